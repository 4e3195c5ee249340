"""Scale through the command: `enrich run` on a synthetic Parquet input of many rows (10,000,000 by
default) against the emulator, then the same command again on the finished checkpoint.

Run with `python bench/scale_cli.py [--rows 10000000] [--workdir DIR]`. Prints a small table, no
pass/fail, and writes it to `bench/results-scale-cli.md` (overwritten).

1. The input (`scale.synthetic_input`: company, website, country; distinct rows) is written as Parquet.
2. The emulator runs in a process of its own with raised budgets (`REQUESTS` requests and `RUNS` runs
   a minute; runs take 2 s on average), and `enrich run` is given the same budgets.
3. `enrich run input.parquet -o out.parquet` runs as a child process (`python -m enrich`): its wall,
   its peak RSS and its CPU (from `os.wait4`, the child's own), and the emulator's counters.
4. The same command again (the resume of a finished job): it must send nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from emuproc import EmulatorProcess
from engine import format_table
from scale import dir_bytes, synthetic_input

LATENCY = 2.0
REQUESTS = 20_000  # a minute, engine and emulator
RUNS = 500_000  # a minute, engine and emulator
PROCESSOR = "lite-fast"
RESULTS = Path(__file__).with_name("results-scale-cli.md")
FIELDS = ["--field", "ceo=Name of the CEO", "--field", "founded:integer=Year founded"]


def write_input(rows: int, path: Path) -> float:
    """Write `rows` synthetic rows to `path` a million at a time; seconds taken."""
    t = time.perf_counter()
    step = 1_000_000
    if rows <= step:
        synthetic_input(rows).write_parquet(path)
    else:
        import pyarrow.parquet as pq

        whole = synthetic_input(rows)  # (the generator's own memory: this process, not the client)
        with pq.ParquetWriter(str(path), whole.slice(0, 1).to_arrow().schema) as writer:
            for start in range(0, rows, step):
                writer.write_table(whole.slice(start, step).to_arrow())
        del whole
    return time.perf_counter() - t


def enrich_run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m enrich run ...` as a child: its wall, exit code, peak RSS (MB) and CPU (s)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "enrich", *args], env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall": time.perf_counter() - t,
        "rc": proc.returncode,
        "rss": usage.ru_maxrss / 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
        "stderr": err.strip().splitlines()[-3:],
    }


def run(rows: int, workdir: Path) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"bench/scale_cli.py --rows {rows}: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python "
        f"{platform.python_version()}, polars {pl.__version__}, {os.cpu_count()} CPUs",
        "",
    ]
    print(lines[0], flush=True)
    source = workdir / "input.parquet"
    if not source.exists():
        # In a process of its own: Linux counts a child's peak RSS from its parent's at the fork (the
        # larger is kept across fork and exec), so a 10M-row frame built here would be every child's
        # "peak" (it was: 1,934 MB for both the run and the resume, whose own peaks were lower).
        t = time.perf_counter()
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scale_cli; "
        code += f"scale_cli.write_input({rows}, __import__('pathlib').Path({str(source)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"input written in {time.perf_counter() - t:.0f} s", flush=True)
    out = workdir / "out.parquet"
    checkpoint = Path(str(out) + ".enrich")
    with EmulatorProcess(
        latency=LATENCY, rate_limit=REQUESTS, run_rate_limit=RUNS, rate_window=60.0, seed=1
    ) as emu:
        env = {**os.environ, "PARALLEL_API_KEY": emu.api_key}
        args = [
            "run",
            str(source),
            "-o",
            str(out),
            *FIELDS,
            "--processor",
            PROCESSOR,
            "--base-url",
            emu.url,
            "--rate-limit",
            str(REQUESTS),
            "--run-rate",
            str(RUNS),
            "--no-progress",
            "--yes",
        ]
        before = emu.stats()
        job = enrich_run(args, env)
        print(f"job: {job}", flush=True)
        served = emu.stats()
        emu_rss = emu.peak_rss_mb()
        resume = enrich_run(args, env)
        print(f"resume: {resume}", flush=True)
        after = emu.stats()
    written = pl.scan_parquet(out)
    statuses = dict(written.group_by("_status").len().collect().iter_rows())
    # (in this process, not the client's: every input value back in its place)
    in_order = pl.read_parquet(out, columns=["company"])["company"].equals(
        pl.read_parquet(source, columns=["company"])["company"]
    )
    created = served["runs_created"] - before["runs_created"]
    ideal = max(LATENCY, rows / RUNS * 60.0)
    table: list[tuple[str, ...]] = [
        (
            "input",
            f"{source.stat().st_size / 1e6:,.1f} MB",
            "",
            f"Parquet, {rows:,} distinct rows",
        ),
        ("run: wall", f"{job['wall']:,.0f} s", "", f"exit {job['rc']}"),
        (
            "run: wall / ideal",
            f"{job['wall'] / ideal:.2f}x",
            "",
            f"ideal {ideal:,.0f} s: {rows:,} / {RUNS:,} runs a minute",
        ),
        ("run: peak RSS", f"{job['rss']:,.0f} MB", "<= 1,536 MB", "the enrich process"),
        ("run: CPU", f"{job['cpu']:,.0f} s", "", f"{job['cpu'] / rows * 1000:.3f} s per 1,000 rows"),
        ("runs created - distinct", f"{created - rows:,}", "0", f"{created:,} created"),
        ("429s", f"{served['rate_limited'] - before['rate_limited']:,}", "", ""),
        ("rows by status", ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items())), "", ""),
        (
            "inputs in order",
            str(in_order) if in_order is not None else "n/a",
            "True",
            "the output's company column is the input's",
        ),
        ("checkpoint on disk", f"{dir_bytes(checkpoint) / 1e6:,.0f} MB", "", ""),
        ("output file", f"{out.stat().st_size / 1e6:,.0f} MB", "", ""),
        ("emulator peak RSS", f"{emu_rss or 0:,.0f} MB", "", "its own process"),
        ("resume: wall", f"{resume['wall']:,.1f} s", "<= 30 s", f"exit {resume['rc']}, written again"),
        ("resume: peak RSS", f"{resume['rss']:,.0f} MB", "", ""),
        ("resume: requests", f"{after['requests_total'] - served['requests_total']:,}", "0", ""),
    ]
    lines += [
        f"`enrich run` of {rows:,} rows, {PROCESSOR}, group mode; emulator and engine allow {REQUESTS:,} "
        f"requests and {RUNS:,} runs a minute; runs take {LATENCY:g} s on average",
        "",
        *format_table(("measure", "value", "target", "note"), table, right=(1, 2)),
        "",
        "last lines of the run's stderr: " + " | ".join(job["stderr"]),
        "last lines of the resume's stderr: " + " | ".join(resume["stderr"]),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows (default 10,000,000)")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()
    if args.workdir is not None:
        lines = run(args.rows, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="enrich-scale-cli-") as tmp:
            lines = run(args.rows, Path(tmp))
    print("\n".join(lines))
    RESULTS.write_text(
        "# bench/scale_cli.py: latest results\n\n"
        f"Written by `python bench/scale_cli.py --rows {args.rows}` (overwritten on each run).\n\n"
        "```\n" + "\n".join(lines) + "\n```\n"
    )


if __name__ == "__main__":
    main()
