"""The emulator's rate limits: the per-key budgets of requests and of runs.

`_Window` is a sliding window (the documented quota: at most `limit` units in any `window` seconds);
`_Bucket` is a token bucket whose burst may be below one full add (a quota the client was not told).
`_budget` picks one from the config; `EmulatorApp` keeps one per API key for requests and one for runs,
and a 429's Retry-After is the budget's `wait_time`.
"""

from __future__ import annotations

from collections import deque


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
