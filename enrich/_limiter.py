"""The per-key rate limiter: an exact sliding window over two budgets, slowed down by 429s.

One `RateLimiter` is shared by every request made with one API key. Each request spends one unit of the
*requests* budget and, if it creates runs, that many units of the *runs* budget (an add-runs call with 1,000
inputs spends 1,000; a create-run spends 1; a GET spends 0). Both budgets hold over every window of `period`
seconds, not on average: the limiter keeps a log of what it granted and when, and a request is let through
only when it fits in the window that ends now. Waiters queue in arrival order and are woken by a timer set
for the exact instant the window has room for the first of them; nothing polls.

When the server answers 429 anyway (another process shares the key, or the server counts differently), the
limiter pauses every sender and lowers its pace; successes bring the pace back. See `RateLimiter` for the
constants.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVarTuple

from ._exceptions import UsageError

__all__ = ["Cancellable", "Clock", "LoopClock", "RateLimiter", "VirtualTimeLoop"]

_Ts = TypeVarTuple("_Ts")

# The adaptive policy (see RateLimiter's docstring).
_DECREASE_FACTOR = 0.5  # pace × this on each congestion event
_MIN_PACE = 0.05  # the pace never drops below 5% of the nominal budgets
_RECOVERY_STEP = 0.02  # + 2% of nominal per recovery interval with a success in it
_RECOVERY_PERIODS = 1 / 30  # the recovery interval, as a share of `period` (2 s at the default 60 s)
_COALESCE_SECONDS = 1.0  # 429s within this long of a counted one (or during its pause) are the same event
_BACKOFF_BASE = 1.0  # seconds of pause for a 429 without Retry-After; doubles per consecutive event
_BACKOFF_CAP = 60.0  # ... up to this many seconds


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
    """Keeps the requests of one API key within two per-window budgets, exactly.

    Args:
        requests_per_minute: the requests budget: at most this many requests in any window of `period`
            seconds (default 2,000; at least 1; `math.inf` for no limit).
        runs_per_minute: the runs budget: at most this many runs created in any window of `period` seconds
            (default 2,000; `math.inf` for no limit). The names say "minute" because `period` defaults to
            60 s; the budgets are per `period`.
        period: the window length in seconds (default 60.0). Tests and benchmarks scale it down.
        clock: where time comes from (default: the running event loop's clock, bound at the first
            `acquire`; the limiter can be built outside any loop, then used inside exactly one).

    Guarantee: for every window [t, t + period), the requests granted in it number at most the requests
    budget and the runs they spend sum to at most the runs budget. It is a sliding log of (expiry, runs),
    not a token bucket: no burst on top of the rate. With many waiters the whole budget is used, since a
    waiter is let through at the very instant enough of the log expires.

    Fairness: waiters are served strictly in arrival order. A big add-runs request at the head holds back
    the small ones behind it until it fits, so it can never be starved or overtaken.

    A request for more runs than the runs budget raises `UsageError` (a `ValueError`): it could never fit.
    A request that fits the nominal budget but not the reduced one (see the pace below) goes when the window
    holds no other runs: it then briefly exceeds the reduced budget, never the nominal one.

    Adaptive pace (multiplicative decrease, additive increase):

    * `rate_limited(retry_after)` pauses every sender until now + `retry_after` seconds, or without one,
      for 1 s doubling per consecutive 429 up to 60 s. The first 429 of a congestion event also halves the
      pace (floor 5% of nominal); the effective budgets are the nominal ones × the pace. 429s that arrive
      within 1 s of a counted one, or before its pause ends, answer requests that were already in flight:
      they count as the same event (no further halving, no longer backoff) and extend the pause only if
      they carry a longer Retry-After.
    * `succeeded()` raises the pace by 2% of nominal at most once per `period / 30` seconds (2 s at the
      default period), counted from the last change, up to 100%: from 50% back to 100% in 50 s. Successes
      that arrive during a pause are ignored (their requests were sent before it). The first success
      after a pause also resets the backoff to 1 s.

    Example:
        >>> limiter = RateLimiter(requests_per_minute=2000, runs_per_minute=2000)
        >>> async def add_runs(inputs):
        ...     await limiter.acquire(runs=len(inputs))
        ...     response = await send(inputs)
        ...     if response.status_code == 429:
        ...         limiter.rate_limited(retry_after_seconds(response))
        ...     else:
        ...         limiter.succeeded()
    """

    __slots__ = (
        "_clock",
        "_log",
        "_loop",
        "_n_waiting",
        "_pace",
        "_pace_changed_at",
        "_paused_until",
        "_period",
        "_quiet_until",
        "_recovery_interval",
        "_requests_budget",
        "_requests_cap",
        "_runs_budget",
        "_runs_cap",
        "_runs_used",
        "_strikes",
        "_timer",
        "_timer_when",
        "_waiters",
    )

    def __init__(
        self,
        requests_per_minute: float = 2000,
        runs_per_minute: float = 2000,
        *,
        period: float = 60.0,
        clock: Clock | None = None,
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
        self._recovery_interval = self._period * _RECOVERY_PERIODS
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        # The sliding log: (expiry, runs) per granted request, in expiry order. Its length is the number of
        # requests in the window; `_runs_used` is the sum of its runs.
        self._log: deque[tuple[float, int]] = deque()
        self._runs_used = 0
        # Waiters in arrival order: (future, runs). A cancelled waiter stays until it reaches the head.
        self._waiters: deque[tuple[asyncio.Future[tuple[float, int]], int]] = deque()
        self._n_waiting = 0
        self._timer: Cancellable | None = None
        self._timer_when = 0.0
        self._paused_until = -math.inf
        self._quiet_until = -math.inf
        self._strikes = 0
        self._pace = 1.0
        self._pace_changed_at = -math.inf
        self._requests_cap = self._requests_budget
        self._runs_cap = self._runs_budget

    # -- the public surface ---------------------------------------------------------------------------

    async def acquire(self, runs: int = 0) -> tuple[float, int]:
        """Wait until one request and `runs` runs fit both budgets, then spend them.

        `runs` is the number of runs the request creates (0 for a GET, 1 for a create-run, the number of
        inputs for an add-runs call). Returns at once when nobody is waiting and both fit; otherwise joins
        the queue. Cancelling the wait spends nothing and lets the next waiter move up. Returns the grant,
        to hand to `settle()` once the request is answered.

        Raises:
            UsageError: `runs` is negative or more than the runs budget (split the request).
        """
        if not 0 <= runs <= self._runs_budget:
            raise self._refusal(runs)
        if self._loop is None:
            self._bind()
        now = self._now()
        if not self._waiters and now >= self._paused_until:
            log = self._log
            while log and log[0][0] <= now:
                self._runs_used -= log.popleft()[1]
            if len(log) + 1 <= self._requests_cap and self._runs_used + runs <= max(self._runs_cap, runs):
                grant = (now + self._period, runs)
                log.append(grant)
                self._runs_used += runs
                return grant
        return await self._wait(runs)

    def settle(self, grant: tuple[float, int]) -> None:
        """The request of `grant` was answered: count its runs in the window from now, not from the grant.

        The server counts a request when it handles it, some time between the grant and the answer (the
        body is encoded and sent, the server parses it, maybe after other work). Counted from the grant,
        a request that reached the server late would still be in the server's window when the limiter
        lets the next one through, and earn a 429. The answer is the latest the server can have counted
        it. Only grants that spend runs are moved (they are answered at once); a long poll's GET would
        hold its request slot for minutes.
        """
        if grant[1] == 0:
            return
        try:
            self._log.remove(grant)  # O(window), once per run-creating request
        except ValueError:
            return  # expired already
        # Every entry was granted at or before now, so the log stays sorted by expiry.
        self._log.append((self._now() + self._period, grant[1]))

    def rate_limited(self, retry_after: float | None = None) -> None:
        """Report a 429: pause every sender and, once per congestion event, halve the pace.

        `retry_after` is the server's Retry-After in seconds; `None` (or NaN) means it gave none, and the
        pause is the exponential backoff instead (1 s, 2 s, 4 s, ... up to 60 s per consecutive event).
        """
        now = self._now()
        new_event = now >= self._quiet_until
        if new_event:
            self._strikes += 1
            self._set_pace(max(_MIN_PACE, self._pace * _DECREASE_FACTOR), now)
        if retry_after is not None and not math.isnan(retry_after):
            # The server's word is fresh news even when the 429 is stale: honour it either way.
            self._paused_until = max(self._paused_until, now + max(0.0, retry_after))
        elif new_event:
            delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** (self._strikes - 1))
            self._paused_until = max(self._paused_until, now + delay)
        self._quiet_until = max(
            self._quiet_until, self._paused_until, now + _COALESCE_SECONDS if new_event else -math.inf
        )
        if self._waiters:
            self._dispatch(now)

    def succeeded(self) -> None:
        """Report a non-429 answer: recover the pace by one step if a recovery interval has passed."""
        if self._strikes == 0 and self._pace >= 1.0:
            return
        now = self._now()
        if now < self._paused_until:
            return
        self._strikes = 0
        if self._pace < 1.0 and now - self._pace_changed_at >= self._recovery_interval:
            self._set_pace(min(1.0, round(self._pace + _RECOVERY_STEP, 9)), now)
            if self._waiters:
                self._dispatch(now)

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
    def pace(self) -> float:
        """The current share of the nominal budgets in force, from 0.05 to 1.0."""
        return self._pace

    def __repr__(self) -> str:
        paused = "no"
        if self._loop is not None:  # else never used: nothing to evict, no clock to read
            now = self._now()
            self._evict(now)
            if self._paused_until > now:
                paused = f"{self._paused_until - now:.3g}s"
        return (
            f"<RateLimiter per {self._period:g}s: requests {len(self._log)}/{self._requests_cap:g}"
            f" (nominal {self._requests_budget:g}), runs {self._runs_used}/{self._runs_cap:g}"
            f" (nominal {self._runs_budget:g}), pace {self._pace:.0%}, waiting {self._n_waiting},"
            f" paused {paused}>"
        )

    # -- internals ----------------------------------------------------------------------------------

    def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = LoopClock(self._loop)

    def _now(self) -> float:
        if self._clock is None:
            self._bind()
        assert self._clock is not None
        return self._clock.now()

    def _refusal(self, runs: int) -> UsageError:
        if runs < 0:
            return UsageError(f"runs must be 0 or more, not {runs}")
        return UsageError(
            f"a request for {runs} runs can never fit the budget of {self._runs_budget:g} runs per "
            f"{self._period:g} s; split it into smaller requests"
        )

    def _set_pace(self, pace: float, now: float) -> None:
        self._pace = pace
        self._pace_changed_at = now
        self._requests_cap = max(1.0, self._requests_budget * pace)
        self._runs_cap = self._runs_budget * pace

    def _evict(self, now: float) -> None:
        log = self._log
        while log and log[0][0] <= now:
            self._runs_used -= log.popleft()[1]

    def _fits_at(self, runs: int, now: float) -> float:
        """The first instant at which one request and `runs` runs fit, given what the log holds now."""
        requests_cap = self._requests_cap
        runs_cap = max(self._runs_cap, runs)  # an oversized request fits an otherwise empty window
        n = len(self._log)
        used = self._runs_used
        if n + 1 <= requests_cap and used + runs <= runs_cap:
            return now
        # Walk the log oldest first: each entry this passes over expires before the waiter can go, so the
        # walk is paid for by evictions that follow (amortised O(1) per request).
        for expires, spent in self._log:
            n -= 1
            used -= spent
            if n + 1 <= requests_cap and used + runs <= runs_cap:
                return expires
        raise AssertionError("unreachable: an empty window fits any request")  # pragma: no cover

    async def _wait(self, runs: int) -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(f"{self!r} is bound to a different event loop")
        future: asyncio.Future[tuple[float, int]] = loop.create_future()
        waiter = (future, runs)
        self._waiters.append(waiter)
        self._n_waiting += 1
        try:
            if len(self._waiters) == 1:
                self._dispatch(self._now())
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted, then cancelled before this task resumed: the request was never sent.
                self._refund(future.result())
                self._dispatch(self._now())
            elif self._waiters and self._waiters[0] is waiter:
                self._dispatch(self._now())  # the head left: the next waiter may fit sooner
            raise
        finally:
            self._n_waiting -= 1

    def _refund(self, grant: tuple[float, int]) -> None:
        try:
            self._log.remove(grant)  # rare (a cancel racing a grant), so O(window) is fine
        except ValueError:
            return  # already expired
        self._runs_used -= grant[1]

    def _dispatch(self, now: float) -> None:
        """Serve waiters from the head while they fit; then set a timer for when the head will fit."""
        self._evict(now)
        waiters = self._waiters
        while waiters:
            future, runs = waiters[0]
            if future.done():  # cancelled
                waiters.popleft()
                continue
            at = max(self._paused_until, self._fits_at(runs, now))
            if at > now:
                self._arm(at)
                return
            waiters.popleft()
            grant = (now + self._period, runs)
            self._log.append(grant)
            self._runs_used += runs
            future.set_result(grant)
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
