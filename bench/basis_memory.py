"""Memory of a job that asks for the basis: the client's peak RSS against the size of its result.

Run with `python bench/basis_memory.py [--rows 20000] [--basis-bytes 3000] [--no-basis] [--write
out.parquet]`. The emulator
runs in a process of its own (`bench/emuproc.py`), answers with the sample schema's seven fields and,
with `--basis-bytes`, a basis of about that many bytes per field (real core/pro answers carry several
KB). The job runs in this process, in group mode, with a fresh checkpoint in a temporary directory;
the line printed gives the wall time, this process's peak RSS and the result frame's size. With
`--write`, the result goes to that file as `enrich run -o` writes it (`write_to`: joined a part at a
time, never whole in memory) and the file's size is printed instead. No pass/fail: issue 12's targets
are read off it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from emuproc import EmulatorProcess
from engine import peak_rss_mb
from scale import synthetic_input

from enrich import JobStats, aenrich

SCHEMA = Path(__file__).parents[1] / "sample_data" / "companies_schema.json"
WINDOW = 6.0
REQUESTS = 2_000
RUNS = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--basis-bytes", type=int, default=None, help="the emulator's basis size per field")
    parser.add_argument("--no-basis", action="store_true", help="the same job without basis=True")
    parser.add_argument("--write", default=None, help="write the result to this file (as enrich run -o)")
    args = parser.parse_args()
    schema = json.loads(SCHEMA.read_text())
    df = synthetic_input(args.rows)
    config = {"latency": 1.0, "rate_limit": REQUESTS, "run_rate_limit": RUNS, "rate_window": WINDOW}
    if args.basis_bytes is not None:
        config["basis_bytes"] = args.basis_bytes
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(**config) as emu:
        started = time.monotonic()
        out = asyncio.run(
            aenrich(
                df,
                schema,
                processor="core",
                base_url=emu.url,
                api_key=emu.api_key,
                checkpoint=Path(tmp) / "cp",
                progress=False,
                basis=not args.no_basis,
                stats=JobStats(),
                rate_limit=REQUESTS,
                run_rate=RUNS,
                rate_window=WINDOW,
                write_to=args.write,
            )
        )
        wall = time.monotonic() - started
    size = (
        f"result_frame={out.estimated_size('mb'):,.0f} MB"
        if args.write is None
        else f"written={Path(args.write).stat().st_size / 1e6:,.0f} MB ({args.write})"
    )
    print(
        f"rows={args.rows:,} basis={not args.no_basis} basis_bytes={args.basis_bytes} wall={wall:.1f} s "
        f"peak_rss={peak_rss_mb():,.0f} MB {size}"
    )


if __name__ == "__main__":
    main()
