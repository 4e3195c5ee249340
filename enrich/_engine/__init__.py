"""The batch engine: frame → content-keyed run inputs → checkpoint filter → runs → checkpoint → join.

One module per stage, each taking the previous one's output:

1. `prepare`: read the frame, parse the output description, build each row's input, key it by content
   (input + task spec + processor), deduplicate, check everything the API would refuse (no network).
   Every bad input is a one-line `UsageError` here, before anything is sent or spent. → `_Plan`.
2. `shards`: a job of more than 32,768 distinct rows is split by content (the top bits of each key)
   into shards, each with its own checkpoint area and task group, run a few at a time under one rate
   limiter, so memory does not grow with the job (`aenrich_shard` runs one). Then, per shard:
   `job`: the job's state, filtered against the checkpoint (`_Job.load`): keys with an outcome are done;
   keys with a receipt are collected, never resubmitted. It records outcomes and reports progress.
3. `reconcile`: creates whose answers were lost (an add-runs sent but not recorded, a timeout) are found
   again by reading the group's runs (their metadata carries the key) before anything new is sent; rows
   whose create the service may still commit are held until the commit horizon.
4. `submit`: add-runs of ≤1,000 (or one create per key in `mode="runs"`), under the shared rate limiter,
   each intent durable before it is sent and its receipt before the next.
5. `collect`: one collector per task group reads the answers as the runs end (events and runs streams).
6. `join`: the answers, read from the checkpoint a segment at a time and typed, onto every row in its
   original order, with `_status`, `_error`, `_run_id`, `_interaction_id` (and `_basis`).

`pipeline.aenrich()` runs the stages (the implementation of the public API); `sync.enrich()` is its one
sync bridge; `dry_run.plan()` works out what a job would do without sending anything (`--dry-run`);
`pilot` runs a seeded sample of the job first and measures it (`pilot=N`, `--pilot N`).

What survives a crash at each step is the checkpoint's business (`enrich._checkpoint`): the group id is
durable before any run is added to it, the intent of an add before it is sent, its receipts before the
next add is sent (in runs mode the creates of one moment share one write of their intents, and their
receipts go with the next write).
"""

from enrich._engine.dry_run import JobPlan, plan
from enrich._engine.job import JobStats
from enrich._engine.pilot import Pilot, PilotReport
from enrich._engine.pipeline import aenrich, aenrich_shard
from enrich._engine.prepare import KEY_FIELD, cache_dir
from enrich._engine.sync import enrich

__all__ = [
    "KEY_FIELD",
    "JobPlan",
    "JobStats",
    "Pilot",
    "PilotReport",
    "aenrich",
    "aenrich_shard",
    "cache_dir",
    "enrich",
    "plan",
]
