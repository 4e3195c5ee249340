"""What a new user met on a first tour (issue 11), each driven through the CLI or the Python API as the
user drove it: answers of one service never pass for another's, the user's data comes back as given,
an enriched table can be enriched again, and what the tool says is true."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from enrich import Emulator, JobStats, ServiceMismatchError, UsageError, aenrich, enrich
from enrich._checkpoint import Checkpoint
from enrich._cli import main

KEY = "demo-key"
CEO = {"ceo": "Name of the CEO"}


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    with Emulator(api_key=KEY, latency=0.05, seed=0) as emulator:
        monkeypatch.setenv("PARALLEL_API_KEY", KEY)
        monkeypatch.setenv("PARALLEL_BASE_URL", emulator.url)
        yield emulator


def companies(n: int, **extra: list[Any]) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)], **extra})


def run(*args: str) -> int:
    return main(["run", *args, "--processor", "lite", "--no-progress"])


# -- 1. the service a checkpoint belongs to ---------------------------------------------------------------


def test_emulator_answers_never_pass_for_the_services(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quickstart on --emulator, then the same command against a service: refused, nothing sent."""
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(5).write_csv(src)
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--emulator") == 0
    capsys.readouterr()
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in-process emulator" in err and "--checkpoint" in err, err
    assert emu.stats()["requests_total"] == 0  # nothing sent, not even a read
    assert main(["status", str(out)]) == 0
    assert "service:     the in-process emulator" in capsys.readouterr().out
    # ... and the dry run says the same before anything
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--dry-run") == 2


def test_a_checkpoint_of_one_address_is_refused_at_another(tmp_path: Path) -> None:
    df, cp = companies(4), tmp_path / "cp"
    with Emulator(api_key=KEY, latency=0.05) as first:
        enrich(df, CEO, api_key=KEY, base_url=first.url, checkpoint=cp, progress=False, processor="lite")
    assert Checkpoint.read(cp).service == first.url
    with Emulator(api_key=KEY, latency=0.05) as second:
        refused = re.escape(f"holds runs of {first.url}, not of {second.url}")
        with pytest.raises(ServiceMismatchError, match=refused):
            enrich(df, CEO, api_key=KEY, base_url=second.url, checkpoint=cp, progress=False, processor="lite")
        assert second.stats()["requests_total"] == 0


# -- 3, 4. chaining and the input mapping -----------------------------------------------------------------


def test_an_enriched_file_can_be_enriched_again(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src, first, second = tmp_path / "in.csv", tmp_path / "first.parquet", tmp_path / "second.parquet"
    companies(6).write_csv(src)
    assert run(str(src), "-o", str(first), "--field", "ceo=CEO") == 0
    for extra in ([], ["--columns", "company"]):
        capsys.readouterr()
        assert run(str(first), "-o", str(second), "--field", "cfo=CFO", *extra) == 0, capsys.readouterr().err
        out = pl.read_parquet(second)
        assert out.columns == ["company", "ceo", "cfo", "_status", "_error", "_run_id", "_interaction_id"]
        assert out["ceo"].to_list() == pl.read_parquet(first)["ceo"].to_list()  # carried through
        assert set(out["_status"]) == {"completed"} and "replaced by this job's" in capsys.readouterr().err
    # the second job sent company (and the earlier answer, without --columns), never _status or _run_id
    sent = [json.dumps(json.loads(r.body)["input"]) for r in emu.app.state.runs.values()]
    assert not any("_status" in s or "_run_id" in s or "_interaction_id" in s for s in sent)


def test_the_same_inputs_through_another_mapping_pay_nothing_more(tmp_path: Path, emu: Emulator) -> None:
    """Naming with --columns the columns that were sent, or adding a column not sent: same run inputs,
    same answers, no new run."""
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(5).write_csv(src)
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO") == 0
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--columns", "company") == 0
    companies(5, notes=[f"n{i}" for i in range(5)]).write_csv(src)
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--columns", "company") == 0
    assert emu.stats()["runs_created"] == 5
    companies(6, notes=[f"n{i}" for i in range(6)]).write_csv(src)  # one row more: only it is sent
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--columns", "company") == 0
    assert emu.stats()["runs_created"] == 6


# -- 6. an empty table --------------------------------------------------------------------------------------


def test_an_empty_table_gives_a_typed_empty_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    src.write_text("company,website\n")
    spec = ["--field", "ceo=CEO", "--field", "founded:integer=Year", "--field", "tags:array=Tags"]
    assert run(str(src), "-o", str(out), *spec, "--emulator") == 0, capsys.readouterr().err
    back = pl.read_parquet(out)
    assert back.height == 0 and back.schema["founded"] == pl.Int64 and back.schema["tags"] == pl.List(pl.Utf8)
    assert back.columns[-4:] == ["_status", "_error", "_run_id", "_interaction_id"]
    # The library, with no key and no service: nothing is needed to enrich nothing.
    empty = enrich(pl.DataFrame({"company": pl.Series([], dtype=pl.Utf8)}), CEO, api_key=None, progress=False)
    assert empty.height == 0 and empty.schema["ceo"] == pl.Utf8


# -- 7, 8, 9. saying what is true -------------------------------------------------------------------------


def test_progress_moves_while_rows_wait_for_the_rate_limit(tmp_path: Path) -> None:
    """Runs mode on a quota of 5 runs a second: nothing finishes for a while, yet the counts keep coming,
    with the 429s and the spend; the last event, after the timeout, is the truth."""
    events: list[Any] = []
    with Emulator(api_key=KEY, latency=0.05, rate_limit=None, run_rate_limit=5, rate_window=1.0) as emu:
        out = enrich(
            companies(40),
            CEO,
            api_key=KEY,
            base_url=emu.url,
            checkpoint=tmp_path / "cp",
            progress=events.append,
            processor="lite",
            mode="runs",
            run_rate=50,
            rate_window=1.0,
            timeout=3.0,
        )
    counted = [e for e in events if e.message is None]
    assert len(counted) >= 5  # twice a second, whatever finishes
    assert max(e.refused for e in counted) >= 1  # the 429s are shown
    last = counted[-1]
    by = out["_status"].value_counts()
    done = dict(zip(by["_status"].to_list(), by["count"].to_list(), strict=True))
    assert last.completed == done.get("completed", 0)
    cp = Checkpoint.read(tmp_path / "cp")
    assert last.spent == pytest.approx(cp.runs * 0.005)  # lite: $5 per 1,000 runs
    assert last.running + last.waiting == done.get("pending", 0)


def test_summary_counts_runs_found_again_and_retried(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(30).write_csv(src)
    with Emulator(api_key=KEY, latency=0.05, failure_rate=0.3, seed=3) as emu:
        monkeypatch.setenv("PARALLEL_API_KEY", KEY)
        monkeypatch.setenv("PARALLEL_BASE_URL", emu.url)
        assert run(str(src), "-o", str(out), "--field", "ceo=CEO") == 0
        failed = pl.read_parquet(out)["_status"].to_list().count("failed")
        assert failed
        capsys.readouterr()
        assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--retry-failed") == 0
        err = capsys.readouterr().err
        assert f"; {failed:,} runs created or found now" in err, err
        assert f"${emu.stats()['runs_created'] * 0.005:,.2f} spent on this job so far" in err


def test_the_services_warnings_are_shown_once_with_their_count(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(4).write_csv(src)
    fields = [x for i in range(7) for x in ("--field", f"f{i}=Fact {i}")]
    done = subprocess.run(  # a process of its own: no test harness catches the library's log records
        [sys.executable, "-m", "enrich", "run", str(src), "-o", str(out), *fields, "--processor", "base"],
        capture_output=True,
        text=True,
        env={**os.environ, "PARALLEL_BASE_URL": emu.url, "PARALLEL_API_KEY": KEY},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "warns" in line]
    assert len(warned) == 1 and "the service warns (4 runs)" in warned[0] and "processor" in warned[0]
    assert main(["status", str(out)]) == 0
    assert "service warns (4 runs)" in capsys.readouterr().out
    assert main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["service_warnings"].values()) == [4] and report["rows"] == 4


# -- 11. hints that name the real next step ---------------------------------------------------------------


def test_each_stop_names_its_own_next_step(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.csv"
    companies(30).write_csv(src)
    # The in-process emulator ends with the command: "run it again" would be refused.
    args = ["run", str(src), "-o", str(tmp_path / "a.csv"), "--field", "ceo=CEO", "--emulator"]
    code = main([*args, "--processor", "pro", "--timeout", "1", "--no-progress", "--yes"])
    err = capsys.readouterr().err
    assert code == 3 and "delete" in err and "run the same command again" not in err, err
    # --max-cost reached: the fix is a higher cap.
    assert run(str(src), "-o", str(tmp_path / "b.csv"), "--field", "ceo=CEO", "--max-cost", "0.05") == 3
    err = capsys.readouterr().err
    assert "raise --max-cost" in err and "$0.05 spent of $0.05" in err, err
    # A wrong address answers nothing at all: say so, at once, and that nothing was created.
    monkeypatch.setenv("PARALLEL_BASE_URL", "http://127.0.0.1:9")
    assert run(str(src), "-o", str(tmp_path / "c.csv"), "--field", "ceo=CEO") == 2
    err = capsys.readouterr().err
    assert "could not reach http://127.0.0.1:9" in err and "long while" not in err, err


def test_no_key_is_refused_before_the_table_is_read_or_a_checkpoint_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    with pytest.raises(UsageError, match=r"^no API key: .*enrich\.Emulator\(\)"):
        enrich(pl.DataFrame({"company": ["a"]}), "ceo", checkpoint=tmp_path / "cp", progress=False)
    assert not (tmp_path / "cp").exists()  # (it used to hold a manifest naming a service never asked)


def test_a_misspelt_argument_names_enrich_and_the_near_name(tmp_path: Path) -> None:
    """enrich() hands its keyword arguments to aenrich(): a typo used to be "aenrich() got an unexpected
    keyword argument", and help(enrich) showed only **kwargs."""
    with pytest.raises(TypeError, match=r"^enrich\(\) got an unexpected keyword argument 'procesor'; did "):
        enrich(pl.DataFrame({"a": [1]}), "x", procesor="base", checkpoint=tmp_path / "cp")
    assert not (tmp_path / "cp").exists()
    shown = inspect.signature(enrich).parameters
    assert {"processor", "checkpoint", "basis", "max_cost"} <= set(shown)
    assert not [name for name in shown if name.startswith("_")]


# -- 12. Ctrl-C -------------------------------------------------------------------------------------------


def test_ctrl_c_stops_a_sync_call_made_inside_a_running_loop(tmp_path: Path) -> None:
    """asyncio.run's own SIGINT handler cancels a task that cannot run while enrich() blocks the loop:
    without care, Ctrl-C would wait for the job's end (a minute here)."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, threading, time
        import polars as pl
        from enrich import Emulator, enrich

        async def main():
            with Emulator(latency=60) as emu:
                threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
                t = time.monotonic()
                try:
                    enrich(pl.DataFrame({{"company": ["a", "b"]}}), {{"ceo": "CEO"}}, api_key=emu.api_key,
                           base_url=emu.url, checkpoint={str(tmp_path / "cp")!r}, progress=False,
                           processor="lite")
                except KeyboardInterrupt:
                    print(f"interrupted after {{time.monotonic() - t:.1f}} s", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert "interrupted after" in done.stdout, done.stderr[-2000:]
    assert float(done.stdout.split()[2]) < 10
    assert Checkpoint.read(tmp_path / "cp").counts().submitted == 2  # its runs are recorded


def test_ctrl_c_in_a_script_cancels_the_job_from_the_loop_not_from_the_signal_handler() -> None:
    """asyncio.run's handler cancels the main task inside the signal handler, which can land between an
    Event.set()'s `fut.done()` check and its `set_result()`: the loop then dies with a "Fatal error ...
    InvalidStateError" traceback (seen once in CI, on `enrich run`). enrich() cancels on the loop instead."""
    script = textwrap.dedent(
        """
        import asyncio, signal
        from enrich._engine.sync import _run_here

        seen = {}

        async def job():
            task = asyncio.current_task()
            signal.raise_signal(signal.SIGINT)  # the Python handler has run when this returns
            seen["cancelled in the handler"] = task.cancelling()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # the job's flush still runs
                seen["flushed"] = True
                raise

        try:
            _run_here(job())
        except KeyboardInterrupt:
            seen["KeyboardInterrupt"] = True
        seen["handler restored"] = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print(seen)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.stdout.strip() == str(
        {"cancelled in the handler": 0, "flushed": True, "KeyboardInterrupt": True, "handler restored": True}
    ), done.stdout + done.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_ctrl_c_at_the_confirmation_prompt_sends_nothing(tmp_path: Path, emu: Emulator) -> None:
    import pty

    src = tmp_path / "in.csv"
    companies(2_001).write_csv(src)  # $10.005 on lite: above the $10 that asks first
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal, Ctrl-C not ignored (a background job's would be)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        argv = ["-m", "enrich", "run", str(src), "-o", str(tmp_path / "o.csv"), "--field", "ceo=CEO"]
        os.execvp(sys.executable, [sys.executable, *argv, "--processor", "lite"])
    seen = b""
    while b"Submit it?" not in seen:
        chunk = os.read(fd, 1024)
        assert chunk, seen
        seen += chunk
    os.kill(pid, signal.SIGINT)
    rest = b""
    try:
        while chunk := os.read(fd, 1024):
            rest += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, rest
    assert b"not confirmed: nothing was sent" in rest and b"Traceback" not in rest
    assert emu.stats()["requests_total"] == 0


# -- 13. habits -------------------------------------------------------------------------------------------


def test_version_and_emulate_port_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("enrich ")
    assert main(["emulate", "--port", "99999"]) == 2
    assert "0 to 65535" in capsys.readouterr().err
    with Emulator() as busy:
        port = int(busy.url.rsplit(":", 1)[1])
        assert main(["emulate", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "in use" in err and err.count("\n") == 1


# -- 14, 15. the default checkpoint; arrow in, arrow out --------------------------------------------------


def test_a_notebook_cell_run_twice_pays_once(emu: Emulator, tmp_path: Path) -> None:
    df = companies(5)
    stats = JobStats()
    first = enrich(df, CEO, progress=False, processor="lite", stats=stats)
    where = Path(stats.checkpoint)
    assert where.is_relative_to(Path(os.environ["ENRICH_CACHE_DIR"])) and (where / "manifest.json").exists()
    again = enrich(df, CEO, progress=False, processor="lite")
    assert again.equals(first) and emu.stats()["runs_created"] == 5
    # checkpoint=False: nothing is left behind once every row finished
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("enrich-*"))
    enrich(companies(3), {"cfo": "CFO"}, progress=False, processor="lite", checkpoint=False)
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("enrich-*")) == before


def test_an_arrow_table_gives_an_arrow_table(emu: Emulator) -> None:
    table = pa.table({"company": pa.array(["Acme", "Initech"], pa.string()), "zip": ["02134", "00042"]})
    out = enrich(table, CEO, progress=False, processor="lite", checkpoint=False)
    assert isinstance(out, pa.Table)
    assert out.select(["company", "zip"]).equals(table)  # the caller's columns exactly as given
    assert out.column_names[-4:] == ["_status", "_error", "_run_id", "_interaction_id"]
    lazy = asyncio.run(aenrich(pl.LazyFrame({"company": ["Acme"]}), CEO, progress=False, processor="lite"))
    assert isinstance(lazy, pl.DataFrame) and lazy["_status"].to_list() == ["completed"]


# -- 2, 5, 13. files: values as written, checks before paying, the usual shell habits --------------------


def test_csv_values_come_back_and_are_sent_as_written(tmp_path: Path, emu: Emulator) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    rows = ["company,zip,price"] + [f"Company {i},{i:05d},{i}.10" for i in range(3)] + ["Initech,ABC,1.0"]
    src.write_text("\n".join(rows) + "\n")
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO") == 0
    back = out.read_text().splitlines()
    # ... then ceo, _status, _error, _run_id, _interaction_id
    assert [line.rsplit(",", 5)[0] for line in back] == rows
    sent = sorted(json.loads(r.body)["input"]["zip"] for r in emu.app.state.runs.values())
    assert sent == ["00000", "00001", "00002", "ABC"]


def test_an_output_that_cannot_be_written_is_refused_before_paying(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.csv"
    companies(3).write_csv(src)
    assert run(str(src), "-o", "/proc/enrich-out.csv", "--field", "ceo=CEO") == 2
    assert run(str(src), "-o", str(tmp_path / "o.csv"), "--checkpoint", "/proc/cp", "--field", "ceo=CEO") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "/proc" in err, err
    assert emu.stats()["requests_total"] == 0


def test_stdin_to_stdout_globs_and_json_arrays(
    tmp_path: Path, emu: Emulator, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        companies(2).with_columns(pl.col("company") + f"-{i}").write_csv(parts / f"part-{i}.csv")
    out = tmp_path / "out.parquet"
    assert run(str(parts / "part-*.csv"), "-o", str(out), "--field", "ceo=CEO") == 0
    assert pl.read_parquet(out)["company"].to_list() == [
        f"Company {j}-{i}" for i in range(3) for j in range(2)
    ]
    array = tmp_path / "in.json"
    array.write_text(json.dumps([{"company": "Acme"}, {"company": "Initech"}]))
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "enrich",
            "run",
            "-",
            "-o",
            "-",
            "--field",
            "ceo=CEO",
            "--processor",
            "lite",
            "--no-progress",
            "--checkpoint",
            str(tmp_path / "cp"),
        ],
        input=b"company\nAcme\n",
        capture_output=True,
        env={**os.environ, "PARALLEL_BASE_URL": emu.url, "PARALLEL_API_KEY": KEY},
        timeout=60,
    )
    assert code.returncode == 0, code.stderr
    lines = code.stdout.decode().splitlines()
    assert lines[0] == "company,ceo,_status,_error,_run_id,_interaction_id" and lines[1].startswith("Acme,")
    assert run(str(array), "-o", str(out), "--field", "ceo=CEO") == 0
    assert pl.read_parquet(out)["company"].to_list() == ["Acme", "Initech"]


def test_a_checkpoint_of_an_older_enrich_keeps_its_answers(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints written before the input mapping left the fingerprint (and before the service was
    recorded) resume: nothing is sent again, and the service is recorded from then on."""
    import enrich._engine.prepare as preparing

    prepare = preparing._prepare

    def old_style(*args: Any, **kwargs: Any) -> Any:
        plan = prepare(*args, **kwargs)
        plan.fingerprint.update(columns=kwargs["columns"], prompt=kwargs["prompt"])
        return plan

    df, cp = companies(4), tmp_path / "cp"
    with monkeypatch.context() as patch:
        patch.setattr(preparing, "_prepare", old_style)
        enrich(df, CEO, checkpoint=cp, progress=False, processor="lite", service="x")
    manifest = json.loads((cp / "manifest.json").read_text())
    manifest.pop("service")
    (cp / "manifest.json").write_text(json.dumps(manifest))
    again = enrich(df, CEO, checkpoint=cp, progress=False, processor="lite", columns=["company"])
    assert set(again["_status"]) == {"completed"} and emu.stats()["runs_created"] == 4
    assert Checkpoint.read(cp).service == emu.url


def test_an_emulator_restarted_at_the_same_address_is_named_not_waited_for(tmp_path: Path) -> None:
    """`enrich emulate` stopped and started again (new ids): the resumed job's group is unknown there. It
    stops at once with ForeignRunError, instead of waiting for runs that will never end."""
    import socket

    from enrich import ForeignRunError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    df, cp = companies(3), tmp_path / "cp"
    kw: dict[str, Any] = {"checkpoint": cp, "progress": False, "processor": "lite"}
    with Emulator(port=port, latency=30) as first:
        out = enrich(df, CEO, api_key=first.api_key, base_url=first.url, timeout=1, **kw)
        assert set(out["_status"]) == {"pending"}
    with (
        Emulator(port=port, latency=0.05) as second,
        pytest.raises(ForeignRunError, match="does not know task group"),
    ):
        enrich(df, CEO, api_key=second.api_key, base_url=second.url, timeout=20, **kw)
    assert Checkpoint.read(cp).counts().submitted == 3  # nothing recorded is lost


@pytest.mark.parametrize("mode", ["runs", "group"])
def test_creates_refused_with_429_are_not_in_doubt_after_a_stop(tmp_path: Path, mode: str) -> None:
    """Stopped while creates wait to go again after a 429: the service refused them, so nothing exists.
    They must not be in doubt, or the resume holds their rows for the whole commit horizon (2 min)."""
    cp = tmp_path / "cp"
    quota = {"rate_limit": None, "run_rate_limit": 5, "rate_window": 1.0}
    with Emulator(api_key=KEY, latency=0.05, **quota) as emu:
        out = enrich(
            companies(60),
            CEO,
            api_key=KEY,
            base_url=emu.url,
            checkpoint=cp,
            progress=False,
            processor="lite",
            mode=mode,
            run_rate=100,
            rate_window=1.0,
            timeout=2.0,
        )
        assert "pending" in set(out["_status"]) and emu.stats()["rate_limited"] >= 1
    # At most what was on the wire at the stop: a create or two in runs mode; in group mode one add, of up
    # to the service's burst (5) once the limiter learned it (the creates refused and waiting would be 60).
    assert Checkpoint.read(cp).counts().in_doubt <= (2 if mode == "runs" else 5)


def test_a_wrong_address_leaves_nothing_that_blocks_the_right_one(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(3).write_csv(src)
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--base-url", "127.0.0.1:8787") == 2
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--base-url", "http://127.0.0.1:9") == 2
    assert "could not reach http://127.0.0.1:9" in capsys.readouterr().err
    assert run(str(src), "-o", str(out), "--field", "ceo=CEO", "--timeout", "30") == 0, (
        capsys.readouterr().err
    )
    assert Checkpoint.read(tmp_path / "out.parquet.enrich").service == emu.url


def test_the_default_checkpoint_is_the_calls_own(emu: Emulator) -> None:
    """Other data with the same output is another job: its own spend under max_cost, its own lock."""
    first, second = JobStats(), JobStats()
    enrich(companies(4), CEO, progress=False, processor="lite", stats=first)
    out = enrich(companies(3).reverse(), CEO, progress=False, processor="lite", stats=second, max_cost=0.02)
    assert first.checkpoint != second.checkpoint and set(out["_status"]) == {"completed"}
    assert second.spent == pytest.approx(0.015)


def test_a_temporary_checkpoint_names_itself_in_the_rows_left_pending(tmp_path: Path) -> None:
    with Emulator(api_key=KEY, latency=30) as emu:
        out = enrich(
            companies(2), CEO, api_key=KEY, base_url=emu.url, progress=False, processor="lite",
            checkpoint=False, timeout=1,
        )  # fmt: skip
    error = out["_error"][0]
    where = error.split("checkpoint=")[1].split(" ")[0].strip("'")
    assert "run the same call again" not in error and Checkpoint.read(where).counts().submitted == 2


def test_emulate_on_port_0_names_the_port_it_serves() -> None:
    from enrich._cli import _check_port_free

    assert _check_port_free("127.0.0.1", 0) > 0


def test_an_older_checkpoint_of_an_emulator_never_passes_for_another_service(tmp_path: Path) -> None:
    """A checkpoint written before services were recorded is checked before it is adopted: one of its
    runs is looked up on the new service, and an unknown run refuses it (its answers were synthetic)."""
    df, cp = companies(3), tmp_path / "cp"
    kw: dict[str, Any] = {"checkpoint": cp, "progress": False, "processor": "lite"}
    with Emulator(api_key=KEY, latency=0.05) as first:
        enrich(df, CEO, api_key=KEY, base_url=first.url, **kw)
    manifest = json.loads((cp / "manifest.json").read_text())
    del manifest["service"]  # as an older enrich wrote it
    (cp / "manifest.json").write_text(json.dumps(manifest))
    with Emulator(api_key=KEY, latency=0.05) as second:
        with pytest.raises(ServiceMismatchError, match="written before enrich recorded services"):
            enrich(df, CEO, api_key=KEY, base_url=second.url, **kw)
        assert second.stats()["runs_created"] == 0
    assert Checkpoint.read(cp).service is None  # not adopted


def test_an_in_process_transport_is_not_the_base_urls_service(tmp_path: Path) -> None:
    import httpx

    from enrich import create_app

    transport = httpx.ASGITransport(app=create_app())
    enrich(companies(2), CEO, api_key=KEY, transport=transport, checkpoint=tmp_path / "cp", progress=False)
    assert Checkpoint.read(tmp_path / "cp").service == "a custom transport at https://api.parallel.ai"


def test_only_the_retired_fingerprint_keys_are_ignored(tmp_path: Path) -> None:
    from enrich import CheckpointMismatchError

    with Checkpoint.open(tmp_path / "a", {"processor": "lite", "columns": ["company"], "prompt": None}):
        pass
    with Checkpoint.open(tmp_path / "a", {"processor": "lite"}):  # an older enrich's mapping: the same job
        pass
    with Checkpoint.open(tmp_path / "b", {"processor": "lite", "from_the_future": 1}):
        pass
    with pytest.raises(CheckpointMismatchError, match="from_the_future"):
        Checkpoint.open(tmp_path / "b", {"processor": "lite"})
