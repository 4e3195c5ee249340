"""The join written to a file in parts (`write_to`, `enrich run -o`) gives the file the whole frame gives.

The part sizes are shrunk so that a job of a few hundred rows goes through every step many times: the
answers set aside in several spill files per part, many parts, many record batches per part, many chunks.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import EmulatorConfig, UsageError, create_app
from enrich._engine import JobStats, aenrich, assemble
from enrich._io import read_table, write_table

FIELDS = {
    "ceo": "Name of the current CEO",
    "founded": ("integer", "Year founded"),
    "revenue": ("number", "Revenue in USD"),
    "public": ("boolean", "Is it listed?"),
    "segment": ("enum", ["b2b", "b2c"], "Market"),
    "products": ("array", "Main products"),
    "hq": ("object", {"city": "City", "country": "Country"}, "Headquarters"),
}


def table(rows: int, distinct: int, seed: int = 7) -> pl.DataFrame:
    """`rows` rows of `distinct` inputs, repeats in random order (a row may reuse an input seen long
    before), one input too large to send (failed before sending), and columns of several types."""
    rng = random.Random(seed)
    picks = [i if i < distinct else rng.randrange(distinct) for i in range(rows)]
    rng.shuffle(picks)
    names = [f"Company {i}" if i else "x" * 30_000 for i in picks]
    return pl.DataFrame(
        {
            "company": names,
            "zip": [f"{i:05d}" for i in picks],
            "score": [i / 7 if i % 5 else None for i in picks],
            "tags": [[f"t{i % 3}"] * (i % 3) for i in picks],
        }
    )


def run(app: Any, data: Any, **kw: Any) -> Any:
    return asyncio.run(
        aenrich(
            data,
            FIELDS,
            api_key="test-key",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            progress=False,
            processor="lite",
            columns=["company"],
            **kw,
        )
    )


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Small sizes; counts what the file join did: parts, spill files, record batches, chunks."""
    # ~10 distinct rows with their basis per part (a basis entry per array element included)
    monkeypatch.setattr(assemble, "PART_BYTES", 30_000)
    monkeypatch.setattr(assemble, "SPILL_BYTES", 20_000)  # answers set aside several times per part
    monkeypatch.setattr(assemble, "BATCH_BYTES", 8_000)
    monkeypatch.setattr(assemble, "CHUNK_BYTES", 30_000)
    monkeypatch.setattr(assemble, "MIN_PART_ROWS", 1)
    monkeypatch.setattr(assemble, "MIN_CHUNK_ROWS", 1)
    seen = {"parts": 0, "spilled": 0, "batches": 0, "chunks": 0}
    write_parts, merge = assemble.write_parts, assemble.merge

    def counting_parts(plan: Any, spill: assemble.Spill, *args: Any, **kw: Any) -> Any:
        seen["spilled"] = sum(spill._files.values())
        parts, statuses, schema = write_parts(plan, spill, *args, **kw)
        seen["parts"] = len(parts)
        seen["batches"] = sum(len(p.firsts) for p in parts)
        return parts, statuses, schema

    def counting_merge(*args: Any, **kw: Any) -> Any:
        for chunk in merge(*args, **kw):
            seen["chunks"] += 1
            yield chunk

    monkeypatch.setattr(assemble, "write_parts", counting_parts)
    monkeypatch.setattr(assemble, "merge", counting_merge)
    return seen


@pytest.mark.parametrize("name", ["out.parquet", "out.csv", "out.jsonl", "out.json", "out.csv.gz"])
def test_a_file_written_in_parts_is_the_file_of_the_whole_frame(
    tmp_path: Path, small_parts: dict[str, int], name: str
) -> None:
    df = table(360, 150)
    # A cost cap leaves rows pending (with their reason), and one input is refused before sending.
    kw = {"basis": True, "max_cost": 0.005 * 120, "checkpoint": tmp_path / "cp"}
    stats = JobStats()
    app = create_app(EmulatorConfig(latency=0.02, seed=1))
    assert run(app, df, write_to=tmp_path / name, stats=stats, **kw) is None
    assert app.stats()["runs_created"] == 120
    # It went through each step many times (a part has ~10 distinct rows; a chunk ~30 KB).
    seen = small_parts
    assert seen["parts"] >= 10 and seen["spilled"] >= 10, seen  # the answers went by disk
    assert seen["batches"] > 2 * seen["parts"] and seen["chunks"] >= 10, seen
    # The same call again sends nothing (the cap is reached) and returns the frame: the reference.
    whole = run(app, df, stats=JobStats(), **kw)
    assert app.stats()["runs_created"] == 120
    assert set(whole["_status"].to_list()) == {"completed", "failed", "pending"}
    counts = whole["_status"].value_counts()
    assert stats.statuses == dict(zip(counts["_status"].to_list(), counts["count"].to_list(), strict=True))
    write_table(whole, tmp_path / f"whole-{name}")
    got, want = (tmp_path / name).read_bytes(), (tmp_path / f"whole-{name}").read_bytes()
    if name.endswith(".gz"):
        got, want = gzip.decompress(got), gzip.decompress(want)
    if name.endswith(".parquet"):
        assert read_table(tmp_path / name).equals(whole)
    else:  # text formats: byte for byte
        assert got == want
    assert not list(tmp_path.glob(".enrich-parts-*")), "the parts were not removed"


def test_parts_hold_the_rows_of_their_answers_in_order(tmp_path: Path, small_parts: dict[str, int]) -> None:
    """Every row lands once, in its place, with its own answer, whatever the part of its input."""
    df = table(500, 60, seed=3).with_row_index("i")
    app = create_app(EmulatorConfig(latency=0.02))
    run(app, df, write_to=tmp_path / "out.parquet", checkpoint=tmp_path / "cp")
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["i"].to_list() == list(range(500))
    assert out.select(df.columns).equals(df)
    by_input = out.filter(pl.col("_status") == "completed").group_by("company").agg(pl.col("ceo").n_unique())
    assert by_input["ceo"].max() == 1  # one answer per input, whichever row asks for it


def test_an_output_that_cannot_be_written_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    with pytest.raises(UsageError, match="does not exist"):
        run(app, table(10, 10), write_to=tmp_path / "missing" / "out.parquet")
    with pytest.raises(UsageError, match="unknown file type"):
        run(app, table(10, 10), write_to=tmp_path / "out.xlsx")
    with pytest.raises(UsageError, match="give write_to too"):
        run(app, table(10, 10), write_format="csv")
    assert app.stats()["requests_total"] == 0


def test_stdout_gets_the_file(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    df = table(30, 20)
    run(app, df.slice(1), write_to="-", write_format="jsonl", checkpoint=tmp_path / "cp")
    text = capfdbinary.readouterr().out.decode()
    assert len(text.splitlines()) == 29 and '"_status":"completed"' in text


def test_a_failed_write_keeps_even_a_temporary_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint=False removes its directory once every row finished, but only after the result is out:
    a write that fails leaves the answers (paid for) where the error says."""
    import errno

    import enrich._engine.pipeline as pipeline
    from enrich import OutputError

    def full(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_frames", full)
    app = create_app(EmulatorConfig(latency=0.02))
    stats = JobStats()
    with pytest.raises(OutputError, match="No space left on device; every answer is kept in ") as caught:
        run(app, table(20, 20).slice(1), write_to=tmp_path / "out.parquet", checkpoint=False, stats=stats)
    assert isinstance(caught.value, OSError) and stats.checkpoint in str(caught.value)
    assert Path(stats.checkpoint).is_dir()


def test_a_resumed_join_reads_the_answers_typed_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job's answers are typed once: the resume reads them from `typed/` in the checkpoint,
    decodes nothing, and gives the same frame. A typed file that cannot be read is set aside and its
    answers typed again from their JSON (the record), with the same result."""
    from enrich._schema import OutputSpec

    app = create_app(EmulatorConfig(latency=0.02))
    df = table(200, 120, seed=5)
    cp = tmp_path / "cp"
    first = run(app, df, checkpoint=cp, basis=True)
    files = list((cp / "typed").glob("typed-*.parquet"))
    assert files
    decoded: list[int] = []
    to_frame = OutputSpec.to_frame

    def counting(self: OutputSpec, contents: Any) -> Any:
        decoded.append(sum(c is not None for c in contents))
        return to_frame(self, contents)

    monkeypatch.setattr(OutputSpec, "to_frame", counting)
    again = run(app, df, checkpoint=cp, basis=True)
    assert sum(decoded) == 0 and again.equals(first)
    for f in files:
        f.write_bytes(b"PAR1 damaged")
    decoded.clear()
    third = run(app, df, checkpoint=cp, basis=True)
    assert sum(decoded) == 119 and third.equals(first)  # every completed input (one is refused locally)
    assert len(list((cp / "typed").glob("*.unreadable"))) == len(files)
    assert app.stats()["runs_created"] == 119


def test_without_the_basis_a_resumed_join_reads_no_answer_text_it_typed_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the basis, an answer typed before is joined from `typed/` alone: the text of its record
    is not read again (a million-row resume spent most of its join there). An answer typed before
    whose record is gone is still never passed off as read: its row says it could not be read."""
    from enrich._checkpoint import Checkpoint

    app = create_app(EmulatorConfig(latency=0.02))
    df = table(200, 120, seed=6)
    cp = tmp_path / "cp"
    first = run(app, df, checkpoint=cp)
    read: list[int] = []
    answers = Checkpoint.answers

    def counting(self: Checkpoint, run_ids: Any, **kw: Any) -> Any:
        read.append(len(run_ids))
        return answers(self, run_ids, **kw)

    monkeypatch.setattr(Checkpoint, "answers", counting)
    again = run(app, df, checkpoint=cp)
    assert again.equals(first) and sum(read) == 0
    # With the basis every record is read (the basis is in it), and the typed answers are reused.
    with_basis = run(app, df, checkpoint=cp, basis=True)
    assert sum(read) == 119 and with_basis.drop("_basis").equals(first)
    assert app.stats()["runs_created"] == 119


_NO_NUMPY = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed: `import numpy` raises ImportError
import asyncio
import httpx
import polars as pl
from enrich import EmulatorConfig, aenrich, create_app

app = create_app(EmulatorConfig(latency=0.02, basis_bytes=600))
df = pl.DataFrame({"company": [f"C{i % 40}" for i in range(100)]})
kw = dict(
    api_key="k", base_url="http://emulator", transport=httpx.ASGITransport(app=app), progress=False,
    processor="core", basis=True, checkpoint=sys.argv[1],
)
spec = {"ceo": "CEO", "founded": ("integer", "Year")}
out = asyncio.run(aenrich(df, spec, **kw))
asyncio.run(aenrich(df, spec, write_to=sys.argv[1] + ".parquet", **kw))
assert out["_status"].to_list() == ["completed"] * 100
assert pl.read_parquet(sys.argv[1] + ".parquet").equals(out)
print("ok")
"""


def test_a_job_needs_no_numpy(tmp_path: Path) -> None:
    """numpy is not a dependency (pandas brings it to the test extra, not to users): a job with its basis,
    to a frame and to a file, runs where `import numpy` fails. (A fresh `pip install .` found the join
    importing it.)"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _NO_NUMPY, str(tmp_path / "cp")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("step", [1, 2, 3, 6])
def test_interaction_ids_a_part_left_out_come_back_as_its_run_ids(tmp_path: Path, step: int) -> None:
    """A part whose interaction ids are its run ids leaves the column out (one copy of the ids, not two);
    merged with a part whose service gave ids of their own, every row gets its own run's."""
    import pyarrow as pa

    def part(name: str, rows: list[int], interactions: list[str | None] | None) -> assemble._Part:
        frame = pl.DataFrame({"ceo": [f"ceo {r}" for r in rows], "_run_id": [f"run_{r}" for r in rows]})
        if interactions is not None:
            frame = frame.with_columns(pl.Series("_interaction_id", interactions, dtype=pl.String))
        frame = frame.with_columns(pl.Series(assemble._ROW, rows, dtype=pl.Int64))
        path = tmp_path / f"{name}-{step}.arrow"
        table = frame.to_arrow()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
        return assemble._Part(path, rows[::2], same=interactions is None)

    schema = pl.Schema({"ceo": pl.String, "_run_id": pl.String, "_interaction_id": pl.String})
    parts = [part("same", [0, 2, 4], None), part("own", [1, 3, 5], ["int_1", None, "int_5"])]
    chunks = list(assemble.merge(parts, 6, step))
    assert len(chunks) == -(-6 // step)
    got = pl.concat(chunks)
    assert got.schema == schema
    assert got.to_dicts() == [
        {"ceo": f"ceo {r}", "_run_id": f"run_{r}", "_interaction_id": i}
        for r, i in enumerate(["run_0", "int_1", "run_2", None, "run_4", "int_5"])
    ]


def test_an_output_field_named_d_keeps_each_rows_answer(tmp_path: Path) -> None:
    """The answers typed by a join are kept and read back by the next one, each placed on its row by a
    row number carried beside them: a field named like that column once took its place (687 rows of
    1,200 got another row's answer, or the join failed)."""
    fields = {"d": ("integer", "Some number"), "name": "A name"}
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(300)]})
    app = create_app(EmulatorConfig(latency=0.0, seed=1))

    def call() -> pl.DataFrame:
        return asyncio.run(
            aenrich(
                df, fields, api_key="k", base_url="http://emulator", transport=httpx.ASGITransport(app=app),
                progress=False, processor="lite", checkpoint=tmp_path / "cp",
            )
        )  # fmt: skip

    first = call()
    again = call()  # joined from the answers the first call typed
    assert again.equals(first) and app.stats()["runs_created"] == 300
    for typed in (tmp_path / "cp").rglob("typed"):
        shutil.rmtree(typed)
    assert call().equals(first)  # typed again from the answers as recorded


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_failed_write_leaves_no_part_file_open(
    tmp_path: Path, small_parts: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the merge writes: the error says to free space, so the parts (removed) must
    not stay open behind it (a notebook keeps the last error, and with it a suspended merge)."""
    import errno

    import pyarrow.parquet as pq

    from enrich import OutputError

    app = create_app(EmulatorConfig(latency=0.01, seed=1))
    df = table(300, 120)
    run(app, df, checkpoint=tmp_path / "cp", _shard_rows=64)
    real, written = pq.ParquetWriter.write_table, []

    def full(self: Any, frame: Any, row_group_size: Any = None) -> None:
        written.append(frame.num_rows)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, frame, row_group_size=row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(OutputError, match="No space left on device") as kept:
        run(app, df, checkpoint=tmp_path / "cp", _shard_rows=64, write_to=tmp_path / "out.parquet")
    import gc

    gc.collect()
    fds = Path("/proc/self/fd")
    opened = [str(p.readlink()) for p in fds.iterdir() if p.is_symlink() and p.exists()]
    assert kept.value is not None and not [p for p in opened if ".enrich-parts-" in p], opened


@pytest.mark.parametrize(
    "positions",
    [
        [5, 3, 4, 7, 6],  # a range, each place once: scattered
        [10, 2, 7],  # gaps: sorted
        [4, 1, 1, 3],  # as many rows as places, one place twice and one empty: sorted, both kept
        [3, 1, 1, 2],
        [],
    ],
)
def test_a_merged_chunk_is_put_in_position_order(positions: list[int]) -> None:
    import pyarrow as pa

    table = pa.table(
        {assemble._ROW: pa.array(positions, pa.int64()), "v": [f"row {i}" for i in range(len(positions))]}
    )
    got = assemble._in_order(table)
    assert got.equals(table.sort_by([(assemble._ROW, "ascending"), ("v", "ascending")]))
