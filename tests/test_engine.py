"""enrich()/aenrich() end to end against the in-process emulator (httpx.ASGITransport, no sockets)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import polars as pl
import pytest

from enrich import (
    AuthenticationError,
    CheckpointMismatchError,
    EmulatorConfig,
    PaymentRequiredError,
    UsageError,
    create_app,
)
from enrich._checkpoint import Checkpoint
from enrich._emulator.synth import synth_output
from enrich._engine import JobStats, aenrich, enrich
from enrich._inputs import build_inputs
from enrich._models import FieldBasis
from enrich._schema import parse_output

FIELDS = {
    "ceo": "Name of the current CEO",
    "founded": ("integer", "Year founded"),
    "revenue": ("number", "Revenue in USD"),
    "public": ("boolean", "Is it listed?"),
    "segment": ("enum", ["b2b", "b2c"], "Market"),
    "products": ("array", "Main products"),
    "hq": ("object", {"city": "City", "country": "Country"}, "Headquarters"),
    "employees": ("integer?", "Employee count"),
}


def companies(n: int = 20) -> pl.DataFrame:
    return pl.DataFrame(
        {"company": [f"Company {i}" for i in range(n)], "website": [f"c{i}.com" for i in range(n)]}
    )


def run_job(app: Any, data: Any, output: Any, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    return asyncio.run(
        aenrich(data, output, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def expected(df: pl.DataFrame, output: Any, processor: str = "lite", **build: Any) -> list[Any]:
    spec = parse_output(output)
    schema = spec.task_spec()["output_schema"]
    return [synth_output(i, schema, processor=processor)[0] for i in build_inputs(df, **build)]


def test_typed_columns_of_every_type(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies()
    out = run_job(app, df, FIELDS, checkpoint=tmp_path / "cp")
    assert out.columns == [*df.columns, *FIELDS, "_status", "_error", "_run_id", "_interaction_id"]
    assert out.schema["ceo"] == pl.Utf8 and out.schema["founded"] == pl.Int64
    assert out.schema["revenue"] == pl.Float64 and out.schema["public"] == pl.Boolean
    assert out.schema["products"] == pl.List(pl.Utf8)
    assert isinstance(out.schema["hq"], pl.Struct) and out.schema["employees"] == pl.Int64
    assert out["_status"].to_list() == ["completed"] * len(df)
    assert out["_error"].null_count() == len(df)
    for row, want in zip(out.iter_rows(named=True), expected(df, FIELDS), strict=True):
        for name in FIELDS:
            assert row[name] == want[name], name
    assert out.select(df.columns).equals(df)
    assert app.stats()["runs_created"] == len(df) and app.stats()["duplicate_runs"] == 0


def test_group_mode_spends_few_requests(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.1))
    df = companies(1500)
    stats = JobStats()
    out = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", stats=stats)
    assert out["_status"].to_list() == ["completed"] * 1500
    assert app.stats()["requests_total"] <= 15, app.stats()["requests"]
    assert stats.submitted == 1500 and stats.requests == app.stats()["requests_total"]


def test_basis_column(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    out = run_job(app, companies(3), {"ceo": "CEO"}, basis=True, processor="core")
    basis = out["_basis"].to_list()[0]
    assert basis[0]["field"] == "ceo" and basis[0]["citations"][0]["url"].startswith("http")
    assert basis[0]["confidence"] in ("low", "medium", "high")


def test_text_output_and_prompt_template() -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(5)
    out = run_job(app, df, "A one-line summary of the company", prompt="Describe {company} ({website})")
    assert out.columns[-5:] == ["output", "_status", "_error", "_run_id", "_interaction_id"]
    want = expected(df, "A one-line summary of the company", prompt="Describe {company} ({website})")
    assert out["output"].to_list() == want
    assert all(isinstance(w, str) and w for w in want)


def test_pandas_in_pandas_out() -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    pdf = pd.DataFrame({"company": ["A", "B", "C"]}, index=pd.Index([10, 20, 30], name="id"))
    out = run_job(app, pdf, {"founded": ("integer", "Year")})
    assert isinstance(out, pd.DataFrame)
    assert list(out.index) == [10, 20, 30] and out.index.name == "id"
    assert list(out["_status"]) == ["completed"] * 3
    assert str(out["founded"].dtype) == "Int64"


def test_identical_rows_are_submitted_once(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = pl.DataFrame({"company": [f"C{i % 7}" for i in range(50)]})
    out = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 7
    want = expected(df, {"ceo": "CEO"})
    assert out["ceo"].to_list() == [w["ceo"] for w in want]
    # the same run answers every copy of the row
    assert out.group_by("company").agg(pl.col("_run_id").n_unique())["_run_id"].to_list() == [1] * 7


def test_rerun_submits_only_what_is_new(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(10)
    run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    more = pl.concat([companies(14)[::-1], df.head(2)])  # reordered, 4 new rows, 2 duplicates
    out = run_job(app, more, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 14
    assert out["company"].to_list() == more["company"].to_list()
    assert out["ceo"].to_list() == [w["ceo"] for w in expected(more, {"ceo": "CEO"})]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"columns": ["compnay"]}, "compnay"),
        ({"processor": "turbo"}, "unknown processor 'turbo'"),
        ({"output": {"company": "collides"}}, "company"),
        ({"metadata": {"a-very-long-metadata-key": 1}}, "16"),
        ({"metadata": {"enrich_key": "x"}}, "reserved"),
        ({"metadata": {"k": "v" * 513}}, "512"),
        ({"prompt": "Find {ceo_name}"}, "ceo_name"),
        ({"mode": "fast"}, "mode"),
        ({"output": {"x": ("integer-ish", "?")}}, "integer-ish"),
        ({"input_schema": {"type": "array"}}, "input_schema"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_input_is_refused_before_any_request(
    kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    app = create_app(EmulatorConfig())
    data = kwargs.pop("data", companies(3))
    output = kwargs.pop("output", {"ceo": "CEO"})
    with pytest.raises(UsageError) as info:
        run_job(app, data, output, checkpoint=tmp_path / "cp", **kwargs)
    assert message.lower() in str(info.value).lower()
    assert "\n" not in str(info.value)
    assert app.stats()["requests_total"] == 0


def test_rows_failing_input_schema_are_not_sent() -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = pl.DataFrame({"company": ["A", None, "C"]})
    schema = {"type": "object", "properties": {"company": {"type": "string"}}, "required": ["company"]}
    out = run_job(app, df, {"ceo": "CEO"}, input_schema=schema)
    assert out["_status"].to_list() == ["completed", "failed", "completed"]
    assert "input_schema" in out["_error"][1]
    assert app.stats()["runs_created"] == 2


def test_wrong_key_stops_after_one_request(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(api_key="right"))
    with pytest.raises(AuthenticationError):
        run_job(app, companies(50), {"ceo": "CEO"}, api_key="wrong", checkpoint=tmp_path / "cp")
    assert app.stats()["requests_total"] == 1


def test_out_of_credit_stops_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    # lite costs $0.005 a run: $5.01 buys the first add of 1,000 and refuses the second.
    app = create_app(EmulatorConfig(latency=0.05, credit=5.01))
    with pytest.raises(PaymentRequiredError):
        run_job(app, companies(1500), {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 1000
    richer = create_app(EmulatorConfig(latency=0.05))
    # the first 1,000 are collected from the old service state only if it still knows them; here a new
    # emulator does not, so only the resume plan is checked: nothing already created is sent again.
    from enrich._checkpoint import Checkpoint

    assert Checkpoint.read(tmp_path / "cp").runs == 1000
    del richer


def test_timeout_leaves_pending_rows_then_resume_collects_them(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=1.5))
    df = companies(30)
    first = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", timeout=0.3)
    assert set(first["_status"]) == {"pending"}
    assert first["_run_id"].null_count() == 0
    assert "again" in first["_error"][0]
    second = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    assert set(second["_status"]) == {"completed"}
    assert second["_run_id"].to_list() == first["_run_id"].to_list()
    assert app.stats()["runs_created"] == 30


def test_retry_failed_resubmits_only_failed_rows(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=0.5, seed=4))
    df = companies(40)
    first = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    failed = first.filter(pl.col("_status") == "failed")
    assert 0 < failed.height < 40 and failed["_error"].null_count() == 0
    again = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")  # no retry: nothing sent
    assert app.stats()["runs_created"] == 40 and again["_status"].to_list() == first["_status"].to_list()
    retried = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", retry_failed=True)
    assert app.stats()["runs_created"] == 40 + failed.height
    changed = retried.filter(pl.col("company").is_in(failed["company"].to_list()))
    assert set(changed["_run_id"]).isdisjoint(set(failed["_run_id"]))
    kept = retried.filter(~pl.col("company").is_in(failed["company"].to_list()))
    assert kept["_run_id"].to_list() == first.filter(pl.col("_status") == "completed")["_run_id"].to_list()


def test_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    run_job(app, companies(3), {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    with pytest.raises(CheckpointMismatchError) as info:
        run_job(app, companies(3), {"cfo": "CFO"}, checkpoint=tmp_path / "cp")
    assert "task_spec" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="processor"):
        run_job(app, companies(3), {"ceo": "CEO"}, processor="base", checkpoint=tmp_path / "cp")


def test_torn_segment_is_skipped_and_nothing_is_paid_twice(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(20)
    first = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    segments = sorted((tmp_path / "cp").glob("*.parquet"))
    last = segments[-1]
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    stats = JobStats()
    second = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", stats=stats)
    assert any("skipp" in w or "torn" in w or "unreadable" in w for w in stats.warnings), stats.warnings
    assert second["ceo"].to_list() == first["ceo"].to_list()
    assert app.stats()["runs_created"] == 20


def test_lost_answers_are_reconciled_not_resubmitted(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, fault_rate=1.0, faults=frozenset({"lost_create"})))
    df = companies(2500)
    stats = JobStats()
    # Every add-runs answer is lost (the runs exist); a raised run budget keeps the test fast.
    out = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", stats=stats, run_rate=100_000)
    assert set(out["_status"]) == {"completed"}
    assert app.stats()["faults"]["lost_create"] == 3 and stats.reconciled >= 1
    assert app.stats()["runs_created"] == 2500 and app.stats()["duplicate_runs"] == 0


def test_a_job_of_a_thousand_rows_costs_four_requests(tmp_path: Path) -> None:
    """Create the group, add the rows, follow the events stream, read the runs once every run ended:
    the same four requests as a fixed sleep-and-poll client, without its polling delay."""
    app = create_app(EmulatorConfig(latency=0.3, seed=4))
    df = pl.DataFrame({"company": [f"Company {i}" for i in range(1000)]})
    stats = JobStats()
    out = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp", stats=stats)
    assert out["_status"].to_list() == ["completed"] * 1000
    requests = app.stats()["requests"]
    assert requests == {
        "POST /v1/tasks/groups": 1,
        "POST /v1/tasks/groups/{taskgroup_id}/runs": 1,
        "GET /v1/tasks/groups/{taskgroup_id}/events": 1,
        "GET /v1/tasks/groups/{taskgroup_id}/runs": 1,
    }, requests
    assert stats.requests == 4


def test_runs_mode(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=0.2, seed=1))
    df = companies(25)
    out = run_job(app, df, {"ceo": "CEO"}, mode="runs", checkpoint=tmp_path / "cp")
    assert set(out["_status"]) <= {"completed", "failed"}
    done = out.filter(pl.col("_status") == "completed")
    want = {
        r["company"]: w["ceo"]
        for r, w in zip(df.iter_rows(named=True), expected(df, {"ceo": "CEO"}), strict=True)
    }
    assert all(want[r["company"]] == r["ceo"] for r in done.iter_rows(named=True))
    requests = app.stats()["requests"]
    assert app.stats()["runs_created"] == 25
    # one create per row (an add-runs of one input, so a lost answer can be found again), one group
    assert (
        requests["POST /v1/tasks/groups/{taskgroup_id}/runs"] == 25 and requests["POST /v1/tasks/groups"] == 1
    )
    # collected through the group's streams, not with a blocking result call (a connection) per row
    assert "GET /v1/tasks/runs/{run_id}/result" not in requests
    assert sum(requests.values()) <= 25 + 1 + 10


def test_runs_mode_group_commits_intents_and_keeps_receipts_before_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates of one moment share one intents segment (one fsync); every outcome written to disk has
    its run's receipt written before it, so a crash between the two never orphans an answer."""
    writes: list[tuple[str, int]] = []
    real_rows, real_receipts, real_outcomes = (
        Checkpoint.record_intent_rows,
        Checkpoint.record_receipts,
        Checkpoint.add_outcomes,
    )
    receipted: set[str] = set()

    def rows(self: Checkpoint, r: Any) -> None:
        writes.append(("intents", len(r)))
        real_rows(self, r)

    def receipts(self: Checkpoint, r: Any) -> None:
        receipted.update(x.run_id for x in r)
        real_receipts(self, r)

    def outcomes(self: Checkpoint, o: Any) -> None:
        assert {x.run_id for x in o} <= receipted, "an outcome reached the checkpoint before its receipt"
        real_outcomes(self, o)

    monkeypatch.setattr(Checkpoint, "record_intent_rows", rows)
    monkeypatch.setattr(Checkpoint, "record_receipts", receipts)
    monkeypatch.setattr(Checkpoint, "add_outcomes", outcomes)
    app = create_app(EmulatorConfig(latency=0.05, seed=2))
    stats = JobStats()
    out = run_job(app, companies(200), {"ceo": "CEO"}, mode="runs", checkpoint=tmp_path / "cp", stats=stats)
    assert out["_status"].to_list() == ["completed"] * 200
    assert sum(n for _, n in writes) == 200
    assert len(writes) < 50, f"{len(writes)} intent writes for 200 creates: not grouped"
    assert app.stats()["duplicate_runs"] == 0
    assert set(stats.stages) == {"key", "dedupe", "load", "submit", "collect", "join"}
    assert all(v >= 0 for v in stats.stages.values())


def test_runs_mode_never_spends_past_max_cost_with_many_creates_in_flight(tmp_path: Path) -> None:
    """Runs just created but whose receipts wait for the next group commit count as spent."""
    app = create_app(EmulatorConfig(latency=0.05, seed=5))
    price = 5 / 1000  # lite: $5 per 1,000 runs
    out = run_job(
        app,
        companies(300),
        {"ceo": "CEO"},
        mode="runs",
        concurrency=50,
        max_cost=100 * price,
        checkpoint=tmp_path / "cp",
    )
    assert app.stats()["runs_created"] == 100
    assert (out["_status"] == "completed").sum() == 100 and (out["_status"] == "pending").sum() == 200


def test_runs_mode_timeout_records_every_run_it_was_told_of(tmp_path: Path) -> None:
    """A timeout mid-submission writes the receipts still waiting for a group commit: every run id the
    job returns is in the checkpoint, and only creates whose answers never came back are in doubt."""
    app = create_app(EmulatorConfig(latency=2.0, seed=6))
    out = run_job(
        app,
        companies(3000),
        {"ceo": "CEO"},
        mode="runs",
        concurrency=50,
        checkpoint=tmp_path / "cp",
        timeout=0.5,
    )
    created = app.stats()["runs_created"]
    state = Checkpoint.read(tmp_path / "cp").state()
    told = set(out["_run_id"].drop_nulls().to_list())
    assert 0 < len(told) <= created < 3000
    assert told <= set(state["run_id"].to_list())


def test_runs_mode_lost_creates_are_found_not_resent(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05, fault_rate=0.3, faults=frozenset({"lost_create"}), seed=3))
    df = companies(60)
    stats = JobStats()
    out = run_job(app, df, {"ceo": "CEO"}, mode="runs", checkpoint=tmp_path / "cp", stats=stats)
    assert set(out["_status"]) == {"completed"}
    assert (
        app.stats()["faults"]["lost_create"] >= 5 and stats.reconciled == app.stats()["faults"]["lost_create"]
    )
    assert app.stats()["runs_created"] == 60 and app.stats()["duplicate_runs"] == 0
    # the lost answers of one moment are settled by one read of the group, not one read each
    assert app.stats()["requests"]["GET /v1/tasks/groups/{taskgroup_id}/runs"] < stats.reconciled


def test_sync_enrich_inside_a_running_loop(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))

    async def notebook_cell() -> Any:
        # What Jupyter does: a loop is already running when the user calls the sync function.
        return enrich(
            companies(4),
            {"ceo": "CEO"},
            processor="lite",
            api_key="k",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            progress=False,
        )

    out = asyncio.run(notebook_cell())
    assert out["_status"].to_list() == ["completed"] * 4


def test_progress_events(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    events: list[Any] = []
    run_job(app, companies(10), {"ceo": "CEO"}, progress=events.append)
    assert events[-1].total == 10 and events[-1].completed == 10 and events[-1].running == 0
    assert any((e.message or "").startswith("checkpoint: ") for e in events)  # the default one, said


def test_basis_of_resumed_rows_matches_the_first_call(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(3)
    first = run_job(app, df, {"ceo": "CEO"}, basis=True, processor="core", checkpoint=tmp_path / "cp")
    again = run_job(app, df, {"ceo": "CEO"}, basis=True, processor="core", checkpoint=tmp_path / "cp")
    assert again["_basis"].to_list() == first["_basis"].to_list()
    assert again["_basis"][0][0]["field"] == "ceo" and app.stats()["runs_created"] == 3


def test_basis_is_kept_by_the_checkpoint_not_in_memory_until_asked(tmp_path: Path) -> None:
    """Without basis=True the job holds no basis (the bulk of each answer) in memory, yet a later call
    with basis=True gets every row's basis from the checkpoint, without a new run."""
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(4)
    stats = JobStats()
    plain = run_job(app, df, {"ceo": "CEO"}, processor="core", checkpoint=tmp_path / "cp", stats=stats)
    assert "_basis" not in plain.columns
    loaded = Checkpoint.read(tmp_path / "cp").state()
    assert loaded["basis"].null_count() == 0  # stored as the API sent it
    without = Checkpoint.read(tmp_path / "cp").state(basis=False)
    assert without["basis"].null_count() == 4 and without["output"].to_list() == loaded["output"].to_list()
    again = run_job(app, df, {"ceo": "CEO"}, basis=True, processor="core", checkpoint=tmp_path / "cp")
    assert [b[0]["field"] for b in again["_basis"].to_list()] == ["ceo"] * 4
    assert again["ceo"].to_list() == plain["ceo"].to_list() and app.stats()["runs_created"] == 4


def test_the_basis_is_decoded_in_slices_to_the_same_values_as_field_basis_normalizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The join decodes each segment's basis text in polars, a few MB at a time, never into Python
    objects; what it makes is what `FieldBasis.from_json(...).to_json()` makes of each entry (missing text
    empty, missing lists empty, confidence and title kept null), over slice boundaries, and a basis of a
    shape polars cannot decode falls back to the entry-by-entry path."""
    from enrich._engine import join as _engine

    monkeypatch.setattr(_engine, "_DECODE_BYTES", 200)  # many slices
    entries = [
        {
            "field": "ceo",
            "reasoning": "r",
            "confidence": "high",
            "citations": [{"url": "u", "excerpts": ["x"]}],
        },
        {"field": "founded"},
        {"field": "hq", "reasoning": None, "citations": [{"title": "t"}], "extra": 1},
        {"reasoning": "no field"},
    ]
    texts = [json.dumps(entries[: 1 + i % 4]) if i % 5 else None for i in range(300)] + [json.dumps([])]
    part = pl.DataFrame(
        {"run_id": [str(i) for i in range(len(texts))], "output": ["{}"] * len(texts), "basis": texts}
    )
    typed = _engine._typed_basis(part)
    assert typed["basis"].dtype == _engine._BASIS
    assert typed["basis"].to_list() == [_engine._basis_rows(t) if t is not None else None for t in texts]
    odd = part.with_columns(pl.lit(json.dumps([1, {"field": "x"}])).alias("basis"))  # not all objects
    assert _engine._typed_basis(odd)["basis"].to_list()[0] == [FieldBasis.from_json({"field": "x"}).to_json()]


def test_an_answer_that_cannot_be_read_back_is_said_on_its_row_not_passed_off_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join reads every answer from the checkpoint. One it cannot read back (an outcome segment
    damaged after the checkpoint opened: here, every answer missing) leaves the row's values null with
    `_error` saying why and its `_run_id` kept, never an empty answer that passes for a real one."""
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(4)
    run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    # (without the typed answers the first join kept: those are joined without reading the text again)
    shutil.rmtree(tmp_path / "cp" / "typed")
    monkeypatch.setattr(
        Checkpoint,
        "answers",
        lambda self, run_ids, **kw: pl.DataFrame(
            schema={"run_id": pl.String, "output": pl.String, "basis": pl.String}
        ),
    )
    again = run_job(app, df, {"ceo": "CEO"}, checkpoint=tmp_path / "cp")
    assert app.stats()["runs_created"] == 4  # nothing sent again
    assert again["ceo"].null_count() == 4 and again["_run_id"].null_count() == 0
    assert again["_status"].to_list() == ["completed"] * 4
    assert all("could not be read back from the checkpoint" in e for e in again["_error"].to_list())
