"""A job on a local Spark (`local[2,4]`: two task slots, a failed task tried up to four times) against the
emulator over HTTP (`enrich.spark`): a task's Python worker killed mid-shard and retried by Spark, the
static split of a key's budget, the layout fixed by the first run.

PySpark (the `spark` extra) needs a JVM and takes a few seconds to start, so these tests run only when
asked: `ENRICH_SPARK=1 pytest -m spark tests/test_spark.py`. The refusals of bad arguments are plain
Python, checked before PySpark is imported: they run in every suite."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from enrich import Emulator, UsageError
from enrich.spark import _murmur3_int, _route, enrich_spark, prepare_spark

KEYS = {"ENRICH_TEST_SPARK_KEY_A": "spark-key-a", "ENRICH_TEST_SPARK_KEY_B": "spark-key-b"}
FIELDS = {"summary": "One-line summary of the company"}

spark_only = [
    pytest.mark.spark,
    pytest.mark.skipif(os.environ.get("ENRICH_SPARK") != "1", reason="Spark tests run with ENRICH_SPARK=1"),
    # PySpark warns that it does not fully support pandas 3, and of its own deprecations: not ours.
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def spark() -> Any:
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    # The executors' Python is this one, and they read their keys from the environment they start with.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.update(KEYS)
    session = (
        SparkSession.builder.master("local[2,4]")
        .appName("enrich-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("FATAL")  # (the killed worker's task is logged at length otherwise)
    try:
        yield session
    finally:
        session.stop()


def companies(rows: int, distinct: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i % distinct:05d}" for i in range(rows)], "row": range(rows)})


def key_id(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def collect(df: Any) -> pl.DataFrame:
    frame = pl.from_arrow(df.toArrow())
    assert isinstance(frame, pl.DataFrame)
    return frame.sort("row")


def _spark(test: Any) -> Any:
    """`spark_only`'s marks on `test`."""
    for mark in reversed(spark_only):
        test = mark(test)
    return test


@_spark
def test_a_task_killed_mid_shard_is_retried_and_costs_no_run_twice(spark: Any, tmp_path: Path) -> None:
    rows, distinct, window = 4_000, 2_500, 2.0
    df = spark.createDataFrame(companies(rows, distinct).to_pandas())
    pids = tmp_path / "running"  # a file per Python worker running a shard, named by its pid
    pids.mkdir()
    killed: list[int] = []
    args: dict[str, Any] = {
        "checkpoint": tmp_path / "job.enrich",
        "api_keys": ["ENRICH_TEST_SPARK_KEY_A"],
        "columns": ["company"],  # (not `row`: 2,500 distinct inputs in 4,000 rows)
        "processor": "lite-fast",
        "rate_limit": 200,
        "run_rate": 200,
        "rate_window": window,
    }
    with Emulator(latency=0.5, api_key=None, run_rate_limit=200, rate_limit=200, rate_window=window) as emu:
        args["base_url"] = emu.url

        def kill_one_mid_job() -> None:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and emu.stats()["runs_created"] < 500:
                time.sleep(0.05)
            running = [int(p.name) for p in pids.iterdir()]
            if running and emu.stats()["runs_created"] < distinct:
                os.kill(running[0], signal.SIGKILL)
                killed.append(running[0])

        job = prepare_spark(df, FIELDS, shards_count=8, **args)
        assert job.tasks_per_key == 2  # (two task slots, eight shards on one key)
        run = job.run_shard

        def run_shard(table: Any) -> Any:  # the recipe's function, marked while it runs
            mark = pids / str(os.getpid())
            mark.touch()
            out = run(table)
            mark.unlink()  # (not when killed: a killed worker's mark stays, and is not killed twice)
            return out

        killer = threading.Thread(target=kill_one_mid_job, daemon=True)
        killer.start()
        out = collect(job.keyed(df).groupBy(job.column).applyInArrow(run_shard, job.schema))
        killer.join()
        stats = emu.stats()
        assert killed, "no shard's worker was running once 500 runs were created"
        assert out.height == rows and out["row"].to_list() == list(range(rows))
        assert out["_status"].value_counts().to_dicts() == [{"_status": "completed", "count": rows}]
        # Exactly one run per distinct input, in spite of the worker killed mid-shard.
        assert stats["runs_created"] == distinct and stats["max_runs_per_distinct"] == 1
        # Every row has its own answer: the emulator's text answers start with the input they answer.
        assert (out["summary"].str.starts_with(out["company"] + ":")).all()
        # The key's budget split between the two tasks kept the job within the key's quota, hand-overs
        # included: a task that follows another in a Python worker goes on with that task's limiter
        # (a fresh limiter's burst on top of its last window drew 28 and 33 429s in 217 and 210
        # requests). Measured since: 0 of 142 (a worker started after the kill has no limiter to adopt).
        spent = stats["per_key"][key_id(KEYS["ENRICH_TEST_SPARK_KEY_A"])]
        assert spent["rate_limited"] <= 0.05 * spent["requests"], spent
        # The same call again (the one-call form): resumed from the checkpoint, nothing created.
        again = collect(enrich_spark(df, FIELDS, **args))
        assert emu.stats()["runs_created"] == distinct
        assert again.select("row", "company", "summary", "_run_id").equals(
            out.select("row", "company", "summary", "_run_id")
        )
        # The pandas form of the recipe (PySpark 3.5's) gives the same rows.
        job = prepare_spark(df, FIELDS, **args)
        by_pandas = collect(job.keyed(df).groupBy(job.column).applyInPandas(job.run_shard_pandas, job.schema))
        assert by_pandas.select(out.columns).equals(out)
        assert emu.stats()["runs_created"] == distinct
        # A different shard count for the same checkpoint is refused before anything runs.
        with pytest.raises(UsageError, match="laid out in 8 shard"):
            prepare_spark(df, FIELDS, **{**args, "shards_count": 4})


@_spark
def test_two_keys_split_the_shards_and_each_shard_is_a_partition(spark: Any, tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    rows = 1_000
    df = spark.createDataFrame(companies(rows, rows).to_pandas())
    with Emulator(latency=0.2, api_key=None) as emu:
        job = prepare_spark(
            df,
            FIELDS,
            checkpoint=tmp_path / "two.enrich",
            api_keys=list(KEYS),
            columns=["company"],
            processor="lite-fast",
            base_url=emu.url,
            shards_count=4,
            tasks_per_key=1,
        )
        keyed = job.keyed(df).withColumn("partition", F.spark_partition_id())
        placed = keyed.groupBy(job.column, "partition").count().collect()
        assert sorted(r["partition"] for r in placed) == [0, 1, 2, 3]  # one shard per partition
        assert sorted(r[job.column] % 4 for r in placed) == [0, 1, 2, 3]
        out = collect(job.keyed(df).groupBy(job.column).applyInArrow(job.run_shard, job.schema))
        stats = emu.stats()
    assert (out["_status"] == "completed").all() and stats["runs_created"] == rows
    assert set(stats["per_key"]) == {key_id(v) for v in KEYS.values()}
    # Spark's own hash of an int, as `_route` computes it for the shard column's values.
    values = [-(2**31), -7, 0, 1, 42, 255, 2**31 - 1]
    hashed = spark.createDataFrame([(v,) for v in values], "v int").select("v", F.hash("v").alias("h"))
    assert {r["v"]: r["h"] for r in hashed.collect()} == {v: _murmur3_int(v, 42) for v in values}


def test_bad_arguments_are_refused_before_anything(tmp_path: Path) -> None:
    """Plain Python, before PySpark is imported: these run without it."""
    c = tmp_path / "c"
    with pytest.raises(UsageError, match="not keys"):
        prepare_spark(None, FIELDS, checkpoint=c, api_keys=["sk-live-123"])
    with pytest.raises(UsageError, match="same variable twice"):
        prepare_spark(None, FIELDS, checkpoint=c, api_keys=["K", "K"])
    with pytest.raises(UsageError, match="power of two"):
        prepare_spark(None, FIELDS, checkpoint=c, shards_count=3)
    with pytest.raises(UsageError, match="tasks_per_key must be"):
        prepare_spark(None, FIELDS, checkpoint=c, tasks_per_key=0)
    with pytest.raises(UsageError, match="one request or more"):
        prepare_spark(None, FIELDS, checkpoint=c, rate_limit=10, tasks_per_key=20)
    with pytest.raises(UsageError, match="a URL must be object storage"):
        prepare_spark(None, FIELDS, checkpoint="ftp://host/job")
    with pytest.raises(UsageError, match="every worker can reach"):
        prepare_spark(None, FIELDS, checkpoint="")
    with pytest.raises(UsageError, match="unknown processor"):
        prepare_spark(None, FIELDS, checkpoint=c, processor="nope")
    with pytest.raises(UsageError, match="concurrency"):
        prepare_spark(None, FIELDS, checkpoint=c, concurrency=0)
    with pytest.raises(UsageError, match="run_rate"):
        prepare_spark(None, FIELDS, checkpoint=c, run_rate=-1)
    with pytest.raises(UsageError):
        prepare_spark(None, {}, checkpoint=c)  # (no output field)
    # Every argument good: then PySpark is needed, and the table must be a Spark DataFrame.
    with pytest.raises(UsageError, match=r"pip install 'enrich\[spark\]'|pyspark\.sql\.DataFrame"):
        prepare_spark(pl.DataFrame({"company": ["A"]}), FIELDS, checkpoint=c)
    assert not c.exists()


def test_each_shard_has_a_value_spark_puts_in_its_own_partition() -> None:
    for count in (1, 2, 8, 256):
        routes = [_route(s, count) for s in range(count)]
        assert [r % count for r in routes] == list(range(count))
        assert [_murmur3_int(r, 42) % count for r in routes] == list(range(count))
    # Spark's hash of these ints (`SELECT hash(CAST(v AS INT))`, Spark 4.3).
    assert [_murmur3_int(v, 42) for v in (0, 1, 42)] == [933211791, -559580957, 29417773]
