"""Rows → Task API inputs, and the content keys that identify them.

The path of a frame through enrich:

    to_polars(data)            polars / lazy / pandas frame / arrow table → (polars DataFrame, kind)
    build_inputs(df, ...)      each row → a JSON-safe dict of its columns, or a prompt string
    row_keys(inputs, spec, p)  each row → a 32-hex content key (sha256 of input + task spec + processor)
    dedupe(keys)               distinct keys once, and each row's index into them
    ...                        (the engine runs the distinct inputs and builds result columns)
    from_polars(df, kind, ..)  back to the caller's frame type (pandas keeps its index and dtypes)

How cells become JSON (`build_inputs`), column-wise in polars, so a million rows take about a second:

| polars dtype            | JSON value                                                                 |
|-------------------------|----------------------------------------------------------------------------|
| String, integers, Boolean | as is (integers of any width stay exact JSON integers)                   |
| Float32/Float64         | a number; NaN and ±infinity become null (JSON has no NaN)                  |
| Decimal                 | a **string** with the exact digits and scale (`"1234.50"`): a JSON number  |
|                         | would be read back as a binary float and lose digits or trailing zeros     |
| Date                    | `"2024-03-01"`                                                             |
| Datetime                | ISO 8601, `"2024-03-01T09:30:00"`, fraction only when non-zero (`.250`,    |
|                         | `.000500`); with a time zone the offset is kept: `"…T09:30:00+01:00"`      |
| Time                    | `"09:30:00"`, with a fraction when non-zero                                |
| Duration                | an ISO 8601 duration string: `"P1DT2H"`, `"PT1.5S"`, `"-PT3S"`              |
| Categorical, Enum       | the category as a string                                                   |
| List, Array, Struct     | arrays and objects, converted recursively by the rules above              |
| Null (any dtype)        | null; the key stays in the object                                          |
| Binary                  | refused (`UsageError` naming the column and first row): decode it first    |
| Object                  | converted per cell by the same rules; a cell that is none of these types   |
|                         | is refused (`UsageError` naming the column and row)                        |

Row numbers in messages are 0-based positions in the frame.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import polars as pl

from ._exceptions import UsageError
from ._jsonschema import Validator

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

__all__ = [
    "INPUT_LIMIT",
    "build_inputs",
    "canonical_json",
    "check_input_size",
    "dedupe",
    "from_polars",
    "row_keys",
    "to_polars",
    "validate_inputs",
]

#: Most characters the Task API takes for task spec + input together (both as compact JSON).
INPUT_LIMIT = 25_000

#: A tag hashed into every row key; changing how keys are made must change it (see `row_keys`).
_KEY_VERSION = "enrich-row-key/1"

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    """`value` as canonical JSON: sorted keys, no spaces, UTF-8 text kept, NaN refused (`ValueError`).

    The same as `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)`, with a reused encoder (it runs once per row).

    >>> canonical_json({"b": 1, "a": ["é", None]})
    '{"a":["é",null],"b":1}'
    """
    return _ENCODER.encode(value)


# --------------------------------------------------------------------------------------------------
# Frames in and out
# --------------------------------------------------------------------------------------------------


def _is_pandas_frame(data: object) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(data, pd.DataFrame)


def to_polars(data: object) -> tuple[pl.DataFrame, str]:
    """The caller's frame as a polars DataFrame, and its kind (`"polars"`, `"pandas"` or `"arrow"`) for
    `from_polars`.

    Accepts a polars DataFrame, a polars LazyFrame (collected here), a pandas DataFrame (its index is
    left out of the inputs; `from_polars` puts it back) or a pyarrow Table. A frame with no rows is
    fine (the result is empty, with every column typed). Refused with `UsageError`: any other type,
    a frame with no columns, duplicate column names, pandas columns with several levels, and pandas
    columns polars cannot read (mixed types in one object column).

    >>> df, kind = to_polars(pl.DataFrame({"company": ["Acme"]}))
    >>> kind, df.columns
    ('polars', ['company'])
    """
    if isinstance(data, pl.DataFrame):
        df, kind = data, "polars"
    elif isinstance(data, pl.LazyFrame):
        df, kind = data.collect(), "polars"
    elif _is_pandas_frame(data):
        df, kind = _from_pandas(data), "pandas"
    elif _is_arrow_table(data):
        names = list(data.column_names)  # type: ignore[attr-defined]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UsageError(
                f"duplicate column names: {', '.join(map(repr, dupes))}; give every column a distinct name"
            )
        frame = pl.from_arrow(data)
        assert isinstance(frame, pl.DataFrame)
        df, kind = frame, "arrow"
    else:
        hint = ""
        if isinstance(data, pl.Series) or type(data).__name__ == "Series":
            hint = " (for a Series, pass series.to_frame())"
        raise UsageError(
            "data must be a polars DataFrame or LazyFrame, a pandas DataFrame or a pyarrow Table; "
            f"got {type(data).__name__}{hint}"
        )
    if df.width == 0:
        raise UsageError("data has no columns; nothing to send")
    return df, kind


def _is_arrow_table(data: object) -> bool:
    pa = sys.modules.get("pyarrow")
    return pa is not None and isinstance(data, pa.Table)


def _from_pandas(data: Any) -> pl.DataFrame:
    pd = sys.modules["pandas"]
    if isinstance(data.columns, pd.MultiIndex):
        raise UsageError(
            "pandas columns with several levels are not supported; flatten them first, e.g. "
            "df.columns = ['_'.join(map(str, c)) for c in df.columns]"
        )
    names = [str(c) for c in data.columns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(
            f"duplicate column names: {', '.join(map(repr, dupes))}; give every column a distinct name"
        )
    try:
        return pl.from_pandas(data)
    except Exception as exc:  # pyarrow and polars raise several types; find the culprit column
        for j, name in enumerate(names):
            try:
                pl.from_pandas(data.iloc[:, [j]])
            except Exception:
                raise UsageError(_pandas_column_problem(name, data.iloc[:, j])) from None
        raise UsageError(f"cannot read the pandas frame: {' '.join(str(exc).split())}") from None


def _pandas_column_problem(name: str, column: Any) -> str:
    first: str | None = None
    for row, value in enumerate(column.tolist()):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            _py_json(value)
        except _NotJSON:
            return _object_problem(name, row, value)
        kind = _kind(value)
        if first is None:
            first = kind
        elif kind != first:
            return (
                f"column {name!r} mixes types: row {row} holds {kind} {_short(value)} among {first} "
                f"values; give the column one type, e.g. df[{name!r}] = df[{name!r}].astype(str)"
            )
    return f"column {name!r} cannot be converted to a polars column; give it one plain type"


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float | Decimal):
        return "number"
    return type(value).__name__


def from_polars(
    df: pl.DataFrame, kind: str, original: object = None, *, added: Sequence[str] | None = None
) -> Any:
    """The result `df` as the caller's frame type: `kind` and `original` come from `to_polars`.

    `added` names the columns the job made (default: those not in `original`); every other column
    of `df` is one of the caller's, given back as the caller gave it.

    polars in → the polars DataFrame itself (also for a LazyFrame: the result is computed data).
    pyarrow in → a pyarrow Table: the caller's columns as they were (same types and chunks), then the
    added ones. pandas in → a pandas DataFrame. When `original` (the caller's pandas frame) is given and
    has as many rows as `df`, its columns come back untouched (same labels, dtypes and values) with its
    index, and the new columns are added after conversion: integer and boolean columns become pandas
    nullable dtypes (`Int64`, `boolean`, so nulls do not turn integers into floats), floats `float64`
    (null → NaN), strings pandas' string dtype, lists and structs object columns of Python lists and
    dicts.

    >>> out = from_polars(pl.DataFrame({"a": [1]}), "polars")
    >>> out.shape
    (1, 1)
    """
    if kind == "polars":
        return df
    if kind == "arrow":
        import pyarrow as pa

        if not isinstance(original, pa.Table) or original.num_rows != df.height:
            return df.to_arrow()
        names = original.column_names
        new = [c for c in df.columns if (c in added if added is not None else c not in names)]
        table = original.select([c for c in df.columns if c not in new])
        for name, column in zip(new, df.select(new).to_arrow().columns, strict=True):
            table = table.append_column(name, column)
        return table.select(df.columns)
    if kind != "pandas":
        raise ValueError(f"unknown frame kind {kind!r}")
    import pandas as pd

    if not isinstance(original, pd.DataFrame) or len(original) != df.height:
        return _to_pandas(df)
    labels = {str(c): c for c in original.columns}
    fresh = set(added) if added is not None else set()
    kept = [c for c in df.columns if c in labels and c not in fresh]
    new = [c for c in df.columns if c not in kept]
    left = original[[labels[c] for c in kept]].reset_index(drop=True)
    out = pd.concat([left, _to_pandas(df.select(new))], axis=1) if new else left
    out = out[[labels[c] if c in kept else c for c in df.columns]]
    out.index = original.index
    out.columns.name = original.columns.name
    return out


def _to_pandas(df: pl.DataFrame) -> Any:
    import pandas as pd
    import pyarrow as pa

    nullable = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.uint8(): pd.UInt8Dtype(),
        pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(),
        pa.uint64(): pd.UInt64Dtype(),
        pa.bool_(): pd.BooleanDtype(),
    }
    nested = [c for c, t in df.schema.items() if isinstance(t, pl.List | pl.Array | pl.Struct)]
    out = df.drop(nested).to_pandas(types_mapper=nullable.get)
    for c in nested:  # pyarrow would give numpy arrays, and structs with ints turned into floats
        out[c] = pd.Series(df[c].to_list(), dtype=object)
    return out[df.columns]


# --------------------------------------------------------------------------------------------------
# Cells → JSON
# --------------------------------------------------------------------------------------------------


class _NotJSON(Exception):
    pass


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _object_problem(name: str, row: int, value: object) -> str:
    binary = isinstance(value, bytes | bytearray | memoryview)
    kind = "binary data" if binary else f"a value of type {type(value).__name__}"
    fix = (
        "decode it to text first (e.g. base64)"
        if binary
        else "convert the column to text, numbers or dates first"
    )
    return f"column {name!r} row {row} holds {kind}, which cannot be sent as JSON; {fix}"


def _iso_duration(td: timedelta) -> str:
    """ISO 8601 duration, as polars' `dt.to_string("iso")` writes it (`P1DT2H`, `PT1.5S`, `-PT3S`)."""
    micros = (td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    days, rest = divmod(micros, 86_400_000_000)
    hours, rest = divmod(rest, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds, frac = divmod(rest, 1_000_000)
    text = f"{sign}P{days}D" if days else f"{sign}P"
    clock = ""
    if hours:
        clock += f"{hours}H"
    if minutes:
        clock += f"{minutes}M"
    if seconds or frac:
        clock += f"{seconds}.{frac:06d}".rstrip("0") + "S" if frac else f"{seconds}S"
    if clock:
        text += "T" + clock
    elif not days:
        text += "T0S"
    return text


def _py_json(value: Any) -> Any:
    """A Python cell (from an Object column or pandas) → a JSON-safe value, by the module's rules."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _iso_duration(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise _NotJSON
        return {k: _py_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_py_json(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        try:
            return _py_json(item())
        except (TypeError, ValueError):
            raise _NotJSON from None
    raise _NotJSON


def _has_binary(dtype: PolarsDataType) -> bool:
    if isinstance(dtype, pl.List | pl.Array):
        return _has_binary(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_has_binary(f.dtype) for f in dtype.fields)
    return dtype == pl.Binary


def _has_object(dtype: PolarsDataType) -> bool:
    if isinstance(dtype, pl.List | pl.Array):
        return _has_object(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_has_object(f.dtype) for f in dtype.fields)
    return dtype == pl.Object


def _json_expr(e: pl.Expr, dtype: PolarsDataType) -> pl.Expr | None:
    """An expression giving JSON-safe values for a column of `dtype`; None when it needs no change."""
    if dtype.is_integer() or dtype in (pl.String, pl.Boolean, pl.Null):
        return None
    if dtype.is_float():
        return pl.when(e.is_finite()).then(e)
    if dtype.is_decimal():
        return e.cast(pl.String)
    if dtype == pl.Date:
        return e.dt.to_string("%Y-%m-%d")
    if isinstance(dtype, pl.Datetime):
        return e.dt.to_string("%Y-%m-%dT%H:%M:%S%.f" + ("%:z" if dtype.time_zone else ""))
    if dtype == pl.Time:
        return e.dt.to_string("%H:%M:%S%.f")
    if isinstance(dtype, pl.Duration):
        return e.dt.to_string("iso")
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return e.cast(pl.String)
    if isinstance(dtype, pl.Array):
        inner = _json_expr(pl.element(), dtype.inner)
        listed = e.arr.to_list()
        return listed if inner is None else listed.list.eval(inner)
    if isinstance(dtype, pl.List):
        inner = _json_expr(pl.element(), dtype.inner)
        return None if inner is None else e.list.eval(inner)
    if isinstance(dtype, pl.Struct):
        fields = [(f.name, _json_expr(e.struct.field(f.name), f.dtype)) for f in dtype.fields]
        if all(x is None for _, x in fields):
            return None
        rebuilt = pl.struct([(x if x is not None else e.struct.field(n)).alias(n) for n, x in fields])
        return pl.when(e.is_not_null()).then(rebuilt)
    raise UsageError(f"columns of dtype {dtype} cannot be sent as JSON; convert the column first")


def _json_columns(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with every column converted to JSON-safe values (Object columns are left for Python)."""
    exprs = []
    for name, dtype in df.schema.items():
        if _has_binary(dtype):
            nonnull = df.get_column(name).is_not_null().arg_true()
            if len(nonnull):
                row = int(nonnull[0])
                raise UsageError(_object_problem(name, row, b""))
            exprs.append(pl.repeat(None, df.height, dtype=pl.Null).alias(name))
            continue
        if _has_object(dtype):
            exprs.append(pl.col(name))
            continue
        try:
            x = _json_expr(pl.col(name), dtype)
        except UsageError:
            raise UsageError(
                f"column {name!r} has dtype {dtype}, which cannot be sent as JSON; convert it first"
            ) from None
        exprs.append(pl.col(name) if x is None else x.alias(name))
    return df.select(exprs)


def _python_column(df: pl.DataFrame, name: str) -> list[Any]:
    """The JSON-safe values of an Object column, converted cell by cell."""
    values = df.get_column(name).to_list()
    for row, value in enumerate(values):
        try:
            values[row] = _py_json(value)
        except _NotJSON:
            raise UsageError(_object_problem(name, row, value)) from None
    return values


# --------------------------------------------------------------------------------------------------
# build_inputs
# --------------------------------------------------------------------------------------------------


def near_name(name: str, choices: Sequence[str]) -> str | None:
    """The choice `name` was probably meant to be (the same but for case, else the closest), or None."""
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = near_name(name, choices)
    return f" Did you mean {close!r}?" if close else ""


def _missing_column(name: str, available: Sequence[str], what: str = "column") -> UsageError:
    shown = ", ".join(available[:20]) + (f", … ({len(available)} in all)" if len(available) > 20 else "")
    return UsageError(f"{what} {name!r} not found; available: {shown}.{_did_you_mean(name, available)}")


def build_inputs(
    df: pl.DataFrame,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    first_row: int = 0,
) -> list[Any]:
    """Each row of `df` as a Task API input: a JSON-safe dict of its columns, or a prompt string.

    `columns`: the columns to send (default: all, in frame order); a single name may be given as a str.
    A name not in `df` is a `UsageError` listing the available columns, with a did-you-mean.

    `prompt`: a template such as `"Find the CEO of {company} ({website})"` that makes each input a
    string. Fields name columns, as in `str.format` (`{{` and `}}` are literal braces), and may carry a
    format spec, applied to the cell's Python value (`{revenue:,.0f}`, `{since:%d %b %Y}`). A null
    (or NaN) renders as an empty string, so "({website})" becomes "()": "null" or "None" in a prompt
    reads as a value the processor might repeat. Without a spec, other values render as their JSON
    form by the module's table (`true`, `[1, 2]`, `2024-03-01`, a Decimal's exact digits). With a
    prompt, `columns` (if given) limits the columns the template may use. Refused before anything is
    sent: a field naming no column (with a did-you-mean), positional fields (`{}`), conversions
    (`!r`), nested fields in a spec, a spec that fails on a cell, and a template with no fields. A
    column whose name holds `:`, `!`, `{` or `}` cannot be named in a template. A row is named in an
    error by its place in `df` plus `first_row` (`df` a batch of a larger table).

    Cells are converted by the table in this module's docstring, column-wise in polars. Speed: about
    1 s per 1,000,000 rows of four scalar columns.

    >>> df = pl.DataFrame({"company": ["Acme", "Initech"], "website": ["acme.com", None]})
    >>> build_inputs(df)
    [{'company': 'Acme', 'website': 'acme.com'}, {'company': 'Initech', 'website': None}]
    >>> build_inputs(df, prompt="CEO of {company} ({website})?")
    ['CEO of Acme (acme.com)?', 'CEO of Initech ()?']
    """
    chosen = chosen_columns(df, columns)
    if prompt is not None:
        return _render_prompt(df, chosen, prompt, first_row)
    sub = _json_columns(df.select(chosen))
    # column lists zipped into dicts: about twice as fast as sub.rows(named=True)
    cols = [
        _python_column(sub, name) if _has_object(dtype) else sub.get_column(name).to_list()
        for name, dtype in sub.schema.items()
    ]
    return [dict(zip(chosen, values, strict=True)) for values in zip(*cols, strict=True)]


def chosen_columns(df: pl.DataFrame, columns: Sequence[str] | str | None) -> list[str]:
    """The columns `build_inputs` sends: `columns` checked against `df` (all of them for None)."""
    available = df.columns
    if isinstance(columns, str):
        columns = [columns]
    if columns is not None:
        chosen = list(columns)
        if not chosen:
            raise UsageError("columns is empty; name at least one input column (or leave it out for all)")
        for name in chosen:
            if not isinstance(name, str):
                raise UsageError(f"column names must be strings, got {name!r}")
            if name not in available:
                raise _missing_column(name, available)
        dupes = sorted({c for c in chosen if chosen.count(c) > 1})
        if dupes:
            raise UsageError(f"columns lists {', '.join(map(repr, dupes))} more than once; list each once")
    else:
        chosen = list(available)
    return chosen


def _render_prompt(
    df: pl.DataFrame, allowed: list[str], prompt: str, first_row: int = 0, what: str = "prompt"
) -> list[str]:
    """Each row's `prompt` template rendered (see `build_inputs`); `what` names the template in errors
    (a run option's place, for `run_options=`)."""
    if not isinstance(prompt, str):
        raise UsageError(f"{what} must be a string template, got {type(prompt).__name__}")
    try:
        parts = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise UsageError(f"{what} template: {exc}; write {{{{ and }}}} for literal braces") from None
    pieces: list[str] = []
    fields: list[tuple[str, str]] = []
    for literal, name, spec, conversion in parts:
        pieces.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if name == "" or (name.isdigit() and name not in df.columns):
            raise UsageError(f"{what} template: fields must name columns, e.g. {{company}}; got {{{name}}}")
        if conversion:
            raise UsageError(f"{what} template: conversions like {{{name}!{conversion}}} are not supported")
        if spec and ("{" in spec or "}" in spec):
            raise UsageError(f"{what} template: nested fields in {{{name}:{spec}}} are not supported")
        if name not in allowed:
            if name in df.columns:
                raise UsageError(f"{what} field {{{name}}} names a column left out by columns=; add it there")
            raise _missing_column(name, allowed, what=f"{what} field column")
        fields.append((name, spec or ""))
        pieces.append("{}")
    if not fields:
        raise UsageError(
            "the prompt template names no columns, so every row would get the same input; "
            "add fields such as {company}"
        )
    template = "".join(pieces)
    names = list(dict.fromkeys(name for name, _ in fields))
    sub = _json_columns(df.select(names))
    rendered: dict[tuple[str, str], list[str]] = {}
    for name, spec in fields:
        if (name, spec) in rendered:
            continue
        if not spec and sub.schema[name] == pl.String:
            rendered[(name, spec)] = sub.get_column(name).fill_null("").to_list()
            continue
        if spec:  # a format spec applies to the cell's own Python value: {since:%d %b %Y}, {price:.2f}
            values = df.get_column(name).to_list()
        elif _has_object(sub.schema[name]):
            values = _python_column(sub, name)
        else:
            values = sub.get_column(name).to_list()
        rendered[(name, spec)] = _render_values(name, values, spec, first_row, what)
    columns = [rendered[key] for key in fields]
    return [template.format(*vals) for vals in zip(*columns, strict=True)]


def _render_values(
    name: str, values: list[Any], spec: str, first_row: int = 0, what: str = "prompt"
) -> list[str]:
    out: list[str] = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            out.append("")
            continue
        if spec:
            try:
                out.append(format(value, spec))
            except (ValueError, TypeError) as exc:
                raise UsageError(
                    f"{what} field {{{name}:{spec}}} fails at row {first_row + row} on {_short(value)}: {exc}"
                ) from None
        elif isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool | list | dict):
            out.append(json.dumps(value, ensure_ascii=False))
        else:
            out.append(str(value))
    return out


# --------------------------------------------------------------------------------------------------
# Keys, dedupe, limits, validation
# --------------------------------------------------------------------------------------------------


def row_keys(inputs: Sequence[Any], task_spec: Mapping[str, Any], processor: str) -> list[str]:
    """Each input's content key: 32 hex characters, stable across runs, processes and versions.

    The key is the first 32 hex digits of the SHA-256 of the UTF-8 bytes of
    `canonical_json(["enrich-row-key/1", processor, task_spec, input])`. So identical inputs under the
    same task spec and processor get identical keys, and any change to the input, the spec (fields,
    descriptions, input schema) or the processor gives a new key. Keys are stored in checkpoints
    and run metadata: this definition must never change without changing the version tag.
    `ValueError` if an input holds NaN or infinity (`build_inputs` never makes those).

    Speed: about 1.5 s per 1,000,000 inputs of four scalar fields (JSON encoding, then SHA-256).

    >>> row_keys([{"company": "Acme"}], {"output_schema": {"type": "text", "description": "CEO"}}, "base")
    ['50896f2d89292ef4bb2dc0678b3a456c']
    """
    return keys_and_sizes(inputs, task_spec, processor)[0]


def keys_and_sizes(
    inputs: Sequence[Any],
    task_spec: Mapping[str, Any],
    processor: str,
    *,
    options: str | pl.Series | None = None,
) -> tuple[list[str], list[int]]:
    """`row_keys()`, and each input's size as `check_input_size` measures it, from one JSON encoding.

    `options`: the run options the inputs are sent with, as canonical JSON (`enrich._run_options`):
    one text for every input, or a Series of one per input. They are part of the key, as a fifth
    element: `["enrich-row-key/1", processor, task_spec, input, options]`."""
    head = canonical_json([_KEY_VERSION, processor, task_spec])
    texts = _encode_many(inputs)
    native = len(texts) >= _NATIVE_FROM or isinstance(options, pl.Series)
    hashed = _polars_keys(pl.Series(texts, dtype=pl.String), head, options, as_list=True) if native else None
    if isinstance(hashed, list):
        keys = hashed
    elif isinstance(options, pl.Series):
        keys = _python_keys(texts, head, options.to_list())
    else:
        keys = _python_keys(texts, head, options)
    strings = all(type(v) is str for v in inputs)  # a string input is measured by its own length
    return keys, [len(v) for v in inputs] if strings else [len(t) for t in texts]


def _python_keys(
    texts: Sequence[str | bytes], head: str, options: str | list[str] | None = None
) -> list[str]:
    """The key of each input's canonical JSON text (and its options' text): the reference definition,
    with hashlib."""
    prefix = hashlib.sha256(head[:-1].encode() + b",")
    if isinstance(options, list):
        tails: Iterable[bytes] = (b"," + o.encode() + b"]" for o in options)
    else:
        tails = itertools.repeat(b"]" if options is None else b"," + options.encode() + b"]", len(texts))
    keys = []
    for text, tail in zip(texts, tails, strict=True):
        h = prefix.copy()
        h.update(text.encode() if isinstance(text, str) else text)
        h.update(tail)
        keys.append(h.hexdigest()[:32])
    return keys


#: The messages hashed at once by `_polars_keys`, in bytes.
_MESSAGE_BYTES = 32 << 20

#: The longest head (the key's version, processor and task spec, plus fixed options) `_polars_keys`
#: hashes again for every row: 0.5 us + 0.8 ns per byte a row on one core, against hashlib's ~0.9 us
#: whatever the head (its state after the head is copied); measured on 2 cores.
_NATIVE_HEAD_MAX = 1_000

#: Below this many inputs the keys are computed with hashlib (the plugin's call costs more than it saves).
_NATIVE_FROM = 4_096


def _polars_keys(
    texts: pl.Series, head: str, options: str | pl.Series | None = None, *, as_list: bool = False
) -> pl.Series | list[str] | None:
    """The keys of `texts` (each input's canonical JSON, and `options` as `keys_and_sizes` takes them)
    computed inside polars by the `polars-hash` plugin (SHA-256 in Rust, on every core): 10,000,000
    keys in about 3 s instead of 10 s of hashlib in a Python loop, and no Python string per row. None
    when the plugin is missing or fails, or when the task spec is so long (`_NATIVE_HEAD_MAX`) that
    hashing it again for every row costs more than hashlib's copy of its state. `as_list`: the keys as
    a list, converted a slice at a time (never the Series and the list of them at once).

    A key is a row's identity in the checkpoint, so the plugin is never trusted blindly: on every call
    the keys of a spread sample (the first and last rows, and evenly spaced ones) are computed with
    hashlib too, and any difference means None (the caller falls back to `_python_keys`).
    """
    n = texts.len()
    fixed = len(head) + len(options if isinstance(options, str) else "")  # characters in every message
    if fixed > _NATIVE_HEAD_MAX:
        return None
    frame = pl.DataFrame({"t": texts})
    parts = [pl.lit(head[:-1] + ","), pl.col("t")]
    if isinstance(options, pl.Series):
        frame = frame.with_columns(options.alias("o"))
        parts += [pl.lit(","), pl.col("o")]
    elif options is not None:
        parts.append(pl.lit("," + options))
    parts.append(pl.lit("]"))
    # Each message repeats the task spec (up to 15,000 characters): made a slice of rows at a time, so
    # they are never all in memory (whole, a million messages of a 500-character spec were 730 MB).
    step = max(1_024, _MESSAGE_BYTES // (fixed + 64))
    try:
        import polars_hash as plh

        hashed = plh.col("m").chash.sha2_256().str.slice(0, 32)
        pieces = []
        listed: list[str] = []
        # As many slices at once as polars has threads (a single select hashes on one core).
        starts = list(range(0, n, step))
        at_once = max(1, pl.thread_pool_size())
        for i in range(0, len(starts), at_once):
            group = [
                frame.lazy().slice(start, step).select(pl.concat_str(parts).alias("m")).select(hashed)
                for start in starts[i : i + at_once]
            ]
            for done in pl.collect_all(group):
                if as_list:
                    listed += done["m"].to_list()
                else:
                    pieces.append(done["m"])
        keys: pl.Series | list[str] = listed
        if not as_list:
            keys = pl.concat(pieces, rechunk=True) if pieces else pl.Series("m", [], dtype=pl.String)
        del pieces
    except Exception:  # (not installed, or a polars it was not built for: the reference path is kept)
        return None
    sample = sorted({*range(min(16, n)), *range(max(0, n - 16), n), *range(0, n, max(1, n // 64))})
    extra = options.gather(sample).to_list() if isinstance(options, pl.Series) else options
    got = [keys[i] for i in sample] if isinstance(keys, list) else keys.gather(sample).to_list()
    if len(keys) != n or None in got or got != _python_keys(texts.gather(sample).to_list(), head, extra):
        return None
    if isinstance(keys, pl.Series) and keys.null_count():
        return None
    return keys


_KEY_SLICE = 65_536


def text_keys_and_sizes(
    df: pl.DataFrame,
    columns: Sequence[str],
    task_spec: Mapping[str, Any],
    processor: str,
    *,
    options: str | pl.Series | None = None,
    as_list: bool = False,
) -> tuple[list[str] | pl.Series, pl.Series] | None:
    """`keys_and_sizes(build_inputs(df, columns=columns), task_spec, processor)` when every column sent
    is text, computed from the columns: polars writes each row's canonical JSON (`struct.json_encode`,
    fields in sorted order), so no Python dict is built per row (a million rows: 1 s instead of 5, and
    none of the 390 MB of dicts). None when it does not apply.

    The keys are the checkpoint's identity of a row: they must be exactly those of `row_keys`. polars'
    escaping matches `canonical_json` character for character (tested on every code point to U+3000
    and beyond), and a sample of rows (the first, the last, and evenly spread ones) is encoded both
    ways on every call: any difference falls back to the per-row path.
    """
    n = df.height
    if not n or not columns or any(df.schema[c] != pl.String for c in columns):
        return None
    text = df.select(pl.struct(sorted(columns)).struct.json_encode().alias("t"))["t"]
    sample = sorted({*range(min(64, n)), *range(max(0, n - 64), n), *range(0, n, max(1, n // 128))})
    want = [canonical_json(x) for x in build_inputs(df[sample], columns=list(columns))]
    if text.gather(sample).to_list() != want:
        return None
    head = canonical_json([_KEY_VERSION, processor, task_spec])
    native = n >= _NATIVE_FROM or isinstance(options, pl.Series)
    hashed = _polars_keys(text, head, options, as_list=as_list) if native else None
    if hashed is not None:
        return hashed, text.str.len_chars()
    keys: list[str] = []
    encoded = text.cast(pl.Binary)
    # A slice at a time: a bytes object per row of the whole column, freed among the keys kept, would
    # leave the process ~300 MB larger at a million rows (memory the allocator cannot give back).
    for start in range(0, n, _KEY_SLICE):
        extra = options.slice(start, _KEY_SLICE).to_list() if isinstance(options, pl.Series) else options
        keys += _python_keys(encoded.slice(start, _KEY_SLICE).to_list(), head, extra)
    return keys, text.str.len_chars()  # (a Series: no int object per row)


def _encode_many(values: Sequence[Any]) -> list[str]:
    """`[canonical_json(v) for v in values]`, computed column-wise when the values allow it.

    Inputs from `build_inputs` are all dicts with the same keys, or all strings. Then each column is
    encoded with the exact primitive the json encoder uses for its type (`encode_basestring` for
    str, `int.__repr__`, `float.__repr__`), and rows are assembled from a template with the keys in
    sorted order: the same text as `canonical_json`, about three times faster. Anything else (mixed
    types in a column, nested values, differing keys) falls back to `canonical_json` for that column
    or for every value.
    """
    encode = _ENCODER.encode
    if not values:
        return []
    first = values[0]
    if type(first) is str and all(type(v) is str for v in values):
        return [_encode_str(v) for v in values]
    if type(first) is not dict or not all(type(k) is str for k in first):
        return [encode(v) for v in values]
    keys = sorted(first)
    width = len(keys)
    if not all(type(v) is dict and len(v) == width for v in values):
        return [encode(v) for v in values]
    try:
        columns = [[v[k] for v in values] for k in keys]
    except KeyError:
        return [encode(v) for v in values]
    if not columns:
        return ["{}"] * len(values)
    template = "{" + ",".join(_encode_str(k).replace("%", "%%") + ":%s" for k in keys) + "}"
    encoded = [_encode_column(c) for c in columns]
    return [template % row for row in zip(*encoded, strict=True)]


_encode_str = json.encoder.encode_basestring  # the function JSONEncoder uses with ensure_ascii=False
_NONE = type(None)


def _encode_column(values: list[Any]) -> list[str]:
    types = set(map(type, values))
    types.discard(_NONE)
    if types == {str}:
        return ["null" if v is None else _encode_str(v) for v in values]
    if types == {int}:
        return ["null" if v is None else int.__repr__(v) for v in values]
    if types == {float}:
        if not all(v is None or v - v == 0.0 for v in values):
            raise ValueError("Out of range float values are not JSON compliant")
        return ["null" if v is None else float.__repr__(v) for v in values]
    if types == {bool}:
        return ["null" if v is None else "true" if v else "false" for v in values]
    if not types:
        return ["null"] * len(values)
    encode = _ENCODER.encode
    return [encode(v) for v in values]


def dedupe(keys: Iterable[str]) -> tuple[list[str], Sequence[int]]:
    """The distinct keys in first-seen order, and for each row the index of its key among them.

    >>> dedupe(["a", "b", "a", "c", "b"])
    (['a', 'b', 'c'], [0, 1, 0, 2, 1])
    """
    keys = keys if isinstance(keys, list) else list(keys)
    column = pl.Series("k", keys, dtype=pl.String)
    if len(column) < 10_000:  # a dict is quicker for a few
        positions: dict[str, int] = {}
        index = [positions.setdefault(k, len(positions)) for k in column.to_list()]
        return list(positions), index
    # In polars: a million keys in ~0.3 s instead of ~1 s.
    distinct = column.unique(maintain_order=True)
    if len(distinct) == len(column):  # no repeats (the usual table): the same key objects, not copies
        return keys, range(len(keys))  # (no int object per row)
    at = column.to_frame().join(
        distinct.to_frame().with_row_index("d"), on="k", how="left", maintain_order="left"
    )["d"]
    return distinct.to_list(), at.to_list()


def check_input_size(
    inputs: Sequence[Any],
    task_spec: Mapping[str, Any],
    *,
    limit: int = INPUT_LIMIT,
    sizes: Sequence[int] | None = None,
) -> list[str | None]:
    """Per input, why the API would refuse it for size, or None when it fits.

    The Task API takes at most `limit` (25,000) characters of task spec + input together. Both are
    measured as compact JSON (`canonical_json`), a string input by its length. Returns one line per
    problem rather than raising, so the engine can fail just those rows.

    >>> spec = {"output_schema": {"type": "text", "description": "CEO"}}
    >>> check_input_size(["Acme", "x" * 30_000], spec)[0] is None
    True
    """
    spec_chars = len(canonical_json(task_spec))
    room = limit - spec_chars
    if isinstance(sizes, pl.Series):  # (from `text_keys_and_sizes`): only the rows over are looked at
        over = (sizes > room).fill_null(False)
        if not over.any():
            return [None] * len(sizes)
        sizes = sizes.to_list()
    if sizes is None:  # `keys_and_sizes` gives them without a second encoding
        if all(type(v) is str for v in inputs):
            sizes = [len(v) for v in inputs]
        else:
            sizes = [len(text) for text in _encode_many(inputs)]
    if max(sizes, default=0) <= room:
        return [None] * len(sizes)
    problems: list[str | None] = []
    for size in sizes:
        if size <= room:
            problems.append(None)
        else:
            problems.append(
                f"input too large: {size:,} characters, plus {spec_chars:,} of task spec, is over the Task "
                f"API's {limit:,}; send fewer or shorter columns"
            )
    return problems


def validate_inputs(inputs: Sequence[Any], input_schema: Mapping[str, Any] | None) -> list[str | None]:
    """Per input, how it breaks `input_schema` (errors joined by "; "), or None when it conforms.

    `input_schema` is a JSON Schema, or its wire form `{"type": "json", "json_schema": ...}`; None
    (or a text schema) accepts everything.

    >>> schema = {"type": "object", "properties": {"founded": {"type": "integer"}}}
    >>> validate_inputs([{"founded": 1998}, {"founded": "1998"}], schema)
    [None, '$.founded: expected integer, got string']
    """
    if input_schema is None:
        return [None] * len(inputs)
    schema: Any = input_schema
    if input_schema.get("type") in ("json", "text") and "properties" not in input_schema:
        schema = input_schema.get("json_schema")
        if schema is None:
            return [None] * len(inputs)
    check = Validator(schema)
    problems: list[str | None] = []
    for value in inputs:
        errors = check(value)
        if not errors:
            problems.append(None)
        elif len(errors) <= 3:
            problems.append("; ".join(errors))
        else:
            problems.append("; ".join(errors[:3]) + f" (+{len(errors) - 3} more)")
    return problems
