"""Backoff for retried requests: exponential, full jitter, the server's Retry-After when it gives one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How read-only requests are retried.

    `max_attempts` counts the first try (5 means up to 4 retries) for transport errors, 408, 409 and 5xx.
    A 429 is not an error of the request but of the pace: it is retried up to `max_rate_limited`
    times while the shared limiter slows every sender down.

    The wait before retry number n (0-based) is uniform in [0, min(cap, base * 2**n)] seconds ("full
    jitter"), unless the server said how long to wait (Retry-After or retry-after-ms, taken when it is
    in (0, `max_server_wait`] seconds). `RetryPolicy.no_wait()` keeps the counts but never sleeps (tests).
    """

    max_attempts: int = 5
    max_rate_limited: int = 100
    base: float = 0.5
    cap: float = 30.0
    max_server_wait: float = 300.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False, compare=False)
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    @classmethod
    def no_wait(cls, **kwargs: object) -> RetryPolicy:
        async def _no_sleep(_: float) -> None:
            await asyncio.sleep(0)

        return cls(sleep=_no_sleep, **kwargs)  # type: ignore[arg-type]

    def delay(self, retry_number: int, server_wait: float | None = None) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first retry)."""
        if server_wait is not None and 0 < server_wait <= self.max_server_wait:
            return server_wait
        return self.random() * min(self.cap, self.base * 2.0**retry_number)
