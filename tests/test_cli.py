"""The `enrich` command: in-process through main(), and as a subprocess against a real emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from enrich import Emulator
from enrich._cli import _parse_field, main
from enrich._schema import parse_output

SECRET = "sk-RECOGNISABLE-SECRET-0123456789"


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "in.csv"
    pl.DataFrame(
        {
            "company": [f"Company {i}" for i in range(12)],
            "website": [f"c{i}.com" for i in range(12)],
            "listed": ["2020-01-0" + str(1 + i % 9) for i in range(12)],
        }
    ).write_csv(path)
    return path


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    with Emulator(api_key=SECRET, latency=0.05) as emulator:
        monkeypatch.setenv("PARALLEL_API_KEY", SECRET)
        monkeypatch.setenv("PARALLEL_BASE_URL", emulator.url)
        yield emulator


FIELDS = [
    "--field",
    "ceo=Name of the CEO",
    "--field",
    "founded:integer=Year founded",
    "--field",
    "tags:array=Tags",
]


def test_run_csv_to_parquet_and_resume(
    table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    out = table.with_name("out.parquet")
    code = main(["run", str(table), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress"])
    assert code == 0
    df = pl.read_parquet(out)
    assert df["company"].to_list() == [f"Company {i}" for i in range(12)]
    assert df.schema["listed"] == pl.Utf8  # CSV values come back as written: text
    assert df["listed"].to_list() == pl.read_csv(table, infer_schema=False)["listed"].to_list()
    assert df.schema["founded"] == pl.Int64 and df.schema["tags"] == pl.List(pl.Utf8)
    assert set(df["_status"]) == {"completed"}
    assert "12 completed, 0 failed, 0 pending" in capsys.readouterr().err
    assert (table.parent / "out.parquet.enrich" / "manifest.json").exists()
    assert main(["run", str(table), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress"]) == 0
    assert emu.stats()["runs_created"] == 12  # the rerun sent nothing new
    typed = table.with_name("typed.parquet")  # --infer-types: dates as dates (and other inputs: new runs)
    args = ["run", str(table), "-o", str(typed), *FIELDS, "--processor", "lite", "--no-progress"]
    assert main([*args, "--infer-types"]) == 0
    assert pl.read_parquet(typed).schema["listed"] == pl.Date


def test_parquet_to_csv_flattens_nested_columns(table: Path, emu: Emulator) -> None:
    src = table.with_name("in.parquet")
    pl.read_csv(table, try_parse_dates=True).write_parquet(src)
    out = table.with_name("out.csv")
    assert (
        main(["run", str(src), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress", "--basis"])
        == 0
    )
    back = pl.read_csv(out, try_parse_dates=True)
    assert back.schema["listed"] == pl.Date and back.schema["founded"] == pl.Int64
    assert isinstance(json.loads(back["tags"][0]), list)
    assert json.loads(back["_basis"][0])[0]["field"] == "ceo"


def test_jsonl_in_and_out(tmp_path: Path, emu: Emulator) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"company": "A"}\n{"company": "B"}\n')
    out = tmp_path / "out.ndjson"
    assert (
        main(["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["company"] for r in rows] == ["A", "B"] and all(r["_status"] == "completed" for r in rows)


def test_schema_file_and_prompt(table: Path, emu: Emulator) -> None:
    schema = table.with_name("schema.json")
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"ceo": {"type": "string", "description": "CEO"}},
                "required": ["ceo"],
                "additionalProperties": False,
            }
        )
    )
    out = table.with_name("out.parquet")
    args = ["run", str(table), "-o", str(out), "--schema", str(schema), "--prompt", "CEO of {company}?"]
    assert main([*args, "--processor", "lite", "--no-progress", "--columns", "company"]) == 0
    assert pl.read_parquet(out)["ceo"].null_count() == 0


def test_dry_run_sends_nothing(table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    out = table.with_name("out.parquet")
    assert main(["run", str(table), "-o", str(out), *FIELDS, "--processor", "pro", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "runs to submit:     12" in plan and "$1.20" in plan and "nothing was sent" in plan
    # The time says what it assumes: pro's documented run time and the --run-rate.
    assert "(assumes runs take 2 min to 10 min, 6 min on average, and 2,000 runs created a minute)" in plan
    assert emu.stats()["requests_total"] == 0
    assert not out.exists() and not table.with_name("out.parquet.enrich").exists()


def test_max_cost_holds_across_resumes(
    table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    out = table.with_name("out.parquet")
    args = ["run", str(table), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
    # lite is $0.005 a run: $0.02 pays for 4 runs
    assert main([*args, "--max-cost", "0.02"]) == 3
    assert emu.stats()["runs_created"] == 4
    df = pl.read_parquet(out)
    assert df["_status"].to_list().count("completed") == 4
    assert "max cost" in df.filter(pl.col("_status") == "pending")["_error"][0]
    assert main([*args, "--max-cost", "0.02"]) == 3
    assert emu.stats()["runs_created"] == 4
    assert "--max-cost reached" in capsys.readouterr().err
    assert main([*args, "--max-cost", "1"]) == 0
    assert emu.stats()["runs_created"] == 12


def test_expensive_job_needs_yes_without_a_terminal(tmp_path: Path, emu: Emulator) -> None:
    src = tmp_path / "in.csv"
    pl.DataFrame({"company": [f"C{i}" for i in range(40)]}).write_csv(src)
    args = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--field", "ceo=CEO", "--processor", "ultra"]
    assert main([*args, "--no-progress"]) == 2  # $12 > $10, no terminal: refused
    assert emu.stats()["requests_total"] == 0
    assert main([*args, "--no-progress", "--yes"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--field", "ceo=CEO", "-o", "{dir}/in.csv"], "is the input file"),
        (["--field", "ceo=CEO", "-o", "{dir}/out.xlsx"], "unknown file type"),
        (["-o", "{dir}/out.parquet"], "--field"),
        (["--field", "ceo", "-o", "{dir}/out.parquet"], "NAME=DESCRIPTION"),
        (["--field", "ceo:int64=CEO", "-o", "{dir}/out.parquet"], "unknown type"),
        (["--field", "seg:enum(a,b=S", "-o", "{dir}/out.parquet"], "enum(a,b,c)"),
        (["--field", "seg:array[enum(a)=S", "-o", "{dir}/out.parquet"], "enum(a,b,c)"),
        (["--field", "seg:enum( , )=S", "-o", "{dir}/out.parquet"], "needs its choices"),
        (["--field", "company=dup", "-o", "{dir}/out.parquet"], "company"),
        (["--field", "ceo=CEO", "--columns", "nope", "-o", "{dir}/out.parquet"], "nope"),
        (["--field", "ceo=CEO", "--processor", "hyper", "-o", "{dir}/out.parquet"], "unknown processor"),
        (["--field", "ceo=CEO", "--processor", "core-fst", "-o", "{dir}/out.parquet"], "mean 'core-fast'?"),
        (["--field", "ceo=CEO", "--schema", "{dir}/missing.json", "-o", "{dir}/out.parquet"], "either"),
        (["--schema", "{dir}/missing.json", "-o", "{dir}/out.parquet"], "no such file"),
        (["--field", "ceo=CEO", "-o", "{dir}/nodir/out.parquet"], "does not exist"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [a.replace("{dir}", str(table.parent)) for a in argv]
    assert main(["run", str(table), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("enrich: error:") and message in err[0], err
    assert emu.stats()["requests_total"] == 0


def test_field_types_take_python_aliases_and_enums_with_their_choices_as_written(
    table: Path, emu: Emulator
) -> None:
    out = table.with_name("out.parquet")
    fields = ["n:int=Count", "ok:bool?=Ok", "seg:Enum(B2B, b2c)=Market", "tags:array[enum(x,y)?]?=Tags"]
    assert main(["run", str(table), "-o", str(out), *[f"--field={f}" for f in fields], "--no-progress"]) == 0
    df = pl.read_parquet(out)
    assert df.schema["n"] == pl.Int64 and df.schema["ok"] == pl.Boolean
    assert set(df["seg"]) <= {"B2B", "b2c"} and df.schema["tags"] == pl.List(pl.String)
    assert {t for tags in df["tags"] if tags is not None for t in tags} <= {"x", "y", None}
    sent = parse_output(dict(map(_parse_field, fields))).task_spec()["output_schema"]["json_schema"]
    assert sent["properties"]["seg"]["enum"] == ["B2B", "b2c"]
    assert sent["properties"]["tags"]["items"]["anyOf"][0]["enum"] == ["x", "y"]


def test_missing_input_and_missing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o.csv"), "--field", "a=b"]) == 2
    assert "no such file" in capsys.readouterr().err
    src = tmp_path / "in.csv"
    src.write_text("company\nA\n")
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    assert main(["run", str(src), "-o", str(tmp_path / "o.csv"), "--field", "a=b"]) == 2
    assert "PARALLEL_API_KEY" in capsys.readouterr().err


def test_bad_key_exits_4_and_keeps_the_checkpoint(
    table: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARALLEL_API_KEY", "wrong-key")
    out = table.with_name("out.parquet")
    assert (
        main(
            ["run", str(table), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
        )
        == 4
    )
    err = capsys.readouterr().err
    assert "401" in err and "Traceback" not in err and "wrong-key" not in err
    assert (
        err.strip().splitlines()[-1].startswith("enrich: error: the service refused the API key in PARALLEL")
    )
    assert (table.parent / "out.parquet.enrich" / "manifest.json").exists()


def test_timeout_exits_3_then_resumes(table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Emulator(latency=1.5) as slow:
        monkeypatch.setenv("PARALLEL_API_KEY", "k")
        monkeypatch.setenv("PARALLEL_BASE_URL", slow.url)
        out = table.with_name("out.parquet")
        args = [
            "run",
            str(table),
            "-o",
            str(out),
            "--field",
            "ceo=CEO",
            "--processor",
            "lite",
            "--no-progress",
        ]
        assert main([*args, "--timeout", "0.3"]) == 3
        assert set(pl.read_parquet(out)["_status"]) == {"pending"}
        assert main(args) == 0
        assert slow.stats()["runs_created"] == 12


def test_status(table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    out = table.with_name("out.parquet")
    assert (
        main(
            ["run", str(table), "-o", str(out), "--field", "ceo=CEO", "--processor", "base", "--no-progress"]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["completed"] == 12 and report["runs_created"] == 12
    assert report["spent_usd"] == pytest.approx(0.12) and len(report["groups"]) == 1
    assert report["last_finished"] is not None
    assert main(["status", str(table.parent / "out.parquet.enrich")]) == 0
    assert "12 completed" in capsys.readouterr().out
    assert main(["status", str(table.parent / "nothing-here")]) == 2
    # Into a pipe its reader closed (`enrich status ... | head -1`): no traceback.
    reader = subprocess.Popen(
        [sys.executable, "-m", "enrich", "status", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.close()
    with reader.stderr:
        err = reader.stderr.read()
    assert reader.wait(timeout=30) == 1 and err == b"", err.decode()


def test_retry_failed_before_the_input_takes_no_path(
    table: Path,
    emu: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """`--retry-failed` has an optional value: a path after it is the input, not statuses."""
    out = table.with_name("out.parquet")
    assert main(["run", "--retry-failed", str(table), "-o", str(out), "--field", "ceo=CEO", "--dry-run"]) == 0
    assert "rows:" in capsys.readouterr().out
    code = main(
        ["run", "--retry-failed", "canceled", str(table), "-o", str(out), "--field", "c=C", "--dry-run"]
    )
    assert code == 2 and "'canceled' is not a status" in (err := capsys.readouterr().err)
    assert "did you mean 'cancelled'?" in err and "True" not in err
    # Statuses stay the flag's value, even with a file of that name where the command runs.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "failed").write_text("company\nA\n")
    args = ["run", "--retry-failed", "failed", str(table), "-o", str(out), "--field", "ceo=CEO", "--dry-run"]
    assert main(args) == 0
    assert "rows:               12" in capsys.readouterr().out


def test_emulator_flag_needs_no_key(
    table: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PARALLEL_API_KEY", raising=False)
    out = table.with_name("out.parquet")
    assert (
        main(
            [
                "run",
                str(table),
                "-o",
                str(out),
                "--field",
                "ceo=CEO",
                "--processor",
                "lite",
                "--emulator",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "SYNTHETIC" in capsys.readouterr().err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for code in ("0 ", "2 ", "3 ", "4 "):
        assert f"  {code}" in text


def test_subprocess_key_never_written_and_sigint_exits_3(table: Path, tmp_path: Path) -> None:
    with Emulator(api_key=SECRET, latency=3.0) as slow:
        env = {**os.environ, "PARALLEL_API_KEY": SECRET, "PARALLEL_BASE_URL": slow.url}
        out = table.with_name("out.parquet")
        cmd = [
            sys.executable,
            "-m",
            "enrich",
            "run",
            str(table),
            "-o",
            str(out),
            "--field",
            "ceo=CEO",
            "--processor",
            "lite",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while slow.stats()["runs_created"] < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 3, stderr.decode()
        assert b"Traceback" not in stderr and b"run the same command again" in stderr
        rerun = subprocess.run([*cmd, "-v"], env=env, capture_output=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr.decode()
        assert slow.stats()["runs_created"] == 12
    blobs = [stdout, stderr, rerun.stdout, rerun.stderr]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in b for b in blobs)


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permission bits")
def test_the_output_gets_ordinary_permissions_not_the_temp_files(tmp_path: Path) -> None:
    """The output is written through a private temporary file; it must not stay private (0600)."""
    from enrich._io import write_table

    df = pl.DataFrame({"a": [1, 2]})
    old = os.umask(0o022)
    try:
        write_table(df, tmp_path / "new.parquet")
        assert (tmp_path / "new.parquet").stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("a\n")
        kept.chmod(0o640)
        write_table(df, kept)  # replacing a file keeps its mode
        assert kept.stat().st_mode & 0o777 == 0o640
        assert pl.read_csv(kept)["a"].to_list() == [1, 2]
    finally:
        os.umask(old)


def test_an_output_that_fails_to_write_keeps_every_answer(
    table: Path, emu: Emulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the result is written: exit 3, one line that says what to do, and the same
    command afterwards writes the file without a new run."""
    import errno

    import enrich._engine.pipeline as pipeline

    out = table.with_name("out.parquet")
    args = ["run", str(table), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress"]
    real = pipeline.write_frames

    def full(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline, "write_frames", full)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert f"error: cannot write {out}: No space left on device; every answer is kept in" in err
    assert "run the same call again (nothing is paid twice)" in err
    assert not out.exists() and not list(table.parent.glob(".enrich-parts-*"))
    monkeypatch.setattr(pipeline, "write_frames", real)
    assert main(args) == 0
    assert emu.stats()["runs_created"] == 12
    assert pl.read_parquet(out)["_status"].to_list() == ["completed"] * 12


def test_run_keys_the_input_once(table: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """`enrich run` plans the job (cost, what is done) and then runs it: the rows are keyed once for
    both (a million rows take seconds to key), and the job runs from that very preparation."""
    from enrich._engine.prepare import _Job

    calls: list[str] = []
    real = _Job.keyed

    def counting(self: _Job, df: pl.DataFrame, **kw: object) -> object:
        calls.append("key")
        return real(self, df, **kw)

    monkeypatch.setattr(_Job, "keyed", counting)
    out = table.with_name("out.parquet")
    assert main(["run", str(table), "-o", str(out), *FIELDS, "--processor", "lite", "--no-progress"]) == 0
    assert calls == ["key"]
    assert pl.read_parquet(out)["_status"].to_list() == ["completed"] * 12
