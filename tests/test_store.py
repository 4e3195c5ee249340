"""The checkpoint store: its contract on both stores, LocalStore's durability and lock, a checkpoint and a
whole job on a MemoryStore, and a job on a store written from the interface alone."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

import httpx
import polars as pl
import pytest

from enrich import (
    CheckpointError,
    CheckpointStore,
    EmulatorConfig,
    JobStats,
    LocalStore,
    MemoryStore,
    UsageError,
    create_app,
    enrich,
    plan,
)
from enrich._checkpoint import Checkpoint, Outcome, Receipt
from enrich._engine import aenrich

FP = {"processor": "base", "mode": "group", "output_schema": {"type": "object"}}
FIELDS = {"ceo": "Name of the current CEO", "founded": ("integer", "Year founded")}


def key(i: int) -> str:
    return f"{i:032x}"


def put(data: bytes) -> Callable[[BinaryIO], object]:
    return lambda f: f.write(data)


def read(store: CheckpointStore, name: str) -> bytes:
    with store.open(name) as f:
        return f.read()


@pytest.fixture(params=["local", "memory", "object"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "local":
        local = LocalStore(tmp_path / "store")
        local.create()
        return local
    if request.param == "object":  # object storage, as obstore sees it (its in-memory store)
        return object_store()
    return MemoryStore()


def object_store(lease: float = 0.4) -> Any:
    obstore = pytest.importorskip("obstore.store")
    from enrich._store_object import ObjectStore

    return ObjectStore(obstore.MemoryStore(), lease=lease)


# -- the contract, on both stores ----------------------------------------------------------------------------


def test_write_if_absent_refuses_an_existing_name(store: CheckpointStore) -> None:
    store.write("receipts-000000001.parquet", put(b"first"))
    with pytest.raises(FileExistsError):
        store.write("receipts-000000001.parquet", put(b"second"))
    assert read(store, "receipts-000000001.parquet") == b"first"
    assert store.list() == ["receipts-000000001.parquet"]


def test_overwrite_replaces(store: CheckpointStore) -> None:
    store.write("pacing.json", put(b"{}"), overwrite=True)  # also when absent
    store.write("pacing.json", put(b'{"size": 2}'), overwrite=True)
    assert read(store, "pacing.json") == b'{"size": 2}'
    assert store.list() == ["pacing.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_write_that_raises_midway_leaves_nothing(store: CheckpointStore, overwrite: bool) -> None:
    store.write("kept.json", put(b"old"))

    def half(f: BinaryIO) -> None:
        f.write(b"PAR1 half of a segment")
        raise RuntimeError("the process was told to stop")

    for name in ("new.parquet", "kept.json") if overwrite else ("new.parquet",):
        with pytest.raises(RuntimeError, match="told to stop"):
            store.write(name, half, overwrite=overwrite)
    assert store.list() == ["kept.json"]
    assert read(store, "kept.json") == b"old"
    with pytest.raises(FileNotFoundError):
        store.open("new.parquet")
    if isinstance(store, LocalStore):
        assert sorted(p.name for p in store.path.iterdir()) == ["kept.json"]  # no .tmp left behind


def test_list_prefix_and_children(store: CheckpointStore) -> None:
    store.write("manifest.json", put(b"{}"))
    store.write("receipts-000000002.parquet", put(b"r"))
    typed = store.child("typed")
    typed.write("typed-ab-1.parquet", put(b"t"))
    shard = store.child("shards/03")
    shard.write("manifest.json", put(b"s"))
    assert store.list() == [
        "manifest.json",
        "receipts-000000002.parquet",
        "shards/03/manifest.json",
        "typed/typed-ab-1.parquet",
    ]
    assert store.list("receipts-") == ["receipts-000000002.parquet"]
    assert store.list("typed/") == ["typed/typed-ab-1.parquet"]
    assert store.list("shards/0") == ["shards/03/manifest.json"]
    assert typed.list() == ["typed-ab-1.parquet"] and typed.list("nothing") == []
    assert store.child("shards").list() == ["03/manifest.json"]
    assert read(store.child("shards").child("03"), "manifest.json") == b"s"
    assert read(store, "shards/03/manifest.json") == b"s"
    assert shard.location.endswith("03") and store.location in shard.location
    assert store.child("never").list() == []


def test_open_is_seekable(store: CheckpointStore) -> None:
    store.write("f.bin", put(b"0123456789PAR1"))
    with store.open("f.bin") as f:
        f.seek(-4, io.SEEK_END)
        assert f.read() == b"PAR1"
        f.seek(0)
        assert f.read(2) == b"01"


def test_delete(store: CheckpointStore) -> None:
    store.delete("missing.parquet")  # fine
    store.write("a.parquet", put(b"a"))
    store.child("typed").write("b.parquet", put(b"b"))
    store.delete("a.parquet")
    store.delete("typed/b.parquet")
    assert store.list() == []
    store.write("a.parquet", put(b"again"))  # a deleted name may be written again
    assert read(store, "a.parquet") == b"again"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "./a", "a//b", "a/"])
def test_bad_names_are_refused(store: CheckpointStore, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        store.write(name, put(b"x"))
    with pytest.raises(ValueError, match="name"):
        store.open(name)


def test_one_writer_per_area(store: CheckpointStore) -> None:
    # Another handle on the same directory; the same MemoryStore (a second Checkpoint.open on it).
    if isinstance(store, LocalStore):
        other: CheckpointStore = LocalStore(store.path)
    elif type(store).__name__ == "ObjectStore":
        other = type(store)(store._store, lease=store.lease_seconds)  # type: ignore[attr-defined]
    else:
        other = store
    store.lock()
    with pytest.raises(CheckpointError, match="in use by another"):
        other.lock()
    child = store.child("shards/03")
    child.create()
    child.lock()  # an area's lock is its own
    child.unlock()
    store.unlock()
    store.unlock()  # not holding it: nothing
    other.lock()
    other.unlock()


def test_exists_and_create(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "a" / "b")
    assert not local.exists()
    local.create()
    assert local.exists() and local.path.is_dir()
    memory = MemoryStore()
    assert not memory.exists()
    memory.create()
    assert memory.exists() and memory.list() == []
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        LocalStore(tmp_path / "file").create()


# -- LocalStore ----------------------------------------------------------------------------------------------


def test_local_lock_held_by_another_process_fails(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from enrich._store import LocalStore; s = LocalStore(sys.argv[1]); s.create(); "
            "s.lock(); print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        mine = LocalStore(path)
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is in use by another enrich process"):
            mine.lock()
        with pytest.raises(CheckpointError, match="in use by another enrich process"):
            Checkpoint.open(path, FP)
    finally:
        holder.kill()  # as SIGKILL: the kernel drops the flock
        holder.communicate()
    mine.lock()
    mine.unlock()


def test_local_lock_removes_debris_and_a_reader_does_not(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "cp")
    store.create()
    store.write("manifest.json", put(b"{}"))
    (store.path / "receipts-000000002.parquet.tmp").write_bytes(b"half")
    assert store.list() == ["manifest.json"]  # a file being written is not listed
    with pytest.raises(ValueError, match=r"\.tmp"):
        store.write("x.tmp", put(b""))
    assert (store.path / "receipts-000000002.parquet.tmp").exists()
    store.lock()
    assert sorted(p.name for p in store.path.iterdir()) == ["manifest.json"]
    store.unlock()


def test_local_write_if_absent_links_without_replacing(tmp_path: Path) -> None:
    """The new file is linked into place: a file that appeared meanwhile (another writer on a file system
    without locks) is never replaced. Without hard links (FAT, some mounts) it still refuses."""
    store = LocalStore(tmp_path / "cp")
    store.create()
    real_link = os.link

    def someone_was_first(src: Any, dst: Any) -> None:
        Path(dst).write_bytes(b"theirs")
        real_link(src, dst)

    with mock.patch("os.link", someone_was_first), pytest.raises(FileExistsError):
        store.write("groups-000000001.parquet", put(b"mine"))
    assert read(store, "groups-000000001.parquet") == b"theirs"
    assert not list(store.path.glob("*.tmp"))
    with mock.patch("os.link", side_effect=OSError(errno.EPERM, "Operation not permitted")):
        store.write("groups-000000002.parquet", put(b"no links"))
        with pytest.raises(FileExistsError):
            store.write("groups-000000002.parquet", put(b"again"))
    assert read(store, "groups-000000002.parquet") == b"no links"
    assert store.list() == ["groups-000000001.parquet", "groups-000000002.parquet"]


def test_local_child_directories_are_made_but_not_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "cp")
    store.create()
    store.child("shards/03").write("manifest.json", put(b"{}"))
    assert (tmp_path / "cp" / "shards" / "03" / "manifest.json").read_bytes() == b"{}"
    gone = LocalStore(tmp_path / "deleted")  # a checkpoint deleted under a running job: its writes fail
    with pytest.raises(FileNotFoundError):
        gone.write("receipts-000000001.parquet", put(b"r"))
    assert not (tmp_path / "deleted").exists()


# -- a checkpoint on a MemoryStore ---------------------------------------------------------------------------


@pytest.fixture
def no_files() -> Iterator[None]:
    """Every file system call a checkpoint could make fails: what runs under it assumes no disk."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file system call {args!r}")

    with (
        mock.patch("os.fsync", refused),
        mock.patch("os.replace", refused),
        mock.patch("os.link", refused),
        mock.patch("os.scandir", refused),
        mock.patch("os.listdir", refused),
        mock.patch("os.unlink", refused),
        mock.patch("os.mkdir", refused),
    ):
        yield


@pytest.mark.usefixtures("no_files")
def test_checkpoint_on_a_memory_store() -> None:
    store = MemoryStore()
    cp = Checkpoint.open(store, FP, compact_fanout=2, flush_rows=2, flush_seconds=float("inf"))
    assert cp.store is store and cp.directory is None
    cp.record_group("g")
    for i in range(20):
        cp.record_intents(f"b{i}", "g", [key(i)])
        if i % 5 != 4:  # every fifth create's answer was lost: in doubt
            cp.record_receipts([Receipt(key(i), f"r{i}", "g", f"b{i}")])
            cp.add_outcomes([Outcome(key(i), f"r{i}", "completed", output=f'{{"n": {i}}}')])
    state = cp.state()
    segments = [n for n in store.list() if n.endswith(".parquet")]
    assert len(segments) <= 4 * 5  # compacted: at most fanout - 1 per tier of each kind
    assert cp.warnings == []
    with pytest.raises(CheckpointError, match=f"checkpoint {store.location} is in use by another"):
        Checkpoint.open(store, FP)
    reader = Checkpoint.read(store)
    assert reader.state().equals(state)
    cp._abandon()  # as if killed: the buffered outcome is lost, every record is not
    cp = Checkpoint.open(store, FP)
    assert [i.batch_id for i in cp.in_doubt()] == ["b4", "b9", "b14", "b19"]
    assert cp.counts().runs == 16 and cp.counts().completed == 16
    assert cp.state()["output"].to_list() == [f'{{"n": {i}}}' for i in range(20) if i % 5 != 4]
    cp.resolve_intents("b4")
    cp.record_pacing({"size": 3})
    cp.close()
    again = Checkpoint.open(store, FP, create=False)
    assert [i.batch_id for i in again.in_doubt()] == ["b9", "b14", "b19"] and again.pacing == {"size": 3}
    again.close()
    with pytest.raises(CheckpointError, match="no checkpoint at memory://"):
        Checkpoint.open(MemoryStore(), FP, create=False)


def test_memory_store_is_thread_safe() -> None:
    store = MemoryStore()
    won: list[int] = []

    def write(i: int) -> None:
        try:
            store.write("manifest.json", put(str(i).encode()))
            won.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and read(store, "manifest.json") == str(won[0]).encode()


# -- jobs ---------------------------------------------------------------------------------------------------


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"company": [f"Company {i}" for i in range(n)], "website": [f"c{i}.com" for i in range(n)]}
    )


def job(app: Any, df: pl.DataFrame, checkpoint: Any, **kw: Any) -> tuple[pl.DataFrame, JobStats]:
    stats = JobStats()
    out = asyncio.run(
        aenrich(
            df,
            FIELDS,
            api_key="test-key",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            processor="lite",
            progress=False,
            service="emulator",
            checkpoint=checkpoint,
            stats=stats,
            **kw,
        )
    )
    return out, stats


def test_a_job_on_a_memory_store_resumes_without_a_request(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(30)
    store = MemoryStore()
    first, stats = job(app, df, store)
    assert first["_status"].to_list() == ["completed"] * 30 and stats.requests > 0
    assert stats.checkpoint == store.location
    assert store.list("typed/")  # the join kept its typed answers in the store too
    again, stats = job(app, df, store)
    assert stats.requests == 0 and again.equals(first)
    assert app.stats()["runs_created"] == 30
    estimate = plan(df, FIELDS, processor="lite", checkpoint=store, service="emulator")
    assert estimate.done == 30 and estimate.to_submit == 0 and estimate.checkpoint == store.location
    out = tmp_path / "out.parquet"
    job(app, df, store, write_to=out)  # a file written from a store that is not a directory
    assert pl.read_parquet(out).equals(first)


def test_the_sync_call_takes_a_store() -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    store = MemoryStore()
    kw: dict[str, Any] = {
        "api_key": "k",
        "base_url": "http://emulator",
        "processor": "lite",
        "progress": False,
    }
    kw |= {"transport": httpx.ASGITransport(app=app), "checkpoint": store}
    enrich(companies(5), FIELDS, **kw)
    stats = JobStats()
    enrich(companies(5), FIELDS, stats=stats, **kw)
    assert stats.requests == 0 and app.stats()["runs_created"] == 5


class DictStore(CheckpointStore):
    """A store written from the interface alone, as one for object storage would be: flat keys with a
    prefix per area, whole values, conditional writes, a lock per area."""

    def __init__(self, objects: dict[str, bytes] | None = None, prefix: str = "") -> None:
        self.objects = objects if objects is not None else {}
        self.prefix = prefix
        self.held = False

    @property
    def location(self) -> str:
        return f"dict://{self.prefix}"

    def list(self, prefix: str = "") -> list[str]:
        start = self.prefix + prefix
        return sorted(k[len(self.prefix) :] for k in self.objects if k.startswith(start) and "#" not in k)

    def open(self, name: str) -> BinaryIO:
        try:
            return io.BytesIO(self.objects[self.prefix + name])
        except KeyError:
            raise FileNotFoundError(name) from None

    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        body = io.BytesIO()
        write(body)
        if not overwrite and self.prefix + name in self.objects:
            raise FileExistsError(name)
        self.objects[self.prefix + name] = body.getvalue()

    def delete(self, name: str) -> None:
        self.objects.pop(self.prefix + name, None)

    def lock(self) -> None:
        if self.prefix + "#lock" in self.objects:
            raise CheckpointError(f"checkpoint {self.location} is in use by another writer")
        self.objects[self.prefix + "#lock"] = b""
        self.held = True

    def unlock(self) -> None:
        if self.held:
            self.objects.pop(self.prefix + "#lock", None)
            self.held = False

    def child(self, name: str) -> DictStore:
        return DictStore(self.objects, self.prefix + name + "/")


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_a_store_with_only_the_abstract_methods_runs_a_job(mode: str) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(40)
    store = DictStore()
    first, stats = job(app, df, store, mode=mode)
    assert stats.requests > 0 and first["_status"].to_list() == ["completed"] * 40
    assert "manifest.json" in store.objects and any(k.startswith("typed/") for k in store.objects)
    assert "#lock" not in store.objects  # released
    again, stats = job(app, df, DictStore(store.objects), mode=mode)  # another handle, the same objects
    assert stats.requests == 0 and again.equals(first)
    assert app.stats()["runs_created"] == 40
    more, stats = job(app, companies(45), DictStore(store.objects), mode=mode)
    assert app.stats()["runs_created"] == 45 and more.head(40).equals(first)


def test_a_child_area_is_made_level_by_level_and_never_remakes_a_deleted_root(tmp_path: Path) -> None:
    from enrich import LocalStore

    root = LocalStore(tmp_path / "cp")
    root.create()
    shard = root.child("shards/03")
    shard.create()
    assert (tmp_path / "cp" / "shards" / "03").is_dir()
    (tmp_path / "cp" / "shards" / "03").rmdir()
    (tmp_path / "cp" / "shards").rmdir()
    (tmp_path / "cp").rmdir()  # the checkpoint deleted under a running job
    with pytest.raises(OSError):
        root.child("shards/04").create()
    assert not (tmp_path / "cp").exists()


# -- object storage (obstore): a job on it, and the lease that stands in for a lock -------------------------


def test_a_job_on_object_storage_resumes_without_a_request(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(40)
    store = object_store(lease=30)
    first, stats = job(app, df, store, _shard_rows=16)  # in shards: each its own area and lease
    assert first["_status"].to_list() == ["completed"] * 40 and stats.requests > 0
    assert any(name.startswith("shards/") for name in store.list())
    assert not [name for name in store.list() if "lease" in name]  # the lease is not one of its files
    again, stats = job(app, df, store, _shard_rows=16)
    assert stats.requests == 0 and again.equals(first)
    assert app.stats()["runs_created"] == 40
    out = tmp_path / "out.parquet"
    job(app, df, store, _shard_rows=16, write_to=out)
    assert pl.read_parquet(out).equals(first)


def test_a_lease_whose_holder_died_is_taken_over_and_fences_the_old_holder() -> None:
    holder = object_store(lease=0.6)
    other = type(holder)(holder._store, lease=0.6)
    holder.lock()
    holder.write("intents-000000001.parquet", put(b"i"))
    holder._lease._stop.set()  # the holder stops renewing (killed, paused, cut off from the store)
    started = time.monotonic()
    other.lock()  # waits until the lease has not changed for `lease` seconds, then takes it over
    assert 0.5 <= time.monotonic() - started < 5
    with pytest.raises(CheckpointError, match="lost its lease"):
        holder.write("intents-000000002.parquet", put(b"late"))  # nothing written by the old holder
    assert other.list() == ["intents-000000001.parquet"]
    other.write("intents-000000002.parquet", put(b"new"))
    other.unlock()
    third = type(holder)(holder._store, lease=60)
    started = time.monotonic()
    third.lock()  # a released lease is taken at once
    assert time.monotonic() - started < 1
    third.unlock()


def test_a_live_lease_is_not_taken() -> None:
    holder = object_store(lease=0.4)
    holder.lock()
    try:
        for _ in range(3):  # renewed every 0.1 s: always held
            with pytest.raises(CheckpointError, match="in use by another"):
                type(holder)(holder._store, lease=0.4).lock()
        holder.write("a.json", put(b"{}"))
    finally:
        holder.unlock()


def test_object_storage_urls() -> None:
    pytest.importorskip("obstore")
    from enrich._store import as_store
    from enrich._store_object import ObjectStore

    with pytest.raises(UsageError, match="a URL must be object storage"):
        as_store("ftp://host/x")
    with pytest.raises(UsageError, match="a URL must be object storage"):
        enrich(companies(2), FIELDS, checkpoint="http://host/x", api_key="k", base_url="http://emulator")
    store = as_store("s3://bucket/jobs/ceo")
    assert isinstance(store, ObjectStore) and store.location == "s3://bucket/jobs/ceo"
    assert store.child("shards/03").location == "s3://bucket/jobs/ceo/shards/03"
    # Sent to another process as its URL and area: credentials come from that machine's environment.
    again = pickle.loads(pickle.dumps(store.child("shards/03")))
    assert again.location == "s3://bucket/jobs/ceo/shards/03"
    with pytest.raises(TypeError, match="give a URL"):
        pickle.dumps(object_store())


def test_a_taker_waits_the_holders_lease_not_its_own() -> None:
    holder = object_store(lease=2.0)  # renewed every 0.5 s
    holder.lock()
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="in use by another"):  # not taken after 0.3 s
            type(holder)(holder._store, lease=0.3).lock()
        assert time.monotonic() - started < 2
        holder.write("a.json", put(b"{}"))
    finally:
        holder.unlock()


def test_a_renewal_whose_answer_was_lost_keeps_the_lease_and_a_takeover_fences_at_once() -> None:
    obstore = pytest.importorskip("obstore")
    holder = object_store(lease=0.8)  # renewed every 0.2 s; valid for 0.53 s after each
    holder.lock()
    lease = holder._lease
    key = lease.key
    # Its own renewal landed but the answer was lost: the lease changed under it, with its own token.
    obstore.put(holder._store, key, holder._lease_body(lease.token, 99))
    time.sleep(0.5)
    assert not lease.lost
    holder.write("a.json", put(b"{}"))
    # Another writer took it over (a body with another token): the holder stops writing at its next
    # renewal, long before its lease would have run out by time alone.
    obstore.put(holder._store, key, holder._lease_body("someone-else", 0))
    time.sleep(0.35)
    assert lease.lost
    with pytest.raises(CheckpointError, match="lost its lease"):
        holder.write("b.json", put(b"{}"))
    holder.unlock()  # (a lost lease is not released: it is the taker's)
    assert b"someone-else" in bytes(obstore.get(holder._store, key).bytes())


def test_object_storage_errors_while_taking_a_lease_are_checkpoint_errors(monkeypatch: Any) -> None:
    obstore = pytest.importorskip("obstore")
    holder, other = object_store(lease=5), None
    holder.lock()
    other = type(holder)(holder._store, lease=5)

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise obstore.exceptions.GenericError("503 Slow Down")

    monkeypatch.setattr(obstore, "get", unavailable)
    with pytest.raises(OSError, match=r"cannot take the lease.*503 Slow Down"):
        other.lock()
    monkeypatch.undo()
    holder.unlock()
    with pytest.raises(CheckpointError, match="cannot open checkpoint"):
        monkeypatch.setattr(obstore, "get", unavailable)
        Checkpoint.open(other, FP)  # the lease is free now, but its first read fails: one clear error
