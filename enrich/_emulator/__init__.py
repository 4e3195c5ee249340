"""A local emulator of Parallel's Task API (../shared/task-api.md), strict where the real service is.

It serves the run and group endpoints with the real wire shapes, status codes, limits and SSE framing,
so a client that works against it works against `https://api.parallel.ai`. Outputs are synthetic and
deterministic (`enrich._emulator.synth`); their basis is compact unless `basis_bytes` makes it the size of
real answers (several KB per field). On top of the API it can inject what production does to a client:
failed runs, rate limits (429 + Retry-After), exhausted credit (402), and transport faults (HTML 5xx,
dropped connections, slow answers, and creates whose answer is lost although the runs exist). It can
also be unkind the way real services and their proxies are, each behaviour off by default
(`EmulatorConfig` says how): creates committed seconds after a 504 or a hung-up client
(`late_commit_seconds`), SSE streams closed on the service's own timer (`stream_close_seconds`), a
quota the client was not told, as a token bucket with a small burst (`rate_burst`, `run_burst`), 429s
without Retry-After (`retry_after_header`), and, by default, ids that differ across restarts (`seed`).

Three ways to run it:

    app = create_app(EmulatorConfig(latency=0.05))     # a plain ASGI app
    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emulator")

    with Emulator(latency=0.05) as emu:                  # uvicorn on 127.0.0.1:<free port>, own thread
        httpx.get(emu.url + "/v1/tasks/runs/...", headers={"x-api-key": emu.api_key})

    serve(EmulatorConfig(), port=8787)                   # blocking, for `enrich emulate`

Runs move queued → running → completed|failed on timestamps drawn at creation; state is derived from
the clock (one heap of pending transitions, no timer per run), so a million runs cost memory, not CPU.
Blocking calls (`/result`, the event streams) wait on asyncio timers and futures, never on polling.

`GET /_emulator/stats` (no key needed, never faulted) and `app.stats()` report counters for tests:
requests by route, 429s (and when: seconds after the first request), faults by kind, `late_commits`
(and `late_commits_pending`), `streams_closed_early`, runs and groups created, `duplicate_runs` (runs
created beyond the distinct (input, task_spec, processor) triples) and runs by status. No client may
need it.

Where the sources leave a question open (task-api.md, "Open questions"), the emulator takes the stricter
reading, so a client that passes here also passes there:

- `/result?timeout=` must be an integer in [0, 3600]; anything else is 422 (not a silent clamp).
- 429 carries `Retry-After` (float seconds), never `retry-after-ms` or `x-should-retry`; the windows
  slide; GETs count toward the request limit; an add of N inputs is one request and N runs. Options
  take the other readings: no Retry-After at all, and token buckets whose burst may be below one
  full add.
- A create or add either happens before its answer or not at all, unless `late_commit_seconds` makes
  it land later than a gateway's 504 or a client's hang-up (a retry then makes duplicates).
- No concurrency cap besides credit. `action_required`, `cancelling` and `cancelled` are never produced.
- No task spec means `auto`: JSON with `output_schema` filled on `pro` and above, text below `pro`.
- Group `GET …/runs` lists every run, active ones included, with its current status.
- Group create and add-runs answer 200, single-run create 202; `/v1` and `/v1beta` group paths both work.
- SSE never sends `id:` or `retry:` lines; only the group events stream sends `: keepalive` comments.
  Streams last their documented lifetimes (run events 570 s, group events 1 h) unless
  `stream_close_seconds` ends them sooner, as a proxy may.
- Run, group and ref ids are random per emulator unless `seed` is given, so a restarted emulator does
  not hand out the ids of the last one.
- Errors use ErrorResponse, except the group endpoints' 422 (FastAPI shape), unknown routes
  (`{"detail": "Not Found"}`) and injected 5xx (HTML). Results stay fetchable for the app's lifetime.
- Unknown fields in a TaskRunInput, an empty input string, null metadata values, a body that is not
  `application/json`, and query booleans other than `true`/`false` are all 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import uvicorn

from enrich._emulator.synth import PREMIUM_TIERS, check_basis_bytes, output_of
from enrich._emulator.synth import _canonical as _synth_canonical
from enrich._jsonschema import UNSUPPORTED_KEYWORDS
from enrich._processors import PROCESSORS, Processor

__all__ = [
    "DEMO_API_KEY",
    "FAULT_KINDS",
    "STATS_PATH",
    "Emulator",
    "EmulatorApp",
    "EmulatorConfig",
    "EmulatorState",
    "create_app",
    "serve",
]

#: Every transport/server fault the emulator can inject (see `EmulatorConfig.faults`).
FAULT_KINDS = frozenset({"html_5xx", "drop", "slow", "lost_create"})

#: How a late-committed create is answered (see `EmulatorConfig.late_commit_answer`).
_LATE_ANSWERS = ("gateway", "after")

#: The key `Emulator` hands out when its config names none (any non-empty key is then accepted).
DEMO_API_KEY = "emulator-demo-key"

STATS_PATH = "/_emulator/stats"

_STATUSES = ("queued", "running", "completed", "failed")
_QUEUED, _RUNNING, _COMPLETED, _FAILED = range(4)
_ALL_STATUSES = ("queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled")

# Limits from task-api.md §3 and §6.
_MAX_INPUTS_PER_ADD = 1_000
_MAX_SPEC_CHARS = 15_000
_MAX_SPEC_INPUT_CHARS = 25_000
_MAX_METADATA_KEY = 16
_MAX_METADATA_VALUE = 512
_MAX_NESTING = 5
_MAX_PROPERTIES = 100
_MAX_ENUM_VALUES = 500
_LARGE_ENUM_VALUES = 250  # an enum of more values than this ...
_LARGE_ENUM_CHARS = 7_500  # ... may hold at most this many characters
_MAX_DOMAINS = 200
_MAX_RESULT_TIMEOUT = 3_600  # seconds; docs use 3600, the default is 600
_DEFAULT_RESULT_TIMEOUT = 600
_MAX_GROUP_EVENTS_SECONDS = 3_600.0
_RUN_EVENTS_SECONDS = 570.0
_UNSUPPORTED_KEYWORDS = UNSUPPORTED_KEYWORDS  # the one list, shared with the client-side check
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_RESERVED_FIELDS = frozenset(
    {"citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"}
)
_RUN_INPUT_FIELDS = frozenset(
    {
        "input",
        "processor",
        "task_spec",
        "metadata",
        "source_policy",
        "advanced_settings",
        "enable_events",
        "mcp_servers",
        "webhook",
        "previous_interaction_id",
        "memory_scope_key",
    }
)
_FAILURE_MESSAGES = (
    "Task execution failed: the research step timed out.",
    "Task execution failed: an internal error occurred while processing the task.",
    "Task execution failed: no usable sources could be retrieved.",
)

_MSG_UNAUTHORIZED = "Unauthorized: invalid or missing credentials"
_MSG_FORBIDDEN = "Forbidden: invalid processor in request"
_MSG_PAYMENT = "Payment required: insufficient credit in account"
_MSG_RATE = "Too many requests: quota temporarily exceeded"
_MSG_422 = "Unprocessable content: request validation error"
_MSG_RUN_404 = "Run id not found"
_MSG_RESULT_404 = "Run failed or run id not found"
_MSG_GROUP_404 = "TaskGroup not found"
_MSG_408 = "Request timed out; run still active"

_HTML_5XX = {
    502: b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
    b"</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    503: b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center>"
    b"<h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
    b"</html>\r\n",
    504: b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n<center><h1>504 Gateway "
    b"Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
}

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the emulator behaves. Every default suits a demo; tests turn the knobs they need.

    Times are in seconds, money in US dollars, rates are shares in [0, 1].

    - `api_key`: when set, a request whose `x-api-key` differs gets 401. When None, any non-empty key
      is accepted; a missing key still gets 401.
    - `latency`: the mean duration of a run; each run draws uniformly from [0.5x, 1.5x] and spends the
      first 5-15 % of it queued. None: the processor's documented latency range (`_processors.py`)
      divided by 60, so minutes become seconds.
    - `failure_rate`: share of runs that end `failed` with an ErrorObject. Drawn per run, not per
      input: resubmitting a failed input may succeed.
    - `fault_rate`: share of requests hit by one of the `faults` kinds:
      `html_5xx` (502/503 with an HTML body, nothing done), `drop` (the connection closes before a full
      answer, nothing done), `slow` (the request is carried out, then the answer waits
      `slow_seconds`, long enough for a client read timeout), `lost_create` (a create-run or add-runs
      request is carried out, the runs exist, but the answer is a 502 HTML page).
    - `rate_limit`: requests per `rate_window` per key, sliding window (GETs count unless
      `count_gets=False`); `run_rate_limit`: runs created per window per key (an add of N inputs
      counts N). Over either: 429 with `Retry-After` (seconds, a float) unless
      `retry_after_header=False`. A 429'd request does nothing and is not counted. The default,
      2,000 a minute, is the documented production limit; None disables the limit.
    - `rate_burst`, `run_burst`: when set, that budget is a token bucket instead of a sliding window:
      it holds at most this many tokens, starts full and refills at `rate_limit` (or
      `run_rate_limit`) per `rate_window`, i.e. limit/rate_window tokens a second. This is a quota
      the client is not told: with `run_burst=500`, an add of 1,000 runs gets 429 every time (its
      Retry-After is a full window) while adds of 500 pass. Retry-After is the time until enough
      tokens exist. Each needs its limit set; None (the default): the sliding window.
    - `credit`: dollars. Each created run reserves its processor's price; a create or add that would
      go over it gets 402 and creates nothing. None: unlimited.
    - `late_commit_seconds`, `late_commit_rate`, `late_commit_answer`: when `late_commit_seconds > 0`,
      a `late_commit_rate` share of run-creating requests (`POST /v1/tasks/runs`, `POST .../groups/
      {id}/runs`) is validated and admitted (rate limit, credit) on arrival, but its runs are created
      `late_commit_seconds` later by a task of the emulator's own, which does not depend on the
      client's connection: the commit lands even when the client has gone away. Nothing of those
      runs is visible (run ids, group counts, runs and events streams) before the commit.
      `late_commit_answer="gateway"` (the default) answers the client at once with an HTML
      504 Gateway Time-out, as a proxy in front of a slow service does; `"after"` answers normally
      once the commit happened, with the ids it created. Defaults: 0.0 (off), 1.0, "gateway".
    - `stream_close_seconds`: every SSE stream (run events, group runs, group events) ends after this
      many seconds, whatever is still active, with a clean end of the body, as a proxy's idle or
      lifetime timeout does. None (the default): only the documented lifetimes (570 s, 1 h).
    - `seed`: None (the default) draws run, group and ref ids from a fresh random source, so ids
      differ across restarts as the service's do; every other draw (durations, failures, faults,
      late commits) is then seeded as if `seed=0`. An int seeds everything, ids included, so two
      emulators with one seed hand out the same ids. Outputs never depend on the seed.
    - `keepalive_seconds`: interval of `: keepalive` comments on the long group events stream.
    - `basis_bytes`: the size of answers. None (the default): a compact basis per field (one to three
      citations with one-line excerpts, a one-line reasoning), a few hundred bytes. An int in
      [512, 1,000,000]: each basis entry (each top-level field, or the text output's one) is about that
      many bytes of compact UTF-8 JSON (a few % under; up to 15 % under at small sizes with long
      names), as real core/pro answers are (several KB): several citations with distinct plausible
      https URLs and titles derived from the input, excerpt passages of varied length, and a
      reasoning paragraph. `lite`/`base` keep their rule of no
      excerpts and no confidence: their size comes from more citations and a longer reasoning. The
      content is the same either way, and the bytes depend only on (input, task spec, processor tier,
      basis_bytes), like every output (`enrich._emulator.synth.expected_output(..., basis_bytes=N)`).
    """

    api_key: str | None = None
    latency: float | None = None
    failure_rate: float = 0.0
    fault_rate: float = 0.0
    faults: frozenset[str] = FAULT_KINDS
    slow_seconds: float = 20.0
    rate_limit: int | None = 2_000
    run_rate_limit: int | None = None
    rate_window: float = 60.0
    rate_burst: int | None = None
    run_burst: int | None = None
    retry_after_header: bool = True
    count_gets: bool = True
    credit: float | None = None
    late_commit_seconds: float = 0.0
    late_commit_rate: float = 1.0
    late_commit_answer: str = "gateway"
    stream_close_seconds: float | None = None
    seed: int | None = None
    keepalive_seconds: float = 15.0
    basis_bytes: int | None = None

    def __post_init__(self) -> None:
        check_basis_bytes(self.basis_bytes)
        for name in ("failure_rate", "fault_rate", "late_commit_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        object.__setattr__(self, "faults", frozenset(self.faults))
        unknown = self.faults - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(FAULT_KINDS)}")
        if self.latency is not None and self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency!r}")
        for name in ("rate_limit", "run_rate_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
        for name, limit in (("rate_burst", "rate_limit"), ("run_burst", "run_rate_limit")):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
            if getattr(self, limit) is None:
                raise ValueError(f"{name} needs {limit}: it sets the refill rate of the bucket")
        for name in ("rate_window", "keepalive_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.late_commit_seconds < 0:
            raise ValueError(f"late_commit_seconds must be >= 0, got {self.late_commit_seconds!r}")
        if self.late_commit_answer not in _LATE_ANSWERS:
            known = " or ".join(_LATE_ANSWERS)
            raise ValueError(f"late_commit_answer must be {known}, got {self.late_commit_answer!r}")
        if self.stream_close_seconds is not None and self.stream_close_seconds <= 0:
            raise ValueError(f"stream_close_seconds must be > 0 or None, got {self.stream_close_seconds!r}")
        if self.slow_seconds < 0:
            raise ValueError("slow_seconds must be >= 0")
        if self.credit is not None and self.credit < 0:
            raise ValueError("credit must be >= 0 or None")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty or None")


def _draw_seed(config: EmulatorConfig) -> int:
    """The seed of the draws that are not ids (durations, failures, faults): 0 when none is given."""
    return 0 if config.seed is None else config.seed


def _id_source(config: EmulatorConfig, name: str) -> random.Random:
    """Where ids come from: seeded when the config names a seed, else fresh for every emulator.

    Unseeded ids matter: a restarted emulator that handed out the ids of the last one would let a
    resumed client read another job's runs as its own.
    """
    if config.seed is None:
        return random.Random(os.urandom(32))
    return random.Random(f"{config.seed}:{name}")


# --------------------------------------------------------------------------------------------------
# State: runs, groups, the transition heap


class _Spec:
    """One distinct task spec (or none), shared by every run that uses it."""

    __slots__ = ("canonical", "errors", "kind", "output", "processor_warnings", "size", "spec", "warnings")

    def __init__(self, spec: dict[str, Any] | None, canonical: str) -> None:
        self.spec = spec
        self.canonical = canonical
        self.size = len(canonical) if spec is not None else 0
        self.kind = "none"
        self.errors: list[dict[str, Any]] = []  # locs relative to the spec
        self.warnings: list[dict[str, Any]] = []
        # Computed once per spec rather than per run (a job answers many runs of one spec):
        self.output: tuple[Any, str] | None = None  # (output_schema, its canonical JSON) for `output_of`
        self.processor_warnings: dict[str, list[dict[str, Any]]] = {}  # by processor


class _Run:
    __slots__ = (
        "body",
        "created",
        "end",
        "error_ref",
        "events",
        "fails",
        "group",
        "index",
        "metadata",
        "processor",
        "run_id",
        "seq",
        "spec",
        "start",
        "state",
        "warnings",
    )

    def __init__(self) -> None:
        self.state = _QUEUED


class _Group:
    __slots__ = (
        "cached_status",
        "counts",
        "created",
        "events",
        "group_id",
        "metadata",
        "modified",
        "runs",
        "waiters",
    )

    def __init__(self, group_id: str, metadata: dict[str, Any] | None, created: float) -> None:
        self.group_id = group_id
        self.metadata = metadata
        self.created = created
        self.modified = created
        self.runs: list[_Run] = []
        self.counts = [0, 0, 0, 0]
        # The group event log, in the order things happened: a _Run (it went non-active) or a dict
        # (a task_group_status snapshot). Event ids are positions in this list.
        self.events: list[_Run | dict[str, Any]] = []
        self.waiters: set[asyncio.Future[str]] = set()
        self.cached_status: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.counts[_QUEUED] + self.counts[_RUNNING] > 0

    def notify(self) -> None:
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_result("wake")


@dataclass(slots=True)
class _Prepared:
    """A validated TaskRunInput, ready to become a run."""

    body: str  # compact JSON of the input without task_spec and metadata
    input: Any
    metadata: str | None  # compact JSON: a str costs far less memory than a dict per run
    spec: _Spec
    processor: Processor
    events: bool
    warnings: list[dict[str, Any]] | None
    dedup: bytes


class EmulatorState:
    """Everything the emulator holds: runs, groups, credit, and the clock-driven state machine.

    Runs change state lazily: `advance()` pops every transition that is due from one heap (at most one
    pending entry per active run) and updates status counts and group event logs. Every request calls
    it first, so answers always reflect the clock.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.runs: dict[str, _Run] = {}
        self.groups: dict[str, _Group] = {}
        self.status_counts = [0, 0, 0, 0]
        self.distinct: dict[bytes, int] = {}
        self.max_per_distinct = 0
        self.spent_micro = 0
        self.credit_micro = None if config.credit is None else round(config.credit * 1_000_000)
        self._heap: list[tuple[float, int, _Run]] = []
        self._seq = 0
        self._rng = random.Random(f"{_draw_seed(config)}:runs")
        self._ids = _id_source(config, "ids")
        self._specs: dict[str, _Spec] = {}
        self._wall_offset = time.time() - time.monotonic()

    # -- time and ids

    @staticmethod
    def now() -> float:
        """The emulator clock (monotonic seconds); timestamps on the wire are derived from it."""
        return time.monotonic()

    def timestamp(self, t: float) -> str:
        """RFC 3339 UTC with microseconds and a `Z`, e.g. `2025-04-23T20:21:48.037943Z`."""
        # isoformat() ends in "+00:00" for UTC: the strftime("%Y-%m-%dT%H:%M:%S.%fZ") spelling, but faster.
        return (
            datetime.fromtimestamp(t + self._wall_offset, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
        )

    def new_hex(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def new_ref(self) -> str:
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))

    # -- specs

    def spec(self, task_spec: Any) -> _Spec:
        """The shared, validated record of `task_spec` (a dict or None)."""
        canonical = _canonical(task_spec) if task_spec is not None else ""
        found = self._specs.get(canonical)
        if found is None:
            found = _Spec(task_spec, canonical)
            _check_task_spec(task_spec, found)
            self._specs[canonical] = found
        return found

    # -- credit

    def can_afford(self, items: list[_Prepared]) -> bool:
        if self.credit_micro is None:
            return True
        return self.spent_micro + _cost_micro(items) <= self.credit_micro

    def reserve(self, items: list[_Prepared]) -> int:
        """Reserve the credit of runs to be created later (a late commit); returns the amount."""
        if self.credit_micro is None:
            return 0
        cost = _cost_micro(items)
        self.spent_micro += cost
        return cost

    def release(self, micro: int) -> None:
        """Give back a reservation whose runs will never be created."""
        self.spent_micro -= micro

    # -- runs

    def create_runs(
        self, items: list[_Prepared], group: _Group | None, *, reserved: bool = False
    ) -> list[_Run]:
        """Create one run per prepared input (in order), reserving credit and scheduling transitions.

        `reserved`: the credit was reserved already, on the request's arrival (a late commit).
        """
        self.advance()
        now = self.now()
        cfg = self.config
        rng = self._rng
        created = []
        for item in items:
            run = _Run()
            self._seq += 1
            run.seq = self._seq
            run.run_id = "trun_" + self.new_hex()
            run.body = item.body
            run.metadata = item.metadata
            run.spec = item.spec
            run.processor = item.processor.name
            run.events = item.events
            run.warnings = item.warnings
            run.group = group
            run.created = now
            # Four draws per run, always, so one run's outcome never shifts another's.
            if cfg.latency is None:
                lo, hi = item.processor.latency
                duration = rng.uniform(lo / 60.0, hi / 60.0)
            else:
                duration = cfg.latency * rng.uniform(0.5, 1.5)
            queued = duration * rng.uniform(0.05, 0.15)
            fails = rng.random() < cfg.failure_rate
            fail_at = rng.uniform(0.2, 1.0)
            run.start = now + queued
            run.fails = fails
            run.end = run.start + (duration - queued) * (fail_at if fails else 1.0)
            run.error_ref = self.new_ref() if fails else None
            if group is not None:
                run.index = len(group.runs)
                group.runs.append(run)
                group.counts[_QUEUED] += 1
            else:
                run.index = -1
            self.runs[run.run_id] = run
            self.status_counts[_QUEUED] += 1
            heapq.heappush(self._heap, (run.start, run.seq, run))
            n = self.distinct.get(item.dedup, 0) + 1
            self.distinct[item.dedup] = n
            self.max_per_distinct = max(self.max_per_distinct, n)
            if self.credit_micro is not None and not reserved:
                self.spent_micro += round(item.processor.price_per_1k * 1_000)
            created.append(run)
        if group is not None and created:
            group.modified = now
            group.events.append(self.group_status(group))
            group.notify()
        return created

    def advance(self) -> None:
        """Apply every state transition that is due by now."""
        now = self.now()
        heap = self._heap
        changed: set[_Group] = set()
        while heap and heap[0][0] <= now:
            t, seq, run = heapq.heappop(heap)
            group = run.group
            if run.state == _QUEUED:
                run.state = _RUNNING
                self.status_counts[_QUEUED] -= 1
                self.status_counts[_RUNNING] += 1
                if group is not None:
                    group.counts[_QUEUED] -= 1
                    group.counts[_RUNNING] += 1
                    group.modified = t
                heapq.heappush(heap, (run.end, seq, run))
                continue
            final = _FAILED if run.fails else _COMPLETED
            run.state = final
            self.status_counts[_RUNNING] -= 1
            self.status_counts[final] += 1
            if group is not None:
                group.counts[_RUNNING] -= 1
                group.counts[final] += 1
                group.modified = t
                group.events.append(run)
                if not group.active:
                    group.events.append(self.group_status(group))
                changed.add(group)
        for group in changed:
            group.notify()

    def next_transition(self) -> float | None:
        """When the next pending transition is due (monotonic seconds), or None."""
        return self._heap[0][0] if self._heap else None

    def create_group(self, metadata: dict[str, Any] | None) -> _Group:
        group = _Group("tgrp_" + self.new_hex(), metadata, self.now())
        self.groups[group.group_id] = group
        return group

    # -- wire shapes

    def group_status(self, group: _Group) -> dict[str, Any]:
        counts = {_STATUSES[i]: n for i, n in enumerate(group.counts) if n}
        status = {
            "num_task_runs": len(group.runs),
            "task_run_status_counts": counts,
            "is_active": group.active,
            "status_message": None,
            "modified_at": self.timestamp(group.modified),
        }
        group.cached_status = status
        return status

    def group_json(self, group: _Group) -> dict[str, Any]:
        return {
            "taskgroup_id": group.group_id,
            "metadata": group.metadata,
            "status": self.group_status(group),
            "created_at": self.timestamp(group.created),
        }

    def run_json(self, run: _Run) -> dict[str, Any]:
        state = run.state
        changed = run.created if state == _QUEUED else run.start if state == _RUNNING else run.end
        warnings = run.spec.warnings + _processor_warnings(run.spec, run.processor) + (run.warnings or [])
        return {
            "run_id": run.run_id,
            "interaction_id": run.run_id,
            "status": _STATUSES[state],
            "is_active": state < _COMPLETED,
            "processor": run.processor,
            "metadata": json.loads(run.metadata) if run.metadata is not None else None,
            "taskgroup_id": run.group.group_id if run.group is not None else None,
            "created_at": self.timestamp(run.created),
            "modified_at": self.timestamp(changed),
            "warnings": warnings or None,
            "error": self.run_error(run) if state == _FAILED else None,
        }

    def run_error(self, run: _Run) -> dict[str, Any]:
        message = _FAILURE_MESSAGES[run.seq % len(_FAILURE_MESSAGES)]
        return {"ref_id": run.error_ref, "message": message, "detail": None}

    def run_input(self, run: _Run) -> dict[str, Any]:
        """The TaskRunInput the run was created from, with the task spec that applied to it."""
        body = json.loads(run.body)
        if run.metadata is not None:
            body["metadata"] = json.loads(run.metadata)
        if run.spec.spec is not None:
            body["task_spec"] = run.spec.spec
        return body

    def run_output(self, run: _Run) -> dict[str, Any]:
        # `build_output(input, spec.spec, processor)`, with the spec's part of the work done once per spec.
        spec = run.spec
        cached = spec.output
        if cached is None:
            schema = spec.spec.get("output_schema") if spec.spec else None
            cached = spec.output = (schema, _synth_canonical(schema))
        return output_of(
            json.loads(run.body)["input"], cached[0], cached[1], run.processor, self.config.basis_bytes
        )

    def stats(self) -> dict[str, Any]:
        self.advance()
        created = self._seq
        return {
            "runs_created": created,
            "groups_created": len(self.groups),
            "distinct_runs": len(self.distinct),
            "duplicate_runs": created - len(self.distinct),
            "max_runs_per_distinct": self.max_per_distinct,
            "runs_by_status": dict(zip(_STATUSES, self.status_counts, strict=True)),
            "active_runs": self.status_counts[_QUEUED] + self.status_counts[_RUNNING],
            "credit_spent": self.spent_micro / 1_000_000,
            "credit_remaining": None
            if self.credit_micro is None
            else (self.credit_micro - self.spent_micro) / 1_000_000,
        }


def _cost_micro(items: list[_Prepared]) -> int:
    return sum(round(p.processor.price_per_1k * 1_000) for p in items)


def _processor_warnings(spec: _Spec, processor: str) -> list[dict[str, Any]]:
    """The warnings `processor` gives for `spec`, cached per spec (callers copy it, never mutate it)."""
    found = spec.processor_warnings.get(processor)
    if found is None:
        found = spec.processor_warnings[processor] = _new_processor_warnings(spec, processor)
    return found


def _new_processor_warnings(spec: _Spec, processor: str) -> list[dict[str, Any]]:
    if spec.kind != "json" or spec.spec is None:
        return []
    props = spec.spec["output_schema"]["json_schema"].get("properties") or {}
    limit = PROCESSORS[processor].max_fields
    if len(props) <= limit:
        return []
    return [
        {
            "type": "warning",
            "message": f"The output schema has {len(props)} fields; processor {processor!r} handles about "
            f"{limit} well. Consider a higher processor or fewer fields.",
            "detail": {"num_fields": len(props), "recommended_max": limit},
        }
    ]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _compact(value: Any) -> str:
    # `json.dumps(value, separators=(",", ":"), ensure_ascii=False)` without building an encoder per call.
    return _COMPACT.encode(value)


# --------------------------------------------------------------------------------------------------
# Validation. Errors are FastAPI-style dicts {loc, msg, type}; the run endpoints wrap them in an
# ErrorResponse, the group endpoints answer them as {"detail": [...]}.

_Loc = tuple[str | int, ...]


class _Errors(list[dict[str, Any]]):
    def add(self, loc: _Loc, msg: str, kind: str) -> None:
        self.append({"loc": list(loc), "msg": msg, "type": kind})


def _check_str(obj: Mapping[str, Any], key: str, loc: _Loc, errs: _Errors, *, required: bool = False) -> None:
    if key not in obj:
        if required:
            errs.add((*loc, key), "Field required", "missing")
        return
    value = obj[key]
    if value is None and not required:
        return
    if not isinstance(value, str):
        errs.add((*loc, key), "Input should be a valid string", "string_type")


def _check_str_list(value: Any, loc: _Loc, errs: _Errors) -> int:
    if not isinstance(value, list):
        errs.add(loc, "Input should be a valid list", "list_type")
        return 0
    for i, item in enumerate(value):
        if not isinstance(item, str):
            errs.add((*loc, i), "Input should be a valid string", "string_type")
    return len(value)


def _check_extra(
    obj: Mapping[str, Any], allowed: frozenset[str] | set[str], loc: _Loc, errs: _Errors
) -> None:
    for key in obj:
        if key not in allowed:
            errs.add((*loc, key), "Extra inputs are not permitted", "extra_forbidden")


def _check_object(value: Any, loc: _Loc, errs: _Errors) -> bool:
    if not isinstance(value, dict):
        errs.add(loc, "Input should be a valid dictionary or object", "dict_type")
        return False
    return True


def _check_metadata(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    for key, item in value.items():
        if len(key) > _MAX_METADATA_KEY:
            errs.add(
                (*loc, key),
                f"Metadata keys must be at most {_MAX_METADATA_KEY} characters",
                "string_too_long",
            )
        if isinstance(item, str):
            if len(item) > _MAX_METADATA_VALUE:
                errs.add(
                    (*loc, key),
                    f"Metadata values must be at most {_MAX_METADATA_VALUE} characters",
                    "string_too_long",
                )
        elif not isinstance(item, bool | int | float):
            errs.add((*loc, key), "Metadata values must be a string, number or boolean", "scalar_type")


def _check_source_policy(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"include_domains", "exclude_domains", "after_date"}, loc, errs)
    total = 0
    for key in ("include_domains", "exclude_domains"):
        if key in value:
            total += _check_str_list(value[key], (*loc, key), errs)
    if total > _MAX_DOMAINS:
        errs.add(loc, f"At most {_MAX_DOMAINS} domain entries are allowed in total", "too_long")
    after = value.get("after_date")
    if after is not None:
        try:
            if not isinstance(after, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", after):
                raise ValueError
            date.fromisoformat(after)
        except ValueError:
            errs.add(
                (*loc, "after_date"),
                "Input should be a valid date in the format YYYY-MM-DD",
                "date_from_datetime_parsing",
            )


def _check_advanced(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"location", "data_sources"}, loc, errs)
    _check_str(value, "location", loc, errs)
    sources = value.get("data_sources")
    if sources is not None and _check_object(sources, (*loc, "data_sources"), errs):
        _check_extra(sources, {"free", "pay_per_use"}, (*loc, "data_sources"), errs)
        for key in ("free", "pay_per_use"):
            if key in sources:
                _check_str_list(sources[key], (*loc, "data_sources", key), errs)


def _check_mcp_servers(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        errs.add(loc, "Input should be a valid list", "list_type")
        return
    for i, server in enumerate(value):
        sloc = (*loc, i)
        if not _check_object(server, sloc, errs):
            continue
        _check_extra(server, {"name", "url", "type", "headers", "allowed_tools"}, sloc, errs)
        _check_str(server, "name", sloc, errs, required=True)
        _check_str(server, "url", sloc, errs, required=True)
        if "type" in server and server["type"] != "url":
            errs.add((*sloc, "type"), "Input should be 'url'", "literal_error")
        headers = server.get("headers")
        if headers is not None and _check_object(headers, (*sloc, "headers"), errs):
            for key, item in headers.items():
                if not isinstance(item, str):
                    errs.add((*sloc, "headers", key), "Input should be a valid string", "string_type")
        if server.get("allowed_tools") is not None:
            _check_str_list(server["allowed_tools"], (*sloc, "allowed_tools"), errs)


def _check_webhook(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"url", "event_types"}, loc, errs)
    _check_str(value, "url", loc, errs, required=True)
    if "event_types" in value:
        kinds = value["event_types"]
        if not isinstance(kinds, list):
            errs.add((*loc, "event_types"), "Input should be a valid list", "list_type")
        else:
            for i, kind in enumerate(kinds):
                if kind != "task_run.status":
                    errs.add((*loc, "event_types", i), "Input should be 'task_run.status'", "literal_error")


def _check_schema_wrapper(value: Any, loc: _Loc, errs: _Errors, *, output: bool) -> str:
    """Check an output_schema/input_schema spelling; return its kind ("json", "text", "auto", "")."""
    if isinstance(value, str):
        if not value.strip():
            errs.add(loc, "A schema description must not be empty", "string_too_short")
            return ""
        return "text"
    if not _check_object(value, loc, errs):
        return ""
    kind = value.get("type")
    if kind is None:
        kind = "json" if "json_schema" in value else "text" if "description" in value else None
    if kind == "json":
        _check_extra(value, {"type", "json_schema"}, loc, errs)
        if "json_schema" not in value:
            errs.add((*loc, "json_schema"), "Field required", "missing")
            return ""
        if not _check_object(value["json_schema"], (*loc, "json_schema"), errs):
            return ""
        return "json"
    if kind == "text":
        _check_extra(value, {"type", "description"}, loc, errs)
        _check_str(value, "description", loc, errs)
        return "text"
    if kind == "auto" and output:
        _check_extra(value, {"type"}, loc, errs)
        return "auto"
    allowed = "'json', 'text' or 'auto'" if output else "'json' or 'text'"
    errs.add((*loc, "type"), f"Input should be {allowed}", "literal_error")
    return ""


def _check_task_spec(task_spec: Any, rec: _Spec) -> None:
    """Validate a task spec into `rec` (errors with locs relative to the spec, warnings, kind)."""
    errs = _Errors()
    rec.errors = errs
    if task_spec is None:
        return
    if not _check_object(task_spec, (), errs):
        return
    _check_extra(task_spec, {"output_schema", "input_schema"}, (), errs)
    if "output_schema" not in task_spec:
        errs.add(("output_schema",), "Field required", "missing")
        return
    kind = _check_schema_wrapper(task_spec["output_schema"], ("output_schema",), errs, output=True)
    rec.kind = kind or "none"
    if task_spec.get("input_schema") is not None:
        _check_schema_wrapper(task_spec["input_schema"], ("input_schema",), errs, output=False)
    if kind == "json" and not errs:
        rec.warnings = _check_json_schema(task_spec["output_schema"]["json_schema"], errs)
    if rec.size > _MAX_SPEC_CHARS:
        errs.add(
            (), f"The task spec is {rec.size} characters; at most {_MAX_SPEC_CHARS} are allowed", "too_long"
        )


def _check_json_schema(root: dict[str, Any], errs: _Errors) -> list[dict[str, Any]]:
    """Enforce the output json_schema rules of task-api.md §3; return the spec warnings."""
    loc: _Loc = ("output_schema", "json_schema")
    if "anyOf" in root or "oneOf" in root:
        errs.add(loc, "anyOf/oneOf is not allowed at the root of an output schema", "value_error")
    if root.get("type") != "object":
        errs.add((*loc, "type"), "The root of an output schema must have type 'object'", "value_error")
    props = root.get("properties")
    if not isinstance(props, dict) or not props:
        errs.add((*loc, "properties"), "The root of an output schema must define properties", "value_error")
    totals = {"properties": 0, "enum": 0, "depth_error": False}
    no_required: list[str] = []
    open_objects: list[str] = []
    reserved: list[str] = []

    def resolve(ref: str) -> Any:
        if not ref.startswith("#/"):
            return None
        target: Any = root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target

    def walk(node: Any, path: str, depth: int, refs: tuple[str, ...], is_property: bool) -> None:
        # `depth` is the nesting level of the enclosing container. Objects and arrays each open a level
        # and the root object is level 1 (the stricter reading of "nesting <= 5 levels"); $refs are
        # followed, so a referenced object counts where it is used.
        if len(refs) > 32:
            return
        if not isinstance(node, dict):
            errs.add((*loc,), f"{path}: a schema must be an object", "value_error")
            return
        for key in node:
            if key in _UNSUPPORTED_KEYWORDS:
                errs.add((*loc,), f"{path}: unsupported keyword {key!r}", "value_error")
        ref = node.get("$ref")
        if ref is not None:
            target = resolve(ref) if isinstance(ref, str) else None
            if target is None:
                errs.add((*loc,), f"{path}: cannot resolve $ref {ref!r}", "value_error")
            elif ref in refs:
                errs.add((*loc,), f"{path}: recursive $ref {ref!r} is not supported", "value_error")
            else:
                walk(target, path, depth, (*refs, ref), is_property)
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [] if kind is None else [kind]
        if kind is not None:
            if not kinds or any(not isinstance(k, str) or k not in _JSON_TYPES for k in kinds):
                errs.add((*loc,), f"{path}: invalid type {kind!r}", "value_error")
            elif is_property and all(k == "null" for k in kinds):
                errs.add((*loc,), f"{path}: a standalone 'null' type is not supported", "value_error")
        container = "properties" in node or "items" in node or "object" in kinds or "array" in kinds
        level = depth + 1 if container else depth
        if level > _MAX_NESTING:
            if not totals["depth_error"]:
                totals["depth_error"] = True
                errs.add((*loc,), f"{path}: nested deeper than {_MAX_NESTING} levels", "value_error")
            return
        if "enum" in node:
            enum = node["enum"]
            if not isinstance(enum, list) or not enum:
                errs.add((*loc,), f"{path}: enum must be a non-empty list", "value_error")
            else:
                totals["enum"] += len(enum)
                chars = sum(len(v) if isinstance(v, str) else len(_compact(v)) for v in enum)
                if len(enum) > _LARGE_ENUM_VALUES and chars > _LARGE_ENUM_CHARS:
                    errs.add(
                        (*loc,),
                        f"{path}: an enum of more than {_LARGE_ENUM_VALUES} values may hold at most "
                        f"{_LARGE_ENUM_CHARS} characters; this one holds {chars}",
                        "value_error",
                    )
        properties = node.get("properties")
        if properties is not None:
            if not isinstance(properties, dict):
                errs.add((*loc,), f"{path}: properties must be an object", "value_error")
            else:
                totals["properties"] += len(properties)
                required = node.get("required")
                if not isinstance(required, list) or set(properties) - set(required):
                    no_required.append(path)
                if node.get("additionalProperties") is not False:
                    open_objects.append(path)
                for name, sub in properties.items():
                    if name in _RESERVED_FIELDS:
                        reserved.append(f"{path}.{name}")
                    walk(sub, f"{path}.{name}", level, refs, True)
        items = node.get("items")
        if items is not None:
            if isinstance(items, list):
                errs.add((*loc,), f"{path}: tuple-style items are not supported", "value_error")
            else:
                walk(items, f"{path}[]", level, refs, False)
        for key in ("anyOf", "oneOf", "allOf"):
            options = node.get(key)
            if options is not None:
                if not isinstance(options, list) or not options:
                    errs.add((*loc,), f"{path}: {key} must be a non-empty list", "value_error")
                else:
                    for i, option in enumerate(options):
                        walk(option, f"{path}.{key}[{i}]", depth, refs, False)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}.additionalProperties", level, refs, False)

    walk(root, "$", 0, (), False)
    if totals["properties"] > _MAX_PROPERTIES:
        errs.add(
            loc,
            f"The output schema has {totals['properties']} properties; at most {_MAX_PROPERTIES}",
            "value_error",
        )
    if totals["enum"] > _MAX_ENUM_VALUES:
        errs.add(
            loc,
            f"The output schema has {totals['enum']} enum values; at most {_MAX_ENUM_VALUES}",
            "value_error",
        )
    warnings = []
    if no_required:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Every field of an output schema object should be listed in 'required'.",
                "detail": {"paths": no_required[:20]},
            }
        )
    if open_objects:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Every object in an output schema should set 'additionalProperties': false.",
                "detail": {"paths": open_objects[:20]},
            }
        )
    if reserved:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Output field names that collide with basis fields may be ignored: "
                + ", ".join(sorted(_RESERVED_FIELDS)),
                "detail": {"paths": reserved[:20]},
            }
        )
    return warnings


def _input_warnings(value: Any, spec: _Spec) -> list[dict[str, Any]] | None:
    task_spec = spec.spec
    if not task_spec or not isinstance(task_spec.get("input_schema"), dict):
        return None
    schema = task_spec["input_schema"].get("json_schema")
    if not isinstance(schema, dict):
        return None
    if not isinstance(value, dict):
        return [
            {"type": "input_validation_warning", "message": "The input is not an object.", "detail": None}
        ]
    required = schema.get("required")
    missing = [k for k in required if k not in value] if isinstance(required, list) else []
    if missing:
        return [
            {
                "type": "input_validation_warning",
                "message": "The input lacks fields its input schema requires.",
                "detail": {"missing": missing},
            }
        ]
    return None


# --------------------------------------------------------------------------------------------------
# Rate limiting


class _Window:
    """A sliding-window counter: at most `limit` units in any `window` seconds."""

    __slots__ = ("events", "limit", "total", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def wait_time(self, now: float, n: int) -> float:
        """0 when `n` more units fit now, else the seconds until they will."""
        events = self.events
        while events and events[0][0] <= now - self.window:
            self.total -= events.popleft()[1]
        if self.total + n <= self.limit:
            return 0.0
        if n > self.limit:
            return self.window
        need = self.total + n - self.limit
        freed = 0
        for t, k in events:
            freed += k
            if freed >= need:
                return max(t + self.window - now, 0.001)
        return self.window

    def add(self, now: float, n: int) -> None:
        self.events.append((now, n))
        self.total += n

    def undo_last(self) -> None:
        self.total -= self.events.pop()[1]

    def __repr__(self) -> str:
        return f"<_Window {self.total}/{self.limit} per {self.window}s>"


class _Bucket:
    """A token bucket: at most `capacity` units at once, refilled at `limit` units per `window` seconds.

    It starts full. Unlike `_Window`, its burst can be smaller than its rate: a request of more units
    than the capacity never fits, however long the client waits.
    """

    __slots__ = ("capacity", "last", "last_n", "rate", "tokens", "window")

    def __init__(self, limit: int, window: float, capacity: int) -> None:
        self.capacity = capacity
        self.window = window
        self.rate = limit / window  # units per second
        self.tokens = float(capacity)
        self.last: float | None = None
        self.last_n = 0

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now

    def wait_time(self, now: float, n: int) -> float:
        """0 when `n` more units fit now, else the seconds until they will (a window when they never do)."""
        self._refill(now)
        if self.tokens >= n:
            return 0.0
        if n > self.capacity:
            return self.window
        return max((n - self.tokens) / self.rate, 0.001)

    def add(self, now: float, n: int) -> None:
        self._refill(now)
        self.tokens -= n
        self.last_n = n

    def undo_last(self) -> None:
        self.tokens = min(self.capacity, self.tokens + self.last_n)
        self.last_n = 0

    def __repr__(self) -> str:
        return f"<_Bucket {self.tokens:.1f}/{self.capacity} +{self.rate:g}/s>"


def _budget(limit: int, window: float, burst: int | None) -> _Window | _Bucket:
    """The per-key budget: a sliding window, or a token bucket when a burst is configured."""
    return _Window(limit, window) if burst is None else _Bucket(limit, window, burst)


# --------------------------------------------------------------------------------------------------
# HTTP plumbing


class _ConnectionDropped(httpx.RemoteProtocolError):
    """Raised inside the app to drop the connection (the `drop` fault).

    Under uvicorn the connection closes after the response head, so the client sees a protocol error;
    through `httpx.ASGITransport` the client sees this exception, which is an httpx.RemoteProtocolError.
    """

    def __init__(self) -> None:
        super().__init__("Server disconnected without sending a complete response (emulated fault).")


class _DropFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ConnectionDropped))


_DROP_FILTER = _DropFilter()
_filter_users = 0
_filter_lock = threading.Lock()


def _install_drop_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users += 1
        logging.getLogger("uvicorn.error").addFilter(_DROP_FILTER)


def _remove_drop_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users -= 1
        if _filter_users <= 0:
            _filter_users = 0
            logging.getLogger("uvicorn.error").removeFilter(_DROP_FILTER)


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


@dataclass(slots=True)
class _Stream:
    chunks: AsyncGenerator[bytes, None]
    status: int = 200


class _ClientGone(Exception):
    """The client went away while its answer was pending: there is nobody to answer."""


class _HTTPError(Exception):
    def __init__(self, response: _Response, *, rate_limited: bool = False) -> None:
        super().__init__(response.status)
        self.response = response
        self.rate_limited = rate_limited


class _Request:
    __slots__ = ("_watch", "body", "headers", "key", "method", "params", "path", "query", "receive")

    def __init__(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        receive: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body
        self.receive = receive
        self.key = headers.get("x-api-key", "")
        self._watch: asyncio.Task[None] | None = None

    def disconnect_watch(self) -> asyncio.Task[None]:
        """A task that finishes when the client goes away."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_disconnect())
        return self._watch

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: str
    creates: bool = False  # creates runs: eligible for the lost_create fault
    groups: bool = False  # answers validation errors in the FastAPI shape


def _routes() -> list[_Route]:
    run = r"(?P<run_id>[^/]+)"
    grp = r"(?P<group_id>[^/]+)"
    table: list[_Route] = []

    def add(method: str, template: str, regex: str, handler: str, **kw: bool) -> None:
        table.append(_Route(method, re.compile(regex + r"\Z"), f"{method} {template}", handler, **kw))

    add("POST", "/v1/tasks/runs", r"/v1/tasks/runs", "create_run", creates=True)
    add("GET", "/v1/tasks/runs/{run_id}", rf"/v1/tasks/runs/{run}", "get_run")
    add("GET", "/v1/tasks/runs/{run_id}/result", rf"/v1/tasks/runs/{run}/result", "get_result")
    add("GET", "/v1/tasks/runs/{run_id}/input", rf"/v1/tasks/runs/{run}/input", "get_input")
    for prefix in ("/v1", "/v1beta"):
        add("GET", prefix + "/tasks/runs/{run_id}/events", rf"{prefix}/tasks/runs/{run}/events", "run_events")
        base = prefix + "/tasks/groups"
        add("POST", base, base, "create_group", groups=True)
        add("GET", base + "/{taskgroup_id}", rf"{base}/{grp}", "get_group", groups=True)
        add(
            "POST",
            base + "/{taskgroup_id}/runs",
            rf"{base}/{grp}/runs",
            "add_runs",
            creates=True,
            groups=True,
        )
        add("GET", base + "/{taskgroup_id}/runs", rf"{base}/{grp}/runs", "group_runs", groups=True)
        add("GET", base + "/{taskgroup_id}/events", rf"{base}/{grp}/events", "group_events", groups=True)
        add(
            "GET",
            base + "/{taskgroup_id}/runs/{run_id}",
            rf"{base}/{grp}/runs/{run}",
            "group_run",
            groups=True,
        )
    return table


_ROUTES = _routes()


def _sse(kind: str, data: Mapping[str, Any]) -> bytes:
    # Never an `id:` line: the SDK decoder keeps the last id, and a later blank line would then yield
    # an empty-data event (task-api.md §2.5). The cursor travels in the JSON as `event_id`.
    return b"event: " + kind.encode() + b"\ndata: " + _compact(data).encode() + b"\n\n"


# --------------------------------------------------------------------------------------------------
# The ASGI application


class EmulatorApp:
    """The emulator as an ASGI 3 application; `create_app()` builds one.

    `state` is the `EmulatorState` (runs, groups, credit); `stats()` returns the test counters. The
    app is not bound to an event loop: the same instance can serve several `asyncio.run()` calls
    through `httpx.ASGITransport`, one after another.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.state = EmulatorState(config)
        self._faults_rng = random.Random(f"{_draw_seed(config)}:faults")
        self._late_rng = random.Random(f"{_draw_seed(config)}:late")
        self._refs = _id_source(config, "refs")
        self._requests: Counter[str] = Counter()
        self._responses: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._rate_limited = 0
        self._first_request: float | None = None
        self._rate_limited_at: list[float] = []  # seconds after the first request, the first 100,000
        self._request_windows: dict[str, _Window | _Bucket] = {}
        self._run_windows: dict[str, _Window | _Bucket] = {}
        self._waiters: set[asyncio.Future[str]] = set()
        self._closing = False
        self._late_pending: set[asyncio.Task[_Response]] = set()
        self._late_commits = 0
        self._streams_closed_early = 0

    def __repr__(self) -> str:
        s = self.state
        return f"<EmulatorApp runs={len(s.runs)} groups={len(s.groups)} active={s.stats()['active_runs']}>"

    # -- inspection

    def stats(self) -> dict[str, Any]:
        """Counters for tests: requests, 429s, faults, late commits, early stream closes, runs, credit.

        Also duplicates and runs by status (`EmulatorState.stats`).
        """
        out = {
            "requests": dict(sorted(self._requests.items())),
            "requests_total": sum(self._requests.values()),
            "responses": {str(k): v for k, v in sorted(self._responses.items())},
            "rate_limited": self._rate_limited,
            "rate_limited_at": list(self._rate_limited_at),
            "faults": {kind: self._faults[kind] for kind in sorted(FAULT_KINDS)},
            "late_commits": self._late_commits,
            "late_commits_pending": len(self._late_pending),
            "streams_closed_early": self._streams_closed_early,
        }
        out.update(self.state.stats())
        return out

    def close(self) -> None:
        """Wake every waiting request so streams end and blocking calls answer; call on the app's loop."""
        self._closing = True
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result("closing")

    # -- ASGI entry point

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._closing = False
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if path == STATS_PATH and method == "GET":
            await self._send(send, _Response(200, _compact(self.stats()).encode()), count=False)
            return
        route, params, allowed = self._match(method, path)
        self._requests[route.name if route else "unmatched"] += 1
        if self._first_request is None:
            self._first_request = self.state.now()
        fault = self._draw_fault(route)
        if fault == "html_5xx":
            status = self._faults_rng.choice((502, 503))
            await self._send(send, _Response(status, _HTML_5XX[status], content_type=b"text/html"))
            return
        if fault == "drop":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            raise _ConnectionDropped
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = {
            k: v[-1]
            for k, v in parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"), True).items()
        }
        req = _Request(method, path, params, query, headers, body, receive)
        try:
            try:
                response = await self._dispatch(route, allowed, req)
            except _HTTPError as exc:
                response = exc.response
            except _ClientGone:
                return
            if fault == "lost_create":
                if isinstance(response, _Stream):
                    await response.chunks.aclose()
                response = _Response(502, _HTML_5XX[502], content_type=b"text/html")
            elif fault == "slow" and await self._wait(req, self.config.slow_seconds) == "disconnect":
                if isinstance(response, _Stream):
                    await response.chunks.aclose()
                return
            await self._send(send, response)
        finally:
            req.close()

    def _match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str], list[str]]:
        allowed = []
        for route in _ROUTES:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, m.groupdict(), []
            allowed.append(route.method)
        return None, {}, allowed

    def _draw_fault(self, route: _Route | None) -> str | None:
        cfg = self.config
        if cfg.fault_rate <= 0 or self._faults_rng.random() >= cfg.fault_rate:
            return None
        kinds = sorted(k for k in cfg.faults if k != "lost_create" or (route is not None and route.creates))
        if not kinds:
            return None
        kind = self._faults_rng.choice(kinds)
        self._faults[kind] += 1
        return kind

    async def _send(self, send: Any, response: _Response | _Stream, *, count: bool = True) -> None:
        if count:
            self._responses[response.status] += 1
        if isinstance(response, _Stream):
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            async with contextlib.aclosing(response.chunks) as chunks:
                if self.config.stream_close_seconds is None:
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                else:
                    await self._send_until(send, chunks, self.config.stream_close_seconds)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def _send_until(self, send: Any, chunks: AsyncGenerator[bytes, None], seconds: float) -> None:
        """Send a stream's chunks until it ends or `seconds` pass, whichever comes first.

        The caller then ends the body cleanly, as a proxy's stream timeout does.
        """
        loop = asyncio.get_running_loop()
        close_at = loop.time() + seconds
        while True:
            if loop.time() >= close_at:  # a stream that never waits (a long snapshot) ends here
                self._streams_closed_early += 1
                return
            try:
                # Only the generator's own wait is timed, never a send: a chunk goes out whole or not at all.
                async with asyncio.timeout_at(close_at):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self._streams_closed_early += 1
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _dispatch(self, route: _Route | None, allowed: list[str], req: _Request) -> _Response | _Stream:
        if route is None:
            if allowed:
                raise _HTTPError(
                    _Response(
                        405, b'{"detail":"Method Not Allowed"}', [(b"allow", ", ".join(allowed).encode())]
                    )
                )
            raise _HTTPError(_Response(404, b'{"detail":"Not Found"}'))
        cfg = self.config
        if not req.key or (cfg.api_key is not None and req.key != cfg.api_key):
            raise self._error(401, _MSG_UNAUTHORIZED)
        self.state.advance()
        window = None
        if cfg.rate_limit is not None and (cfg.count_gets or req.method != "GET"):
            window = self._request_windows.get(req.key)
            if window is None:
                window = self._request_windows[req.key] = _budget(
                    cfg.rate_limit, cfg.rate_window, cfg.rate_burst
                )
            now = self.state.now()
            wait = window.wait_time(now, 1)
            if wait:
                raise self._rate_limit_error(wait)
            window.add(now, 1)
        handler: Callable[[_Request, _Route], Awaitable[_Response | _Stream]] = getattr(
            self, "_h_" + route.handler
        )
        try:
            return await handler(req, route)
        except _HTTPError as exc:
            if exc.rate_limited and window is not None:
                window.undo_last()
            raise

    # -- responses

    def _json(self, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
        return _Response(status, _compact(obj).encode(), headers or [])

    def _error(self, status: int, message: str, detail: Any = None, headers: Any = None) -> _HTTPError:
        ref = str(uuid.UUID(int=self._refs.getrandbits(128), version=4))
        body = {"type": "error", "error": {"ref_id": ref, "message": message, "detail": detail}}
        return _HTTPError(self._json(status, body, headers))

    def _rate_limit_error(self, wait: float) -> _HTTPError:
        self._rate_limited += 1
        if len(self._rate_limited_at) < 100_000:
            self._rate_limited_at.append(self.state.now() - (self._first_request or self.state.now()))
        headers = [(b"retry-after", f"{wait:.3f}".encode())] if self.config.retry_after_header else None
        exc = self._error(429, _MSG_RATE, None, headers)
        exc.rate_limited = True
        return exc

    def _invalid(self, route: _Route, errors: list[dict[str, Any]]) -> _HTTPError:
        if route.groups:
            return _HTTPError(self._json(422, {"detail": errors}))
        return self._error(422, _MSG_422, {"errors": errors})

    def _parse_json(self, req: _Request, route: _Route) -> Any:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if not req.body:
            raise self._invalid(route, [{"loc": ["body"], "msg": "Field required", "type": "missing"}])
        if ctype != "application/json":
            raise self._invalid(
                route,
                [
                    {
                        "loc": ["body"],
                        "msg": "Content-Type must be application/json",
                        "type": "model_attributes_type",
                    }
                ],
            )
        try:
            return json.loads(req.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            pos = getattr(exc, "pos", 0)
            raise self._invalid(
                route, [{"loc": ["body", pos], "msg": "JSON decode error", "type": "json_invalid"}]
            ) from None

    def _query_bool(self, req: _Request, route: _Route, name: str, default: bool) -> bool:
        raw = req.query.get(name)
        if raw is None:
            return default
        if raw in ("true", "false"):
            return raw == "true"
        raise self._invalid(
            route,
            [{"loc": ["query", name], "msg": "Input should be a valid boolean", "type": "bool_parsing"}],
        )

    def _query_cursor(self, req: _Request, route: _Route, group: _Group, prefix: str, limit: int) -> int:
        """The position after `last_event_id`; only cursors this group's stream handed out are valid."""
        raw = req.query.get("last_event_id")
        if raw is None or raw == "":
            return 0
        m = re.fullmatch(prefix + r"(\d{10})-([0-9a-f]{8})", raw)
        if m is None or m.group(2) != _group_tag(group) or int(m.group(1)) > limit:
            raise self._invalid(
                route,
                [{"loc": ["query", "last_event_id"], "msg": "Invalid event cursor", "type": "value_error"}],
            )
        return int(m.group(1))

    def _run(self, req: _Request, message: str = _MSG_RUN_404) -> _Run:
        run = self.state.runs.get(req.params["run_id"])
        if run is None:
            raise self._error(404, message)
        return run

    def _group(self, req: _Request) -> _Group:
        group = self.state.groups.get(req.params["group_id"])
        if group is None:
            raise self._error(404, _MSG_GROUP_404)
        return group

    # -- creating runs

    def _prepare(
        self, obj: Any, loc: _Loc, errs: _Errors, default_spec: _Spec | None = None
    ) -> tuple[_Prepared | None, str | None]:
        """Validate one TaskRunInput. Returns (prepared or None, processor name if unknown)."""
        before = len(errs)
        if not _check_object(obj, loc, errs):
            return None, None
        _check_extra(obj, _RUN_INPUT_FIELDS, loc, errs)
        if "input" not in obj:
            errs.add((*loc, "input"), "Field required", "missing")
        elif not isinstance(obj["input"], str | dict):
            errs.add((*loc, "input"), "Input should be a valid string or object", "union_type")
        elif obj["input"] == "":
            errs.add((*loc, "input"), "The input must not be empty", "string_too_short")
        _check_str(obj, "processor", loc, errs, required=True)
        _check_metadata(obj.get("metadata"), (*loc, "metadata"), errs)
        _check_source_policy(obj.get("source_policy"), (*loc, "source_policy"), errs)
        _check_advanced(obj.get("advanced_settings"), (*loc, "advanced_settings"), errs)
        _check_mcp_servers(obj.get("mcp_servers"), (*loc, "mcp_servers"), errs)
        _check_webhook(obj.get("webhook"), (*loc, "webhook"), errs)
        for key in ("previous_interaction_id", "memory_scope_key"):
            _check_str(obj, key, loc, errs)
        events = obj.get("enable_events")
        if events is not None and not isinstance(events, bool):
            errs.add((*loc, "enable_events"), "Input should be a valid boolean", "bool_type")
        task_spec = obj.get("task_spec")
        if task_spec is None and default_spec is not None:
            spec = default_spec  # its errors, if any, were reported once by the caller
        else:
            spec = self.state.spec(task_spec)
            for err in spec.errors:
                errs.append({**err, "loc": [*loc, "task_spec", *err["loc"]]})
        if len(errs) > before:
            return None, None
        value = obj["input"]
        input_text = value if isinstance(value, str) else _compact(value)
        if spec.size + len(input_text) > _MAX_SPEC_INPUT_CHARS:
            errs.add(
                loc,
                f"Task spec and input are {spec.size + len(input_text)} characters; at most "
                f"{_MAX_SPEC_INPUT_CHARS} are allowed",
                "too_long",
            )
            return None, None
        processor = PROCESSORS.get(obj["processor"])
        if processor is None:
            return None, obj["processor"]
        body = {k: v for k, v in obj.items() if k not in ("task_spec", "metadata")}
        dedup_src = "\0".join((processor.name, spec.canonical, _canonical(value)))
        return (
            _Prepared(
                body=_compact(body),
                input=value,
                metadata=_compact(obj["metadata"]) if obj.get("metadata") is not None else None,
                spec=spec,
                processor=processor,
                events=events
                if events is not None
                else processor.name.removesuffix("-fast") in PREMIUM_TIERS,
                warnings=_input_warnings(value, spec),
                dedup=hashlib.blake2b(dedup_src.encode(), digest_size=16).digest(),
            ),
            None,
        )

    def _admit(self, req: _Request, items: list[_Prepared]) -> None:
        """Run-rate limit (429), then credit (402), for runs about to be created."""
        cfg = self.config
        window = None
        now = self.state.now()
        if cfg.run_rate_limit is not None:
            window = self._run_windows.get(req.key)
            if window is None:
                window = self._run_windows[req.key] = _budget(
                    cfg.run_rate_limit, cfg.rate_window, cfg.run_burst
                )
            wait = window.wait_time(now, len(items))
            if wait:
                raise self._rate_limit_error(wait)
        if not self.state.can_afford(items):
            raise self._error(402, _MSG_PAYMENT)
        if window is not None:
            window.add(now, len(items))

    async def _commit(
        self, req: _Request, items: list[_Prepared], commit: Callable[[bool], _Response]
    ) -> _Response:
        """Create the admitted runs now, or, for a late commit, on a timer of the emulator's own.

        The late commit is a task of the app, not of the request: cancelling the request or closing
        its connection does not stop it. `commit(reserved)` creates the runs and builds the answer.
        """
        cfg = self.config
        if cfg.late_commit_seconds <= 0 or self._late_rng.random() >= cfg.late_commit_rate:
            return commit(False)
        reserved = self.state.reserve(items)
        task = asyncio.get_running_loop().create_task(self._late_commit(reserved, commit))
        self._late_pending.add(task)
        task.add_done_callback(self._late_pending.discard)
        if cfg.late_commit_answer == "after":
            while not task.done():
                reason = await self._wait(req, cfg.late_commit_seconds, until=task)
                if reason == "disconnect":
                    raise _ClientGone
                if reason == "closing":
                    break
            if task.done():
                return task.result()
        return _Response(504, _HTML_5XX[504], content_type=b"text/html")

    async def _late_commit(self, reserved: int, commit: Callable[[bool], _Response]) -> _Response:
        try:
            await asyncio.sleep(self.config.late_commit_seconds)
        except asyncio.CancelledError:  # the loop ends (an ASGITransport test, a server stop): no runs
            self.state.release(reserved)
            raise
        self._late_commits += 1
        return commit(True)

    # -- handlers: runs

    async def _h_create_run(self, req: _Request, route: _Route) -> _Response:
        obj = self._parse_json(req, route)
        errs = _Errors()
        prepared, unknown = self._prepare(obj, ("body",), errs)
        if errs:
            raise self._invalid(route, errs)
        if unknown is not None or prepared is None:
            raise self._error(403, _MSG_FORBIDDEN, {"processor": unknown})
        self._admit(req, [prepared])

        def commit(reserved: bool) -> _Response:
            (run,) = self.state.create_runs([prepared], None, reserved=reserved)
            return self._json(202, self.state.run_json(run))

        return await self._commit(req, [prepared], commit)

    async def _h_get_run(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.run_json(self._run(req)))

    async def _h_get_input(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.run_input(self._run(req)))

    async def _h_get_result(self, req: _Request, route: _Route) -> _Response:
        run = self._run(req, _MSG_RESULT_404)
        raw = req.query.get("timeout")
        timeout = _DEFAULT_RESULT_TIMEOUT
        if raw is not None:
            if not re.fullmatch(r"\d+", raw) or int(raw) > _MAX_RESULT_TIMEOUT:
                raise self._invalid(
                    route,
                    [
                        {
                            "loc": ["query", "timeout"],
                            "msg": f"timeout must be an integer between 0 and {_MAX_RESULT_TIMEOUT}",
                            "type": "int_parsing",
                        }
                    ],
                )
            timeout = int(raw)
        state = self.state
        deadline = state.now() + timeout
        while run.state < _COMPLETED:
            now = state.now()
            if now >= deadline:
                raise self._error(408, _MSG_408)
            reason = await self._wait(req, min(deadline, run.end) - now + 0.0005)
            if reason != "timeout":
                raise self._error(408, _MSG_408)
            state.advance()
        if run.state == _FAILED:
            raise self._error(404, _MSG_RESULT_404)
        return self._json(200, {"run": state.run_json(run), "output": state.run_output(run)})

    async def _h_run_events(self, req: _Request, route: _Route) -> _Stream:
        run = self._run(req)
        return _Stream(self._run_event_stream(req, run))

    def _progress_plan(self, run: _Run) -> list[tuple[float, str, str]]:
        span = run.end - run.start
        subject = _describe_input(json.loads(run.body)["input"])
        if not run.events:
            plan = [(0.0, "task_run.progress_msg.exec_status", f"Working on {subject}")]
        else:
            plan = [
                (0.0, "task_run.progress_msg.plan", f"Planning research for {subject}"),
                (0.15, "task_run.progress_msg.search", f"Searching the web for {subject}"),
                (0.4, "task_run.progress_msg.extract", "Reading and extracting from sources"),
                (0.65, "task_run.progress_msg.search", "Cross-checking findings"),
                (0.85, "task_run.progress_msg.result", "Compiling the output"),
            ]
        return [
            (run.start + f * span, kind, text) for f, kind, text in plan if run.start + f * span < run.end
        ]

    def _progress_stats(self, run: _Run, now: float) -> bytes:
        span = max(run.end - run.start, 1e-9)
        meter = 100.0 if run.state >= _COMPLETED else max(0.0, min(99.0, (now - run.start) / span * 100))
        read = int(meter / 10)
        host = _describe_input(json.loads(run.body)["input"])
        sample = [f"https://{_slugify(host)}.example.com/source/{i + 1}" for i in range(min(read, 3))]
        return _sse(
            "task_run.progress_stats",
            {
                "type": "task_run.progress_stats",
                "progress_meter": round(meter, 1),
                "source_stats": {
                    "num_sources_considered": read * 3,
                    "num_sources_read": read,
                    "sources_read_sample": sample,
                },
            },
        )

    def _run_state_event(self, run: _Run, *, output: bool) -> bytes:
        state = self.state
        return _sse(
            "task_run.state",
            {
                "type": "task_run.state",
                "event_id": _run_cursor(run.group, run.index + 1) if run.group is not None else None,
                "run": state.run_json(run),
                "input": None,
                "output": state.run_output(run) if output and run.state == _COMPLETED else None,
            },
        )

    async def _run_event_stream(self, req: _Request, run: _Run) -> AsyncGenerator[bytes, None]:
        state = self.state
        closes_at = state.now() + _RUN_EVENTS_SECONDS
        yield self._run_state_event(run, output=False)
        plan = self._progress_plan(run)
        sent = 0
        while True:
            state.advance()
            now = state.now()
            out = []
            while sent < len(plan) and plan[sent][0] <= now:
                t, kind, text = plan[sent]
                out.append(_sse(kind, {"type": kind, "message": text, "timestamp": state.timestamp(t)}))
                sent += 1
            if out:
                out.append(self._progress_stats(run, now))
                yield b"".join(out)
            if run.state >= _COMPLETED:
                yield self._run_state_event(run, output=True)
                return
            if now >= closes_at:
                return
            wake = min(closes_at, run.end, plan[sent][0] if sent < len(plan) else math.inf)
            if await self._wait(req, wake - now + 0.0005) != "timeout":
                return

    # -- handlers: groups

    async def _h_create_group(self, req: _Request, route: _Route) -> _Response:
        obj = self._parse_json(req, route)
        errs = _Errors()
        if _check_object(obj, ("body",), errs):
            _check_extra(obj, {"metadata"}, ("body",), errs)
            _check_metadata(obj.get("metadata"), ("body", "metadata"), errs)
        if errs:
            raise self._invalid(route, errs)
        group = self.state.create_group(obj.get("metadata"))
        return self._json(200, self.state.group_json(group))

    async def _h_get_group(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.group_json(self._group(req)))

    async def _h_group_run(self, req: _Request, route: _Route) -> _Response:
        group = self._group(req)
        run = self._run(req)
        if run.group is not group:
            raise self._error(404, _MSG_RUN_404)
        return self._json(200, self.state.run_json(run))

    async def _h_add_runs(self, req: _Request, route: _Route) -> _Response:
        group = self._group(req)
        refresh = self._query_bool(req, route, "refresh_status", True)
        obj = self._parse_json(req, route)
        errs = _Errors()
        if not _check_object(obj, ("body",), errs):
            raise self._invalid(route, errs)
        _check_extra(obj, {"inputs", "default_task_spec"}, ("body",), errs)
        default_spec = None
        if obj.get("default_task_spec") is not None:
            default_spec = self.state.spec(obj["default_task_spec"])
            for err in default_spec.errors:
                errs.append({**err, "loc": ["body", "default_task_spec", *err["loc"]]})
        inputs = obj.get("inputs")
        if "inputs" not in obj:
            errs.add(("body", "inputs"), "Field required", "missing")
        elif not isinstance(inputs, list):
            errs.add(("body", "inputs"), "Input should be a valid list", "list_type")
        elif not inputs:
            errs.add(
                ("body", "inputs"), "List should have at least 1 item after validation, not 0", "too_short"
            )
        elif len(inputs) > _MAX_INPUTS_PER_ADD:
            errs.add(
                ("body", "inputs"),
                f"List should have at most {_MAX_INPUTS_PER_ADD} items after validation, not {len(inputs)}",
                "too_long",
            )
        if errs:
            raise self._invalid(route, errs)
        prepared: list[_Prepared] = []
        unknown: list[str] = []
        for i, item in enumerate(inputs):
            p, bad = self._prepare(item, ("body", "inputs", i), errs, default_spec)
            if p is not None:
                prepared.append(p)
            elif bad is not None:
                unknown.append(bad)
        if errs:
            raise self._invalid(route, errs)
        if unknown:
            raise self._error(403, _MSG_FORBIDDEN, {"processors": sorted(set(unknown))})
        self._admit(req, prepared)

        def commit(reserved: bool) -> _Response:
            before_runs = len(group.runs)
            before_events = len(group.events)
            cached = group.cached_status
            runs = self.state.create_runs(prepared, group, reserved=reserved)
            if refresh or cached is None:
                status = self.state.group_status(group)
            else:
                status = cached
                group.cached_status = cached
            return self._json(
                200,
                {
                    "run_ids": [r.run_id for r in runs],
                    "status": status,
                    "run_cursor": _run_cursor(group, before_runs) if before_runs else None,
                    "event_cursor": _event_cursor(group, before_events) if before_events else None,
                },
            )

        return await self._commit(req, prepared, commit)

    async def _h_group_runs(self, req: _Request, route: _Route) -> _Stream:
        group = self._group(req)
        include_input = self._query_bool(req, route, "include_input", False)
        include_output = self._query_bool(req, route, "include_output", False)
        status = req.query.get("status")
        if status is not None and status not in _ALL_STATUSES:
            raise self._invalid(
                route,
                [
                    {
                        "loc": ["query", "status"],
                        "msg": f"Input should be one of {_ALL_STATUSES}",
                        "type": "enum",
                    }
                ],
            )
        start = self._query_cursor(req, route, group, "r", len(group.runs))
        end = len(group.runs)
        wanted = _STATUSES.index(status) if status in _STATUSES else (-1 if status is None else -2)
        return _Stream(self._group_runs_stream(group, start, end, wanted, include_input, include_output))

    async def _group_runs_stream(
        self, group: _Group, start: int, end: int, wanted: int, include_input: bool, include_output: bool
    ) -> AsyncGenerator[bytes, None]:
        state = self.state
        buf: list[bytes] = []
        for i in range(start, end):
            run = group.runs[i]
            if wanted != -1 and run.state != wanted:
                continue
            event = {
                "type": "task_run.state",
                "event_id": _run_cursor(group, i + 1),
                "run": state.run_json(run),
                "input": state.run_input(run) if include_input else None,
                "output": state.run_output(run) if include_output and run.state == _COMPLETED else None,
            }
            buf.append(_sse("task_run.state", event))
            if len(buf) >= 256:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)

    async def _h_group_events(self, req: _Request, route: _Route) -> _Stream:
        group = self._group(req)
        start = self._query_cursor(req, route, group, "e", len(group.events))
        timeout = _MAX_GROUP_EVENTS_SECONDS
        raw = req.query.get("timeout")
        if raw is not None:
            try:
                timeout = float(raw)
                if not 0 < timeout <= _MAX_GROUP_EVENTS_SECONDS:
                    raise ValueError
            except ValueError:
                raise self._invalid(
                    route,
                    [
                        {
                            "loc": ["query", "timeout"],
                            "msg": f"timeout must be a number in (0, {_MAX_GROUP_EVENTS_SECONDS:g}]",
                            "type": "float_parsing",
                        }
                    ],
                ) from None
        return _Stream(self._group_event_stream(req, group, start, timeout))

    async def _group_event_stream(
        self, req: _Request, group: _Group, start: int, timeout: float
    ) -> AsyncGenerator[bytes, None]:
        state = self.state
        keepalive = self.config.keepalive_seconds
        deadline = state.now() + timeout
        next_keepalive = state.now() + keepalive
        index = start
        while True:
            state.advance()
            log = group.events
            if index < len(log):
                end = len(log)
                buf = []
                for i in range(index, end):
                    entry = log[i]
                    eid = _event_cursor(group, i + 1)
                    if isinstance(entry, dict):
                        data = {"type": "task_group_status", "event_id": eid, "status": entry}
                        buf.append(_sse("task_group_status", data))
                    else:
                        data = {
                            "type": "task_run.state",
                            "event_id": eid,
                            "run": state.run_json(entry),
                            "input": None,
                            "output": None,
                        }
                        buf.append(_sse("task_run.state", data))
                    if len(buf) >= 256:
                        yield b"".join(buf)
                        buf = []
                if buf:
                    yield b"".join(buf)
                index = end
                next_keepalive = state.now() + keepalive
                continue
            if not group.active:
                return
            now = state.now()
            if now >= deadline:
                return
            due = state.next_transition()
            wake = min(deadline, next_keepalive, due if due is not None else math.inf)
            reason = await self._wait(req, wake - now + 0.0005, group)
            if reason in ("disconnect", "closing"):
                return
            if state.now() >= next_keepalive:
                yield b": keepalive\n\n"
                next_keepalive = state.now() + keepalive

    # -- waiting

    async def _wait(
        self,
        req: _Request,
        delay: float,
        group: _Group | None = None,
        until: asyncio.Future[Any] | None = None,
    ) -> str:
        """Wait `delay` seconds on a timer; end early on a group change, `until` being done, a
        disconnect or close().

        Returns "timeout", "wake", "disconnect" or "closing".
        """
        if self._closing:
            return "closing"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()

        def fire(reason: str) -> None:
            if not fut.done():
                fut.set_result(reason)

        handle = loop.call_later(max(delay, 0.0), fire, "timeout")
        watch = req.disconnect_watch()

        def on_disconnect(_: object) -> None:
            fire("disconnect")

        if watch.done():
            fire("disconnect")
        else:
            watch.add_done_callback(on_disconnect)

        def on_until(_: object) -> None:
            fire("wake")

        if until is not None:
            until.add_done_callback(on_until)
        self._waiters.add(fut)
        if group is not None:
            group.waiters.add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            watch.remove_done_callback(on_disconnect)
            if until is not None:
                until.remove_done_callback(on_until)
            self._waiters.discard(fut)
            if group is not None:
                group.waiters.discard(fut)


# Cursors are opaque on the wire (task-api.md §8). Ours are "<stream><position>-<group tag>": zero-padded
# so they sort in stream order, and tagged so a cursor from another group or stream is refused.


def _group_tag(group: _Group) -> str:
    return group.group_id[5:13]


def _run_cursor(group: _Group, n: int) -> str:
    return f"r{n:010d}-{_group_tag(group)}"


def _event_cursor(group: _Group, n: int) -> str:
    return f"e{n:010d}-{_group_tag(group)}"


def _describe_input(value: Any) -> str:
    if isinstance(value, dict):
        first = next(iter(value.values()), "")
        value = first if isinstance(first, str) else _compact(first)
    text = " ".join(str(value).split())
    return (text[:57] + "...") if len(text) > 60 else (text or "the input")


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "item"


def create_app(config: EmulatorConfig | None = None) -> EmulatorApp:
    """A new emulator ASGI app with its own empty state.

    >>> app = create_app(EmulatorConfig(latency=0.05, seed=1))
    >>> app.stats()["runs_created"]
    0
    """
    return EmulatorApp(config or EmulatorConfig())


# --------------------------------------------------------------------------------------------------
# Serving


class _Server(uvicorn.Server):
    """uvicorn that reports when it listens, and wakes the app's waiters before it drains."""

    def __init__(
        self, config: uvicorn.Config, app: EmulatorApp, ready: threading.Event | None = None
    ) -> None:
        super().__init__(config)
        self.emulator = app
        self.ready = ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            if self.ready is not None:
                self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Long-lived streams and blocking /result calls would hold the graceful drain open.
        self.emulator.close()
        await super().shutdown(sockets=sockets)


def _uvicorn_config(app: EmulatorApp, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        timeout_graceful_shutdown=5,
        **kw,
    )


class Emulator:
    """The emulator served by uvicorn on 127.0.0.1, in a background thread with its own event loop.

        >>> with Emulator(latency=0.05) as emu:                     # doctest: +SKIP
        ...     r = httpx.post(emu.url + "/v1/tasks/runs", headers={"x-api-key": emu.api_key},
        ...                    json={"input": "Acme", "processor": "base"})
        ...     r.status_code, emu.stats()["runs_created"]
        (202, 1)

    Pass an `EmulatorConfig`, or its fields as keyword arguments (or both: keywords override), e.g.
    `Emulator(late_commit_seconds=2.0, stream_close_seconds=30, run_rate_limit=2_000, run_burst=500)`
    for a service that is unkind to clients (see `EmulatorConfig`).
    `url` is `http://127.0.0.1:<port>` (a free port unless `port` is given); `api_key` is the config's
    key or `DEMO_API_KEY`; `app` is the ASGI app, usable with `httpx.ASGITransport` as well. Entering
    returns once the port accepts connections; leaving ends open streams and stops the server.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        /,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **options: Any,
    ) -> None:
        config = config or EmulatorConfig()
        if options:
            config = replace(config, **options)
        self.config = config
        self.app = create_app(config)
        self.api_key = config.api_key or DEMO_API_KEY
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return f"<Emulator {self.url} {state}>"

    def start(self) -> Emulator:
        """Start serving; returns when the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        server = _Server(
            _uvicorn_config(self.app, log_level="warning", access_log=False, log_config=None), self.app, ready
        )
        self._server = server
        _install_drop_filter()
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="enrich-emulator", daemon=True
        )
        self._thread = thread
        thread.start()
        ready.wait(30)
        if not server.started:
            self.close()
            raise RuntimeError("the emulator did not start")
        return self

    def close(self) -> None:
        """Stop serving (idempotent): open streams end, then uvicorn drains and the thread exits."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            if server.loop is not None and not server.loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    server.loop.call_soon_threadsafe(self.app.close)
            thread.join(30)
            _remove_drop_filter()
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def stats(self) -> dict[str, Any]:
        """`app.stats()`, computed on the server's loop so it is consistent."""
        server = self._server
        if server is None or server.loop is None:
            return self.app.stats()

        async def _stats() -> dict[str, Any]:
            return self.app.stats()

        return asyncio.run_coroutine_threadsafe(_stats(), server.loop).result(30)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve the emulator on `host:port` until Ctrl-C, then return; for `enrich emulate`.

    Binds 127.0.0.1 by default: the emulator has no real authentication and is meant for one machine.
    Logs go through uvicorn's loggers at INFO (one access line per request). On Ctrl-C, open streams
    end and blocking calls answer at once, so shutdown does not wait for them.

        >>> serve(EmulatorConfig(latency=2.0, failure_rate=0.05), port=8787)  # doctest: +SKIP
    """
    app = create_app(config)
    server = _Server(_uvicorn_config(app, host=host, port=port, log_level="info"), app)
    _install_drop_filter()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; like uvicorn.run, swallow it
        pass
    finally:
        _remove_drop_filter()
