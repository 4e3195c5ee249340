"""The emulator's state: runs, groups, credit, and the clock-driven state machine (`EmulatorState`).

Runs move queued → running → completed|failed (or → cancelling → cancelled, or queued → action_required)
on timestamps drawn at creation; `EmulatorState.advance()` applies every transition that is due, from one
heap of pending transitions. The state also gives the wire shapes of runs and groups (`run_json`,
`group_json`, `run_input`, `run_output`) and the processor warnings of a task spec.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from enrich._emulator.config import EmulatorConfig, _draw_seed, _id_source
from enrich._emulator.sources import SourcePolicy
from enrich._emulator.synth import _canonical as _synth_canonical
from enrich._emulator.synth import output_of
from enrich._emulator.validate import _check_task_spec
from enrich._emulator.wire import _canonical, _compact
from enrich._processors import PROCESSORS, Processor

__all__ = ["EmulatorState"]

# Status codes, in an order that makes the checks cheap: below _COMPLETED a run is active (queued,
# running, cancelling); from _COMPLETED to _CANCELLED it has ended for good; _ACTION_REQUIRED is
# neither active nor ended.
#: The answers made ahead of their first read (`EmulatorState.prepare_answers`) take at most this much.
#: (`_READ` marks a run whose answer was read: not made ahead any more.)
ANSWER_CACHE_BYTES = 64 << 20
_READ = b""
_STATUSES = ("queued", "running", "cancelling", "completed", "failed", "cancelled", "action_required")
_QUEUED, _RUNNING, _CANCELLING, _COMPLETED, _FAILED, _CANCELLED, _ACTION_REQUIRED = range(7)
#: The statuses in the order the API reference lists them (task-api.md §4).
_ALL_STATUSES = ("queued", "action_required", "running", "completed", "failed", "cancelling", "cancelled")

_FAILURE_MESSAGES = (
    "Task execution failed: the research step timed out.",
    "Task execution failed: an internal error occurred while processing the task.",
    "Task execution failed: no usable sources could be retrieved.",
)


class _Spec:
    """One distinct task spec (or none), shared by every run that uses it."""

    __slots__ = ("canonical", "errors", "kind", "output", "processor_warnings", "size", "spec", "warnings")

    def __init__(self, spec: dict[str, Any] | None, canonical: str) -> None:
        self.spec = spec
        self.canonical = canonical
        self.size = len(canonical) if spec is not None else 0
        self.kind = "none"
        self.errors: list[dict[str, Any]] = []  # locs relative to the spec
        self.warnings: list[dict[str, Any]] = []
        # Computed once per spec rather than per run (a job answers many runs of one spec):
        self.output: tuple[Any, str] | None = None  # (output_schema, its canonical JSON) for `output_of`
        self.processor_warnings: dict[str, list[dict[str, Any]]] = {}  # by processor


class _Run:
    __slots__ = (
        "answer",
        "body",
        "created",
        "end",
        "error_ref",
        "events",
        "group",
        "index",
        "interaction_id",
        "metadata",
        "outcome",
        "processor",
        "run_id",
        "seq",
        "spec",
        "start",
        "state",
        "warnings",
    )

    def __init__(self) -> None:
        self.state = _QUEUED
        self.answer: bytes | None = None  # its output as JSON, made while it runs (`prepare_answers`)

    @property
    def fails(self) -> bool:
        return self.outcome == _FAILED

    @property
    def cancel_at(self) -> float:
        """When a run that will be cancelled starts `cancelling`: halfway through its running time."""
        return self.start + (self.end - self.start) / 2


class _Group:
    __slots__ = (
        "cached_status",
        "counts",
        "created",
        "events",
        "group_id",
        "metadata",
        "modified",
        "runs",
        "waiters",
    )

    def __init__(self, group_id: str, metadata: dict[str, Any] | None, created: float) -> None:
        self.group_id = group_id
        self.metadata = metadata
        self.created = created
        self.modified = created
        self.runs: list[_Run] = []
        self.counts = [0] * len(_STATUSES)
        # The group event log, in the order things happened: a _Run (it went non-active) or a dict
        # (a task_group_status snapshot). Event ids are positions in this list.
        self.events: list[_Run | dict[str, Any]] = []
        self.waiters: set[asyncio.Future[str]] = set()
        self.cached_status: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.counts[_QUEUED] + self.counts[_RUNNING] + self.counts[_CANCELLING] > 0

    def notify(self) -> None:
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_result("wake")


@dataclass(slots=True)
class _Prepared:
    """A validated TaskRunInput, ready to become a run."""

    body: str  # compact JSON of the input without task_spec and metadata
    input: Any
    metadata: str | None  # compact JSON: a str costs far less memory than a dict per run
    spec: _Spec
    processor: Processor
    events: bool
    warnings: list[dict[str, Any]] | None
    dedup: bytes


class EmulatorState:
    """Everything the emulator holds: runs, groups, credit, and the clock-driven state machine.

    Runs change state lazily: `advance()` pops every transition that is due from one heap (at most one
    pending entry per active run) and updates status counts and group event logs. Every request calls
    it first, so answers always reflect the clock.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.runs: dict[str, _Run] = {}
        self.groups: dict[str, _Group] = {}
        self.status_counts = [0] * len(_STATUSES)
        self.distinct: dict[bytes, int] = {}
        self.max_per_distinct = 0
        self.spent_micro = 0
        self.credit_micro = None if config.credit is None else round(config.credit * 1_000_000)
        self._heap: list[tuple[float, int, _Run]] = []
        self._seq = 0
        self._rng = random.Random(f"{_draw_seed(config)}:runs")
        self._ids = _id_source(config, "ids")
        # Interaction ids of their own (`own_interaction_ids`) come from a source of their own, so they
        # shift no other id of a seed; the map exists only then (a run's interaction is the run itself).
        self._interaction_ids = _id_source(config, "interactions") if config.own_interaction_ids else None
        self.interactions: dict[str, _Run] | None = {} if config.own_interaction_ids else None
        self._specs: dict[str, _Spec] = {}
        self._wall_offset = time.time() - time.monotonic()
        # Answers are made while their runs run, as a service's are, not when they are read: the runs
        # that will complete wait here for `prepare_answers`, within `ANSWER_CACHE_BYTES` of answers.
        self._to_answer: collections.deque[_Run] = collections.deque()
        self.answer_bytes = 0

    # -- time and ids

    @staticmethod
    def now() -> float:
        """The emulator clock (monotonic seconds); timestamps on the wire are derived from it."""
        return time.monotonic()

    def timestamp(self, t: float) -> str:
        """RFC 3339 UTC with microseconds and a `Z`, e.g. `2025-04-23T20:21:48.037943Z`."""
        # isoformat() ends in "+00:00" for UTC: the strftime("%Y-%m-%dT%H:%M:%S.%fZ") spelling, but faster.
        return (
            datetime.fromtimestamp(t + self._wall_offset, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
        )

    def new_hex(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def new_ref(self) -> str:
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))

    def interaction(self, interaction_id: str) -> _Run | None:
        """The run whose `interaction_id` this is (a follow-up's `previous_interaction_id`), or None when
        this emulator never handed it out: with `own_interaction_ids` a run id is not one."""
        if self.interactions is None:
            return self.runs.get(interaction_id)
        return self.interactions.get(interaction_id)

    # -- specs

    def spec(self, task_spec: Any) -> _Spec:
        """The shared, validated record of `task_spec` (a dict or None)."""
        canonical = _canonical(task_spec) if task_spec is not None else ""
        found = self._specs.get(canonical)
        if found is None:
            found = _Spec(task_spec, canonical)
            _check_task_spec(task_spec, found)
            self._specs[canonical] = found
        return found

    # -- credit

    def can_afford(self, items: list[_Prepared]) -> bool:
        if self.credit_micro is None:
            return True
        return self.spent_micro + _cost_micro(items) <= self.credit_micro

    def reserve(self, items: list[_Prepared]) -> int:
        """Reserve the credit of runs to be created later (a late commit); returns the amount."""
        if self.credit_micro is None:
            return 0
        cost = _cost_micro(items)
        self.spent_micro += cost
        return cost

    def release(self, micro: int) -> None:
        """Give back a reservation whose runs will never be created."""
        self.spent_micro -= micro

    # -- runs

    def create_runs(
        self, items: list[_Prepared], group: _Group | None, *, reserved: bool = False
    ) -> list[_Run]:
        """Create one run per prepared input (in order), reserving credit and scheduling transitions.

        `reserved`: the credit was reserved already, on the request's arrival (a late commit).
        """
        self.advance()
        now = self.now()
        cfg = self.config
        rng = self._rng
        created = []
        for item in items:
            run = _Run()
            self._seq += 1
            run.seq = self._seq
            run.run_id = "trun_" + self.new_hex()
            if self._interaction_ids is None:
                run.interaction_id = run.run_id
            else:
                run.interaction_id = f"int_{self._interaction_ids.getrandbits(128):032x}"
            run.body = item.body
            run.metadata = item.metadata
            run.spec = item.spec
            run.processor = item.processor.name
            run.events = item.events
            run.warnings = item.warnings
            run.group = group
            run.created = now
            # Four draws per run, always, so one run's outcome never shifts another's. One number
            # decides the outcome: a failure is what it was before cancels and action_required existed.
            if cfg.latency is None:
                lo, hi = item.processor.latency
                duration = rng.uniform(lo / 60.0, hi / 60.0)
            else:
                duration = cfg.latency * rng.uniform(0.5, 1.5)
            queued = duration * rng.uniform(0.05, 0.15)
            u = rng.random()
            stop_at = rng.uniform(0.2, 1.0)
            run.start = now + queued
            if u < cfg.failure_rate:
                run.outcome = _FAILED
            elif u < cfg.failure_rate + cfg.cancel_rate:
                run.outcome = _CANCELLED
            elif u < cfg.failure_rate + cfg.cancel_rate + cfg.action_required_rate:
                run.outcome = _ACTION_REQUIRED
            else:
                run.outcome = _COMPLETED
            if run.outcome == _ACTION_REQUIRED:
                run.end = run.start  # it stops where it would have started running
            elif run.outcome == _COMPLETED:
                run.end = run.start + (duration - queued)
            else:
                run.end = run.start + (duration - queued) * stop_at
            run.error_ref = self.new_ref() if run.outcome == _FAILED else None
            if group is not None:
                run.index = len(group.runs)
                group.runs.append(run)
                group.counts[_QUEUED] += 1
            else:
                run.index = -1
            self.runs[run.run_id] = run
            if self.interactions is not None:
                self.interactions[run.interaction_id] = run
            self.status_counts[_QUEUED] += 1
            heapq.heappush(self._heap, (run.start, run.seq, run))
            if run.outcome == _COMPLETED:
                self._to_answer.append(run)
            n = self.distinct.get(item.dedup, 0) + 1
            self.distinct[item.dedup] = n
            self.max_per_distinct = max(self.max_per_distinct, n)
            if self.credit_micro is not None and not reserved:
                self.spent_micro += round(item.processor.price_per_1k * 1_000)
            created.append(run)
        if group is not None and created:
            group.modified = now
            group.events.append(self.group_status(group))
            group.notify()
        return created

    def advance(self) -> None:
        """Apply every state transition that is due by now."""
        now = self.now()
        heap = self._heap
        changed: set[_Group] = set()
        while heap and heap[0][0] <= now:
            t, seq, run = heapq.heappop(heap)
            group = run.group
            old, outcome = run.state, run.outcome
            if old == _QUEUED:
                new = _ACTION_REQUIRED if outcome == _ACTION_REQUIRED else _RUNNING
            elif old == _RUNNING and outcome == _CANCELLED:
                new = _CANCELLING
            else:
                new = outcome
            run.state = new
            self.status_counts[old] -= 1
            self.status_counts[new] += 1
            if group is not None:
                group.counts[old] -= 1
                group.counts[new] += 1
                group.modified = t
            if new < _COMPLETED:  # still active: one more transition is due
                due = run.cancel_at if new == _RUNNING and outcome == _CANCELLED else run.end
                heapq.heappush(heap, (due, seq, run))
                continue
            if group is not None:  # the run went non-active: a group event
                group.events.append(run)
                if not group.active:
                    group.events.append(self.group_status(group))
                changed.add(group)
        for group in changed:
            group.notify()

    def next_transition(self) -> float | None:
        """When the next pending transition is due (monotonic seconds), or None."""
        return self._heap[0][0] if self._heap else None

    def create_group(self, metadata: dict[str, Any] | None) -> _Group:
        group = _Group("tgrp_" + self.new_hex(), metadata, self.now())
        self.groups[group.group_id] = group
        return group

    # -- wire shapes

    def group_status(self, group: _Group) -> dict[str, Any]:
        counts = {_STATUSES[i]: n for i, n in enumerate(group.counts) if n}
        status = {
            "num_task_runs": len(group.runs),
            "task_run_status_counts": counts,
            "is_active": group.active,
            "status_message": None,
            "modified_at": self.timestamp(group.modified),
        }
        group.cached_status = status
        return status

    def group_json(self, group: _Group) -> dict[str, Any]:
        return {
            "taskgroup_id": group.group_id,
            "metadata": group.metadata,
            "status": self.group_status(group),
            "created_at": self.timestamp(group.created),
        }

    def run_json(self, run: _Run) -> dict[str, Any]:
        state = run.state
        if state == _QUEUED:
            changed = run.created
        elif state in (_RUNNING, _ACTION_REQUIRED):
            changed = run.start
        elif state == _CANCELLING:
            changed = run.cancel_at
        else:
            changed = run.end
        warnings = run.spec.warnings + _processor_warnings(run.spec, run.processor) + (run.warnings or [])
        return {
            "run_id": run.run_id,
            "interaction_id": run.interaction_id,
            "status": _STATUSES[state],
            "is_active": state < _COMPLETED,
            "processor": run.processor,
            "metadata": json.loads(run.metadata) if run.metadata is not None else None,
            "taskgroup_id": run.group.group_id if run.group is not None else None,
            "created_at": self.timestamp(run.created),
            "modified_at": self.timestamp(changed),
            "warnings": warnings or None,
            "error": self.run_error(run) if state == _FAILED else None,
        }

    def run_error(self, run: _Run) -> dict[str, Any]:
        message = _FAILURE_MESSAGES[run.seq % len(_FAILURE_MESSAGES)]
        return {"ref_id": run.error_ref, "message": message, "detail": None}

    def run_input(self, run: _Run) -> dict[str, Any]:
        """The TaskRunInput the run was created from, with the task spec that applied to it."""
        body = json.loads(run.body)
        if run.metadata is not None:
            body["metadata"] = json.loads(run.metadata)
        if run.spec.spec is not None:
            body["task_spec"] = run.spec.spec
        return body

    def prepare_answers(self, count: int) -> bool:
        """Make the answers of up to `count` runs created lately; whether more can be made now.

        A service answers a read of finished runs from what it stored when they ended: making them at
        the read instead (3 KB of JSON with its basis in ~0.1 ms each) made the last read of a job wait
        on the emulator. An answer is kept until it is first read (`output_json`), within
        `ANSWER_CACHE_BYTES` of answers not read yet; past that, the next are made when read, or here
        once reads have made room (the next create asks)."""
        while count > 0 and self._to_answer and self.answer_bytes < ANSWER_CACHE_BYTES:
            run = self._to_answer.popleft()
            if run.answer is not None:  # (read already: made then)
                continue
            count -= 1
            try:
                run.answer = orjson.dumps(self.run_output(run))
            except orjson.JSONEncodeError:  # (an integer beyond 64 bits in its input: made when read)
                continue
            self.answer_bytes += len(run.answer)
        return bool(self._to_answer) and self.answer_bytes < ANSWER_CACHE_BYTES

    def output_json(self, run: _Run) -> bytes:
        """The run's output as JSON (made now unless `prepare_answers` made it; then given up: a read
        again, rare, makes it again)."""
        if run.answer:
            made, run.answer = run.answer, _READ
            self.answer_bytes -= len(made)
            return made
        run.answer = _READ
        output = self.run_output(run)
        try:
            return orjson.dumps(output)
        except orjson.JSONEncodeError:
            return _compact(output).encode()

    def run_output(self, run: _Run) -> dict[str, Any]:
        # `build_output(input, spec.spec, processor, ...)`, with the spec's part done once per spec.
        spec = run.spec
        cached = spec.output
        if cached is None:
            schema = spec.spec.get("output_schema") if spec.spec else None
            cached = spec.output = (schema, _synth_canonical(schema))
        body = json.loads(run.body)
        return output_of(
            body["input"],
            cached[0],
            cached[1],
            run.processor,
            self.config.basis_bytes,
            SourcePolicy.of(body.get("source_policy")),
            body.get("previous_interaction_id"),
        )

    def stats(self) -> dict[str, Any]:
        self.advance()
        created = self._seq
        return {
            "runs_created": created,
            "groups_created": len(self.groups),
            "distinct_runs": len(self.distinct),
            "duplicate_runs": created - len(self.distinct),
            "max_runs_per_distinct": self.max_per_distinct,
            "runs_by_status": {name: self.status_counts[_STATUSES.index(name)] for name in _ALL_STATUSES},
            "active_runs": sum(self.status_counts[:_COMPLETED]),
            "credit_spent": self.spent_micro / 1_000_000,
            "credit_remaining": None
            if self.credit_micro is None
            else (self.credit_micro - self.spent_micro) / 1_000_000,
        }


def _cost_micro(items: list[_Prepared]) -> int:
    return sum(round(p.processor.price_per_1k * 1_000) for p in items)


def _processor_warnings(spec: _Spec, processor: str) -> list[dict[str, Any]]:
    """The warnings `processor` gives for `spec`, cached per spec (callers copy it, never mutate it)."""
    found = spec.processor_warnings.get(processor)
    if found is None:
        found = spec.processor_warnings[processor] = _new_processor_warnings(spec, processor)
    return found


def _new_processor_warnings(spec: _Spec, processor: str) -> list[dict[str, Any]]:
    if spec.kind != "json" or spec.spec is None:
        return []
    props = spec.spec["output_schema"]["json_schema"].get("properties") or {}
    limit = PROCESSORS[processor].max_fields
    if len(props) <= limit:
        return []
    return [
        {
            "type": "warning",
            "message": f"The output schema has {len(props)} fields; processor {processor!r} handles about "
            f"{limit} well. Consider a higher processor or fewer fields.",
            "detail": {"num_fields": len(props), "recommended_max": limit},
        }
    ]
