"""Tables in and out of files, by extension: .csv, .parquet, .jsonl/.ndjson.

Writes are atomic: the table goes to a temporary file beside the target, is fsynced, then renamed
over it, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from enrich._exceptions import UsageError

__all__ = ["FORMATS", "check_output_path", "read_table", "write_table"]

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "ndjson", ".ndjson": "ndjson"}


def _format(path: Path, role: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise UsageError(f"{role} {path}: unknown file type {path.suffix or '(none)'!r}; use one of {known}")
    return fmt


def read_table(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a table; dates in CSV files are parsed, so they round-trip as dates."""
    p = Path(path)
    fmt = _format(p, "input")
    if not p.is_file():
        raise UsageError(f"input {p}: no such file")
    try:
        if fmt == "csv":
            return pl.read_csv(p, try_parse_dates=True, infer_schema_length=10_000)
        if fmt == "parquet":
            return pl.read_parquet(p)
        return pl.read_ndjson(p)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"input {p}: cannot read it as {fmt}: {first}") from exc


def _flatten_for_csv(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists or structs: such columns become JSON text."""
    nested = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
    if not nested:
        return df

    def encode(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False, default=str)

    return df.with_columns(pl.Series(c, [encode(v) for v in df[c].to_list()], dtype=pl.Utf8) for c in nested)


def check_output_path(
    path: str | os.PathLike[str], *, input_path: str | os.PathLike[str] | None = None
) -> Path:
    """Refuse an output path that cannot be written, before anything is sent."""
    p = Path(path)
    _format(p, "output")
    if input_path is not None and p.resolve() == Path(input_path).resolve():
        raise UsageError(
            f"output {p} is the input file: choose another output path (the input is never overwritten)"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output {p}: the directory {parent} does not exist")
    if p.is_dir():
        raise UsageError(f"output {p} is a directory; give a file name")
    return p


def write_table(df: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write `df` atomically in the format the extension names."""
    p = Path(path)
    fmt = _format(p, "output")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "csv":
                _flatten_for_csv(df).write_csv(f)
            elif fmt == "parquet":
                df.write_parquet(f)
            else:
                df.write_ndjson(f)
            f.flush()
            # mkstemp makes the file private (0600); the output gets the mode a plain open() would give
            # it, or keeps the one of the file it replaces.
            if hasattr(os, "fchmod"):  # POSIX
                with contextlib.suppress(OSError):
                    os.fchmod(f.fileno(), _mode_for(p))
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits for a new `path`: those of the file it replaces, else 0o666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        pass
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask
