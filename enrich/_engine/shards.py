"""Stage 2, shards: a large job is split by content into shards, each processed, checkpointed and
resumed on its own, a bounded number at a time, so that what a job holds in memory does not grow with
its rows.

A shard is the set of distinct rows whose key (a sha256 prefix, `prepare`) starts with the same bits:
the top `log2(count)` bits of the key's first byte. Where a row goes depends only on its content, so a
resume, another process or another machine (a distributed run) puts it in the same shard.

On disk a sharded checkpoint is a root directory whose manifest records `"shards": count` (with format 2,
so that an older enrich refuses it instead of seeing no runs and paying again), and one ordinary
checkpoint per shard under `shards/XX/` (XX: the shard's number, two hex digits), with its own task
group and its own typed answers (`typed/`). The root keeps what is the job's, not a shard's: the rate
limiter's pacing, the service's warnings and the last call.

The count is chosen once, when a checkpoint that recorded nothing is first opened: one shard for every
`SHARD_ROWS` distinct rows, a power of two up to `MAX_SHARDS`. A checkpoint of an older enrich (or one
that recorded runs in one area) keeps its single area: a job never moves a recorded run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from enrich._checkpoint import Checkpoint, Settled, read_settled
from enrich._engine.prepare import _Plan
from enrich._progress import Progress, ProgressSink

#: A job is split so that a shard holds at most about this many distinct rows.
SHARD_ROWS = 32_768
#: ... into at most this many shards (a key's first byte names at most 256).
MAX_SHARDS = 256
#: Shards whose state is held at once: one submitting, the others collecting their runs' answers.
AT_ONCE = 4
DIRECTORY = "shards"


def shard_count(distinct: int, *, rows_per_shard: int = SHARD_ROWS) -> int:
    """The number of shards for a job of `distinct` rows: a power of two, 1 up to `MAX_SHARDS`."""
    if distinct <= rows_per_shard:
        return 1
    return min(MAX_SHARDS, 1 << math.ceil(math.log2(distinct / rows_per_shard)))


def shard_of(keys: pl.Series, count: int) -> pl.Series:
    """The shard of each row key (32 hex digits) in a job of `count` shards (a power of two)."""
    if count == 1:
        return pl.Series("shard", [0] * len(keys), dtype=pl.Int64)
    shift = 8 - count.bit_length() + 1
    first = keys.str.slice(0, 2).str.to_integer(base=16).cast(pl.Int64)
    return (first // (1 << shift)).alias("shard")


def area_name(shard: int) -> str:
    return f"{DIRECTORY}/{shard:02x}"


def layout(root: Checkpoint, distinct: int, *, rows_per_shard: int = SHARD_ROWS) -> int:
    """The job's shard count: recorded in `root`, or chosen now (and recorded before anything else) if
    it recorded nothing."""
    # Split only a checkpoint known to hold nothing: a segment that could not be read this once (an I/O
    # error, an object store's hiccup) must not make a root of shards that never reads it again.
    if root.shards > 1 or not root.recorded_nothing or root.warnings:
        return root.shards
    count = shard_count(distinct, rows_per_shard=rows_per_shard)
    if count > 1:
        root.record_shards(count)
    return count


@dataclass
class Area:
    """One shard of a job: its rows (a plan of its own distinct rows) and where they are recorded."""

    shard: int
    #: The checkpoint directory under the root (None: the root itself, a job of one shard).
    name: str | None
    plan: _Plan
    #: The shard's rows: the distinct row of each (in `plan.keys`), and its place in the job's frame
    #: (None: every row of the frame, in order).
    index: pl.Series
    rows: pl.Series | None
    #: The plan's frame holds just the shard's rows, in order (a spooled table, `spool`); else it is the
    #: job's frame, and a row is taken from it at its place (`rows`).
    own: bool = False


def split(plan: _Plan, count: int) -> list[Area]:
    """The shards of `plan`, each a plan of its own distinct rows (in the job's order) that shares the
    job's frame; shards with no row of this call are left out."""
    index = pl.Series("d", plan.index, dtype=pl.Int64)
    if count == 1:
        return [Area(0, None, plan, index, None)]
    keys = plan.key_series().alias("key")
    # Each distinct row's shard and its place among the shard's distinct rows (in the job's order).
    distinct = pl.DataFrame({"shard": shard_of(keys, count)}).with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("shard").alias("local")
    )
    by_row = (
        distinct.gather(index)
        .with_row_index("row")
        .partition_by("shard", as_dict=True, include_key=False, maintain_order=True)
    )
    by_key = distinct.with_row_index("d").partition_by("shard", as_dict=True, maintain_order=True)
    del distinct
    areas = []
    for (shard,), frame in sorted(by_key.items()):  # type: ignore[type-var]
        at = frame["d"].cast(pl.Int64).to_list()
        sub = dataclasses.replace(
            plan,
            key_data=[plan.keys[d] for d in at],
            index=[],  # (its rows are the area's)
            inputs=[plan.inputs[d] for d in at] if plan.inputs is not None else None,
            input_rows=at if plan.input_rows is None else [plan.input_rows[d] for d in at],
            timings={},
            notes=[],
        )
        rows = by_row[(shard,)]
        areas.append(
            Area(int(shard), area_name(int(shard)), sub, rows["local"], rows["row"].cast(pl.Int64))  # type: ignore[call-overload]
        )
    plan.inputs = None  # the shards hold them now, and give them away as they load
    return areas


def open_area(root: Checkpoint, area: Area, service: str | None) -> Checkpoint:
    """The checkpoint of `area` (the root itself for a job of one shard), opened for writing."""
    if area.name is None:
        return root
    return Checkpoint.open(root.store.child(area.name), root.fingerprint, service=service)


def area_states(
    root: Checkpoint, only: set[int] | None = None, columns: Sequence[str] | None = None
) -> Iterator[tuple[int, Settled]]:
    """(shard, its state without outputs, runs, groups and warnings) of each area of `root` (of the
    shards `only`; None: all), one area at a time: read from the state a settled shard kept in one
    file when it is still current (`read_settled`), else from its segments (for `enrich status`, the
    dry run and the job's spend). With `columns`, a settled state holds only those (of its
    `_LIGHT_STATE`)."""
    if root.shards == 1:
        yield 0, _settled_of(root)
        return
    made = set(root.store.list(DIRECTORY + "/"))
    for shard in range(root.shards):
        name = area_name(shard)
        if f"{name}/manifest.json" not in made or (only is not None and shard not in only):
            continue
        store = root.store.child(name)
        settled = (
            read_settled(store, root.job_id) if columns is None else read_settled(store, root.job_id, columns)
        )
        if settled is None:
            cp = Checkpoint.read(store)
            settled = _settled_of(cp)
            cp.close(forget=True)
        yield shard, settled


def _settled_of(cp: Checkpoint) -> Settled:
    """What `area_states` gives of a checkpoint read from its segments (running rows included)."""
    counts = cp.counts()
    return Settled(
        cp.state(outputs=False),
        cp.runs,
        counts.duplicates,
        tuple(cp.groups),
        tuple(cp.warnings),
        counts.in_doubt,
    )


def recorded_runs(root: Checkpoint, only: set[int] | None = None) -> dict[int, int]:
    """Runs recorded in each shard's area (of the shards `only`, None: all), read one area at a time:
    `max_cost` and the job's spend count every run the job paid for, in shards this call has no row of
    too."""
    return {shard: settled.runs for shard, settled in area_states(root, only, ("row_key",))}


@dataclass
class Tally:
    """The counts of every shard summed into one progress bar, and the runs every shard has paid for
    (`max_cost` counts the whole job's)."""

    sink: ProgressSink | None
    total: int
    price: float | None
    latest: dict[int, Progress] = field(default_factory=dict)
    #: Runs recorded per shard: read before the work (with `max_cost`), or when the shard closed.
    recorded: dict[int, int] = field(default_factory=dict)
    #: The shards open now, whose runs are counted live.
    live: dict[int, Checkpoint] = field(default_factory=dict)
    #: The jobs of the shards sending now: their runs being created, and held rows (which a late commit
    #: may still create), count too (`_Job.spending`).
    jobs: dict[int, Any] = field(default_factory=dict)

    def paid(self, *, besides: int | None = None) -> int:
        """Runs the job has paid for, in every shard but `besides`."""
        total = 0
        for shard in set(self.recorded) | set(self.live):
            if shard != besides:
                job = self.jobs.get(shard)
                cp = self.live.get(shard)
                if job is not None and cp is not None:
                    total += job.spending()
                else:
                    total += cp.runs if cp is not None else self.recorded.get(shard, 0)
        return total

    def sink_for(self, shard: int) -> ProgressSink | None:
        if self.sink is None:
            return None

        def report(progress: Progress) -> None:
            self.latest[shard] = progress
            self.emit(progress.message, rate_limited=progress.rate_limited, refused=progress.refused)

        return report

    def emit(self, message: str | None = None, *, rate_limited: int = 0, refused: int = 0) -> None:
        if self.sink is None:
            return
        shown = list(self.latest.values())
        completed = sum(p.completed for p in shown)
        failed = sum(p.failed for p in shown)
        cancelled = sum(p.cancelled for p in shown)
        action_required = sum(p.action_required for p in shown)
        running = sum(p.running for p in shown)
        self.sink(
            Progress(
                total=self.total,
                completed=completed,
                failed=failed,
                cancelled=cancelled,
                action_required=action_required,
                running=running,
                waiting=max(0, self.total - completed - failed - cancelled - action_required - running),
                rate_limited=rate_limited,
                message=message,
                refused=refused,
                spent=self.paid() * self.price if self.price is not None else None,
            )
        )
