"""The one sync bridge: `enrich()` runs `aenrich()` on an `asyncio.Runner`, or on a worker thread with its
own loop when one is already running (a notebook), with Ctrl-C handled so the checkpoint is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from enrich._engine.pipeline import aenrich
from enrich._inputs import near_name

P = ParamSpec("P")
R = TypeVar("R")


def _sync_twin(of: Callable[P, Coroutine[Any, Any, R]]) -> Callable[[Callable[..., Any]], Callable[P, R]]:
    """Give a blocking function its async twin's parameters, for `help()`, IDEs and type checkers (the
    body takes `**kwargs` and hands them on; the private `_`-named ones are left out of the signature)."""
    signature = inspect.signature(of)
    shown = signature.replace(
        parameters=[p for p in signature.parameters.values() if not p.name.startswith("_")]
    )

    def decorate(function: Callable[..., Any]) -> Callable[P, R]:
        function.__signature__ = shown  # type: ignore[attr-defined]
        return function

    return decorate


def _check_arguments(data: Any, output: Any, kwargs: dict[str, Any]) -> None:
    """A wrong argument names `enrich()`, not the `aenrich()` it is handed to, and a near name is offered."""
    known = inspect.signature(aenrich).parameters
    for name in kwargs:
        if name not in known:
            close = near_name(name, [k for k in known if not k.startswith("_")])
            meant = f"; did you mean {close!r}?" if close else ""
            raise TypeError(f"enrich() got an unexpected keyword argument {name!r}{meant}")
    try:
        inspect.signature(aenrich).bind(data, output, **kwargs)
    except TypeError as exc:
        raise TypeError(f"enrich(): {exc}") from None


@_sync_twin(aenrich)
def enrich(data: Any, output: Any, **kwargs: Any) -> Any:
    """Enrich `data` with the columns described by `output`, one Task API run per distinct row.

    The result has the caller's type (polars in, polars out; pandas in, pandas out): every input column
    and row in the original order, then one typed column per output field, then `_status`
    ("completed", "failed", "cancelled", "action_required" or "pending"), `_error` (why there is no
    answer, null when completed), `_run_id` and `_interaction_id` (the run's, for a follow-up run's
    `previous_interaction_id`; null until the run ended, and where an older enrich's checkpoint did not
    record it), and with `basis=True` a `_basis` column (per-field reasoning, citations and confidence).

    Args:
        data: a polars DataFrame or LazyFrame, or a pandas DataFrame.
        output: what to find. A dict of field specs, e.g. `{"ceo": "Name of the CEO", "founded":
            ("integer", "Year founded"), "products": ("array", "Main products")}` (types: string,
            integer, number, boolean, enum, array, array[T], object; a trailing `?` makes one nullable);
            a JSON Schema object; the path of a .json file holding one; or a plain string for one text
            column named `output`.
        columns: the input columns (a list, or "a,b"); default: all.
        prompt: a template such as `"Find the CEO of {company} ({website})"`; each input is then that
            string instead of a JSON object of the columns.
        input_schema: a JSON Schema for the input object, sent with the task and checked locally first:
            rows that do not satisfy it are not sent and come back failed with the reason.
        metadata: a dict stored with every run (keys of at most 16 characters, scalar values of at most
            512); `enrich_key` is reserved for the row key.
        run_options: the Task API's per-run fields, sent with every run: `source_policy`
            (`include_domains`, `exclude_domains`, `after_date`), `advanced_settings` (`location`,
            `data_sources`), `previous_interaction_id`, `mcp_servers`, `enable_events`, `webhook`,
            `memory_scope_key`. Any string in them may be a `{column}` template rendered per row, as in
            `prompt`: `{"source_policy": {"include_domains": ["{domain}"]}}` keeps each row's research
            to its own site, and `{"previous_interaction_id": "{_interaction_id}"}` asks a follow-up on
            the research of an earlier enrichment of the same frame. Checked before anything is sent
            (unknown fields, shapes, at most 200 domains, YYYY-MM-DD dates, ISO country codes). A row's
            rendered options are part of its content key: changed options are new runs.
        beta: `parallel-beta` values to send (a name or a list, e.g. "field-basis-2025-11-25"); those
            `mcp_servers` and `webhook` need are added by themselves. Part of each row's key too.
        processor: "lite", "base", "core" (default), "core2x", "pro", "ultra"..., or a `-fast` variant.
            A newer processor can be allowed with env `ENRICH_EXTRA_PROCESSORS=name`.
        checkpoint: a directory that records the job; calling again with the same arguments resumes it.
            Default (None): one under the user cache directory (`~/.cache/enrich/checkpoints/...` on
            Linux; env `ENRICH_CACHE_DIR` moves it) named by the job and the service, so a notebook cell
            run twice resumes instead of paying twice; its path is said in the progress output and in
            `JobStats.checkpoint`. False: a temporary one, removed when every row finished. A
            `CheckpointStore` (`MemoryStore()`, one for object storage) keeps it there. A checkpoint
            records the service it ran on and is never used with another one.
        mode: "group" (default: task groups, add-runs of up to 1,000, few requests) or "runs" (one
            create per row, each sent as soon as the budget allows; collected through the job's group).
        basis: add the `_basis` column: per row, a list of the service's basis entries, each a struct
            of `field`, `element`, `reasoning`, `confidence` (null on lite/base) and `citations` (url,
            title, excerpts). An array field also gets an entry per element (the service names them
            `field.0`, `field.1`, ...): `field` is then the array field's name and `element` the index,
            null for an entry about a whole field. One row per entry:
            `out.explode("_basis").unnest("_basis")`.
        retry_failed: True submits again the rows whose run failed (only those). Or the statuses
            whose rows to submit again, by name: "failed", "cancelled", "action_required" (one, or a
            list, e.g. `("failed", "cancelled")`); another name is a `UsageError`. Rows the service
            cancelled, or stopped for an action on its side (`action_required`: not waited for), are
            never sent again unless named.
        api_key: default env `PARALLEL_API_KEY`. base_url: default env `PARALLEL_BASE_URL`, else
            `https://api.parallel.ai`.
        service: the name the checkpoint records for the service (default: the base URL without
            credentials); a checkpoint of another service raises `ServiceMismatchError`.
        rate_limit: requests per `rate_window` (default 2,000 per 60 s). run_rate: runs created per
            `rate_window` (default 2,000). Both budgets are enforced; 429s slow the job down.
        timeout: seconds for the whole job (None: no limit); unfinished rows come back "pending" with
            their run ids kept, and the next call collects them.
        progress: True for a tqdm bar, False for none, or a callable taking `Progress` counts.
        concurrency: runs mode only: how many creates are in flight at once (default 100); each waits
            for the rate limiter, which sets the pace.
        max_cost: a hard cap in dollars on what the job ever spends, across resumes: no run is submitted
            that would take the cost of all runs created so far over it (rows left out come back
            "pending"). Prices are the per-processor list prices.
        transport: an httpx transport (tests: `httpx.ASGITransport(app=create_app())`); the checkpoint
            then records "a custom transport at BASE_URL" as its service, never the base URL's own.
        stats: a `JobStats` to fill with what the job did (requests, reconciliations, ...).
        request_timeout: seconds to wait for a connection or for the next bytes of an answer (default
            60); an answer that takes longer counts as lost (a create is then reconciled, a read
            retried). The blocking result call adds its server-side wait to it.
        commit_horizon: seconds after a create was sent during which the service may still commit it
            although its answer was lost (a 502/504, a timeout, a killed process): until then its rows
            are held, never sent again, and adopted if their runs appear (default: twice
            `request_timeout`). A run that appears later still is recorded as a paid duplicate and never
            joined.
        write_to: write the result to this file (or `-`, stdout) instead of returning it, in the format
            its extension names (.parquet, .csv, .jsonl, .json, and .gz of them) or `write_format`.
            The result is then never held whole: it is joined a part at a time and streamed into the
            file, so a table with citations larger than memory can be written (JSON lines or Parquet;
            a .json array is built whole). The file is written atomically; the call returns None, and
            `stats.statuses` counts the rows per status.
        write_format: the format of `write_to` when its extension names none ("parquet", "csv",
            "jsonl", "json"), or for `-` (default csv).
        pilot: run this many distinct inputs first (the same seeded sample every time: the smallest
            row keys, which are SHA-256 digests of the content) and return a `Pilot`: the sample's
            rows enriched (`.frame`) and a `PilotReport` (`.report`: statuses, the service's warnings,
            fields that came back empty or mistyped, run times p50/p90/max by the service's clock,
            the cost, and the rest of the job's runs, cost and time under the quota). The report is
            kept in the checkpoint (so checkpoint=False is refused): the next call with the same
            arguments goes on with the whole job, and the pilot's rows are never paid again. A pilot
            that did not finish (timeout) is finished by the next call first.

    Raises `UsageError` for bad input (before anything is sent), `AuthenticationError` (401),
    `PaymentRequiredError` (402: resume later), `PermissionDeniedError`/`ValidationError` (the API refused
    the task), `CheckpointMismatchError` (the checkpoint belongs to another job). Nothing recorded is lost.

    Returns the result frame (None with `write_to`); with `pilot=`, a `Pilot` when the pilot ran in
    this call.

    Works in scripts and inside a running event loop (Jupyter) alike; in async code prefer `aenrich`.

    Example::

        from enrich import enrich
        out = enrich(
            companies,
            {"ceo": "Name of the current CEO", "founded": ("integer", "Year the company was founded")},
            processor="base",
            checkpoint="companies.enrich",
        )
    """
    _check_arguments(data, output, kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop in this thread: a script (run outside the except, so errors raised by the job
        # are not chained to "no running event loop")
    else:
        return _run_in_thread(lambda: aenrich(data, output, **kwargs))
    return _run_here(aenrich(data, output, **kwargs))


def _run_here(coro: Any) -> Any:
    """`asyncio.run(coro)`, with a Ctrl-C that cancels the job from the loop, not from the signal handler.

    asyncio's own handler calls `task.cancel()` inside the signal handler, which runs between any two
    bytecodes of the loop's thread: landing between an `Event.set()`'s `if not fut.done()` and its
    `fut.set_result()` (anyio's socket reads do that on every packet), it cancels the future in between and
    the loop dies with "Fatal error: protocol.data_received() call failed ... InvalidStateError". Here the
    first Ctrl-C schedules the cancel with `call_soon_threadsafe`; the job then flushes its checkpoint and
    KeyboardInterrupt is raised, as asyncio.run would. A second Ctrl-C raises KeyboardInterrupt at once.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        return asyncio.run(coro)  # the caller handles SIGINT itself (asyncio.run then leaves it alone)
    main: dict[str, Any] = {}
    interrupts = 0

    async def job() -> Any:
        if interrupts:  # Ctrl-C before the job began: it does not begin
            coro.close()
            raise asyncio.CancelledError
        main["loop"], main["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await coro

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        if "task" in main:  # (before it: job() sees `interrupts`)
            with contextlib.suppress(RuntimeError):  # (the loop closed as the signal came)
                main["loop"].call_soon_threadsafe(main["task"].cancel)

    def restore() -> None:
        if signal.getsignal(signal.SIGINT) is on_sigint:  # (not a handler the job installed)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        with asyncio.Runner() as runner:  # (sees our handler, so installs none of its own)
            try:
                return runner.run(job())
            finally:
                restore()  # before the runner closes, as asyncio.run does: Ctrl-C then stops the close
    except asyncio.CancelledError:
        if interrupts:
            raise KeyboardInterrupt from None
        raise
    finally:
        restore()


def _run_in_thread(make: Callable[[], Any]) -> Any:
    """Run a coroutine to completion on a worker thread with its own loop (the caller's loop is busy).

    A KeyboardInterrupt in the calling thread cancels the job, waits for its checkpoint to be flushed,
    then propagates.
    """
    result: dict[str, Any] = {}
    loop_ready = threading.Event()
    finished = threading.Event()  # not Thread.join: on CPython <= 3.12 an interrupted join() can mark
    state: dict[str, Any] = {}  # the thread stopped while it still runs (bpo-45274)

    def target() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        try:
            task = loop.create_task(make())
            state["task"] = task
            loop_ready.set()
            result["value"] = loop.run_until_complete(task)
        except BaseException as exc:
            result["error"] = exc
        finally:
            loop_ready.set()
            loop.close()
            finished.set()

    thread = threading.Thread(target=target, name="enrich", daemon=True)
    # The caller's loop may have its own SIGINT handler (asyncio.run's cancels the loop's main task,
    # which cannot run while this call blocks it, so Ctrl-C would wait for the job's end): while the
    # job runs, Ctrl-C raises KeyboardInterrupt here, as in a plain script.
    restore = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, TypeError):
            restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread.start()
    try:
        while not finished.wait(0.1):
            pass
    except KeyboardInterrupt:
        while True:  # the job flushes and closes its checkpoint first; a second Ctrl-C does not skip it
            try:
                loop_ready.wait()
                loop, task = state.get("loop"), state.get("task")
                if loop is not None and task is not None:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(task.cancel)
                finished.wait()
                break
            except KeyboardInterrupt:
                continue
        raise
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
    if "error" in result:
        raise result["error"]
    return result["value"]
