"""`enrich run`, with the rate limiter's window scaled down, for the torture tests (tests/test_torture.py).

The CLI has no flag for the limiter's window: it is a minute, as the API counts. This runs the very same
command (`enrich._cli.main`) with `rate_window` set to ENRICH_TORTURE_WINDOW seconds, so a low
`--run-rate` makes many small add-runs calls within a few seconds, and kills land between them. The
window is not part of the job's fingerprint: `python -m enrich` with the same arguments resumes the job.

Usage: python tests/_torture_worker.py run INPUT -o OUTPUT ...   (the arguments of `enrich`)
"""

import functools
import os
import sys

import enrich._engine as engine
from enrich._cli import main

engine.enrich = functools.partial(engine.enrich, rate_window=float(os.environ["ENRICH_TORTURE_WINDOW"]))
sys.exit(main(sys.argv[1:]))
