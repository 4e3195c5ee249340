"""The engine against an unkind service: a quota it was not told, a shared key, cut streams, late commits.

    python bench/unkind.py [--quick] [--only quota,shared,streams,first-answers,late-commits]
                           [--seeds N] [--engine-arg name=value ...]

Prints one table per section as it goes, and writes them (with the command line, the date, the commit and
the load average) to `bench/results-unkind.md`, overwritten on each run. Nothing passes or fails: each
target is printed next to its number, and a section that fails prints its traceback and the next one runs.
The full run takes ~20-25 min; `--quick` ~3-4 min: quota variants (a) and (c) only, at 600 rows per mode;
shared at 2,000 (group) and 1,100 (runs) rows per job; streams at 1,000 and 2,500 rows, the reference at
1,000 rows only; first-answers at 2,500 rows; late-commits with 3 seeds. `--engine-arg name=value`
(repeatable; the value is read as JSON when it parses, else as a string) passes a keyword to every
`aenrich()` call (and, in late-commits, to the CLI's `enrich()`), so options the engine gains later can
be tried without editing this file. `--seeds N` sets the late-commits seeds per mode.

Every engine job (`enrich._engine.aenrich`, processor `lite`, run.py's output fields) runs in a freshly
spawned process after a 2-row warm-up under another API key, against the emulator served by a process of
its own (`emuproc.EmulatorProcess`), both sides on a 6-s rate window (production's minute /10), runs
taking 2 s on average (uniform 1-3 s). A hook on httpx's transport in the job's process (run.py's
`record_requests`) notes each request's send time and status; after the job, each of its groups' runs are
read back from the emulator (`GET /v1/tasks/groups/{id}/runs`, under a third key) for the service's own
times of creation and end. The ideal is set by the service's REAL quota: the instant it can have admitted
the last run and request (a sliding window admits a full budget at once then one more per window; a
token bucket its burst at once, then its rate), plus the slowest run (1.5x latency).

Sections (`--only NAME[,NAME]`):

- `quota`: the client assumes 2,000 requests and 2,000 runs per 6 s; the service allows 4x less:
  (a) a sliding window of 500 and 500 with Retry-After, (b) the same without Retry-After, (c) token
  buckets of 500 per 6 s with a burst of 250 (below one full add), (d) 250 and 250 per 3 s (the same
  rate, half the burst). Group mode at 5,000 rows, runs mode at 1,500. Target: wall <= 1.2x ideal, <= 5 %
  of the requests sent after the first window answered 429.
- `shared`: two jobs with one API key, started together in two processes against one emulator at the
  default quota (2,000 and 2,000 per 6 s), different inputs each: 5,000 rows each in group mode, then
  1,500 each in runs mode. The ideal of each is the time the quota needs for BOTH jobs' runs. Also: who
  got the runs created in each window. Target: each <= 1.2x.
- `streams`: the service ends every SSE stream 1 s after it opened (`stream_close_seconds=1`), while
  runs take 1.1-3.3 s (latency 2.2 s), so streams close with runs active: 1,000 rows through enrich and
  through parallel-web-tools (`compare.py`'s `measure`, `run_enrich`, `run_pwt`; in-thread emulator,
  processor lite-fast as in compare.py), 5,000 rows through enrich alone, and the same without the early
  closes for reference. pwt reads the group 3 s after its add, then every 5 s: runs ending past its first
  read cost it 5 s more (the issue's 8.2 s). Targets: 1,000 rows <= 1.1x ideal and <= 0.75x pwt; 5,000
  <= 1.15x.
- `first-answers`: 5,000 rows in group mode at the default budget (adds wait for budget): when the first
  run ended (the service's times), when a `progress=` callable first counted a completed row, when the
  first `outcomes-*.parquet` segment appeared in the checkpoint (a thread polls the directory), and
  whether adds were still waiting then. Target: lag <= 5 s (latency + a few seconds).
- `late-commits`: crash torture. Per seed and mode, an emulator (in a thread) that commits 70 % of the
  creates 3 s late behind an HTML 504, with 3 % faults (lost_create, html_5xx, drop), no rate limit,
  runs of 1 s; `enrich run` (tests/_torture_worker.py, limiter window 0.25 s, `--run-rate 100`) on 1,500
  rows (group) or 300 (runs) with ~10 % duplicate inputs, `--commit-horizon 5` (the service commits
  within 3 s), SIGKILLed 4 times 0.5-3 s after its start,
  then rerun until it exits 0 (at most 20 attempts or 300 s). 20 seeds (`--quick` 3, `--seeds N`).
  Target: 0 runs beyond the distinct inputs in every seed, every row its own answer.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import inspect
import json
import math
import multiprocessing
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
from emuproc import EmulatorProcess
from engine import FIELDS, companies, format_table, in_fresh_process
from run import Report, Sent, heading, load, per_window, record_requests, run_sections, steady_share

import enrich
from enrich import Emulator, EmulatorConfig
from enrich._emulator import STATS_PATH
from enrich._engine import JobStats, aenrich

RESULTS = Path(__file__).with_name("results-unkind.md")
TESTS = Path(__file__).resolve().parent.parent / "tests"
LATENCY = 2.0  # seconds, the mean run duration (the emulator draws uniformly from 0.5x to 1.5x)
STREAMS_LATENCY = 2.2  # streams: runs of 1.1-3.3 s, so streams close mid-run and some end past pwt's 3 s
STREAMS_CLOSE = 1.0  # streams: seconds a stream stays open
WINDOW = 6.0  # seconds: production's minute /10, on both sides unless a section says otherwise
BUDGET = 2000  # requests and runs per window: what the client assumes, and the default service quota
PROCESSOR = "lite"
MAX_ADD = 1000  # inputs per add-runs call
WARM_KEY = "unkind-warm-up"  # the emulator's budgets are per key: the warm-up spends none of the job's
RUN_KEY = "unkind-key"
READ_KEY = "unkind-reader"  # reads the groups back after a job without touching the job key's budget
SECTIONS = ("quota", "shared", "streams", "first-answers", "late-commits")

# Targets
T_QUOTA = 1.2  # wall / ideal
T_429_AFTER = 0.05  # share of requests sent after the first window that were answered 429
T_SHARED = 1.2
T_STREAM_1K = 1.1
T_STREAM_PWT = 0.75
T_STREAM_5K = 1.15
T_LAG = 5.0  # seconds from the first run's end to the first answer counted (and on disk)

CLIENT = {"rate_limit": BUDGET, "run_rate": BUDGET, "rate_window": WINDOW}  # what aenrich is told
DEFAULT_SERVICE: dict[str, Any] = {"rate_limit": BUDGET, "run_rate_limit": BUDGET, "rate_window": WINDOW}
QUOTA_VARIANTS: dict[str, dict[str, Any]] = {
    "a": {"rate_limit": 500, "run_rate_limit": 500, "rate_window": 6.0},
    "b": {"rate_limit": 500, "run_rate_limit": 500, "rate_window": 6.0, "retry_after_header": False},
    "c": {"rate_limit": 500, "rate_burst": 250, "run_rate_limit": 500, "run_burst": 250, "rate_window": 6.0},
    "d": {"rate_limit": 250, "run_rate_limit": 250, "rate_window": 3.0},
}

# Runs `tests/_torture_worker.py` (the CLI with the limiter's window from ENRICH_TORTURE_WINDOW) with the
# keywords of `--engine-arg` bound to the engine's `enrich()` first: argv[1] is their JSON.
_TORTURE_WORKER = """
import functools, json, runpy, sys
import enrich._engine as engine
engine.enrich = functools.partial(engine.enrich, **json.loads(sys.argv.pop(1)))
sys.argv[0] = {worker!r}
runpy.run_path({worker!r}, run_name="__main__")
"""


@dataclass
class Context:
    """What every section needs: the size preset, the report, the engine's extra keywords, a work dir."""

    quick: bool
    emit: Report
    engine_kwargs: dict[str, Any]
    tmp: Path
    seeds: int | None = None


# -- quotas and ideals -------------------------------------------------------------------------------


def describe(service: dict[str, Any]) -> str:
    """The service's quota in a few words, e.g. "500 req + 500 runs / 6 s, bucket burst 250"."""
    window = service.get("rate_window", 60.0)
    req, runs = service.get("rate_limit"), service.get("run_rate_limit")
    text = f"{req or 'no'} req + {runs or 'no'} runs / {window:g} s"
    bursts = {service.get("rate_burst"), service.get("run_burst")} - {None}
    if bursts:
        text += f", bucket burst {'/'.join(str(b) for b in sorted(bursts))}"
    if service.get("retry_after_header") is False:
        text += ", no Retry-After"
    return text


def admit_seconds(units: int, limit: int | None, window: float, burst: int | None) -> float:
    """When a quota can have admitted `units` asked for at t=0: a sliding window lets a full budget go
    at once and one more per window; a token bucket its burst at once, then `limit / window` a second."""
    if limit is None or units <= 0:
        return 0.0
    if burst is None:
        return (math.ceil(units / limit) - 1) * window
    return max(0.0, (units - burst) * window / limit)


def requests_needed(runs: int, mode: str, service: dict[str, Any]) -> int:
    """One group, the adds (runs mode: one per run; group mode: as large as the run quota lets an add
    be, at most 1,000), one read of the results."""
    if mode == "runs":
        return 1 + runs + 1
    largest = min(x for x in (MAX_ADD, service.get("run_rate_limit"), service.get("run_burst")) if x)
    return 1 + math.ceil(runs / largest) + 1


def ideal_seconds(runs: int, requests: int, service: dict[str, Any], latency: float = LATENCY) -> float:
    """The instant the service's real quota can have admitted every run and request, + the slowest run."""
    window = service.get("rate_window", 60.0)
    admitted = max(
        admit_seconds(runs, service.get("run_rate_limit"), window, service.get("run_burst")),
        admit_seconds(requests, service.get("rate_limit"), window, service.get("rate_burst")),
    )
    return admitted + 1.5 * latency


# -- one engine job in a fresh process ---------------------------------------------------------------


@dataclass
class JobSpec:
    """One `aenrich()` job, as the spawned child runs it."""

    rows: int
    mode: str
    url: str
    workdir: str
    offset: int = 0  # the first company number: jobs that share a key send different inputs
    client: dict[str, Any] = field(default_factory=lambda: dict(CLIENT))
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    watch_outcomes: bool = False


class ProgressLog:
    """A `progress=` callable: keeps (seconds since `start`, completed, failed, running, waiting)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.reports: list[tuple[float, int, int, int, int]] = []

    def __call__(self, p: Any) -> None:
        self.reports.append((time.monotonic() - self.start, p.completed, p.failed, p.running, p.waiting))


class SegmentWatch(threading.Thread):
    """Polls a checkpoint directory every 10 ms; `found` is when the first `outcomes-*.parquet` appeared."""

    def __init__(self, directory: Path, start: float) -> None:
        super().__init__(name="segment-watch", daemon=True)
        self.directory, self.t0 = directory, start
        self.found: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if self.directory.is_dir() and any(self.directory.glob("outcomes-*.parquet")):
                self.found = time.monotonic() - self.t0
                return
            time.sleep(0.01)


def emulator_stats(url: str) -> dict[str, Any]:
    """The emulator's counters over HTTP (not counted as a request)."""
    return dict(httpx.get(url + STATS_PATH, timeout=60).json())


def job_child(spec: JobSpec, barrier: Any = None) -> dict[str, Any]:
    """Runs in a fresh process: a 2-row warm-up under another key, then the measured `aenrich()`.

    With a `barrier` (jobs sharing a key), every job's warm-up ends before the emulator's counters are
    read, and they are read before any job starts. Returns the wall time, the client's log of requests
    (times relative to the job's start), the progress reports, the group ids and the job's own counters.
    """
    work = Path(spec.workdir)
    common: dict[str, Any] = {
        "base_url": spec.url,
        "mode": spec.mode,
        "processor": PROCESSOR,
        **spec.client,
        **spec.engine_kwargs,
    }
    warm = pl.DataFrame(
        {"company": [f"Warm-up {spec.offset} {c}" for c in "AB"], "website": ["a.example", "b.example"]}
    )
    asyncio.run(
        aenrich(warm, FIELDS, api_key=WARM_KEY, checkpoint=work / "warm-up", progress=False, **common)
    )
    if barrier is not None:
        barrier.wait()
    base = emulator_stats(spec.url)
    if barrier is not None:
        barrier.wait()
    df = companies(spec.offset + spec.rows).slice(spec.offset)
    stats = JobStats()
    sent = record_requests()
    log = ProgressLog()
    start = log.start = time.monotonic()
    epoch = time.time()
    watch = SegmentWatch(work / "job", start)
    if spec.watch_outcomes:
        watch.start()
    out = asyncio.run(
        aenrich(
            df,
            FIELDS,
            api_key=RUN_KEY,
            checkpoint=work / "job",
            stats=stats,
            progress=log,
            timeout=spec.timeout,
            **common,
        )
    )
    wall = time.monotonic() - start
    watch.done.set()
    groups = sorted({m.group(1) for _, what, *_ in sent if (m := re.search(r"/groups/([^/]+)", what))})
    return {
        "rows": spec.rows,
        "mode": spec.mode,
        "distinct": df.n_unique(),
        "wall": wall,
        "epoch": epoch,
        "statuses": dict(Counter(out["_status"].to_list())),
        "stats": dataclasses.asdict(stats),
        "base": base,
        "sent": [(at - start, what, status, took) for at, what, status, took in sent],
        "progress": log.reports,
        "first_segment": watch.found,
        "groups": groups,
    }


def group_runs(url: str, group_id: str) -> list[tuple[float, float, str]]:
    """Every run of a group as the service reports it: (created, last change, status), epoch seconds."""

    def epoch(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    runs = []
    path = f"{url}/v1/tasks/groups/{group_id}/runs"
    with httpx.stream("GET", path, headers={"x-api-key": READ_KEY}, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                run = json.loads(line[5:])["run"]
                runs.append((epoch(run["created_at"]), epoch(run["modified_at"]), run["status"]))
    return runs


def run_jobs(service: dict[str, Any], specs: list[JobSpec]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`specs` against one fresh emulator process with the `service` quota, each job in a fresh process
    (several: started together, sharing the key). Returns each job's result, with the service's view of
    its runs (`runs`: created and ended, relative to the job's start), and the emulator's counters for
    all the jobs (the warm-ups taken off)."""
    with EmulatorProcess(api_key=None, latency=LATENCY, seed=1, **service) as emu:
        for spec in specs:
            spec.url = emu.url
        if len(specs) == 1:
            results = [in_fresh_process(job_child, specs[0])]
        else:
            with (
                multiprocessing.get_context("spawn").Manager() as manager,
                ThreadPoolExecutor(len(specs)) as pool,
            ):
                barrier = manager.Barrier(len(specs))
                futures = [pool.submit(in_fresh_process, job_child, spec, barrier) for spec in specs]
                results = [f.result() for f in futures]
        served = emulator_stats(emu.url)
        for r in results:
            r["runs"] = [
                (created - r["epoch"], ended - r["epoch"], status)
                for group in r["groups"]
                for created, ended, status in group_runs(emu.url, group)
            ]
    base = results[0].pop("base")
    for r in results[1:]:
        r.pop("base")
    counters = {
        k: served[k] - base[k]
        for k in ("requests_total", "rate_limited", "runs_created", "duplicate_runs", "streams_closed_early")
    }
    return results, counters


# -- reading a job -----------------------------------------------------------------------------------


def after_first_window(sent: list[Sent], window: float) -> tuple[int, int]:
    """(429s, requests) among the requests sent one window or more after the job's first request."""
    if not sent:
        return 0, 0
    t0 = min(at for at, *_ in sent)
    later = [status for at, _, status, _ in sent if at >= t0 + window]
    return sum(1 for s in later if s == 429), len(later)


def share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def route_of(what: str) -> str:
    """A request's route with its ids taken out, e.g. "POST /v1/tasks/groups/{id}/runs"."""
    return re.sub(r"/(tgrp|trun)_[^/]+", lambda m: f"/{{{m.group(1)}}}", what)


@dataclass
class Row:
    """One job as the tables show it."""

    label: str
    rows: int
    mode: str
    quota: str
    wall: float
    ideal: float
    requests: int
    r429: int
    later429: tuple[int, int] | None  # (429s, requests) after the first window; None: not recorded
    extra: int  # runs created - distinct inputs
    duplicates: int  # the emulator's duplicate_runs
    completed: int
    target: str = ""
    verdict: str = ""

    @property
    def ratio(self) -> float:
        return self.wall / self.ideal

    def later_share(self) -> float | None:
        if self.later429 is None or not self.later429[1]:
            return None
        return self.later429[0] / self.later429[1]

    def cells(self) -> tuple[str, ...]:
        if self.later429 is None:
            later = "n/a"
        elif not self.later429[1]:
            later = "none sent after"
        else:
            later = f"{share(*self.later429)} ({self.later429[0]:,}/{self.later429[1]:,})"
        return (
            self.label,
            f"{self.rows:,}",
            self.mode,
            self.quota,
            f"{self.wall:.1f}",
            f"{self.ideal:.1f}",
            f"{self.ratio:.2f}x",
            f"{self.requests / self.rows:.4f}",
            f"{self.r429:,} ({share(self.r429, self.requests)})",
            later,
            f"{self.extra:,} / {self.duplicates:,}",
            f"{self.completed:,}/{self.rows:,}",
            self.target,
            self.verdict,
        )


HEADER = (
    "job",
    "rows",
    "mode",
    "service quota",
    "wall s",
    "ideal s",
    "wall/ideal",
    "req/row",
    "429s",
    "429 after 1st window",
    "extra runs",
    "completed",
    "target",
    "verdict",
)


def table(
    rows: list[Row], extra_header: tuple[str, ...] = (), extra: list[tuple[str, ...]] | None = None
) -> list[str]:
    """The common columns, then a section's own (`extra_header`, one tuple of cells per row)."""
    cells = [r.cells() + (extra[i] if extra else ()) for i, r in enumerate(rows)]
    return format_table(HEADER + extra_header, cells, right=tuple(range(1, 12)))


def judge(row: Row, ratio_target: float, later_target: float | None = None, *more: tuple[str, bool]) -> None:
    """Sets the row's target and verdict: wall/ideal, the 429 share after the first window, no extra run,
    every row completed, and `more` (name, missed) of a section's own."""
    row.target = f"<={ratio_target}x" + (f", 429 after 1st <={later_target:.0%}" if later_target else "")
    misses = [name for name, missed in more if missed]
    if row.ratio > ratio_target:
        misses.append("wall")
    later = row.later_share()
    if later_target is not None and later is not None and later > later_target:
        misses.append("429s")
    if row.extra or row.duplicates:
        misses.append("extra runs")
    if row.completed != row.rows:
        misses.append("rows")
    row.verdict = "MISSED: " + ", ".join(misses) if misses else "met"


def job_row(label: str, r: dict[str, Any], service: dict[str, Any], ideal: float) -> Row:
    """A job's row from its client log (requests, 429s) and the service's view of its runs."""
    sent = r["sent"]
    window = service.get("rate_window", 60.0)
    return Row(
        label=label,
        rows=r["rows"],
        mode=r["mode"],
        quota=describe(service),
        wall=r["wall"],
        ideal=ideal,
        requests=len(sent),
        r429=sum(1 for *_, status, _ in sent if status == 429),
        later429=after_first_window(sent, window),
        extra=len(r["runs"]) - r["distinct"],
        duplicates=0,
        completed=r["statuses"].get("completed", 0),
    )


def job_details(r: dict[str, Any], service: dict[str, Any]) -> list[str]:
    """Under a table: requests by route and status, what was sent and refused per window, the runs the
    service created per window, JobStats; in runs mode the steady share of the real request budget."""
    sent, window = r["sent"], service.get("rate_window", 60.0)
    routes = Counter(route_of(what) for _, what, *_ in sent)
    refused = Counter(route_of(what) for _, what, status, _ in sent if status == 429)
    statuses = Counter(status for *_, status, _ in sent)
    sent_per = per_window(sent, window)
    refused_per = per_window([s for s in sent if s[2] == 429], window) if refused else []
    t0 = min((at for at, *_ in sent), default=0.0)
    created = Counter(int((c - t0) // window) for c, _, _ in r["runs"] if c >= t0)
    stats = r["stats"]
    lines = [
        "  requests by route (429s): "
        + ", ".join(f"{route} {n:,} ({refused.get(route, 0):,})" for route, n in routes.most_common()),
        "  answers by status: " + ", ".join(f"{s} {n:,}" for s, n in sorted(statuses.items())),
        f"  per {window:g}-s window from the first request: sent "
        + " ".join(f"{n:,}" for n in sent_per)
        + "; 429 "
        + (" ".join(f"{n:,}" for n in refused_per) if refused_per else "none")
        + "; runs created (service's clock) "
        + " ".join(f"{created.get(i, 0):,}" for i in range(max(created, default=-1) + 1)),
        f"  JobStats: requests {stats.get('requests', 0):,}, 429s {stats.get('rate_limited', 0):,}, "
        f"polls {stats.get('polls', 0):,}, stragglers {stats.get('stragglers', 0):,}; statuses "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(r["statuses"].items()))
        + "; stages "
        + ", ".join(f"{k} {v:.1f}" for k, v in (stats.get("stages") or {}).items()),
    ]
    if r["mode"] == "runs" and service.get("rate_limit"):
        ratio, how = steady_share(sent, window, service["rate_limit"])
        lines.append(
            f"  steady-state share of the real request budget ({service['rate_limit']:,}/{window:g} s): "
            + (f"{ratio:.0%}" if ratio is not None else "n/a")
            + f" ({how})"
        )
    return lines


def timeout_for(ideal: float) -> float:
    """aenrich(timeout=): a job that cannot finish comes back with rows pending instead of hanging."""
    return 4 * ideal + 60


# -- 1. a quota 4x below what the client assumes -----------------------------------------------------


def quota(ctx: Context) -> None:
    """Client: 2,000 requests and 2,000 runs per 6 s. Service: 4x less, as four kinds of quota."""
    group_rows, runs_rows = (600, 600) if ctx.quick else (5_000, 1_500)
    variants = "ac" if ctx.quick else "abcd"
    ctx.emit(
        [
            "## quota: the service allows 4x less than the client assumes",
            "",
            f"Client: rate_limit={BUDGET}, run_rate={BUDGET}, rate_window={WINDOW:g}. Service variants: "
            + "; ".join(f"({v}) {describe(QUOTA_VARIANTS[v])}" for v in variants)
            + f". Group mode {group_rows:,} rows, runs mode {runs_rows:,} rows; latency {LATENCY:g} s.",
            "",
        ]
    )
    rows: list[Row] = []
    details: list[str] = []
    for v in variants:
        service = QUOTA_VARIANTS[v]
        for mode, n in (("group", group_rows), ("runs", runs_rows)):
            ideal = ideal_seconds(n, requests_needed(n, mode, service), service)
            print(f"  ... ({v}) {describe(service)}, {mode} mode, {n:,} rows (load {load()})", flush=True)
            spec = JobSpec(
                n,
                mode,
                "",
                str(ctx.tmp / f"quota-{v}-{mode}"),
                engine_kwargs=ctx.engine_kwargs,
                timeout=timeout_for(ideal),
            )
            try:
                (r,), counters = run_jobs(service, [spec])
            except Exception:
                ctx.emit([f"({v}) {mode}: FAILED", *traceback.format_exc().rstrip().splitlines()])
                continue
            row = job_row(f"({v})", r, service, ideal)
            row.extra, row.duplicates = counters["runs_created"] - r["distinct"], counters["duplicate_runs"]
            judge(row, T_QUOTA, T_429_AFTER)
            rows.append(row)
            details += [
                f"({v}) {mode} mode, {n:,} rows: wall {r['wall']:.1f} s, ideal {ideal:.1f} s; the emulator "
                f"served {counters['requests_total']:,} requests, {counters['rate_limited']:,} of them 429",
                *job_details(r, service),
            ]
            print(f"      {r['wall']:.1f} s, {row.verdict}", flush=True)
    if rows:
        ctx.emit([*table(rows), "", *QUOTA_NOTES, "", *details])


QUOTA_NOTES = [
    "ideal: when the service's real quota can have admitted every run and request (a sliding window: a",
    "  full budget at once, then one more per window; a token bucket: its burst at once, then its rate),",
    "  + the slowest run (1.5x latency). Requests needed: group mode 1 group + adds as large as the run",
    "  quota allows (<= 1,000) + 1 read; runs mode 1 group + 1 add per row + 1 read.",
    "req/row, 429s: the client's log of what it sent (a hook on httpx's transport), 429s over requests.",
    "429 after 1st window: among requests sent one service window or more after the first request.",
    "extra runs: runs created - distinct inputs / the emulator's duplicate_runs.",
]


# -- 2. two jobs on one key --------------------------------------------------------------------------


def shared(ctx: Context) -> None:
    """Two jobs, one API key, one emulator at the default quota, started together."""
    service = DEFAULT_SERVICE
    sizes = (("group", 2_000), ("runs", 1_100)) if ctx.quick else (("group", 5_000), ("runs", 1_500))
    ctx.emit(
        [
            "## shared: two jobs on one API key",
            "",
            f"Service: {describe(service)}; both clients told rate_limit={BUDGET}, run_rate={BUDGET}, "
            f"rate_window={WINDOW:g}. Each job in its own process, started together (a barrier after the "
            "warm-ups), different inputs. Ideal: the quota admitting BOTH jobs' runs, + 1.5x latency.",
            "",
        ]
    )
    rows: list[Row] = []
    splits: list[tuple[str, ...]] = []
    details: list[str] = []
    for mode, n in sizes:
        runs = 2 * n
        ideal = ideal_seconds(runs, 2 * requests_needed(n, mode, service), service)
        print(f"  ... two jobs, {mode} mode, {n:,} rows each (load {load()})", flush=True)
        specs = [
            JobSpec(
                n,
                mode,
                "",
                str(ctx.tmp / f"shared-{mode}-{i}"),
                offset=i * n,
                engine_kwargs=ctx.engine_kwargs,
                timeout=timeout_for(ideal),
            )
            for i in range(2)
        ]
        try:
            results, counters = run_jobs(service, specs)
        except Exception:
            ctx.emit([f"{mode}: FAILED", *traceback.format_exc().rstrip().splitlines()])
            continue
        split, worst = window_split(results, service["rate_window"])
        for i, r in enumerate(results):
            row = job_row(f"{mode} job {'AB'[i]}", r, service, ideal)
            judge(row, T_SHARED)
            rows.append(row)
            splits.append((worst,))
            details += [
                f"{mode} job {'AB'[i]}, {n:,} rows: wall {r['wall']:.1f} s, ideal {ideal:.1f} s",
                *job_details(r, service),
            ]
        details += [
            f"{mode}: runs created per {service['rate_window']:g}-s window (service's clock), job A / job B: "
            + ", ".join(split),
            f"  both jobs together: the emulator served {counters['requests_total']:,} requests "
            f"({counters['rate_limited']:,} 429), created {counters['runs_created']:,} runs for "
            f"{sum(r['distinct'] for r in results):,} distinct inputs "
            f"({counters['duplicate_runs']:,} duplicates)",
        ]
        print("      " + ", ".join(f"{r['wall']:.1f} s" for r in results), flush=True)
    if rows:
        ctx.emit(
            [
                *table(rows, ("smaller share while both created",), splits),
                "",
                *SHARED_NOTES,
                "smaller share while both created: in the windows before either job's last run was created,",
                "  the lowest share of that window's runs one job got (50% = even; 0% = one starved).",
                "",
                *details,
            ]
        )


SHARED_NOTES = [
    "ideal: when the quota can have admitted BOTH jobs' runs and requests (a full budget at once,",
    "  then one more per window), + the slowest run (1.5x latency); each wall from its job's start.",
    "req/row, 429s, 429 after 1st window: each job's own log; extra runs: runs in the job's group -",
    "  its distinct inputs (the emulator's totals for both jobs are under the table).",
]


def window_split(results: list[dict[str, Any]], window: float) -> tuple[list[str], str]:
    """Runs created per window (from the first run either job created) by each job, and the lowest share
    one job got of a window's runs while both still had runs to create."""
    times = [[c for c, _, _ in r["runs"]] for r in results]
    if not all(times):
        return [], "n/a"
    t0 = min(min(t) for t in times)
    counts = [Counter(int((c - t0) // window) for c in t) for t in times]
    last = max(max(c) for c in counts)
    both_until = min(int((max(t) - t0) // window) for t in times)  # the window of the first job's last run
    split = [" / ".join(f"{c.get(i, 0):,}" for c in counts) for i in range(last + 1)]
    shares = [
        min(c.get(i, 0) for c in counts) / total
        for i in range(both_until)
        if (total := sum(c.get(i, 0) for c in counts))
    ]
    return split, f"{min(shares):.0%}" if shares else "n/a"


# -- 3. streams closed by the service ----------------------------------------------------------------


def streams_child(
    tool: str, rows: int, close: float | None, engine_kwargs: dict[str, Any], work: str
) -> dict[str, Any]:
    """Runs in a fresh process: compare.py's `measure` of one tool on `rows` rows (a 2-row warm-up first),
    against an in-thread emulator at the default quota whose streams end after `close` s.

    enrich gets the 6-s window and `engine_kwargs` by binding them to the `aenrich` compare.py calls.
    """
    import compare

    compare.aenrich = functools.partial(aenrich, **CLIENT, **engine_kwargs)
    fn = compare.run_enrich if tool == "enrich" else compare.run_pwt
    compare.measure(fn, companies(2), EmulatorConfig(latency=0.05, seed=1), Path(work) / "warm")
    sent = record_requests()
    config = EmulatorConfig(latency=STREAMS_LATENCY, seed=1, stream_close_seconds=close, **DEFAULT_SERVICE)
    out = compare.measure(fn, companies(rows), config, Path(work))
    return {"outcome": dataclasses.asdict(out), "sent": sent}


def streams(ctx: Context) -> None:
    """Every SSE stream ended by the service after 1 s: enrich against parallel-web-tools, and alone."""
    import compare

    close = STREAMS_CLOSE
    big = 2_500 if ctx.quick else 5_000
    jobs: list[tuple[str, int, float | None]] = [("enrich", 1_000, close)]
    if compare.parallel_enrich is not None:
        jobs.append(("pwt", 1_000, close))
    jobs += [("enrich", big, close), ("enrich", 1_000, None)]
    if not ctx.quick:
        jobs.append(("enrich", big, None))
        if compare.parallel_enrich is not None:
            jobs.insert(-1, ("pwt", 1_000, None))
    ctx.emit(
        [
            f"## streams: the service ends every SSE stream after {close:g} s, with runs active",
            "",
            f"Service: {describe(DEFAULT_SERVICE)}, latency {STREAMS_LATENCY:g} s, "
            f"stream_close_seconds={close:g} "
            "(and unset, for reference); in-thread emulator (compare.py's measure), each tool in a fresh "
            f"process; processor {compare.PROCESSOR} and compare.py's two fields (parity with pwt); "
            "group mode.",
            *([] if compare.parallel_enrich is not None else [f"parallel-web-tools: {compare.PWT_MISSING}"]),
            "",
        ]
    )
    done: dict[tuple[str, int, float | None], dict[str, Any]] = {}
    for tool, n, cut in jobs:
        print(f"  ... {tool}, {n:,} rows, streams closed after {cut} s (load {load()})", flush=True)
        try:
            done[(tool, n, cut)] = in_fresh_process(
                streams_child, tool, n, cut, ctx.engine_kwargs, str(ctx.tmp / f"streams-{tool}-{n}-{cut}")
            )
        except Exception:
            ctx.emit([f"{tool} {n:,} {cut}: FAILED", *traceback.format_exc().rstrip().splitlines()])
            continue
        print(f"      {done[(tool, n, cut)]['outcome']['wall']:.1f} s", flush=True)
    rows: list[Row] = []
    extra: list[tuple[str, ...]] = []
    for (tool, n, cut), r in done.items():
        o, served = r["outcome"], r["outcome"]["served"]
        ideal = ideal_seconds(
            n, requests_needed(n, "group", DEFAULT_SERVICE), DEFAULT_SERVICE, STREAMS_LATENCY
        )
        quota_text = describe(DEFAULT_SERVICE) + (f", streams cut at {cut:g} s" if cut else "")
        row = Row(
            label=f"{tool}" + (" (reference)" if cut is None else ""),
            rows=n,
            mode="group",
            quota=quota_text,
            wall=o["wall"],
            ideal=ideal,
            requests=served.get("requests_total", 0),
            r429=served.get("rate_limited", 0),
            later429=after_first_window(r["sent"], WINDOW) if tool == "enrich" else None,
            extra=served.get("runs_created", 0) - n,
            duplicates=served.get("duplicate_runs", 0),
            completed=o["correct"],
        )
        pwt = done.get(("pwt", n, cut)) if tool == "enrich" else None
        ratio = o["wall"] / pwt["outcome"]["wall"] if pwt and pwt["outcome"]["correct"] == n else None
        if tool == "pwt":
            row.target, row.verdict = "(the reference tool)", ""
        elif n <= 1_000 and pwt is not None:
            judge(row, T_STREAM_1K, None, ("vs pwt", ratio is None or ratio > T_STREAM_PWT))
            row.target += f", <={T_STREAM_PWT}x pwt"
        else:
            judge(row, T_STREAM_1K if n <= 1_000 else T_STREAM_5K)
        rows.append(row)
        extra.append(
            (
                f"{pwt['outcome']['wall']:.1f}" if pwt else "",
                f"{ratio:.2f}x" if ratio is not None else ("n/a" if pwt else ""),
                f"{served.get('requests_total', 0):,}",
                f"{served.get('streams_closed_early', 0):,}",
            )
        )
    if not rows:
        return
    details = []
    for (tool, n, cut), r in done.items():
        served = r["outcome"]["served"]
        details.append(
            f"{tool} {n:,} rows, streams cut at {cut}: requests by route: "
            + ", ".join(
                f"{route} {k:,}"
                for route, k in sorted(served.get("requests", {}).items(), key=lambda x: -x[1])
            )
            + f"; rows wrong {r['outcome']['wrong']:,}, without answer {r['outcome']['missing']:,}"
            + (f"; error: {r['outcome']['error']}" if r["outcome"]["error"] else "")
        )
    ctx.emit(
        [
            *table(rows, ("pwt s", "enrich/pwt", "requests", "streams cut"), extra),
            "",
            "completed: rows whose fields equal the emulator's answer for their input (compare.py's check).",
            "req/row, 429s, requests: the emulator's counters; 429 after 1st window: enrich's own log.",
            "streams cut: SSE streams the service ended early (the emulator's streams_closed_early).",
            "enrich/pwt: enrich's wall over parallel-web-tools' on the same rows and the same stream closes.",
            "",
            *details,
        ]
    )


# -- 4. first answers while adds wait ----------------------------------------------------------------


def first_answers(ctx: Context) -> None:
    """When the first answer is counted, and on disk, while later adds still wait for budget."""
    service = DEFAULT_SERVICE
    n = 2_500 if ctx.quick else 5_000
    ctx.emit(
        [
            "## first-answers: the first answers while adds wait for budget",
            "",
            f"Service and client: {describe(service)}; group mode, {n:,} rows, latency {LATENCY:g} s "
            f"(the first runs can end {LATENCY * 0.5:g} s after the first add).",
            "",
        ]
    )
    ideal = ideal_seconds(n, requests_needed(n, "group", service), service)
    print(f"  ... group mode, {n:,} rows (load {load()})", flush=True)
    spec = JobSpec(
        n,
        "group",
        "",
        str(ctx.tmp / "first-answers"),
        engine_kwargs=ctx.engine_kwargs,
        timeout=timeout_for(ideal),
        watch_outcomes=True,
    )
    (r,), counters = run_jobs(service, [spec])
    row = job_row("first answers", r, service, ideal)
    row.extra, row.duplicates = counters["runs_created"] - r["distinct"], counters["duplicate_runs"]
    judge(row, T_QUOTA)
    ended = [e for _, e, status in r["runs"] if status == "completed"]
    first_end = min(ended) if ended else None
    adds = [
        at
        for at, what, status, _ in r["sent"]
        if what.endswith("/runs") and what.startswith("POST ") and status == 200
    ]
    counted = next(((t, waiting) for t, completed, _, _, waiting in r["progress"] if completed > 0), None)
    segment = r["first_segment"]
    waiting_at_segment = (
        next((w for t, *_, w in reversed(r["progress"]) if t <= segment), None)
        if segment is not None
        else None
    )

    def at(t: float | None) -> str:
        return f"{t:.1f}" if t is not None else "never"

    def lag(t: float | None) -> float | None:
        return t - first_end if t is not None and first_end is not None else None

    lags = {"counted": lag(counted[0] if counted else None), "on disk": lag(segment)}
    misses = [k for k, v in lags.items() if v is None or v > T_LAG]
    cells = (
        f"{n:,}",
        at(adds[0] if adds else None),
        at(first_end),
        at(counted[0] if counted else None),
        at(segment),
        " / ".join(at(v) for v in lags.values()),
        f"{counted[1]:,}" if counted else "n/a",
        f"{waiting_at_segment:,}" if waiting_at_segment is not None else "n/a",
        f"{r['wall']:.1f}",
        f"<= {T_LAG:g} s",
        "MISSED: " + ", ".join(misses) if misses else "met",
    )
    header = (
        "rows",
        "first add s",
        "first run ended s",
        "first answer counted s",
        "first outcomes segment s",
        "lag counted / on disk s",
        "waiting then",
        "waiting at segment",
        "wall s",
        "target",
        "verdict",
    )
    completions = [(t, c) for t, c, *_ in r["progress"]]
    ctx.emit(
        [
            *format_table(header, [cells], right=tuple(range(9))),
            "",
            "Times in seconds from the aenrich() call. first add: the client's first add-runs answered 200.",
            "first run ended: the earliest end among the job's runs, as the service reports them",
            "  (modified_at of its completed runs, read back after the job). first answer counted: the",
            "  first progress report with completed > 0. first outcomes segment: the first",
            "  outcomes-*.parquet in the checkpoint (polled every 10 ms). lag: each minus the first run's",
            "  end. waiting: inputs not submitted yet (Progress.waiting) at that report / at the last",
            "  report before the segment appeared.",
            "",
            *table([row]),
            "",
            "progress reports (s: completed): "
            + ", ".join(f"{t:.1f}: {c:,}" for t, c in thin(completions, 24)),
            *job_details(r, service),
        ]
    )


def thin(items: list[Any], most: int) -> list[Any]:
    """At most `most` items spread evenly over `items` (the first and last kept)."""
    if len(items) <= most:
        return items
    step = (len(items) - 1) / (most - 1)
    return [items[round(i * step)] for i in range(most)]


# -- 5. crash torture against late commits -----------------------------------------------------------


def late_commit_seed(seed: int, mode: str, tmp: Path, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One seed: the CLI job killed 4 times at random moments, then rerun until it exits 0."""
    import test_torture as torture  # tests/ is on sys.path: Job, table, expected

    rows = 1_500 if mode == "group" else 300
    distinct = rows * 9 // 10
    rng = random.Random(seed)
    df = torture.table(rows, distinct)
    config = EmulatorConfig(
        latency=1.0,
        rate_limit=None,
        late_commit_seconds=3.0,
        late_commit_rate=0.7,
        late_commit_answer="gateway",
        fault_rate=0.03,
        faults=frozenset({"lost_create", "html_5xx", "drop"}),
        seed=seed,
    )
    started = time.monotonic()
    codes: list[str] = []
    result: dict[str, Any] = {"seed": seed, "mode": mode, "rows": rows, "distinct": distinct, "error": ""}
    with Emulator(config) as emu:
        job = torture.Job(tmp, emu, df, "--run-rate", "100", "--no-progress", "--mode", mode)
        job.cmd[job.cmd.index("--commit-horizon") + 1] = "5"  # the service commits within 3 s
        worker = _TORTURE_WORKER.format(worker=str(TESTS / "_torture_worker.py"))
        job.cmd = [sys.executable, "-c", worker, json.dumps(engine_kwargs), *job.cmd[2:]]
        code: int | None = None
        err = b""
        try:
            for _ in range(4):
                code, err = job.attempt(lambda: True, delay=rng.uniform(0.5, 3.0))
                codes.append("killed" if code == -signal.SIGKILL else f"exit {code}")
                if code == 0:
                    break
            while code != 0 and len(codes) < 24 and time.monotonic() - started < 300:
                code, err = job.attempt()
                codes.append(f"exit {code}")
            if code != 0:
                result["error"] = f"gave up; last stderr: {last_line(err)}"
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        # A create answered 504 commits 3 s later, whatever the client did: count those runs too.
        deadline = time.monotonic() + config.late_commit_seconds + 5
        while emu.stats()["late_commits_pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = emu.stats()
        wrong = unanswered = rows
        if code == 0 and job.target.exists():
            wrong, unanswered = check_rows(pl.read_parquet(job.target), df, emu, torture.expected(df))
    result.update(
        wall=time.monotonic() - started,
        codes=codes,
        extra=stats["runs_created"] - distinct,
        duplicates=stats["duplicate_runs"],
        late_commits=stats["late_commits"],
        faults={k: v for k, v in stats["faults"].items() if v},
        wrong=wrong,
        unanswered=unanswered,
    )
    return result


def last_line(err: bytes) -> str:
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "(none)"


def check_rows(out: pl.DataFrame, df: pl.DataFrame, emu: Emulator, want: list[Any]) -> tuple[int, int]:
    """(rows with a wrong answer, rows without one): a row is right when its run was created for its own
    input and its fields are that input's answer (tests/test_torture.py's check, counted, not asserted)."""
    if out.height != df.height or out["row"].to_list() != df["row"].to_list():
        return df.height, 0
    runs = emu.app.state.runs
    wrong = unanswered = 0
    for row, expected in zip(out.iter_rows(named=True), want, strict=True):
        run = runs.get(row["_run_id"]) if row["_run_id"] else None
        own = run is not None and json.loads(run.body)["input"] == {"company": row["company"]}
        if row["_status"] != "completed":
            unanswered += 1
            wrong += run is not None and not own
        elif not own or (row["ceo"], row["founded"]) != (expected["ceo"], expected["founded"]):
            wrong += 1
    return wrong, unanswered


def late_commits(ctx: Context) -> None:
    """Crash torture against late commits: per mode, runs beyond the distinct inputs, wrong rows."""
    seeds = ctx.seeds if ctx.seeds is not None else (3 if ctx.quick else 20)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    ctx.emit(
        [
            "## late-commits: crash torture against creates committed 3 s after a 504",
            "",
            "Emulator (in a thread): late_commit_seconds=3, late_commit_rate=0.7, "
            "late_commit_answer=gateway, fault_rate=0.03 (lost_create, html_5xx, drop), latency 1 s, "
            "no rate limit, seed=seed.",
            "enrich run (tests/_torture_worker.py: limiter window 0.25 s) --run-rate 100 --processor lite; "
            "1,500 rows (group) / 300 (runs), 10 % duplicate inputs; SIGKILLed 4 times 0.5-3 s after "
            "start, then rerun until exit 0 (<= 20 more attempts, 300 s).",
            f"Seeds 1-{seeds} per mode."
            + (f" Engine keywords bound to enrich(): {ctx.engine_kwargs}" if ctx.engine_kwargs else ""),
            "",
        ]
    )
    results: dict[str, list[dict[str, Any]]] = {"group": [], "runs": []}
    details: list[str] = []
    for mode in results:
        for seed in range(1, seeds + 1):
            with tempfile.TemporaryDirectory(dir=ctx.tmp) as tmp:
                try:
                    r = late_commit_seed(seed, mode, Path(tmp), ctx.engine_kwargs)
                except Exception:
                    ctx.emit([f"{mode} seed {seed}: FAILED", *traceback.format_exc().rstrip().splitlines()])
                    continue
            results[mode].append(r)
            details.append(
                f"{mode} seed {seed}: {r['wall']:.1f} s, extra runs {r['extra']:,} (duplicates "
                f"{r['duplicates']:,}), wrong {r['wrong']:,}, unanswered {r['unanswered']:,}, late commits "
                f"{r['late_commits']:,}, faults {r['faults']}; "
                + ", ".join(r["codes"])
                + (f"; {r['error']}" if r["error"] else "")
            )
            print("  " + details[-1], flush=True)
    header = (
        "mode",
        "rows",
        "seeds",
        "extra runs min/max/total",
        "seeds with extra runs",
        "rows wrong",
        "rows unanswered",
        "seeds given up",
        "mean wall s per seed",
        "target",
        "verdict",
    )
    cells = []
    for mode, rs in results.items():
        if not rs:
            continue
        extras = [r["extra"] for r in rs]
        bad_seeds = sum(1 for r in rs if r["extra"] or r["duplicates"])
        wrong, unanswered = sum(r["wrong"] for r in rs), sum(r["unanswered"] for r in rs)
        misses = [
            m for m, bad in (("extra runs", bad_seeds), ("wrong rows", wrong), ("rows", unanswered)) if bad
        ]
        cells.append(
            (
                mode,
                f"{rs[0]['rows']:,}",
                f"{len(rs)}",
                f"{min(extras):,} / {max(extras):,} / {sum(extras):,}",
                f"{bad_seeds} of {len(rs)}",
                f"{wrong:,}",
                f"{unanswered:,}",
                f"{sum(1 for r in rs if r['error'])}",
                f"{statistics.mean(r['wall'] for r in rs):.1f}",
                "0 extra runs, every row its own answer",
                "MISSED: " + ", ".join(misses) if misses else "met",
            )
        )
    ctx.emit(
        [
            *format_table(header, cells, right=tuple(range(1, 9))),
            "",
            "extra runs: runs the emulator created - distinct inputs, after the last late commit landed.",
            "rows wrong: answered from another input's run, or with a value not that input's answer;",
            "  unanswered: not completed in the final output (all of them when the seed was given up).",
            "",
            *details,
        ]
    )


# -- main --------------------------------------------------------------------------------------------


def parse_engine_args(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """`name=value` pairs for `aenrich()`; a value that parses as JSON is taken as JSON, else as text."""
    known = inspect.signature(aenrich).parameters
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--engine-arg wants name=value, got {item!r}")
        if name not in known:
            parser.error(f"--engine-arg {name}: aenrich() has no such keyword")
        try:
            kwargs[name] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[name] = text
    return kwargs


def engine_source() -> str:
    """Where `enrich` was imported from, and whether that is this checkout's (PYTHONPATH may point the
    bench at another copy, e.g. a `git archive` of a commit, while enrich/ is being edited)."""
    measured = Path(enrich.__file__).resolve().parent
    ours = Path(__file__).resolve().parent.parent / "enrich"
    if measured == ours:
        return f"enrich imported from {measured}"
    return f"enrich imported from {measured}: NOT this checkout's enrich/ (the git state above is not it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, fewer variants and seeds (~3 min)"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--seeds", type=int, default=None, help="late-commits seeds per mode (20; --quick 3)")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a keyword for every aenrich() call (repeatable; JSON values, else text)",
    )
    args = parser.parse_args()
    only = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    engine_kwargs = parse_engine_args(args.engine_arg, parser)

    emit = Report()
    started = time.monotonic()
    more = [engine_source(), *([f"engine keywords (--engine-arg): {engine_kwargs}"] if engine_kwargs else [])]
    command = heading(emit, "bench/unkind.py", *more)
    functions: dict[str, Callable[[Context], None]] = {
        "quota": quota,
        "shared": shared,
        "streams": streams,
        "first-answers": first_answers,
        "late-commits": late_commits,
    }
    with tempfile.TemporaryDirectory(prefix="enrich-unkind-") as tmp:
        ctx = Context(args.quick, emit, engine_kwargs, Path(tmp), args.seeds)
        sections = [(name, functools.partial(functions[name], ctx)) for name in SECTIONS if name in only]
        run_sections(sections, emit, started, RESULTS, command)


if __name__ == "__main__":
    main()
