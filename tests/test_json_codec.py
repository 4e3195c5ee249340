"""The JSON codec of answers (`_models.loads`, `_engine.job.dumps`): orjson's speed, json's values.

An answer is read off the wire and written to the checkpoint as JSON text. orjson does both in a
fraction of json's time, but not always to the same value: it reads integers beyond 64 bits as floats,
refuses NaN and infinities, and would write them as null. These tests hold the codec to json's values.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from enrich._engine.job import dumps
from enrich._models import ExoticFloat, loads

# JSON values, with the numbers orjson treats otherwise: integers past 64 bits, NaN and infinities.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(2**64), max_value=2**64)  # (the edges of 64 bits, where orjson changes)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=()))  # lone surrogates too
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN, and an integer never equal to a float."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b) and not (isinstance(a, float) and isinstance(b, float)):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(values)
def test_loads_reads_what_json_reads(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert same(loads(text), json.loads(text))
    try:
        data = text.encode()  # as a body comes off the wire: UTF-8 (a lone surrogate only as an escape)
    except UnicodeEncodeError:
        return
    assert same(loads(data), json.loads(data))


@settings(max_examples=400, deadline=None)
@given(values)
def test_dumps_writes_the_value_json_writes(value: Any) -> None:
    read = loads(json.dumps(value, ensure_ascii=False))  # as an answer comes off the wire
    assert same(json.loads(dumps(read)), json.loads(json.dumps(read, ensure_ascii=False)))


def test_what_orjson_would_get_wrong() -> None:
    big = "123456789012345678901234567890"
    assert loads(f'{{"n": {big}}}') == {"n": int(big)}  # orjson alone: 1.2345678901234568e+29
    for edge in (-(2**63) - 1, -(10**19) + 1, 2**64, -(2**63), 2**64 - 1, 10**18):  # (19-20 digits)
        assert loads(f"[{edge}]") == [edge] and type(loads(f"[{edge}]")[0]) is int, edge
        assert dumps([edge]) == f"[{edge}]"
    nan = loads('{"x": NaN, "y": [Infinity, -Infinity, 1e400]}')
    assert isinstance(nan["x"], ExoticFloat) and math.isnan(nan["x"])
    assert dumps(nan) == '{"x":NaN,"y":[Infinity,-Infinity,Infinity]}'  # orjson alone: nulls
    assert dumps({"n": int(big)}) == f'{{"n":{big}}}'
    assert loads('{"s": "\\ud800"}') == {"s": "\ud800"}  # a lone surrogate escape, as json reads it
    assert loads("[1.5, 2]") == [1.5, 2] and type(loads("2")) is int
