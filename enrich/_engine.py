"""The batch engine: frame → content-keyed run inputs → checkpoint filter → runs → checkpoint → join.

`aenrich()` is the implementation; `enrich()` is its one sync bridge. A job is:

1. *Prepare* (no network): read the frame, parse the output description, build each row's input, key it
   by content (input + task spec + processor), deduplicate, check everything the API would refuse.
   Every bad input is a one-line `UsageError` here, before anything is sent or spent.
2. *Filter* against the checkpoint: keys with an outcome are done; keys with a receipt are collected,
   never resubmitted; keys whose add-runs was sent but not recorded are reconciled by reading the
   group's runs (their metadata carries the key) before anything new is sent.
3. *Run*: submission (add-runs of ≤1,000, or one create per key in `mode="runs"`) pipelined with
   collection, everything under one shared rate limiter.
4. *Join*: the answers, typed, onto every row in its original order, with `_status`, `_error`, `_run_id`.

What survives a crash at each step is the checkpoint's business (`enrich._checkpoint`): the group id is
durable before any run is added to it, the intent of an add before it is sent, its receipts before the
next add is sent (in runs mode the creates of one moment share one write of their intents, and their
receipts go with the next write).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import polars as pl

from enrich._checkpoint import Checkpoint, Outcome, Receipt
from enrich._client import MAX_RUNS_PER_ADD, TaskClient, service_of
from enrich._exceptions import (
    APIStatusError,
    AuthenticationError,
    ForeignRunError,
    NotFoundError,
    OutcomeUnknownError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceMismatchError,
    TransportError,
    UsageError,
    ValidationError,
)
from enrich._inputs import (
    build_inputs,
    check_input_size,
    dedupe,
    from_polars,
    keys_and_sizes,
    to_polars,
    validate_inputs,
)
from enrich._limiter import RateLimiter
from enrich._models import FieldBasis, RunStateEvent, TaskOutput, TaskRun
from enrich._processors import PROCESSORS
from enrich._progress import Progress, ProgressSink, TqdmSink
from enrich._retry import RetryPolicy
from enrich._schema import RESERVED_COLUMNS, OutputSpec, check_collisions, parse_output

__all__ = ["JobPlan", "JobStats", "aenrich", "enrich", "plan"]

_T = TypeVar("_T")
_log = logging.getLogger("enrich")

#: The metadata key that carries a run's row key (the API allows keys of at most 16 characters).
KEY_FIELD = "enrich_key"
_META_KEY_MAX = 16
_META_VALUE_MAX = 512
_INPUT_LIMIT = 25_000  # task spec + input, in characters
_MODES = ("group", "runs")
# Collection: re-reading an answer already collected is waste; past this many per poll, the run holding
# the stream cursor back is waited for on its own (one blocking result call) so the cursor moves on.
_STRAGGLER_WASTE = 200
# ... and only once it has held the cursor back for this many polls in a row.
_STRAGGLER_POLLS = 2
# The limiter's window is this much longer than the service's (a share of it), to absorb network jitter.
_WINDOW_MARGIN = 0.02
# How long reads ride out a service that keeps failing (transport errors, 5xx) before the job gives up.
_OUTAGE_SECONDS = 1800.0
# Outcomes are handed to the checkpoint this many at a time (or after a second, or at the end of a poll).
_OUTCOME_BATCH = 1000
# The join decodes and types this many answers at a time.
_JOIN_CHUNK = 100_000
_DECODE_BYTES = 4 << 20  # JSON text of the basis decoded at a time
_STATUS = {"completed": "completed", "failed": "failed"}  # one str object per status, not one per row
_COMPLETED = ("completed", None)
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
    #: are absent.
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def runs_now(self) -> int:
        """Runs this call created or adopted: submitted, found again after a lost answer, or committed
        late and found."""
        return self.submitted + self.reconciled + self.found_late


# -- preparation ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    df: pl.DataFrame
    kind: str
    original: Any
    spec: OutputSpec
    task_spec: dict[str, Any]
    processor: str
    mode: str
    metadata: dict[str, Any]
    keys: list[str]  # distinct keys, first-seen order
    index: list[int]  # row -> distinct key index
    inputs: list[Any]  # distinct inputs
    local_errors: dict[str, str]  # key -> why it is not sent
    fingerprint: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)  # "key", "dedupe": seconds
    notes: list[str] = field(default_factory=list)  # said once in the job's warnings

    @property
    def added(self) -> list[str]:
        """The columns the job adds to the caller's frame."""
        return [*self.spec.columns, *RESERVED_COLUMNS]


def _allowed_processors() -> set[str]:
    extra = os.environ.get("ENRICH_EXTRA_PROCESSORS", "")
    return set(PROCESSORS) | {p.strip() for p in extra.split(",") if p.strip()}


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise UsageError(
            f"metadata must be a dict of short keys to scalar values, got {type(metadata).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"metadata key {key!r} must be a non-empty string")
        if key == KEY_FIELD:
            raise UsageError(f"metadata key {KEY_FIELD!r} is reserved for enrich's row key: rename it")
        if len(key) > _META_KEY_MAX:
            raise UsageError(f"metadata key {key!r} is {len(key)} characters; the API allows {_META_KEY_MAX}")
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(
                f"metadata value of {key!r} must be a string, number or boolean, got {type(value).__name__}"
            )
        if isinstance(value, str) and len(value) > _META_VALUE_MAX:
            raise UsageError(
                f"metadata value of {key!r} is {len(value)} characters; the API allows {_META_VALUE_MAX}"
            )
        out[key] = value
    return out


def _prepare(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | None,
    prompt: str | None,
    input_schema: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    processor: str,
    mode: str,
) -> _Plan:
    if mode not in _MODES:
        raise UsageError(f"mode must be 'group' or 'runs', got {mode!r}")
    if not isinstance(processor, str) or processor not in _allowed_processors():
        known = ", ".join(sorted(PROCESSORS, key=lambda p: (PROCESSORS[p].price_per_1k, p)))
        raise UsageError(
            f"unknown processor {processor!r}; known: {known} "
            "(a newer one can be allowed with ENRICH_EXTRA_PROCESSORS=name)"
        )
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    df, kind = to_polars(data)
    spec = parse_output(output)
    notes: list[str] = []
    # An enriched frame enriched again: its own columns are never sent, and this job's replace them.
    earlier = [c for c in df.columns if c in RESERVED_COLUMNS]
    if earlier:
        df = df.drop(earlier)
        notes.append(
            f"the input holds an earlier enrichment's {', '.join(earlier)}: they are not sent and are "
            "replaced by this job's (rename them first to keep both)"
        )
    check_collisions(spec, df.columns)
    if input_schema is not None and (
        not isinstance(input_schema, Mapping) or input_schema.get("type") != "object"
    ):
        raise UsageError('input_schema must be a JSON Schema object: {"type": "object", "properties": {...}}')
    meta = _check_metadata(metadata)
    task_spec = spec.task_spec(dict(input_schema) if input_schema is not None else None)
    t0 = time.monotonic()
    inputs = build_inputs(df, columns=list(columns) if columns is not None else None, prompt=prompt)
    all_keys, all_sizes = keys_and_sizes(inputs, task_spec, processor)
    t1 = time.monotonic()
    keys, index = dedupe(all_keys)
    if len(keys) == len(all_keys):  # no repeats: the first row of each key is the row itself
        distinct_inputs, sizes = inputs, all_sizes
    else:
        first: dict[str, int] = {}
        for row, key in enumerate(all_keys):
            first.setdefault(key, row)
        rows = [first[k] for k in keys]
        distinct_inputs = [inputs[r] for r in rows]
        sizes = [all_sizes[r] for r in rows]
    local_errors: dict[str, str] = {}
    for key, problem in zip(
        keys, check_input_size(distinct_inputs, task_spec, limit=_INPUT_LIMIT, sizes=sizes), strict=True
    ):
        if problem:
            local_errors[key] = problem
    if input_schema is not None:
        problems = validate_inputs(distinct_inputs, dict(input_schema))
        for key, problem in zip(keys, problems, strict=True):
            if problem and key not in local_errors:
                local_errors[key] = f"input does not match input_schema: {problem}"
    # What makes two calls one job. Not the input mapping (columns, prompt): each row's key is a hash of
    # the input it sends, so a row whose input did not change keeps its run whatever the mapping.
    fingerprint = {
        "task_spec": task_spec,
        "processor": processor,
        "mode": mode,
        "metadata": meta,
    }
    timings = {"key": t1 - t0, "dedupe": time.monotonic() - t1}
    return _Plan(
        df=df,
        kind=kind,
        original=data,
        spec=spec,
        task_spec=task_spec,
        processor=processor,
        mode=mode,
        metadata=meta,
        keys=keys,
        index=index,
        inputs=distinct_inputs,
        local_errors=local_errors,
        fingerprint=fingerprint,
        timings=timings,
        notes=notes,
    )


# -- the running job ---------------------------------------------------------------------------------


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
        retry_failed: bool,
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
        self.retry_failed = retry_failed
        self.max_cost = max_cost
        self.keep_basis = keep_basis  # the join reads each row's basis (the checkpoint always has it)
        self.temporary = False  # checkpoint=False: the row errors name the directory to pass to resume
        self.default_checkpoint = False  # checkpoint=None: so do they (other rows, another directory)
        processor_ = PROCESSORS.get(plan.processor)
        self.price = processor_.price_per_run if processor_ is not None else None
        self.reserved = 0  # runs being created right now (runs mode), counted against max_cost
        self.capped = False  # submission stopped at max_cost
        # An add-runs call spends its size from the runs budget, so it can be no larger than the budget (nor
        # than what the limiter learned the service accepts at once: `limiter.max_runs`).
        self.batch_size = max(1, min(MAX_RUNS_PER_ADD, int(limiter.runs_budget)))
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
        self.failed_count = 0
        self.recorded_groups: frozenset[str] = frozenset()  # groups of earlier calls (set by load)
        # The service's warnings on the runs finished in this call: message -> runs that carried it.
        self.service_warnings: collections.Counter[str] = collections.Counter()
        self._outcomes: list[Outcome] = []  # finished, not yet handed to the checkpoint
        self._outcomes_since = 0.0
        self.todo: list[str] = []
        self.inputs: dict[str, Any] = {}  # key -> input, of the rows not created yet
        self.wanted = frozenset(plan.keys)
        # Run ids submitted and not collected yet, by group (None: runs created one by one).
        self.pending: dict[str | None, set[str]] = {}
        # Runs that answered a key before (superseded by retry_failed): never adopted again.
        self.superseded: set[str] = set()
        self._last_report = 0.0
        self.collect_wakeup = asyncio.Event()
        self.submission_done = asyncio.Event()
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
            wanted = state["row_key"].is_in(pl.Series(self.plan.keys, dtype=pl.String).implode())
            if not wanted.all():
                state = state.filter(wanted)
        # Column-wise, into dicts built in bulk: a Python step per row is most of a 1M-row resume's time.
        # Finished rows need no reverse index (run -> key): the collector tells them by the key in their
        # run's metadata.
        status = pl.col("status")
        if self.retry_failed:
            self.superseded.update(state.filter(status == "failed")["run_id"].to_list())
            ended = state["status"] == "completed"
        else:
            ended = state["status"].is_in(["completed", "failed"])
        finished = state if ended.all() else state.filter(ended)
        keys = finished["row_key"].to_list()
        statuses = [_STATUS.get(x, x) for x in finished["status"].to_list()]  # shared constants
        self.done = dict(zip(keys, zip(statuses, finished["error"].to_list(), strict=True), strict=True))
        self.run_of = dict(zip(keys, finished["run_id"].to_list(), strict=True))
        del finished
        running = state.filter(~status.is_in(["completed", "failed"]) & pl.col("run_id").is_not_null())
        for key, run_id, group_id in running.select("row_key", "run_id", "group_id").iter_rows():
            self._adopt(key, run_id, group_id)
        self.stats.already_done = len(self.done)
        for key in self.plan.keys:
            if key in self.plan.local_errors:
                self.done[key] = ("failed", self.plan.local_errors[key])
                self.failed_count += 1
            elif key not in self.done and key not in self.run_of:
                self.todo.append(key)
        self.failed_count = sum(1 for v in self.done.values() if v[0] == "failed")
        # Runs recorded for keys about to be (re)submitted answered them before: never adopt one again,
        # never let one hold the runs-stream cursor.
        if self.todo:
            self.superseded.update(self.cp.run_ids(self.todo))
        # Only rows still to be sent need their input; at a million rows the others are ~350 MB.
        todo = set(self.todo)
        self.inputs = {k: x for k, x in zip(self.plan.keys, self.plan.inputs, strict=True) if k in todo}
        self.plan.inputs = []

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
        buffered = self.committer.buffered if self.committer is not None else 0  # created, not yet recorded
        # Held rows may yet be created by a late commit: counted as spent until they are settled.
        spent = (self.cp.runs + buffered + len(self._late) + self.reserved + len(self.held_keys)) * self.price
        room = int((self.max_cost - spent) / self.price + 1e-9)
        if room < n:
            self.capped = True
        return max(0, min(n, room))

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

    def collectors(self) -> dict[str, _GroupCollector]:
        """A collector for each group with runs outstanding or rows held (their late commits)."""
        groups = {gid for gid, runs in self.pending.items() if runs} | {h[0] for h in self.held.values()}
        return {gid: _GroupCollector(self, gid) for gid in groups if gid is not None}

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

    async def settle_holds(self) -> list[str]:
        """Reconcile the held batches whose horizon has passed: their runs found are adopted; the rest
        were never created and are returned, to send again (their intents resolved)."""
        async with self._settling:
            now = time.monotonic()
            due = {b: h for b, h in self.held.items() if h[2] <= now}
            if not due:
                return []
            by_group: dict[str | None, dict[str, str]] = {}
            for batch_id, (gid, keys, _) in due.items():
                by_group.setdefault(gid, {}).update(dict.fromkeys(keys, batch_id))
            for gid, keys in by_group.items():
                if gid is not None:
                    self.stats.reconciled += len(await self.reconcile(gid, keys))
            again: list[str] = []
            for batch_id in due:
                _, keys, _ = self.held.pop(batch_id, (None, set(), 0.0))
                for k in keys:
                    if self.held_keys.get(k) == batch_id:
                        del self.held_keys[k]
                        if k not in self.run_of and k not in self.done:
                            again.append(k)
                self.cp.resolve_intents(batch_id)
            self.stats.resubmitted_unknown += len(again)
            self.holds_changed.set()
            return again

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
        failed = self.failed_count
        completed = len(self.done) - failed
        self.sink(
            Progress(
                total=len(self.plan.keys),
                completed=completed,
                failed=failed,
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
            text = json.dumps(output.content, ensure_ascii=False)
            basis = json.dumps(list(output.basis_json), ensure_ascii=False)  # as sent; the join normalizes
            self.done[key] = _COMPLETED
            outcome = Outcome(
                row_key=key,
                run_id=run.run_id,
                status="completed",
                output=text,
                basis=basis,
                error=None,
                finished_at=now,
            )
        else:
            if run.error is not None:
                error = run.error.message
            elif run.status == "completed":
                error = "the run completed without an output"
            else:
                error = f"the run ended with status {run.status!r}"
            self.done[key] = ("failed", error)
            self.failed_count += 1
            outcome = Outcome(row_key=key, run_id=run.run_id, status="failed", error=error, finished_at=now)
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
        return {
            "input": self.inputs[key],
            "processor": self.plan.processor,
            "metadata": self.metadata_for(key),
        }

    # ---- group mode

    async def ensure_group(self) -> str:
        """The job's task group: the checkpoint's latest, or a new one recorded before any run is added."""
        if self.cp.groups:
            return self.cp.groups[-1]
        group = await self.client.create_group(metadata={"enrich": "enrich"})
        self.cp.record_group(group.group_id)  # durable before any run is added to it
        return group.group_id

    async def run_group_mode(self) -> None:
        await self.reconcile_in_doubt()
        collectors = self.collectors()
        async with asyncio.TaskGroup() as tg:
            for c in collectors.values():
                tg.create_task(c.run())
            if self.todo or self.held:
                group_id = await self.ensure_group()
                if group_id not in collectors:
                    collectors[group_id] = _GroupCollector(self, group_id)
                    tg.create_task(collectors[group_id].run())
                collector = collectors[group_id]
                await self.submit_group(group_id, collector)
            self.submission_done.set()
            self.submitted_at = time.monotonic()
            for c in collectors.values():
                c.wake()
                c.new_runs.set()

    async def submit_group(self, group_id: str, collector: _GroupCollector) -> None:
        """Add the rows to do to the group, a call at a time, until none are left or held.

        Held rows are settled as their horizons pass: adopted if their runs showed up, sent again if not.
        Past `max_cost` nothing more is sent, but held rows are still waited for (they may be paid)."""
        capped = False
        while self.todo or self.held:
            again = await self.settle_holds()
            if again:
                self.todo.extend(again)
            if capped or not self.todo:
                if not self.held:
                    break
                collector.new_runs.set()  # held rows: the collector listens for their late commits
                await self.wait_for_holds()
                continue
            # The size the service was seen to accept at once: a quota that counts runs may never fit
            # the full batch in one call (the limiter learns it from 429s).
            size = self.affordable(min(self.batch_size, self.limiter.max_runs, len(self.todo)))
            if not size:
                self.report(f"max cost ${self.max_cost:,.2f} reached: {len(self.todo):,} rows not submitted")
                capped = True
                continue
            # Rows adopted meanwhile (a late commit of a row about to be sent again) are not sent.
            batch: list[str] = []
            taken = 0
            for key in self.todo:
                taken += 1
                if key not in self.run_of and key not in self.done:
                    batch.append(key)
                    if len(batch) == size:
                        break
            if not batch:
                del self.todo[:taken]
                continue
            if await self.add_batch(group_id, batch, collector):
                del self.todo[:taken]

    async def add_batch(self, group_id: str, batch: list[str], collector: _GroupCollector) -> bool:
        """Add `batch` to the group; False when it was refused with a 429 (nothing created: send it
        again, in a smaller call if the limiter learned the service takes no more at once).

        The intent is recorded the moment the request goes out (after the rate limiter let it through),
        with the time: a lost answer holds the rows until the commit horizon after that moment."""
        batch_id = uuid.uuid4().hex
        inputs = [self.run_input(k) for k in batch]
        sent_at: list[datetime] = []

        wire: list[bool] = [False]  # the request is out, its answer not in (cleared by a 429)

        async def on_send() -> None:
            if any(k in self.run_of or k in self.done for k in batch):
                raise _Adopted  # a late commit of one of these rows was adopted while this waited
            sent_at.append(datetime.now(UTC))
            wire[0] = True
            self.cp.record_intents(batch_id, group_id, batch, sent_at=sent_at[-1])  # durable first
            self.inflight.update(dict.fromkeys(batch, batch_id))

        def on_refused() -> None:
            wire[0] = False

        try:
            answer = await self.client.add_runs(
                group_id,
                inputs,
                default_task_spec=self.plan.task_spec,
                retry_rate_limited=len(batch) == 1,  # a larger call is split by the caller instead
                on_send=on_send,
                on_refused=on_refused,
            )
        except asyncio.CancelledError:  # stopped while waiting to go again after a 429: none created
            if sent_at and not wire[0]:
                with contextlib.suppress(Exception):
                    self.cp.resolve_intents(batch_id)
            raise
        except (RateLimitError, _Adopted):  # nothing was created: the loop forms the call again
            self._landed(batch)
            if sent_at:
                self.cp.resolve_intents(batch_id)
            return False
        except OutcomeUnknownError:
            try:  # on the wire still, as far as the collector knows, until the group is read for them
                found = await self.reconcile(group_id, dict.fromkeys(batch, batch_id))
            finally:
                self._landed(batch)
            self.stats.reconciled += len(found)
            missing = [k for k in batch if k not in found]
            if missing:  # not committed yet, maybe never: held until the horizon, never sent again before
                self.hold(batch_id, group_id, missing, sent_at[-1])
            else:
                self.cp.resolve_intents(batch_id)
            collector.wake()
            collector.new_runs.set()
            return True
        except (*_FATAL, TransportError) as exc:  # refused, or never sent: nothing was created
            self._landed(batch)
            if sent_at:
                self.cp.resolve_intents(batch_id)
            if isinstance(exc, TransportError):
                raise
            raise _Fatal(exc) from exc
        if len(answer.run_ids) != len(batch):
            self._landed(batch)
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
        self.cp.record_receipts(receipts)  # durable before the next add is sent
        self._landed(batch)
        for k in batch:  # created: never sent again
            self.inputs.pop(k, None)
        for k, r in zip(batch, answer.run_ids, strict=True):
            self._adopt(k, r, group_id)
        self.stats.submitted += len(batch)
        collector.wake()
        collector.new_runs.set()
        self.report()
        return True

    def _landed(self, keys: Iterable[str]) -> None:
        """The create of `keys` is answered (or failed): their runs, if any, are no longer on the wire."""
        for k in keys:
            self.inflight.pop(k, None)

    async def reconcile_in_doubt(self) -> None:
        """Settle add-runs whose answers were never recorded: find their runs by the key in metadata."""
        doubts = self.cp.in_doubt()
        if not doubts:
            return
        self.report(
            f"reconciling {sum(len(d.row_keys) for d in doubts)} runs whose submission was interrupted"
        )
        by_group: dict[str | None, dict[str, str]] = {}
        for intent in doubts:
            by_group.setdefault(intent.group_id, {}).update(dict.fromkeys(intent.row_keys, intent.batch_id))
        for gid, keys in by_group.items():
            if gid is None:
                # Runs created one by one cannot be listed: the API has no such endpoint. Those keys
                # are submitted again (counted, and said in the closing stats).
                pending = {k for k in keys if k not in self.run_of and k not in self.done}
                self.stats.resubmitted_unknown += len(pending)
                continue
            found = await self.reconcile(gid, keys)
            self.stats.reconciled += len(found)
        now = datetime.now(UTC)
        for intent in doubts:
            young = intent.sent_at is not None and (now - intent.sent_at).total_seconds() < self.horizon
            if young and intent.group_id is not None:
                # Sent less than the horizon ago (by a process that died): the service may still commit
                # it. Its rows not found are held, not sent again, until the horizon has passed (rows no
                # longer in the frame are not held: the intent stays in doubt for a later run).
                self.hold(intent.batch_id, intent.group_id, intent.row_keys, intent.sent_at, say=False)
            else:
                self.cp.resolve_intents(intent.batch_id)
                if intent.group_id is not None:  # never created: sent again (counted, and said)
                    self.stats.resubmitted_unknown += sum(
                        1
                        for k in intent.row_keys
                        if k in self.wanted and k not in self.run_of and k not in self.done
                    )
        # Keys found are no longer to do; keys held wait; keys not found stay (they were never created).
        self.todo = [k for k in self.todo if k not in self.run_of and k not in self.held_keys]
        self.say_held()

    async def reconcile(self, group_id: str, keys: Mapping[str, str]) -> dict[str, str]:
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
            async for event in self.client.stream_group_runs(group_id):
                if not isinstance(event, RunStateEvent):
                    continue
                run = event.run
                key = (run.metadata or {}).get(KEY_FIELD)
                if not isinstance(key, str) or (key not in self.wanted and key not in keys):
                    continue
                if run.run_id == self.run_of.get(key) or run.run_id in self.superseded:
                    continue
                if key in keys and key not in found and not self.cp.knows_run(run.run_id):
                    found[key] = run.run_id  # the first: any later one of the row is a duplicate
                elif key in self.wanted:
                    others.append((key, run))
            return found, others

        found, others = await self.patiently(read, "reading the group's runs to find a lost create")
        if found:
            now = datetime.now(UTC)
            self.cp.record_receipts(
                [
                    Receipt(row_key=k, run_id=r, group_id=group_id, batch_id=keys[k], created_at=now)
                    for k, r in found.items()
                ]
            )
            for k, r in found.items():
                self._unhold(k)
                if k in self.wanted:  # a row no longer in the frame: recorded (paid for), not collected
                    self._adopt(k, r, group_id)
        for key, run in others:  # late commits of held rows, duplicates
            if run.run_id != self.run_of.get(key):
                self.claim(key, run, group_id)
        self.flush_late()
        return found

    # ---- runs mode

    async def run_runs_mode(self) -> None:
        """One create per row, collected like group mode.

        Each run is created by an add-runs call of one input into the job's task group rather than by
        `POST /v1/tasks/runs`: the cost and the pacing are the same, but a create whose answer is lost
        can then be found again (the API cannot list runs outside a group), so no row is paid twice. The
        answers are collected through the group (its
        events and runs streams, as in group mode), not with a blocking call per row: that would hold a
        connection per row in flight, and the request budget, not a connection count, sets the pace.
        """
        await self.reconcile_in_doubt()
        group_id = await self.ensure_group() if self.todo or self.held else None
        reconciler = _Reconciler(self)
        self.committer = committer = _Committer(self.cp)
        collectors = self.collectors()
        if group_id is not None and group_id not in collectors:
            collectors[group_id] = _GroupCollector(self, group_id)
        queue = collections.deque(self.todo)
        self.todo = []
        capped = False

        async def wait(key: str, run_id: str) -> None:
            # a run recorded without a group (an older checkpoint): only its own result call finds it
            run, output = await self.patiently(
                functools.partial(self.client.wait_for_result, run_id, poll_timeout=600),
                "waiting for a run",
            )
            self.check_owner(key, run)
            self.finish(key, run, output)

        async def creator() -> None:
            nonlocal capped
            while queue or self.held:
                if not queue:  # only held rows left: settle them as their horizons pass
                    again = await self.settle_holds()
                    (self.todo if capped else queue).extend(again)
                    if not queue and self.held:
                        for c in collectors.values():
                            c.new_runs.set()  # the collectors listen for the held rows' late commits
                        await self.wait_for_holds()
                    continue
                key = queue.popleft()
                if key in self.run_of or key in self.done:
                    continue  # adopted meanwhile: a late commit of its lost create
                if capped or not self.affordable(1):
                    capped = True
                    self.todo.append(key)
                    continue
                self.reserved += 1
                try:
                    assert group_id is not None
                    await self.create_one(key, group_id, reconciler)
                finally:
                    self.reserved -= 1
                collector = collectors[group_id]
                collector.wake()
                collector.new_runs.set()

        async with asyncio.TaskGroup() as tg:
            for c in collectors.values():
                tg.create_task(c.run())
            for run_id in list(self.pending.get(None, ())):
                tg.create_task(wait(self.key_of_run[run_id], run_id))
            try:
                async with asyncio.TaskGroup() as creators:
                    for _ in range(max(1, min(self.concurrency, len(queue)))):
                        creators.create_task(creator())
            finally:
                committer.close()  # also on a timeout, an interrupt or a fatal answer
            self.submitted_at = time.monotonic()
            self.submission_done.set()
            for c in collectors.values():
                c.wake()
                c.new_runs.set()
        if self.todo:
            self.report(f"max cost ${self.max_cost:,.2f} reached: {len(self.todo):,} rows not submitted")

    async def create_one(self, key: str, group_id: str, reconciler: _Reconciler) -> None:
        """Create the run of one row (or, when its answer is lost, find it or hold the row)."""
        batch_id = uuid.uuid4().hex
        committer = self.committer
        assert committer is not None
        sent_at: list[datetime] = []

        wire: list[bool] = [False]  # the request is out, its answer not in (cleared by a 429)

        async def on_send() -> None:  # each time the request goes out, after the rate limiter
            if key in self.run_of or key in self.done:
                raise _Adopted  # a late commit of this row was adopted while this waited
            sent_at.append(datetime.now(UTC))
            wire[0] = True
            self.inflight[key] = batch_id  # from now on a run of it is this create's (claim waits)
            await committer.intent(batch_id, group_id, key)  # durable before the request is sent

        def on_refused() -> None:
            wire[0] = False

        try:
            answer = await self.client.add_runs(
                group_id,
                [self.run_input(key)],
                default_task_spec=self.plan.task_spec,
                on_send=on_send,
                on_refused=on_refused,
            )
        except asyncio.CancelledError:
            # Stopped (Ctrl-C, a timeout) while the create waited to go again after a 429: the service
            # refused every send, so nothing exists and the row is not in doubt (nor held on resume).
            if sent_at and not wire[0]:
                with contextlib.suppress(Exception):
                    self.cp.resolve_intents(batch_id)
            raise
        except _Adopted:
            if sent_at:  # recorded for an earlier send of this call, refused with a 429: nothing created
                self.cp.resolve_intents(batch_id)
            return
        except OutcomeUnknownError:
            try:  # on the wire still, as far as the collector knows, until the group is read for it
                found = await reconciler.check(group_id, key, batch_id)
            finally:
                self._landed([key])
            committer.flush_receipts()
            if found is not None:
                self.stats.reconciled += 1
                self.cp.resolve_intents(batch_id)
            else:  # not committed yet, maybe never: held until the horizon, never sent again before
                self.hold(batch_id, group_id, [key], sent_at[-1])
            return
        except (*_FATAL, TransportError, RateLimitError) as exc:  # refused or never sent: none created
            self._landed([key])
            if sent_at:
                self.cp.resolve_intents(batch_id)
            if isinstance(exc, _FATAL):
                raise _Fatal(exc) from exc
            raise
        self._landed([key])
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
        self._adopt(key, run_id, group_id)
        self.inputs.pop(key, None)  # created: never sent again
        self.stats.submitted += 1
        self.report()


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
                found = await self.job.reconcile(group_id, {k: b for k, (b, _) in waiting.items()})
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


async def _adopt_service(cp: Checkpoint, client: TaskClient, job: _Job, service: str) -> None:
    """A checkpoint of an older enrich, with runs, records no service: one of its runs is looked up on
    this service first (one read, nothing created). Unknown there (an emulator's run, another address):
    `ServiceMismatchError`. Known: the service is recorded."""
    run_id = next(iter(job.run_of.values()), None)
    if run_id is None and cp.runs:  # none of this call's rows: any run of the checkpoint will do
        recorded = cp.state(outputs=False, basis=False)["run_id"].drop_nulls()
        run_id = recorded[0] if len(recorded) else None
    if run_id is not None:
        try:
            await job.patiently(lambda: client.get_run(run_id), "checking the checkpoint's service")
        except NotFoundError:
            raise ServiceMismatchError(
                f"checkpoint {cp.path} was written before enrich recorded services, and its run {run_id} "
                f"is unknown to {service}: its answers came from another service (an emulator?) and are "
                "never used for this one; use a new checkpoint (--checkpoint DIR, or checkpoint=)"
            ) from None
    cp.adopt_service(service)


async def _tick(job: _Job) -> None:
    """Report the counts twice a second: while rows wait for the rate limiter, nothing else does."""
    while True:
        await asyncio.sleep(0.5)
        job.report(force=True)


def _keep_pacing(cp: Checkpoint, stats: JobStats, learned: dict[str, Any]) -> None:
    """Keep what the rate limiter learned in the checkpoint (a head start for a resume; never fatal)."""
    try:
        cp.record_pacing(learned)
    except Exception as exc:
        message = f"what was learned of the service's quota is not kept ({exc})"
        if message not in stats.warnings:
            stats.warnings.append(message)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error that is not a cancellation, unwrapping nested task groups."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]


# -- the join ------------------------------------------------------------------------------------------

_CITATION = pl.Struct({"url": pl.Utf8, "title": pl.Utf8, "excerpts": pl.List(pl.Utf8)})
_BASIS = pl.List(
    pl.Struct(
        {"field": pl.Utf8, "reasoning": pl.Utf8, "confidence": pl.Utf8, "citations": pl.List(_CITATION)}
    )
)
# What `FieldBasis.from_json(...).to_json()` makes of a decoded entry: text fields "" and lists [] when
# missing (the confidence and a citation's title stay null: "not given").
_NORMAL_BASIS = pl.col("basis").list.eval(
    pl.element().struct.with_fields(
        pl.field("field").fill_null(""),
        pl.field("reasoning").fill_null(""),
        pl.field("citations")
        .fill_null(pl.lit([], dtype=pl.List(_CITATION)))
        .list.eval(
            pl.element().struct.with_fields(
                pl.field("url").fill_null(""),
                pl.field("excerpts").fill_null(pl.lit([], dtype=pl.List(pl.Utf8))),
            )
        ),
    )
)


def _join(plan: _Plan, job: _Job | None, *, basis: bool, answers: pl.DataFrame | None = None) -> pl.DataFrame:
    """The result: `plan.df` with the answers (`answers`: run_id, output text, typed basis, as
    `_answers` reads them), statuses and errors of its distinct rows, in its order."""
    done = job.done if job is not None else {}
    run_of = job.run_of if job is not None else {}
    held = job.held_keys if job is not None else {}
    statuses: list[str] = []
    errors: list[str | None] = []
    run_ids: list[str | None] = []
    answered: list[str | None] = []  # the run whose answer the row gets (completed rows only)
    for key in plan.keys:
        outcome = done.get(key)
        run_id = run_of.get(key)
        run_ids.append(run_id)
        if outcome is None:
            statuses.append("pending")
            answered.append(None)
            if key in run_of:
                errors.append(
                    "not finished yet: run the same call again to collect it"
                    if job is None or not (job.temporary or job.default_checkpoint)
                    else f"not finished yet: its run is recorded in {job.cp.path}; pass "
                    f"checkpoint={str(job.cp.path)!r} to collect it without paying twice"
                )
            elif key in held:
                errors.append(
                    "its create's answer was lost and the service may still commit it: run the same call "
                    "again to find it (or, past the commit horizon, to send it again)"
                )
            elif job is not None and job.capped:
                errors.append(f"not submitted: the max cost of ${job.max_cost:,.2f} was reached")
            else:
                errors.append("not submitted yet: run the same call again")
        else:
            status, error = outcome
            statuses.append(status)
            errors.append(error)
            answered.append(run_id if status == "completed" else None)
    if answers is None:
        answers = _no_answers()
    looked = pl.DataFrame({"run_id": pl.Series(answered, dtype=pl.String)}).join(
        answers, on="run_id", how="left", maintain_order="left"
    )
    del answered
    # A chunk at a time: a million decoded answers at once would hold a gigabyte of Python objects.
    frames: list[pl.DataFrame] = []
    problems: list[str | None] = []
    texts = looked["output"]
    for start in range(0, max(len(texts), 1), _JOIN_CHUNK):
        frame, found = plan.spec.to_frame(_decode_answers(texts.slice(start, _JOIN_CHUNK).to_list()))
        frames.append(frame)
        problems.extend(found)
    del texts
    values = pl.concat(frames) if len(frames) > 1 else frames[0]
    for i, problem in enumerate(problems):
        if problem and statuses[i] == "completed":
            errors[i] = problem
    # A completed run's answer is always recorded (JSON text, "null" at the least): none read back means
    # its segment could not be read. Said on the row, never passed off as an empty answer.
    for i in (looked["output"].is_null() & looked["run_id"].is_not_null()).arg_true().to_list():
        errors[i] = (
            "its answer could not be read back from the checkpoint (see the job's warnings); "
            "nothing is lost on the service: its run id is in _run_id"
        )
    extra = {
        "_status": pl.Series("_status", statuses, dtype=pl.Utf8),
        "_error": pl.Series("_error", errors, dtype=pl.Utf8),
        "_run_id": pl.Series("_run_id", run_ids, dtype=pl.Utf8),
    }
    if basis:
        extra["_basis"] = looked["basis"].cast(_BASIS)
    del looked
    distinct = values.with_columns(**extra)
    index = pl.Series("i", plan.index, dtype=pl.UInt32)
    return pl.concat([plan.df, distinct[index]], how="horizontal")


def _no_answers() -> pl.DataFrame:
    return pl.DataFrame(schema={"run_id": pl.String, "output": pl.String, "basis": _BASIS})


def _answers(cp: Checkpoint, job: _Job, *, basis: bool) -> pl.DataFrame:
    """run_id, output (JSON text) and basis (typed, `_BASIS`; null unless `basis`) of the completed rows
    of `job`, read from the checkpoint a segment at a time: the basis is decoded by polars as each
    segment is read, never into Python objects, so the raw text of one segment is all that is held
    besides the result's own columns."""
    ids = pl.Series(
        "run_id",
        [job.run_of[k] for k, (status, _) in job.done.items() if status == "completed"],
        dtype=pl.String,
    )
    if ids.is_empty():
        return _no_answers()
    return cp.answers(ids, basis=basis, each=_typed_basis)


def _typed_basis(part: pl.DataFrame) -> pl.DataFrame:
    """`part` with its basis column (JSON text as the service sent it) decoded to `_BASIS`, normalized as
    `FieldBasis` does (missing text fields empty, missing lists empty); decoded in Rust. A basis of an
    unexpected shape is decoded entry by entry in Python, as before."""
    texts = part["basis"]
    if texts.dtype != pl.String or texts.null_count() == len(texts):
        return part.with_columns(pl.lit(None, dtype=_BASIS).alias("basis"))
    try:
        # A slice at a time: decoding holds ~4x its text in temporaries (a 100 MB part peaked 380 MB).
        # (Slices are views: their boundaries where the running total of bytes crosses a multiple.)
        bucket = (texts.str.len_bytes().fill_null(0).cum_sum() // _DECODE_BYTES).to_numpy()
        starts = [0, *(int(i) + 1 for i in (bucket[1:] != bucket[:-1]).nonzero()[0]), len(texts)]
        decoded = pl.concat(
            [texts.slice(a, b - a).str.json_decode(dtype=_BASIS) for a, b in itertools.pairwise(starts)],
            rechunk=False,
        )
    except pl.exceptions.PolarsError:
        decoded = pl.Series("basis", [_basis_rows(t) for t in texts.to_list()], dtype=_BASIS)
    else:
        decoded = pl.DataFrame({"basis": decoded}).select(_NORMAL_BASIS)["basis"]
    return part.with_columns(decoded.alias("basis"))


def _decode_answers(texts: list[str | None]) -> list[Any]:
    """The answers as the checkpoint keeps them (JSON text, or None) → decoded values, None kept.

    Decoded as one JSON array: a third faster than a `json.loads` per answer. If that fails (text not
    written by `json.dumps`), answer by answer, a bad one as None.
    """
    present = [t for t in texts if t is not None]
    try:
        values = json.loads("[" + ",".join(present) + "]")
        if len(values) != len(present):
            raise ValueError("an answer is not one JSON value")
    except ValueError:
        values = [_loads_or_none(t) for t in present]
    it = iter(values)
    return [next(it) if t is not None else None for t in texts]


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _basis_rows(basis: Any) -> list[dict[str, Any]] | None:
    if isinstance(basis, str):  # as the checkpoint keeps it
        basis = json.loads(basis)
    if not isinstance(basis, list):
        return None
    # The basis is stored as the API sent it; FieldBasis gives every row the same shape and types.
    return [FieldBasis.from_json(b).to_json() for b in basis if isinstance(b, dict)]


# -- the public entry points ------------------------------------------------------------------------


async def aenrich(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    processor: str = "core",
    checkpoint: str | os.PathLike[str] | bool | None = None,
    mode: str = "group",
    basis: bool = False,
    retry_failed: bool = False,
    api_key: str | None = None,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
    timeout: float | None = None,
    progress: bool | ProgressSink = True,
    concurrency: int = 100,
    max_cost: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    stats: JobStats | None = None,
    request_timeout: float = 60.0,
    commit_horizon: float | None = None,
) -> Any:
    """Enrich `data` through the Task API; the async form of `enrich()` (same arguments, same result).

    Example (in a notebook cell)::

        df = await aenrich(df, {"ceo": "Name of the current CEO"}, checkpoint="ceo.enrich")
    """
    started = time.monotonic()
    stats = stats if stats is not None else JobStats()
    plan = _prepare(
        data,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
    )
    if rate_limit <= 0 or run_rate <= 0:
        raise UsageError("rate_limit and run_rate must be positive numbers of requests/runs per minute")
    if max_cost is not None:
        if max_cost < 0:
            raise UsageError("max_cost must be a dollar amount of zero or more")
        if plan.processor not in PROCESSORS:
            raise UsageError(f"max_cost needs a known price, and processor {plan.processor!r} has none")
    if rate_window <= 0:
        raise UsageError("rate_window must be a positive number of seconds")
    if timeout is not None and timeout <= 0:
        raise UsageError("timeout must be a positive number of seconds (or None for no limit)")
    if not request_timeout > 0:
        raise UsageError("request_timeout must be a positive number of seconds")
    horizon = 2 * request_timeout if commit_horizon is None else commit_horizon
    if not (horizon >= 0 and math.isfinite(horizon)):
        raise UsageError(
            "commit_horizon must be a number of seconds of 0 or more (None: twice request_timeout)"
        )
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"concurrency must be a whole number of 1 or more, got {concurrency!r}")
    sink: ProgressSink | None
    owned_bar: TqdmSink | None = None
    if progress is True:
        sink = owned_bar = TqdmSink()
    elif progress is False or progress is None:
        sink = None
    else:
        sink = progress
    if service is not None:
        svc = service
    elif transport is not None:  # an in-process app (the emulator, in tests) is not the base URL's service
        svc = f"a custom transport at {service_of(base_url)}"
    else:
        svc = service_of(base_url)
    if service is not None and (not isinstance(service, str) or not service.strip()):
        raise UsageError("service must be a non-empty name, or None for the base URL")
    stats.warnings.extend(plan.notes)
    if not plan.keys:  # an empty table (a quiet day): the typed empty result; nothing sent or recorded
        if owned_bar is not None:
            owned_bar.close()
        stats.elapsed = time.monotonic() - started
        return from_polars(_join(plan, None, basis=basis), plan.kind, plan.original, added=plan.added)
    path, temporary = _checkpoint_path(checkpoint, plan.fingerprint, svc, plan.keys)
    temp_note = None
    if temporary:
        temp_note = (
            f"checkpoint=False: keeping state in {path}, removed when the call ends with every row finished"
        )
    elif checkpoint is None:
        temp_note = f"checkpoint: {path} (the same call resumes from it; checkpoint=False for none)"
    stats.rows = plan.df.height
    stats.distinct = len(plan.keys)
    stats.checkpoint = str(path)
    stats.stages.update(plan.timings)
    # Everything above is local; an API key is needed only now, and only if there is work to send.
    t_load = time.monotonic()
    cp = Checkpoint.open(path, plan.fingerprint, service=svc)
    job: _Job | None = None
    answers: pl.DataFrame | None = None
    reading = 0.0
    client: TaskClient | None = None
    try:
        # The service counts a request when it arrives, the limiter when it is sent: a window a little
        # longer than the service's keeps arrival jitter from turning a full budget into a 429.
        # It starts from what the last process learned of the key's real quota (kept in the checkpoint).
        limiter = RateLimiter(
            requests_per_minute=rate_limit,
            runs_per_minute=run_rate,
            period=rate_window * (1 + _WINDOW_MARGIN),
            learned=cp.pacing,
            on_learn=functools.partial(_keep_pacing, cp, stats),
        )
        client = TaskClient(
            api_key,
            base_url=base_url,
            transport=transport,
            limiter=limiter,
            retry=RetryPolicy(),
            timeout=request_timeout,
            max_connections=max(100, concurrency),
        )
        job = _Job(
            plan,
            cp,
            client,
            limiter,
            retry_failed=retry_failed,
            sink=sink,
            stats=stats,
            concurrency=concurrency,
            max_cost=max_cost,
            keep_basis=basis,
            horizon=horizon,
        )
        job.temporary = temporary
        job.default_checkpoint = checkpoint is None or checkpoint is True
        job.load()
        if cp.service is None:  # written before services were recorded: its runs must be this service's
            await _adopt_service(cp, client, job, svc)
        cp.record_last_call(
            {"rows": plan.df.height, "distinct": len(plan.keys), "at": datetime.now(UTC).isoformat()}
        )
        stats.stages["load"] = time.monotonic() - t_load
        if temp_note:
            job.report(temp_note)
        job.report(force=True)
        work = job.run_group_mode if plan.mode == "group" else job.run_runs_mode
        if job.todo or job.outstanding or cp.in_doubt():
            t_work = time.monotonic()
            ticker = asyncio.create_task(_tick(job))  # counts move while nothing finishes (rate waits)
            try:
                async with asyncio.timeout(timeout):
                    await work()
            except TimeoutError:
                stats.timed_out = True
                job.report(f"timeout after {timeout:g} s: unfinished rows come back as pending")
            except BaseExceptionGroup as group:
                leaf = _first_leaf(group)
                raise job.explain(leaf.error if isinstance(leaf, _Fatal) else leaf) from None
            except _Fatal as fatal:
                raise job.explain(fatal.error) from None
            except NotFoundError as exc:
                raise job.explain(exc) from None
            finally:
                ticker.cancel()
                end = time.monotonic()
                submitted = job.submitted_at if job.submitted_at is not None else end
                stats.stages["submit"] = submitted - t_work
                stats.stages["collect"] = end - submitted
        job.report(force=True)
    finally:
        if job is not None:
            stats.capped = job.capped
            stats.held = len(job.held_keys)
        if client is not None:
            stats.requests = client.requests_sent
            stats.answered = client.answers_received
            stats.rate_limited = client.rate_limited_count
            await client.aclose()
        try:
            if job is not None:
                if job.committer is not None:
                    job.committer.close()
                job.push_outcomes()
                job.report(force=True)  # the bar's last word is the truth, also after Ctrl-C or an error
                cp.record_service_warnings(job.service_warnings)
        except Exception as exc:  # never mask the job's own error, but never hide this one either
            stats.warnings.append(
                f"the answers collected last are not saved in the checkpoint ({exc}); "
                "the next run collects them again without paying twice"
            )
        finally:
            if job is not None:
                t_answers = time.monotonic()
                try:  # before the tables are freed: they tell which segment records each answer
                    answers = _answers(cp, job, basis=basis)
                except Exception as exc:
                    stats.warnings.append(f"the answers could not be read from the checkpoint ({exc})")
                reading = time.monotonic() - t_answers  # part of the join
            try:  # always: a checkpoint left open stays locked for the life of the process (a notebook)
                cp.close(forget=True)  # the join needs none of its tables: free them first
            except Exception as exc:
                stats.warnings.append(
                    f"the checkpoint was not closed cleanly ({exc}); nothing recorded is lost"
                )
        stats.warnings.extend(cp.warnings)
        stats.runs_total = cp.runs
        proc = PROCESSORS.get(plan.processor)
        stats.spent = cp.runs * proc.price_per_run if proc is not None else None
        with contextlib.suppress(Exception):
            stats.service_warnings = cp.service_warnings
        stats.elapsed = time.monotonic() - started
        if owned_bar is not None:
            owned_bar.close()
    if temporary and job is not None:
        if len(job.done) == len(plan.keys):
            shutil.rmtree(path, ignore_errors=True)
            stats.checkpoint = ""
        else:
            stats.warnings.append(
                f"rows are unfinished: their runs are recorded in {path}; pass checkpoint={str(path)!r} "
                "to collect them without paying twice"
            )
    t_join = time.monotonic()
    result = from_polars(
        _join(plan, job, basis=basis, answers=answers), plan.kind, plan.original, added=plan.added
    )
    del answers
    stats.stages["join"] = time.monotonic() - t_join + reading
    return result


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a job would do, worked out without sending anything (`plan()`, `enrich run --dry-run`).

    Counts are of distinct inputs (runs), except `rows`. Money is in US dollars at list prices;
    `None` when the processor has no known price. `seconds` is a rough wall-time estimate under the
    rate budgets: the processor's typical latency plus the time the budgets need to submit everything.
    """

    rows: int
    distinct: int
    done: int
    running: int
    to_submit: int
    refused: int
    processor: str
    mode: str
    price_per_run: float | None
    spent: float | None
    cost: float | None
    seconds: float
    checkpoint: str | None

    def lines(self) -> list[str]:
        """The plan as short lines for a terminal."""

        def money(x: float | None) -> str:
            return "unknown (no list price)" if x is None else f"${x:,.2f}"

        return [
            f"rows:               {self.rows:,}",
            f"distinct inputs:    {self.distinct:,}",
            f"already done:       {self.done:,} (in the checkpoint)",
            f"submitted, running: {self.running:,} (collected, not paid again)",
            f"refused locally:    {self.refused:,} (not sent: too large or failing input_schema)",
            f"runs to submit:     {self.to_submit:,}",
            f"processor:          {self.processor} ({money(self.price_per_run and self.price_per_run * 1000)}"
            " per 1,000 runs)",
            f"estimated cost:     {money(self.cost)} (spent so far: {money(self.spent)})",
            f"estimated time:     {_duration(self.seconds)} in {self.mode} mode",
            f"checkpoint:         {self.checkpoint or '(temporary)'}",
        ]


def cache_dir() -> Path:
    """Where default checkpoints live: env `ENRICH_CACHE_DIR`, else the platform's user cache directory
    (`~/.cache/enrich` on Linux, `~/Library/Caches/enrich` on macOS, `%LOCALAPPDATA%\\enrich\\Cache` on
    Windows)."""
    configured = os.environ.get("ENRICH_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("enrich", appauthor=False))


def _checkpoint_path(
    checkpoint: str | os.PathLike[str] | bool | None,
    fingerprint: Mapping[str, Any],
    service: str,
    keys: Iterable[str] = (),
) -> tuple[Path, bool]:
    """(the checkpoint directory, whether it is temporary) for the `checkpoint=` argument.

    None (or True): a directory under `cache_dir()` named by the job, the service and the distinct
    inputs (`keys`), so the same call made again (a notebook cell run twice) resumes instead of paying
    twice, and a call on other data is another job (its own max_cost, its own lock). False: a new
    temporary one.
    """
    if checkpoint is False:
        return Path(tempfile.mkdtemp(prefix="enrich-")), True
    if checkpoint is None or checkpoint is True:
        digest = hashlib.sha256(json.dumps({"job": fingerprint, "service": service}, sort_keys=True).encode())
        for key in sorted(keys):  # the rows too: other data with the same columns is another job
            digest.update(key.encode())
        name = digest.hexdigest()[:16]
        return cache_dir() / "checkpoints" / f"{fingerprint.get('processor', 'job')}-{name}", False
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise UsageError(
            f"checkpoint must be a directory path, None (a default one) or False (none), "
            f"got {type(checkpoint).__name__}"
        )
    return Path(checkpoint), False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def plan(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    processor: str = "core",
    checkpoint: str | os.PathLike[str] | bool | None = None,
    mode: str = "group",
    retry_failed: bool = False,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
) -> JobPlan:
    """Work out what `enrich()` with the same arguments would submit and cost, sending nothing.

    The checkpoint, when it exists, is read (never written or created) and must belong to this job.

    Example::

        p = plan(df, {"ceo": "CEO name"}, processor="base", checkpoint="ceo.enrich")
        print("\n".join(p.lines()))
    """
    job = _prepare(
        data,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
    )
    if rate_limit <= 0 or run_rate <= 0 or rate_window <= 0:  # the estimate below divides by them
        raise UsageError(
            "rate_limit and run_rate must be positive numbers of requests/runs per minute, and "
            "rate_window a positive number of seconds"
        )
    done = running = 0
    runs_created = 0
    wanted = set(job.keys) - set(job.local_errors)
    svc = service if service is not None else service_of(base_url)
    path = None if checkpoint is False else _checkpoint_path(checkpoint, job.fingerprint, svc, job.keys)[0]
    if path is not None and (path / "manifest.json").exists():
        cp = Checkpoint.read(path)
        cp.check_fingerprint(job.fingerprint)
        cp.check_service(svc)
        runs_created = cp.runs
        state = cp.state(outputs=False)
        state = state.filter(pl.col("row_key").is_in(list(wanted)))
        finished = state.filter(pl.col("status").is_in(["completed", "failed"]))
        if retry_failed:
            finished = finished.filter(pl.col("status") == "completed")
        done = finished.height
        running = state.filter(pl.col("status") == "submitted").height
    to_submit = len(wanted) - done - running
    proc = PROCESSORS.get(processor)
    price = proc.price_per_run if proc is not None else None
    window = rate_window / 60.0
    if mode == "group":
        # Adds of up to 1,000; the first window's budget goes at once, the rest at the budget's pace.
        submit_seconds = max(0.0, (to_submit - run_rate) / run_rate) * 60.0 * window
    else:
        # One create and about one result call per run share the request budget.
        submit_seconds = max(to_submit / run_rate, 2 * to_submit / rate_limit) * 60.0 * window
    latency = (sum(proc.latency) / 2) if proc is not None else 300.0
    return JobPlan(
        rows=job.df.height,
        distinct=len(job.keys),
        done=done,
        running=running,
        to_submit=to_submit,
        refused=len(job.local_errors),
        processor=processor,
        mode=mode,
        price_per_run=price,
        spent=runs_created * price if price is not None else None,
        cost=to_submit * price if price is not None else None,
        seconds=(submit_seconds + latency) if (to_submit or running) else 0.0,
        checkpoint=str(path) if path is not None else None,
    )


def enrich(data: Any, output: Any, **kwargs: Any) -> Any:
    """Enrich `data` with the columns described by `output`, one Task API run per distinct row.

    The result has the caller's type (polars in, polars out; pandas in, pandas out): every input column
    and row in the original order, then one typed column per output field, then `_status`
    ("completed", "failed" or "pending"), `_error` (why, null when completed) and `_run_id`, and with
    `basis=True` a `_basis` column (per-field reasoning, citations and confidence).

    Args:
        data: a polars DataFrame or LazyFrame, or a pandas DataFrame.
        output: what to find. A dict of field specs, e.g. `{"ceo": "Name of the CEO", "founded":
            ("integer", "Year founded"), "products": ("array", "Main products")}` (types: string,
            integer, number, boolean, enum, array, array[T], object; a trailing `?` makes one nullable);
            a JSON Schema object; the path of a .json file holding one; or a plain string for one text
            column named `output`.
        columns: the input columns (a list, or "a,b"); default: all.
        prompt: a template such as `"Find the CEO of {company} ({website})"`; each input is then that
            string instead of a JSON object of the columns.
        input_schema: a JSON Schema for the input object, sent with the task and checked locally first:
            rows that do not satisfy it are not sent and come back failed with the reason.
        metadata: a dict stored with every run (keys of at most 16 characters, scalar values of at most
            512); `enrich_key` is reserved for the row key.
        processor: "lite", "base", "core" (default), "core2x", "pro", "ultra"..., or a `-fast` variant.
            A newer processor can be allowed with env `ENRICH_EXTRA_PROCESSORS=name`.
        checkpoint: a directory that records the job; calling again with the same arguments resumes it.
            Default (None): one under the user cache directory (`~/.cache/enrich/checkpoints/...` on
            Linux; env `ENRICH_CACHE_DIR` moves it) named by the job and the service, so a notebook cell
            run twice resumes instead of paying twice; its path is said in the progress output and in
            `JobStats.checkpoint`. False: a temporary one, removed when every row finished. A checkpoint
            records the service it ran on and is never used with another one.
        mode: "group" (default: task groups, add-runs of up to 1,000, few requests) or "runs" (one
            create per row, each sent as soon as the budget allows; collected through the job's group).
        basis: add the `_basis` column.
        retry_failed: submit again the rows whose run failed (only those).
        api_key: default env `PARALLEL_API_KEY`. base_url: default env `PARALLEL_BASE_URL`, else
            `https://api.parallel.ai`.
        service: the name the checkpoint records for the service (default: the base URL without
            credentials); a checkpoint of another service raises `ServiceMismatchError`.
        rate_limit: requests per `rate_window` (default 2,000 per 60 s). run_rate: runs created per
            `rate_window` (default 2,000). Both budgets are enforced; 429s slow the job down.
        timeout: seconds for the whole job (None: no limit); unfinished rows come back "pending" with
            their run ids kept, and the next call collects them.
        progress: True for a tqdm bar, False for none, or a callable taking `Progress` counts.
        concurrency: runs mode only: how many creates are in flight at once (default 100); each waits
            for the rate limiter, which sets the pace.
        max_cost: a hard cap in dollars on what the job ever spends, across resumes: no run is submitted
            that would take the cost of all runs created so far over it (rows left out come back
            "pending"). Prices are the per-processor list prices.
        transport: an httpx transport (tests: `httpx.ASGITransport(app=create_app())`); the checkpoint
            then records "a custom transport at BASE_URL" as its service, never the base URL's own.
        stats: a `JobStats` to fill with what the job did (requests, reconciliations, ...).
        request_timeout: seconds to wait for a connection or for the next bytes of an answer (default
            60); an answer that takes longer counts as lost (a create is then reconciled, a read
            retried). The blocking result call adds its server-side wait to it.
        commit_horizon: seconds after a create was sent during which the service may still commit it
            although its answer was lost (a 502/504, a timeout, a killed process): until then its rows
            are held, never sent again, and adopted if their runs appear (default: twice
            `request_timeout`). A run that appears later still is recorded as a paid duplicate and never
            joined.

    Raises `UsageError` for bad input (before anything is sent), `AuthenticationError` (401),
    `PaymentRequiredError` (402: resume later), `PermissionDeniedError`/`ValidationError` (the API refused
    the task), `CheckpointMismatchError` (the checkpoint belongs to another job). Nothing recorded is lost.

    Works in scripts and inside a running event loop (Jupyter) alike; in async code prefer `aenrich`.

    Example::

        from enrich import enrich
        out = enrich(
            companies,
            {"ceo": "Name of the current CEO", "founded": ("integer", "Year the company was founded")},
            processor="base",
            checkpoint="companies.enrich",
        )
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop in this thread: a script (asyncio.run is called outside the except, so errors
        # raised by the job are not chained to "no running event loop")
    else:
        return _run_in_thread(lambda: aenrich(data, output, **kwargs))
    return asyncio.run(aenrich(data, output, **kwargs))


def _run_in_thread(make: Callable[[], Any]) -> Any:
    """Run a coroutine to completion on a worker thread with its own loop (the caller's loop is busy).

    A KeyboardInterrupt in the calling thread cancels the job, waits for its checkpoint to be flushed,
    then propagates.
    """
    result: dict[str, Any] = {}
    loop_ready = threading.Event()
    finished = threading.Event()  # not Thread.join: on CPython <= 3.12 an interrupted join() can mark
    state: dict[str, Any] = {}  # the thread stopped while it still runs (bpo-45274)

    def target() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        try:
            task = loop.create_task(make())
            state["task"] = task
            loop_ready.set()
            result["value"] = loop.run_until_complete(task)
        except BaseException as exc:
            result["error"] = exc
        finally:
            loop_ready.set()
            loop.close()
            finished.set()

    thread = threading.Thread(target=target, name="enrich", daemon=True)
    # The caller's loop may have its own SIGINT handler (asyncio.run's cancels the loop's main task,
    # which cannot run while this call blocks it, so Ctrl-C would wait for the job's end): while the
    # job runs, Ctrl-C raises KeyboardInterrupt here, as in a plain script.
    restore = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, TypeError):
            restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread.start()
    try:
        while not finished.wait(0.1):
            pass
    except KeyboardInterrupt:
        while True:  # the job flushes and closes its checkpoint first; a second Ctrl-C does not skip it
            try:
                loop_ready.wait()
                loop, task = state.get("loop"), state.get("task")
                if loop is not None and task is not None:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(task.cancel)
                finished.wait()
                break
            except KeyboardInterrupt:
                continue
        raise
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
    if "error" in result:
        raise result["error"]
    return result["value"]
