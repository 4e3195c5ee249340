"""A job on a Ray cluster: `enrich_dataset(ds, output, ...)`, for tables one process cannot hold or keys
one process cannot use up (`pip install 'enrich[ray]'`).

The same job as `enrich()`, spread over Ray Data:

1. Each row is keyed as `enrich()` keys it (a hash of the input it sends), in `map_batches`, and given its
   shard: the top bits of its key, for a shard count fixed in the checkpoint's root manifest when the job
   is first run (the layout `enrich()` uses for a large job, so either can resume the other's checkpoint).
2. The rows are grouped by shard (`groupby(...).map_groups(...)`), and each shard runs the one-machine
   shard entry point (`aenrich_shard`) in an actor of a pool: its own checkpoint area and task group,
   deduplicated, resumed from what its area recorded. A worker that dies mid-shard is replaced by Ray and
   its shard run again: its in-doubt creates are reconciled through its group, as after a crash on one
   machine, so no input is paid for twice.
3. Every shard sends under one broker per API key (`enrich._engine.broker`): the key's adaptive rate
   limiter lives in one actor, asked once per add-runs call or read, so the cluster keeps to each key's
   quota and a 429 anywhere pauses every shard on that key. Shard `s` sends under key `s % len(keys)`.

`api_keys` names environment variables read on the workers: a key's value is never pickled, logged or
written. The checkpoint must be where every worker can reach it: a directory (one machine, or a shared file
system) or object storage (`s3://bucket/prefix`: `enrich._store_object`, whose lease stands
in for the lock, so that a worker Ray gave up on cannot write beside the one that replaced it).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from enrich._checkpoint import Checkpoint
from enrich._engine import shards
from enrich._engine.broker import Broker, BrokerLimiter, CostShare, Ledger
from enrich._engine.pipeline import _service_name, aenrich_shard
from enrich._engine.prepare import _checked_job
from enrich._exceptions import UsageError
from enrich._processors import PROCESSORS
from enrich._run_options import check_run_options
from enrich._store import CheckpointStore, as_store
from enrich._store_object import ObjectStore, is_url

__all__ = ["enrich_dataset"]

#: The column that carries each row's shard between the two stages (dropped from the result).
SHARD_COLUMN = "__enrich_shard"
#: Shards run at once per key: one sends while the others collect their answers, so that a key always
#: has a shard ready to send (4 used 87-97% of a key's quota in bench/ray_keys.py, 6 used 99.7-100%).
PER_KEY = 6
#: The share of the cluster's CPUs the workers reserve by default: they mostly wait on the network, and
#: Ray Data's own stages (reading, keying, the shuffle that groups the shards) need the rest (reserving
#: 1.2 of 2 CPUs left the shuffle none: the job hung).
CPU_SHARE = 0.25
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("enrich.ray needs Ray Data: pip install 'enrich[ray]'") from None
    return ray


def enrich_dataset(
    ds: Any,
    output: Any,
    *,
    checkpoint: str | os.PathLike[str] | ObjectStore,
    api_keys: Sequence[str] = ("PARALLEL_API_KEY",),
    processor: str = "core",
    shards_count: int | None = None,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    run_options: Mapping[str, Any] | None = None,
    beta: str | Sequence[str] | None = None,
    mode: str = "group",
    basis: bool = False,
    retry_failed: bool | str | Sequence[str] = False,
    max_cost: float | None = None,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
    timeout: float | None = None,
    concurrency: int = 100,
    request_timeout: float = 60.0,
    commit_horizon: float | None = None,
    workers: int | None = None,
    num_cpus: float | None = None,
) -> Any:
    """Enrich the rows of the Ray Dataset `ds`; returns a Ray Dataset (lazy, as Ray's are) with `ds`'s
    columns and the columns `enrich()` adds (`_status`, `_error`, `_run_id`, `_interaction_id`, the
    typed outputs). Its rows come grouped by shard, not in `ds`'s order: sort on a column to order them.

    The arguments are `enrich()`'s where they apply, and:

    - `checkpoint`: the job's checkpoint (required), reachable from every worker: a directory, or an
      object-storage URL (`s3://bucket/prefix`; `pip install 'enrich[cloud]'`) whose credentials each
      worker reads from its environment (`AWS_*`, ...), or an `ObjectStore` of one. Running the
      same call again resumes it: nothing is paid twice, and a finished job sends nothing.
    - `api_keys`: names of environment variables that hold API keys, read on the workers. Each key gets
      its own budget (`rate_limit` requests and `run_rate` runs per `rate_window` s), kept by a broker
      actor per key for the whole cluster (per key value: two variables holding one key share it).
    - `shards_count`: the number of shards, a power of two up to 256; default: one per 32,768 rows. It is
      fixed by the job's first run, and a different one is refused.
    - `workers`: shards run at once (actors of the pool); default: 6 per key. Throughput follows the
      keys, not the cluster's size.
    - `max_cost`: the job's cap in dollars, for the whole cluster, counting every run the checkpoint
      recorded (as `enrich()`'s): a ledger actor allows each shard its share before it sends, once per
      add-runs call. Rows past the cap come back unsent; a call with a higher cap goes on.
    - `timeout`: seconds per shard (each shard's call stops after that long; its unfinished rows come
      back `pending`, and the next call collects them).
    - `num_cpus`: CPUs reserved per worker; default: a quarter of the cluster's CPUs shared by the
      workers, at most 0.1 each. They mostly wait on the network, and the stages that read, key and
      group the rows need the rest (workers that reserve too much leave the shuffle none: it hangs).

    Example::

        ds = ray.data.read_parquet("s3://bucket/companies/")
        out = enrich_dataset(ds, {"ceo": "Name of the CEO"}, checkpoint="/shared/ceo.enrich",
                             api_keys=["PARALLEL_KEY_1", "PARALLEL_KEY_2"], processor="base")
        out.write_parquet("s3://bucket/enriched/")
    """
    ray = _ray()
    if not isinstance(ds, ray.data.Dataset):
        raise UsageError(f"enrich_dataset takes a ray.data.Dataset, got {type(ds).__name__}")
    keys = _check_keys(api_keys)
    root_at = _root(checkpoint)
    _check_layout(shards_count, rate_limit, run_rate, rate_window)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a whole number, 1 or more, got {workers!r}")
    if num_cpus is not None and not (
        isinstance(num_cpus, (int, float)) and not isinstance(num_cpus, bool) and 0 < num_cpus <= 64
    ):
        raise UsageError(f"num_cpus must be a positive number of CPUs per worker, got {num_cpus!r}")
    options = check_run_options(run_options, beta, processor)
    schema = _polars_schema(ds)
    if SHARD_COLUMN in schema:
        raise UsageError(
            f"the dataset has a column named {SHARD_COLUMN!r}, which enrich_dataset uses: rename it"
        )
    job = _checked_job(  # every bad argument is refused here, before a row is read or anything sent
        schema,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
        options=options,
    )
    price = PROCESSORS[processor].price_per_run
    if max_cost is not None and (
        isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost >= 0
    ):
        raise UsageError(f"max_cost must be a dollar amount of zero or more, got {max_cost!r}")
    if max_cost is not None and price is None:
        raise UsageError(f"max_cost needs a known price, and processor {processor!r} has none")
    svc = _service_name(service, None, base_url)
    root = Checkpoint.open(root_at, job.fingerprint, service=svc)
    try:
        count = _layout(root, ds, shards_count)
        # Every run the job paid for counts against max_cost, in shards without rows now too.
        recorded = None if max_cost is None else shards.recorded_runs(root) if count > 1 else {0: root.runs}
    finally:
        root.close()
    ledger = None
    if max_cost is not None:
        ledger = ray.remote(num_cpus=0)(Ledger).remote(int(max_cost / price + 1e-9), recorded)
    passed = {  # the arguments of `aenrich` each shard is run with
        "columns": columns,
        "prompt": prompt,
        "input_schema": input_schema,
        "metadata": metadata,
        "run_options": run_options,
        "beta": beta,
        "processor": processor,
        "mode": mode,
        "basis": basis,
        "retry_failed": retry_failed,
        "max_cost": max_cost,
        "base_url": base_url,
        "service": service,
        "timeout": timeout,
        "concurrency": concurrency,
        "request_timeout": request_timeout,
        "commit_horizon": commit_horizon,
    }
    keyed = ds.map_batches(  # (CPU work: Ray's default of a CPU per task)
        _key_batch,
        fn_kwargs={"job": job, "count": count},
        batch_format="pyarrow",
    )
    size = min(workers if workers is not None else len(keys) * PER_KEY, count)
    if num_cpus is None:
        cpus = float(ray.cluster_resources().get("CPU", 2.0))
        num_cpus = round(max(0.01, min(0.1, CPU_SHARE * cpus / size)), 3)
    return keyed.groupby(SHARD_COLUMN, num_partitions=count).map_groups(
        _ShardWorker,
        fn_constructor_kwargs={
            "output": output,
            "root": root_at,
            "count": count,
            "keys": keys,
            "ledger": ledger,
            "budgets": (rate_limit, run_rate, rate_window),
            "options": passed,
        },
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=num_cpus,
        # A worker that dies mid-shard is replaced and its shard run again (resumed from its area).
        max_restarts=-1,
        max_task_retries=-1,
    )


def _root(checkpoint: Any) -> str | ObjectStore:
    """Where the job's checkpoint is, as every worker can reach it: an absolute directory (one machine or a
    shared file system) or object storage (sent to the workers as its URL: each reads its credentials from
    its own environment)."""
    if isinstance(checkpoint, ObjectStore) or (isinstance(checkpoint, str) and "://" in checkpoint):
        store = as_store(checkpoint)
        assert isinstance(store, ObjectStore)
        if not is_url(store.url):
            raise UsageError(
                "the workers need an object store they can rebuild: give its URL (s3://bucket/prefix), "
                "not an obstore object"
            )
        return store
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise UsageError(
            "a job on a cluster needs a checkpoint every worker can reach (checkpoint=...): a directory on "
            "a shared file system or an object-storage URL (s3://bucket/prefix)"
        )
    return os.fspath(Path(checkpoint).absolute())


def _check_layout(shards_count: Any, rate_limit: Any, run_rate: Any, rate_window: Any) -> None:
    """The shard count and a key's budgets of a job on a cluster (Ray's, Spark's), checked on the driver."""
    if shards_count is not None and (
        isinstance(shards_count, bool)
        or not isinstance(shards_count, int)
        or not 1 <= shards_count <= shards.MAX_SHARDS
        or shards_count & (shards_count - 1)
    ):
        raise UsageError(
            f"shards_count must be a power of two from 1 to {shards.MAX_SHARDS}, got {shards_count!r}"
        )
    for name, value in (("rate_limit", rate_limit), ("run_rate", run_rate), ("rate_window", rate_window)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{name} must be a positive number, got {value!r}")


def _check_keys(api_keys: Any) -> list[str]:
    if isinstance(api_keys, str):
        api_keys = [api_keys]
    if not isinstance(api_keys, Sequence) or not api_keys:
        raise UsageError("api_keys must name one or more environment variables that hold API keys")
    names = list(api_keys)
    for name in names:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise UsageError(
                f"api_keys names environment variables (read on the workers), not keys: {name!r} is not "
                "a variable name"
            )
    if len(set(names)) != len(names):
        raise UsageError("api_keys names the same variable twice: each key gets one budget")
    return names


def _polars_schema(ds: Any) -> pl.Schema:
    schema = ds.schema()
    if schema is None:
        raise UsageError("the dataset has no schema (no rows?): nothing to enrich")
    arrow = getattr(schema, "base_schema", schema)
    if not isinstance(arrow, pa.Schema):
        raise UsageError("the dataset's schema is not an Arrow schema: read it with ray.data's readers")
    frame = pl.from_arrow(arrow.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


def _layout(root: Checkpoint, ds: Any, wanted: int | None) -> int:
    """The job's shard count: recorded in the root's manifest, or chosen and recorded now."""
    if root.shards > 1 or not root.recorded_nothing:
        if wanted is not None and wanted != root.shards:
            raise UsageError(
                f"this job's checkpoint is laid out in {root.shards} shard(s); run it with "
                f"shards_count={root.shards} (or leave it out), or give another checkpoint"
            )
        return root.shards
    count = wanted if wanted is not None else shards.shard_count(ds.count())
    if count > 1:
        root.record_shards(count)
    return count


def _broker_name(api_key: str) -> str:
    """The name of the broker actor of the API key `api_key`: named by a hash of the key's value, not by
    the variable that holds it, so that two variables (or two jobs) holding one key share its budget.
    (A 64-bit prefix of its SHA-256 tells nothing of the key.)"""
    return "enrich-broker-" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def _broker(api_key: str, rate_limit: float, run_rate: float, window: float) -> Any:
    """The broker actor of `api_key`: one per key in the cluster, made by the first worker that needs
    it (detached: it outlives the job, so that every job on the cluster shares the key's budget), and
    set to this call's budgets."""
    ray = _ray()
    actor = ray.remote(num_cpus=0, max_restarts=-1)(Broker)
    handle = actor.options(
        name=_broker_name(api_key), namespace="enrich", get_if_exists=True, lifetime="detached"
    ).remote(rate_limit, run_rate, window)
    ray.get(handle.configure.remote(rate_limit, run_rate, window))
    return handle


def _key_batch(batch: pa.Table, *, job: Any, count: int) -> pa.Table:
    """map_batches: each row's shard, from its key (`job`: the job `enrich_dataset` checked, keying as
    `enrich()` keys)."""
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    keys, _, _ = job.keyed(frame, options=job.option_texts(frame))
    series = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
    shard = shards.shard_of(series, count).cast(pl.Int32)
    routes = pl.Series(_routes(count), dtype=pl.Int32)
    return batch.append_column(SHARD_COLUMN, routes.gather(shard).to_arrow())


@functools.cache
def _routes(count: int) -> tuple[int, ...]:
    """The value of the shard column for each shard: `shard + k * count`, chosen so that the hash shuffle
    of `groupby(..., num_partitions=count)` puts each shard in a partition of its own. With the shard
    numbers themselves, two shards often shared a partition (run one after the other by one worker)
    while another partition had none, and a key could then wait a window or more with no shard sending
    (the two-key test saw 77 % and 9 % of a key's quota). The partition is found by Ray's own function;
    without it (another Ray), the shard numbers, as before. A worker takes the value modulo `count`."""
    try:
        from ray.data._internal.arrow_ops.transform_pyarrow import _hash_partition_vectorized
    except ImportError:
        return tuple(range(count))

    tries = 64  # (candidates per shard: a free partition is found within a few hundred)
    while True:
        values = [shard + k * count for k in range(tries) for shard in range(count)]
        if values[-1] > 2**31 - 1:
            return tuple(range(count))
        table = pa.table({SHARD_COLUMN: pa.array(values, pa.int32())})
        found: dict[int, int] = {}
        for value, part in zip(values, _hash_partition_vectorized(table, count).tolist(), strict=True):
            if part == value % count:
                found.setdefault(part, value)
        if len(found) == count:
            return tuple(found[shard] for shard in range(count))
        tries *= 4


class _ShardWorker:
    """map_groups: one shard's rows enriched by `aenrich_shard`, in its own checkpoint area, under the
    broker of its key."""

    def __init__(
        self,
        output: Any,
        root: str | ObjectStore,
        count: int,
        keys: list[str],
        ledger: Any,
        budgets: tuple[float, float, float],
        options: dict[str, Any],
    ) -> None:
        self.output, self.root, self.count, self.ledger = output, root, count, ledger
        self.keys, self.budgets, self.options = keys, budgets, options
        self.brokers: dict[str, Any] = {}  # by key variable: the broker of the key it holds

    def __call__(self, group: pa.Table) -> pa.Table:
        if not group.num_rows:
            return group.drop_columns([SHARD_COLUMN])
        shard = group.column(SHARD_COLUMN)[0].as_py() % self.count  # (its route: see `_routes`)
        rows = group.drop_columns([SHARD_COLUMN])
        name = self.keys[shard % len(self.keys)]
        api_key = os.environ.get(name)
        if not api_key:
            raise UsageError(f"the environment variable {name} (api_keys) is not set on this worker")
        area: str | CheckpointStore = self.root
        if self.count > 1:
            sub, root = shards.area_name(shard), self.root
            area = root.child(sub) if isinstance(root, CheckpointStore) else os.path.join(root, sub)
        frame = pl.from_arrow(rows)
        assert isinstance(frame, pl.DataFrame)
        if name not in self.brokers:
            self.brokers[name] = _broker(api_key, *self.budgets)
        out = asyncio.run(self._run(frame, area, shard, api_key, self.brokers[name]))
        table = out.to_arrow()
        # The input's columns come back in their own Arrow types (polars would widen string to
        # large_string, say): exactly as given.
        for i, field in enumerate(rows.schema):
            if table.schema.field(field.name).type != field.type:
                table = table.set_column(i, field, table.column(field.name).cast(field.type))
        return table

    async def _run(
        self, frame: pl.DataFrame, area: str | CheckpointStore, shard: int, api_key: str, broker: Any
    ) -> pl.DataFrame:
        requests, runs, window = self.budgets
        limiter = BrokerLimiter(
            _RayLink(broker), requests_per_minute=requests, runs_per_minute=runs, period=window
        )
        return await aenrich_shard(
            frame,
            self.output,
            checkpoint=area,
            limiter=limiter,
            api_key=api_key,
            progress=False,
            _ledger=None if self.ledger is None else CostShare(_RayLink(self.ledger), shard),
            **self.options,
        )


class _RayLink:
    """A `broker.Link` to a broker actor."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def send(self, method: str, *args: Any) -> None:
        getattr(self.handle, method).remote(*args)
