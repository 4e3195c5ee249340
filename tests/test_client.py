"""The client against httpx.MockTransport: every error class, body shape, retry rule and stream case."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from enrich._client import TaskClient
from enrich._exceptions import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    OutcomeUnknownError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    StillRunningError,
    TransportError,
    UsageError,
    ValidationError,
)
from enrich._models import ErrorEvent, GroupStatusEvent, RunStateEvent, TaskRunResult, UnknownEvent
from enrich._retry import RetryPolicy, retryable, should_retry_header

KEY = "sk-test-SECRET-123456"

RUN = {
    "run_id": "trun_1",
    "interaction_id": "trun_1",
    "status": "queued",
    "is_active": True,
    "processor": "core",
    "metadata": {"k": "v"},
    "taskgroup_id": None,
    "created_at": "2025-04-23T20:21:48.037943Z",
    "modified_at": "2025-04-23T20:21:48.037943Z",
}


def error_body(message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"ref_id": "ref-1", "message": message, "detail": None}}


class FakeLimiter:
    def __init__(self) -> None:
        self.acquired: list[int] = []
        self.limited: list[float | None] = []
        self.successes = 0

    async def acquire(self, runs: int = 0) -> None:
        self.acquired.append(runs)

    def settle(self, grant: object) -> None:
        pass

    def rate_limited(self, retry_after: float | None = None, grant: object = None) -> None:
        self.limited.append(retry_after)

    def succeeded(self, grant: object = None) -> None:
        self.successes += 1

    def refund(self, grant: object) -> None:
        pass


def run(
    coro_fn: Callable[[TaskClient], Any], handler: Callable[[httpx.Request], httpx.Response], **kw: Any
) -> Any:
    async def main() -> Any:
        kw.setdefault("retry", RetryPolicy.no_wait())
        async with TaskClient(
            KEY, base_url="http://api.test", transport=httpx.MockTransport(handler), **kw
        ) as client:
            return await coro_fn(client)

    return asyncio.run(main())


# -- configuration -----------------------------------------------------------------------------


def test_key_and_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARALLEL_API_KEY", "env-key")
    monkeypatch.setenv("PARALLEL_BASE_URL", "http://env.test/")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RUN)

    async def main() -> None:
        async with TaskClient(transport=httpx.MockTransport(handler)) as client:
            assert client.base_url == "http://env.test"
            await client.get_run("trun_1")

    asyncio.run(main())
    assert seen[0].headers["x-api-key"] == "env-key"
    assert str(seen[0].url) == "http://env.test/v1/tasks/runs/trun_1"


def test_default_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARALLEL_BASE_URL", raising=False)

    async def main() -> str:
        async with TaskClient("k") as client:
            return client.base_url

    assert asyncio.run(main()) == "https://api.parallel.ai"


def test_missing_key_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    with pytest.raises(UsageError, match="PARALLEL_API_KEY"):
        TaskClient()


def test_bad_base_url() -> None:
    with pytest.raises(UsageError, match="http"):
        TaskClient("k", base_url="api.parallel.ai")


def test_repr_hides_the_key() -> None:
    async def main() -> str:
        async with TaskClient(KEY, base_url="http://api.test") as client:
            return repr(client)

    text = asyncio.run(main())
    assert KEY not in text and "hidden" in text


# -- requests and typed answers ---------------------------------------------------------------


def test_create_run_body_headers_and_202() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=RUN)

    spec = {"output_schema": {"type": "text", "description": "x"}}
    limiter = FakeLimiter()
    result = run(
        lambda c: c.create_run({"a": 1}, "core", task_spec=spec, metadata={"k": "v"}),
        handler,
        limiter=limiter,
    )
    assert result.run_id == "trun_1" and result.status == "queued" and result.is_active
    body = json.loads(seen[0].content)
    assert body == {"input": {"a": 1}, "processor": "core", "task_spec": spec, "metadata": {"k": "v"}}
    assert seen[0].method == "POST" and seen[0].url.path == "/v1/tasks/runs"
    assert seen[0].headers["x-api-key"] == KEY
    assert limiter.acquired == [1] and limiter.successes == 1


def test_add_runs_body_query_and_budget() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "run_ids": ["trun_a", "trun_b"],
                "status": {"num_task_runs": 2, "task_run_status_counts": {"queued": 2}, "is_active": True},
                "run_cursor": None,
                "event_cursor": None,
            },
        )

    limiter = FakeLimiter()
    inputs = [{"input": "a", "processor": "lite"}, {"input": "b", "processor": "lite"}]
    spec = {"output_schema": "x"}
    resp = run(lambda c: c.add_runs("tgrp_1", inputs, default_task_spec=spec), handler, limiter=limiter)
    assert resp.run_ids == ("trun_a", "trun_b") and resp.status.num_task_runs == 2
    assert seen[0].url.path == "/v1/tasks/groups/tgrp_1/runs"
    assert seen[0].url.params["refresh_status"] == "false"
    assert json.loads(seen[0].content) == {"inputs": inputs, "default_task_spec": spec}
    assert limiter.acquired == [2]


def test_add_runs_refuses_more_than_1000_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - must not be called
        raise AssertionError("sent")

    inputs = [{"input": str(i), "processor": "lite"} for i in range(1001)]
    with pytest.raises(UsageError, match="1000"):
        run(lambda c: c.add_runs("tgrp_1", inputs), handler)


def test_group_create_and_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "taskgroup_id": "tgrp_9",
                "metadata": None,
                "created_at": "2025-01-01T00:00:00Z",
                "status": {
                    "num_task_runs": 3,
                    "task_run_status_counts": {"completed": 2, "running": 1},
                    "is_active": True,
                    "status_message": None,
                    "modified_at": None,
                },
            },
        )

    group = run(lambda c: c.create_group(), handler)
    assert group.group_id == "tgrp_9"
    assert group.status.task_run_status_counts == {"completed": 2, "running": 1} and group.status.is_active


def test_result_json_output_and_basis() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["timeout"] == "30"
        return httpx.Response(
            200,
            json={
                "run": {**RUN, "status": "completed", "is_active": False},
                "output": {
                    "type": "json",
                    "content": {"ceo": "Ada"},
                    "basis": [
                        {
                            "field": "ceo",
                            "reasoning": "r",
                            "citations": [{"url": "https://x", "title": None, "excerpts": ["e"]}],
                            "confidence": "high",
                        }
                    ],
                },
            },
        )

    result = run(lambda c: c.get_result("trun_1", timeout=30), handler)
    assert result.output.content == {"ceo": "Ada"}
    assert result.output.basis[0].citations[0].excerpts == ("e",)
    assert result.output.basis[0].to_json()["confidence"] == "high"


def test_result_reads_json_encoded_content_and_text() -> None:
    r = TaskRunResult.from_json({"run": RUN, "output": {"type": "json", "content": '{"a": 1}', "basis": []}})
    assert r.output.content == {"a": 1}
    t = TaskRunResult.from_json({"run": RUN, "output": {"type": "text", "content": "hi", "basis": []}})
    assert t.output.content == "hi" and t.output.type == "text"


def test_legacy_shapes_of_the_product_page() -> None:
    completed = {
        "run_id": "b0679f70",
        "status": "completed",
        "is_active": False,
        "result": {"population": "29.5 million"},
        "result_url": "https://api.parallel.ai/v1/tasks/runs/b0679f70/result",
        "warnings": None,
        "errors": None,
        "processor": "core",
        "metadata": None,
        "created_at": "2025-04-08T04:28:59.913464",
        "modified_at": "2025-04-08T04:29:32.651298",
    }
    r = TaskRunResult.from_json(completed)
    assert r.run.status == "completed" and r.output.content == {"population": "29.5 million"}
    failed = {
        **completed,
        "status": "failed",
        "result": None,
        "errors": [{"code": "processing_error", "message": "bad input", "details": {"field": "input"}}],
    }
    from enrich._models import TaskRun

    run_ = TaskRun.from_json(failed)
    assert (
        run_.error is not None and run_.error.message == "bad input" and run_.error.code == "processing_error"
    )
    assert run_.error.detail == {"field": "input"}


def test_unknown_status_is_kept() -> None:
    from enrich._models import TaskRun

    r = TaskRun.from_json({**RUN, "status": "teleporting", "is_active": False})
    assert r.status == "teleporting" and r.is_terminal


def test_a_documented_status_decides_whether_a_run_is_active() -> None:
    from enrich._models import TaskRun

    # is_active is true exactly for queued, running, cancelling (task-api.md section 4): a cancelling run
    # is waited for even if a service called it inactive; action_required is inactive and not terminal.
    assert TaskRun.from_json({**RUN, "status": "cancelling", "is_active": False}).is_active
    stopped = TaskRun.from_json({**RUN, "status": "action_required", "is_active": True})
    assert not stopped.is_active and not stopped.is_terminal
    assert TaskRun.from_json({**RUN, "status": "cancelled"}).is_terminal


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (402, PaymentRequiredError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (418, APIStatusError),
        (422, ValidationError),
    ],
)
def test_status_errors(status: int, cls: type[APIStatusError]) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, json=error_body(f"message {status}"))

    with pytest.raises(cls) as info:
        run(lambda c: c.get_run("trun_1"), handler)
    err = info.value
    assert err.status == status and err.message == f"message {status}" and err.ref_id == "ref-1"
    assert err.request is not None and err.request.url == "http://api.test/v1/tasks/runs/trun_1"
    assert KEY not in str(err) and KEY not in repr(err) and KEY not in repr(vars(err))
    assert len(calls) == (5 if status == 409 else 1)


def test_fastapi_validation_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422,
            json={"detail": [{"loc": ["body", "inputs"], "msg": "too many inputs", "type": "value_error"}]},
        )

    with pytest.raises(ValidationError) as info:
        run(lambda c: c.get_group("tgrp_1"), handler)
    assert info.value.message == "body.inputs: too many inputs"
    assert info.value.errors[0]["type"] == "value_error"


def test_html_server_error_is_retried_then_raised() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(502, html="<html><body><h1>502 Bad Gateway</h1>nginx</body></html>")

    with pytest.raises(ServerError) as info:
        run(lambda c: c.get_run("trun_1"), handler)
    assert info.value.status == 502 and "Bad Gateway" in info.value.message and "<" not in info.value.message
    assert len(calls) == 5


def test_read_retried_until_success_with_backoff() -> None:
    answers = [
        httpx.Response(503, text="busy"),
        httpx.Response(500, json=error_body("x")),
        httpx.Response(200, json=RUN),
    ]
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)

    policy = RetryPolicy(sleep=sleep, random=lambda: 1.0, base=0.5, cap=30)
    r = run(lambda c: c.get_run("trun_1"), lambda req: answers.pop(0), retry=policy)
    assert r.run_id == "trun_1" and delays == [0.5, 1.0]


def test_transport_errors_on_reads_are_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        return httpx.Response(200, json=RUN)

    assert run(lambda c: c.get_run("trun_1"), handler).run_id == "trun_1"
    assert len(calls) == 3


def test_transport_error_gives_up() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(TransportError) as info:
        run(lambda c: c.get_run("trun_1"), handler)
    assert "ReadTimeout" in str(info.value) and info.value.status is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_rate_limit_retry_after(headers: dict[str, str], expected: float | None) -> None:
    answers = [
        httpx.Response(429, json=error_body("Too many requests"), headers=headers),
        httpx.Response(200, json=RUN),
    ]
    limiter = FakeLimiter()
    r = run(lambda c: c.get_run("trun_1"), lambda req: answers.pop(0), limiter=limiter)
    assert r.run_id == "trun_1"
    assert limiter.limited == [expected] and limiter.acquired == [0, 0]


def test_rate_limit_without_limiter_sleeps_server_wait() -> None:
    answers = [
        httpx.Response(429, json=error_body("slow"), headers={"Retry-After": "3"}),
        httpx.Response(202, json=RUN),
    ]
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)

    r = run(lambda c: c.create_run("x", "lite"), lambda req: answers.pop(0), retry=RetryPolicy(sleep=sleep))
    assert r.run_id == "trun_1" and delays == [3.0]


def test_rate_limit_gives_up_after_many() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json=error_body("Too many"))

    with pytest.raises(RateLimitError):
        run(lambda c: c.get_run("trun_1"), handler, retry=RetryPolicy.no_wait(max_rate_limited=3))


# -- creates are never retried blindly ----------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        lambda req: httpx.Response(502, html="<h1>Bad Gateway</h1>"),
        lambda req: httpx.Response(500, json=error_body("boom")),
        lambda req: (_ for _ in ()).throw(httpx.ReadTimeout("read timed out", request=req)),
        lambda req: (_ for _ in ()).throw(httpx.RemoteProtocolError("dropped", request=req)),
        lambda req: (_ for _ in ()).throw(httpx.WriteError("broken pipe", request=req)),
        lambda req: httpx.Response(202, text="{not json"),
    ],
)
def test_lost_answer_on_create_is_outcome_unknown(failure: Callable[[httpx.Request], httpx.Response]) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return failure(request)

    with pytest.raises(OutcomeUnknownError) as info:
        run(lambda c: c.create_run("x", "lite"), handler)
    assert len(calls) == 1
    assert info.value.request is not None and info.value.request.method == "POST"
    assert isinstance(info.value.cause, (TransportError, ServerError))

    calls.clear()
    with pytest.raises(OutcomeUnknownError):
        run(lambda c: c.add_runs("tgrp_1", [{"input": "x", "processor": "lite"}]), handler)
    assert len(calls) == 1


def test_create_retried_when_never_sent() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(202, json=RUN)

    assert run(lambda c: c.create_run("x", "lite"), handler).run_id == "trun_1"
    assert len(calls) == 2


def test_create_refusals_are_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(403, json=error_body("Forbidden: invalid processor in request"))

    with pytest.raises(PermissionDeniedError, match="invalid processor"):
        run(lambda c: c.create_run("x", "nope"), handler)
    assert len(calls) == 1


def test_create_group_is_retried_like_a_read() -> None:
    answers = [
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json={"taskgroup_id": "tgrp_2", "status": {}}),
    ]
    assert run(lambda c: c.create_group(), lambda req: answers.pop(0)).group_id == "tgrp_2"


# -- blocking result -------------------------------------------------------------------------------


def test_get_result_408_is_still_running_and_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(408, json=error_body("Request timed out; run still active"))

    with pytest.raises(StillRunningError):
        run(lambda c: c.get_result("trun_1", timeout=1), handler)
    assert len(calls) == 1


def test_wait_for_result_asks_again_on_408() -> None:
    answers = [
        httpx.Response(408, json=error_body("Request timed out; run still active")),
        httpx.Response(408, json=error_body("Request timed out; run still active")),
        httpx.Response(
            200,
            json={
                "run": {**RUN, "status": "completed", "is_active": False},
                "output": {"type": "text", "content": "hi"},
            },
        ),
    ]
    r, output = run(lambda c: c.wait_for_result("trun_1"), lambda req: answers.pop(0))
    assert r.status == "completed" and output is not None and output.content == "hi"


def test_wait_for_result_reads_a_failed_runs_error() -> None:
    failed = {
        **RUN,
        "status": "failed",
        "is_active": False,
        "error": {"ref_id": "r", "message": "no sources"},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/result"):
            return httpx.Response(404, json=error_body("Run failed or run id not found"))
        return httpx.Response(200, json=failed)

    r, output = run(lambda c: c.wait_for_result("trun_1"), handler)
    assert output is None and r.status == "failed" and r.error is not None and r.error.message == "no sources"


def test_wait_for_result_unknown_run() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json=error_body("Run id not found"))

    with pytest.raises(NotFoundError):
        run(lambda c: c.wait_for_result("trun_x"), handler)


# -- streams ----------------------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def state(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "task_run.state",
        "event_id": str(i),
        "run": {**RUN, "run_id": f"trun_{i}", "status": "completed", "is_active": False},
        **extra,
    }


class ChunkedStream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail = fail

    async def __aiter__(self):  # type: ignore[override]
        for chunk in self.chunks:
            yield chunk
        if self.fail is not None:
            raise self.fail


def collect(client_call: Callable[[TaskClient], Any]) -> Callable[[TaskClient], Any]:
    async def go(c: TaskClient) -> list[Any]:
        return [e async for e in client_call(c)]

    return go


def test_runs_stream_split_chunks_keepalives_and_outputs() -> None:
    body = (
        b": keepalive\n\n"
        + sse(state(1, output={"type": "json", "content": {"a": 1}, "basis": []}, input={"input": "x"}))
        + sse({"type": "error", "error": {"ref_id": "r", "message": "hiccup"}})
        + sse({"type": "brand_new_event", "event_id": "2"})
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=ChunkedStream(chunks)
        )

    events = run(
        collect(lambda c: c.stream_group_runs("tgrp_1", include_output=True, status="completed")), handler
    )
    assert isinstance(events[0], RunStateEvent) and events[0].output is not None
    assert events[0].output.content == {"a": 1} and events[0].input == {"input": "x"}
    assert isinstance(events[1], ErrorEvent) and events[1].error.message == "hiccup"
    assert isinstance(events[2], UnknownEvent) and events[2].type == "brand_new_event"
    params = seen[0].url.params
    assert params["include_output"] == "true" and params["status"] == "completed"
    assert params["include_input"] == "false" and "last_event_id" not in params
    assert seen[0].headers["accept"] == "text/event-stream"


def test_stream_cut_mid_event_resumes_from_last_event() -> None:
    first = sse(state(1), state(2)) + sse(state(3))[:25]  # cut inside event 3
    second = sse(state(3), state(4))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(
                200, stream=ChunkedStream([first], fail=httpx.RemoteProtocolError("incomplete chunked read"))
            )
        return httpx.Response(200, stream=ChunkedStream([second]))

    events = run(collect(lambda c: c.stream_group_runs("tgrp_1")), handler)
    assert [e.event_id for e in events] == ["1", "2", "3", "4"]
    assert seen[1].url.params["last_event_id"] == "2"


def test_stream_malformed_json_is_retried_then_raised() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=ChunkedStream([b"data: {oops\n\n"]))

    with pytest.raises(TransportError, match="malformed"):
        run(collect(lambda c: c.stream_group_runs("tgrp_1")), handler)


def test_stream_404_raises_and_429_waits() -> None:
    answers = [
        httpx.Response(429, json=error_body("slow down"), headers={"Retry-After": "2"}),
        httpx.Response(404, json=error_body("TaskGroup not found")),
    ]
    limiter = FakeLimiter()
    with pytest.raises(NotFoundError, match="TaskGroup not found"):
        run(collect(lambda c: c.stream_group_events("tgrp_x")), lambda req: answers.pop(0), limiter=limiter)
    assert limiter.limited == [2.0]


def test_group_events_stream() -> None:
    body = sse(
        {"type": "task_group_status", "event_id": "e1", "status": {"num_task_runs": 1, "is_active": True}},
        {**state(1), "event_id": "e2"},
        {"type": "task_group_status", "event_id": "e3", "status": {"num_task_runs": 1, "is_active": False}},
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=ChunkedStream([body]))

    events = run(collect(lambda c: c.stream_group_events("tgrp_1", last_event_id="e0", timeout=30)), handler)
    assert isinstance(events[0], GroupStatusEvent) and events[0].status.is_active
    assert isinstance(events[1], RunStateEvent) and events[1].output is None
    assert isinstance(events[2], GroupStatusEvent) and not events[2].status.is_active
    assert seen[0].url.params["last_event_id"] == "e0" and seen[0].url.params["timeout"] == "30"


# -- x-should-retry: the service's word on retrying, read as the SDK reads it ----------------------

NO = {"x-should-retry": "false"}
YES = {"x-should-retry": "true"}


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (503, None, True),
        (500, "false", False),
        (429, "FALSE", False),
        (408, None, True),
        (409, None, True),
        (400, None, False),
        (400, "true", True),
        (404, " True ", True),
        (401, "maybe", False),  # neither: the status decides
        (502, "", True),
    ],
)
def test_retryable_follows_the_header_then_the_status(
    status: int, header: str | None, expected: bool
) -> None:
    assert retryable(status, should_retry_header(header)) is expected


def test_read_answered_should_retry_false_is_raised_at_once() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json=error_body("busy"), headers=NO)

    with pytest.raises(ServerError) as info:
        run(lambda c: c.get_run("trun_1"), handler)
    assert len(calls) == 1 and info.value.should_retry is False


def test_read_answered_should_retry_true_is_retried_whatever_its_status() -> None:
    answers = [
        httpx.Response(400, json=error_body("try again"), headers=YES),
        httpx.Response(404, json=error_body("not yet"), headers=YES),
        httpx.Response(200, json=RUN),
    ]
    assert run(lambda c: c.get_run("trun_1"), lambda req: answers.pop(0)).run_id == "trun_1"
    assert not answers


def test_read_without_the_header_keeps_the_status_rules() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json=error_body("bad"))

    with pytest.raises(BadRequestError) as info:
        run(lambda c: c.get_run("trun_1"), handler)
    assert len(calls) == 1 and info.value.should_retry is None


def test_rate_limit_said_not_to_retry_is_raised_and_reported() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(429, json=error_body("quota spent"), headers={**NO, "Retry-After": "4"})

    limiter = FakeLimiter()
    with pytest.raises(RateLimitError) as info:
        run(lambda c: c.get_run("trun_1"), handler, limiter=limiter)
    assert len(calls) == 1 and info.value.should_retry is False
    assert limiter.limited == [4.0]  # the pace still hears of it


@pytest.mark.parametrize("header", [NO, YES])
def test_create_answered_5xx_is_in_doubt_whatever_the_header(header: dict[str, str]) -> None:
    # A 5xx may have created the runs: "false" does not make it a refusal, "true" does not make it safe
    # to send again. The caller finds out (reconciles) either way.
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json=error_body("unavailable"), headers=header)

    with pytest.raises(OutcomeUnknownError) as info:
        run(lambda c: c.add_runs("tgrp_1", [{"input": "x", "processor": "lite"}]), handler)
    assert len(calls) == 1
    assert isinstance(info.value.cause, ServerError)
    assert info.value.cause.should_retry is (header is YES)


def test_create_refused_4xx_is_sent_again_only_when_the_service_says_so() -> None:
    sends: list[int] = []
    refused: list[int] = []
    answers = [
        httpx.Response(409, json=error_body("busy, try again"), headers=YES),
        httpx.Response(200, json={"run_ids": ["trun_1"], "status": {}}),
    ]

    async def on_send() -> None:
        sends.append(1)

    def go(c: TaskClient) -> Any:
        return c.add_runs(
            "tgrp_1",
            [{"input": "x", "processor": "lite"}],
            on_send=on_send,
            on_refused=lambda: refused.append(1),
        )

    assert run(go, lambda req: answers.pop(0)).run_ids == ("trun_1",)
    assert len(sends) == 2 and len(refused) == 1  # nothing was on the wire between the two sends

    calls = []

    def conflict(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(409, json=error_body("conflict"))

    with pytest.raises(ConflictError):  # a 409 of a create, without the header: not sent again
        run(lambda c: c.create_run("x", "lite"), conflict)
    assert len(calls) == 1


def test_blocking_result_408_is_left_to_its_caller_even_with_should_retry_true() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(408, json=error_body("Request timed out; run still active"), headers=YES)

    with pytest.raises(StillRunningError):
        run(lambda c: c.get_result("trun_1", timeout=1), handler)
    assert len(calls) == 1  # `wait_for_result` asks again itself


def test_stream_follows_should_retry() -> None:
    answers = [
        httpx.Response(400, json=error_body("again"), headers=YES),
        httpx.Response(200, content=sse(state(1))),
    ]
    events = run(collect(lambda c: c.stream_group_runs("tgrp_1")), lambda req: answers.pop(0))
    assert [e.run.run_id for e in events] == ["trun_1"]

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(502, text="bad gateway", headers=NO)

    with pytest.raises(ServerError):
        run(collect(lambda c: c.stream_group_runs("tgrp_1")), handler)
    assert len(calls) == 1

    limiter = FakeLimiter()
    calls.clear()

    def limited(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(429, json=error_body("quota spent"), headers=NO)

    with pytest.raises(RateLimitError):
        run(collect(lambda c: c.stream_group_events("tgrp_1")), limited, limiter=limiter)
    assert len(calls) == 1 and limiter.limited == [None]
