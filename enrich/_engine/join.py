"""Stage 6, the join: the answers, typed, onto every row of the caller's frame in its original order,
with `_status`, `_error`, `_run_id`, `_interaction_id` and (with `basis=True`) `_basis`.

`_meta` says per distinct row what became of it; `_distinct` builds the added columns of a range of
distinct rows from their answers; `assemble` runs it a part at a time (`_join` does it at once, for the
empty result).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import polars as pl

from enrich._engine.job import OUTCOMES, _Job
from enrich._engine.prepare import _Plan
from enrich._models import FieldBasis

#: The distinct row an answer belongs to, carried beside the answers set aside (`assemble.Spill`): a
#: name no output field can have (they cannot start with "_"; a field named `d` once took the place of
#: the row number in a join).
ROW_OF = "__enrich_d"

# The join decodes and types this many answers at a time.
_JOIN_CHUNK = 100_000
_DECODE_BYTES = 4 << 20  # JSON text of the basis decoded at a time


_CITATION = pl.Struct({"url": pl.Utf8, "title": pl.Utf8, "excerpts": pl.List(pl.Utf8)})
# The basis as decoded from the service's JSON (set aside so, for the join: never kept in a checkpoint).
_BASIS = pl.List(
    pl.Struct(
        {"field": pl.Utf8, "reasoning": pl.Utf8, "confidence": pl.Utf8, "citations": pl.List(_CITATION)}
    )
)
# ... and as `_basis` gives it: each entry's `field` a top-level field, and `element` the index of the
# array element an entry is about (`field.0`, `field.1`, ... as the service names them), null for an
# entry about the whole field. One row per element: `out.explode("_basis").unnest("_basis")`.
_BASIS_OUT = pl.List(
    pl.Struct(
        {
            "field": pl.Utf8,
            "element": pl.Int64,
            "reasoning": pl.Utf8,
            "confidence": pl.Utf8,
            "citations": pl.List(_CITATION),
        }
    )
)
_ELEMENT = r"^(.+)\.(\d+)$"
# What `FieldBasis.from_json(...).to_json()` makes of a decoded entry: text fields "" and lists [] when
# missing (the confidence and a citation's title stay null: "not given").
_NORMAL_BASIS = pl.col("basis").list.eval(
    pl.element().struct.with_fields(
        pl.field("field").fill_null(""),
        pl.field("reasoning").fill_null(""),
        pl.field("citations")
        .fill_null(pl.lit([], dtype=pl.List(_CITATION)))
        .list.eval(
            pl.element().struct.with_fields(
                pl.field("url").fill_null(""),
                pl.field("excerpts").fill_null(pl.lit([], dtype=pl.List(pl.Utf8))),
            )
        ),
    )
)


_UNREADABLE = (
    "its answer could not be read back from the checkpoint (see the job's warnings); "
    "nothing is lost on the service: its run id is in _run_id"
)


def _meta(plan: _Plan, job: _Job | None) -> pl.DataFrame:
    """Per distinct row, in `plan.keys` order: `_status`, `_error`, `_run_id`, `_interaction_id` (its run's,
    as its outcome recorded it: null until it ends), and `answered` (the run whose answer the row gets:
    completed rows only). Built column-wise: a Python step per row was 2.4 s
    of a million-row resume."""
    keys = pl.DataFrame({"key": plan.key_series()})
    done = job.done if job is not None else {}
    run_of = job.run_of if job is not None else {}
    outcomes = list(done.values())
    finished = pl.DataFrame(
        {
            "key": pl.Series(list(done), dtype=pl.String),
            "_status": pl.Series([o[0] for o in outcomes], dtype=pl.String),
            "_error": pl.Series([o[1] for o in outcomes], dtype=pl.String),
        }
    )
    del outcomes
    runs = pl.DataFrame(
        {
            "key": pl.Series(list(run_of), dtype=pl.String),
            "_run_id": pl.Series(list(run_of.values()), dtype=pl.String),
        }
    )
    interactions = (
        job.cp.interactions()
        if job is not None
        else pl.DataFrame(schema={"run_id": pl.String, "interaction_id": pl.String})
    ).rename({"run_id": "_run_id", "interaction_id": "_interaction_id"})
    held = pl.Series(list(job.held_keys) if job is not None else [], dtype=pl.String)
    if job is not None and (job.temporary or job.default_checkpoint):
        running = (
            f"not finished yet: its run is recorded in {job.root}; pass "
            f"checkpoint={str(job.root)!r} to collect it without paying twice"
        )
    else:
        running = "not finished yet: run the same call again to collect it"
    if job is not None and job.capped:
        unsent = f"not submitted: the max cost of ${job.max_cost:,.2f} was reached"
    else:
        unsent = "not submitted yet: run the same call again"
    why_pending = (
        pl.when(pl.col("_run_id").is_not_null())
        .then(pl.lit(running))
        .when(pl.col("key").is_in(held.implode()))
        .then(
            pl.lit(
                "its create's answer was lost and the service may still commit it: run the same call "
                "again to find it (or, past the commit horizon, to send it again)"
            )
        )
        .otherwise(pl.lit(unsent))
    )
    return (
        keys.join(finished, on="key", how="left", maintain_order="left")
        .join(runs, on="key", how="left", maintain_order="left")
        .join(interactions, on="_run_id", how="left", maintain_order="left")
        .select(
            pl.col("_status").fill_null("pending"),
            pl.when(pl.col("_status").is_null())
            .then(why_pending)
            .otherwise(pl.col("_error"))
            .alias("_error"),
            "_run_id",
            "_interaction_id",
            pl.when(pl.col("_status") == "completed").then(pl.col("_run_id")).alias("answered"),
        )
    )


def _finished_meta(plan: _Plan, cp: Any, *, retry_failed: frozenset[str]) -> pl.DataFrame | None:
    """`_meta` of a shard whose every row is finished, read column-wise from its checkpoint, or None
    when something is left to do (a row to send, a run to collect, a create in doubt, a failure to
    retry). Building the job's state per row costs ~2 s of a million-row resume that has nothing to do.
    """
    if cp.service is None or cp.in_doubt():
        return None
    state = cp.state(outputs=False)
    cp.drop_cache()
    return _finished_meta_of(plan, state, retry_failed=retry_failed)


def _finished_meta_of(
    plan: _Plan, state: pl.DataFrame, *, retry_failed: frozenset[str]
) -> pl.DataFrame | None:
    """`_finished_meta` from a shard's state (`Checkpoint.state(outputs=False)`, or the one kept when it
    settled: `read_settled`), with nothing in doubt."""
    state = state.select(
        pl.col("row_key").alias("key"),
        pl.col("status").alias("_status"),
        pl.col("error").alias("_error"),
        pl.col("run_id").alias("_run_id"),
        pl.col("interaction_id").alias("_interaction_id"),
    )
    local = pl.DataFrame(
        {
            "key": pl.Series(list(plan.local_errors), dtype=pl.String),
            "_local": pl.Series(list(plan.local_errors.values()), dtype=pl.String),
        }
    )
    meta = (
        pl.DataFrame({"key": plan.key_series()})
        .join(state, on="key", how="left", maintain_order="left")
        .join(local, on="key", how="left", maintain_order="left")
    )
    del state
    refused = pl.col("_local").is_not_null()  # refused before sending: never sent, never retried
    ended = [s for s in OUTCOMES if s not in retry_failed]  # rows to send again are left to do
    if not meta.select((refused | pl.col("_status").is_in(ended)).fill_null(False).all()).item():
        return None
    return meta.select(
        pl.when(refused).then(pl.lit("failed")).otherwise(pl.col("_status")).alias("_status"),
        pl.when(refused).then(pl.col("_local")).otherwise(pl.col("_error")).alias("_error"),
        pl.when(refused).then(None).otherwise(pl.col("_run_id")).alias("_run_id"),
        pl.when(refused).then(None).otherwise(pl.col("_interaction_id")).alias("_interaction_id"),
        pl.when(~refused & (pl.col("_status") == "completed")).then(pl.col("_run_id")).alias("answered"),
    )


def _distinct(
    plan: _Plan,
    meta: pl.DataFrame,
    answers: pl.DataFrame,
    *,
    basis: bool,
    typed: pl.DataFrame | None = None,
    first: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The columns the job adds, for the distinct rows of `meta` (a slice of `_meta`): the typed answers
    found in `answers` (run_id, output text, typed basis, as `assemble.Spill` keeps them), `_status`,
    `_error`, `_run_id`, `_interaction_id`, and `_basis` with `basis`; and the answers typed here
    (run_id, the output columns, `_problem`), for `typed.TypedAnswers` to keep.

    `typed` holds answers typed by an earlier join (same columns, and `d`: the distinct row whose run
    it is; `meta` starts at distinct row `first`): those are not decoded again. Without
    `basis` their text need not have been read (`answers` may lack them): the record of a completed
    run is known from the checkpoint's light columns, and its typed answer was made from that record.
    With `basis` a row's basis comes from its record, so a row whose record was not read back says so.
    """
    columns = plan.spec.columns
    looked = meta.select(pl.col("answered").alias("run_id")).join(
        # (inner names: a text output's column is named "output" too)
        answers.select("run_id", pl.col("output").alias("_text"), pl.col("basis").alias("_basis_in")),
        on="run_id",
        how="left",
        maintain_order="left",
    )
    if typed is not None and typed.height:
        # Placed by row (which `spill_typed` found by run id), the last copy of a run winning (a
        # compaction that died before removing its sources leaves two): a scatter, where a join on the
        # run ids again, then a unique, were 8 s of a 10M-row resume's CPU.
        where = pl.repeat(None, looked.height, dtype=pl.UInt32, eager=True).scatter(
            (typed[ROW_OF] - first).cast(pl.UInt32), pl.int_range(typed.height, dtype=pl.UInt32, eager=True)
        )
        placed = typed.select(*columns, "_problem", pl.lit(True).alias("_typed"))[where]
        looked = pl.concat([looked, placed], how="horizontal")
    else:
        empty = pl.DataFrame(
            schema={**plan.spec.polars_schema(), "_problem": pl.String, "_typed": pl.Boolean}
        )
        looked = pl.concat([looked, empty.clear(looked.height)], how="horizontal")
    # A row's answer is there if its text was read, or (without the basis) it was typed before.
    read = pl.col("_text").is_not_null()
    if not basis:
        read = read | pl.col("_typed").fill_null(False)
    # Only the answers not typed before are decoded (in Python: a third of a million-row resume was this).
    todo = (looked["_text"].is_not_null() & looked["_typed"].is_null()).arg_true()
    texts = looked["_text"].gather(todo)
    # A chunk at a time: a million decoded answers at once would hold a gigabyte of Python objects.
    frames: list[pl.DataFrame] = []
    problems: list[str | None] = []
    for start in range(0, len(texts), _JOIN_CHUNK):
        frame, found = plan.spec.to_frame(_decode_answers(texts.slice(start, _JOIN_CHUNK).to_list()))
        frames.append(frame)
        problems.extend(found)
    if not frames:  # every answer typed before (building an empty one through pyarrow imports pandas)
        frames.append(pl.DataFrame(schema=plan.spec.polars_schema()))
    del texts
    fresh = (pl.concat(frames) if len(frames) > 1 else frames[0]).with_columns(
        pl.Series("_problem", problems, dtype=pl.String), pl.Series("_at", todo, dtype=pl.UInt32)
    )
    del frames, problems
    # The fresh answers into their places; the ones typed before are where the join put them.
    merged = (
        looked.with_row_index("_at")
        .join(fresh, on="_at", how="left", suffix="_fresh", maintain_order="left")
        .select(
            "run_id",
            "_text",
            "_basis_in",
            # Typed answers count only beside their record: an answer whose record cannot be read back
            # is said so on its row, whatever was typed from it before.
            *(pl.when(read).then(pl.coalesce(c, f"{c}_fresh")).alias(c) for c in [*columns, "_problem"]),
            read.alias("_read"),
        )
    )
    del looked
    new = merged.gather(todo).select("run_id", *columns, "_problem")
    problem = merged["_problem"]
    completed = meta["_status"] == "completed"
    # A completed run's answer is always recorded (JSON text, "null" at the least): none read back means
    # its segment could not be read. Said on the row, never passed off as an empty answer.
    unreadable = ~merged["_read"] & merged["run_id"].is_not_null()
    error = (
        pl.select(
            pl.when(unreadable)
            .then(pl.lit(_UNREADABLE))
            .when(completed & problem.is_not_null() & (problem != ""))
            .then(problem)
            .otherwise(meta["_error"])
        )
        .to_series()
        .alias("_error")
    )
    extra = [meta["_status"], error, meta["_run_id"], meta["_interaction_id"]]
    if basis:
        extra.append(_per_element(merged["_basis_in"].cast(_BASIS), plan.spec.columns).alias("_basis"))
    return merged.select(columns).with_columns(extra), new


def _join(plan: _Plan, job: _Job | None, *, basis: bool, answers: pl.DataFrame | None = None) -> pl.DataFrame:
    """The result at once: `plan.df` with the answers (`answers`: run_id, output text, typed basis),
    statuses and errors of its distinct rows, in its order (the empty result; `assemble` joins a job's
    answers a part at a time)."""
    distinct, _ = _distinct(
        plan, _meta(plan, job), answers if answers is not None else _no_answers(), basis=basis
    )
    index = pl.Series("i", plan.index, dtype=pl.UInt32)
    return pl.concat([plan.df, distinct[index]], how="horizontal")


def _no_answers() -> pl.DataFrame:
    return pl.DataFrame(schema={"run_id": pl.String, "output": pl.String, "basis": _BASIS})


def _per_element(basis: pl.Series, fields: list[str]) -> pl.Series:
    """`basis` (of `_BASIS`) as `_basis` gives it (`_BASIS_OUT`): an entry the service named `f.N`, where
    `f` is one of the top-level `fields` and `f.N` is not, is about element N of `f`: its `field` becomes
    `f` and its `element` N. Every other entry keeps its `field` as sent, `element` null. So no entry is
    dropped or renamed beyond recovery (`f.N` is `field` + "." + `element`), and a field whose name holds
    a dot is never taken for an element of another."""
    sent = pl.element().struct.field("field")
    head = sent.str.extract(_ELEMENT, 1)
    index = sent.str.extract(_ELEMENT, 2).cast(pl.Int64, strict=False)
    element = ~sent.is_in(fields) & head.is_in(fields) & index.is_not_null()
    return basis.list.eval(
        pl.struct(
            pl.when(element).then(head).otherwise(sent).alias("field"),
            pl.when(element).then(index).alias("element"),
            *(pl.element().struct.field(f) for f in ("reasoning", "confidence", "citations")),
        )
    ).cast(_BASIS_OUT)


def _typed_basis(part: pl.DataFrame) -> pl.DataFrame:
    """`part` with its basis column (JSON text as the service sent it) decoded to `_BASIS`, normalized as
    `FieldBasis` does (missing text fields empty, missing lists empty); decoded in Rust. A basis of an
    unexpected shape is decoded entry by entry in Python, as before."""
    texts = part["basis"]
    if texts.dtype != pl.String or texts.null_count() == len(texts):
        return part.with_columns(pl.lit(None, dtype=_BASIS).alias("basis"))
    try:
        # A slice at a time: decoding holds ~4x its text in temporaries (a 100 MB part peaked 380 MB).
        # (Slices are views: their boundaries where the running total of bytes crosses a multiple.)
        bucket = texts.str.len_bytes().fill_null(0).cum_sum() // _DECODE_BYTES
        starts = [0, *(bucket.diff().fill_null(0) != 0).arg_true().to_list(), len(texts)]
        decoded = pl.concat(
            [texts.slice(a, b - a).str.json_decode(dtype=_BASIS) for a, b in itertools.pairwise(starts)],
            rechunk=False,
        )
    except pl.exceptions.PolarsError:
        decoded = pl.Series("basis", [_basis_rows(t) for t in texts.to_list()], dtype=_BASIS)
    else:
        decoded = pl.DataFrame({"basis": decoded}).select(_NORMAL_BASIS)["basis"]
    return part.with_columns(decoded.alias("basis"))


def _decode_answers(texts: list[str | None]) -> list[Any]:
    """The answers as the checkpoint keeps them (JSON text, or None) → decoded values, None kept.

    Decoded as one JSON array: a third faster than a `json.loads` per answer. If that fails (text not
    written by `json.dumps`), answer by answer, a bad one as None.
    """
    present = [t for t in texts if t is not None]
    try:
        values = json.loads("[" + ",".join(present) + "]")
        if len(values) != len(present):
            raise ValueError("an answer is not one JSON value")
    except ValueError:
        values = [_loads_or_none(t) for t in present]
    it = iter(values)
    return [next(it) if t is not None else None for t in texts]


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _basis_rows(basis: Any) -> list[dict[str, Any]] | None:
    if isinstance(basis, str):  # as the checkpoint keeps it
        basis = json.loads(basis)
    if not isinstance(basis, list):
        return None
    # The basis is stored as the API sent it; FieldBasis gives every row the same shape and types.
    return [FieldBasis.from_json(b).to_json() for b in basis if isinstance(b, dict)]
