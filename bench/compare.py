"""Benchmark enrich against parallel-web-tools (Parallel's polars `parallel_enrich`) on the same emulator.

Run with `python bench/compare.py [--rows 500,1000,5000] [--latency 2.0]`. Prints a table, no pass/fail,
and writes it to `bench/results-compare.md` (overwritten). About 2.5 minutes with the defaults on 2 cores,
most of it enrich's 5,000 rows paced by the run budget.

For each size, the same synthetic rows (`company`, `website`: engine.py's `companies()`) and the same two
output fields (`ceo_name`, `founding_year`: strings described "CEO name" and "Founding year", which is what
parallel-web-tools makes of `output_columns=["CEO name", "Founding year"]`), on its processor default
`lite-fast`, go through

- enrich: `aenrich()` in group mode with its default budgets (2,000 requests and 2,000 runs a minute);
- parallel-web-tools: `parallel_enrich(df, input_columns={"company": "company", "website": "website"},
  output_columns=[...])`, pointed at the emulator with env `PARALLEL_API_URL` and `PARALLEL_API_KEY`
  (`parallel_web_tools.core.endpoints.get_api_url`, `core.auth.resolve_api_key`);

each against its own fresh `Emulator` (uvicorn on 127.0.0.1, in a thread of this process) with the same
`EmulatorConfig`: runs take `--latency` seconds on average (uniform 0.5x-1.5x), 2,000 requests and 2,000
runs per 60-s window as in production (parallel-web-tools has no way to scale the window, so the real
minute is kept), the same seed (so the k-th run created takes as long on both).

A row is correct when its output fields equal the emulator's answer for that row: `expected_output()` of
`enrich._emulator.synth` applied to the run input the emulator recorded for the row's input (`app.state`,
which holds each run's input and the task spec the tool sent). The two tools send different task specs (enrich
adds `"additionalProperties": false`), so their answers differ from each other, each being right for its
own spec. Requests, runs, duplicates and 429s are the emulator's counters. Where parallel-web-tools fails
it does not raise: `enrich_batch` logs the exception and answers every row with `{"error": str(exc)}`; the
bench captures that log line and counts the rows it left without an answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from engine import ROUTES, companies, format_table, thread_cpu

from enrich import Emulator, EmulatorConfig
from enrich._emulator.synth import expected_output
from enrich._engine import aenrich
from enrich._processors import PROCESSORS

try:
    from parallel_web_tools.integrations.polars import parallel_enrich
except ImportError as exc:  # the optional `bench` extra
    parallel_enrich = None
    PWT_MISSING = f"{exc}"
else:
    PWT_MISSING = ""

BUDGET = 2000  # requests and runs per window, as in production
WINDOW = 60.0  # seconds: production's minute (parallel-web-tools cannot be told another window)
PROCESSOR = "lite-fast"  # parallel_enrich's default
OUTPUT_COLUMNS = ["CEO name", "Founding year"]  # parallel-web-tools' spelling ...
FIELDS = {"ceo_name": "CEO name", "founding_year": "Founding year"}  # ... and the columns it makes of it
INPUT_COLUMNS = {"company": "company", "website": "website"}  # parallel-web-tools: input key -> column
TARGET_RATIO = 0.75  # enrich / parallel-web-tools wall time, at 500 and 1,000 rows
TARGET_SIZES = (500, 1000)
PWT_LOGGER = "parallel_web_tools"
RESULTS = Path(__file__).with_name("results-compare.md")
ALL_ROUTES = {**ROUTES, "GET /v1/tasks/groups/{taskgroup_id}": "group status"}


@dataclass
class Outcome:
    """One tool's run at one size: timings, the emulator's counters, and each row checked."""

    tool: str
    rows: int
    wall: float = 0.0
    client_cpu: float | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before and after
    served: dict[str, Any] = field(default_factory=dict)
    correct: int = 0
    wrong: int = 0
    missing: int = 0
    unseen: int = 0  # rows whose input the emulator never received
    error: str = ""  # what the tool raised or logged, first line
    row_errors: int = 0  # rows the tool itself marked as failed
    row_error: str = ""  # the first of those messages


# -- the two tools -----------------------------------------------------------------------------------


def run_enrich(df: pl.DataFrame, emu: Emulator, workdir: Path) -> tuple[pl.DataFrame | None, Outcome]:
    out = Outcome("enrich", df.height)
    try:
        frame = asyncio.run(
            aenrich(
                df,
                FIELDS,
                processor=PROCESSOR,
                api_key=emu.api_key,
                base_url=emu.url,
                checkpoint=workdir / f"enrich-{df.height}",
                progress=False,
            )
        )
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None, out
    failed = frame.filter(pl.col("_status") != "completed")
    out.row_errors = failed.height
    if failed.height:
        out.row_error = str(failed["_error"][0])
    return frame, out


class _Captured(logging.Handler):
    """Keeps the records parallel-web-tools logs (its `enrich_batch` logs and swallows every failure)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def pointed_at(emu: Emulator) -> Iterator[_Captured]:
    """Point parallel-web-tools at `emu` through its environment variables and capture its error log."""
    saved = {k: os.environ.get(k) for k in ("PARALLEL_API_URL", "PARALLEL_API_KEY")}
    os.environ["PARALLEL_API_URL"] = emu.url
    os.environ["PARALLEL_API_KEY"] = emu.api_key
    logger = logging.getLogger(PWT_LOGGER)
    handler, propagate = _Captured(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_pwt(df: pl.DataFrame, emu: Emulator, workdir: Path) -> tuple[pl.DataFrame | None, Outcome]:
    assert parallel_enrich is not None
    out = Outcome("pwt", df.height)
    with pointed_at(emu) as log:
        try:
            result = parallel_enrich(
                df, input_columns=INPUT_COLUMNS, output_columns=OUTPUT_COLUMNS, processor=PROCESSOR
            )
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return None, out
    if log.records:
        record = log.records[0]
        exc_info = record.exc_info[1] if record.exc_info else None
        cause = f" ({type(exc_info).__name__})" if exc_info is not None else ""
        out.error = record.getMessage().splitlines()[0] + cause
    out.row_errors = result.error_count
    if result.errors:
        out.row_error = str(result.errors[0]["error"]).splitlines()[0]
    return result.result, out


# -- measuring ---------------------------------------------------------------------------------------

Tool = Callable[[pl.DataFrame, Emulator, Path], tuple[pl.DataFrame | None, Outcome]]


def measure(tool: Tool, df: pl.DataFrame, config: EmulatorConfig, workdir: Path) -> Outcome:
    """Run `tool` on `df` against a fresh emulator; time it and check every row against the emulator."""
    with Emulator(config) as emu:
        server = next((t for t in threading.enumerate() if t.name == "enrich-emulator"), None)
        server_id = server.native_id if server is not None else None
        load0 = os.getloadavg()[0]
        cpu0, server_cpu0 = time.process_time(), thread_cpu(server_id)
        start = time.perf_counter()
        frame, out = tool(df, emu, workdir)
        out.wall = time.perf_counter() - start
        cpu, server_cpu1 = time.process_time() - cpu0, thread_cpu(server_id)
        out.load = (load0, os.getloadavg()[0])
        out.served = emu.stats()
    if server_cpu0 is not None and server_cpu1 is not None:
        out.client_cpu = cpu - (server_cpu1 - server_cpu0)
    check_rows(df, frame, emu, out)  # the server has stopped: its state is no longer changing
    return out


def check_rows(df: pl.DataFrame, frame: pl.DataFrame | None, emu: Emulator, out: Outcome) -> None:
    """Count rows whose fields equal the emulator's answer to the run created for the row's input."""
    state = emu.app.state
    expected: dict[str, dict[str, Any]] = {}
    for run in state.runs.values():
        run_input = state.run_input(run)
        expected[_key(run_input["input"])] = expected_output(run_input)["content"]
    names = list(FIELDS)
    inputs = df.select(list(INPUT_COLUMNS.values())).rows()
    got = frame.select(names).rows() if frame is not None else [(None,) * len(names)] * df.height
    for values, answer in zip(inputs, got, strict=True):
        want = expected.get(_key(dict(zip(INPUT_COLUMNS, values, strict=True))))
        if want is None:
            out.unseen += 1
        if all(v is None for v in answer):
            out.missing += 1
        elif want is not None and list(answer) == [want.get(n) for n in names]:
            out.correct += 1
        else:
            out.wrong += 1


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- output ------------------------------------------------------------------------------------------


def slowest_run(latency: float | None) -> float:
    """The longest a run can take: 1.5x the mean, or with `latency=None` the top of the processor's
    documented range, which the emulator divides by 60 (minutes become seconds)."""
    if latency is None:
        return PROCESSORS[PROCESSOR].latency[1] / 60.0
    return 1.5 * latency


def latency_label(latency: float | None) -> str:
    if latency is None:
        lo, hi = PROCESSORS[PROCESSOR].latency
        return f"documented/60 ({lo / 60:.2f}-{hi / 60:.2f} s)"
    return f"{latency:g} s ({0.5 * latency:g}-{1.5 * latency:g} s)"


def floor_seconds(rows: int, latency: float | None) -> float:
    """The physics: adds of <= 1,000 runs, a full run budget at once then one more per window, then the
    slowest run (1.5x latency)."""
    return (math.ceil(rows / BUDGET) - 1) * WINDOW + slowest_run(latency)


def by_route(served: dict[str, Any]) -> str:
    return ", ".join(
        f"{ALL_ROUTES.get(route, route)} {n}"
        for route, n in sorted(served.get("requests", {}).items(), key=lambda item: -item[1])
    )


def rows_cell(o: Outcome) -> str:
    return f"{o.correct:,}/{o.rows:,}"


def summary_table(pairs: list[tuple[Outcome, Outcome | None]], latency: float | None) -> list[str]:
    header = (
        "rows",
        "floor s",
        "enrich s",
        "pwt s",
        "enrich/pwt",
        "target",
        "enrich req",
        "pwt req",
        "req ratio",
        "enrich correct",
        "pwt correct",
    )
    table = []
    for e, p in pairs:
        pwt_ok = p is not None and p.correct == p.rows
        ratio = f"{e.wall / p.wall:.2f}x" if pwt_ok and p is not None else "n/a"
        req_e = e.served.get("requests_total", 0)
        req_p = p.served.get("requests_total", 0) if p is not None else 0
        table.append(
            (
                f"{e.rows:,}",
                f"{floor_seconds(e.rows, latency):.1f}",
                f"{e.wall:.1f}",
                f"{p.wall:.1f}" if p is not None else "skipped",
                ratio,
                f"<= {TARGET_RATIO}x" if e.rows in TARGET_SIZES else "",
                f"{req_e:,}",
                f"{req_p:,}" if p is not None else "",
                f"{req_e / req_p:.2f}x" if pwt_ok and p is not None and req_p else "n/a",
                rows_cell(e),
                rows_cell(p) if p is not None else "",
            )
        )
    return format_table(header, table, right=tuple(range(len(header))))


def detail_table(e: Outcome, p: Outcome | None, latency: float | None) -> list[str]:
    outcomes = [e] if p is None else [e, p]

    def row(label: str, cell: Callable[[Outcome], str]) -> tuple[str, ...]:
        return (label, *(cell(o) for o in outcomes))

    def cpu(o: Outcome) -> str:
        return f"{o.client_cpu:.2f} s" if o.client_cpu is not None else "n/a"

    table = [
        row("wall time", lambda o: f"{o.wall:.1f} s"),
        row("requests", lambda o: f"{o.served.get('requests_total', 0):,}"),
        *[
            row(f"  {name}", lambda o, route=route: f"{o.served.get('requests', {}).get(route, 0):,}")
            for route, name in ALL_ROUTES.items()
            if any(o.served.get("requests", {}).get(route) for o in outcomes)
        ],
        row("429s", lambda o: f"{o.served.get('rate_limited', 0):,}"),
        row("groups created", lambda o: f"{o.served.get('groups_created', 0):,}"),
        row("runs created", lambda o: f"{o.served.get('runs_created', 0):,}"),
        row("duplicate runs", lambda o: f"{o.served.get('duplicate_runs', 0):,}"),
        row("rows correct", lambda o: f"{o.correct:,}"),
        row("rows wrong", lambda o: f"{o.wrong:,}"),
        row("rows without an answer", lambda o: f"{o.missing:,}"),
        row("rows never sent", lambda o: f"{o.unseen:,}"),
        row("rows the tool marked failed", lambda o: f"{o.row_errors:,}"),
        row("client CPU", cpu),
        row("load avg (1 min) before/after", lambda o: f"{o.load[0]:.2f}/{o.load[1]:.2f}"),
    ]
    header = ("measure", "enrich", *(("parallel-web-tools",) if p is not None else ()))
    lines = [
        f"{e.rows:,} rows (floor {floor_seconds(e.rows, latency):.1f} s: the last runs admitted at "
        f"{(math.ceil(e.rows / BUDGET) - 1) * WINDOW:.0f} s, then up to {slowest_run(latency):.2g} s)",
        "",
        *format_table(header, table, right=tuple(range(1, len(header)))),
    ]
    for o in outcomes:
        if o.error:
            lines.append(f"{o.tool} error: {o.error}")
        if o.row_error:
            lines.append(f"{o.tool} row error ({o.row_errors:,} rows): {o.row_error}")
    return lines


SUMMARY_NOTE = [
    "pwt: parallel-web-tools' polars parallel_enrich. enrich/pwt and req ratio: only where pwt",
    "answered every row correctly. floor: the physics (see below). req: requests the emulator served",
    "(429s included). pwt sleeps 3 s after its add, then reads the group status every 5 s, so it can",
    "only finish about 3 + 5k s after the add.",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header_lines(sizes: list[int], latency: float | None) -> list[str]:
    """What is compared, on what: versions, the emulator's config, and whether pwt is installed."""
    lines = [
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
        f"polars {pl.__version__}, parallel-web-tools {_version('parallel-web-tools')} "
        f"(parallel-web {_version('parallel-web')}), {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"rows {', '.join(f'{n:,}' for n in sizes)}; emulator per run: latency {latency_label(latency)}, "
        f"{BUDGET:,} requests and {BUDGET:,} runs per {WINDOW:g}-s window, seed 1; processor {PROCESSOR}; "
        f"fields {', '.join(FIELDS)}",
    ]
    if parallel_enrich is None:
        lines.append(
            "parallel-web-tools is not installed: running enrich only "
            f"(pip install 'parallel-web-tools[polars]'; import said: {PWT_MISSING})"
        )
    return lines


def run_compare(
    sizes: list[int], latency: float | None, *, warm: bool = True
) -> tuple[list[tuple[Outcome, Outcome | None]], list[str]]:
    """Both tools at each size against fresh emulators; returns the pairs and the per-size detail lines.

    `warm`: first pay the first-call costs (imports, polars, the checkpoint's parquet writer, the SDK's
    models) on two rows, so they are no part of either tool's time; once per process is enough.
    """
    config = EmulatorConfig(
        latency=latency, rate_limit=BUDGET, run_rate_limit=BUDGET, rate_window=WINDOW, seed=1
    )
    pairs: list[tuple[Outcome, Outcome | None]] = []
    details: list[str] = []
    with tempfile.TemporaryDirectory(prefix="enrich-compare-") as tmp:
        work = Path(tmp)
        if warm:
            warm_config = EmulatorConfig(latency=0.05, seed=1)
            measure(run_enrich, companies(2), warm_config, work / "warm")
            if parallel_enrich is not None:
                measure(run_pwt, companies(2), warm_config, work / "warm")
        for rows in sizes:
            df = companies(rows)
            e = measure(run_enrich, df, config, work)
            p = measure(run_pwt, df, config, work) if parallel_enrich is not None else None
            pairs.append((e, p))
            details += ["", *detail_table(e, p, latency)]
            print(f"  ... {rows:,} rows done (latency {latency_label(latency)})", flush=True)
    return pairs, details


def pwt_schedule(floor: float) -> float:
    """When parallel-web-tools can notice that its last run ended: the first of its group-status reads
    (3 s after the add, then every 5 s) at or after `floor`."""
    return 3.0 + 5.0 * max(0, math.ceil((floor - 3.0) / 5.0))


def sweep_table(runs: dict[float | None, list[tuple[Outcome, Outcome | None]]]) -> list[str]:
    """enrich against pwt by latency: where the slowest run falls in pwt's 3 + 5k s schedule."""
    header = (
        "latency",
        "rows",
        "floor s",
        "enrich s",
        "pwt s",
        "pwt schedule s",
        "enrich/pwt",
        "floor/schedule",
        "target",
        "correct e/p",
    )
    table = []
    for latency, pairs in runs.items():
        for e, p in pairs:
            ok = p is not None and p.correct == p.rows
            table.append(
                (
                    latency_label(latency),
                    f"{e.rows:,}",
                    f"{floor_seconds(e.rows, latency):.2f}",
                    f"{e.wall:.1f}",
                    f"{p.wall:.1f}" if p is not None else "skipped",
                    f"{pwt_schedule(floor_seconds(e.rows, latency)):g}",
                    f"{e.wall / p.wall:.2f}x" if ok and p is not None else "n/a",
                    f"{floor_seconds(e.rows, latency) / pwt_schedule(floor_seconds(e.rows, latency)):.2f}x",
                    f"<= {TARGET_RATIO}x" if e.rows in TARGET_SIZES else "",
                    f"{rows_cell(e)} / {rows_cell(p) if p is not None else '-'}",
                )
            )
    lo, hi = PROCESSORS[PROCESSOR].latency
    return [
        "latency sweep (same config otherwise). latency: the mean run duration and its range. floor: when",
        "the slowest run can end. pwt schedule: its first group-status read at or after the floor (3 s",
        "after its add, then every 5 s). floor/schedule: the best ratio any client can get against it.",
        "",
        *format_table(header, table, right=tuple(range(1, len(header)))),
        "",
        f"Not run (too long for this bench): {PROCESSOR} at its real documented {lo:g}-{hi:g} s: floor "
        f"{hi:g} s, pwt schedule {pwt_schedule(hi):g} s, so at best {hi / pwt_schedule(hi):.2f}x.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default="500,1000,5000", help="comma-separated sizes (default 500,1000,5000)"
    )
    parser.add_argument(
        "--latency", type=float, default=2.0, help="mean run duration in seconds (default 2.0)"
    )
    args = parser.parse_args()
    try:
        sizes = [int(s.replace("_", "")) for s in args.rows.split(",") if s.strip()]
    except ValueError:
        parser.error("--rows must be comma-separated integers, e.g. 500,1000,5000")
    if not sizes or min(sizes) < 1:
        parser.error("--rows sizes must be at least 1")
    if args.latency <= 0:
        parser.error("--latency must be > 0")

    printed: list[str] = []

    def emit(lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)
            printed.append(line)

    command = f"python bench/compare.py --rows {','.join(map(str, sizes))} --latency {args.latency:g}"
    emit([f"{command}:", *header_lines(sizes, args.latency), ""])
    pairs, details = run_compare(sizes, args.latency)
    emit(summary_table(pairs, args.latency))
    emit(["", *SUMMARY_NOTE])
    emit(details)
    RESULTS.write_text(
        "# bench/compare.py: latest results\n\n"
        f"Written by `{command}` (overwritten on each run). See `bench/README.md`.\n\n"
        "```\n" + "\n".join(printed) + "\n```\n"
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
