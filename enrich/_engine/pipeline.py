"""The pipeline: `aenrich()` checks the options, then runs the stages in order (prepare, load the
checkpoint, reconcile and submit while collecting, join) and keeps the checkpoint consistent however
the call ends (an error, a timeout, Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from enrich._checkpoint import Checkpoint
from enrich._client import TaskClient, service_of
from enrich._engine import assemble
from enrich._engine.job import JobStats, _Fatal, _Job
from enrich._engine.join import _join
from enrich._engine.prepare import _checkpoint_path, _Plan, _prepare
from enrich._engine.submit import run_group_mode, run_runs_mode
from enrich._engine.typed import TypedAnswers
from enrich._exceptions import (
    NotFoundError,
    OutputError,
    ServiceMismatchError,
    UsageError,
)
from enrich._inputs import (
    from_polars,
)
from enrich._io import check_output_path, flatten_for_csv, format_of, write_chunks, write_table
from enrich._limiter import RateLimiter
from enrich._processors import PROCESSORS
from enrich._progress import ProgressSink, TqdmSink
from enrich._retry import RetryPolicy

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
                f"checkpoint {cp.path} was written before enrich recorded services, and its run {run_id} "
                f"is unknown to {service}: its answers came from another service (an emulator?) and are "
                "never used for this one; use a new checkpoint (--checkpoint DIR, or checkpoint=)"
            ) from None
    cp.adopt_service(service)


async def _tick(job: _Job) -> None:
    """Report the counts twice a second: while rows wait for the rate limiter, nothing else does."""
    while True:
        await asyncio.sleep(0.5)
        job.report(force=True)


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


async def aenrich(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | str | None = None,
    prompt: str | None = None,
    input_schema: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    processor: str = "core",
    checkpoint: str | os.PathLike[str] | bool | None = None,
    mode: str = "group",
    basis: bool = False,
    retry_failed: bool = False,
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
    _prepared: _Plan | None = None,
) -> Any:
    """Enrich `data` through the Task API; the async form of `enrich()` (same arguments, same result).

    Example (in a notebook cell)::

        df = await aenrich(df, {"ceo": "Name of the current CEO"}, checkpoint="ceo.enrich")
    """
    started = time.monotonic()
    stats = stats if stats is not None else JobStats()
    # `enrich run` prepared this job already for its plan (`_plan_and_prepared`, the same frame and
    # arguments): its keys are reused, once.
    reuse = _prepared is not None and _prepared.original is data and not _prepared.consumed
    plan = (
        _prepared
        if reuse
        else _prepare(
            data,
            output,
            columns=columns,
            prompt=prompt,
            input_schema=input_schema,
            metadata=metadata,
            processor=processor,
            mode=mode,
        )
    )
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
    if service is not None:
        svc = service
    elif transport is not None:  # an in-process app (the emulator, in tests) is not the base URL's service
        svc = f"a custom transport at {service_of(base_url)}"
    else:
        svc = service_of(base_url)
    if service is not None and (not isinstance(service, str) or not service.strip()):
        raise UsageError("service must be a non-empty name, or None for the base URL")
    stats.warnings.extend(plan.notes)
    if not plan.keys:  # an empty table (a quiet day): the typed empty result; nothing sent or recorded
        if owned_bar is not None:
            owned_bar.close()
        stats.elapsed = time.monotonic() - started
        empty = _join(plan, None, basis=basis)
        if write_to is not None:
            write_table(empty, write_to, write_format)
            return None
        return from_polars(empty, plan.kind, plan.original, added=plan.added)
    path, temporary = _checkpoint_path(checkpoint, plan.fingerprint, svc, plan.keys)
    temp_note = None
    if temporary:
        temp_note = (
            f"checkpoint=False: keeping state in {path}, removed when the call ends with every row finished"
        )
    elif checkpoint is None:
        temp_note = f"checkpoint: {path} (the same call resumes from it; checkpoint=False for none)"
    stats.rows = plan.df.height
    stats.distinct = len(plan.keys)
    stats.checkpoint = str(path)
    stats.stages.update(plan.timings)
    # Everything above is local; an API key is needed only now, and only if there is work to send.
    t_load = time.monotonic()
    cp = Checkpoint.open(path, plan.fingerprint, service=svc)
    job: _Job | None = None
    spill: assemble.Spill | None = None
    typed: TypedAnswers | None = None
    workspace: Path | None = None
    reading = 0.0
    client: TaskClient | None = None
    try:
        # The service counts a request when it arrives, the limiter when it is sent: a window a little
        # longer than the service's keeps arrival jitter from turning a full budget into a 429.
        # It starts from what the last process learned of the key's real quota (kept in the checkpoint).
        limiter = RateLimiter(
            requests_per_minute=rate_limit,
            runs_per_minute=run_rate,
            period=rate_window * (1 + _WINDOW_MARGIN),
            learned=cp.pacing,
            on_learn=functools.partial(_keep_pacing, cp, stats),
        )
        client = TaskClient(
            api_key,
            base_url=base_url,
            transport=transport,
            limiter=limiter,
            retry=RetryPolicy(),
            timeout=request_timeout,
            max_connections=max(100, concurrency),
        )
        job = _Job(
            plan,
            cp,
            client,
            limiter,
            retry_failed=retry_failed,
            sink=sink,
            stats=stats,
            concurrency=concurrency,
            max_cost=max_cost,
            keep_basis=basis,
            horizon=horizon,
        )
        job.temporary = temporary
        job.default_checkpoint = checkpoint is None or checkpoint is True
        job.load()
        if cp.service is None:  # written before services were recorded: its runs must be this service's
            await _adopt_service(cp, client, job, svc)
        cp.record_last_call(
            {"rows": plan.df.height, "distinct": len(plan.keys), "at": datetime.now(UTC).isoformat()}
        )
        stats.stages["load"] = time.monotonic() - t_load
        if temp_note:
            job.report(temp_note)
        job.report(force=True)
        work = functools.partial(run_group_mode if plan.mode == "group" else run_runs_mode, job)
        if job.todo or job.outstanding or cp.in_doubt():
            t_work = time.monotonic()
            ticker = asyncio.create_task(_tick(job))  # counts move while nothing finishes (rate waits)
            try:
                async with asyncio.timeout(timeout):
                    await work()
            except TimeoutError:
                stats.timed_out = True
                job.report(f"timeout after {timeout:g} s: unfinished rows come back as pending")
            except BaseExceptionGroup as group:
                leaf = _first_leaf(group)
                raise job.explain(leaf.error if isinstance(leaf, _Fatal) else leaf) from None
            except _Fatal as fatal:
                raise job.explain(fatal.error) from None
            except NotFoundError as exc:
                raise job.explain(exc) from None
            finally:
                ticker.cancel()
                end = time.monotonic()
                submitted = job.submitted_at if job.submitted_at is not None else end
                stats.stages["submit"] = submitted - t_work
                stats.stages["collect"] = end - submitted
        job.report(force=True)
    finally:
        if job is not None:
            stats.capped = job.capped
            stats.held = len(job.held_keys)
        if client is not None:
            stats.requests = client.requests_sent
            stats.answered = client.answers_received
            stats.rate_limited = client.rate_limited_count
            await client.aclose()
        try:
            if job is not None:
                if job.committer is not None:
                    job.committer.close()
                job.push_outcomes()
                job.report(force=True)  # the bar's last word is the truth, also after Ctrl-C or an error
                cp.record_service_warnings(job.service_warnings)
        except Exception as exc:  # never mask the job's own error, but never hide this one either
            stats.warnings.append(
                f"the answers collected last are not saved in the checkpoint ({exc}); "
                "the next run collects them again without paying twice"
            )
        finally:
            if job is not None:
                t_answers = time.monotonic()
                try:  # before the tables are freed: they tell which segment records each answer
                    # Set aside on disk by part: the join holds one part at a time.
                    near = cp.path if write_to is None or os.fspath(write_to) == "-" else Path(write_to)
                    workspace = assemble.workspace(near)
                    typed = TypedAnswers(cp.path, plan.spec)
                    spill = assemble.spill_answers(cp, job, workspace, basis=basis, typed=typed)
                except Exception as exc:
                    stats.warnings.append(f"the answers could not be read from the checkpoint ({exc})")
                reading = time.monotonic() - t_answers  # part of the join
            try:  # always: a checkpoint left open stays locked for the life of the process (a notebook)
                cp.close(forget=True)  # the join needs none of its tables: free them first
            except Exception as exc:
                stats.warnings.append(
                    f"the checkpoint was not closed cleanly ({exc}); nothing recorded is lost"
                )
        stats.warnings.extend(cp.warnings)
        stats.runs_total = cp.runs
        proc = PROCESSORS.get(plan.processor)
        stats.spent = cp.runs * proc.price_per_run if proc is not None else None
        with contextlib.suppress(Exception):
            stats.service_warnings = cp.service_warnings
        stats.elapsed = time.monotonic() - started
        if owned_bar is not None:
            owned_bar.close()
    t_join = time.monotonic()
    result: Any = None
    if write_to is not None:
        _write_file(
            plan, job, spill, workspace, write_to, write_format, fmt, basis=basis, stats=stats, typed=typed
        )
    else:
        try:
            joined = _joined_frame(plan, job, spill, workspace, basis=basis, stats=stats, typed=typed)
        finally:
            if workspace is not None:
                assemble.remove(workspace)
        result = from_polars(joined, plan.kind, plan.original, added=plan.added)
        del joined
    stats.stages["join"] = time.monotonic() - t_join + reading
    # Only once the result is out: a join that fails (a full disk) must find the answers again.
    if temporary and job is not None:
        if len(job.done) == len(plan.keys):
            shutil.rmtree(path, ignore_errors=True)
            stats.checkpoint = ""
        else:
            stats.warnings.append(
                f"rows are unfinished: their runs are recorded in {path}; pass checkpoint={str(path)!r} "
                "to collect them without paying twice"
            )
    return result


def _joined_frame(
    plan: _Plan,
    job: _Job | None,
    spill: assemble.Spill | None,
    workspace: Path | None,
    *,
    basis: bool,
    stats: JobStats,
    typed: TypedAnswers | None = None,
) -> pl.DataFrame:
    """The join for a frame in memory: the added columns built a part at a time, merged in row order
    and read back, so the result's own columns are the only large allocation."""
    if workspace is None:  # the answers could not be read: every completed row says why
        workspace = assemble.workspace(None)
    chunks, schema, stats.statuses, _ = assemble.joined_chunks(
        plan, job, spill, workspace, basis=basis, typed=typed, inputs=False
    )
    return pl.concat([plan.df, assemble.read_chunks(chunks, schema)], how="horizontal")


def _write_file(
    plan: _Plan,
    job: _Job | None,
    spill: assemble.Spill | None,
    workspace: Path | None,
    write_to: str | os.PathLike[str],
    write_format: str | None,
    fmt: str | None,
    *,
    basis: bool,
    stats: JobStats,
    typed: TypedAnswers | None = None,
) -> None:
    """The join for a file: a part at a time, merged in row order and streamed into `write_to`."""
    if workspace is None:  # the answers could not be read: still a file, every completed row says why
        workspace = assemble.workspace(None)
    try:
        flatten = flatten_for_csv if fmt == "csv" else None
        chunks, schema, stats.statuses, step = assemble.joined_chunks(
            plan, job, spill, workspace, basis=basis, typed=typed, flatten=flatten
        )
        write_chunks(chunks, schema, write_to, write_format, row_group_rows=step)
    except OSError as exc:  # a full disk, a permission: the answers are safe in the checkpoint
        where = "" if stats.checkpoint == "" else f" in {stats.checkpoint}"
        raise OutputError(
            f"cannot write {os.fspath(write_to)}: {exc.strerror or exc}; every answer is kept{where}: "
            "fix this, then run the same call again (nothing is paid twice)"
        ) from exc
    finally:
        assemble.remove(workspace)
