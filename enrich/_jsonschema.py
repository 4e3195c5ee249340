"""The JSON Schema subset the Task API accepts: its hard rules, and a small, fast validator.

Two functions, both pure and both returning lists of one-line messages (never raising for bad data):

- `output_schema_problems(schema)` checks an output `json_schema` against the API's documented hard limits
  (task-api.md §3): the things that make the API refuse the task spec, so they can be refused before anything
  is sent.
- `validate(instance, schema)` checks a JSON value against a schema of the supported subset, with errors
  that carry JSON paths (`"$.founded: expected integer, got string"`). It runs once per row, so the
  schema is compiled into a tree of small checks (`Validator`), built once and reused for every row.

Supported by `validate`: `type` (a name or a list of names, including `"null"`), `properties`, `required`,
`additionalProperties` (false or a schema), `items` (a schema), `enum`, `const`, `anyOf`, `oneOf`,
`allOf`, and local `$ref`s (`#/$defs/...`, `#/definitions/...`). Every other keyword (`description`,
`title`, `default`, ...) is ignored. `"integer"` accepts floats with no fractional part (2001.0), as
JSON Schema does; booleans are never numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "MAX_ENUM_VALUES",
    "MAX_NESTING",
    "MAX_PROPERTIES",
    "MAX_SPEC_CHARS",
    "UNSUPPORTED_KEYWORDS",
    "Validator",
    "json_path",
    "output_schema_problems",
    "validate",
]

#: Deepest allowed nesting of objects and arrays; the root object is level 1.
MAX_NESTING = 5
#: Most properties allowed, counted over every level of the schema.
MAX_PROPERTIES = 100
#: Most enum values allowed, counted over every enum in the schema.
MAX_ENUM_VALUES = 500
#: An enum with more than this many values ...
LARGE_ENUM_VALUES = 250
#: ... may hold at most this many characters of values in total.
LARGE_ENUM_CHARS = 7_500
#: Most characters of a task spec, measured as compact JSON (`separators=(",", ":")`).
MAX_SPEC_CHARS = 15_000

#: Keywords the Task API refuses anywhere in an output schema.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "contains",
        "format",
        "maxContains",
        "maxItems",
        "maxLength",
        "maxProperties",
        "maximum",
        "minContains",
        "minItems",
        "minLength",
        "minimum",
        "minProperties",
        "multipleOf",
        "pattern",
        "patternProperties",
        "propertyNames",
        "uniqueItems",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)

_TYPE_NAMES = frozenset({"string", "integer", "number", "boolean", "object", "array", "null"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def json_path(parent: str, key: str | int) -> str:
    """The JSON path of `key` under `parent`: `$.name`, `$['odd key']` or `$.list[3]`.

    >>> json_path("$", "founded"), json_path("$.products", 2), json_path("$", "annual revenue")
    ('$.founded', '$.products[2]', "$['annual revenue']")
    """
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _IDENT.match(key):
        return f"{parent}.{key}"
    return f"{parent}[{key!r}]"


# --------------------------------------------------------------------------------------------------
# The API's hard rules for an output schema
# --------------------------------------------------------------------------------------------------


def output_schema_problems(schema: object) -> list[str]:
    """Every reason the Task API would refuse `schema` as an output `json_schema`; empty when it is fine.

    Checked (task-api.md §3): the root is `{"type": "object", "properties": {...}}` with at least one
    property and no `anyOf`; no standalone `null` type (null only inside a type list or a union branch);
    known type names; objects and arrays nested at most `MAX_NESTING` (5) levels, the root object being
    level 1; at most `MAX_PROPERTIES` (100) properties over all levels; at most `MAX_ENUM_VALUES` (500)
    enum values in all, and at most 7,500 characters for an enum of more than 250 values; none of
    `UNSUPPORTED_KEYWORDS`; at most `MAX_SPEC_CHARS` (15,000) characters of compact JSON. The API's
    *warnings* (fields not all required, `additionalProperties` not false) are not problems here.

    Each problem is one line that starts with the schema path it is about.

    >>> output_schema_problems({"type": "object", "properties": {"ceo": {"type": "string"}}})
    []
    >>> schema = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "x"}}}
    >>> output_schema_problems(schema)
    ["$.properties.zip: keyword 'pattern' is not supported by the Task API; put the rule in the description"]
    """
    if not isinstance(schema, Mapping):
        return [f"$: the output schema must be a JSON object, got {_json_type(schema)}"]
    problems: list[str] = []
    if "anyOf" in schema:
        problems.append("$: anyOf is not allowed at the root; the root must be one object with properties")
    if schema.get("type") != "object":
        problems.append(f'$: the root must have "type": "object", got {_show_json(schema.get("type"))}')
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not props:
        problems.append('$: the root must have "properties" with at least one field')
    counts = {"properties": 0, "enum": 0}
    _walk(schema, "$", 0, False, schema, counts, problems)
    if counts["properties"] > MAX_PROPERTIES:
        problems.append(
            f"$: {counts['properties']} properties in all; the Task API allows at most {MAX_PROPERTIES}"
        )
    if counts["enum"] > MAX_ENUM_VALUES:
        problems.append(
            f"$: {counts['enum']} enum values in all; the Task API allows at most {MAX_ENUM_VALUES}"
        )
    try:
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        problems.append(f"$: the schema is not plain JSON ({exc})")
    else:
        if size > MAX_SPEC_CHARS:
            problems.append(
                f"$: the schema is {size:,} characters of JSON; "
                f"the Task API allows at most {MAX_SPEC_CHARS:,}"
            )
    return problems


def _walk(
    node: object,
    path: str,
    depth: int,
    in_union: bool,
    root: Mapping[str, Any],
    counts: dict[str, int],
    problems: list[str],
) -> None:
    if isinstance(node, bool):  # `true` / `false` schemas are valid JSON Schema
        return
    if not isinstance(node, Mapping):
        problems.append(f"{path}: a schema must be a JSON object, got {_json_type(node)}")
        return
    for keyword in node:
        if keyword in UNSUPPORTED_KEYWORDS:
            problems.append(
                f"{path}: keyword {keyword!r} is not supported by the Task API; "
                "put the rule in the description"
            )
    types = node.get("type")
    type_list = [types] if isinstance(types, str) else types if isinstance(types, list) else None
    if types is not None and (type_list is None or not all(isinstance(t, str) for t in type_list)):
        problems.append(f"{path}: type must be a name or a list of names, got {_show_json(types)}")
        type_list = None
    if type_list is not None:
        for name in type_list:
            if name not in _TYPE_NAMES:
                problems.append(f"{path}: unknown type {name!r}; use one of {', '.join(sorted(_TYPE_NAMES))}")
        if type_list and all(t == "null" for t in type_list) and not in_union:
            problems.append(
                f"{path}: a standalone null type is not allowed; "
                'make the field nullable instead, e.g. "type": ["string", "null"]'
            )
    container = (type_list is not None and ("object" in type_list or "array" in type_list)) or any(
        k in node for k in ("properties", "items")
    )
    level = depth + 1 if container else depth
    if level > MAX_NESTING:
        problems.append(f"{path}: nested {level} levels deep; the Task API allows at most {MAX_NESTING}")
        return  # one report per branch, not one per deeper level
    props = node.get("properties")
    if props is not None:
        if isinstance(props, Mapping):
            counts["properties"] += len(props)
            for name, sub in props.items():
                _walk(sub, f"{path}.properties.{name}", level, False, root, counts, problems)
        else:
            problems.append(f"{path}.properties: must be an object mapping names to schemas")
    items = node.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _walk(sub, f"{path}.items[{i}]", level, False, root, counts, problems)
    elif items is not None:
        _walk(items, f"{path}.items", level, False, root, counts, problems)
    extra = node.get("additionalProperties")
    if isinstance(extra, Mapping):
        _walk(extra, f"{path}.additionalProperties", level, False, root, counts, problems)
    for keyword in ("anyOf", "oneOf", "allOf"):
        branches = node.get(keyword)
        if branches is None:
            continue
        if not isinstance(branches, list) or not branches:
            problems.append(f"{path}.{keyword}: must be a non-empty list of schemas")
            continue
        for i, sub in enumerate(branches):
            _walk(sub, f"{path}.{keyword}[{i}]", depth, True, root, counts, problems)
    for keyword in ("$defs", "definitions"):
        defs = node.get(keyword)
        if isinstance(defs, Mapping):
            for name, sub in defs.items():
                _walk(sub, f"{path}.{keyword}.{name}", 0, False, root, counts, problems)
    enum = node.get("enum")
    if enum is not None:
        if not isinstance(enum, list) or not enum:
            problems.append(f"{path}.enum: must be a non-empty list of values")
        else:
            counts["enum"] += len(enum)
            if len(enum) > LARGE_ENUM_VALUES:
                chars = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in enum)
                if chars > LARGE_ENUM_CHARS:
                    problems.append(
                        f"{path}.enum: {len(enum)} values of {chars:,} characters; an enum of more than "
                        f"{LARGE_ENUM_VALUES} values may hold at most {LARGE_ENUM_CHARS:,} characters"
                    )
    required = node.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        problems.append(f"{path}.required: must be a list of property names")


# --------------------------------------------------------------------------------------------------
# A small validator
# --------------------------------------------------------------------------------------------------


def validate(instance: object, schema: Mapping[str, Any] | bool) -> list[str]:
    """Check a JSON value against `schema`; return readable errors, empty when it conforms.

    `instance` is a decoded JSON value (dict, list, str, int, float, bool or None). Each error names
    the JSON path of the offending value. This compiles `schema` on every call; to check many values
    against one schema, build a `Validator` once (about 1.2 µs per flat object of four fields).

    >>> schema = {"type": "object", "properties": {"founded": {"type": "integer"}}, "required": ["founded"]}
    >>> validate({"founded": "1998"}, schema)
    ['$.founded: expected integer, got string']
    >>> validate({}, schema)
    ["$: missing required property 'founded'"]
    """
    return Validator(schema)(instance)


_Check = Callable[[Any, str, list[str]], None]


class Validator:
    """`schema` compiled into checks, for validating many values: `Validator(schema)(value) -> errors`.

    The schema is read once, here: changing it afterwards does not change the validator.

    >>> check = Validator({"type": "array", "items": {"type": ["integer", "null"]}})
    >>> check([1, None, "2"])
    ['$[2]: expected integer or null, got string']
    """

    __slots__ = ("_check", "_memo", "_root", "schema")

    def __init__(self, schema: Mapping[str, Any] | bool) -> None:
        self.schema = schema
        self._root: Mapping[str, Any] = schema if isinstance(schema, Mapping) else {}
        self._memo: dict[int, _Check] = {}
        self._check = self._compile(schema)
        del self._memo

    def __call__(self, instance: object) -> list[str]:
        errors: list[str] = []
        self._check(instance, "$", errors)
        return errors

    def __repr__(self) -> str:
        return f"Validator({_show_json(self.schema, 60)})"

    def _compile(self, schema: object) -> _Check:
        if schema is True:
            return _accept
        if schema is False or not isinstance(schema, Mapping):
            return _refuse
        key = id(schema)
        if key in self._memo:
            return self._memo[key]
        cell: list[_Check] = []

        def deferred(value: Any, path: str, errors: list[str]) -> None:  # a recursive $ref
            cell[0](value, path, errors)

        self._memo[key] = deferred
        check = self._compile_node(schema)
        cell.append(check)
        self._memo[key] = check
        return check

    def _compile_node(self, schema: Mapping[str, Any]) -> _Check:
        checks: list[_Check] = []
        ref = schema.get("$ref")
        if ref is not None:
            target = _resolve(ref, self._root)
            if target is None:
                message = f": cannot resolve $ref {ref!r}"
                checks.append(lambda value, path, errors: errors.append(path + message))
            else:
                checks.append(self._compile(target))
        if "enum" in schema:
            checks.append(_enum_check(schema["enum"]))
        if "const" in schema:
            const = schema["const"]
            shown = _show_json(const)

            def check_const(value: Any, path: str, errors: list[str]) -> None:
                if not _same(value, const):
                    errors.append(f"{path}: expected {shown}, got {_show_json(value)}")

            checks.append(check_const)
        props = schema.get("properties")
        required = schema.get("required")
        extra = schema.get("additionalProperties")
        if props or required or (extra is not None and extra is not True):
            checks.append(self._object_check(props or {}, required or [], extra))
        items = schema.get("items")
        if isinstance(items, Mapping | bool):
            checks.append(_items_check(self._compile(items)))
        for keyword in ("anyOf", "oneOf"):
            branches = schema.get(keyword)
            if branches:
                checks.append(_union_check(keyword, branches, [self._compile(b) for b in branches]))
        all_of = schema.get("allOf")
        if all_of:
            checks.extend(self._compile(b) for b in all_of)
        return _node_check(_type_predicate(schema.get("type")), _type_label(schema), checks)

    def _object_check(self, props: Mapping[str, Any], required: list[str], extra: object) -> _Check:
        fields = [(name, json_path("", name), self._compile(sub)) for name, sub in props.items()]
        known = frozenset(props)
        extra_check = self._compile(extra) if isinstance(extra, Mapping) else None
        closed = extra is False

        def check_object(value: Any, path: str, errors: list[str]) -> None:
            if type(value) is not dict:
                return
            for name in required:
                if name not in value:
                    errors.append(f"{path}: missing required property {name!r}")
            for name, suffix, check in fields:
                x = value.get(name, _MISSING)
                if x is not _MISSING:
                    check(x, path + suffix, errors)
            if closed:
                if len(value) > len(known) or not value.keys() <= known:
                    errors.extend(f"{path}: unexpected property {k!r}" for k in value if k not in known)
            elif extra_check is not None:
                for k in value:
                    if k not in known:
                        extra_check(value[k], json_path(path, k), errors)

        return check_object


_MISSING: Any = object()


def _accept(value: Any, path: str, errors: list[str]) -> None:
    return None


def _refuse(value: Any, path: str, errors: list[str]) -> None:
    errors.append(f"{path}: no value is allowed here")


def _is_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_PREDICATES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def _is_type(value: object, name: str) -> bool:
    predicate = _TYPE_PREDICATES.get(name)
    return predicate is not None and predicate(value)


def _never(value: object) -> bool:
    return False


def _type_predicate(t: object) -> Callable[[object], bool] | None:
    if t is None:
        return None
    if isinstance(t, str):
        return _TYPE_PREDICATES.get(t, _never)
    names = [n for n in t if isinstance(n, str)] if isinstance(t, list) else []
    predicates = [_TYPE_PREDICATES[n] for n in names if n in _TYPE_PREDICATES]
    if len(predicates) == 2:
        first, second = predicates
        return lambda v: first(v) or second(v)
    return lambda v: any(p(v) for p in predicates)


def _node_check(predicate: Callable[[object], bool] | None, label: str, checks: list[_Check]) -> _Check:
    if predicate is None:
        if len(checks) == 1:
            return checks[0]

        def run_all(value: Any, path: str, errors: list[str]) -> None:
            for check in checks:
                check(value, path, errors)

        return run_all
    if not checks:

        def type_only(value: Any, path: str, errors: list[str]) -> None:
            if not predicate(value):
                errors.append(f"{path}: expected {label}, got {_json_type(value)}")

        return type_only

    def typed(value: Any, path: str, errors: list[str]) -> None:
        if not predicate(value):
            errors.append(f"{path}: expected {label}, got {_json_type(value)}")
            return  # the other keywords would only repeat the type error
        for check in checks:
            check(value, path, errors)

    return typed


def _enum_check(enum: object) -> _Check:
    choices = list(enum) if isinstance(enum, list) else []
    shown = ", ".join(_show_json(c, 30) for c in choices[:10]) + (", …" if len(choices) > 10 else "")
    strings = frozenset(c for c in choices if isinstance(c, str))

    def check_enum(value: Any, path: str, errors: list[str]) -> None:
        if type(value) is str and value in strings:
            return
        if not any(_same(value, c) for c in choices):
            errors.append(f"{path}: expected one of {shown}, got {_show_json(value)}")

    return check_enum


def _items_check(item: _Check) -> _Check:
    def check_items(value: Any, path: str, errors: list[str]) -> None:
        if type(value) is list:
            for i, x in enumerate(value):
                item(x, f"{path}[{i}]", errors)

    return check_items


def _union_check(keyword: str, branches: list[Any], checks: list[_Check]) -> _Check:
    labels = " or ".join(dict.fromkeys(_type_label(b) for b in branches))
    fits = [_type_predicate(b.get("type")) if isinstance(b, Mapping) else None for b in branches]
    pairs = list(zip(checks, fits, branches, strict=True))

    def check_union(value: Any, path: str, errors: list[str]) -> None:
        matches = 0
        for check in checks:
            trial: list[str] = []
            check(value, path, trial)
            if not trial:
                matches += 1
                if keyword == "anyOf":
                    return
        if matches == 1:
            return
        if matches > 1:
            errors.append(f"{path}: matches {matches} of the oneOf forms; it must match exactly one")
            return
        fitting = [c for c, fit, b in pairs if (fit(value) if fit is not None else b is not False)]
        if len(fitting) == 1:  # the value has the type of one branch: its errors say the most
            fitting[0](value, path, errors)
        else:
            errors.append(f"{path}: expected {labels}, got {_describe(value)}")

    return check_union


def _json_type(value: object) -> str:
    """The JSON type name of a decoded value ("string", "integer", "array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _show_json(value: object, limit: int = 40) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _same(a: object, b: object) -> bool:
    """JSON equality: 1 == 1.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _resolve(ref: object, root: Mapping[str, Any]) -> Mapping[str, Any] | bool | None:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping | bool) else None


def _type_label(schema: object) -> str:
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        return "anything" if schema is True else "nothing"
    t = schema.get("type")
    if isinstance(t, str):
        return t
    if isinstance(t, list):
        return " or ".join(str(x) for x in t)
    if "enum" in schema:
        return "one of the enum values"
    if "const" in schema:
        return f"the constant {_show_json(schema['const'])}"
    return "a value of another form"


def _describe(value: object) -> str:
    kind = _json_type(value)
    if kind in ("array", "object", "null"):
        return kind
    return f"{kind} {_show_json(value)}"
