"""Answers typed by a join, kept in the checkpoint so that a resumed join reads columns, not JSON.

The checkpoint records each answer as the service sent it (JSON text), and that record is never replaced.
Typing it (`OutputSpec.to_frame`: decode, check every value against its column, build typed Series) is
Python work per answer, a third of a million-row resume. So a join keeps what it typed in `typed/` inside
the checkpoint (its store's sub-area `typed`; in a directory, a subdirectory): Parquet files of run_id,
the output columns and `_problem` (what did not fit), named by a tag of the output columns' types and of
this module's version, so that another typing never reads them. A run's answer never changes, so a typed
answer stays true for its run id.

It is a cache derived from the record, never a record: a file that cannot be read is set aside and its
answers typed again from their JSON; deleting `typed/` loses nothing. Files are written whole, each under
a new name (`CheckpointStore.write`); past `MAX_FILES` they are merged into one, a row group at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from enrich._schema import OutputSpec
from enrich._store import CheckpointStore, as_store

_VERSION = 1  # the typing of answers (`OutputSpec.to_frame`): a change makes earlier files unread
MAX_FILES = 32
DIRECTORY = "typed"


class TypedAnswers:
    """The typed answers of one checkpoint (its store, or its directory), for one output spec."""

    def __init__(self, checkpoint: CheckpointStore | str | os.PathLike[str], spec: OutputSpec) -> None:
        self.store = as_store(checkpoint).child(DIRECTORY)
        self.schema = pl.Schema({"run_id": pl.String, **spec.polars_schema(), "_problem": pl.String})
        described = json.dumps(
            {"version": _VERSION, "columns": [[c, str(d)] for c, d in self.schema.items()]}, sort_keys=True
        )
        self.tag = hashlib.sha256(described.encode()).hexdigest()[:16]
        self.unreadable = 0  # files set aside this call

    def files(self) -> list[str]:
        """The names (in `store`) of the files of this typing."""
        try:
            names = self.store.list(f"typed-{self.tag}-")
        except OSError:
            return []
        return [n for n in names if "/" not in n and n.endswith(".parquet")]

    def read(self) -> Iterator[pl.DataFrame]:
        """Every typed answer kept, a file at a time, as frames of `schema`."""
        for name in self.files():
            try:
                # (read by polars: through pyarrow, the conversion of its strings was half the time)
                with self.store.open(name) as f:
                    frame = self._conform(pl.read_parquet(f))
            # (a damaged file can make polars panic rather than raise)
            except (
                OSError,
                pa.ArrowException,
                ValueError,
                pl.exceptions.PolarsError,
                pl.exceptions.PanicException,
            ):
                self._set_aside(name)
                continue
            yield frame

    def add(self, frame: pl.DataFrame) -> None:
        """Keep `frame` (run_id, the output columns, `_problem`). A failure to write is not an error:
        the answers are typed again next time."""
        if not frame.height:
            return
        with contextlib.suppress(OSError, pa.ArrowException):
            self._write(frame.select(list(self.schema)).to_arrow(), None)

    def compact(self) -> None:
        """Merge the files into one once there are more than `MAX_FILES`, a row group at a time."""
        files = self.files()
        if len(files) <= MAX_FILES:
            return
        with contextlib.suppress(OSError, pa.ArrowException, ValueError, pl.exceptions.PolarsError):
            self._write(None, files)
            for name in files:
                self.store.delete(name)

    def _write(self, table: pa.Table | None, sources: list[str] | None) -> None:
        def write(f: BinaryIO) -> None:
            if table is not None:
                pq.write_table(table, f, compression="zstd")
                return
            schema = pl.DataFrame(schema=self.schema).to_arrow().schema
            with pq.ParquetWriter(f, schema, compression="zstd") as writer:
                for source in sources or []:
                    with self.store.open(source) as g, pq.ParquetFile(g) as parquet:
                        for i in range(parquet.num_row_groups):
                            group = pl.from_arrow(parquet.read_row_group(i))
                            writer.write_table(self._conform(group).to_arrow().cast(schema))  # type: ignore[arg-type]

        self.store.write(f"typed-{self.tag}-{uuid.uuid4().hex}.parquet", write)

    def _conform(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select(pl.col(c).cast(d) for c, d in self.schema.items())

    def _set_aside(self, name: str) -> None:
        """Keep an unreadable file as `<stem>.unreadable` (never read again), for whoever looks into it."""
        self.unreadable += 1
        with contextlib.suppress(OSError):
            with self.store.open(name) as f:
                aside = name.removesuffix(".parquet") + ".unreadable"
                self.store.write(aside, lambda out: shutil.copyfileobj(f, out), overwrite=True)
            self.store.delete(name)
