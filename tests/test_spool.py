"""A table read in batches (a LazyFrame; `enrich run` scans its input files): keyed a batch at a time and
set aside on disk by key, each shard read back alone. Small tables are spooled here by shrinking
`spool.STREAM_ROWS` and `spool.BATCH_ROWS`; the result must be the one the whole frame gives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import Emulator, EmulatorConfig, UsageError, create_app
from enrich._cli import main
from enrich._engine import JobStats, aenrich, plan, spool
from enrich._engine.prepare import cache_dir
from enrich._io import read_tables, scan_tables

SERVICE = "a custom transport at http://emulator"
OUT = {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")}


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "STREAM_ROWS", 20)
    monkeypatch.setattr(spool, "BATCH_ROWS", 7)


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "company": [f"Company {i}" for i in range(n)],
            "city": [None if i % 5 == 0 else f"c{i % 7}" for i in range(n)],
            "employees": [i * 10 for i in range(n)],
        }
    )


def run_job(app: Any, data: Any, output: Any = OUT, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    kw.setdefault("_shard_rows", 8)
    return asyncio.run(
        aenrich(data, output, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def leftovers(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if p.name.startswith((".enrich-", "enrich-"))]


def test_a_lazy_table_gives_the_frames_result_and_pays_once_per_distinct_input(tmp_path: Path) -> None:
    df = pl.concat([companies(60), companies(60).head(9), companies(60).slice(30, 4)])  # 13 repeats
    whole_app, app = create_app(EmulatorConfig(latency=0.02)), create_app(EmulatorConfig(latency=0.02))
    whole = run_job(whole_app, df, checkpoint=tmp_path / "whole")
    stats = JobStats()
    lazy = run_job(app, df.lazy(), checkpoint=tmp_path / "lazy", stats=stats)
    assert isinstance(lazy, pl.DataFrame)
    assert lazy.drop("_run_id", "_interaction_id").equals(whole.drop("_run_id", "_interaction_id"))
    assert lazy.select(df.columns).equals(df)  # every input value as given, in the input's order
    assert app.stats()["runs_created"] == 60 == stats.distinct and stats.rows == 73
    manifest = json.loads((tmp_path / "lazy" / "manifest.json").read_text())
    assert manifest["shards"] == 16  # (split by its 73 rows: a spooled shard holds its repeats)
    # A repeated row got its first occurrence's run.
    assert lazy["_run_id"][60:69].to_list() == lazy["_run_id"][:9].to_list()
    assert not leftovers(tmp_path)


def test_a_parquet_scan_is_read_a_slice_at_a_time_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """polars' streaming reader of Parquet reads row groups ahead of a slow consumer (a 10M-row input
    held 850-950 MB at once): a plain scan is read by slices instead. Anything more goes the other way."""
    df = pl.concat([companies(60), companies(60).head(9)])
    source = tmp_path / "in.parquet"
    df.write_parquet(source, row_group_size=16)  # (row groups cut across the slices)
    streamed: list[str] = []
    collect_batches = pl.LazyFrame.collect_batches

    def spy(self: pl.LazyFrame, *args: Any, **kw: Any) -> Any:
        streamed.append(self.explain())
        return collect_batches(self, *args, **kw)

    monkeypatch.setattr(pl.LazyFrame, "collect_batches", spy)
    whole = run_job(create_app(EmulatorConfig(latency=0.02)), df, checkpoint=tmp_path / "whole")
    app = create_app(EmulatorConfig(latency=0.02))
    lazy = run_job(app, pl.scan_parquet(source), checkpoint=tmp_path / "lazy")
    assert streamed == []  # read by slices
    assert lazy.drop("_run_id", "_interaction_id").equals(whole.drop("_run_id", "_interaction_id"))
    assert lazy.select(df.columns).equals(df) and app.stats()["runs_created"] == 60
    # A filter pushed into the scan would make each slice read from the start: streamed instead.
    small = run_job(app, pl.scan_parquet(source).filter(pl.col("employees") < 300), checkpoint=tmp_path / "f")
    assert len(streamed) == 1 and small.height == 39 and app.stats()["runs_created"] == 60 + 30
    assert not leftovers(tmp_path)


def test_a_lazy_table_written_to_a_file_resumes_from_a_frames_checkpoint(tmp_path: Path) -> None:
    df = companies(50)
    app = create_app(EmulatorConfig(latency=0.02))
    first = run_job(app, df.head(30), checkpoint=tmp_path / "cp")  # 30 rows, in memory: one area
    assert app.stats()["runs_created"] == 30
    out = tmp_path / "out.csv"
    assert run_job(app, df.lazy(), checkpoint=tmp_path / "cp", write_to=out) is None
    assert app.stats()["runs_created"] == 50  # the 30 kept, 20 new
    written = pl.read_csv(out, infer_schema=False)
    assert written["company"].to_list() == df["company"].cast(pl.String).to_list()
    assert written["city"].to_list() == df["city"].to_list()
    assert written["_run_id"].head(30).to_list() == first["_run_id"].to_list()
    assert set(written["_status"]) == {"completed"}
    assert not leftovers(tmp_path)


def test_the_dry_run_of_a_lazy_table_counts_what_each_shard_has_done(tmp_path: Path) -> None:
    df = companies(60)
    app = create_app(EmulatorConfig(latency=0.02))
    run_job(app, df.head(40).lazy(), checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 40
    estimate = plan(df.lazy(), OUT, processor="lite", checkpoint=tmp_path / "cp", service=SERVICE)
    assert (estimate.rows, estimate.distinct, estimate.done, estimate.to_submit) == (60, 60, 40, 20)
    assert estimate.spent == pytest.approx(40 * 0.005)
    assert not leftovers(tmp_path)


def test_a_lazy_tables_default_checkpoint_is_the_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default checkpoint is named by the distinct inputs: the same table, read whole or in batches,
    is the same job."""
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(tmp_path / "cache"))
    df = companies(45)
    app = create_app(EmulatorConfig(latency=0.02))
    stats = JobStats()
    run_job(app, df.lazy(), checkpoint=None, stats=stats)
    again = JobStats()
    run_job(app, df, checkpoint=None, stats=again)
    assert (
        stats.checkpoint == again.checkpoint and Path(stats.checkpoint).parent == cache_dir() / "checkpoints"
    )
    assert app.stats()["runs_created"] == 45 and again.already_done == 45


def test_rows_the_api_would_refuse_are_refused_in_every_batch(tmp_path: Path) -> None:
    df = companies(40).with_columns(
        pl.when(pl.int_range(pl.len()) % 9 == 4)
        .then(pl.lit("x" * 30_000))
        .otherwise(pl.col("company"))
        .alias("company")
    )
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}  # (a null city fails it)
    app = create_app(EmulatorConfig(latency=0.02))
    estimate = plan(df.lazy(), OUT, processor="lite", input_schema=schema, checkpoint=tmp_path / "cp")
    too_big = pl.int_range(40, eager=True) % 9 == 4
    refused = int((too_big | df["city"].is_null()).sum())
    assert too_big.sum() and df["city"].null_count() and estimate.refused == refused
    result = run_job(app, df.lazy(), checkpoint=tmp_path / "cp", input_schema=schema)
    assert (result["_status"] == "failed").sum() == refused
    assert app.stats()["runs_created"] == 40 - refused
    # Counted again shard by shard, as the dry run reads each shard's files against its checkpoint.
    again = plan(
        pl.concat([df, companies(48).tail(8)]).lazy(),
        OUT,
        processor="lite",
        input_schema=schema,
        checkpoint=tmp_path / "cp",
        service=SERVICE,
    )
    more = int(companies(48).tail(8)["city"].is_null().sum())
    assert (again.rows, again.distinct, again.refused) == (48, 48, refused + more)
    assert (again.done, again.to_submit) == (40 - refused, 8 - more)


def test_a_bad_cell_in_a_later_batch_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    df = companies(40).with_columns(pl.col("employees").cast(pl.String))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 33).then(None).otherwise(pl.col("employees")))
    app = create_app(EmulatorConfig(latency=0.02))
    with pytest.raises(UsageError, match="employees"):
        run_job(app, df.lazy(), prompt="{employees:>5d} at {company}", checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 0 == app.stats()["groups_created"]
    assert not leftovers(tmp_path)


def spy_spools(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    made: list[Path] = []
    real = spool.Spool.__init__

    def spy(self: spool.Spool, *a: Any, **kw: Any) -> None:
        real(self, *a, **kw)
        made.append(self.directory)

    monkeypatch.setattr(spool.Spool, "__init__", spy)
    return made


def test_a_table_of_few_rows_is_prepared_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = spy_spools(monkeypatch)
    app = create_app(EmulatorConfig(latency=0.02))
    result = run_job(app, companies(20).lazy(), checkpoint=tmp_path / "cp")
    assert result.height == 20 and not made
    run_job(app, companies(21).lazy(), checkpoint=tmp_path / "cp2")
    assert len(made) == 1 and not made[0].exists()


def test_enrich_run_reads_its_files_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = spy_spools(monkeypatch)
    emu = Emulator(api_key="test-key", latency=0.02).__enter__()
    monkeypatch.setenv("PARALLEL_API_KEY", "test-key")
    df = companies(70).with_columns(pl.col("employees").cast(pl.String))
    df = pl.concat([df, df.head(6)])
    df.head(30).write_csv(tmp_path / "a.csv")
    df.slice(30).write_csv(tmp_path / "b.csv")
    out = tmp_path / "out.parquet"
    args = ["run", str(tmp_path / "*.csv"), "-o", str(out), "--field", "ceo=Name of the CEO"]
    args += ["--processor", "lite", "--no-progress", "--base-url", emu.url]
    assert main(args) == 0
    written = pl.read_parquet(out)
    assert written.select(df.columns).equals(df)
    assert emu.stats()["runs_created"] == 70
    assert len(made) == 1 and not made[0].exists()  # the table was spooled, and the spool removed
    assert main([*args, "--dry-run"]) == 0
    assert main(args) == 0
    assert emu.stats()["runs_created"] == 70
    assert pl.read_parquet(out).equals(written)
    assert not leftovers(tmp_path)
    emu.__exit__(None, None, None)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_scanned_files_give_the_values_read_files_give(tmp_path: Path, fmt: str) -> None:
    a = pl.DataFrame({"zip": ["02134", None, ""], "n": ["1.10", "2", None], "x": [None, None, None]})
    b = pl.DataFrame({"zip": ["99"], "n": ["3"], "x": ["set"]})
    for name, frame in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            frame.write_csv(path)
        elif fmt == "parquet":
            frame.write_parquet(path)
        else:
            frame.write_ndjson(path)
    files = [str(tmp_path / f"a.{fmt}"), str(tmp_path / f"b.{fmt}")]
    scanned = scan_tables(files)
    assert scanned is not None
    assert scanned.collect().equals(read_tables(files))
    assert scan_tables([*files, "-"]) is None  # stdin is read whole


def test_scanned_files_are_refused_as_read_files_are(tmp_path: Path) -> None:
    pl.DataFrame({"a": ["1"], "b": ["2"]}).write_csv(tmp_path / "one.csv")
    pl.DataFrame({"b": ["1"], "a": ["2"]}).write_csv(tmp_path / "two.csv")
    (tmp_path / "dup.csv").write_text("a,a\n1,2\n")
    with pytest.raises(UsageError, match="same columns in another order"):
        scan_tables([tmp_path / "one.csv", tmp_path / "two.csv"])
    with pytest.raises(UsageError, match="more than once"):
        scan_tables([tmp_path / "dup.csv"])
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="cannot read it as parquet"):
        scan_tables([tmp_path / "bad.parquet"])


def test_a_categorical_column_is_spooled_and_comes_back_as_given(tmp_path: Path) -> None:
    """Each batch of a categorical column has its own Arrow dictionary: the spool's files must take them."""
    df = companies(50).with_columns(
        pl.col("city").cast(pl.Categorical),
        pl.concat_list("city", pl.lit("x")).cast(pl.List(pl.Categorical)).alias("cities"),
    )
    whole = run_job(create_app(EmulatorConfig(latency=0.02)), df, checkpoint=tmp_path / "whole")
    lazy = run_job(create_app(EmulatorConfig(latency=0.02)), df.lazy(), checkpoint=tmp_path / "lazy")
    assert lazy.select(df.columns).equals(df)
    assert lazy.drop("_run_id", "_interaction_id").equals(whole.drop("_run_id", "_interaction_id"))
    assert not leftovers(tmp_path)


def test_a_bad_cell_in_a_later_batch_is_named_by_its_row_in_the_table(tmp_path: Path) -> None:
    df = pl.DataFrame({"company": [f"c{i}" for i in range(40)], "n": [None] * 33 + ["x"] + [None] * 6})
    app = create_app(EmulatorConfig(latency=0.02))
    for data in (df, df.lazy()):
        with pytest.raises(UsageError, match="fails at row 33 on 'x'"):
            run_job(app, data, prompt="{company} {n:d}", checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 0
    assert not leftovers(tmp_path)


def test_a_column_named_as_the_spools_own_is_refused(tmp_path: Path) -> None:
    df = companies(40).with_columns(pl.col("company").alias(spool._KEY))
    with pytest.raises(UsageError, match="__enrich_key"):
        run_job(create_app(EmulatorConfig()), df.lazy(), checkpoint=tmp_path / "cp", columns=["company"])
    assert not leftovers(tmp_path)


def test_a_full_disk_while_spooling_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pyarrow as pa

    from enrich import OutputError

    real = pa.OSFile

    def full(path: str, mode: str = "rb") -> Any:
        if ".enrich-spool-" in path and mode == "wb":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)

    monkeypatch.setattr(pa, "OSFile", full)
    app = create_app(EmulatorConfig())
    with pytest.raises(OutputError, match="No space left on device; nothing was sent"):
        run_job(app, companies(40).lazy(), checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 0
    assert not leftovers(tmp_path)


def test_a_spooled_table_of_few_distinct_inputs_is_split_by_its_rows(tmp_path: Path) -> None:
    """A spooled shard's frame holds its rows, repeats included: a table of many rows and few distinct
    inputs is split as its rows ask, not as one shard holding the whole table."""
    df = pl.concat([companies(12)] * 6)
    app = create_app(EmulatorConfig(latency=0.02))
    result = run_job(app, df.lazy(), checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 12
    assert json.loads((tmp_path / "cp" / "manifest.json").read_text())["shards"] == 16  # 72 rows, 8 a shard
    assert result.select(df.columns).equals(df)
    assert result["_run_id"].to_list() == result["_run_id"].head(12).to_list() * 6
