"""The per-key rate limiter: exact sliding-window budgets, and what 429s teach about the real quota.

One `RateLimiter` is shared by every request made with one API key. Each request spends one unit of the
*requests* budget and, if it creates runs, that many units of the *runs* budget (an add-runs call with 1,000
inputs spends 1,000; a create-run spends 1; a GET spends 0). Both budgets hold over every window of `period`
seconds, not on average: the limiter keeps a log of what it granted and when, and a request is let through
only when it fits in the window that ends now. Waiters are woken by a timer set for the exact instant the
window has room for them; nothing polls. Reads (requests that create no runs) wait in a queue of their
own, so a read never waits behind an add-runs call that waits for run budget.

The budgets the client is given are only what it *assumes*. A key's real quota may be lower (a lower tier,
a key shared with another job), counted over a shorter window, or a token bucket whose burst is below one
full add-runs call. Each 429 is read for what it says:

* about the *size* of a call: an add refused although the window held nothing else of ours, and larger
  than any add accepted so far, is split (`max_runs` halves) and sent again at once;
* about the *pace*: every sender pauses (Retry-After, or a backoff that starts at `period / 60` and
  doubles), and the first request sent after the pause and accepted measures the quota: the runs (and
  requests) the service let through in the span that ended with it, over that span. The budgets become
  what was measured, a little under, and a burst limit (a token bucket) keeps adds apart when the
  service's window is shorter than the assumed one.

Nothing is learned from counting successes. The pace recovers by time: after a few windows
without a 429 while senders wait for budget, the learned limits are raised by a step, and a 429 sets them
back to what was measured. What was learned can be saved (`learned`) and given to a new limiter
(`RateLimiter(learned=...)`), so a resumed job starts where the last process left off.

Time comes from a `Clock`. The default, `LoopClock`, is the running event loop's own clock and timers, so
`VirtualTimeLoop` (an event loop whose time jumps to the next timer whenever every task is waiting) turns
minutes of limiting into milliseconds for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
import selectors
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVarTuple

from ._exceptions import UsageError

__all__ = ["Cancellable", "Clock", "LoopClock", "RateLimiter", "VirtualTimeLoop"]

_Ts = TypeVarTuple("_Ts")

# What a 429 teaches (see the module docstring). Times are shares of `period` unless said otherwise.
_MARGIN = 0.02  # a learned window is this much longer than the span measured: arrival jitter
_MIN_SPAN = 0.1  # a measurement spans at least this much of a period (a burst says nothing of a rate)
_COALESCE = 1 / 60  # 429s within this long of a counted one (or during its pause) are the same event
_BACKOFF_BASE = 1 / 60  # pause after a 429 without Retry-After; doubles per consecutive event ...
_BACKOFF_CAP = 1.0  # ... up to one period
_MAX_SPLITS = 3  # splits in a row before a refusal of a call is taken as one of the pace
_MAX_GAPS = 2  # smaller calls tried to fill a window before the first pause
_PROBE_PERIODS = 4.0  # windows without a 429 before the learned limits are raised (at first) ...
_PROBE_MIN, _PROBE_MAX = 1.0, 16.0  # ... and the range that interval moves in
_PROBE_STEP = 1.1  # ... by this factor (the size of a call doubles) ...
_PROBE_STEP_MAX = 2.0  # ... growing to this after probes that went through
_HISTORY = 2.0  # periods of grants a measurement looks back on
_MIN_CALLS = 10  # calls between two measurements that tell a rate

Grant = tuple[float, int]
"""What `acquire` returns: (the instant the grant leaves the window, runs spent)."""


class Cancellable(Protocol):
    """A scheduled wake-up that can be called off (`asyncio.TimerHandle` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where the limiter reads the time and sets its wake-ups.

    `now()` returns monotonic seconds (any origin). `call_at(when, callback)` calls `callback()` once, on the
    event loop the limiter is used from, at the instant `when` on the same scale as `now()` (or as soon as
    possible if `when` has passed), and returns a handle whose `cancel()` calls it off.
    """

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable: ...


@dataclass(frozen=True, slots=True)
class LoopClock:
    """The default clock: an event loop's `time()` and `call_at()`.

    Under `VirtualTimeLoop` this is virtual time, so the limiter needs no special clock in tests.
    """

    loop: asyncio.AbstractEventLoop

    def now(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return self.loop.call_at(when, callback)


class RateLimiter:
    """Keeps the requests of one API key within two per-window budgets, and learns the real quota.

    Args:
        requests_per_minute: the requests budget: at most this many requests in any window of `period`
            seconds (default 2,000; at least 1; `math.inf` for no limit).
        runs_per_minute: the runs budget: at most this many runs created in any window of `period` seconds
            (default 2,000; `math.inf` for no limit). The names say "minute" because `period` defaults to
            60 s; the budgets are per `period`.
        period: the window length in seconds (default 60.0). Tests and benchmarks scale it down.
        clock: where time comes from (default: the running event loop's clock, bound at the first
            `acquire`; the limiter can be built outside any loop, then used inside exactly one).
        learned: what an earlier limiter learned of the same key's quota (`learned`), to start from.
        on_learn: called with `learned` (or `{}`) whenever what the limiter knows of the quota changes.

    Guarantee: for every window [t, t + period), the requests granted in it and not refused (a 429 leaves
    the window) number at most the requests budget and the runs they spend sum to at most the runs
    budget. It is a sliding log of (expiry, runs),
    not a token bucket: no burst on top of the rate. With many waiters the whole budget is used, since a
    waiter is let through at the very instant enough of the log expires. A learned quota adds a second
    sliding window of the same kind: at most `runs` runs and `requests` requests in any `window` seconds.

    Queues: requests that create runs wait in arrival order, and so do reads (`runs=0`), each in a queue of
    its own: a big add-runs request at the head holds back the adds behind it until it fits, so it can
    never be starved or overtaken, but it never holds back a read.

    A request for more runs than the runs budget raises `UsageError` (a `ValueError`): it could never fit.
    A request that fits the nominal budget but not the learned one goes when the learned window holds no
    other runs.

    The protocol of a request (the client does this): `grant = await acquire(runs)`; then, once answered,
    `succeeded(grant)` (any answer but a 429), `rate_limited(retry_after, grant)` (a 429: nothing was done),
    or `settle(grant)` (no answer: it may have reached the service); `refund(grant)` if it was never sent.

    Example:
        >>> limiter = RateLimiter(requests_per_minute=2000, runs_per_minute=2000)
        >>> async def add_runs(inputs):
        ...     grant = await limiter.acquire(runs=len(inputs))
        ...     response = await send(inputs)
        ...     if response.status_code == 429:
        ...         limiter.rate_limited(retry_after_seconds(response), grant)
        ...     else:
        ...         limiter.succeeded(grant)
    """

    __slots__ = (
        "_clock",
        "_creators",
        "_episode",
        "_event",
        "_gap",
        "_gaps",
        "_history",
        "_largest_ok",
        "_last_change",
        "_log",
        "_loop",
        "_marks",
        "_measured",
        "_n_waiting",
        "_on_learn",
        "_paused_total",
        "_paused_until",
        "_period",
        "_probe_every",
        "_probe_step",
        "_probed_at",
        "_quiet_until",
        "_readers",
        "_reads_paused_until",
        "_recent",
        "_recent_runs",
        "_requests_budget",
        "_runs_budget",
        "_runs_used",
        "_size",
        "_size_refused",
        "_splits",
        "_strikes",
        "_timer",
        "_timer_when",
        "_trial",
        "_window",
        "_window_requests",
        "_window_runs",
    )

    def __init__(
        self,
        requests_per_minute: float = 2000,
        runs_per_minute: float = 2000,
        *,
        period: float = 60.0,
        clock: Clock | None = None,
        learned: Mapping[str, Any] | None = None,
        on_learn: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        if not requests_per_minute >= 1:
            raise UsageError(f"requests_per_minute must be at least 1, not {requests_per_minute!r}")
        if not runs_per_minute >= 0:
            raise UsageError(f"runs_per_minute must be at least 0, not {runs_per_minute!r}")
        if not (period > 0 and math.isfinite(period)):
            raise UsageError(f"period must be a positive number of seconds, not {period!r}")
        self._requests_budget = float(requests_per_minute)
        self._runs_budget = float(runs_per_minute)
        self._period = float(period)
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_learn = on_learn
        # The sliding log: (expiry, runs) per granted request, in expiry order. Its length is the number of
        # requests in the window; `_runs_used` is the sum of its runs.
        self._log: deque[Grant] = deque()
        self._runs_used = 0
        # Waiters in arrival order: (future, runs). A cancelled waiter stays until it reaches the head.
        self._creators: deque[tuple[asyncio.Future[Grant], int, int]] = deque()  # (future, runs, least)
        self._readers: deque[tuple[asyncio.Future[Grant], int, int]] = deque()
        self._n_waiting = 0
        self._timer: Cancellable | None = None
        self._timer_when = 0.0
        self._paused_until = -math.inf  # creators
        self._reads_paused_until = -math.inf
        self._quiet_until = -math.inf
        self._strikes = 0
        # The learned quota: at most `_window_runs` runs and `_window_requests` requests in any `_window`
        # seconds (None: nothing learned). `_recent` holds the grants in that window, as in `_log`.
        self._window: float | None = None
        self._window_runs = math.inf
        self._window_requests = math.inf
        self._recent: deque[Grant] = deque()
        self._recent_runs = 0
        # Every grant of the last `_HISTORY` periods: [expiry as granted, runs, expiry as counted (moved
        # to its answer by `settle`)]. A measurement looks back on when calls were sent (the first); a
        # learned window is rebuilt from when they were counted (the last). And when the calls that
        # measured were sent.
        self._history: deque[list[Any]] = deque()
        self._marks: deque[tuple[float, float]] = deque()  # (sent, _paused_total then)
        self._paused_total = 0.0  # seconds the creates were paused, in all
        # The size of calls: `_size` the largest to make, `_largest_ok` the largest the service accepted,
        # `_size_refused` the smallest it refused although none of ours was in the window.
        self._size = self._runs_budget
        self._largest_ok = 0
        self._size_refused = math.inf
        self._splits = 0
        self._gaps = 0  # calls made smaller to fill a window before the first measurement
        self._gap = self._runs_budget
        self._measured = False
        # A 429 being measured: (time, runs of the refused call, requests share, runs share of the window).
        self._event: tuple[float, int, float, float] | None = None
        self._episode: float | None = None  # when the 429s not yet measured began
        # After a 429's pause, one request goes alone (a trial) until it is answered: the others would
        # only bounce off the same quota.
        self._trial: Grant | None = None
        self._last_change: float | None = None  # the last 429 or probe (None: not bound to a clock yet)
        self._probe_every = _PROBE_PERIODS  # periods from a 429 or a probe to the next probe
        self._probed_at: float | None = None  # the last probe, until a 429 follows it
        self._probe_step = _PROBE_STEP
        if learned:
            self._restore(learned)

    # -- the public surface ---------------------------------------------------------------------------

    async def acquire(self, runs: int = 0, *, at_least: int | None = None) -> Grant:
        """Wait until one request and `runs` runs fit both budgets, then spend them.

        With `at_least` (1 to `runs`), a create may get fewer runs than it asked for: as many as fit
        the moment it is served, once `at_least` fit (the grant's second item says how many). A caller
        with many rows to send fills what is left of a window this way, where a full call would wait
        for the next window (another sender took the rest).

        `runs` is the number of runs the request creates (0 for a GET, 1 for a create-run, the number of
        inputs for an add-runs call). Returns at once when nobody of its kind is waiting and both fit;
        otherwise joins the queue. Cancelling the wait spends nothing and lets the next waiter move up.
        Returns the grant, to hand back once the request is answered (see the class docstring).

        Raises:
            UsageError: `runs` is negative or more than the runs budget (split the request).
        """
        if not 0 <= runs <= self._runs_budget:
            raise self._refusal(runs)
        least = runs if at_least is None or not runs else max(1, min(int(at_least), runs))
        if self._loop is None:
            self._bind()
        now = self._now()
        queue = self._creators if runs else self._readers
        trial_due = self._event is not None and (runs or not self._event[1])
        if not queue and now >= self._pause_of(runs) and not trial_due:
            self._evict(now)
            if self._fits_at(least, now) <= now:
                return self._grant(self._fitting(runs, least), now)
        return await self._wait(runs, least)

    def settle(self, grant: Grant) -> None:
        """The request of `grant` got no answer, or is answered: count its runs in the window from now.

        The server counts a request when it handles it, some time between the grant and the answer (the
        body is encoded and sent, the server parses it, maybe after other work). Counted from the grant,
        a request that reached the server late would still be in the server's window when the limiter
        lets the next one through, and earn a 429. The answer is the latest the server can have counted
        it. Only grants that spend runs are moved (they are answered at once); a long poll's GET would
        hold its request slot for minutes.
        """
        was_trial = self._settle(grant)
        if was_trial:
            self._end_trial()

    def _settle(self, grant: Grant) -> bool:
        """`settle` without waking anyone; True if `grant` was the trial (now ended)."""
        was_trial = grant is self._trial
        if was_trial:
            self._trial = None
        if grant[1] == 0:
            return was_trial
        expiry = self._now() + self._period
        try:
            self._log.remove(grant)  # O(window), once per run-creating request
        except ValueError:
            return was_trial  # expired already
        # Every entry was granted at or before now, so the log stays sorted by expiry.
        moved = (expiry, grant[1])
        self._log.append(moved)
        entry = self._sent(grant)
        if entry is not None:
            entry[2] = expiry
        try:
            self._recent.remove(grant)
        except ValueError:
            return was_trial
        self._recent.append(moved)
        return was_trial

    def succeeded(self, grant: Grant | None = None) -> None:
        """The request of `grant` was answered, not with a 429. Settles it (see `settle`).

        The first request sent after a 429's pause and accepted measures the quota (module docstring).
        """
        now = self._now()
        if now >= self._paused_until:
            self._strikes = 0  # the first answer after a pause starts the backoff over
        if grant is None:  # an answer of unknown origin (a caller that keeps no grants): maybe the trial's
            if self._trial is not None:
                self._end_trial()
            return
        self._settle(grant)  # (waiters are let go below, once what it measured is in force)
        runs = grant[1]
        if runs:
            self._splits = 0
            self._gap = self._runs_budget
            self._largest_ok = max(self._largest_ok, runs)
        event = self._event
        if event is not None and grant[0] - self._period >= event[0] and (runs or not event[1]):
            self._event = None
            self._trial = None
            if not self._measure(grant, now, event):
                # Too soon to tell: the next request goes alone too, and measures again (all of them at
                # once would only bounce off the same quota).
                self._event = (now, *event[1:])
        if self._creators or self._readers:
            self._dispatch(now)

    def rate_limited(self, retry_after: float | None = None, grant: Grant | None = None) -> None:
        """Report a 429 for `grant` (nothing was done, nothing counted: it leaves the window).

        `retry_after` is the server's Retry-After in seconds; `None` (or NaN) means it gave none. A call
        refused for its size is split (`max_runs` halves) without a pause; otherwise every sender pauses
        until now + `retry_after`, or without one for a backoff of `period / 60` doubling per consecutive
        event up to a period. 429s that arrive within `period / 60` of a counted one, or before its pause
        ends, answer requests already in flight: they are the same event.
        """
        now = self._now()
        runs = grant[1] if grant is not None else 0
        if grant is None or grant is self._trial:
            self._trial = None  # refused: the next pause is longer, and another trial follows it
        if grant is not None:
            self._give_back(grant)
        self._evict(now)
        others = self._runs_used
        if runs > 1 and others == 0 and runs > self._largest_ok and self._splits < _MAX_SPLITS:
            # Refused with nothing else of ours in the window, and larger than any call accepted: the call
            # is too big for the service's burst. Split it; the pace is not to blame.
            self._splits += 1
            self._size_refused = min(self._size_refused, runs)
            self._size = max(1, min(self._size, max(runs // 2, self._largest_ok)))
            self._learned_changed()
            if self._creators:
                self._dispatch(now)
            return
        self._splits = 0
        if runs > 1 and others and self._gaps < _MAX_GAPS and not self._measured:
            # Before anything is measured: the window held `others` of ours and this call did not fit,
            # but a smaller one may. Fill the gap (the quota may be far above `others`; calls of 1,000
            # could never tell 1,500 from 1,000) before pausing.
            self._gaps += 1
            self._gap = max(1, runs // 2)
            if self._creators:
                self._dispatch(now)
            return
        self._gap = self._runs_budget
        new_event = now >= self._quiet_until
        if new_event:
            if self._probed_at is not None and now - self._probed_at <= self._period:
                self._probe_every = min(_PROBE_MAX, self._probe_every * 2)  # the probe went too far
                self._probe_step = _PROBE_STEP
            self._probed_at = None
            self._strikes += 1
            share_requests = len(self._log) / self._requests_budget
            share_runs = others / self._runs_budget if self._runs_budget else 0.0
            self._event = (now, runs, share_requests, share_runs)
            self._last_change = now
            if self._episode is None:
                self._episode = now
        if retry_after is not None and not math.isnan(retry_after):
            # The server's word is fresh news even when the 429 is stale: honour it either way.
            until = now + max(0.0, retry_after)
        elif new_event:
            # No word from the server: a sliding window may need most of a period, a token bucket a
            # fraction of a second. Doubling from a sixtieth of the period overshoots either by 2x at most.
            until = now + min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** (self._strikes - 1)) * self._period
        else:
            until = -math.inf
        self._paused_total += max(0.0, until - max(self._paused_until, now))
        self._paused_until = max(self._paused_until, until)
        if not runs:  # a read was refused: the requests quota is spent, reads wait too (as long as creates)
            self._reads_paused_until = max(self._reads_paused_until, until, self._paused_until)
        self._quiet_until = max(
            self._quiet_until, self._paused_until, now + _COALESCE * self._period if new_event else -math.inf
        )
        if self._creators or self._readers:
            self._dispatch(now)

    def refund(self, grant: Grant) -> None:
        """The request of `grant` was never sent: give back what it spent."""
        if grant is self._trial:
            self._trial = None
        self._give_back(grant)
        if self._loop is not None and (self._creators or self._readers):
            self._dispatch(self._now())

    @property
    def waiting(self) -> int:
        """How many coroutines are blocked in `acquire` right now."""
        return self._n_waiting

    @property
    def runs_budget(self) -> float:
        """The nominal runs budget per `period` (the most runs one request may ask for)."""
        return self._runs_budget

    @property
    def requests_budget(self) -> float:
        """The nominal requests budget per `period`."""
        return self._requests_budget

    @property
    def period(self) -> float:
        """The window of the nominal budgets, in seconds."""
        return self._period

    @property
    def max_runs(self) -> int:
        """The most runs one request should ask for now: what the service was seen to accept at once."""
        return max(1, int(min(self._size, self._window_runs, self._gap, self._runs_budget)))

    @property
    def pace(self) -> float:
        """The runs rate in force as a share of the nominal one, at most 1.0."""
        if self._window is None or not self._runs_budget or self._window_runs == math.inf:
            return 1.0
        return min(1.0, (self._window_runs / self._window) / (self._runs_budget / self._period))

    @property
    def learned(self) -> dict[str, Any] | None:
        """What is known of the real quota, JSON-able (for `RateLimiter(learned=...)`); None if nothing."""
        if self._window is None and self._size >= self._runs_budget and self._size_refused == math.inf:
            return None
        return {
            "window": self._window,
            "runs": _finite(self._window_runs),
            "requests": _finite(self._window_requests),
            "size": _finite(self._size),
            "largest_accepted": self._largest_ok,
        }

    def __repr__(self) -> str:
        paused = "no"
        if self._loop is not None:  # else never used: nothing to evict, no clock to read
            now = self._now()
            self._evict(now)
            if self._paused_until > now:
                paused = f"{self._paused_until - now:.3g}s"
        learned = ""
        if self._window is not None:
            learned = (
                f", learned {len(self._recent)}/{self._window_requests:g} requests and"
                f" {self._recent_runs}/{self._window_runs:g} runs per {self._window:.3g}s"
            )
        return (
            f"<RateLimiter per {self._period:g}s: requests {len(self._log)}/{self._requests_budget:g},"
            f" runs {self._runs_used}/{self._runs_budget:g}{learned}, calls of {self.max_runs} runs,"
            f" waiting {self._n_waiting}, paused {paused}>"
        )

    def _adopt(self, on_learn: Callable[[dict[str, Any]], object] | None) -> bool:
        """Take this limiter over to the running loop from the loop it was last used on, now closed.

        A Spark task follows another on the same key in one Python worker, each on a loop of its own: the
        new task goes on with the last one's window (what the service still counts), pause and learned
        quota, where a fresh limiter would burst a full budget on top of them. Both loops must keep
        `time.monotonic()` (asyncio's own loops do; a `VirtualTimeLoop` or a custom clock does not), and
        nothing may still wait on the old one. Returns False, changing nothing, when that is not so.
        """
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is loop:
            self._on_learn = on_learn
            return True
        if (
            not _monotonic(loop)
            or (old is not None and not (old.is_closed() and _monotonic(old)))
            or not (self._clock is None or (isinstance(self._clock, LoopClock) and self._clock.loop is old))
            or any(not future.done() for future, _, _ in (*self._creators, *self._readers))
        ):
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._creators.clear()
        self._readers.clear()
        self._n_waiting = 0
        self._trial = None  # (its answer went with the old loop: after a 429, the next one is a trial)
        self._loop = self._clock = None  # bound to this loop at its next use
        self._on_learn = on_learn
        return True

    # -- internals: time and grants ---------------------------------------------------------------------

    def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = LoopClock(self._loop)

    def _now(self) -> float:
        if self._clock is None:
            self._bind()
        assert self._clock is not None
        now = self._clock.now()
        if self._last_change is None:
            self._last_change = now
        return now

    def _refusal(self, runs: int) -> UsageError:
        if runs < 0:
            return UsageError(f"runs must be 0 or more, not {runs}")
        return UsageError(
            f"a request for {runs} runs can never fit the budget of {self._runs_budget:g} runs per "
            f"{self._period:g} s; split it into smaller requests"
        )

    def _pause_of(self, runs: int) -> float:
        return self._paused_until if runs else self._reads_paused_until

    def _evict(self, now: float) -> None:
        log = self._log
        while log and log[0][0] <= now:
            self._runs_used -= log.popleft()[1]
        if self._window is not None:
            recent = self._recent
            start = now - self._window + self._period  # an entry leaves at its expiry - period + window
            while recent and recent[0][0] <= start:
                self._recent_runs -= recent.popleft()[1]

    def _grant(self, runs: int, now: float) -> Grant:
        grant = (now + self._period, runs)
        self._log.append(grant)
        self._runs_used += runs
        history = self._history
        history.append([grant[0], runs, grant[0]])
        while history[0][0] < now - (_HISTORY - 1) * self._period:
            history.popleft()
        if self._window is not None:
            self._recent.append(grant)
            self._recent_runs += runs
        return grant

    def _give_back(self, grant: Grant) -> None:
        """Take `grant` out of the windows: it was refused (a 429 is not counted), or never sent."""
        try:
            self._log.remove(grant)  # rare (a 429, a cancel racing a grant), so O(window) is fine
        except ValueError:
            return  # already expired
        self._runs_used -= grant[1]
        entry = self._sent(grant)
        if entry is not None:
            self._history.remove(entry)
        try:
            self._recent.remove(grant)
        except ValueError:
            pass
        else:
            self._recent_runs -= grant[1]

    def _sent(self, grant: Grant) -> list[Any] | None:
        """The history's entry of `grant` (looked for from the newest: grants are answered soon)."""
        for entry in reversed(self._history):
            if entry[0] == grant[0] and entry[1] == grant[1]:
                return entry
            if entry[0] < grant[0]:
                return None
        return None

    def _fitting(self, runs: int, least: int) -> int:
        """The most runs, from `least` (which fit now) up to `runs`, that fit the windows now."""
        if least >= runs:
            return runs
        free = self._runs_budget - self._runs_used
        if self._window is not None:
            free = min(free, self._window_runs - self._recent_runs)
        return int(max(least, min(runs, free)))

    def _fits_at(self, runs: int, now: float) -> float:
        """The first instant at which one request and `runs` runs fit, given what the logs hold now."""
        at = _fits(
            self._log, len(self._log), self._runs_used, runs, self._requests_budget, self._runs_budget, 0
        )
        if self._window is not None:
            at = max(
                at,
                _fits(
                    self._recent,
                    len(self._recent),
                    self._recent_runs,
                    runs,
                    self._window_requests,
                    self._window_runs,
                    self._window - self._period,
                ),
            )
        return max(at, now)

    # -- internals: what a 429 teaches ------------------------------------------------------------------

    def _measure(self, grant: Grant, now: float, event: tuple[float, int, float, float]) -> bool:
        """The first call accepted after a 429's pause: what the service let through in the span that
        ends with it. Each of our grants (of the last `_HISTORY` periods) before it may be where the
        service's window began (its expiry made room); the one that gives the highest rate is taken: the
        runs (and requests) from it to the call, over that span, a little widened, become the learned
        window."""
        sent = grant[0] - self._period
        runs = grant[1]
        _, refused_runs, share_requests, share_runs = event
        by_runs = bool(refused_runs)
        candidates: list[tuple[float, float, float, float]] = []  # (rate, span, runs, requests)
        after_runs = after_requests = 0
        longest: tuple[float, float, float] | None = None  # (span, runs, requests) back to the oldest
        for expires, spent, _ in reversed(self._history):
            t = expires - self._period
            if t >= sent:
                continue  # this call itself, or sent after it
            span = sent - t
            if span >= _MIN_SPAN * self._period and (spent or not by_runs):
                # at least the largest call accepted: one such call fits the service's window
                amount_runs = max(runs + after_runs, self._largest_ok)
                amount_requests = 1 + after_requests
                rate = (amount_runs if by_runs else amount_requests) / span
                candidates.append((rate, span, amount_runs, amount_requests))
                longest = (span, runs + after_runs, 1 + after_requests)
            after_runs += spent
            after_requests += 1
        best = None
        if candidates:
            # The fastest span; of spans about as fast, the shortest: the smallest burst that keeps the
            # pace (a token bucket looks the same over every span, and a long window lets big bursts).
            top = max(c[0] for c in candidates)
            best = min((c for c in candidates if c[0] >= top * (1 - _MARGIN)), key=lambda c: c[1])
        if best is None or longest is None:
            # Too soon, or nothing of ours in the window (the quota went to someone else). What went
            # through since the trouble began is all there is to go by, for now.
            start = self._episode
            if start is None or sent <= start:
                return best is None and start is None  # nothing of ours to go by: the pause did its work
            through = [
                r for e, r, _c in self._history if start <= e - self._period < sent and (r or not by_runs)
            ]
            if len(through) < _MIN_CALLS:
                return False  # too few to tell a rate
            amount = (sum(through) + runs) if by_runs else (len(through) + 1)
            span = sent - start
            stretch = max(1.0, _MIN_SPAN * self._period / span)  # the same rate over a useful window
            best = (0.0, span * stretch, amount * stretch, (len(through) + 1) * stretch)
            longest = (0.0, 0, 0)
        else:
            self._episode = None
        self._measured = True
        rate, span, amount_runs, amount_requests = best
        # A burst the service allowed (a full token bucket) makes a short span look fast. The rate is no
        # more than what it let through since an earlier measurement (a moment it was just as full),
        # nor than the average over everything of ours in the history looked back on.
        cap = math.inf
        long_span, long_runs, long_requests = longest
        if long_span >= self._period:
            cap = (long_runs if by_runs else long_requests) / long_span
        marks = [m for m in self._marks if m[0] < sent]
        if marks:
            mark, paused = next((m for m in marks if sent - m[0] >= _MIN_SPAN * self._period), marks[-1])
            between = [
                r for e, r, _c in self._history if mark < e - self._period < sent and (r or not by_runs)
            ]
            sending = (sent - mark) - (self._paused_total - paused)  # the time we were not paused
            if len(between) >= _MIN_CALLS and sending > 0:  # else too few calls to tell a rate
                since = sum(between) if by_runs else len(between)
                cap = min(cap, (since + (runs if by_runs else 1)) / sending)
        if cap < rate:
            amount_runs = max(1.0, amount_runs * cap / rate)
            amount_requests = max(1.0, amount_requests * cap / rate)
        self._marks.append((sent, self._paused_total))
        while self._marks and self._marks[0][0] < sent - _HISTORY * self._period:
            self._marks.popleft()
        window = span * (1 + _MARGIN)
        old = self._window
        scale = window / old if old is not None else 1.0
        self._window = window
        runs_cap = self._window_runs * scale
        requests_cap = self._window_requests * scale
        if by_runs:
            runs_cap = amount_runs
        # The requests quota is to blame when a read was refused, or a create of one run while our
        # requests filled more of their budget than our runs did (runs mode); never for an add of many.
        if not by_runs or (refused_runs == 1 and share_requests >= share_runs):
            requests_cap = amount_requests
        self._window_runs = max(1.0, runs_cap)
        self._window_requests = max(1.0, requests_cap)
        self._rebuild_recent(now)
        self._last_change = now
        self._learned_changed()
        return True

    def _rebuild_recent(self, now: float) -> None:
        assert self._window is not None
        start = now - self._window + self._period
        # From the history (the main log forgets what is older than a period, and a learned window may
        # be longer), each grant as counted: a request answered late may still be in the service's window.
        self._recent = deque(sorted((e[2], e[1]) for e in self._history if e[2] > start))
        self._recent_runs = sum(r for _, r in self._recent)

    def _probe(self, now: float) -> bool:
        """Raise the learned limits a step when no 429 came for `_probe_every` periods; True if raised.

        A probe followed by a 429 within a period failed: the next waits twice as long (up to 16
        periods) and steps by 10% again, so a job at its quota rarely hears a 429. A probe that led to
        none makes the next come twice as soon (down to one period) and step further (up to 2x), so a
        job whose neighbour on the key went away, or that measured its quota low, gets it back quickly."""
        assert self._last_change is not None
        if now - self._last_change < self._probe_every * self._period or self.learned is None:
            return False
        if self._probed_at is not None:  # the last probe was not refused: probe sooner, further
            self._probe_every = max(_PROBE_MIN, self._probe_every / 2)
            self._probe_step = min(_PROBE_STEP_MAX, 1 + (self._probe_step - 1) * 1.5)
        self._probed_at = now
        self._last_change = now
        if self._window is not None:
            # The same amounts in a shorter window: a faster pace that calls of the same size can use.
            self._window /= self._probe_step
            nominal_runs = self._runs_budget * self._window / self._period
            nominal_requests = self._requests_budget * self._window / self._period
            if self._window_runs >= nominal_runs and self._window_requests >= nominal_requests:
                self._window = None  # back to the nominal budgets
                self._window_runs = self._window_requests = math.inf
                self._recent.clear()
                self._recent_runs = 0
        self._size = min(self._runs_budget, self._size * 2, max(1.0, self._size_refused - 1))
        self._learned_changed()
        return True

    def _restore(self, learned: Mapping[str, Any]) -> None:
        def number(name: str) -> float | None:
            value = learned.get(name)
            return float(value) if isinstance(value, (int, float)) and value > 0 else None

        window = number("window")
        if window is not None:
            self._window = window
            self._window_runs = number("runs") or math.inf
            self._window_requests = number("requests") or math.inf
            self._measured = True
        if (size := number("size")) is not None:
            self._size = max(1, min(self._runs_budget, size))
        if (largest := number("largest_accepted")) is not None:
            self._largest_ok = int(largest)

    def _end_trial(self) -> None:
        self._trial = None
        if self._loop is not None and (self._creators or self._readers):
            self._dispatch(self._now())

    def _learned_changed(self) -> None:
        if self._on_learn is not None:
            learned = self.learned
            self._on_learn(learned if learned is not None else {})

    # -- internals: queues --------------------------------------------------------------------------

    async def _wait(self, runs: int, least: int) -> Grant:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(f"{self!r} is bound to a different event loop")
        future: asyncio.Future[Grant] = loop.create_future()
        waiter = (future, runs, least)
        queue = self._creators if runs else self._readers
        queue.append(waiter)
        self._n_waiting += 1
        try:
            if len(queue) == 1:
                self._dispatch(self._now())
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted, then cancelled before this task resumed: the request was never sent.
                self._give_back(future.result())
                self._dispatch(self._now())
            elif queue and queue[0] is waiter:
                self._dispatch(self._now())  # the head left: the next waiter may fit sooner
            raise
        finally:
            self._n_waiting -= 1

    def _dispatch(self, now: float) -> None:
        """Serve both queues from their heads while they fit; then set a timer for the sooner head."""
        self._evict(now)
        wake = math.inf
        queues = ((self._readers, self._reads_paused_until), (self._creators, self._paused_until))
        for queue, paused in queues:
            while queue:
                future, runs, least = queue[0]
                if future.done():  # cancelled
                    queue.popleft()
                    continue
                at = self._fits_at(least, now)
                if at > now and now >= paused and self._probe(now):
                    at = self._fits_at(least, now)  # waiting for budget with no 429 in a long while
                at = max(paused, at)
                if at > now:
                    wake = min(wake, at)
                    break
                trial = self._event is not None and (runs or not self._event[1])
                if trial and self._trial is not None:
                    give_up = self._trial[0]  # a trial unanswered for a period is not waited for
                    if give_up > now:
                        wake = min(wake, give_up)
                        break  # a trial is out: the others wait for its answer
                    self._trial = None
                queue.popleft()
                grant = self._grant(self._fitting(runs, least), now)
                if trial:
                    self._trial = grant
                future.set_result(grant)
        if wake < math.inf:
            self._arm(wake)
        else:
            self._disarm()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_when == when:
                return
            self._timer.cancel()
        assert self._clock is not None
        self._timer_when = when
        self._timer = self._clock.call_at(when, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # asyncio may run a timer up to one clock resolution early (1 ns on Linux). Then nothing has
        # expired yet by the clock, and _dispatch simply sets the timer again for the same instant.
        self._timer = None
        self._dispatch(self._now())


def _monotonic(loop: asyncio.AbstractEventLoop) -> bool:
    """The loop's time is `time.monotonic()`, as every asyncio loop's is unless it overrides `time()`."""
    return type(loop).time is asyncio.BaseEventLoop.time


def _fits(
    log: deque[tuple[float, int]],
    n: int,
    used: int,
    runs: int,
    requests_cap: float,
    runs_cap: float,
    leaves_after: float,
) -> float:
    """The instant one request and `runs` runs fit a window holding `log` (entries (expiry, runs) in the
    order they leave, each at its expiry + `leaves_after`), `n` requests and `used` runs; -inf when they
    fit now. A request for more runs than `runs_cap` fits a window that holds no other runs."""
    runs_cap = max(runs_cap, runs)
    if n + 1 <= requests_cap and used + runs <= runs_cap:
        return -math.inf
    # Walk the log oldest first: each entry this passes over leaves before the waiter can go, so the
    # walk is paid for by evictions that follow (amortised O(1) per request).
    for t, spent in log:
        n -= 1
        used -= spent
        if n + 1 <= requests_cap and used + runs <= runs_cap:
            return t + leaves_after
    raise AssertionError("unreachable: an empty window fits any request")  # pragma: no cover


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


class _JumpSelector(selectors.DefaultSelector):
    """Polls for I/O without blocking; where the loop would sleep, it asks the loop to jump instead."""

    def __init__(self, jump: Callable[[float], None]) -> None:
        super().__init__()
        self._jump = jump

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            # Nothing ready and no timer pending: only real I/O (or a thread) can wake the loop.
            ready = super().select(VirtualTimeLoop.deadlock_after)
            if not ready:
                raise RuntimeError(
                    "VirtualTimeLoop: every task is waiting and no timer is pending (deadlock)"
                )
            return ready
        self._jump(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: whenever every task is waiting, time jumps to the next timer.

    `time()` starts at 0.0 and only moves by jumps, so `asyncio.sleep(3600)` returns at once with
    `loop.time()` 3600 s later, and every timer fires at exactly its instant. Made for tests and benchmarks
    of timer-driven code (the limiter, backoff): minutes of waiting run in milliseconds. I/O still works
    but does not hold time back, so do not use it for code that waits on real sockets. If every task waits
    with no timer pending and no I/O arrives within `deadlock_after` real seconds (default 1.0), the loop
    raises `RuntimeError` instead of hanging.

    Example:
        >>> with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        ...     runner.run(asyncio.sleep(60))  # returns immediately
    """

    deadlock_after: float = 1.0

    def __init__(self) -> None:
        self._virtual_now = 0.0
        self._wakeups: list[float] = []  # every instant ever passed to call_at, as a heap
        super().__init__(_JumpSelector(self._jump))

    def time(self) -> float:
        return self._virtual_now

    def call_at(
        self,
        when: float,
        callback: Callable[[*_Ts], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        heapq.heappush(self._wakeups, when)
        return super().call_at(when, callback, *args, context=context)

    def _jump(self, timeout: float) -> None:
        now = self._virtual_now
        wakeups = self._wakeups
        while wakeups and wakeups[0] <= now:
            heapq.heappop(wakeups)
        target = now + timeout
        # The loop asked to sleep until its next timer; land on that timer's exact instant, so float
        # rounding in (when - now) + now never leaves time a hair short of it. A cancelled timer's
        # instant may come first: landing there just costs one more loop iteration.
        if wakeups and wakeups[0] <= target + 1e-6:
            target = wakeups[0]
        self._virtual_now = max(now, target)
