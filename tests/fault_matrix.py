"""The fault matrix of issue 5: what production does to a job, injected case by case, and what the job did.

Every case runs a small job (a few hundred rows, some of them duplicates) through `aenrich()` against the
emulator served over real HTTP on 127.0.0.1 (`Emulator`), with one kind of trouble injected: by the
emulator itself (`EmulatorConfig`: rate limits, faults, failed runs, latency) or by a `Tap` from
`tests/_fakes.py` put in front of the emulator's app before the server starts (`Emulator.app` is the ASGI
app uvicorn serves), which rewrites, cuts or corrupts what the client sees while the emulator keeps the
truth. Then the runner checks, against that truth:

- every row carries its own answer: its `_run_id` names a run the emulator created from that row's input,
  a completed row holds exactly `synth_output()` of its input, a failed row's run really failed and its
  `_error` says why in one line, and a value that broke its schema is null with `_error` naming the field;
- exactly one run per distinct input (`runs_created == distinct`, `duplicate_runs == 0`);
- 429s stay a small share of the requests (the limiter backs off instead of hammering);
- the fault was really injected (a case that injects nothing proves nothing).

`tests/test_reliability.py` asserts every case; this file is also the command that regenerates the
report, so its table stays true:

    /work/venv/bin/python tests/fault_matrix.py --report docs/reliability.md
    /work/venv/bin/python tests/fault_matrix.py --case lost-create   # print some cases, write nothing
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import heapq
import json
import logging
import multiprocessing
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_fakes`, when run as a script

from _fakes import Cut, Tap, is_add_runs, is_runs_stream, sse

from enrich import Emulator, EmulatorConfig
from enrich._checkpoint import Checkpoint
from enrich._emulator.synth import synth_output
from enrich._engine import JobStats, aenrich
from enrich._inputs import build_inputs
from enrich._schema import parse_output

__all__ = ["CASES", "Case", "Result", "report", "run_case"]

OUTPUT = {"ceo": "Name of the current CEO", "founded": ("integer", "Year founded")}
FIELDS = tuple(OUTPUT)
PROCESSOR = "lite"
#: The 429 budget of a case, once the engine has had its first window to learn the quota it was not told:
#: at most this share of its requests ...
MAX_429_SHARE = 0.05
#: ... or this many 429s after the first window, whichever is more. A group-mode job sends a dozen
#: requests, so one 429 is 8 %; an add, the events stream and a poll can be in flight together.
MAX_429_FLOOR = 3
#: In its first window the engine learns: each 429 pauses every sender and lets one request through,
#: whose answer measures the quota. At most this many 429s then: the creates in flight when the first
#: came back, and without Retry-After a backoff from a sixtieth of the window that doubles (about six
#: tries to reach the end of a window); timing moves it by half again on a loaded machine. A limiter
#: that does not back off sends hundreds.
MAX_429_LEARNING = 30
#: A call that runs longer than this (seconds) is stopped and its case fails.
DEADLINE = 60.0
#: Cases run at once, each in its own process.
JOBS = 6


# -- taps: what the client sees, changed ----------------------------------------------------------------


def _pick(run_id: str, one_in: int) -> bool:
    """A deterministic share of runs, chosen by their id."""
    return int(hashlib.blake2b(run_id.encode(), digest_size=4).hexdigest(), 16) % one_in == 0


class CutStreams(Tap):
    """Cuts the first `cuts` SSE streams (group runs and group events) in the middle of their third event,
    like a connection reset: the client gets half an event, then the connection closes."""

    cuts = 6

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.hits = 0
        # Events seen per stream: each request is answered on its own task, its events in order.
        self._seen: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        raw = sse(data)
        stream = is_runs_stream(method, path) or path.endswith("/events")
        task = asyncio.current_task()
        if self.hits >= self.cuts or not stream or task is None or data.get("type") != "task_run.state":
            return raw
        seen = self._seen[task] = self._seen.get(task, 0) + 1
        if seen == 3:
            self.hits += 1
            raise Cut(raw[: len(raw) // 2])
        return raw


class Malformed(Tap):
    """Corrupts JSON: every second add-runs answer and every tenth result answer are cut in half (the
    request was carried out), and the first runs stream carries one event that is not JSON."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.hits = 0
        self._adds = 0
        self._results = 0
        self._stream_done = False

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if status == 200 and is_add_runs(method, path):
            self._adds += 1
            if self._adds % 2 == 0:
                self.hits += 1
                return body[: len(body) // 2]
        elif status == 200 and path.endswith("/result"):
            self._results += 1
            if self._results % 10 == 0:
                self.hits += 1
                return body[: len(body) // 2]
        return body

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        if is_runs_stream(method, path) and not self._stream_done and data.get("type") == "task_run.state":
            self._stream_done = True
            self.hits += 1
            return b'event: task_run.state\ndata: {"type": "task_run.state", "run": \n\n'
        return sse(data)


class UnknownStatus(Tap):
    """Statuses this client version does not know: active runs say `paused_for_review` (is_active true),
    failed runs say `errored` (is_active false, with their error), in streams and in run/result answers."""

    RENAME: ClassVar[dict[str, str]] = {
        "queued": "paused_for_review",
        "running": "paused_for_review",
        "failed": "errored",
    }

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.hits = 0

    def _rename(self, run: Any) -> None:
        if isinstance(run, dict) and run.get("status") in self.RENAME:
            run["status"] = self.RENAME[run["status"]]
            self.hits += 1

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        self._rename(data.get("run"))
        return sse(data)

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if status != 200 or "/runs/" not in path or is_add_runs(method, path):
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict):
            self._rename(data.get("run", data))  # a result holds {"run", "output"}; a run is itself
        return json.dumps(data).encode()


class HoldQueued(Tap):
    """Every run stays queued for `hold` seconds after its creation, then runs for 0.1 s.

    The emulator draws each run's schedule when it is created; this moves the start of the runs an
    add-runs call created (and their entries in the emulator's transition heap) before anyone sees them.
    """

    hold = 0.8

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.hits = 0

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if status == 200 and is_add_runs(method, path):
            state = self.app.state
            now = state.now()
            held = set(json.loads(body)["run_ids"])
            for run_id in held:
                run = state.runs[run_id]
                run.start = now + self.hold
                run.end = run.start + 0.1
            heap = state._heap
            heap[:] = [(run.start if run.run_id in held else t, seq, run) for t, seq, run in heap]
            heapq.heapify(heap)
            self.hits += len(held)
        return body


class Outage(Tap):
    """The service goes down for `seconds` right after the first add-runs call is answered: every request
    gets an HTML 503 and nothing is done. Longer than the client's own retries (5 tries, at most 7.5 s of
    backoff), so the engine has to ride it out, in submission (a lost add and the read that looks for its
    runs) as in collection."""

    seconds = 8.0

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.hits = 0
        self.until: float | None = None

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if self.until is not None and time.monotonic() < self.until:
            self.hits += 1
            return 503, b"<html><head><title>503 Service Temporarily Unavailable</title></head></html>"
        return None

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if self.until is None and status == 200 and is_add_runs(method, path):
            self.until = time.monotonic() + self.seconds
        return body


class BreakSchema(Tap):
    """One run in five answers `founded` in words: a value that does not fit its integer column."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.broken: set[str] = set()

    @property
    def hits(self) -> int:
        return len(self.broken)

    def _break(self, run: Any, output: Any) -> None:
        if isinstance(output, dict) and isinstance(output.get("content"), dict) and isinstance(run, dict):
            run_id = str(run.get("run_id"))
            if _pick(run_id, 5):
                output["content"]["founded"] = "nineteen ninety"
                self.broken.add(run_id)

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        self._break(data.get("run"), data.get("output"))
        return sse(data)

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if status != 200 or not path.endswith("/result"):
            return body
        data = json.loads(body)
        self._break(data.get("run"), data.get("output"))
        return json.dumps(data).encode()


# -- the matrix -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    `emulator`: `EmulatorConfig` fields; `tap`: a `Tap` subclass put in front of the emulator's app;
    `engine`: `aenrich()` keywords. With `resume`, the job is called twice: the first call stops at
    `engine["timeout"]`, the second (without it) must finish what the first left pending. `fault` names
    what must have been injected: an emulator fault kind, "429", "failed", "pending" or "tap".
    """

    name: str
    mode: str
    injected: str
    fault: str
    emulator: Mapping[str, Any] = field(default_factory=dict)
    tap: type[Tap] | None = None
    engine: Mapping[str, Any] = field(default_factory=dict)
    rows: int = 0  # 0: 300 in group mode, 100 in runs mode (a create each, so ~1 request a row)
    resume: bool = False
    #: Duplicates are expected (a commit later than the job's horizon): each must be counted by the job,
    #: recorded in its checkpoint, and no row may carry one.
    duplicates: bool = False
    seconds: float = 3.0  # a rough wall time, so that `run_all` starts the long cases first

    @property
    def id(self) -> str:
        return f"{self.name}[{self.mode}]"


def _both(name: str, injected: str, fault: str, **kw: Any) -> list[Case]:
    """The case in group and in runs mode. Keywords are `Case` fields; `group=` and `runs=` hold each
    mode's own (dicts are merged). `{}` in `injected` becomes the emulator's fault rate."""
    per_mode = {m: kw.pop(m, {}) for m in ("group", "runs")}
    cases = []
    for mode in ("group", "runs"):
        merged = {"injected": injected, **kw}
        for key, value in per_mode[mode].items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        rate = merged.get("emulator", {}).get("fault_rate")
        if rate is not None:
            merged["injected"] = merged["injected"].replace("{}", f"{rate:.0%}")
        cases.append(Case(name=name, mode=mode, fault=fault, **merged))
    return cases


# The 429 cases. Both sides count over the same scaled window, and the emulator's quota is below the
# engine's budget, so 429s really happen and the engine must slow down. The scale keeps production's
# proportions where they matter: a runs-mode job keeps 5 creates in flight against a quota of 40 requests
# per window (a create a row, plus a few reads of the group), so one 429 bounces a handful of requests,
# not the whole quota. Group mode sends a dozen requests; one add of all rows unless a run quota splits it.
_QUOTAS = {
    "requests": {
        "group": ({"rate_limit": 3}, {"rate_limit": 12}),
        "runs": ({"rate_limit": 40}, {"rate_limit": 60}),
    },
    "runs": {
        "group": ({"run_rate_limit": 150}, {"run_rate": 200}),
        "runs": ({"run_rate_limit": 50}, {"run_rate": 75}),
    },
    "both": {
        "group": ({"rate_limit": 3, "run_rate_limit": 150}, {"rate_limit": 12, "run_rate": 200}),
        "runs": ({"rate_limit": 40, "run_rate_limit": 50}, {"rate_limit": 60, "run_rate": 75}),
    },
}
_WINDOWS = {"group": 1.0, "runs": 2.0}


def _quota(name: str, retry_after: bool) -> dict[str, Any]:
    """`_both()` keywords of a 429 case: the emulator's quota and the engine's budgets, per mode."""
    out: dict[str, Any] = {}
    for mode, (emulator, engine) in _QUOTAS[name].items():
        window = _WINDOWS[mode]
        quota = [
            f"{emulator[k]} {unit} (engine {engine[e]})"
            for k, e, unit in (
                ("rate_limit", "rate_limit", "requests"),
                ("run_rate_limit", "run_rate", "runs"),
            )
            if k in emulator
        ]
        header = "with" if retry_after else "without"
        out[mode] = {
            "injected": f"quota {' and '.join(quota)} per {window:g} s; 429 {header} Retry-After",
            "emulator": {
                "rate_limit": None,
                **emulator,
                "rate_window": window,
                "retry_after_header": retry_after,
            },
            "engine": {**engine, "rate_window": window, **({"concurrency": 5} if mode == "runs" else {})},
        }
    return out


_SMALL_ADDS = {"group": {"engine": {"run_rate": 100, "rate_window": 0.5}}}  # several add-runs calls

# A quota the engine was not told, shaped unlike its own: a token bucket whose burst is below one add
# (40 runs, refilled at 150 a second; the engine assumes 200 a second; in runs mode a second's worth),
# and a window half as long as the engine's. Runs mode keeps 5 creates in flight.
_UNTOLD = {
    "burst": {
        "group": (
            {"run_rate_limit": 150, "run_burst": 40, "rate_window": 1.0},
            {"run_rate": 200, "rate_window": 1.0},
        ),
        "runs": (
            {"run_rate_limit": 50, "run_burst": 25, "rate_window": 2.0},
            {"run_rate": 75, "rate_window": 2.0},
        ),
    },
    "short-window": {
        "group": ({"run_rate_limit": 60, "rate_window": 0.5}, {"run_rate": 200, "rate_window": 1.0}),
        "runs": ({"run_rate_limit": 25, "rate_window": 1.0}, {"run_rate": 75, "rate_window": 2.0}),
    },
}


def _untold(name: str, injected: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, (emulator, engine) in _UNTOLD[name].items():
        out[mode] = {
            "emulator": {"rate_limit": None, **emulator},
            "engine": {**engine, **({"concurrency": 5} if mode == "runs" else {})},
            "injected": injected.format(**{**engine, **emulator}, engine_window=engine["rate_window"]),
        }
    return out


CASES: list[Case] = [
    *_both("baseline", "nothing", "none"),
    *_both(
        "429-requests",
        "request quota below the engine's budget; 429 with Retry-After",
        "429",
        **_quota("requests", True),
    ),
    *_both(
        "429-requests-no-retry-after",
        "request quota below the engine's budget; 429 without Retry-After",
        "429",
        **_quota("requests", False),
    ),
    *_both(
        "429-runs",
        "run quota below the engine's run budget; 429 with Retry-After",
        "429",
        **_quota("runs", True),
    ),
    *_both(
        "429-both-no-retry-after",
        "request and run quotas both below the engine's budgets; 429 without Retry-After",
        "429",
        **_quota("both", False),
    ),
    *_both(
        "html-5xx",
        "502/503 with an HTML body, nothing done: {} of requests",
        "html_5xx",
        emulator={"faults": {"html_5xx"}},
        group={"emulator": {"fault_rate": 0.3}, **_SMALL_ADDS["group"]},
        runs={"emulator": {"fault_rate": 0.1}},
    ),
    *_both(
        "drop",
        "connection closed before a full answer, nothing done: {} of requests",
        "drop",
        emulator={"faults": {"drop"}},
        group={"emulator": {"fault_rate": 0.3}, **_SMALL_ADDS["group"]},
        runs={"emulator": {"fault_rate": 0.1}},
    ),
    *_both(
        "slow",
        "answer held 1.5 s after the work is done, past a 0.5 s read timeout: {} of requests",
        "slow",
        emulator={"faults": {"slow"}, "slow_seconds": 1.5},
        engine={"request_timeout": 0.5},
        group={"emulator": {"fault_rate": 0.3}, **_SMALL_ADDS["group"]},
        runs={"emulator": {"fault_rate": 0.05}},
    ),
    *_both(
        "outage",
        "the service down for 8 s from the first add-runs answer on: every request an HTML 503",
        "tap",
        tap=Outage,
        seconds=11.0,
        group=_SMALL_ADDS["group"],
    ),
    *_both(
        "lost-create",
        "runs created, the answer lost as an HTML 502: {} of creates",
        "lost_create",
        emulator={"faults": {"lost_create"}},
        group={
            "emulator": {"fault_rate": 1.0},
            **_SMALL_ADDS["group"],
            "injected": "runs created, the answer lost as an HTML 502: all 3 add-runs calls",
        },
        runs={"emulator": {"fault_rate": 0.3}},
    ),
    *_both(
        "sse-cut",
        "the first 6 SSE streams (group runs and events) cut mid-event",
        "tap",
        tap=CutStreams,
        # Runs mode reads a stream only to find lost creates: lose some, so there are streams to cut.
        runs={
            "emulator": {"faults": {"lost_create"}, "fault_rate": 0.3},
            "injected": "30% of creates lost; the first 6 group listings that look for them cut mid-event",
        },
    ),
    *_both(
        "malformed-json",
        "JSON cut in half: every 2nd add-runs answer (3 adds) and one runs-stream event",
        "tap",
        tap=Malformed,
        group=_SMALL_ADDS["group"],
        runs={"injected": "JSON cut in half: every 2nd create's answer and every 10th result"},
    ),
    *_both(
        "unknown-status",
        "statuses this client does not know: 'paused_for_review' (active), 'errored' (10% of runs fail)",
        "tap",
        tap=UnknownStatus,
        emulator={"failure_rate": 0.1},
        # The result call blocks until a run ends, so runs mode only sees a failed run's status.
        runs={"injected": "a status this client does not know: 'errored' (10% of runs fail)"},
    ),
    *_both(
        "schema-break", "one answer in five has a year in words for an integer field", "tap", tap=BreakSchema
    ),
    *_both("failed-runs", "20% of runs fail", "failed", emulator={"failure_rate": 0.2}),
    *_both(
        "late-commit",
        "30% of creates answered with a gateway's HTML 504 at once and committed 1 s later; horizon 3 s",
        "late",
        emulator={"late_commit_seconds": 1.0, "late_commit_rate": 0.3},
        engine={"commit_horizon": 3.0},
        group=_SMALL_ADDS["group"],
        seconds=4.0,
    ),
    *_both(
        "late-commit-past-horizon",
        "30% of creates answered 504 and committed 1 s later, past the job's horizon of 0.2 s "
        "(runs take 2 s): the rows are sent again, the late runs are duplicates",
        "late",
        emulator={"late_commit_seconds": 1.0, "late_commit_rate": 0.3, "latency": 2.0},
        engine={"commit_horizon": 0.2},
        group=_SMALL_ADDS["group"],
        duplicates=True,
        seconds=5.0,
    ),
    *_both(
        "stream-close",
        "every SSE stream closed 0.3 s after it opened, whatever is active (runs take 1 s)",
        "stream-close",
        emulator={"stream_close_seconds": 0.3, "latency": 1.0},
        seconds=4.0,
    ),
    *_both(
        "quota-burst",
        "",
        "429",
        **_untold(
            "burst",
            "runs: a token bucket of {run_burst} refilled at {run_rate_limit} per {rate_window:g} s "
            "(engine: {run_rate} per {engine_window:g} s)",
        ),
    ),
    *_both(
        "quota-short-window",
        "",
        "429",
        **_untold(
            "short-window",
            "runs: {run_rate_limit} per {rate_window:g} s window "
            "(engine: {run_rate} per a window twice as long)",
        ),
    ),
    *_both(
        "queued-past-timeout",
        "runs stay queued 0.8 s, the job's timeout is 0.3 s (rows pending); then the same call again",
        "pending",
        tap=HoldQueued,
        engine={"timeout": 0.3},
        resume=True,
    ),
]


# -- running a case --------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one case did. Counts are the emulator's (the truth) unless they say otherwise."""

    case: Case
    rows: int = 0
    distinct: int = 0
    correct: int = 0
    completed: int = 0
    failed: int = 0
    flagged: int = 0  # completed rows with a value nulled for breaking its schema
    pending_first: int = 0  # resume cases: rows the first call left pending
    runs_created: int = 0
    duplicate_runs: int = 0
    requests: int = 0
    rate_limited: int = 0
    rate_limited_late: int = 0  # after the first window from the first 429 (while the engine learns)
    counted_duplicates: int = 0  # JobStats.duplicates
    recorded_duplicates: int = 0  # in the checkpoint
    injected: int = 0  # how many times the fault was injected
    reconciled: int = 0
    resubmitted_unknown: int = 0
    seconds: float = 0.0
    error: str | None = None  # the job raised
    problems: list[str] = field(default_factory=list)

    @property
    def extra_runs(self) -> int:
        return self.runs_created - self.distinct

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def passed(self) -> bool:
        return not self.problems


class _QuietCuts(logging.Filter):
    """uvicorn logs a traceback for each stream a tap cuts on purpose; those are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and "mid-event" in str(exc))


@contextlib.contextmanager
def _quiet_cuts() -> Iterator[None]:
    quiet = _QuietCuts()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def companies(rows: int) -> pl.DataFrame:
    """`rows` rows, one in ten a repeat of an earlier row, interleaved."""
    distinct = rows - rows // 10
    names = [f"Company {i}" for i in range(distinct)]
    for j in range(rows - distinct):
        names.insert(10 * j + 5, names[(7 * j) % distinct])
    return pl.DataFrame({"company": names})


def run_case(case: Case, workdir: Path | None = None) -> Result:
    """Run one case end to end over HTTP and check it; never raises for what the job does."""
    result = Result(case)
    df = companies(case.rows or (300 if case.mode == "group" else 100))
    inputs = build_inputs(df)
    result.rows = df.height
    result.distinct = len({json.dumps(i, sort_keys=True) for i in inputs})
    config = EmulatorConfig(latency=0.1, seed=7)
    options = dict(case.emulator)
    if "faults" in options:
        options["faults"] = frozenset(options["faults"])
    emulator = Emulator(config, **options)
    tap = case.tap(emulator.app) if case.tap is not None else None
    if tap is not None:
        emulator.app = tap  # served in place of the app; stats(), state and close() pass through
    stats: list[JobStats] = []
    outs: list[pl.DataFrame] = []
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fault-matrix-")))
        stack.enter_context(_quiet_cuts())
        checkpoint = workdir / f"{case.name}-{case.mode}.enrich"
        started = time.monotonic()
        with emulator:
            kw: dict[str, Any] = {
                "processor": PROCESSOR,
                "mode": case.mode,
                "api_key": emulator.api_key,
                "base_url": emulator.url,
                "checkpoint": checkpoint,
                "progress": False,
                # Unless a case says otherwise, this emulator commits a create at once or never: a lost
                # one is sent again a second after it was sent (the default waits two minutes).
                "commit_horizon": 1.0,
                **case.engine,
            }
            calls = [kw, {k: v for k, v in kw.items() if k != "timeout"}] if case.resume else [kw]
            for call in calls:
                stats.append(JobStats())
                try:
                    outs.append(asyncio.run(_bounded(aenrich(df, OUTPUT, stats=stats[-1], **call))))
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    break
            result.seconds = time.monotonic() - started
        emulated = emulator.stats()
        if (checkpoint / "manifest.json").exists():
            result.recorded_duplicates = Checkpoint.read(checkpoint).counts().duplicates
    result.runs_created = emulated["runs_created"]
    result.duplicate_runs = emulated["duplicate_runs"]
    # A tap's canned answers (an outage's 503s) never reach the emulator: count requests where they arrive.
    result.requests = len(tap.calls) if tap is not None else emulated["requests_total"]
    result.rate_limited = emulated["rate_limited"]
    # The engine learns from the first 429 on: its first window is the one that follows it (a loaded
    # machine may be slow enough not to reach the quota in the service's first window at all).
    window = float(case.emulator.get("rate_window", 60.0))
    learned_by = min(emulated["rate_limited_at"], default=0.0) + window
    result.rate_limited_late = sum(1 for t in emulated["rate_limited_at"] if t > learned_by)
    result.reconciled = sum(s.reconciled for s in stats)
    result.counted_duplicates = sum(s.duplicates for s in stats)
    result.resubmitted_unknown = sum(s.resubmitted_unknown for s in stats)
    result.injected = _injected(case, emulated, tap, outs)
    if case.resume and outs:
        first = outs[0].filter(pl.col("_status") == "pending")
        result.pending_first = first.height
        unclear = first.filter(pl.col("_error").is_null() | (pl.col("_error").str.strip_chars() == ""))
        if unclear.height:
            result.problems.append(f"{unclear.height} rows left pending without a reason")
    if result.error is None and outs:
        _check_rows(result, outs[-1], inputs, emulator, getattr(tap, "broken", set()))
    _judge(result)
    return result


async def _bounded(job: Any) -> Any:
    """The job, stopped (and failed) if it runs past `DEADLINE` seconds: a hang is a finding too."""
    try:
        async with asyncio.timeout(DEADLINE):
            return await job
    except TimeoutError:
        raise TimeoutError(f"the job did not finish within {DEADLINE:g} s") from None


def _injected(case: Case, emulated: dict[str, Any], tap: Tap | None, outs: list[pl.DataFrame]) -> int:
    if case.fault == "429":
        return int(emulated["rate_limited"])
    if case.fault == "late":
        return int(emulated["late_commits"])
    if case.fault == "stream-close":
        return int(emulated["streams_closed_early"])
    if case.fault in emulated["faults"]:
        return int(emulated["faults"][case.fault])
    if case.fault == "tap":
        return int(getattr(tap, "hits", 0))
    if case.fault == "failed":
        return int(emulated["runs_by_status"]["failed"])
    if case.fault == "pending" and outs:
        return outs[0]["_status"].to_list().count("pending")
    return 0


def _check_rows(
    result: Result, out: pl.DataFrame, inputs: list[Any], emulator: Emulator, broken: set[str]
) -> None:
    schema = parse_output(OUTPUT).task_spec()["output_schema"]
    runs = emulator.app.state.runs
    wrong: list[str] = []
    for i, (row, given) in enumerate(zip(out.iter_rows(named=True), inputs, strict=True)):
        status, error, run_id = row["_status"], row["_error"], row["_run_id"]
        run = runs.get(run_id) if run_id else None
        own = run is not None and json.loads(run.body)["input"] == given
        clear = isinstance(error, str) and error.strip() != "" and "\n" not in error
        ok = False
        if status == "completed":
            result.completed += 1
            want = synth_output(given, schema, processor=PROCESSOR)[0]
            if run_id in broken:
                result.flagged += 1
                ok = (
                    own
                    and row["founded"] is None
                    and row["ceo"] == want["ceo"]
                    and clear
                    and "founded" in error
                )
            else:
                ok = own and not run.fails and all(row[f] == want[f] for f in FIELDS) and error is None
        elif status == "failed":
            result.failed += 1
            ok = own and run.fails and clear and all(row[f] is None for f in FIELDS)
        if ok:
            result.correct += 1
        elif len(wrong) < 3:
            wrong.append(f"row {i}: {status} {error!r} run={run_id} own={own}")
    if wrong:
        result.problems.append(f"{result.rows - result.correct} rows wrong, e.g. " + "; ".join(wrong))


def _judge(result: Result) -> None:
    case = result.case
    if result.error is not None:
        result.problems.insert(0, f"the job raised {result.error}")
    elif result.correct != result.rows and not result.problems:
        result.problems.append(f"{result.rows - result.correct} rows wrong")
    if case.duplicates:
        if not result.duplicate_runs:
            result.problems.append("no duplicate was made: the case proves nothing")
        elif (
            result.counted_duplicates != result.duplicate_runs
            or result.recorded_duplicates != result.duplicate_runs
        ):
            result.problems.append(
                f"{result.duplicate_runs} duplicates made, {result.counted_duplicates} counted by the job, "
                f"{result.recorded_duplicates} in its checkpoint"
            )
        elif result.runs_created != result.distinct + result.duplicate_runs:
            result.problems.append(f"{result.runs_created} runs for {result.distinct} distinct inputs")
    elif result.runs_created != result.distinct or result.duplicate_runs:
        result.problems.append(
            f"{result.runs_created} runs for {result.distinct} distinct inputs "
            f"({result.duplicate_runs} duplicates)"
        )
    allowed = max(MAX_429_SHARE * result.requests, MAX_429_FLOOR)
    if result.rate_limited_late > allowed:
        result.problems.append(
            f"{result.rate_limited_late} 429s after the first window, {result.rate_limited} in all, in "
            f"{result.requests} requests: it did not learn the quota"
        )
    if result.rate_limited - result.rate_limited_late > max(
        MAX_429_LEARNING, MAX_429_SHARE * result.requests
    ):
        result.problems.append(
            f"{result.rate_limited - result.rate_limited_late} 429s in the first window: hammering"
        )
    if case.fault != "none" and result.injected == 0:
        result.problems.append("nothing was injected: the case proves nothing")
    if case.resume and result.pending_first == 0:
        result.problems.append("the first call left nothing pending")


# -- the report -------------------------------------------------------------------------------------------


def _row(r: Result) -> str:
    extra = f"{r.extra_runs:+d}" + (f" ({r.duplicate_runs} dup)" if r.duplicate_runs else "")
    verdict = "pass" if r.passed else "**FAIL**: " + "; ".join(r.problems)
    return (
        f"| `{r.case.name}` | {r.case.mode} | {r.case.injected} | {r.injected} | {r.correct}/{r.rows}"
        f" ({r.completed} ok, {r.failed} failed{f', {r.flagged} flagged' if r.flagged else ''}) "
        f"| {extra} | {r.reconciled} / {r.resubmitted_unknown} | {r.rate_limited} ({r.share_429:.1%}) "
        f"| {r.requests} "
        f"| {r.seconds:.1f} s | {verdict} |"
    )


def table(results: list[Result]) -> str:
    head = (
        "| case | mode | injected | times | rows correct | extra runs | found / resent | 429s (share) "
        "| requests | time | verdict |\n|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join([head, *(_row(r) for r in results)])


_INTRO = """\
# Reliability: the fault matrix

Generated by a command that reruns the matrix; do not edit by hand:

    /work/venv/bin/python tests/fault_matrix.py --report docs/reliability.md

`tests/test_reliability.py` asserts the same cases on every test run. {passed} of {total} cases pass; the
matrix took {wall:.0f} s of wall time ({jobs} cases at a time, each in its own process).

Each case runs one job through `aenrich()` against the emulator over real HTTP on 127.0.0.1 (processor
`lite`, runs of 0.05-0.15 s; 300 rows in group mode, 100 in runs mode, one row in ten repeating an
earlier one), with one kind of trouble injected: by the emulator (rate limits, faults, failed runs) or
by a tap in front of it that rewrites, cuts or delays what the client sees while the emulator keeps the
truth. A case passes when:

- the job finishes (a resume case: its second call finishes; each call is stopped after {deadline:g} s);
- every row carries its own answer: its `_run_id` is a run the emulator created from that row's input; a
  completed row holds exactly that input's deterministic answer (`synth_output`); a failed row's run
  really failed and `_error` says why in one line; a value that broke its schema is null and `_error`
  names the field;
- the emulator created exactly one run per distinct input (no extra run, no duplicate), except where a
  case makes duplicates on purpose (a commit later than the job's horizon): then each one is counted by
  the job, recorded in its checkpoint, and no row carries it;
- after the window that follows the first 429 (while the engine learns a quota it was not told),
  429s are at most {share:.0%} of the requests, or {floor}; in the first window at most {learning}
  (a limiter that does not back off sends hundreds);
- the trouble was really injected (a case that injects nothing proves nothing).

Columns: *times* is how often the trouble was injected, counted per request or per run (emulator
faults, 429s, tap rewrites, failed runs, or rows the first call left pending); *rows correct* counts
completed, failed and *flagged* rows (completed with a value nulled for breaking its schema); *extra
runs* is runs created minus distinct inputs; *found / resent* counts rows whose create's answer was
lost: their runs found by reading the group, or (nothing had been created) sent again; *requests*
counts every request the emulator received, 429s included; *time* is wall time, both calls for a
resume case.
"""


def report(results: list[Result], *, wall: float, jobs: int, findings: str = "") -> str:
    """The markdown report: how it was made, the table, then `findings`."""
    intro = _INTRO.format(
        passed=sum(r.passed for r in results),
        total=len(results),
        wall=wall,
        jobs=jobs,
        deadline=DEADLINE,
        share=MAX_429_SHARE,
        floor=MAX_429_FLOOR,
        learning=MAX_429_LEARNING,
    )
    return f"{intro}\n{table(results)}\n\n{findings.strip()}\n"


FINDINGS = """\
## Findings

**Fixed: an add-runs call larger than the service's run quota was retried until the job died.** Group
mode sized every add-runs call by the engine's run budget (up to 1,000 runs). When the service's quota
of runs per window is smaller, such a call can never fit: the client retried it after every 429 (the
emulator's Retry-After is then a whole window) up to 100 times, and the job raised `RateLimitError`
having created nothing. Before the fix, `429-runs[group]` (then a quota of 100 runs a second against
adds of 150) ended that way after 100 s, with 101 429s in 103 requests; without Retry-After the backoff
doubles up to 60 s and `429-both-no-retry-after[group]` had not ended after 150 s. Now `add_runs` takes
`retry_rate_limited=False`, which reports the 429 to the limiter and hands it back (nothing was
created); the engine sends the batch again at the size the limiter learned the service accepts at
once (`RateLimiter.max_runs`: halved when an add is refused with nothing else of ours in the window),
so one or two 429s split the adds until they fit. A call of one run is still retried by the client, so
a quota that refuses everything still ends the job after 100 429s. Guarded by
`test_add_runs_hands_a_429_back_when_asked` and
`test_an_add_larger_than_the_run_quota_is_split_not_retried_forever` (`tests/test_reliability.py`).

**Added: `request_timeout=` on `aenrich()`/`enrich()`** (default 60 s, as before). The slow-answer cases
need a read timeout below the emulator's 1.5-s delay; 60 s could only be reached with minute-long
tests. An answer slower than that is lost like a dropped one: a create is reconciled (`slow[group]`
found all 170 runs of its slow adds), a read is retried.

**Quotas the engine was not told (issue 10).** A 429 no longer halves a pace that recovers on
successes. Every create pauses (Retry-After, or a backoff from a sixtieth of the window), one trial goes
alone, and the first one accepted measures what the service let through: that becomes a learned window,
so after the first window almost no 429 follows (`429-*`, `quota-burst`: a token bucket whose burst is
below one add; `quota-short-window`: a window half the engine's). In the first window the creates in
flight when the first 429 comes bounce too, and without Retry-After the backoff takes a few tries to
reach the end of a window: about 5-15 429s there on these scaled clocks.

**Late commits (issue 10).** `late-commit` answers 30 % of the creates with a gateway's 504 at once and
commits them a second later: the rows are held until the commit horizon (3 s here), their runs adopted
when they appear, nothing sent twice. `late-commit-past-horizon` gives the job a horizon (0.2 s) shorter
than the service's delay: the rows are sent again and the late runs are duplicates, each one counted by
the job (`JobStats.duplicates`), recorded in its checkpoint, and never joined. `stream-close` ends every
stream after 0.3 s with runs active: the events stream is reopened from its last event and the job ends
with its runs.

**Fixed: an outage during submission stopped the job.** `outage` takes the service down for 8 s (every
request an HTML 503), longer than the client's own retries of one request (5 tries, at most 7.5 s of
backoff). Reads of runs and of the group's runs already rode out such an outage (`_Job.patiently`,
retrying for up to 30 minutes, added to the engine while this matrix was being built: before it, 30 %
dropped connections in runs mode had stopped a job this way). But the read that looks for the
runs of a create whose answer was lost did not: an add-runs call met the outage (a 503, so its runs may
or may not exist), the group was read to find out, that read failed 5 times, and the job raised
`ServerError` with 100 of 270 runs created (group mode) or 1 of 90 (runs mode). Nothing was paid twice
and the same call resumed it, but an overnight job stopped on an 8-s blip. Now `_Job.reconcile` reads
through `patiently` like the other reads; both cases finish in under 15 s with every row and no extra
run (`outage` in the table is the regression guard: it fails without the fix). A job whose very first
request (creating its group) meets an outage still stops, having sent nothing.

**Recovery costs seconds, not runs.** Every lost create was settled without paying twice: found by
reading the group when the runs existed (`lost-create`, `slow`, `malformed-json`), sent again when
nothing had been created (`html-5xx`, `drop`). Group-mode fault cases take 1-5 s against 0.3 s for
the baseline: retry backoff, the commit horizon (1 s here) before a lost create that created nothing
is sent again, the collector's fallback poll.
A lost answer to the group's own create (an empty group costs nothing) is retried like a read and can
leave one empty group behind.

**Unknown statuses and broken values are data, not crashes.** Runs reported as `paused_for_review`
with `is_active: true` are waited for; runs that end as `errored` come back failed with the run's own
error message; an integer field answered in words becomes a null cell, the row stays completed and
`_error` names the field (`founded: expected integer, got 'nineteen ninety'`).
"""


def run_all(cases: list[Case], jobs: int = JOBS) -> Iterator[Result]:
    """Run `cases` in `jobs` worker processes (each with its own emulator), yielding results in order.

    The cases mostly wait (on runs, timers and backoff), so a few at once fit on two cores; each keeps
    its own process so that one case's CPU never shares an event loop or a GIL with another's.
    """
    if jobs <= 1:
        yield from map(run_case, cases)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures: dict[int, concurrent.futures.Future[Result]] = {}
        for i in sorted(range(len(cases)), key=lambda i: -cases[i].seconds):  # the long ones first
            futures[i] = pool.submit(run_case, cases[i])
        for i in range(len(cases)):
            yield futures[i].result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="write the markdown report here")
    parser.add_argument("--case", action="append", default=[], help="run only cases whose name has this")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"cases run at once (default {JOBS})")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if not args.case or any(s in c.id for s in args.case)]
    results = []
    started = time.monotonic()
    for result in run_all(chosen, args.jobs):
        case = result.case
        results.append(result)
        print(
            f"{case.id:40} {'pass' if result.passed else 'FAIL'} {result.correct}/{result.rows} "
            f"runs {result.runs_created}/{result.distinct} 429 {result.rate_limited}/{result.requests} "
            f"injected {result.injected} {result.seconds:.1f}s {'; '.join(result.problems)}",
            flush=True,
        )
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        wall = time.monotonic() - started
        args.report.write_text(report(results, wall=wall, jobs=args.jobs, findings=FINDINGS))
        print(f"wrote {args.report}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    # Run as the module `fault_matrix`, so worker processes unpickle its cases and taps by that name.
    import fault_matrix

    raise SystemExit(fault_matrix.main())
