"""The emulator's unkind options: so far, ids that differ across restarts unless seeded."""

from __future__ import annotations

from typing import Any

import pytest
from test_emulator import app_with, body, client, run

from enrich._emulator import EmulatorApp, EmulatorConfig

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
