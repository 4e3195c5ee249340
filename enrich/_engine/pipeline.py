"""The pipeline: `aenrich()` checks the options, then runs the stages in order (prepare, load the
checkpoint, reconcile and submit while collecting, join) and keeps the checkpoint consistent however
the call ends (an error, a timeout, Ctrl-C).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from enrich._checkpoint import Checkpoint, Settled, read_pilot, read_settled
from enrich._client import TaskClient, api_key_of, service_of
from enrich._engine import assemble, shards
from enrich._engine import pilot as pilot_sample
from enrich._engine.job import JobStats, _Fatal, _Job, retry_statuses
from enrich._engine.join import _finished_meta, _finished_meta_of, _join, _meta
from enrich._engine.pilot import Pilot, PilotReport
from enrich._engine.prepare import _checkpoint_path, _distinct_plan, _Plan
from enrich._engine.spool import _KEY, _OPTIONS, _SIZE, Spool, _prepare_any
from enrich._engine.submit import run_group_mode, run_runs_mode
from enrich._engine.typed import TypedAnswers
from enrich._exceptions import (
    NotFoundError,
    OutputError,
    ServiceMismatchError,
    UsageError,
)
from enrich._inputs import from_polars, to_polars
from enrich._io import check_output_path, flatten_for_csv, format_of, write_frames, write_table
from enrich._limiter import RateLimiter
from enrich._processors import PROCESSORS
from enrich._progress import Progress, ProgressSink, TqdmSink
from enrich._retry import RetryPolicy
from enrich._run_options import check_run_options
from enrich._store import CheckpointStore, LocalStore, MemoryStore

# The limiter's window is this much longer than the service's (a share of it), to absorb network jitter.
_WINDOW_MARGIN = 0.02


async def _adopt_service(cp: Checkpoint, client: TaskClient, job: _Job, service: str) -> None:
    """A checkpoint of an older enrich, with runs, records no service: one of its runs is looked up on
    this service first (one read, nothing created). Unknown there (an emulator's run, another address):
    `ServiceMismatchError`. Known: the service is recorded."""
    run_id = next(iter(job.run_of.values()), None)
    if run_id is None and cp.runs:  # none of this call's rows: any run of the checkpoint will do
        recorded = cp.state(outputs=False, basis=False)["run_id"].drop_nulls()
        run_id = recorded[0] if len(recorded) else None
    if run_id is not None:
        try:
            await job.patiently(lambda: client.get_run(run_id), "checking the checkpoint's service")
        except NotFoundError:
            raise ServiceMismatchError(
                f"checkpoint {cp.store.location} was written before enrich recorded services, and its run "
                f"{run_id} is unknown to {service}: its answers came from another service (an emulator?) and "
                "are never used for this one; use a new checkpoint (--checkpoint DIR, or checkpoint=)"
            ) from None
    cp.adopt_service(service)


async def _tick(tally: shards.Tally) -> None:
    """Report the counts twice a second: while rows wait for the rate limiter, nothing else does."""
    while True:
        await asyncio.sleep(0.5)
        tally.emit()


def _keep_pacing(cp: Checkpoint, stats: JobStats, learned: dict[str, Any]) -> None:
    """Keep what the rate limiter learned in the checkpoint (a head start for a resume; never fatal)."""
    try:
        cp.record_pacing(learned)
    except Exception as exc:
        message = f"what was learned of the service's quota is not kept ({exc})"
        if message not in stats.warnings:
            stats.warnings.append(message)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error that is not a cancellation, unwrapping nested task groups."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]


def _visibly_empty(data: Any) -> bool:
    """A table in memory with no rows (a LazyFrame is not read to find out)."""
    try:
        return len(data) == 0
    except TypeError:
        return False


async def aenrich(
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
    basis: bool = False,
    retry_failed: bool | str | Collection[str] = False,
    api_key: str | None = None,
    base_url: str | None = None,
    service: str | None = None,
    rate_limit: int = 2000,
    run_rate: int = 2000,
    rate_window: float = 60.0,
    timeout: float | None = None,
    progress: bool | ProgressSink = True,
    concurrency: int = 100,
    max_cost: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    stats: JobStats | None = None,
    request_timeout: float = 60.0,
    commit_horizon: float | None = None,
    write_to: str | os.PathLike[str] | None = None,
    write_format: str | None = None,
    pilot: int | None = None,
    _pilot_only: bool = False,
    _prepared: _Plan | Spool | None = None,
    _shard_rows: int = shards.SHARD_ROWS,
    _limiter: RateLimiter | None = None,
    _ledger: Any = None,
    _hand_over: list[RateLimiter | None] | None = None,
) -> Any:
    """Enrich `data` through the Task API; the async form of `enrich()` (same arguments, same result).

    Example (in a notebook cell)::

        df = await aenrich(df, {"ceo": "Name of the current CEO"}, checkpoint="ceo.enrich")
    """
    started = time.monotonic()
    stats = stats if stats is not None else JobStats()
    if not _visibly_empty(data):  # (an empty table needs no key: nothing is sent)
        api_key_of(api_key)  # (before a table is read and set aside, or a checkpoint made, for nothing)
    if pilot is not None:  # (before a large table is read and set aside, or a pilot paid for)
        _check_pilot(pilot, checkpoint)
        if write_to is not None:
            check_output_path(write_to, format=write_format)
        elif write_format is not None:
            raise UsageError("write_format names the format of write_to: give write_to too")
    # `enrich run` prepared this job already for its plan (`_plan_and_prepared`, the same frame and
    # arguments): its keys are reused, once.
    reuse = _prepared is not None and _original(_prepared) is data and not _prepared.consumed
    # How the rows are prepared: for the job (unless `enrich run` did), and again for a pilot's sample.
    arguments: dict[str, Any] = {
        "columns": columns,
        "prompt": prompt,
        "input_schema": input_schema,
        "metadata": metadata,
        "processor": processor,
        "mode": mode,
        "options": check_run_options(run_options, beta, processor),
    }
    prepared: _Plan | Spool
    if reuse:
        assert _prepared is not None
        prepared = _prepared
    else:  # (a LazyFrame is read in batches, and set aside on disk beside the output or checkpoint)
        near = write_to if write_to is not None and os.fspath(write_to) != "-" else None
        if near is None and isinstance(checkpoint, (str, os.PathLike)) and "://" not in os.fspath(checkpoint):
            near = checkpoint
        prepared = _prepare_any(data, output, near=Path(near) if near is not None else None, **arguments)
    spool = prepared if isinstance(prepared, Spool) else None
    # What the job's call and a pilot's share (`_enrich_prepared`'s arguments but where it writes).
    common: dict[str, Any] = {
        "columns": columns,
        "processor": processor,
        "basis": basis,
        "retry_failed": retry_failed,
        "api_key": api_key,
        "base_url": base_url,
        "service": service,
        "rate_limit": rate_limit,
        "run_rate": run_rate,
        "rate_window": rate_window,
        "timeout": timeout,
        "progress": progress,
        "concurrency": concurrency,
        "max_cost": max_cost,
        "transport": transport,
        "request_timeout": request_timeout,
        "commit_horizon": commit_horizon,
        "shard_rows": _shard_rows,
        "limiter": _limiter,
        "ledger": _ledger,
        "hand_over": _hand_over,
    }
    keep = False  # the spool outlives this call: a pilot's caller goes on with the same preparation
    try:
        if pilot is not None:
            ran = await _pilot_first(
                prepared, output, pilot, checkpoint, arguments, common, stats=stats, started=started
            )
            if ran is not None or _pilot_only:
                keep = reuse
                return ran if ran is not None else stats.pilot
        return await _enrich_prepared(
            prepared,
            checkpoint=checkpoint,
            stats=stats,
            started=started,
            write_to=write_to,
            write_format=write_format,
            **common,
        )
    finally:
        if spool is not None and not keep:
            spool.remove()


async def _pilot_first(
    prepared: _Plan | Spool,
    output: Any,
    n: int,
    checkpoint: Any,
    arguments: dict[str, Any],
    common: dict[str, Any],
    *,
    stats: JobStats,
    started: float,
) -> Pilot | None:
    """`pilot=n`: the job's pilot run, measured, kept in its checkpoint and returned; None when the
    checkpoint keeps a pilot's report already (or there is nothing to pilot): the job goes on."""
    spool = prepared if isinstance(prepared, Spool) else None
    plan = spool.template if spool is not None else prepared
    assert isinstance(plan, _Plan)
    svc = _service_name(common["service"], common["transport"], common["base_url"])
    path, _ = _job_checkpoint(prepared, checkpoint, svc)
    if spool is not None:
        spool.count()
        keys, rows = pilot_sample.spool_sample(spool, n)
    else:
        keys, _, at = pilot_sample.frame_sample(plan, n)
    if not keys:
        return None
    digest = pilot_sample.sample_digest(keys)
    # A kept report stands for this job only while its sample is the same (a reworded prompt changes
    # every key); one this version cannot read is none: the pilot runs again, its runs not paid twice.
    kept = PilotReport.from_dict(read_pilot(path) or {})
    if kept is not None and kept.sample_digest == digest:
        stats.pilot = kept
        return None
    if spool is not None:
        sub: _Plan = _distinct_plan(
            spool.job,
            pilot_sample.spool_rows_frame(rows),
            "polars",
            None,
            rows[_KEY],
            rows[_SIZE],
            None,
            options=rows[_OPTIONS] if _OPTIONS in rows.columns else None,
        )
        layout_rows, sendable = max(spool.distinct, spool.rows), spool.distinct - len(spool.refused)
        rows_total, original = spool.rows, None  # (a LazyFrame's rows come back as polars)
    else:
        from enrich._engine import prepare  # (looked up when called: tests stand in for it)

        # Prepared again from the caller's own rows: every column, an earlier enrichment's too, which
        # run options may name (`{_interaction_id}`); the sample's keys come out the same.
        original = pilot_sample.original_rows(plan.original, at)
        made = prepare._prepare(to_polars(original)[0], output, **arguments)
        assert isinstance(made, _Plan)
        sub = made
        layout_rows, sendable = len(plan.keys), len(plan.keys) - len(plan.local_errors)
        rows_total = plan.df.height
    t0 = time.monotonic()
    frame = await _enrich_prepared(
        sub,
        checkpoint=path,
        stats=stats,
        started=started,
        write_to=None,
        write_format=None,
        layout_rows=layout_rows,
        **common,
    )
    report = pilot_sample.build_report(
        frame,
        plan,
        path,
        stats,
        wall=time.monotonic() - t0,
        sendable=sendable,
        rate_limit=common["rate_limit"],
        run_rate=common["run_rate"],
        rate_window=common["rate_window"],
        sample_digest=digest,
    )
    root = Checkpoint.open(path, plan.fingerprint, service=svc)
    try:  # (the last call is the job's, not its sample's: `enrich status` tells its rows)
        root.record_last_call(
            {
                "rows": rows_total,
                "distinct": len(plan.keys) if spool is None else spool.distinct,
                "pilot": len(keys),
                "at": datetime.now(UTC).isoformat(),
            }
        )
        if not report.statuses.get("pending"):  # every pilot run ended: the next call goes on
            root.record_pilot(report.to_dict())
    finally:
        root.close()
    stats.pilot = report
    return Pilot(from_polars(frame, plan.kind, original, added=plan.added), report)


def _then_remove(chunks: Iterator[Any], workspace: Path, removing: list[threading.Thread]) -> Iterator[Any]:
    """`chunks` (the merge's, which closes its files once done), then the workspace removed on a thread
    of its own (`assemble.remove_soon`, added to `removing`) while the writer encodes the last chunk and
    makes the file durable: a second or two of a 10M-row job's unlinking, no longer after it."""
    yield from chunks
    removing.append(assemble.remove_soon([workspace]))


def _check_pilot(n: object, checkpoint: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"pilot must be a whole number of distinct inputs, 1 or more, got {n!r}")
    if checkpoint is False:
        raise UsageError(
            "pilot= keeps its report and runs in the job's checkpoint: give a checkpoint (or None for the "
            "default one), not checkpoint=False"
        )


def _service_name(service: str | None, transport: Any, base_url: str | None) -> str:
    """The service a checkpoint records: `service`, else the base URL's (a custom transport says so)."""
    if service is not None:
        return service
    if transport is not None:  # an in-process app (the emulator, in tests) is not the base URL's service
        return f"a custom transport at {service_of(base_url)}"
    return service_of(base_url)


def _job_checkpoint(
    prepared: _Plan | Spool, checkpoint: Any, svc: str
) -> tuple[Path | CheckpointStore, bool]:
    """The job's checkpoint (`_checkpoint_path`: the default one is named from the job's distinct keys)."""
    if isinstance(prepared, Spool):
        return _checkpoint_path(
            checkpoint, prepared.template.fingerprint, svc, prepared.sorted_keys(), ordered=True
        )
    return _checkpoint_path(checkpoint, prepared.fingerprint, svc, prepared.keys)


def _original(prepared: _Plan | Spool) -> Any:
    return prepared.template.original if isinstance(prepared, Spool) else prepared.original


async def _enrich_prepared(
    prepared: _Plan | Spool,
    *,
    columns: Sequence[str] | str | None,
    processor: str,
    checkpoint: str | os.PathLike[str] | CheckpointStore | bool | None,
    basis: bool,
    retry_failed: bool | str | Collection[str],
    api_key: str | None,
    base_url: str | None,
    service: str | None,
    rate_limit: int,
    run_rate: int,
    rate_window: float,
    timeout: float | None,
    progress: bool | ProgressSink,
    concurrency: int,
    max_cost: float | None,
    transport: httpx.AsyncBaseTransport | None,
    stats: JobStats,
    request_timeout: float,
    commit_horizon: float | None,
    write_to: str | os.PathLike[str] | None,
    write_format: str | None,
    shard_rows: int,
    limiter: RateLimiter | None,
    started: float,
    ledger: Any = None,
    layout_rows: int | None = None,
    hand_over: list[RateLimiter | None] | None = None,
) -> Any:
    """The job of `prepared`. `layout_rows`: the rows the job's shards are laid out for (a pilot's
    sample is laid out as its whole job is)."""
    spool = prepared if isinstance(prepared, Spool) else None
    plan = spool.template if spool is not None else prepared
    assert isinstance(plan, _Plan)
    if spool is not None:
        spool.count()
    rows = spool.rows if spool is not None else plan.df.height
    distinct = spool.distinct if spool is not None else len(plan.keys)
    if rate_limit <= 0 or run_rate <= 0:
        raise UsageError("rate_limit and run_rate must be positive numbers of requests/runs per minute")
    if max_cost is not None:
        if max_cost < 0:
            raise UsageError("max_cost must be a dollar amount of zero or more")
        if plan.processor not in PROCESSORS:
            raise UsageError(f"max_cost needs a known price, and processor {plan.processor!r} has none")
    if rate_window <= 0:
        raise UsageError("rate_window must be a positive number of seconds")
    if timeout is not None and timeout <= 0:
        raise UsageError("timeout must be a positive number of seconds (or None for no limit)")
    if not request_timeout > 0:
        raise UsageError("request_timeout must be a positive number of seconds")
    horizon = 2 * request_timeout if commit_horizon is None else commit_horizon
    if not (horizon >= 0 and math.isfinite(horizon)):
        raise UsageError(
            "commit_horizon must be a number of seconds of 0 or more (None: twice request_timeout)"
        )
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise UsageError(f"concurrency must be a whole number of 1 or more, got {concurrency!r}")
    retry = retry_statuses(retry_failed)
    fmt: str | None = None
    if write_to is not None:  # refused now, before anything is sent, if it cannot be written
        check_output_path(write_to, format=write_format)
        fmt = format_of(write_to, write_format)
    elif write_format is not None:
        raise UsageError("write_format names the format of write_to: give write_to too")
    sink: ProgressSink | None
    owned_bar: TqdmSink | None = None
    if progress is True:
        sink = owned_bar = TqdmSink()
    elif progress is False or progress is None:
        sink = None
    else:
        sink = progress
    svc = _service_name(service, transport, base_url)
    if service is not None and (not isinstance(service, str) or not service.strip()):
        raise UsageError("service must be a non-empty name, or None for the base URL")
    stats.warnings.extend(plan.notes)
    if not distinct:  # an empty table (a quiet day): the typed empty result; nothing sent or recorded
        if owned_bar is not None:
            owned_bar.close()
        stats.elapsed = time.monotonic() - started
        empty = _join(plan, None, basis=basis)
        if write_to is not None:
            write_table(empty, write_to, write_format)
            return None
        return from_polars(empty, plan.kind, plan.original, added=plan.added)
    path, temporary = _job_checkpoint(prepared, checkpoint, svc)
    temp_note = None
    if temporary:
        temp_note = (
            f"checkpoint=False: keeping state in {path}, removed when the call ends with every row finished"
        )
    elif checkpoint is None:
        temp_note = f"checkpoint: {path} (the same call resumes from it; checkpoint=False for none)"
    stats.rows = rows
    stats.distinct = distinct
    stats.checkpoint = str(path)
    stats.stages.update(spool.timings if spool is not None else plan.timings)
    # Everything above is local; an API key is needed only now, and only if there is work to send.
    t_load = time.monotonic()
    root = Checkpoint.open(path, plan.fingerprint, service=svc)
    proc = PROCESSORS.get(plan.processor)
    tally = shards.Tally(sink, distinct, proc.price_per_run if proc is not None else None)
    run = _Run(
        plan=plan,
        root=root,
        service=svc,
        stats=stats,
        tally=tally,
        basis=basis,
        options={
            "retry_failed": retry,
            "concurrency": concurrency,
            "max_cost": max_cost,
            "keep_basis": basis,
            "horizon": horizon,
        },
        temporary=temporary,
        default_checkpoint=checkpoint is None or checkpoint is True,
        timeout=timeout,
        deadline=None if timeout is None else time.monotonic() + timeout,
        write_to=write_to,
        flatten=flatten_for_csv if fmt == "csv" else None,
        inputs=write_to is not None or spool is not None,
        ledger=ledger,
    )
    near = root.directory if write_to is None or os.fspath(write_to) == "-" else Path(write_to)
    workspace: Path | None = None
    client: TaskClient | None = None
    finished = False
    try:
        # The service counts a request when it arrives, the limiter when it is sent: a window a little
        # longer than the service's keeps arrival jitter from turning a full budget into a 429.
        # It starts from what the last process learned of the key's real quota (kept in the checkpoint).
        # With `hand_over` (a Spark worker's last limiter on this key), that one goes on here instead.
        keep = functools.partial(_keep_pacing, root, stats)
        before = hand_over[0] if hand_over else None
        period = rate_window * (1 + _WINDOW_MARGIN)
        if (
            limiter is None
            and before is not None
            and (before.requests_budget, before.runs_budget, before.period) == (rate_limit, run_rate, period)
            and before._adopt(on_learn=keep)
        ):
            limiter = before
            if limiter.learned is None and root.pacing:
                limiter._restore(root.pacing)
        limiter = limiter or RateLimiter(
            requests_per_minute=rate_limit,
            runs_per_minute=run_rate,
            period=period,
            learned=root.pacing,
            on_learn=keep,
        )
        if hand_over is not None:
            hand_over[0] = limiter
        client = TaskClient(
            api_key,
            base_url=base_url,
            transport=transport,
            limiter=limiter,
            retry=RetryPolicy(),
            timeout=request_timeout,
            max_connections=max(100, concurrency),
            beta=plan.run_options.beta if plan.run_options is not None else (),
        )
        run.client, run.limiter = client, limiter
        # A spooled shard's frame holds its rows, repeats included: a table of few distinct inputs
        # and many rows is split by its rows.
        laid = layout_rows if layout_rows is not None else max(distinct, rows) if spool else distinct
        count = shards.layout(root, laid, rows_per_shard=shard_rows)
        areas: list[shards.Area | Callable[[], shards.Area]]
        if spool is not None:
            areas = list(spool.areas(count))
            spool.consumed = True
        else:
            areas = list(shards.split(plan, count))
        plan.consumed = True
        if max_cost is not None and count > 1:  # every run the job paid for counts, in every shard
            tally.recorded.update(shards.recorded_runs(root))
        root.record_last_call({"rows": rows, "distinct": distinct, "at": datetime.now(UTC).isoformat()})
        if temp_note:
            tally.emit(temp_note)
        run.workspace = workspace = assemble.workspace(near)
        # The merge holds a record batch of every part at once: the more shards, the smaller.
        run.batch_bytes = min(assemble.BATCH_BYTES, max(64 << 10, (16 << 20) // len(areas)))
        t_work = time.monotonic()
        ticker = asyncio.create_task(_tick(tally))  # counts move while nothing finishes (rate waits)
        try:
            await _run_areas(run, areas)
            if spool is not None:  # every shard's rows were read: freed while the parts are merged
                spool.remove_soon()
            # The merge needs none of the per-row lists (keys, positions): ~130 MB at a million rows,
            # freed before the result is built instead of after.
            areas.clear()
            plan.keys, plan.index, plan.input_rows = [], [], None
        finally:
            ticker.cancel()
            end = time.monotonic()
            stats.stages["load"] = t_work - t_load + run.loading
            if run.worked:
                submitted = run.submitted_at if run.submitted_at is not None else end
                stats.stages["submit"] = max(0.0, submitted - t_work - run.loading)
                stats.stages["collect"] = end - max(submitted, t_work + run.loading)
        finished = True
        tally.emit()
    finally:
        unseen = set(range(root.shards)) - set(tally.recorded) - set(tally.live) if root.shards > 1 else set()
        stopped = isinstance(sys.exc_info()[1], KeyboardInterrupt | asyncio.CancelledError)
        if unseen and not stopped:  # shards this call has no row of (or did not reach) paid for the job too
            with contextlib.suppress(Exception):
                tally.recorded.update(shards.recorded_runs(root, only=unseen))
        if client is not None:
            stats.requests = client.requests_sent
            stats.answered = client.answers_received
            stats.rate_limited = client.rate_limited_count
            await client.aclose()
        try:
            root.record_service_warnings(run.service_warnings)
        except Exception as exc:
            stats.warnings.append(f"the service's warnings on the runs are not kept ({exc})")
        try:  # always: a checkpoint left open stays locked for the life of the process (a notebook)
            root.close(forget=True)  # the join needs none of its tables: free them first
        except Exception as exc:
            stats.warnings.append(f"the checkpoint was not closed cleanly ({exc}); nothing recorded is lost")
        stats.warnings.extend(root.warnings)
        stats.runs_total = tally.paid()
        stats.spent = stats.runs_total * tally.price if tally.price is not None else None
        with contextlib.suppress(Exception):
            stats.service_warnings = root.service_warnings
        stats.elapsed = time.monotonic() - started
        if owned_bar is not None:
            owned_bar.close()
        if not finished and workspace is not None:
            assemble.remove(workspace)
    assert workspace is not None
    t_join = time.monotonic()
    stats.statuses = dict(run.statuses)
    result: Any = None
    removing: list[threading.Thread] = []
    try:
        if write_to is not None:
            step = assemble.chunk_rows(run.parts)
            with contextlib.closing(assemble.merge(run.parts, rows, step, arrow=True)) as merged:
                chunks = _then_remove(merged, workspace, removing)
                write_frames(chunks, run.schema, write_to, write_format, row_group_rows=step)
        elif spool is not None:  # the parts hold the input's columns too
            result = assemble.merged_frame(run.parts, rows, run.schema)
        else:
            added = assemble.merged_frame(run.parts, plan.df.height, run.schema)
            result = from_polars(
                pl.concat([plan.df, added], how="horizontal"), plan.kind, plan.original, added=plan.added
            )
            del added
    except OSError as exc:  # a full disk, a permission: the answers are safe in the checkpoint
        raise _output_error(exc, write_to or workspace, stats) from exc
    finally:
        for thread in removing:
            thread.join()
        assemble.remove(workspace)
    stats.stages["join"] = time.monotonic() - t_join + run.reading
    # Only once the result is out: a join that fails (a full disk) must find the answers again.
    if temporary:
        if stats.statuses.get("pending", 0) == 0:
            shutil.rmtree(path, ignore_errors=True)
            stats.checkpoint = ""
        else:
            stats.warnings.append(
                f"rows are unfinished: their runs are recorded in {path}; pass checkpoint={str(path)!r} "
                "to collect them without paying twice"
            )
    return result


@dataclass
class _Run:
    """What the shards of one call share: the plan, the root checkpoint, the client and its limiter,
    the progress tally, and what each shard hands to the join."""

    plan: _Plan
    root: Checkpoint
    service: str
    stats: JobStats
    tally: shards.Tally
    basis: bool
    options: dict[str, Any]
    temporary: bool
    default_checkpoint: bool
    timeout: float | None
    deadline: float | None  # time.monotonic() past which nothing more is sent
    client: TaskClient | None = None
    limiter: RateLimiter | None = None
    ledger: Any = None  # a cluster's `broker.CostShare` of the job's max_cost (None: this process's)
    #: The join's scratch directory, and what each shard put there: its rows joined, sorted by
    #: position (`assemble.write_parts`), the rows per status, and the columns.
    workspace: Path | None = None
    write_to: str | os.PathLike[str] | None = None
    flatten: Any = None
    inputs: bool = False  # the parts hold the input's columns (a file, a spooled table)
    batch_bytes: int = assemble.BATCH_BYTES
    parts: list[Any] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    schema: pl.Schema = field(default_factory=pl.Schema)
    service_warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    submitted_at: float | None = None
    worked: bool = False  # a shard sent or collected something
    loading: float = 0.0  # seconds spent opening and loading the shards' checkpoints
    reading: float = 0.0  # seconds spent reading answers from the checkpoint (part of the join)


async def _run_areas(run: _Run, areas: Sequence[shards.Area | Callable[[], shards.Area]]) -> None:
    """Run the shards, a bounded number at a time: the next starts once the last one has sent all its
    runs, while up to `shards.AT_ONCE` collect their answers. A shard given as a function (a spooled
    table's) is read when its turn comes."""
    if len(areas) == 1:
        await _run_area(run, _made(areas[0]), asyncio.Event())
        return
    slots = asyncio.Semaphore(shards.AT_ONCE)
    try:
        async with asyncio.TaskGroup() as tg:
            previous: asyncio.Event | None = None
            for area in areas:
                if previous is not None:
                    await previous.wait()
                await slots.acquire()
                submitted = asyncio.Event()

                async def one(
                    area: shards.Area | Callable[[], shards.Area] = area, submitted: asyncio.Event = submitted
                ) -> None:
                    try:
                        # (a spooled shard is read from disk in a worker thread, beside the others)
                        made = area if isinstance(area, shards.Area) else await asyncio.to_thread(area)
                        await _run_area(run, made, submitted)
                    finally:
                        submitted.set()
                        slots.release()

                tg.create_task(one())
                previous = submitted
    except BaseExceptionGroup as group:  # the error of the shard that ended the job, as one shard's
        raise _first_leaf(group) from None


def _made(area: shards.Area | Callable[[], shards.Area]) -> shards.Area:
    return area if isinstance(area, shards.Area) else area()


async def _open_area(run: _Run, area: shards.Area) -> Checkpoint:
    """`shards.open_area`; on object storage in a thread: taking a dead writer's lease waits for it to
    run out (`ObjectStore.lock`), and the other shards' requests must not wait with it. Cancelled
    meanwhile, the area is closed once it is open (its lease never outlives the call)."""
    if area.name is None or isinstance(run.root.store, (LocalStore, MemoryStore)):
        return shards.open_area(run.root, area, run.service)
    opening = asyncio.ensure_future(asyncio.to_thread(shards.open_area, run.root, area, run.service))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(lambda done: done.cancelled() or done.exception() or done.result().close())
        raise


async def _run_area(run: _Run, area: shards.Area, submitted: asyncio.Event) -> None:
    """One shard: its checkpoint opened and loaded, its rows sent and collected (until the call's
    deadline), its answers set aside for the join, its state freed."""
    assert run.client is not None and run.limiter is not None and run.workspace is not None
    t0 = time.monotonic()
    stats = run.stats
    job: _Job | None = None
    if area.name is not None and not run.basis and await _run_settled(run, area, submitted, t0):
        return
    cp = await _open_area(run, area)
    run.tally.live[area.shard] = cp
    try:  # a shard with nothing left to do: joined from its checkpoint's columns, no job state built
        meta = _finished_meta(area.plan, cp, retry_failed=run.options["retry_failed"])
    except BaseException:
        _close_area(run, area, cp)
        raise
    if meta is not None:
        joined = False
        try:  # (a progress callback that raises must not leave the shard locked)
            run.loading += time.monotonic() - t0
            _say_finished(run, area, meta)
            submitted.set()
            _join_area(run, area, meta, cp)
            joined = True
        finally:
            _close_area(run, area, cp, settled=joined)
        return
    ended = False
    try:
        job = _Job(
            area.plan,
            cp,
            run.client,
            run.limiter,
            sink=run.tally.sink_for(area.shard),
            stats=stats,
            **run.options,
        )
        job.temporary = run.temporary
        job.default_checkpoint = run.default_checkpoint
        job.root = run.root.store.location
        job.paid_elsewhere = functools.partial(run.tally.paid, besides=area.shard)
        job.ledger = run.ledger
        run.tally.jobs[area.shard] = job
        job.load()
        if cp.service is None:  # written before services were recorded: its runs must be this service's
            await _adopt_service(cp, run.client, job, run.service)
        run.loading += time.monotonic() - t0
        job.report(force=True)
        left = None if run.deadline is None else run.deadline - time.monotonic()
        work = run_group_mode if area.plan.mode == "group" else run_runs_mode
        pending = bool(job.todo or job.outstanding or cp.in_doubt())
        if pending and left is not None and left <= 0 and not stats.timed_out:  # the deadline passed
            stats.timed_out = True  # while an earlier shard ended: this one sends nothing
            job.report(f"timeout after {run.timeout:g} s: unfinished rows come back as pending")
        if pending and (left is None or left > 0):
            run.worked = True
            waiter = asyncio.create_task(_when_submitted(job, submitted))
            try:
                async with asyncio.timeout(left):
                    await work(job)
                if job.ledger is not None:  # it sends no more: what it did not spend is the others'
                    job.ledger.release(job.spending())
            except TimeoutError:
                if not stats.timed_out:
                    stats.timed_out = True
                    job.report(f"timeout after {run.timeout:g} s: unfinished rows come back as pending")
            except BaseExceptionGroup as group:
                leaf = _first_leaf(group)
                raise job.explain(leaf.error if isinstance(leaf, _Fatal) else leaf) from None
            except _Fatal as fatal:
                raise job.explain(fatal.error) from None
            except NotFoundError as exc:
                raise job.explain(exc) from None
            finally:
                waiter.cancel()
                if job.submitted_at is not None:
                    run.submitted_at = max(run.submitted_at or 0.0, job.submitted_at)
                # Ended otherwise (a timeout, an error): its allowance is kept, not released, since a
                # create cut off on the wire may still be committed; its shard's next ask resets it.
        submitted.set()
        job.report(force=True)
        ended = True
    finally:
        if job is not None:
            stats.capped = stats.capped or job.capped
            stats.held += len(job.held_keys)
            try:
                if job.committer is not None:
                    job.committer.close()
                job.push_outcomes()
                job.report(force=True)  # the bar's last word is the truth, also after Ctrl-C or an error
                run.service_warnings.update(job.service_warnings)
            except Exception as exc:  # never mask the job's own error, but never hide this one either
                stats.warnings.append(
                    f"the answers collected last are not saved in the checkpoint ({exc}); "
                    "the next run collects them again without paying twice"
                )
        if not ended:  # an error, Ctrl-C: nothing to join, and the shard's lock must not outlive the call
            _close_area(run, area, cp)
    # The job ended well (or at its deadline): the shard's rows are joined now, while its checkpoint
    # is open, and set aside in row order for the merge; then its state goes.
    joined = False
    try:
        assert job is not None
        meta = _meta(area.plan, job)
        del job
        _join_area(run, area, meta, cp)
        joined = True
    finally:
        _close_area(run, area, cp, settled=joined)


class _Unsettled(Exception):
    """A shard's settled state does not have every answer typed: it is joined from its checkpoint."""


async def _run_settled(run: _Run, area: shards.Area, submitted: asyncio.Event, t0: float) -> bool:
    """A shard found finished and unchanged since its state was kept in one file (`read_settled`),
    joined from that file and its typed answers, without opening its checkpoint or loading its tables.
    False when that does not apply (the shard is then run as any other).

    It sends nothing, so the next shard may start at once: its join runs in a worker thread (polars
    and pyarrow let go of the GIL), a few shards at a time (`shards.AT_ONCE`)."""
    assert area.name is not None
    store = run.root.store.child(area.name)
    found = await asyncio.to_thread(_settled_meta, run, area, store)
    if found is None:
        return False
    settled, meta = found
    run.loading += time.monotonic() - t0
    submitted.set()
    try:
        joined = await asyncio.to_thread(_joined, run, area, meta, None, store)
    except _Unsettled:
        return False
    _take(run, joined)
    _say_finished(run, area, meta)
    run.tally.recorded[area.shard] = settled.runs
    return True


def _settled_meta(run: _Run, area: shards.Area, store: Any) -> tuple[Settled, pl.DataFrame] | None:
    """A shard's settled state and what became of its rows (`_finished_meta_of`), or None."""
    settled = read_settled(store, run.root.job_id, ("row_key", "run_id", "interaction_id", "status", "error"))
    if settled is None:
        return None
    meta = _finished_meta_of(area.plan, settled.state, retry_failed=run.options["retry_failed"])
    return None if meta is None else (settled, meta)


def _say_finished(run: _Run, area: shards.Area, meta: pl.DataFrame) -> None:
    """The counts of a shard found finished, for the progress bar and the stats."""
    by = meta["_status"].value_counts()
    counts = dict(zip(by["_status"].to_list(), by["count"].to_list(), strict=True))
    run.stats.already_done += int(meta["_run_id"].is_not_null().sum())  # (refused rows have no run)
    area.plan.inputs = None
    area.plan.consumed = True
    sink = run.tally.sink_for(area.shard)
    if sink is not None:
        sink(
            Progress(
                total=meta.height,
                completed=counts.get("completed", 0),
                failed=counts.get("failed", 0),
                cancelled=counts.get("cancelled", 0),
                action_required=counts.get("action_required", 0),
                running=0,
                waiting=0,
            )
        )


def _close_area(run: _Run, area: shards.Area, cp: Checkpoint, *, settled: bool = False) -> None:
    """Close a shard's checkpoint; with `settled` (its rows were joined), keep its state in one file
    first if nothing is running or in doubt there (`record_settled`): the next call joins it from that."""
    run.tally.recorded[area.shard] = cp.runs
    run.tally.live.pop(area.shard, None)
    run.tally.jobs.pop(area.shard, None)
    if cp is run.root:
        return
    if settled:
        cp.record_settled()
    run.stats.warnings.extend(cp.warnings)
    try:
        cp.close(forget=True)
    except Exception as exc:
        run.stats.warnings.append(f"the checkpoint was not closed cleanly ({exc}); nothing recorded is lost")


async def _when_submitted(job: _Job, submitted: asyncio.Event) -> None:
    await job.fresh_sent.wait()
    submitted.set()


async def aenrich_shard(
    data: Any,
    output: Any,
    *,
    checkpoint: str | os.PathLike[str] | CheckpointStore,
    limiter: RateLimiter | None = None,
    **options: Any,
) -> Any:
    """Run one shard of a job: `data` holds the shard's rows, recorded in `checkpoint` as one area (not
    split in shards however many rows it has, unless it already is a root of shards), sending under
    `limiter`. The other arguments are `aenrich()`'s.

    This is the unit a distributed run hands to each worker: the shard's frame, the job's output and
    options, and its own checkpoint. Shards run at once in one process share one `limiter`, made in the
    running event loop, so together they keep to the key's quota (`rate_limit`, `run_rate` and
    `rate_window` then do not apply); None: the shard has its own, from those arguments. The result is
    `aenrich()`'s for `data`; running the same shard again resumes it without paying twice.

    Example::

        limiter = RateLimiter(requests_per_minute=2000, runs_per_minute=2000)
        parts = await asyncio.gather(
            *(aenrich_shard(part, output, checkpoint=f"job.enrich/{i}", limiter=limiter)
              for i, part in enumerate(df.partition_by("region")))
        )
    """
    if not isinstance(checkpoint, (str, os.PathLike, CheckpointStore)):
        raise UsageError("a shard needs its own checkpoint: give its directory or store (checkpoint=...)")
    if limiter is not None and not isinstance(limiter, RateLimiter):
        raise UsageError(f"limiter must be an enrich.RateLimiter, got {type(limiter).__name__}")
    if options.get("pilot") is not None:
        raise UsageError("a shard runs its rows as they are: run the pilot with enrich(pilot=) on the job")
    for private in ("_prepared", "_shard_rows", "_limiter"):
        options.pop(private, None)
    return await aenrich(data, output, checkpoint=checkpoint, _limiter=limiter, _shard_rows=2**62, **options)


@dataclass
class _Joined:
    """A shard's rows joined (`_joined`): its parts, rows per status, columns, and seconds taken."""

    parts: list[Any]
    statuses: dict[str, int]
    schema: pl.Schema | None
    seconds: float


def _join_area(run: _Run, area: shards.Area, meta: pl.DataFrame, cp: Checkpoint) -> None:
    _take(run, _joined(run, area, meta, cp))


def _take(run: _Run, joined: _Joined) -> None:
    run.parts.extend(joined.parts)
    run.statuses.update(joined.statuses)
    if not run.schema and joined.schema:
        run.schema = joined.schema
    run.reading += joined.seconds


def _joined(
    run: _Run, area: shards.Area, meta: pl.DataFrame, cp: Checkpoint | None, store: Any = None
) -> _Joined:
    """The rows of one shard joined with its answers, written sorted by position to parts: its
    answers read from its checkpoint into parts of bounded size, with the answers typed by an earlier
    join (kept in the shard's checkpoint), and a part at a time joined onto its rows.

    Without `cp` (a settled shard, `_run_settled`; its checkpoint's `store` given instead) every answer
    must have been typed before: else `_Unsettled`, before any part is written."""
    assert run.workspace is not None
    t0 = time.monotonic()
    stats = run.stats
    ids = assemble.answered(meta)
    name = "" if area.name is None else f"{area.shard:02x}-"
    spill = assemble.Spill(run.workspace, meta.height, name=name)
    typed = TypedAnswers(cp.store if cp is not None else store, run.plan.spec)
    try:
        # Without the basis, the answers typed by an earlier join are read first, and their text is not
        # read again. With it, the text (and basis) of every answer is read first: the parts are sized
        # by the largest columns.
        if run.basis:
            assert cp is not None
            _spill_answers(run, spill, cp, ids)
        try:
            found = assemble.spill_typed(spill, typed, ids)
        except OSError as exc:
            raise _output_error(exc, run.workspace, stats) from exc
        except Exception as exc:
            if cp is None:
                raise _Unsettled from exc
            found = None
            stats.warnings.append(f"the answers typed before could not be read ({exc}); they are typed again")
        if not run.basis:
            missing = ids if found is None else _not_found(ids, found, meta.height)
            if cp is None and missing.height:
                raise _Unsettled
            if missing.height or cp is not None:
                assert cp is not None
                _spill_answers(run, spill, cp, missing)
        # (set aside in memory up to SPILL_BYTES: a small shard never writes its answers to disk)
        try:
            parts, statuses, schema = assemble.write_parts(
                area.plan,
                spill,
                run.workspace,
                meta=meta,
                index=area.index,
                rows=area.rows,
                own=area.own,
                basis=run.basis,
                flatten=run.flatten,
                inputs=run.inputs,
                typed=typed if cp is not None else None,  # (no lock held: nothing written there)
                batch_bytes=run.batch_bytes,
            )
        except OSError as exc:
            raise _output_error(exc, run.workspace, stats) from exc
    finally:
        spill.remove()
    return _Joined(parts, statuses, schema, time.monotonic() - t0)


def _not_found(ids: pl.DataFrame, found: pl.DataFrame, rows: int) -> pl.DataFrame:
    """The rows of `ids` whose distinct row (`ROW_OF`, below `rows`) is not among `found`'s: a mask
    made by scatter (an anti join hashed them all, a second per 10M rows)."""
    seen = pl.repeat(False, rows, dtype=pl.Boolean, eager=True).scatter(found[assemble.ROW_OF], True)
    return ids.filter(~seen.gather(ids[assemble.ROW_OF]))


def _spill_answers(run: _Run, spill: assemble.Spill, cp: Checkpoint, ids: pl.DataFrame) -> None:
    assert run.workspace is not None
    try:  # before the tables are freed: they tell which segment records each answer
        assemble.spill_answers(spill, cp, ids, basis=run.basis)
    except OSError as exc:
        raise _output_error(exc, run.workspace, run.stats) from exc
    except Exception as exc:  # each completed row says its answer could not be read back
        run.stats.warnings.append(f"the answers could not be read from the checkpoint ({exc})")


def _output_error(exc: OSError, where: str | os.PathLike[str], stats: JobStats) -> OutputError:
    """A result that cannot be written (a full disk, a permission): the answers are safe."""
    kept = "" if stats.checkpoint == "" else f" in {stats.checkpoint}"
    return OutputError(
        f"cannot write {os.fspath(where)}: {exc.strerror or exc}; every answer is kept{kept}: "
        "fix this, then run the same call again (nothing is paid twice)"
    )
