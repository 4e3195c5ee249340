"""A large job split by content into shards: each recorded in its own checkpoint area with its own task
group, a bounded number at a time, under the call's one rate limiter. Small jobs are split here by
`_shard_rows` (the rows per shard; 32,768 by default)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import EmulatorConfig, ServiceMismatchError, create_app
from enrich._checkpoint import Checkpoint
from enrich._engine import JobStats, aenrich, plan, shards
from enrich._progress import Progress

SERVICE = "a custom transport at http://emulator"
OUT = {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"company": [f"Company {i}" for i in range(n)], "city": [f"c{i % 7}" for i in range(n)]}
    )


def emulated_shard(app: Any, frame: pl.DataFrame, area: Path, **kw: Any) -> Any:
    """`aenrich_shard` of `frame` (lite, the OUT fields) in `area`, against `app` in process."""
    from enrich import aenrich_shard

    return aenrich_shard(
        frame,
        OUT,
        checkpoint=area,
        base_url="http://emulator",
        transport=httpx.ASGITransport(app=app),
        api_key="k",
        processor="lite",
        **kw,
    )


def run_job(app: Any, data: Any, output: Any = OUT, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    kw.setdefault("_shard_rows", 8)
    return asyncio.run(
        aenrich(data, output, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def test_a_rows_shard_depends_only_on_its_key() -> None:
    keys = pl.Series(["00" + "0" * 30, "3f" + "0" * 30, "40" + "0" * 30, "ff" + "a" * 30])
    assert shards.shard_of(keys, 1).to_list() == [0, 0, 0, 0]
    assert shards.shard_of(keys, 2).to_list() == [0, 0, 0, 1]
    assert shards.shard_of(keys, 4).to_list() == [0, 0, 1, 3]
    assert shards.shard_of(keys, 256).to_list() == [0, 0x3F, 0x40, 0xFF]
    assert [shards.shard_count(n, rows_per_shard=8) for n in (1, 8, 9, 16, 17, 40, 10**9)] == [
        1,
        1,
        2,
        2,
        4,
        8,
        256,
    ]


def test_a_sharded_job_gives_the_unsharded_result_with_a_group_per_shard(tmp_path: Path) -> None:
    df = pl.concat([companies(40), companies(40).head(5)])  # 5 repeated rows share their runs
    whole_app, app = create_app(EmulatorConfig(latency=0.02)), create_app(EmulatorConfig(latency=0.02))
    whole = run_job(whole_app, df, checkpoint=tmp_path / "whole", _shard_rows=1000)
    stats = JobStats()
    split = run_job(app, df, checkpoint=tmp_path / "split", stats=stats)
    assert split.drop("_run_id", "_interaction_id").equals(whole.drop("_run_id", "_interaction_id"))
    assert set(split["_status"]) == {"completed"} and split["_run_id"].null_count() == 0
    assert app.stats()["runs_created"] == 40 == stats.runs_total
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert (manifest["format"], manifest["shards"]) == (2, 8)
    areas = sorted(p.name for p in (tmp_path / "split" / "shards").iterdir())
    assert 4 <= len(areas) <= 8 and all(len(a) == 2 for a in areas)
    groups = set()
    for area in areas:
        cp = Checkpoint.read(tmp_path / "split" / "shards" / area)
        assert len(cp.groups) == 1 and cp.runs > 0
        groups.add(cp.groups[0])
        keys = cp.state(outputs=False)["row_key"]
        assert set(shards.shard_of(keys, 8).to_list()) == {int(area, 16)}
    assert len(groups) == len(areas) == app.stats()["groups_created"]
    assert not (tmp_path / "whole" / "shards").exists()


def test_a_sharded_job_resumes_without_paying_twice(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=1.0))
    df = companies(60)
    first = run_job(app, df, checkpoint=tmp_path / "cp", timeout=0.5)
    assert "pending" in set(first["_status"])
    created = app.stats()["runs_created"]
    # the recorded layout holds whatever rows per shard the next call would choose
    stats = JobStats()
    second = run_job(app, df, checkpoint=tmp_path / "cp", stats=stats, _shard_rows=1000)
    assert set(second["_status"]) == {"completed"}
    assert app.stats()["runs_created"] == 60
    ran = first.filter(pl.col("_run_id").is_not_null())
    again = second.filter(pl.col("company").is_in(ran["company"].implode()))
    assert again["_run_id"].to_list() == ran["_run_id"].to_list()  # the runs made before are kept
    assert 0 < created < 60 and stats.runs_now == 60 - created
    requests = app.stats()["requests_total"]
    third = run_job(app, df, checkpoint=tmp_path / "cp")
    assert app.stats()["requests_total"] == requests and third.equals(second)


def test_at_most_a_few_shards_are_held_at_once_and_one_submits_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(EmulatorConfig(latency=0.3))
    opened = shards.open_area
    live: set[int] = set()
    most = 0
    order: list[int] = []

    def watching(root: Checkpoint, area: shards.Area, service: str | None) -> Checkpoint:
        nonlocal most
        cp = opened(root, area, service)
        live.add(area.shard)
        most = max(most, len(live))
        order.append(area.shard)
        close = cp.close

        def closing(**kw: Any) -> None:
            live.discard(area.shard)
            close(**kw)

        cp.close = closing  # type: ignore[method-assign]
        return cp

    monkeypatch.setattr(shards, "open_area", watching)
    out = run_job(app, companies(200), checkpoint=tmp_path / "cp", _shard_rows=4)  # 64 shards
    assert set(out["_status"]) == {"completed"}
    assert order == sorted(order) and len(order) > shards.AT_ONCE
    assert 1 < most <= shards.AT_ONCE  # later shards collect while the next one submits
    assert not live


def test_max_cost_counts_the_runs_of_every_shard(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    df = companies(50)
    price = 0.005  # lite, per run
    first = run_job(app, df, checkpoint=tmp_path / "cp", max_cost=20 * price)
    assert app.stats()["runs_created"] == 20
    assert (first["_status"] == "completed").sum() == 20
    run_job(app, df, checkpoint=tmp_path / "cp", max_cost=20 * price)
    assert app.stats()["runs_created"] == 20  # the shards run before paid for all of it
    last = run_job(app, df, checkpoint=tmp_path / "cp", max_cost=50 * price)
    assert app.stats()["runs_created"] == 50 and set(last["_status"]) == {"completed"}


def test_a_checkpoint_with_runs_in_one_area_is_never_split(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    run_job(app, companies(10), checkpoint=tmp_path / "cp", _shard_rows=1000)
    out = run_job(app, companies(40), checkpoint=tmp_path / "cp")  # would be 8 shards if new
    assert set(out["_status"]) == {"completed"} and app.stats()["runs_created"] == 40
    assert not (tmp_path / "cp" / "shards").exists()
    assert "shards" not in json.loads((tmp_path / "cp" / "manifest.json").read_text())


def test_runs_mode_in_shards(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    out = run_job(app, companies(30), checkpoint=tmp_path / "cp", mode="runs")
    assert set(out["_status"]) == {"completed"} and app.stats()["runs_created"] == 30
    assert len(list((tmp_path / "cp" / "shards").iterdir())) > 1


def test_one_bar_counts_every_shard(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    events: list[Progress] = []
    run_job(app, companies(40), checkpoint=tmp_path / "cp", progress=events.append)
    assert {e.total for e in events} == {40}
    last = events[-1]
    assert (last.completed, last.running, last.waiting) == (40, 0, 0)
    assert last.spent == pytest.approx(40 * 0.005)
    finished = [e.finished for e in events]
    assert finished == sorted(finished)


def test_a_root_of_shards_of_another_service_is_refused(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    run_job(app, companies(20), checkpoint=tmp_path / "cp")
    with pytest.raises(ServiceMismatchError):
        run_job(app, companies(20), checkpoint=tmp_path / "cp", service="https://api.other.example")
    assert json.loads((tmp_path / "cp" / "manifest.json").read_text())["service"] != (
        "https://api.other.example"
    )


def test_the_dry_run_and_status_count_every_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from enrich._cli import main

    app = create_app(EmulatorConfig(latency=1.0))
    df = companies(40)
    run_job(app, df, checkpoint=tmp_path / "cp", timeout=0.5)
    here = "a custom transport at http://emulator"  # the service an in-process app's runs are recorded for
    estimate = plan(df, OUT, processor="lite", checkpoint=tmp_path / "cp", service=here)
    assert estimate.running + estimate.done == app.stats()["runs_created"] > 0
    run_job(app, df, checkpoint=tmp_path / "cp")
    assert main(["status", str(tmp_path / "cp"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["completed"] == 40 and report["runs_created"] == 40
    assert report["shards"] == 8 and len(report["groups"]) == len(
        list((tmp_path / "cp" / "shards").iterdir())
    )
    assert main(["status", str(tmp_path / "cp")]) == 0
    assert "a group per shard of the 8 the job is split in" in capsys.readouterr().out


def test_shards_run_by_the_caller_share_one_limiter_and_resume_on_their_own(tmp_path: Path) -> None:
    from enrich import RateLimiter, aenrich_shard

    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(30).with_row_index("i")
    parts = [df.filter(pl.col("i") % 3 == r) for r in range(3)]
    acquired = 0

    class Counting(RateLimiter):
        async def acquire(self, runs: int = 0) -> Any:
            nonlocal acquired
            acquired += 1
            return await super().acquire(runs)

    async def main() -> list[pl.DataFrame]:
        limiter = Counting(requests_per_minute=600, runs_per_minute=600)
        return await asyncio.gather(
            *(
                aenrich_shard(
                    part.drop("i"),
                    OUT,
                    checkpoint=tmp_path / f"shard-{r}",
                    limiter=limiter,
                    base_url="http://emulator",
                    transport=httpx.ASGITransport(app=app),
                    api_key="k",
                    processor="lite",
                    progress=False,
                )
                for r, part in enumerate(parts)
            )
        )

    results = asyncio.run(main())
    assert acquired == app.stats()["requests_total"] > 0  # every request of every shard went through it
    assert app.stats()["runs_created"] == 30 and app.stats()["groups_created"] == 3
    for part, result in zip(parts, results, strict=True):
        assert result["company"].to_list() == part["company"].to_list()
        assert set(result["_status"]) == {"completed"}
    requests = app.stats()["requests_total"]
    again = run_job(app, parts[1].drop("i"), checkpoint=tmp_path / "shard-1")
    assert again.equals(results[1]) and app.stats()["requests_total"] == requests
    whole = run_job(create_app(EmulatorConfig(latency=0.05)), df.drop("i"), checkpoint=tmp_path / "whole")
    joined = pl.concat(results).sort("company")
    assert joined.drop("_run_id", "_interaction_id").equals(
        whole.sort("company").drop("_run_id", "_interaction_id")
    )


def test_a_sharded_job_on_a_store_that_is_not_a_directory() -> None:
    from enrich import MemoryStore

    app = create_app(EmulatorConfig(latency=0.02))
    store = MemoryStore()
    first = run_job(app, companies(40), checkpoint=store, basis=True)
    assert set(first["_status"]) == {"completed"} and app.stats()["runs_created"] == 40
    assert any(n.startswith("shards/") and n.endswith("/manifest.json") for n in store.list())
    assert any(n.startswith("shards/") and "/typed/" in n for n in store.list())  # each shard's own
    requests = app.stats()["requests_total"]
    again = run_job(app, companies(40), checkpoint=store, basis=True)
    assert again.equals(first) and app.stats()["requests_total"] == requests


def test_a_finished_shard_is_joined_from_its_checkpoint_without_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume reads what a finished shard needs column-wise; a shard with a row to retry, or one
    refused locally, still comes back right."""
    from enrich._engine import job as job_module

    app = create_app(EmulatorConfig(latency=0.02, failure_rate=0.3, seed=3))
    df = pl.concat([companies(40), pl.DataFrame({"company": ["x" * 30_000], "city": ["c0"]})])  # too long
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    assert first["_status"][-1] == "failed" and "25,000" in first["_error"][-1]
    failed = int((first["_status"] == "failed").sum()) - 1
    assert failed > 0
    loads: list[int] = []
    load = job_module._Job.load
    monkeypatch.setattr(job_module._Job, "load", lambda self: (loads.append(1), load(self))[1])
    stats = JobStats()
    again = run_job(app, df, checkpoint=tmp_path / "cp", stats=stats)
    assert again.equals(first) and not loads  # no shard had anything left to do
    assert stats.already_done == 40 and stats.statuses == {"completed": 40 - failed, "failed": failed + 1}
    retried = run_job(app, df, checkpoint=tmp_path / "cp", retry_failed=True)
    assert 0 < len(loads) < 8  # only the shards with a failure to retry
    assert app.stats()["runs_created"] == 40 + failed
    assert retried["_error"][-1] == first["_error"][-1]


def test_a_shard_that_fails_leaves_no_lock_behind(tmp_path: Path) -> None:
    """An error that ends the job (a wrong key, credit spent) closes every shard it opened: the same
    process can run the job again at once (a notebook), and nothing recorded is paid twice."""
    from enrich import AuthenticationError, PaymentRequiredError

    app = create_app(EmulatorConfig(api_key="right", latency=0.02))
    with pytest.raises(AuthenticationError):
        run_job(app, companies(40), checkpoint=tmp_path / "cp", api_key="wrong")
    poor = create_app(EmulatorConfig(latency=0.02, credit=20 * 0.005))
    with pytest.raises(PaymentRequiredError):
        run_job(poor, companies(40), checkpoint=tmp_path / "poor")
    paid = poor.stats()["runs_created"]
    assert 0 < paid < 40
    out = run_job(app, companies(40), checkpoint=tmp_path / "cp", api_key="right")
    assert set(out["_status"]) == {"completed"}
    with pytest.raises(PaymentRequiredError):  # not "in use": the shards were closed
        run_job(poor, companies(40), checkpoint=tmp_path / "poor")
    assert poor.stats()["runs_created"] == paid


def test_the_jobs_spend_counts_the_shards_a_call_has_no_row_of(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    run_job(app, companies(40), checkpoint=tmp_path / "cp")
    stats = JobStats()
    some = run_job(app, companies(40).head(3), checkpoint=tmp_path / "cp", stats=stats)
    assert set(some["_status"]) == {"completed"} and stats.requests == 0
    assert stats.runs_total == 40 and stats.spent == pytest.approx(40 * 0.005)


def test_a_progress_callback_that_raises_leaves_no_shard_locked(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.02))
    first = run_job(app, companies(20), checkpoint=tmp_path / "cp")

    def broken(progress: Progress) -> None:
        raise RuntimeError("the sink broke")

    with pytest.raises(RuntimeError, match="sink broke"):
        run_job(app, companies(20), checkpoint=tmp_path / "cp", progress=broken)
    assert run_job(app, companies(20), checkpoint=tmp_path / "cp").equals(first)  # not "in use"


def test_a_checkpoint_whose_segments_could_not_be_read_once_is_never_split(tmp_path: Path) -> None:
    """A one-area checkpoint whose every segment fails to read in one call (an I/O error) still holds
    its runs: it must not become a root of shards, which would never read them again."""
    from enrich import MemoryStore

    class Flaky(MemoryStore):
        failing = False

        def open(self, name: str) -> Any:
            if self.failing and name.endswith(".parquet") and "/" not in name:
                raise OSError(5, "Input/output error")
            return super().open(name)

    app = create_app(EmulatorConfig(latency=0.02))
    store = Flaky()
    run_job(app, companies(12), checkpoint=store, _shard_rows=1000)
    store.failing = True
    run_job(app, companies(12), checkpoint=store)  # 12 rows at 8 per shard would be 2 shards if new
    store.failing = False
    assert not any(n.startswith("shards/") for n in store.list())
    stats = JobStats()
    run_job(app, companies(12), checkpoint=store, stats=stats)
    assert stats.runs_total == app.stats()["runs_created"]


def test_typed_answers_kept_twice_are_joined_once(tmp_path: Path) -> None:
    """A compaction of typed answers that died before removing its sources leaves each answer twice:
    the join takes one, never a row per copy."""
    app = create_app(EmulatorConfig(latency=0.02))
    first = run_job(app, companies(20), checkpoint=tmp_path / "cp")
    typed = next((tmp_path / "cp" / "shards").glob("*/typed/typed-*.parquet"))
    copy = typed.with_name(typed.name.replace(".parquet", "-copy.parquet"))
    copy.write_bytes(typed.read_bytes())
    assert run_job(app, companies(20), checkpoint=tmp_path / "cp").equals(first)


def test_a_deadline_passed_between_shards_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call's timeout passed while one shard was joined: the shards after it send nothing, and the
    call says it timed out (their rows come back pending)."""
    import time

    from enrich._engine import pipeline

    monkeypatch.setattr(shards, "AT_ONCE", 1)  # one shard after another
    app = create_app(EmulatorConfig(latency=0.02))
    join = pipeline._join_area
    joined: list[int] = []

    def slow_join(*args: Any) -> None:
        join(*args)
        if not joined:
            time.sleep(1.5)  # the first shard's join outlasts the call's timeout
        joined.append(1)

    monkeypatch.setattr(pipeline, "_join_area", slow_join)
    stats = JobStats()
    out = run_job(app, companies(40), checkpoint=tmp_path / "cp", timeout=1.0, stats=stats)
    assert "pending" in set(out["_status"]) and "completed" in set(out["_status"])
    assert stats.timed_out


def test_the_jobs_spend_counts_every_shard_also_when_the_call_fails(tmp_path: Path) -> None:
    from enrich import AuthenticationError

    app = create_app(EmulatorConfig(api_key="right", latency=0.02))
    run_job(app, companies(40), checkpoint=tmp_path / "cp", api_key="right")
    stats = JobStats()
    with pytest.raises(AuthenticationError):  # new rows in some shard: the wrong key stops the job there
        run_job(app, companies(60), checkpoint=tmp_path / "cp", api_key="wrong", stats=stats)
    assert stats.runs_total == 40


@pytest.mark.parametrize(("mode", "spooled"), [("group", False), ("runs", False), ("group", True)])
def test_shards_against_an_unkind_service_pay_once_and_join_their_own_answers(
    tmp_path: Path, mode: str, spooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shard's creates are committed a second after an HTML 504, its streams are closed on the
    service's timer: each row still gets the answer of its own input, from one run, over real HTTP.
    `spooled`: the table is a LazyFrame read in batches and set aside on disk by key."""
    from enrich import Emulator
    from enrich._engine import spool

    monkeypatch.setattr(spool, "STREAM_ROWS", 10)
    monkeypatch.setattr(spool, "BATCH_ROWS", 7)
    from enrich._emulator.synth import synth_output
    from enrich._inputs import build_inputs
    from enrich._schema import parse_output

    df = companies(24)
    unkind = {
        "latency": 0.2,
        "late_commit_seconds": 1.0,
        "late_commit_rate": 0.5,
        "stream_close_seconds": 0.7,
        "seed": 5,
    }
    with Emulator(**unkind) as emu:
        out = asyncio.run(
            aenrich(
                df.lazy() if spooled else df,
                {"ceo": "Name of the CEO"},
                api_key=emu.api_key,
                base_url=emu.url,
                checkpoint=tmp_path / "cp",
                processor="lite",
                progress=False,
                mode=mode,
                commit_horizon=5.0,  # (late commits come after 1 s)
                timeout=120,
                _shard_rows=8,
            )
        )
        served = emu.stats()
        runs = emu.app.state.runs
    schema = parse_output({"ceo": "Name of the CEO"}).task_spec()["output_schema"]
    assert out["_status"].to_list() == ["completed"] * 24, out["_error"].drop_nulls().to_list()[:3]
    assert out["ceo"].to_list() == [
        synth_output(i, schema, processor="lite")[0]["ceo"] for i in build_inputs(df)
    ]
    for row in out.iter_rows(named=True):
        assert json.loads(runs[row["_run_id"]].body)["input"] == {
            "company": row["company"],
            "city": row["city"],
        }
    assert served["runs_created"] == 24 and served["duplicate_runs"] == 0
    assert served["late_commits"] >= 1 and len(list((tmp_path / "cp" / "shards").iterdir())) > 1


def test_a_settled_shard_is_joined_from_one_file_while_its_checkpoint_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard with nothing running or in doubt keeps its state in one file when it closes; the next
    call joins it from that file and its typed answers, without opening its checkpoint. Anything
    recorded there since (a new row, a retry) or a typed answer missing makes it read the segments."""
    from enrich._checkpoint import SETTLED

    app = create_app(EmulatorConfig(latency=0.02, failure_rate=0.2, seed=5))
    df = companies(40)
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    areas = sorted((tmp_path / "cp" / "shards").iterdir())
    assert areas and all((a / SETTLED).exists() for a in areas)
    opened: list[str] = []
    real_open = Checkpoint.open.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Checkpoint], path: Any, *a: Any, **kw: Any) -> Checkpoint:
        opened.append(str(getattr(path, "location", path)))
        return real_open(cls, path, *a, **kw)

    monkeypatch.setattr(Checkpoint, "open", classmethod(spy))
    reads: list[str] = []
    real_read = Checkpoint.read.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        Checkpoint, "read", classmethod(lambda cls, p: (reads.append(str(p)), real_read(cls, p))[1])
    )
    requests = app.stats()["requests_total"]
    stats = JobStats()
    again = run_job(app, df, checkpoint=tmp_path / "cp", stats=stats)
    assert again.equals(first) and app.stats()["requests_total"] == requests
    assert opened == [str(tmp_path / "cp")]  # the root only
    assert stats.already_done == 40 and stats.runs_total == 40
    estimate = plan(df, OUT, processor="lite", checkpoint=tmp_path / "cp", service=SERVICE)
    assert (estimate.done, estimate.to_submit, estimate.spent) == (40, 0, 40 * 0.005)
    assert reads == [str(tmp_path / "cp")]  # (the dry run reads the settled files too)

    # A row more in one shard: that shard's checkpoint records it, and its settled file is stale.
    opened.clear()
    more = pl.concat([df, companies(41).tail(1)])
    grown = run_job(app, more, checkpoint=tmp_path / "cp")
    assert grown.head(40).equals(first) and app.stats()["runs_created"] == 41
    assert len(opened) == 2  # the root, and the shard of the new row
    # Typed answers lost: the shard is read from its segments, and its answers typed again.
    for area in areas:
        shutil.rmtree(area / "typed", ignore_errors=True)
    opened.clear()
    assert run_job(app, more, checkpoint=tmp_path / "cp").equals(grown)
    assert len(opened) == 1 + len(areas)
    # Failures retried: the shards with one are run again, each settles again with the new runs.
    retried = run_job(app, more, checkpoint=tmp_path / "cp", retry_failed=True)
    failed = int((grown["_status"] == "failed").sum())
    assert failed and app.stats()["runs_created"] == 41 + failed
    opened.clear()
    assert run_job(app, more, checkpoint=tmp_path / "cp").equals(retried)
    assert opened == [str(tmp_path / "cp")]


def test_a_settled_file_of_another_job_or_damaged_is_never_used(tmp_path: Path) -> None:
    from enrich._checkpoint import SETTLED, read_settled

    app = create_app(EmulatorConfig(latency=0.02))
    df = companies(30)
    first = run_job(app, df, checkpoint=tmp_path / "cp")
    area = sorted((tmp_path / "cp" / "shards").iterdir())[0]
    root = Checkpoint.read(tmp_path / "cp")
    store = root.store.child(f"shards/{area.name}")
    kept = read_settled(store, root.job_id)
    assert kept is not None and kept.state.height > 0
    assert read_settled(store, "another-job") is None
    (area / SETTLED).write_bytes((area / SETTLED).read_bytes()[:-40] + b"x" * 40)
    assert read_settled(store, root.job_id) is None
    assert run_job(app, df, checkpoint=tmp_path / "cp").equals(first)
    assert read_settled(store, root.job_id) is not None  # written again when the shard closed


def test_a_settled_file_is_never_used_for_another_checkpoints_segments(tmp_path: Path) -> None:
    """Segment names are sequence numbers: a shard of another checkpoint of the same job, copied over
    this one's, shows the same names. Its settled file names its checkpoint, so it is not used."""
    from enrich._checkpoint import SETTLED

    app = create_app(EmulatorConfig(latency=0.02))
    a, b = companies(30), companies(60).tail(30)
    run_job(app, a, checkpoint=tmp_path / "A")
    run_job(app, b, checkpoint=tmp_path / "B")
    for area in sorted((tmp_path / "B" / "shards").iterdir()):
        mine = tmp_path / "A" / "shards" / area.name
        for f in area.iterdir():
            if f.is_file() and f.name != SETTLED and mine.exists():
                shutil.copy(f, mine / f.name)
    created = app.stats()["runs_created"]
    again = run_job(app, a, checkpoint=tmp_path / "A")
    assert set(again["_status"]) == {"completed"}
    # A's rows are not in the copied segments: they are paid again, never taken from a stale state
    assert app.stats()["runs_created"] > created


def test_status_reads_a_settled_shard_as_its_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from enrich._checkpoint import SETTLED
    from enrich._cli import main

    app = create_app(EmulatorConfig(latency=0.02, failure_rate=0.3, seed=2))
    run_job(app, companies(40), checkpoint=tmp_path / "cp")
    assert main(["status", str(tmp_path / "cp"), "--json"]) == 0
    settled = json.loads(capsys.readouterr().out)
    for area in (tmp_path / "cp" / "shards").iterdir():
        (area / SETTLED).unlink()
    assert main(["status", str(tmp_path / "cp"), "--json"]) == 0
    read = json.loads(capsys.readouterr().out)
    assert settled == read and read["inputs"]["failed"] > 0 and len(read["groups"]) > 1


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_shards_of_many_processes_keep_to_one_max_cost_through_a_ledger(tmp_path: Path, mode: str) -> None:
    """A cluster's shards (here: coroutines, each with its own checkpoint, as Ray's actors have) share the
    job's max_cost through a `Ledger`: together they never go over it, and a call with a higher cap goes
    on from what was paid."""
    from enrich._engine.broker import CostShare, Ledger, LocalLink

    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(400).with_row_index("i")
    parts = [df.filter(pl.col("i") % 4 == r).drop("i") for r in range(4)]
    price = 0.005  # lite

    async def call(max_cost: float) -> list[pl.DataFrame]:
        areas = [tmp_path / f"s{r}" for r in range(4)]
        recorded = {r: Checkpoint.read(area).runs for r, area in enumerate(areas) if area.exists()}
        ledger = Ledger(int(max_cost / price + 1e-9), recorded)
        return await asyncio.gather(
            *(
                emulated_shard(
                    app,
                    part,
                    tmp_path / f"s{r}",
                    mode=mode,
                    max_cost=max_cost,
                    rate_limit=60_000,
                    run_rate=60_000,
                    progress=False,
                    _ledger=CostShare(LocalLink(ledger), r),
                )
                for r, part in enumerate(parts)
            )
        )

    first = asyncio.run(call(1.0))  # 200 runs of 400 inputs
    created = app.stats()["runs_created"]
    assert 150 <= created <= 200  # never over; a little under at most (a shard's unused share)
    done = sum(int((out["_status"] == "completed").sum()) for out in first)
    assert done == created and sum(out.height for out in first) == 400
    second = asyncio.run(call(1.5))  # the cap counts what the first call paid: 300 in all
    assert created < app.stats()["runs_created"] <= 300
    assert app.stats()["max_runs_per_distinct"] == 1
    assert sum(int((out["_status"] == "completed").sum()) for out in second) == app.stats()["runs_created"]


@pytest.mark.parametrize("hand_over", [True, False])
def test_a_shard_after_another_on_its_key_goes_on_with_its_limiter(tmp_path: Path, hand_over: bool) -> None:
    """Spark runs a slot's shards one after another in a Python worker, each on a loop of its own: with
    `_hand_over`, the next shard goes on with the last one's limiter (the window the service still counts)
    instead of bursting a fresh budget on top of it; what the limiter learns is kept in each area."""

    window = 1.5
    app = create_app(EmulatorConfig(latency=0.05, run_rate_limit=40, rate_limit=1000, rate_window=window))
    parts = [companies(120).slice(40 * r, 40) for r in range(3)]
    slot: list[Any] = [None]
    limiters = []

    def shard(r: int) -> pl.DataFrame:
        return asyncio.run(
            emulated_shard(
                app,
                parts[r],
                tmp_path / f"s{r}",
                rate_limit=1000,
                run_rate=40,
                rate_window=window,
                progress=False,
                _hand_over=slot if hand_over else None,
            )
        )

    for r in range(3):
        out = shard(r)
        assert (
            set(out["_status"]) == {"completed"} and out["company"].to_list() == parts[r]["company"].to_list()
        )
        limiters.append(slot[0])
    assert app.stats()["runs_created"] == 120
    if hand_over:
        assert limiters[0] is limiters[1] is limiters[2] is not None
        assert app.stats()["rate_limited"] == 0, app.stats()  # each shard waited for the last one's window
    else:
        assert app.stats()["rate_limited"] > 0  # a fresh limiter sent its 40 on top of the last 40
