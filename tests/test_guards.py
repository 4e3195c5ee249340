"""Guards for behaviour the rest of the suite let through: each test here fails when the code it names is
broken on purpose (the mutation is in its docstring), where the whole suite used to pass.

- runs mode: an outcome on disk never precedes its run's receipt (`_Job.push_outcomes`);
- `RateLimiter.settle`: a run-creating request counts in the window from its answer, not its grant;
- add-runs answering fewer run ids than inputs; `_first_leaf`; Ctrl-C through the sync bridge's thread;
  giving up after the outage limit; a full disk in runs mode; a create whose connection never opened.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import polars as pl
import pytest
from _fakes import FullDisk, StreamingASGITransport, Tap, is_add_runs
from hypothesis import given, settings
from hypothesis import strategies as st

from enrich import APIStatusError, EmulatorConfig, create_app, enrich
from enrich._checkpoint import Checkpoint, Receipt
from enrich._client import TaskClient
from enrich._engine import KEY_FIELD, JobStats, aenrich
from enrich._engine.job import _Job
from enrich._engine.pipeline import _first_leaf
from enrich._engine.prepare import _prepare
from enrich._engine.submit import _Committer
from enrich._exceptions import (
    CheckpointError,
    OutcomeUnknownError,
    RateLimitError,
    ServerError,
    TransportError,
    ValidationError,
)
from enrich._limiter import RateLimiter, VirtualTimeLoop
from enrich._models import TaskOutput, TaskRun
from enrich._retry import RetryPolicy

T = TypeVar("T")
CEO = {"ceo": "Name of the current CEO"}
GROUP = "tgrp_guards"


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def on_virtual_time(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def vnow() -> float:
    return asyncio.get_running_loop().time()


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - vnow()))


def plan_of(rows: int, mode: str) -> Any:
    return _prepare(
        companies(rows),
        CEO,
        columns=None,
        prompt=None,
        input_schema=None,
        metadata=None,
        processor="lite",
        mode=mode,
    )


def job_on(plan: Any, cp: Checkpoint) -> _Job:
    """A `_Job` of `plan` on `cp`, with no client: for tests that drive its bookkeeping by hand."""
    job = _Job(
        plan,
        cp,
        None,  # type: ignore[arg-type]
        RateLimiter(),
        retry_failed=False,
        sink=None,
        stats=JobStats(),
        concurrency=1,
    )
    job.load()
    return job


# -- runs mode: a receipt reaches disk no later than its run's outcome -----------------------------------


def test_runs_mode_outcome_never_reaches_disk_before_its_receipt(tmp_path: Path) -> None:
    """Mutation caught: `committer.flush_receipts()` deleted from `_Job.push_outcomes`.

    A create's receipt waits in the committer's buffer (it goes with the next intents write); its run
    ends at once and its outcome is pushed, and flushed (flush_rows=1), before that write; then the
    process dies as on SIGKILL. The reopened checkpoint must know the run by its receipt, with its
    outcome: an outcome whose receipt was lost counts for nothing and leaves the row in doubt.
    """
    path = tmp_path / "cp"
    plan = plan_of(1, "runs")
    key = plan.keys[0]
    run_id = "trun_" + "a" * 32

    async def scenario() -> None:
        cp = Checkpoint.open(path, plan.fingerprint, flush_rows=1)
        job = job_on(plan, cp)
        cp.record_group(GROUP)
        job.committer = committer = _Committer(cp)
        batch_id = uuid.uuid4().hex
        await committer.intent(batch_id, GROUP, key)  # durable before the create is sent
        # The create answered: create_one() buffers the receipt and adopts the run.
        committer.receipt(
            Receipt(
                row_key=key, run_id=run_id, group_id=GROUP, batch_id=batch_id, created_at=datetime.now(UTC)
            )
        )
        job._adopt(key, run_id, GROUP)
        assert committer.buffered == 1
        run = TaskRun(run_id=run_id, status="completed", is_active=False, metadata={KEY_FIELD: key})
        job.finish(key, run, TaskOutput("json", {"ceo": "Ada"}))
        job.push_outcomes()  # what a poll does at its end
        cp._abandon()  # SIGKILL: nothing more is written

    asyncio.run(scenario())
    names = sorted(os.listdir(path))
    seq: dict[str, list[int]] = {"receipts": [], "outcomes": []}
    for name in names:
        if match := re.match(r"(receipts|outcomes)-(\d+)", name):
            seq[match[1]].append(int(match[2]))
    assert seq["outcomes"], names  # the outcome did reach disk ...
    assert seq["receipts"] and min(seq["receipts"]) < min(seq["outcomes"]), names  # ... after its receipt
    saved = Checkpoint.read(path)
    state = saved.state()
    assert state.select("row_key", "run_id", "status").rows() == [(key, run_id, "completed")]
    assert saved.in_doubt() == [] and saved.runs == 1


# -- RateLimiter.settle ----------------------------------------------------------------------------------


def test_a_run_creating_grant_counts_in_the_window_from_its_answer() -> None:
    """Mutation caught: `RateLimiter.settle()` made a no-op (the next create would go at t=60, and reach
    a server that counted the first one at up to t=5 inside its window). Also guards that a GET's grant
    is not moved (its slot frees at t=60 whatever its answer took)."""

    async def main() -> tuple[float, float]:
        runs = RateLimiter(requests_per_minute=100, runs_per_minute=1, period=60.0)
        grant = await runs.acquire(1)
        await sleep_until(5.0)
        runs.settle(grant)  # answered at t=5
        await runs.acquire(1)
        next_create = vnow()
        gets = RateLimiter(requests_per_minute=1, runs_per_minute=1, period=60.0)
        start = vnow()
        grant = await gets.acquire(0)
        await sleep_until(start + 5.0)
        gets.settle(grant)
        await gets.acquire(0)
        return next_create, vnow() - start

    next_create, next_get = on_virtual_time(main())
    assert next_create == 65.0
    assert next_get == 60.0


def _max_in_window(times: list[tuple[float, int]], period: float) -> int:
    """The largest total weight of (time, weight) pairs in any window [t, t + period)."""
    times = sorted(times)
    best = total = lo = 0
    for t, weight in times:
        total += weight
        while times[lo][0] + period <= t:
            total -= times[lo][1]
            lo += 1
        best = max(best, total)
    return best


_requests = st.tuples(
    st.floats(0, 30).map(lambda t: round(t, 1)),  # when the request is wanted
    st.integers(0, 6),  # runs it creates (0: a GET)
    st.floats(0, 9.9).map(lambda t: round(t, 1)),  # how long its answer takes (< period)
)


@settings(max_examples=100, deadline=None)
@given(
    requests_budget=st.integers(1, 6),
    runs_budget=st.integers(6, 15),
    workers=st.lists(st.lists(_requests, min_size=1, max_size=6), min_size=1, max_size=5),
    congestion=st.lists(st.tuples(st.floats(0, 40), st.none() | st.floats(0, 5)), max_size=2),
)
def test_no_window_counted_from_the_answers_holds_more_than_either_budget(
    requests_budget: int,
    runs_budget: int,
    workers: list[list[tuple[float, int, float]]],
    congestion: list[tuple[float, float | None]],
) -> None:
    """Sibling of test_limiter's window property, with `settle`: each run-creating request is counted when
    it is answered (the latest the server can have counted it), each GET when it is granted; in every
    window of `period` counted that way both budgets hold (answers take less than a period).

    Mutation caught: `settle()` made a no-op."""
    period = 10.0

    async def main() -> list[tuple[float, int]]:
        limiter = RateLimiter(requests_budget, runs_budget, period=period)
        counted: list[tuple[float, int]] = []

        async def worker(plan: list[tuple[float, int, float]]) -> None:
            for start, runs, answer in plan:
                await sleep_until(start)
                grant = await limiter.acquire(runs)
                if runs == 0:
                    counted.append((vnow(), 0))
                await asyncio.sleep(answer)
                limiter.settle(grant)
                limiter.succeeded()
                if runs:
                    counted.append((vnow(), runs))

        async def server(t: float, retry_after: float | None) -> None:
            await sleep_until(t)
            limiter.rate_limited(retry_after)

        async with asyncio.TaskGroup() as tg:
            for plan in workers:
                tg.create_task(worker(plan))
            for t, retry_after in congestion:
                tg.create_task(server(t, retry_after))
        return counted

    counted = on_virtual_time(main())
    assert len(counted) == sum(len(plan) for plan in workers)
    assert _max_in_window([(t, 1) for t, _ in counted], period) <= requests_budget
    assert _max_in_window(counted, period) <= runs_budget


# -- add-runs answering fewer run ids than inputs --------------------------------------------------------


class _ShortAnswer(Tap):
    """Carries out the first add-runs call, then answers it with one run id fewer than it created."""

    cut = True

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if is_add_runs(method, path) and status == 200 and self.cut:
            self.cut = False
            data = json.loads(body)
            data["run_ids"] = data["run_ids"][:-1]
            return json.dumps(data).encode()
        return body


def test_an_add_answering_too_few_run_ids_ends_the_job_and_adopts_nothing(tmp_path: Path) -> None:
    """Mutation caught: the `len(answer.run_ids) != len(batch)` check in `_Job.add_batch` removed (the
    job then ends on a bare `ValueError` from zip(strict=True)), or kept with zip(strict=False) (two rows
    would be recorded with runs that may answer other rows).

    The add's runs exist but the answer cannot say which is which: nothing is recorded as a receipt, the
    add stays in doubt, and the rerun finds the runs by their metadata and pays for nothing again."""
    app = _ShortAnswer(create_app(EmulatorConfig(latency=0.05)))
    cp = tmp_path / "cp"
    kw: dict[str, Any] = {
        "processor": "lite",
        "checkpoint": cp,
        "api_key": "k",
        "base_url": "http://emulator",
        "progress": False,
        "timeout": 20,  # a broken engine ends with rows pending, not a hung suite
    }
    df = companies(3)
    with pytest.raises(APIStatusError, match="add-runs answered 2 run ids for 3 inputs") as info:
        asyncio.run(aenrich(df, CEO, transport=httpx.ASGITransport(app=app), **kw))
    assert info.value.status == 200
    saved = Checkpoint.read(cp)
    assert saved.state(outputs=False).height == 0 and saved.runs == 0  # nothing adopted
    assert [sorted(i.row_keys) for i in saved.in_doubt()] == [sorted(plan_of(3, "group").keys)]
    out = asyncio.run(aenrich(df, CEO, transport=httpx.ASGITransport(app=app), **kw))
    assert out["_status"].to_list() == ["completed"] * 3
    assert app.stats()["runs_created"] == 3 and app.stats()["duplicate_runs"] == 0


# -- _first_leaf -----------------------------------------------------------------------------------------


def test_first_leaf_unwraps_nested_groups_and_skips_cancellations() -> None:
    """Mutations caught: `_first_leaf` not recursing into nested groups, or not skipping cancellations
    (aenrich would then raise a CancelledError or an ExceptionGroup instead of the job's error)."""
    error = ValueError("the job's error")
    nested = BaseExceptionGroup(
        "outer",
        [
            asyncio.CancelledError(),
            BaseExceptionGroup("collectors", [asyncio.CancelledError(), ExceptionGroup("creators", [error])]),
            RuntimeError("later"),
        ],
    )
    assert _first_leaf(nested) is error
    only = asyncio.CancelledError()
    assert _first_leaf(BaseExceptionGroup("g", [BaseExceptionGroup("h", [only])])) is only


# -- Ctrl-C through the sync bridge's worker thread ------------------------------------------------------


def test_ctrl_c_in_a_running_loop_cancels_the_job_and_flushes_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutations caught (with the bug below fixed): `_run_in_thread` not cancelling the job on
    KeyboardInterrupt (the job runs to its end), or not waiting for the job's thread before re-raising
    (the checkpoint is still open, and locked, when the caller sees the interrupt); aenrich abandoning
    its checkpoint instead of closing it (the answers collected are lost).

    `enrich()` is called from inside a running event loop, as in a notebook cell, so it runs the job on
    a worker thread. SIGINT reaches the calling thread once some answers are collected (reported by the
    progress callback, on the job's thread)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not the default KeyboardInterrupt handler here")
    monkeypatch.setattr("enrich._engine.collect._POLL_MIN_ENDED", 1)  # poll as runs end: answers trickle in
    real_close = Checkpoint.close

    def slow_close(self: Checkpoint, **kwargs: Any) -> None:
        time.sleep(0.2)  # a flush of many answers takes a moment: the caller must wait it out
        real_close(self, **kwargs)

    monkeypatch.setattr(Checkpoint, "close", slow_close)
    app = Tap(create_app(EmulatorConfig(latency=1.0, seed=5)))
    cp = tmp_path / "cp"
    rows = 40
    reported: list[int] = []
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def sink(progress: Any) -> None:
        reported.append(progress.completed)
        if progress.completed and len(reported) < 10_000 and not getattr(sink, "sent", False):
            sink.sent = True  # type: ignore[attr-defined]
            signal.pthread_kill(main_thread, signal.SIGINT)

    async def notebook_cell() -> Any:
        return enrich(
            companies(rows),
            CEO,
            processor="lite",
            checkpoint=cp,
            api_key="k",
            base_url="http://emulator",
            transport=StreamingASGITransport(app),
            progress=sink,
        )

    loop = asyncio.new_event_loop()  # a notebook's loop: no SIGINT handler of its own
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(notebook_cell())
    finally:
        loop.close()
    took = time.monotonic() - started
    collected = max(reported)
    assert 0 < collected < rows, reported
    assert took < 1.5, took  # runs end 0.5-1.5 s after creation: the job did not wait for them
    # The job's thread closed the checkpoint before the interrupt reached us: it opens for writing (the
    # lock is free) and holds every answer reported, and a receipt for every run created.
    with Checkpoint.open(cp, plan_of(rows, "group").fingerprint) as reopened:
        counts = reopened.counts()
    assert collected <= counts.completed < rows, (collected, counts)
    assert counts.runs == app.stats()["runs_created"] == rows and counts.in_doubt == 0


# -- the outage limit of `_Job.patiently` ----------------------------------------------------------------


def test_reads_give_up_after_the_outage_limit_and_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation caught: the `now - first_failure > _OUTAGE_SECONDS` give-up removed from `_Job.patiently`
    (the read then retries forever; here the virtual-time budget of an hour runs out)."""
    monkeypatch.setattr("enrich._engine.job._OUTAGE_SECONDS", 120.0)
    # The engine's clock is the loop's: virtual time, like its backoff sleeps.
    monkeypatch.setattr(
        "enrich._engine.job.time", SimpleNamespace(monotonic=lambda: asyncio.get_running_loop().time())
    )
    job = SimpleNamespace(report=lambda *args, **kwargs: None)  # all `patiently` needs of its job
    down = [
        TransportError("ConnectError"),
        ServerError("bad gateway", status=502),
        RateLimitError("slow down", status=429),
    ]

    async def outage(until: float) -> Any:
        calls: list[float] = []

        async def call() -> str:
            calls.append(vnow())
            if vnow() < until:
                raise down[len(calls) % len(down)]
            return "answer"

        async with asyncio.timeout(3600):
            try:
                return await _Job.patiently(job, call, "reading"), calls  # type: ignore[arg-type]
            except Exception as exc:
                return exc, calls

    answer, calls = on_virtual_time(outage(until=100.0))  # back before the limit: the answer
    assert answer == "answer" and calls[-1] >= 100.0
    error, calls = on_virtual_time(outage(until=float("inf")))  # down for good
    assert isinstance(error, (TransportError, ServerError, RateLimitError)), error
    assert 120.0 < calls[-1] <= 120.0 + 60.0, calls  # gave up at the first failure past the limit
    assert calls[-2] - calls[0] <= 120.0
    refused, calls = on_virtual_time(_refused_at_once(job))
    assert isinstance(refused, ValidationError) and len(calls) == 1


async def _refused_at_once(job: Any) -> tuple[Exception, list[float]]:
    calls: list[float] = []

    async def call() -> None:
        calls.append(vnow())
        raise ValidationError("refused", status=422)

    try:
        await _Job.patiently(job, call, "reading")
    except Exception as exc:
        return exc, calls
    raise AssertionError("a refused read was retried into an answer")


# -- a full disk in runs mode ----------------------------------------------------------------------------


class _FullDisk(FullDisk):
    """The checkpoint's disk fills up at the `after`-th write (0-based) of segment kind `kind` (see
    `_fakes.FullDisk`); `sent_after` counts add-runs requests sent once writes failed."""

    def __init__(self, checkpoint: Path, kind: str, after: int) -> None:
        super().__init__(checkpoint, kind, after)
        self.sent_after = 0


class _Counting(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, disk: _FullDisk) -> None:
        self.inner, self.disk = inner, disk

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if is_add_runs(request.method, request.url.path) and self.disk.failing:
            self.disk.sent_after += 1
        return await self.inner.handle_async_request(request)


def _runs_mode_job_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, after: int
) -> tuple[Any, dict[str, Any], _FullDisk, list[Checkpoint]]:
    """A 30-row runs-mode job whose checkpoint writes fail from the `after`-th write of `kind` on; returns
    the emulator, the job's arguments, the disk, and the checkpoints the job opened."""
    app = create_app(EmulatorConfig(latency=0.05, seed=2))
    cp = tmp_path / "cp"
    kw: dict[str, Any] = {
        "processor": "lite",
        "mode": "runs",
        "concurrency": 4,
        "checkpoint": cp,
        "api_key": "k",
        "base_url": "http://emulator",
        "progress": False,
        "timeout": 20,  # a broken engine ends with rows pending, not a hung suite
    }
    disk = _FullDisk(cp, kind, after)
    opened: list[Checkpoint] = []
    real_open = Checkpoint.open.__func__  # type: ignore[attr-defined]

    def tracked(cls: type[Checkpoint], *args: Any, **kwargs: Any) -> Checkpoint:
        opened.append(real_open(cls, *args, **kwargs))
        return opened[-1]

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "open", classmethod(tracked))
        patch.setattr("enrich._store.os.replace", disk.replace)
        patch.setattr("enrich._store.os.link", disk.link)
        patch.setattr("enrich._store.os.fsync", disk.fsync)
        transport = _Counting(httpx.ASGITransport(app=app), disk)
        with pytest.raises(CheckpointError, match=os.strerror(errno.ENOSPC)):
            asyncio.run(aenrich(companies(30), CEO, transport=transport, **kw))
    return app, kw, disk, opened


@pytest.mark.parametrize(
    ("kind", "after"),
    [
        ("intents", 2),  # a group commit of intents: its creates must not be sent
        ("receipts", 1),  # receipts of runs that exist: their intents stay in doubt
    ],
)
def test_full_disk_in_runs_mode_stops_sending_and_the_rerun_pays_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, after: int
) -> None:
    """Mutations caught: `_Committer._write` letting its creates go although their intents write failed
    (`set_result` for `set_exception`), or `create_one` not awaiting its intent (sent before it is
    durable). Either sends creates on a full disk; the first also leaves runs no intent covers, and
    the rerun pays for them twice.

    The rerun is a new process's: the job's checkpoint is released as the process's exit would (see
    the next test for why that is needed in this process)."""
    app, kw, disk, opened = _runs_mode_job_on_a_full_disk(tmp_path, monkeypatch, kind, after)
    assert disk.failing
    created = app.stats()["runs_created"]
    assert 0 < created < 30
    assert disk.sent_after == 0  # not one create was sent once the checkpoint could not be written
    counts = Checkpoint.read(kw["checkpoint"]).counts()
    assert counts.runs <= created <= counts.runs + counts.in_doubt, (counts, created)
    for cp in opened:
        cp._abandon()  # the process ends: the kernel drops its lock
    out = asyncio.run(aenrich(companies(30), CEO, transport=httpx.ASGITransport(app=app), **kw))
    assert out["_status"].to_list() == ["completed"] * 30
    assert app.stats()["runs_created"] == 30 and app.stats()["duplicate_runs"] == 0


def test_after_a_full_disk_in_runs_mode_the_same_process_can_run_the_job_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, kw, _, _ = _runs_mode_job_on_a_full_disk(tmp_path, monkeypatch, "receipts", 1)
    out = asyncio.run(aenrich(companies(30), CEO, transport=httpx.ASGITransport(app=app), **kw))
    assert out["_status"].to_list() == ["completed"] * 30
    assert app.stats()["runs_created"] == 30 and app.stats()["duplicate_runs"] == 0


# -- a create whose connection never opened --------------------------------------------------------------


@pytest.mark.parametrize("error", [httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ConnectError])
@pytest.mark.parametrize("call", ["add_runs", "create_run"])
def test_a_create_that_never_connected_is_retried_not_in_doubt(error: type[Exception], call: str) -> None:
    """Mutation caught: ConnectTimeout or PoolTimeout taken out of `_NOT_SENT` in enrich/_client.py (the
    create would raise OutcomeUnknownError and cost a reconciling read of the whole group). A read
    timeout, which may come after the service carried the request out, stays in doubt."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if len(sent) == 1:
            raise error("no connection", request=request)
        if request.url.path.endswith("/runs") and "/groups/" in request.url.path:
            return httpx.Response(200, json={"run_ids": ["trun_1"], "status": {}})
        return httpx.Response(202, json={"run_id": "trun_1", "status": "queued", "is_active": True})

    async def create(transport: httpx.AsyncBaseTransport) -> Any:
        async with TaskClient(
            "k", base_url="http://api.test", transport=transport, retry=RetryPolicy.no_wait()
        ) as c:
            if call == "add_runs":
                return (await c.add_runs(GROUP, [{"input": "x", "processor": "lite"}])).run_ids
            return (await c.create_run("x", "lite")).run_id

    answer = asyncio.run(create(httpx.MockTransport(handler)))
    assert answer in (("trun_1",), "trun_1") and len(sent) == 2

    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    with pytest.raises(OutcomeUnknownError):
        asyncio.run(create(httpx.MockTransport(read_timeout)))
