"""Interaction ids of their own (`EmulatorConfig.own_interaction_ids`). The service's examples show a run's
`interaction_id` equal to its `run_id`, but it does not promise it (task-api.md §4). With the option on, every
`_interaction_id` the client gives must be the one the service gave, never a run id in its place: in frames
and files, across shards, on a resume, where one part of a job has ids of its own and another has not, and
as the `previous_interaction_id` of a follow-up. With it off, the column is the run ids, and a part keeps one
copy of them (`assemble._Part.same`, which these tests watch so both paths are known to be taken).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_emulator import app_with, assert_error, body, client, run
from test_emulator_run_options import add, create, wait_done
from test_emulator_unkind import _session
from test_interaction_id import companies, interaction_ids, run_job, stored_inputs

from enrich import Emulator, EmulatorConfig, create_app
from enrich._checkpoint import SETTLED, Checkpoint
from enrich._cli import main as cli
from enrich._emulator.synth import expected_output
from enrich._engine import aenrich, assemble
from enrich._exceptions import ValidationError

INTERACTION_ID = re.compile(r"int_[0-9a-f]{32}")
CFO = {"cfo": "Name of the current CFO"}


def own(**kw: Any) -> Any:
    """An emulator app whose runs have interaction ids of their own."""
    return create_app(EmulatorConfig(latency=0.05, own_interaction_ids=True, **kw))


def assert_the_services_ids(app: Any, frame: pl.DataFrame) -> list[str]:
    """Every row's `_interaction_id` is the one the service gives for its run (GET /v1/tasks/runs/{id}), an
    id of its own: none is a run id. Returns them."""
    got, runs = frame["_interaction_id"].to_list(), frame["_run_id"].to_list()
    assert None not in got and None not in runs
    assert got == interaction_ids(app, runs)
    assert all(INTERACTION_ID.fullmatch(i) for i in got)
    assert not set(got) & set(app.state.runs)  # not this row's run id, nor any other run's
    return got


@pytest.fixture
def parts_same(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """`_Part.same` of every part the jobs of a test write: whether it left `_interaction_id` out."""
    seen: list[bool] = []
    write_parts = assemble.write_parts

    def spy(*args: Any, **kw: Any) -> Any:
        parts, statuses, schema = write_parts(*args, **kw)
        seen.extend(part.same for part in parts)
        return parts, statuses, schema

    monkeypatch.setattr(assemble, "write_parts", spy)
    return seen


# --------------------------------------------------------------------------------------------------
# The emulator


def test_each_run_gets_an_interaction_id_of_its_own_and_only_those_can_be_followed_up() -> None:
    app = app_with(own_interaction_ids=True)

    async def go() -> None:
        async with client(app) as c:
            first = (await create(c, body("core"))).json()
            rid, iid = first["run_id"], first["interaction_id"]
            assert INTERACTION_ID.fullmatch(iid) and iid != rid
            assert (await c.get(f"/v1/tasks/runs/{rid}")).json()["interaction_id"] == iid
            done = await wait_done(c, rid)
            assert done["run"]["interaction_id"] == iid
            # A run id is not an interaction id: refused as one this API never handed out, nothing created.
            created = app.stats()["runs_created"]
            error = assert_error(await create(c, body(previous_interaction_id=rid)), 422)
            assert rid in error["message"] and error["detail"]["errors"][0]["type"] == "unknown_interaction"
            _, r = await add(c, [body(), body(previous_interaction_id=rid)])
            assert_error(r, 422)
            assert app.stats()["runs_created"] == created
            # The interaction id is followed up, and the follow-up's basis names it.
            follow = body("core", previous_interaction_id=iid)
            r = await create(c, follow)
            assert r.status_code == 202 and r.json()["interaction_id"] not in (iid, r.json()["run_id"])
            chained = (await wait_done(c, r.json()["run_id"]))["output"]
            assert chained == expected_output(follow)
            lead = f"Following up on interaction {iid}:"
            assert chained["basis"] and all(b["reasoning"].startswith(lead) for b in chained["basis"])
            _, r = await add(c, [follow])
            assert r.status_code == 200
            group_run = (await wait_done(c, r.json()["run_ids"][0]))["run"]
            assert INTERACTION_ID.fullmatch(group_run["interaction_id"])

    run(go())


def test_interaction_ids_are_seeded_and_leave_every_other_id_of_a_seed_as_it_was() -> None:
    def session(**kw: Any) -> dict[str, Any]:
        app = app_with(failure_rate=0.6, **kw)
        found = _session(app)
        found["interactions"] = [app.state.runs[r].interaction_id for r in found["runs"]]
        return found

    off, on, again = (
        session(seed=4),
        session(seed=4, own_interaction_ids=True),
        session(seed=4, own_interaction_ids=True),
    )
    for key in ("group", "runs", "ref", "failure_refs", "outputs"):
        assert off[key] == on[key]
    assert off["interactions"] == off["runs"]
    assert on["interactions"] == again["interactions"]
    assert all(INTERACTION_ID.fullmatch(i) for i in on["interactions"])
    other = session(seed=5, own_interaction_ids=True)["interactions"]
    unseeded = [session(own_interaction_ids=True)["interactions"] for _ in range(2)]
    assert len({tuple(ids) for ids in (on["interactions"], other, *unseeded)}) == 4
    assert EmulatorConfig().own_interaction_ids is False


# --------------------------------------------------------------------------------------------------
# The client never puts a run id where the service gave an interaction id


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_a_frame_in_memory_has_the_services_interaction_ids(
    tmp_path: Path, mode: str, parts_same: list[bool]
) -> None:
    app = own(failure_rate=0.3, seed=2)
    df = pl.concat([companies(12), companies(3)])  # repeats share their run, and its interaction id
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode)
    assert {"completed", "failed"} <= set(out["_status"])  # a failed run's interaction is kept too
    got = assert_the_services_ids(app, out)
    assert got[12:] == got[:3]
    assert parts_same and not any(parts_same)


@pytest.mark.parametrize("basis", [False, True])
def test_a_parquet_file_has_the_services_interaction_ids(
    tmp_path: Path, basis: bool, parts_same: list[bool]
) -> None:
    app = own()
    out = tmp_path / "out.parquet"
    assert run_job(app, companies(10), checkpoint=tmp_path / "cp", basis=basis, write_to=out) is None
    written = pl.read_parquet(out)
    assert written.columns[-3 if basis else -2 :][:2] == ["_run_id", "_interaction_id"]
    assert_the_services_ids(app, written)
    assert parts_same and not any(parts_same)


def test_a_job_of_several_shards_has_the_services_interaction_ids(
    tmp_path: Path, parts_same: list[bool]
) -> None:
    app = own()
    df = companies(48)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8)
    assert Checkpoint.read(tmp_path / "cp").shards > 1
    want = assert_the_services_ids(app, first)
    out = tmp_path / "out.parquet"
    run_job(app, df.lazy(), checkpoint=tmp_path / "cp", _shard_rows=8, write_to=out)
    assert pl.read_parquet(out)["_interaction_id"].to_list() == want
    assert len(parts_same) > 2 and not any(parts_same)


@pytest.mark.parametrize("shard_rows", [1 << 20, 8])
def test_a_resume_of_a_finished_checkpoint_gives_the_same_interaction_ids(
    tmp_path: Path, shard_rows: int, parts_same: list[bool]
) -> None:
    app = own()
    df = companies(24)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    want = assert_the_services_ids(app, first)
    created, requests = app.stats()["runs_created"], app.stats()["requests_total"]
    again = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    assert again.equals(first)
    out = tmp_path / "out.parquet"
    run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows, write_to=out)
    assert pl.read_parquet(out)["_interaction_id"].to_list() == want
    # Settled states dropped: the outcomes are read again from the checkpoint's segments.
    for path in (tmp_path / "cp").rglob(SETTLED):
        path.unlink()
    assert run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows).equals(first)
    assert app.stats()["runs_created"] == created and app.stats()["requests_total"] == requests
    assert not any(parts_same)


def test_a_job_whose_parts_differ_gives_each_row_its_own_runs_interaction_id(
    tmp_path: Path, parts_same: list[bool]
) -> None:
    """Some shards whose interaction ids are their run ids (a part leaves the column out), others whose
    service gave ids of their own, merged into one result: a checkpoint of an emulator without the option,
    half of whose shards are rewritten as if their service had given ids of their own."""
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(48)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8)
    assert first["_interaction_id"].to_list() == first["_run_id"].to_list()
    forged: set[str] = set()
    for shard in sorted((tmp_path / "cp" / "shards").iterdir())[::2]:
        for path in shard.rglob("outcomes-*.parquet"):
            table = pq.read_table(path)
            runs = table.column("run_id")
            forged.update(runs.to_pylist())
            at = table.schema.get_field_index("interaction_id")
            table = table.set_column(at, table.schema.field(at), pc.replace_substring(runs, "trun_", "int_"))
            pq.write_table(table, path, compression="zstd", write_page_checksum=True)
    for path in (tmp_path / "cp").rglob(SETTLED):
        path.unlink()
    parts_same.clear()
    want = [r.replace("trun_", "int_") if r in forged else r for r in first["_run_id"].to_list()]
    again = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8)
    assert True in parts_same and False in parts_same
    assert again["_interaction_id"].to_list() == want and want != first["_run_id"].to_list()
    out = tmp_path / "out.parquet"
    run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8, write_to=out)
    assert pl.read_parquet(out)["_interaction_id"].to_list() == want


def test_a_follow_up_names_the_services_interaction_ids(tmp_path: Path) -> None:
    app = own()
    first = run_job(app, companies(6), checkpoint=tmp_path / "first")
    want = assert_the_services_ids(app, first)
    follow = asyncio.run(
        aenrich(
            first,
            CFO,
            api_key="test-key",
            base_url="http://emulator",
            transport=httpx.ASGITransport(app=app),
            processor="lite",
            progress=False,
            basis=True,
            checkpoint=tmp_path / "follow",
            run_options={"previous_interaction_id": "{_interaction_id}"},
        )
    )
    assert set(follow["_status"]) == {"completed"}
    sent = [app.state.run_input(app.state.runs[r]) for r in follow["_run_id"].to_list()]
    assert [s["previous_interaction_id"] for s in sent] == want
    for iid, basis in zip(want, follow["_basis"].to_list(), strict=True):
        assert basis and all(b["reasoning"].startswith(f"Following up on interaction {iid}:") for b in basis)
    assert not set(assert_the_services_ids(app, follow)) & set(want)
    # Naming the run ids instead is refused by the service, before anything is created.
    created = app.stats()["runs_created"]
    with pytest.raises(ValidationError, match="previous_interaction_id"):
        asyncio.run(
            aenrich(
                first,
                CFO,
                api_key="test-key",
                base_url="http://emulator",
                transport=httpx.ASGITransport(app=app),
                processor="lite",
                progress=False,
                checkpoint=tmp_path / "wrong",
                run_options={"previous_interaction_id": "{_run_id}"},
            )
        )
    assert app.stats()["runs_created"] == created


def test_a_follow_up_from_the_command_line_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, first, second = tmp_path / "in.csv", tmp_path / "first.parquet", tmp_path / "second.parquet"
    companies(5).write_csv(source)
    options = tmp_path / "follow.json"
    options.write_text(json.dumps({"previous_interaction_id": "{_interaction_id}"}))
    with Emulator(latency=0.05, own_interaction_ids=True) as emu:
        monkeypatch.setenv("PARALLEL_API_KEY", emu.api_key)
        common = ["--processor", "lite", "--no-progress", "--base-url", emu.url]
        assert cli(["run", str(source), "-o", str(first), "--field", "ceo=CEO", *common]) == 0
        args = ["run", str(first), "-o", str(second), "--field", "cfo=CFO", "--run-options", str(options)]
        assert cli([*args, *common]) == 0
        before, done = pl.read_parquet(first), pl.read_parquet(second)
        sent = stored_inputs(emu, done["_run_id"].to_list())
        assert_the_services_ids(emu.app, before)
        assert_the_services_ids(emu.app, done)
    assert set(done["_status"]) == {"completed"}
    assert [s["previous_interaction_id"] for s in sent] == before["_interaction_id"].to_list()


# --------------------------------------------------------------------------------------------------
# Without the option: the interaction ids are the run ids, kept once


@pytest.mark.parametrize("shard_rows", [1 << 20, 8])
def test_without_the_option_the_interaction_ids_are_the_run_ids(
    tmp_path: Path, shard_rows: int, parts_same: list[bool]
) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=0.3, seed=2))
    df = pl.concat([companies(24), companies(3)])
    out = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    assert {"completed", "failed"} <= set(out["_status"])
    assert (
        out["_interaction_id"].to_list()
        == out["_run_id"].to_list()
        == interaction_ids(app, out["_run_id"].to_list())
    )
    assert out.columns[-2:] == ["_run_id", "_interaction_id"]
    path = tmp_path / "out.parquet"
    run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows, write_to=path)
    written = pl.read_parquet(path)
    assert written["_interaction_id"].to_list() == out["_run_id"].to_list()
    assert written.equals(out)
    assert parts_same and all(parts_same)  # every part left the column out: the merge gave it back
