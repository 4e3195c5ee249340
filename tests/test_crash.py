"""Crash test: a job in a subprocess is SIGKILLed at random moments and rerun until it finishes.

Every row must come back with its own answer and the emulator must have created exactly one run per
distinct input, whatever was interrupted: an add-runs in flight, receipts half written, collection.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from enrich import Emulator
from enrich._emulator.synth import synth_output
from enrich._inputs import build_inputs
from enrich._schema import parse_output

WORKER = Path(__file__).with_name("_crash_worker.py")
OUTPUT = {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")}


def run_until_done(
    emu: Emulator, tmp: Path, df: pl.DataFrame, mode: str, kills: int, seed: int
) -> pl.DataFrame:
    source, target, checkpoint = tmp / "in.parquet", tmp / "out.parquet", tmp / "cp"
    df.write_parquet(source)
    rng = random.Random(seed)
    args = [
        sys.executable,
        str(WORKER),
        emu.url,
        emu.api_key,
        str(source),
        str(target),
        str(checkpoint),
        mode,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = 0
    for _attempt in range(kills + 10):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if killed < kills:
            time.sleep(rng.uniform(0.7, 2.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                killed += 1
                continue
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        if target.exists():
            return pl.read_parquet(target)
    raise AssertionError("the job never finished")


@pytest.mark.parametrize("mode", ["group"])
def test_sigkill_and_rerun_creates_each_run_once(tmp_path: Path, mode: str) -> None:
    n = 1000
    df = pl.DataFrame(
        {"company": [f"Company {i % 900}" for i in range(n)], "row": [i % 900 for i in range(n)]}
    )
    faults = frozenset({"lost_create", "html_5xx", "drop"})
    with Emulator(latency=1.0, fault_rate=0.05, faults=faults, seed=11) as emu:
        out = run_until_done(emu, tmp_path, df, mode, kills=5, seed=5)
        stats = emu.stats()
    assert out.height == n and out["row"].to_list() == df["row"].to_list()
    assert set(out["_status"]) == {"completed"}
    schema = parse_output(OUTPUT).task_spec()["output_schema"]
    want = [synth_output(i, schema, processor="lite")[0] for i in build_inputs(df)]
    assert out["ceo"].to_list() == [w["ceo"] for w in want]
    assert out["founded"].to_list() == [w["founded"] for w in want]
    assert stats["runs_created"] == 900, stats
    assert stats["duplicate_runs"] == 0
