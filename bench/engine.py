"""Benchmark the batch engine: group mode end to end, and the checkpoint store at a million rows.

Run with `python bench/engine.py [--rows 10000] [--quick]`. Prints two tables, no pass/fail, and writes
them to `bench/results-engine.md` (overwritten). About 1.5 minutes on 2 cores; `--quick` (no 1M part)
under one.

(a) `aenrich()` in group mode on `--rows` distinct rows against the emulator, at production physics
    run 10x faster: runs take 2 s on average (1-3 s), and both sides (engine and emulator) allow 2,000
    requests and 2,000 runs per 6-s window (a 10x-scaled minute). The emulator is the real HTTP server
    (`Emulator`: uvicorn on 127.0.0.1) in a thread of this process, so requests cross a socket as in
    production; the CPU of that thread is read from /proc and subtracted to give the client's CPU.
    The ideal wall time is `max(latency, rows / runs budget x window)`: submission paced by the runs
    budget, with the runs' latency overlapping it.
(b) The checkpoint as the engine writes it, per add-runs batch of 1,000 rows: `record_intents`,
    `record_receipts` (1,000 receipts), `add_outcomes` (1,000 outcomes with ~200-byte output JSON) and
    `flush`, for 10,000 and 1,000,000 synthetic rows; then resuming the 1M-row checkpoint
    (`Checkpoint.open`, `state(outputs=False)`, `state(outputs=True)`). Each part runs in a fresh
    process, so its peak RSS is its own; the 10k write is the median of three. Also: `add_outcomes`
    given one outcome per call (what recording each answer as it arrives would cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from emuproc import stat_cpu

from enrich import Emulator, EmulatorConfig
from enrich._checkpoint import Checkpoint, Outcome, Receipt
from enrich._engine import JobStats, aenrich

LATENCY = 2.0  # seconds, the mean run duration (the emulator draws from 0.5x to 1.5x)
BUDGET = 2000  # requests and runs per window, as in production
WINDOW = 6.0  # seconds: a minute scaled down 10x
BATCH = 1000  # rows per add-runs call, as the engine sends them
RESULTS = Path(__file__).with_name("results-engine.md")
FIELDS: dict[str, Any] = {
    "ceo": "Name of the current CEO",
    "founded": ("integer", "Year the company was founded"),
    "hq": ("object", {"city": "City", "country": "Country"}, "Headquarters"),
    "products": ("array", "Main products"),
}
ROUTES = {
    "POST /v1/tasks/groups/{taskgroup_id}/runs": "add-runs",
    "GET /v1/tasks/groups/{taskgroup_id}/runs": "runs stream",
    "GET /v1/tasks/groups/{taskgroup_id}/events": "events stream",
    "GET /v1/tasks/runs/{run_id}/result": "result",
    "POST /v1/tasks/groups": "create group",
}


# -- measuring ---------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux: VmHWM of /proc/self/status, because `ru_maxrss` survives exec and a spawned child would
    report its parent's peak. Elsewhere `ru_maxrss` (bytes on macOS, KiB on other systems).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def thread_cpu(native_id: int | None) -> float | None:
    """CPU seconds (user + system) a thread of this process has used, from /proc; None where unavailable."""
    return None if native_id is None else stat_cpu(f"/proc/self/task/{native_id}/stat")


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a new interpreter (spawned, not forked), so its peak RSS is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# -- (a) the engine ----------------------------------------------------------------------------------


def companies(rows: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "company": [f"Company {i}" for i in range(rows)],
            "website": [f"company-{i}.example.com" for i in range(rows)],
        }
    )


def engine_run(rows: int, workdir: Path) -> dict[str, Any]:
    df = companies(rows)
    config = EmulatorConfig(
        latency=LATENCY, rate_limit=BUDGET, run_rate_limit=BUDGET, rate_window=WINDOW, seed=1
    )
    stats = JobStats()
    with Emulator(config) as emu:
        server = next((t for t in threading.enumerate() if t.name == "enrich-emulator"), None)
        server_id = server.native_id if server is not None else None
        cpu0, server_cpu0 = time.process_time(), thread_cpu(server_id)
        start = time.perf_counter()
        out = asyncio.run(
            aenrich(
                df,
                FIELDS,
                api_key=emu.api_key,
                base_url=emu.url,
                rate_limit=BUDGET,
                run_rate=BUDGET,
                rate_window=WINDOW,
                checkpoint=workdir / "engine.enrich",
                progress=False,
                stats=stats,
            )
        )
        wall = time.perf_counter() - start
        cpu, server_cpu1 = time.process_time() - cpu0, thread_cpu(server_id)
        served = emu.stats()
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    return {
        "rows": rows,
        "distinct": df.n_unique(),
        "wall": wall,
        "cpu": cpu,
        "server_cpu": server_cpu,
        "stats": stats,
        "served": served,
        "completed": int((out["_status"] == "completed").sum()),  # (a filter would copy the frame)
        "rss": peak_rss_mb(),
    }


def engine_table(r: dict[str, Any]) -> list[str]:
    rows, served, stats = r["rows"], r["served"], r["stats"]
    ideal = max(LATENCY, rows / BUDGET * WINDOW)
    runs_needed = rows / BUDGET * WINDOW
    # A full budget goes at once, then one more per window: the last add-runs is admitted this late.
    admitted = (math.ceil(rows / BUDGET) - 1) * WINDOW
    floor = admitted + LATENCY * 1.5
    requests = served["requests_total"]
    by_route = ", ".join(
        f"{ROUTES.get(route, route)} {n}"
        for route, n in sorted(served["requests"].items(), key=lambda item: -item[1])
    )
    extra = served["runs_created"] - r["distinct"]
    if r["server_cpu"] is None:
        cpu_line = ("CPU, client + emulator", f"{r['cpu']:.2f} s", "", "(no per-thread CPU here)")
        client_cpu = r["cpu"]
    else:
        client_cpu = r["cpu"] - r["server_cpu"]
        cpu_line = ("CPU, emulator thread", f"{r['server_cpu']:.2f} s", "", "subtracted from the process")
    table: list[tuple[str, str, str, str]] = [
        ("wall time", f"{r['wall']:.1f} s", "", "aenrich() call: prepare, submit, collect, join"),
        (
            "ideal",
            f"{ideal:.1f} s",
            "",
            f"max(latency {LATENCY:g} s, {rows:,} / {BUDGET:,} runs x {WINDOW:g} s = {runs_needed:.1f} s)",
        ),
        (
            "floor",
            f"{floor:.1f} s",
            "",
            f"the last runs are admitted at {admitted:.0f} s, then take up to {LATENCY * 1.5:g} s",
        ),
        ("wall / ideal", f"{r['wall'] / ideal:.2f}x", "<= 1.15x", ""),
        ("requests", f"{requests:,}", "", by_route),
        ("requests per row", f"{requests / rows:.4f}", "<= 0.01", ""),
        (
            "429s",
            f"{served['rate_limited']:,}",
            "",
            f"{served['rate_limited'] / max(requests, 1):.1%} of requests",
        ),
        (
            "runs created - distinct inputs",
            f"{extra:,}",
            "0",
            f"{served['runs_created']:,} created, emulator duplicate_runs {served['duplicate_runs']}",
        ),
        (
            "polls / stragglers",
            f"{stats.polls} / {stats.stragglers}",
            "",
            "JobStats: runs-stream reads / waited alone",
        ),
        ("rows completed", f"{r['completed']:,}", f"{rows:,}", ""),
        (
            "client CPU",
            f"{client_cpu:.2f} s",
            "",
            f"{client_cpu / rows * 1000 * 1000:.0f} ms per 1,000 rows (engine, httpx, checkpoint)",
        ),
        cpu_line,
        ("peak RSS", f"{r['rss']:.0f} MB", "", "the whole process: engine and emulator"),
    ]
    lines = [
        f"(a) group mode, {rows:,} distinct rows, against the emulator served over real HTTP (uvicorn on",
        "    127.0.0.1, in a thread of this process; its CPU is read per thread from /proc); runs take",
        f"    {LATENCY:g} s on average (uniform {LATENCY * 0.5:g}-{LATENCY * 1.5:g} s); engine and emulator "
        f"both allow {BUDGET:,} requests and",
        f"    {BUDGET:,} runs per {WINDOW:g}-s window (production's minute, 10x faster)",
        "",
    ]
    return lines + format_table(("measure", "value", "target", "note"), table, right=(1, 2))


# -- (b) the checkpoint ------------------------------------------------------------------------------

_NAMES = ("Jonas Weber", "Mei Tanaka", "Amara Okafor", "Lucas Silva", "Sofia Rossi", "Noah Cohen")
_CITIES = (
    ("San Francisco", "United States"),
    ("Tokyo", "Japan"),
    ("Berlin", "Germany"),
    ("Lagos", "Nigeria"),
)
_PRODUCTS = ("analytics platform", "payments API", "industrial sensors", "cloud storage", "consulting")


@dataclass(frozen=True, slots=True)
class _Batch:
    """One add-runs batch as the engine records it: the intent's keys, then receipts, then outcomes."""

    batch_id: str
    group_id: str
    keys: list[str]
    receipts: list[Receipt]
    outcomes: list[Outcome]


def _output_prefixes(rng: random.Random, n: int = 512) -> list[str]:
    """Output JSON without its closing brace; each row adds a random `note` (so no two rows are alike)."""
    prefixes = []
    for _ in range(n):
        city, country = rng.choice(_CITIES)
        output = {
            "ceo": rng.choice(_NAMES),
            "founded": rng.randint(1900, 2024),
            "hq": {"city": city, "country": country},
            "products": rng.sample(_PRODUCTS, 3),
        }
        prefixes.append(json.dumps(output)[:-1])
    return prefixes


def synthetic_batch(rng: random.Random, group_id: str, prefixes: list[str]) -> _Batch:
    """One batch of BATCH rows with ~200-byte output JSON; built before the clock starts."""
    batch_id = uuid.uuid4().hex
    keys = [f"{rng.getrandbits(128):032x}" for _ in range(BATCH)]
    runs = [f"trun_{rng.getrandbits(128):032x}" for _ in range(BATCH)]
    now = datetime.now(UTC)
    return _Batch(
        batch_id,
        group_id,
        keys,
        [Receipt(k, r, group_id, batch_id, now) for k, r in zip(keys, runs, strict=True)],
        [
            Outcome(
                k,
                r,
                "completed",
                output=f'{rng.choice(prefixes)}, "note": "{rng.getrandbits(64):016x}"}}',
                basis="[]",
                finished_at=now,
            )
            for k, r in zip(keys, runs, strict=True)
        ],
    )


def write_checkpoint(rows: int, path: str, one_at_a_time: bool = False) -> dict[str, Any]:
    """Write `rows` rows into a new checkpoint at `path` as the engine does, one batch of 1,000 at a time.

    Only the checkpoint calls are timed. With `one_at_a_time`, outcomes are given to `add_outcomes` one
    per call. Returns seconds in total, per-batch seconds, disk size and this process's peak RSS.
    """
    rng = random.Random(rows)
    prefixes = _output_prefixes(rng)
    # First-call costs (polars, pyarrow, zstd) are not part of a row's cost: pay them on a throwaway.
    with (
        tempfile.TemporaryDirectory() as tmp,
        Checkpoint.open(tmp + "/warm-up", {"bench": "warm-up"}) as warm,
    ):
        _write_batch(warm, synthetic_batch(rng, "tgrp_warmup", prefixes), one_at_a_time=False)
    cp = Checkpoint.open(path, {"bench": "engine", "rows": rows})
    group_id = f"tgrp_{rng.getrandbits(128):032x}"
    cp.record_group(group_id)
    batches: list[float] = []
    for _ in range(rows // BATCH):
        batch = synthetic_batch(rng, group_id, prefixes)
        start = time.perf_counter()
        _write_batch(cp, batch, one_at_a_time=one_at_a_time)
        batches.append(time.perf_counter() - start)
    cp.close()
    output_bytes = sum(len(o.output or "") for o in batch.outcomes) / BATCH
    return {
        "rows": rows,
        "seconds": sum(batches),
        "batches": batches,
        "disk_mb": dir_size_mb(Path(path)),
        "segments": sum(1 for p in Path(path).glob("*.parquet")),
        "rss": peak_rss_mb(),
        "output_bytes": output_bytes,
    }


def _write_batch(cp: Checkpoint, batch: _Batch, *, one_at_a_time: bool) -> None:
    cp.record_intents(batch.batch_id, batch.group_id, batch.keys)
    cp.record_receipts(batch.receipts)
    if one_at_a_time:
        for outcome in batch.outcomes:
            cp.add_outcomes([outcome])
    else:
        cp.add_outcomes(batch.outcomes)
    cp.flush()


def resume_checkpoint(path: str, rows: int) -> dict[str, Any]:
    """Open the checkpoint at `path` as a resuming job does; time each step."""
    t0 = time.perf_counter()
    cp = Checkpoint.open(path, {"bench": "engine", "rows": rows})
    t1 = time.perf_counter()
    light = cp.state(outputs=False)
    t2 = time.perf_counter()
    full = cp.state(outputs=True)
    t3 = time.perf_counter()
    cp.close()
    assert light.height == full.height == rows, (light.height, full.height)
    assert full["output"].null_count() == 0
    return {"open": t1 - t0, "light": t2 - t1, "full": t3 - t2, "rss": peak_rss_mb()}


def checkpoint_table(
    small: dict[str, Any], one: dict[str, Any], large: dict[str, Any] | None, resume: dict[str, Any] | None
) -> list[str]:
    def row(label: str, r: dict[str, Any]) -> tuple[str, ...]:
        batches = r["batches"]
        tail = batches[-10:]
        return (
            label,
            f"{r['rows']:,}",
            f"{r['seconds']:.2f}",
            f"{r['seconds'] / r['rows'] * 1e6:.1f}",
            f"{sum(tail) / (len(tail) * BATCH) * 1e6:.1f}",
            f"{max(batches) * 1000:.0f}",
            f"{r['segments']}",
            f"{r['disk_mb']:.1f}",
            f"{r['rss']:.0f}",
        )

    header = (
        "write",
        "rows",
        "s",
        "us/row",
        "last 10k us/row",
        "worst batch ms",
        "segments",
        "disk MB",
        "peak RSS MB",
    )
    table = [row("batched, median of 3", small)]
    if large is not None:
        table.append(row("batched", large))
    table.append(row("1 outcome per call", one))
    lines = [
        f"(b) checkpoint writes per batch of {BATCH:,}: record_intents, record_receipts, add_outcomes",
        f"    ({small['output_bytes']:.0f}-byte output JSON on average), flush; only these calls are timed;",
        "    each part in a fresh process (peak RSS is its own); fsync on, files under $TMPDIR",
        "",
        *format_table(header, table, right=tuple(range(1, len(header)))),
        "",
    ]
    per_small = small["seconds"] / small["rows"]
    if large is not None and resume is not None:
        per_large = large["seconds"] / large["rows"]
        tail = large["batches"][-10:]
        lines += [
            f"write cost per row, 1M / 10k: {per_large / per_small:.2f}x (target <= 1.5x); "
            f"the last 10k rows of the 1M run: {sum(tail) / (len(tail) * BATCH) / per_small:.2f}x",
            f"resume of the 1M-row checkpoint: open {resume['open']:.2f} s, state(outputs=False) "
            f"{resume['light']:.2f} s, state(outputs=True) {resume['full']:.2f} s, "
            f"total {resume['open'] + resume['light'] + resume['full']:.2f} s; "
            f"peak RSS {resume['rss']:.0f} MB",
        ]
    else:
        lines.append("1M rows and resume: skipped (--quick)")
    lines.append(
        f"add_outcomes one outcome per call: {one['seconds'] / one['rows'] * 1e6:.0f} us/row, "
        f"{one['seconds'] / small['seconds']:.0f}x the batched write of the same rows"
    )
    return lines


# -- output ------------------------------------------------------------------------------------------


def format_table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()
) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        parts = [
            f"{c:>{w}}" if i in right else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return " ".join(parts).rstrip()

    lines = [fmt(header)]
    lines.append("-" * len(lines[0]))
    lines += [fmt(r) for r in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows for the engine run (default 10,000)")
    parser.add_argument("--quick", action="store_true", help="skip the 1M-row checkpoint part")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error("--rows must be at least 1")

    printed: list[str] = []

    def emit(lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)
            printed.append(line)

    emit(
        [
            f"bench/engine.py --rows {args.rows}{' --quick' if args.quick else ''}: "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
            f"polars {pl.__version__}, {os.cpu_count()} CPUs, load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="enrich-bench-") as tmp:
        work = Path(tmp)
        emit(engine_table(engine_run(args.rows, work)))
        emit([""])
        # 10k rows are only 10 batches (~0.1 s): take the median of three fresh processes.
        runs = [in_fresh_process(write_checkpoint, 10_000, str(work / f"cp-10k-{i}")) for i in range(3)]
        small = sorted(runs, key=lambda r: r["seconds"])[1]
        one = in_fresh_process(write_checkpoint, 10_000, str(work / "cp-10k-one"), True)
        large = resume = None
        if not args.quick:
            large = in_fresh_process(write_checkpoint, 1_000_000, str(work / "cp-1m"))
            resume = in_fresh_process(resume_checkpoint, str(work / "cp-1m"), 1_000_000)
        emit(checkpoint_table(small, one, large, resume))

    command = f"python bench/engine.py --rows {args.rows}{' --quick' if args.quick else ''}"
    RESULTS.write_text(
        "# bench/engine.py: latest results\n\n"
        f"Written by `{command}` (overwritten on each run). See `bench/README.md`.\n\n"
        "```\n" + "\n".join(printed) + "\n```\n"
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
