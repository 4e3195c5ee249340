"""Every status the service sends, recorded as itself (issue 13): `cancelled` and `action_required` in the
checkpoint, `_status`, the summary, `JobStats` and `enrich status`; `cancelling` waited for like a running
run; `retry_failed` sends them again only when asked by name. Against the emulator (its `cancel_rate` and
`action_required_rate`), in-process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import Emulator, EmulatorConfig, JobStats, Progress, UsageError, create_app, plan
from enrich._checkpoint import Checkpoint
from enrich._cli import main as cli
from enrich._engine import aenrich

CEO = {"ceo": "Name of the current CEO"}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def run_job(app: Any, data: Any, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    kw.setdefault("timeout", 120)  # a job that waited for an action_required run would end pending
    return asyncio.run(
        aenrich(data, CEO, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def service_statuses(app: Any, run_ids: list[str]) -> list[str]:
    """Each run's status as the emulator answers GET /v1/tasks/runs/{id}."""

    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as c:
            return [
                (await c.get(f"/v1/tasks/runs/{r}", headers={"x-api-key": "k"})).json()["status"]
                for r in run_ids
            ]

    return asyncio.run(main())


def mixed(**kw: Any) -> Any:
    return create_app(EmulatorConfig(latency=0.05, cancel_rate=0.3, action_required_rate=0.3, seed=3, **kw))


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_each_status_is_recorded_as_itself(tmp_path: Path, mode: str) -> None:
    app = mixed()
    df = companies(40)
    stats = JobStats()
    events: list[Progress] = []
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode, stats=stats, progress=events.append)
    assert out.columns[-4:] == ["_status", "_error", "_run_id", "_interaction_id"]
    got = out["_status"].to_list()
    assert set(got) == {"completed", "cancelled", "action_required"}  # none failed, none pending
    # As the service says, row by row (action_required rows are settled for this call, not waited for).
    assert got == service_statuses(app, out["_run_id"].to_list())
    for row in out.iter_rows(named=True):
        if row["_status"] == "completed":
            assert row["ceo"] is not None and row["_error"] is None
        else:
            assert row["ceo"] is None and "no answer" in row["_error"]
            said = {"cancelled": "cancelled:", "action_required": "action required:"}[row["_status"]]
            assert row["_error"].startswith(said)
    by = {s: got.count(s) for s in set(got)}
    assert stats.statuses == by
    last = events[-1]  # the progress counts each end apart, and nothing is left waiting
    assert (last.completed, last.cancelled, last.action_required, last.failed) == (
        by["completed"],
        by["cancelled"],
        by["action_required"],
        0,
    )
    assert last.finished == 40 and last.waiting == 0 and last.running == 0
    counts = Checkpoint.read(tmp_path / "cp").counts()
    assert (counts.completed, counts.cancelled, counts.action_required, counts.failed) == (
        by["completed"],
        by["cancelled"],
        by["action_required"],
        0,
    )


def test_cancelling_is_waited_for_until_the_run_is_cancelled(tmp_path: Path) -> None:
    # Each run goes running -> cancelling (still active) -> cancelled: a job that took "cancelling" for
    # an end would record it (as failed) before the run reached cancelled.
    app = create_app(EmulatorConfig(latency=0.3, cancel_rate=1.0, seed=1))
    out = run_job(app, companies(8), checkpoint=tmp_path / "cp")
    assert out["_status"].to_list() == ["cancelled"] * 8
    assert service_statuses(app, out["_run_id"].to_list()) == ["cancelled"] * 8


def test_a_resume_leaves_cancelled_and_action_required_rows_alone(tmp_path: Path) -> None:
    app = mixed()
    df = companies(30)
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    created = app.stats()["runs_created"]
    for retry in (False, True):  # retry_failed=True means failed, and there are none
        again = run_job(app, df, checkpoint=tmp_path / "cp", retry_failed=retry)
        assert again.equals(first)
        assert app.stats()["runs_created"] == created


def test_retry_failed_by_name_sends_those_rows_again_and_only_those(tmp_path: Path) -> None:
    app = mixed(failure_rate=0.2)
    df = companies(40)
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    by = first["_status"].value_counts()
    assert set(by["_status"]) == {"completed", "failed", "cancelled", "action_required"}
    created = app.stats()["runs_created"]

    retried = run_job(app, df, checkpoint=tmp_path / "cp", retry_failed=["cancelled"])
    was = first["_status"] == "cancelled"
    assert app.stats()["runs_created"] == created + int(was.sum())
    # The cancelled rows have new runs; every other row kept its run and its status.
    assert set(retried.filter(was)["_run_id"]).isdisjoint(set(first.filter(was)["_run_id"]))
    assert retried.filter(~was).equals(first.filter(~was))
    created = app.stats()["runs_created"]

    both = run_job(app, df, checkpoint=tmp_path / "cp", retry_failed=("failed", "action_required"))
    sent = (retried["_status"] == "failed") | (retried["_status"] == "action_required")
    assert app.stats()["runs_created"] == created + int(sent.sum())
    assert both.filter(~sent).equals(retried.filter(~sent))


def test_the_dry_run_counts_rows_asked_by_name_as_to_submit(tmp_path: Path) -> None:
    app = mixed()
    df = companies(30)
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    cancelled = int((first["_status"] == "cancelled").sum())
    kw: dict[str, Any] = {"processor": "lite", "checkpoint": tmp_path / "cp"}
    kw["service"] = "a custom transport at http://emulator"  # what the job recorded
    assert plan(df, CEO, retry_failed=True, **kw).to_submit == 0
    assert plan(df, CEO, retry_failed="cancelled", **kw).to_submit == cancelled


@pytest.mark.parametrize("bad", [("canceled",), ["completed"], "pending", 3, [True]])
def test_retry_failed_refuses_what_is_not_a_status_to_send_again(tmp_path: Path, bad: Any) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    with pytest.raises(UsageError) as info:
        run_job(app, companies(3), checkpoint=tmp_path / "cp", retry_failed=bad)
    assert "\n" not in str(info.value) and "retry_failed" in str(info.value)
    assert app.stats()["requests_total"] == 0  # nothing sent
    with pytest.raises(UsageError):
        plan(companies(3), CEO, processor="lite", checkpoint=False, retry_failed=bad)


def test_a_sharded_job_keeps_the_statuses_through_its_settled_state(tmp_path: Path) -> None:
    app = mixed()
    df = companies(64)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=16)
    assert Checkpoint.read(tmp_path / "cp").shards > 1
    assert {"cancelled", "action_required"} <= set(first["_status"])
    requests = app.stats()["requests_total"]
    again = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=16)  # joined from settled states
    assert again.equals(first) and app.stats()["requests_total"] == requests


def test_the_summary_and_status_count_each_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(30).write_csv(source)
    with Emulator(latency=0.05, cancel_rate=0.3, action_required_rate=0.3, seed=3) as emu:
        args = ["run", str(source), "-o", str(target), "--field", "ceo=Name of the current CEO"]
        args += ["--processor", "lite", "--no-progress", "--base-url", emu.url]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PARALLEL_API_KEY", emu.api_key)
            assert cli(args) == 0  # every row is settled: exit 0
    by = pl.read_parquet(target)["_status"].value_counts()
    n = dict(zip(by["_status"].to_list(), by["count"].to_list(), strict=True))
    err = capsys.readouterr().err
    assert (
        f"{n['completed']} completed, 0 failed, {n['cancelled']} cancelled, "
        f"{n['action_required']} action required, 0 pending of 30 rows"
    ) in err, err
    assert cli(["status", str(target), "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert inputs["cancelled"] == n["cancelled"] and inputs["action_required"] == n["action_required"]
    assert cli(["status", str(target)]) == 0
    assert f"{n['cancelled']} cancelled, {n['action_required']} action required" in capsys.readouterr().out


def test_the_cli_retries_failed_rows_or_the_statuses_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(30).write_csv(source)
    with Emulator(latency=0.05, failure_rate=0.2, cancel_rate=0.3, seed=3) as emu:
        args = ["run", str(source), "-o", str(target), "--field", "ceo=Name of the current CEO"]
        args += ["--processor", "lite", "--no-progress", "--base-url", emu.url]

        def created() -> int:
            return int(httpx.get(f"{emu.url}/_emulator/stats").json()["runs_created"])

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PARALLEL_API_KEY", emu.api_key)
            assert cli(args) in (0, 1)
            first = pl.read_parquet(target)
            count = dict(zip(*first["_status"].value_counts().to_dict(as_series=False).values(), strict=True))
            assert count.get("failed") and count.get("cancelled")
            before = created()
            cli([*args, "--retry-failed"])  # failed rows only, as before
            assert created() == before + count["failed"]
            before = created()
            again = pl.read_parquet(target)
            cli([*args, "--retry-failed", "cancelled,failed"])
            was = again["_status"].is_in(["cancelled", "failed"])
            assert created() == before + int(was.sum())
            assert pl.read_parquet(target).filter(~was).equals(again.filter(~was))
            capsys.readouterr()
            assert cli([*args, "--retry-failed", "canceled"]) == 2
            err = capsys.readouterr().err
            assert "'canceled' is not a status that can be sent again" in err and err.count("\n") == 1
            assert created() == before + int(was.sum())  # refused: nothing sent
