"""Tables in and out of files, by extension, and through stdin/stdout as `-`.

Formats: .csv, .parquet/.pq, .jsonl/.ndjson (one JSON object per line), .json (one JSON array of objects),
and gzip-compressed .csv.gz, .jsonl.gz, .ndjson.gz, .json.gz; all of them both in and out.

CSV is read as text: every value comes back exactly as written (zip code 02134 stays "02134", 1.10 stays
"1.10"), unless `infer_types=True` asks for the old guessing of numbers and dates. Parquet, JSONL and JSON
are typed formats and keep their types.

Writes are atomic: the table goes to a temporary file beside the target, is fsynced, then renamed
over it, so a reader (or a crash) never sees half a file. Stdout (`-`) is staged in a temporary file, then
copied and flushed. `write_frames` streams a result merged from parts (`enrich._engine.assemble`).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import itertools
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow as pa

from enrich._exceptions import UsageError

__all__ = [
    "FORMATS",
    "FORMAT_NAMES",
    "check_checkpoint_dir",
    "check_output_path",
    "flatten_for_csv",
    "format_of",
    "read_table",
    "read_tables",
    "scan_tables",
    "write_frames",
    "write_table",
]

# File name endings and the format each names; a name ending in .gz is gzip-compressed.
FORMATS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "ndjson",
    ".jsonl.gz": "ndjson",
    ".ndjson": "ndjson",
    ".ndjson.gz": "ndjson",
    ".json": "json",
    ".json.gz": "json",
}
# The names a format can be given by (a --format flag, `stdin_format`): jsonl is ndjson.
FORMAT_NAMES = ("csv", "json", "jsonl", "ndjson", "parquet")
_ALIASES = {"jsonl": "ndjson"}
_STDIO = "-"
_GZIP_MAGIC = b"\x1f\x8b"
_GLOB_MAGIC = re.compile(r"[*?[]")
_PathLike = str | os.PathLike[str]


def _named_format(name: str, role: str) -> str:
    fmt = _ALIASES.get(name.lower(), name.lower())
    if fmt not in FORMAT_NAMES:
        raise UsageError(f"{role} format {name!r} is unknown; use one of {', '.join(FORMAT_NAMES)}")
    return fmt


def _by_extension(path: Path) -> tuple[str, bool] | None:
    """(format, gzipped) that the file name's ending names, or None for an unknown ending."""
    name = path.name.lower()
    for ending in sorted(FORMATS, key=len, reverse=True):  # .csv.gz before .csv (and .gz)
        if name.endswith(ending):
            return FORMATS[ending], ending.endswith(".gz")
    return None


def _spec(path: Path, role: str, explicit: str | None = None) -> tuple[str, bool]:
    """(format, gzipped) of a file: from its extension, or from `explicit` when the extension names none."""
    found = _by_extension(path)
    if explicit is not None:
        fmt = _named_format(explicit, role)
        if found is not None and found[0] != fmt:
            raise UsageError(
                f"{role} {path}: its extension says {found[0]} but the format given is {explicit}; "
                "make them agree"
            )
        return fmt, found[1] if found else False
    if found is None:
        suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix
        known = ", ".join(sorted(FORMATS))
        raise UsageError(f"{role} {path}: unknown file type {suffix or '(none)'!r}; use one of {known}")
    return found


def format_of(path_or_dash: _PathLike, explicit: str | None, *, role: str = "output") -> str:
    """The format (csv, parquet, ndjson or json) a path or `-` is read or written in.

    `explicit` (a --format flag) wins for `-` (default csv) and for a file whose extension names no format;
    for a file whose extension names another format it is an error. "jsonl" is returned as "ndjson".
    """
    if os.fspath(path_or_dash) == _STDIO:
        return _named_format(explicit, role) if explicit is not None else "csv"
    return _spec(Path(path_or_dash), role, explicit)[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parse(source: Path | io.BytesIO, fmt: str, infer_types: bool, label: str, gz: bool) -> pl.DataFrame:
    try:
        if gz and isinstance(source, Path):
            source = io.BytesIO(gzip.decompress(source.read_bytes()))
        if fmt == "csv":
            _check_csv_header(source, label)
            if infer_types:
                return pl.read_csv(source, try_parse_dates=True, infer_schema_length=10_000)
            return pl.read_csv(source, infer_schema=False)
        if fmt == "parquet":
            return pl.read_parquet(source)
        if fmt == "json":
            data = source.read_bytes() if isinstance(source, Path) else source.getvalue()
            data = data.removeprefix(b"\xef\xbb\xbf").lstrip()
            if not data.startswith(b"["):
                raise UsageError(
                    f"input {label}: a .json input must hold a JSON array of objects [{{...}}, ...]; "
                    "for one object per line, name it .jsonl"
                )
            return pl.read_json(io.BytesIO(data), infer_schema_length=None)
        return pl.read_ndjson(source, infer_schema_length=None)  # a type may change after row 100
    except UsageError:
        raise  # a UsageError is a ValueError too: keep it as it is
    except (pl.exceptions.PolarsError, OSError, ValueError, EOFError, zlib.error) as exc:
        kind = f"gzip-compressed {fmt}" if gz else fmt
        raise UsageError(f"input {label}: cannot read it as {kind}: {_first_line(exc)}") from exc


def _check_csv_header(source: Path | io.BytesIO, label: str) -> None:
    """Refuse a header that names a column twice: polars would rename one (`a_duplicated_0`), and that
    made-up name would be sent and written as if it were the user's."""
    header = pl.read_csv(source, has_header=False, n_rows=1, infer_schema=False)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    names = [str(v) for v in header.row(0)] if header.height else []
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(
            f"input {label}: the header names {', '.join(map(repr, twice))} more than once; give every "
            "column a distinct name"
        )


def _read_stdin(fmt: str, infer_types: bool) -> pl.DataFrame:
    label = "- (stdin)"
    isatty = getattr(sys.stdin, "isatty", None)
    if isatty is not None and isatty():
        raise UsageError(f"input {label} is a terminal; pipe a table into it, or name an input file")
    data = sys.stdin.buffer.read()
    gz = data.startswith(_GZIP_MAGIC)  # no text table starts so: 0x8b is not valid UTF-8 there
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UsageError(
                f"input {label}: cannot read it as gzip-compressed {fmt}: {_first_line(exc)}"
            ) from exc
    return _parse(io.BytesIO(data), fmt, infer_types, label, gz)


def read_table(path: _PathLike, *, infer_types: bool = False, format: str | None = None) -> pl.DataFrame:
    """Read a table from a file, or from stdin when `path` is `-` (csv unless `format` says otherwise).

    CSV columns are read as text (pl.Utf8), so every value comes back exactly as written: "02134" keeps
    its leading zero and "1.10" its trailing one. An empty unquoted field is null, a quoted empty field
    ("") is the empty string, the convention write_table follows too, so text columns round-trip.
    `infer_types=True` guesses types instead (numbers, dates; from the first 10,000 rows).
    Parquet, JSONL and JSON keep their own types. A name ending in .gz is gzip-compressed; gzip on stdin
    is recognised by its first bytes. `format` names the format for `-`, or for an unknown extension.
    """
    if os.fspath(path) == _STDIO:
        return _read_stdin(format_of(_STDIO, format, role="input"), infer_types)
    p = Path(path)
    fmt, gz = _check_input_file(p, format)
    return _parse(p, fmt, infer_types, str(p), gz)


def _check_input_file(p: Path, explicit: str | None = None) -> tuple[str, bool]:
    if p.is_dir():
        raise UsageError(f"input {p} is a directory; name its files, or a pattern such as {p / '*.csv'}")
    found = _spec(p, "input", explicit)
    if not p.is_file():
        raise UsageError(f"input {p}: no such file")
    return found


def _expand(paths: Sequence[_PathLike]) -> list[str]:
    """The files (and `-`) that paths and glob patterns name, in order; patterns expand sorted."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for item in paths:
        s = os.fspath(item)
        if s != _STDIO and _GLOB_MAGIC.search(s) and not os.path.lexists(s):
            matches = sorted(m for m in glob.glob(s, recursive=True) if os.path.isfile(m))
            if not matches:
                raise UsageError(f"input {s}: the pattern matches no file")
        else:
            matches = [s]
        for m in matches:
            key = m if m == _STDIO else str(Path(m).resolve())
            if key in seen:
                if m == _STDIO:
                    raise UsageError("input - (stdin) is given twice; stdin can be read only once")
                raise UsageError(
                    f"input {m} is named twice (also as {seen[key]}); name each file once, "
                    "or make the patterns not overlap"
                )
            seen[key] = m
            out.append(m)
    return out


def _names(columns: list[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:5])
    return shown + (f" and {len(columns) - 5} more" if len(columns) > 5 else "")


def read_tables(
    paths: Sequence[_PathLike], *, infer_types: bool = False, stdin_format: str = "csv"
) -> pl.DataFrame:
    """Read several tables, one after the other, into one frame.

    Each item is a file, a glob pattern (`data/*.csv.gz`, `part-*.parquet`; its matches are taken in sorted
    order, and a pattern matching no file is an error) or `-` for stdin in `stdin_format` (csv, jsonl,
    ndjson, parquet, json; at most once). Every table must have the same columns in the same order, and
    each column the same type (a column that is all null in one file takes the type of the others); formats
    may be mixed. CSV is read as text unless `infer_types` (see read_table).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("no input given: name at least one file, glob pattern, or - for stdin")
    stdin_fmt = _named_format(stdin_format, "input")
    files = _expand(paths)
    for f in files:  # refuse a bad name before reading (perhaps large) files ahead of it
        if f != _STDIO:
            _check_input_file(Path(f))
    frames: list[pl.DataFrame] = []
    for f in files:
        df = read_table(f, infer_types=infer_types, format=stdin_fmt if f == _STDIO else None)
        if frames:
            _check_same_columns(f, df.columns, files[0], frames[0].columns)
        frames.append(df)
    if len(frames) == 1:
        return frames[0]
    schema = _common_schema(files, [df.schema for df in frames])
    frames = [
        df.with_columns(
            pl.col(c).cast(schema[c]) for c, t in df.schema.items() if t == pl.Null and c in schema
        )
        for df in frames
    ]
    return pl.concat(frames, how="vertical")


def scan_tables(paths: Sequence[_PathLike], *, infer_types: bool = False) -> pl.LazyFrame | None:
    """The table `read_tables` reads, as a LazyFrame that reads it a batch at a time, when every input
    is a file polars can scan: CSV, Parquet or JSON lines, not gzip-compressed. None otherwise (stdin,
    a .gz file, a .json array): then the table is read whole. The same checks, and the same values."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("no input given: name at least one file, glob pattern, or - for stdin")
    files = _expand(paths)
    formats = []
    for f in files:
        if f == _STDIO:
            return None
        fmt, gz = _check_input_file(Path(f))
        if gz or fmt == "json" or (fmt == "ndjson" and _GLOB_MAGIC.search(f)):  # (scan_ndjson globs)
            return None
        formats.append(fmt)
    frames: list[pl.LazyFrame] = []
    schemas: list[pl.Schema] = []
    for f, fmt in zip(files, formats, strict=True):
        try:
            if fmt == "csv":
                _check_csv_header(Path(f), f)
                if infer_types:
                    frame = pl.scan_csv(f, try_parse_dates=True, infer_schema_length=10_000, glob=False)
                else:
                    frame = pl.scan_csv(f, infer_schema=False, glob=False)
            elif fmt == "parquet":
                frame = pl.scan_parquet(f, glob=False, hive_partitioning=False)
            else:
                frame = pl.scan_ndjson(f, infer_schema_length=None)
            schema = frame.collect_schema()
        except UsageError:
            raise
        except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
            raise UsageError(f"input {f}: cannot read it as {fmt}: {_first_line(exc)}") from exc
        if frames:
            _check_same_columns(f, schema.names(), files[0], schemas[0].names())
        frames.append(frame)
        schemas.append(schema)
    if len(frames) == 1:
        return frames[0]
    common = _common_schema(files, schemas)
    return pl.concat(
        [
            frame.with_columns(
                pl.col(c).cast(common[c]) for c, t in schema.items() if t == pl.Null and c in common
            )
            for frame, schema in zip(frames, schemas, strict=True)
        ],
        how="vertical",
    )


def _check_same_columns(f: str, columns: list[str], first_file: str, first: list[str]) -> None:
    if columns == first:
        return
    label = "- (stdin)" if f == _STDIO else f
    missing = [c for c in first if c not in columns]
    extra = [c for c in columns if c not in first]
    if missing or extra:
        diff = "; ".join(
            part
            for part in (
                f"missing {_names(missing)}" if missing else "",
                f"extra {_names(extra)}" if extra else "",
            )
            if part
        )
    else:
        diff = f"same columns in another order ({_names(columns)})"
    raise UsageError(
        f"input {label}: its columns differ from those of {first_file}: {diff}; "
        "every input must have the same columns in the same order"
    )


def _common_schema(files: list[str], schemas: list[pl.Schema]) -> dict[str, pl.DataType]:
    """Each column's type across the inputs (a column all null in one input takes the others')."""
    schema: dict[str, pl.DataType] = {}
    for f, each in zip(files, schemas, strict=True):
        for column, dtype in each.items():
            if dtype == pl.Null:
                continue
            if column not in schema:
                schema[column] = dtype
            elif schema[column] != dtype:
                label = "- (stdin)" if f == _STDIO else f
                raise UsageError(
                    f"input {label}: column {column!r} is {dtype} here but {schema[column]} in an input "
                    "before it; every input must give each column the same type"
                )
    return schema


def _flatten_for_csv(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists or structs: such columns become JSON text."""
    nested = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
    if not nested:
        return df

    def encode(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False, default=str)

    return df.with_columns(pl.Series(c, [encode(v) for v in df[c].to_list()], dtype=pl.Utf8) for c in nested)


def _probe(directory: Path, name: str) -> None:
    """Prove files can be created in `directory`: make one beside where `name` goes, and remove it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".probe", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def _input_files(input_path: _PathLike | Sequence[_PathLike] | None) -> list[Path]:
    """The existing files that input paths and patterns name (quietly: reading them reports the rest)."""
    if input_path is None:
        return []
    items = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    files: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if s == _STDIO:
            continue
        if _GLOB_MAGIC.search(s) and not os.path.lexists(s):
            files += [Path(m) for m in glob.glob(s, recursive=True)]
        else:
            files.append(Path(s))
    return files


def check_output_path(
    path: _PathLike,
    *,
    input_path: _PathLike | Sequence[_PathLike] | None = None,
    format: str | None = None,
) -> Path:
    """Refuse an output path that cannot be written, before anything is sent.

    `-` is stdout (returned as Path("-")): always writable, never the input. For a file: its extension (or
    `format`) must name a format, it must not be an input (`input_path`: a path, pattern or a list of them),
    its directory must exist, and a file must be creatable there: a probe file is made and removed, since
    the output is written as a temporary file in that directory and renamed over the target. That is also
    why a read-only target file (chmod 444) in a writable directory passes: the rename replaces it (and the
    new file keeps its mode). In a sticky directory such as /tmp, a target that belongs to another user
    cannot be replaced, and is refused.
    """
    if os.fspath(path) == _STDIO:
        format_of(_STDIO, format)
        return Path(_STDIO)
    p = Path(path)
    _spec(p, "output", format)
    target = p.resolve()
    if any(target == f.resolve() for f in _input_files(input_path)):
        raise UsageError(
            f"output {p} is the input file: choose another output path (the input is never overwritten)"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output {p}: the directory {parent} does not exist")
    if p.is_dir():
        raise UsageError(f"output {p} is a directory; give a file name")
    try:
        _probe(parent, p.name)
    except OSError as exc:
        raise UsageError(
            f"output {p}: cannot write in {parent}: {exc.strerror or exc}; choose another output path"
        ) from exc
    if hasattr(os, "geteuid"):
        with contextlib.suppress(OSError):
            st, dst = p.stat(), parent.stat()
            if dst.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, dst.st_uid):
                raise UsageError(
                    f"output {p} belongs to another user in the sticky directory {parent}, so it cannot be "
                    "replaced; choose another output path"
                )
    return p


def check_checkpoint_dir(path: _PathLike) -> Path:
    """Refuse a checkpoint directory that cannot be written, before anything is sent; never creates it.

    An existing path must be a directory in which a file can be created (a probe is made and removed). A
    missing one will be created with its missing parents, so its nearest existing ancestor must be a
    directory in which one can be created.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"checkpoint {p} is not a directory; choose another checkpoint path")
        try:
            _probe(p, "enrich")
        except OSError as exc:
            raise UsageError(
                f"checkpoint {p}: cannot write in it: {exc.strerror or exc}; choose another checkpoint path"
            ) from exc
        return p
    if p.is_symlink():
        raise UsageError(f"checkpoint {p}: cannot create it: it is a broken symbolic link; remove it")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(
            f"checkpoint {p}: cannot create it: {ancestor} is not a directory; choose another checkpoint path"
        )
    try:
        _probe(ancestor, p.name)
    except OSError as exc:
        raise UsageError(
            f"checkpoint {p}: cannot create it: cannot write in {ancestor}: {exc.strerror or exc}; "
            "choose another checkpoint path"
        ) from exc
    return p


_ROW_GROUP_BYTES = 16 << 20


def _serialize(df: pl.DataFrame, fmt: str, f: IO[bytes]) -> None:
    if fmt == "csv":
        _flatten_for_csv(df).write_csv(f)
    elif fmt == "parquet":
        # Row groups of ~16 MB: polars encodes a whole row group before it writes it, and its default
        # (262,144 rows) held +127 MB while a million-row result was written; this holds ~60.
        per_row = max(1, df.estimated_size() // max(1, df.height))
        df.write_parquet(f, row_group_size=max(1_024, min(262_144, _ROW_GROUP_BYTES // per_row)))
    elif fmt == "json":
        df.write_json(f)  # one array of row objects
    else:
        df.write_ndjson(f)


def write_table(df: pl.DataFrame, path: _PathLike, format: str | None = None) -> None:
    """Write `df` atomically in the format the extension names (or `format`); `-` writes to stdout.

    For `-` the format is `format`, csv by default, written in one go and flushed. A name ending in .gz is
    gzip-compressed.
    """
    _write(lambda fmt, f: _serialize(df, fmt, f), path, format)


def write_frames(
    frames: Iterable[pl.DataFrame | pa.Table],
    schema: pl.Schema,
    path: _PathLike,
    format: str | None = None,
    *,
    row_group_rows: int | None = None,
) -> None:
    """Write `frames` (polars frames or Arrow tables), in order, as one table of `schema`, the way
    `write_table` writes a frame (same formats, atomic, .gz, `-`), one at a time as they come, so that
    no more than about two are in memory (a result merged in parts: `enrich._engine.assemble`). A
    Parquet file gets a row group per frame (of at most `row_group_rows`), encoded on a thread of its
    own while the next frame is made. CSV frames must be flat already (`flatten_for_csv`). JSON (one
    array) is the exception: it is built whole; use JSON lines for tables larger than memory."""

    def conform(frame: pl.DataFrame | pa.Table) -> pl.DataFrame:
        if isinstance(frame, pa.Table):
            frame = pl.from_arrow(frame, rechunk=False)  # type: ignore[assignment]
        assert isinstance(frame, pl.DataFrame)
        changed = {c: d for c, d in schema.items() if frame.schema[c] != d}
        return frame.cast(changed) if changed else frame

    def serialize(fmt: str, f: IO[bytes]) -> None:
        if fmt == "parquet":
            _write_parquet_frames(frames, schema, f, row_group_rows)
            return
        if fmt == "json":
            parts = [conform(frame) for frame in frames]
            (pl.concat(parts) if parts else pl.DataFrame(schema=schema)).write_json(f)
            return
        wrote = False
        for frame in frames:
            if fmt == "csv":
                conform(frame).write_csv(f, include_header=not wrote)
            else:
                conform(frame).write_ndjson(f)
            wrote = True
        if fmt == "csv" and not wrote:
            pl.DataFrame(schema=schema).write_csv(f)

    _write(serialize, path, format)


def _write_parquet_frames(
    frames: Iterable[pl.DataFrame | pa.Table], schema: pl.Schema, f: IO[bytes], row_group_rows: int | None
) -> None:
    """The frames as a Parquet file (zstd, as polars writes one), a frame encoded and written by a
    thread of the writer's own while the caller makes the next: pyarrow encodes without the GIL, and
    the merge that makes the frames is the other half of the work (a 10M-row result wrote its chunks
    to disk and polars read them back into its own writer: three passes over the result for one)."""
    import pyarrow.parquet as pq

    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    tables = (frame if isinstance(frame, pa.Table) else frame.to_arrow() for frame in frames)
    first = next(tables, None)
    if first is not None:
        tables = itertools.chain([first], tables)
    dictionary = _dictionary_columns(first, arrow_schema)
    with (
        pq.ParquetWriter(f, arrow_schema, compression="zstd", use_dictionary=dictionary) as writer,
        ThreadPoolExecutor(1) as pool,
    ):
        pending = None
        del first
        for table in tables:
            if table.schema != arrow_schema:  # (a column of nulls only, say: the same values)
                table = table.cast(arrow_schema)
            if pending is not None:
                pending.result()  # one frame written at a time, in order; at most two held
            pending = pool.submit(writer.write_table, table, row_group_size=row_group_rows)
            del table
        if pending is not None:
            pending.result()


def _dictionary_columns(first: pa.Table | None, schema: pa.Schema) -> list[str] | bool:
    """The columns a Parquet writer should dictionary-encode, judged by the first frame: text columns
    whose values repeat (a column of unique names or run ids is first encoded as a dictionary, then
    again plainly once the dictionary overflows: 7% of a 10M-row output's writing). Other types are
    left to the writer (dictionary-encoded, as by default)."""
    if first is None or not first.num_rows:
        return True
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    text = (pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary())
    unique = {
        field.name
        for field in schema
        if field.type in text
        and field.name in first.column_names
        and pc.count_distinct(first.column(field.name)).as_py() > first.num_rows // 2
    }
    if not unique:
        return True
    # (the writer names a column by its path: a struct's leaves are "basis.x", not "basis")
    empty = io.BytesIO()
    pq.write_table(schema.empty_table(), empty)
    described = pq.ParquetFile(io.BytesIO(empty.getvalue())).schema
    paths = [described.column(i).path for i in range(len(described))]
    return [p for p in paths if p not in unique]


def flatten_for_csv(df: pl.DataFrame) -> pl.DataFrame:
    """`df` as CSV can hold it: list and struct columns become JSON text (as `write_table` writes them)."""
    return _flatten_for_csv(df)


def _write(serialize: Callable[[str, IO[bytes]], None], path: _PathLike, format: str | None) -> None:
    if os.fspath(path) == _STDIO:
        fmt = format_of(_STDIO, format)
        with tempfile.TemporaryFile() as buffer:  # parquet wants a seekable file; stdout is often a pipe
            serialize(fmt, buffer)  # type: ignore[arg-type]
            buffer.seek(0)
            shutil.copyfileobj(buffer, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
        return
    p = Path(path)
    fmt, gz = _spec(p, "output", format)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            if gz:
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as packed:
                    serialize(fmt, packed)  # type: ignore[arg-type]
            else:
                serialize(fmt, f)
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
