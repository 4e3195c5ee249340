"""The official SDK (`parallel-web`) against the emulator over real HTTP.

If the SDK can create, wait, stream and parse everything the emulator answers, and raises its own
exception classes for the emulator's errors, then the emulator speaks the real wire format. Responses
are also re-validated strictly (`model_validate`, since the SDK itself builds models without
validation) and checked to carry no field the SDK does not model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest
from parallel import (
    AsyncParallel,
    AuthenticationError,
    InternalServerError,
    NotFoundError,
    Parallel,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from parallel.types import (
    RunInput,
    TaskGroup,
    TaskGroupRunResponse,
    TaskGroupStatus,
    TaskGroupStatusEvent,
    TaskRun,
    TaskRunEvent,
    TaskRunJsonOutput,
    TaskRunProgressMessageEvent,
    TaskRunProgressStatsEvent,
    TaskRunResult,
    TaskRunTextOutput,
)
from parallel.types.shared import ErrorResponse

from enrich._emulator import Emulator
from enrich._emulator.synth import expected_output

SCHEMA = {
    "type": "object",
    "properties": {
        "ceo": {"type": "string", "description": "Name of the CEO"},
        "founded_year": {"type": "integer"},
        "website": {"type": ["string", "null"]},
    },
    "required": ["ceo", "founded_year", "website"],
    "additionalProperties": False,
}
SPEC = {"output_schema": {"type": "json", "json_schema": SCHEMA}}


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(latency=0.05) as emulator:
        yield emulator


@pytest.fixture
def sdk(emu: Emulator) -> Iterator[Parallel]:
    with Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=0) as client:
        yield client


def strict(model: type[pydantic.BaseModel], data: dict[str, Any]) -> pydantic.BaseModel:
    """Validate `data` as `model` and check it carries only fields the model knows (by wire name)."""
    known = {f.alias or name for name, f in model.model_fields.items()}
    assert set(data) <= known, f"{model.__name__} has no field(s) {set(data) - known}"
    return model.model_validate(data)


def test_create_and_result_parse_strictly(sdk: Parallel) -> None:
    raw = sdk.task_run.with_raw_response.create(
        input={"company": "Acme Corp"}, processor="core", task_spec=SPEC, metadata={"row": "1", "n": 2}
    )
    assert raw.status_code == 202
    run = raw.parse()
    strict(TaskRun, raw.http_response.json())
    assert run.status == "queued" and run.is_active and run.task_group_id is None
    assert run.metadata == {"row": "1", "n": 2}

    raw_result = sdk.task_run.with_raw_response.result(run.run_id, api_timeout=30)
    data = raw_result.http_response.json()
    strict(TaskRunResult, data)
    strict(TaskRun, data["run"])
    strict(TaskRunJsonOutput, data["output"])
    result = raw_result.parse()
    assert result.run.status == "completed" and not result.run.is_active
    assert isinstance(result.output, TaskRunJsonOutput)
    expected = expected_output({"input": {"company": "Acme Corp"}, "processor": "core", "task_spec": SPEC})
    assert result.output.content == expected["content"]
    assert [b.field for b in result.output.basis] == ["ceo", "founded_year", "website"]
    assert all(b.confidence in ("high", "medium", "low") for b in result.output.basis)
    assert all(c.url.startswith("https://") for b in result.output.basis for c in b.citations or [])


def test_text_output_without_a_task_spec(sdk: Parallel) -> None:
    run = sdk.task_run.create(input="What does Acme Corp make?", processor="lite")
    raw = sdk.task_run.with_raw_response.result(run.run_id, api_timeout=30)
    strict(TaskRunTextOutput, raw.http_response.json()["output"])
    output = raw.parse().output
    assert isinstance(output, TaskRunTextOutput)
    assert (
        output.content
        == expected_output({"input": "What does Acme Corp make?", "processor": "lite"})["content"]
    )
    assert [b.field for b in output.basis] == ["output"] and output.basis[0].confidence is None


def test_execute_with_a_pydantic_model(sdk: Parallel) -> None:
    class Person(pydantic.BaseModel):
        name: str
        role: str

    class Company(pydantic.BaseModel):
        ceo: str
        founded_year: int
        website: str | None = None
        executives: list[Person]

    result = sdk.task_run.execute(input="Acme Corp", processor="base", output=Company, timeout=30)
    company = result.output.parsed
    assert isinstance(company, Company) and all(isinstance(p, Person) for p in company.executives)


def test_retrieve_and_retrieve_input(sdk: Parallel) -> None:
    raw = sdk.task_run.create(
        input={"company": "Acme"},
        processor="base-fast",
        task_spec=SPEC,
        source_policy={"include_domains": ["acme.example.com"]},
        betas=["events-sse-2025-07-24"],
    )
    run = sdk.task_run.retrieve(raw.run_id)
    assert run.run_id == raw.run_id and run.processor == "base-fast"
    strict(TaskRun, sdk.task_run.with_raw_response.retrieve(raw.run_id).http_response.json())
    data = sdk.task_run.with_raw_response.retrieve_input(raw.run_id).http_response.json()
    run_input = strict(RunInput, data)
    assert isinstance(run_input, RunInput)
    assert run_input.input == {"company": "Acme"} and run_input.task_spec is not None
    assert run_input.source_policy is not None and run_input.source_policy.include_domains == [
        "acme.example.com"
    ]


def test_run_events_stream(sdk: Parallel) -> None:
    run = sdk.task_run.create(input="Acme", processor="pro", task_spec=SPEC)
    events = list(sdk.task_run.events(run.run_id))
    assert isinstance(events[0], TaskRunEvent) and isinstance(events[-1], TaskRunEvent)
    assert any(isinstance(e, TaskRunProgressMessageEvent) for e in events)
    assert any(isinstance(e, TaskRunProgressStatsEvent) for e in events)
    final = events[-1]
    assert isinstance(final, TaskRunEvent) and final.run.status == "completed"
    assert isinstance(final.output, TaskRunJsonOutput)


def test_group_lifecycle(sdk: Parallel) -> None:
    raw = sdk.task_group.with_raw_response.create(metadata={"job": "conformance"})
    strict(TaskGroup, raw.http_response.json())
    group = raw.parse()
    gid = group.task_group_id
    assert gid.startswith("tgrp_") and group.metadata == {"job": "conformance"}

    inputs: list[Any] = [
        {"input": {"company": f"Company {i}"}, "processor": "lite", "metadata": {"row": i}} for i in range(5)
    ]
    raw_add = sdk.task_group.with_raw_response.add_runs(gid, inputs=inputs, default_task_spec=SPEC)
    strict(TaskGroupRunResponse, raw_add.http_response.json())
    added = raw_add.parse()
    assert len(added.run_ids) == 5 and added.status.num_task_runs == 5

    events = list(sdk.task_group.events(gid, api_timeout=30))
    assert isinstance(events[0], TaskGroupStatusEvent) and isinstance(events[-1], TaskGroupStatusEvent)
    assert not events[-1].status.is_active
    finished = [e for e in events if isinstance(e, TaskRunEvent)]
    assert sorted(e.run.run_id for e in finished) == sorted(added.run_ids)
    assert all(e.output is None and e.event_id for e in finished)

    runs = list(sdk.task_group.get_runs(gid, include_input=True, include_output=True))
    assert [e.run.run_id for e in runs] == added.run_ids
    for event, sent in zip(runs, inputs, strict=True):
        assert isinstance(event, TaskRunEvent) and event.input is not None
        assert event.input.input == sent["input"] and event.run.metadata == {"row": sent["metadata"]["row"]}
        assert event.output is not None
        assert event.output.content == expected_output(sent, default_task_spec=SPEC)["content"]
    resumed = list(sdk.task_group.get_runs(gid, last_event_id=runs[1].event_id, status="completed"))
    assert [e.run.run_id for e in resumed] == added.run_ids[2:]

    status = sdk.task_group.retrieve(gid).status
    assert (
        status.num_task_runs == 5
        and not status.is_active
        and status.task_run_status_counts == {"completed": 5}
    )
    one = sdk.task_group.retrieve_run(added.run_ids[0], task_group_id=gid)
    assert one.task_group_id == gid and one.status == "completed"


def test_async_client(emu: Emulator) -> None:
    async def go() -> None:
        async with AsyncParallel(api_key=emu.api_key, base_url=emu.url, max_retries=0) as client:
            run = await client.task_run.create(input="Acme", processor="core-fast", task_spec=SPEC)
            result = await client.task_run.result(run.run_id, api_timeout=30)
            assert isinstance(result.output, TaskRunJsonOutput)
            group = await client.task_group.create()
            await client.task_group.add_runs(
                group.task_group_id, inputs=[{"input": "x", "processor": "base"}]
            )
            stream = await client.task_group.events(group.task_group_id)
            kinds = [type(e).__name__ async for e in stream]
            assert kinds == ["TaskGroupStatusEvent", "TaskRunEvent", "TaskGroupStatusEvent"]

    asyncio.run(go())


def test_rate_limit_is_a_rate_limit_error() -> None:
    with (
        Emulator(rate_limit=1, rate_window=30) as emu,
        Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=0) as sdk,
    ):
        sdk.task_run.create(input="x", processor="base")
        with pytest.raises(RateLimitError) as caught:
            sdk.task_run.create(input="x", processor="base")
        assert 0 < float(caught.value.response.headers["retry-after"]) <= 30
        strict(ErrorResponse, caught.value.response.json())


def test_failed_run_is_not_found_on_result_and_carries_its_error() -> None:
    with (
        Emulator(latency=0.05, failure_rate=1.0) as emu,
        Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=0) as sdk,
    ):
        run = sdk.task_run.create(input="x", processor="base")
        with pytest.raises(NotFoundError):
            sdk.task_run.result(run.run_id, api_timeout=30)
        failed = sdk.task_run.retrieve(run.run_id)
        assert failed.status == "failed" and not failed.is_active
        assert failed.error is not None and failed.error.ref_id and failed.error.message


def test_error_statuses_map_to_sdk_exceptions() -> None:
    with Emulator(api_key="right-key") as emu:
        with Parallel(api_key="wrong-key", base_url=emu.url, max_retries=0) as sdk:
            with pytest.raises(AuthenticationError) as caught:
                sdk.task_run.create(input="x", processor="base")
            strict(ErrorResponse, caught.value.response.json())
        with Parallel(api_key="right-key", base_url=emu.url, max_retries=0) as sdk:
            with pytest.raises(PermissionDeniedError):
                sdk.task_run.create(input="x", processor="hyper")
            with pytest.raises(UnprocessableEntityError) as invalid:
                sdk.task_run.create(input="x", processor="base", metadata={"a-key-far-too-long": "v"})
            strict(ErrorResponse, invalid.value.response.json())
            group = sdk.task_group.create()
            with pytest.raises(UnprocessableEntityError):
                sdk.task_group.add_runs(group.task_group_id, inputs=[])
            with pytest.raises(NotFoundError):
                sdk.task_group.retrieve("tgrp_" + "0" * 32)
            with pytest.raises(NotFoundError):
                sdk.task_run.retrieve("trun_" + "0" * 32)


STREAM_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "task_run.state": TaskRunEvent,
    "task_group_status": TaskGroupStatusEvent,
    "task_run.progress_stats": TaskRunProgressStatsEvent,
}


def test_every_streamed_event_validates_strictly(emu: Emulator, sdk: Parallel) -> None:
    group = sdk.task_group.create()
    gid = group.task_group_id
    added = sdk.task_group.add_runs(gid, inputs=[{"input": "x", "processor": "pro"}], default_task_spec=SPEC)
    paths = [
        f"/v1/tasks/groups/{gid}/events",
        f"/v1/tasks/groups/{gid}/runs?include_input=true&include_output=true",
        f"/v1/tasks/runs/{added.run_ids[0]}/events",
    ]
    seen = set()
    with httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as http:
        for path in paths:
            for line in http.get(path).text.splitlines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line.removeprefix("data: "))
                kind = data["type"]
                model = STREAM_MODELS.get(kind, TaskRunProgressMessageEvent)
                event = strict(model, data)
                seen.add(kind)
                if isinstance(event, TaskRunEvent):
                    strict(TaskRun, data["run"])
                    if data["input"] is not None:
                        strict(RunInput, data["input"])
                    if data["output"] is not None:
                        strict(TaskRunJsonOutput, data["output"])
                if isinstance(event, TaskGroupStatusEvent):
                    strict(TaskGroupStatus, data["status"])
    assert {
        "task_run.state",
        "task_group_status",
        "task_run.progress_stats",
        "task_run.progress_msg.plan",
    } <= seen


def test_sdk_retries_honour_retry_after() -> None:
    with (
        Emulator(rate_limit=1, rate_window=0.3) as emu,
        Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=2) as sdk,
    ):
        sdk.task_run.create(input="x", processor="base")
        sdk.task_run.create(input="y", processor="base")  # 429 first, then the SDK waits and retries
        stats = emu.stats()
        assert stats["rate_limited"] >= 1 and stats["runs_created"] == 2


def test_sdk_retries_after_a_lost_create_pay_twice() -> None:
    """Why the client needs its own reconciliation: the SDK's blind retry duplicates committed runs."""
    with (
        Emulator(fault_rate=1.0, faults=frozenset({"lost_create"})) as emu,
        Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=1) as sdk,
    ):
        with pytest.raises(InternalServerError):
            sdk.task_run.create(input="x", processor="base")
        stats = emu.stats()
        assert stats["runs_created"] == 2 and stats["duplicate_runs"] == 1
