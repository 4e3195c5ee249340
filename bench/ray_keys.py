"""Ray: one budget per API key across the cluster (`enrich.ray.enrich_dataset`), measured.

    python bench/ray_keys.py [--rows 24000] [--keys 2] [--quota 1000] [--window 3] [--shards 16]

A local Ray (2 CPUs) and the emulator (its own process) with a runs quota per key. Prints, per key:
runs created, the share of its quota used in steady state (the windows after the first and before the
one holding its last create), its 429s over its requests; and for the job: wall time against the ideal
the quotas allow, runs beyond the distinct inputs, requests per row. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from emuproc import EmulatorProcess

from enrich._emulator import STATS_PATH


def steady(creates: list[list[float]], quota: int, window: float) -> float | None:
    t0 = creates[0][0]
    per: dict[int, int] = {}
    for t, n in creates:
        i = int((t - t0) // window)
        per[i] = per.get(i, 0) + int(n)
    inner = range(1, max(per))
    if not inner:
        return None
    return sum(per.get(i, 0) for i in inner) / len(inner) / quota


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=24_000)
    p.add_argument("--keys", type=int, default=2)
    p.add_argument("--quota", type=int, default=1_000, help="runs per window per key")
    p.add_argument("--window", type=float, default=3.0)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--latency", type=float, default=1.0)
    a = p.parse_args()
    names = [f"BENCH_RAY_KEY_{i}" for i in range(a.keys)]
    os.environ.update({n: f"bench-ray-key-{i}" for i, n in enumerate(names)})
    import ray

    from enrich.ray import enrich_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="enrich-ray-bench-"))
    try:
        config = {"latency": a.latency, "api_key": None, "run_rate_limit": a.quota, "rate_window": a.window}
        with EmulatorProcess(**config) as emu:
            df = pl.DataFrame({"company": [f"Company {i:07d}" for i in range(a.rows)]})
            t0 = time.monotonic()
            first: list[float] = []

            def watch() -> None:  # when the first run is created: what Ray takes to start the job
                while not first and time.monotonic() - t0 < 600:
                    if httpx.get(emu.url + STATS_PATH, timeout=60).json()["runs_created"]:
                        first.append(time.monotonic() - t0)
                    time.sleep(0.1)

            threading.Thread(target=watch, daemon=True).start()
            out = enrich_dataset(
                ray.data.from_arrow(df.to_arrow()),
                {"ceo": "Name of the CEO"},
                checkpoint=work / "job.enrich",
                api_keys=names,
                processor="lite-fast",
                base_url=emu.url,
                run_rate=a.quota,
                rate_window=a.window,
                shards_count=a.shards,
            )
            result = pa.concat_tables(ray.get(out.to_arrow_refs()))
            wall = time.monotonic() - t0
            stats = httpx.get(emu.url + STATS_PATH, timeout=60).json()
        completed = sum(1 for s in result.column("_status").to_pylist() if s == "completed")
        per_window = a.quota * a.keys
        ideal = max(a.latency * 1.5, (math.ceil(a.rows / per_window) - 1) * a.window + 1.5 * a.latency)
        print(
            f"rows {a.rows:,}, keys {a.keys}, quota {a.quota:,} runs / {a.window:g} s per key, "
            f"shards {a.shards}"
        )
        print(f"completed {completed:,}/{a.rows:,}; wall {wall:.1f} s (floor the quotas allow {ideal:.1f} s)")
        if first:
            print(f"first run created {first[0]:.1f} s after the call (Ray starting the stages and actors)")
        print(
            f"runs created {stats['runs_created']:,} (beyond distinct: {stats['runs_created'] - a.rows}); "
            f"requests/row {stats['requests_total'] / a.rows:.4f}; 429s {stats['rate_limited']}"
        )
        print("key           runs  steady share  429s/requests")
        for key, spent in stats["per_key"].items():
            share = steady(spent["creates"], a.quota, a.window)
            share_text = "n/a" if share is None else f"{share:.1%}"
            limited, requests = spent["rate_limited"], spent["requests"]
            print(
                f"{key}  {spent['runs']:>6,}  {share_text:>12}  "
                f"{limited}/{requests} ({limited / requests:.1%})"
            )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
