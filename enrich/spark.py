"""A job on Spark: `enrich_spark(df, output, ...)`, or the recipe it is made of (`prepare_spark`), for
tables that live in Spark (`pip install 'enrich[spark]'`).

The same job as `enrich()` and `enrich.ray`, in plain PySpark:

1. Each row is keyed as `enrich()` keys it (a hash of the input it sends), in `mapInArrow`, and given its
   shard: the top bits of its key, for a shard count fixed in the checkpoint's root manifest when the job
   is first run (the layout `enrich()` and `enrich.ray` use, so each can resume the others' checkpoint).
   The rows are then repartitioned so that each shard is one Spark partition, hence one task.
2. `groupBy(shard).applyInArrow(...)` (or `applyInPandas`) runs each shard through the one-machine shard
   entry point (`aenrich_shard`): its own checkpoint area and task group, deduplicated, resumed from what
   its area recorded. A task that fails (its Python worker killed, an executor lost) is retried by Spark
   and resumes its shard: its in-doubt creates are reconciled through its group, so no input is paid
   for twice.
3. Spark has no shared actor to hold a key's rate limiter, so the budget is split statically: each task
   sends under its own limiter with `rate_limit / tasks_per_key` requests and `run_rate / tasks_per_key`
   runs per window, where `tasks_per_key` is how many tasks may run at once on one key. Shard `s` sends
   under key `s % len(api_keys)`.

`api_keys` names environment variables read on the executors: a key's value is never pickled, logged or
written. The checkpoint must be where every executor can reach it: a directory (one machine, or a shared
file system) or object storage (`s3://bucket/prefix`, with the `cloud` extra). Leave speculative execution
off (Spark's default): two copies of a shard's task would contend for its checkpoint area.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from enrich._checkpoint import Checkpoint
from enrich._engine import shards
from enrich._engine.job import _Job, retry_statuses
from enrich._engine.join import _join
from enrich._engine.pipeline import _service_name, aenrich_shard
from enrich._engine.prepare import _check_choices, _checked_job, _prepare
from enrich._exceptions import UsageError
from enrich._run_options import check_run_options
from enrich._schema import parse_output
from enrich._store_object import ObjectStore
from enrich.ray import _check_keys, _check_layout, _layout, _root

__all__ = ["SparkJob", "enrich_spark", "prepare_spark"]

#: The column that carries each row's shard between the two stages (dropped from the result).
SHARD_COLUMN = "__enrich_shard"
#: Spark's hash partitioning (`repartition(n, column)`): Murmur3 with this seed, modulo n.
_SPARK_HASH_SEED = 42


def _spark() -> Any:
    try:
        import pyspark.sql
    except ImportError:
        raise UsageError("enrich.spark needs PySpark: pip install 'enrich[spark]'") from None
    return pyspark.sql


def enrich_spark(df: Any, output: Any, **arguments: Any) -> Any:
    """Enrich the rows of the Spark DataFrame `df`; returns a Spark DataFrame (lazy, as Spark's are) with
    `df`'s columns and the columns `enrich()` adds (`_status`, `_error`, `_run_id`, `_interaction_id`,
    the typed outputs). Its rows come grouped by shard, not in `df`'s order: sort on a column to order
    them. The arguments are `prepare_spark`'s.

    It is the recipe, in one call: `prepare_spark` on the driver, then the job's `keyed(df)` grouped by
    its shard column and each group run by `run_shard` (`applyInArrow`; `applyInPandas` with
    `run_shard_pandas` on PySpark 3.5).

    Example::

        out = enrich_spark(spark.read.parquet("s3://bucket/companies/"), {"ceo": "Name of the CEO"},
                           checkpoint="/shared/ceo.enrich", api_keys=["PARALLEL_KEY_1"], processor="base")
        out.write.parquet("s3://bucket/enriched/")
    """
    job = prepare_spark(df, output, **arguments)
    grouped = job.keyed(df).groupBy(job.column)
    if hasattr(grouped, "applyInArrow"):  # (PySpark 4: no trip through pandas, the types kept exactly)
        return grouped.applyInArrow(job.run_shard, job.schema)
    return grouped.applyInPandas(job.run_shard_pandas, job.schema)


def prepare_spark(
    df: Any,
    output: Any,
    *,
    checkpoint: str | os.PathLike[str] | ObjectStore,
    api_keys: Sequence[str] = ("PARALLEL_API_KEY",),
    processor: str = "core",
    shards_count: int | None = None,
    tasks_per_key: int | None = None,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    run_options: Mapping[str, Any] | None = None,
    beta: str | Sequence[str] | None = None,
    mode: str = "group",
    basis: bool = False,
    retry_failed: bool | str | Sequence[str] = False,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
    timeout: float | None = None,
    concurrency: int = 100,
    request_timeout: float = 60.0,
    commit_horizon: float | None = None,
) -> SparkJob:
    """The job of enriching `df` (a Spark DataFrame), prepared on the driver: every argument checked
    before anything is sent, and the shard count fixed in the checkpoint's root manifest. Returns a
    `SparkJob`, the pieces of the recipe::

        job = prepare_spark(df, output, checkpoint="/shared/job.enrich", api_keys=["PARALLEL_API_KEY"])
        out = job.keyed(df).groupBy(job.column).applyInArrow(job.run_shard, job.schema)
        # PySpark 3.5: .applyInPandas(job.run_shard_pandas, job.schema)

    The arguments are `enrich()`'s where they apply, and:

    - `checkpoint`: the job's checkpoint (required), reachable from every executor: a directory, or an
      object-storage URL (`s3://bucket/prefix`) whose credentials each executor reads from its
      environment. Running the
      same job again resumes it: nothing is paid twice, and a finished job sends nothing.
    - `api_keys`: names of environment variables that hold API keys, read on the executors (set them
      there: `spark.executorEnv.NAME`, or the cluster's environment). Shard `s` sends under key
      `s % len(api_keys)`.
    - `shards_count`: the number of shards (and of tasks), a power of two up to 256; default: one per
      32,768 rows (`df.count()` is run to know). It is fixed by the job's first run; another is refused.
    - `tasks_per_key`: how many tasks may run at once on one key. Each task keeps to an equal share of its
      key's budget, `rate_limit / tasks_per_key` requests and `run_rate / tasks_per_key` runs per
      `rate_window` s, so that together they keep to the key's quota (Spark has no shared place for one
      limiter per key, as `enrich.ray` has). Default: the cluster's task slots
      (`defaultParallelism`) or the shards of one key, whichever is fewer: safe however the slots fall on
      the keys, though with several keys and fewer slots than shards a task then uses less than it may.
    - `timeout`: seconds per shard (each shard's call stops after that long; its unfinished rows come
      back `pending`, and the next run collects them).
    """
    keys = _check_keys(api_keys)
    root_at = _root(checkpoint)
    _check_layout(shards_count, rate_limit, run_rate, rate_window)
    if tasks_per_key is not None and (
        isinstance(tasks_per_key, bool) or not isinstance(tasks_per_key, int) or tasks_per_key < 1
    ):
        raise UsageError(f"tasks_per_key must be a whole number, 1 or more, got {tasks_per_key!r}")
    if tasks_per_key is not None and rate_limit / tasks_per_key < 1:
        raise UsageError(
            f"rate_limit / tasks_per_key is {rate_limit / tasks_per_key:g}: each task needs a budget of "
            "one request or more per window (fewer tasks per key, or a longer rate_window)"
        )
    _check_shard_options(basis, retry_failed, timeout, concurrency, request_timeout, commit_horizon)
    _check_choices(processor, mode)
    options = check_run_options(run_options, beta, processor)
    parse_output(output)
    sql = _spark()
    if not isinstance(df, sql.DataFrame):
        raise UsageError(f"prepare_spark takes a pyspark.sql.DataFrame, got {type(df).__name__}")
    from pyspark.sql.pandas.types import to_arrow_schema

    try:
        arrow_in = to_arrow_schema(df.schema)
    except Exception as exc:  # (a Spark type Arrow has no counterpart for)
        raise UsageError(f"the DataFrame's schema has no Arrow form: {exc}") from None
    frame = pl.from_arrow(arrow_in.empty_table())
    assert isinstance(frame, pl.DataFrame)
    if SHARD_COLUMN in frame.columns:
        raise UsageError(
            f"the DataFrame has a column named {SHARD_COLUMN!r}, which enrich.spark uses: rename it"
        )
    arguments: dict[str, Any] = {
        "columns": columns,
        "prompt": prompt,
        "input_schema": input_schema,
        "metadata": metadata,
        "processor": processor,
        "mode": mode,
    }
    job = _checked_job(frame.schema, output, options=options, **arguments)  # (every bad argument refused)
    # The result's columns: those of the empty result `enrich()` gives for a frame of `df`'s schema.
    empty = _join(_prepare(frame, output, options=options, **arguments), None, basis=basis)
    # (its Spark types first, and their Arrow form from them: Spark takes back exactly that form.)
    spark_schema = _spark_schema(df.schema, empty.to_arrow().schema)
    result = to_arrow_schema(spark_schema)
    svc = _service_name(service, None, base_url)
    root = Checkpoint.open(root_at, job.fingerprint, service=svc)
    try:
        count = _layout(root, df, shards_count)
    finally:
        root.close()
    if tasks_per_key is None:
        slots = df.sparkSession.sparkContext.defaultParallelism
        tasks_per_key = max(1, min(slots, math.ceil(count / len(keys))))
        if rate_limit / tasks_per_key < 1:
            raise UsageError(
                f"rate_limit {rate_limit} split between {tasks_per_key} tasks per key is under one request "
                "per window: give tasks_per_key= (fewer), or a longer rate_window"
            )
    return SparkJob(
        output=output,
        job=job,
        root=root_at,
        count=count,
        keys=keys,
        tasks_per_key=tasks_per_key,
        budgets=(rate_limit, run_rate, rate_window),
        options={
            **arguments,
            "run_options": run_options,
            "beta": beta,
            "basis": basis,
            "retry_failed": retry_failed,
            "base_url": base_url,
            "service": service,
            "timeout": timeout,
            "concurrency": concurrency,
            "request_timeout": request_timeout,
            "commit_horizon": commit_horizon,
        },
        input_schema=arrow_in,
        result_schema=result,
        spark_schema=spark_schema,
    )


class SparkJob:
    """A job prepared on the driver by `prepare_spark`: what the recipe needs, and nothing secret (it is
    pickled to the executors; the API keys are read there, from the variables `api_keys` names).

    - `keyed(df)`: `df` with the shard column `column`, one Spark partition per shard.
    - `run_shard` / `run_shard_pandas`: one shard's rows enriched, for `applyInArrow` / `applyInPandas`.
    - `schema`: the result's Spark schema (`df`'s columns and the columns `enrich()` adds).
    - `shards_count`, `tasks_per_key`: the job's shard count, and the tasks its budget is split between.
    """

    column = SHARD_COLUMN

    def __init__(
        self,
        *,
        output: Any,
        job: _Job,
        root: str | ObjectStore,
        count: int,
        keys: list[str],
        tasks_per_key: int,
        budgets: tuple[float, float, float],
        options: dict[str, Any],
        input_schema: pa.Schema,
        result_schema: pa.Schema,
        spark_schema: Any,
    ) -> None:
        self.output, self._job, self.root, self.shards_count = output, job, root, count
        self.keys, self.tasks_per_key, self.budgets, self.options = keys, tasks_per_key, budgets, options
        self.input_schema, self.result_schema, self.schema = input_schema, result_schema, spark_schema
        #: The value of the shard column for each shard: the shard's number plus a multiple of the shard
        #: count, chosen so that Spark's hash partitioning puts each shard in a partition of its own.
        self.routes = [_route(s, count) for s in range(count)]

    def keyed(self, df: Any) -> Any:
        """`df` (of the schema the job was prepared for) with the shard column: each row keyed as
        `enrich()` keys it (`mapInArrow`), then repartitioned so that each shard is one partition (one
        task, so the shards run in parallel however small the table; Spark's adaptive execution does not
        coalesce a repartition by count)."""
        from pyspark.sql.types import IntegerType, StructField, StructType

        schema = StructType([*df.schema.fields, StructField(SHARD_COLUMN, IntegerType(), False)])
        return df.mapInArrow(self._key_batches, schema).repartition(self.shards_count, SHARD_COLUMN)

    def _key_batches(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        routes = pl.Series(self.routes, dtype=pl.Int32)
        field = pa.field(SHARD_COLUMN, pa.int32(), nullable=False)
        for batch in batches:
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            keys, _, _ = self._job.keyed(frame, options=self._job.option_texts(frame))
            series = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
            route = routes.gather(shards.shard_of(series, self.shards_count))
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, route.to_arrow()], schema=batch.schema.append(field)
            )

    @property
    def run_shard(self) -> Callable[[pa.Table], pa.Table]:
        """For `applyInArrow`: one shard's rows (with the shard column) enriched by `aenrich_shard` in the
        shard's checkpoint area, under its key and its share of the key's budget. A task that runs it
        again (Spark's retry) resumes the shard from its area: nothing is paid twice.

        (A function of one argument, not a bound method: Spark counts a method's `self` as the argument
        that takes the group's key.)"""

        def run_shard(table: pa.Table) -> pa.Table:
            return self._run_shard(table)

        return run_shard

    @property
    def run_shard_pandas(self) -> Callable[[Any], Any]:
        """For `applyInPandas` (PySpark 3.5, which has no `applyInArrow`): `run_shard` of a pandas frame."""

        def run_shard_pandas(frame: Any) -> Any:
            table = pa.Table.from_pandas(
                frame,
                schema=self.input_schema.append(pa.field(SHARD_COLUMN, pa.int32(), nullable=False)),
                preserve_index=False,
            )
            return self._run_shard(table).to_pandas()

        return run_shard_pandas

    def _run_shard(self, table: pa.Table) -> pa.Table:
        if not table.num_rows:
            return self.result_schema.empty_table()
        shard = table.column(SHARD_COLUMN)[0].as_py() % self.shards_count
        name = self.keys[shard % len(self.keys)]
        api_key = os.environ.get(name)
        if not api_key:
            raise UsageError(f"the environment variable {name} (api_keys) is not set on this executor")
        area: str | ObjectStore = self.root
        if self.shards_count > 1:
            name, root = shards.area_name(shard), self.root
            area = root.child(name) if isinstance(root, ObjectStore) else os.path.join(root, name)
        frame = pl.from_arrow(table.drop_columns([SHARD_COLUMN]))
        assert isinstance(frame, pl.DataFrame)
        requests, runs, window = self.budgets
        # This worker's last limiter on the key goes on (see `_HAND_OVER`).
        slot = _HAND_OVER.setdefault(hashlib.sha256(api_key.encode()).hexdigest()[:16], [None])
        out = asyncio.run(
            aenrich_shard(
                frame,
                self.output,
                checkpoint=area,
                api_key=api_key,
                progress=False,
                rate_limit=requests / self.tasks_per_key,
                run_rate=runs / self.tasks_per_key,
                rate_window=window,
                _hand_over=slot,
                **self.options,
            )
        ).to_arrow()
        # Exactly the declared types: the input's columns as given (polars would widen string to
        # large_string, say), and the added ones as Spark knows them.
        return pa.Table.from_arrays(
            [out.column(f.name).cast(f.type) for f in self.result_schema], schema=self.result_schema
        )


#: The limiter of the last task run in this Python worker on each key (by a hash of the key: never its
#: value). Spark runs a slot's tasks one after another in one Python worker, and a task that follows
#: another on the key goes on with that task's limiter: its last window, which the service still counts,
#: its pause and what it learned of the quota. A fresh one would burst a full share on top of them
#: (measured in the kill test, 2 tasks a key on 2 slots: 28 and 33 of 217 and 210 requests were 429s).
#: One entry per key, replaced by each task.
_HAND_OVER: dict[str, list[Any]] = {}


def _check_shard_options(
    basis: Any, retry_failed: Any, timeout: Any, concurrency: Any, request_timeout: Any, horizon: Any
) -> None:
    """What each shard's call checks, checked once on the driver: a bad value would otherwise fail every
    task, on the executors."""
    if not isinstance(basis, bool):
        raise UsageError(f"basis must be True or False, got {basis!r}")
    retry_statuses(retry_failed)
    if timeout is not None and not (_number(timeout) and timeout > 0):
        raise UsageError("timeout must be a positive number of seconds (or None for no limit)")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"concurrency must be a whole number of 1 or more, got {concurrency!r}")
    if not (_number(request_timeout) and request_timeout > 0):
        raise UsageError("request_timeout must be a positive number of seconds")
    if horizon is not None and not (_number(horizon) and horizon >= 0 and math.isfinite(horizon)):
        raise UsageError(
            "commit_horizon must be a number of seconds of 0 or more (None: twice request_timeout)"
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _spark_schema(given: Any, result: pa.Schema) -> Any:
    """The result's Spark schema: the input's columns with their own Spark types, the added ones from
    their Arrow types."""
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import StructField, StructType

    fields = {f.name: f for f in given.fields}
    return StructType(
        [fields.get(f.name) or StructField(f.name, from_arrow_type(f.type), True) for f in result]
    )


def _route(shard: int, count: int) -> int:
    """The least `shard + k * count` that Spark's `repartition(count, column)` puts in partition `shard`
    (its hash partitioning: Murmur3 of the int with seed 42, modulo `count`). Only the spread depends
    on it: `shard` is the value modulo `count` whatever Spark does."""
    value = shard
    while _murmur3_int(value, _SPARK_HASH_SEED) % count != shard:
        value += count
    return value


def _murmur3_int(value: int, seed: int) -> int:
    """Spark's `Murmur3_x86_32.hashInt`, as a signed 32-bit int."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    k1 = (value & mask) * 0xCC9E2D51 & mask
    k1 = rotl(k1, 15) * 0x1B873593 & mask
    h1 = seed ^ k1
    h1 = (rotl(h1, 13) * 5 + 0xE6546B64) & mask
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & mask
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & mask
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1
