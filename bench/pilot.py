"""Pilot: how close a pilot's projection of the rest of a job comes to what the rest then does.

Run with `python bench/pilot.py [--rows 2000] [--pilot 100]`. Writes its table to
`bench/results-pilot.md` (overwritten). Nothing passes or fails: the ratios are printed next to the
target (the projection within 20 % of the outcome).

For each setting (the emulator in a process of its own, `bench/emuproc.py`; engine and emulator allow
the same budgets): `aenrich(pilot=N)` on `rows` distinct inputs runs the pilot and returns its
`PilotReport`; the same call again runs the rest of the job, whose wall time, runs created and
unanswered rows are compared with the report's projection (`rest_seconds`, `rest_runs`, `rest_cost`,
and the pilot's share of unanswered runs times the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from emuproc import EmulatorProcess

from enrich import JobStats, PilotReport, aenrich

RESULTS = Path(__file__).with_name("results-pilot.md")
FIELDS = {
    "ceo": "Name of the current CEO",
    "founded": ("integer", "Year the company was founded"),
    "hq": "City of the headquarters",
}
#: (name, emulator latency s, runs per window, requests per window, window s, failure rate, mode)
SETTINGS = [
    ("group, runs-bound", 2.0, 500, 2000, 6.0, 0.05, "group"),
    ("group, one window", 3.0, 2000, 2000, 6.0, 0.10, "group"),
    ("runs mode, requests-bound", 1.0, 2000, 400, 6.0, 0.05, "runs"),
]


async def one(
    name: str,
    latency: float,
    runs: int,
    requests: int,
    window: float,
    failure: float,
    mode: str,
    rows: int,
    pilot: int,
    workdir: Path,
) -> list[str]:
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(rows)], "country": ["Germany"] * rows})
    checkpoint = workdir / f"{name.replace(' ', '-').replace(',', '')}.enrich"
    with EmulatorProcess(
        latency=latency,
        failure_rate=failure,
        rate_limit=requests,
        run_rate_limit=runs,
        rate_window=window,
        seed=7,
    ) as emu:
        common = dict(
            base_url=emu.url,
            api_key=emu.api_key,
            processor="lite",
            mode=mode,
            checkpoint=checkpoint,
            progress=False,
            rate_limit=requests,
            run_rate=runs,
            rate_window=window,
            pilot=pilot,
        )
        first = await aenrich(df, FIELDS, **common)
        report: PilotReport = first.report
        created_pilot = emu.stats()["runs_created"]
        stats = JobStats()
        t0 = time.perf_counter()
        out = await aenrich(df, FIELDS, stats=stats, **common)
        wall = time.perf_counter() - t0
        created = emu.stats()["runs_created"] - created_pilot
    unanswered = out.height - out.filter(pl.col("_status") == "completed").height
    pilot_unanswered = report.runs - report.completed
    expected_unanswered = (1 - report.completed / report.runs) * report.rest_runs if report.runs else 0.0
    rest_unanswered = unanswered - pilot_unanswered
    ratio = wall / report.rest_seconds if report.rest_seconds else float("nan")
    spent = created * (report.price_per_run or 0)
    p50, p90 = report.percentile(0.5) or 0.0, report.percentile(0.9) or 0.0
    return [
        f"{name}: {rows:,} rows, pilot {pilot}, latency {latency:g} s (uniform 0.5-1.5x), {runs:,} runs and "
        f"{requests:,} requests per {window:g} s, failure rate {failure:.0%}, {mode} mode",
        f"  {'':28} {'projected':>12} {'actual':>12} {'actual/projected':>18}",
        f"  {'rest: wall s':28} {report.rest_seconds:>12.1f} {wall:>12.1f} {ratio:>17.2f}x",
        f"  {'rest: runs created':28} {report.rest_runs:>12,} {created:>12,} "
        f"{created / max(1, report.rest_runs):>17.2f}x",
        f"  {'rest: cost $':28} {report.rest_cost or 0:>12.2f} {spent:>12.2f}",
        f"  {'rest: unanswered rows':28} {expected_unanswered:>12.0f} {rest_unanswered:>12,}",
        f"  pilot: {report.runs} runs, p50 {p50:.2f} s, p90 {p90:.2f} s, "
        f"max {max(report.latencies):.2f} s, took {report.wall:.1f} s; target: wall within 20 % "
        f"({'met' if 0.8 <= ratio <= 1.2 else 'MISSED'})",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--pilot", type=int, default=100)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="enrich-bench-pilot-"))
    lines = [
        f"bench/pilot.py --rows {args.rows} --pilot {args.pilot}: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"Python {platform.python_version()}, polars {pl.__version__}, {os.cpu_count()} CPUs",
        "",
    ]
    print("\n".join(lines), flush=True)
    for setting in SETTINGS:
        got = asyncio.run(one(*setting, rows=args.rows, pilot=args.pilot, workdir=workdir))
        print("\n".join(got), flush=True)
        lines += got
    RESULTS.write_text(
        "# bench/pilot.py: latest results\n\nWritten by `python bench/pilot.py` (overwritten on each run). "
        "See `bench/README.md`.\n\n```\n" + "\n".join(lines) + "\n```\n"
    )


if __name__ == "__main__":
    sys.exit(main())
