"""Output specs → task specs and typed columns; answers → frames."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich._exceptions import UsageError
from enrich._jsonschema import output_schema_problems, validate
from enrich._schema import RESERVED_COLUMNS, OutputSpec, check_collisions, parse_output


def refused(output: object) -> str:
    with pytest.raises(UsageError) as info:
        parse_output(output)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- field specs -----------------------------------------------------------------------------------


def test_a_plain_string_is_a_string_field() -> None:
    spec = parse_output({"ceo": "Name of the current CEO"})
    assert spec.kind == "json"
    assert spec.json_schema == {
        "type": "object",
        "properties": {"ceo": {"type": "string", "description": "Name of the current CEO"}},
        "required": ["ceo"],
        "additionalProperties": False,
    }
    assert spec.columns == ["ceo"]
    assert spec.polars_schema() == {"ceo": pl.String}


@pytest.mark.parametrize(
    ("type_name", "schema", "dtype"),
    [
        ("string", {"type": "string"}, pl.String),
        ("str", {"type": "string"}, pl.String),
        ("text", {"type": "string"}, pl.String),
        ("integer", {"type": "integer"}, pl.Int64),
        ("int", {"type": "integer"}, pl.Int64),
        ("number", {"type": "number"}, pl.Float64),
        ("float", {"type": "number"}, pl.Float64),
        ("boolean", {"type": "boolean"}, pl.Boolean),
        ("bool", {"type": "boolean"}, pl.Boolean),
        ("array", {"type": "array", "items": {"type": "string"}}, pl.List(pl.String)),
        ("list", {"type": "array", "items": {"type": "string"}}, pl.List(pl.String)),
        ("array[integer]", {"type": "array", "items": {"type": "integer"}}, pl.List(pl.Int64)),
        ("list[float]", {"type": "array", "items": {"type": "number"}}, pl.List(pl.Float64)),
        ("array[boolean]", {"type": "array", "items": {"type": "boolean"}}, pl.List(pl.Boolean)),
        (
            "array[array[number]]",
            {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            pl.List(pl.List(pl.Float64)),
        ),
        ("Integer", {"type": "integer"}, pl.Int64),
        (" integer ", {"type": "integer"}, pl.Int64),
    ],
)
def test_type_names(type_name: str, schema: dict[str, Any], dtype: pl.DataType) -> None:
    spec = parse_output({"f": (type_name, "desc")})
    assert spec.json_schema["properties"]["f"] == {**schema, "description": "desc"}
    assert spec.polars_schema() == {"f": dtype}


@pytest.mark.parametrize(
    ("type_name", "schema"),
    [
        ("integer?", {"type": ["integer", "null"]}),
        ("nullable integer", {"type": ["integer", "null"]}),
        ("number ?", {"type": ["number", "null"]}),
        ("string?", {"type": ["string", "null"]}),
        ("array?", {"type": ["array", "null"], "items": {"type": "string"}}),
        ("array[integer?]", {"type": "array", "items": {"type": ["integer", "null"]}}),
        ("array[integer?]?", {"type": ["array", "null"], "items": {"type": ["integer", "null"]}}),
    ],
)
def test_nullable_types(type_name: str, schema: dict[str, Any]) -> None:
    spec = parse_output({"f": (type_name, "d")})
    assert spec.json_schema["properties"]["f"] == {**schema, "description": "d"}
    assert output_schema_problems(spec.json_schema) == []


def test_nullable_keeps_the_dtype() -> None:
    spec = parse_output({"a": ("integer?", "d"), "b": ("array[number?]?", "d")})
    assert spec.polars_schema() == {"a": pl.Int64, "b": pl.List(pl.Float64)}


def test_enum_and_nullable_enum() -> None:
    spec = parse_output(
        {"segment": ("enum", ["b2b", "b2c"], "Market"), "size": ("enum?", ["s", "m"], "Size")}
    )
    props = spec.json_schema["properties"]
    assert props["segment"] == {"type": "string", "enum": ["b2b", "b2c"], "description": "Market"}
    assert props["size"] == {
        "anyOf": [{"type": "string", "enum": ["s", "m"]}, {"type": "null"}],
        "description": "Size",
    }
    assert spec.polars_schema() == {"segment": pl.String, "size": pl.String}


def test_array_of_enum() -> None:
    spec = parse_output({"tags": ("array[enum]", ["a", "b"], "Tags")})
    assert spec.json_schema["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "string", "enum": ["a", "b"]},
        "description": "Tags",
    }


def test_objects_and_arrays_of_objects_are_closed_and_fully_required() -> None:
    spec = parse_output(
        {
            "hq": ("object", {"city": "City", "geo": ("object?", {"lat": ("number", "Lat")}, "Geo")}, "HQ"),
            "offices": ("array[object]", {"city": "City", "staff": ("integer?", "Headcount")}, "Offices"),
        }
    )
    schema = spec.json_schema
    hq = schema["properties"]["hq"]
    assert hq["required"] == ["city", "geo"] and hq["additionalProperties"] is False
    geo = hq["properties"]["geo"]
    assert geo["type"] == ["object", "null"]
    assert geo["required"] == ["lat"] and geo["additionalProperties"] is False
    item = schema["properties"]["offices"]["items"]
    assert item["required"] == ["city", "staff"] and item["additionalProperties"] is False
    assert spec.polars_schema() == {
        "hq": pl.Struct({"city": pl.String, "geo": pl.Struct({"lat": pl.Float64})}),
        "offices": pl.List(pl.Struct({"city": pl.String, "staff": pl.Int64})),
    }


def test_a_one_tuple_has_no_description_and_lists_work_like_tuples() -> None:
    spec = parse_output({"a": ("integer",), "b": ["enum", ["x", "y"], "B"], "c": ["number", "C"]})
    props = spec.json_schema["properties"]
    assert props["a"] == {"type": "integer"}
    assert props["b"] == {"type": "string", "enum": ["x", "y"], "description": "B"}
    assert props["c"] == {"type": "number", "description": "C"}
    assert parse_output({"e": ("enum", ["x"])}).json_schema["properties"]["e"] == {
        "type": "string",
        "enum": ["x"],
    }


def test_a_dict_property_is_taken_as_is_and_its_objects_closed() -> None:
    prop = {
        "type": "object",
        "description": "HQ",
        "properties": {
            "city": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "string"}}}},
        },
    }
    spec = parse_output({"hq": prop, "ceo": {"type": "string", "description": "CEO"}})
    hq = spec.json_schema["properties"]["hq"]
    assert hq["required"] == ["city", "tags"] and hq["additionalProperties"] is False
    assert hq["properties"]["tags"]["items"]["required"] == ["t"]
    assert "required" not in prop  # the caller's dict is not modified
    partial = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
        "required": ["a"],
    }
    assert parse_output({"x": partial}).json_schema["properties"]["x"]["required"] == ["a"]


def test_a_json_schema_is_taken_exactly_as_given() -> None:
    schema = {"type": "object", "properties": {"ceo": {"type": "string"}, "n": {"type": "integer"}}}
    spec = parse_output(schema)
    assert spec.json_schema == schema
    assert spec.task_spec() == {"output_schema": {"type": "json", "json_schema": schema}}
    assert spec.columns == ["ceo", "n"]


def test_field_order_is_kept() -> None:
    spec = parse_output({"zeta": "z", "alpha": "a", "mid": ("integer", "m")})
    assert spec.columns == ["zeta", "alpha", "mid"]
    assert list(spec.task_spec()["output_schema"]["json_schema"]["properties"]) == ["zeta", "alpha", "mid"]


def test_wire_forms_are_accepted() -> None:
    schema = {"type": "object", "properties": {"ceo": {"type": "string"}}}
    assert parse_output({"type": "json", "json_schema": schema}).json_schema == schema
    text = parse_output({"type": "text", "description": "A summary"})
    assert text.kind == "text" and text.description == "A summary"


def test_json_schema_file(tmp_path: pathlib.Path) -> None:
    schema = {"type": "object", "properties": {"ceo": {"type": "string"}}, "required": ["ceo"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    assert parse_output(path).json_schema == schema
    assert parse_output(str(path)).json_schema == schema
    specs = tmp_path / "fields.json"
    specs.write_text(json.dumps({"ceo": "CEO", "founded": ["integer", "Year"]}), encoding="utf-8")
    assert parse_output(specs).polars_schema() == {"ceo": pl.String, "founded": pl.Int64}


def test_json_file_errors(tmp_path: pathlib.Path) -> None:
    assert refused(str(tmp_path / "nope.json")) == (
        f"output file '{tmp_path / 'nope.json'}' not found; give the path of a .json file holding a JSON "
        f"Schema"
    )
    assert refused(tmp_path / "nope.json").startswith("output file")
    folder = tmp_path / "dir.json"
    folder.mkdir()
    assert "is a directory" in refused(folder)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert refused(bad).startswith(f"output file '{bad}' is not valid JSON: ")
    array = tmp_path / "array.json"
    array.write_text("[1, 2]", encoding="utf-8")
    assert refused(array) == (
        f"output file '{array}' must hold a JSON object (a JSON Schema or field specs), got an array"
    )
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "is not valid JSON" in refused(binary)
    bad_schema = tmp_path / "bad_schema.json"
    bad_schema.write_text(
        json.dumps({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}})
    )
    assert refused(bad_schema).startswith(f"output file '{bad_schema}': $.properties.d: keyword 'format'")


def test_text_output() -> None:
    spec = parse_output("A two-sentence company profile")
    assert spec.kind == "text"
    assert spec.columns == ["output"]
    assert spec.polars_schema() == {"output": pl.String}
    assert spec.json_schema is None
    assert spec.task_spec() == {
        "output_schema": {"type": "text", "description": "A two-sentence company profile"}
    }
    assert parse_output(spec) is spec


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({}, "output has no fields; give at least one"),
        ("   ", "the output description is empty"),
        (
            42,
            "output must be a dict of field specs, a JSON Schema dict, a path to a .json file, or a text "
            "description; got int",
        ),
        ([("a", "b")], "got list"),
        (
            {"a": ("integr", "x")},
            "field 'a': unknown type 'integr'; use string, integer, number, boolean, enum, object, array, "
            "array[T]; add ? for nullable. Did you mean 'integer'?",
        ),
        (
            {"a": "integer"},
            "field 'a': 'integer' looks like a type name, not a description; write ('integer', 'what to "
            "find') for a typed field",
        ),
        ({"a": "array[number]?"}, "looks like a type name"),
        ({"a": ""}, "field 'a': the description is empty; say what to find"),
        ({"a": ("integer", "  ")}, "field 'a': the description is empty"),
        (
            {"a": ("enum", "Market")},
            "field 'a': enum needs its choices, e.g. ('enum', ['b2b', 'b2c'], 'Market')",
        ),
        ({"a": ("array[enum]", "Tags")}, "field 'a': enum needs its choices"),
        ({"a": ("enum", [], "M")}, "field 'a': enum choices must be a non-empty list of strings"),
        ({"a": ("enum", ["x", 1], "M")}, "enum choices must be a non-empty list of strings"),
        ({"a": ("enum", ["x", "y", "x"], "M")}, "field 'a': enum choices repeat 'x'; list each once"),
        ({"a": ("object", "HQ")}, "field 'a': object needs its fields"),
        ({"a": ("object", {}, "HQ")}, "field 'a': an object needs at least one field"),
        ({"a": ("object", {"b": ("intx", "d")}, "HQ")}, "field 'a.b': unknown type 'intx'"),
        ({"a": ("object", {"": "d"}, "HQ")}, "a field name is empty"),
        ({"a": ("integer", ["x"], "d")}, "field 'a': type 'integer' takes no choices or fields"),
        (
            {"a": ("integer", "d", "e", "f")},
            "field 'a': write (type, description), or (type, choices or fields, description) for enum and "
            "object",
        ),
        ({"a": ()}, "field 'a': write (type, description)"),
        ({"a": (3, "d")}, "field 'a': write (type, description)"),
        ({"a": ("integer", 3, "d")}, "takes no choices or fields"),
        ({"a": ("enum", ["x"], 3)}, "field 'a': the description must be a string"),
        (
            {"a": 3},
            "field 'a': a spec must be a description string, a (type, description) tuple or a JSON Schema "
            "dict; got int",
        ),
        ({"a": {"description": "x"}}, "field 'a': a dict spec must be a JSON Schema property"),
        (
            {"_status": "x"},
            "field '_status': names starting with '_' are reserved for enrich's own columns (_status, "
            "_error, _run_id, _interaction_id, _basis); rename the field",
        ),
        ({"_mine": "x"}, "names starting with '_' are reserved"),
        ({"run_id": "x"}, "field 'run_id': the name is taken by enrich's own records of each answer"),
        (
            {"type": "object", "properties": {"run_id": {"type": "string"}}},
            "field 'run_id': the name is taken",
        ),
        ({"": "x"}, "a field name is empty; give every field a name"),
        ({" ceo": "x"}, "field ' ceo' has leading or trailing spaces; remove them"),
        ({3: "x"}, "field names must be strings, got 3"),
        (
            {"sources": "x"},
            "field 'sources': every run already returns citations, reasoning and confidence in its basis "
            "(the _basis column), and the Task API warns about this name; rename the field (e.g. "
            "'lead_sources') or drop it",
        ),
        ({"type": "auto"}, 'output: "type": "auto" without a json_schema is not supported'),
        ({"type": "json", "json_schema": []}, "output: json_schema must be a JSON object, got an array"),
        (
            {"type": "object", "properties": {"a": {"type": "null"}}},
            "output: $.properties.a: a standalone null type is not allowed",
        ),
        ({"type": "object", "properties": {"_a": {"type": "string"}}}, "field '_a': names starting with '_'"),
        (
            {"type": "object", "properties": {"reasoning": {"type": "string"}}},
            "field 'reasoning': every run already returns",
        ),
        (
            {"a": {"type": "string", "pattern": "^x"}},
            "output: $.properties.a: keyword 'pattern' is not supported by the Task API; put the rule in "
            "the description",
        ),
        (
            {f"f{i}": "d" for i in range(101)},
            "output: $: 101 properties in all; the Task API allows at most 100",
        ),
    ],
)
def test_refusals(output: object, expected: str) -> None:
    assert expected in refused(output)


@pytest.mark.parametrize(
    "name", ["citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"]
)
def test_every_basis_name_is_refused(name: str) -> None:
    assert f"field {name!r}: every run already returns" in refused({name: "d"})


def test_basis_names_are_fine_when_nested() -> None:
    spec = parse_output({"lead": ("object", {"source": "Where the lead came from"}, "Lead")})
    assert spec.columns == ["lead"]


def test_many_problems_are_reported_on_one_line() -> None:
    message = refused({"a": {"type": "string", "format": "date"}, "b": {"type": "string", "maxLength": 3}})
    assert message.startswith("output: $.properties.a: keyword 'format'")
    assert "(and 1 more: $.properties.b: keyword 'maxLength'" in message


# -- task_spec -------------------------------------------------------------------------------------


def test_task_spec_json_with_input_schema() -> None:
    spec = parse_output({"ceo": "CEO"})
    input_schema = {"type": "object", "properties": {"company": {"type": "string"}}}
    ts = spec.task_spec(input_schema)
    assert ts == {
        "output_schema": {"type": "json", "json_schema": spec.json_schema},
        "input_schema": {"type": "json", "json_schema": input_schema},
    }
    assert spec.task_spec({"type": "json", "json_schema": input_schema})["input_schema"] == ts["input_schema"]
    assert spec.task_spec("A company name")["input_schema"] == {
        "type": "text",
        "description": "A company name",
    }
    with pytest.raises(UsageError, match="input_schema must be a JSON Schema dict or a string, got int"):
        spec.task_spec(3)  # type: ignore[arg-type]


def test_task_spec_is_a_fresh_copy() -> None:
    spec = parse_output({"ceo": "CEO"})
    ts = spec.task_spec()
    ts["output_schema"]["json_schema"]["properties"]["x"] = {}
    assert spec.task_spec()["output_schema"]["json_schema"]["properties"] == {
        "ceo": {"type": "string", "description": "CEO"}
    }
    assert spec.json_schema is not spec.json_schema


def test_task_spec_size_limit() -> None:
    spec = parse_output({f"f{i}": ("string", "x" * 400) for i in range(30)})  # ~12,600 chars: fine alone
    spec.task_spec()
    with pytest.raises(
        UsageError, match=r"the task spec is 1[5-9],\d{3} characters of JSON and the Task API allows 15,000"
    ):
        spec.task_spec({"type": "object", "properties": {"c": {"type": "string", "description": "y" * 3000}}})


def test_output_spec_is_frozen_and_comparable() -> None:
    spec = parse_output({"ceo": "CEO"})
    with pytest.raises(AttributeError):
        spec.kind = "text"  # type: ignore[misc]
    assert spec == parse_output({"ceo": "CEO"})
    assert spec != parse_output({"ceo": "CEO name"})


# -- to_frame --------------------------------------------------------------------------------------

FULL = parse_output(
    {
        "ceo": "CEO",
        "founded": ("integer", "Year"),
        "revenue": ("number?", "Revenue"),
        "public": ("boolean", "Listed"),
        "segment": ("enum", ["b2b", "b2c"], "Market"),
        "products": ("array", "Products"),
        "offices": ("array[object]", {"city": "City", "staff": ("integer?", "Headcount")}, "Offices"),
        "hq": ("object", {"city": "City", "geo": ("object", {"lat": ("number", "Lat")}, "Geo")}, "HQ"),
    }
)

GOOD = {
    "ceo": "Ada",
    "founded": 1998,
    "revenue": 12.5,
    "public": True,
    "segment": "b2b",
    "products": ["a", "b"],
    "offices": [{"city": "Paris", "staff": 3}, {"city": "Oslo", "staff": None}],
    "hq": {"city": "Paris", "geo": {"lat": 48.8}},
}


def test_to_frame_types_and_values() -> None:
    frame, problems = FULL.to_frame([GOOD, None, json.dumps(GOOD)])
    assert frame.schema == pl.Schema(FULL.polars_schema())
    assert frame.columns == FULL.columns
    assert problems == [None, None, None]
    rows = frame.to_dicts()
    assert rows[0] == GOOD
    assert rows[1] == dict.fromkeys(FULL.columns)
    assert rows[2] == GOOD


def test_to_frame_empty() -> None:
    frame, problems = FULL.to_frame([])
    assert frame.height == 0 and problems == []
    assert frame.schema == pl.Schema(FULL.polars_schema())


def one(spec: OutputSpec, answer: object) -> tuple[dict[str, Any], str | None]:
    frame, problems = spec.to_frame([answer])
    return frame.row(0, named=True), problems[0]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("founded", 2001.0, 2001),
        ("founded", "2001", 2001),
        ("founded", " 2001 ", 2001),
        ("founded", -5, -5),
        ("revenue", 12, 12.0),
        ("revenue", "12.5", 12.5),
        ("revenue", "1e6", 1e6),
        ("revenue", None, None),
        ("revenue", 10**30, 1e30),
    ],
)
def test_accepted_coercions(field: str, value: object, expected: object) -> None:
    row, problem = one(FULL, {**GOOD, field: value})
    assert problem is None
    assert row[field] == expected
    assert type(row[field]) is type(expected)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("founded", "19 ninety", "founded: expected integer, got '19 ninety'"),
        ("founded", "1,200", "founded: expected integer, got '1,200'"),
        ("founded", 2001.5, "founded: expected integer, got 2001.5"),
        ("founded", True, "founded: expected integer, got true"),
        ("founded", None, "founded: expected integer, got null"),
        ("founded", 2**63, "founded: integer 9223372036854775808 is out of the 64-bit range"),
        ("founded", float("inf"), "founded: expected integer, got inf"),
        ("founded", [1998], "founded: expected integer, got an array"),
        ("revenue", "1,200.5", "revenue: expected number, got '1,200.5'"),
        ("revenue", "nan", "revenue: expected number, got 'nan'"),
        ("revenue", float("nan"), "revenue: expected number, got nan"),
        ("revenue", float("-inf"), "revenue: expected number, got -inf"),
        ("revenue", "1_000", "revenue: expected number, got '1_000'"),
        ("revenue", False, "revenue: expected number, got false"),
        ("revenue", 10**400, "revenue: expected number, got 1000000000"),
        ("ceo", 5, "ceo: expected string, got 5"),
        ("ceo", {"name": "Ada"}, "ceo: expected string, got an object"),
        ("public", "true", "public: expected boolean, got 'true'"),
        ("public", 1, "public: expected boolean, got 1"),
        ("segment", "B2B", "segment: expected one of 'b2b', 'b2c', got 'B2B'"),
        ("segment", 3, "segment: expected one of 'b2b', 'b2c', got 3"),
        ("products", "a, b", "products: expected array, got 'a, b'"),
        ("products", ["a", 2], "products[1]: expected string, got 2"),
        ("offices", [{"city": "Paris"}], "offices[0].staff: missing"),
        ("offices", [{"city": "Paris", "staff": "many"}], "offices[0].staff: expected integer, got 'many'"),
        ("hq", {"city": "Paris", "geo": {"lat": "north"}}, "hq.geo.lat: expected number, got 'north'"),
        ("hq", {"city": "Paris", "geo": None}, "hq.geo: expected object, got null"),
        ("hq", "Paris", "hq: expected object, got 'Paris'"),
    ],
)
def test_bad_values_become_null_with_a_message(field: str, value: object, message: str) -> None:
    row, problem = one(FULL, {**GOOD, field: value})
    assert row[field] is None
    assert problem is not None and problem.startswith(message)
    assert {k: v for k, v in row.items() if k != field} == {k: v for k, v in GOOD.items() if k != field}


def test_long_bad_values_are_shortened() -> None:
    _, problem = one(FULL, {**GOOD, "founded": "x" * 200})
    assert problem == "founded: expected integer, got '" + "x" * 39 + "…'"


def test_missing_and_extra_keys() -> None:
    answer = {k: v for k, v in GOOD.items() if k != "founded"} | {"zz": 1}
    row, problem = one(FULL, answer)
    assert row["founded"] is None and row["ceo"] == "Ada"
    assert problem == "founded: missing; unexpected field 'zz'"


def test_nested_extra_keys_are_noted_but_keep_the_value() -> None:
    row, problem = one(FULL, {**GOOD, "hq": {"city": "Paris", "geo": {"lat": 1.0, "lon": 2.0}}})
    assert row["hq"] == {"city": "Paris", "geo": {"lat": 1.0}}
    assert problem == "hq.geo: unexpected field 'lon'"


def test_several_problems_in_one_row_are_joined() -> None:
    _, problem = one(FULL, {**GOOD, "ceo": 1, "public": None})
    assert problem == "ceo: expected string, got 1; public: expected boolean, got null"


def test_bad_answers_never_raise() -> None:
    frame, problems = FULL.to_frame(["not json", "[1, 2]", 3, [GOOD], "null", {"ceo": object()}])
    assert frame.height == 6
    assert problems[:5] == [
        "answer: expected a JSON object, got text 'not json'",
        "answer: expected a JSON object, got an array",
        "answer: expected a JSON object, got 3",
        "answer: expected a JSON object, got an array",
        "answer: expected a JSON object, got null",
    ]
    assert problems[5] is not None and problems[5].startswith("ceo: expected string, got a Python object")
    assert frame.null_count().row(0) == (6,) * len(FULL.columns)


def test_text_output_frame() -> None:
    spec = parse_output("A summary")
    frame, problems = spec.to_frame(["Acme makes anvils.", None, {"a": 1}, 3])
    assert frame.schema == pl.Schema({"output": pl.String})
    assert frame["output"].to_list() == ["Acme makes anvils.", None, None, None]
    assert problems == [None, None, "output: expected text, got an object", "output: expected text, got 3"]


def test_optional_fields_of_a_whole_schema_may_be_missing() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a"],
    }
    spec = parse_output(schema)
    frame, problems = spec.to_frame([{"a": "x"}, {"b": 1}, {"a": "y", "extra": 1}])
    assert frame.to_dicts() == [{"a": "x", "b": None}, {"a": None, "b": 1}, {"a": "y", "b": None}]
    assert problems == [None, "a: missing", None]  # an open object: extras are ignored


def test_untyped_schema_parts_become_json_text() -> None:
    schema = {
        "type": "object",
        "properties": {
            "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "loose": {"type": "object"},
            "bag": {"type": "array"},
        },
    }
    spec = parse_output(schema)
    assert spec.polars_schema() == {"any": pl.String, "loose": pl.String, "bag": pl.List(pl.String)}
    frame, problems = spec.to_frame([{"any": 3, "loose": {"b": 1, "a": [True]}, "bag": ["x", 1, None]}])
    assert frame.row(0) == ("3", '{"a":[true],"b":1}', ["x", "1", None])
    assert problems == [None]


def test_refs_nullable_unions_and_integer_enums() -> None:
    schema = {
        "type": "object",
        "properties": {
            "hq": {"$ref": "#/$defs/Place"},
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "x": {"type": ["integer", "number"]},
            "level": {"enum": [1, 2, 3]},
            "mood": {"type": ["string", "null"], "enum": ["up", "down", None]},
        },
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    spec = parse_output(schema)
    assert spec.polars_schema() == {
        "hq": pl.Struct({"city": pl.String}),
        "n": pl.Int64,
        "x": pl.Float64,
        "level": pl.Int64,
        "mood": pl.String,
    }
    answers = [
        {"hq": {"city": "P"}, "n": None, "x": 3, "level": 2, "mood": None},
        {"level": 4, "mood": "sideways"},
    ]
    frame, problems = spec.to_frame(answers)
    assert frame.row(0) == ({"city": "P"}, None, 3.0, 2, None)
    assert (
        problems[1]
        == "level: expected one of 1, 2, 3, got 4; mood: expected one of 'down', 'up', got 'sideways'"
    )


def test_to_frame_agrees_with_validate_on_good_answers() -> None:
    assert validate(GOOD, FULL.json_schema) == []


# -- collisions ------------------------------------------------------------------------------------


def test_check_collisions() -> None:
    check_collisions(parse_output({"ceo": "CEO"}), ["company", "website"])
    with pytest.raises(UsageError) as info:
        check_collisions(parse_output({"company": "Legal name"}), ["company", "website"])
    assert str(info.value) == (
        "output field 'company' has the same name as an input column; rename the output field (e.g. "
        "'company_found')"
    )
    with pytest.raises(
        UsageError, match=r"output fields 'company', 'website' have the same names as input columns"
    ):
        check_collisions(parse_output({"company": "x", "website": "y", "ceo": "z"}), ["company", "website"])
    with pytest.raises(
        UsageError, match=r"the text output goes to a column named 'output', which is already an input"
    ):
        check_collisions(parse_output("A summary"), ["output"])
    for name in RESERVED_COLUMNS:
        with pytest.raises(UsageError, match=rf"input column '{name}' has the name of a column enrich adds"):
            check_collisions(parse_output({"ceo": "CEO"}), ["company", name])


# -- property tests --------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=8)
CHOICES = ["a", "b", "c"]
OBJECT_FIELDS = {"x": ("integer", "X"), "y": "Y"}

# kind → (spec type, detail, good values, expected value of a good one, bad values)
KINDS: dict[str, tuple[str, Any, st.SearchStrategy[Any], Any, st.SearchStrategy[Any]]] = {
    "string": (
        "string",
        None,
        TEXT,
        lambda v: v,
        st.one_of(INT64, FINITE, st.booleans(), st.lists(TEXT, max_size=2)),
    ),
    "integer": (
        "integer",
        None,
        st.one_of(INT64, st.integers(-(2**52), 2**52).map(float)),
        int,
        st.one_of(
            st.sampled_from(["1,200", "19 ninety", "", "1.5", "0x10", "١٢"]),
            FINITE.filter(lambda f: not f.is_integer()),
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.booleans(),
            st.integers(2**63, 2**70),
            st.lists(INT64, max_size=2),
        ),
    ),
    "number": (
        "number",
        None,
        st.one_of(FINITE, st.integers(-(2**53), 2**53)),
        float,
        st.one_of(
            st.sampled_from(["1,200", "abc", "nan", "inf", "", "1_000", "--1"]),
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.booleans(),
            st.dictionaries(TEXT, INT64, max_size=2),
        ),
    ),
    "boolean": (
        "boolean",
        None,
        st.booleans(),
        lambda v: v,
        st.one_of(st.integers(0, 1), st.sampled_from(["true", "no"])),
    ),
    "enum": (
        "enum",
        CHOICES,
        st.sampled_from(CHOICES),
        lambda v: v,
        st.one_of(st.sampled_from(["A", "d", ""]), INT64),
    ),
    "array": (
        "array[integer]",
        None,
        st.lists(INT64, max_size=4),
        lambda v: v,
        st.one_of(
            TEXT,
            st.lists(TEXT.filter(lambda s: not s.strip().lstrip("+-").isdigit()), min_size=1, max_size=3),
        ),
    ),
    "object": (
        "object",
        OBJECT_FIELDS,
        st.fixed_dictionaries({"x": INT64, "y": TEXT}),
        lambda v: v,
        st.one_of(
            st.lists(INT64, max_size=2),
            st.fixed_dictionaries({"y": TEXT}),
            st.fixed_dictionaries(
                {"x": TEXT.filter(lambda s: not s.strip().lstrip("+-").isdigit()), "y": TEXT}
            ),
        ),
    ),
}


@st.composite
def specs(draw: st.DrawFn) -> tuple[OutputSpec, list[tuple[str, str, bool]]]:
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=5))
    nullables = draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
    fields = {}
    layout = []
    for i, (kind, nullable) in enumerate(zip(kinds, nullables, strict=True)):
        type_name, detail, *_ = KINDS[kind]
        name = f"f{i}"
        fields[name] = (
            type_name + ("?" if nullable else ""),
            *([detail] if detail is not None else []),
            "desc",
        )
        layout.append((name, kind, nullable))
    return parse_output(fields), layout


def expected_dtype(kind: str) -> pl.DataType:
    return {
        "string": pl.String(),
        "integer": pl.Int64(),
        "number": pl.Float64(),
        "boolean": pl.Boolean(),
        "enum": pl.String(),
        "array": pl.List(pl.Int64),
        "object": pl.Struct({"x": pl.Int64, "y": pl.String}),
    }[kind]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec_layout=specs())
def test_conforming_answers_round_trip(
    data: st.DataObject, spec_layout: tuple[OutputSpec, list[Any]]
) -> None:
    spec, layout = spec_layout
    n = data.draw(st.integers(0, 12))
    answers: list[Any] = []
    expected: list[dict[str, Any] | None] = []
    for _ in range(n):
        if data.draw(st.integers(0, 9)) == 0:
            answers.append(None)
            expected.append(None)
            continue
        answer, row = {}, {}
        for name, kind, nullable in layout:
            _, _, good, convert, _ = KINDS[kind]
            value = data.draw(st.one_of(good, st.none()) if nullable else good)
            answer[name] = value
            row[name] = None if value is None else convert(value)
        assert validate(answer, spec.json_schema) == []
        answers.append(json.dumps(answer) if data.draw(st.integers(0, 9)) == 0 else answer)
        expected.append(row)
    frame, problems = spec.to_frame(answers)
    assert problems == [None] * n
    assert frame.schema == pl.Schema({name: expected_dtype(kind) for name, kind, _ in layout})
    assert frame.height == n
    for got, want in zip(frame.to_dicts(), expected, strict=True):
        assert got == (want if want is not None else dict.fromkeys(spec.columns))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec_layout=specs())
def test_non_conforming_answers_null_exactly_the_bad_cells(
    data: st.DataObject, spec_layout: tuple[OutputSpec, list[Any]]
) -> None:
    spec, layout = spec_layout
    n = data.draw(st.integers(1, 10))
    answers = []
    bad_cells: list[set[str]] = []
    goods: list[dict[str, Any]] = []
    for _ in range(n):
        answer: dict[str, Any] = {}
        bad: set[str] = set()
        good_row: dict[str, Any] = {}
        for name, kind, nullable in layout:
            _, _, good, convert, bad_values = KINDS[kind]
            mode = data.draw(
                st.sampled_from(["good", "good", "bad", "missing"] + ([] if nullable else ["null"]))
            )
            if mode == "good":
                value = data.draw(good)
                answer[name] = value
                good_row[name] = convert(value)
            elif mode == "bad":
                answer[name] = data.draw(bad_values)
                bad.add(name)
            elif mode == "null":
                answer[name] = None
                bad.add(name)
            else:
                bad.add(name)
        extra = data.draw(st.booleans())
        if extra:
            answer["zz_extra"] = 1
        answers.append(answer)
        bad_cells.append(bad)
        goods.append(good_row)
    frame, problems = spec.to_frame(answers)
    assert frame.height == n
    for row, bad, good_row, problem, answer in zip(
        frame.to_dicts(), bad_cells, goods, problems, answers, strict=True
    ):
        for name, _, _ in layout:
            if name in bad:
                assert row[name] is None
                assert problem is not None and f"{name}" in problem
            else:
                assert row[name] == good_row[name]
        if not bad and "zz_extra" not in answer:
            assert problem is None
        if "zz_extra" in answer:
            assert problem is not None and "unexpected field 'zz_extra'" in problem
