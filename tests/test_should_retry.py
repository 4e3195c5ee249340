"""The service's `x-should-retry` header against the emulator (issue 13): a job meets answers it is told
not to retry, and creates whose lost answers it is told to retry, and still pays for each input once and
joins each row's own answer (the emulator's `no_retry` fault and `should_retry_header`). The client's
decision itself: `test_client.py`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import EmulatorConfig, JobStats, create_app
from enrich._emulator.synth import synth_output
from enrich._engine import aenrich
from enrich._inputs import build_inputs
from enrich._schema import parse_output

CEO = {"ceo": "Name of the current CEO"}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def run_job(app: Any, data: pl.DataFrame, **kw: Any) -> pl.DataFrame:
    kw.setdefault("progress", False)
    # Adds of 4 runs, a few a second: group mode then makes several creates, as runs mode does.
    kw.setdefault("run_rate", 4)
    kw.setdefault("rate_window", 0.1)
    out = asyncio.run(
        aenrich(
            data,
            CEO,
            api_key="test-key",
            processor="lite",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            **kw,
        )
    )
    assert isinstance(out, pl.DataFrame)
    return out


def own_answers(out: pl.DataFrame, df: pl.DataFrame, app: Any) -> None:
    """Every row completed with the answer of its own input, from a run created for that input."""
    assert out["_status"].to_list() == ["completed"] * df.height, out["_error"].drop_nulls().to_list()[:3]
    schema = parse_output(CEO).task_spec()["output_schema"]
    assert out["ceo"].to_list() == [
        synth_output(i, schema, processor="lite")[0]["ceo"] for i in build_inputs(df)
    ]
    runs = app.state.runs
    for row in out.iter_rows(named=True):
        assert json.loads(runs[row["_run_id"]].body)["input"] == {"company": row["company"]}


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_answers_said_not_to_retry_lose_nothing_and_pay_nothing_twice(tmp_path: Path, mode: str) -> None:
    # 503 + x-should-retry: false, nothing done: the client does not send it again itself; a read is
    # ridden out by the job, a create is found not to exist (reconciled), then sent again.
    app = create_app(EmulatorConfig(latency=0.05, fault_rate=0.2, faults=frozenset({"no_retry"}), seed=4))
    df = companies(24)
    stats = JobStats()
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode, commit_horizon=0.2, stats=stats)
    own_answers(out, df, app)
    assert app.stats()["faults"]["no_retry"] > 0
    assert app.stats()["runs_created"] == df.height  # each input paid for once
    assert stats.runs_total == df.height


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_a_lost_create_the_service_says_to_retry_is_reconciled_not_sent_blindly(
    tmp_path: Path, mode: str
) -> None:
    # lost_create: the runs are created, the answer is a 502 carrying x-should-retry: true. Sending the
    # create again as told would pay for every run twice; the job reads the group first.
    app = create_app(
        EmulatorConfig(
            latency=0.05,
            fault_rate=0.5,  # (of every request: enough creates among them lose their answer)
            faults=frozenset({"lost_create", "html_5xx"}),
            should_retry_header=True,
            seed=2,
        )
    )
    df = companies(48)
    stats = JobStats()
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode, commit_horizon=0.2, stats=stats)
    own_answers(out, df, app)
    # (found by reading the group at once, or adopted when it appeared while the row was held)
    assert app.stats()["faults"]["lost_create"] > 0 and stats.reconciled + stats.found_late > 0
    assert app.stats()["runs_created"] == df.height and app.stats()["duplicate_runs"] == 0


class _NoRetryOn429:
    """The emulator, with `x-should-retry: false` added to each of its 429s (it never sends that itself):
    a service that says a rate-limited create must not be sent again as it is."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.marked = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def marking(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-should-retry"]
                message = {**message, "headers": [*headers, (b"x-should-retry", b"false")]}
                self.marked += 1
            await send(message)

        await self.app(scope, receive, send) if scope["type"] != "http" else await self.app(
            scope, receive, marking
        )


def test_a_429_that_says_not_to_retry_puts_the_row_back_in_runs_mode(tmp_path: Path) -> None:
    """Nothing was created: the row waits its turn under the limiter (which learned of the 429) and is
    sent again, as group mode forms its call again; the job is not ended by a rate limit."""
    inner = create_app(
        EmulatorConfig(latency=0.05, rate_limit=None, run_rate_limit=3, rate_window=0.3, seed=5)
    )
    app = _NoRetryOn429(inner)
    df = companies(20)
    stats = JobStats()
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode="runs", run_rate=40, rate_window=0.3, stats=stats)
    own_answers(out, df, inner)
    assert app.marked > 0  # the service refused some creates, and said not to retry them
    assert inner.stats()["runs_created"] == df.height and inner.stats()["duplicate_runs"] == 0
