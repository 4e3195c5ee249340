"""The pilot (`enrich(pilot=N)`, `enrich run --pilot N`): a seeded sample of the job's distinct inputs runs
first, is measured (statuses, the service's warnings, fields that came back empty or mistyped, run times by
the service's clock, cost) and the rest projected; the report is kept in the checkpoint, and the next call
goes on with the whole job without paying again for the pilot's runs.

Against the emulator in-process (frames, pandas, Arrow, spooled LazyFrames, shards) and over HTTP for the
command line. Every latency is small: the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fakes import Tap, sse

from enrich import (
    Emulator,
    EmulatorConfig,
    JobStats,
    Pilot,
    PilotReport,
    UsageError,
    aenrich_shard,
    create_app,
    enrich,
)
from enrich._checkpoint import PILOT, SETTLED, Checkpoint, read_pilot
from enrich._cli import main
from enrich._engine import aenrich, spool
from enrich._engine.pilot import histogram_lines, project, sample_keys
from enrich._engine.prepare import _prepare

CEO = {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")}
#: Seven fields: more than the five the emulator says processor "base" handles well (it warns per run).
SEVEN = {f"fact{i}": f"Fact number {i} about the company" for i in range(7)}
SEVEN_WARNING = "The output schema has 7 fields; processor 'base' handles about 5 well"


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "company": [f"Company {i}" for i in range(n)],
            "city": [None if i % 5 == 0 else f"c{i % 7}" for i in range(n)],
            "employees": [i * 10 for i in range(n)],
        }
    )


def run_job(app: Any, data: Any, output: Any = CEO, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    return asyncio.run(
        aenrich(data, output, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def plan_of(df: pl.DataFrame, output: Any, processor: str = "lite") -> Any:
    return _prepare(
        df,
        output,
        columns=None,
        prompt=None,
        input_schema=None,
        metadata=None,
        processor=processor,
        mode="group",
    )


def sample_of(df: pl.DataFrame, output: Any, n: int, processor: str = "lite") -> list[str]:
    """The pilot's sample worked out independently: the `n` smallest distinct row keys among the inputs
    that are not refused locally."""
    plan = plan_of(df, output, processor)
    return sorted(set(plan.keys) - set(plan.local_errors))[:n]


def keys_by_company(df: pl.DataFrame, output: Any, processor: str = "lite") -> dict[str, str]:
    plan = plan_of(df, output, processor)
    first = df.unique("company", keep="first", maintain_order=True)["company"].to_list()
    return dict(zip(plan.keys, first, strict=True))


def recorded_keys(checkpoint: Path) -> set[str]:
    """The row keys with a run in the checkpoint at `checkpoint`, every shard's."""
    keys: set[str] = set()
    for manifest in checkpoint.rglob("manifest.json"):
        cp = Checkpoint.read(manifest.parent)
        keys |= set(cp.state(outputs=False)["row_key"].to_list())
    return keys


def service_seconds(app: Any, run_ids: list[str]) -> list[float]:
    """How long each run took by the emulator's clock (it ended at `end`, was created at `created`)."""
    runs = app.state.runs
    return [runs[r].end - runs[r].created for r in run_ids]


def manifest_shards(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "manifest.json").read_text()).get("shards", 1))


# -- the pilot, then the job ------------------------------------------------------------------------------


def test_a_pilot_measures_its_sample_and_the_next_call_runs_the_rest_without_paying_twice(
    tmp_path: Path,
) -> None:
    n, latency = 8, 0.05
    base = companies(30)
    by_key = keys_by_company(base, SEVEN, "base")
    sampled = [by_key[k] for k in sample_of(base, SEVEN, n, "base")]
    # Two of the sampled inputs appear again further down, and one that is not sampled.
    unsampled = next(c for c in base["company"] if c not in sampled)
    repeats = base.filter(pl.col("company").is_in([*sampled[:2], unsampled]))
    df = pl.concat([base, repeats])
    app = create_app(EmulatorConfig(latency=latency, failure_rate=0.3, seed=3))
    cp = tmp_path / "cp"

    def call(stats: JobStats) -> Any:
        return enrich(
            df,
            SEVEN,
            processor="base",
            checkpoint=cp,
            pilot=n,
            stats=stats,
            api_key="k",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            progress=False,
        )

    stats = JobStats()
    pilot = call(stats)
    assert isinstance(pilot, Pilot)
    report = pilot.report
    assert app.stats()["runs_created"] == n
    # Its frame: exactly the rows of the sample, repeats included, in the table's order, values as given.
    frame = pilot.frame
    assert isinstance(frame, pl.DataFrame)
    assert frame.select(df.columns).equals(df.filter(pl.col("company").is_in(sampled)))
    assert frame.height == n + 2 == report.rows
    assert frame["_run_id"].n_unique() == n
    # Statuses: one per run, as the frame has them, failures included.
    runs = frame.unique("_run_id", keep="first")
    assert report.sample == n and report.runs == n and sum(report.statuses.values()) == n
    assert report.statuses == dict(runs["_status"].value_counts().iter_rows())
    assert report.statuses.get("failed", 0) >= 1 and report.completed >= 1
    # The service's warning on every run, counted once per run.
    [(message, count)] = report.warnings.items()
    assert message.startswith(SEVEN_WARNING) and count == n
    # Run times by the service's clock: one per run, each the emulator's own duration of it.
    assert len(report.latencies) == n
    assert sorted(report.latencies) == pytest.approx(
        sorted(service_seconds(app, runs["_run_id"].to_list())), abs=1e-5
    )
    assert all(0 < s <= 1.5 * latency + 1e-3 for s in report.latencies)
    completed = runs.filter(pl.col("_status") == "completed")["_run_id"].to_list()
    assert all(s >= 0.5 * latency - 1e-3 for s in service_seconds(app, completed))
    # The projection of the rest: the other distinct inputs, at base's $0.01 a run.
    assert report.rest_runs == 30 - n
    assert report.price_per_run == pytest.approx(0.01)
    assert report.cost == pytest.approx(n * 0.01) and report.rest_cost == pytest.approx((30 - n) * 0.01)
    assert report.rest_seconds is not None and report.rest_seconds >= max(report.latencies)
    assert (report.processor, report.mode) == ("base", "group")
    assert stats.pilot == report
    assert PilotReport.from_dict(json.loads((cp / PILOT).read_text())) == report

    # The same call again: the whole job, the pilot's runs kept (never paid twice), its report kept.
    stats = JobStats()
    whole = call(stats)
    assert isinstance(whole, pl.DataFrame)
    assert whole.select(df.columns).equals(df)
    assert app.stats()["runs_created"] == 30 == stats.runs_total and stats.runs_now == 30 - n
    assert stats.pilot == report
    joined = whole.filter(pl.col("company").is_in(sampled)).select("company", "_run_id", "_status")
    assert joined.equals(frame.select("company", "_run_id", "_status"))
    assert set(whole["_status"]) <= {"completed", "failed"} and whole["_run_id"].null_count() == 0

    # And a third time: nothing is sent.
    stats = JobStats()
    again = call(stats)
    assert app.stats()["runs_created"] == 30 and stats.runs_now == 0
    assert again.equals(whole)


def test_the_sample_is_the_smallest_keys_of_inputs_the_api_would_accept(tmp_path: Path) -> None:
    """The same job picks the same sample in two fresh checkpoints, and an input refused locally (over the
    size limit) is never in it, even when its key is the smallest of all."""
    n = 5
    df = companies(16)
    by_key = keys_by_company(df, CEO)
    big = None
    for i in range(500):  # an oversize input whose key sorts before every other
        candidate = pl.concat(
            [df, pl.DataFrame({"company": [f"{i}" + "x" * 30_000], "city": ["far"], "employees": [1]})]
        )
        keys = keys_by_company(candidate, CEO)
        if min(keys) not in by_key:
            big = candidate
            break
    assert big is not None
    refused_key = min(keys_by_company(big, CEO))
    want = sample_of(big, CEO, n)
    assert refused_key not in want and want == sorted(by_key)[:n]

    samples = []
    for name in ("one", "two"):
        app = create_app(EmulatorConfig(latency=0.02))
        pilot = run_job(app, big, checkpoint=tmp_path / name, pilot=n)
        assert isinstance(pilot, Pilot)
        assert app.stats()["runs_created"] == n
        samples.append(recorded_keys(tmp_path / name))
        assert sorted(pilot.frame["company"].to_list()) == sorted(by_key[k] for k in want)
        assert pilot.report.sample == n
        assert pilot.report.rest_runs == 16 - n  # the refused input is not among the runs to come
    assert samples[0] == samples[1] == set(want)


def test_sample_keys_leaves_out_exactly_the_refused_keys() -> None:
    """The smallest keys not refused, whatever order polars' unique() gives (it differs call to call)."""
    keys = [f"{i:04x}" for i in range(200)] * 2
    refused = ["0000", "0003", "00c7"]
    want = [k for k in sorted(set(keys)) if k not in refused][:10]
    for _ in range(20):
        assert sample_keys(keys, refused, 10) == want
        assert sample_keys(pl.Series(keys), dict.fromkeys(refused, "too large"), 10) == want
    assert sample_keys(keys, [], 3) == ["0000", "0001", "0002"]
    assert sample_keys(keys, keys, 3) == []


class BreakFounded(Tap):
    """Every answer has `founded` in words: a value that does not fit its integer column."""

    def _break(self, output: Any) -> None:
        if isinstance(output, dict) and isinstance(output.get("content"), dict):
            output["content"]["founded"] = "nineteen ninety"

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        self._break(data.get("output"))
        return sse(data)

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        if status != 200 or not path.endswith("/result"):
            return body
        data = json.loads(body)
        self._break(data.get("output"))
        return json.dumps(data).encode()


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_fields_that_come_back_empty_or_mistyped_are_counted(tmp_path: Path, mode: str) -> None:
    """`ceo` is nullable (the emulator answers about one in eight null); `founded` comes back in words for
    every run (a tap in front of the emulator); `hq` is always filled and is not reported."""
    schema = {
        "type": "object",
        "properties": {
            "ceo": {"type": ["string", "null"], "description": "Name of the CEO"},
            "founded": {"type": "integer", "description": "Year founded"},
            "hq": {"type": "string", "description": "Head office city"},
        },
        "required": ["ceo", "founded", "hq"],
        "additionalProperties": False,
    }
    app = BreakFounded(create_app(EmulatorConfig(latency=0.02, failure_rate=0.2, seed=1)))
    n = 32
    pilot = run_job(app, companies(48), schema, checkpoint=tmp_path / "cp", pilot=n, mode=mode)
    assert isinstance(pilot, Pilot)
    done = pilot.frame.filter(pl.col("_status") == "completed")
    report = pilot.report
    assert 0 < done.height == report.completed < n  # (failed rows are not looked at)
    assert report.fields["founded"] == {"null": 0, "mistyped": done.height}
    assert done["founded"].null_count() == done.height
    assert all("founded: expected integer, got 'nineteen ninety'" in e for e in done["_error"])
    nulls = done["ceo"].null_count()
    assert nulls > 0
    assert report.fields["ceo"] == {"null": nulls, "mistyped": 0}
    assert "hq" not in report.fields
    text = "\n".join(report.lines())
    assert f"ceo: {nulls} empty of {done.height} completed" in text
    assert f"founded: {done.height} not of its type of {done.height} completed" in text


# -- refused, before anything is sent ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, "5", 2.0])
def test_a_bad_pilot_is_refused_in_one_line_before_any_request(tmp_path: Path, value: Any) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    with pytest.raises(UsageError, match="pilot") as info:
        run_job(app, companies(6), checkpoint=tmp_path / "cp", pilot=value)
    assert "\n" not in str(info.value) and repr(value) in str(info.value)
    assert app.stats()["requests_total"] == 0 and app.stats()["runs_created"] == 0
    assert not (tmp_path / "cp").exists()


def test_a_pilot_needs_a_checkpoint_and_a_shard_runs_no_pilot(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    with pytest.raises(UsageError, match="checkpoint=False") as info:
        run_job(app, companies(6), checkpoint=False, pilot=3)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="pilot") as info:
        asyncio.run(
            aenrich_shard(
                companies(6),
                CEO,
                checkpoint=tmp_path / "shard",
                pilot=3,
                processor="lite",
                api_key="k",
                base_url="http://emulator",
                transport=httpx.ASGITransport(app=app),
                progress=False,
            )
        )
    assert "\n" not in str(info.value)
    assert app.stats()["requests_total"] == 0
    assert not (tmp_path / "shard").exists()


def test_a_pilot_stopped_by_the_timeout_is_not_kept_and_the_next_call_finishes_it(tmp_path: Path) -> None:
    n = 4
    app = create_app(EmulatorConfig(latency=0.8))
    cp = tmp_path / "cp"
    df = companies(12)
    first = run_job(app, df, checkpoint=cp, pilot=n, timeout=0.2)
    assert isinstance(first, Pilot)
    assert app.stats()["runs_created"] == n
    assert first.report.statuses == {"pending": n}
    assert read_pilot(cp) is None and not (cp / PILOT).exists()
    # The next call with the pilot finishes the same sample: no new run, then it is kept.
    second = run_job(app, df, checkpoint=cp, pilot=n)
    assert isinstance(second, Pilot)
    assert app.stats()["runs_created"] == n
    assert second.report.statuses == {"completed": n} and len(second.report.latencies) == n
    assert second.frame["_run_id"].to_list() == first.frame["_run_id"].to_list()
    assert second.report.rest_runs == 12 - n
    assert PilotReport.from_dict(read_pilot(cp) or {}) == second.report
    whole = run_job(app, df, checkpoint=cp, pilot=n)
    assert isinstance(whole, pl.DataFrame) and whole["_status"].to_list() == ["completed"] * 12
    assert app.stats()["runs_created"] == 12


def test_a_pilot_on_a_job_with_runs_already_measures_its_sample_and_projects_what_is_left(
    tmp_path: Path,
) -> None:
    """Ten inputs ran before (a smaller call on the same checkpoint): the pilot sends only its sample's
    inputs that have no run, reports its sample's runs alone, and the rest is what is still unpaid."""
    n = 6
    app = create_app(EmulatorConfig(latency=0.02))
    cp = tmp_path / "cp"
    run_job(app, companies(10), checkpoint=cp)
    before = recorded_keys(cp)
    sample = set(sample_of(companies(24), CEO, n))
    assert sample & before and sample - before  # the sample holds inputs that ran and inputs that did not
    pilot = run_job(app, companies(24), checkpoint=cp, pilot=n)
    assert isinstance(pilot, Pilot)
    created = app.stats()["runs_created"]
    assert created == 10 + len(sample - before)
    assert recorded_keys(cp) == before | sample
    report = pilot.report
    assert report.sample == n and report.statuses == {"completed": n}
    assert sorted(report.latencies) == pytest.approx(
        sorted(service_seconds(app, pilot.frame["_run_id"].to_list())), abs=1e-5
    )
    assert report.rest_runs == 24 - created
    run_job(app, companies(24), checkpoint=cp, pilot=n)
    assert app.stats()["runs_created"] == 24


@pytest.mark.parametrize("lazy", [False, True])
def test_the_default_checkpoint_keeps_the_pilot(monkeypatch: pytest.MonkeyPatch, lazy: bool) -> None:
    """checkpoint=None: the job's default checkpoint (named by its inputs) keeps the pilot's report and
    runs, so the same call again goes on with the job, for a frame and for a spooled LazyFrame."""
    monkeypatch.setattr(spool, "STREAM_ROWS", 20)
    monkeypatch.setattr(spool, "BATCH_ROWS", 7)
    df = companies(30)
    app = create_app(EmulatorConfig(latency=0.02))
    pilot = run_job(app, df.lazy() if lazy else df, pilot=5)
    assert isinstance(pilot, Pilot) and app.stats()["runs_created"] == 5
    stats = JobStats()
    whole = run_job(app, df.lazy() if lazy else df, pilot=5, stats=stats)
    assert isinstance(whole, pl.DataFrame) and whole.select(df.columns).equals(df)
    assert app.stats()["runs_created"] == 30 and stats.runs_now == 25 and stats.pilot == pilot.report


# -- tables read in batches, shards, other frame types --------------------------------------------------


def test_a_spooled_lazy_table_gets_the_frames_sample_and_keeps_the_jobs_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool, "STREAM_ROWS", 20)  # a LazyFrame of more rows is set aside on disk
    monkeypatch.setattr(spool, "BATCH_ROWS", 7)
    n = 6
    base = companies(48)
    sampled = sample_of(base, CEO, n)
    picked = [keys_by_company(base, CEO)[k] for k in sampled]
    repeats = base.filter(pl.col("company").is_in(picked[:3]))  # repeats of sampled inputs, further down
    big = pl.DataFrame({"company": ["y" * 30_000], "city": ["far"], "employees": [1]})
    df = pl.concat([base, repeats, base.head(3), big])
    # Without a pilot: the job's shard count (split by its 55 rows, 8 a shard).
    plain = create_app(EmulatorConfig(latency=0.02))
    want = run_job(plain, df.lazy(), checkpoint=tmp_path / "plain", _shard_rows=8)
    shards = manifest_shards(tmp_path / "plain")
    assert shards > 1

    app = create_app(EmulatorConfig(latency=0.02))
    cp = tmp_path / "cp"
    pilot = run_job(app, df.lazy(), checkpoint=cp, pilot=n, _shard_rows=8)
    assert isinstance(pilot, Pilot) and isinstance(pilot.frame, pl.DataFrame)
    assert app.stats()["runs_created"] == n
    assert recorded_keys(cp) == set(sampled)
    assert pilot.frame.select(df.columns).equals(df.filter(pl.col("company").is_in(picked)))
    assert pilot.frame.height == n + 3  # the repeats of the sampled inputs too
    assert pilot.report.rest_runs == 48 - n and pilot.report.sample == n
    assert manifest_shards(cp) == shards  # laid out as the whole job, not as its sample
    # A frame of the same table picks the same sample.
    eager = run_job(create_app(EmulatorConfig(latency=0.02)), df, checkpoint=tmp_path / "eager", pilot=n)
    assert eager.frame.select(df.columns).equals(pilot.frame.select(df.columns))

    stats = JobStats()
    whole = run_job(app, df.lazy(), checkpoint=cp, pilot=n, _shard_rows=8, stats=stats)
    assert isinstance(whole, pl.DataFrame)
    assert whole.drop("_run_id", "_interaction_id").equals(want.drop("_run_id", "_interaction_id"))
    assert app.stats()["runs_created"] == 48 and stats.runs_now == 48 - n
    assert manifest_shards(cp) == shards
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".enrich-", "enrich-"))]


def test_a_sharded_job_keeps_its_shard_count_and_status_reads_every_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 5
    df = companies(40)
    plain = create_app(EmulatorConfig(latency=0.02))
    run_job(plain, df, checkpoint=tmp_path / "plain", _shard_rows=8)
    shards = manifest_shards(tmp_path / "plain")
    assert shards == 8

    app = create_app(EmulatorConfig(latency=0.02))
    cp = tmp_path / "cp"
    pilot = run_job(app, df, checkpoint=cp, pilot=n, _shard_rows=8)
    assert isinstance(pilot, Pilot)
    assert app.stats()["runs_created"] == n and manifest_shards(cp) == shards
    assert len(pilot.report.latencies) == n  # read from the shards' areas
    assert recorded_keys(cp) == set(sample_of(df, CEO, n))
    whole = run_job(app, df, checkpoint=cp, pilot=n, _shard_rows=8)
    assert whole["_status"].to_list() == ["completed"] * 40
    assert app.stats()["runs_created"] == 40 and manifest_shards(cp) == shards
    areas = sorted(p.name for p in (cp / "shards").iterdir())
    assert len(areas) > 1
    capsys.readouterr()
    assert main(["status", str(cp), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run_seconds"]["runs"] == 40 and status["pilot"]["sample"] == n


@pytest.mark.parametrize("kind", ["pandas", "arrow"])
def test_pandas_and_arrow_tables_get_a_pilot_frame_of_their_type(tmp_path: Path, kind: str) -> None:
    pd = pytest.importorskip("pandas")
    n = 4
    df = companies(10)
    data: Any = df.to_pandas() if kind == "pandas" else df.to_arrow()
    want = df.filter(pl.col("company").is_in([keys_by_company(df, CEO)[k] for k in sample_of(df, CEO, n)]))
    app = create_app(EmulatorConfig(latency=0.02))
    pilot = run_job(app, data, checkpoint=tmp_path / "cp", pilot=n)
    assert isinstance(pilot, Pilot)
    frame = pilot.frame
    assert isinstance(frame, pd.DataFrame if kind == "pandas" else pa.Table)
    back = pl.from_pandas(frame) if kind == "pandas" else pl.from_arrow(frame)
    assert isinstance(back, pl.DataFrame)
    assert back.select(df.columns).equals(want)
    assert back["_status"].to_list() == ["completed"] * n and back["founded"].null_count() == 0
    whole = run_job(app, data, checkpoint=tmp_path / "cp", pilot=n)
    assert isinstance(whole, pd.DataFrame if kind == "pandas" else pa.Table) and len(whole) == 10
    assert app.stats()["runs_created"] == 10


def test_a_pandas_pilot_frame_keeps_the_callers_row_labels_and_dtypes(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = companies(10)
    data = df.to_pandas()
    data.index = pd.Index([f"row{i}" for i in range(10)])
    picked = {keys_by_company(df, CEO)[k] for k in sample_of(df, CEO, 3)}
    app = create_app(EmulatorConfig(latency=0.02))
    pilot = run_job(app, data, checkpoint=tmp_path / "cp", pilot=3)
    want = data[data["company"].isin(picked)]
    assert list(pilot.frame.index) == list(want.index)
    assert pilot.frame[list(data.columns)].dtypes.equals(data.dtypes)


# -- the command line --------------------------------------------------------------------------------------


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Any:
    with Emulator(api_key="sk-pilot", latency=0.03) as emulator:
        monkeypatch.setenv("PARALLEL_API_KEY", "sk-pilot")
        monkeypatch.setenv("PARALLEL_BASE_URL", emulator.url)
        yield emulator


@pytest.fixture
def spooled(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """`enrich run` sets its input aside on disk (the 15 rows of `cli_table` are over STREAM_ROWS here);
    the list gets every table the job prepared again instead of using the command's own preparation."""
    import enrich._engine.pipeline as pipeline

    monkeypatch.setattr(spool, "STREAM_ROWS", 10)
    monkeypatch.setattr(spool, "BATCH_ROWS", 4)
    again: list[object] = []
    real = pipeline._prepare_any

    def preparing(data: object, *args: object, **kw: object) -> object:
        again.append(data)
        return real(data, *args, **kw)

    monkeypatch.setattr(pipeline, "_prepare_any", preparing)
    return again


def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def a_terminal(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    import enrich._cli as cli

    monkeypatch.setattr(sys, "stdin", type("Tty", (io.StringIO,), {"isatty": lambda self: True})(""))
    monkeypatch.setattr(cli, "_read_answer", lambda: answer + "\n")


def cli_table(tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    """12 distinct inputs in 15 rows, as a CSV file and as `enrich run` reads it (text)."""
    src = tmp_path / "in.csv"
    pl.concat([companies(12), companies(12).head(3)]).write_csv(src)
    return src, pl.read_csv(src, infer_schema=False)


def test_the_cli_pilot_without_a_terminal_needs_yes_and_status_shows_it(
    tmp_path: Path,
    emu: Emulator,
    spooled: list[object],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_terminal(monkeypatch)
    src, df = cli_table(tmp_path)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--field", "ceo=Name of the CEO", "--processor", "lite"]
    args += ["--no-progress", "--pilot", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pilot: 4 distinct inputs" in err and "runs:       4 completed" in err
    assert "the rest:   8 runs" in err
    errors = [line for line in err.splitlines() if line.startswith("enrich: error:")]
    assert len(errors) == 1 and "--yes" in errors[0] and "8 runs" in errors[0]
    assert not out.exists()
    assert emu.stats()["runs_created"] == 4
    # Again without --yes: the kept report, refused again, nothing sent.
    requests = emu.stats()["requests_total"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(kept from an earlier command)" in err and "pilot: 4 distinct inputs" in err
    assert emu.stats()["requests_total"] == requests and not out.exists()
    # With --yes: the whole job, the pilot's runs not paid again.
    assert main([*args, "--yes"]) == 0
    err = capsys.readouterr().err
    assert "(kept from an earlier command)" in err
    result = pl.read_parquet(out)
    assert result.select(df.columns).equals(df) and result["_status"].to_list() == ["completed"] * 15
    assert emu.stats()["runs_created"] == 12
    assert spooled == []  # the command's one preparation served the pilot and the job
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".enrich-", "enrich-"))]

    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run times:" in text and "(12 runs, by the service's clock)" in text
    bars = [line for line in text.splitlines() if re.match(r"^\s+\d+\.\d\d s( - .*)? #+ +\d+$", line)]
    assert bars and sum(int(line.split()[-1]) for line in bars) == 12
    assert re.search(r"^pilot: 4 distinct inputs \(\d+ rows\), processor lite$", text, re.M)
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run_seconds"]["runs"] == 12
    assert 0 < status["run_seconds"]["p50"] <= status["run_seconds"]["p90"] <= status["run_seconds"]["max"]
    assert status["pilot"]["sample"] == 4 and status["pilot"]["rest_runs"] == 8


def test_the_cli_pilot_asks_on_a_terminal_and_goes_on_in_one_command_with_yes(
    tmp_path: Path,
    emu: Emulator,
    spooled: list[object],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, df = cli_table(tmp_path)
    out = tmp_path / "out.csv"
    args = ["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
    a_terminal(monkeypatch, "n")
    assert main([*args, "--pilot", "3"]) == 0
    err = capsys.readouterr().err
    assert "go on with the other 9 runs" in err and "stopped after the pilot" in err
    assert not out.exists() and emu.stats()["runs_created"] == 3
    a_terminal(monkeypatch, "y")
    assert main([*args, "--pilot", "3"]) == 0
    err = capsys.readouterr().err
    assert "(kept from an earlier command)" in err and "go on with the other 9 runs" in err
    assert pl.read_csv(out).height == df.height and emu.stats()["runs_created"] == 12

    # --yes: the pilot and the job in one command, asking nothing.
    no_terminal(monkeypatch)
    other = tmp_path / "other.parquet"
    more = ["run", str(src), "-o", str(other), "--field", "ceo=Chief executive", "--processor", "lite"]
    assert main([*more, "--no-progress", "--pilot", "5", "--yes"]) == 0
    err = capsys.readouterr().err
    assert "pilot: 5 distinct inputs" in err and "(kept" not in err and "go on" not in err
    assert pl.read_parquet(other)["_status"].to_list() == ["completed"] * df.height
    assert emu.stats()["runs_created"] == 24
    assert spooled == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".enrich-", "enrich-"))]


def test_the_cli_refuses_a_bad_pilot_in_one_line(
    tmp_path: Path, emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = cli_table(tmp_path)
    args = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--field", "ceo=CEO", "--no-progress"]
    assert main([*args, "--pilot", "0", "--yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("enrich: error:") and "pilot" in err[0]
    assert emu.stats()["requests_total"] == 0


# -- run times in the checkpoint -----------------------------------------------------------------------


def without_seconds(root: Path) -> int:
    """Rewrite every outcome segment under `root` as an enrich that did not record run times wrote it (the
    column absent, the footer kept), and drop the settled states; returns the segments rewritten."""
    n = 0
    for path in sorted(root.rglob("outcomes-*.parquet")):
        table = pq.read_table(path)
        meta = table.schema.metadata
        pq.write_table(
            table.drop_columns(["seconds"]).replace_schema_metadata(meta),
            path,
            compression="zstd",
            write_page_checksum=True,
        )
        n += 1
    for path in root.rglob(SETTLED):
        path.unlink()
    return n


def test_the_checkpoint_keeps_each_runs_time_and_an_older_segment_reads_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(EmulatorConfig(latency=0.04, failure_rate=0.3, seed=5))
    cp = tmp_path / "cp"
    first = run_job(app, companies(12), checkpoint=cp)
    times = Checkpoint.read(cp).latencies()
    assert times.columns == ["run_id", "status", "seconds"]
    assert sorted(times["run_id"].to_list()) == sorted(first["_run_id"].to_list())
    assert times["seconds"].null_count() == 0
    assert set(times["status"]) == set(first["_status"]) == {"completed", "failed"}
    assert times["seconds"].to_list() == pytest.approx(
        service_seconds(app, times["run_id"].to_list()), abs=1e-5
    )

    assert without_seconds(cp) > 0
    old = Checkpoint.read(cp).latencies()
    assert old["seconds"].null_count() == 12  # never made up
    assert sorted(old["run_id"].to_list()) == sorted(times["run_id"].to_list())
    again = run_job(app, companies(12), checkpoint=cp)  # resumes from the old segments: nothing sent
    assert again.equals(first) and app.stats()["runs_created"] == 12
    # New rows of the same job record theirs beside the old ones.
    run_job(app, companies(15), checkpoint=cp)
    mixed = Checkpoint.read(cp).latencies()
    assert mixed.height == 15 and mixed["seconds"].null_count() == 12
    capsys.readouterr()
    assert main(["status", str(cp), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_seconds"]["runs"] == 3


# -- the report --------------------------------------------------------------------------------------------


def test_the_report_round_trips_and_renders(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.03, failure_rate=0.3, seed=3))
    pilot = run_job(app, companies(20), SEVEN, processor="base", checkpoint=tmp_path / "cp", pilot=8)
    report = pilot.report
    assert PilotReport.from_dict(report.to_dict()) == report
    assert PilotReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert PilotReport.from_dict({**report.to_dict(), "version": 999}) is None
    assert PilotReport.from_dict({"version": 1, "sample": 3}) is None
    lines = report.lines()
    assert lines[0] == "pilot: 8 distinct inputs (8 rows), processor base"
    heads = [line.split(":")[0].strip() for line in lines[1:]]
    for head in ("runs", "warning", "run time", "cost", "the rest"):
        assert head in heads
    assert f"8 of 8 runs: {SEVEN_WARNING}" in "\n".join(lines)
    assert "the rest:   12 runs, about $0.1200" in "\n".join(lines)
    assert str(report) in repr(report) and repr(report).startswith("PilotReport(")
    page = report._repr_html_()
    assert "<svg" in page and "</svg>" in page and "<table>" in page
    assert "processor &#x27;base&#x27;" in page  # the warning's quotes escaped, never raw markup
    assert "Pilot(8 rows)" in repr(pilot) and "run the same call again" in repr(pilot)
    assert pilot._repr_html_().startswith(page)
    # Without run times: no chart, and the report says so.
    blind = PilotReport.from_dict({**report.to_dict(), "latencies": []})
    assert blind is not None and "<svg" not in blind._repr_html_()
    assert any("run time:   not known" in line for line in blind.lines())
    assert blind.percentile(0.5) is None and report.percentile(1.0) == max(report.latencies)


def test_the_projection_and_the_histogram() -> None:
    # 25 runs at 10 runs a window: two full windows wait (the engine's, 2 % longer than the service's),
    # then the slowest run the pilot saw.
    args = {"mode": "group", "runs_per_window": 10, "requests_per_window": 100, "window": 60.0, "batch": 10}
    assert project(25, [1.0, 4.0], **args) == pytest.approx(2 * 61.2 + 4.0)
    assert project(10, [1.0, 4.0], **args) == pytest.approx(4.0)  # one full budget goes at once
    assert project(0, [1.0], **args) == 0.0 and project(5, [], **args) is None
    # The pilot's 5 runs, created 5 s ago, are still in the window: the next 10 wait for them to leave it.
    assert project(10, [1.0], **args, spent=[(5.0, 5, 1)]) == pytest.approx(61.2 - 5.0 + 1.0)
    runs_mode = {**args, "mode": "runs", "runs_per_window": 1000, "requests_per_window": 10}
    assert project(25, [2.0], **runs_mode) == pytest.approx(2 * 61.2 + 2.0)  # a request per run
    lines = histogram_lines([0.1, 0.2, 0.2, 0.9, 1.7], bins=4)
    assert len(lines) == 4 and sum(int(line.split()[-1]) for line in lines) == 5
    assert histogram_lines([0.5, 0.5]) == [f"  {'0.50 s':>9} {'#' * 30} 2"]
    assert histogram_lines([]) == []


# -- what a review of the feature found ------------------------------------------------------------------


def test_a_reworded_prompt_gets_a_pilot_of_its_own(tmp_path: Path) -> None:
    """A kept report stands for its sample only: a reworded prompt changes every key, so the next call
    with pilot= runs a new pilot, never the whole job unpiloted (it paid for 505 runs)."""
    df = companies(40)
    app = create_app(EmulatorConfig(latency=0.01))
    first = run_job(app, df, checkpoint=tmp_path / "cp", pilot=5, prompt="Company: {company}")
    assert isinstance(first, Pilot) and app.stats()["runs_created"] == 5
    again = run_job(app, df, checkpoint=tmp_path / "cp", pilot=5, prompt="The company {company}")
    assert isinstance(again, Pilot) and app.stats()["runs_created"] == 10
    assert again.report.sample_digest != first.report.sample_digest
    whole = run_job(app, df, checkpoint=tmp_path / "cp", pilot=5, prompt="The company {company}")
    assert isinstance(whole, pl.DataFrame) and app.stats()["runs_created"] == 45


def test_a_kept_report_that_cannot_be_read_runs_the_pilot_again_not_the_job(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_terminal(monkeypatch)
    src, _ = cli_table(tmp_path)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
    assert main([*args, "--pilot", "4"]) == 2
    kept = tmp_path / "out.parquet.enrich" / PILOT
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "version": 99}))
    capsys.readouterr()
    assert main([*args, "--pilot", "4"]) == 2  # the pilot again (nothing new to pay), then the question
    err = capsys.readouterr().err
    assert "pilot: 4 distinct inputs" in err and "--yes" in err
    assert emu.stats()["runs_created"] == 4 and not out.exists()


def test_the_question_after_a_pilot_counts_what_this_command_would_pay(
    tmp_path: Path, emu: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input grew since the pilot: the question names the rest as it is now, not as the kept
    report saw it."""
    no_terminal(monkeypatch)
    src = tmp_path / "in.csv"
    companies(12).write_csv(src)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
    assert main([*args, "--pilot", "4"]) == 2
    companies(60).write_csv(src)
    capsys.readouterr()
    assert main([*args, "--pilot", "4"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("enrich: error:")]
    created = emu.stats()["runs_created"]
    assert len(error) == 1 and f"the rest is {60 - created:,} runs" in error[0], (error, created)


def test_an_emulator_pilot_goes_on_in_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_terminal(monkeypatch)
    src, df = cli_table(tmp_path)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--no-progress"]
    assert main([*args, "--emulator", "--pilot", "3", "--yes"]) == 0, capsys.readouterr().err
    assert pl.read_parquet(out)["_status"].to_list() == ["completed"] * df.height


def test_a_follow_up_can_be_piloted(tmp_path: Path) -> None:
    """Run options may name an earlier enrichment's columns: the pilot's sample keeps them."""
    app = create_app(EmulatorConfig(latency=0.01))
    first = run_job(app, companies(20), checkpoint=tmp_path / "first")
    follow = {"cfo": "Name of the CFO"}
    options = {"previous_interaction_id": "{_interaction_id}"}
    pilot = run_job(app, first, follow, checkpoint=tmp_path / "second", pilot=3, run_options=options)
    assert isinstance(pilot, Pilot) and pilot.report.statuses == {"completed": 3}
    whole = run_job(app, first, follow, checkpoint=tmp_path / "second", pilot=3, run_options=options)
    assert whole["_status"].to_list() == ["completed"] * 20 and app.stats()["runs_created"] == 40


def test_a_pilot_refuses_an_output_it_could_not_write_before_paying(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.01))
    with pytest.raises(UsageError, match="does not exist"):
        run_job(
            app, companies(10), checkpoint=tmp_path / "cp", pilot=3, write_to=tmp_path / "no" / "o.parquet"
        )
    with pytest.raises(UsageError, match="give write_to too"):
        run_job(app, companies(10), checkpoint=tmp_path / "cp", pilot=3, write_format="csv")
    assert app.stats()["runs_created"] == 0


def test_status_after_a_pilot_tells_the_whole_tables_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(EmulatorConfig(latency=0.01))
    run_job(app, companies(50), checkpoint=tmp_path / "cp", pilot=5)
    assert main(["status", str(tmp_path / "cp")]) == 0
    assert "rows:        50 in the last call's input, 50 distinct" in capsys.readouterr().out
