"""The `enrich` command: thin glue over the library.

Expected failures print one line, `enrich: error: ...`, and exit with a documented code; `-v` shows
the traceback as well. Progress goes to stderr, so stdout stays clean for `--dry-run` plans and
`status --json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from enrich._engine.job import UNANSWERED as _RETRYABLE
from enrich._exceptions import (
    APIError,
    AuthenticationError,
    CheckpointError,
    EnrichError,
    ForeignRunError,
    OutputError,
    RateLimitError,
    ServerError,
    TransportError,
    UsageError,
)
from enrich._inputs import near_name

__all__ = ["main"]

EXIT_OK = 0
EXIT_PIPE = 1  # the reader of the output went away (`| head`)
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_API = 4
CONFIRM_ABOVE = 10.0  # dollars: a bigger job asks first

_EPILOG = """\
exit codes:
  0  every row finished (completed, failed, cancelled or action required; the summary line counts each)
  1  the reader of what it printed went away (`enrich status ... | head -1`)
  2  a usage or input error, or an address that never answered: nothing was created
  3  incomplete (timeout, interrupt, --max-cost reached, the service unreachable for a long while, or
     the checkpoint or the output could not be written once the job had started): run the same
     command again to resume
  4  a fatal API answer (bad key, no credit, forbidden, refused task); the checkpoint is kept
"""

_TYPES = ("string", "integer", "number", "boolean", "array")
_TYPE_ALIASES = ("str", "text", "int", "float", "bool", "list")  # (as in Python specs)
_ENUM = re.compile(
    r"(?P<array>(?:array|list)\[)?enum\((?P<choices>[^()]*)\)(?P<items>\??)(?P<end>\]?)(?P<null>\??)\Z",
    re.IGNORECASE,
)
FORMAT_CHOICES = ("csv", "parquet", "jsonl", "ndjson", "json")
#: What a checkpoint of `enrich run --emulator` records as its service: never a real one.
EMULATOR_SERVICE = "the in-process emulator of enrich run --emulator (synthetic answers)"


def _say(message: str) -> None:
    print(f"enrich: {message}", file=sys.stderr)


def _parse_field(spec: str) -> tuple[str, Any]:
    """`NAME=DESCRIPTION` (a string field), `NAME:TYPE=DESCRIPTION`, or with TYPE `enum(a,b,c)` or
    `array[enum(a,b,c)]`."""
    name, sep, description = spec.partition("=")
    if not sep or not name.strip() or not description.strip():
        raise UsageError(f"--field {spec!r}: write NAME=DESCRIPTION or NAME:TYPE=DESCRIPTION")
    name, _, kind = name.partition(":")
    name, written, kind = name.strip(), kind.strip(), kind.strip().lower()
    if not kind:
        return name, description.strip()
    base = kind.rstrip("?")
    if base == "object":
        raise UsageError(
            f"--field {spec!r}: an object needs its fields, which a flag cannot hold; describe it in a "
            "JSON Schema file and pass --schema FILE.json"
        )
    if "enum" in base:
        enum = _ENUM.match(written)  # (the choices as written: B2B stays B2B)
        if enum is None or bool(enum["array"]) != bool(enum["end"]):
            raise UsageError(
                f"--field {spec!r}: write an enum's choices as enum(a,b,c) or array[enum(a,b,c)]"
            )
        choices = [c.strip() for c in enum["choices"].split(",") if c.strip()]
        if not choices:
            raise UsageError(f"--field {spec!r}: an enum needs its choices: enum(a,b,c)")
        item = f"enum{enum['items']}"
        return name, (
            f"array[{item}]{enum['null']}" if enum["array"] else f"{item}{enum['null']}",
            choices,
            description.strip(),
        )
    if base not in _TYPES + _TYPE_ALIASES and not base.startswith(("array[", "list[")):
        close = near_name(base, _TYPES + _TYPE_ALIASES)
        meant = f"did you mean {close!r}? " if close else ""
        raise UsageError(
            f"--field {spec!r}: unknown type {kind!r}; {meant}use one of {', '.join(_TYPES)}, array[T], "
            "enum(a,b,c)"
        )
    return name, (kind, description.strip())


def _run_options_arg(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--run-options FILE.json` with the shortcut flags merged in (a field given both ways is refused)."""
    options: dict[str, Any] = {}
    if args.run_options:
        try:
            options = json.loads(Path(args.run_options).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read --run-options {args.run_options}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"--run-options {args.run_options} is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise UsageError(f"--run-options {args.run_options} must hold a JSON object of run fields")

    def put(flag: str, section: str, key: str, value: Any) -> None:
        place = options.setdefault(section, {})
        if not isinstance(place, dict):
            return  # (the file's own shape error is reported by the checks)
        if key in place:
            raise UsageError(f"{flag} and --run-options both set {section}.{key}; give it once")
        place[key] = value

    def listed(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    if args.include_domains is not None:
        put("--include-domains", "source_policy", "include_domains", listed(args.include_domains))
    if args.exclude_domains is not None:
        put("--exclude-domains", "source_policy", "exclude_domains", listed(args.exclude_domains))
    if args.after_date is not None:
        put("--after-date", "source_policy", "after_date", args.after_date)
    if args.location is not None:
        put("--location", "advanced_settings", "location", args.location)
    return options or None


def _output_arg(args: argparse.Namespace) -> Any:
    if args.schema and args.field:
        raise UsageError("give either --schema or --field, not both")
    if args.schema:
        path = Path(args.schema)
        if not path.is_file():
            raise UsageError(f"--schema {path}: no such file")
        return path
    if not args.field:
        raise UsageError("say what to find: --field NAME=DESCRIPTION (repeatable) or --schema FILE.json")
    fields: dict[str, Any] = {}
    for spec in args.field:
        name, value = _parse_field(spec)
        if name in fields:
            raise UsageError(f"--field {name!r} is given twice")
        fields[name] = value
    return fields


@contextlib.contextmanager
def _service(args: argparse.Namespace) -> Iterator[tuple[str | None, str | None]]:
    """(api_key, base_url) for the job: an in-process emulator with --emulator, else the environment."""
    if args.emulator:
        if args.base_url:
            raise UsageError("--emulator and --base-url cannot be used together")
        from enrich._emulator import Emulator

        with Emulator(seed=0) as emu:
            yield emu.api_key, emu.url
        return
    key = os.environ.get("PARALLEL_API_KEY")
    if not key and not args.dry_run:
        raise UsageError(
            "no API key: export PARALLEL_API_KEY=... (never pass it as a flag), or try --emulator"
        )
    yield key, args.base_url or os.environ.get("PARALLEL_BASE_URL")


def _confirm(cost: float) -> None:
    if not sys.stdin.isatty():
        raise UsageError(
            f"this job would cost about ${cost:,.2f}; pass --yes to confirm it without a terminal"
        )
    try:
        print(
            f"enrich: this job will cost about ${cost:,.2f}. Submit it? [y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        answer = _read_answer().strip().lower()
    except KeyboardInterrupt:  # Ctrl-C at the prompt is a no
        print(file=sys.stderr)
        answer = ""
    if answer not in ("y", "yes"):
        raise UsageError("not confirmed: nothing was sent")


def _read_answer() -> str:
    """A line from the terminal, which Ctrl-C interrupts.

    A blocking read would not be: the signal may land on one of polars' threads, and the main thread
    then sleeps in read() until Enter. Waiting in short selects lets Python run its handler.
    """
    if os.name == "nt":  # select() takes only sockets there; a console read is interruptible
        return sys.stdin.readline()
    import select

    while not select.select([sys.stdin], [], [], 0.2)[0]:
        pass
    return sys.stdin.readline()


def _run(args: argparse.Namespace) -> int:
    from enrich._client import service_of
    from enrich._engine.dry_run import _plan_and_prepared
    from enrich._engine.spool import Spool
    from enrich._io import check_checkpoint_dir, check_output_path, read_tables, scan_tables

    # Everything that can be refused is refused here, before a request: the output and the checkpoint
    # must be writable (a job paid for and then not written is the worst way to learn it).
    output_path = check_output_path(args.output, input_path=args.input, format=args.output_format)
    if args.pilot is not None:
        from enrich._engine.pipeline import _check_pilot

        _check_pilot(args.pilot, None)
    output = _output_arg(args)
    checkpoint: Any
    if args.checkpoint and "://" in args.checkpoint:
        from enrich._store import as_store

        checkpoint = as_store(args.checkpoint)  # object storage (s3://bucket/prefix), or refused
    elif args.checkpoint:
        checkpoint = check_checkpoint_dir(args.checkpoint)
    elif str(output_path) == "-":
        checkpoint = None  # stdout has no "beside": the default checkpoint under the user cache directory
    else:
        checkpoint = check_checkpoint_dir(Path(str(output_path) + ".enrich"))
    # Files polars can scan are read a batch at a time (a table larger than memory is set aside by
    # shard on disk); stdin, .gz and JSON arrays are read whole.
    df: Any = scan_tables(args.input, infer_types=args.infer_types)
    if df is None:
        df = read_tables(args.input, infer_types=args.infer_types, stdin_format=args.input_format or "csv")
    args.service_name = EMULATOR_SERVICE if args.emulator else service_of(args.base_url)
    job: dict[str, Any] = {
        "service": args.service_name,
        "columns": args.columns,
        "prompt": args.prompt,
        "run_options": _run_options_arg(args),
        "beta": args.beta,
        "processor": args.processor,
        "checkpoint": checkpoint,
        "mode": args.mode,
        "retry_failed": _retry_statuses(args.retry_failed),
        "rate_limit": args.rate_limit,
        "run_rate": args.run_rate,
    }
    if args.commit_horizon is not None and args.commit_horizon < 0:
        raise UsageError("--commit-horizon must be a number of seconds of 0 or more")
    # The plan is read by the dry run, the confirmation of a large spend, the check of an --emulator
    # job left running, and to find the default checkpoint of `-o -`; the job itself needs none of it.
    wanted = args.dry_run or args.emulator or not args.yes or checkpoint is None
    the_plan, prepared = _plan_and_prepared(df, output, base_url=args.base_url, estimate=wanted, **job)
    try:
        return _run_planned(args, df, output, output_path, checkpoint, job, the_plan, prepared)
    finally:
        if isinstance(prepared, Spool):  # (the job removes it too; not when it never ran)
            prepared.remove()


def _run_planned(
    args: argparse.Namespace,
    df: Any,
    output: Any,
    output_path: Any,
    checkpoint: Path | None,
    job: dict[str, Any],
    the_plan: Any,
    prepared: Any,
) -> int:
    from enrich._engine import JobStats, enrich

    if checkpoint is None and the_plan is not None and the_plan.checkpoint is not None:
        checkpoint = Path(the_plan.checkpoint)
    if args.dry_run:
        assert the_plan is not None
        print("\n".join(["dry run: nothing was sent", *the_plan.lines()]))
        if args.max_cost is not None and the_plan.cost is not None and the_plan.spent is not None:
            room = max(0.0, args.max_cost - the_plan.spent)
            print(f"max cost:           ${args.max_cost:,.2f} (room for ${room:,.2f} more)")
        return EXIT_OK
    if args.emulator and the_plan is not None and the_plan.to_submit and (the_plan.spent or 0) > 0:
        raise UsageError(
            f"{checkpoint} was made by an earlier --emulator session, whose emulator (and task group) "
            f"ended with it, so {the_plan.to_submit:,} new runs cannot join it; use a new checkpoint "
            "(--checkpoint DIR, or delete it), or `enrich emulate` with --base-url for jobs you change"
        )
    if args.emulator and "previous_interaction_id" in (job["run_options"] or {}):
        raise UsageError(
            "a follow-up names interactions of the emulator that answered the first job, and each "
            "--emulator run starts a new one: run `enrich emulate` and give both jobs --base-url"
        )
    if args.emulator and the_plan is not None and the_plan.running:
        raise UsageError(
            f"{checkpoint} holds {the_plan.running:,} unfinished runs of an earlier --emulator session, "
            f"whose emulator ended with it; delete {checkpoint} to start over, or use `enrich emulate` with "
            "--base-url for jobs you want to interrupt and resume"
        )
    if args.emulator:
        _say(
            "--emulator: the answers are SYNTHETIC, made up by a local emulator of the Task API; "
            "nothing is billed"
        )
    elif args.pilot is not None:  # the pilot's own cost is confirmed; the rest, once it is measured
        price = the_plan.price_per_run if the_plan is not None else None
        pilot_cost = args.pilot * price if price is not None else None
        if pilot_cost is not None and pilot_cost > CONFIRM_ABOVE and not args.yes:
            _confirm(pilot_cost)
    elif the_plan is not None and the_plan.cost and the_plan.cost > CONFIRM_ABOVE and not args.yes:
        cap = args.max_cost if args.max_cost is not None else the_plan.cost
        _confirm(min(the_plan.cost, max(0.0, cap - (the_plan.spent or 0.0))))
    stats = JobStats()
    interrupted = done_ok = False
    stopped: CheckpointError | None = None
    # (one service for the pilot and the job: an --emulator's ends with the block)
    with _service(args) as (api_key, base_url):
        call = {
            "basis": args.basis,
            "timeout": args.timeout,
            "max_cost": args.max_cost,
            "api_key": api_key,
            "base_url": base_url,
            "progress": not args.no_progress,
            "commit_horizon": args.commit_horizon,
            "_prepared": prepared,  # keyed once, for the plan: not again
            "pilot": args.pilot,  # (the job's goes on once its report is kept)
            **job,
        }
        if args.pilot is not None:
            went_on = _pilot(args, df, output, checkpoint, the_plan, call)
            if went_on is not None:
                return went_on
        try:
            # Joined a part at a time and streamed into the file: never the whole result in memory.
            enrich(df, output, stats=stats, write_to=output_path, write_format=args.output_format, **call)
            done_ok = True
        except KeyboardInterrupt:
            interrupted = True
        except OutputError as exc:
            if args.verbose:
                raise
            for warning in stats.warnings:
                _say(f"warning: {warning}")
            _say(f"error: {exc}")
            return EXIT_INCOMPLETE
        except CheckpointError as exc:
            if args.verbose or not stats.requests:
                raise  # nothing was sent: a checkpoint that cannot be used is a usage error (exit 2)
            stopped = exc  # a write failed mid-job (a full disk): submission stopped
        except APIError:
            args.answered = stats.answered  # main() tells "never reached" from "stopped answering"
            raise
    for warning in stats.warnings:
        _say(f"warning: {warning}")
    if stopped is not None:
        _say(
            f"error: {stopped}; submission stopped and every run recorded before is kept: "
            "fix this, then run the same command again"
        )
        return EXIT_INCOMPLETE
    if interrupted or not done_ok:
        if args.emulator:
            _say(
                f"interrupted: the in-process emulator ended with this command, so the runs it had not "
                f"finished cannot be collected; delete {checkpoint} to start over, or use `enrich emulate` "
                "with --base-url for jobs you stop and resume"
            )
        else:
            _say(f"interrupted: the checkpoint {checkpoint} is kept; run the same command again to resume")
        return EXIT_INCOMPLETE
    pending = stats.statuses.get("pending", 0)
    wrote = "stdout" if str(output_path) == "-" else output_path
    kept = f" (checkpoint {checkpoint})" if stats.checkpoint else ""  # an empty input records nothing
    _say(_summary(stats.rows, stats.statuses, stats, args.emulator) + f"; wrote {wrote}{kept}")
    for message, runs in sorted(stats.service_warnings.items(), key=lambda kv: -kv[1]):
        _say(f"the service warns ({runs:,} runs): {message}")
    if stats.duplicates:
        _say(
            f"{stats.duplicates:,} duplicate runs: the service committed creates whose answers were lost "
            f"after they had been sent again (past the commit horizon); paid for, recorded in {checkpoint}, "
            "never joined"
        )
    if pending:
        _say(_next_step(args, stats, checkpoint, pending))
        return EXIT_INCOMPLETE
    return EXIT_OK


def _pilot(
    args: argparse.Namespace,
    df: Any,
    output: Any,
    checkpoint: Path | None,
    the_plan: Any,
    call: dict[str, Any],
) -> int | None:
    """`--pilot N`: run the pilot (or find the report an earlier command kept for this very sample),
    print its report, and ask whether to go on with the rest of the job, whose runs and cost are this
    command's (never a kept report's: the input may have grown since). Returns the exit code when the
    command stops here; None when the job goes on."""
    from enrich._engine import JobStats, enrich
    from enrich._engine.pilot import Pilot, PilotReport

    stats = JobStats()
    try:
        # (the pilot, or its kept report: never the job)
        found = enrich(df, output, stats=stats, _pilot_only=True, **call)
    except KeyboardInterrupt:
        _say(f"interrupted: the pilot's runs are kept in {checkpoint}; run the same command again")
        return EXIT_INCOMPLETE
    for warning in stats.warnings:
        _say(f"warning: {warning}")
    if isinstance(found, Pilot):
        report, created = found.report, stats.runs_now
        print("\n".join(report.lines()), file=sys.stderr, flush=True)
        if report.statuses.get("pending"):
            why = f"--max-cost ${args.max_cost:,.2f} was reached" if stats.capped else "it stopped early"
            _say(
                f"the pilot did not finish ({report.statuses['pending']:,} runs pending: {why}): run the "
                "same command again to finish it (nothing is paid twice)"
            )
            return EXIT_INCOMPLETE
    elif isinstance(found, PilotReport):
        report, created = found, 0
        print("\n".join(["(kept from an earlier command)", *report.lines()]), file=sys.stderr, flush=True)
    else:
        return None  # nothing to pilot (every input refused): the job reports it
    if args.yes:
        return None
    # What the rest costs now: this command's plan (made before the pilot ran, if it ran now).
    rest = max(0, the_plan.to_submit - created) if the_plan is not None else report.rest_runs
    if not rest:
        return None  # nothing left to pay for: the job writes the output
    price = the_plan.price_per_run if the_plan is not None else report.price_per_run
    cost = f", about ${rest * price:,.2f}" if price is not None else ""
    if args.max_cost is not None and price is not None and rest * price > args.max_cost:
        cost += f" (--max-cost stops it at ${args.max_cost:,.2f})"
    if not sys.stdin.isatty():
        if args.emulator:  # its emulator ends with this command: the job cannot go on in another
            raise UsageError(
                f"the pilot is done; the rest is {rest:,} runs: an --emulator session cannot go on in a "
                "later command, so pass --yes to go on in this one"
            )
        raise UsageError(
            f"the pilot is done; the rest is {rest:,} runs{cost}: run the same command with --yes to go "
            "on without a terminal (the pilot's runs are not paid again)"
        )
    try:
        print(f"enrich: go on with the other {rest:,} runs{cost}? [y/N] ", end="", file=sys.stderr)
        sys.stderr.flush()
        answer = _read_answer().strip().lower()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        answer = ""
    if answer not in ("y", "yes"):
        _say(
            f"stopped after the pilot: its runs are kept in {checkpoint}; run the same command again to go on"
        )
        return EXIT_OK
    return None


def _n(count: int, noun: str) -> str:
    """`1,234 runs`, `1 run`."""
    return f"{count:,} {noun if count == 1 else noun + 's'}"


def _summary(rows: int, by: dict[str, int], stats: Any, emulator: bool = False) -> str:
    """The job's one-line account: rows by status (`by`: `_status` -> rows; cancelled and action
    required only when there are any), runs created or found now, requests, 429s, spend."""
    distinct = f" ({_n(stats.distinct, 'distinct input')})" if stats.distinct != rows else ""
    now = f"{_n(stats.runs_now, 'run')} created or found now"
    found = stats.reconciled + stats.found_late
    if found:
        now += f" ({stats.submitted:,} submitted, {found:,} found after a lost answer)"
    limited = f", {stats.rate_limited:,} rate-limited (429)" if stats.rate_limited else ""
    spent = (
        f"; ${stats.spent:,.2f} spent on this job so far ({_n(stats.runs_total, 'run')})"
        if stats.spent is not None
        else f"; {_n(stats.runs_total, 'run')} on this job so far"
    )
    if emulator and stats.spent is not None:
        spent = (
            f"; ${stats.spent:,.2f} at list prices, not billed: the emulator ({_n(stats.runs_total, 'run')})"
        )
    ended = [f"{by.get('completed', 0):,} completed", f"{by.get('failed', 0):,} failed"]
    ended += [f"{by[s]:,} {s.replace('_', ' ')}" for s in ("cancelled", "action_required") if by.get(s)]
    return (
        f"{', '.join(ended)}, {by.get('pending', 0):,} pending of {_n(rows, 'row')}{distinct}; "
        f"{now}, {_n(stats.requests, 'request')}{limited}{spent}"
    )


def _next_step(args: argparse.Namespace, stats: Any, checkpoint: Path, pending: int) -> str:
    """What to do about rows left pending: the step that works, not a generic "run it again"."""
    if stats.capped:
        spent = f"${stats.spent:,.2f}" if stats.spent is not None else "the cap"
        return (
            f"incomplete: --max-cost reached ({spent} spent of ${args.max_cost:,.2f}); raise --max-cost "
            "and run the same command again to go on (nothing is paid twice)"
        )
    if args.emulator:
        return (
            f"incomplete: {pending:,} rows were not finished, and the in-process emulator ended with this "
            f"command, so their runs cannot be collected; delete {checkpoint} and run again with a longer "
            "--timeout (or none), or use `enrich emulate` with --base-url for jobs you stop and resume"
        )
    why = f"--timeout {args.timeout:g} s reached" if stats.timed_out else "not finished"
    return f"incomplete ({why}): run the same command again to resume from {checkpoint}"


def _status(args: argparse.Namespace) -> int:

    from enrich._checkpoint import Checkpoint

    if "://" in args.path:  # a checkpoint on object storage
        from enrich._store import as_store

        store = as_store(args.path)
        if "manifest.json" not in store.list("manifest.json"):
            raise CheckpointError(f"no checkpoint at {args.path}: give the URL --checkpoint named")
        return _report_status(args, Checkpoint.read(store), args.path)
    path = Path(args.path)
    if path.is_file() or not (path / "manifest.json").exists():
        candidate = Path(str(path) + ".enrich")
        if (candidate / "manifest.json").exists():
            path = candidate
    if not (path / "manifest.json").exists():
        raise CheckpointError(
            f"no checkpoint at {args.path} (nor at {args.path}.enrich): give the checkpoint directory "
            "(the one --checkpoint named, or OUTPUT.enrich beside the output)"
        )
    return _report_status(args, Checkpoint.read(path), str(path))


def _report_status(args: argparse.Namespace, cp: Any, path: str) -> int:
    import polars as pl

    from enrich._checkpoint import Counts
    from enrich._engine.pilot import PilotReport, histogram_lines, job_latencies, percentile
    from enrich._engine.pilot import _seconds as _secs
    from enrich._engine.shards import area_states
    from enrich._processors import PROCESSORS

    fingerprint = cp.fingerprint
    # A job split in shards: one checkpoint each under the root, read one at a time.
    totals = dict.fromkeys((f.name for f in dataclasses.fields(Counts)), 0)
    groups: list[str] = []
    warnings: list[str] = []
    failures: list[pl.DataFrame] = []
    first = last = None
    for _, area in area_states(cp):
        for name, value in dataclasses.asdict(area.counts()).items():
            totals[name] += value
        groups.extend(area.groups)
        warnings.extend(area.warnings)
        state = area.state
        failures.append(
            state.filter(pl.col("status") == "failed", pl.col("error").is_not_null())
            .sort("finished_at", descending=True, nulls_last=True)
            .unique("error", keep="first", maintain_order=True)
            .head(5)
            .select("finished_at", "error")
        )
        if state.height:
            created, finished = state["created_at"].min(), state["finished_at"].max()
            first = created if first is None or (created is not None and created < first) else first
            last = finished if last is None or (finished is not None and finished > last) else last
        del state
    counts = Counts(**totals)
    processor = str(fingerprint.get("processor", "?"))
    price = PROCESSORS[processor].price_per_run if processor in PROCESSORS else None
    errors = (
        pl.concat(failures)
        .sort("finished_at", descending=True, nulls_last=True)["error"]
        .unique(maintain_order=True)
        .head(5)
        .to_list()
        if failures
        else []
    )
    report = {
        "checkpoint": str(path),
        "service": cp.service,
        "processor": processor,
        "mode": fingerprint.get("mode"),
        # Counts of distinct inputs (one run each): rows with the same input share one.
        "inputs": {
            "completed": counts.completed,
            "failed": counts.failed,
            "cancelled": counts.cancelled,
            "action_required": counts.action_required,
            "submitted": counts.submitted,
            "in_doubt": counts.in_doubt,
        },
        "runs_created": counts.runs,
        "runs_duplicated": counts.duplicates,
        "spent_usd": round(counts.runs * price, 4) if price is not None else None,
        "still_running_usd": round(counts.submitted * price, 4) if price is not None else None,
        "groups": groups,
        "shards": cp.shards,
        "first_submitted": first.isoformat() if first is not None else None,
        "last_finished": last.isoformat() if last is not None else None,
        "last_errors": errors,
        "service_warnings": cp.service_warnings,
        "rows": (cp.last_call or {}).get("rows"),  # of the last call's input; None before this version
        "warnings": warnings,
    }
    seconds = job_latencies(path)["seconds"].drop_nulls().to_list()
    pilot = PilotReport.from_dict(cp.pilot or {})
    report["run_seconds"] = {
        "runs": len(seconds),
        **{f"p{q}": percentile(seconds, q / 100) for q in (50, 90, 99)},
        "max": max(seconds, default=None),
    }
    report["pilot"] = pilot.to_dict() if pilot is not None else None
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    spent = "unknown" if price is None else f"${counts.runs * price:,.2f}"
    last_call = cp.last_call or {}
    rows_line = (
        f"rows:        {last_call['rows']:,} in the last call's input, {last_call['distinct']:,} distinct "
        "(rows with one input share its run)"
        if isinstance(last_call.get("rows"), int) and isinstance(last_call.get("distinct"), int)
        else None
    )
    lines = [
        f"checkpoint:  {path}",
        f"service:     {cp.service or 'unknown (written by an older enrich)'}",
        f"processor:   {processor} ({report['mode']} mode)",
        *([rows_line] if rows_line else []),
        f"inputs:      {counts.completed:,} completed, {counts.failed:,} failed, "
        + (f"{counts.cancelled:,} cancelled, " if counts.cancelled else "")
        + (f"{counts.action_required:,} action required, " if counts.action_required else "")
        + f"{counts.submitted:,} submitted and not collected, {counts.in_doubt:,} in doubt",
        f"runs:        {counts.runs:,} created; spent {spent} at list prices"
        + (
            f" ({counts.duplicates:,} duplicates: creates committed after they were sent again, never joined)"
            if counts.duplicates
            else ""
        ),
        (
            f"groups:      {len(groups):,}, a group per shard of the {cp.shards} the job is split in "
            "(--json lists them)"
            if cp.shards > 1
            else f"groups:      {', '.join(groups) or '-'}"
        ),
        f"times:       first submitted {report['first_submitted'] or '-'}, "
        f"last finished {report['last_finished'] or '-'}",
    ]
    lines += [f"last error:  {e}" for e in errors]
    lines += [
        f"service warns ({n:,} runs): {m}"
        for m, n in sorted(cp.service_warnings.items(), key=lambda kv: -kv[1])
    ]
    lines += [f"warning:     {w}" for w in warnings]
    if seconds:
        times = report["run_seconds"]
        lines.append(
            f"run times:   p50 {_secs(times['p50'])}, p90 {_secs(times['p90'])}, max {_secs(times['max'])} "
            f"({len(seconds):,} runs, by the service's clock)"
        )
        lines += histogram_lines(seconds)
    if pilot is not None:
        lines += ["", *pilot.lines()]
    print("\n".join(lines))
    return EXIT_OK


def _emulate(args: argparse.Namespace) -> int:
    from enrich._emulator import EmulatorConfig, serve

    faults = frozenset(f.strip() for f in args.faults.split(",") if f.strip()) if args.faults else None
    fields: dict[str, object] = {
        "api_key": args.api_key,
        "latency": args.latency,
        "failure_rate": args.failure_rate,
        "cancel_rate": args.cancel_rate,
        "action_required_rate": args.action_required_rate,
        "fault_rate": args.fault_rate,
        "should_retry_header": args.should_retry_header,
        "rate_limit": args.rate_limit or None,
        "run_rate_limit": args.run_rate_limit or None,
        "rate_window": args.rate_window,
        "rate_burst": args.rate_burst,
        "run_burst": args.run_burst,
        "retry_after_header": not args.no_retry_after,
        "credit": args.credit,
        "late_commit_seconds": args.late_commit,
        "late_commit_rate": args.late_commit_rate,
        "late_commit_answer": args.late_commit_answer,
        "stream_close_seconds": args.stream_close,
        "own_interaction_ids": args.own_interaction_ids,
        "seed": args.seed,
        "basis_bytes": args.basis_bytes,
    }
    if faults is not None:
        fields["faults"] = faults
    try:
        config = EmulatorConfig(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: a port is a number from 0 to 65535 (0: any free one)")
    port = _check_port_free(args.host, args.port)
    key = args.api_key or "any non-empty key"
    _say(f"Task API emulator on http://{args.host}:{port} (key: {key}); its answers are synthetic.")
    _say(
        f"export PARALLEL_BASE_URL=http://{args.host}:{port} PARALLEL_API_KEY={args.api_key or 'demo-key'}"
        "   (in the shell that runs enrich; Ctrl-C stops the emulator)"
    )
    serve(config, host=args.host, port=port)
    return EXIT_OK


def _check_port_free(host: str, port: int) -> int:
    """One line instead of uvicorn's traceback when the address cannot be bound; the port to serve on
    (a free one for 0, so the address printed is the one served)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            why = "it is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise UsageError(
                f"cannot listen on {host}:{port}: {why}; choose another --port (or stop what uses it)"
            ) from None
        return int(probe.getsockname()[1])


def _seed(text: str) -> int | None:
    """`--seed`: an integer, or `none` for ids that differ on every start."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def _version() -> str:
    from enrich import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    common: dict[str, Any] = {"epilog": _EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = argparse.ArgumentParser(
        prog="enrich", description="Enrich tables through Parallel's Task API.", **common
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"enrich {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="enrich a CSV/Parquet/JSONL file",
        description="Enrich INPUT row by row through the Task API and write OUTPUT with the result columns. "
        "Running the same command again resumes from the checkpoint without paying twice.",
        **common,
    )
    run.add_argument(
        "input",
        nargs="+",
        help="input tables of one set of columns: .csv, .parquet, .jsonl/.ndjson, .json (an array), "
        "each maybe .gz; glob patterns such as 'parts/*.csv.gz'; - for stdin",
    )
    run.add_argument(
        "-o", "--output", required=True, help="output table (same formats), written atomically; - for stdout"
    )
    run.add_argument(
        "--infer-types",
        action="store_true",
        help="read CSV columns as numbers and dates where they look like them (default: as text, so "
        "02134 stays 02134 and the output holds your values unchanged)",
    )
    run.add_argument(
        "--input-format", choices=FORMAT_CHOICES, help="the format of stdin (-) as input (default csv)"
    )
    run.add_argument(
        "--output-format",
        choices=FORMAT_CHOICES,
        help="the output's format when it is - (stdout, default csv) or its name has no known extension",
    )
    run.add_argument("--schema", help="output JSON Schema file (an object with properties)")
    run.add_argument(
        "--field",
        action="append",
        metavar="SPEC",
        help="an output column: NAME=DESCRIPTION, or NAME:TYPE=DESCRIPTION with TYPE one of "
        "string, integer, number, boolean, array, array[T], enum(a,b,c) (a trailing ? makes it nullable); "
        "repeatable; objects need --schema",
    )
    run.add_argument("--columns", help="input columns to send, comma-separated (default: all)")
    run.add_argument(
        "--prompt", help='a template making each input a string, e.g. "Find the CEO of {company}"'
    )
    run.add_argument("--processor", default="core", help="processor (default: core)")
    run.add_argument(
        "--run-options",
        metavar="FILE.json",
        help="the Task API's per-run fields as a JSON object (source_policy, advanced_settings, "
        "previous_interaction_id, mcp_servers, enable_events, webhook, memory_scope_key); any string "
        "may be a {column} template",
    )
    run.add_argument(
        "--include-domains",
        metavar="LIST",
        help='search only these domains, comma-separated; may be a template such as "{domain}"',
    )
    run.add_argument("--exclude-domains", metavar="LIST", help="never use these domains, comma-separated")
    run.add_argument("--after-date", metavar="YYYY-MM-DD", help="only use pages published after this date")
    run.add_argument(
        "--location",
        metavar="CC",
        help='research as from this country: an ISO code such as US, or a column of them ("{country_code}")',
    )
    run.add_argument(
        "--beta",
        action="append",
        metavar="NAME",
        help="a parallel-beta header value, e.g. field-basis-2025-11-25; repeatable",
    )
    run.add_argument("--checkpoint", help="checkpoint directory (default: OUTPUT.enrich beside the output)")
    run.add_argument(
        "--mode", choices=("group", "runs"), default="group", help="task groups (default) or one run per row"
    )
    run.add_argument(
        "--basis", action="store_true", help="add a _basis column: reasoning, citations, confidence"
    )
    run.add_argument(
        "--retry-failed",
        nargs="?",
        const="failed",
        metavar="STATUSES",
        help="submit again the rows whose run failed; or name the statuses to send again, comma-separated "
        "(failed, cancelled, action_required)",
    )
    run.add_argument(
        "--timeout", type=float, help="stop after SECONDS; unfinished rows come back pending (exit 3)"
    )
    run.add_argument("--rate-limit", type=int, default=2000, help="requests per minute (default 2000)")
    run.add_argument("--run-rate", type=int, default=2000, help="runs created per minute (default 2000)")
    run.add_argument(
        "--commit-horizon",
        type=float,
        metavar="SECONDS",
        help="how long after a create whose answer was lost the service may still commit it: its rows "
        "wait that long before they are sent again (default 120)",
    )
    run.add_argument(
        "--base-url", help="Task API URL (default: env PARALLEL_BASE_URL, else https://api.parallel.ai)"
    )
    run.add_argument(
        "--emulator", action="store_true", help="run against a local emulator: no key, synthetic answers"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="send nothing; print the plan: rows, runs, cost, time"
    )
    run.add_argument(
        "--max-cost", type=float, metavar="DOLLARS", help="never spend more than this, across resumes"
    )
    run.add_argument(
        "--pilot",
        type=int,
        metavar="N",
        help="run N distinct inputs first (a seeded sample), report what they measured and the rest's "
        "cost and time, then ask to go on (--yes goes on without asking)",
    )
    run.add_argument(
        "--yes",
        action="store_true",
        help=f"confirm jobs over ${CONFIRM_ABOVE:.0f} (and going on after a --pilot) without asking",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    run.set_defaults(func=_run)

    status = sub.add_parser(
        "status",
        help="show what a checkpoint holds",
        description="Counts by status, runs created and cost so far, groups, times and the last errors of a "
        "checkpoint (give the checkpoint directory or the output file beside it).",
        **common,
    )
    status.add_argument("path", help="checkpoint directory, or the OUTPUT whose OUTPUT.enrich it is")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    status.set_defaults(func=_status)

    emu = sub.add_parser(
        "emulate",
        help="serve a local emulator of the Task API (no key, no network)",
        description="Serve a local emulator of the Task API on 127.0.0.1. Its answers are synthetic.",
        **common,
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    emu.add_argument("--port", type=int, default=8787, help="port (default: 8787)")
    emu.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    emu.add_argument(
        "--latency", type=float, help="mean seconds a run takes (default: the processor's range / 60)"
    )
    emu.add_argument("--failure-rate", type=float, default=0.0, help="share of runs that fail (0-1)")
    emu.add_argument(
        "--cancel-rate",
        type=float,
        default=0.0,
        help="share of runs that end cancelled, via cancelling (0-1)",
    )
    emu.add_argument(
        "--action-required-rate",
        type=float,
        default=0.0,
        help="share of runs that stop at action_required (0-1)",
    )
    emu.add_argument("--fault-rate", type=float, default=0.0, help="share of requests hit by a fault (0-1)")
    emu.add_argument(
        "--faults",
        help="fault kinds, comma-separated: html_5xx,drop,slow,lost_create,no_retry "
        "(default: html_5xx,drop,slow,lost_create)",
    )
    emu.add_argument(
        "--should-retry-header",
        action="store_true",
        help="send x-should-retry: true with every 429 and 5xx fault (no_retry sends false)",
    )
    emu.add_argument(
        "--rate-limit",
        type=int,
        default=2000,
        help="requests per window per key, 0 for none (default 2000)",
    )
    emu.add_argument("--run-rate-limit", type=int, default=0, help="runs created per window, 0 for none")
    emu.add_argument(
        "--rate-window", type=float, default=60.0, metavar="SECONDS", help="the limits' window (default 60)"
    )
    emu.add_argument(
        "--rate-burst",
        type=int,
        metavar="N",
        help="make the request limit a token bucket of N (refilled at --rate-limit per window)",
    )
    emu.add_argument(
        "--run-burst",
        type=int,
        metavar="N",
        help="make the run limit a token bucket of N: an add of more runs than N always gets 429",
    )
    emu.add_argument("--no-retry-after", action="store_true", help="answer 429 without Retry-After")
    emu.add_argument("--credit", type=float, help="dollars of credit; runs beyond it get 402")
    emu.add_argument(
        "--late-commit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="create the runs of a create/add request this much later, whether the client waits or not",
    )
    emu.add_argument(
        "--late-commit-rate",
        type=float,
        default=1.0,
        metavar="F",
        help="share of create/add requests committed late (0-1, default 1)",
    )
    emu.add_argument(
        "--late-commit-answer",
        default="gateway",
        metavar="gateway|after",
        help="answer a late request at once with an HTML 504 (gateway, the default) or normally once "
        "committed (after)",
    )
    emu.add_argument(
        "--stream-close",
        type=float,
        metavar="SECONDS",
        help="end every SSE stream after SECONDS, runs active or not (a proxy's timeout)",
    )
    emu.add_argument(
        "--own-interaction-ids",
        action="store_true",
        help="give every run an interaction_id of its own (int_...), not its run_id; "
        "previous_interaction_id then accepts only those",
    )
    emu.add_argument(
        "--seed",
        type=_seed,
        default=None,
        metavar="N|none",
        help="seed of every random choice; none (the default): ids differ on every start, other draws "
        "as seed 0",
    )
    emu.add_argument(
        "--basis-bytes",
        type=int,
        metavar="N",
        help="make each field's basis about N bytes of JSON (512-1000000), with several citations, "
        "excerpts and a reasoning, as real answers are (default: compact, a few hundred bytes)",
    )
    emu.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    emu.set_defaults(func=_emulate)
    return parser


def _retry_statuses(value: str | None) -> list[str] | bool:
    """`--retry-failed [STATUSES]`: the statuses to send again (None: the flag was not given)."""
    if value is None:
        return False
    named = [n.strip() for n in value.split(",") if n.strip()]
    wrong = [n for n in named if n not in _RETRYABLE] or ([] if named else [value])
    if wrong:
        close = near_name(wrong[0], _RETRYABLE)
        meant = f"did you mean {close!r}? " if close else ""
        raise UsageError(
            f"--retry-failed {value!r}: {wrong[0]!r} is not a status that can be sent again; {meant}name "
            "any of failed, cancelled, action_required, comma-separated (alone, the flag means failed)"
        )
    return named


def _statuses_flag(argv: Sequence[str]) -> list[str]:
    """`--retry-failed` takes an optional value: after it, a path (`--retry-failed in.csv -o ...`) is the
    next argument, not the flag's (argparse would take it, then miss the input). Statuses stay its value."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--":
            break
        value = out[i + 1]
        if arg != "--retry-failed" or (value.startswith("-") and value != "-") or not value.strip():
            continue
        named = [n.strip() for n in value.split(",")]
        if named and all(n in _RETRYABLE for n in named):
            continue
        try:
            path = value == "-" or any(c in value for c in "./\\:*?[") or Path(value).exists()
        except (OSError, ValueError):  # (a name too long, a NUL)
            path = False
        if path:
            out[i] = "--retry-failed=failed"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `enrich` command; returns its exit code."""
    parser = _parser()
    args = parser.parse_args(_statuses_flag(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `enrich status ... | head`: the reader has what it wanted
        if args.verbose:
            raise
        # (stdout is pointed at /dev/null so the interpreter's last flush does not fail again)
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        return EXIT_PIPE
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INCOMPLETE
    except UsageError as exc:
        if args.verbose:
            raise
        _say(f"error: {exc}")
        return EXIT_USAGE
    except APIError as exc:
        if args.verbose:
            raise
        if isinstance(exc, TransportError) and getattr(args, "answered", None) == 0:
            # Not one answer came back: a wrong address, not an outage of a service that was there.
            _say(
                f"error: could not reach {args.service_name} ({exc.message}): check --base-url or "
                "PARALLEL_BASE_URL; nothing was created"
            )
            return EXIT_USAGE
        if isinstance(exc, AuthenticationError):  # one line that says which key, and what to do
            _say(
                f"error: the service refused the API key in PARALLEL_API_KEY ({exc}); export the right "
                "one and run the same command again (the checkpoint is kept)"
            )
            return EXIT_API
        _say(f"error: {exc}")
        if isinstance(exc, (TransportError, ServerError, RateLimitError)):
            # The service stayed unreachable or overloaded: nothing is wrong with the job itself.
            _say(
                "the service did not answer for a long while; the checkpoint is kept: "
                "run the same command again"
            )
            return EXIT_INCOMPLETE
        if isinstance(exc, ForeignRunError):  # the message says what to do: another checkpoint
            return EXIT_API
        _say("the checkpoint is kept: fix the cause, then run the same command again")
        return EXIT_API
    except EnrichError as exc:
        if args.verbose:
            raise
        _say(f"error: {exc}")
        return EXIT_USAGE
