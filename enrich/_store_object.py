"""A checkpoint on object storage (S3, GCS, Azure): `ObjectStore`, through obstore (`pip install
'enrich[cloud]'`).

A checkpoint rests on three guarantees of its store (`enrich._store`); on object storage they come from:

* whole or absent: a PUT makes an object whole or not at all;
* write-if-absent: a conditional PUT (`If-None-Match: *`), so a segment's name is taken once: a second
  writer that finds it taken gets `FileExistsError` and writes nothing;
* one writer: object storage has no lock, so `lock` takes a *lease*, an object `.enrich-lease` in the area
  created if absent and renewed every `lease / 4` seconds by a conditional PUT on its ETag.

What if the process holding a lease dies (a Ray or Spark worker killed mid-shard)? Its lease stops changing.
A new writer that finds a lease watches it, on its own clock, and takes it over (a conditional PUT on the
ETag it watched, so that of two new writers one wins) once it has not changed for `lease` seconds; a lease
that changes while watched has a live holder, and `lock` raises as a held `flock` does. The holder, for its
part, counts its lease valid only for `2/3 * lease` after the start of its last renewal that succeeded:
`write` refuses before and after its PUT once it is not, so that a holder cut off from the store (or paused)
stops writing before anyone can take over, and a write that lands too late raises instead of returning. A
taker therefore sees, when it reads the area, every segment the old holder wrote and acted on; intents
written just before a send are reconciled through the task group, as after a crash on one machine.

Credentials and the endpoint come from the environment as obstore reads them (`AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...), on each
machine that opens the store: they are never pickled or written into the checkpoint.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Final

from ._exceptions import CheckpointError, UsageError
from ._store import CheckpointStore, check_name

__all__ = ["SCHEMES", "ObjectStore"]

#: URL schemes obstore reads: S3 (and S3-compatible servers), Google Cloud Storage, Azure.
SCHEMES: Final = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure")
#: The lease object of an area: not one of its files (never listed).
LEASE: Final = ".enrich-lease"
#: How long a lease lasts without renewal, by default: a killed worker's shard waits this long.
LEASE_SECONDS: Final = 30.0


def _obstore() -> Any:
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError:
        message = "a checkpoint on object storage needs obstore: pip install 'enrich[cloud]'"
        raise UsageError(message) from None
    return obstore


def is_url(where: object) -> bool:
    """Whether `where` is a URL of object storage (`s3://bucket/prefix`, ...)."""
    return isinstance(where, str) and where.split("://", 1)[0].lower() in SCHEMES and "://" in where


class _Lease:
    """The lease an `ObjectStore` holds on its area while locked, renewed by a thread of its own."""

    def __init__(self, store: ObjectStore, key: str, e_tag: str, seconds: float, started: float) -> None:
        self.store, self.key, self.e_tag, self.seconds = store, key, e_tag, seconds
        self.renewed = started  # monotonic start of the last PUT that succeeded
        self.lost = False
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="enrich-lease", daemon=True)
        self._thread.start()

    def valid(self) -> bool:
        return not self.lost and time.monotonic() - self.renewed < self.seconds * 2 / 3

    def _renew(self) -> None:
        obstore = self.store._obstore
        while not self._stop.wait(self.seconds / 4):
            started = time.monotonic()
            self.count += 1
            try:
                body = self.store._lease_body(self.count)
                put = obstore.put(self.store._store, self.key, body, mode={"e_tag": self.e_tag})
            except obstore.exceptions.PreconditionError:
                self.lost = True  # another writer took it over: this one must write no more
                return
            except Exception:
                continue
            self.e_tag, self.renewed = put["e_tag"], started

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        obstore = self.store._obstore
        try:  # marked released (not deleted: a delete is unconditional and could remove a taker's lease)
            body = json.dumps({"released": True}).encode()
            obstore.put(self.store._store, self.key, body, mode={"e_tag": self.e_tag})
        except Exception:
            pass


class ObjectStore(CheckpointStore):
    """A checkpoint area on object storage: `ObjectStore("s3://bucket/jobs/ceo")`.

    `where` is a URL (`s3://`, `gs://`, `az://`, `abfs://`) read by obstore with the credentials of the
    environment, or an obstore store object (`obstore.store.S3Store(...)`, `MemoryStore()`). `lease` is how
    long the lease that makes this process the area's one writer lasts without renewal: a writer that died
    holding it keeps the area for that long. Files are read whole into memory (a segment is a few MB).

    Example:

        store = ObjectStore("s3://bucket/jobs/ceo")
        enrich(df, {"ceo": "Name of the CEO"}, checkpoint=store)
    """

    def __init__(
        self, where: str | Any, *, lease: float = LEASE_SECONDS, _base: str = "", _url: str | None = None
    ) -> None:
        self._obstore = _obstore()
        if isinstance(where, str):
            if not is_url(where):
                raise UsageError(
                    f"{where!r} is not an object-storage URL: give s3://, gs:// or az:// followed by the "
                    "bucket and prefix"
                )
            try:
                self._store = self._obstore.store.from_url(where)
            except Exception as exc:
                raise UsageError(f"cannot use {where}: {exc}".splitlines()[0]) from None
            url = where.rstrip("/")
        else:
            self._store, url = where, _url or f"{type(where).__name__}:/"
        if not (isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0):
            raise UsageError(f"lease must be a positive number of seconds, got {lease!r}")
        self.lease_seconds = float(lease)
        self._base = _base
        self._url = url
        self._lease: _Lease | None = None

    @property
    def url(self) -> str:
        """The URL of the store's root (without its area), for rebuilding it on another machine."""
        return self._url

    @property
    def location(self) -> str:
        return f"{self._url}/{self._base}" if self._base else self._url

    def _key(self, name: str) -> str:
        return f"{self._base}/{name}" if self._base else name

    def _lease_body(self, count: int) -> bytes:
        # The count makes each renewal a new ETag (an ETag is a hash of the body), so watchers see it change.
        body = {"host": socket.gethostname(), "pid": os.getpid(), "seconds": self.lease_seconds}
        return json.dumps(body | {"renewal": count}).encode()

    def list(self, prefix: str = "") -> builtins.list[str]:
        full = self._key(prefix)
        # obstore lists by whole path parts: list the folder `full` is in and keep the names it starts.
        folder = full.rsplit("/", 1)[0] if "/" in full else None
        start = f"{self._base}/" if self._base else ""
        names: builtins.list[str] = []
        try:
            for batch in self._obstore.list(self._store, prefix=folder):
                for meta in batch:
                    path = meta["path"]
                    if path.startswith(full) and path.startswith(start) and path.rsplit("/", 1)[-1] != LEASE:
                        names.append(path[len(start) :])
        except FileNotFoundError:
            return []
        except self._obstore.exceptions.BaseError as exc:
            raise OSError(f"cannot list {self.location}: {_first_line(exc)}") from exc
        return sorted(names)

    def open(self, name: str) -> BinaryIO:
        try:
            data = self._obstore.get(self._store, self._key(check_name(name))).bytes()
        except FileNotFoundError:
            raise
        except self._obstore.exceptions.BaseError as exc:
            raise OSError(f"cannot read {name}: {_first_line(exc)}") from exc
        return io.BytesIO(bytes(data))

    def write(self, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> None:
        key = self._key(check_name(name))
        buffer = io.BytesIO()
        write(buffer)
        self._check_lease()
        try:
            mode = "overwrite" if overwrite else "create"
            self._obstore.put(self._store, key, buffer.getbuffer(), mode=mode)
        except self._obstore.exceptions.AlreadyExistsError:
            raise FileExistsError(f"{self.location}: {name} exists") from None
        except self._obstore.exceptions.BaseError as exc:
            raise OSError(f"cannot write {name}: {_first_line(exc)}") from exc
        self._check_lease()  # a write that landed after the lease ran out may not be acted on

    def delete(self, name: str) -> None:
        self._check_lease()
        try:
            self._obstore.delete(self._store, self._key(check_name(name)))
        except FileNotFoundError:
            pass
        except self._obstore.exceptions.BaseError as exc:
            raise OSError(f"cannot delete {name}: {_first_line(exc)}") from exc

    def lock(self) -> None:
        if self._lease is not None:
            raise self._in_use()
        obstore = self._obstore
        key = self._key(LEASE)
        watched: str | None = None  # the ETag of another writer's lease, and since when it has not changed
        since = 0.0
        while True:
            started = time.monotonic()
            try:
                put = obstore.put(self._store, key, self._lease_body(0), mode="create")
                break
            except obstore.exceptions.AlreadyExistsError:
                pass
            except obstore.exceptions.BaseError as exc:
                raise OSError(f"cannot take the lease of {self.location}: {_first_line(exc)}") from exc
            try:
                found = obstore.get(self._store, key)
                e_tag, body = found.meta["e_tag"], bytes(found.bytes())
            except FileNotFoundError:
                continue  # released and removed meanwhile: create it
            released = _released(body)
            if not released and e_tag != watched:
                if watched is not None:
                    raise self._in_use()  # it was renewed while watched: its writer is alive
                watched, since = e_tag, time.monotonic()
            if released or time.monotonic() - since >= self.lease_seconds:
                started = time.monotonic()
                try:  # taken over only if it is still the lease watched (of two takers, one wins)
                    put = obstore.put(self._store, key, self._lease_body(0), mode={"e_tag": e_tag})
                    break
                except obstore.exceptions.PreconditionError:
                    watched = None
                    continue
            time.sleep(min(1.0, self.lease_seconds / 10))
        self._lease = _Lease(self, key, put["e_tag"], self.lease_seconds, started)

    def unlock(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def child(self, name: str) -> ObjectStore:
        return ObjectStore(
            self._store, lease=self.lease_seconds, _base=self._key(check_name(name)), _url=self._url
        )

    def _check_lease(self) -> None:
        if self._lease is not None and not self._lease.valid():
            raise CheckpointError(
                f"checkpoint {self.location}: this process lost its lease on the area (cut off from the "
                f"store for {self.lease_seconds * 2 / 3:.0f} s, or another writer took it over); nothing "
                "more is written: run the job again"
            )

    def _in_use(self) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.location} is in use by another enrich process (its lease is being renewed); "
            "wait for it to end or stop it"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its URL where it is unpickled (credentials from that machine's environment).
        if not is_url(self._url):
            raise TypeError(f"an ObjectStore of {self._url} cannot be sent to another process: give a URL")
        return (_rebuild, (self._url, self.lease_seconds, self._base))


def _rebuild(url: str, lease: float, base: str) -> ObjectStore:
    store = ObjectStore(url, lease=lease)
    return store.child(base) if base else store


def _released(body: bytes) -> bool:
    try:
        return bool(json.loads(body).get("released"))
    except (ValueError, AttributeError):
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
