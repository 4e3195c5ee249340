"""Benchmark the RateLimiter: budget utilisation under load, and the CPU cost of one acquire.

Run with `python bench/limiter.py`. Prints two tables, no pass/fail:

(a) 1,000 concurrent waiters hammer one limiter for 10 simulated minutes (on `VirtualTimeLoop`, so it takes
    about a second): the share of each budget granted, and the most seen in any 60-s window against the
    budget (it must never be over).
(b) the CPU time of one uncontended `acquire()` on a real event loop, in microseconds.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

from enrich._limiter import RateLimiter, VirtualTimeLoop

PERIOD = 60.0
PERIODS = 10
WAITERS = 1000
BUDGET = 2000


def max_in_window(grants: list[tuple[float, int]], period: float) -> int:
    """The largest total weight of the (time, weight) grants, sorted by time, in any [t, t + period)."""
    best = total = lo = 0
    for t, weight in grants:
        total += weight
        while grants[lo][0] + period <= t:
            total -= grants[lo][1]
            lo += 1
        best = max(best, total)
    return best


async def hammer(runs_of: Callable[[], int]) -> list[tuple[float, int]]:
    """WAITERS tasks acquire in a loop for PERIODS periods; returns the (time, runs) of each grant."""
    loop = asyncio.get_running_loop()
    limiter = RateLimiter(BUDGET, BUDGET, period=PERIOD)
    granted: list[tuple[float, int]] = []
    end = PERIOD * PERIODS

    async def waiter() -> None:
        while loop.time() < end:
            runs = runs_of()
            await limiter.acquire(runs)
            granted.append((loop.time(), runs))

    async with asyncio.TaskGroup() as tg:
        for _ in range(WAITERS):
            tg.create_task(waiter())
    return [(t, runs) for t, runs in granted if t < end]


def utilisation() -> None:
    rng = random.Random(1)
    scenarios: list[tuple[str, Callable[[], int]]] = [
        ("GETs (0 runs)", lambda: 0),
        ("add-runs: 90% x1, 10% x100", lambda: 100 if rng.random() < 0.1 else 1),
    ]
    print(f"(a) {WAITERS:,} waiters, {PERIODS} x {PERIOD:g} s simulated, budgets {BUDGET:,} requests and")
    print(f"    {BUDGET:,} runs per {PERIOD:g} s")
    print()
    header = (
        f"{'scenario':<28} {'budget':<9} {'granted':>8} {'of':>7} {'share':>7} {'max in 60 s':>11} "
        f"{'cpu s':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, runs_of in scenarios:
        cpu = time.process_time()
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            grants = runner.run(hammer(runs_of))
        cpu = time.process_time() - cpu
        requests = [(t, 1) for t, _ in grants]
        for budget_name, series in (("requests", requests), ("runs", grants)):
            total = sum(weight for _, weight in series)
            if total == 0:
                continue
            possible = BUDGET * PERIODS
            peak = max_in_window(series, PERIOD)
            print(
                f"{name:<28} {budget_name:<9} {total:>8,} {possible:>7,} {total / possible:>7.1%} "
                f"{f'{peak}/{BUDGET}':>11} {cpu:>6.2f}"
            )
            name = ""


def cpu_per_acquire(n: int = 100_000) -> None:
    async def baseline() -> None:
        async def nothing(runs: int = 0) -> None:
            return None

        for _ in range(n):
            await nothing(1)

    async def acquires() -> None:
        limiter = RateLimiter(math.inf, math.inf)
        for _ in range(n):
            await limiter.acquire(1)

    async def acquire_and_succeed() -> None:
        limiter = RateLimiter(math.inf, math.inf)
        for _ in range(n):
            await limiter.acquire(1)
            limiter.succeeded()

    def measure(main: Callable[[], object]) -> float:
        best = math.inf
        for _ in range(3):
            start = time.process_time()
            asyncio.run(main())  # type: ignore[arg-type]
            best = min(best, time.process_time() - start)
        return best / n * 1e6

    base = measure(baseline)
    print()
    print(f"(b) CPU per call, uncontended, real event loop, best of 3 x {n:,} calls")
    print()
    header = f"{'operation':<34} {'us/call':>8} {'minus an empty await':>21}"
    print(header)
    print("-" * len(header))
    print(f"{'await <empty coroutine>':<34} {base:>8.3f} {'':>21}")
    for name, main in (
        ("await acquire(1)", acquires),
        ("await acquire(1); succeeded()", acquire_and_succeed),
    ):
        us = measure(main)
        print(f"{name:<34} {us:>8.3f} {us - base:>21.3f}")


if __name__ == "__main__":
    utilisation()
    cpu_per_acquire()
