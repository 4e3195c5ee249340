"""Stage 5, collection: one collector per task group reads the answers of its runs as they end, with
few requests (the group's events stream wakes it, the runs stream delivers the answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from enrich._engine.job import _FATAL, _Job
from enrich._engine.prepare import KEY_FIELD
from enrich._exceptions import (
    NotFoundError,
)
from enrich._models import RunStateEvent

# Collection: re-reading an answer already collected is waste; past this many per poll, the run holding
# the stream cursor back is waited for on its own (one blocking result call) so the cursor moves on.
_STRAGGLER_WASTE = 200
# ... and only once it has held the cursor back for this many polls in a row.
_STRAGGLER_POLLS = 2
# A poll that collected nothing is not repeated sooner than this (seconds), whatever wakes the collector.
_IDLE_POLL_GAP = 2.0
# A poll of the runs stream waits until this many runs ended (or half of those outstanding, or all),
# so a job of up to this many rows is collected in one read, and a larger one in a few.
_POLL_MIN_ENDED = 1000
# ... or until this many seconds passed since the last poll (the events stream may be down).
_FALLBACK_POLL = 30.0
# ... or, all but a few having ended, once no other has ended for this long (the few run late).
_TAIL_QUIET = 1.0
# Runs mode: how long the first intent of a group commit waits for others (a create's round trip is ~100x).
_COMMIT_DELAY = 0.005
# The events stream is reopened at once when it closes, unless it closed this soon after opening with
# nothing in it: then after a pause that doubles up to `_REOPEN_MAX` seconds.
_REOPEN_QUICK = 1.0
_REOPEN_MAX = 30.0


def collectors_for(job: _Job) -> dict[str, _GroupCollector]:
    """A collector for each group with runs outstanding or rows held (their late commits)."""
    groups = {gid for gid, runs in job.pending.items() if runs} | {h[0] for h in job.held.values()}
    return {gid: _GroupCollector(job, gid) for gid in groups if gid is not None}


class _GroupCollector:
    """Collects the answers of one group's runs with few requests.

    The runs stream is a snapshot in creation order, resumable from an event id. The collector keeps a
    cursor below which every run is collected, and reads from it with outputs: runs still active cost a
    few bytes, finished ones are collected. A run still active while many already-collected answers pile
    up after it (each poll would download them again) is waited for on its own with the blocking result
    call, and the cursor moves past it. Polls are triggered by the group's events stream (a run ended),
    batched so that a poll collects many answers, with a timer as a fallback.
    """

    def __init__(self, job: _Job, group_id: str) -> None:
        self.job = job
        self.group_id = group_id
        self.cursor: str | None = None
        self.ended: set[str] = set()  # run ids the events stream says have ended, not collected yet
        self.stragglers: set[str] = set()
        self._wake = asyncio.Event()
        self.new_runs = asyncio.Event()
        self._events_cursor: str | None = None
        self._last_poll = -math.inf
        self._last_poll_useful = True
        self._blocked: tuple[str | None, int] = (None, 0)  # the run holding the cursor, for how many polls
        self.late_seen = False  # the events stream told of a run of a held row: poll to adopt it
        self.poll_now = False  # the events stream closed at once with nothing: the group is inactive
        self._last_end = -math.inf  # when the events stream last told of an outstanding run's end

    def wake(self) -> None:
        self._wake.set()

    @property
    def outstanding(self) -> set[str]:
        return self.job.pending.setdefault(self.group_id, set())

    def finished(self) -> bool:
        return self.job.submission_done.is_set() and not self.outstanding

    def listening(self) -> bool:
        """Whether anything may still end or appear in the group: runs outstanding, or held rows."""
        return bool(self.outstanding) or bool(self.job.held_keys)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            events = tg.create_task(self.follow_events())
            stragglers: set[asyncio.Task[None]] = set()
            try:
                while not self.finished():
                    await self.wait_for_work()
                    if self.finished():
                        break
                    blocker = await self.job.patiently(self.poll, "reading the group's runs")
                    if blocker is not None and blocker not in self.stragglers:
                        self.stragglers.add(blocker)
                        self.job.stats.stragglers += 1
                        t = tg.create_task(self.wait_straggler(blocker))
                        stragglers.add(t)
                        t.add_done_callback(stragglers.discard)
            finally:
                events.cancel()
                for t in stragglers:
                    t.cancel()

    async def wait_for_work(self) -> None:
        """Sleep until a poll is worth a request: enough runs ended, all of ours ended, or a timer.

        A poll that collected nothing is not repeated within `_IDLE_POLL_GAP` seconds, whatever wakes us.
        """
        start = time.monotonic()
        while True:
            pending = self.outstanding
            outstanding = len(pending)
            ended = len(self.ended & pending)
            now = time.monotonic()
            if outstanding == 0:
                if self.job.submission_done.is_set() or self.late_seen:
                    return  # (a late commit of a held row: a poll adopts it)
                self._wake.clear()
                await self._wake.wait()  # the next add-runs, or the end of submission, wakes us
                start = time.monotonic()
                continue
            gap = 0.0 if self._last_poll_useful else self._last_poll + _IDLE_POLL_GAP - now
            # Fallback, for when the events stream is down: every 30 s. Waiting costs no wall time: the
            # job ends with its last run, and a poll follows that run's end.
            fallback = _FALLBACK_POLL - (now - start)
            # Ready once all ended, or many; or all but a few once no other run has ended for a moment
            # (the last runs of a batch, running late, are not waited for before the others are read).
            few = max(1, min(10, outstanding // 100))
            quiet = self._last_end + _TAIL_QUIET - now
            tail = bool(ended) and ended >= outstanding - few
            ready = (
                self.late_seen
                or self.poll_now
                or (ended and (ended >= outstanding or ended >= max(_POLL_MIN_ENDED, outstanding // 2)))
                or (tail and quiet <= 0)
            )
            if tail and not ready:
                fallback = min(fallback, quiet)
            if gap <= 0 and (ready or fallback <= 0):
                return
            limit = max(gap if ready else max(gap, fallback), 0.05)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await self._wake.wait()

    async def follow_events(self) -> None:
        """Follow the group's events stream; each run that ends wakes the collector when it matters.

        The stream ends when no run of the group is active, but also whenever the service or a proxy
        in between closes it on a timer of its own: it is reopened from its last event whenever runs are
        outstanding or rows held, and never taken to mean that every run ended (at most twice a second).
        One that closes at once with nothing in it is reopened after a pause that doubles: no run of the
        group is active, so a poll follows at once.
        """
        failures = 0
        quick = 0
        job = self.job
        while not self.finished():
            self.new_runs.clear()
            if not self.listening():  # an empty group's stream closes at once: wait for runs first
                await self.new_runs.wait()
                continue
            opened = time.monotonic()
            heard = 0
            try:
                async for event in job.client.stream_group_events(
                    self.group_id, last_event_id=self._events_cursor
                ):
                    heard += 1
                    if event.event_id is not None:
                        self._events_cursor = event.event_id
                    if isinstance(event, RunStateEvent) and not event.run.is_active:
                        run_id = event.run.run_id
                        self.ended.add(run_id)
                        if run_id in self.outstanding:
                            self._last_end = time.monotonic()
                            self._wake.set()
                        elif run_id not in job.key_of_run and job.held_keys:
                            key = (event.run.metadata or {}).get(KEY_FIELD)
                            if isinstance(key, str) and key in job.held_keys:
                                self.late_seen = True  # a late commit of a held row: adopt it
                                self._wake.set()
                failures = 0
            except _FATAL:
                raise
            except NotFoundError:
                if self.group_id in job.recorded_groups:
                    raise job.unknown_group(self.group_id) from None
                failures += 1  # a group created just now: the service may not list it yet
                await asyncio.sleep(min(60.0, 2.0**failures))
                continue
            except Exception:  # the timer fallback keeps the job going while the stream is down
                failures += 1
                await asyncio.sleep(min(60.0, 2.0**failures))
                continue
            lived = time.monotonic() - opened
            quick = quick + 1 if heard == 0 and lived < _REOPEN_QUICK else 0
            if quick and self.outstanding:
                self.poll_now = True  # closed at once with nothing: no run is active, a poll collects them
            self._wake.set()  # runs may have ended while it closed: let the collector look
            if not (self.outstanding - self.ended) and not job.held_keys:
                pause = _FALLBACK_POLL  # every run it waits for has ended: the poll collects them
            elif quick:
                pause = min(_REOPEN_MAX, 0.5 * 2.0**quick)
            else:  # closed on a timer of its own with runs still active: reopen (at most twice a second)
                pause = max(0.0, _REOPEN_QUICK / 2 - lived)
            if not self.finished():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self.new_runs.wait()

    async def poll(self) -> str | None:
        """Read the runs stream from the cursor; collect what ended. Returns a run to wait for alone.

        The cursor only moves past runs that are settled for this job: collected, or not ours. A run whose
        metadata names one of our keys but whose receipt is not recorded yet (its add-runs answer is on its
        way) holds the cursor back like an active run, so it is seen again once it is ours.
        """
        job = self.job
        job.stats.polls += 1
        prefix = True
        waste = 0
        collected = 0
        blocker: str | None = None
        self.late_seen = self.poll_now = False
        async for event in job.client.stream_group_runs(
            self.group_id, last_event_id=self.cursor, include_output=True
        ):
            if not isinstance(event, RunStateEvent):
                continue
            run = event.run
            claimed = (run.metadata or {}).get(KEY_FIELD)
            key = job.key_of_run.get(run.run_id)
            if key is not None:
                job.check_owner(key, run)
            if key is None:
                verdict = "settled"
                if isinstance(claimed, str) and claimed in job.wanted:
                    if run.run_id == job.run_of.get(claimed):  # collected before (its index is dropped)
                        waste += 0 if prefix else 1
                    else:
                        verdict = job.claim(claimed, run, self.group_id)
                if verdict == "wait":
                    prefix = False  # ours in a moment, once its create's answer is in: keep it ahead
                    continue
                if verdict == "settled":
                    if prefix:
                        self.cursor = event.event_id
                    continue
                key = claimed  # adopted just now: a late commit, or a lost create found
            if run.is_active:
                if key in job.done or run.run_id in self.stragglers:  # settled, or waited for alone
                    if prefix:
                        self.cursor = event.event_id
                elif prefix:
                    prefix = False
                    blocker = run.run_id
                continue
            if key not in job.done:
                job.finish(key, run, event.output)
                collected += 1
            elif not prefix:
                waste += 1
            self.ended.discard(run.run_id)
            if prefix:
                self.cursor = event.event_id
        job.push_outcomes()
        self._last_poll = time.monotonic()
        self._last_poll_useful = collected > 0
        # A run that holds the cursor back poll after poll while answers pile up behind it is waited for
        # alone; one that is merely a little slower than its batch is not worth its own requests.
        self._blocked = (blocker, self._blocked[1] + 1) if blocker == self._blocked[0] else (blocker, 1)
        if blocker is not None and waste >= _STRAGGLER_WASTE and self._blocked[1] >= _STRAGGLER_POLLS:
            return blocker
        return None

    async def wait_straggler(self, run_id: str) -> None:
        run, output = await self.job.patiently(
            lambda: self.job.client.wait_for_result(run_id, poll_timeout=600), "waiting for a run"
        )
        key = self.job.key_of_run.get(run_id)
        if key is not None:
            self.job.check_owner(key, run)
            self.job.finish(key, run, output)
        self.wake()
