"""The Task API's output-schema rules and the small validator."""

from __future__ import annotations

import pytest

from enrich._jsonschema import (
    MAX_ENUM_VALUES,
    MAX_NESTING,
    MAX_PROPERTIES,
    UNSUPPORTED_KEYWORDS,
    Validator,
    json_path,
    output_schema_problems,
    validate,
)


def obj(**props: object) -> dict[str, object]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


STRING = {"type": "string"}


# -- output_schema_problems ------------------------------------------------------------------------


def test_a_good_schema_has_no_problems() -> None:
    schema = obj(
        ceo=STRING,
        founded={"type": ["integer", "null"]},
        segment={"anyOf": [{"type": "string", "enum": ["b2b", "b2c"]}, {"type": "null"}]},
        offices={"type": "array", "items": obj(city=STRING)},
    )
    assert output_schema_problems(schema) == []


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ([], "$: the output schema must be a JSON object, got array"),
        ({"type": "array", "items": STRING}, '$: the root must have "type": "object", got "array"'),
        ({"type": "object"}, '$: the root must have "properties" with at least one field'),
        ({"type": "object", "properties": {}}, '"properties" with at least one field'),
        ({"anyOf": [obj(a=STRING)]}, "$: anyOf is not allowed at the root"),
    ],
)
def test_root_rules(schema: object, expected: str) -> None:
    problems = output_schema_problems(schema)
    assert any(expected in p for p in problems), problems


def test_standalone_null_is_refused_but_null_in_a_union_is_fine() -> None:
    assert output_schema_problems(obj(a={"type": "null"})) == [
        "$.properties.a: a standalone null type is not allowed; make the field nullable instead, "
        'e.g. "type": ["string", "null"]'
    ]
    assert output_schema_problems(obj(a={"type": ["null"]}))
    assert output_schema_problems(obj(a={"anyOf": [STRING, {"type": "null"}]})) == []
    assert output_schema_problems(obj(a={"type": ["string", "null"]})) == []


def test_unknown_type_names_are_named() -> None:
    (problem,) = output_schema_problems(obj(a={"type": "int"}))
    assert problem.startswith("$.properties.a: unknown type 'int'")


def nested(levels: int) -> dict[str, object]:
    """A schema whose deepest object is `levels` levels deep (the root is level 1)."""
    schema: dict[str, object] = obj(leaf=STRING)
    for _ in range(levels - 1):
        schema = obj(inner=schema)
    return schema


def test_nesting_limit_counts_objects_from_the_root() -> None:
    assert output_schema_problems(nested(MAX_NESTING)) == []
    (problem,) = output_schema_problems(nested(MAX_NESTING + 1))
    assert problem == (
        "$.properties.inner.properties.inner.properties.inner.properties.inner.properties.inner: "
        "nested 6 levels deep; the Task API allows at most 5"
    )


def test_arrays_count_as_nesting_levels() -> None:
    deep = obj(
        a={"type": "array", "items": {"type": "array", "items": {"type": "array", "items": obj(b=STRING)}}}
    )
    assert output_schema_problems(deep) == []
    deeper = obj(a={"type": "array", "items": {"type": "array", "items": {"type": "array", "items": deep}}})
    assert any("nested 6 levels deep" in p for p in output_schema_problems(deeper))


def test_property_limit_counts_every_level() -> None:
    top = {f"f{i}": STRING for i in range(MAX_PROPERTIES - 2)}
    assert output_schema_problems(obj(**top, inner=obj(x=STRING))) == []  # 98 + inner + x = 100
    assert output_schema_problems(obj(**top, inner=obj(x=STRING, y=STRING))) == [
        "$: 101 properties in all; the Task API allows at most 100"
    ]
    assert output_schema_problems(obj(**{f"f{i}": STRING for i in range(MAX_PROPERTIES)})) == []


def test_enum_values_are_counted_over_the_whole_schema() -> None:
    half = [f"v{i}" for i in range(MAX_ENUM_VALUES // 2)]
    ok = obj(a={"type": "string", "enum": half}, b={"type": "string", "enum": half})
    assert output_schema_problems(ok) == []
    over = obj(a={"type": "string", "enum": half}, b={"type": "string", "enum": [*half, "extra"]})
    assert output_schema_problems(over) == ["$: 501 enum values in all; the Task API allows at most 500"]


def test_a_large_enum_is_limited_in_characters() -> None:
    values = [f"{i:030d}" for i in range(260)]  # 260 values of 30 chars = 7,800 chars
    (problem,) = output_schema_problems(obj(a={"type": "string", "enum": values}))
    assert problem.startswith("$.properties.a.enum: 260 values of 7,800 characters")


@pytest.mark.parametrize("keyword", sorted(UNSUPPORTED_KEYWORDS))
def test_every_unsupported_keyword_is_refused_with_its_path(keyword: str) -> None:
    schema = obj(address=obj(zip={"type": "string", keyword: 1}))
    assert output_schema_problems(schema) == [
        f"$.properties.address.properties.zip: keyword {keyword!r} is not supported by the Task API; "
        "put the rule in the description"
    ]


def test_minimum_is_unsupported_too() -> None:
    assert "minimum" in UNSUPPORTED_KEYWORDS  # listed by the API docs (task-api.md §3)


def test_keyword_names_as_property_names_are_fine() -> None:
    schema = obj(format=STRING, pattern=STRING, maximum={"type": "number"})
    assert output_schema_problems(schema) == []


def test_spec_size_limit() -> None:
    schema = obj(a={"type": "string", "description": "x" * 15_000})
    (problem,) = output_schema_problems(schema)
    assert problem.startswith("$: the schema is 15,") and "allows at most 15,000" in problem


def test_problems_are_one_line_each_and_all_reported() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "null"}, "b": {"type": "string", "pattern": "x"}},
    }
    problems = output_schema_problems(schema)
    assert len(problems) == 2
    assert all("\n" not in p for p in problems)


def test_malformed_parts_are_reported_not_raised() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": "string",
            "b": {"type": "array", "items": 3},
            "c": {"anyOf": "x"},
            "d": {"enum": []},
            "e": {"type": "object", "properties": []},
        },
        "required": "a",
    }
    problems = output_schema_problems(schema)
    assert "$.properties.a: a schema must be a JSON object, got string" in problems
    assert "$.properties.b.items: a schema must be a JSON object, got integer" in problems
    assert "$.properties.c.anyOf: must be a non-empty list of schemas" in problems
    assert "$.properties.d.enum: must be a non-empty list of values" in problems
    assert "$.properties.e.properties: must be an object mapping names to schemas" in problems
    assert "$.required: must be a list of property names" in problems


def test_defs_are_checked_for_keywords() -> None:
    schema = {**obj(a={"$ref": "#/$defs/A"}), "$defs": {"A": {"type": "string", "format": "date"}}}
    assert output_schema_problems(schema) == [
        "$.$defs.A: keyword 'format' is not supported by the Task API; put the rule in the description"
    ]


def test_not_json_is_a_problem() -> None:
    (problem,) = output_schema_problems(obj(a={"type": "string", "default": float("nan")}))
    assert problem.startswith("$: the schema is not plain JSON")


# -- validate --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_", "ok"),
    [
        ("x", "string", True),
        (1, "string", False),
        (1, "integer", True),
        (2001.0, "integer", True),
        (2001.5, "integer", False),
        (True, "integer", False),
        (1, "number", True),
        (1.5, "number", True),
        (False, "number", False),
        (True, "boolean", True),
        (0, "boolean", False),
        (None, "null", True),
        ({}, "object", True),
        ([], "object", False),
        ([], "array", True),
        ("x", "array", False),
    ],
)
def test_types(value: object, type_: str, ok: bool) -> None:
    assert (validate(value, {"type": type_}) == []) is ok


def test_type_errors_name_the_path_and_both_types() -> None:
    schema = obj(founded={"type": "integer"})
    assert validate({"founded": "1998"}, schema) == ["$.founded: expected integer, got string"]


def test_a_list_of_types_and_null() -> None:
    schema = {"type": ["integer", "null"]}
    assert validate(None, schema) == []
    assert validate(3, schema) == []
    assert validate("3", schema) == ["$: expected integer or null, got string"]


def test_required_and_additional_properties() -> None:
    schema = obj(a=STRING, b=STRING)
    assert validate({"a": "x", "c": 1}, schema) == [
        "$: missing required property 'b'",
        "$: unexpected property 'c'",
    ]
    open_schema = {"type": "object", "properties": {"a": STRING}}
    assert validate({"a": "x", "c": 1}, open_schema) == []
    typed_extra = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}
    assert validate({"c": "x"}, typed_extra) == ["$.c: expected integer, got string"]


def test_items_and_nested_paths() -> None:
    schema = obj(offices={"type": "array", "items": obj(city=STRING, staff={"type": "integer"})})
    value = {"offices": [{"city": "Paris", "staff": 3}, {"city": 7, "staff": 1.5}]}
    assert validate(value, schema) == [
        "$.offices[1].city: expected string, got integer",
        "$.offices[1].staff: expected integer, got number",
    ]


def test_odd_keys_in_paths() -> None:
    schema = obj(**{"annual revenue": {"type": "number"}})
    assert validate({"annual revenue": "x"}, schema) == ["$['annual revenue']: expected number, got string"]
    assert json_path("$", "a-b") == "$['a-b']"
    assert json_path("$.x", 0) == "$.x[0]"


def test_enum_compares_json_values() -> None:
    schema = {"enum": ["b2b", "b2c", 1]}
    assert validate("b2b", schema) == []
    assert validate(1.0, schema) == []
    assert validate(True, schema) == ['$: expected one of "b2b", "b2c", 1, got true']
    assert validate("B2B", {"type": "string", "enum": ["b2b"]}) == ['$: expected one of "b2b", got "B2B"']


def test_const() -> None:
    assert validate("x", {"const": "x"}) == []
    assert validate("y", {"const": "x"}) == ['$: expected "x", got "y"']


def test_any_of_and_one_of() -> None:
    nullable_enum = {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]}
    assert validate(None, nullable_enum) == []
    assert validate("a", nullable_enum) == []
    assert validate(3, nullable_enum) == ["$: expected string or null, got integer 3"]
    assert validate("b", nullable_enum) == ['$: expected one of "a", got "b"']
    one_of = {"oneOf": [{"type": "integer"}, {"type": "number"}]}
    assert validate(1.5, one_of) == []
    assert validate(1, one_of) == ["$: matches 2 of the oneOf forms; it must match exactly one"]
    assert validate(1, {"allOf": [{"type": "integer"}, {"enum": [2]}]}) == ["$: expected one of 2, got 1"]


def test_refs_and_boolean_schemas() -> None:
    schema = {**obj(a={"$ref": "#/$defs/A"}), "$defs": {"A": obj(x={"type": "integer"})}}
    assert validate({"a": {"x": 1}}, schema) == []
    assert validate({"a": {"x": "1"}}, schema) == ["$.a.x: expected integer, got string"]
    assert validate(1, {"$ref": "#/$defs/missing"}) == ["$: cannot resolve $ref '#/$defs/missing'"]
    assert validate(1, True) == []
    assert validate(1, False) == ["$: no value is allowed here"]


def test_recursive_refs_terminate() -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node",
    }
    value: dict[str, object] = {}
    for _ in range(100):
        value = {"child": value}
    assert validate(value, schema) == []


def test_unknown_keywords_are_ignored() -> None:
    assert validate("x", {"type": "string", "description": "d", "title": "t", "format": "date"}) == []


def test_unknown_type_names_match_nothing() -> None:
    assert validate("x", {"type": "text"}) == ["$: expected text, got string"]


def test_a_validator_is_compiled_once_and_reused() -> None:
    schema = obj(company=STRING, founded={"type": ["integer", "null"]})
    check = Validator(schema)
    assert check({"company": "Acme", "founded": None}) == []
    assert check({"company": "Acme", "founded": "x"}) == ["$.founded: expected integer or null, got string"]
    schema["properties"]["company"] = {"type": "integer"}  # read once: later edits do not matter
    assert check({"company": "Acme", "founded": 1}) == []
    assert repr(check).startswith("Validator({")


def test_many_values_against_one_validator() -> None:
    check = Validator(obj(a={"type": "array", "items": obj(b={"type": "number"})}))
    values = [{"a": [{"b": i}, {"b": str(i)}]} for i in range(3)]
    assert [check(v) for v in values] == [["$.a[1].b: expected number, got string"] for _ in range(3)]
