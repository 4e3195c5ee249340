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
            fault_rate=0.3,
            faults=frozenset({"lost_create", "html_5xx"}),
            should_retry_header=True,
            seed=2,
        )
    )
    df = companies(24)
    stats = JobStats()
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode, commit_horizon=0.2, stats=stats)
    own_answers(out, df, app)
    assert app.stats()["faults"]["lost_create"] > 0 and stats.reconciled > 0
    assert app.stats()["runs_created"] == df.height and app.stats()["duplicate_runs"] == 0
