"""The pilot (`enrich(pilot=N)`, `enrich run --pilot N`): before the big spend, a sample of the job's
distinct inputs is run and measured, and the rest of the job projected from it.

Runs cannot be cancelled once created, and a schema mistake found after 100,000 runs is paid 100,000
times. A pilot sends N distinct inputs first, waits for them, and reports what a dry run can only guess:
the statuses, the service's warnings, the fields that came back empty or did not fit their type, how long
the runs took by the service's clock, what they cost, and the rest of the job under the quota at that
speed. The report is kept in the checkpoint (`pilot.json`): the next call with the same arguments goes
on with the whole job, and the pilot's rows are part of it, never paid again.

The sample is the N smallest row keys among the inputs the API would accept. A key is a SHA-256 digest
of the row's content, so the smallest are a uniform random sample, and the same job picks the same sample
every time (a pilot stopped halfway and started again sends only what it had not sent).
"""

from __future__ import annotations

import collections
import hashlib
import html
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from enrich._engine.prepare import _Plan
from enrich._engine.spool import _KEY, _OPTIONS, _ROW, _SIZE, BUCKETS, Spool

#: The version of the report's fields as kept in the checkpoint.
VERSION = 1
#: The histogram's bars are at most this many characters.
_BAR = 30


@dataclass(frozen=True)
class PilotReport:
    """What a pilot measured, and the rest of the job projected from it.

    Money is in US dollars at list prices (the service reports no cost per run: a run is paid whatever
    its status); `None` where the processor has no known price. Times are seconds. Run times are the
    service's own (`modified_at` - `created_at` of each ended run), not when enrich read the answers.
    """

    #: Distinct inputs sent in the pilot, and the rows of the table they answer.
    sample: int
    rows: int
    processor: str
    mode: str
    #: Pilot runs per outcome: completed, failed, cancelled, action_required, pending (not ended).
    statuses: dict[str, int]
    #: The service's warnings on the pilot's runs: message -> runs that carried it.
    warnings: dict[str, int]
    #: Per output field: {"null": completed rows where it came back empty, "mistyped": completed rows
    #: where its value did not fit its type (named in `_error`)}; fields with neither are left out.
    fields: dict[str, dict[str, int]]
    #: The run times (seconds) of the pilot's ended runs, by the service's clock.
    latencies: list[float]
    #: Wall seconds the pilot call took.
    wall: float
    price_per_run: float | None
    #: Distinct inputs the rest of the job sends, and their projected cost and wall time.
    rest_runs: int
    rest_cost: float | None
    rest_seconds: float | None
    #: The quota the projection assumed: runs and requests per window of `window` seconds.
    runs_per_window: float
    requests_per_window: float
    window: float
    version: int = VERSION
    notes: list[str] = field(default_factory=list)
    #: A digest of the sample's row keys (`sample_digest`): a kept report is the job's only while the
    #: job's sample is the same (a reworded prompt, other columns or other rows make another one).
    sample_digest: str = ""

    @property
    def runs(self) -> int:
        return sum(self.statuses.values())

    @property
    def completed(self) -> int:
        return self.statuses.get("completed", 0)

    @property
    def cost(self) -> float | None:
        """The pilot's cost: its runs at list price, failed ones included."""
        return None if self.price_per_run is None else self.runs * self.price_per_run

    @property
    def cost_per_answer(self) -> float | None:
        """What a completed answer cost in the pilot (failures spread over the answers)."""
        if self.cost is None or not self.completed:
            return None
        return self.cost / self.completed

    def percentile(self, q: float) -> float | None:
        """The run time at quantile `q` (0-1) of the pilot's ended runs; None if none ended."""
        return percentile(self.latencies, q)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PilotReport | None:
        """The report kept in a checkpoint; None if it is not one this version reads."""
        if not isinstance(data, Mapping) or data.get("version") != VERSION:
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None

    def lines(self) -> list[str]:
        """The report as short lines for a terminal."""
        out = [f"pilot: {self.sample:,} distinct inputs ({self.rows:,} rows), processor {self.processor}"]
        shown = ", ".join(f"{n:,} {s}" for s, n in sorted(self.statuses.items(), key=lambda x: -x[1]) if n)
        out.append(f"  runs:       {shown or 'none'}")
        for message, n in sorted(self.warnings.items(), key=lambda x: -x[1]):
            out.append(f"  warning:    {n:,} of {self.runs:,} runs: {message}")
        for name, counts in self.fields.items():
            said = [f"{n:,} empty" for n in [counts.get("null", 0)] if n]
            said += [f"{n:,} not of its type" for n in [counts.get("mistyped", 0)] if n]
            out.append(f"  field:      {name}: {', '.join(said)} of {self.completed:,} completed")
        if self.latencies:
            p50, p90, top = self.percentile(0.5), self.percentile(0.9), max(self.latencies)
            out.append(
                f"  run time:   p50 {_seconds(p50)}, p90 {_seconds(p90)}, max {_seconds(top)} "
                f"({len(self.latencies):,} runs, the service's clock); the pilot took {_seconds(self.wall)}"
            )
        else:
            out.append(
                f"  run time:   not known (the service gave no times); the pilot took {_seconds(self.wall)}"
            )
        if self.cost is not None:
            per = self.cost_per_answer
            out.append(
                f"  cost:       {_money(self.cost)} ({self.runs:,} runs at {_money(self.price_per_run)}"
                + (f"; {_money(per)} per completed answer)" if per is not None else ")")
            )
        rest = f"  the rest:   {self.rest_runs:,} runs"
        if self.rest_cost is not None:
            rest += f", about {_money(self.rest_cost)}"
        if self.rest_seconds is not None:
            rest += (
                f", about {_duration(self.rest_seconds)} at {self.runs_per_window:,.0f} runs and "
                f"{self.requests_per_window:,.0f} requests per {self.window:g} s"
            )
        out.append(rest)
        if self.runs and self.completed < self.runs:
            failed = 1 - self.completed / self.runs
            out.append(
                f"              about {failed * self.rest_runs:,.0f} of them unanswered, at the pilot's rate"
            )
        out.extend(f"  note:       {n}" for n in self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return f"PilotReport(\n{self}\n)"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(a)}</td><td style='text-align:left'>"
            f"{html.escape(b)}</td></tr>"
            for a, b in (_split(line) for line in self.lines()[1:])
        )
        chart = histogram_svg(self.latencies) if self.latencies else ""
        return f"<div><b>{html.escape(self.lines()[0])}</b><table>{rows}</table>{chart}</div>"


@dataclass(frozen=True)
class Pilot:
    """What `enrich(pilot=N)` returns when it ran the pilot: the pilot's rows enriched (`frame`, in the
    type of the table given) and its `report`. The next call with the same arguments runs the rest."""

    frame: Any
    report: PilotReport

    def __repr__(self) -> str:
        return (
            f"Pilot({len(self.frame):,} rows)\n{self.report}\nrun the same call again to go on with the job"
        )

    def _repr_html_(self) -> str:
        return self.report._repr_html_() + "<p>Run the same call again to go on with the job.</p>"


def _split(line: str) -> tuple[str, str]:
    head, _, rest = line.strip().partition(":")
    return head, rest.strip()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def _seconds(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x < 10:
        return f"{x:.2f} s"
    return f"{x:.1f} s" if x < 90 else _duration(x)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _money(x: float | None) -> str:
    return "n/a" if x is None else (f"${x:,.4f}" if x < 1 else f"${x:,.2f}")


# -- the sample ----------------------------------------------------------------------------------------


def sample_keys(keys: Iterable[str] | pl.Series, refused: Iterable[str], n: int) -> list[str]:
    """The pilot's `n` distinct inputs: the smallest keys of `keys` not in `refused`."""
    series = keys if isinstance(keys, pl.Series) else pl.Series(list(keys), dtype=pl.String)
    blocked = pl.Series(list(refused), dtype=pl.String)
    distinct = series.unique()  # (once: the order of `unique()` is arbitrary, and differs call to call)
    return distinct.filter(~distinct.is_in(blocked.implode())).sort().head(n).to_list()


def spool_sample(spool: Spool, n: int) -> tuple[list[str], pl.DataFrame]:
    """The pilot's keys of a spooled table (its files hold keys in order: the first files are read until
    `n` are found) and their rows (the input's columns, in row order; the spool's own columns too)."""
    keys: list[str] = []
    frames = []
    for bucket in range(BUCKETS):
        if len(keys) >= n:
            break
        if not spool.counts[bucket]:
            continue
        frame = spool._read(bucket, bucket + 1)
        found = sample_keys(frame[_KEY], spool.refused, n - len(keys))
        keys.extend(found)
        frames.append(frame.filter(pl.col(_KEY).is_in(pl.Series(found, dtype=pl.String).implode())))
    rows = pl.concat(frames) if frames else pl.DataFrame()
    return keys, rows.sort(_ROW) if rows.height else rows


def spool_rows_frame(rows: pl.DataFrame) -> pl.DataFrame:
    """A spooled sample's rows as the input's columns alone."""
    return rows.drop(_ROW, _KEY, _SIZE, _OPTIONS, strict=False)


def frame_sample(plan: _Plan, n: int) -> tuple[list[str], pl.DataFrame, pl.Series]:
    """The pilot's keys of a table in memory, its rows of `plan.df` (in order), and their positions."""
    keys = plan.key_series()
    chosen = sample_keys(keys, plan.local_errors, n)
    picked = keys.is_in(pl.Series(chosen, dtype=pl.String).implode())
    index = pl.Series(plan.index, dtype=pl.UInt32) if not isinstance(plan.index, range) else None
    at = picked.arg_true() if index is None else picked.gather(index).arg_true()
    return chosen, plan.df[at], at


def original_rows(original: Any, at: pl.Series) -> Any:
    """The caller's own rows at positions `at`, every column (an earlier enrichment's too, which run
    options may name), as the caller's type: pandas with their index labels and dtypes, Arrow as they
    were."""
    positions = at.to_list()
    if hasattr(original, "iloc"):  # pandas
        return original.iloc[positions]
    if isinstance(original, pl.LazyFrame):
        original = original.collect()
    if isinstance(original, pl.DataFrame):
        return original[at]
    return original.take(positions)  # a pyarrow Table


def sample_digest(keys: Iterable[str]) -> str:
    """A digest of a sample's row keys (their order does not matter)."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode())
    return digest.hexdigest()[:32]


# -- the report ----------------------------------------------------------------------------------------


def field_problems(frame: pl.DataFrame, columns: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per output column of the pilot's result (its rows), among completed rows: how many came back
    empty ("null"), and how many had a value that did not fit its type or was missing ("mistyped": the
    join names them in `_error`, as "founded: expected integer, got ...")."""
    done = frame.filter(pl.col("_status") == "completed")
    errors = done["_error"].fill_null("") if "_error" in done.columns else pl.Series([""] * done.height)
    out: dict[str, dict[str, int]] = {}
    for name in columns:
        if name not in done.columns:
            continue
        named = errors.str.contains(f"(^|; ){re.escape(name)}: ")
        nulls = int((done[name].is_null() & ~named).sum())
        mistyped = int(named.sum())
        if nulls or mistyped:
            out[name] = {"null": nulls, "mistyped": mistyped}
    return out


def project(
    rest_runs: int,
    latencies: list[float],
    *,
    mode: str,
    runs_per_window: float,
    requests_per_window: float,
    window: float,
    batch: int,
    spent: Iterable[tuple[float, int, int]] = (),
    margin: float = 0.02,
) -> float | None:
    """The wall seconds of `rest_runs` more runs started now: when the quota lets the last of them be
    created, then the slowest run the pilot saw (the last ones created end about that long after).
    None without run times.

    The creates are paced as the engine paces them: group mode adds `batch` runs a request, runs mode
    creates one a request, each as soon as the sliding windows of `window` seconds (the engine's, a
    `margin` longer than the service's) have room for its runs and its request. `spent` is what went
    before in the window: (seconds before now, runs, requests) of each create (the pilot's)."""
    if not latencies:
        return None
    if rest_runs <= 0:
        return 0.0
    period = window * (1 + margin)
    size = max(1, batch) if mode == "group" else 1
    recent: collections.deque[tuple[float, int, int]] = collections.deque(
        sorted((-ago, runs, requests) for ago, runs, requests in spent)
    )
    used_runs = sum(r for _, r, _ in recent)
    used_requests = sum(q for _, _, q in recent)
    t, left = 0.0, rest_runs
    while left:
        k = min(size, left, int(runs_per_window))
        while True:
            while recent and recent[0][0] + period <= t:  # out of the window (the same sum as below)
                _, r, q = recent.popleft()
                used_runs -= r
                used_requests -= q
            if used_runs + k <= runs_per_window and used_requests + 1 <= requests_per_window:
                break
            t = recent[0][0] + period
        recent.append((t, k, 1))
        used_runs += k
        used_requests += 1
        left -= k
    return t + max(latencies)


def histogram_lines(latencies: list[float], *, bins: int = 8) -> list[str]:
    """Run times as a small text histogram, one line per bin: its range, a bar, its count."""
    if not latencies:
        return []
    lo, hi = min(latencies), max(latencies)
    if hi <= lo:
        return [f"  {_seconds(lo):>9} {'#' * _BAR} {len(latencies):,}"]
    width = (hi - lo) / bins
    counts = [0] * bins
    for x in latencies:
        counts[min(bins - 1, int((x - lo) / width))] += 1
    top = max(counts)
    lines = []
    for i, n in enumerate(counts):
        start, end = lo + i * width, lo + (i + 1) * width
        bar = "#" * max(1 if n else 0, round(_BAR * n / top))
        lines.append(f"  {_seconds(start):>9} - {_seconds(end):<9} {bar:<{_BAR}} {n:,}")
    return lines


def histogram_svg(latencies: list[float], *, bins: int = 12) -> str:
    """Run times as a small SVG bar chart (for a notebook)."""
    if not latencies:
        return ""
    lo, hi = min(latencies), max(latencies)
    width = max((hi - lo) / bins, 1e-9)
    counts = [0] * bins
    for x in latencies:
        counts[min(bins - 1, int((x - lo) / width))] += 1
    top = max(counts)
    w, h, gap = 24, 80, 2
    bars = "".join(
        f"<rect x='{i * w + gap}' y='{h - h * n / top:.1f}' width='{w - 2 * gap}' "
        f"height='{h * n / top:.1f}' fill='#4c78a8'><title>{_seconds(lo + i * width)} - "
        f"{_seconds(lo + (i + 1) * width)}: {n:,}</title></rect>"
        for i, n in enumerate(counts)
    )
    label = html.escape(f"run time {_seconds(lo)} to {_seconds(hi)} ({len(latencies):,} runs)")
    return (
        f"<svg width='{bins * w}' height='{h + 16}' role='img' aria-label='{label}'>{bars}"
        f"<text x='0' y='{h + 13}' font-size='11'>{label}</text></svg>"
    )


def job_latencies(path: Any) -> pl.DataFrame:
    """run_id, status, seconds of every ended run of the job whose checkpoint is at `path`, every shard's
    (`Checkpoint.latencies`), read without a lock."""
    from enrich._checkpoint import Checkpoint
    from enrich._engine.shards import DIRECTORY, area_name

    root = Checkpoint.read(path)
    try:
        if root.shards == 1:
            return root.latencies()
        frames = []
        made = set(root.store.list(DIRECTORY + "/"))
        for shard in range(root.shards):
            name = area_name(shard)
            if f"{name}/manifest.json" not in made:
                continue
            area = Checkpoint.read(root.store.child(name))
            try:
                frames.append(area.latencies())
            finally:
                area.close(forget=True)
        if not frames:
            return root.latencies().clear()
        return pl.concat(frames)
    finally:
        root.close(forget=True)


def build_report(
    frame: pl.DataFrame,
    plan: _Plan,
    path: Any,
    stats: Any,
    *,
    wall: float,
    sendable: int,
    rate_limit: float,
    run_rate: float,
    rate_window: float,
    sample_digest: str = "",
) -> PilotReport:
    """The report of a pilot whose result (its rows) is `frame`, of the job `plan` (its whole table,
    `sendable` distinct inputs the API would accept), checkpointed at `path`, with `stats` of the call."""
    from enrich._client import MAX_RUNS_PER_ADD
    from enrich._processors import PROCESSORS

    ran = frame.filter(pl.col("_run_id").is_not_null()).unique("_run_id", keep="first", maintain_order=True)
    counts = ran["_status"].value_counts()
    statuses = dict(zip(counts["_status"].to_list(), counts["count"].to_list(), strict=True))
    unsent = frame.filter(pl.col("_run_id").is_null() & (pl.col("_status") == "pending")).height
    if unsent:
        statuses["pending"] = statuses.get("pending", 0) + unsent
    times = job_latencies(path)
    latencies = times.filter(
        pl.col("run_id").is_in(ran["_run_id"].implode()) & pl.col("seconds").is_not_null()
    )["seconds"].to_list()
    proc = PROCESSORS.get(plan.processor)
    price = proc.price_per_run if proc is not None else None
    rest = max(0, sendable - int(stats.runs_total))
    batch = min(MAX_RUNS_PER_ADD, int(run_rate))
    notes = []
    if ran.height and len(latencies) < ran.filter(pl.col("_status") != "pending").height:
        notes.append(
            "some runs' times are not known (the service gave none, or an older enrich recorded them)"
        )
    return PilotReport(
        sample=ran.height + unsent,
        rows=frame.height,
        processor=plan.processor,
        mode=plan.mode,
        statuses=statuses,
        warnings=dict(stats.service_warnings),
        fields=field_problems(frame, plan.spec.columns),
        latencies=latencies,
        wall=wall,
        price_per_run=price,
        rest_runs=rest,
        rest_cost=None if price is None else rest * price,
        rest_seconds=project(
            rest,
            latencies,
            mode=plan.mode,
            runs_per_window=run_rate,
            requests_per_window=rate_limit,
            window=rate_window,
            batch=batch,
            # (the pilot's creates are still in the window if the rest starts at once: `--yes`)
            spent=[(wall, ran.height, math.ceil(ran.height / batch) if plan.mode == "group" else ran.height)],
        ),
        runs_per_window=run_rate,
        requests_per_window=rate_limit,
        window=rate_window,
        notes=notes,
        sample_digest=sample_digest,
    )
