"""Run one enrich job in its own process, for the crash tests (they SIGKILL it at random moments).

Usage: python tests/_crash_worker.py BASE_URL API_KEY INPUT.parquet OUTPUT.parquet CHECKPOINT MODE
"""

import sys

import polars as pl

from enrich._engine import enrich

base_url, api_key, source, target, checkpoint, mode = sys.argv[1:7]
out = enrich(
    pl.read_parquet(source),
    {"ceo": "Name of the CEO", "founded": ("integer", "Year founded")},
    processor="lite",
    checkpoint=checkpoint,
    mode=mode,
    api_key=api_key,
    base_url=base_url,
    progress=False,
    # Small batches under a scaled window: many add-runs calls, so kills land between them.
    run_rate=50,
    rate_window=0.4,
    # This emulator commits a create at once or never: a second is ample before a lost one is sent again.
    commit_horizon=1.0,
)
out.write_parquet(target + ".tmp")
import os  # noqa: E402

os.replace(target + ".tmp", target)
