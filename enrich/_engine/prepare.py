"""Stage 1, preparation (no network): the frame, the output description and the options become a
`_Plan`: each row's input keyed by content and deduplicated, the local checks done, and the place of
the job's checkpoint. Every bad input is a one-line `UsageError` here, before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from enrich._exceptions import (
    UsageError,
)
from enrich._inputs import (
    build_inputs,
    check_input_size,
    chosen_columns,
    dedupe,
    keys_and_sizes,
    near_name,
    text_keys_and_sizes,
    to_polars,
    validate_inputs,
)
from enrich._processors import PROCESSORS
from enrich._run_options import RunOptions
from enrich._schema import RESERVED_COLUMNS, OutputSpec, check_collisions, parse_output
from enrich._store import CheckpointStore, as_store

#: The metadata key that carries a run's row key (the API allows keys of at most 16 characters).
KEY_FIELD = "enrich_key"
_META_KEY_MAX = 16
_META_VALUE_MAX = 512
_INPUT_LIMIT = 25_000  # task spec + input, in characters
_MODES = ("group", "runs")


@dataclass
class _Plan:
    df: pl.DataFrame
    kind: str
    original: Any
    spec: OutputSpec
    task_spec: dict[str, Any]
    processor: str
    mode: str
    metadata: dict[str, Any]
    key_data: list[str] | pl.Series  # distinct keys, first-seen order (read them as `keys`, `key_series`)
    index: Sequence[int]  # row -> distinct key index (a range when no row repeats another)
    inputs: list[Any] | None  # distinct inputs; None: built when asked (`inputs_of`)
    input_rows: list[int] | None  # the first row of each distinct key (None: row i is key i)
    columns: list[str]  # the columns sent
    prompt: str | None
    local_errors: dict[str, str]  # key -> why it is not sent
    fingerprint: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)  # "key", "dedupe": seconds
    notes: list[str] = field(default_factory=list)  # said once in the job's warnings
    consumed: bool = False  # a job ran from it (it gives its inputs away): never reused
    run_options: RunOptions | None = None  # sent with every run (rendered per row when templated)
    option_texts: pl.Series | None = None  # per row of `df`: its rendered options (templated ones)
    _key_list: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def keys(self) -> list[str]:
        """The distinct keys as a list (made once from `key_data` when that is a Series: a settled shard's
        join never asks, so its 40,000 keys never become Python strings)."""
        if self._key_list is None:
            data = self.key_data
            self._key_list = data.to_list() if isinstance(data, pl.Series) else data
        return self._key_list

    @keys.setter
    def keys(self, value: list[str]) -> None:
        self.key_data, self._key_list = value, value

    def key_series(self) -> pl.Series:
        """The distinct keys as a polars Series (no copy when they came as one)."""
        data = self.key_data
        return data if isinstance(data, pl.Series) else pl.Series(data, dtype=pl.String)

    def inputs_of(self, wanted: set[str]) -> dict[str, Any]:
        """key -> input of the distinct rows in `wanted` (built now when the keys came from polars)."""
        if not wanted:
            return {}
        if self.inputs is not None:
            return {k: x for k, x in zip(self.keys, self.inputs, strict=True) if k in wanted}
        at, rows = self._rows_of(wanted)
        built = build_inputs(self.df[rows], columns=self.columns, prompt=self.prompt)
        return {self.keys[d]: x for d, x in zip(at, built, strict=True)}

    def options_of(self, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """key -> the run options rendered for that row's run (`option_texts`: templated options; the
        same options for every row are `run_options.given`), for `wanted`."""
        if self.run_options is None or self.option_texts is None or not wanted:
            return {}
        at, rows = self._rows_of(wanted)
        texts = self.option_texts.gather(rows).to_list()
        return {self.keys[d]: self.run_options.decode(t) for d, t in zip(at, texts, strict=True)}

    def _rows_of(self, wanted: set[str]) -> tuple[list[int], list[int]]:
        """The distinct rows of the keys in `wanted` (their places among `keys`), and their rows of `df`."""
        at = [d for d, k in enumerate(self.keys) if k in wanted]
        return at, at if self.input_rows is None else [self.input_rows[d] for d in at]

    @property
    def added(self) -> list[str]:
        """The columns the job adds to the caller's frame."""
        return [*self.spec.columns, *RESERVED_COLUMNS]


def _allowed_processors() -> set[str]:
    extra = os.environ.get("ENRICH_EXTRA_PROCESSORS", "")
    return set(PROCESSORS) | {p.strip() for p in extra.split(",") if p.strip()}


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise UsageError(
            f"metadata must be a dict of short keys to scalar values, got {type(metadata).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"metadata key {key!r} must be a non-empty string")
        if key == KEY_FIELD:
            raise UsageError(f"metadata key {KEY_FIELD!r} is reserved for enrich's row key: rename it")
        if len(key) > _META_KEY_MAX:
            raise UsageError(f"metadata key {key!r} is {len(key)} characters; the API allows {_META_KEY_MAX}")
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(
                f"metadata value of {key!r} must be a string, number or boolean, got {type(value).__name__}"
            )
        if isinstance(value, str) and len(value) > _META_VALUE_MAX:
            raise UsageError(
                f"metadata value of {key!r} is {len(value)} characters; the API allows {_META_VALUE_MAX}"
            )
        out[key] = value
    return out


@dataclass
class _Job:
    """What a job is, apart from its rows: the checked arguments, for a frame or a table read in batches."""

    spec: OutputSpec
    task_spec: dict[str, Any]
    processor: str
    mode: str
    metadata: dict[str, Any]
    columns: list[str]  # the columns sent
    prompt: str | None
    input_schema: dict[str, Any] | None
    earlier: list[str]  # an earlier enrichment's columns, dropped from the input
    notes: list[str]
    options: RunOptions | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        # What makes two calls one job. Not the input mapping (columns, prompt): each row's key is a hash
        # of the input it sends, so a row whose input did not change keeps its run whatever the mapping.
        return {
            "task_spec": self.task_spec,
            "processor": self.processor,
            "mode": self.mode,
            "metadata": self.metadata,
        }

    def option_texts(self, df: pl.DataFrame, *, first_row: int = 0) -> pl.Series | None:
        """Each row's run options rendered (canonical JSON), when they are templated: from `df` as
        given, an earlier enrichment's columns included (`{_interaction_id}`)."""
        if self.options is None or not self.options.templated:
            return None
        return self.options.render(df, first_row)

    def keyed(
        self,
        df: pl.DataFrame,
        *,
        first_row: int = 0,
        options: pl.Series | None = None,
        as_list: bool = False,
    ) -> tuple[list[str] | pl.Series, Sequence[int], list[Any] | None]:
        """Each row's key and input size, and the inputs when they had to be built to key them (None:
        keyed from the text columns by polars, the inputs built when asked). `first_row`: the place of
        `df`'s first row in the table (a batch's), for the row an error names. `options`: each row's
        rendered run options (`option_texts`), when they are templated. `as_list`: the keys as a list,
        else maybe a Series (computed by polars)."""
        extra: str | pl.Series | None = options
        if extra is None and self.options is not None:
            extra = self.options.static_text()
        fast = None
        if self.prompt is None and self.input_schema is None:
            fast = text_keys_and_sizes(
                df, self.columns, self.task_spec, self.processor, options=extra, as_list=as_list
            )
        if fast is not None:
            return fast[0], fast[1], None
        inputs = build_inputs(df, columns=self.columns, prompt=self.prompt, first_row=first_row)
        keys, sizes = keys_and_sizes(inputs, self.task_spec, self.processor, options=extra)
        return keys, sizes, inputs


def _check_choices(processor: str, mode: str) -> None:
    if mode not in _MODES:
        raise UsageError(f"mode must be 'group' or 'runs', got {mode!r}")
    if not isinstance(processor, str) or processor not in _allowed_processors():
        known = ", ".join(sorted(PROCESSORS, key=lambda p: (PROCESSORS[p].price_per_1k, p)))
        close = near_name(str(processor), list(PROCESSORS))
        meant = f"did you mean {close!r}? " if close else ""
        raise UsageError(
            f"unknown processor {processor!r}; {meant}known: {known} "
            "(a newer one can be allowed with ENRICH_EXTRA_PROCESSORS=name)"
        )


def _checked_job(
    schema: pl.Schema,
    output: Any,
    *,
    columns: Sequence[str] | str | None,
    prompt: str | None,
    input_schema: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    processor: str,
    mode: str,
    options: RunOptions | None = None,
) -> _Job:
    """The arguments of a job on a table of `schema`, checked: every bad one is a `UsageError`."""
    _check_choices(processor, mode)
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    spec = parse_output(output)
    notes: list[str] = []
    # An enriched frame enriched again: its own columns are never sent, and this job's replace them.
    earlier = [c for c in schema if c in RESERVED_COLUMNS]
    if earlier:
        notes.append(
            f"the input holds an earlier enrichment's {', '.join(earlier)}: they are not sent and are "
            "replaced by this job's (rename them first to keep both)"
        )
    kept = pl.DataFrame(schema={c: t for c, t in schema.items() if c not in earlier})
    check_collisions(spec, kept.columns)
    if input_schema is not None and (
        not isinstance(input_schema, Mapping) or input_schema.get("type") != "object"
    ):
        raise UsageError('input_schema must be a JSON Schema object: {"type": "object", "properties": {...}}')
    meta = _check_metadata(metadata)
    task_spec = spec.task_spec(dict(input_schema) if input_schema is not None else None)
    chosen = chosen_columns(kept, list(columns) if columns is not None else None)
    if options is not None:
        for name in options.columns:  # (an earlier enrichment's columns too: `{_interaction_id}`)
            if name not in schema:
                from enrich._inputs import _missing_column

                raise _missing_column(name, list(schema), what="run_options field column")
    return _Job(
        spec=spec,
        task_spec=task_spec,
        processor=processor,
        mode=mode,
        metadata=meta,
        columns=chosen,
        prompt=prompt,
        input_schema=dict(input_schema) if input_schema is not None else None,
        earlier=earlier,
        notes=notes,
        options=options,
    )


def _prepare(
    data: Any,
    output: Any,
    *,
    columns: Sequence[str] | None,
    prompt: str | None,
    input_schema: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    processor: str,
    mode: str,
    options: RunOptions | None = None,
) -> _Plan:
    _check_choices(processor, mode)  # (before the frame is read: a LazyFrame is collected by to_polars)
    df, kind = to_polars(data)
    job = _checked_job(
        df.schema,
        output,
        columns=columns,
        prompt=prompt,
        input_schema=input_schema,
        metadata=metadata,
        processor=processor,
        mode=mode,
        options=options,
    )
    t0 = time.monotonic()
    texts = job.option_texts(df)  # (before an earlier enrichment's columns go: they may be named)
    if job.earlier:
        df = df.drop(job.earlier)
    # (deduplicated as a list: polars' unique of a Series of keys kept 260 MB more at a million rows)
    all_keys, all_sizes, inputs = job.keyed(df, options=texts, as_list=True)
    t1 = time.monotonic()
    plan = _distinct_plan(job, df, kind, data, all_keys, all_sizes, inputs, options=texts)
    plan.timings.update({"key": t1 - t0, "dedupe": time.monotonic() - t1})
    return plan


def _distinct_plan(
    job: _Job,
    df: pl.DataFrame,
    kind: str,
    original: Any,
    all_keys: list[str] | pl.Series,
    all_sizes: Sequence[int],
    inputs: list[Any] | None,
    *,
    distinct: bool = False,
    options: pl.Series | None = None,
) -> _Plan:
    """The plan of `df`'s rows, keyed (`all_keys`, `all_sizes`, and `inputs` if they were built):
    deduplicated, and the rows the API would refuse found. Keys given as a Series (a spooled shard's)
    are deduplicated in polars: no Python object per row; `distinct`: they are known to be."""
    rows: list[int] | None = None  # the first row of each distinct key (None: row i is key i)
    keys: list[str] | pl.Series
    if distinct:
        keys = all_keys.alias("key") if isinstance(all_keys, pl.Series) else list(all_keys)
        index: Sequence[int] = range(len(keys))
    elif isinstance(all_keys, pl.Series):
        keyed = pl.DataFrame({"k": all_keys}).with_row_index("row")
        firsts = keyed.unique("k", keep="first", maintain_order=True)
        keys = firsts["k"].alias("key")
        index = range(len(keys))
        if len(keys) != len(all_keys):
            index = keyed.join(
                firsts.with_row_index("d").select("k", "d"), on="k", how="left", maintain_order="left"
            )["d"]
            rows = firsts["row"].to_list()
        del keyed, firsts
    else:
        keys, index = dedupe(all_keys)
        if len(keys) != len(all_keys):
            first: dict[str, int] = {}
            for row, key in enumerate(all_keys):
                first.setdefault(key, row)
            rows = [first[k] for k in keys]
    if rows is None:
        distinct_inputs, sizes = inputs, all_sizes
    else:
        distinct_inputs = [inputs[r] for r in rows] if inputs is not None else None
        sizes = all_sizes.gather(rows) if isinstance(all_sizes, pl.Series) else [all_sizes[r] for r in rows]
    del all_keys, all_sizes
    local_errors: dict[str, str] = {}
    problems = check_input_size([], job.task_spec, limit=_INPUT_LIMIT, sizes=sizes)
    if any(problems):  # (the usual table has none: no loop over its keys)
        for key, problem in zip(keys, problems, strict=True):
            if problem:
                local_errors[key] = problem
    if job.input_schema is not None:
        if distinct_inputs is None:
            at = range(len(keys)) if rows is None else rows
            distinct_inputs = build_inputs(df[list(at)], columns=job.columns, prompt=job.prompt)
        problems = validate_inputs(distinct_inputs, job.input_schema)
        for key, problem in zip(keys, problems, strict=True):
            if problem and key not in local_errors:
                local_errors[key] = f"input does not match input_schema: {problem}"
    return _Plan(
        df=df,
        kind=kind,
        original=original,
        spec=job.spec,
        task_spec=job.task_spec,
        processor=job.processor,
        mode=job.mode,
        metadata=job.metadata,
        key_data=keys,
        index=index,
        inputs=distinct_inputs,
        input_rows=rows,
        columns=job.columns,
        prompt=job.prompt,
        local_errors=local_errors,
        fingerprint=job.fingerprint,
        notes=list(job.notes),
        run_options=job.options,
        option_texts=options,
    )


def cache_dir() -> Path:
    """Where default checkpoints live: env `ENRICH_CACHE_DIR`, else the platform's user cache directory
    (`~/.cache/enrich` on Linux, `~/Library/Caches/enrich` on macOS, `%LOCALAPPDATA%\\enrich\\Cache` on
    Windows)."""
    configured = os.environ.get("ENRICH_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("enrich", appauthor=False))


def _checkpoint_path(
    checkpoint: str | os.PathLike[str] | CheckpointStore | bool | None,
    fingerprint: Mapping[str, Any],
    service: str,
    keys: Iterable[str] = (),
    *,
    ordered: bool = False,
) -> tuple[Path | CheckpointStore, bool]:
    """(the checkpoint directory or store, whether it is temporary) for the `checkpoint=` argument.

    A `CheckpointStore` is used as it is.

    None (or True): a directory under `cache_dir()` named by the job, the service and the distinct
    inputs (`keys`, sorted here unless `ordered`), so the same call made again (a notebook cell run
    twice) resumes instead of paying twice, and a call on other data is another job (its own
    max_cost, its own lock). False: a new temporary one.
    """
    if isinstance(checkpoint, CheckpointStore):
        return checkpoint, False
    if isinstance(checkpoint, str) and "://" in checkpoint:
        return as_store(checkpoint), False  # object storage (s3://bucket/prefix), or refused
    if checkpoint is False:
        return Path(tempfile.mkdtemp(prefix="enrich-")), True
    if checkpoint is None or checkpoint is True:
        digest = hashlib.sha256(json.dumps({"job": fingerprint, "service": service}, sort_keys=True).encode())
        # The rows too: other data with the same columns is another job.
        for key in keys if ordered else sorted(keys):
            digest.update(key.encode())
        name = digest.hexdigest()[:16]
        return cache_dir() / "checkpoints" / f"{fingerprint.get('processor', 'job')}-{name}", False
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise UsageError(
            "checkpoint must be a directory path, an object-storage URL, a CheckpointStore, None (a default "
            "one) or False (none), "
            f"got {type(checkpoint).__name__}"
        )
    return Path(checkpoint), False
