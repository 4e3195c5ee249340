"""Stage 1, for a table too large to hold (a LazyFrame; `enrich run` scans its input files): the table
is read in batches, each batch keyed as `prepare` keys a frame, and its rows are set aside on disk by
the first byte of their key, one Arrow file per byte value. A shard's rows are then read back alone
(`Spool.area`): no stage of the job holds the whole table, nor a Python object per row of it.

A shard of a job of `count` shards is the keys whose first byte has the shard's number in its top
`log2(count)` bits (`shards.shard_of`): the files of `256 / count` consecutive byte values. A key is in
one file, so deduplicating within a shard deduplicates the job.

A table of at most `STREAM_ROWS` rows is collected and prepared as a frame (`prepare._prepare`).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from enrich._engine import assemble
from enrich._engine.prepare import _INPUT_LIMIT, _check_choices, _checked_job, _distinct_plan, _Job, _Plan
from enrich._engine.shards import Area, area_name
from enrich._exceptions import OutputError, UsageError
from enrich._inputs import build_inputs, canonical_json, check_input_size, validate_inputs
from enrich._run_options import RunOptions

#: A table of more rows than this is spooled; one of fewer is prepared in memory.
STREAM_ROWS = 262_144
#: Rows read, keyed and set aside at a time (each file gets about 1/256 of them at once).
BATCH_ROWS = 262_144
#: One file per value of a key's first byte.
BUCKETS = 256
_ROW = "__enrich_row"
_KEY = "__enrich_key"
_SIZE = "__enrich_size"
_BUCKET = "__enrich_bucket"
_OPTIONS = "__enrich_options"  # a row's rendered run options (templated `run_options=` only)


@dataclass
class Spool:
    """A table keyed and set aside by key: its rows, distinct inputs, and the job it is for."""

    job: _Job
    #: The job's plan without rows: the input's columns, no keys (what the stages share).
    template: _Plan
    directory: Path
    rows: int = 0
    distinct: int = 0
    #: Rows set aside per first byte of the key.
    counts: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    #: Distinct inputs refused before sending (too large, failing input_schema): key -> why.
    refused: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    consumed: bool = False
    #: `distinct` and `refused` hold every file's (counted by `count`, or by the dry run).
    counted: bool = False
    #: Files found to hold no key twice when they were counted (`summary`).
    unrepeated: set[int] = field(default_factory=set)
    _removing: threading.Thread | None = field(default=None, repr=False)

    def _path(self, bucket: int) -> Path:
        return self.directory / f"rows-{bucket:02x}.arrow"

    def _read(self, lo: int, hi: int, columns: Sequence[str] | None = None) -> pl.DataFrame:
        frames = []
        for bucket in range(lo, hi):
            if self.counts[bucket]:
                with pa.memory_map(str(self._path(bucket))) as source:
                    options = None
                    if columns is not None:  # only those columns are read
                        names = pa.ipc.open_stream(source).schema.names
                        source.seek(0)
                        options = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
                    table = pa.ipc.open_stream(source, options=options).read_all()
                frames.append(pl.from_arrow(table))
                del table
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, rechunk=False)  # type: ignore[arg-type]

    def buckets(self, shard: int, count: int) -> tuple[int, int]:
        """The files of `shard` in a job of `count` shards: byte values [lo, hi)."""
        per = BUCKETS // count
        return shard * per, (shard + 1) * per

    def areas(self, count: int) -> list[Callable[[], Area]]:
        """The job's shards that hold rows, each read from disk when it is called."""
        made = []
        for shard in range(count):
            lo, hi = self.buckets(shard, count)
            if any(self.counts[lo:hi]):
                made.append(lambda shard=shard: self.area(shard, count))
        return made

    def area(self, shard: int, count: int) -> Area:
        """The rows of `shard` (of `count`), in row order, as a plan of its own with its own frame."""
        lo, hi = self.buckets(shard, count)
        frame = self._read(lo, hi).sort(_ROW)
        options = frame[_OPTIONS] if _OPTIONS in frame.columns else None
        plan = _distinct_plan(
            self.job,
            frame.drop(_ROW, _KEY, _SIZE, _OPTIONS, strict=False),
            "polars",
            None,
            frame[_KEY],
            frame[_SIZE],
            None,
            distinct=all(b in self.unrepeated for b in range(lo, hi)),  # (known from the count)
            options=options,
        )
        index = pl.Series("d", plan.index, dtype=pl.Int64)
        plan.index = []  # (its rows are the area's)
        name = None if count == 1 else area_name(shard)
        return Area(shard, name, plan, index, frame[_ROW].cast(pl.Int64), own=True)

    def summary(self, lo: int, hi: int) -> pl.Series:
        """The distinct keys of the files [lo, hi); unless the spool is `counted`, they are counted in
        `distinct`, and those the API would refuse (too large, failing input_schema) kept in
        `refused`. (The dry run counts a shard at a time this way, reading each file once.)"""
        job = self.job
        columns = [_KEY, _SIZE, *(job.columns if job.input_schema is not None else [])]
        frame = self._read(lo, hi, columns)
        if not frame.height:
            return pl.Series(_KEY, [], dtype=pl.String)
        rows = frame.height
        frame = frame.unique(_KEY, keep="any")  # (rows with one key have one input: any will do)
        if frame.height == rows:
            self.unrepeated.update(range(lo, hi))
        if self.counted:
            return frame[_KEY]
        self.distinct += frame.height
        room = _INPUT_LIMIT - len(canonical_json(job.task_spec))
        over = frame.filter(pl.col(_SIZE) > room)  # (only those are looked at)
        problems = check_input_size([], job.task_spec, limit=_INPUT_LIMIT, sizes=over[_SIZE].to_list())
        for key, problem in zip(over[_KEY].to_list(), problems, strict=True):
            if problem:
                self.refused[key] = problem
        if job.input_schema is not None:
            keys = frame[_KEY].to_list()
            inputs = build_inputs(frame, columns=job.columns, prompt=job.prompt)
            for key, problem in zip(keys, validate_inputs(inputs, job.input_schema), strict=True):
                if problem and key not in self.refused:
                    self.refused[key] = f"input does not match input_schema: {problem}"
        return frame[_KEY]

    def count(self) -> None:
        """Count the distinct and refused inputs of every file, if the dry run did not (`summary`)."""
        if self.counted:
            return
        t0 = time.monotonic()
        self.distinct, self.refused = 0, {}  # (a count cut short before is counted again whole)
        for bucket in range(BUCKETS):
            self.summary(bucket, bucket + 1)
        self.counted = True
        self.timings["dedupe"] = time.monotonic() - t0

    def sorted_keys(self) -> Iterator[str]:
        """Every distinct key, in sorted order (a file at a time: the files are in key order)."""
        for bucket in range(BUCKETS):
            if self.counts[bucket]:
                yield from self._read(bucket, bucket + 1, [_KEY])[_KEY].unique().sort().to_list()

    def remove_soon(self) -> None:
        """Start removing the files on a thread of their own (every shard was read); `remove` waits."""
        if self._removing is None:
            self._removing = assemble.remove_soon([self.directory])

    def remove(self) -> None:
        if self._removing is not None:
            self._removing.join()
        assemble.remove(self.directory)


def _prepare_any(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None,
    prompt: str | None,
    input_schema: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    processor: str,
    mode: str,
    near: Path | None,
    options: RunOptions | None = None,
) -> _Plan | Spool:
    """Stage 1 for any data: `_prepare` of a frame, or `_prepare_stream` of a LazyFrame (read in
    batches, and set aside by key beside `near` when it is large)."""
    arguments: dict[str, Any] = {
        "columns": columns,
        "prompt": prompt,
        "input_schema": input_schema,
        "metadata": metadata,
        "processor": processor,
        "mode": mode,
        "options": options,
    }
    if isinstance(data, pl.LazyFrame):
        return _prepare_stream(data, output, near=near, **arguments)
    from enrich._engine import prepare  # (looked up when called: tests stand in for it)

    return prepare._prepare(data, output, **arguments)


def _prepare_stream(
    data: pl.LazyFrame,
    output: Any,
    *,
    columns: Sequence[str] | str | None,
    prompt: str | None,
    input_schema: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    processor: str,
    mode: str,
    near: Path | None,
    options: RunOptions | None = None,
) -> _Plan | Spool:
    """`_prepare` for a LazyFrame: the table is read in batches and spooled beside `near` (the output or
    the checkpoint), or, when it has at most `STREAM_ROWS` rows, collected and prepared as a frame."""
    from enrich._engine.prepare import _prepare

    _check_choices(processor, mode)
    try:
        schema = data.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise UsageError(f"cannot read the input: {_first_line(exc)}") from exc
    if not len(schema):
        raise UsageError("data has no columns; nothing to send")
    taken = [c for c in schema if c in (_ROW, _KEY, _SIZE, _BUCKET, _OPTIONS)]
    if taken:  # (the spool's own columns: the user's would be overwritten, then dropped)
        raise UsageError(f"input column {taken[0]!r} has a name enrich uses for itself; rename it")
    job = _checked_job(
        schema,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
        options=options,
    )
    kept = pl.Schema({c: t for c, t in schema.items() if c not in job.earlier})
    batches = _batches(data)
    head: list[pl.DataFrame] = []
    held = 0
    for batch in batches:
        head.append(batch)
        held += batch.height
        if held > STREAM_ROWS:
            break
    else:  # a small table: prepared in memory, as a frame is
        frame = pl.concat(head) if head else pl.DataFrame(schema=schema)
        plan = _prepare(
            frame,
            output,
            columns=columns,
            prompt=prompt,
            input_schema=input_schema,
            metadata=metadata,
            processor=processor,
            mode=mode,
            options=options,
        )
        plan.original = data  # (the call it was prepared for: `enrich run` hands it to the job)
        return plan
    template = _distinct_plan(job, pl.DataFrame(schema=kept), "polars", data, [], [], None)
    spool = Spool(job, template, assemble.workspace(near, prefix=".enrich-spool-"))
    try:
        _fill(spool, job, _chained(head, batches))
    except OSError as exc:  # (a full disk: nothing was sent)
        spool.remove()
        raise OutputError(
            f"cannot set the input aside in {spool.directory}: {exc.strerror or exc}; nothing was sent: "
            "make room there (beside the output, or the checkpoint), then run the same call again"
        ) from exc
    except BaseException:
        spool.remove()
        raise
    return spool


def _batches(data: pl.LazyFrame) -> Iterator[pl.DataFrame]:
    try:
        if _parquet_scan(data):
            # polars' streaming reader of Parquet reads row groups ahead of a slow consumer, as far as
            # its prefetch allows: 10M rows in row groups of 1M held 850-950 MB at once while they were
            # keyed. A slice of a plain scan is read from the row groups it needs (186 MB, 0.9 s).
            rows = data.select(pl.len()).collect().item()
            for start in range(0, rows, BATCH_ROWS):
                yield data.slice(start, BATCH_ROWS).collect()
            return
        yield from data.collect_batches(chunk_size=BATCH_ROWS)
    except (pl.exceptions.PolarsError, OSError) as exc:  # (an input file gone or unreadable since)
        raise UsageError(f"cannot read the input: {_first_line(exc)}") from exc


_PLAIN_SCAN = re.compile(r"(?:Parquet SCAN \[.*|PROJECT .*|ESTIMATED ROWS.*|)")


def _parquet_scan(data: pl.LazyFrame) -> bool:
    """The plan is a Parquet scan and nothing else (of some columns, of one or several files): a slice of
    it is read from its row groups, not by reading everything before it. (Anything else, or a plan polars
    describes otherwise, is read by `collect_batches`: the same rows, with more memory.)"""
    try:
        plan = data.explain(optimized=True)
    except Exception:  # (a plan that cannot be described is read the other way)
        return False
    lines = [line.strip() for line in plan.splitlines()]
    return any(line.startswith("Parquet SCAN") for line in lines) and all(
        _PLAIN_SCAN.fullmatch(line) for line in lines
    )


def _chained(head: list[pl.DataFrame], rest: Iterator[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    while head:
        yield head.pop(0)
    yield from rest


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _fill(spool: Spool, job: _Job, batches: Iterator[pl.DataFrame]) -> None:
    """Key each batch and append its rows to the file of their key's first byte."""
    t0 = time.monotonic()
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    files: list[Any] = []
    schema: pa.Schema | None = None
    assemble._allow_open_files(BUCKETS)
    options = None  # (uncompressed: lz4 saved 45% of the disk and cost a third of the writing's time)
    try:
        for batch in batches:
            texts = job.option_texts(batch, first_row=spool.rows)  # (an earlier enrichment's columns too)
            if job.earlier:
                batch = batch.drop(job.earlier)
            keys, sizes, _ = job.keyed(batch, first_row=spool.rows, options=texts)
            frame = batch.with_columns(
                pl.int_range(spool.rows, spool.rows + batch.height, dtype=pl.Int64).alias(_ROW),
                pl.Series(_KEY, keys, dtype=pl.String),
                pl.Series(_SIZE, sizes, dtype=pl.Int64),
            )
            if texts is not None:
                frame = frame.with_columns(texts.alias(_OPTIONS))
            del keys, sizes, texts
            spool.rows += batch.height
            # Sorted by file, then cut into one slice per file: a third of partition_by's time.
            frame = frame.with_columns(
                pl.col(_KEY).str.slice(0, 2).str.to_integer(base=16).alias(_BUCKET)
            ).sort(_BUCKET, maintain_order=True)
            runs = frame.group_by(_BUCKET, maintain_order=True).len()
            # (not polars' string views, read back without a conversion: a slice of a view array is
            # written with every data buffer of the whole batch, 256 times over)
            whole = frame.drop(_BUCKET).to_arrow()
            del frame
            if schema is None:
                schema = whole.schema
            elif whole.schema != schema:
                whole = whole.cast(schema)
            at = 0
            for b, n in runs.iter_rows():
                table = whole.slice(at, n)
                at += n
                writer = writers.get(b)
                if writer is None:
                    sink = pa.OSFile(str(spool._path(b)), "wb")
                    files.append(sink)
                    # (the stream format: a categorical column's dictionary differs from batch to batch,
                    # which the file format refuses)
                    writer = writers[b] = pa.ipc.new_stream(sink, schema, options=options)
                writer.write_table(table)
                spool.counts[b] += n
            del whole
    finally:
        for writer in writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        for sink in files:
            sink.close()
    spool.timings["key"] = time.monotonic() - t0
