"""The emulator's configuration: `EmulatorConfig`, every option with its default and the checks of its
values, and where the emulator's random draws get their seeds (`_draw_seed`, `_id_source`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from enrich._emulator.synth import check_basis_bytes

__all__ = ["DEFAULT_FAULTS", "FAULT_KINDS", "EmulatorConfig"]

#: Every transport/server fault the emulator can inject (see `EmulatorConfig.faults`).
FAULT_KINDS = frozenset({"html_5xx", "drop", "slow", "lost_create", "no_retry"})

#: The kinds `EmulatorConfig.faults` holds unless told otherwise: the four that existed before
#: `no_retry`, so a config that names no kinds draws the same faults from the same seed as it did.
DEFAULT_FAULTS = frozenset({"html_5xx", "drop", "slow", "lost_create"})

#: How a late-committed create is answered (see `EmulatorConfig.late_commit_answer`).
_LATE_ANSWERS = ("gateway", "after")


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
    - `cancel_rate`, `action_required_rate`: shares of runs that end `cancelled` or stop at
      `action_required`. They are drawn from the same number per run as `failure_rate` (so the three
      never overlap, and a seed gives the same failures as before these existed); the three together
      are at most 1. A cancelled run goes queued → running → `cancelling` (the second half of its
      running time; still active) → `cancelled` (terminal, not active, error null). An
      action-required run goes queued → `action_required` and stays there (not active, not terminal).
      Neither ever has an output: `/result` answers 404 "Run failed or run id not found" at once, as
      for a failed run. The service documents neither path (task-api.md §4, open question 5); these
      let a pipeline meet the statuses. Defaults: 0.0.
    - `fault_rate`: share of requests hit by one of the `faults` kinds:
      `html_5xx` (502/503 with an HTML body, nothing done), `drop` (the connection closes before a full
      answer, nothing done), `slow` (the request is carried out, then the answer waits
      `slow_seconds`, long enough for a client read timeout), `lost_create` (a create-run or add-runs
      request is carried out, the runs exist, but the answer is a 502 HTML page), `no_retry` (503
      with an ErrorResponse body and `x-should-retry: false`, nothing done: the SDK never retries it).
      `faults` defaults to `DEFAULT_FAULTS`, every kind but `no_retry`; name it to draw it.
    - `should_retry_header`: when True, every 429 and every injected 5xx but `no_retry` (the HTML
      502/503 of `html_5xx` and `lost_create`, the 504 of a late commit) carries `x-should-retry: true`,
      which the SDK obeys before looking at the status (task-api.md §5). Default False: no
      `x-should-retry` header at all.
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
    - `own_interaction_ids`: when True, every run gets an `interaction_id` of its own,
      `int_<32 hex>`, instead of its `run_id`: the service's examples show the two equal, but it does
      not promise it, and a client that puts a run id where an interaction id belongs fails here.
      `previous_interaction_id` then accepts only those ids: a run id is refused (422) like any id
      the emulator never handed out as an interaction. They come from an id source of their own
      (seeded like the run ids, see `seed`), so a seed hands out the same run, group and ref ids with
      the option on or off. Default False: `interaction_id` is `run_id`, as in the docs' examples.
    - `seed`: None (the default) draws run, group, ref and interaction ids from a fresh random
      source, so ids differ across restarts as the service's do; every other draw (durations,
      failures, faults, late commits) is then seeded as if `seed=0`. An int seeds everything, ids
      included, so two emulators with one seed hand out the same ids. Outputs never depend on the seed.
    - `keepalive_seconds`: interval of `: keepalive` comments on the long group events stream.
    - `basis_bytes`: the size of answers. None (the default): a compact basis per field (one to three
      citations with one-line excerpts, a one-line reasoning), a few hundred bytes. An int in
      [512, 1,000,000]: each basis entry is about that many bytes of compact UTF-8 JSON (a few %
      under; up to 15 % under at small sizes with long names), as real core/pro answers are (several
      KB): the entry of each top-level field, of each element of an array field (so an array of three
      items brings four entries of about N bytes), or the text output's one. An entry has several
      citations with distinct plausible https URLs and titles derived from the input, excerpt
      passages of varied length, and a reasoning paragraph. `lite`/`base` keep their rule of no
      excerpts and no confidence: their size comes from more citations and a longer reasoning. The
      content is the same either way, and the bytes depend only on (input, task spec, processor tier,
      basis_bytes, and the run's source policy and previous interaction), like every output
      (`enrich._emulator.synth.expected_output(run_input, basis_bytes=N)`).
    """

    api_key: str | None = None
    latency: float | None = None
    failure_rate: float = 0.0
    cancel_rate: float = 0.0
    action_required_rate: float = 0.0
    fault_rate: float = 0.0
    faults: frozenset[str] = DEFAULT_FAULTS
    should_retry_header: bool = False
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
    own_interaction_ids: bool = False
    seed: int | None = None
    keepalive_seconds: float = 15.0
    basis_bytes: int | None = None

    def __post_init__(self) -> None:
        check_basis_bytes(self.basis_bytes)
        for name in ("failure_rate", "cancel_rate", "action_required_rate", "fault_rate", "late_commit_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        outcomes = self.failure_rate + self.cancel_rate + self.action_required_rate
        if outcomes > 1.0 + 1e-12:
            raise ValueError(
                f"failure_rate + cancel_rate + action_required_rate must be at most 1, got {outcomes:g}"
            )
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
