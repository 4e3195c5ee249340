"""The Task API emulator: endpoints, shapes, lifecycle, validation, limits, faults, streams, stats.

Most tests drive the ASGI app in-process through `httpx.ASGITransport`; the `Emulator` tests at the end
go over real HTTP on 127.0.0.1. Latencies are tens of milliseconds so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from enrich._emulator import (
    DEMO_API_KEY,
    STATS_PATH,
    Emulator,
    EmulatorApp,
    EmulatorConfig,
    create_app,
)
from enrich._emulator.synth import expected_output, synth_output

KEY = "test-key"
RUN_ID = re.compile(r"trun_[0-9a-f]{32}\Z")
GROUP_ID = re.compile(r"tgrp_[0-9a-f]{32}\Z")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
TASKRUN_KEYS = {
    "run_id",
    "interaction_id",
    "status",
    "is_active",
    "processor",
    "metadata",
    "taskgroup_id",
    "created_at",
    "modified_at",
    "warnings",
    "error",
}
SCHEMA = {
    "type": "object",
    "properties": {"ceo": {"type": "string"}, "founded_year": {"type": "integer"}},
    "required": ["ceo", "founded_year"],
    "additionalProperties": False,
}
SPEC = {"output_schema": {"type": "json", "json_schema": SCHEMA}}
FAST = {"latency": 0.05, "rate_limit": None}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@asynccontextmanager
async def client(app: EmulatorApp, key: str | None = KEY) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"x-api-key": key} if key is not None else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator", headers=headers) as c:
        yield c


def app_with(**options: Any) -> EmulatorApp:
    return create_app(EmulatorConfig(**{**FAST, **options}))


def body(processor: str = "base", **extra: Any) -> dict[str, Any]:
    return {"input": {"company": "Acme Corp"}, "processor": processor, **extra}


def sse(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body strictly: `event:` + `data:` blocks, comments allowed, never `id:`."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        kind, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            assert field in ("event", "data"), f"unexpected SSE line {line!r}"
            if field == "event":
                kind = value
            else:
                data.append(value)
        if not data:
            assert kind is None
            continue
        payload = json.loads("\n".join(data))
        assert isinstance(payload, dict) and payload
        assert payload["type"] == kind
        events.append(payload)
    return events


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data = response.json()
    assert data["type"] == "error"
    assert set(data["error"]) == {"ref_id", "message", "detail"}
    assert re.fullmatch(r"[0-9a-f-]{36}", data["error"]["ref_id"])
    if message is not None:
        assert data["error"]["message"] == message
    return data["error"]


def assert_fastapi_422(response: httpx.Response, loc: list[Any] | None = None) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail)
    if loc is not None:
        assert any(d["loc"] == loc for d in detail), detail
    return detail


async def wait_done(c: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    r = await c.get(f"/v1/tasks/runs/{run_id}/result", params={"timeout": 10})
    return r.json()


# --------------------------------------------------------------------------------------------------
# Single runs


def test_create_run_returns_a_queued_taskrun() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            r = await c.post("/v1/tasks/runs", json=body(task_spec=SPEC, metadata={"row": "7"}))
            assert r.status_code == 202
            assert r.headers["content-type"] == "application/json"
            run_ = r.json()
            assert set(run_) == TASKRUN_KEYS
            assert RUN_ID.match(run_["run_id"]) and run_["interaction_id"] == run_["run_id"]
            assert run_["status"] == "queued" and run_["is_active"] is True
            assert run_["processor"] == "base" and run_["metadata"] == {"row": "7"}
            assert run_["taskgroup_id"] is None and run_["error"] is None and run_["warnings"] is None
            assert RFC3339.match(run_["created_at"]) and run_["modified_at"] == run_["created_at"]

    run(go())


def status_at(rec: Any, t: float) -> str:
    """The status a run record should show at monotonic time `t`."""
    if t < rec.start:
        return "queued"
    if t < rec.end:
        return "running"
    return "failed" if rec.fails else "completed"


def test_run_moves_queued_running_completed_on_its_timeline() -> None:
    app = app_with(latency=0.3)

    async def go() -> None:
        async with client(app) as c:

            async def status() -> dict[str, Any]:
                before = time.monotonic()
                got = (await c.get(f"/v1/tasks/runs/{rid}")).json()
                assert got["status"] in {status_at(rec, before), status_at(rec, time.monotonic())}
                return got

            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            rec = app.state.runs[rid]
            assert 0.15 <= rec.end - rec.created <= 0.45 + 1e-6  # [0.5x, 1.5x]
            assert 0.05 * (rec.end - rec.created) <= rec.start - rec.created <= 0.15 * (rec.end - rec.created)
            first = await status()
            await asyncio.sleep(rec.start - time.monotonic() + (rec.end - rec.start) / 2)
            mid = await status()
            assert mid["status"] == "running" and mid["is_active"] is True
            assert mid["modified_at"] > mid["created_at"] and first["created_at"] == mid["created_at"]
            await asyncio.sleep(rec.end - time.monotonic() + 0.01)
            done = await status()
            assert done["status"] == "completed" and done["is_active"] is False
            assert done["modified_at"] > mid["modified_at"]

    run(go())


def test_result_blocks_answers_408_while_active_then_200_with_the_expected_output() -> None:
    app = app_with(latency=0.2)
    request = body(task_spec=SPEC)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=request)).json()["run_id"]
            r = await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 0})
            assert_error(r, 408, "Request timed out; run still active")
            started = time.monotonic()
            r = await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 5})
            assert r.status_code == 200
            assert time.monotonic() - started < 1.0  # woken by the run's end, not by the timeout
            result = r.json()
            assert set(result) == {"run", "output"}
            assert result["run"]["status"] == "completed"
            assert result["output"] == expected_output(request)
            assert result["output"]["type"] == "json"
            assert set(result["output"]["content"]) == {"ceo", "founded_year"}
            assert [b["field"] for b in result["output"]["basis"]] == ["ceo", "founded_year"]

    run(go())


def test_result_timeout_runs_out_after_the_requested_seconds() -> None:
    app = app_with(latency=5.0)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            started = time.monotonic()
            assert_error(await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 1}), 408)
            assert 0.9 < time.monotonic() - started < 1.5

    run(go())


@pytest.mark.parametrize("timeout", ["-1", "abc", "1.5", "3601", ""])
def test_result_refuses_a_bad_timeout(timeout: str) -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            error = assert_error(
                await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": timeout}), 422
            )
            assert error["detail"]["errors"][0]["loc"] == ["query", "timeout"]

    run(go())


def test_failed_run_gives_404_on_result_and_its_error_on_get() -> None:
    app = app_with(failure_rate=1.0)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            r = await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 5})
            assert_error(r, 404, "Run failed or run id not found")
            failed = (await c.get(f"/v1/tasks/runs/{rid}")).json()
            assert failed["status"] == "failed" and failed["is_active"] is False
            assert set(failed["error"]) == {"ref_id", "message", "detail"}
            assert failed["error"]["message"].startswith("Task execution failed")

    run(go())


def test_failures_are_drawn_per_run_so_a_resubmitted_input_may_succeed() -> None:
    app = app_with(failure_rate=0.5, seed=3)

    async def go() -> None:
        async with client(app) as c:
            ids = [(await c.post("/v1/tasks/runs", json=body())).json()["run_id"] for _ in range(40)]
            statuses = set()
            for rid in ids:
                await wait_done(c, rid)
                statuses.add((await c.get(f"/v1/tasks/runs/{rid}")).json()["status"])
            assert statuses == {"completed", "failed"}

    run(go())


def test_unknown_run_ids_give_404_everywhere() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            missing = "trun_" + "0" * 32
            assert_error(await c.get(f"/v1/tasks/runs/{missing}"), 404, "Run id not found")
            assert_error(await c.get(f"/v1/tasks/runs/{missing}/input"), 404, "Run id not found")
            assert_error(await c.get(f"/v1/tasks/runs/{missing}/events"), 404, "Run id not found")
            assert_error(
                await c.get(f"/v1/tasks/runs/{missing}/result"), 404, "Run failed or run id not found"
            )

    run(go())


def test_input_returns_the_original_task_run_input() -> None:
    app = app_with()
    request = body(
        "core-fast",
        task_spec=SPEC,
        metadata={"row": "r1", "n": 3, "ok": True},
        source_policy={"include_domains": ["example.com"], "after_date": "2024-01-31"},
        enable_events=True,
    )

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=request)).json()["run_id"]
            r = await c.get(f"/v1/tasks/runs/{rid}/input")
            assert r.status_code == 200 and r.json() == request

    run(go())


def test_no_task_spec_gives_text_below_pro_and_auto_json_on_pro() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            for processor, kind in (
                ("base", "text"),
                ("core", "text"),
                ("pro", "json"),
                ("ultra-fast", "json"),
            ):
                request = {"input": "Who founded Acme?", "processor": processor}
                rid = (await c.post("/v1/tasks/runs", json=request)).json()["run_id"]
                output = (await wait_done(c, rid))["output"]
                assert output["type"] == kind, processor
                assert output == expected_output(request)
                if kind == "text":
                    assert isinstance(output["content"], str) and output["basis"][0]["field"] == "output"
                    assert set(output) == {"type", "content", "basis"}
                else:
                    assert output["output_schema"]["type"] == "object"

    run(go())


def test_text_schema_and_bare_string_spec_give_text() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            for output_schema in ("A one-line summary", {"type": "text", "description": "Summary"}):
                request = body("pro", task_spec={"output_schema": output_schema})
                rid = (await c.post("/v1/tasks/runs", json=request)).json()["run_id"]
                output = (await wait_done(c, rid))["output"]
                assert output["type"] == "text" and output == expected_output(request)

    run(go())


def test_run_events_stream_starts_and_ends_with_state_and_carries_the_output() -> None:
    app = app_with(latency=0.1)
    request = body("pro", task_spec=SPEC)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=request)).json()["run_id"]
            for prefix in ("/v1", "/v1beta"):
                r = await c.get(f"{prefix}/tasks/runs/{rid}/events")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert "\nid:" not in r.text and not r.text.startswith("id:")
                events = sse(r.text)
                assert events[0]["type"] == "task_run.state" and events[0]["event_id"] is None
                assert events[-1]["type"] == "task_run.state"
                assert events[-1]["run"]["status"] == "completed"
                assert events[-1]["output"] == expected_output(request)
                kinds = [e["type"] for e in events]
                assert "task_run.progress_msg.plan" in kinds and "task_run.progress_stats" in kinds
                for e in events:
                    if e["type"].startswith("task_run.progress_msg."):
                        assert set(e) == {"type", "message", "timestamp"} and RFC3339.match(e["timestamp"])

    run(go())


def test_run_events_stream_of_a_failed_run_ends_with_its_error() -> None:
    app = app_with(failure_rate=1.0)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            events = sse((await c.get(f"/v1/tasks/runs/{rid}/events")).text)
            assert events[-1]["run"]["status"] == "failed" and events[-1]["output"] is None
            assert events[-1]["run"]["error"]["message"]

    run(go())


# --------------------------------------------------------------------------------------------------
# Auth, validation, processors, credit


def test_missing_key_is_401_even_when_any_key_is_accepted() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app, key=None) as c:
            assert_error(
                await c.post("/v1/tasks/runs", json=body()),
                401,
                "Unauthorized: invalid or missing credentials",
            )
            assert_error(await c.post("/v1/tasks/groups", json={}), 401)
        async with client(app, key="") as c:
            assert_error(await c.get("/v1/tasks/groups/tgrp_x"), 401)
        async with client(app, key="anything") as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202

    run(go())


def test_wrong_key_is_401_when_a_key_is_configured() -> None:
    app = app_with(api_key="secret")

    async def go() -> None:
        async with client(app, key="wrong") as c:
            assert_error(await c.post("/v1/tasks/runs", json=body()), 401)
        async with client(app, key="secret") as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
        assert app.stats()["runs_created"] == 1

    run(go())


def nested(depth: int) -> dict[str, Any]:
    """A schema whose objects nest `depth` levels deep (the root counts as 1)."""
    schema: dict[str, Any] = {"type": "object", "properties": {"leaf": {"type": "string"}}}
    for _ in range(depth - 1):
        schema = {"type": "object", "properties": {"child": schema}}
    return schema


def arrays(depth: int) -> dict[str, Any]:
    """`depth` arrays nested in one another, of strings."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def json_spec(schema: dict[str, Any]) -> dict[str, Any]:
    return {"output_schema": {"type": "json", "json_schema": schema}}


def props(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(n)}}


BAD_RUN_BODIES: dict[str, Any] = {
    "not an object": [1, 2],
    "missing input": {"processor": "base"},
    "missing processor": {"input": "x"},
    "input of a wrong type": {"input": 3, "processor": "base"},
    "empty input": {"input": "", "processor": "base"},
    "processor of a wrong type": {"input": "x", "processor": 5},
    "unknown field": {"input": "x", "processor": "base", "result_url": "x"},
    "metadata key over 16": body(metadata={"k" * 17: "v"}),
    "metadata value over 512": body(metadata={"k": "v" * 513}),
    "metadata value not scalar": body(metadata={"k": ["v"]}),
    "metadata value null": body(metadata={"k": None}),
    "metadata not a map": body(metadata="k=v"),
    "enable_events not a bool": body(enable_events="yes"),
    "source_policy over 200 domains": body(
        source_policy={"include_domains": [f"d{i}.com" for i in range(201)]}
    ),
    "source_policy bad date": body(source_policy={"after_date": "2024-02-30"}),
    "webhook without url": body(webhook={"event_types": ["task_run.status"]}),
    "mcp server without url": body(mcp_servers=[{"name": "x"}]),
    "task_spec without output_schema": body(task_spec={"input_schema": "x"}),
    "output_schema of an unknown type": body(task_spec={"output_schema": {"type": "xml"}}),
    "json output_schema without json_schema": body(task_spec={"output_schema": {"type": "json"}}),
    "root not an object": body(task_spec=json_spec({"type": "array", "items": {"type": "string"}})),
    "root without properties": body(task_spec=json_spec({"type": "object"})),
    "anyOf at the root": body(task_spec=json_spec({**props(1), "anyOf": [props(1)]})),
    "unsupported keyword": body(
        task_spec=json_spec({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}})
    ),
    "unsupported keyword deep": body(
        task_spec=json_spec(
            {
                "type": "object",
                "properties": {"a": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
            }
        )
    ),
    "standalone null type": body(
        task_spec=json_spec({"type": "object", "properties": {"n": {"type": "null"}}})
    ),
    "nesting deeper than 5": body(task_spec=json_spec(nested(6))),
    "arrays nested deeper than 5": body(
        task_spec=json_spec({"type": "object", "properties": {"a": arrays(5)}})
    ),
    "more than 100 properties": body(task_spec=json_spec(props(101))),
    "a large enum of long values": body(
        task_spec=json_spec(
            {"type": "object", "properties": {"e": {"enum": [f"{i:030d}" for i in range(251)]}}}
        )
    ),
    "more than 500 enum values": body(
        task_spec=json_spec({"type": "object", "properties": {"e": {"enum": [str(i) for i in range(501)]}}})
    ),
    "unresolvable ref": body(
        task_spec=json_spec({"type": "object", "properties": {"a": {"$ref": "#/$defs/X"}}})
    ),
    "recursive ref": body(
        task_spec=json_spec(
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/N"}},
                "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
            }
        )
    ),
    "spec over 15000 chars": body(
        task_spec=json_spec(
            {"type": "object", "properties": {"a": {"type": "string", "description": "x" * 15_000}}}
        )
    ),
    "spec and input over 25000 chars": {
        "input": "x" * 20_000,
        "processor": "base",
        "task_spec": json_spec(
            {"type": "object", "properties": {"a": {"type": "string", "description": "x" * 6_000}}}
        ),
    },
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_BODIES))
def test_create_run_refuses_invalid_bodies_with_422(case: str) -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            r = await c.post("/v1/tasks/runs", json=BAD_RUN_BODIES[case])
            error = assert_error(r, 422, "Unprocessable content: request validation error")
            assert error["detail"]["errors"]
        assert app.stats()["runs_created"] == 0

    run(go())


PREVIOUS = "<the interaction id of a run created first>"
BETAS = {"parallel-beta": "mcp-server-2025-07-17,webhook-2025-08-12"}
GOOD_RUN_BODIES: dict[str, Any] = {
    "metadata at the limits": body(metadata={"k" * 16: "v" * 512, "n": 1.5, "b": False}),
    "nesting of exactly 5": body(task_spec=json_spec(nested(5))),
    "arrays nested exactly 5 deep": body(
        task_spec=json_spec({"type": "object", "properties": {"a": arrays(4)}})
    ),
    "exactly 100 properties": body(task_spec=json_spec(props(100))),
    "exactly 500 enum values": body(
        task_spec=json_spec({"type": "object", "properties": {"e": {"enum": [str(i) for i in range(500)]}}})
    ),
    "nullable fields, $defs and arrays of objects": body(
        task_spec=json_spec(
            {
                "type": "object",
                "properties": {
                    "a": {"type": ["string", "null"]},
                    "b": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
                    "people": {"type": "array", "items": {"$ref": "#/$defs/Person"}},
                },
                "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}},
            }
        )
    ),
    "a property named like a keyword": body(
        task_spec=json_spec({"type": "object", "properties": {"format": {"type": "string"}}})
    ),
    "text and input schemas": body(task_spec={"output_schema": "Summary", "input_schema": {"type": "text"}}),
    "auto output schema": body(task_spec={"output_schema": {"type": "auto"}}),
    "every optional field": body(
        source_policy={"include_domains": ["a.com"], "exclude_domains": [".gov"], "after_date": "2024-01-01"},
        advanced_settings={"location": "US", "data_sources": {"free": ["x"], "pay_per_use": []}},
        enable_events=False,
        mcp_servers=[{"name": "m", "url": "https://m.example.com", "type": "url", "headers": {"a": "b"}}],
        webhook={"url": "https://hook.example.com", "event_types": ["task_run.status"]},
        previous_interaction_id=PREVIOUS,
        memory_scope_key="scope",
        metadata=None,
        task_spec=None,
    ),
}


@pytest.mark.parametrize("case", sorted(GOOD_RUN_BODIES))
def test_create_run_accepts_valid_bodies_at_the_limits(case: str) -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            request = dict(GOOD_RUN_BODIES[case])
            if request.get("previous_interaction_id") == PREVIOUS:
                first = (await c.post("/v1/tasks/runs", json=body())).json()
                request["previous_interaction_id"] = first["interaction_id"]
            r = await c.post("/v1/tasks/runs", json=request, headers=BETAS)
            assert r.status_code == 202, r.text
            output = (await wait_done(c, r.json()["run_id"]))["output"]
            assert output == expected_output(request)

    run(go())


def test_bad_json_wrong_content_type_and_empty_body_are_422() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            headers = {"content-type": "application/json"}
            assert_error(await c.post("/v1/tasks/runs", content=b"{nope", headers=headers), 422)
            assert_error(await c.post("/v1/tasks/runs", content=b"", headers=headers), 422)
            form = {"content-type": "application/x-www-form-urlencoded"}
            assert_error(await c.post("/v1/tasks/runs", content=b"input=x", headers=form), 422)
            assert_fastapi_422(await c.post("/v1/tasks/groups", content=b"[", headers=headers))

    run(go())


def test_spec_warnings_for_missing_required_and_open_objects() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            loose = json_spec(
                {"type": "object", "properties": {"a": {"type": "string"}, "sources": {"type": "string"}}}
            )
            run_ = (await c.post("/v1/tasks/runs", json=body(task_spec=loose))).json()
            kinds = [w["type"] for w in run_["warnings"]]
            assert kinds == ["spec_validation_warning"] * 3
            assert all(set(w) == {"type", "message", "detail"} for w in run_["warnings"])
            many = json_spec({**props(3), "required": ["f0", "f1", "f2"], "additionalProperties": False})
            run_ = (await c.post("/v1/tasks/runs", json=body("lite", task_spec=many))).json()
            assert [w["type"] for w in run_["warnings"]] == ["warning"]  # lite handles ~2 fields

    run(go())


def test_unknown_processor_is_403() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            assert_error(
                await c.post("/v1/tasks/runs", json=body("turbo")),
                403,
                "Forbidden: invalid processor in request",
            )
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [body(), body("nope")]
            assert_error(await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs}), 403)
        assert app.stats()["runs_created"] == 0

    run(go())


def test_credit_runs_out_with_402_and_nothing_is_created() -> None:
    app = app_with(credit=0.025)  # base costs $0.01 a run

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            assert (
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            ).status_code == 200
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body(), body()]})
            assert_error(r, 402, "Payment required: insufficient credit in account")
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            assert_error(await c.post("/v1/tasks/runs", json=body()), 402)
            assert (await c.post("/v1/tasks/runs", json=body("lite"))).status_code == 202  # $0.005 fits
        stats = app.stats()
        assert stats["runs_created"] == 3
        assert stats["credit_spent"] == pytest.approx(0.025) and stats["credit_remaining"] == pytest.approx(0)

    run(go())


# --------------------------------------------------------------------------------------------------
# Rate limits


def test_rate_limit_429_with_retry_after_in_a_sliding_window() -> None:
    app = app_with(rate_limit=3, rate_window=0.5)

    async def go() -> None:
        async with client(app) as c:
            for _ in range(3):
                assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            r = await c.post("/v1/tasks/runs", json=body())
            assert_error(r, 429, "Too many requests: quota temporarily exceeded")
            retry_after = float(r.headers["retry-after"])
            assert 0 < retry_after <= 0.5
            assert (await c.get("/v1/tasks/runs/trun_x")).status_code == 429  # GETs count by default
            await asyncio.sleep(retry_after + 0.01)
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
        stats = app.stats()
        assert stats["runs_created"] == 4 and stats["rate_limited"] == 2
        assert stats["responses"]["429"] == 2

    run(go())


def test_rate_limit_is_per_key_and_gets_can_be_exempt() -> None:
    app = app_with(rate_limit=1, rate_window=60, count_gets=False, retry_after_header=False)

    async def go() -> None:
        async with client(app, key="a") as a, client(app, key="b") as b:
            assert (await a.post("/v1/tasks/runs", json=body())).status_code == 202
            r = await a.post("/v1/tasks/runs", json=body())
            assert r.status_code == 429 and "retry-after" not in r.headers
            assert (await b.post("/v1/tasks/runs", json=body())).status_code == 202
            for _ in range(5):
                assert (await a.get("/v1/tasks/runs/trun_x")).status_code == 404

    run(go())


def test_run_rate_limit_counts_each_input_and_a_429_does_nothing() -> None:
    app = app_with(run_rate_limit=5, rate_limit=100, rate_window=60)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            assert (
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            ).status_code == 200
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            assert_error(r, 429)
            assert 59 < float(r.headers["retry-after"]) <= 60
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            assert_error(await c.post("/v1/tasks/runs", json=body()), 429)
            assert (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]["num_task_runs"] == 3
        stats = app.stats()
        assert stats["runs_created"] == 5
        # The two run-limited POSTs were not counted against the request window either.
        assert len(app._request_windows[KEY].events) == stats["requests_total"] - 2

    run(go())


# --------------------------------------------------------------------------------------------------
# Faults


def test_html_5xx_fault_does_nothing_and_answers_html() -> None:
    app = app_with(fault_rate=1.0, faults=frozenset({"html_5xx"}))

    async def go() -> None:
        async with client(app) as c:
            for _ in range(6):
                r = await c.post("/v1/tasks/runs", json=body())
                assert r.status_code in (502, 503)
                assert r.headers["content-type"] == "text/html" and r.text.startswith("<html>")
            stats = (await c.get(STATS_PATH)).json()  # never faulted
        assert stats["runs_created"] == 0 and stats["faults"]["html_5xx"] == 6

    run(go())


def test_lost_create_fault_commits_the_runs_but_loses_the_answer() -> None:
    app = app_with(fault_rate=1.0, faults=frozenset({"lost_create"}))

    async def go() -> None:
        async with client(app) as c:
            r = await c.post("/v1/tasks/runs", json=body())
            assert r.status_code == 502 and r.headers["content-type"] == "text/html"
            gr = await c.post("/v1/tasks/groups", json={})  # not a create-runs request: no fault
            gid = gr.json()["taskgroup_id"]
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body(metadata={"row": "1"})]})
            assert r.status_code == 502
            runs = sse((await c.get(f"/v1/tasks/groups/{gid}/runs")).text)
            assert [e["run"]["metadata"] for e in runs] == [{"row": "1"}]
        stats = app.stats()
        assert stats["runs_created"] == 2 and stats["faults"]["lost_create"] == 2

    run(go())


def test_drop_fault_raises_a_protocol_error_and_does_nothing() -> None:
    app = app_with(fault_rate=1.0, faults=frozenset({"drop"}))

    async def go() -> None:
        async with client(app) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/v1/tasks/runs", json=body())
        assert app.stats()["runs_created"] == 0 and app.stats()["faults"]["drop"] == 1

    run(go())


def test_slow_fault_delays_the_answer_but_carries_out_the_request() -> None:
    app = app_with(fault_rate=1.0, faults=frozenset({"slow"}), slow_seconds=0.3)

    async def go() -> None:
        async with client(app) as c:
            started = time.monotonic()
            r = await c.post("/v1/tasks/runs", json=body())
            assert r.status_code == 202 and time.monotonic() - started >= 0.3
        assert app.stats()["faults"]["slow"] == 1

    run(go())


def test_fault_rate_is_a_share_of_requests() -> None:
    app = app_with(fault_rate=0.3, faults=frozenset({"html_5xx"}), seed=11)

    async def go() -> None:
        async with client(app) as c:
            codes = [(await c.get("/v1/tasks/runs/trun_x")).status_code for _ in range(200)]
        assert 30 <= sum(code >= 500 for code in codes) <= 90

    run(go())


# --------------------------------------------------------------------------------------------------
# Groups


def test_group_create_get_and_both_prefixes_share_state() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            r = await c.post("/v1/tasks/groups", json={"metadata": {"job": "demo"}})
            assert r.status_code == 200
            group = r.json()
            assert set(group) == {"taskgroup_id", "metadata", "status", "created_at"}
            assert GROUP_ID.match(group["taskgroup_id"]) and group["metadata"] == {"job": "demo"}
            assert group["status"] == {
                "num_task_runs": 0,
                "task_run_status_counts": {},
                "is_active": False,
                "status_message": None,
                "modified_at": group["created_at"],
            }
            gid = group["taskgroup_id"]
            beta = await c.get(f"/v1beta/tasks/groups/{gid}")
            assert beta.status_code == 200 and beta.json()["taskgroup_id"] == gid
            assert (await c.post("/v1beta/tasks/groups", json={})).status_code == 200
        assert app.stats()["groups_created"] == 2

    run(go())


def test_add_runs_answers_ids_in_input_order_status_and_cursors() -> None:
    app = app_with(latency=0.05)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [{"input": f"q{i}", "processor": "lite"} for i in range(4)]
            first = (await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs})).json()
            assert set(first) == {"run_ids", "status", "run_cursor", "event_cursor"}
            assert first["run_cursor"] is None and first["event_cursor"] is None
            assert [app.state.runs[rid].body for rid in first["run_ids"]] == [
                json.dumps(i, separators=(",", ":")) for i in inputs
            ]
            assert first["status"]["num_task_runs"] == 4 and first["status"]["is_active"] is True
            assert first["status"]["task_run_status_counts"] == {"queued": 4}
            second = (
                await c.post(
                    f"/v1/tasks/groups/{gid}/runs",
                    params={"refresh_status": "false"},
                    json={"inputs": inputs[:1]},
                )
            ).json()
            assert isinstance(second["run_cursor"], str) and isinstance(second["event_cursor"], str)
            assert second["status"]["num_task_runs"] == 4  # a cached status, from before this add
            for rid in first["run_ids"] + second["run_ids"]:
                await wait_done(c, rid)
            status = (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]
            assert status["num_task_runs"] == 5 and status["is_active"] is False
            assert status["task_run_status_counts"] == {"completed": 5}
            one = await c.get(f"/v1/tasks/groups/{gid}/runs/{first['run_ids'][2]}")
            assert one.status_code == 200 and one.json()["taskgroup_id"] == gid

    run(go())


def test_add_runs_accepts_1000_inputs_and_refuses_1001_or_none() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [{"input": {"n": i}, "processor": "lite"} for i in range(1001)]
            assert_fastapi_422(
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs}), ["body", "inputs"]
            )
            assert_fastapi_422(
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": []}), ["body", "inputs"]
            )
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs[:1000]})
            assert r.status_code == 200 and len(set(r.json()["run_ids"])) == 1000
        assert app.stats()["runs_created"] == 1000

    run(go())


def test_group_validation_errors_use_the_fastapi_shape() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            assert_fastapi_422(
                await c.post("/v1/tasks/groups", json={"metadata": {"k": {"x": 1}}}),
                ["body", "metadata", "k"],
            )
            assert_fastapi_422(await c.post("/v1/tasks/groups", json={"name": "x"}), ["body", "name"])
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            url = f"/v1/tasks/groups/{gid}/runs"
            inputs = [body(), body(), {"input": "x"}]
            assert_fastapi_422(await c.post(url, json={"inputs": inputs}), ["body", "inputs", 2, "processor"])
            bad_spec = {"inputs": [body()], "default_task_spec": json_spec({"type": "object"})}
            assert_fastapi_422(
                await c.post(url, json=bad_spec),
                ["body", "default_task_spec", "output_schema", "json_schema", "properties"],
            )
            assert_fastapi_422(await c.post(url, json={}), ["body", "inputs"])
            assert_fastapi_422(
                await c.post(url, params={"refresh_status": "yes"}, json={"inputs": [body()]}),
                ["query", "refresh_status"],
            )
            assert_fastapi_422(await c.get(url, params={"status": "done"}), ["query", "status"])
            for cursor in (
                "12",
                "r0000000001-00000000",
                "r0000000099-" + gid[5:13],
                "e0000000000-" + gid[5:13],
            ):
                assert_fastapi_422(
                    await c.get(url, params={"last_event_id": cursor}), ["query", "last_event_id"]
                )
            assert_fastapi_422(
                await c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": "0"}), ["query", "timeout"]
            )
        assert app.stats()["runs_created"] == 0

    run(go())


def test_default_task_spec_applies_to_inputs_without_one() -> None:
    app = app_with()
    text_spec = {"output_schema": "A summary"}

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [body(), body(task_spec=text_spec)]
            r = await c.post(
                f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs, "default_task_spec": SPEC}
            )
            ids = r.json()["run_ids"]
            outputs = [(await wait_done(c, rid))["output"] for rid in ids]
            assert outputs[0] == expected_output(inputs[0], default_task_spec=SPEC)
            assert outputs[0]["type"] == "json" and outputs[1]["type"] == "text"
            assert (await c.get(f"/v1/tasks/runs/{ids[0]}/input")).json()["task_spec"] == SPEC

    run(go())


def test_unknown_group_is_404_on_every_group_endpoint() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            g = "/v1/tasks/groups/tgrp_" + "0" * 32
            for r in (
                await c.get(g),
                await c.post(g + "/runs", json={"inputs": [body()]}),
                await c.get(g + "/runs"),
                await c.get(g + "/events"),
                await c.get(g + f"/runs/{rid}"),
            ):
                assert_error(r, 404, "TaskGroup not found")
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            assert_error(await c.get(f"/v1/tasks/groups/{gid}/runs/{rid}"), 404)  # not in this group

    run(go())


def test_runs_stream_is_a_snapshot_in_creation_order_with_filter_and_resume() -> None:
    app = app_with(latency=0.05, failure_rate=0.5, seed=5)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            url = f"/v1/tasks/groups/{gid}/runs"
            first = [{"input": {"n": i}, "processor": "lite", "metadata": {"n": i}} for i in range(6)]
            a = (await c.post(url, json={"inputs": first, "default_task_spec": SPEC})).json()
            b = (await c.post(url, json={"inputs": first[:2], "default_task_spec": SPEC})).json()
            for rid in a["run_ids"] + b["run_ids"]:
                await wait_done(c, rid)
            events = sse((await c.get(url)).text)
            assert [e["run"]["run_id"] for e in events] == a["run_ids"] + b["run_ids"]
            assert all(e["input"] is None and e["output"] is None for e in events)
            ids = [e["event_id"] for e in events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            full = sse((await c.get(url, params={"include_input": "true", "include_output": "true"})).text)
            for e in full:
                assert e["input"]["input"] == {"n": e["run"]["metadata"]["n"]}
                if e["run"]["status"] == "completed":
                    assert e["output"] == expected_output(e["input"])
                else:
                    assert e["output"] is None and e["run"]["status"] == "failed"
            failed = sse((await c.get(url, params={"status": "failed"})).text)
            assert failed and {e["run"]["status"] for e in failed} == {"failed"}
            assert len(failed) == sum(e["run"]["status"] == "failed" for e in events)
            assert sse((await c.get(url, params={"status": "cancelled"})).text) == []
            resumed = sse((await c.get(url, params={"last_event_id": b["run_cursor"]})).text)
            assert [e["run"]["run_id"] for e in resumed] == b["run_ids"]
            resumed = sse((await c.get(url, params={"last_event_id": ids[2]})).text)
            assert [e["event_id"] for e in resumed] == ids[3:]

    run(go())


def test_runs_stream_does_not_wait_for_active_runs() -> None:
    app = app_with(latency=60)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            events = sse(
                (await c.get(f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true"})).text
            )
            assert [e["run"]["status"] for e in events] == ["queued"] * 3
            assert all(e["output"] is None for e in events)

    run(go())


def test_runs_stream_sends_a_large_snapshot_in_many_chunks() -> None:
    app = app_with(latency=60)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [{"input": {"n": i}, "processor": "lite"} for i in range(1000)]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs})
        messages: list[dict[str, Any]] = []
        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/v1/tasks/groups/{gid}/runs",
            "query_string": b"include_input=true",
            "headers": [(b"x-api-key", KEY.encode())],
        }
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        await app(scope, receive, send)
        chunks = [m["body"] for m in messages if m["type"] == "http.response.body" and m["body"]]
        assert len(chunks) >= 4
        assert len(sse(b"".join(chunks).decode())) == 1000

    run(go())


def test_group_events_stream_reports_each_run_and_closes_when_the_group_is_done() -> None:
    app = app_with(latency=0.05, failure_rate=0.3, seed=2)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            assert sse((await c.get(f"/v1/tasks/groups/{gid}/events")).text) == []  # empty, inactive
            add = (await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 5})).json()
            started = time.monotonic()
            events = sse((await c.get(f"/v1/tasks/groups/{gid}/events")).text)
            assert time.monotonic() - started < 1.0
            kinds = [e["type"] for e in events]
            assert kinds == ["task_group_status"] + ["task_run.state"] * 5 + ["task_group_status"]
            assert events[0]["status"]["is_active"] is True
            assert events[-1]["status"]["is_active"] is False and events[-1]["status"]["num_task_runs"] == 5
            runs = events[1:-1]
            assert sorted(e["run"]["run_id"] for e in runs) == sorted(add["run_ids"])
            assert all(e["run"]["is_active"] is False and e["output"] is None for e in runs)
            ends = [e["run"]["modified_at"] for e in runs]
            assert ends == sorted(ends)  # in the order the runs finished
            ids = [e["event_id"] for e in events]
            assert ids == sorted(ids)
            resumed = sse(
                (await c.get(f"/v1/tasks/groups/{gid}/events", params={"last_event_id": ids[3]})).text
            )
            assert resumed == events[4:]
            more = (await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})).json()
            tail = sse(
                (
                    await c.get(
                        f"/v1/tasks/groups/{gid}/events", params={"last_event_id": more["event_cursor"]}
                    )
                ).text
            )
            assert [e["type"] for e in tail] == ["task_group_status", "task_run.state", "task_group_status"]
            assert tail[1]["run"]["run_id"] == more["run_ids"][0]

    run(go())


def test_group_events_stream_stays_open_until_its_timeout_while_runs_are_active() -> None:
    app = app_with(latency=60, keepalive_seconds=0.1)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            started = time.monotonic()
            r = await c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": 0.35})
            assert 0.3 < time.monotonic() - started < 1.0
            assert ": keepalive\n\n" in r.text
            assert [e["type"] for e in sse(r.text)] == ["task_group_status"]

    run(go())


def test_group_events_stream_wakes_when_runs_are_added() -> None:
    app = app_with(latency=0.3)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            stream = asyncio.ensure_future(c.get(f"/v1/tasks/groups/{gid}/events"))
            await asyncio.sleep(0.03)
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            events = sse((await stream).text)
            assert [e["type"] for e in events].count("task_run.state") == 2

    run(go())


# --------------------------------------------------------------------------------------------------
# Routing, stats, determinism


def test_unknown_route_is_404_and_wrong_method_405() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            r = await c.get("/v1/tasks/nothing")
            assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
            r = await c.delete("/v1/tasks/runs")
            assert r.status_code == 405 and r.headers["allow"] == "POST"
            assert (await c.get("/v1/tasks/runs/")).status_code == 404

    run(go())


def test_sdk_headers_are_ignored() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            headers = {
                "X-Stainless-Lang": "python",
                "x-stainless-retry-count": "0",
                "parallel-beta": "events-sse-2025-07-24,field-basis-2025-11-25",
                "User-Agent": "Parallel/Python 1.3.7",
                "Accept": "application/json",
            }
            assert (await c.post("/v1/tasks/runs", json=body(), headers=headers)).status_code == 202

    run(go())


def test_stats_count_requests_duplicates_and_statuses() -> None:
    app = app_with(latency=0.05)

    async def go() -> None:
        async with client(app) as c:
            a = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            await c.post("/v1/tasks/runs", json=body())  # the same input again: a duplicate
            await c.post("/v1/tasks/runs", json=body("core"))  # another processor: distinct
            await c.post("/v1/tasks/runs", json=body(metadata={"x": 1}))  # metadata does not matter
            await wait_done(c, a)
            await asyncio.sleep(0.1)
            over_http = (await c.get(STATS_PATH, headers={"x-api-key": ""})).json()
        stats = app.stats()
        assert over_http["runs_created"] == stats["runs_created"] == 4
        assert (
            stats["distinct_runs"] == 2
            and stats["duplicate_runs"] == 2
            and stats["max_runs_per_distinct"] == 3
        )
        assert stats["requests"] == {"POST /v1/tasks/runs": 4, "GET /v1/tasks/runs/{run_id}/result": 1}
        assert stats["runs_by_status"] == {
            "queued": 0,
            "action_required": 0,
            "running": 0,
            "completed": 4,
            "failed": 0,
            "cancelling": 0,
            "cancelled": 0,
        }
        assert stats["groups_created"] == 0 and stats["rate_limited"] == 0

    run(go())


def test_same_seed_same_ids_and_outputs_do_not_depend_on_the_seed() -> None:
    async def create(app: EmulatorApp) -> tuple[str, dict[str, Any]]:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body(task_spec=SPEC))).json()["run_id"]
            return rid, (await wait_done(c, rid))["output"]

    a, b, other = app_with(seed=1), app_with(seed=1), app_with(seed=2)
    (ida, outa), (idb, outb), (idc, outc) = run(create(a)), run(create(b)), run(create(other))
    assert ida == idb != idc
    assert outa == outb == outc
    assert a.state.runs[ida].end - a.state.runs[ida].created == pytest.approx(
        b.state.runs[idb].end - b.state.runs[idb].created
    )


def test_synth_output_conforms_to_the_schema_and_echoes_the_input() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "website": {"type": "string"},
            "founded": {"type": "integer", "description": "Year the company was founded"},
            "margin_pct": {"type": "number"},
            "public": {"type": "boolean"},
            "tier": {"enum": ["a", "b", "c"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "execs": {
                "type": "array",
                "items": {"type": "object", "properties": {"role": {"type": "string"}}},
            },
            "hq": {"type": "object", "properties": {"city": {"type": ["string", "null"]}}},
        },
    }
    content, basis = synth_output({"company": "Globex"}, schema)
    assert synth_output({"company": "Globex"}, schema) == (content, basis)
    assert content["name"] == "Globex" and content["website"].startswith("https://globex.")
    assert 1950 <= content["founded"] <= 2024 and isinstance(content["margin_pct"], float)
    assert isinstance(content["public"], bool) and content["tier"] in ("a", "b", "c")
    assert all(isinstance(t, str) and "Globex" in t for t in content["tags"])
    assert all(set(e) == {"role"} for e in content["execs"]) and set(content["hq"]) == {"city"}
    # One entry per field, and after an array field's one per element (SDK 1.3.7's shape).
    fields = []
    for name in schema["properties"]:
        value = content[name]
        fields += [name, *(f"{name}.{i}" for i in range(len(value)))] if isinstance(value, list) else [name]
    assert [b["field"] for b in basis] == fields and "tags.0" in fields and "execs.0" in fields
    assert all(set(b) == {"field", "reasoning", "citations", "confidence"} for b in basis)
    assert all(set(c) == {"url", "title", "excerpts"} for b in basis for c in b["citations"])
    assert synth_output({"company": "Initech"}, schema)[0] != content


# --------------------------------------------------------------------------------------------------
# Over real HTTP


@pytest.fixture(scope="module")
def emu() -> Any:
    with Emulator(latency=0.05) as emulator:
        yield emulator


def test_emulator_serves_on_localhost_with_a_demo_key(emu: Emulator) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", emu.url) and emu.api_key == DEMO_API_KEY
    with httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as c:
        rid = c.post("/v1/tasks/runs", json=body()).json()["run_id"]
        assert c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 5}).status_code == 200
        assert c.get(STATS_PATH).json()["runs_created"] >= 1
    assert emu.stats()["runs_created"] >= 1


def test_emulator_streams_events_as_they_happen(emu: Emulator) -> None:
    with httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as c:
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
        with c.stream("GET", f"/v1/tasks/groups/{gid}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        assert [e["type"] for e in sse(text)].count("task_run.state") == 3


def test_emulator_drop_fault_is_a_protocol_error_over_http() -> None:
    with (
        Emulator(fault_rate=1.0, faults=frozenset({"drop"})) as emu,
        httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as c,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            c.post("/v1/tasks/runs", json=body())
        assert emu.stats()["runs_created"] == 0


def test_emulator_slow_fault_fires_a_client_read_timeout_yet_creates_the_run() -> None:
    with (
        Emulator(fault_rate=1.0, faults=frozenset({"slow"}), slow_seconds=1.0) as emu,
        httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}, timeout=0.2) as c,
    ):
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/tasks/runs", json=body())
        assert emu.stats()["runs_created"] == 1


def test_emulator_exit_ends_open_streams_promptly() -> None:
    emulator = Emulator(latency=600).start()
    try:
        with httpx.Client(base_url=emulator.url, headers={"x-api-key": emulator.api_key}) as c:
            gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
            c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            with c.stream("GET", f"/v1/tasks/groups/{gid}/events") as r:
                lines = r.iter_lines()
                assert next(lines) == "event: task_group_status"
                started = time.monotonic()
                emulator.close()
                assert time.monotonic() - started < 2.0
                rest = list(lines)
            assert all(not line.startswith("event: task_run") for line in rest)
    finally:
        emulator.close()


def test_emulator_accepts_a_config_and_keyword_overrides() -> None:
    base = EmulatorConfig(api_key="k1", latency=1.0)
    emulator = Emulator(base, latency=0.01)
    assert emulator.config.latency == 0.01 and emulator.api_key == "k1"
    with pytest.raises(ValueError, match="unknown fault kinds"):
        EmulatorConfig(faults=frozenset({"meteor"}))
    with pytest.raises(ValueError):
        EmulatorConfig(failure_rate=1.5)


def test_an_unstarted_emulators_app_serves_through_asgi_transport() -> None:
    emulator = Emulator(latency=0.01)

    async def go() -> int:
        async with client(emulator.app, key=emulator.api_key) as c:
            return (await c.post("/v1/tasks/groups", json={})).status_code

    assert run(go()) == 200 and emulator.stats()["groups_created"] == 1
