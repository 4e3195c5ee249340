"""Stage 4, submission: add-runs of up to 1,000 inputs into the job's task group (group mode), or one
create per row (runs mode), under the job's rate limiter. Each intent is durable before its request
is sent and its receipts before the next; a lost answer is reconciled, never sent twice blindly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from enrich._checkpoint import Checkpoint, Receipt
from enrich._engine.collect import _GroupCollector, collectors_for
from enrich._engine.job import _FATAL, _Adopted, _Fatal, _Job
from enrich._engine.reconcile import _Reconciler, reconcile, reconcile_in_doubt, settle_holds
from enrich._exceptions import (
    APIStatusError,
    OutcomeUnknownError,
    RateLimitError,
    TransportError,
)

# Runs mode: how long the first intent of a group commit waits for others (a create's round trip is ~100x).
_COMMIT_DELAY = 0.005


async def ensure_group(job: _Job) -> str:
    """The job's task group: the checkpoint's latest, or a new one recorded before any run is added."""
    if job.cp.groups:
        return job.cp.groups[-1]
    group = await job.client.create_group(metadata={"enrich": "enrich"})
    job.cp.record_group(group.group_id)  # durable before any run is added to it
    return group.group_id


async def run_group_mode(job: _Job) -> None:
    await reconcile_in_doubt(job)
    collectors = collectors_for(job)
    async with asyncio.TaskGroup() as tg:
        for c in collectors.values():
            tg.create_task(c.run())
        if job.todo or job.held:
            group_id = await ensure_group(job)
            if group_id not in collectors:
                collectors[group_id] = _GroupCollector(job, group_id)
                tg.create_task(collectors[group_id].run())
            collector = collectors[group_id]
            await submit_group(job, group_id, collector)
        job.submission_done.set()
        job.fresh_sent.set()
        job.submitted_at = time.monotonic()
        for c in collectors.values():
            c.wake()
            c.new_runs.set()


#: A call is made smaller to fill what is left of a window if that is at least 1/this of a full call.
_FILL_SHARE = 20


async def submit_group(job: _Job, group_id: str, collector: _GroupCollector) -> None:
    """Add the rows to do to the group, a call at a time, until none are left or held.

    Held rows are settled as their horizons pass: adopted if their runs showed up, sent again if not.
    Past `max_cost` nothing more is sent, but held rows are still waited for (they may be paid)."""
    capped = False
    while job.todo or job.held:
        again = await settle_holds(job)
        if again:
            job.todo.extend(again)
        if capped or not job.todo:
            if not job.held:
                break
            job.fresh_sent.set()  # only held rows are left: the next shard need not wait for them
            collector.new_runs.set()  # held rows: the collector listens for their late commits
            await job.wait_for_holds()
            continue
        # The size the service was seen to accept at once: a quota that counts runs may never fit
        # the full batch in one call (the limiter learns it from 429s).
        wanted = min(job.batch_size, job.limiter.max_runs, len(job.todo))
        await job.top_up(wanted)  # (on a cluster: room under the job's max_cost, from its ledger)
        size = job.affordable(wanted)
        granted = None
        if size > 1 and job.fill:
            # The call takes what the window holds when its turn comes, from 1/_FILL_SHARE of a full
            # call up: the rest of a window another sender (a shard, a process on the same key) left is
            # used now, where a full call would wait for the next window.
            granted = await job.limiter.acquire(size, at_least=max(1, size // _FILL_SHARE))
            size = granted[1]
        if not size:
            job.report(f"max cost ${job.max_cost:,.2f} reached: {len(job.todo):,} rows not submitted")
            capped = True
            continue
        # Rows adopted meanwhile (a late commit of a row about to be sent again) are not sent.
        batch: list[str] = []
        taken = 0
        for key in job.todo:
            taken += 1
            if key not in job.run_of and key not in job.done:
                batch.append(key)
                if len(batch) == size:
                    break
        if not batch:
            if granted is not None:
                job.limiter.refund(granted)
            del job.todo[:taken]
            continue
        if await add_batch(job, group_id, batch, collector, granted=granted):
            del job.todo[:taken]


async def add_batch(
    job: _Job, group_id: str, batch: list[str], collector: _GroupCollector, *, granted: Any = None
) -> bool:
    """Add `batch` to the group; False when it was refused with a 429 (nothing created: send it
    again, in a smaller call if the limiter learned the service takes no more at once).

    The intent is recorded the moment the request goes out (after the rate limiter let it through),
    with the time: a lost answer holds the rows until the commit horizon after that moment."""
    batch_id = uuid.uuid4().hex
    inputs = [job.run_input(k) for k in batch]
    sent_at: list[datetime] = []

    wire: list[bool] = [False]  # the request is out, its answer not in (cleared by a 429)

    async def on_send() -> None:
        if any(k in job.run_of or k in job.done for k in batch):
            raise _Adopted  # a late commit of one of these rows was adopted while this waited
        sent_at.append(datetime.now(UTC))
        wire[0] = True
        job.cp.record_intents(batch_id, group_id, batch, sent_at=sent_at[-1])  # durable first
        job.inflight.update(dict.fromkeys(batch, batch_id))

    def on_refused() -> None:
        wire[0] = False

    # (the limiter's grant for this call, when the caller sized the call by it)
    extra = {"granted": granted} if granted is not None else {}
    try:
        answer = await job.client.add_runs(
            group_id,
            inputs,
            default_task_spec=job.plan.task_spec,
            retry_rate_limited=len(batch) == 1,  # a larger call is split by the caller instead
            on_send=on_send,
            on_refused=on_refused,
            **extra,
        )
    except asyncio.CancelledError:  # stopped while waiting to go again after a 429: none created
        if sent_at and not wire[0]:
            with contextlib.suppress(Exception):
                job.cp.resolve_intents(batch_id)
        raise
    except (RateLimitError, _Adopted):  # nothing was created: the loop forms the call again
        job._landed(batch)
        if sent_at:
            job.cp.resolve_intents(batch_id)
        return False
    except OutcomeUnknownError:
        try:  # on the wire still, as far as the collector knows, until the group is read for them
            found = await reconcile(job, group_id, dict.fromkeys(batch, batch_id))
        finally:
            job._landed(batch)
        job.stats.reconciled += len(found)
        missing = [k for k in batch if k not in found]
        if missing:  # not committed yet, maybe never: held until the horizon, never sent again before
            job.hold(batch_id, group_id, missing, sent_at[-1])
        else:
            job.cp.resolve_intents(batch_id)
        collector.wake()
        collector.new_runs.set()
        return True
    except (*_FATAL, TransportError) as exc:  # refused, or never sent: nothing was created
        job._landed(batch)
        if sent_at:
            job.cp.resolve_intents(batch_id)
        if isinstance(exc, TransportError):
            raise
        raise _Fatal(exc) from exc
    if len(answer.run_ids) != len(batch):
        job._landed(batch)
        raise _Fatal(
            APIStatusError(
                f"add-runs answered {len(answer.run_ids)} run ids for {len(batch)} inputs", status=200
            )
        )
    now = datetime.now(UTC)
    receipts = [
        Receipt(row_key=k, run_id=r, group_id=group_id, batch_id=batch_id, created_at=now)
        for k, r in zip(batch, answer.run_ids, strict=True)
    ]
    job.cp.record_receipts(receipts)  # durable before the next add is sent
    job._landed(batch)
    for k in batch:  # created: never sent again
        job.inputs.pop(k, None)
        job.options.pop(k, None)
    for k, r in zip(batch, answer.run_ids, strict=True):
        job._adopt(k, r, group_id)
    job.stats.submitted += len(batch)
    collector.wake()
    collector.new_runs.set()
    job.report()
    return True


async def run_runs_mode(job: _Job) -> None:
    """One create per row, collected like group mode.

    Each run is created by an add-runs call of one input into the job's task group rather than by
    `POST /v1/tasks/runs`: the cost and the pacing are the same, but a create whose answer is lost
    can then be found again (the API cannot list runs outside a group), so no row is paid twice. The
    answers are collected through the group (its
    events and runs streams, as in group mode), not with a blocking call per row: that would hold a
    connection per row in flight, and the request budget, not a connection count, sets the pace.
    """
    await reconcile_in_doubt(job)
    group_id = await ensure_group(job) if job.todo or job.held else None
    reconciler = _Reconciler(job)
    job.committer = committer = _Committer(job.cp)
    collectors = collectors_for(job)
    if group_id is not None and group_id not in collectors:
        collectors[group_id] = _GroupCollector(job, group_id)
    queue = collections.deque(job.todo)
    job.todo = []
    capped = False
    bounced: dict[str, int] = {}  # key -> 429s that said not to retry (x-should-retry: false)

    async def wait(key: str, run_id: str) -> None:
        # a run recorded without a group (an older checkpoint): only its own result call finds it
        run, output = await job.patiently(
            functools.partial(job.client.wait_for_result, run_id, poll_timeout=600),
            "waiting for a run",
        )
        job.check_owner(key, run)
        job.finish(key, run, output)

    async def creator() -> None:
        nonlocal capped
        while queue or job.held:
            if not queue:  # only held rows left: settle them as their horizons pass
                job.fresh_sent.set()  # (the next shard need not wait for them)
                again = await settle_holds(job)
                (job.todo if capped else queue).extend(again)
                if not queue and job.held:
                    for c in collectors.values():
                        c.new_runs.set()  # the collectors listen for the held rows' late commits
                    await job.wait_for_holds()
                continue
            key = queue.popleft()
            if key in job.run_of or key in job.done:
                continue  # adopted meanwhile: a late commit of its lost create
            if not capped and job.ledger is not None and job.allowance - job.spending() < 1:
                await job.top_up(min(job.batch_size, len(queue) + 1))  # room for a batch of creates
            if capped or not job.affordable(1):
                capped = True
                job.todo.append(key)
                continue
            job.reserved += 1
            try:
                assert group_id is not None
                await create_one(job, key, group_id, reconciler)
            except RateLimitError as exc:
                # A 429 that says not to send it again as it is (x-should-retry: false): nothing was
                # created, and the limiter, told of it, paces the row's next try, as group mode does.
                bounced[key] = bounced.get(key, 0) + 1
                if exc.should_retry is not False or bounced[key] > job.client.retry.max_rate_limited:
                    raise
                queue.append(key)
            finally:
                job.reserved -= 1
            collector = collectors[group_id]
            collector.wake()
            collector.new_runs.set()

    async with asyncio.TaskGroup() as tg:
        for c in collectors.values():
            tg.create_task(c.run())
        for run_id in list(job.pending.get(None, ())):
            tg.create_task(wait(job.key_of_run[run_id], run_id))
        try:
            async with asyncio.TaskGroup() as creators:
                for _ in range(max(1, min(job.concurrency, len(queue)))):
                    creators.create_task(creator())
        finally:
            committer.close()  # also on a timeout, an interrupt or a fatal answer
        job.submitted_at = time.monotonic()
        job.submission_done.set()
        job.fresh_sent.set()
        for c in collectors.values():
            c.wake()
            c.new_runs.set()
    if job.todo:
        job.report(f"max cost ${job.max_cost:,.2f} reached: {len(job.todo):,} rows not submitted")


async def create_one(job: _Job, key: str, group_id: str, reconciler: _Reconciler) -> None:
    """Create the run of one row (or, when its answer is lost, find it or hold the row)."""
    batch_id = uuid.uuid4().hex
    committer = job.committer
    assert committer is not None
    sent_at: list[datetime] = []

    wire: list[bool] = [False]  # the request is out, its answer not in (cleared by a 429)

    async def on_send() -> None:  # each time the request goes out, after the rate limiter
        if key in job.run_of or key in job.done:
            raise _Adopted  # a late commit of this row was adopted while this waited
        sent_at.append(datetime.now(UTC))
        wire[0] = True
        job.inflight[key] = batch_id  # from now on a run of it is this create's (claim waits)
        await committer.intent(batch_id, group_id, key)  # durable before the request is sent

    def on_refused() -> None:
        wire[0] = False

    try:
        answer = await job.client.add_runs(
            group_id,
            [job.run_input(key)],
            default_task_spec=job.plan.task_spec,
            on_send=on_send,
            on_refused=on_refused,
        )
    except asyncio.CancelledError:
        # Stopped (Ctrl-C, a timeout) while the create waited to go again after a 429: the service
        # refused every send, so nothing exists and the row is not in doubt (nor held on resume).
        if sent_at and not wire[0]:
            with contextlib.suppress(Exception):
                job.cp.resolve_intents(batch_id)
        raise
    except _Adopted:
        if sent_at:  # recorded for an earlier send of this call, refused with a 429: nothing created
            job.cp.resolve_intents(batch_id)
        return
    except OutcomeUnknownError:
        try:  # on the wire still, as far as the collector knows, until the group is read for it
            found = await reconciler.check(group_id, key, batch_id)
        finally:
            job._landed([key])
        committer.flush_receipts()
        if found is not None:
            job.stats.reconciled += 1
            job.cp.resolve_intents(batch_id)
        else:  # not committed yet, maybe never: held until the horizon, never sent again before
            job.hold(batch_id, group_id, [key], sent_at[-1])
        return
    except (*_FATAL, TransportError, RateLimitError) as exc:  # refused or never sent: none created
        job._landed([key])
        if sent_at:
            job.cp.resolve_intents(batch_id)
        if isinstance(exc, _FATAL):
            raise _Fatal(exc) from exc
        raise
    job._landed([key])
    (run_id,) = answer.run_ids
    committer.receipt(
        Receipt(
            row_key=key,
            run_id=run_id,
            group_id=group_id,
            batch_id=batch_id,
            created_at=datetime.now(UTC),
        )
    )
    job._adopt(key, run_id, group_id)
    job.inputs.pop(key, None)  # created: never sent again
    job.options.pop(key, None)
    job.stats.submitted += 1
    job.report()


class _Committer:
    """Group commit of runs mode's intents and receipts.

    Each create needs its intent durable before it is sent; one fsync'd segment per create caps a job at
    about a hundred creates a second. Creates that start at the same moment instead share one segment:
    each awaits the write that carries its intent. Receipts are written with the next intents (so before
    any later create is sent), before any outcome is handed to the checkpoint, and at the end of
    submission. A receipt lost to a crash leaves its intent in doubt, and the resume finds the run by
    reading the group: no row is paid twice.
    """

    def __init__(self, cp: Checkpoint) -> None:
        self.cp = cp
        self._intents: list[tuple[str, str | None, str]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._receipts: list[Receipt] = []
        self._writer: asyncio.Task[None] | None = None

    async def intent(self, batch_id: str, group_id: str | None, key: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._intents.append((batch_id, group_id, key))
        self._waiters.append(future)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await future

    def receipt(self, receipt: Receipt) -> None:
        self._receipts.append(receipt)

    @property
    def buffered(self) -> int:
        """Runs created whose receipts are not written yet (`max_cost` counts them as spent)."""
        return len(self._receipts)

    def flush_receipts(self) -> None:
        """Write the buffered receipts; on failure they stay buffered (and the error is raised)."""
        if self._receipts:
            receipts = self._receipts
            self.cp.record_receipts(receipts)
            del self._receipts[: len(receipts)]

    def close(self) -> None:
        """End of submission, however it ended: no intents write may start after this (a create that
        was never sent would only add rows in doubt), and the buffered receipts are written."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        for future in self._waiters:
            if not future.done():
                future.cancel()
        self._intents, self._waiters = [], []
        self.flush_receipts()

    async def _write(self) -> None:
        await asyncio.sleep(_COMMIT_DELAY)  # let the creates of this moment join
        while self._intents:
            intents, waiters = self._intents, self._waiters
            self._intents, self._waiters = [], []
            try:
                self.flush_receipts()
                self.cp.record_intent_rows(intents)
            except Exception as exc:
                for future in waiters:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for future in waiters:
                    if not future.done():
                        future.set_result(None)
