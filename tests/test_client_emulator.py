"""The client against the emulator: in-process (ASGITransport) and over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from enrich import (
    AuthenticationError,
    Emulator,
    EmulatorConfig,
    OutcomeUnknownError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimiter,
    RateLimitError,
    RetryPolicy,
    TaskClient,
    ValidationError,
    create_app,
)
from enrich._emulator.synth import synth_output
from enrich._models import GroupStatusEvent, RunStateEvent

SPEC = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {"ceo": {"type": "string"}, "founded": {"type": "integer"}},
            "required": ["ceo", "founded"],
            "additionalProperties": False,
        },
    }
}
KEY = "test-key"


def with_app(config: EmulatorConfig, fn: Any, **client_kw: Any) -> Any:
    app = create_app(config)

    async def main() -> Any:
        client_kw.setdefault("retry", RetryPolicy.no_wait())
        async with TaskClient(
            KEY, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **client_kw
        ) as client:
            return await fn(client)

    return asyncio.run(main()), app


def test_create_and_wait_for_result() -> None:
    async def go(c: TaskClient) -> Any:
        run = await c.create_run({"company": "Acme"}, "base", task_spec=SPEC, metadata={"row": "1"})
        assert run.status == "queued" and run.metadata == {"row": "1"}
        return await c.wait_for_result(run.run_id, poll_timeout=1)

    (run, output), _ = with_app(EmulatorConfig(latency=0.05), go)
    assert run.status == "completed"
    content, _basis = synth_output({"company": "Acme"}, SPEC["output_schema"], processor="base")
    assert output.content == content
    assert {b.field for b in output.basis} == {"ceo", "founded"}


def test_failed_run_is_returned_with_its_error() -> None:
    async def go(c: TaskClient) -> Any:
        run = await c.create_run("x", "lite")
        return await c.wait_for_result(run.run_id, poll_timeout=1)

    (run, output), _ = with_app(EmulatorConfig(latency=0.02, failure_rate=1.0), go)
    assert output is None and run.status == "failed" and run.error is not None and run.error.message


def test_group_add_stream_and_events() -> None:
    inputs = [
        {"input": {"company": f"c{i}"}, "processor": "lite", "metadata": {"k": str(i)}} for i in range(30)
    ]

    async def go(c: TaskClient) -> Any:
        group = await c.create_group()
        added = await c.add_runs(group.group_id, inputs, default_task_spec=SPEC)
        events = [e async for e in c.stream_group_events(group.group_id, timeout=10)]
        runs = [e async for e in c.stream_group_runs(group.group_id, include_output=True)]
        return added, events, runs

    (added, events, runs), app = with_app(EmulatorConfig(latency=0.05), go)
    assert len(added.run_ids) == 30
    ended = [e for e in events if isinstance(e, RunStateEvent)]
    assert {e.run.run_id for e in ended} == set(added.run_ids)
    assert isinstance(events[-1], GroupStatusEvent) and not events[-1].status.is_active
    assert [e.run.run_id for e in runs] == list(added.run_ids)  # creation order
    for event, inp in zip(runs, inputs, strict=True):
        assert event.run.metadata == inp["metadata"]
        assert event.output is not None
        assert event.output.content == synth_output(inp["input"], SPEC["output_schema"], processor="lite")[0]
    assert app.stats()["duplicate_runs"] == 0


def test_runs_stream_resumes_from_a_cursor() -> None:
    async def go(c: TaskClient) -> Any:
        group = await c.create_group()
        await c.add_runs(group.group_id, [{"input": str(i), "processor": "lite"} for i in range(5)])
        first = [e async for e in c.stream_group_runs(group.group_id)]
        rest = [e async for e in c.stream_group_runs(group.group_id, last_event_id=first[1].event_id)]
        return first, rest

    (first, rest), _ = with_app(EmulatorConfig(latency=0.05), go)
    assert [e.run.run_id for e in rest] == [e.run.run_id for e in first[2:]]


@pytest.mark.parametrize(
    ("config", "call", "error"),
    [
        (EmulatorConfig(api_key="other"), lambda c: c.get_group("tgrp_x"), AuthenticationError),
        (EmulatorConfig(), lambda c: c.create_run("x", "warp-speed"), PermissionDeniedError),
        (EmulatorConfig(credit=0.001), lambda c: c.create_run("x", "ultra"), PaymentRequiredError),
        (
            EmulatorConfig(),
            lambda c: c.create_run("x", "lite", metadata={"a_key_longer_than_16": "v"}),
            ValidationError,
        ),
    ],
)
def test_fatal_answers(config: EmulatorConfig, call: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        with_app(config, call)
    assert KEY not in str(info.value)


def test_lost_create_is_outcome_unknown_and_the_run_exists() -> None:
    config = EmulatorConfig(latency=0.05, fault_rate=1.0, faults=frozenset({"lost_create"}))

    async def go(c: TaskClient) -> Any:
        group = await c.create_group()
        with pytest.raises(OutcomeUnknownError):
            await c.add_runs(group.group_id, [{"input": "x", "processor": "lite", "metadata": {"k": "1"}}])
        return [e async for e in c.stream_group_runs(group.group_id)]

    runs, app = with_app(config, go)
    assert len(runs) == 1 and runs[0].run.metadata == {"k": "1"}  # created, though the answer was lost
    assert app.stats()["runs_created"] == 1


def test_429_slows_down_through_the_limiter() -> None:
    config = EmulatorConfig(rate_limit=5, rate_window=0.5)

    async def go(c: TaskClient) -> int:
        await asyncio.gather(*(c.get_group("tgrp_missing") for _ in range(12)), return_exceptions=True)
        return c.rate_limited_count

    limited, app = with_app(config, go, limiter=RateLimiter(1000, 1000))
    assert limited >= 1 and app.stats()["rate_limited"] == limited


def test_429_surfaces_when_retries_are_exhausted() -> None:
    config = EmulatorConfig(rate_limit=1, rate_window=60)

    async def go(c: TaskClient) -> None:
        await c.create_group()
        await c.create_group()

    with pytest.raises(RateLimitError) as info:
        with_app(config, go, retry=RetryPolicy.no_wait(max_rate_limited=2))
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60


def test_over_real_http_with_faults() -> None:
    """Dropped connections and HTML 5xx on reads are retried until they succeed."""
    with Emulator(latency=0.05, fault_rate=0.4, faults=frozenset({"drop", "html_5xx"}), seed=3) as emu:

        async def main() -> Any:
            async with TaskClient(
                emu.api_key, base_url=emu.url, retry=RetryPolicy.no_wait(max_attempts=20)
            ) as c:
                group = None
                while group is None:
                    try:
                        group = await c.create_group()
                    except Exception:  # a create-group answer can be lost too; any error is retried here
                        continue
                results = [await c.get_group(group.group_id) for _ in range(10)]
                return results

        results = asyncio.run(main())
        assert all(r.status.num_task_runs == 0 for r in results)
        assert sum(emu.stats()["faults"].values()) > 0
