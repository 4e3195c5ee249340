"""The engine's hard paths: stragglers, bad service data, broken streams, Ctrl-C, resume in runs mode,
credit running out, repeated retries, inputs that must never be sent.

Most tests mount the emulator in-process behind `tests._fakes.Tap`, which changes what the client sees
(a delayed or lost answer, a rewritten, malformed or cut SSE event) while the emulator keeps the truth
(runs created, duplicates). `StreamingASGITransport` is used where the engine must see the group events
stream as it streams over HTTP. A few unit tests drive `_Job` and `_GroupCollector` on a fake group
client (`_Harness`) to reach states the emulator cannot produce on demand (a poll landing while an
add-runs answer is on its way, statuses it never sends, a checkpoint with a history of retries).

Tests whose docstring says "Guards a fixed bug" failed on an earlier engine and pass since its fix.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from _fakes import Cut, StreamingASGITransport, Tap, is_add_runs, is_runs_stream, sse

from enrich import Emulator, EmulatorConfig, PaymentRequiredError, UsageError, create_app
from enrich._checkpoint import Checkpoint, Outcome, Receipt
from enrich._emulator.synth import synth_output
from enrich._engine import KEY_FIELD, JobStats, aenrich, collect, enrich, submit
from enrich._engine import job as job_stage
from enrich._engine.collect import _GroupCollector
from enrich._engine.job import _Job
from enrich._engine.prepare import _prepare
from enrich._inputs import build_inputs
from enrich._limiter import RateLimiter
from enrich._models import AddRunsResponse, GroupStatus, RunStateEvent, TaskOutput, TaskRun
from enrich._schema import parse_output

CEO = {"ceo": "Name of the current CEO"}
TWO = {"ceo": "Name of the current CEO", "founded": ("integer", "Year founded")}
RESULT = "GET /v1/tasks/runs/{run_id}/result"


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def run_job(app: Any, data: Any, output: Any, *, transport: Any = None, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    transport = transport or httpx.ASGITransport(app=app)
    return asyncio.run(aenrich(data, output, base_url="http://emulator", transport=transport, **kw))


def expected(df: pl.DataFrame, output: Any, field: str, processor: str = "lite") -> list[Any]:
    schema = parse_output(output).task_spec()["output_schema"]
    return [synth_output(i, schema, processor=processor)[0][field] for i in build_inputs(df)]


def nth_run(data: dict[str, Any]) -> int:
    """The creation position (1-based) of the run of a runs-stream event (its cursor says it)."""
    return int(str(data["event_id"])[1:11])


class _SlowAnswers(Tap):
    """Carries out every add-runs call, then holds its answer back for `delay` seconds."""

    delay = 0.0

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if is_add_runs(method, path) and self.delay:
            await asyncio.sleep(self.delay)
        return body


# -- the straggler path of the group collector --------------------------------------------------------


class _Waves(Tap):
    """Reschedules the runs of the first add-runs call: run 1 ends 1.2 s after creation, the others in
    waves of 150 ending 0.15 s apart (from 0.15 s on), so polls come one wave at a time."""

    straggler: str | None = None

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if is_add_runs(method, path) and self.straggler is None:
            state = self.app.state
            now = state.now()
            run_ids = json.loads(body)["run_ids"]
            for i, run_id in enumerate(run_ids):
                run = state.runs[run_id]
                assert run.state == 0, "still queued: its end time can be moved"
                run.end = now + (1.2 if i == 0 else 0.15 + 0.15 * ((i - 1) // 150))
            self.straggler = run_ids[0]
        return body


def test_straggler_is_awaited_alone_and_the_cursor_moves_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A poll per wave of 150 (a job this size is otherwise read once, when every run has ended).
    monkeypatch.setattr(collect, "_POLL_MIN_ENDED", 100)
    app = _Waves(create_app(EmulatorConfig(latency=0.4)))
    df = companies(900)
    # Submit everything, stop before anything ends: the next call only collects.
    first = run_job(app, df, CEO, checkpoint=tmp_path / "cp", timeout=0.05)
    assert first["_status"].to_list() == ["pending"] * 900 and first["_run_id"].null_count() == 0
    # Collect with the events stream streaming (as over HTTP).
    stats = JobStats()
    streaming = StreamingASGITransport(app)
    out = run_job(app, df, CEO, checkpoint=tmp_path / "cp", stats=stats, transport=streaming)
    assert out["_status"].to_list() == ["completed"] * 900
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert out["_run_id"][0] == app.straggler
    # Run 1 is set aside once the answers after it are read a second time; its answer comes by the
    # blocking result call.
    assert stats.stragglers == 1 and app.stats()["requests"][RESULT] == 1
    assert ("GET", f"/v1/tasks/runs/{app.straggler}/result") in app.calls
    assert stats.polls == app.runs_streams and 3 <= stats.polls <= 7, stats.polls
    # Then polls start past it: about 1,650 answers are downloaded in all. Reading from run 1 on every
    # poll (no straggler path) downloads about 3,900.
    assert app.outputs_served <= 2_100, app.outputs_served
    assert app.stats()["runs_created"] == 900


# -- the runs-stream cursor against add-runs calls in flight (bugs fixed during review, kept as guards) --


def test_group_job_finishes_when_the_events_stream_streams() -> None:
    """Guards a fixed bug: with nothing outstanding the collector polled in a hot loop while an add-runs
    call was in flight, and a poll that saw its runs before their receipts moved the cursor past them, so
    they were never collected (over real HTTP a 20-row job polled ~180 times in 8 s and never ended)."""
    app = Tap(create_app(EmulatorConfig(latency=0.05)))
    df = companies(20)
    stats = JobStats()
    out = run_job(app, df, CEO, stats=stats, timeout=1.0, transport=StreamingASGITransport(app))
    assert out["_status"].to_list() == ["completed"] * 20
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert stats.polls <= 3, stats.polls


def test_small_group_job_over_real_http() -> None:
    df = companies(20)
    with Emulator(latency=0.05) as emu:
        stats = JobStats()
        out = asyncio.run(
            aenrich(
                df,
                CEO,
                processor="lite",
                api_key=emu.api_key,
                base_url=emu.url,
                progress=False,
                stats=stats,
                timeout=5,
            )
        )
        emulated = emu.stats()
    assert out["_status"].to_list() == ["completed"] * 20
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert stats.polls <= 3 and emulated["requests_total"] <= 8, emulated["requests"]
    assert emulated["runs_created"] == 20


def test_no_polls_while_the_first_add_is_in_flight() -> None:
    """Guards a fixed bug: wait_for_work() returned at once when nothing was outstanding, so the collector
    polled the runs stream in a loop for as long as an add-runs answer took."""
    app = _SlowAnswers(create_app(EmulatorConfig(latency=0.05)))
    app.delay = 0.3  # a slow network: the add is carried out, its answer takes 0.3 s
    stats = JobStats()
    out = run_job(app, companies(20), CEO, stats=stats, timeout=1.0)
    assert stats.polls <= 2, stats.polls
    assert out["_status"].to_list() == ["completed"] * 20


class _Clock:
    """`time` for the engine module: monotonic() runs `offset` seconds ahead and counts its calls."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.calls = 0

    def monotonic(self) -> float:
        self.calls += 1
        return time.monotonic() + self.offset


class _FakeGroup:
    """Just enough of TaskClient for one group: add_runs creates runs, then answers once `release` is set.

    Each run is [run_id, row key, status, is_active]; a completed run's output is {"ceo": its key}.
    """

    def __init__(self) -> None:
        self.runs: list[list[Any]] = []
        self.outputs_served = 0
        self.created = asyncio.Event()
        self.release = asyncio.Event()

    async def add_runs(
        self,
        group_id: str,
        inputs: list[dict[str, Any]],
        *,
        default_task_spec: Any = None,
        retry_rate_limited: bool = True,
        on_send: Any = None,
        on_refused: Any = None,
    ) -> AddRunsResponse:
        if on_send is not None:
            await on_send()
        ids = []
        for item in inputs:
            run_id = f"trun_{len(self.runs):032x}"
            self.runs.append([run_id, item["metadata"][KEY_FIELD], "running", True])
            ids.append(run_id)
        self.created.set()
        await self.release.wait()
        return AddRunsResponse(run_ids=tuple(ids), status=GroupStatus())

    def set(self, i: int, status: str, active: bool) -> None:
        self.runs[i][2:] = [status, active]

    async def stream_group_runs(
        self, group_id: str, *, last_event_id: str | None = None, include_output: bool = False
    ) -> Any:
        start = int(last_event_id or 0)
        for i, (run_id, key, status, active) in enumerate(self.runs[start:], start + 1):
            run = TaskRun(
                run_id=run_id, status=status, is_active=active, metadata={KEY_FIELD: key}, group_id=group_id
            )
            output = None
            if include_output and status == "completed":
                output = TaskOutput("json", {"ceo": key})
                self.outputs_served += 1
            yield RunStateEvent(event_id=str(i), run=run, output=output)


class _Harness:
    """A `_Job` and the collector of its one group, on `_FakeGroup` (no HTTP, no timers)."""

    def __init__(
        self,
        cp_path: Path,
        rows: int,
        *,
        retry_failed: bool = False,
        history: Callable[[Checkpoint, list[str]], None] | None = None,
    ) -> None:
        self.plan = _prepare(
            companies(rows),
            CEO,
            columns=None,
            prompt=None,
            input_schema=None,
            metadata=None,
            processor="lite",
            mode="group",
        )
        self.fake = _FakeGroup()
        self.cp = Checkpoint.open(cp_path, self.plan.fingerprint)
        if history is not None:
            history(self.cp, self.plan.keys)  # what earlier calls recorded
        self.job = _Job(
            self.plan,
            self.cp,
            self.fake,  # type: ignore[arg-type]
            RateLimiter(),
            retry_failed=retry_failed,
            sink=None,
            stats=JobStats(),
            concurrency=1,
        )
        self.job.load()
        self.cp.record_group("tgrp_fake")
        self.collector = _GroupCollector(self.job, "tgrp_fake")

    def add_all(self) -> asyncio.Task[None]:
        batch = list(self.job.todo)
        return asyncio.create_task(submit.add_batch(self.job, "tgrp_fake", batch, self.collector))

    def outcome(self, i: int) -> tuple[str, str | None] | None:
        return self.job.done.get(self.plan.keys[i])


def test_a_row_adopted_while_its_add_waits_for_the_limiter_is_not_sent(tmp_path: Path) -> None:
    """A late commit of a row about to be sent again is adopted (a poll saw its run) while the add that
    holds it waits for the rate limiter: the add must not go out, or the row is paid twice."""

    async def scenario() -> tuple[bool, int, list[Any]]:
        h = _Harness(tmp_path / "cp", 3)
        real_add = h.fake.add_runs
        first = h.plan.keys[0]

        async def add_runs(*args: Any, **kw: Any) -> Any:
            h.job.found_late(first, "trun_late", "tgrp_fake")  # while it waited for its grant
            h.fake.release.set()
            return await real_add(*args, **kw)

        h.fake.add_runs = add_runs  # type: ignore[method-assign]
        with h.cp:
            sent = await h.add_all()
            return sent, len(h.fake.runs), h.cp.in_doubt()

    sent, created, doubts = asyncio.run(scenario())
    assert sent is False and created == 0 and doubts == []  # not sent, nothing in doubt: formed again


def test_a_poll_during_an_add_in_flight_does_not_lose_its_runs(tmp_path: Path) -> None:
    """Guards a fixed bug: poll() moved the cursor past runs whose key it did not know yet (their add-runs
    answer still on its way), so they were never collected."""

    async def scenario() -> list[Any]:
        h = _Harness(tmp_path / "cp", 5)
        with h.cp:
            add = h.add_all()
            await h.fake.created.wait()
            await h.collector.poll()  # the runs exist; their receipts are not recorded yet
            h.fake.release.set()
            await add
            for i in range(5):
                h.fake.set(i, "completed", False)
            await h.collector.poll()
            return [h.outcome(i) for i in range(5)]

    outcomes = asyncio.run(scenario())
    assert [o and o[0] for o in outcomes] == ["completed"] * 5


def test_run_statuses_the_client_does_not_know_follow_is_active(tmp_path: Path) -> None:
    async def scenario() -> list[Any]:
        h = _Harness(tmp_path / "cp", 4)
        with h.cp:
            h.fake.release.set()
            await h.add_all()
            h.fake.set(0, "action_required", True)  # not in ACTIVE_STATUSES, but active on the wire
            h.fake.set(1, "expired", False)  # an end this version does not know, without output
            h.fake.set(2, "completed", False)
            await h.collector.poll()
            first = [h.outcome(i) for i in range(4)]
            h.fake.set(0, "completed", False)
            h.fake.set(3, "completed", False)
            await h.collector.poll()
            h.job.push_outcomes()
            answer = h.cp.answers(pl.Series([h.job.run_of[h.plan.keys[0]]]))["output"].to_list()
            return [first, [h.outcome(i) for i in range(4)], h.job.outstanding, h.plan.keys, answer]

    first, second, outstanding, keys, answer = asyncio.run(scenario())
    assert first[0] is None and first[3] is None  # still running: waited for, not failed
    assert first[1] is not None and first[1][0] == "failed" and "'expired'" in str(first[1][1])
    assert first[2] is not None and first[2][0] == "completed"
    assert [o and o[0] for o in second] == ["completed", "failed", "completed", "completed"]
    assert len(answer) == 1 and json.loads(answer[0]) == {"ceo": keys[0]}  # its own answer, late
    assert outstanding == 0


def test_an_older_failed_run_does_not_hold_the_cursor_during_a_retry(tmp_path: Path) -> None:
    def history(cp: Checkpoint, keys: list[str]) -> None:
        # Row 0 failed twice (runs r1, r2); rows 1-10 were submitted (runs p1..p10), not collected yet.
        cp.record_group("tgrp_fake")
        receipts = [Receipt(keys[0], f"trun_r{i}", "tgrp_fake", f"b{i}") for i in (1, 2)]
        receipts += [Receipt(keys[i], f"trun_p{i}", "tgrp_fake", "b3") for i in range(1, 11)]
        cp.record_receipts(receipts)
        cp.add_outcomes(
            [Outcome(keys[0], run, "failed", error="Task execution failed") for run in ("trun_r1", "trun_r2")]
        )

    async def scenario() -> tuple[int, list[Any]]:
        h = _Harness(tmp_path / "cp", 11, retry_failed=True, history=history)
        with h.cp:
            keys = h.plan.keys
            h.fake.runs = [["trun_r1", keys[0], "failed", False], ["trun_r2", keys[0], "failed", False]]
            h.fake.runs += [[f"trun_p{i}", keys[i], "completed", False] for i in range(1, 11)]
            h.fake.release.set()
            await h.add_all()  # row 0 again: run 13, still running
            await h.collector.poll()
            served = h.fake.outputs_served
            await h.collector.poll()
            return h.fake.outputs_served - served, [h.outcome(i) for i in range(11)]

    downloaded_again, outcomes = asyncio.run(scenario())
    assert outcomes[0] is None and [o and o[0] for o in outcomes[1:]] == ["completed"] * 10
    assert downloaded_again == 0


def test_an_idle_collector_sleeps_until_the_next_add(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    for stage in (collect, job_stage, submit):  # the engine's clock
        monkeypatch.setattr(stage, "time", clock)

    async def scenario() -> int:
        h = _Harness(tmp_path / "cp", 3)
        with h.cp:
            waiting = asyncio.create_task(h.collector.wait_for_work())
            await asyncio.sleep(0.01)
            clock.offset = 31.0  # the wait began 31 s ago; nothing is outstanding, more adds to come
            h.collector.wake()
            await asyncio.sleep(0.01)
            before = clock.calls
            await asyncio.sleep(0.3)
            spins = clock.calls - before
            h.job.submission_done.set()
            h.collector.wake()
            await waiting
            return spins

    assert asyncio.run(scenario()) == 0


class _LaggingSnapshot(Tap):
    """The runs stream shows run 1 still active for `lag` seconds after the events stream said it ended."""

    lag = 0.3
    until: float | None = None

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        if is_runs_stream(method, path) and nth_run(data) == 1:
            if self.until is None:
                self.until = time.monotonic() + self.lag
            if time.monotonic() < self.until:
                data["run"].update(status="running", is_active=True)
                data["output"] = None
        return sse(data)


def test_a_runs_snapshot_lagging_the_events_stream_causes_no_poll_storm() -> None:
    """Guards a fixed bug: a run the events stream reported ended but the runs stream still showed active
    made wait_for_work() return at once, and the collector polled in a hot loop (~300 polls in 0.3 s).
    Now a poll that collected nothing is not repeated for a few seconds (this test takes about 3 s)."""
    app = _LaggingSnapshot(create_app(EmulatorConfig(latency=0.05)))
    stats = JobStats()
    out = run_job(app, companies(20), CEO, stats=stats, timeout=6)
    assert out["_status"].to_list() == ["completed"] * 20
    assert stats.polls <= 5, stats.polls


# -- bad data from the service ------------------------------------------------------------------------


class _BadValue(Tap):
    """Run 4's answer says its founding year in words."""

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        if is_runs_stream(method, path) and nth_run(data) == 4 and data.get("output"):
            data["output"]["content"]["founded"] = "nineteen ninety"
        return sse(data)


def test_a_value_that_does_not_fit_its_column_is_null_and_named(tmp_path: Path) -> None:
    app = _BadValue(create_app(EmulatorConfig(latency=0.05)))
    df = companies(6)
    out = run_job(app, df, TWO, checkpoint=tmp_path / "cp")
    want = expected(df, TWO, "founded")
    assert out["founded"].to_list() == [*want[:3], None, *want[4:]]
    assert out.schema["founded"] == pl.Int64
    assert out["_status"].to_list() == ["completed"] * 6
    assert out["ceo"].to_list() == expected(df, TWO, "ceo")  # the rest of the answer is kept
    errors = out["_error"].to_list()
    assert errors[:3] + errors[4:] == [None] * 5 and errors[3] is not None
    assert "founded" in errors[3] and "nineteen ninety" in errors[3] and "\n" not in errors[3]
    # The checkpoint keeps the answer as the service gave it; a rerun (even retrying failures) sends
    # nothing and reports the same.
    again = run_job(app, df, TWO, checkpoint=tmp_path / "cp", retry_failed=True)
    assert again["_error"].to_list() == errors and again["founded"].to_list() == out["founded"].to_list()
    assert app.stats()["runs_created"] == 6


class _MalformedOnce(Tap):
    """The first runs stream carries one event that is not JSON in place of its third event."""

    done = False

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        if is_runs_stream(method, path) and not self.done and nth_run(data) == 3:
            self.done = True
            return b'event: task_run.state\ndata: {"type": "task_run.state", "run": \n\n'
        return sse(data)


def test_a_malformed_event_is_read_again_from_the_last_cursor(tmp_path: Path) -> None:
    app = _MalformedOnce(create_app(EmulatorConfig(latency=0.05)))
    df = companies(10)
    stats = JobStats()
    out = run_job(app, df, CEO, checkpoint=tmp_path / "cp", stats=stats)
    assert app.done
    assert out["_status"].to_list() == ["completed"] * 10
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert app.runs_streams == stats.polls + 1  # one stream read again, not a poll lost
    assert app.stats()["runs_created"] == 10


class _CutListings(Tap):
    """Holds add-runs answers back (`delay`); cuts the first `cuts` runs streams in the middle of their
    seventh event, like a connection reset."""

    delay = 0.0
    cuts = 0

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if is_add_runs(method, path) and self.delay:
            await asyncio.sleep(self.delay)
        return body

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        raw = sse(data)
        if is_runs_stream(method, path) and self.cuts and nth_run(data) == 7:
            self.cuts -= 1
            raise Cut(raw[: len(raw) // 2])
        return raw


def test_in_doubt_add_is_reconciled_through_cut_listings(tmp_path: Path) -> None:
    app = _CutListings(create_app(EmulatorConfig(latency=0.05)))
    df = companies(30)
    # The add-runs call is carried out but the job ends before its answer arrives: 30 rows in doubt.
    app.delay = 5.0
    first = run_job(app, df, TWO, checkpoint=tmp_path / "cp", timeout=0.3)
    assert first["_status"].to_list() == ["pending"] * 30 and first["_run_id"].null_count() == 30
    assert app.stats()["runs_created"] == 30
    assert len(Checkpoint.read(tmp_path / "cp").in_doubt()) == 1
    # The reconciling listing and the first poll are both cut mid-event; both resume from their cursor.
    app.delay, app.cuts = 0.0, 2
    stats = JobStats()
    out = run_job(
        app, df, TWO, checkpoint=tmp_path / "cp", stats=stats, transport=StreamingASGITransport(app)
    )
    assert app.cuts == 0
    assert out["_status"].to_list() == ["completed"] * 30
    assert out["founded"].to_list() == expected(df, TWO, "founded")
    assert stats.reconciled == 30 and stats.submitted == 0 and stats.resubmitted_unknown == 0
    assert app.stats()["runs_created"] == 30 and app.stats()["duplicate_runs"] == 0


def test_in_doubt_rows_dropped_from_the_frame_are_recorded_not_collected(tmp_path: Path) -> None:
    """Rows whose add-runs answer was lost, then removed from the frame: their runs are found and
    recorded (they were paid for), but not collected into a job that no longer has them."""
    app = _CutListings(create_app(EmulatorConfig(latency=0.05)))
    df = companies(30)
    app.delay = 5.0
    run_job(app, df, TWO, checkpoint=tmp_path / "cp", timeout=0.3)  # 30 rows in doubt
    app.delay = 0.0
    seen: list[Any] = []
    stats = JobStats()
    out = run_job(app, df.head(10), TWO, checkpoint=tmp_path / "cp", stats=stats, progress=seen.append)
    assert out["_status"].to_list() == ["completed"] * 10
    assert stats.reconciled == 30 and stats.submitted == 0
    assert all(p.completed + p.failed + p.running + p.waiting <= p.total == 10 for p in seen), seen[-1]
    assert Checkpoint.read(tmp_path / "cp").runs == 30 and app.stats()["runs_created"] == 30
    # The 20 others, asked for again, are collected from their recorded runs: nothing is paid twice.
    again = run_job(app, df, TWO, checkpoint=tmp_path / "cp")
    assert again["_status"].to_list() == ["completed"] * 30
    assert app.stats()["runs_created"] == 30 and app.stats()["duplicate_runs"] == 0


# -- retries, credit, local failures ------------------------------------------------------------------


def _set_failure_rate(app: Any, rate: float) -> None:
    app.state.config = replace(app.state.config, failure_rate=rate)


def test_retry_failed_twice_makes_a_new_run_each_time(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=1.0))
    df = pl.concat([companies(5), companies(2)])  # 7 rows, 5 distinct
    cp = tmp_path / "cp"
    first = run_job(app, df, CEO, checkpoint=cp)
    second = run_job(app, df, CEO, checkpoint=cp, retry_failed=True)
    _set_failure_rate(app, 0.0)
    third = run_job(app, df, CEO, checkpoint=cp, retry_failed=True)
    assert first["_status"].to_list() == second["_status"].to_list() == ["failed"] * 7
    assert third["_status"].to_list() == ["completed"] * 7
    assert third["ceo"].to_list() == expected(df, CEO, "ceo")
    for a, b, c in zip(first["_run_id"], second["_run_id"], third["_run_id"], strict=True):
        assert len({a, b, c}) == 3
    assert app.stats()["runs_created"] == 15  # 5 distinct + 5 retried + 5 retried again
    assert Checkpoint.read(cp).runs == 15
    run_job(app, df, CEO, checkpoint=cp, retry_failed=True)  # nothing failed: nothing sent
    assert app.stats()["runs_created"] == 15


class _LoseThirdAdd(Tap):
    """The third add-runs call is answered 502 by a proxy: nothing is created."""

    adds = 0

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if is_add_runs(method, path):
            self.adds += 1
            if self.adds == 3:
                return 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return None


def test_a_lost_retry_never_adopts_an_older_failed_run(tmp_path: Path) -> None:
    app = _LoseThirdAdd(create_app(EmulatorConfig(latency=0.05, failure_rate=1.0)))
    df = companies(1)
    cp = tmp_path / "cp"
    first = run_job(app, df, CEO, checkpoint=cp)
    second = run_job(app, df, CEO, checkpoint=cp, retry_failed=True)
    stats = JobStats()
    # the third add is lost and never created: held for the commit horizon, then sent again
    third = run_job(app, df, CEO, checkpoint=cp, retry_failed=True, stats=stats, commit_horizon=0.3)
    assert app.adds >= 3
    old = {first["_run_id"][0], second["_run_id"][0]}
    assert third["_run_id"][0] not in old
    assert app.stats()["runs_created"] == 3
    assert stats.reconciled == 0


def test_credit_runs_out_mid_job_then_resume_pays_only_for_the_rest(tmp_path: Path) -> None:
    # A budget of 10 runs per 0.1 s makes adds of 10; lite costs $0.005 a run, so $0.101 buys two adds
    # and refuses the third.
    app = create_app(EmulatorConfig(latency=0.05, credit=0.101))
    df = pl.concat([companies(25), companies(5)])
    budget = {"run_rate": 10, "rate_window": 0.1, "checkpoint": tmp_path / "cp"}
    with pytest.raises(PaymentRequiredError):
        run_job(app, df, CEO, **budget)
    assert app.stats()["runs_created"] == 20
    read = Checkpoint.read(tmp_path / "cp")
    assert read.runs == 20 and read.in_doubt() == []
    app.state.credit_micro = None  # the account was topped up
    stats = JobStats()
    out = run_job(app, df, CEO, stats=stats, **budget)
    assert out["_status"].to_list() == ["completed"] * 30
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert stats.submitted == 5 and stats.reconciled == 0 and stats.resubmitted_unknown == 0
    assert app.stats()["runs_created"] == 25 and app.stats()["duplicate_runs"] == 0


def test_inputs_too_large_or_off_schema_fail_locally_and_are_never_sent(tmp_path: Path) -> None:
    spec = parse_output(CEO).task_spec()
    room = 25_000 - len(json.dumps(spec, separators=(",", ":")))
    # Inputs are sent as prompts (plain strings) so their size is exactly their length.
    texts = ["small", "x" * room, "y" * (room + 1), "z" * 100_000]
    df = pl.DataFrame({"text": texts})
    app = create_app(EmulatorConfig(latency=0.05))
    out = run_job(app, df, CEO, prompt="{text}", checkpoint=tmp_path / "cp")
    assert out["_status"].to_list() == ["completed", "completed", "failed", "failed"]
    assert out["_run_id"].to_list()[2:] == [None, None]
    for error in out["_error"].to_list()[2:]:
        assert "too large" in error and "25,000" in error
    assert app.stats()["runs_created"] == 2  # the row exactly at the limit was accepted by the service
    again = run_job(app, df, CEO, prompt="{text}", checkpoint=tmp_path / "cp", retry_failed=True)
    assert again["_status"].to_list() == out["_status"].to_list()
    assert app.stats()["runs_created"] == 2

    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    rows = pl.DataFrame({"year": [2001, None, 1999]})
    app2 = create_app(EmulatorConfig(latency=0.05))
    got = run_job(app2, rows, CEO, input_schema=schema, mode="runs")
    assert got["_status"].to_list() == ["completed", "failed", "completed"]
    assert got["_run_id"][1] is None and "input_schema" in got["_error"][1]
    assert app2.stats()["runs_created"] == 2


# -- runs mode ----------------------------------------------------------------------------------------


def test_runs_mode_timeout_then_resume_collects_without_new_runs(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.6))  # runs end 0.3 to 0.9 s after creation
    df = pl.concat([companies(12), companies(3)])
    first = run_job(app, df, TWO, mode="runs", checkpoint=tmp_path / "cp", timeout=0.15)
    assert first["_status"].to_list() == ["pending"] * 15
    assert first["_run_id"].null_count() == 0
    assert app.stats()["runs_created"] == 12
    stats = JobStats()
    second = run_job(app, df, TWO, mode="runs", checkpoint=tmp_path / "cp", stats=stats)
    assert second["_status"].to_list() == ["completed"] * 15
    assert second["_run_id"].to_list() == first["_run_id"].to_list()
    assert second["founded"].to_list() == expected(df, TWO, "founded")
    assert stats.submitted == 0 and app.stats()["runs_created"] == 12
    # collected by reading the group's runs, not row by row
    assert app.stats()["requests"].get("GET /v1/tasks/groups/{taskgroup_id}/runs", 0) >= 1


def test_runs_mode_failed_runs_and_retry_failed(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=1.0))
    df = companies(8)
    cp = tmp_path / "cp"
    first = run_job(app, df, CEO, mode="runs", checkpoint=cp)
    assert first["_status"].to_list() == ["failed"] * 8
    assert all(e.startswith("Task execution failed") for e in first["_error"])
    assert first["ceo"].null_count() == 8
    run_job(app, df, CEO, mode="runs", checkpoint=cp)  # failures are kept: nothing is sent
    assert app.stats()["runs_created"] == 8
    _set_failure_rate(app, 0.0)
    retried = run_job(app, df, CEO, mode="runs", checkpoint=cp, retry_failed=True)
    assert retried["_status"].to_list() == ["completed"] * 8
    assert retried["ceo"].to_list() == expected(df, CEO, "ceo")
    assert set(retried["_run_id"]).isdisjoint(set(first["_run_id"]))
    assert app.stats()["runs_created"] == 16
    assert app.stats()["requests"]["POST /v1/tasks/groups"] == 1  # the retry reuses the job's group


# -- Ctrl-C -------------------------------------------------------------------------------------------

_WORKER = """
import sys
import polars as pl
from enrich._engine import enrich

def sink(p):
    print("progress", p.completed, p.failed, flush=True)

base_url, api_key, checkpoint = sys.argv[1:4]
print("ready", flush=True)
sys.stdin.readline()  # the test sends "go" once the runs are created
enrich(
    pl.DataFrame({"company": [f"Company {i}" for i in range(400)]}),
    {"ceo": "Name of the current CEO"},
    processor="lite",
    checkpoint=checkpoint,
    api_key=api_key,
    base_url=base_url,
    progress=sink,
)
print("finished", flush=True)
"""


def test_ctrl_c_mid_collection_flushes_every_outcome(tmp_path: Path) -> None:
    df = companies(400)
    cp = tmp_path / "cp"
    with Emulator(latency=1.5) as emu:
        kw = {"api_key": emu.api_key, "base_url": emu.url, "processor": "lite", "progress": False}
        # The worker starts first and waits, so its imports (seconds on a loaded machine) are not paid
        # while the runs end: otherwise it could find every run ended and collect them in one read.
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, emu.url, emu.api_key, str(cp)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        # Submit everything first (runs end 0.75 to 2.25 s later), so the subprocess only collects.
        first = asyncio.run(aenrich(df, CEO, checkpoint=cp, timeout=0.3, **kw))
        assert first["_status"].to_list() == ["pending"] * 400
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout is not None
        reported = 0
        for line in proc.stdout:
            if line.startswith("progress"):
                reported = int(line.split()[1])
                if reported > 0:
                    break
        assert 0 < reported < 400, "the worker reported no collected row before the job finished"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest, err = proc.communicate(timeout=10)
        took = time.monotonic() - sent
        assert "finished" not in rest
        assert took < 3.0, took
        assert proc.returncode in (-signal.SIGINT, 130, 1), (proc.returncode, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines and lines[-1] == "KeyboardInterrupt", err[-2000:]
        # Nothing failed on the way out (the chained context of that traceback is pinned below).
        assert "Exception ignored" not in err and "Error:" not in err.replace("RuntimeError:", ""), err
        # Every outcome collected before the signal was flushed (400 rows buffer, never reaching the
        # 1,000-row flush: only the close on the way out wrote them).
        saved = Checkpoint.read(cp).counts()
        assert reported <= saved.completed < 400, (reported, saved)
        assert saved.runs == 400 and saved.in_doubt == 0
        stats = JobStats()
        out = asyncio.run(aenrich(df, CEO, checkpoint=cp, stats=stats, **kw))
        emulated = emu.stats()
    assert out["_status"].to_list() == ["completed"] * 400
    assert out["ceo"].to_list() == expected(df, CEO, "ceo")
    assert stats.already_done == saved.completed and stats.submitted == 0
    assert emulated["runs_created"] == 400 and emulated["duplicate_runs"] == 0


def test_errors_of_the_sync_entry_point_are_not_chained_to_the_loop_probe() -> None:
    with pytest.raises(UsageError) as info:
        enrich(companies(2), CEO, processor="turbo", api_key="k", progress=False)
    assert info.value.__context__ is None, repr(info.value.__context__)
