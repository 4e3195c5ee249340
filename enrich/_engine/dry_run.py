"""The dry run: what a job would do (rows, distinct inputs, runs already recorded, cost, time under the
quota), worked out without sending anything (`plan()`, `enrich run --dry-run`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from enrich._checkpoint import Checkpoint
from enrich._client import service_of
from enrich._engine.job import OUTCOMES, retry_statuses
from enrich._engine.prepare import _checkpoint_path, _Plan
from enrich._engine.shards import area_states
from enrich._engine.spool import BUCKETS, Spool, _prepare_any
from enrich._exceptions import (
    UsageError,
)
from enrich._processors import PROCESSORS
from enrich._run_options import check_run_options
from enrich._store import CheckpointStore, as_store


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a job would do, worked out without sending anything (`plan()`, `enrich run --dry-run`).

    Counts are of distinct inputs (runs), except `rows`. Money is in US dollars at list prices;
    `None` when the processor has no known price. `seconds` is a rough wall-time estimate under the
    rate budgets: the processor's typical latency plus the time the budgets need to submit everything.
    """

    rows: int
    distinct: int
    done: int
    running: int
    to_submit: int
    refused: int
    processor: str
    mode: str
    price_per_run: float | None
    spent: float | None
    cost: float | None
    seconds: float
    checkpoint: str | None
    #: What `seconds` assumes: a run's typical (low, high) seconds for the processor (None: unknown,
    #: 300 s taken) and the runs created per minute.
    latency: tuple[float, float] | None = None
    run_rate: int | None = None
    rate_limit: int | None = None
    rate_window: float = 60.0

    def lines(self) -> list[str]:
        """The plan as short lines for a terminal."""

        def money(x: float | None) -> str:
            return "unknown (no list price)" if x is None else f"${x:,.2f}"

        return [
            f"rows:               {self.rows:,}",
            f"distinct inputs:    {self.distinct:,}",
            f"already done:       {self.done:,} (in the checkpoint)",
            f"submitted, running: {self.running:,} (collected, not paid again)",
            f"refused locally:    {self.refused:,} (not sent: too large or failing input_schema)",
            f"runs to submit:     {self.to_submit:,}",
            f"processor:          {self.processor} ({money(self.price_per_run and self.price_per_run * 1000)}"
            " per 1,000 runs)",
            f"estimated cost:     {money(self.cost)} (spent so far: {money(self.spent)})",
            f"estimated time:     {_duration(self.seconds)} in {self.mode} mode{self._assumes()}",
            f"checkpoint:         {self.checkpoint or '(temporary)'}",
        ]

    def _assumes(self) -> str:
        if not self.seconds or self.run_rate is None:
            return ""
        if self.latency is None:
            took = "runs of an unknown processor take 5 min"
        else:
            lo, hi = self.latency
            took = f"runs take {_short(lo)} to {_short(hi)}, {_short((lo + hi) / 2)} on average"
        per = "a minute" if self.rate_window == 60 else f"per {self.rate_window:g} s"
        rates = f"{self.run_rate:,} runs created"
        if self.mode == "runs" and self.rate_limit is not None:  # (a create and a read per run)
            rates += f" and {self.rate_limit:,} requests"
        return f" (assumes {took}, and {rates} {per})"


def _short(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def plan(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    run_options: Mapping[str, Any] | None = None,
    beta: str | Sequence[str] | None = None,
    processor: str = "core",
    checkpoint: str | os.PathLike[str] | CheckpointStore | bool | None = None,
    mode: str = "group",
    retry_failed: bool | str | Collection[str] = False,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
) -> JobPlan:
    """Work out what `enrich()` with the same arguments would submit and cost, sending nothing.

    The checkpoint, when it exists, is read (never written or created) and must belong to this job.

    Example::

        p = plan(df, {"ceo": "CEO name"}, processor="base", checkpoint="ceo.enrich")
        print("\n".join(p.lines()))
    """
    estimate, prepared = _plan_and_prepared(
        data,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        run_options=run_options,
        beta=beta,
        processor=processor,
        checkpoint=checkpoint,
        mode=mode,
        retry_failed=retry_failed,
        base_url=base_url,
        service=service,
        rate_limit=rate_limit,
        run_rate=run_rate,
        rate_window=rate_window,
    )
    if isinstance(prepared, Spool):
        prepared.remove()
    assert estimate is not None
    return estimate


def _plan_and_prepared(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    run_options: Mapping[str, Any] | None = None,
    beta: str | Sequence[str] | None = None,
    processor: str = "core",
    checkpoint: str | os.PathLike[str] | CheckpointStore | bool | None = None,
    mode: str = "group",
    retry_failed: bool | str | Collection[str] = False,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
    estimate: bool = True,
) -> tuple[JobPlan | None, _Plan | Spool]:
    """`plan()`, and the preparation it made, which `enrich run` hands to the job (`_prepared`) so
    that a million rows are not keyed twice (6 s of a resume). Without `estimate` only the
    preparation (the plan is None): reading every shard's state for a plan nobody reads was 3 s of a
    10M-row resume."""
    job = _prepare_any(
        data,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
        near=_directory(checkpoint),
        options=check_run_options(run_options, beta, processor),
    )
    if not estimate:
        return None, job
    try:
        return _estimate(
            job,
            checkpoint=checkpoint,
            retry_failed=retry_failed,
            base_url=base_url,
            service=service,
            rate_limit=rate_limit,
            run_rate=run_rate,
            rate_window=rate_window,
        ), job
    except BaseException:
        if isinstance(job, Spool):
            job.remove()
        raise


def _estimate(
    job: _Plan | Spool,
    *,
    checkpoint: str | os.PathLike[str] | CheckpointStore | bool | None,
    retry_failed: bool | str | Collection[str],
    base_url: str | None,
    service: str | None,
    rate_limit: int,
    run_rate: int,
    rate_window: float,
) -> JobPlan:
    spool = job if isinstance(job, Spool) else None
    the = spool.template if spool is not None else job
    assert isinstance(the, _Plan)
    processor, mode = the.processor, the.mode
    if rate_limit <= 0 or run_rate <= 0 or rate_window <= 0:  # the estimate below divides by them
        raise UsageError(
            "rate_limit and run_rate must be positive numbers of requests/runs per minute, and "
            "rate_window a positive number of seconds"
        )
    done = running = 0
    runs_created = 0
    again = retry_statuses(retry_failed)
    ended = [s for s in OUTCOMES if s not in again]  # rows sent again are not done
    svc = service if service is not None else service_of(base_url)
    path = None
    if checkpoint is not False:
        keys = spool.sorted_keys() if spool is not None else the.keys
        path = _checkpoint_path(checkpoint, the.fingerprint, svc, keys, ordered=spool is not None)[0]
    if path is not None and "manifest.json" in as_store(path).list("manifest.json"):
        cp = Checkpoint.read(path)
        cp.check_fingerprint(the.fingerprint)
        cp.check_service(svc)
        everyone = None
        if spool is None:
            everyone = pl.Series(the.keys, dtype=pl.String).unique()
        if spool is not None and cp.shards == 1:
            everyone = spool.summary(0, BUCKETS)
        seen = set()
        # A job split in shards: one checkpoint each under the root, read one at a time.
        for shard, area in area_states(cp, columns=("row_key", "status")):
            runs_created += area.runs
            seen.add(shard)
            if everyone is None:
                assert spool is not None
                keys_of = spool.summary(*spool.buckets(shard, cp.shards))  # (counted as it is read)
            else:
                keys_of = everyone
            refused = spool.refused if spool is not None else the.local_errors
            refused_keys = pl.Series(list(refused), dtype=pl.String)
            wanted = keys_of.filter(~keys_of.is_in(refused_keys.implode())).implode()
            state = area.state.filter(pl.col("row_key").is_in(wanted))
            finished = state.filter(pl.col("status").is_in(ended))
            done += finished.height
            running += state.filter(pl.col("status") == "submitted").height
        if spool is not None and not spool.counted:  # files of shards never made, and their counts
            for shard in set(range(cp.shards)) - seen:
                spool.summary(*spool.buckets(shard, cp.shards))
            spool.counted = True
    if spool is not None:
        spool.count()
    refused = spool.refused if spool is not None else the.local_errors
    distinct = spool.distinct if spool is not None else len(the.keys)
    to_submit = distinct - len(refused) - done - running
    proc = PROCESSORS.get(processor)
    price = proc.price_per_run if proc is not None else None
    window = rate_window / 60.0
    if mode == "group":
        # Adds of up to 1,000; the first window's budget goes at once, the rest at the budget's pace.
        submit_seconds = max(0.0, (to_submit - run_rate) / run_rate) * 60.0 * window
    else:
        # One create and about one result call per run share the request budget.
        submit_seconds = max(to_submit / run_rate, 2 * to_submit / rate_limit) * 60.0 * window
    latency = (sum(proc.latency) / 2) if proc is not None else 300.0
    return JobPlan(
        rows=spool.rows if spool is not None else the.df.height,
        distinct=distinct,
        done=done,
        running=running,
        to_submit=to_submit,
        refused=len(refused),
        processor=processor,
        mode=mode,
        price_per_run=price,
        spent=runs_created * price if price is not None else None,
        cost=to_submit * price if price is not None else None,
        seconds=(submit_seconds + latency) if (to_submit or running) else 0.0,
        checkpoint=str(path) if path is not None else None,
        latency=proc.latency if proc is not None else None,
        run_rate=run_rate,
        rate_limit=rate_limit,
        rate_window=rate_window,
    )


def _directory(checkpoint: Any) -> Path | None:
    """The checkpoint's directory, if it is one (not a store, nor object storage's URL)."""
    if isinstance(checkpoint, (str, os.PathLike)) and "://" not in os.fspath(checkpoint):
        return Path(checkpoint)
    return None
