"""The emulator's unkind options: late commits, streams closed early, token-bucket quotas, unseeded ids.

Each test fails without its option. Most drive the ASGI app in-process (`httpx.ASGITransport`); the
hang-up and clean-close tests go over real HTTP on 127.0.0.1, where a connection can really close.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from test_emulator import app_with, assert_error, body, client, run, sse

from enrich._cli import main
from enrich._emulator import Emulator, EmulatorApp, EmulatorConfig, _Bucket

LATE = 0.2  # seconds: long enough to look before the commit, short enough for a fast suite


async def group_view(
    c: httpx.AsyncClient, gid: str
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """What a client can see of a group: its run count, its runs stream, its events stream."""
    count = (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]["num_task_runs"]
    runs = sse((await c.get(f"/v1/tasks/groups/{gid}/runs")).text)
    events = sse((await c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": 0.01})).text)
    return count, runs, events


# --------------------------------------------------------------------------------------------------
# Late commits


def test_late_commit_gateway_answers_504_at_once_and_the_runs_appear_later() -> None:
    app = app_with(latency=60, late_commit_seconds=LATE)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            started = time.monotonic()
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            assert time.monotonic() - started < LATE / 2
            assert r.status_code == 504 and r.headers["content-type"] == "text/html"
            assert "504 Gateway Time-out" in r.text
            single = await c.post("/v1/tasks/runs", json=body())
            assert single.status_code == 504
            assert await group_view(c, gid) == (0, [], [])
            stats = app.stats()
            assert stats["runs_created"] == 0 and stats["late_commits"] == 0
            assert stats["late_commits_pending"] == 2
            await asyncio.sleep(LATE + 0.05)
            count, runs, events = await group_view(c, gid)
            assert count == 3 and len(runs) == 3
            assert [e["type"] for e in events] == ["task_group_status"]
        stats = app.stats()
        assert stats["runs_created"] == 4 and stats["late_commits"] == 2
        assert stats["late_commits_pending"] == 0 and stats["responses"]["504"] == 2

    run(go())


def test_late_commit_after_answers_once_committed_with_the_ids_the_commit_created() -> None:
    app = app_with(latency=60, late_commit_seconds=LATE, late_commit_answer="after")

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            started = time.monotonic()
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            assert time.monotonic() - started >= LATE
            assert r.status_code == 200
            listed = [e["run"]["run_id"] for e in sse((await c.get(f"/v1/tasks/groups/{gid}/runs")).text)]
            assert r.json()["run_ids"] == listed and r.json()["status"]["num_task_runs"] == 3
            single = await c.post("/v1/tasks/runs", json=body())
            assert single.status_code == 202
            assert (await c.get(f"/v1/tasks/runs/{single.json()['run_id']}")).status_code == 200

    run(go())


def test_late_commit_lands_although_the_client_cancelled_its_request() -> None:
    app = app_with(latency=60, late_commit_seconds=LATE, late_commit_answer="after")

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            add = asyncio.ensure_future(c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 2}))
            await asyncio.sleep(LATE / 4)
            add.cancel()
            with pytest.raises(asyncio.CancelledError):
                await add
            assert (await group_view(c, gid))[0] == 0
            await asyncio.sleep(LATE)
            count, runs, _ = await group_view(c, gid)
            assert count == 2 and len(runs) == 2
        assert app.stats()["late_commits"] == 1

    run(go())


def test_late_commit_admits_on_arrival_against_the_rate_limit_and_the_credit() -> None:
    limited = app_with(late_commit_seconds=LATE, run_rate_limit=1, rate_window=60)
    poor = app_with(late_commit_seconds=LATE, credit=0.015)  # base costs $0.01 a run

    async def go() -> None:
        async with client(limited) as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 504
            assert_error(await c.post("/v1/tasks/runs", json=body()), 429)
        async with client(poor) as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 504
            assert_error(await c.post("/v1/tasks/runs", json=body()), 402)
            await asyncio.sleep(LATE + 0.05)
        for app in (limited, poor):
            assert app.stats()["runs_created"] == 1 and app.stats()["late_commits"] == 1
        assert poor.stats()["credit_spent"] == pytest.approx(0.01)

    run(go())


def test_late_commit_still_pending_when_its_loop_ends_creates_nothing_and_frees_its_credit() -> None:
    app = app_with(late_commit_seconds=LATE, credit=0.015)

    async def create() -> int:
        async with client(app) as c:
            return (await c.post("/v1/tasks/runs", json=body())).status_code

    assert run(create()) == 504  # the loop ends while the commit waits on its timer
    stats = app.stats()
    assert stats["runs_created"] == 0 and stats["late_commits_pending"] == 0
    assert stats["credit_spent"] == 0


def test_late_commit_rate_is_a_seeded_share_of_creates() -> None:
    def codes(app: EmulatorApp) -> list[int]:
        async def go() -> list[int]:
            async with client(app) as c:
                return [(await c.post("/v1/tasks/runs", json=body())).status_code for _ in range(60)]

        return run(go())

    first = codes(app_with(late_commit_seconds=5.0, late_commit_rate=0.5))
    assert set(first) == {202, 504} and 15 <= first.count(504) <= 45
    assert codes(app_with(late_commit_seconds=5.0, late_commit_rate=0.5)) == first  # as if seed 0
    assert codes(app_with(late_commit_seconds=5.0, late_commit_rate=0.5, seed=0)) == first
    assert codes(app_with(late_commit_seconds=5.0, late_commit_rate=0.0)) == [202] * 60


def test_emulator_late_commit_lands_after_the_client_hung_up() -> None:
    with (
        Emulator(latency=60, late_commit_seconds=LATE, late_commit_answer="after") as emu,
        httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as c,
    ):
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3}, timeout=LATE / 4)
        assert c.get(f"/v1/tasks/groups/{gid}").json()["status"]["num_task_runs"] == 0
        time.sleep(LATE + 0.1)
        assert c.get(f"/v1/tasks/groups/{gid}").json()["status"]["num_task_runs"] == 3
        stats = emu.stats()
        assert stats["late_commits"] == 1 and stats["runs_created"] == 3
        assert stats["requests"]["POST /v1/tasks/groups/{taskgroup_id}/runs"] == 1
        assert stats["responses"] == {"200": 3}  # the group's create and two GETs: the add got no answer


# --------------------------------------------------------------------------------------------------
# Streams closed on the service's own timer


def test_stream_close_ends_a_group_events_stream_while_runs_are_active() -> None:
    app = app_with(latency=60, stream_close_seconds=0.2)

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 2})
            started = time.monotonic()
            r = await c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": 5})
            assert 0.2 <= time.monotonic() - started < 1.0
            events = sse(r.text)
            assert [e["type"] for e in events] == ["task_group_status"]
            assert events[0]["status"]["is_active"] is True
            assert (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]["is_active"] is True
        assert app.stats()["streams_closed_early"] == 1

    run(go())


def test_stream_close_ends_run_events_and_leaves_streams_that_end_sooner_alone() -> None:
    app = app_with(latency=60, stream_close_seconds=0.2)

    async def go() -> None:
        async with client(app) as c:
            rid = (await c.post("/v1/tasks/runs", json=body())).json()["run_id"]
            started = time.monotonic()
            events = sse((await c.get(f"/v1/tasks/runs/{rid}/events")).text)
            assert 0.2 <= time.monotonic() - started < 1.0
            assert events[0]["type"] == "task_run.state" and events[0]["run"]["is_active"] is True
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
            assert len(sse((await c.get(f"/v1/tasks/groups/{gid}/runs")).text)) == 1  # a snapshot
        assert app.stats()["streams_closed_early"] == 1

    run(go())


def test_emulator_stream_close_is_a_clean_end_of_the_body() -> None:
    with (
        Emulator(latency=60, stream_close_seconds=0.2) as emu,
        httpx.Client(base_url=emu.url, headers={"x-api-key": emu.api_key}) as c,
    ):
        gid = c.post("/v1/tasks/groups", json={}).json()["taskgroup_id"]
        c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()]})
        started = time.monotonic()
        with c.stream("GET", f"/v1/tasks/groups/{gid}/events") as r:
            text = "".join(r.iter_text())  # no RemoteProtocolError: the body ended as a body ends
        assert 0.2 <= time.monotonic() - started < 1.5
        assert [e["type"] for e in sse(text)] == ["task_group_status"]
        assert emu.stats()["streams_closed_early"] == 1


# --------------------------------------------------------------------------------------------------
# Token buckets


def test_bucket_refills_at_its_rate_and_never_fits_more_than_its_capacity() -> None:
    bucket = _Bucket(60, 60.0, 5)  # 1 unit a second, at most 5 at once
    assert bucket.wait_time(0.0, 5) == 0.0
    bucket.add(0.0, 5)
    assert bucket.wait_time(0.0, 1) == pytest.approx(1.0)
    assert bucket.wait_time(0.5, 2) == pytest.approx(1.5)
    assert bucket.wait_time(100.0, 5) == 0.0  # full again, never more than full
    assert bucket.wait_time(100.0, 6) == 60.0  # more than the capacity: a full window, every time
    bucket.add(100.0, 5)
    bucket.undo_last()
    assert bucket.wait_time(100.0, 5) == 0.0


def test_run_burst_refuses_an_add_over_it_every_time_while_smaller_adds_pass() -> None:
    app = app_with(run_rate_limit=600, rate_window=60, run_burst=5)  # 10 runs a second, 5 at once

    async def go() -> None:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            for _ in range(3):
                r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 6})
                assert_error(r, 429)
                assert float(r.headers["retry-after"]) == 60.0
            assert (
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 5})
            ).status_code == 200
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 2})
            assert_error(r, 429)
            wait = float(r.headers["retry-after"])
            assert 0.1 < wait <= 0.2
            await asyncio.sleep(wait + 0.01)
            assert (
                await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 2})
            ).status_code == 200
            assert (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]["num_task_runs"] == 7
        stats = app.stats()
        assert stats["runs_created"] == 7 and stats["rate_limited"] == 4

    run(go())


def test_rate_burst_makes_the_request_limit_a_token_bucket() -> None:
    app = app_with(rate_limit=6, rate_window=1.0, rate_burst=3)  # 6 a second, 3 at once

    async def go() -> None:
        async with client(app) as c:
            for _ in range(3):
                assert (await c.get("/v1/tasks/runs/trun_x")).status_code == 404
            r = await c.get("/v1/tasks/runs/trun_x")
            assert_error(r, 429)
            wait = float(r.headers["retry-after"])
            assert 0 < wait <= 1 / 6 + 0.001
            await asyncio.sleep(wait + 0.005)
            assert (await c.get("/v1/tasks/runs/trun_x")).status_code == 404  # the 429 cost no token

    run(go())


def test_bursts_answer_429_without_retry_after_when_told() -> None:
    app = app_with(rate_limit=1, rate_window=60, rate_burst=1, run_rate_limit=10, run_burst=2)
    app_runs = app_with(run_rate_limit=10, rate_window=60, run_burst=2, retry_after_header=False)
    app_reqs = app_with(rate_limit=1, rate_window=60, rate_burst=1, retry_after_header=False)

    async def go() -> None:
        async with client(app) as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            assert "retry-after" in (await c.post("/v1/tasks/runs", json=body())).headers
        async with client(app_reqs) as c:
            assert (await c.post("/v1/tasks/runs", json=body())).status_code == 202
            r = await c.post("/v1/tasks/runs", json=body())
            assert r.status_code == 429 and "retry-after" not in r.headers
        async with client(app_runs) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            r = await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})
            assert r.status_code == 429 and "retry-after" not in r.headers

    run(go())


def test_burst_options_are_validated() -> None:
    with pytest.raises(ValueError, match="run_burst needs run_rate_limit"):
        EmulatorConfig(run_burst=5)
    with pytest.raises(ValueError, match="rate_burst needs rate_limit"):
        EmulatorConfig(rate_limit=None, rate_burst=5)
    with pytest.raises(ValueError, match="rate_burst must be >= 1"):
        EmulatorConfig(rate_burst=0)
    for bad in (
        {"late_commit_seconds": -1.0},
        {"late_commit_rate": 1.5},
        {"late_commit_answer": "later"},
        {"stream_close_seconds": 0.0},
    ):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)


# --------------------------------------------------------------------------------------------------
# Ids across restarts


def _session(app: EmulatorApp) -> dict[str, Any]:
    """Ids, draws and outputs of one fixed sequence of requests."""

    async def go() -> dict[str, Any]:
        async with client(app) as c:
            gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            add = (await c.post(f"/v1/tasks/groups/{gid}/runs", json={"inputs": [body()] * 3})).json()
            ref = (await c.get("/v1/tasks/runs/trun_x")).json()["error"]["ref_id"]
            runs = [app.state.runs[rid] for rid in add["run_ids"]]
            return {
                "group": gid,
                "runs": add["run_ids"],
                "ref": ref,
                "failure_refs": [r.error_ref for r in runs],
                "durations": [(r.start - r.created, r.end - r.created, r.fails) for r in runs],
                "outputs": [app.state.run_output(r) for r in runs],
            }

    return run(go())


def test_unseeded_emulators_hand_out_different_ids_but_the_same_draws() -> None:
    assert EmulatorConfig().seed is None
    a, b = _session(app_with(failure_rate=0.6)), _session(app_with(failure_rate=0.6))
    zero = _session(app_with(failure_rate=0.6, seed=0))
    assert a["group"] != b["group"] and a["ref"] != b["ref"]
    assert not set(a["runs"]) & set(b["runs"])
    assert any(a["failure_refs"]) and a["failure_refs"] != b["failure_refs"]
    for other in (b, zero):
        assert [d[2] for d in a["durations"]] == [d[2] for d in other["durations"]]
        times = [t for d in other["durations"] for t in d[:2]]
        assert [t for d in a["durations"] for t in d[:2]] == pytest.approx(times)
        assert a["outputs"] == other["outputs"]


def test_seeded_emulators_hand_out_the_same_ids() -> None:
    a, b = _session(app_with(failure_rate=0.6, seed=4)), _session(app_with(failure_rate=0.6, seed=4))
    other = _session(app_with(failure_rate=0.6, seed=5))
    for key in ("group", "runs", "ref", "failure_refs"):
        assert a[key] == b[key] != other[key]
    assert a["outputs"] == b["outputs"] == other["outputs"]


# --------------------------------------------------------------------------------------------------
# `enrich emulate`


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[EmulatorConfig]:
    """The configs `enrich emulate` would serve, without serving them."""
    configs: list[EmulatorConfig] = []

    def fake_serve(config: EmulatorConfig, host: str, port: int) -> None:
        configs.append(config)

    monkeypatch.setattr("enrich._emulator.serve", fake_serve)
    return configs


def test_cli_emulate_maps_its_flags_to_the_config(served: list[EmulatorConfig]) -> None:
    assert main(["emulate", "--port", "0"]) == 0  # (any free port: 8787 may be in use here)
    default = served.pop()
    assert (
        default.seed is None and default.late_commit_seconds == 0.0 and default.stream_close_seconds is None
    )
    assert default.own_interaction_ids is False
    argv = [
        *("emulate", "--port", "0"),
        *("--late-commit", "2.5", "--late-commit-rate", "0.3", "--late-commit-answer", "after"),
        *("--stream-close", "30", "--rate-limit", "100", "--rate-burst", "10"),
        *("--run-rate-limit", "2000", "--run-burst", "500", "--rate-window", "30"),
        *("--no-retry-after", "--seed", "7", "--credit", "5", "--faults", "drop,slow"),
        "--own-interaction-ids",
    ]
    assert main(argv) == 0
    config = served.pop()
    assert (config.late_commit_seconds, config.late_commit_rate, config.late_commit_answer) == (
        2.5,
        0.3,
        "after",
    )
    assert config.stream_close_seconds == 30.0 and config.rate_window == 30.0
    assert (config.rate_limit, config.rate_burst, config.run_rate_limit, config.run_burst) == (
        100,
        10,
        2000,
        500,
    )
    assert config.retry_after_header is False and config.seed == 7 and config.credit == 5.0
    assert config.faults == frozenset({"drop", "slow"}) and config.own_interaction_ids is True
    assert main(["emulate", "--port", "0", "--seed", "none"]) == 0 and served.pop().seed is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--late-commit", "-1"], "late_commit_seconds must be >= 0"),
        (["--late-commit-rate", "2"], "late_commit_rate must be within [0, 1]"),
        (["--late-commit-answer", "later"], "late_commit_answer must be gateway or after"),
        (["--stream-close", "0"], "stream_close_seconds must be > 0"),
        (["--run-burst", "5"], "run_burst needs run_rate_limit"),
        (["--rate-limit", "0", "--rate-burst", "5"], "rate_burst needs rate_limit"),
        (["--rate-window", "0"], "rate_window must be > 0"),
    ],
)
def test_cli_emulate_bad_values_exit_2_with_one_line(
    served: list[EmulatorConfig], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["emulate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("enrich: error: ") and message in err[0]
    assert served == []


def test_cli_emulate_refuses_a_seed_that_is_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["emulate", "--seed", "abc"])
    assert exc.value.code == 2
    assert "expected an integer or none" in capsys.readouterr().err
