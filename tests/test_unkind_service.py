"""The engine against a service that does not cooperate (issue 10): late commits, streams closed on the
service's own timer, reads while creates wait for budget, a service that does not hold the checkpoint's
runs, and what the limiter learned kept for a resume.

Every job runs against the emulator over real HTTP on 127.0.0.1 (`Emulator`), with its unkind options.
Assertions are on counts (runs created, duplicates, rows, requests), never on wall time: where "too
slow" is the bug, the job gets a `timeout=` and the old behaviour leaves rows pending.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import enrich._engine.collect as collect
from enrich import Emulator, ForeignRunError
from enrich._checkpoint import Checkpoint
from enrich._cli import main as cli
from enrich._emulator.synth import synth_output
from enrich._engine import JobStats, aenrich
from enrich._inputs import build_inputs
from enrich._schema import parse_output

CEO = {"ceo": "Name of the current CEO"}


def companies(n: int, prefix: str = "Company") -> pl.DataFrame:
    return pl.DataFrame({"company": [f"{prefix} {i}" for i in range(n)]})


def answers(df: pl.DataFrame) -> list[Any]:
    schema = parse_output(CEO).task_spec()["output_schema"]
    return [synth_output(i, schema, processor="lite")[0]["ceo"] for i in build_inputs(df)]


def job(emu: Emulator, df: pl.DataFrame, checkpoint: Path, **kw: Any) -> pl.DataFrame:
    kw.setdefault("processor", "lite")
    kw.setdefault("progress", False)
    out = asyncio.run(aenrich(df, CEO, api_key=emu.api_key, base_url=emu.url, checkpoint=checkpoint, **kw))
    assert isinstance(out, pl.DataFrame)
    return out


def own_answers(out: pl.DataFrame, df: pl.DataFrame, emu: Emulator) -> None:
    """Every row completed with the answer of its own input, from a run created for that input."""
    assert out["_status"].to_list() == ["completed"] * df.height, out["_error"].drop_nulls().to_list()[:3]
    assert out["ceo"].to_list() == answers(df)
    runs = emu.app.state.runs
    for row in out.iter_rows(named=True):
        assert json.loads(runs[row["_run_id"]].body)["input"] == {"company": row["company"]}


# -- late commits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_a_create_committed_after_its_504_is_adopted_not_sent_again(tmp_path: Path, mode: str) -> None:
    """Every create answers an HTML 504 at once and commits 1 s later. The rows are held, their runs are
    adopted when they appear (not at the horizon of 60 s: the job has 20 s), and nothing is paid twice."""
    df = companies(40)
    with Emulator(latency=0.3, late_commit_seconds=1.0, late_commit_rate=1.0, seed=1) as emu:
        stats = JobStats()
        out = job(emu, df, tmp_path / "cp", mode=mode, stats=stats, commit_horizon=60.0, timeout=20)
        emulated = emu.stats()
    own_answers(out, df, emu)
    assert emulated["late_commits"] >= 1
    assert emulated["runs_created"] == 40 and emulated["duplicate_runs"] == 0
    assert stats.found_late + stats.reconciled >= 1 and stats.duplicates == 0 and stats.held == 0


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_a_commit_later_than_the_horizon_is_a_duplicate_recorded_and_never_joined(
    tmp_path: Path, mode: str
) -> None:
    """The service commits 1.5 s after answering 504, but the job's horizon is 0.3 s: the rows are sent
    again, and the late runs are duplicates. They are counted, recorded as paid, and never joined."""
    df = companies(20)
    with Emulator(latency=2.5, late_commit_seconds=1.5, late_commit_rate=0.5, seed=2) as emu:
        stats = JobStats()
        out = job(emu, df, tmp_path / "cp", mode=mode, stats=stats, commit_horizon=0.3, timeout=30)
        emulated = emu.stats()
    own_answers(out, df, emu)
    assert emulated["duplicate_runs"] >= 1
    assert stats.duplicates == emulated["duplicate_runs"] == emulated["runs_created"] - 20
    kept = set(out["_run_id"])
    saved = Checkpoint.read(tmp_path / "cp")
    assert saved.counts().duplicates == stats.duplicates and not kept & set(saved.duplicates)
    assert saved.runs == emulated["runs_created"]  # every run paid for is on record


def test_a_resume_within_the_horizon_holds_the_rows_of_a_create_not_committed_yet(tmp_path: Path) -> None:
    """The process stops after its add was answered 504, before the service commits it (1.5 s later).
    The rerun, started at once, finds nothing in the group yet: it holds the rows instead of sending them
    again, and adopts the runs when they land (before its own timeout, far before the horizon)."""
    df = companies(30)
    cp = tmp_path / "cp"
    with Emulator(latency=0.3, late_commit_seconds=1.5, late_commit_rate=1.0, seed=3) as emu:
        first = job(emu, df, cp, commit_horizon=60.0, timeout=0.5)
        assert set(first["_status"]) == {"pending"}
        assert Checkpoint.read(cp).counts().in_doubt == 30
        stats = JobStats()
        out = job(emu, df, cp, commit_horizon=60.0, stats=stats, timeout=20)
        emulated = emu.stats()
    own_answers(out, df, emu)
    assert emulated["runs_created"] == 30 and emulated["duplicate_runs"] == 0
    assert stats.submitted == 0 and stats.found_late + stats.reconciled == 30


def test_past_the_horizon_a_resume_sends_what_was_never_created(tmp_path: Path) -> None:
    """An add answered 502 that created nothing: once the horizon has passed, its rows are sent again."""
    from _fakes import Tap, is_add_runs

    class BadGateway(Tap):
        """Every add-runs is answered 502 by a gateway and never reaches the service, while `down`."""

        down = True

        async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
            if self.down and is_add_runs(method, path):
                return 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return None

    df = companies(10)
    emu = Emulator(latency=0.2, seed=4)
    gateway = emu.app = BadGateway(emu.app)
    with emu:
        first = job(emu, df, tmp_path / "cp", commit_horizon=60.0, timeout=1.0)
        assert set(first["_status"]) == {"pending"}
        assert "may still commit" in first["_error"][0]
        gateway.down = False  # the service recovers
        stats = JobStats()
        out = job(emu, df, tmp_path / "cp", commit_horizon=0.0, stats=stats)
        assert emu.stats()["runs_created"] == 10
    own_answers(out, df, emu)
    assert stats.resubmitted_unknown == 10


# -- collection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_streams_closed_on_the_services_timer_do_not_blind_the_collector(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stream is closed after 0.4 s whatever is active. The events stream is reopened from its last
    event, so the job ends with its runs; relying on the timer fallback (made an hour here) it would not
    have ended within its timeout."""
    monkeypatch.setattr(collect, "_FALLBACK_POLL", 3600.0)
    df = companies(60)
    with Emulator(latency=1.5, stream_close_seconds=0.4, seed=5) as emu:
        stats = JobStats()
        out = job(emu, df, tmp_path / "cp", mode=mode, stats=stats, timeout=20)
        emulated = emu.stats()
    own_answers(out, df, emu)
    assert emulated["streams_closed_early"] >= 2
    assert emulated["requests"]["GET /v1/tasks/groups/{taskgroup_id}/events"] >= 3  # reopened
    assert stats.polls <= 12  # (a poll a reopening would be ~20)


def test_the_last_few_runs_are_not_waited_for_before_a_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 runs end in about a second; one is held back by the service for a minute. The answers of the
    others are collected at once, not when the last run ends nor at the timer fallback."""
    from _fakes import Tap

    class HoldOne(Tap):
        """The first run created stays 'running' in every listing and event for 60 s."""

        held: str | None = None

        def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
            run = data.get("run")
            if isinstance(run, dict):
                if HoldOne.held is None:
                    HoldOne.held = run["run_id"]
                if run["run_id"] == HoldOne.held:
                    data = {**data, "run": {**run, "status": "running", "is_active": True}, "output": None}
            return super().event(method, path, data)

    monkeypatch.setattr(collect, "_FALLBACK_POLL", 3600.0)
    df = companies(200)
    emu = Emulator(latency=0.5, seed=6)
    emu.app = HoldOne(emu.app)
    with emu:
        out = job(emu, df, tmp_path / "cp", timeout=6)
    by = out["_status"].value_counts()
    assert dict(by.iter_rows()) == {"completed": 199, "pending": 1}


def test_answers_are_collected_while_adds_wait_for_run_budget(tmp_path: Path) -> None:
    """Adds of 100 every second (the run budget); runs take 0.2 s. Answers are counted while later adds
    still wait: reads never queue behind creates."""
    seen: list[tuple[int, int]] = []

    def sink(progress: Any) -> None:
        seen.append((progress.completed, progress.waiting))

    df = companies(400)
    with Emulator(latency=0.2, rate_limit=None, seed=7) as emu:
        out = job(emu, df, tmp_path / "cp", run_rate=100, rate_window=1.0, progress=sink)
    assert set(out["_status"]) == {"completed"}
    assert any(done >= 100 and waiting > 0 for done, waiting in seen), seen[-20:]


# -- whose answer it is ---------------------------------------------------------------------------------


def test_a_service_that_does_not_hold_the_checkpoints_runs_is_refused(tmp_path: Path) -> None:
    """A job stops with its runs pending; the emulator is restarted with the same seed, so it hands out
    the same group and run ids to another job. The resumed job meets runs with the ids it recorded and
    other rows' keys: it stops with ForeignRunError, joins nothing, and loses nothing it recorded.
    (Both are named one service, as a proxy in front of two would be: else the checkpoint's service check
    refuses the second before anything is sent.)"""
    df, other = companies(20), companies(20, prefix="Other")
    cp = tmp_path / "cp"
    with Emulator(latency=5.0, seed=8) as first:
        pending = job(first, df, cp, timeout=0.5, service="one-name")
        assert set(pending["_status"]) == {"pending"}
    recorded = Checkpoint.read(cp).counts()
    with Emulator(latency=0.1, seed=8) as second:
        job(second, other, tmp_path / "other")  # the same ids, for other inputs
        with pytest.raises(ForeignRunError, match="does not hold this checkpoint's runs"):
            job(second, df, cp, timeout=20, service="one-name")
    after = Checkpoint.read(cp).counts()
    assert after.completed == 0 and after.submitted == recorded.submitted == 20


# -- what the limiter learned ---------------------------------------------------------------------------


def test_what_the_limiter_learned_is_kept_and_a_resume_starts_from_it(tmp_path: Path) -> None:
    """The service allows 60 runs a second; the job assumes 200. The first call learns it (a few 429s),
    stops; the resume starts at the learned pace and hears no 429 at all."""
    df = companies(300)
    cp = tmp_path / "cp"
    quota = {"rate_limit": None, "run_rate_limit": 60, "rate_window": 1.0}
    budget = {"run_rate": 200, "rate_window": 1.0}
    with Emulator(latency=0.1, seed=9, **quota) as emu:
        first = job(emu, df, cp, timeout=2.2, **budget)
        learned = Checkpoint.read(cp).pacing
        assert emu.stats()["rate_limited"] >= 1 and learned and learned["runs"] <= 60
        assert set(first["_status"]) >= {"pending"}
        time.sleep(1.1)  # the first call's last adds leave the service's window
        before = emu.stats()["rate_limited"]
        out = job(emu, df, cp, **budget)
        assert emu.stats()["rate_limited"] == before
        assert emu.stats()["runs_created"] == 300 and emu.stats()["duplicate_runs"] == 0
    own_answers(out, df, emu)


# -- what the user is told -------------------------------------------------------------------------------


def test_status_and_the_summary_count_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = companies(20)
    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    df.write_csv(source)
    with Emulator(latency=2.5, late_commit_seconds=1.5, late_commit_rate=0.5, seed=2) as emu:
        args = ["run", str(source), "-o", str(target), "--field", "ceo=Name of the current CEO"]
        args += ["--processor", "lite", "--commit-horizon", "0.3", "--no-progress", "--base-url", emu.url]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PARALLEL_API_KEY", emu.api_key)
            assert cli(args) == 0
        duplicates = emu.stats()["duplicate_runs"]
    err = capsys.readouterr().err
    assert duplicates >= 1 and f"{duplicates} duplicate" in err, err
    assert cli(["status", str(target), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs_duplicated"] == duplicates and report["runs_created"] == 20 + duplicates
    assert cli(["status", str(target)]) == 0
    assert f"{duplicates} duplicates" in capsys.readouterr().out
