"""Which answers are retried (`retryable`: the status, or the service's `x-should-retry` header, read as
the official SDK reads it) and how long to wait first (`RetryPolicy`: exponential, full jitter, the
server's Retry-After when it gives one)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["RetryPolicy", "retryable", "should_retry_header"]

#: Statuses retried when the service says nothing about it (`x-should-retry`): as the SDK does.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def should_retry_header(value: str | None) -> bool | None:
    """The service's `x-should-retry` header: True for "true", False for "false" (any case, spaces
    around ignored), None when it is absent or says anything else (then the status decides).

    >>> should_retry_header("true"), should_retry_header(" FALSE "), should_retry_header(None)
    (True, False, None)
    """
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.strip().lower())


def retryable(status: int, advice: bool | None = None) -> bool:
    """Whether an error answer of `status` is worth sending again, as the SDK decides
    (../shared/task-api.md section 5): the service's `x-should-retry` (`advice`, see
    `should_retry_header`) wins when it gave one, true or false; otherwise 408, 409, 429 and 5xx are.

    What is *safe* to send again is the client's to decide on top of this: a create answered 5xx may
    have created its runs, whatever the header says (`TaskClient`).

    >>> retryable(503), retryable(503, False), retryable(400), retryable(400, True)
    (True, False, False, True)
    """
    if advice is not None:
        return advice
    return status in RETRYABLE_STATUSES or status >= 500


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
