"""Our client's requests against the official SDK's (`parallel-web`), byte for byte where it matters.

The client tests pin our requests with hand-written expectations; a misspelt optional parameter
(`include_outputs`, `last_event`, `refresh`) written the same way in the test and the code would pass them
and be ignored by the service. Here each call the engine makes is sent twice onto an `httpx.MockTransport`:
once by `TaskClient`, once by `parallel.AsyncParallel` with the arguments that mean the same, and the two
requests must agree on method, path, query and JSON body.

Normalised, because they legitimately differ: headers (the SDK adds `X-Stainless-*`, its user agent and
retry counters; only `x-api-key`, `accept` and `content-type` are compared), key order in the body and
query, and fields whose value is None (the SDK leaves out what it was not given; we leave out None).

Where the two cannot be asked the same thing, the case says so:
- `stream_group_runs` always sends `include_input` and `include_output` (false unless asked), where the SDK
  sends only what it is given; the SDK side passes the defaults explicitly. The service's defaults are
  false too (task-api.md), so both mean the same.
- `add_runs` always sends `refresh_status` (false unless asked); the service's default is true, so the SDK
  side must pass `refresh_status=False` to mean the same.
- The SDK can send `parallel-beta` headers (`betas=`); we never do.

`test_every_request_of_a_job_is_one_the_sdk_sends_alike` closes the loop: it records what the engine
really sends in a job of each mode (a lost create included, so the reconciling read is there too) and
replays each request through the SDK, passing its query and body fields as the SDK's keyword arguments by
name, so a field the SDK does not know fails the test.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import parallel
import polars as pl
import pytest
from parallel.types.run_input_param import RunInputParam
from parallel.types.task_spec_param import TaskSpecParam

from enrich import create_app
from enrich._client import TaskClient
from enrich._emulator import EmulatorConfig
from enrich._engine import aenrich
from enrich._engine.prepare import _prepare
from enrich._models import RunStateEvent

KEY = "sk-wire-test-0123456789"
BASE = "http://api.test"
GROUP = "tgrp_0123456789abcdef"
RUN_ID = "trun_0123456789abcdef0123456789abcdef"
STATUS = {
    "num_task_runs": 1,
    "task_run_status_counts": {"queued": 1},
    "is_active": True,
    "status_message": None,
    "modified_at": "2025-04-23T20:21:48.037943Z",
}
RUN = {
    "run_id": RUN_ID,
    "interaction_id": RUN_ID,
    "status": "completed",
    "is_active": False,
    "processor": "lite",
    "metadata": {"enrich_key": "0" * 32},
    "taskgroup_id": GROUP,
    "created_at": "2025-04-23T20:21:48.037943Z",
    "modified_at": "2025-04-23T20:21:48.037943Z",
}
OUTPUT = {"type": "json", "content": {"ceo": "Ada"}, "basis": []}


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events
    )


def _answer(request: httpx.Request) -> httpx.Response:
    """A minimal valid answer to each endpoint the engine uses."""
    method, path = request.method, request.url.path
    if method == "GET" and re.fullmatch(r"/v1/tasks/groups/[^/]+/runs", path):
        event = {"type": "task_run.state", "event_id": "c1", "run": RUN, "input": None, "output": None}
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(event))
    if method == "GET" and re.fullmatch(r"/v1/tasks/groups/[^/]+/events", path):
        event = {"type": "task_group_status", "event_id": "e1", "status": {**STATUS, "is_active": False}}
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(event))
    if method == "POST" and path == "/v1/tasks/groups":
        group = {"taskgroup_id": GROUP, "status": STATUS, "created_at": RUN["created_at"], "metadata": None}
        return httpx.Response(200, json=group)
    if method == "POST" and re.fullmatch(r"/v1/tasks/groups/[^/]+/runs", path):
        n = len(json.loads(request.content)["inputs"])
        body = {"run_ids": [f"{RUN_ID[:-2]}{i:02x}" for i in range(n)], "status": STATUS}
        return httpx.Response(200, json={**body, "run_cursor": None, "event_cursor": None})
    if method == "GET" and path.endswith("/result"):
        return httpx.Response(200, json={"run": RUN, "output": OUTPUT})
    if method == "GET" and path.startswith("/v1/tasks/runs/"):
        return httpx.Response(200, json=RUN)
    if method == "POST" and path == "/v1/tasks/runs":
        return httpx.Response(202, json={**RUN, "status": "queued", "is_active": True})
    return httpx.Response(404, json={"type": "error", "error": {"ref_id": "r", "message": f"no {path}"}})


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


@dataclass(frozen=True)
class Wire:
    """What of a request must agree: method, path, query (sorted pairs), JSON body, three headers."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: Any
    api_key: str | None
    accept: str | None
    content_type: str | None

    @classmethod
    def of(cls, request: httpx.Request) -> Wire:
        body = _drop_none(json.loads(request.content)) if request.content else None
        # The SDK sends content-type: application/json on every request (task-api.md), a GET's too; a
        # request without a body has no content type to agree on.
        content_type = request.headers.get("content-type") if body is not None else None
        return cls(
            method=request.method,
            path=request.url.path,
            query=tuple(sorted(request.url.params.multi_items())),
            body=body,
            api_key=request.headers.get("x-api-key"),
            accept=request.headers.get("accept"),
            content_type=content_type,
        )


async def _record(call: Callable[[Any], Awaitable[Any]], *, sdk: bool) -> tuple[list[Wire], Any]:
    """Make one call with a fresh client of the kind asked, on a mock that records every request."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _answer(request)

    transport = httpx.MockTransport(handler)
    if sdk:
        http = httpx.AsyncClient(transport=transport)
        client: Any = parallel.AsyncParallel(api_key=KEY, base_url=BASE, http_client=http, max_retries=0)
        try:
            answer = await call(client)
        finally:
            await client.close()
    else:
        async with TaskClient(KEY, base_url=BASE, transport=transport) as client:
            answer = await call(client)
    return [Wire.of(r) for r in seen], answer


async def _drain(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def _sdk_drain(stream: Awaitable[Any]) -> list[Any]:
    return [event async for event in await stream]


def _engine_payload() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The inputs and default task spec the engine builds for two rows (metadata and input_schema set)."""
    plan = _prepare(
        pl.DataFrame({"company": ["Parallel", "Acme"], "site": ["parallel.ai", "acme.test"]}),
        {"ceo": "Name of the current CEO", "founded": ("integer?", "Year founded")},
        columns=None,
        prompt=None,
        input_schema={"type": "object", "properties": {"company": {"type": "string"}}},
        metadata={"team": "growth", "batch": 7},
        processor="lite",
        mode="group",
    )
    inputs = [
        {"input": x, "processor": plan.processor, "metadata": {**plan.metadata, "enrich_key": k}}
        for k, x in plan.inputs_of(set(plan.keys)).items()
    ]
    return inputs, plan.task_spec


INPUTS, SPEC = _engine_payload()


@dataclass(frozen=True)
class Case:
    ours: Callable[[TaskClient], Awaitable[Any]]
    sdk: Callable[[parallel.AsyncParallel], Awaitable[Any]]
    check: Callable[[Any, Any], None]  # (our answer, the SDK's answer): both read the same thing


def _same_group(ours: Any, theirs: Any) -> None:
    assert ours.group_id == theirs.taskgroup_id == GROUP


def _same_run_ids(ours: Any, theirs: Any) -> None:
    assert list(ours.run_ids) == theirs.run_ids and len(ours.run_ids) == len(INPUTS)


def _one_run_event(ours: Any, theirs: Any) -> None:
    assert len(ours) == len(theirs) == 1
    assert isinstance(ours[0], RunStateEvent) and ours[0].run.run_id == theirs[0].run.run_id == RUN_ID


def _one_group_event(ours: Any, theirs: Any) -> None:
    assert len(ours) == len(theirs) == 1
    assert ours[0].event_id == theirs[0].event_id == "e1"


def _same_run(ours: Any, theirs: Any) -> None:
    assert ours.run_id == theirs.run_id == RUN_ID


def _same_result(ours: Any, theirs: Any) -> None:
    assert ours.run.run_id == theirs.run.run_id and ours.output.content == theirs.output.content


CASES: dict[str, Case] = {
    # ensure_group()
    "create group": Case(
        lambda c: c.create_group(metadata={"enrich": "enrich"}),
        lambda s: s.task_group.create(metadata={"enrich": "enrich"}),
        _same_group,
    ),
    "create group without metadata": Case(
        lambda c: c.create_group(), lambda s: s.task_group.create(), _same_group
    ),
    # add_batch() and create_one(): refresh_status is false unless asked (the service's default is true)
    "add runs": Case(
        lambda c: c.add_runs(GROUP, INPUTS, default_task_spec=SPEC),
        lambda s: s.task_group.add_runs(GROUP, inputs=INPUTS, default_task_spec=SPEC, refresh_status=False),
        _same_run_ids,
    ),
    "add runs refreshing the status": Case(
        lambda c: c.add_runs(GROUP, INPUTS[:1], refresh_status=True),
        lambda s: s.task_group.add_runs(GROUP, inputs=INPUTS[:1], refresh_status=True),
        lambda ours, theirs: None,
    ),
    # reconcile(): the whole group, no outputs
    "group runs stream from the start": Case(
        lambda c: _drain(c.stream_group_runs(GROUP)),
        lambda s: _sdk_drain(s.task_group.get_runs(GROUP, include_input=False, include_output=False)),
        _one_run_event,
    ),
    # _GroupCollector.poll(): from the cursor, with outputs
    "group runs stream from a cursor with outputs": Case(
        lambda c: _drain(c.stream_group_runs(GROUP, last_event_id="c0", include_output=True)),
        lambda s: _sdk_drain(
            s.task_group.get_runs(GROUP, last_event_id="c0", include_input=False, include_output=True)
        ),
        _one_run_event,
    ),
    "group runs stream of one status with inputs": Case(
        lambda c: _drain(c.stream_group_runs(GROUP, status="failed", include_input=True)),
        lambda s: _sdk_drain(
            s.task_group.get_runs(GROUP, status="failed", include_input=True, include_output=False)
        ),
        _one_run_event,
    ),
    # _GroupCollector.follow_events()
    "group events stream from the start": Case(
        lambda c: _drain(c.stream_group_events(GROUP)),
        lambda s: _sdk_drain(s.task_group.events(GROUP)),
        _one_group_event,
    ),
    "group events stream from a cursor with a timeout": Case(
        lambda c: _drain(c.stream_group_events(GROUP, last_event_id="e0", timeout=30)),
        lambda s: _sdk_drain(s.task_group.events(GROUP, last_event_id="e0", api_timeout=30)),
        _one_group_event,
    ),
    # wait_for_result(): a failed run's error is read with get_run
    "get run": Case(lambda c: c.get_run(RUN_ID), lambda s: s.task_run.retrieve(RUN_ID), _same_run),
    "get result": Case(
        lambda c: c.get_result(RUN_ID, timeout=600),
        lambda s: s.task_run.result(RUN_ID, api_timeout=600),
        _same_result,
    ),
    "create run": Case(
        lambda c: c.create_run(
            INPUTS[0]["input"],
            "lite",
            task_spec=SPEC,
            metadata=INPUTS[0]["metadata"],
            source_policy={"include_domains": ["parallel.ai"]},
        ),
        lambda s: s.task_run.create(
            input=INPUTS[0]["input"],
            processor="lite",
            task_spec=SPEC,  # type: ignore[arg-type]
            metadata=INPUTS[0]["metadata"],
            source_policy={"include_domains": ["parallel.ai"]},
        ),
        _same_run,
    ),
    "create run with a text input": Case(
        lambda c: c.create_run("Who is the CEO of Parallel?", "base"),
        lambda s: s.task_run.create(input="Who is the CEO of Parallel?", processor="base"),
        _same_run,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_our_request_is_the_sdks(name: str) -> None:
    case = CASES[name]

    async def both() -> tuple[tuple[list[Wire], Any], tuple[list[Wire], Any]]:
        return await _record(case.ours, sdk=False), await _record(case.sdk, sdk=True)

    (ours, our_answer), (theirs, their_answer) = asyncio.run(both())
    assert len(ours) == len(theirs) == 1, (ours, theirs)
    assert ours[0] == theirs[0]
    assert ours[0].api_key == KEY
    case.check(our_answer, their_answer)


def test_the_engines_payload_uses_only_fields_the_sdk_knows() -> None:
    """The inputs and task spec are dicts the SDK passes through as they are: check their keys by name."""
    run_input_fields = RunInputParam.__required_keys__ | RunInputParam.__optional_keys__
    spec_fields = TaskSpecParam.__required_keys__ | TaskSpecParam.__optional_keys__
    for item in INPUTS:
        assert set(item) <= run_input_fields, set(item) - run_input_fields
    assert set(SPEC) <= spec_fields and "output_schema" in SPEC, SPEC
    for schema in (SPEC["output_schema"], SPEC["input_schema"]):
        assert schema["type"] in ("json", "text") and ("json_schema" in schema) == (schema["type"] == "json")


# -- what a real job sends, replayed through the SDK -----------------------------------------------------

_ALIASES = {"timeout": "api_timeout"}  # query names the SDK spells differently as keyword arguments


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    if value.isdigit():
        return int(value)
    return value


def _replay(request: httpx.Request) -> Callable[[parallel.AsyncParallel], Awaitable[Any]]:
    """The SDK call that should send `request`, its query and body fields passed by name."""
    method, path = request.method, request.url.path
    kwargs = {_ALIASES.get(k, k): _typed(v) for k, v in request.url.params.multi_items()}
    body = json.loads(request.content) if request.content else {}
    if method == "POST" and path == "/v1/tasks/groups":
        return lambda s: s.task_group.create(**body, **kwargs)
    if match := re.fullmatch(r"/v1/tasks/groups/([^/]+)/runs", path):
        group = match[1]
        if method == "POST":
            return lambda s: s.task_group.add_runs(group, **body, **kwargs)
        return lambda s: _sdk_drain(s.task_group.get_runs(group, **kwargs))
    if match := re.fullmatch(r"/v1/tasks/groups/([^/]+)/events", path):
        group = match[1]
        return lambda s: _sdk_drain(s.task_group.events(group, **kwargs))
    if match := re.fullmatch(r"/v1/tasks/runs/([^/]+)/result", path):
        run = match[1]
        return lambda s: s.task_run.result(run, **kwargs)
    if match := re.fullmatch(r"/v1/tasks/runs/([^/]+)", path):
        run = match[1]
        return lambda s: s.task_run.retrieve(run, **kwargs)
    if method == "POST" and path == "/v1/tasks/runs":
        return lambda s: s.task_run.create(**body, **kwargs)
    raise AssertionError(f"the engine sent a request the SDK has no call for: {method} {path}")


class _Recording(httpx.AsyncBaseTransport):
    """The emulator in-process; records each request. The first add-runs answer is lost (a 502 after
    the runs were created), so the job reads the group to find them."""

    def __init__(self) -> None:
        self.inner = httpx.ASGITransport(app=create_app(EmulatorConfig(latency=0.05, seed=3)))
        self.requests: list[httpx.Request] = []
        self.lost = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/runs") and not self.lost:
            self.lost = True
            await response.aread()
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        return response


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_every_request_of_a_job_is_one_the_sdk_sends_alike(mode: str) -> None:
    transport = _Recording()
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(3)]})
    out = asyncio.run(
        aenrich(
            df,
            {"ceo": "Name of the current CEO"},
            processor="lite",
            mode=mode,
            metadata={"team": "growth"},
            api_key=KEY,
            base_url=BASE,
            transport=transport,
            progress=False,
            timeout=20,  # a broken engine ends with rows pending, not a hung suite
        )
    )
    assert out["_status"].to_list() == ["completed"] * 3
    kinds = set()
    for request in transport.requests:
        wire = Wire.of(request)
        path = re.sub(r"/(tgrp|trun)_\w+", "/{id}", wire.path)
        kinds.add((wire.method, path, tuple((k, "*" if k == "last_event_id" else v) for k, v in wire.query)))
        theirs, _ = asyncio.run(_record(_replay(request), sdk=True))
        assert theirs == [wire]
    # The job went through the calls this test is about: the create, the add, the reconciling read of
    # the lost add (no outputs), the collector's poll (with outputs) and the events stream.
    runs = "/v1/tasks/groups/{id}/runs"
    assert ("POST", "/v1/tasks/groups", ()) in kinds
    assert ("POST", runs, (("refresh_status", "false"),)) in kinds
    assert ("GET", runs, (("include_input", "false"), ("include_output", "false"))) in kinds
    assert ("GET", runs, (("include_input", "false"), ("include_output", "true"))) in kinds
    assert ("GET", "/v1/tasks/groups/{id}/events", ()) in kinds
