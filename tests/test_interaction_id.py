"""`_interaction_id` (issue 13): each run's `interaction_id`, as the service gave it, recorded with the run's
outcome and joined next to `_run_id`: in frames and files, with and without the basis, in shards, spooled
tables and settled states. A checkpoint that did not record it gives null, never a made-up id.
Against the emulator, in-process, and over HTTP for the follow-up chain it enables.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow.parquet as pq
import pytest

from enrich import Emulator, EmulatorConfig, create_app
from enrich._checkpoint import SETTLED, Checkpoint
from enrich._cli import main as cli
from enrich._engine import aenrich, spool

CEO = {"ceo": "Name of the current CEO"}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame({"company": [f"Company {i}" for i in range(n)]})


def run_job(app: Any, data: Any, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    return asyncio.run(
        aenrich(data, CEO, base_url="http://emulator", transport=httpx.ASGITransport(app=app), **kw)
    )


def interaction_ids(app: Any, run_ids: list[str | None]) -> list[str | None]:
    """Each run's interaction_id as the emulator answers GET /v1/tasks/runs/{id}."""

    async def main() -> list[str | None]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as c:
            got: list[str | None] = []
            for r in run_ids:
                got.append(
                    None
                    if r is None
                    else (await c.get(f"/v1/tasks/runs/{r}", headers={"x-api-key": "k"})).json()[
                        "interaction_id"
                    ]
                )
            return got

    return asyncio.run(main())


def without_interaction_ids(root: Path) -> int:
    """Rewrite every outcome segment under `root` as an enrich that did not record interaction ids wrote
    it (the column absent, the footer kept), and drop the settled states; returns the segments rewritten."""
    n = 0
    for path in sorted(root.rglob("outcomes-*.parquet")):
        table = pq.read_table(path)
        meta = table.schema.metadata
        table = table.drop_columns(["interaction_id"]).replace_schema_metadata(meta)
        pq.write_table(table, path, compression="zstd", write_page_checksum=True)
        n += 1
    for path in root.rglob(SETTLED):
        path.unlink()
    return n


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_each_row_gets_its_runs_interaction_id_next_to_its_run_id(tmp_path: Path, mode: str) -> None:
    app = create_app(EmulatorConfig(latency=0.05, failure_rate=0.3, seed=2))
    df = pl.concat([companies(12), companies(3)])  # repeats share their run, and its interaction id
    out = run_job(app, df, checkpoint=tmp_path / "cp", mode=mode)
    assert out.columns[-4:] == ["_status", "_error", "_run_id", "_interaction_id"]
    assert out.schema["_interaction_id"] == pl.String
    assert {"completed", "failed"} <= set(out["_status"])  # a failed run's id is kept too
    assert out["_interaction_id"].null_count() == 0
    assert out["_interaction_id"].to_list() == interaction_ids(app, out["_run_id"].to_list())


def test_written_files_with_the_basis_and_a_resume_carry_it(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(10)
    frame = run_job(app, df, checkpoint=tmp_path / "cp", basis=True)
    assert frame.columns[-3:] == ["_run_id", "_interaction_id", "_basis"]
    want = interaction_ids(app, frame["_run_id"].to_list())
    assert frame["_interaction_id"].to_list() == want
    for name in ("out.parquet", "out.csv", "out.jsonl"):
        assert run_job(app, df, checkpoint=tmp_path / "cp", basis=True, write_to=tmp_path / name) is None
    assert pl.read_parquet(tmp_path / "out.parquet")["_interaction_id"].to_list() == want
    assert pl.read_csv(tmp_path / "out.csv")["_interaction_id"].to_list() == want
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["_interaction_id"] for line in lines] == want
    assert app.stats()["runs_created"] == 10  # (read from the checkpoint each time)


def test_shards_spooled_tables_and_settled_states_carry_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool, "STREAM_ROWS", 20)  # a LazyFrame of more rows is set aside on disk
    monkeypatch.setattr(spool, "BATCH_ROWS", 7)
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(48)
    first = run_job(app, df.lazy(), checkpoint=tmp_path / "cp", _shard_rows=8)
    assert Checkpoint.read(tmp_path / "cp").shards > 1
    want = interaction_ids(app, first["_run_id"].to_list())
    assert first["_interaction_id"].to_list() == want
    assert list((tmp_path / "cp").rglob(SETTLED))  # the shards kept their settled states
    requests = app.stats()["requests_total"]
    for data in (df, df.lazy()):  # joined from the settled states, in memory and spooled
        again = run_job(app, data, checkpoint=tmp_path / "cp", _shard_rows=8)
        assert again["_interaction_id"].to_list() == want
    out = tmp_path / "out.parquet"
    run_job(app, df.lazy(), checkpoint=tmp_path / "cp", _shard_rows=8, write_to=out)
    assert pl.read_parquet(out)["_interaction_id"].to_list() == want
    assert app.stats()["requests_total"] == requests


def test_a_settled_state_of_an_older_enrich_is_read_again_from_the_segments(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(40)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8)
    settled = sorted((tmp_path / "cp").rglob(SETTLED))
    assert settled
    for path in settled:  # as the previous version kept it: no interaction_id column, version 2
        table = pq.read_table(path)
        meta = {**table.schema.metadata, b"enrich.version": b"2"}
        pq.write_table(table.drop_columns(["interaction_id"]).replace_schema_metadata(meta), path)
    again = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=8)
    assert again.equals(first) and again["_interaction_id"].null_count() == 0


@pytest.mark.parametrize("shard_rows", [1 << 20, 8])
def test_a_checkpoint_that_did_not_record_it_gives_null_and_resumes(tmp_path: Path, shard_rows: int) -> None:
    app = create_app(EmulatorConfig(latency=0.05))
    df = companies(24)
    first = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    assert without_interaction_ids(tmp_path / "cp") > 0
    created = app.stats()["runs_created"]
    old = run_job(app, df, checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    assert old["_interaction_id"].null_count() == df.height  # never made up
    assert old.drop("_interaction_id").equals(first.drop("_interaction_id"))
    assert app.stats()["runs_created"] == created
    # New rows of the same job record theirs beside the old ones.
    more = run_job(app, companies(30), checkpoint=tmp_path / "cp", _shard_rows=shard_rows)
    assert more["_interaction_id"].head(24).null_count() == 24
    assert more["_interaction_id"].tail(6).to_list() == interaction_ids(
        app, more["_run_id"].tail(6).to_list()
    )


# -- the chain it enables: a follow-up job on the same research --------------------------------------


def stored_inputs(emu: Emulator, run_ids: list[str]) -> list[dict[str, Any]]:
    """Each run's input as the service stored it (GET /v1/tasks/runs/{id}/input)."""
    headers = {"x-api-key": emu.api_key}
    return [httpx.get(f"{emu.url}/v1/tasks/runs/{r}/input", headers=headers).json() for r in run_ids]


def test_a_follow_up_job_names_each_rows_interaction_from_python(tmp_path: Path) -> None:
    df = companies(6)
    with Emulator(latency=0.05) as emu:
        kw: dict[str, Any] = {
            "api_key": emu.api_key,
            "base_url": emu.url,
            "processor": "lite",
            "progress": False,
        }
        first = asyncio.run(aenrich(df, CEO, checkpoint=tmp_path / "first", **kw))
        follow = asyncio.run(
            aenrich(
                first,
                {"cfo": "Name of the CFO"},
                checkpoint=tmp_path / "follow",
                run_options={"previous_interaction_id": "{_interaction_id}"},
                **kw,
            )
        )
        sent = stored_inputs(emu, follow["_run_id"].to_list())
    assert [s["previous_interaction_id"] for s in sent] == first["_interaction_id"].to_list()
    assert follow["ceo"].to_list() == first["ceo"].to_list()  # the first answers, carried through
    assert set(follow["_status"]) == {"completed"}
    # the follow-up's own runs, with their own interaction ids, replace the earlier ones in the output
    assert not set(follow["_interaction_id"]) & set(first["_interaction_id"])


def test_a_follow_up_job_names_each_rows_interaction_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, first, second = tmp_path / "in.csv", tmp_path / "first.parquet", tmp_path / "second.parquet"
    companies(5).write_csv(source)
    options = tmp_path / "follow.json"
    options.write_text(json.dumps({"previous_interaction_id": "{_interaction_id}"}))
    with Emulator(latency=0.05) as emu:
        monkeypatch.setenv("PARALLEL_API_KEY", emu.api_key)
        common = ["--processor", "lite", "--no-progress", "--base-url", emu.url]
        assert cli(["run", str(source), "-o", str(first), "--field", "ceo=CEO", *common]) == 0
        args = ["run", str(first), "-o", str(second), "--field", "cfo=CFO", "--run-options", str(options)]
        assert cli([*args, *common]) == 0
        done = pl.read_parquet(second)
        sent = stored_inputs(emu, done["_run_id"].to_list())
    assert [s["previous_interaction_id"] for s in sent] == pl.read_parquet(first)["_interaction_id"].to_list()
