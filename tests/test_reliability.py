"""The fault matrix (`tests/fault_matrix.py`, issue 5), asserted case by case, plus what it found.

The selected cases run once per session, a few at a time in worker processes (each its own emulator over
real HTTP on 127.0.0.1); each test then asserts one case's expectations. The checks are shown able to
fail: a wrong answer, a forgotten reconciliation and a limiter that does not back off are each caught.
`/work/venv/bin/python tests/fault_matrix.py --report docs/reliability.md` reruns the same matrix and
writes the report.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import polars as pl
import pytest
from _fakes import Tap, is_runs_stream, sse
from fault_matrix import (
    CASES,
    MAX_429_FLOOR,
    MAX_429_LEARNING,
    MAX_429_SHARE,
    Case,
    Result,
    run_all,
    run_case,
)

from enrich import EmulatorConfig, RateLimiter, create_app
from enrich._client import TaskClient
from enrich._engine import JobStats, aenrich
from enrich._engine import reconcile as reconcile_stage
from enrich._engine import submit as submit_stage
from enrich._engine.job import _Job
from enrich._exceptions import RateLimitError
from enrich._limiter import VirtualTimeLoop
from enrich._retry import RetryPolicy

_BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest) -> dict[str, Result]:
    """The results of the matrix cases this session selected, run together."""
    chosen = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec and "case" in callspec.params:
            chosen.append(callspec.params["case"])
    return {result.case.id: result for result in run_all(chosen)}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_fault_matrix(case: Case, matrix: dict[str, Result]) -> None:
    r = matrix[case.id]
    assert r.error is None, r.error
    assert r.correct == r.rows, r.problems
    if case.duplicates:  # committed past the horizon: counted, recorded, never joined (rows checked above)
        assert r.duplicate_runs > 0, "no duplicate was made"
        assert r.counted_duplicates == r.recorded_duplicates == r.duplicate_runs, r.problems
        assert r.runs_created == r.distinct + r.duplicate_runs, r.problems
    else:
        assert r.runs_created == r.distinct and r.duplicate_runs == 0, (r.runs_created, r.distinct)
    assert r.rate_limited_late <= max(MAX_429_SHARE * r.requests, MAX_429_FLOOR), r.problems
    assert r.rate_limited - r.rate_limited_late <= max(MAX_429_LEARNING, MAX_429_SHARE * r.requests), (
        r.problems
    )
    assert case.fault == "none" or r.injected > 0, "nothing was injected"
    assert r.passed, r.problems  # and whatever else the runner judged


def test_the_matrix_covers_the_issue() -> None:
    names = {case.name for case in CASES}
    for want in (
        "429-requests",
        "429-requests-no-retry-after",
        "429-runs",
        "html-5xx",
        "drop",
        "slow",
        "lost-create",
        "sse-cut",
        "malformed-json",
        "unknown-status",
        "schema-break",
        "failed-runs",
        "queued-past-timeout",
    ):
        assert want in names
        assert {c.mode for c in CASES if c.name == want} == {"group", "runs"}, want


# -- the checks can fail --------------------------------------------------------------------------------


class _WrongAnswer(Tap):
    """The runs stream hands the second run created another company's CEO."""

    hits = 0

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        output = data.get("output")
        # A runs-stream event id holds the run's creation position (as in test_engine_edges.nth_run).
        if is_runs_stream(method, path) and output and int(str(data["event_id"])[1:11]) == 2:
            output["content"]["ceo"] = "Someone Else"
            self.hits += 1
        return sse(data)


def test_a_row_with_someone_elses_answer_is_caught() -> None:
    r = run_case(Case("wrong-answer", "group", "a wrong CEO", "tap", tap=_WrongAnswer, rows=30))
    assert r.error is None and r.correct == r.rows - 1, r.problems
    assert not r.passed and "1 rows wrong" in r.problems[0]


def test_a_lost_create_paid_twice_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    async def forgetful(job: _Job, group_id: str, keys: Any) -> dict[str, str]:
        return {}  # never finds the runs of a lost answer: they are created again

    for stage in (reconcile_stage, submit_stage):
        monkeypatch.setattr(stage, "reconcile", forgetful)
    monkeypatch.setattr(_Job, "claim", lambda self, key, run, group_id: "settled")  # nor adopts them late
    lost = {"faults": {"lost_create"}, "fault_rate": 0.5}  # some adds get through, so the job ends
    r = run_case(Case("lost-forgotten", "group", "lost answers, never reconciled", "lost_create", lost))
    assert r.extra_runs > 0 and not r.passed
    assert any("distinct inputs" in p for p in r.problems), r.problems


def test_a_limiter_that_does_not_back_off_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RateLimiter, "rate_limited", lambda self, retry_after=None, grant=None: None)
    r = run_case(_BY_ID["429-requests[runs]"])
    assert any("hammering" in p or "did not learn" in p for p in r.problems), r.problems


# -- regressions ------------------------------------------------------------------------------------------


def test_an_add_larger_than_the_run_quota_is_split_not_retried_forever() -> None:
    """Guards a fixed bug: group mode sized every add-runs call by the engine's run budget; when the
    service's run quota was smaller, the call could never fit, the client retried it (each after the
    server's Retry-After) until it gave up, and the job died with RateLimitError having sent nothing.
    Now a refused add comes back to the engine, which sends it again in halves."""
    app = create_app(EmulatorConfig(latency=0.05, run_rate_limit=10, rate_limit=None, rate_window=0.2))
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(40)]})
    stats = JobStats()
    out = asyncio.run(
        aenrich(
            df,
            {"ceo": "CEO"},
            processor="lite",
            api_key="k",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            progress=False,
            run_rate=25,  # batches of 25 against a quota of 10 runs per window
            rate_window=0.2,
            timeout=10,
            stats=stats,
        )
    )
    assert out["_status"].to_list() == ["completed"] * 40
    emulated = app.stats()
    assert emulated["runs_created"] == 40 and emulated["duplicate_runs"] == 0
    # one refusal per split (25, 12), a gap filled, then the pause that measures the quota: not 100
    assert emulated["rate_limited"] <= 6, emulated["rate_limited"]


def test_add_runs_hands_a_429_back_when_asked() -> None:
    calls: list[tuple[float, httpx.Request]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((asyncio.get_running_loop().time(), request))
        if len(calls) == 1:
            body = {"type": "error", "error": {"ref_id": "r", "message": "slow down", "detail": None}}
            return httpx.Response(429, json=body, headers={"Retry-After": "30"})
        return httpx.Response(200, json={"run_ids": ["trun_1", "trun_2"], "status": {}})

    async def add(retry: bool) -> Any:
        limiter = RateLimiter(1000, 1000)
        async with TaskClient(
            "k",
            base_url="http://api.test",
            transport=httpx.MockTransport(handler),
            limiter=limiter,
            retry=RetryPolicy.no_wait(),
        ) as client:
            inputs = [{"input": "a", "processor": "lite"}, {"input": "b", "processor": "lite"}]
            try:
                return await client.add_runs("tgrp_1", inputs, retry_rate_limited=retry)
            except RateLimitError as exc:
                return exc

    def run_virtual(retry: bool) -> Any:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            return runner.run(add(retry))

    refused = run_virtual(False)
    assert isinstance(refused, RateLimitError) and refused.retry_after == 30
    assert len(calls) == 1  # not retried
    calls.clear()
    added = run_virtual(True)
    # the default: retried (at once: refused with nothing else in the window, the call may be too big
    # for the service's burst, and the limiter splits rather than pauses; the engine sends adds of many
    # without retries, and sends them again smaller)
    assert added.run_ids == ("trun_1", "trun_2") and len(calls) == 2
    assert json.loads(calls[-1][1].content)["inputs"][1]["input"] == "b"
