"""Torture: `enrich run` killed, interrupted, fed damaged checkpoints, a full disk and bad input; the key.

The promises under test (issue 5): exactly one run per distinct input whatever is killed or fails, every
row back in order with its own answer, an output file that is whole or absent, one clear line for every
refusal (before anything is sent), and an API key that lands nowhere.

Crash torture: SIGKILLs of `enrich run` subprocesses aimed at moments (during submission, between an
add-runs and its receipt, while add-runs answers are lost, during collection, during the final write),
then the same command until it exits 0. The limiter's window is scaled down by tests/_torture_worker.py,
so a low `--run-rate` spreads the submission over many small add-runs calls. Sizes: 2,000 rows in group
mode (about 10 s) and 400 in runs mode (about 13 s); `ENRICH_TORTURE_ROWS=20000 pytest -m slow -k
torture_large` runs a larger setting (a fifth of the rows in runs mode; ENRICH_TORTURE_SEED picks the
kill moments).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _fakes
import polars as pl
import pytest

import enrich._engine as engine
from enrich import AuthenticationError, Emulator, RateLimiter, ServerError, TaskClient
from enrich._checkpoint import Checkpoint
from enrich._cli import _parser, main
from enrich._emulator import serve
from enrich._emulator.synth import synth_output
from enrich._inputs import build_inputs
from enrich._retry import RetryPolicy
from enrich._schema import parse_output

WORKER = Path(__file__).with_name("_torture_worker.py")
SECRET = "sk-TORTURE-7f3a9c1e5b-SECRET"
OUTPUT = {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")}
FIELDS = ["--field", "ceo=Name of the CEO", "--field", "founded:integer=Year founded"]
WINDOW = "0.25"  # seconds: the scaled rate window of the torture worker
FAULTS = frozenset({"lost_create", "html_5xx", "drop", "slow"})


def expected(df: pl.DataFrame) -> list[Any]:
    """Each row's answer, as the emulator makes it (the inputs are the `company` column only)."""
    schema = parse_output(OUTPUT).task_spec()["output_schema"]
    return [synth_output(i, schema, processor="lite")[0] for i in build_inputs(df, columns=["company"])]


def table(rows: int, distinct: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"row": list(range(rows)), "company": [f"Company {(i * 7) % distinct}" for i in range(rows)]}
    )


def check_result(out: pl.DataFrame, df: pl.DataFrame, emu: Emulator) -> None:
    """All rows in order; completed ones with their own answer, failed ones with the error of their run."""
    # (a CSV input comes back as the text it holds: compare as text)
    assert out.height == df.height and [str(v) for v in out["row"]] == [str(v) for v in df["row"]]
    assert out["company"].to_list() == df["company"].to_list()
    assert set(out["_status"]) <= {"completed", "failed"}, out["_status"].value_counts()
    runs = emu.app.state.runs
    for row, want in zip(out.iter_rows(named=True), expected(df), strict=True):
        run = runs[row["_run_id"]]
        assert json.loads(run.body)["input"] == {"company": row["company"]}  # the row's own run
        if row["_status"] == "completed":
            assert (row["ceo"], row["founded"], row["_error"]) == (want["ceo"], want["founded"], None)
        else:
            assert run.fails and row["ceo"] is None and row["_error"], row


def temporaries(target: Path) -> set[Path]:
    """The output's temporary files: one exists while it is written, and stays if that is killed."""
    return set(target.parent.glob(f".{target.name}.*.tmp"))


def writing(target: Path) -> Callable[[], bool]:
    """A kill point: a new temporary file of the output appeared, so the output is being written."""
    before = temporaries(target)
    return lambda: bool(temporaries(target) - before)


class Job:
    """One `enrich run` command against an emulator, started, killed and rerun as a subprocess."""

    def __init__(self, tmp: Path, emu: Emulator, df: pl.DataFrame, *extra: str, worker: bool = True) -> None:
        self.source, self.target = tmp / "in.parquet", tmp / "out.parquet"
        self.checkpoint = tmp / "out.parquet.enrich"
        df.write_parquet(self.source)
        self.rows = df.height
        self.emu = emu
        head = [sys.executable, str(WORKER)] if worker else [sys.executable, "-m", "enrich"]
        #: The job's arguments; `extra` (rate budgets, progress) may differ between runs of one job.
        self.args = [
            "run",
            str(self.source),
            "-o",
            str(self.target),
            *FIELDS,
            "--columns",
            "company",
            "--processor",
            "lite",
            "--yes",  # the large setting costs more than the $10 asked about without a terminal
            # This emulator commits a create at once or never (unless a test says otherwise): a lost one
            # is sent again a second after it was sent, not two minutes.
            "--commit-horizon",
            "1",
        ]
        self.cmd = [*head, *self.args, *extra]
        self.env = {
            **os.environ,
            "PARALLEL_API_KEY": emu.api_key,
            "PARALLEL_BASE_URL": emu.url,
            "ENRICH_TORTURE_WINDOW": WINDOW,
            "PYTHONUNBUFFERED": "1",
        }
        self.output_seen = 0  # times the output existed between attempts (each time it read whole)

    def created(self) -> int:
        return len(self.emu.app.state.runs)

    def attempt(
        self, ready: Callable[[], bool] | None = None, *, delay: float = 0.0, sig: int = signal.SIGKILL
    ) -> tuple[int, bytes]:
        """Run the command; send `sig` once `ready()` (then `delay` s later). Returns (exit code, stderr).

        The code is negative when the signal killed it. The output, whenever it exists, must read whole.
        """
        proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        try:
            if ready is not None:
                while proc.poll() is None and not ready():
                    assert time.monotonic() < deadline, "the kill point never came"
                    time.sleep(0.0005)
                if proc.poll() is None:
                    if delay:
                        time.sleep(delay)
                    proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.check_output()
        return proc.returncode, err

    def check_output(self) -> None:
        if self.target.exists():
            out = pl.read_parquet(self.target)  # whole, or it would not read
            assert out.height == self.rows and out["row"].to_list() == list(range(self.rows))
            self.output_seen += 1

    def finish(self) -> pl.DataFrame:
        code, err = self.attempt()
        assert code == 0, err.decode()[-3000:]
        assert b"Traceback" not in err
        return pl.read_parquet(self.target)

    def in_doubt(self) -> int:
        return Checkpoint.read(self.checkpoint).counts().in_doubt


# -- crash torture ---------------------------------------------------------------------------------------


def torture(tmp: Path, rows: int, seed: int, mode: str = "group") -> None:
    rng = random.Random(seed)
    distinct = rows * 9 // 10
    df = table(rows, distinct)
    started = time.monotonic()
    # Runs mode waits on each run with 100 workers: shorter runs keep its pace near group mode's.
    latency = 1.0 if mode == "group" else 0.4
    with Emulator(
        latency=latency,
        failure_rate=0.05,
        # Runs mode makes one result call per row; each read gives up after five failed attempts, so
        # its rate stays low enough that no read fails five times in a row (that ends a job, exit 4).
        fault_rate=0.15 if mode == "group" else 0.05,
        faults=FAULTS,
        slow_seconds=0.5,
        rate_limit=None,
        seed=seed,
    ) as emu:
        # --run-rate 100 per 0.25 s window: add-runs of 100 inputs, 400 runs a second.
        job = Job(tmp, emu, df, "--run-rate", "100", "--no-progress", "--mode", mode)
        killed: list[str] = []
        log: list[str] = []

        def kill(what: str, ready: Callable[[], bool], delay: float = 0.0) -> bool:
            began = time.monotonic()
            code, err = job.attempt(ready, delay=delay)
            outcome = "killed" if code == -signal.SIGKILL else f"exit {code}"
            log.append(f"{what}: {outcome} after {time.monotonic() - began:.1f} s, {job.created()} runs")
            if code == -signal.SIGKILL:
                killed.append(what)
                return True
            assert code == 0, err.decode()[-3000:]  # it finished before the kill point
            return False

        def at(share: float) -> Callable[[], bool]:
            """A kill point: `share` of the distinct inputs more have runs than now (at least one)."""
            target = min(distinct - 1, job.created() + max(1, round(share * distinct)))
            return lambda: job.created() >= target

        # 1. During submission, once a random share of the runs exists.
        kill("submission", at(rng.uniform(0.05, 0.25)))
        # 2. Between an add-runs and its receipt: the moment the emulator has created an add's runs, the
        # client has not heard yet. The checkpoint then holds the add's intent without receipts.
        for _ in range(4):
            if kill("add-runs without receipt", at(0)) and job.in_doubt():
                break
        else:
            raise AssertionError("no kill landed between an add-runs and its receipt")
        # 3. While every add-runs answer is lost after its runs were created: the job reconciles after
        # each add, and is killed somewhere in that.
        faulty = emu.app.config
        emu.app.config = dataclasses.replace(faulty, fault_rate=1.0, faults=frozenset({"lost_create"}))
        try:
            kill("lost answers", at(rng.uniform(0.05, 0.15)), delay=rng.uniform(0, 0.2))
        finally:
            emu.app.config = faulty
        # 4. At random moments: once, and once more per 5,000 rows in the larger settings.
        for i in range(1 + rows // 5000):
            kill("random", lambda: True, delay=rng.uniform(0.5, 1.5) if i == 0 else rng.uniform(1, 4))
        # 5. During collection: every run created, answers still coming in.
        kill("collection", lambda: job.created() >= distinct, delay=rng.uniform(0.1, 0.5) * latency)
        # 6. During the final write of the output.
        kill("final write", writing(job.target))
        out = job.finish()
        # 7. A rerun of the finished job rewrites the output: killed mid-write, the old file stays whole.
        whole = job.target.read_bytes()
        for _ in range(5):
            written = writing(job.target)
            if kill("rewrite", written) and written():
                break  # its temporary file is left behind: the kill landed mid-write
        else:
            raise AssertionError("no kill landed during a write of the output")
        assert job.target.read_bytes() == whole
        again = job.finish()
        stats = emu.stats()
        check_result(out, df, emu)
        assert again.equals(out)
    assert stats["runs_created"] == distinct and stats["duplicate_runs"] == 0, stats
    assert stats["faults"]["lost_create"] and stats["runs_by_status"]["failed"], stats
    assert {"submission", "add-runs without receipt", "lost answers", "collection"} <= set(killed), log
    assert job.output_seen >= 2
    took = time.monotonic() - started
    print(f"\n{mode} mode, {rows:,} rows, {took:.1f} s, faults {stats['faults']}: {'; '.join(log)}")


@pytest.mark.parametrize(("mode", "rows"), [("group", 2000), ("runs", 400)])
def test_sigkill_torture_through_the_cli(tmp_path: Path, mode: str, rows: int) -> None:
    torture(tmp_path, rows, seed=7, mode=mode)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ENRICH_TORTURE_ROWS"), reason="set ENRICH_TORTURE_ROWS=20000 for the larger torture"
)
@pytest.mark.parametrize("mode", ["group", "runs"])
def test_sigkill_torture_large(tmp_path: Path, mode: str) -> None:
    rows, seed = int(os.environ["ENRICH_TORTURE_ROWS"]), int(os.environ.get("ENRICH_TORTURE_SEED", "3"))
    # Runs mode writes two durable records per run on the event loop: about 100 runs a second here.
    torture(tmp_path, rows if mode == "group" else max(400, rows // 5), seed=seed, mode=mode)


def late_torture(tmp: Path, rows: int, seed: int, mode: str, kills: int = 4) -> dict[str, Any]:
    """`enrich run` killed `kills` times at random moments against a service that answers 70% of creates
    with a gateway's 504 and commits them 2.5 s later (also after the client is gone), then run until it
    exits 0. Returns the emulator's counters; the rows are checked here."""
    rng = random.Random(seed)
    df = table(rows, rows * 9 // 10)
    with Emulator(
        latency=1.0,
        late_commit_seconds=2.5,
        late_commit_rate=0.7,
        fault_rate=0.03,
        faults=frozenset({"lost_create", "html_5xx", "drop"}),
        rate_limit=None,
        seed=seed,
    ) as emu:
        job = Job(tmp, emu, df, "--run-rate", "100", "--no-progress", "--mode", mode)
        job.cmd[job.cmd.index("--commit-horizon") + 1] = "4"  # longer than the service's 2.5 s
        for _ in range(kills):
            job.attempt(lambda: True, delay=rng.uniform(0.3, 2.5))
        out = job.finish()
        check_result(out, df, emu)
        return emu.stats()


@pytest.mark.parametrize(("mode", "rows"), [("group", 1500), ("runs", 300)])
def test_sigkill_torture_with_late_commits_pays_no_run_twice(tmp_path: Path, mode: str, rows: int) -> None:
    """The issue's worst case: a killed process's creates committed seconds after it died, after the
    rerun read the group. Without the commit horizon this paid for 871-2,000 runs twice per job."""
    stats = late_torture(tmp_path, rows, seed=11, mode=mode)
    assert stats["late_commits"] > 0
    assert stats["runs_created"] == rows * 9 // 10 and stats["duplicate_runs"] == 0, stats


def test_sigint_during_submission_exits_3_and_keeps_every_run(tmp_path: Path) -> None:
    df = table(1800, 1800)
    with Emulator(latency=1.0, rate_limit=None, seed=2) as emu:
        job = Job(tmp_path, emu, df, "--run-rate", "50")  # progress bar on: it must end cleanly too
        # 200 runs a second, ending 0.5 to 1.5 s after creation: a poll reads the runs once 1,000 have
        # ended (about 6 s in); at 1,400 created (7 s) those answers are collected, not yet flushed.
        code, err = job.attempt(lambda: job.created() >= 1400, sig=signal.SIGINT)
        created = job.created()
        assert code == 3, err.decode()[-3000:]
        assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()[-3000:]
        assert err.decode().strip().splitlines()[-1].startswith("enrich: interrupted:")
        assert 1400 <= created < 1800  # stopped mid-submission
        saved = Checkpoint.read(job.checkpoint)
        counts = saved.counts()
        # Every run the service created is recorded, or in doubt (found by the rerun), never lost.
        assert counts.runs <= created <= counts.runs + counts.in_doubt, (counts, created)
        # The answers collected were only buffered (fewer than 1,000, under 5 s): the interrupt flushed them.
        assert counts.completed > 0, counts
        assert not list(job.checkpoint.glob("*.tmp")) and not saved.warnings
        # The same command, without the test's scaled window, finishes it.
        rerun = subprocess.run(
            [sys.executable, "-m", "enrich", *job.args, "--no-progress"],
            env=job.env,
            capture_output=True,
            timeout=60,
        )
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
        check_result(pl.read_parquet(job.target), df, emu)
        assert emu.stats()["runs_created"] == 1800 and emu.stats()["duplicate_runs"] == 0


# -- the checkpoint under damage, through `enrich run` ------------------------------------------------------


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    with Emulator(api_key=SECRET, latency=0.3, rate_limit=None) as emulator:
        monkeypatch.setenv("PARALLEL_API_KEY", SECRET)
        monkeypatch.setenv("PARALLEL_BASE_URL", emulator.url)
        # The CLI's limiter window is a minute; scale it so --run-rate 20 makes batches of 20 quickly.
        monkeypatch.setattr(engine, "enrich", functools.partial(engine.enrich, rate_window=0.1))
        yield emulator


def cli(tmp: Path, *extra: str, rows: int = 60) -> list[str]:
    """`enrich run` arguments for a job of `rows` distinct companies in tmp/in.csv → tmp/out.parquet."""
    source = tmp / "in.csv"
    if not source.exists():
        table(rows, rows).write_csv(source)
    return [
        "run",
        str(source),
        "-o",
        str(tmp / "out.parquet"),
        *FIELDS,
        "--columns",
        "company",
        "--processor",
        "lite",
        "--no-progress",
        *extra,
    ]


def err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def newest(checkpoint: Path, kind: str = "") -> Path:
    """The segment written last (of `kind`, when given): the greatest seq."""
    return max(checkpoint.glob(f"{kind}*.parquet"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


@pytest.mark.parametrize("kind", ["", "receipts"])
def test_torn_segment_warns_and_the_rerun_pays_nothing_more(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    args = cli(tmp_path, "--run-rate", "20")
    # Stop while runs are still out, so the rerun has to collect them through the damaged record.
    assert main([*args, "--timeout", "0.5"]) == 3
    torn = newest(tmp_path / "out.parquet.enrich", kind)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    capsys.readouterr()
    assert main(args) == 0
    err = err_lines(capsys)
    assert any(line.startswith(f"enrich: warning: skipped {torn.name}") for line in err), err
    assert "Traceback" not in "\n".join(err)
    df = table(60, 60)
    check_result(pl.read_parquet(tmp_path / "out.parquet"), df, emu)
    assert emu.stats()["runs_created"] == 60 and emu.stats()["duplicate_runs"] == 0


def test_truncated_manifest_is_one_line_and_nothing_is_overwritten(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(tmp_path)
    assert main(args) == 0
    manifest = tmp_path / "out.parquet.enrich" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    requests = emu.stats()["requests_total"]
    capsys.readouterr()
    for extra in ([], ["--dry-run"]):
        assert main([*args, *extra]) == 2
        err = err_lines(capsys)
        assert len(err) == 1 and "manifest" in err[0] and "damaged" in err[0], err
        assert "restore it, or use another checkpoint path" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert emu.stats()["requests_total"] == requests


def test_segment_from_another_job_is_skipped_with_a_warning(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert main([*cli(other), "--field", "cfo=Name of the CFO"]) == 0
    args = cli(tmp_path)
    assert main(args) == 0
    stray = newest(other / "out.parquet.enrich", "receipts")
    cp = tmp_path / "out.parquet.enrich"
    copied = cp / f"receipts-{int(newest(cp).stem.rsplit('-', 1)[1]) + 1:09d}.parquet"
    copied.write_bytes(stray.read_bytes())
    capsys.readouterr()
    assert main(args) == 0
    err = err_lines(capsys)
    assert any(f"skipped {copied.name}: segment from another job" in line for line in err), err
    check_result(pl.read_parquet(tmp_path / "out.parquet"), table(60, 60), emu)
    assert emu.stats()["runs_created"] == 120 and emu.stats()["duplicate_runs"] == 0


class FullDisk(_fakes.FullDisk):
    """The checkpoint's disk fills up (see `_fakes.FullDisk`); `created` records how many runs the
    service had made when the first write failed."""

    def __init__(self, checkpoint: Path, emu: Emulator, kind: str, after: int, code: int) -> None:
        super().__init__(checkpoint, kind, after, code)
        self.emu = emu
        self.created: int | None = None

    def filled(self) -> None:
        self.created = len(self.emu.app.state.runs)


@pytest.mark.parametrize(
    ("kind", "after", "code"),
    [
        ("intents", 2, errno.ENOSPC),  # before an add-runs is sent
        ("receipts", 2, errno.ENOSPC),  # after the runs exist, before their receipt is durable
        ("", 12, errno.EROFS),  # the file system turns read-only under the job
    ],
)
def test_full_disk_stops_submission_and_loses_nothing(
    tmp_path: Path,
    emu: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    after: int,
    code: int,
) -> None:
    args = cli(tmp_path, "--run-rate", "20", rows=200)
    checkpoint = tmp_path / "out.parquet.enrich"
    disk = FullDisk(checkpoint, emu, kind, after, code)
    durable: list[str] = []
    record = Checkpoint.record_receipts

    def logged(self: Checkpoint, receipts: Any) -> None:
        record(self, receipts)
        durable.extend(r.run_id for r in receipts)  # recorded: it returned

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "record_receipts", logged)
        patch.setattr("enrich._store.os.replace", disk.replace)
        patch.setattr("enrich._store.os.link", disk.link)
        patch.setattr("enrich._store.os.fsync", disk.fsync)
        assert main(args) == 3
        created = emu.stats()["runs_created"]
    *warnings, error = err_lines(capsys)
    # One line says why (a warning may add that the answers collected last could not be saved).
    assert all(line.startswith("enrich: warning:") for line in warnings), warnings
    assert error.startswith(f"enrich: error: cannot write checkpoint {checkpoint}: {os.strerror(code)}")
    assert "submission stopped" in error and "run the same command again" in error
    assert disk.created is not None and 0 < created < 200
    assert created == disk.created  # nothing was submitted after the first failed write
    saved = Checkpoint.read(checkpoint)
    assert set(durable) <= set(saved.state(outputs=False)["run_id"])  # every receipt recorded is there
    counts = saved.counts()
    assert counts.runs <= created <= counts.runs + counts.in_doubt, (counts, created)
    if kind == "intents":  # the add whose intent failed was never sent
        assert (counts.in_doubt, counts.runs) == (0, created), counts
    if kind == "receipts":  # its runs exist, unrecorded: in doubt, so the rerun finds them
        assert counts.in_doubt == 20 and counts.runs == created - 20, counts
    assert not (tmp_path / "out.parquet").exists()
    # A healthy disk: the same command finishes and pays for nothing twice.
    assert main(args) == 0
    check_result(pl.read_parquet(tmp_path / "out.parquet"), table(200, 200), emu)
    assert emu.stats()["runs_created"] == 200 and emu.stats()["duplicate_runs"] == 0


def test_last_flush_failing_is_a_warning_and_the_answers_are_written(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(tmp_path)
    checkpoint = tmp_path / "out.parquet.enrich"
    disk = FullDisk(checkpoint, emu, "outcomes", 0, errno.ENOSPC)
    with monkeypatch.context() as patch:
        patch.setattr("enrich._store.os.replace", disk.replace)
        patch.setattr("enrich._store.os.link", disk.link)
        assert main(args) == 0  # every answer is in the output; only the checkpoint missed them
    err = err_lines(capsys)
    assert any("warning:" in line and os.strerror(errno.ENOSPC) in line for line in err), err
    check_result(pl.read_parquet(tmp_path / "out.parquet"), table(60, 60), emu)
    assert Checkpoint.read(checkpoint).counts().submitted == 60
    assert main(args) == 0  # the rerun collects them again, and creates nothing
    assert emu.stats()["runs_created"] == 60


def test_output_that_cannot_be_written_exits_3_and_keeps_the_answers(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(tmp_path)
    real = os.replace

    def full(src: Any, dst: Any) -> None:
        if Path(dst).name == "out.parquet":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr("enrich._io.os.replace", full)
        assert main(args) == 3
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("enrich: error: cannot write") and "again" in err[0], err
    assert not (tmp_path / "out.parquet").exists() and not temporaries(tmp_path / "out.parquet")
    assert main(args) == 0
    assert emu.stats()["runs_created"] == 60


# -- bad input: one line, nothing sent --------------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(400))


BAD_INPUTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("in.csv", lambda p: p.write_text(""), "empty"),
    ("in.csv", _garbage, "cannot read it as csv"),
    ("in.parquet", lambda p: p.write_text("company\nAcme\n"), "cannot read it as parquet"),
    (
        "in.parquet",
        lambda p: pl.DataFrame({"company": ["A", "B"], "logo": [b"\x89PNG", b"\x00"]}).write_parquet(p),
        "'logo' row 0 holds binary data",
    ),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_INPUTS)
def test_bad_input_files_are_refused_before_anything_is_sent(
    tmp_path: Path,
    emu: Emulator,
    capsys: pytest.CaptureFixture[str],
    name: str,
    make: Callable[[Path], None],
    message: str,
) -> None:
    source = tmp_path / name
    make(source)
    out = tmp_path / "out.parquet"
    assert main(["run", str(source), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite"]) == 2
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("enrich: error:") and message in err[0], err
    assert emu.stats()["requests_total"] == 0
    assert not out.exists() and not (tmp_path / "out.parquet.enrich").exists()


def _schema(properties: dict[str, Any], **root: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **root}


BAD_SCHEMAS: list[tuple[Any, str]] = [
    ("{not json", "is not valid JSON"),
    ([{"type": "object"}], "must hold a JSON object"),
    ({"type": "string", "description": "CEO"}, 'the root must have "type": "object", got "string"'),
    ({"anyOf": [_schema({"ceo": {"type": "string"}})]}, "anyOf is not allowed at the root"),
    (_schema({"ceo": {"type": "string", "pattern": "^[A-Z]"}}), "keyword 'pattern' is not supported"),
    (_schema({"mail": {"type": "string", "format": "email"}}), "keyword 'format' is not supported"),
    (_schema({}), '"properties" with at least one field'),
    (_schema({"company": {"type": "string"}}), "company"),  # collides with an input column
]


@pytest.mark.parametrize(("schema", "message"), BAD_SCHEMAS)
def test_bad_schema_files_are_refused_before_anything_is_sent(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], schema: Any, message: str
) -> None:
    path = tmp_path / "schema.json"
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    args = cli(tmp_path)
    args[args.index("--field") : args.index("--columns")] = ["--schema", str(path)]
    assert main(args) == 2
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("enrich: error:") and message in err[0], err
    assert emu.stats()["requests_total"] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "Find the CEO of {compnay}"], "'compnay' not found; available: company. Did you mean"),
        (["--columns", "company,contry"], "'contry' not found"),
        (["--processor", "core-ultra"], "unknown processor 'core-ultra'"),
        (["--run-rate", "0"], "run_rate"),
    ],
)
def test_bad_options_are_refused_before_anything_is_sent(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = cli(tmp_path)
    if "--columns" in extra:
        del args[args.index("--columns") : args.index("--columns") + 2]
    assert main([*args, *extra]) == 2
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("enrich: error:") and message in err[0], err
    assert emu.stats()["requests_total"] == 0


def test_checkpoint_of_another_job_says_what_differs(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(tmp_path)
    assert main(args) == 0
    requests = emu.stats()["requests_total"]
    capsys.readouterr()
    changed = [a.replace("Year founded", "Year it was founded") for a in args]
    for extra in ([], ["--dry-run"]):
        assert main([*changed, *extra]) == 2
        err = err_lines(capsys)
        assert len(err) == 1 and "was made for a different job" in err[0], err
        assert "task_spec" in err[0] and "Year it was founded" in err[0]
    assert main([*args, "--processor", "base"]) == 2
    assert 'processor: "lite" → "base"' in err_lines(capsys)[0]
    assert emu.stats()["requests_total"] == requests


# -- secrets ------------------------------------------------------------------------------------------


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_the_key_lands_nowhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: httpx, httpcore, enrich, uvicorn, asyncio
    for name in ("httpx", "httpcore", "enrich"):
        caplog.set_level(logging.DEBUG, logger=name)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(temp / "cache"))  # the default checkpoint, looked at too
    wrong = "sk-WRONG-4d2b8a-KEY"
    texts: list[str] = []
    df = table(30, 30)
    with Emulator(api_key=SECRET, latency=0.2, rate_limit=None) as emu:
        # A CLI job in a subprocess with the progress bar on, its temp files in our directory.
        job = Job(tmp_path, emu, df, worker=False)
        job.env["TMPDIR"] = str(temp)
        job.env["PARALLEL_API_KEY"] = SECRET
        done = subprocess.run(job.cmd, env=job.env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert b"30/30" in done.stderr  # the bar was drawn
        texts += [done.stdout.decode(), done.stderr.decode()]
        # The same job with a wrong key: exit 4, and neither key printed.
        bad = subprocess.run(
            [*job.cmd, "-o", str(tmp_path / "bad.parquet"), "-v"],
            env={**job.env, "PARALLEL_API_KEY": wrong},
            capture_output=True,
            timeout=60,
        )
        assert bad.returncode != 0 and b"401" in bad.stderr
        texts += [bad.stdout.decode(), bad.stderr.decode()]
        # A library job in this process: bar on, no checkpoint (the default one), DEBUG logs.
        stats = engine.JobStats()
        out = engine.enrich(
            df, OUTPUT, columns=["company"], processor="lite", api_key=SECRET, base_url=emu.url, stats=stats
        )
        assert set(out["_status"]) == {"completed"} and str(temp) in stats.checkpoint
        texts += [repr(stats), str(stats.warnings)]
        # The library with a wrong key: the error, its repr, its traceback and its chain.
        with pytest.raises(AuthenticationError) as info:
            engine.enrich(df, OUTPUT, processor="lite", api_key=wrong, base_url=emu.url, progress=True)
        texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
        # In-process CLI runs: a job, its status report, and a wrong key.
        monkeypatch.setenv("PARALLEL_API_KEY", SECRET)
        monkeypatch.setenv("PARALLEL_BASE_URL", emu.url)
        cli_args = cli(tmp_path / "tmp")
        cli_args.remove("--no-progress")
        assert main(cli_args) == 0
        assert main(["status", str(tmp_path / "tmp" / "out.parquet")]) == 0
        monkeypatch.setenv("PARALLEL_API_KEY", wrong)
        assert main([*cli_args, "-o", str(tmp_path / "tmp" / "bad.parquet")]) == 4
    # A 5xx with an HTML body, and the reprs of the client, the limiter and the errors.
    with Emulator(api_key=SECRET, fault_rate=1.0, faults=frozenset({"html_5xx"})) as broken:
        import asyncio

        async def fail() -> list[str]:
            limiter = RateLimiter(100, 100)
            client = TaskClient(SECRET, base_url=broken.url, limiter=limiter, retry=RetryPolicy.no_wait())
            async with client:
                with pytest.raises(ServerError) as error:
                    await client.get_run("run_1")
                return [
                    repr(client),
                    str(client.__dict__),
                    repr(limiter),
                    str(error.value),
                    repr(error.value),
                    "".join(traceback.format_exception(error.value)),
                ]

        texts += asyncio.run(fail())
    captured = capsys.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    assert "HTTP Request: POST" in caplog.text  # httpx logged its requests, and was captured
    assert any("401" in t for t in texts) and any("502" in t or "503" in t for t in texts)
    written = files_under(tmp_path)
    assert any(p.suffix == ".parquet" for p in written) and any(p.name == "manifest.json" for p in written)
    assert any(temp / "cache" in p.parents for p in written)  # the default checkpoint
    for key in (SECRET, wrong):
        assert not [t for t in texts if key in t], key
        assert not [p for p in written if key.encode() in p.read_bytes()], key


def test_the_emulator_binds_localhost_and_rejects_wrong_keys() -> None:
    import inspect

    import httpx

    assert Emulator().url.startswith("http://127.0.0.1:")
    assert _parser().parse_args(["emulate"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    with Emulator(api_key=SECRET) as emu:
        url = emu.url + "/v1/tasks/groups"
        assert httpx.post(url, json={}, headers={"x-api-key": SECRET}).status_code == 200
        assert httpx.post(url, json={}, headers={"x-api-key": SECRET + "x"}).status_code == 401
        assert httpx.post(url, json={}).status_code == 401
        assert emu.stats()["groups_created"] == 1
    with Emulator() as open_emu:  # no key configured: any non-empty key, but never none
        assert httpx.post(open_emu.url + "/v1/tasks/groups", json={}).status_code == 401


def test_help_documents_the_exit_code_of_a_write_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "3 incomplete (timeout, interrupt, --max-cost reached," in text
    assert "the checkpoint or the output could not be written once the job had started" in text
