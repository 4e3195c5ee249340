"""Scale: a million rows through the engine end to end against the emulator, then resume the checkpoint.

Run with `python bench/scale.py [--rows 1000000] [--partial]`; `run_scale(rows, workdir)` is the same
for `bench/run.py`. Prints small tables, no pass/fail, and writes them to `bench/results-scale.md`
(overwritten) when run as a command.

1. A synthetic input of `rows` distinct rows (`company`, `website`, `country`; deterministic) is written
   as Parquet into the work directory (not a timed stage).
2. The emulator runs in a process of its own (`bench/emuproc.py`) with a raised budget: runs take 2 s on
   average (1-3 s), and both it and the engine allow `REQUESTS` requests and `RUNS` runs per `WINDOW`
   seconds.
3. In a fresh spawned process (so its peak RSS and CPU are the client's own): `read_table()` of the
   input, `aenrich()` in group mode with a checkpoint, `write_table()` of the result. Wall per stage
   (the engine's come from `JobStats.stages`), CPU of the client process, its peak RSS, and from the
   emulator: requests, 429s, runs created, its CPU and peak RSS.
4. Resume: another fresh process makes the same call on the finished checkpoint. Everything is done, so
   it must send nothing (the emulator's request counter is read before and after).
5. With `--partial`: a job on a fresh emulator stopped by `timeout=` about halfway, then resumed in a
   fresh process (what loading a half-finished checkpoint costs, and that the rest is collected).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from emuproc import EmulatorProcess
from engine import FIELDS, ROUTES, format_table, in_fresh_process, peak_rss_mb

LATENCY = 2.0  # seconds, the mean run duration (the emulator draws from 0.5x to 1.5x)
REQUESTS = 2_000  # requests per window, engine and emulator
RUNS = 50_000  # runs per window, engine and emulator
WINDOW = 6.0  # seconds
PROCESSOR = "lite-fast"
RESULTS = Path(__file__).with_name("results-scale.md")
STAGES = ("read", "key", "dedupe", "load", "submit", "collect", "join", "write")
_COUNTRIES = ("United States", "Germany", "Japan", "Brazil", "India", "France", "Nigeria", "Canada")
_WORDS = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Cyberdyne", "Soylent")
_SUFFIXES = ("Inc", "GmbH", "Ltd", "SA", "KK", "Corp", "AG", "LLC")


# -- the input ---------------------------------------------------------------------------------------


def synthetic_input(rows: int) -> pl.DataFrame:
    """`rows` distinct rows: company, website, country; the same for the same `rows`."""
    i = pl.int_range(rows, eager=True, dtype=pl.Int64)
    word = pl.Series(_WORDS).gather(i % len(_WORDS))
    suffix = pl.Series(_SUFFIXES).gather((i // len(_WORDS)) % len(_SUFFIXES))
    country = pl.Series(_COUNTRIES).gather((i * 7919) % len(_COUNTRIES))
    n = i.cast(pl.Utf8).str.zfill(7)
    return pl.DataFrame(
        {
            "company": word + " " + n + " " + suffix,
            "website": word.str.to_lowercase() + "-" + n + ".example.com",
            "country": country,
        }
    )


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the client, in a fresh process ------------------------------------------------------------------


def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def client_job(
    input_path: str,
    checkpoint: str,
    url: str,
    api_key: str,
    output_path: str | None,
    timeout: float | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """read, aenrich, write (when `output_path`); runs in a spawned process, so its RSS and CPU are its own.

    With `profile` (a path), the aenrich call runs under pyinstrument and its text report is written there.
    """
    from enrich._engine import JobStats, aenrich
    from enrich._io import read_table, write_table

    cpu0, t0 = time.process_time(), time.perf_counter()
    df = read_table(input_path)
    t1 = time.perf_counter()
    rss_read = peak_rss_mb()
    stats = JobStats()
    call = aenrich(
        df,
        FIELDS,
        base_url=url,
        api_key=api_key,
        processor=PROCESSOR,
        checkpoint=checkpoint,
        progress=False,
        stats=stats,
        rate_limit=REQUESTS,
        run_rate=RUNS,
        rate_window=WINDOW,
        timeout=timeout,
    )
    cpu1 = time.process_time()
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="enabled", interval=0.001)
        profiler.start()
        out = asyncio.run(call)
        profiler.stop()
        hot = hotspots(profiler.last_session.root_frame())
        tree = profiler.output_text(unicode=False, color=False, show_all=False)
        Path(profile).write_text("\n".join(hot) + "\n\n" + tree)
    else:
        out = asyncio.run(call)
    t2 = time.perf_counter()
    cpu2 = time.process_time()
    rss_enrich = peak_rss_mb()
    # (counted on the column: a filter copies every column of the result, +200 MB at the peak at 1M rows)
    completed = int((out["_status"] == "completed").sum())
    pending = int((out["_status"] == "pending").sum())
    t3 = time.perf_counter()
    if output_path is not None:
        write_table(out, output_path)
    t4 = time.perf_counter()
    return {
        "hotspots": hot if profile else [],
        "rows": df.height,
        "read": t1 - t0,
        "enrich": t2 - t1,
        "write": t4 - t3 if output_path is not None else None,
        "wall": (t2 - t0) + (t4 - t3),
        "cpu": time.process_time() - cpu0,
        "cpu_enrich": cpu2 - cpu1,
        "rss": peak_rss_mb(),
        "rss_read": rss_read,
        "rss_enrich": rss_enrich,
        "rss_now": _proc_status("VmRSS"),
        "stages": dict(getattr(stats, "stages", {}) or {}),
        "requests": stats.requests,
        "rate_limited": stats.rate_limited,
        "polls": stats.polls,
        "stragglers": stats.stragglers,
        "already_done": stats.already_done,
        "submitted": stats.submitted,
        "completed": completed,
        "pending": pending,
        "warnings": list(stats.warnings),
    }


def hotspots(root: Any, top: int = 15) -> list[str]:
    """The functions that took the most time in a pyinstrument tree: by own time and including callees.

    Time the event loop spent waiting (`select`, pyinstrument's synthetic `[await]` frames) is left out,
    so the shares are of the time the client was busy.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()

    def name(frame: Any) -> str:
        function = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
        return f"{function} {frame.file_path_short}:{frame.line_no}"

    def walk(frame: Any, parent: str | None, stack: frozenset[str]) -> float:
        """Attribute `frame`'s busy time; returns it (its time less the waiting under it)."""
        if frame.is_synthetic:
            if frame.function == "[self]" and parent is not None:
                own[parent] += frame.time
                return float(frame.time)
            return 0.0  # [await], [out-of-context]: the loop was waiting
        if frame.function == "select" and "selector" in (frame.file_path_short or ""):
            return 0.0
        ident = name(frame)
        below = sum(walk(child, ident, stack | {ident}) for child in frame.children)
        mine = frame.time - sum(c.time for c in frame.children)
        own[ident] += mine
        if ident not in stack:  # time under a recursive call counts once
            total[ident] += below + mine
        return below + mine

    busy = max(walk(root, None, frozenset()), 1e-9)
    lines = [f"busy {busy:.1f} s of {root.time:.1f} s profiled (waiting in select/await left out)", ""]
    lines += ["by own time:", *(f"  {t / busy:6.1%} {t:7.2f} s  {k}" for k, t in own.most_common(top))]
    lines += [
        "including callees:",
        *(f"  {t / busy:6.1%} {t:7.2f} s  {k}" for k, t in total.most_common(top + 10)),
    ]
    return lines


# -- the bench ---------------------------------------------------------------------------------------


def _emulator() -> EmulatorProcess:
    return EmulatorProcess(
        latency=LATENCY, rate_limit=REQUESTS, run_rate_limit=RUNS, rate_window=WINDOW, seed=1
    )


def _s(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run_scale(
    rows: int,
    workdir: Path,
    *,
    partial: bool = False,
    profile: Path | None = None,
    results: Path | None = None,
) -> list[str]:
    """The scale bench at `rows` rows in `workdir`; prints its lines and returns them.

    `partial`: also stop a job halfway and resume it. `profile`: a path for a pyinstrument report of a
    separate diagnostic run of the client (its numbers are not the bench's). `results`: write the lines
    there as Markdown.
    """
    printed: list[str] = []

    def emit(lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)
            printed.append(line)

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    emit(
        [
            f"bench/scale.py --rows {rows}: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python "
            f"{platform.python_version()}, polars {pl.__version__}, {os.cpu_count()} CPUs, load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "",
        ]
    )

    # 1. the input
    input_path = workdir / "input.parquet"
    t = time.perf_counter()
    synthetic_input(rows).write_parquet(input_path)
    gen_seconds = time.perf_counter() - t
    input_bytes = input_path.stat().st_size
    checkpoint = workdir / "scale.enrich"
    output_path = workdir / "out.parquet"

    # 2-4. the job and its resume
    with _emulator() as emu:
        before = emu.stats()
        emu_cpu0 = emu.cpu_seconds()
        job = in_fresh_process(
            client_job, str(input_path), str(checkpoint), emu.url, emu.api_key, str(output_path)
        )
        served = emu.stats()
        emu_cpu1 = emu.cpu_seconds()
        emu_rss = emu.peak_rss_mb()
        resume = in_fresh_process(client_job, str(input_path), str(checkpoint), emu.url, emu.api_key, None)
        after = emu.stats()
    checkpoint_bytes = dir_bytes(checkpoint)
    output_bytes = output_path.stat().st_size

    emit(
        job_table(
            rows,
            job,
            before,
            served,
            emu_cpu0,
            emu_cpu1,
            emu_rss,
            input_bytes,
            gen_seconds,
            checkpoint_bytes,
            output_bytes,
        )
    )
    emit([""])
    emit(resume_table(rows, resume, served, after, checkpoint_bytes, "finished"))

    # 5. a half-finished checkpoint
    if partial:
        emit([""])
        half = workdir / "half.enrich"
        stop = max(1.0, round(job["enrich"] / 2))  # about half of the full job's aenrich call
        with _emulator() as emu:
            first = in_fresh_process(client_job, str(input_path), str(half), emu.url, emu.api_key, None, stop)
            mid = emu.stats()
            second = in_fresh_process(client_job, str(input_path), str(half), emu.url, emu.api_key, None)
            end = emu.stats()
        emit(partial_table(rows, stop, first, second, mid, end))

    # a diagnostic profile, separate from the measured run
    if profile is not None:
        emit(["", f"profile: a separate run of the client under pyinstrument, written to {profile}"])
        with _emulator() as emu:
            prof_dir = workdir / "profile.enrich"
            diag = in_fresh_process(
                client_job, str(input_path), str(prof_dir), emu.url, emu.api_key, None, None, str(profile)
            )
        emit([f"  (its wall {diag['wall']:.1f} s, CPU {diag['cpu']:.1f} s under the profiler)", ""])
        emit(["  " + line for line in diag["hotspots"]])

    if results is not None:
        command = f"python bench/scale.py --rows {rows}{' --partial' if partial else ''}"
        results.write_text(
            "# bench/scale.py: latest results\n\n"
            f"Written by `{command}` (overwritten on each run). See `bench/README.md`.\n\n"
            "```\n" + "\n".join(printed) + "\n```\n"
        )
    return printed


def _stage_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    stages = r["stages"]
    wall = r["wall"]
    out = []
    for name in STAGES:
        value = r[name] if name in ("read", "write") else stages.get(name)
        share = "" if value is None or not wall else f"{value / wall:.0%}"
        out.append((f"  {name}", _s(value), share))
    engine = sum(stages.get(n, 0.0) for n in STAGES if n not in ("read", "write"))
    if stages:
        out.append(("  (aenrich outside these stages)", _s(r["enrich"] - engine), ""))
    return out


def job_table(
    rows: int,
    job: dict[str, Any],
    before: dict[str, Any],
    served: dict[str, Any],
    emu_cpu0: float | None,
    emu_cpu1: float | None,
    emu_rss: float | None,
    input_bytes: int,
    gen_seconds: float,
    checkpoint_bytes: int,
    output_bytes: int,
) -> list[str]:
    requests = served["requests_total"] - before["requests_total"]
    limited = served["rate_limited"] - before["rate_limited"]
    created = served["runs_created"] - before["runs_created"]
    ideal = max(LATENCY, rows / RUNS * WINDOW)
    by_route = ", ".join(
        f"{ROUTES.get(route, route)} {n}"
        for route, n in sorted(served["requests"].items(), key=lambda item: -item[1])
    )
    emu_cpu = None if emu_cpu0 is None or emu_cpu1 is None else emu_cpu1 - emu_cpu0
    table: list[tuple[str, ...]] = [
        ("input", _mb(input_bytes), "", f"Parquet, {rows:,} distinct rows, generated in {gen_seconds:.1f} s"),
        *[
            (name, value, "", f"{share} of the wall" if share else "")
            for name, value, share in _stage_rows(job)
        ],
        ("total wall", f"{job['wall']:.1f} s", "", f"read + aenrich + write; aenrich {job['enrich']:.1f} s"),
        (
            "ideal",
            f"{ideal:.1f} s",
            "",
            f"max(latency {LATENCY:g} s, {rows:,} / {RUNS:,} runs x {WINDOW:g} s)",
        ),
        ("wall / ideal", f"{job['wall'] / ideal:.2f}x", "", ""),
        (
            "client peak RSS",
            f"{job['rss']:,.0f} MB",
            "<= 1,024 MB",  # issue 12
            f"after read {job['rss_read']:,.0f}, after aenrich {job['rss_enrich']:,.0f}",
        ),
        (
            "client CPU",
            f"{job['cpu']:.1f} s",
            "",
            f"aenrich alone {job['cpu_enrich']:.1f} s "
            f"({job['cpu_enrich'] / rows * 1000:.3f} s per 1,000 rows)",
        ),
        ("client CPU per 1,000 rows", f"{job['cpu'] / rows * 1000:.3f} s", "<= 0.2 s", "the whole process"),
        ("requests", f"{requests:,}", "", by_route),
        ("requests per row", f"{requests / rows:.5f}", "", f"the engine counted {job['requests']:,}"),
        ("429s", f"{limited:,}", "", f"{limited / max(requests, 1):.2%} of requests"),
        (
            "runs created - distinct",
            f"{created - rows:,}",
            "0",
            f"{created:,} created, duplicate_runs {served['duplicate_runs']}",
        ),
        (
            "polls / stragglers",
            f"{job['polls']} / {job['stragglers']}",
            "",
            "runs-stream reads / waited alone",
        ),
        ("rows completed", f"{job['completed']:,}", f"{rows:,}", f"pending {job['pending']:,}"),
        (
            "checkpoint on disk",
            _mb(checkpoint_bytes),
            "",
            f"{checkpoint_bytes / rows:.0f} bytes per row",
        ),
        ("output file", _mb(output_bytes), "", "Parquet, the input columns and the answers"),
        ("emulator CPU", f"{_s(emu_cpu, 1)} s", "", "its own process, during the job"),
        ("emulator peak RSS", f"{_s(emu_rss, 0)} MB", "", ""),
    ]
    lines = [
        f"(a) {rows:,} distinct rows end to end: read_table, aenrich (group mode, {PROCESSOR}, checkpoint),",
        "    write_table, in a fresh process; the emulator in another process; runs take "
        f"{LATENCY:g} s on average",
        f"    (uniform {LATENCY * 0.5:g}-{LATENCY * 1.5:g} s); engine and emulator allow {REQUESTS:,} "
        f"requests and {RUNS:,} runs per {WINDOW:g}-s window",
        "",
    ]
    lines += format_table(("measure", "value", "target", "note"), table, right=(1, 2))
    if job["warnings"]:
        lines += ["warnings: " + "; ".join(job["warnings"])]
    return lines


def resume_table(
    rows: int, r: dict[str, Any], before: dict[str, Any], after: dict[str, Any], cp_bytes: int, what: str
) -> list[str]:
    sent = after["requests_total"] - before["requests_total"]
    load = r["stages"].get("load")
    table: list[tuple[str, ...]] = [
        *[
            (name, value, "", f"{share} of the wall" if share else "")
            for name, value, share in _stage_rows(r)
            if name.strip() != "write"
        ],
        ("load", _s(load), "", "stages['load']" if load is not None else "n/a until JobStats.stages lands"),
        ("aenrich wall", f"{r['enrich']:.2f} s", "<= 5 s", "key + dedupe + load + join"),
        ("total wall", f"{r['wall']:.2f} s", "", "read + aenrich"),
        ("peak RSS", f"{r['rss']:,.0f} MB", "<= 1,024 MB", f"after read {r['rss_read']:,.0f}"),
        ("CPU", f"{r['cpu']:.2f} s", "", ""),
        ("requests sent", f"{sent:,}", "0", f"emulator counter; the engine counted {r['requests']:,}"),
        ("rows completed", f"{r['completed']:,}", f"{rows:,}", f"already done {r['already_done']:,}"),
    ]
    lines = [
        f"(b) resume of the {what} {rows:,}-row checkpoint ({_mb(cp_bytes)}): the same call again in a "
        "fresh process, no write",
        "",
    ]
    return lines + format_table(("measure", "value", "target", "note"), table, right=(1, 2))


def partial_table(
    rows: int,
    stop: float,
    first: dict[str, Any],
    second: dict[str, Any],
    mid: dict[str, Any],
    end: dict[str, Any],
) -> list[str]:
    table = [
        (
            "stopped run",
            f"{first['enrich']:.1f} s",
            f"{first['completed']:,}",
            f"{mid['runs_created']:,}",
            f"{mid['requests_total']:,}",
            _s(first["stages"].get("load")),
            f"{first['rss']:,.0f}",
        ),
        (
            "resume",
            f"{second['enrich']:.1f} s",
            f"{second['completed']:,}",
            f"{end['runs_created'] - mid['runs_created']:,}",
            f"{end['requests_total'] - mid['requests_total']:,}",
            _s(second["stages"].get("load")),
            f"{second['rss']:,.0f}",
        ),
    ]
    lines = [
        f"(c) a half-finished checkpoint: a fresh emulator, the job stopped by timeout={stop:g} s, then the "
        "same call again",
        f"    (rows already done when resumed: {second['already_done']:,}; runs created in all "
        f"{end['runs_created']:,}, duplicate_runs {end['duplicate_runs']})",
        "",
    ]
    header = ("call", "aenrich", "completed", "runs created", "requests", "load s", "peak RSS MB")
    return lines + format_table(header, table, right=tuple(range(1, len(header))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows (default 1,000,000)")
    parser.add_argument("--partial", action="store_true", help="also stop a job halfway and resume it")
    parser.add_argument("--profile", type=Path, help="also profile the client (pyinstrument text) to PATH")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.workdir is not None:
        run_scale(args.rows, args.workdir, partial=args.partial, profile=args.profile, results=RESULTS)
    else:
        with tempfile.TemporaryDirectory(prefix="enrich-scale-") as tmp:
            run_scale(args.rows, Path(tmp), partial=args.partial, profile=args.profile, results=RESULTS)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
