"""Frames in and out, rows → inputs, content keys, dedupe, size limits and input validation."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrich._exceptions import UsageError
from enrich._inputs import (
    INPUT_LIMIT,
    _encode_many,
    build_inputs,
    canonical_json,
    check_input_size,
    dedupe,
    from_polars,
    row_keys,
    to_polars,
    validate_inputs,
)


def usage_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UsageError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- to_polars / from_polars -----------------------------------------------------------------------


def test_polars_and_lazy_frames() -> None:
    df = pl.DataFrame({"company": ["Acme"]})
    assert to_polars(df) == (df, "polars")
    got, kind = to_polars(df.lazy())
    assert kind == "polars" and got.equals(df)
    assert from_polars(got, kind, df) is got


def test_pandas_index_stays_out_of_the_inputs() -> None:
    pdf = pd.DataFrame({"company": ["Acme", "Initech"]}, index=pd.Index(["r1", "r2"], name="id"))
    df, kind = to_polars(pdf)
    assert kind == "pandas"
    assert df.columns == ["company"]
    assert build_inputs(df) == [{"company": "Acme"}, {"company": "Initech"}]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            [{"a": 1}],
            "data must be a polars DataFrame or LazyFrame, a pandas DataFrame or a pyarrow Table; got list",
        ),
        ({"a": [1]}, "got dict"),
        (pl.Series("a", [1]), "got Series (for a Series, pass series.to_frame())"),
        (pd.Series([1]), "(for a Series, pass series.to_frame())"),
        (pl.DataFrame(), "data has no columns; nothing to send"),
        (
            pd.DataFrame([[1, 2]], columns=["a", "a"]),
            "duplicate column names: 'a'; give every column a distinct name",
        ),
        (pd.DataFrame([[1, 2]], columns=[1, "1"]), "duplicate column names: '1'"),
        (
            pd.DataFrame([[1]], columns=pd.MultiIndex.from_tuples([("a", "b")])),
            "pandas columns with several levels are not supported; flatten them first",
        ),
        (
            pd.DataFrame({"ok": [1, 2, 3], "m": [1, 2, "x"]}),
            "column 'm' mixes types: row 2 holds str 'x' among number values; give the column one type, "
            "e.g. df['m'] = df['m'].astype(str)",
        ),
        (
            pd.DataFrame({"o": [None, object()]}),
            "column 'o' row 1 holds a value of type object, which cannot be sent as JSON; convert the "
            "column to text, numbers or dates first",
        ),
    ],
)
def test_to_polars_refusals(data: object, expected: str) -> None:
    assert expected in usage_error(to_polars, data)


def test_pandas_round_trip_keeps_index_labels_and_dtypes() -> None:
    pdf = pd.DataFrame(
        {
            "company": ["Acme", "Initech", "Hooli"],
            7: pd.array([1, None, 3], dtype="Int64"),
            "kind": pd.Categorical(["x", "y", "x"]),
        },
        index=pd.Index([10, 20, 10], name="id"),
    )
    pdf.columns.name = "cols"
    df, kind = to_polars(pdf)
    assert df.columns == ["company", "7", "kind"]
    result = df.with_columns(
        pl.Series("founded", [1998, None, 2001], dtype=pl.Int64),
        pl.Series("revenue", [1.5, None, 2.0]),
        pl.Series("public", [True, None, False]),
        pl.Series("ceo", ["Ada", None, "Bo"]),
        pl.Series("products", [["a"], None, []], dtype=pl.List(pl.String)),
        pl.Series("hq", [{"city": "P", "n": 1}, None, {"city": None, "n": 2}]),
        pl.Series("_status", ["completed"] * 3),
    )
    out = from_polars(result, kind, pdf)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == [
        "company",
        7,
        "kind",
        "founded",
        "revenue",
        "public",
        "ceo",
        "products",
        "hq",
        "_status",
    ]
    assert out.index.equals(pdf.index) and out.index.name == "id"
    assert out.columns.name == "cols"
    pd.testing.assert_frame_equal(out[["company", 7, "kind"]], pdf)
    assert str(out["founded"].dtype) == "Int64"
    assert out["founded"].tolist()[0] == 1998 and out["founded"].isna().tolist() == [False, True, False]
    assert str(out["public"].dtype) == "boolean"
    assert out["revenue"].dtype == "float64" and math.isnan(out["revenue"].iloc[1])
    assert out["ceo"].tolist()[0] == "Ada"
    assert out["products"].tolist() == [["a"], None, []]
    assert out["hq"].tolist() == [{"city": "P", "n": 1}, None, {"city": None, "n": 2}]


def test_from_polars_without_the_original() -> None:
    df = pl.DataFrame({"a": [1, None], "l": [[1], None]})
    out = from_polars(df, "pandas")
    assert list(out.columns) == ["a", "l"]
    assert str(out["a"].dtype) == "Int64"
    assert out["l"].tolist() == [[1], None]
    with pytest.raises(ValueError, match="unknown frame kind"):
        from_polars(df, "numpy")


# -- build_inputs: cell conversions ----------------------------------------------------------------


def one_column(series: pl.Series) -> list[Any]:
    return [row[series.name] for row in build_inputs(series.to_frame())]


def test_scalars_and_nulls_keep_their_keys() -> None:
    df = pl.DataFrame({"s": ["x", None], "i": [1, None], "b": [True, None], "n": [None, None]})
    assert build_inputs(df) == [
        {"s": "x", "i": 1, "b": True, "n": None},
        {"s": None, "i": None, "b": None, "n": None},
    ]


def test_big_and_unsigned_integers_stay_exact() -> None:
    assert one_column(pl.Series("u", [2**64 - 1], dtype=pl.UInt64)) == [2**64 - 1]
    assert one_column(pl.Series("i", [-(2**63)], dtype=pl.Int64)) == [-(2**63)]
    assert one_column(pl.Series("i8", [-3], dtype=pl.Int8)) == [-3]


def test_floats_nan_and_infinity_become_null() -> None:
    assert one_column(pl.Series("f", [1.5, math.nan, math.inf, -math.inf, None, -0.0])) == [
        1.5,
        None,
        None,
        None,
        None,
        -0.0,
    ]
    assert one_column(pl.Series("f", [0.5, math.nan], dtype=pl.Float32)) == [0.5, None]


def test_decimals_become_exact_strings() -> None:
    s = pl.Series("d", [Decimal("1234.50"), Decimal("-0.01"), None, Decimal("12345678901234567890.12")])
    assert one_column(s) == ["1234.50", "-0.01", None, "12345678901234567890.12"]


def test_dates_times_and_durations() -> None:
    assert one_column(pl.Series("d", [dt.date(2024, 3, 1), None])) == ["2024-03-01", None]
    naive = pl.Series(
        "t",
        [
            dt.datetime(2024, 3, 1, 9, 30),
            dt.datetime(2024, 3, 1, 9, 30, 0, 250_000),
            dt.datetime(2024, 3, 1, 9, 30, 0, 500),
        ],
    )
    assert one_column(naive) == [
        "2024-03-01T09:30:00",
        "2024-03-01T09:30:00.250",
        "2024-03-01T09:30:00.000500",
    ]
    paris = pl.Series(
        "t",
        [
            dt.datetime(2024, 1, 1, 9, 30, tzinfo=ZoneInfo("Europe/Paris")),
            dt.datetime(2024, 7, 1, 9, 30, tzinfo=ZoneInfo("Europe/Paris")),
        ],
    )
    assert paris.dtype == pl.Datetime("us", "Europe/Paris")
    assert one_column(paris) == ["2024-01-01T09:30:00+01:00", "2024-07-01T09:30:00+02:00"]
    utc = pl.Series("t", [dt.datetime(2024, 1, 1, tzinfo=dt.UTC)])
    assert one_column(utc) == ["2024-01-01T00:00:00+00:00"]
    assert one_column(pl.Series("t", [dt.time(9, 30), dt.time(9, 30, 1, 4000)])) == [
        "09:30:00",
        "09:30:01.004",
    ]
    durations = pl.Series(
        "d",
        [
            dt.timedelta(days=1, hours=2),
            dt.timedelta(seconds=1.5),
            dt.timedelta(0),
            -dt.timedelta(seconds=3),
            None,
        ],
    )
    assert one_column(durations) == ["P1DT2H", "PT1.5S", "PT0S", "-PT3S", None]


def test_categorical_and_enum_become_strings() -> None:
    assert one_column(pl.Series("c", ["a", None, "b"], dtype=pl.Categorical)) == ["a", None, "b"]
    assert one_column(pl.Series("e", ["lo", "hi"], dtype=pl.Enum(["lo", "hi"]))) == ["lo", "hi"]


def test_lists_arrays_and_structs_convert_recursively() -> None:
    lists = pl.Series("l", [[1.0, math.nan, None], None, []])
    assert one_column(lists) == [[1.0, None, None], None, []]
    dates = pl.Series("l", [[dt.date(2024, 1, 2)], [None]])
    assert one_column(dates) == [["2024-01-02"], [None]]
    array = pl.Series("a", [[1, 2], [3, 4]], dtype=pl.Array(pl.Int64, 2))
    assert one_column(array) == [[1, 2], [3, 4]]
    farray = pl.Series("a", [[1.0, math.inf]], dtype=pl.Array(pl.Float64, 2))
    assert one_column(farray) == [[1.0, None]]
    struct = pl.Series(
        "s",
        [{"a": dt.date(2020, 1, 2), "b": [math.inf, 2.0], "c": "x"}, None, {"a": None, "b": None, "c": None}],
    )
    assert one_column(struct) == [
        {"a": "2020-01-02", "b": [None, 2.0], "c": "x"},
        None,
        {"a": None, "b": None, "c": None},
    ]
    plain = pl.Series("s", [{"x": 1, "y": "z"}, None])
    assert one_column(plain) == [{"x": 1, "y": "z"}, None]
    nested = pl.Series("ls", [[{"x": 1, "d": Decimal("1.10")}, None], None])
    assert one_column(nested) == [[{"x": 1, "d": "1.10"}, None], None]


def test_binary_is_refused_with_column_and_row() -> None:
    df = pl.DataFrame({"name": ["a", "b", "c"], "photo": [None, b"\x89PNG", b"x"]})
    assert usage_error(build_inputs, df) == (
        "column 'photo' row 1 holds binary data, which cannot be sent as JSON; decode it to text first "
        "(e.g. base64)"
    )
    assert build_inputs(df, columns=["name"]) == [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    all_null = pl.DataFrame({"photo": pl.Series([None, None], dtype=pl.Binary)})
    assert build_inputs(all_null) == [{"photo": None}, {"photo": None}]
    nested = pl.DataFrame({"files": [[b"a"]]})
    assert "column 'files' row 0 holds binary data" in usage_error(build_inputs, nested)


class Opaque:
    pass


def test_object_columns_convert_per_cell() -> None:
    s = pl.Series(
        "o", [Decimal("1.5"), dt.date(2020, 1, 1), {"k": [1, math.nan]}, None, (1, "a")], dtype=pl.Object
    )
    assert one_column(s) == ["1.5", "2020-01-01", {"k": [1, None]}, None, [1, "a"]]
    bad = pl.Series("o", ["fine", Opaque()], dtype=pl.Object)
    assert usage_error(build_inputs, bad.to_frame()) == (
        "column 'o' row 1 holds a value of type Opaque, which cannot be sent as JSON; convert the column to "
        "text, numbers or dates first"
    )
    raw = pl.Series("o", [b"bytes"], dtype=pl.Object)
    assert "column 'o' row 0 holds binary data" in usage_error(build_inputs, raw.to_frame())


def test_pandas_cells() -> None:
    pdf = pd.DataFrame(
        {
            "when": pd.to_datetime(["2024-01-01 09:30", None]).tz_localize("Europe/Paris"),
            "n": pd.array([1, None], dtype="Int64"),
            "f": [1.5, float("nan")],
            "cat": pd.Categorical(["a", None]),
            "dec": [Decimal("1.10"), None],
        }
    )
    df, _ = to_polars(pdf)
    assert build_inputs(df) == [
        {"when": "2024-01-01T09:30:00+01:00", "n": 1, "f": 1.5, "cat": "a", "dec": "1.10"},
        {"when": None, "n": None, "f": None, "cat": None, "dec": None},
    ]


# -- build_inputs: columns -------------------------------------------------------------------------

FRAME = pl.DataFrame(
    {
        "company": ["Acme", "Initech"],
        "website": ["acme.com", None],
        "founded": [1998, 2001],
        "public": [True, False],
        "tags": [["a", "b"], []],
        "since": [dt.date(2020, 1, 2), None],
        "revenue": [1234.5, None],
    }
)


def test_columns_selects_and_orders() -> None:
    assert build_inputs(FRAME, columns=["website", "company"]) == [
        {"website": "acme.com", "company": "Acme"},
        {"website": None, "company": "Initech"},
    ]
    assert build_inputs(FRAME, columns="company") == [{"company": "Acme"}, {"company": "Initech"}]


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (
            ["compnay"],
            "column 'compnay' not found; available: company, website, founded, public, tags, since, revenue. "
            "Did you mean 'company'?",
        ),
        (
            ["Company"],
            "column 'Company' not found; available: company, website, founded, public, tags, since, "
            "revenue. Did you mean 'company'?",
        ),
        (
            ["zzz"],
            "column 'zzz' not found; available: company, website, founded, public, tags, since, revenue.",
        ),
        ([], "columns is empty; name at least one input column (or leave it out for all)"),
        (["company", "company"], "columns lists 'company' more than once; list each once"),
        ([3], "column names must be strings, got 3"),
    ],
)
def test_column_refusals(columns: Any, expected: str) -> None:
    assert usage_error(build_inputs, FRAME, columns=columns) == expected


def test_many_available_columns_are_abbreviated() -> None:
    wide = pl.DataFrame({f"c{i}": [1] for i in range(30)})
    message = usage_error(build_inputs, wide, columns=["c99"])
    assert "c19, … (30 in all)" in message


# -- build_inputs: prompts -------------------------------------------------------------------------


def test_prompt_templates() -> None:
    assert build_inputs(FRAME, prompt="Find the CEO of {company} ({website})") == [
        "Find the CEO of Acme (acme.com)",
        "Find the CEO of Initech ()",
    ]
    assert build_inputs(FRAME, prompt="{{literal}} {company}!") == ["{literal} Acme!", "{literal} Initech!"]
    assert build_inputs(FRAME, prompt="{company} {company}") == ["Acme Acme", "Initech Initech"]


def test_prompt_renders_values_as_json_and_applies_format_specs() -> None:
    template = "{founded} {public} {tags} {since} {revenue} | {revenue:,.2f} | {company:>8} | {founded:05d}"
    assert build_inputs(FRAME, prompt=template) == [
        '1998 true ["a", "b"] 2020-01-02 1234.5 | 1,234.50 |     Acme | 01998',
        "2001 false []   |  |  Initech | 02001",
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "CEO of {compnay}",
            "prompt field column 'compnay' not found; available: company, website, founded, public, tags, "
            "since, revenue. Did you mean 'company'?",
        ),
        ("CEO of {}", "prompt template: fields must name columns, e.g. {company}; got {}"),
        ("CEO of {0}", "prompt template: fields must name columns, e.g. {company}; got {0}"),
        ("CEO of {company!r}", "prompt template: conversions like {company!r} are not supported"),
        ("CEO of {company:{width}}", "prompt template: nested fields in {company:{width}} are not supported"),
        (
            "CEO of Acme",
            "the prompt template names no columns, so every row would get the same input; add fields such "
            "as {company}",
        ),
        (
            "CEO of {company",
            "prompt template: expected '}' before end of string; write {{ and }} for literal braces",
        ),
        (
            "CEO of company}",
            "prompt template: Single '}' encountered in format string; write {{ and }} for literal braces",
        ),
        (
            "{company:d}",
            "prompt field {company:d} fails at row 0 on 'Acme': Unknown format code 'd' for object of type "
            "'str'",
        ),
    ],
)
def test_prompt_refusals(prompt: str, expected: str) -> None:
    assert usage_error(build_inputs, FRAME, prompt=prompt) == expected


def test_prompt_format_specs_apply_to_the_cell_value() -> None:
    df = pl.DataFrame(
        {
            "since": [dt.date(2020, 1, 2), None],
            "price": [Decimal("1234.50"), Decimal("2")],
            "x": [math.nan, 0.25],
        }
    )
    assert build_inputs(df, prompt="{since:%d %b %Y}|{price:,.1f}|{price}|{x:.0%}|{x}") == [
        "02 Jan 2020|1,234.5|1234.50||",
        "|2.0|2.00|25%|0.25",
    ]


def test_prompt_with_columns_limits_the_fields() -> None:
    assert build_inputs(FRAME, columns=["company"], prompt="{company}") == ["Acme", "Initech"]
    assert usage_error(build_inputs, FRAME, columns=["company"], prompt="{company} {website}") == (
        "prompt field {website} names a column left out by columns=; add it there"
    )


def test_prompt_can_name_a_numeric_column() -> None:
    df = pl.DataFrame({"0": ["zero"]})
    assert build_inputs(df, prompt="{0}!") == ["zero!"]


# -- canonical JSON, keys, dedupe ------------------------------------------------------------------


def test_canonical_json() -> None:
    value = {"b": [1, 2.5, None, True], "a": "é€", "c": {"y": 1, "x": 2}}
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical_json(value) == expected == '{"a":"é€","b":[1,2.5,null,true],"c":{"x":2,"y":1}}'
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_json({"a": math.nan})


TEXT_SPEC = {"output_schema": {"type": "text", "description": "CEO"}}


def test_row_key_is_a_fixed_function_of_input_spec_and_processor() -> None:
    # A literal: if this changes, every stored checkpoint and run's metadata stops matching.
    assert row_keys([{"company": "Acme"}], TEXT_SPEC, "base") == ["50896f2d89292ef4bb2dc0678b3a456c"]
    assert row_keys(["Find the CEO of Acme"], TEXT_SPEC, "core-fast") == ["343dcd80b64d72b54c06a2bd4451796e"]
    payload = canonical_json(["enrich-row-key/1", "base", TEXT_SPEC, {"company": "Acme"}])
    assert hashlib.sha256(payload.encode()).hexdigest()[:32] == "50896f2d89292ef4bb2dc0678b3a456c"


def test_row_keys_identity() -> None:
    inputs = [{"a": 1, "b": "x"}, {"b": "x", "a": 1}, {"a": 2, "b": "x"}]
    keys = row_keys(inputs, TEXT_SPEC, "base")
    assert keys[0] == keys[1] != keys[2]
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
    assert row_keys(inputs, TEXT_SPEC, "core")[0] != keys[0]
    other_spec = {"output_schema": {"type": "text", "description": "CFO"}}
    assert row_keys(inputs, other_spec, "base")[0] != keys[0]
    assert row_keys([], TEXT_SPEC, "base") == []
    with pytest.raises(ValueError, match="not JSON compliant"):
        row_keys([{"a": math.nan}], TEXT_SPEC, "base")


@pytest.mark.parametrize(
    "values",
    [
        [{"a": 1, "b": "x"}, {"a": None, "b": None}],
        [{"a": 1.5}, {"a": None}, {"a": -0.0}, {"a": 1e300}],
        [{"a": 1}, {"a": 1.5}],  # mixed column
        [{"a": [1, {"z": 1, "y": 2}]}, {"a": {"k": None}}],  # nested
        [{"a": 1}, {"b": 1}],  # different keys
        [{"a": 1}, {"a": 1, "b": 2}],
        [{"%s": "%d", "é": '\u2028"\\'}],  # template characters and escapes
        [{}, {}],
        ["text", 'more "text"'],
        ["text", {"a": 1}],
        [{1: "int key"}],
        [{"b": True, "a": False}, {"b": None, "a": True}],
        [{"a": None}, {"a": None}],
    ],
)
def test_fast_encoding_equals_canonical_json(values: list[Any]) -> None:
    assert _encode_many(values) == [canonical_json(v) for v in values]


def test_dedupe() -> None:
    assert dedupe([]) == ([], [])
    assert dedupe(["k1", "k2", "k1", "k3", "k2", "k2"]) == (["k1", "k2", "k3"], [0, 1, 0, 2, 1, 1])
    inputs = build_inputs(pl.DataFrame({"company": ["Acme", "Initech", "Acme"]}))
    keys, index = dedupe(row_keys(inputs, TEXT_SPEC, "base"))
    assert len(keys) == 2 and index == [0, 1, 0]


# -- size limits and validation --------------------------------------------------------------------


def test_check_input_size() -> None:
    spec_chars = len(canonical_json(TEXT_SPEC))
    room = INPUT_LIMIT - spec_chars
    fits = "x" * room
    over = "x" * (room + 1)
    assert check_input_size([fits, over, "small"], TEXT_SPEC) == [
        None,
        f"input too large: {room + 1:,} characters, plus {spec_chars:,} of task spec, is over the Task "
        f"API's 25,000; "
        "send fewer or shorter columns",
        None,
    ]
    as_dict = {"t": "x" * (room - len('{"t":""}'))}
    assert check_input_size([as_dict, {"t": as_dict["t"] + "x"}], TEXT_SPEC)[0] is None
    assert check_input_size([as_dict, {"t": as_dict["t"] + "x"}], TEXT_SPEC)[1] is not None
    assert check_input_size([{"a": 1}], TEXT_SPEC, limit=10)[0] is not None


def test_validate_inputs() -> None:
    schema = {
        "type": "object",
        "properties": {"company": {"type": "string"}, "founded": {"type": "integer"}},
        "required": ["company"],
    }
    inputs = [{"company": "Acme", "founded": 1998}, {"founded": "x"}, "text"]
    expected = [
        None,
        "$: missing required property 'company'; $.founded: expected integer, got string",
        "$: expected object, got string",
    ]
    assert validate_inputs(inputs, schema) == expected
    assert validate_inputs(inputs, {"type": "json", "json_schema": schema}) == expected
    assert validate_inputs(inputs, None) == [None, None, None]
    assert validate_inputs(inputs, {"type": "text", "description": "x"}) == [None, None, None]
    many = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcde"}}
    (problem,) = validate_inputs([dict.fromkeys("abcde", "x")], many)
    assert problem is not None and problem.endswith("(+2 more)")


# -- property tests --------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
DATES = st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31))

COLUMN_KINDS: dict[str, tuple[st.SearchStrategy[Any], pl.DataType]] = {
    "int": (INT64, pl.Int64()),
    "float": (FLOATS, pl.Float64()),
    "str": (st.text(max_size=10), pl.String()),
    "bool": (st.booleans(), pl.Boolean()),
    "date": (DATES, pl.Date()),
    "list": (st.lists(st.one_of(st.none(), INT64), max_size=4), pl.List(pl.Int64)),
    "flist": (st.lists(FLOATS, max_size=3), pl.List(pl.Float64)),
}


def expected_json(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "float":
        return value if math.isfinite(value) else None
    if kind == "date":
        return value.isoformat()
    if kind == "flist":
        return [v if math.isfinite(v) else None for v in value]
    return value


@st.composite
def frames(draw: st.DrawFn) -> tuple[pl.DataFrame, list[str], list[list[Any]]]:
    kinds = draw(st.lists(st.sampled_from(sorted(COLUMN_KINDS)), min_size=1, max_size=5))
    n = draw(st.integers(1, 15))
    series, columns = [], []
    for i, kind in enumerate(kinds):
        values, dtype = COLUMN_KINDS[kind]
        column = draw(st.lists(st.one_of(st.none(), values), min_size=n, max_size=n))
        series.append(pl.Series(f"c{i}_{kind}", column, dtype=dtype))
        columns.append(column)
    return pl.DataFrame(series), kinds, columns


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames())
def test_rows_to_inputs_to_json_and_back_keep_values_order_and_nulls(
    frame: tuple[pl.DataFrame, list[str], list[list[Any]]],
) -> None:
    df, kinds, columns = frame
    inputs = build_inputs(df)
    assert all(list(row) == df.columns for row in inputs)  # frame order before canonical sorting
    decoded = [json.loads(canonical_json(row)) for row in inputs]  # what the API would receive
    assert len(decoded) == df.height
    for row_index, row in enumerate(decoded):
        assert list(row) == sorted(df.columns)  # every key kept, nulls included
        for name, kind, column in zip(df.columns, kinds, columns, strict=True):
            want = expected_json(kind, column[row_index])
            got = row[name]
            assert got == want
            if kind == "date" and got is not None:
                assert dt.date.fromisoformat(got) == column[row_index]
    assert _encode_many(inputs) == [canonical_json(row) for row in inputs]
    keys = row_keys(inputs, TEXT_SPEC, "base")
    distinct, index = dedupe(keys)
    assert [distinct[i] for i in index] == keys
    for i, row in enumerate(inputs):
        first = keys.index(keys[i])
        assert canonical_json(inputs[first]) == canonical_json(row)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), INT64, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.text(max_size=5), min_size=0, max_size=4, unique=True),
    data=st.data(),
)
def test_fast_encoding_equals_canonical_json_for_random_rows(keys: list[str], data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 6))
    column_values = {
        k: data.draw(st.sampled_from([JSON_SCALARS, JSON_VALUES, INT64, st.text(max_size=6)])) for k in keys
    }
    rows = [{k: data.draw(column_values[k]) for k in keys} for _ in range(n)]
    assert _encode_many(rows) == [canonical_json(r) for r in rows]


def test_text_columns_are_keyed_by_polars_exactly_as_row_by_row() -> None:
    """`text_keys_and_sizes` (all-text columns, JSON written by polars) gives the keys and sizes of the
    per-row path for every code point a cell may hold, in every row, not just the sampled ones."""
    from enrich._inputs import keys_and_sizes, text_keys_and_sizes

    spec = {"output_schema": {"type": "text", "description": "CEO"}}
    cells = [chr(c) for c in range(0x2100)] + ["\U0001f600", "\ufeff", "\u2028", "", 'a"b\\c/d']
    df = pl.DataFrame(
        {
            'name é"x': [f"<{c}>" for c in cells],
            "a": [None if i % 7 == 0 else cells[-i] for i in range(len(cells))],
        }
    )
    fast = text_keys_and_sizes(df, df.columns, spec, "core")
    assert fast is not None
    keys, sizes = fast
    assert (list(keys), sizes.to_list()) == keys_and_sizes(build_inputs(df), spec, "core")
    # A column that is not text keeps the per-row path.
    assert (
        text_keys_and_sizes(df.with_columns(pl.lit(1).alias("n")), [*df.columns, "n"], spec, "core") is None
    )


def test_a_sample_that_differs_falls_back_to_the_row_by_row_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import enrich._inputs as inputs

    df = pl.DataFrame({"company": [f"c{i}" for i in range(1000)]})
    spec = {"output_schema": {"type": "text", "description": "CEO"}}
    real = inputs.canonical_json
    monkeypatch.setattr(inputs, "canonical_json", lambda v: real(v).replace("c9", "C9"))
    assert inputs.text_keys_and_sizes(df, ["company"], spec, "core") is None


def test_dedupe_of_many_keys_is_first_seen_order() -> None:
    import random

    from enrich._inputs import dedupe

    rng = random.Random(4)
    keys = [f"{rng.randrange(5_000):032x}" for _ in range(30_000)]
    positions: dict[str, int] = {}
    index = [positions.setdefault(k, len(positions)) for k in keys]
    assert dedupe(keys) == (list(positions), index)
    distinct = [f"{i:032x}" for i in range(20_000)]  # no repeats: the same objects, and a range
    kept, at = dedupe(distinct)
    assert kept is distinct and list(at) == list(range(20_000))


def test_keys_computed_in_polars_equal_hashlib_keys_on_every_row() -> None:
    """The plugin's SHA-256 (`_polars_keys`) gives the reference key of every row, for every code point
    a text may hold, not only on the sample it checks at each call."""
    from enrich._inputs import _polars_keys, _python_keys

    head = canonical_json(["enrich-row-key/1", "base", {"output_schema": "CEO"}])
    texts = [canonical_json({"c": chr(c) * (c % 5), "n": c}) for c in range(0x3100)]
    texts += ['{"a":"\U0001f600"}', '{"a":"\\u2028"}', "{}", '"x"']
    native = _polars_keys(pl.Series(texts, dtype=pl.String), head)
    assert native is not None, "polars-hash is a dependency: its keys must be used"
    assert native.to_list() == _python_keys(texts, head)


def test_keys_fall_back_to_hashlib_without_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without polars-hash (or with one that fails), keys are still the reference keys."""
    import sys

    from enrich._inputs import keys_and_sizes, text_keys_and_sizes

    spec = {"output_schema": {"type": "text", "description": "CEO"}}
    df = pl.DataFrame({"company": [f"Acme {i}" for i in range(5_000)]})
    with_plugin = text_keys_and_sizes(df, ["company"], spec, "base")
    monkeypatch.setitem(sys.modules, "polars_hash", None)  # (import raises ImportError)
    without = text_keys_and_sizes(df, ["company"], spec, "base")
    assert with_plugin is not None and without is not None
    assert isinstance(without[0], list)
    assert list(with_plugin[0]) == without[0] == keys_and_sizes(df.to_dicts(), spec, "base")[0]
    assert row_keys([{"company": "Acme 0"}], spec, "base") == [without[0][0]]
