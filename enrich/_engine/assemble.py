"""Stage 7: the join written in parts and assembled, in bounded memory, shard by shard.

A result larger than memory (100,000 rows with citations is gigabytes) is never built whole. For each
shard (`shards`), while its checkpoint is open:

1. `Spill`: its answers, read from the checkpoint a row group at a time (and the answers typed by an
   earlier join), are set aside by *part*, a range of the shard's distinct rows sized so that one
   part's answers fit in about `PART_BYTES`; in memory up to `SPILL_BYTES`, then on disk.
2. `write_parts`: each part is joined on its own (`join._distinct`) onto the shard's rows that use it,
   each row tagged with its position in the frame, and written as an Arrow IPC file sorted by that
   position, in small record batches.

Then for the whole job:

3. `merge`: the parts of every shard are merged by position (a k-way merge that reads one batch of a
   part at a time, so about one batch per part is held), a chunk at a time. For a file each chunk is
   written as it comes (`enrich._io.write_frames`: a Parquet row group encoded on a thread while the
   next chunk is merged, or CSV or JSON lines; to a temporary file, renamed); for a frame the chunks
   become its columns as they come (`merged_frame`).

Rows reuse answers out of order (a repeated input), so a part can be needed again long after its first
rows: the merge keeps its place in every part, never the part itself.
"""

from __future__ import annotations

import bisect
import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from enrich._engine.join import ROW_OF, _distinct, _no_answers, _typed_basis
from enrich._engine.prepare import _Plan
from enrich._engine.typed import TypedAnswers

#: A part's answers (typed, in memory) are about this large. (Only answers with a basis fill more than one
#: part per shard; 100,000 rows with 3 KB per basis field peaked at 1,149 MB with 64 MB, 997 MB with 32,
#: 965 MB with 16, while other shards collected.)
PART_BYTES = 16 << 20
#: Answers read from the checkpoint are held up to this much before they are written to their parts.
SPILL_BYTES = 16 << 20
#: A record batch of a part file, and a chunk of the merged output, hold about this many bytes.
BATCH_BYTES = 4 << 20
CHUNK_BYTES = 16 << 20
#: ... and never fewer rows than these (per part, per merged chunk).
MIN_PART_ROWS = 256
MIN_CHUNK_ROWS = 1024
_ROW = "__enrich_row"
#: Where the service gave each run's own id as its interaction id (its docs' examples do), a part leaves
#: the column out and the merge makes it the run id column itself: one copy of 50 bytes a row, not two.
_RUN, _INTERACTION = "_run_id", "_interaction_id"


@dataclass
class Spill:
    """The answers of a job set aside on disk by part (distinct rows `j * per_part` to
    `(j + 1) * per_part`), as the checkpoint is read; the join then holds one part at a time. Two kinds:
    "answers" (run_id, output text, typed basis, `ROW_OF`) and "typed" (answers typed by an earlier join,
    `typed.TypedAnswers`: run_id, the output columns, `_problem`, `ROW_OF`)."""

    directory: Path
    #: The distinct rows (of a shard).
    total: int
    #: Names its files apart from other shards' in the same directory.
    name: str = ""
    per_part: int = 0  # set from the size of the first answers set aside
    _buffer: dict[tuple[str, int], list[pl.DataFrame]] = field(default_factory=dict)
    _buffered: int = 0
    _files: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, part: pl.DataFrame) -> pl.DataFrame:
        """`Checkpoint.answers`'s `each`: type the basis of a segment's answers, set them aside by part,
        and return nothing to hold."""
        part = _typed_basis(part)  # `ROW_OF` carried by the checkpoint (`spill_answers`)
        self._keep("answers", part)
        return part.clear()

    def add_typed(self, frame: pl.DataFrame) -> None:
        """Set aside answers typed before (with `ROW_OF`), by part."""
        self._keep("typed", frame)

    def _keep(self, kind: str, part: pl.DataFrame) -> None:
        if not part.height:
            return
        if not self.per_part:  # sized by the first answers set aside (typed ones, without the basis)
            size = max(1, part.estimated_size() // part.height)
            self.per_part = max(MIN_PART_ROWS, PART_BYTES // size)
        split = part.with_columns((pl.col(ROW_OF) // self.per_part).alias("_part"))
        for (j,), frame in split.partition_by("_part", as_dict=True, include_key=False).items():
            self._buffer.setdefault((kind, int(j)), []).append(frame)  # type: ignore[arg-type]
        self._buffered += part.estimated_size()
        if self._buffered > SPILL_BYTES:
            self.flush()

    def flush(self) -> None:
        for (kind, j), frames in self._buffer.items():
            n = self._files.get((kind, j), 0)
            path = self.directory / f"{self.name}{kind}-{j}-{n}.arrow"
            pl.concat(frames).write_ipc(path, compression="uncompressed")
            self._files[(kind, j)] = n + 1
        self._buffer.clear()
        self._buffered = 0

    def part(self, j: int, kind: str = "answers") -> pl.DataFrame | None:
        """The answers of part `j` of `kind`; None when there are none."""
        frames = [
            pl.read_ipc(self.directory / f"{self.name}{kind}-{j}-{n}.arrow")
            for n in range(self._files.get((kind, j), 0))
        ]
        frames.extend(self._buffer.get((kind, j), []))
        return pl.concat(frames) if frames else None

    def remove(self) -> None:
        """Every part is joined: free the disk space of what was set aside."""
        for (kind, j), n in self._files.items():
            for i in range(n):
                (self.directory / f"{self.name}{kind}-{j}-{i}.arrow").unlink(missing_ok=True)
        self._files.clear()
        self._buffer.clear()


def answered(meta: pl.DataFrame) -> pl.DataFrame:
    """The run each completed distinct row of `meta` gets its answer from: run_id, `ROW_OF` (its place)."""
    return (
        meta.select(pl.col("answered").alias("run_id"))
        .with_row_index(ROW_OF)
        .drop_nulls("run_id")
        .select("run_id", pl.col(ROW_OF).cast(pl.Int64))
    )


def spill_answers(spill: Spill, cp: Any, ids: pl.DataFrame, *, basis: bool) -> None:
    """Read the answers of the runs `ids` (run_id, `ROW_OF`) from the checkpoint `cp` into `spill`."""
    if ids.height:
        cp.answers(ids, basis=basis, each=spill.add)


def spill_typed(spill: Spill, typed: TypedAnswers, ids: pl.DataFrame) -> pl.DataFrame:
    """Set aside the answers of the runs `ids` (run_id, `ROW_OF`) typed by earlier joins, kept in
    `typed`, each with the distinct row that gets it; returns the rows found (`ROW_OF`)."""
    found = []
    if ids.height:
        for frame in typed.read():
            frame = frame.join(ids, on="run_id", how="inner")
            found.append(frame.select(ROW_OF))
            spill.add_typed(frame)
    return pl.concat(found) if found else pl.DataFrame(schema={ROW_OF: pl.Int64})


@dataclass
class _Part:
    path: Path
    firsts: list[int]  # the position of the first row of each record batch
    reader: Any = None
    source: Any = None  # the open file `reader` reads
    next_batch: int = 0
    pending: pa.RecordBatch | None = None  # the rest of the batch read last
    positions: Any = None  # the positions of the whole batch read last (its int64 buffer, as a view)
    taken: int = 0  # rows of that batch merged already (`pending` is the batch from there)
    same: bool = False  # `_interaction_id` is `_run_id` in every row: left out of the file


def write_parts(
    plan: _Plan,
    spill: Spill,
    directory: Path,
    *,
    meta: pl.DataFrame,
    index: pl.Series,
    rows: pl.Series | None = None,
    own: bool = False,
    basis: bool,
    flatten: Any = None,
    inputs: bool = True,
    typed: TypedAnswers | None = None,
    batch_bytes: int | None = None,
) -> tuple[list[_Part], dict[str, int], pl.Schema]:
    """Join each part of `spill` onto its rows; write them to `directory`, sorted by position. Returns the
    parts, the rows per status, and the schema of the result (without the position).

    `meta` says what became of each distinct row (`join._meta`); `index` is the distinct row of each row
    joined and `rows` its position in the job's frame (None: the rows of `plan.df` in order), where
    `plan.df` is the job's frame, or with `own` the rows joined themselves, in order. Without
    `inputs`, the parts hold only the columns the job adds (a frame in memory has the input already).
    Answers typed here are kept in `typed` for the next join. A record batch holds about `batch_bytes`
    (default `BATCH_BYTES`): the merge holds one batch of every part at once."""
    per = spill.per_part or max(meta.height, 1)
    index = index.cast(pl.Int64).alias("d")
    if rows is None:
        rows = pl.int_range(index.len(), dtype=pl.Int64, eager=True)
    counts = meta["_status"].gather(index).value_counts()
    statuses = dict(zip(counts["_status"].to_list(), counts["count"].to_list(), strict=True))
    # The rows of each part, each in row order.
    by_part = (
        pl.DataFrame({"row": rows.cast(pl.Int64), "d": index})
        .with_columns(
            (pl.col("d") // per).alias("part"),
            (pl.int_range(pl.len(), dtype=pl.Int64) if own else pl.col("row")).alias("at"),
        )
        .partition_by("part", as_dict=True, maintain_order=True)
    )
    parts: list[_Part] = []
    schema: pl.Schema | None = None
    for (j,), rows_of in sorted(by_part.items()):  # type: ignore[type-var]
        rows = rows_of["row"].cast(pl.Int64)
        lo = int(j) * per  # type: ignore[call-overload]
        answers = spill.part(j)
        distinct, fresh = _distinct(
            plan,
            meta.slice(lo, per),
            answers if answers is not None else _no_answers(),
            basis=basis,
            typed=spill.part(j, "typed"),
            first=lo,
        )
        del answers
        if typed is not None:
            typed.add(fresh)
        del fresh
        added = distinct[(rows_of["d"] - lo).cast(pl.UInt32)]
        frame = pl.concat([plan.df[rows_of["at"]], added], how="horizontal") if inputs else added
        del rows_of
        del distinct, added
        if flatten is not None:
            frame = flatten(frame)
        if schema is None:
            schema = frame.schema
        frame = frame.with_columns(rows.alias(_ROW))
        same = _INTERACTION in frame.columns and bool(
            frame.select(pl.col(_INTERACTION).eq_missing(pl.col(_RUN)).all()).item()
        )
        if same:
            frame = frame.drop(_INTERACTION)
        size = max(1, frame.estimated_size() // frame.height)
        batch = max(16, (batch_bytes or BATCH_BYTES) // size)
        path = directory / f"part-{spill.name}{j}.arrow"
        table = frame.to_arrow()
        del frame
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=batch)
        del table
        parts.append(_Part(path, rows.gather_every(batch).to_list(), same=same))
    if typed is not None:
        typed.compact()
    return parts, statuses, schema if schema is not None else pl.Schema()


def chunk_rows(parts: list[_Part]) -> int:
    """Rows per merged chunk (and per row group of a Parquet output): about `CHUNK_BYTES`, judged by
    the first batch of the first part."""
    if not parts:
        return MIN_CHUNK_ROWS
    with pa.OSFile(str(parts[0].path), "rb") as f:
        first = pa.ipc.open_file(f).get_batch(0)
    size = max(1, first.nbytes // max(first.num_rows, 1))
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // size)


def merge(parts: list[_Part], rows: int, step: int, *, arrow: bool = False) -> Iterator[Any]:
    """The rows of `parts` (each sorted by position) in position order, as frames of `step` rows; with
    `arrow`, as the Arrow tables they are made as (a Parquet writer takes them as they are: a polars
    frame in between was 3 s of a 10M-row merge spent converting strings there and back)."""
    if not parts:
        return
    _allow_open_files(len(parts))
    for part in parts:
        part.source = pa.OSFile(str(part.path), "rb")
        part.reader = pa.ipc.open_file(part.source)
    try:
        for end in range(step, rows + step, step):
            pieces: list[pa.RecordBatch] = []
            pieces_same: list[bool] = []
            for part in parts:
                while True:
                    if part.pending is None:
                        if part.next_batch >= len(part.firsts) or part.firsts[part.next_batch] >= end:
                            break
                        part.pending = part.reader.get_batch(part.next_batch)
                        # (a batch's positions bisected in place, on a view of their buffer: a polars
                        # search cost 2 ms a call, 9 s of a 10M-row merge; a list of ints, 36 bytes a
                        # row at the job's peak; a pyarrow scalar imports pandas)
                        column = part.pending.column(_ROW)
                        assert column.null_count == 0 and column.type == pa.int64()
                        view = memoryview(column.buffers()[1]).cast("q")  # type: ignore[arg-type]
                        part.positions = view[column.offset : column.offset + len(column)]
                        part.taken = 0
                        part.next_batch += 1
                    batch, positions = part.pending, part.positions
                    assert positions is not None
                    # positions are sorted: those before `end` are a prefix
                    k = bisect.bisect_left(positions, end, lo=part.taken) - part.taken
                    if k:
                        pieces.append(batch.slice(0, k))
                        pieces_same.append(part.same)
                    if k < batch.num_rows:
                        part.pending, part.taken = batch.slice(k), part.taken + k
                        break
                    part.pending = part.positions = None
            if not pieces:
                continue
            # (sorted by pyarrow: polars sorts twice as fast, but its allocator then keeps ~80 MB more
            # at a million rows, at the peak of the job)
            if all(pieces_same):  # the column is the run ids themselves, after the sort
                table = _in_order(pa.Table.from_batches(pieces)).drop_columns([_ROW])
                table = table.add_column(
                    table.schema.get_field_index(_RUN) + 1, _INTERACTION, table.column(_RUN)
                )
            else:
                table = pa.Table.from_batches(
                    [_with_interaction(p) if same else p for p, same in zip(pieces, pieces_same, strict=True)]
                )
                table = _in_order(table).drop_columns([_ROW])
            del pieces
            if arrow:
                yield table
                del table
                continue
            frame = pl.from_arrow(table, rechunk=False)
            del table
            assert isinstance(frame, pl.DataFrame)
            yield frame
            del frame
    finally:  # (also when the caller stops early: a failed write must not keep the files open)
        for part in parts:
            part.pending = part.positions = None
            part.reader = None
            if part.source is not None:
                part.source.close()
                part.source = None


def _in_order(table: pa.Table) -> pa.Table:
    """`table` sorted by position. A chunk's positions are usually a range with each place once (every
    row of the job is in one part): then each row's place is known, and is scattered there, half the
    time of a sort. Any other positions are sorted."""
    positions = pl.from_arrow(table.column(_ROW))
    assert isinstance(positions, pl.Series)
    n = positions.len()
    lo = positions.min()
    if n and positions.max() - lo + 1 == n:  # type: ignore[operator]
        order = pl.repeat(None, n, dtype=pl.UInt32, eager=True).scatter(
            (positions - lo).cast(pl.UInt32), pl.int_range(n, dtype=pl.UInt32, eager=True)
        )
        if not order.null_count():  # n places filled by n rows: each place once
            return table.take(order.to_arrow())
    return table.sort_by(_ROW)


def _with_interaction(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of a part that left `_interaction_id` out (`_Part.same`), with it: its run ids."""
    return batch.add_column(batch.schema.get_field_index(_RUN) + 1, _INTERACTION, batch.column(_RUN))


def _allow_open_files(n: int) -> None:
    """Raise the soft limit of open files, if need be and allowed, for a merge of `n` parts (a file each:
    256 shards pass macOS's default of 256)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard)
        )


def merged_frame(parts: list[_Part], rows: int, schema: pl.Schema) -> pl.DataFrame:
    """Step 3, for a frame in memory: the parts merged in row order straight into polars columns, a
    chunk at a time, so the frame is the only large allocation (the chunks written to disk and read
    back whole through pyarrow doubled the added columns at the peak: +340 MB at a million rows)."""
    frames = []
    for frame in merge(parts, rows, chunk_rows(parts)):
        frames.append(frame)
        del frame
        pa.default_memory_pool().release_unused()  # the chunk was gathered into polars: give it back
    for part in parts:
        part.path.unlink(missing_ok=True)
    if not frames:
        return pl.DataFrame(schema=schema)
    frame = pl.concat(frames, rechunk=False)  # type: ignore[arg-type]
    del frames
    changed = {c: d for c, d in schema.items() if frame.schema[c] != d}
    return frame.cast(changed) if changed else frame


def workspace(near: Path | None, *, prefix: str = ".enrich-parts-") -> Path:
    """A private temporary directory for the parts beside `near` (the output file, or the checkpoint:
    space on the disk the user chose, where /tmp may be memory), else in the system's temporary
    directory."""
    where = near.parent if near is not None else None
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=prefix.lstrip(".")))


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def remove_soon(paths: Iterable[Path]) -> threading.Thread:
    """Remove the files or directories `paths` on a thread of their own (started; `join()` it to wait).

    Freeing gigabytes of spooled rows and parts is seconds of the kernel's time in `unlink` (3 to 5 s
    of a 10M-row resume), with the GIL released: done while the merge and the output's writing go on,
    not before them. Errors are ignored, as `remove`'s are: the files are this job's own scratch."""

    def work() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    thread = threading.Thread(target=work, name="enrich-remove", daemon=False)
    thread.start()
    return thread
