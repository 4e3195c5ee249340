"""A key's budget shared by many senders: `RateLimiter.acquire(at_least=...)` fills what a window has
left, and a `Broker` holds one limiter for `BrokerLimiter`s in other processes (here: in-process
through `LocalLink`). All on virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from enrich._engine.broker import Broker, BrokerLimiter, Ledger, LocalLink
from enrich._limiter import RateLimiter, VirtualTimeLoop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def now() -> float:
    return asyncio.get_running_loop().time()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_flexible_create_takes_what_the_window_has_left_and_a_rigid_one_waits() -> None:
    async def main() -> list[tuple[float, int]]:
        limiter = RateLimiter(requests_per_minute=100, runs_per_minute=100, period=10.0)
        got = []
        g = await limiter.acquire(70)
        limiter.succeeded(g)
        got.append((now(), g[1]))
        g = await limiter.acquire(50, at_least=10)  # 30 fit now: granted at once
        got.append((now(), g[1]))
        g = await limiter.acquire(50, at_least=10)  # nothing left: waits for the window, then all 50
        got.append((now(), g[1]))
        g = await limiter.acquire(60)  # 50 left: a rigid call waits until 60 fit (the 70 leave at 10 s)
        got.append((now(), g[1]))
        return got

    assert run(main()) == [(0.0, 70), (0.0, 30), (10.0, 50), (20.0, 60)]


def test_at_least_is_bounded_to_the_call() -> None:
    async def main() -> list[int]:
        limiter = RateLimiter(requests_per_minute=100, runs_per_minute=100, period=10.0)
        a = await limiter.acquire(5, at_least=50)  # (more than asked: the call's size)
        b = await limiter.acquire(0, at_least=3)  # a read spends no runs whatever at_least says
        return [a[1], b[1]]

    assert run(main()) == [5, 0]


def test_two_senders_on_one_broker_keep_to_one_budget_and_a_429_pauses_both() -> None:
    async def main() -> tuple[list[tuple[float, str, int]], dict[str, Any]]:
        broker = Broker(100, 100, 10.0)
        a = BrokerLimiter(LocalLink(broker), requests_per_minute=100, runs_per_minute=100, period=10.0)
        b = BrokerLimiter(LocalLink(broker), requests_per_minute=100, runs_per_minute=100, period=10.0)
        log: list[tuple[float, str, int]] = []

        async def send(limiter: BrokerLimiter, tag: str, calls: int) -> None:
            for _ in range(calls):
                g = await limiter.acquire(60, at_least=10)
                log.append((now(), tag, g[1]))
                limiter.succeeded(g)

        await asyncio.gather(send(a, "a", 3), send(b, "b", 3))
        # A 429 seen by one sender pauses the other: its next create waits out the Retry-After.
        g = await a.acquire(1)
        a.rate_limited(30.0, g)
        t0 = now()
        g = await b.acquire(1)
        log.append((now() - t0, "b after a's 429", g[1]))
        b.succeeded(g)
        return log, broker.stats()

    log, stats = run(main())
    creates = [(t, n) for t, tag, n in log if tag in "ab"]
    for start in {t for t, _ in creates}:  # never more than the budget in any window
        assert sum(n for t, n in creates if start <= t < start + 10.0) <= 100
    assert sum(n for _, n in creates) == 6 * 60 - sum(60 - n for _, n in creates)
    assert [n for _, n in creates][:2] == [60, 40]  # the second sender filled the window's rest
    assert log[-1][0] >= 30.0
    assert stats["unanswered"] == 0 and stats["waiting"] == 0


def test_a_sender_that_gives_up_waiting_leaves_no_grant_behind() -> None:
    async def main() -> dict[str, Any]:
        broker = Broker(100, 100, 10.0)
        a = BrokerLimiter(LocalLink(broker), requests_per_minute=100, runs_per_minute=100, period=10.0)
        g = await a.acquire(100)
        a.succeeded(g)
        waiting = asyncio.ensure_future(a.acquire(50))
        await settle()
        assert broker.stats()["waiting"] == 1 and a.waiting == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle()
        t0 = now()
        g = await a.acquire(100)  # the window frees at 10 s: the cancelled wait took nothing
        assert now() - t0 == pytest.approx(10.0)
        a.succeeded(g)
        return broker.stats()

    stats = run(main())
    assert stats["unanswered"] == 0 and stats["waiting"] == 0 and stats["acquired"] == 2


def test_a_cancel_that_overtakes_its_acquire_refuses_it() -> None:
    async def main() -> tuple[bool, int]:
        broker = Broker(100, 100, 10.0)
        broker.cancel("t1")  # (over the wire, a cancel may arrive first)
        granted, _, runs = await broker.acquire(10, "t1")
        return granted, runs

    assert run(main()) == (False, 0)


def test_a_grant_whose_sender_died_is_settled_after_the_answer_timeout() -> None:
    async def main() -> dict[str, Any]:
        broker = Broker(100, 100, 10.0, answer_timeout=5.0)
        granted, _, _ = await broker.acquire(10, "dead")  # never answered: its process died
        assert granted and broker.stats()["unanswered"] == 1
        await asyncio.sleep(6.0)
        await broker.acquire(10, "alive")
        return broker.stats()

    stats = run(main())
    assert stats["unanswered"] == 1  # the live one; the dead one was settled


def test_a_broker_set_to_new_budgets_answers_old_grants_to_the_limiter_that_gave_them() -> None:
    async def main() -> tuple[tuple[float, float, float], dict[str, Any]]:
        broker = Broker(100, 100, 10.0)
        await broker.acquire(50, "old")
        broker.configure(200, 200, 10.0)
        broker.succeeded("old")
        granted, _, runs = await broker.acquire(200, "new")  # the new limiter's whole budget
        assert granted and runs == 200
        broker.succeeded("new")
        return broker.budgets(), broker.stats()

    budgets, stats = run(main())
    assert budgets == (200.0, 200.0, 10.0) and stats["unanswered"] == 0


def test_a_ledger_never_allows_more_than_its_cap_and_resets_a_shard_to_what_it_spent() -> None:
    ledger = Ledger(100, {0: 30})  # shard 0 paid for 30 runs in an earlier call
    assert ledger.allow(1, 0, 50) == 50
    assert ledger.allow(2, 0, 50) == 20  # what is left: 100 - 30 - 50
    assert ledger.allow(3, 0, 10) == 0
    # Asked again having spent 10 of its 50: reset to 10 + what it wants, as far as the cap goes.
    assert ledger.allow(1, 10, 60) == 50 and ledger.allowed() == 100
    ledger.release(1, 10)  # it sends no more: its share goes back
    assert ledger.allow(3, 0, 100) == 40  # 100 - 30 - 10 - 20
    # A shard run again (its worker died) replaces its dead attempt's allowance when it asks.
    assert ledger.allow(2, 5, 0) == 5 and ledger.allowed() == 30 + 10 + 5 + 40
    assert ledger.allow(0, 30, 50) == 45  # what the retried shard left: 15
    assert ledger.allow(1, 10, 5) == 10  # the cap is reached: nothing more for anyone
