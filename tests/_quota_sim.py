"""A client and a service on virtual time: how the rate limiter paces jobs against a quota it was not told.

The service keeps one quota per API key with the emulator's own counters (`enrich._emulator._budget`: a
sliding window, or a token bucket with a burst), refuses with 429 (Retry-After, or none), and answers after
a round trip. The clients drive `RateLimiter` the way the engine does: group mode sends add-runs of
`min(1000, limiter.max_runs, rows left)` one after another and reads the group now and then; runs mode
keeps `concurrency` creates of one run in flight. Several jobs may share one key, each with its own limiter.

Everything runs on `VirtualTimeLoop`, so a job of many minutes takes milliseconds and every count is the
same on every machine: the suite asserts on it (`tests/test_limiter.py`), no wall clock involved.

    result = simulate(Quota(runs=500, requests=500, window=60), jobs=[Job("group", 5000)])
    result.jobs[0].wall / result.ideal, result.jobs[0].share_429_after(60)
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from enrich._emulator import _budget
from enrich._limiter import RateLimiter, VirtualTimeLoop

__all__ = ["Job", "Quota", "Result", "simulate"]

ADD_MAX = 1000


@dataclass(frozen=True)
class Quota:
    """The service's quota per key: `runs` and `requests` per `window` s (None: no limit), as token buckets
    when a burst is given; `retry_after`: whether a 429 says how long to wait."""

    runs: int | None = 2000
    requests: int | None = 2000
    window: float = 60.0
    run_burst: int | None = None
    request_burst: int | None = None
    retry_after: bool = True

    def ideal(self, runs: int) -> float:
        """The least time in which `runs` runs can be admitted: a full window or burst goes at once."""
        if self.runs is None:
            return 0.0
        if self.run_burst is None:
            return (math.ceil(runs / self.runs) - 1) * self.window
        return max(0.0, (runs - self.run_burst) / (self.runs / self.window))


@dataclass
class Job:
    """One job: `mode` "group" or "runs", `rows` distinct rows, starting at `start` s."""

    mode: str
    rows: int
    start: float = 0.0
    concurrency: int = 20
    assumed_runs: int = 2000
    assumed_requests: int = 2000
    assumed_window: float = 60.0
    # filled in by the run
    created: list[float] = field(default_factory=list)
    sent: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    end: float = 0.0
    limiter: RateLimiter | None = None

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def refused(self) -> int:
        return sum(1 for _, status in self.sent if status == 429)

    def share_429_after(self, t: float) -> float:
        later = [status for at, status in self.sent if at >= self.start + t]
        return sum(1 for s in later if s == 429) / len(later) if later else 0.0


@dataclass
class Result:
    jobs: list[Job]
    ideal: float


class _Service:
    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.runs = _budget(quota.runs, quota.window, quota.run_burst) if quota.runs else None
        self.requests = _budget(quota.requests, quota.window, quota.request_burst) if quota.requests else None

    def arrive(self, now: float, runs: int) -> float | None:
        """None when admitted, else the wait a 429 would state."""
        if self.requests is not None:
            wait = self.requests.wait_time(now, 1)
            if wait:
                return wait
        if runs and self.runs is not None:
            wait = self.runs.wait_time(now, runs)
            if wait:
                return wait
        if self.requests is not None:
            self.requests.add(now, 1)
        if runs and self.runs is not None:
            self.runs.add(now, runs)
        return None


def simulate(
    quota: Quota,
    jobs: list[Job],
    *,
    rtt: float = 0.05,
    poll_every: float | None = None,
    period_margin: float = 0.02,
) -> Result:
    """Run `jobs` against one key with `quota`; each job's limiter assumes its own budgets and window
    (times 1 + `period_margin`, as the engine does). Reads every `poll_every` s (default: a window/6)."""

    async def main() -> None:
        service = _Service(quota)
        loop = asyncio.get_running_loop()
        poll = poll_every if poll_every is not None else quota.window / 6

        async def request(job: Job, runs: int) -> bool:
            limiter = job.limiter
            assert limiter is not None
            grant = await limiter.acquire(runs)
            await asyncio.sleep(rtt / 2)
            wait = service.arrive(loop.time(), runs)
            await asyncio.sleep(rtt / 2)
            if wait is None:
                job.sent.append((loop.time(), 200))
                if runs:
                    job.created.extend([loop.time()] * runs)
                limiter.succeeded(grant)
                return True
            job.sent.append((loop.time(), 429))
            limiter.rate_limited(wait if quota.retry_after else None, grant)
            return False

        async def reader(job: Job, done: asyncio.Event) -> None:
            while not done.is_set():
                await request(job, 0)
                try:
                    async with asyncio.timeout(poll):
                        await done.wait()
                except TimeoutError:
                    pass

        async def group(job: Job) -> None:
            left = job.rows
            while left:
                assert job.limiter is not None
                size = min(ADD_MAX, job.limiter.max_runs, left)
                if await request(job, size):
                    left -= size

        async def runs_mode(job: Job) -> None:
            left = job.rows

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    while not await request(job, 1):
                        pass

            async with asyncio.TaskGroup() as tg:
                for _ in range(job.concurrency):
                    tg.create_task(worker())

        async def one(job: Job) -> None:
            await asyncio.sleep(job.start)
            job.limiter = RateLimiter(
                job.assumed_requests, job.assumed_runs, period=job.assumed_window * (1 + period_margin)
            )
            done = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(reader(job, done))
                await (group(job) if job.mode == "group" else runs_mode(job))
                job.end = loop.time()
                done.set()

        async with asyncio.TaskGroup() as tg:
            for job in jobs:
                tg.create_task(one(job))

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())
    return Result(jobs, quota.ideal(sum(j.rows for j in jobs)))
