"""Stage 2, the running job's state: what the checkpoint says is done, running or to do (`_Job.load`),
rows held while a lost create may still be committed, outcomes handed to the checkpoint in batches,
and progress. The stages after it (reconcile, submit, collect) act on a `_Job`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import polars as pl

from enrich._checkpoint import Checkpoint, Outcome, Receipt
from enrich._client import MAX_RUNS_PER_ADD, TaskClient
from enrich._engine.prepare import KEY_FIELD, _Plan
from enrich._exceptions import (
    APIStatusError,
    AuthenticationError,
    ForeignRunError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
    UsageError,
    ValidationError,
)
from enrich._limiter import RateLimiter
from enrich._models import TaskOutput, TaskRun
from enrich._processors import PROCESSORS
from enrich._progress import Progress, ProgressSink

if TYPE_CHECKING:
    from enrich._engine.submit import _Committer

_T = TypeVar("_T")
_log = logging.getLogger("enrich")
# How long reads ride out a service that keeps failing (transport errors, 5xx) before the job gives up.
_OUTAGE_SECONDS = 1800.0
# Outcomes are handed to the checkpoint this many at a time (or after a second, or at the end of a poll).
_OUTCOME_BATCH = 1000
#: How a run that ended without an answer is recorded (`_status`), besides "failed": the service's own
#: word for it. `cancelled` and `action_required` are never sent again unless asked by name.
UNANSWERED = ("failed", "cancelled", "action_required")
#: The outcome statuses of a finished row.
OUTCOMES = ("completed", *UNANSWERED)
# What each means, the start of its row's `_error` (the service's message, if any, follows).
_MEANING = {
    "cancelled": "cancelled: the run was stopped before it finished, and has no answer",
    "action_required": (
        "action required: the run stopped to wait for an action on the service's side (see it on "
        "Parallel's platform), and has no answer; it is not waited for"
    ),
}
_STATUS = {s: s for s in OUTCOMES}  # one str object per status, not one per row
_COMPLETED = ("completed", None)


def retry_statuses(value: object) -> frozenset[str]:
    """The outcome statuses `retry_failed` asks to send again: False/None none, True "failed", or the
    names given (one string, or several) among `UNANSWERED`. A `UsageError` for anything else.

    >>> sorted(retry_statuses(True)), sorted(retry_statuses(("failed", "cancelled")))
    (['failed'], ['cancelled', 'failed'])
    """
    if value is None or value is False:
        return frozenset()
    if value is True:
        return frozenset({"failed"})
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise UsageError(
            f"retry_failed must be True, False or statuses to send again ({', '.join(UNANSWERED)}), "
            f"got {value!r}"
        )
    unknown = [n for n in names if n not in UNANSWERED]
    if unknown:
        raise UsageError(
            f"retry_failed: {unknown[0]!r} is not a status that can be sent again; "
            f"use any of {', '.join(UNANSWERED)} (True: failed)"
        )
    return frozenset(names)


@dataclass
class JobStats:
    """What a job did, for benchmarks and the CLI summary (not part of the frame)."""

    rows: int = 0
    distinct: int = 0
    already_done: int = 0
    submitted: int = 0
    reconciled: int = 0
    resubmitted_unknown: int = 0
    requests: int = 0
    #: HTTP answers received, of any status: 0 after requests means the service was never reached.
    answered: int = 0
    rate_limited: int = 0
    polls: int = 0
    stragglers: int = 0
    #: Runs found for a row that already had one (a create the service committed after the job had
    #: given it up and sent it again): paid for, recorded, never joined.
    duplicates: int = 0
    #: Runs of held rows (or of rows about to be sent again) adopted when they appeared: late commits.
    #: (Lost creates found by reading the group right away are counted in `reconciled`.)
    found_late: int = 0
    #: Rows whose create's outcome was still unknown when the job ended (within the commit horizon).
    held: int = 0
    capped: bool = False
    #: The call stopped at its `timeout`.
    timed_out: bool = False
    #: Runs the checkpoint records in all (every call, duplicates included), and their list price
    #: (None: the processor has no known price): what the job has spent so far.
    runs_total: int = 0
    spent: float | None = None
    #: The service's warnings on the job's runs (every call): each distinct message -> runs that carried it.
    service_warnings: dict[str, int] = field(default_factory=dict)
    checkpoint: str = ""
    elapsed: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: Wall seconds per stage: "key" (inputs built and keyed), "dedupe" (distinct inputs and local
    #: checks), "load" (checkpoint opened and read), "submit" (until the last run was created),
    #: "collect" (from then until the last answer), "join" (the result frame). Stages that did not run
    #: are absent. "join" sums each shard's join: finished shards are joined a few at once in worker
    #: threads, so it may exceed its share of the wall.
    stages: dict[str, float] = field(default_factory=dict)
    #: Rows of the result per `_status` ("completed", "failed", "cancelled", "action_required",
    #: "pending"), counted by the join.
    statuses: dict[str, int] = field(default_factory=dict)
    #: The job's pilot (`pilot=`): what it measured, run in this call or kept from an earlier one.
    pilot: Any = None

    @property
    def runs_now(self) -> int:
        """Runs this call created or adopted: submitted, found again after a lost answer, or committed
        late and found."""
        return self.submitted + self.reconciled + self.found_late


class _Adopted(Exception):
    """Raised from a create's `on_send`: a row of it got its run (a late commit) while it waited for the
    rate limiter, so it must not be sent."""


class _Fatal(Exception):
    """Wraps an API answer that ends the job (bad key, no credit, refused spec)."""

    def __init__(self, error: APIStatusError) -> None:
        super().__init__(str(error))
        self.error = error


_FATAL = (AuthenticationError, PaymentRequiredError, PermissionDeniedError, ValidationError)


class _Job:
    def __init__(
        self,
        plan: _Plan,
        cp: Checkpoint,
        client: TaskClient,
        limiter: RateLimiter,
        *,
        retry_failed: bool | str | Collection[str],
        sink: ProgressSink | None,
        stats: JobStats,
        concurrency: int,
        max_cost: float | None = None,
        keep_basis: bool = False,
        horizon: float = 120.0,
    ) -> None:
        self.plan = plan
        self.cp = cp
        self.client = client
        self.limiter = limiter
        self.sink = sink
        self.stats = stats
        self.concurrency = concurrency
        # The outcome statuses whose rows are sent again.
        self.retry_failed: frozenset[str] = retry_statuses(retry_failed)
        self.max_cost = max_cost
        self.keep_basis = keep_basis  # the join reads each row's basis (the checkpoint always has it)
        self.temporary = False  # checkpoint=False: the row errors name the directory to pass to resume
        self.default_checkpoint = False  # checkpoint=None: so do they (other rows, another directory)
        self.root = cp.store.location  # the job's checkpoint (a shard's `cp` is an area under it)
        # Runs the job's other shards have paid for (`max_cost` counts the whole job's).
        self.paid_elsewhere: Callable[[], int] = lambda: 0
        # On a cluster, the job's cost cap is a ledger's (`broker.Ledger`): this shard may have paid for
        # `allowance` runs in all, and asks it for more (`top_up`) before it sends.
        self.ledger: Any = None
        self.allowance = 0
        self._asking = asyncio.Lock()
        processor_ = PROCESSORS.get(plan.processor)
        self.price = processor_.price_per_run if processor_ is not None else None
        self.reserved = 0  # runs being created right now (runs mode), counted against max_cost
        self.capped = False  # submission stopped at max_cost
        # An add-runs call spends its size from the runs budget, so it can be no larger than the budget (nor
        # than what the limiter learned the service accepts at once: `limiter.max_runs`).
        self.batch_size = max(1, min(MAX_RUNS_PER_ADD, int(limiter.runs_budget)))
        # Whether a call can take what a window has left (`acquire(at_least=)`): a limiter of the
        # caller's own (a subclass written for an older enrich) may not take it.
        self.fill = "at_least" in inspect.signature(limiter.acquire).parameters
        # Late commits. A create whose answer was lost may still be committed by the service for up to
        # `horizon` seconds after it was sent: until then its rows are held (neither created nor to send),
        # and a run of theirs that shows up is adopted. Held batches: batch_id -> (group_id, keys,
        # deadline on the monotonic clock); `held_keys`: key -> batch_id. `inflight`: key -> batch_id of
        # the create on the wire now (its runs may be listed before its answer arrives).
        self.horizon = horizon
        self.held: dict[str, tuple[str | None, set[str], float]] = {}
        self.held_keys: dict[str, str] = {}
        self.inflight: dict[str, str] = {}
        self.holds_changed = asyncio.Event()
        self._settling = asyncio.Lock()
        self._late: list[Receipt] = []  # receipts of late runs adopted, not written yet (`flush_late`)
        # Per distinct key: the run that answers it, and its outcome once known.
        self.run_of: dict[str, str] = {}
        self.key_of_run: dict[str, str] = {}
        self.group_of: dict[str, str | None] = {}
        # key -> (status, error). Never the answer: the checkpoint has it, and the join reads it from
        # there a segment at a time into typed columns. Answers and bases held here until the join took
        # gigabytes (100,000 rows with citations: 9 GB).
        self.done: dict[str, tuple[str, str | None]] = {}
        # Rows of `done` per status other than "completed" (for the progress counts).
        self.unanswered: collections.Counter[str] = collections.Counter()
        self.recorded_groups: frozenset[str] = frozenset()  # groups of earlier calls (set by load)
        # The service's warnings on the runs finished in this call: message -> runs that carried it.
        self.service_warnings: collections.Counter[str] = collections.Counter()
        self._outcomes: list[Outcome] = []  # finished, not yet handed to the checkpoint
        self._outcomes_since = 0.0
        self.todo: list[str] = []
        self.inputs: dict[str, Any] = {}  # key -> input, of the rows not created yet
        self.options: dict[str, dict[str, Any]] = {}  # key -> its run options (templated ones), likewise
        self.wanted = frozenset(plan.keys)
        # Run ids submitted and not collected yet, by group (None: runs created one by one).
        self.pending: dict[str | None, set[str]] = {}
        # Runs that answered a key before (superseded by retry_failed, or sent again): never adopted again.
        self.superseded: set[str] = set()
        self._last_report = 0.0
        self.collect_wakeup = asyncio.Event()
        self.submission_done = asyncio.Event()
        # Every row not held has been sent (held rows may still be sent again past their horizon):
        # the job's next shard may start sending (`pipeline._run_areas`).
        self.fresh_sent = asyncio.Event()
        self.submitted_at: float | None = None  # time.monotonic() when the last run was created
        self.committer: _Committer | None = None  # runs mode's group commit of intents and receipts

    # ---- state from the checkpoint

    def unknown_group(self, group_id: str) -> ForeignRunError:
        """The service answered 404 for a group the checkpoint recorded: its runs are not there."""
        return ForeignRunError(
            f"the service at {self.client.base_url} does not know task group {group_id}, recorded in "
            f"checkpoint {self.cp.path}: it does not hold this checkpoint's runs (an emulator restarted, "
            "or another service at the same address); its answers are not used: use a new checkpoint"
        )

    def explain(self, exc: BaseException) -> BaseException:
        """A 404 for a group the checkpoint recorded becomes `unknown_group`; any other error is kept."""
        if isinstance(exc, NotFoundError) and exc.request is not None:
            for group_id in self.recorded_groups:
                if f"/{group_id}" in exc.request.url:
                    return self.unknown_group(group_id)
        return exc

    def load(self) -> None:
        self.recorded_groups = frozenset(self.cp.groups)
        state = self.cp.state(outputs=False)  # the answers are read by the join, not held here
        self.cp.drop_cache()  # its cached light state (~130 MB at 1M rows) is not needed again
        if state.height:  # (a filter copies the frame: at a million rows, 300 MB more at the peak)
            wanted = state["row_key"].is_in(self.plan.key_series().implode())
            if not wanted.all():
                state = state.filter(wanted)
        # Column-wise, into dicts built in bulk: a Python step per row is most of a 1M-row resume's time.
        # Finished rows need no reverse index (run -> key): the collector tells them by the key in their
        # run's metadata.
        status = pl.col("status")
        again = sorted(self.retry_failed)
        if again:
            self.superseded.update(state.filter(status.is_in(again))["run_id"].to_list())
        # (a status not among the outcomes is "submitted": running, collected below)
        ended = state["status"].is_in([s for s in OUTCOMES if s not in self.retry_failed])
        finished = state if ended.all() else state.filter(ended)
        keys = finished["row_key"].to_list()
        statuses = [_STATUS.get(x, x) for x in finished["status"].to_list()]  # shared constants
        self.done = dict(zip(keys, zip(statuses, finished["error"].to_list(), strict=True), strict=True))
        self.run_of = dict(zip(keys, finished["run_id"].to_list(), strict=True))
        del finished
        running = state.filter(~status.is_in(OUTCOMES) & pl.col("run_id").is_not_null())
        for key, run_id, group_id in running.select("row_key", "run_id", "group_id").iter_rows():
            self._adopt(key, run_id, group_id)
        self.stats.already_done += len(self.done)
        for key in self.plan.keys:
            if key in self.plan.local_errors:
                self.done[key] = ("failed", self.plan.local_errors[key])
            elif key not in self.done and key not in self.run_of:
                self.todo.append(key)
        self.unanswered = collections.Counter(v[0] for v in self.done.values() if v[0] != "completed")
        # Runs recorded for keys about to be (re)submitted answered them before: never adopt one again,
        # never let one hold the runs-stream cursor.
        if self.todo:
            self.superseded.update(self.cp.run_ids(self.todo))
        # Only rows still to be sent need their input; at a million rows the others are ~350 MB.
        todo = set(self.todo)
        self.inputs = self.plan.inputs_of(todo)
        self.options = self.plan.options_of(todo)  # (templated options only: the others are the plan's)
        self.plan.inputs = self.plan.option_texts = None
        self.plan.consumed = True

    def _adopt(self, key: str, run_id: str, group_id: str | None) -> None:
        old = self.run_of.get(key)
        if old is not None:
            self.key_of_run.pop(old, None)
            self.pending.get(self.group_of.get(key), set()).discard(old)
        self.run_of[key] = run_id
        self.key_of_run[run_id] = key
        self.group_of[key] = group_id
        if key not in self.done:
            self.pending.setdefault(group_id, set()).add(run_id)

    def affordable(self, n: int) -> int:
        """How many of `n` more runs fit under `max_cost`, counting every run the checkpoint says was
        created (across resumes) and those being created now."""
        if self.max_cost is None or self.price is None:
            return n
        if self.ledger is not None:
            room = self.allowance - self.spending()
        else:
            spent = (self.spending() + self.paid_elsewhere()) * self.price
            room = int((self.max_cost - spent) / self.price + 1e-9)
        if room < n:
            self.capped = True
        return max(0, min(n, room))

    async def top_up(self, want: int) -> None:
        """With a cluster's ledger: make room for `want` more runs under `max_cost` if this shard's
        allowance lacks it (one call to the ledger per add-runs call, or per batch of creates)."""
        if self.ledger is None or self.max_cost is None or self.price is None:
            return
        async with self._asking:
            if self.allowance - self.spending() < want:
                self.allowance = await self.ledger.allow(self.spending(), want)

    def spending(self) -> int:
        """Runs this shard has paid for or may have: recorded, created and not recorded yet, being
        created, and held (a late commit may still create them)."""
        buffered = self.committer.buffered if self.committer is not None else 0
        return self.cp.runs + buffered + len(self._late) + self.reserved + len(self.held_keys)

    @property
    def outstanding(self) -> int:
        return sum(len(p) for p in self.pending.values())

    def check_owner(self, key: str, run: TaskRun) -> None:
        """Raise `ForeignRunError` unless `run`, recorded for row `key`, carries `key` in its metadata.

        A run id names a run of the service that created it; another service (an emulator restarted
        without its seed hands out the same ids) may answer for the id with another input's run."""
        claimed = (run.metadata or {}).get(KEY_FIELD)
        if claimed is not None and claimed != key:  # no key at all cannot be checked (nor reconciled)
            raise ForeignRunError(
                f"run {run.run_id}, recorded for row {key}, carries the row key {claimed!r}: the service at "
                f"{self.client.base_url} does not hold this checkpoint's runs (another address, or an "
                "emulator restarted); its answers are not used: use a new checkpoint",
                run_id=run.run_id,
                row_key=key,
                claimed=claimed,
            )

    # ---- creates whose outcome is unknown: held until the commit horizon

    def hold(
        self,
        batch_id: str,
        group_id: str | None,
        keys: Sequence[str],
        sent_at: datetime | None,
        *,
        say: bool = True,
    ) -> None:
        """Hold `keys`, whose create (sent at `sent_at`, UTC) may still be committed by the service.

        They are neither created nor sent again until the horizon after the send has passed; a run of
        theirs that shows up before is adopted (`found_late`). The intent stays in doubt on disk, so a
        process that dies now holds them again on resume.
        """
        keys = [k for k in keys if k in self.wanted and k not in self.run_of and k not in self.done]
        if not keys:
            return
        age = (datetime.now(UTC) - sent_at).total_seconds() if sent_at is not None else 0.0
        deadline = time.monotonic() + max(0.0, self.horizon - max(0.0, age))
        _, old, _ = self.held.get(batch_id, (group_id, set(), deadline))
        self.held[batch_id] = (group_id, old | set(keys), deadline)
        for k in keys:
            self.held_keys[k] = batch_id
        self.holds_changed.set()
        if say:
            self.say_held()

    def say_held(self) -> None:
        if not self.held:
            return
        deadline = max(h[2] for h in self.held.values())
        until = datetime.now() + (deadline - time.monotonic()) * timedelta(seconds=1)
        self.report(
            f"{len(self.held_keys):,} rows held until {until:%H:%M:%S}: their create's answer was lost and "
            "the service may still commit it (it is adopted if it does; sent again if not)"
        )

    def _unhold(self, key: str) -> str | None:
        """`key` is held no longer (its run was found): returns the batch it was held for."""
        batch_id = self.held_keys.pop(key, None)
        if batch_id is not None:
            keys = self.held[batch_id][1]
            keys.discard(key)
            if not keys:
                del self.held[batch_id]
            self.holds_changed.set()
        return batch_id

    def found_late(self, key: str, run_id: str, group_id: str | None) -> None:
        """A run of `key` appeared while its create's outcome was unknown (held), or before it was sent
        again: it is the row's run. Its receipt (under the intent's batch, which settles that row's
        doubt) is written with the others found in the same read (`flush_late`), before any outcome."""
        batch_id = self._unhold(key)
        self._late.append(
            Receipt(
                row_key=key,
                run_id=run_id,
                group_id=group_id,
                batch_id=batch_id or f"late-{uuid.uuid4().hex}",
                created_at=datetime.now(UTC),
            )
        )
        self.inputs.pop(key, None)
        self.options.pop(key, None)
        self._adopt(key, run_id, group_id)
        self.stats.found_late += 1

    def flush_late(self) -> None:
        """Write the receipts of late runs adopted so far (after runs mode's buffered receipts). A crash
        before this loses nothing: their intents are still in doubt, and the next run finds them."""
        if self._late:
            if self.committer is not None:
                self.committer.flush_receipts()
            late, self._late = self._late, []
            self.cp.record_receipts(late)

    def claim(self, key: object, run: TaskRun, group_id: str | None) -> str:
        """What to make of a run of the group that carries row key `key` in its metadata and is not the
        run recorded for it: "ours" (now adopted: a late commit, or a lost create found), "wait" (its
        create is on the wire: the answer will name it), or "settled" (not ours, an older run of the row,
        or a duplicate: recorded as paid, never joined)."""
        if not isinstance(key, str) or key not in self.wanted or run.run_id in self.superseded:
            return "settled"
        if key in self.inflight:
            return "wait"
        if self.cp.knows_run(run.run_id):
            return "settled"  # recorded before: an older run of the row, or a duplicate already counted
        if key in self.held_keys or (key not in self.run_of and key not in self.done):
            self.found_late(key, run.run_id, group_id)
            return "ours"
        self.cp.record_duplicates([(key, run.run_id, group_id)])
        self.stats.duplicates += 1
        self.report(
            f"a duplicate run {run.run_id} of a row that has its own run: recorded as paid, not joined "
            f"({self.stats.duplicates} so far; its create was committed after the job gave it up)"
        )
        return "settled"

    async def wait_for_holds(self) -> None:
        """Sleep until the first held batch reaches its horizon, or the holds change."""
        if not self.held:
            return
        self.holds_changed.clear()
        delay = min(h[2] for h in self.held.values()) - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.holds_changed.wait()

    def report(self, message: str | None = None, *, force: bool = False) -> None:
        if self.sink is None:
            return
        now = time.monotonic()
        if not force and message is None and now - self._last_report < 0.2:
            return
        self._last_report = now
        counts = self.unanswered
        completed = len(self.done) - sum(counts.values())
        self.sink(
            Progress(
                total=len(self.plan.keys),
                completed=completed,
                failed=counts["failed"],
                cancelled=counts["cancelled"],
                action_required=counts["action_required"],
                running=self.outstanding,
                # by definition, not by a queue: rows taken off a queue and not sent (a timeout) still wait
                waiting=max(0, len(self.plan.keys) - len(self.done) - self.outstanding),
                rate_limited=self.limiter.waiting,
                message=message,
                refused=self.client.rate_limited_count,
                spent=self.cp.runs * self.price if self.price is not None else None,
            )
        )

    # ---- outcomes

    def finish(self, key: str, run: TaskRun, output: TaskOutput | None) -> None:
        """Record the end of the run that answers `key` (ignored for superseded runs).

        Outcomes are handed to the checkpoint in batches (`push_outcomes`): one Parquet frame per answer
        costs ~25x more CPU than one per thousand. An outcome not yet pushed or flushed is lost on SIGKILL
        and simply collected again on resume.
        """
        if self.run_of.get(key) != run.run_id or key in self.done:
            return
        for warning in run.warnings:
            if warning.message not in self.service_warnings:
                _log.warning("the service warns: %s", warning.message)
            self.service_warnings[warning.message] += 1
        self.pending.get(self.group_of.pop(key, None), set()).discard(run.run_id)
        # A finished run needs no reverse index: the collector knows it by the key in its metadata.
        self.key_of_run.pop(run.run_id, None)
        now = datetime.now(UTC)
        if run.status == "completed" and output is not None:
            text = dumps(output.content)
            basis = dumps(list(output.basis_json))  # as sent; the join normalizes
            self.done[key] = _COMPLETED
            outcome = Outcome(
                row_key=key,
                run_id=run.run_id,
                status="completed",
                output=text,
                basis=basis,
                error=None,
                finished_at=now,
                interaction_id=run.interaction_id,
                seconds=run_seconds(run),
            )
        else:
            status, error = _unanswered(run)
            self.done[key] = (status, error)
            self.unanswered[status] += 1
            outcome = Outcome(
                row_key=key,
                run_id=run.run_id,
                status=status,
                error=error,
                finished_at=now,
                interaction_id=run.interaction_id,
                seconds=run_seconds(run),
            )
        if not self._outcomes:
            self._outcomes_since = time.monotonic()
        self._outcomes.append(outcome)
        if len(self._outcomes) >= _OUTCOME_BATCH or time.monotonic() - self._outcomes_since > 1.0:
            self.push_outcomes()
        self.report()

    async def patiently(self, call: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a read-only call, riding out an outage of the service.

        The client already retries a few times over some seconds; an overnight job must also survive a
        service that is down for minutes. Transport errors, 5xx and exhausted 429 retries are retried with
        backoff (up to a minute apart) until `_OUTAGE_SECONDS` of failures in a row; other errors end the job.
        An answer the service says not to retry (`x-should-retry: false`) is not sent again by the client,
        but a read is still ridden out here, slowly: it creates nothing, and ending an overnight job on
        one 503 would lose more than a few reads cost.
        """
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                return await call()
            except (TransportError, ServerError, RateLimitError) as exc:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if now - first_failure > _OUTAGE_SECONDS:
                    raise
                attempt += 1
                if attempt == 1:
                    self.report(f"{what}: {exc}; retrying until the service answers")
                await asyncio.sleep(min(60.0, 2.0**attempt))

    def push_outcomes(self) -> None:
        """Hand the outcomes gathered so far to the checkpoint (which flushes them to disk in batches)."""
        self.flush_late()
        if self._outcomes:
            if self.committer is not None:
                self.committer.flush_receipts()  # an outcome on disk never precedes its run's receipt
            outcomes, self._outcomes = self._outcomes, []
            self.cp.add_outcomes(outcomes)

    def metadata_for(self, key: str) -> dict[str, Any]:
        return {**self.plan.metadata, KEY_FIELD: key}

    def run_input(self, key: str) -> dict[str, Any]:
        """The TaskRunInput of `key`'s run: its input, the processor, its metadata and run options."""
        body = {
            "input": self.inputs[key],
            "processor": self.plan.processor,
            "metadata": self.metadata_for(key),
        }
        options = self.plan.run_options
        if options is not None:  # (templated ones were rendered for the rows to send: never the templates)
            body.update(self.options[key] if options.templated else options.given)
        return body

    def _landed(self, keys: Iterable[str]) -> None:
        """The create of `keys` is answered (or failed): their runs, if any, are no longer on the wire."""
        for k in keys:
            self.inflight.pop(k, None)


def run_seconds(run: TaskRun) -> float | None:
    """How long a finished run took by the service's clock (`modified_at` - `created_at`, RFC 3339);
    None when either is missing or unreadable, never a guess."""
    if not run.created_at or not run.modified_at:
        return None
    try:
        start = datetime.fromisoformat(run.created_at.replace("Z", "+00:00"))
        end = datetime.fromisoformat(run.modified_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if start.tzinfo is None or end.tzinfo is None:
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


def _unanswered(run: TaskRun) -> tuple[Any, str]:
    """The outcome status and `_error` of a run that ended without an answer: cancelled and
    action_required as themselves, anything else (failed, an unknown inactive status, a completed run
    without an output) as failed."""
    said = run.error.message if run.error is not None else None
    if run.status in _MEANING:
        return _STATUS[run.status], _MEANING[run.status] + (f" (the service says: {said})" if said else "")
    if said is not None:
        return "failed", said
    if run.status == "completed":
        return "failed", "the run completed without an output"
    return "failed", f"the run ended with status {run.status!r}"


def dumps(value: Any) -> str:
    """`value` as compact JSON text: the value json would write, never another.

    orjson where it can (12x faster on answers with their basis: the last read of a job spent most of
    its CPU here); json for what orjson refuses: integers beyond 64 bits, lone surrogates, and the
    floats the client decodes as `ExoticFloat` (NaN, infinities), which orjson would write as null.
    """
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, UnicodeDecodeError):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
