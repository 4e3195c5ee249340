"""The benchmark harness of issue 6: one command, one table, written to `bench/results.md`.

    python bench/run.py [--quick] [--skip-compare] [--skip-scale] [--sizes 1000,10000,100000]

Three sections, each of which prints its table as it goes; a section that fails prints its error and the
next one runs:

1. **Engine.** `aenrich()` against the emulator served by a process of its own (`emuproc.EmulatorProcess`),
   so the client's CPU (`time.process_time()` around `aenrich` in the process that runs it) and peak RSS
   (VmHWM) are the client's alone; each size runs in a freshly spawned process, so its peak RSS is its own.
   Runs take 2 s on average (uniform 1-3 s); engine and emulator both allow 2,000 requests and 2,000 runs
   per window: 6 s (production's minute, 10x faster) up to 10k rows, 1.5 s at 100k so it takes ~1.5 min
   instead of 5. Group mode at `--sizes`, runs mode (`mode="runs"`) at 1,000 rows and at 5,000
   (over two budgets, so it has a steady state; `--runs-sizes`), and at 500 rows with 200 per 6 s
   (production's request rate, 2,000 a minute, to tell the pacing from the CPU). A hook on httpx's
   transport notes the send time of each request: for runs mode, the share of the request budget used
   in steady state.
2. **Against parallel-web-tools** (`compare.py`): the same rows through both tools on the same emulator
   config, production's 60-s window, at 500, 1,000 and 5,000 rows (latency 2 s), then a latency sweep at
   500 and 1,000 rows.
3. **Scale** (`scale.py`, `run_scale(1_000_000, workdir)`): a million rows.

`--quick`: group 1k and 10k, runs 1k, compare at 500 and 1,000 only, no sweep, no scale (~2 min).
No pass/fail: every target is printed next to its number. Timings on a shared 2-core machine move by
10-20 % from run to run; the load average is printed before and after each section.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
from emuproc import EmulatorProcess, stat_cpu
from engine import FIELDS, ROUTES, companies, format_table, in_fresh_process, peak_rss_mb

from enrich._emulator import STATS_PATH
from enrich._engine import JobStats, aenrich

RESULTS = Path(__file__).with_name("results.md")
LATENCY = 2.0  # seconds, the mean run duration (the emulator draws uniformly from 0.5x to 1.5x)
BUDGET = 2000  # requests and runs per window, as in production
WINDOW = 6.0  # seconds: production's minute, 10x faster
FAST_WINDOW = 1.5  # seconds, for sizes above FAST_ABOVE rows (40x faster), so 100k rows take ~75 s
FAST_ABOVE = 10_000
GROUP_SIZES = (1_000, 10_000, 100_000)
QUICK_GROUP_SIZES = (1_000, 10_000)
RUNS_SIZES = (1_000, 5_000)  # 5,000: 2.5 budgets, so runs mode reaches a steady state
QUICK_RUNS_SIZES = (1_000,)
# Runs mode again at production's request rate (2,000 a minute = 200 per 6 s): the engine's pacing
# without the 10x-faster clock's demand on the client's CPU (333 requests a second at 2,000 per 6 s).
PRODUCTION_RATE_ROWS = 500
PRODUCTION_RATE_BUDGET = 200
SCALE_ROWS = 1_000_000
MAX_ADD = 1_000  # inputs per add-runs call
WARM_KEY = "bench-warm-up"  # the emulator limits per key: the warm-up spends none of the measured budget
RUN_KEY = "bench-key"
Sent = tuple[float, str, int, float]  # a request: sent at (s), "METHOD /path", status, seconds to answer
ALL_ROUTES = {**ROUTES, "GET /v1/tasks/groups/{taskgroup_id}": "group status"}

# Targets (issue 6)
T_RATIO = 1.1
T_REQ_PER_ROW = 0.01
T_429 = 0.01
T_BUDGET_SHARE = 0.90


class Report:
    """Prints lines as they come (flushed) and keeps them for `bench/results.md`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines += lines

    def record(self, lines: list[str]) -> None:
        """Keep lines that were printed already (by `run_scale`)."""
        self.lines += lines


def git_state() -> str:
    """The commit measured, and whether the engine's files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "enrich"], cwd=root, capture_output=True, text=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- 1. the engine -----------------------------------------------------------------------------------


def record_requests() -> list[Sent]:
    """From now on, note each request this process sends: (`time.monotonic()` when sent, "METHOD /path",
    status (0 when no answer came), seconds until the answer's headers).

    Patches `httpx.AsyncHTTPTransport.handle_async_request` in the (fresh, dedicated) client process
    rather than passing `transport=` to `aenrich`: httpx ignores a client's `limits` when it is given a
    transport, so a transport of ours would replace the connection pool the engine sizes for itself.
    """
    sent: list[Sent] = []
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        at = time.monotonic()
        status = 0
        try:
            response = await original(self, request)
            status = response.status_code
            return response
        finally:
            sent.append((at, f"{request.method} {request.url.path}", status, time.monotonic() - at))

    httpx.AsyncHTTPTransport.handle_async_request = handle  # type: ignore[method-assign]
    return sent


def engine_child(
    rows: int,
    mode: str,
    window: float,
    budget: int,
    url: str,
    emu_pid: int,
    workdir: str,
    concurrency: int | None = None,
) -> dict[str, Any]:
    """Runs in a fresh process: a 2-row warm-up (under another API key), then the measured `aenrich()`.

    Also reads the emulator's counters after the warm-up (`base`) and its CPU around the job.
    """
    work = Path(workdir)
    common: dict[str, Any] = {
        "base_url": url,
        "rate_limit": budget,
        "run_rate": budget,
        "rate_window": window,
        "mode": mode,
        "progress": False,
    }
    if concurrency is not None and mode == "runs":
        common["concurrency"] = concurrency
    # First-call costs (the checkpoint's parquet writer, httpx, the engine's code paths) are no part of
    # a row's cost. The emulator counts budgets per key, so this spends nothing of the measured key's.
    warm = pl.DataFrame({"company": ["Warm-up A", "Warm-up B"], "website": ["a.example", "b.example"]})
    asyncio.run(aenrich(warm, FIELDS, api_key=WARM_KEY, checkpoint=work / "warm-up", **common))
    base = httpx.get(url + STATS_PATH, timeout=60).json()
    df = companies(rows)
    distinct = df.n_unique()
    stats = JobStats()
    sent = record_requests()
    emu_cpu0 = process_cpu(emu_pid)
    cpu0 = time.process_time()
    start = time.monotonic()
    out = asyncio.run(aenrich(df, FIELDS, api_key=RUN_KEY, checkpoint=work / "job", stats=stats, **common))
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu0
    emu_cpu1 = process_cpu(emu_pid)
    return {
        "rows": rows,
        "mode": mode,
        "window": window,
        "budget": budget,
        "distinct": distinct,
        "wall": wall,
        "cpu": cpu,
        "rss": peak_rss_mb(),
        "completed": int((out["_status"] == "completed").sum()),  # (a filter would copy the frame)
        "stats": dataclasses.asdict(stats),
        "base": base,
        "emu_cpu": None if emu_cpu0 is None or emu_cpu1 is None else emu_cpu1 - emu_cpu0,
        "sent": [(at - start, what, status, took) for at, what, status, took in sent],
    }


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc; None elsewhere)."""
    return stat_cpu(f"/proc/{pid}/stat")


def engine_one(
    rows: int, mode: str, window: float, budget: int, work: Path, concurrency: int | None = None
) -> dict[str, Any]:
    """One size: a fresh emulator process, the job in a fresh client process, the emulator's counters."""
    with EmulatorProcess(
        api_key=None,  # any key: the warm-up and the job are counted apart by the rate limits
        latency=LATENCY,
        rate_limit=budget,
        run_rate_limit=budget,
        rate_window=window,
        seed=1,
    ) as emu:
        assert emu.proc is not None
        load0 = os.getloadavg()[0]
        r = in_fresh_process(
            engine_child,
            rows,
            mode,
            window,
            budget,
            emu.url,
            emu.proc.pid,
            str(work / f"{mode}-{rows}-{budget}"),
            concurrency,
        )
        served = emu.stats()
        r["emu_rss"] = emu.peak_rss_mb()
    r["load"] = (load0, os.getloadavg()[0])
    # The emulator's counters do not tell keys apart: take off what they were after the warm-up.
    base = r.pop("base")
    requests = {k: v - base["requests"].get(k, 0) for k, v in served["requests"].items()}
    r["served"] = {
        "requests": {k: v for k, v in requests.items() if v},
        **{
            k: served[k] - base[k]
            for k in ("requests_total", "rate_limited", "runs_created", "duplicate_runs")
        },
    }
    return r


def ideal_seconds(rows: int, mode: str, window: float, budget: int = BUDGET) -> tuple[float, int]:
    """`max(latency, runs / run budget x window, requests needed / request budget x window)`.

    Requests needed: group mode, one group, one add-runs per 1,000 rows and one read of the results;
    runs mode, the group, one add-runs of one input per row and one read of the results (the answers
    can be read through the group's runs stream; with a blocking result call per row it is 2 per row).
    """
    needed = 1 + math.ceil(rows / MAX_ADD) + 1 if mode == "group" else 1 + rows + 1
    return max(LATENCY, rows / budget * window, needed / budget * window), needed


def floor_seconds(rows: int, window: float, budget: int = BUDGET) -> float:
    """The physics of group mode: a full run budget at once, one more per window, then the slowest run."""
    return (math.ceil(rows / budget) - 1) * window + 1.5 * LATENCY


def per_window(sent: list[Sent], window: float) -> list[int]:
    """Requests sent in consecutive windows of `window` s from the first request."""
    if not sent:
        return []
    t0 = min(at for at, *_ in sent)
    counts = Counter(int((at - t0) // window) for at, *_ in sent)
    return [counts.get(i, 0) for i in range(max(counts) + 1)]


def max_sliding(sent: list[Sent], window: float) -> int:
    times = sorted(at for at, *_ in sent)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def steady_share(sent: list[Sent], window: float, budget: int = BUDGET) -> tuple[float | None, str]:
    """The share of the request budget used in steady state, and how it was measured.

    Steady state: the windows (consecutive, `window` s each, from the first request) after the first
    (the ramp-up: a full budget may go at once) and before the one that holds the job's last create (the
    tail: from then on there are no rows left to send, only the answers to wait for); the share is their
    mean count over the budget. A job whose requests all fit in one window's budget has no steady state
    (None). A job with no window between those two: the requests sent
    between the 10th and the 90th percentile of send times, as a rate per window over the budget (a job
    that fits in one window's budget can show more than 100 %: the limiter lets a full budget go at once).
    """
    counts = per_window(sent, window)
    if len(sent) <= budget:
        return None, f"n/a: all {len(sent):,} requests fit in one window's budget, so no steady state"
    t0 = min(at for at, *_ in sent)
    creates = [at for at, route, *_ in sent if route.startswith("POST ") and route.endswith("/runs")]
    tail = int((max(creates) - t0) // window) if creates else len(counts) - 1
    if tail >= 2:
        middle = counts[1:tail]
        return (
            sum(middle) / len(middle) / budget,
            f"mean of windows 2-{tail} of {len(counts)} (window {tail + 1} holds the last create)",
        )
    times = sorted(at for at, *_ in sent)
    if len(times) < 10:
        return None, "too few requests"
    lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
    if hi <= lo:
        return None, "every request sent at once"
    share = (len(times) * 8 // 10) / (hi - lo) * window / budget
    return (
        share,
        f"the job spans {len(counts)} window(s): rate of the middle 80% of requests ({lo:.1f}-{hi:.1f} s)",
    )


def engine_verdict(r: dict[str, Any]) -> tuple[str, str]:
    rows, mode, window, budget, served = r["rows"], r["mode"], r["window"], r["budget"], r["served"]
    total = max(served["requests_total"], 1)
    share429 = served["rate_limited"] / total
    misses: list[str] = []
    notes: list[str] = []
    if mode == "group":
        target = f"<={T_RATIO}x, <={T_REQ_PER_ROW}/row, 0 extra, 429 <={T_429:.0%}"
        ideal, _ = ideal_seconds(rows, mode, window, budget)
        if r["wall"] / ideal > T_RATIO:
            misses.append("wall")
        if served["requests_total"] / rows > T_REQ_PER_ROW:
            misses.append("req/row")
        if served["runs_created"] - r["distinct"] or served["duplicate_runs"]:
            misses.append("extra runs")
    else:
        target = f">={T_BUDGET_SHARE:.0%} of req budget, 429 <={T_429:.0%}"
        share, _ = steady_share(r["sent"], window, budget)
        if share is not None and share < T_BUDGET_SHARE:
            misses.append("budget share")
        elif share is None:
            notes.append("share n/a (fits in one window)")
    if share429 > T_429:
        misses.append("429s")
    if r["completed"] != rows:
        misses.append("rows")
    verdict = ("MISSED: " + ", ".join(misses)) if misses else ("the rest met" if notes else "met")
    return target, "; ".join([*notes, verdict])


def engine_section(
    sizes: list[int],
    runs_sizes: list[int],
    production_rate: bool,
    emit: Report,
    concurrency: int | None = None,
) -> None:
    emit(
        [
            "## 1. The engine against the emulator",
            "",
            f"The emulator in its own process (uvicorn, 127.0.0.1); runs take {LATENCY:g} s on average "
            f"(uniform {LATENCY * 0.5:g}-{LATENCY * 1.5:g} s).",
            f"Engine and emulator both allow {BUDGET:,} requests and {BUDGET:,} runs per window: "
            f"{WINDOW:g} s (production's minute /10) up to {FAST_ABOVE:,} rows, "
            f"{FAST_WINDOW:g} s above (/40).",
            *(
                [
                    f"The last runs-mode row allows {PRODUCTION_RATE_BUDGET} per {WINDOW:g} s instead: "
                    "production's request rate (2,000 a minute), without the 10x clock's demand on the CPU."
                ]
                if production_rate
                else []
            ),
            "Each job in a fresh client process (client CPU and peak RSS are its own), after a 2-row warm-up "
            "under another API key.",
            f"Fields: {', '.join(FIELDS)}; processor core (its latency is the emulator's, above)."
            + (f" Runs mode with concurrency={concurrency}." if concurrency is not None else ""),
            "",
        ]
    )
    jobs = [(n, "group", BUDGET) for n in sizes] + [(n, "runs", BUDGET) for n in runs_sizes]
    if production_rate:
        jobs.append((PRODUCTION_RATE_ROWS, "runs", PRODUCTION_RATE_BUDGET))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="enrich-run-") as tmp:
        for rows, mode, budget in jobs:
            window = FAST_WINDOW if rows > FAST_ABOVE else WINDOW
            print(
                f"  ... {mode} mode, {rows:,} rows, {budget:,} per {window:g}-s window (load {load()})",
                flush=True,
            )
            try:
                r = engine_one(rows, mode, window, budget, Path(tmp), concurrency)
            except Exception:
                emit([f"{mode} mode, {rows:,} rows: FAILED", *traceback.format_exc().rstrip().splitlines()])
                continue
            results.append(r)
            print(f"      {r['wall']:.1f} s", flush=True)
    if not results:
        return
    emit(engine_table(results))
    emit(["", *engine_notes()])
    for r in results:
        emit(["", *engine_details(r)])


def engine_table(results: list[dict[str, Any]]) -> list[str]:
    header = (
        "rows",
        "mode",
        "budget/window",
        "wall s",
        "ideal s",
        "wall/ideal",
        "req/row",
        "429s",
        "extra runs",
        "client RSS MB",
        "client CPU s/1k rows",
        "emulator CPU",
        "target",
        "verdict",
    )
    table = []
    for r in results:
        rows, mode, window, budget, served = r["rows"], r["mode"], r["window"], r["budget"], r["served"]
        ideal, _ = ideal_seconds(rows, mode, window, budget)
        total = served["requests_total"]
        target, verdict = engine_verdict(r)
        emu_cpu = f"{r['emu_cpu'] / r['wall']:.0%} of 1 CPU" if r["emu_cpu"] is not None else "n/a"
        table.append(
            (
                f"{rows:,}",
                mode,
                f"{budget:,}/{window:g} s",
                f"{r['wall']:.1f}",
                f"{ideal:.1f}",
                f"{r['wall'] / ideal:.2f}x",
                f"{total / rows:.4f}",
                f"{served['rate_limited']:,} ({served['rate_limited'] / max(total, 1):.1%})",
                f"{served['runs_created'] - r['distinct']:,} / {served['duplicate_runs']:,}",
                f"{r['rss']:.0f}",
                f"{r['cpu'] / rows * 1000:.3f}",
                emu_cpu,
                target,
                verdict,
            )
        )
    return format_table(header, table, right=tuple(range(12)))


def engine_notes() -> list[str]:
    return [
        "ideal: max(latency, runs / run budget x window, requests needed / request budget x window);",
        "  requests needed: group mode 1 group + 1 add-runs per 1,000 rows + 1 read; runs mode 1 group +",
        "  1 add-runs of one input per row + 1 read (2 per row if each answer took a result call).",
        "  A full budget may go at once, so a group-mode job can finish under its ideal (floor: the last",
        "  add-runs admitted at (ceil(rows/2000)-1) x window, then the slowest run, 1.5x latency).",
        "verdict: each target of the row's mode (group: wall/ideal, req/row, extra runs, 429s; runs:",
        "  the steady-state share of the request budget, below, and 429s), and every row completed.",
        "req/row, 429s: requests the emulator served for the job (429s included; the warm-up's are not).",
        "extra runs: runs created - distinct inputs / the emulator's duplicate_runs (same input twice).",
        "client RSS: peak (VmHWM) of the process that ran aenrich; client CPU: time.process_time() around",
        "  aenrich() in that process. emulator CPU: the emulator process's CPU over the wall time (100% =",
        "  it was the bottleneck).",
    ]


def engine_details(r: dict[str, Any]) -> list[str]:
    rows, mode, window, budget = r["rows"], r["mode"], r["window"], r["budget"]
    served, stats = r["served"], r["stats"]
    ideal, needed = ideal_seconds(rows, mode, window, budget)
    head = f"{mode} mode, {rows:,} rows, {budget:,} requests and runs per {window:g}-s window"
    routes = ", ".join(
        f"{ALL_ROUTES.get(route, route)} {n:,}"
        for route, n in sorted(served["requests"].items(), key=lambda item: -item[1])
    )
    lines = [
        f"{head}: wall {r['wall']:.1f} s, ideal {ideal:.1f} s "
        f"(requests needed {needed:,}), floor {floor_seconds(rows, window, budget):.1f} s"
        if mode == "group"
        else f"{head}: wall {r['wall']:.1f} s, ideal {ideal:.1f} s (requests needed {needed:,})",
        f"  requests {served['requests_total']:,}: {routes}",
        f"  JobStats: requests {stats['requests']:,}, 429s {stats['rate_limited']:,}, "
        f"polls {stats['polls']:,}, stragglers {stats['stragglers']:,}, "
        f"rows completed {r['completed']:,}/{rows:,}",
        f"  client CPU {r['cpu']:.2f} s, peak RSS {r['rss']:.0f} MB; emulator CPU "
        + (f"{r['emu_cpu']:.2f} s" if r["emu_cpu"] is not None else "n/a")
        + (f", peak RSS {r['emu_rss']:.0f} MB" if r.get("emu_rss") is not None else "")
        + f"; load avg (1 min) {r['load'][0]:.2f} -> {r['load'][1]:.2f}",
    ]
    stages = stats.get("stages") or {}
    if stages:
        lines.append("  stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    adds = sorted(
        (at, took) for at, what, _, took in r["sent"] if what.startswith("POST ") and what.endswith("/runs")
    )
    if mode == "group" and len(adds) > 1:
        # The limiter lets a full run budget go at once, then one more budget per window.
        paced = (math.ceil(rows / budget) - 1) * window
        lines.append(
            f"  add-runs: {len(adds):,} sent from {adds[0][0]:.1f} s to {adds[-1][0]:.1f} s after the job's "
            f"start, the last {adds[-1][0] - adds[0][0] - paced:+.1f} s after the budget allows it "
            f"({paced:.1f} s after the first); answered in {statistics.mean(t for _, t in adds):.2f} s on "
            f"average"
        )
    if mode == "runs":
        counts = per_window(r["sent"], window)
        share, how = steady_share(r["sent"], window, budget)
        statuses = Counter(status for _, _, status, _ in r["sent"])
        lines += [
            f"  requests sent per {window:g}-s window (client's log, from its first request): "
            + ", ".join(f"{c:,}" for c in counts),
            "  steady-state share of the request budget: "
            + (f"{share:.1%}" if share is not None else "n/a")
            + f" ({how}; target >= {T_BUDGET_SHARE:.0%}); the most in any sliding {window:g}-s window: "
            f"{max_sliding(r['sent'], window):,} of {budget:,}",
            "  answers by status: " + ", ".join(f"{s} {n:,}" for s, n in sorted(statuses.items())),
        ]
    return lines


# -- 2. against parallel-web-tools -------------------------------------------------------------------


def compare_section(quick: bool, emit: Report) -> None:
    import compare

    sizes = [500, 1000] if quick else [500, 1000, 5000]
    emit(["## 2. Against parallel-web-tools", "", *compare.header_lines(sizes, 2.0), ""])
    pairs, details = compare.run_compare(sizes, 2.0)
    emit(compare.summary_table(pairs, 2.0))
    emit(["", *compare.SUMMARY_NOTE])
    emit(details)
    if quick:
        return
    # The latency sweep at the target sizes: the ratio is set by where the slowest run falls in
    # parallel-web-tools' 3 + 5k s schedule. Latency 2 s is the run above.
    sweep: dict[float | None, list[tuple[Any, Any]]] = {2.0: [p for p in pairs if p[0].rows in (500, 1000)]}
    for latency in (1.0, 4.0, None):
        print(f"  ... sweep: latency {compare.latency_label(latency)} (load {load()})", flush=True)
        try:
            sweep[latency] = compare.run_compare([500, 1000], latency, warm=False)[0]
        except Exception:
            emit([f"latency {latency}: FAILED", *traceback.format_exc().rstrip().splitlines()])
    order = [x for x in (1.0, 2.0, 4.0, None) if x in sweep]
    emit(["", *compare.sweep_table({x: sweep[x] for x in order})])


# -- 3. scale ----------------------------------------------------------------------------------------


def scale_section(emit: Report) -> None:
    try:
        from scale import run_scale  # bench/scale.py
    except ImportError as exc:
        emit([f"scale: bench/scale.py not available ({exc})"])
        return
    emit(["## 3. Scale", ""])
    with tempfile.TemporaryDirectory(prefix="enrich-scale-") as tmp:
        lines = run_scale(SCALE_ROWS, Path(tmp))
    emit.record(lines)


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="group 1k+10k, runs 1k, compare at 500/1k, no scale"
    )
    parser.add_argument(
        "--skip-compare", action="store_true", help="skip the comparison with parallel-web-tools"
    )
    parser.add_argument("--skip-scale", action="store_true", help="skip the 1M-row scale section")
    parser.add_argument("--skip-engine", action="store_true", help="skip the engine table")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated group-mode sizes (default 1000,10000,100000)"
    )
    parser.add_argument(
        "--runs-concurrency",
        type=int,
        default=None,
        help="aenrich(concurrency=) for the runs-mode jobs (default: the engine's own)",
    )
    parser.add_argument(
        "--runs-sizes",
        default=None,
        help="comma-separated runs-mode sizes (default 1000,5000; --quick 1000; 0 for none)",
    )
    args = parser.parse_args()

    def sizes_of(text: str | None, default: tuple[int, ...], flag: str) -> list[int]:
        if text is None:
            return list(default)
        try:
            sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
        except ValueError:
            parser.error(f"{flag} must be comma-separated integers, e.g. 1000,10000")
        if min(sizes, default=0) < 0:
            parser.error(f"{flag} sizes must be positive")
        return [n for n in sizes if n > 0]

    sizes = sizes_of(args.sizes, QUICK_GROUP_SIZES if args.quick else GROUP_SIZES, "--sizes")
    runs_sizes = sizes_of(args.runs_sizes, QUICK_RUNS_SIZES if args.quick else RUNS_SIZES, "--runs-sizes")

    emit = Report()
    started = time.monotonic()
    command = heading(emit, "bench/run.py")
    sections: list[tuple[str, Callable[[], None]]] = []
    if not args.skip_engine:
        sections.append(
            (
                "engine",
                lambda: engine_section(
                    sizes,
                    runs_sizes,
                    not args.quick and args.runs_sizes is None,
                    emit,
                    args.runs_concurrency,
                ),
            )
        )
    if not args.skip_compare:
        sections.append(("compare", lambda: compare_section(args.quick, emit)))
    if not (args.skip_scale or args.quick):
        sections.append(("scale", lambda: scale_section(emit)))
    run_sections(sections, emit, started, RESULTS, command)


def heading(emit: Report, script: str, *more: str) -> str:
    """Emit the report's heading (the command, date, versions, machine, load, commit); returns the
    command line."""
    command = f"python {script}" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    emit(
        [
            f"# `{command}`",
            "",
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()} "
            f"({platform.machine()}, {platform.system()}), polars {pl.__version__}, "
            f"httpx {httpx.__version__}, {os.cpu_count()} CPUs, load average {load()} "
            "(the machine is shared: other jobs may run)",
            git_state(),
            *more,
            "",
        ]
    )
    return command


def run_sections(
    sections: list[tuple[str, Callable[[], None]]], emit: Report, started: float, results: Path, command: str
) -> None:
    """Run each section (a failure prints its traceback and the next one runs), then write `results`."""
    for name, section in sections:
        t0 = time.monotonic()
        try:
            section()
        except Exception:
            emit([f"{name}: FAILED", *traceback.format_exc().rstrip().splitlines()])
        emit(["", f"({name}: {time.monotonic() - t0:.0f} s, load average after: {load()})", ""])
    emit([f"total {time.monotonic() - started:.0f} s"])
    script = command.split()[1]
    results.write_text(
        f"# {script}: latest results\n\n"
        f"Written by `{command}` (overwritten on each run). See `bench/README.md`.\n\n"
        "```\n" + "\n".join(emit.lines) + "\n```\n"
    )
    print(f"\nwritten to {results}")


if __name__ == "__main__":
    main()
