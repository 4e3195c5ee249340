"""Stage 4, shared pacing: one API key's rate limiter, held in one place for the shards of many processes.

A job run on a cluster (`enrich.ray`) sends from many processes under the same API keys. Each key's
budget lives in one `Broker`, which holds the key's `RateLimiter` (the adaptive one, which learns the
real quota from 429s). A shard's engine sends under a `BrokerLimiter`: a `RateLimiter` whose every
grant is asked of the broker (once per add-runs call or read, never per row) and whose every answer is
handed back to it. So the whole cluster keeps to one budget per key, and a 429 seen by any shard pauses
every shard on that key, as it pauses the coroutines of one process.

A job's cost cap is shared the same way: a `Ledger` (one per call of `enrich_dataset`) allows each shard
its share of `max_cost` before it sends (`CostShare`, `_Job.top_up`), never more between them than the cap.

The broker is plain asyncio: `enrich.ray` serves one as a Ray actor per key, and tests use one in-process.
A `BrokerLimiter` reaches it through a `Link`: `call` awaits a method's answer, `send` does not wait.

What may go wrong between them, and what the broker does:

- A shard gives up waiting (its job ended, Ctrl-C, a timeout): it sends `cancel(token)`; the broker stops
  the wait, or gives the grant back if it was granted meanwhile. A cancel that arrives before its
  acquire is remembered, and that acquire is refused.
- A shard's process dies with grants unanswered: a grant is counted in the window from when it was
  granted whatever becomes of it, so the budget stays safe; one never answered within `answer_timeout`
  is settled by the broker (a trial grant after a 429 would otherwise hold every other shard back).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable
from typing import Any, NamedTuple, Protocol

from enrich._limiter import Grant, RateLimiter

#: Seconds after which a grant nobody answered is settled by the broker (its shard died, most likely):
#: longer than any request is given (`request_timeout` defaults to 60 s; a create is answered at once).
ANSWER_TIMEOUT = 600.0


class Broker:
    """Holds one API key's `RateLimiter` for every process that sends under that key.

    Methods take and return plain values (a token names a grant), so that they can be called from
    another process (a Ray actor's methods)."""

    def __init__(
        self,
        requests_per_minute: float = 2000,
        runs_per_minute: float = 2000,
        period: float = 60.0,
        *,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.limiter = RateLimiter(requests_per_minute, runs_per_minute, period=period)
        self.answer_timeout = answer_timeout
        # token -> (the limiter that granted it, the grant, when granted)
        self._granted: dict[str, tuple[RateLimiter, Grant, float]] = {}
        self._waiting: dict[str, asyncio.Task[Grant]] = {}
        self._cancelled: set[str] = set()  # cancels that came before their acquire
        self.acquired = 0  # grants given, for tests and `stats`
        self.rate_limited_count = 0

    def budgets(self) -> tuple[float, float, float]:
        """(requests, runs, period) of the limiter."""
        return self.limiter.requests_budget, self.limiter.runs_budget, self.limiter.period

    def configure(self, requests_per_minute: float, runs_per_minute: float, period: float) -> None:
        """Keep to these budgets from now on (a job run with other settings than the last one): a new
        limiter takes the next grants; those given already are answered to the one that gave them."""
        if self.budgets() != (float(requests_per_minute), float(runs_per_minute), float(period)):
            self.limiter = RateLimiter(requests_per_minute, runs_per_minute, period=period)

    async def acquire(self, runs: int, token: str, at_least: int | None = None) -> tuple[bool, int, int]:
        """Wait for a grant of one request and `runs` runs (from `at_least` up: `RateLimiter.acquire`),
        kept under `token` until it is answered. Returns (granted, the most runs one call should ask
        for now, the runs granted); not granted: cancelled."""
        self._sweep()
        if token in self._cancelled:
            self._cancelled.discard(token)
            return False, self.limiter.max_runs, 0
        limiter = self.limiter
        task = asyncio.ensure_future(limiter.acquire(runs, at_least=at_least))
        self._waiting[token] = task
        try:
            grant = await task
        except asyncio.CancelledError:
            return False, self.limiter.max_runs, 0
        finally:
            self._waiting.pop(token, None)
        self._granted[token] = (limiter, grant, asyncio.get_running_loop().time())
        self.acquired += 1
        return True, self.limiter.max_runs, grant[1]

    def cancel(self, token: str) -> None:
        """The caller gave up on `token`: stop its wait, or give its grant back (never sent)."""
        task = self._waiting.get(token)
        if task is not None:
            task.cancel()
        elif token in self._granted:
            self.refund(token)
        else:
            self._cancelled.add(token)

    def succeeded(self, token: str) -> None:
        held = self._granted.pop(token, None)
        if held is not None:
            held[0].succeeded(held[1])

    def rate_limited(self, token: str, retry_after: float | None) -> None:
        self.rate_limited_count += 1
        held = self._granted.pop(token, None)
        if held is not None:
            held[0].rate_limited(retry_after, held[1])
        else:
            self.limiter.rate_limited(retry_after, None)

    def settle(self, token: str) -> None:
        held = self._granted.pop(token, None)
        if held is not None:
            held[0].settle(held[1])

    def refund(self, token: str) -> None:
        held = self._granted.pop(token, None)
        if held is not None:
            held[0].refund(held[1])

    def stats(self) -> dict[str, Any]:
        return {
            "acquired": self.acquired,
            "rate_limited": self.rate_limited_count,
            "unanswered": len(self._granted),
            "waiting": len(self._waiting),
            "max_runs": self.limiter.max_runs,
        }

    def _sweep(self) -> None:
        """Settle the grants nobody answered in `answer_timeout` seconds (their process died)."""
        if not self._granted:
            return
        cutoff = asyncio.get_running_loop().time() - self.answer_timeout
        for token in [t for t, (_, _, at) in self._granted.items() if at < cutoff]:
            self.settle(token)


class Ledger:
    """A job's cost cap (`max_cost`) for the shards of many processes: how many runs each shard may have
    paid for, never more than the cap's runs between them.

    A shard asks for room before it sends (`allow`, once per add-runs call, or per batch of creates in
    runs mode): it says what it has spent or may have (`_Job.spending`: recorded, being created, held),
    and is allowed that plus what it wants, as far as the cap minus every other shard's allowance goes.
    So a shard's allowance is reset to what it really spent each time it asks, and a shard run again
    (its worker died) replaces its dead attempt's allowance when it first asks. A dead attempt's unused
    allowance is held until then: the job may stop a little below its cap, never above it.

    `recorded`: the runs each shard's area recorded before this call (shards with no rows now count too).
    """

    def __init__(self, limit_runs: int, recorded: dict[int, int] | None = None) -> None:
        self.limit = limit_runs
        self.allowance: dict[int, int] = dict(recorded or {})

    def allow(self, shard: int, spent: int, want: int) -> int:
        """The runs shard `shard` may have paid for in all (its `spent` plus at most `want` more)."""
        others = sum(runs for s, runs in self.allowance.items() if s != shard)
        self.allowance[shard] = spent + max(0, min(want, self.limit - others - spent))
        return self.allowance[shard]

    def release(self, shard: int, spent: int) -> None:
        """The shard sends no more: its allowance is what it spent."""
        self.allowance[shard] = spent

    def allowed(self) -> int:
        """Runs allowed to every shard together (at most the cap's)."""
        return sum(self.allowance.values())


class CostShare:
    """A shard's handle on its job's `Ledger` (through a `Link`): `aenrich_shard(..., _ledger=...)`."""

    def __init__(self, link: Link, shard: int) -> None:
        self.link, self.shard = link, shard

    async def allow(self, spent: int, want: int) -> int:
        return int(await self.link.call("allow", self.shard, spent, want))

    def release(self, spent: int) -> None:
        self.link.send("release", self.shard, spent)


class Link(Protocol):
    """How a `BrokerLimiter` reaches its broker."""

    def call(self, method: str, *args: Any) -> Awaitable[Any]:
        """Call `method` of the broker and wait for its answer."""
        ...

    def send(self, method: str, *args: Any) -> None:
        """Call `method` of the broker without waiting for it."""
        ...


class LocalLink:
    """A `Link` to a `Broker` (or a `Ledger`) in this process (its event loop's)."""

    def __init__(self, broker: Broker | Ledger) -> None:
        self.broker = broker

    async def call(self, method: str, *args: Any) -> Any:
        answer = getattr(self.broker, method)(*args)
        return await answer if inspect.isawaitable(answer) else answer  # (a ledger's methods are plain)

    def send(self, method: str, *args: Any) -> None:
        getattr(self.broker, method)(*args)


class RemoteGrant(NamedTuple):
    """A grant held by a broker, named by its token; `[1]` is its runs, as a local grant's."""

    token: str
    runs: int


class BrokerLimiter(RateLimiter):
    """A `RateLimiter` whose budget is a broker's: every grant is asked of it, every answer handed to it.

    Give it to `aenrich_shard(limiter=...)`. Its budgets say what the broker's are (the engine sizes its
    calls by them); the pacing, the learning from 429s and the window are the broker's."""

    __slots__ = ("_link", "_remote_max_runs", "_remote_waiting")

    def __init__(
        self, link: Link, *, requests_per_minute: float, runs_per_minute: float, period: float = 60.0
    ) -> None:
        super().__init__(requests_per_minute, runs_per_minute, period=period)
        self._link = link
        self._remote_max_runs = max(1, int(min(runs_per_minute, 1_000_000)))
        self._remote_waiting = 0

    async def acquire(self, runs: int = 0, *, at_least: int | None = None) -> Grant:
        if not 0 <= runs <= self._runs_budget:
            raise self._refusal(runs)
        token = uuid.uuid4().hex
        self._remote_waiting += 1
        try:
            granted, self._remote_max_runs, runs = await self._link.call("acquire", runs, token, at_least)
        except BaseException:  # cancelled (or the broker is gone): never leave a grant behind
            self._link.send("cancel", token)
            raise
        finally:
            self._remote_waiting -= 1
        if not granted:  # (cancelled by someone else: only this limiter cancels, so never in practice)
            raise asyncio.CancelledError
        return RemoteGrant(token, runs)  # type: ignore[return-value]

    def succeeded(self, grant: Grant | None = None) -> None:
        if isinstance(grant, RemoteGrant):
            self._link.send("succeeded", grant.token)

    def rate_limited(self, retry_after: float | None = None, grant: Grant | None = None) -> None:
        self._link.send("rate_limited", grant.token if isinstance(grant, RemoteGrant) else "", retry_after)

    def settle(self, grant: Grant) -> None:
        if isinstance(grant, RemoteGrant):
            self._link.send("settle", grant.token)

    def refund(self, grant: Grant) -> None:
        if isinstance(grant, RemoteGrant):
            self._link.send("refund", grant.token)

    @property
    def waiting(self) -> int:
        return self._remote_waiting

    @property
    def max_runs(self) -> int:
        return max(1, min(self._remote_max_runs, int(self._runs_budget)))

    @property
    def pace(self) -> float:
        return 1.0

    @property
    def learned(self) -> dict[str, Any] | None:
        return None  # (the broker's to keep)

    def __repr__(self) -> str:
        return (
            f"<BrokerLimiter per {self._period:g}s: requests {self._requests_budget:g}, runs "
            f"{self._runs_budget:g}, calls of {self.max_runs} runs, waiting {self._remote_waiting}>"
        )
