"""Stage 3, reconciliation: creates whose answers were never recorded (the process died, the answer
was lost) are found again by reading the group's runs, whose metadata carries the row key; rows whose
create the service may still commit are held until the commit horizon, then settled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from enrich._checkpoint import Receipt
from enrich._engine.job import _Job
from enrich._engine.prepare import KEY_FIELD
from enrich._models import RunStateEvent, TaskRun


async def reconcile_in_doubt(job: _Job) -> None:
    """Settle add-runs whose answers were never recorded: find their runs by the key in metadata."""
    doubts = job.cp.in_doubt()
    if not doubts:
        return
    job.report(f"reconciling {sum(len(d.row_keys) for d in doubts)} runs whose submission was interrupted")
    by_group: dict[str | None, dict[str, str]] = {}
    for intent in doubts:
        by_group.setdefault(intent.group_id, {}).update(dict.fromkeys(intent.row_keys, intent.batch_id))
    for gid, keys in by_group.items():
        if gid is None:
            # Runs created one by one cannot be listed: the API has no such endpoint. Those keys
            # are submitted again (counted, and said in the closing stats).
            pending = {k for k in keys if k not in job.run_of and k not in job.done}
            job.stats.resubmitted_unknown += len(pending)
            continue
        found = await reconcile(job, gid, keys)
        job.stats.reconciled += len(found)
    now = datetime.now(UTC)
    for intent in doubts:
        young = intent.sent_at is not None and (now - intent.sent_at).total_seconds() < job.horizon
        if young and intent.group_id is not None:
            # Sent less than the horizon ago (by a process that died): the service may still commit
            # it. Its rows not found are held, not sent again, until the horizon has passed (rows no
            # longer in the frame are not held: the intent stays in doubt for a later run).
            job.hold(intent.batch_id, intent.group_id, intent.row_keys, intent.sent_at, say=False)
        else:
            job.cp.resolve_intents(intent.batch_id)
            if intent.group_id is not None:  # never created: sent again (counted, and said)
                job.stats.resubmitted_unknown += sum(
                    1
                    for k in intent.row_keys
                    if k in job.wanted and k not in job.run_of and k not in job.done
                )
    # Keys found are no longer to do; keys held wait; keys not found stay (they were never created).
    job.todo = [k for k in job.todo if k not in job.run_of and k not in job.held_keys]
    job.say_held()


async def reconcile(job: _Job, group_id: str, keys: Mapping[str, str]) -> dict[str, str]:
    """Read the group's runs; adopt (and record receipts for) runs that carry one of `keys`.

    `keys` maps each row key in doubt to the batch of its intent; a receipt recorded with that batch id
    settles the intent by itself. A run the checkpoint knows (an older run of the row) is never adopted
    again; of the unknown runs of a row the first is adopted, any other is a duplicate (`claim`), as
    are runs of rows that have their run already. The read rides out an outage like every other
    read: a lost create is most likely in the middle of one.
    """

    async def read() -> tuple[dict[str, str], list[tuple[str, TaskRun]]]:
        found: dict[str, str] = {}
        others: list[tuple[str, TaskRun]] = []  # runs of other rows that are not their recorded run
        async for event in job.client.stream_group_runs(group_id):
            if not isinstance(event, RunStateEvent):
                continue
            run = event.run
            key = (run.metadata or {}).get(KEY_FIELD)
            if not isinstance(key, str) or (key not in job.wanted and key not in keys):
                continue
            if run.run_id == job.run_of.get(key) or run.run_id in job.superseded:
                continue
            if key in keys and key not in found and not job.cp.knows_run(run.run_id):
                found[key] = run.run_id  # the first: any later one of the row is a duplicate
            elif key in job.wanted:
                others.append((key, run))
        return found, others

    found, others = await job.patiently(read, "reading the group's runs to find a lost create")
    if found:
        now = datetime.now(UTC)
        job.cp.record_receipts(
            [
                Receipt(row_key=k, run_id=r, group_id=group_id, batch_id=keys[k], created_at=now)
                for k, r in found.items()
            ]
        )
        for k, r in found.items():
            job._unhold(k)
            if k in job.wanted:  # a row no longer in the frame: recorded (paid for), not collected
                job._adopt(k, r, group_id)
    for key, run in others:  # late commits of held rows, duplicates
        if run.run_id != job.run_of.get(key):
            job.claim(key, run, group_id)
    job.flush_late()
    return found


async def settle_holds(job: _Job) -> list[str]:
    """Reconcile the held batches whose horizon has passed: their runs found are adopted; the rest
    were never created and are returned, to send again (their intents resolved)."""
    async with job._settling:
        now = time.monotonic()
        due = {b: h for b, h in job.held.items() if h[2] <= now}
        if not due:
            return []
        by_group: dict[str | None, dict[str, str]] = {}
        for batch_id, (gid, keys, _) in due.items():
            by_group.setdefault(gid, {}).update(dict.fromkeys(keys, batch_id))
        for gid, keys in by_group.items():
            if gid is not None:
                job.stats.reconciled += len(await reconcile(job, gid, keys))
        again: list[str] = []
        for batch_id in due:
            _, keys, _ = job.held.pop(batch_id, (None, set(), 0.0))
            for k in keys:
                if job.held_keys.get(k) == batch_id:
                    del job.held_keys[k]
                    if k not in job.run_of and k not in job.done:
                        again.append(k)
            job.cp.resolve_intents(batch_id)
        job.stats.resubmitted_unknown += len(again)
        job.holds_changed.set()
        return again


class _Reconciler:
    """Finds the runs of creates whose answers were lost, many at a time.

    Each lost answer would otherwise cost a read of the whole group; instead the keys in doubt are
    gathered for a moment and one read of the group's runs settles all of them.
    """

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.waiting: dict[str, tuple[str, asyncio.Future[str | None]]] = {}
        self.round: asyncio.Task[None] | None = None

    async def check(self, group_id: str, key: str, batch_id: str) -> str | None:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.waiting[key] = (batch_id, future)
        if self.round is None or self.round.done():
            self.round = asyncio.create_task(self.settle(group_id))
        return await future

    async def settle(self, group_id: str) -> None:
        while self.waiting:
            await asyncio.sleep(0.2)  # let the other lost answers of this moment join
            waiting, self.waiting = self.waiting, {}
            try:
                found = await reconcile(self.job, group_id, {k: b for k, (b, _) in waiting.items()})
            except BaseException as exc:
                for _, future in waiting.values():
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, Exception):
                    continue
                raise
            for key, (_, future) in waiting.items():
                if not future.done():
                    future.set_result(found.get(key))
