"""RateLimiter: exact sliding-window budgets, FIFO, cancellation, 429 pacing. All on virtual time."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enrich._limiter import Clock, LoopClock, RateLimiter, VirtualTimeLoop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on virtual time: the loop's clock starts at 0.0 and jumps to the next timer."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def now() -> float:
    return asyncio.get_running_loop().time()


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - now()))


async def grab(limiter: RateLimiter, runs: int, log: list[tuple[float, Any]], tag: Any, start: float = 0.0):
    """Start at `start`, acquire, and log (time granted, tag)."""
    await sleep_until(start)
    await limiter.acquire(runs)
    log.append((now(), tag))


async def settle() -> None:
    """Let every ready task run without letting virtual time move."""
    for _ in range(10):
        await asyncio.sleep(0)


def max_in_window(grants: Sequence[tuple[float, float]], period: float) -> float:
    """The largest total weight of the (time, weight) grants in any window [t, t + period)."""
    grants = sorted(grants)
    best = total = 0.0
    lo = 0
    for hi, (t, weight) in enumerate(grants):
        total += weight
        while grants[lo][0] + period <= t:
            total -= grants[lo][1]
            lo += 1
        best = max(best, total)
        assert hi >= lo
    return best


@dataclass
class RecordingClock:
    """A Clock on the loop's time plus `offset`, recording every wake-up asked for and running hooks
    right after each one fires."""

    loop: asyncio.AbstractEventLoop
    offset: float = 0.0
    wakeups: list[float] = field(default_factory=list)
    after_fire: list[Callable[[], object]] = field(default_factory=list)

    def now(self) -> float:
        return self.loop.time() + self.offset

    def call_at(self, when: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        self.wakeups.append(when)

        def fire() -> None:
            callback()
            for hook in self.after_fire:
                hook()

        return self.loop.call_at(when - self.offset, fire)


# -- the budgets ---------------------------------------------------------------------------------------


def test_requests_budget_is_a_sliding_window() -> None:
    async def main() -> list[float]:
        limiter = RateLimiter(requests_per_minute=10, runs_per_minute=math.inf)
        log: list[tuple[float, Any]] = []
        async with asyncio.TaskGroup() as tg:
            for i in range(25):
                tg.create_task(grab(limiter, 0, log, i))
        return [t for t, _ in log]

    assert run(main()) == [0.0] * 10 + [60.0] * 10 + [120.0] * 5


def test_a_grant_leaves_the_window_at_exactly_period_seconds() -> None:
    async def main() -> list[tuple[float, Any]]:
        limiter = RateLimiter(requests_per_minute=1)
        log: list[tuple[float, Any]] = []
        await grab(limiter, 0, log, "first")
        await grab(limiter, 0, log, "a hair early", start=60.0 - 1e-9)
        await grab(limiter, 0, log, "on the dot", start=180.0)
        return log

    assert run(main()) == [(0.0, "first"), (60.0, "a hair early"), (180.0, "on the dot")]


def test_window_slides_with_each_grant_not_in_fixed_buckets() -> None:
    # Grants at 0, 30, 45 with a budget of 3: the 4th may go only when the one from t=0 leaves, at 60,
    # and the 5th only when the one from t=30 leaves, at 90.
    async def main() -> list[float]:
        limiter = RateLimiter(requests_per_minute=3)
        log: list[tuple[float, Any]] = []
        async with asyncio.TaskGroup() as tg:
            for i, start in enumerate([0, 30, 45, 50, 51]):
                tg.create_task(grab(limiter, 0, log, i, start))
        return [t for t, _ in log]

    assert run(main()) == [0.0, 30.0, 45.0, 60.0, 90.0]


def test_runs_budget_spends_the_runs_and_gets_spend_none() -> None:
    async def main() -> list[tuple[float, Any]]:
        limiter = RateLimiter(requests_per_minute=1000, runs_per_minute=100)
        log: list[tuple[float, Any]] = []
        await grab(limiter, 40, log, "a")
        await grab(limiter, 40, log, "b")
        for i in range(5):
            await grab(limiter, 0, log, f"get{i}")  # GETs do not touch the runs budget
        await grab(limiter, 20, log, "c")  # 100 exactly: fits
        await grab(limiter, 1, log, "d")  # 101: waits for a's 40 to leave
        await grab(limiter, 40, log, "e")  # 61 + 40 = 101: waits for b's 40 too
        return log

    assert run(main()) == [
        (0.0, "a"),
        (0.0, "b"),
        *[(0.0, f"get{i}") for i in range(5)],
        (0.0, "c"),
        (60.0, "d"),
        (60.0, "e"),
    ]


def test_both_budgets_bind() -> None:
    # 3 requests per window, 10 runs: one-run requests hit the request budget, big ones the runs budget.
    async def main() -> list[float]:
        limiter = RateLimiter(requests_per_minute=3, runs_per_minute=10, period=6.0)
        log: list[tuple[float, Any]] = []
        for runs in [1, 1, 1, 1, 9, 9]:
            await grab(limiter, runs, log, runs)
        return [t for t, _ in log]

    # The 4th waits for a request to leave; the 5th then fits (1 + 9 runs); the 6th waits for runs only.
    assert run(main()) == [0.0, 0.0, 0.0, 6.0, 6.0, 12.0]


def test_more_runs_than_the_budget_is_refused() -> None:
    async def main() -> None:
        limiter = RateLimiter(runs_per_minute=100)
        with pytest.raises(ValueError, match=r"101 runs can never fit the budget of 100 runs per 60 s"):
            await limiter.acquire(101)
        with pytest.raises(ValueError, match="0 or more"):
            await limiter.acquire(-1)
        await limiter.acquire(100)  # exactly the budget is fine
        assert limiter.waiting == 0

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": math.nan}, "requests_per_minute"),
        ({"runs_per_minute": -1}, "runs_per_minute"),
        ({"period": 0}, "period"),
        ({"period": math.inf}, "period"),
    ],
)
def test_bad_budgets_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimiter(**kwargs)


@dataclass(frozen=True)
class Job:
    start: float
    runs: int
    patience: float | None  # give up (cancel) after this long; None waits forever


jobs = st.builds(
    Job,
    start=st.floats(0, 30).map(lambda t: round(t, 1)),
    runs=st.integers(0, 12),
    patience=st.one_of(st.none(), st.floats(0, 20)),
)


@settings(max_examples=100, deadline=None)
@given(
    requests=st.integers(1, 8),
    runs_budget=st.integers(12, 30),
    tasks=st.lists(st.lists(jobs, min_size=1, max_size=8), min_size=1, max_size=5),
    congestion=st.lists(st.tuples(st.floats(0, 40), st.none() | st.floats(0, 5)), max_size=3),
)
def test_no_window_ever_holds_more_than_either_budget(
    requests: int, runs_budget: int, tasks: list[list[Job]], congestion: list[tuple[float, float | None]]
) -> None:
    period = 10.0

    async def main() -> tuple[list[tuple[float, int]], int, int]:
        limiter = RateLimiter(requests, runs_budget, period=period)
        granted: list[tuple[float, int]] = []
        cancelled = 0

        async def worker(plan: list[Job]) -> None:
            nonlocal cancelled
            for job in plan:
                await sleep_until(job.start)
                try:
                    async with asyncio.timeout(job.patience):
                        await limiter.acquire(job.runs)
                except TimeoutError:
                    cancelled += 1
                    continue
                granted.append((now(), job.runs))
                limiter.succeeded()

        async def server(t: float, retry_after: float | None) -> None:
            await sleep_until(t)
            limiter.rate_limited(retry_after)

        async with asyncio.TaskGroup() as tg:
            for plan in tasks:
                tg.create_task(worker(plan))
            for t, retry_after in congestion:
                tg.create_task(server(t, retry_after))
        assert limiter.waiting == 0
        return granted, cancelled, sum(len(plan) for plan in tasks)

    granted, cancelled, total = run(main())
    assert len(granted) + cancelled == total
    assert max_in_window([(t, 1) for t, _ in granted], period) <= requests
    assert max_in_window(granted, period) <= runs_budget


def test_many_waiters_use_at_least_97_percent_of_the_budget() -> None:
    period, periods = 60.0, 10
    rng = random.Random(7)
    weights = [rng.choice([1, 1, 1, 2, 5, 20, 100]) for _ in range(10_000)]

    async def main(runs_of: Callable[[int], int], budget: tuple[int, int]) -> list[tuple[float, int]]:
        limiter = RateLimiter(*budget, period=period)
        granted: list[tuple[float, int]] = []
        counter = iter(range(10**9))

        async def waiter() -> None:
            while now() < period * periods:
                runs = runs_of(next(counter))
                await limiter.acquire(runs)
                granted.append((now(), runs))

        async with asyncio.TaskGroup() as tg:
            for _ in range(200):
                tg.create_task(waiter())
        return [(t, r) for t, r in granted if t < period * periods]

    # Requests bound: GETs only.
    granted = run(main(lambda i: 0, (500, 500)))
    assert len(granted) / (500 * periods) >= 0.97
    assert max_in_window([(t, 1) for t, _ in granted], period) <= 500
    # Runs bound: a mix of small and 100-run requests.
    granted = run(main(lambda i: weights[i % len(weights)], (2000, 1000)))
    share = sum(r for _, r in granted) / (1000 * periods)
    assert share >= 0.97, share
    assert max_in_window(granted, period) <= 1000
    assert max_in_window([(t, 1) for t, _ in granted], period) <= 2000


# -- fairness and cancellation -------------------------------------------------------------------------


def test_waiters_are_served_in_arrival_order() -> None:
    async def main() -> list[Any]:
        limiter = RateLimiter(requests_per_minute=3)
        log: list[tuple[float, Any]] = []
        async with asyncio.TaskGroup() as tg:
            for i in range(12):
                tg.create_task(grab(limiter, 0, log, i, start=i * 0.5))
        return log

    log = run(main())
    assert [tag for _, tag in log] == list(range(12))
    assert [t for t, _ in log] == [0.0, 0.5, 1.0, 60.0, 60.5, 61.0, 120.0, 120.5, 121.0, 180.0, 180.5, 181.0]


def test_a_big_request_is_not_overtaken_by_small_ones() -> None:
    async def main() -> list[tuple[float, Any]]:
        limiter = RateLimiter(requests_per_minute=1000, runs_per_minute=100)
        log: list[tuple[float, Any]] = []
        await grab(limiter, 60, log, "first")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(grab(limiter, 100, log, "big"))
            for i in range(3):
                # These would fit at once (60 + 1 <= 100), but the big one came first.
                tg.create_task(grab(limiter, 1, log, f"small{i}", start=1.0 + i))
        return log

    assert run(main()) == [
        (0.0, "first"),
        (60.0, "big"),
        (120.0, "small0"),
        (120.0, "small1"),
        (120.0, "small2"),
    ]


def test_cancelling_a_waiter_spends_nothing_and_moves_the_queue_up() -> None:
    async def main() -> tuple[list[tuple[float, Any]], list[int]]:
        limiter = RateLimiter(requests_per_minute=1)
        log: list[tuple[float, Any]] = []
        await limiter.acquire()  # the window is full until t=60
        a = asyncio.create_task(grab(limiter, 0, log, "a"))
        b = asyncio.create_task(grab(limiter, 0, log, "b"))
        c = asyncio.create_task(grab(limiter, 0, log, "c"))
        d = asyncio.create_task(grab(limiter, 0, log, "d"))
        await settle()
        seen = [limiter.waiting]
        await sleep_until(10)
        a.cancel()  # the head
        c.cancel()  # one in the middle
        await settle()
        seen.append(limiter.waiting)
        await asyncio.gather(b, d)
        for task in (a, c):
            assert task.cancelled()
        seen.append(limiter.waiting)
        return log, seen

    log, seen = run(main())
    assert log == [(60.0, "b"), (120.0, "d")]
    assert seen == [4, 2, 0]


def test_cancelling_a_big_head_lets_the_small_ones_behind_it_go_at_once() -> None:
    async def main() -> list[tuple[float, Any]]:
        limiter = RateLimiter(requests_per_minute=100, runs_per_minute=100)
        log: list[tuple[float, Any]] = []
        await grab(limiter, 60, log, "first")
        big = asyncio.create_task(grab(limiter, 100, log, "big"))  # would go at t=60
        gets = asyncio.gather(*(grab(limiter, 0, log, f"get{i}") for i in range(2)))
        await sleep_until(10.0)
        big.cancel()
        await gets
        return log

    assert run(main()) == [(0.0, "first"), (10.0, "get0"), (10.0, "get1")]


def test_cancel_after_the_grant_but_before_resuming_refunds_it() -> None:
    # The timer grants `a` at t=60, and `a` is cancelled in the same instant, before it resumes: its
    # request was never sent, so `b` must get the slot at t=60 rather than t=120.
    async def main() -> tuple[list[tuple[float, Any]], str]:
        clock = RecordingClock(asyncio.get_running_loop())
        limiter = RateLimiter(requests_per_minute=1, runs_per_minute=10, clock=clock)
        log: list[tuple[float, Any]] = []
        await limiter.acquire(3)
        a = asyncio.create_task(grab(limiter, 7, log, "a"))
        b = asyncio.create_task(grab(limiter, 10, log, "b"))
        await settle()
        clock.after_fire.append(lambda: a.cancel() if not log else None)
        await b
        with pytest.raises(asyncio.CancelledError):
            await a
        return log, repr(limiter)

    log, state = run(main())
    assert log == [(60.0, "b")]
    assert "requests 1/1 " in state and "runs 10/10 " in state and "waiting 0" in state


def test_waiters_wake_on_exact_timers_not_by_polling() -> None:
    async def main() -> tuple[list[float], list[tuple[float, Any]]]:
        clock = RecordingClock(asyncio.get_running_loop(), offset=1000.0)
        limiter = RateLimiter(requests_per_minute=2, clock=clock)
        log: list[tuple[float, Any]] = []
        async with asyncio.TaskGroup() as tg:
            for i in range(6):
                tg.create_task(grab(limiter, 0, log, i, start=i * 7.0))
        return clock.wakeups, log

    wakeups, log = run(main())
    # The injected clock's time scale is used throughout, and there is one wake-up per step.
    assert wakeups == [1060.0, 1067.0, 1120.0, 1127.0]
    assert [t for t, _ in log] == [0.0, 7.0, 60.0, 67.0, 120.0, 127.0]


# -- 429s ----------------------------------------------------------------------------------------------


def test_a_429_pauses_every_sender_for_retry_after() -> None:
    async def main() -> list[tuple[float, Any]]:
        limiter = RateLimiter(requests_per_minute=4)
        log: list[tuple[float, Any]] = []
        for i in range(4):
            await grab(limiter, 0, log, f"full{i}")
        queued = asyncio.create_task(grab(limiter, 0, log, "queued", start=0.5))  # waits for t=60 ...
        await sleep_until(1.0)
        limiter.rate_limited(retry_after=90.0)  # ... now for t=91; the pace is halved: budget 2
        async with asyncio.TaskGroup() as tg:
            tg.create_task(grab(limiter, 0, log, "later", start=70.0))  # window empty, but paused
            tg.create_task(grab(limiter, 0, log, "after", start=95.0))  # pause over, but window full
        await queued
        return log

    assert run(main()) == [
        *[(0.0, f"full{i}") for i in range(4)],
        (91.0, "queued"),
        (91.0, "later"),
        (151.0, "after"),
    ]


def test_backoff_without_retry_after_doubles_up_to_60_seconds() -> None:
    async def main() -> list[float]:
        limiter = RateLimiter(requests_per_minute=math.inf, runs_per_minute=math.inf)
        pauses = []
        for _ in range(9):
            limiter.rate_limited()
            start = now()
            await limiter.acquire()
            pauses.append(now() - start)
        limiter.succeeded()  # after the pause: the backoff starts over
        limiter.rate_limited()
        start = now()
        await limiter.acquire()
        pauses.append(now() - start)
        return pauses

    assert run(main()) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 1.0]


def test_successes_during_a_pause_are_stale_and_ignored() -> None:
    async def main() -> list[tuple[float, float, str]]:
        limiter = RateLimiter()
        seen = []
        limiter.rate_limited(retry_after=10.0)
        await sleep_until(5.0)
        limiter.succeeded()  # a request sent before the 429: no recovery yet
        seen.append((now(), limiter.pace, repr(limiter)))
        await sleep_until(10.0)
        limiter.rate_limited()  # a new event: pace 25%, and a 2-s backoff since the 1st wasn't cleared
        seen.append((now(), limiter.pace, repr(limiter)))
        await sleep_until(11.0)
        limiter.succeeded()  # still paused: does not clear the backoff either
        await sleep_until(12.0)
        limiter.rate_limited()
        seen.append((now(), limiter.pace, repr(limiter)))
        return seen

    seen = run(main())
    assert [(t, pace) for t, pace, _ in seen] == [(5.0, 0.5), (10.0, 0.25), (12.0, 0.125)]
    assert "paused 5s" in seen[0][2]
    assert "paused 2s" in seen[1][2]
    assert "paused 4s" in seen[2][2]


def test_multiplicative_decrease_then_additive_recovery() -> None:
    async def main() -> list[tuple[float, float]]:
        limiter = RateLimiter(requests_per_minute=100, runs_per_minute=100)
        limiter.rate_limited(retry_after=0.0)
        paces = [(now(), limiter.pace)]
        # At half pace only 50 of 100 requests go in the first window.
        tasks = [asyncio.create_task(limiter.acquire()) for _ in range(100)]
        await settle()
        paces.append((float(sum(task.done() for task in tasks)), 0.0))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in [1.0, 1.99, 2.0, 3.0, 4.0, 6.5]:
            await sleep_until(t)
            limiter.succeeded()
            paces.append((now(), limiter.pace))
        while limiter.pace < 1.0:
            await asyncio.sleep(2.0)
            limiter.succeeded()
        paces.append((now(), limiter.pace))
        return paces

    paces = run(main())
    assert paces[0] == (0.0, 0.5)
    assert paces[1] == (50.0, 0.0)
    assert paces[2:-1] == [(1.0, 0.5), (1.99, 0.5), (2.0, 0.52), (3.0, 0.52), (4.0, 0.54), (6.5, 0.56)]
    # 22 more steps of 0.02, 2 s apart: back to exactly 100%, never above.
    assert paces[-1] == (50.5, 1.0)


def test_pace_never_drops_below_5_percent_and_oversized_requests_still_go() -> None:
    async def main() -> tuple[float, list[tuple[float, Any]]]:
        limiter = RateLimiter(requests_per_minute=1000, runs_per_minute=100)
        for i in range(10):
            await sleep_until(i * 10.0)
            limiter.rate_limited(retry_after=0.0)
        floor = limiter.pace  # effective runs budget: 5
        log: list[tuple[float, Any]] = []
        await grab(limiter, 3, log, "small")
        # 80 runs exceed the effective budget but not the nominal one: they go when no other runs are in
        # the window, and block the window until they leave.
        await grab(limiter, 80, log, "oversized")
        await grab(limiter, 1, log, "next")
        return floor, log

    floor, log = run(main())
    assert floor == 0.05
    assert log == [(90.0, "small"), (150.0, "oversized"), (210.0, "next")]


def test_simultaneous_429s_count_as_one_congestion_event() -> None:
    async def main() -> list[tuple[float, float, str]]:
        limiter = RateLimiter()
        seen = []
        for _ in range(5):  # five requests in flight all come back 429
            limiter.rate_limited()
        seen.append((now(), limiter.pace, repr(limiter)))
        await sleep_until(0.5)
        limiter.rate_limited(retry_after=3.0)  # still the same event, but the server wants longer
        seen.append((now(), limiter.pace, repr(limiter)))
        await sleep_until(3.4)
        limiter.rate_limited()  # during that pause: stale
        seen.append((now(), limiter.pace, repr(limiter)))
        await sleep_until(4.0)
        limiter.rate_limited()  # after the pause: a new event
        seen.append((now(), limiter.pace, repr(limiter)))
        return seen

    seen = run(main())
    assert [(t, pace) for t, pace, _ in seen] == [(0.0, 0.5), (0.5, 0.5), (3.4, 0.5), (4.0, 0.25)]
    assert "paused 1s" in seen[0][2]  # one 1-s backoff, not 16 s
    assert "paused 3s" in seen[1][2]
    assert "paused 0.1s" in seen[2][2]
    assert "paused 2s" in seen[3][2]  # second event: the backoff doubled once


def test_repr_shows_live_state() -> None:
    async def main() -> tuple[str, str]:
        limiter = RateLimiter(requests_per_minute=4, runs_per_minute=100, period=30)
        await limiter.acquire(30)
        await limiter.acquire(0)
        limiter.rate_limited(retry_after=5.0)
        task = asyncio.create_task(limiter.acquire(10))
        await settle()
        during = repr(limiter)
        await task  # at t=30, when a request leaves the window
        await sleep_until(60.0)
        return during, repr(limiter)

    during, after = run(main())
    assert during == (
        "<RateLimiter per 30s: requests 2/2 (nominal 4), runs 30/50 (nominal 100), pace 50%, "
        "waiting 1, paused 5s>"
    )
    assert after == (
        "<RateLimiter per 30s: requests 0/2 (nominal 4), runs 0/50 (nominal 100), pace 50%, "
        "waiting 0, paused no>"
    )
    assert repr(RateLimiter()).startswith("<RateLimiter per 60s: requests 0/2000 (nominal 2000)")


# -- loops and clocks ----------------------------------------------------------------------------------


def test_built_outside_a_loop_and_bound_to_the_first_one() -> None:
    limiter = RateLimiter(requests_per_minute=1)
    run(limiter.acquire())

    async def second_loop() -> None:
        await limiter.acquire()  # the window is full (virtual time restarted), so this would wait

    with pytest.raises(RuntimeError, match="different event loop"):
        run(second_loop())


def test_the_default_clock_is_the_loop() -> None:
    async def main() -> bool:
        clock: Clock = LoopClock(asyncio.get_running_loop())
        await asyncio.sleep(5)
        return clock.now() == 5.0

    assert run(main())


def test_real_event_loop_smoke() -> None:
    async def main() -> float:
        limiter = RateLimiter(requests_per_minute=2, period=0.05)
        start = time.monotonic()
        for _ in range(5):  # 2 at once, 2 after 0.05 s, 1 after 0.1 s
            await limiter.acquire()
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert 0.1 - 0.002 <= elapsed < 1.0


def test_virtual_time_loop_reports_deadlock_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VirtualTimeLoop, "deadlock_after", 0.01)

    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(RuntimeError, match="deadlock"):
        run(main())
