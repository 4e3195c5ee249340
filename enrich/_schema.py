"""The user's description of the output → a Task API task spec, and answers → typed polars columns.

`parse_output(output)` accepts four forms and returns a frozen `OutputSpec`:

1. **Field specs**, a dict of field name → spec::

       {
           "ceo": "Name of the current CEO",                     # a string field with that description
           "founded": ("integer", "Year founded"),               # (type, description)
           "revenue": ("number?", "Revenue in USD, if public"),  # nullable
           "segment": ("enum", ["b2b", "b2c"], "Market"),        # (type, choices, description)
           "products": ("array", "Main products"),               # array of strings
           "offices": ("array[object]", {"city": "City", "staff": ("integer", "Headcount")}, "Offices"),
           "hq": {"type": "string", "description": "HQ city"},   # a JSON Schema property, taken as is
       }

   Type names (case-insensitive, aliases in brackets): `string` (`str`, `text`), `integer` (`int`),
   `number` (`float`), `boolean` (`bool`), `enum`, `object`, `array` (`list`, an array of strings), and
   `array[T]` for any type T, nested as deep as you like (`array[array[number]]`). A trailing `?` or a
   leading `nullable ` makes a type nullable (`"integer?"` → `["integer", "null"]`; `"array[integer?]"`
   makes the items nullable). `enum` needs its choices (a list of strings) and `object` its fields (a
   dict of field specs, recursively) as the middle element of a 3-tuple, also when they are inside an
   array: `("array[enum]", ["a", "b"], "Tags")`. The description may be left out: `("integer",)`.
   Lists work like tuples, so specs can come from a JSON file. A plain string that is only a type name
   (`"integer"`) is refused, since it would silently become a string field described as "integer".
2. **A JSON Schema** object (`{"type": "object", "properties": {...}}`), taken as is (also the wire
   form `{"type": "json", "json_schema": {...}}`).
3. **A path** (`str` ending in `.json`, or `pathlib.Path`) of a JSON file holding form 1 or 2.
4. **Any other string**: a text output. The task spec is `{"type": "text", "description": ...}` and
   the result is one Utf8 column named `output`.

Every form is checked with `output_schema_problems`; any problem is a `UsageError` before anything
is sent. The schema built from field specs lists every field in `required` and sets
`"additionalProperties": false` on every object, as the API asks; dict properties get the same
defaults where they leave them out. A JSON Schema given whole is sent exactly as given.

Field names (top level) must be non-empty, without leading or trailing spaces, must not start with
`_` (enrich's result columns `_status`, `_error`, `_run_id`, `_interaction_id` and `_basis` live
there), and must not be one of `citations`, `confidence`, `evidence`, `reasoning`, `source`, `sources`,
`source_urls`: every run already returns citations, reasoning and confidence in its basis (the `_basis`
column), and the API warns that such fields duplicate it. These are refused with the reason, so rename
the field (`lead_source`) if you mean something else.

Column dtypes: string and enum → `pl.String` (enum values are checked, but the column stays
`pl.String` so frames from several runs and checkpoints concatenate without category mismatches),
integer → `pl.Int64`, number → `pl.Float64`, boolean → `pl.Boolean`, array → `pl.List(inner)`,
object → `pl.Struct(fields)`. Nullable types have the same dtype (polars columns hold nulls anyway).
A schema part this mapping cannot type (a union of several non-null types, an object without
properties, an array without `items`) becomes `pl.String` holding the value's compact JSON text with
sorted keys (a string value stays as it is).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from ._exceptions import UsageError
from ._jsonschema import MAX_SPEC_CHARS, output_schema_problems

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

__all__ = [
    "BASIS_FIELD_NAMES",
    "RESERVED_COLUMNS",
    "OutputSpec",
    "check_collisions",
    "parse_output",
]

#: Result columns enrich adds to every frame; output fields and input columns may not use these names.
RESERVED_COLUMNS: tuple[str, ...] = ("_status", "_error", "_run_id", "_interaction_id", "_basis")

#: Output field names the Task API warns about because the run's basis already holds them.
BASIS_FIELD_NAMES = frozenset(
    {"citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"}
)

_TEXT_COLUMN = "output"

_ALIASES = {
    "string": "string",
    "str": "string",
    "text": "string",
    "integer": "integer",
    "int": "integer",
    "number": "number",
    "float": "number",
    "boolean": "boolean",
    "bool": "boolean",
    "enum": "enum",
    "object": "object",
    "array": "array",
    "list": "array",
}
_SYNTAX_HINT = "string, integer, number, boolean, enum, object, array, array[T]; add ? for nullable"
_ARRAY_RE = re.compile(r"(?:array|list)\s*\[(.*)\]\Z", re.IGNORECASE | re.DOTALL)
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------------
# The compiled form of a schema: what each column holds and how an answer's value is checked
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """One schema position, compiled for checking and converting answer values."""

    kind: str  # "string", "integer", "number", "boolean", "array", "object" or "json"
    nullable: bool
    dtype: pl.DataType
    choices: frozenset[Any] | None = None
    item: _Node | None = None
    fields: tuple[tuple[str, _Node, bool], ...] = ()  # (name, node, required)
    closed: bool = False  # additionalProperties: false

    @property
    def label(self) -> str:
        if self.choices is not None:
            shown = ", ".join(repr(c) for c in sorted(self.choices, key=str)[:8])
            return f"one of {shown}" + (", …" if len(self.choices) > 8 else "")
        return "text (any JSON)" if self.kind == "json" else self.kind


_JSON_NODE = _Node("json", True, pl.String())


class _Bad(Exception):
    """A value does not fit its column; the message names it."""


_MISSING: Any = object()


def _compile(schema: object, root: Mapping[str, Any], depth: int = 0) -> _Node:
    if depth > 32 or not isinstance(schema, Mapping):
        return _JSON_NODE
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve_ref(ref, root)
        return _compile(target, root, depth + 1) if target is not None else _JSON_NODE
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list) and branches:
        real = [b for b in branches if not _is_null_schema(b)]
        if len(real) != 1:
            return _JSON_NODE
        node = _compile(real[0], root, depth + 1)
        nullable = node.nullable or len(real) < len(branches)
        return _with_nullable(node, nullable)
    raw = schema.get("type")
    types = {raw} if isinstance(raw, str) else set(raw) if isinstance(raw, list) else set()
    nullable = "null" in types
    types.discard("null")
    enum = schema.get("enum")
    choices: frozenset[Any] | None = None
    if isinstance(enum, list) and enum:
        nullable = nullable or None in enum
        values = [v for v in enum if v is not None]
        if not types:
            if values and all(isinstance(v, str) for v in values):
                types = {"string"}
            elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                types = {"integer"}
        if types <= {"string", "integer"} and all(isinstance(v, str | int) for v in values):
            choices = frozenset(values)
    if not types:
        if "properties" in schema:
            types = {"object"}
        elif "items" in schema:
            types = {"array"}
    if types == {"integer", "number"}:
        types = {"number"}
    if len(types) != 1:
        return _JSON_NODE
    (kind,) = types
    if kind == "string":
        return _Node("string", nullable, pl.String(), choices=choices)
    if kind == "integer":
        return _Node("integer", nullable, pl.Int64(), choices=choices)
    if kind == "number":
        return _Node("number", nullable, pl.Float64())
    if kind == "boolean":
        return _Node("boolean", nullable, pl.Boolean())
    if kind == "array":
        items = schema.get("items")
        item = _compile(items, root, depth + 1) if isinstance(items, Mapping) else _JSON_NODE
        return _Node("array", nullable, pl.List(item.dtype), item=item)
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, Mapping) or not props:
            return _with_nullable(_JSON_NODE, True)
        required = schema.get("required")
        required_set = set(required) if isinstance(required, list) else set()
        fields = tuple(
            (str(name), _compile(sub, root, depth + 1), name in required_set) for name, sub in props.items()
        )
        dtype = pl.Struct([pl.Field(name, node.dtype) for name, node, _ in fields])
        return _Node(
            "object", nullable, dtype, fields=fields, closed=schema.get("additionalProperties") is False
        )
    return _JSON_NODE


def _with_nullable(node: _Node, nullable: bool) -> _Node:
    if node.nullable == nullable:
        return node
    return _Node(node.kind, nullable, node.dtype, node.choices, node.item, node.fields, node.closed)


def _is_null_schema(schema: object) -> bool:
    return isinstance(schema, Mapping) and (schema.get("type") == "null" or schema.get("type") == ["null"])


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> object:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _show(value: object) -> str:
    """A short rendering of a bad value for a problem message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 42 else text[:40] + "…'"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:39] + "…"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a Python {type(value).__name__}"


def _convert(node: _Node, value: object, path: str, notes: list[str]) -> Any:
    """`value` converted for `node`'s column, or `_Bad` naming what does not fit.

    Accepted beyond the exact JSON type (documented on `OutputSpec.to_frame`): integral floats and
    plain digit strings for integers, ints and numeric strings for numbers. Extra keys of a closed
    object are noted in `notes` and dropped; they do not make the value bad.
    """
    if value is None:
        if node.nullable:
            return None
        raise _Bad(f"{path}: expected {node.label}, got null")
    kind = node.kind
    out: Any = _MISSING
    if kind == "string":
        if isinstance(value, str):
            out = value
    elif kind == "integer":
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            out = value
        elif isinstance(value, float):
            if value.is_integer():
                out = int(value)
        elif isinstance(value, str) and _INT_RE.match(value.strip()):
            out = int(value.strip())
        if out is not _MISSING and not _INT64_MIN <= out <= _INT64_MAX:
            raise _Bad(f"{path}: integer {_show(value)} is out of the 64-bit range")
    elif kind == "number":
        if isinstance(value, bool):
            pass
        elif isinstance(value, float):
            if math.isfinite(value):
                out = value
        elif isinstance(value, int):
            try:
                out = float(value)
            except OverflowError:
                pass
        elif isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            number = float(value.strip())
            if math.isfinite(number):
                out = number
    elif kind == "boolean":
        if isinstance(value, bool):
            out = value
    elif kind == "array":
        if isinstance(value, list | tuple):
            item = node.item or _JSON_NODE
            return [_convert(item, x, f"{path}[{i}]", notes) for i, x in enumerate(value)]
    elif kind == "object":
        if isinstance(value, Mapping):
            result: dict[str, Any] = {}
            for name, sub, required in node.fields:
                x = value.get(name, _MISSING)
                if x is _MISSING:
                    if required:
                        raise _Bad(f"{path}.{name}: missing")
                    result[name] = None
                else:
                    result[name] = _convert(sub, x, f"{path}.{name}", notes)
            if node.closed and not value.keys() <= result.keys():
                notes.extend(f"{path}: unexpected field {k!r}" for k in value if k not in result)
            return result
    else:  # json
        if isinstance(value, str):
            return value
        try:
            return json.dumps(
                value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as exc:
            raise _Bad(f"{path}: not JSON ({exc})") from None
    if out is _MISSING:
        raise _Bad(f"{path}: expected {node.label}, got {_show(value)}")
    if node.choices is not None and out not in node.choices:
        raise _Bad(f"{path}: expected {node.label}, got {_show(value)}")
    return out


def _suspects(node: _Node, vals: list[Any]) -> list[int]:
    """Indices whose value may not fit `node` as is; every other value is known to fit exactly.

    Only cheap type checks in list comprehensions, column-wise (nested arrays and objects are
    flattened), so a million good answers cost no per-cell function call. The suspects go through
    `_convert`, which converts them or says why they do not fit.
    """
    nullable = node.nullable
    kind = node.kind
    choices = node.choices
    if kind == "string":
        if choices is not None:
            return [i for i, v in enumerate(vals) if type(v) is not str or v not in choices]
        if nullable:
            return [i for i, v in enumerate(vals) if type(v) is not str and v is not None]
        return [i for i, v in enumerate(vals) if type(v) is not str]
    if kind == "integer":
        lo, hi = _INT64_MIN, _INT64_MAX
        if choices is not None:
            return [i for i, v in enumerate(vals) if type(v) is not int or v not in choices]
        if nullable:
            return [
                i for i, v in enumerate(vals) if v is not None and (type(v) is not int or not lo <= v <= hi)
            ]
        return [i for i, v in enumerate(vals) if type(v) is not int or not lo <= v <= hi]
    if kind == "number":
        # v - v == 0.0 is false for nan and ±inf, which JSON cannot carry and the column refuses
        if nullable:
            return [i for i, v in enumerate(vals) if v is not None and (type(v) is not float or v - v != 0.0)]
        return [i for i, v in enumerate(vals) if type(v) is not float or v - v != 0.0]
    if kind == "boolean":
        if nullable:
            return [i for i, v in enumerate(vals) if type(v) is not bool and v is not None]
        return [i for i, v in enumerate(vals) if type(v) is not bool]
    if kind == "array":
        bad = [i for i, v in enumerate(vals) if type(v) is not list and (v is not None or not nullable)]
        full = [i for i, v in enumerate(vals) if type(v) is list and v]
        if full and node.item is not None:
            inner = _suspects(node.item, [x for i in full for x in vals[i]])
            if inner:
                owners = [i for i in full for _ in vals[i]]
                bad = sorted({*bad, *(owners[j] for j in inner)})
        return bad
    if kind == "object":
        bad = [i for i, v in enumerate(vals) if type(v) is not dict and (v is not None or not nullable)]
        where = [i for i, v in enumerate(vals) if type(v) is dict]
        if where:
            objs = [vals[i] for i in where]
            more: set[int] = set()
            if node.closed:
                width = len(node.fields)
                more.update(where[j] for j, d in enumerate(objs) if len(d) != width)
            for name, sub, _ in node.fields:
                more.update(where[j] for j in _suspects(sub, [d.get(name, _MISSING) for d in objs]))
            if more:
                bad = sorted({*bad, *more})
        return bad
    # json: anything but a string needs encoding
    return [i for i, v in enumerate(vals) if type(v) is not str and (v is not None or not nullable)]


def _arrow_type(dtype: PolarsDataType) -> pa.DataType:
    if isinstance(dtype, pl.List):
        return pa.large_list(_arrow_type(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return pa.struct([(f.name, _arrow_type(f.dtype)) for f in dtype.fields])
    if dtype == pl.Int64:
        return pa.int64()
    if dtype == pl.Float64:
        return pa.float64()
    if dtype == pl.Boolean:
        return pa.bool_()
    return pa.large_string()


def _series(name: str, values: list[Any], dtype: pl.DataType) -> pl.Series:
    if isinstance(dtype, pl.List | pl.Struct):
        # polars builds nested columns from Python objects ~10x slower than pyarrow does
        return pl.Series(name, pa.array(values, type=_arrow_type(dtype))).cast(dtype)
    return pl.Series(name, values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# OutputSpec
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """What each run must answer, as a task spec and as typed result columns. Build it with `parse_output`.

    `kind` is `"json"` (one column per top-level field of `json_schema`) or `"text"` (one Utf8 column
    named `output`, described by `description`).
    """

    kind: str
    schema_text: str | None = None  # the JSON schema as compact JSON (immutable; see `json_schema`)
    description: str | None = None
    _root: _Node | None = field(default=None, compare=False, repr=False)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The output JSON schema (a fresh copy), or None for a text output."""
        return None if self.schema_text is None else json.loads(self.schema_text)

    @property
    def columns(self) -> list[str]:
        """The result columns, in schema order: the top-level fields, or `["output"]` for text."""
        if self._root is None:
            return [_TEXT_COLUMN]
        return [name for name, _, _ in self._root.fields]

    def polars_schema(self) -> dict[str, pl.DataType]:
        """Column name → polars dtype (see the module docstring for the mapping).

        >>> parse_output({"founded": ("integer", "Year"), "tags": ("array", "Tags")}).polars_schema()
        {'founded': Int64, 'tags': List(String)}
        """
        if self._root is None:
            return {_TEXT_COLUMN: pl.String()}
        return {name: node.dtype for name, node, _ in self._root.fields}

    def task_spec(self, input_schema: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
        """The wire TaskSpec: `{"output_schema": ..., "input_schema": ...}` (a fresh dict each call).

        `input_schema` is a JSON Schema for the row inputs (sent as `{"type": "json", "json_schema": ...}`),
        a wire-form schema (`{"type": "json"|"text", ...}`, sent as is), a string (sent as a text schema),
        or None (left out). `UsageError` when the spec would exceed the API's 15,000 characters.

        >>> parse_output("A two-sentence summary of the company").task_spec()
        {'output_schema': {'type': 'text', 'description': 'A two-sentence summary of the company'}}
        """
        if self.schema_text is None:
            spec: dict[str, Any] = {"output_schema": {"type": "text", "description": self.description}}
        else:
            spec = {"output_schema": {"type": "json", "json_schema": json.loads(self.schema_text)}}
        if input_schema is not None:
            if isinstance(input_schema, str):
                spec["input_schema"] = {"type": "text", "description": input_schema}
            elif not isinstance(input_schema, Mapping):
                raise UsageError(
                    f"input_schema must be a JSON Schema dict or a string, got {type(input_schema).__name__}"
                )
            elif input_schema.get("type") in ("json", "text"):
                spec["input_schema"] = copy.deepcopy(dict(input_schema))
            else:
                spec["input_schema"] = {"type": "json", "json_schema": copy.deepcopy(dict(input_schema))}
        size = len(json.dumps(spec, separators=(",", ":"), ensure_ascii=False))
        if size > MAX_SPEC_CHARS:
            raise UsageError(
                f"the task spec is {size:,} characters of JSON and the Task API allows {MAX_SPEC_CHARS:,}; "
                "shorten the field descriptions or ask for fewer fields"
            )
        return spec

    def to_frame(self, contents: Sequence[object]) -> tuple[pl.DataFrame, list[str | None]]:
        """Answers → a frame with exactly `columns` and `polars_schema()`, and one problem (or None) per row.

        `contents[i]` is row i's answer: a dict for a JSON output (or a JSON-encoded string of one, a
        shape the API's docs also show), a str for a text output, or None when the row has no answer
        (its cells are null and its problem is None). Never raises for bad service data: a value that
        does not fit its column becomes null, and the row's problem names it, e.g.
        `"founded: expected integer, got '19 ninety'"` (several problems are joined with "; ").

        What fits: exact JSON types, plus integral floats (`2001.0`) and plain digit strings (`"2001"`)
        for integer fields, and ints and numeric strings (`"12.5"`, `"1e6"`) for number fields.
        Refused: thousands separators (`"1,200"`), fractional floats for integers, NaN and infinity,
        booleans as numbers, numbers for string fields, enum values off the list (case matters). A bad
        value anywhere inside an array or object nulls that whole top-level cell. A missing required
        field is a problem (`"founded: missing"`); a missing optional field (a JSON Schema given whole
        with a partial `required`) is simply null. Extra fields are reported (`"unexpected field 'x'"`)
        when the object is closed (`additionalProperties: false`) and otherwise ignored; they never
        null anything.

        Speed: column-wise type checks in Python and one typed Series per column; about 1 s for
        1,000,000 answers of five scalar fields.

        >>> spec = parse_output({"ceo": "CEO name", "founded": ("integer", "Year founded")})
        >>> answers = [{"ceo": "Ada", "founded": 1998}, {"ceo": "Bo", "founded": "19 ninety"}]
        >>> frame, problems = spec.to_frame(answers)
        >>> frame["founded"].to_list(), problems
        ([1998, None], [None, "founded: expected integer, got '19 ninety'"])
        """
        n = len(contents)
        notes: dict[int, list[str]] = {}
        if self._root is None:
            vals = list(contents)
            for i in [i for i, c in enumerate(vals) if type(c) is not str and c is not None]:
                c = vals[i]
                if isinstance(c, str):
                    vals[i] = str(c)
                    continue
                vals[i] = None
                notes[i] = [f"{_TEXT_COLUMN}: expected text, got {_show(c)}"]
            frame = pl.DataFrame([pl.Series(_TEXT_COLUMN, vals, dtype=pl.String())])
            return frame, _join_notes(notes, n)

        rows: list[Any] = list(contents)
        for i in [i for i, c in enumerate(rows) if type(c) is not dict and c is not None]:
            c = rows[i]
            if isinstance(c, str):
                try:
                    c = json.loads(c)
                except ValueError:
                    rows[i] = None
                    notes[i] = [f"answer: expected a JSON object, got text {_show(c)}"]
                    continue
            if isinstance(c, Mapping):
                rows[i] = dict(c)
            else:
                rows[i] = None
                notes[i] = [f"answer: expected a JSON object, got {_show(c)}"]

        series = []
        for name, node, required in self._root.fields:
            vals = [r.get(name, _MISSING) if r is not None else None for r in rows]
            for i in _suspects(node, vals):
                if rows[i] is None:
                    vals[i] = None
                    continue
                v = vals[i]
                if v is _MISSING:
                    vals[i] = None
                    if required:
                        notes.setdefault(i, []).append(f"{name}: missing")
                    continue
                extra: list[str] = []
                try:
                    vals[i] = _convert(node, v, name, extra)
                except _Bad as exc:
                    vals[i] = None
                    notes.setdefault(i, []).append(str(exc))
                else:
                    if extra:
                        notes.setdefault(i, []).extend(extra)
            series.append(_series(name, vals, node.dtype))

        if self._root.closed:
            known = {name for name, _, _ in self._root.fields}
            for i in [i for i, r in enumerate(rows) if r is not None and not r.keys() <= known]:
                unexpected = [k for k in rows[i] if k not in known]
                if unexpected:
                    notes.setdefault(i, []).extend(f"unexpected field {k!r}" for k in unexpected)
        return pl.DataFrame(series), _join_notes(notes, n)


def _join_notes(notes: dict[int, list[str]], n: int) -> list[str | None]:
    problems: list[str | None] = [None] * n
    for i, messages in notes.items():
        problems[i] = "; ".join(messages)
    return problems


# --------------------------------------------------------------------------------------------------
# parse_output
# --------------------------------------------------------------------------------------------------


def parse_output(output: object) -> OutputSpec:
    """The user's output description → an `OutputSpec`; `UsageError` (one line) for anything wrong.

    `output` is a dict of field specs, a JSON Schema dict, a `pathlib.Path` or a `str` ending in
    `.json` naming a file that holds either, any other string (a text output), or an `OutputSpec`
    (returned as is). The mini-syntax of field specs is in this module's docstring.

    >>> spec = parse_output({"ceo": "Name of the current CEO", "founded": ("integer?", "Year founded")})
    >>> spec.columns
    ['ceo', 'founded']
    >>> spec.json_schema["properties"]["founded"]
    {'type': ['integer', 'null'], 'description': 'Year founded'}
    >>> parse_output("A one-paragraph company profile").columns
    ['output']
    """
    if isinstance(output, OutputSpec):
        return output
    if isinstance(output, pathlib.Path):
        return _from_mapping(_load_json_file(output), source=f"output file '{output}'")
    if isinstance(output, str):
        text = output.strip()
        if text.lower().endswith(".json"):
            return _from_mapping(_load_json_file(pathlib.Path(text)), source=f"output file '{text}'")
        if not text:
            raise UsageError("the output description is empty; describe what each row should get back")
        return OutputSpec("text", description=output)
    if isinstance(output, Mapping):
        return _from_mapping(output, source="output")
    raise UsageError(
        "output must be a dict of field specs, a JSON Schema dict, a path to a .json file, or a text "
        f"description; got {type(output).__name__}"
    )


def _load_json_file(path: pathlib.Path) -> Mapping[str, Any]:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "not found"
        raise UsageError(f"output file '{path}' {where}; give the path of a .json file holding a JSON Schema")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read output file '{path}': {_one_line(exc)}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"output file '{path}' is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"output file '{path}' must hold a JSON object (a JSON Schema or field specs), "
            f"got {_json_kind(data)}"
        )
    return data


def _from_mapping(output: Mapping[str, Any], *, source: str) -> OutputSpec:
    if not output:
        raise UsageError(f"{source} has no fields; give at least one, e.g. {{'ceo': 'Name of the CEO'}}")
    kind = output.get("type")
    if kind == "text" and isinstance(output.get("description"), str) and len(output) <= 2:
        return parse_output(output["description"])
    if kind == "json" and "json_schema" in output:
        schema = output["json_schema"]
        if not isinstance(schema, Mapping):
            raise UsageError(f"{source}: json_schema must be a JSON object, got {_json_kind(schema)}")
        return _from_schema(schema, source=source)
    if kind == "object" or "$schema" in output:
        return _from_schema(output, source=source)
    if kind in ("auto", "json"):
        raise UsageError(
            f'{source}: "type": "{kind}" without a json_schema is not supported; describe the fields'
        )
    if _schema_not_object(output):
        # A JSON Schema whose root is not one object: its problems name the fix, where reading it as field
        # specs would complain about a "field" named type or anyOf.
        return _from_schema(output, source=source)
    properties = {}
    for name, spec in output.items():
        _check_field_name(name, top=True)
        properties[name] = _field_schema(spec, str(name))
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return _from_schema(schema, source=source)


def _schema_not_object(output: Mapping[str, Any]) -> bool:
    """True for a JSON Schema with a non-object root: `{"type": "string"}`, `{"anyOf": [{...}, ...]}`.

    Neither can be field specs (a bare type name is refused as a description, a union is no spec).
    """
    if output.get("type") in ("string", "number", "integer", "boolean", "array", "null"):
        return True
    return any(
        isinstance(branches := output.get(word), list)
        and branches
        and all(isinstance(b, Mapping) for b in branches)
        for word in ("anyOf", "oneOf", "allOf")
    )


def _from_schema(schema: Mapping[str, Any], *, source: str) -> OutputSpec:
    problems = output_schema_problems(schema)
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise UsageError(f"{source}: {problems[0]}{more}")
    props = schema["properties"]
    for name in props:
        _check_field_name(name, top=True)
    # key order is kept: it is the order the fields are shown to the processor and the column order
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    root = _compile(schema, schema)
    return OutputSpec("json", schema_text=text, _root=root)


def _check_field_name(name: object, *, top: bool) -> None:
    if not isinstance(name, str):
        raise UsageError(f"field names must be strings, got {name!r}")
    if not name.strip():
        raise UsageError("a field name is empty; give every field a name")
    if name != name.strip():
        raise UsageError(f"field {name!r} has leading or trailing spaces; remove them")
    if not top:
        return
    if name.startswith("_"):
        raise UsageError(
            f"field {name!r}: names starting with '_' are reserved for enrich's own columns "
            f"({', '.join(RESERVED_COLUMNS)}); rename the field"
        )
    if name == "run_id":  # (the answers a join keeps are keyed by it: the two would clash)
        raise UsageError(
            "field 'run_id': the name is taken by enrich's own records of each answer (each row's run id "
            "is in _run_id); rename the field"
        )
    if name in BASIS_FIELD_NAMES:
        raise UsageError(
            f"field {name!r}: every run already returns citations, reasoning and confidence in its basis "
            "(the _basis column), and the Task API warns about this name; rename the field "
            f"(e.g. 'lead_{name}') or drop it"
        )


@dataclass(frozen=True, slots=True)
class _Type:
    base: str  # a value of _ALIASES
    nullable: bool
    item: _Type | None = None

    def needs(self) -> str | None:
        """'enum' or 'object' when this type needs choices or fields, else None."""
        if self.base == "array" and self.item is not None:
            return self.item.needs()
        return self.base if self.base in ("enum", "object") else None


def _parse_type(text: str, where: str) -> _Type:
    s = text.strip()
    nullable = False
    if s.lower().startswith("nullable "):
        nullable, s = True, s[len("nullable ") :].strip()
    if s.endswith("?"):
        nullable, s = True, s[:-1].strip()
    m = _ARRAY_RE.match(s)
    if m:
        return _Type("array", nullable, _parse_type(m.group(1), where))
    base = _ALIASES.get(s.lower())
    if base is None:
        close = difflib.get_close_matches(s.lower(), list(_ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{where}: unknown type {text!r}; use {_SYNTAX_HINT}.{hint}")
    return _Type(base, nullable, _Type("string", False) if base == "array" else None)


def _is_type_name(text: str) -> bool:
    try:
        _parse_type(text, "")
    except UsageError:
        return False
    return True


def _field_schema(spec: object, path: str) -> dict[str, Any]:
    """The JSON Schema property for one field spec; `path` is the dotted field name, for messages."""
    where = f"field {path!r}"
    if isinstance(spec, str):
        if not spec.strip():
            raise UsageError(f"{where}: the description is empty; say what to find")
        if _is_type_name(spec):
            raise UsageError(
                f"{where}: {spec!r} looks like a type name, not a description; write "
                f"({spec!r}, 'what to find') for a typed field"
            )
        return {"type": "string", "description": spec}
    if isinstance(spec, tuple | list):
        return _tuple_schema(list(spec), path)
    if isinstance(spec, Mapping):
        if not any(k in spec for k in ("type", "anyOf", "oneOf", "enum", "const", "$ref")):
            raise UsageError(
                f"{where}: a dict spec must be a JSON Schema property such as "
                "{'type': 'string', 'description': '...'} (for a whole schema, add \"type\": \"object\" "
                "at the root)"
            )
        prop = copy.deepcopy(dict(spec))
        _close_objects(prop)
        return prop
    raise UsageError(
        f"{where}: a spec must be a description string, a (type, description) tuple or a JSON Schema "
        f"dict; got {type(spec).__name__}"
    )


def _tuple_schema(parts: list[Any], path: str) -> dict[str, Any]:
    where = f"field {path!r}"
    usage = "write (type, description), or (type, choices or fields, description) for enum and object"
    if not 1 <= len(parts) <= 3 or not isinstance(parts[0], str):
        raise UsageError(f"{where}: {usage}")
    t = _parse_type(parts[0], where)
    needs = t.needs()
    detail: Any = None
    description: Any = None
    if len(parts) == 3:
        detail, description = parts[1], parts[2]
    elif len(parts) == 2:
        if isinstance(parts[1], str):
            description = parts[1]
        else:
            detail = parts[1]
    if description is not None and not isinstance(description, str):
        raise UsageError(f"{where}: the description must be a string; {usage}")
    if needs == "enum" and not isinstance(detail, list | tuple):
        raise UsageError(f"{where}: enum needs its choices, e.g. ({parts[0]!r}, ['b2b', 'b2c'], 'Market')")
    if needs == "object" and not isinstance(detail, Mapping):
        raise UsageError(
            f"{where}: object needs its fields, e.g. ({parts[0]!r}, {{'city': 'City name'}}, 'Office')"
        )
    if needs is None and detail is not None:
        raise UsageError(f"{where}: type {parts[0]!r} takes no choices or fields; {usage}")
    schema = _type_schema(t, detail, path)
    if description is not None:
        if not description.strip():
            raise UsageError(f"{where}: the description is empty; say what to find")
        schema["description"] = description
    return schema


def _type_schema(t: _Type, detail: Any, path: str) -> dict[str, Any]:
    where = f"field {path!r}"

    def typed(name: str) -> str | list[str]:
        return [name, "null"] if t.nullable else name

    if t.base == "array":
        assert t.item is not None
        return {"type": typed("array"), "items": _type_schema(t.item, detail, path)}
    if t.base == "enum":
        choices = list(detail)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise UsageError(f"{where}: enum choices must be a non-empty list of strings")
        dupes = sorted({c for c in choices if choices.count(c) > 1})
        if dupes:
            raise UsageError(f"{where}: enum choices repeat {', '.join(map(repr, dupes))}; list each once")
        base: dict[str, Any] = {"type": "string", "enum": choices}
        return {"anyOf": [base, {"type": "null"}]} if t.nullable else base
    if t.base == "object":
        if not detail:
            raise UsageError(f"{where}: an object needs at least one field")
        props = {}
        for sub_name, sub_spec in detail.items():
            _check_field_name(sub_name, top=False)
            props[sub_name] = _field_schema(sub_spec, f"{path}.{sub_name}")
        return {
            "type": typed("object"),
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }
    return {"type": typed(t.base)}


def _close_objects(schema: Any) -> None:
    """Give every object in a user's JSON Schema property `required` (all fields) and
    `additionalProperties: false` where it leaves them out, as the Task API asks."""
    if isinstance(schema, list):
        for sub in schema:
            _close_objects(sub)
        return
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        schema.setdefault("required", list(props))
        schema.setdefault("additionalProperties", False)
        for sub in props.values():
            _close_objects(sub)
    for keyword in ("items", "anyOf", "oneOf", "allOf"):
        if keyword in schema:
            _close_objects(schema[keyword])


# --------------------------------------------------------------------------------------------------
# Collisions with the input columns
# --------------------------------------------------------------------------------------------------


def check_collisions(spec: OutputSpec, input_columns: Iterable[str]) -> None:
    """`UsageError` when a result column would overwrite an input column.

    Result columns are the spec's columns and enrich's own `RESERVED_COLUMNS`.

    >>> check_collisions(parse_output({"ceo": "CEO name"}), ["company", "website"])
    >>> try:
    ...     check_collisions(parse_output({"ceo": "CEO name"}), ["ceo"])
    ... except UsageError as exc:
    ...     print(exc)
    output field 'ceo' has the same name as an input column; rename the output field (e.g. 'ceo_found')
    """
    inputs = list(input_columns)
    present = set(inputs)
    reserved = [c for c in inputs if c in RESERVED_COLUMNS]
    if reserved:
        raise UsageError(
            f"input column {reserved[0]!r} has the name of a column enrich adds "
            f"({', '.join(RESERVED_COLUMNS)}); rename or drop that input column"
        )
    clash = [c for c in spec.columns if c in present]
    if not clash:
        return
    if spec.kind == "text":
        raise UsageError(
            f"the text output goes to a column named {_TEXT_COLUMN!r}, which is already an input column; "
            "rename that input column, or describe the output as fields, e.g. {'summary': '...'}"
        )
    if len(clash) == 1:
        raise UsageError(
            f"output field {clash[0]!r} has the same name as an input column; "
            f"rename the output field (e.g. '{clash[0]}_found')"
        )
    names = ", ".join(repr(c) for c in clash)
    raise UsageError(
        f"output fields {names} have the same names as input columns; "
        f"rename the output fields (e.g. '{clash[0]}_found')"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
