"""The checkpoint store: a job's durable record of what it has paid for.

A job turns each distinct input row, named by its `row_key` (32 hex digits), into one Task API run. Runs cost
money and take minutes to hours, so when the process dies (SIGKILL, a laptop going to sleep, Ctrl-C) the next
run of the same command must know which rows already have a run and never create a second one for them. This
module is that memory; the engine decides what to do with it.

Its files live in a `CheckpointStore` (`enrich._store`): by default a local directory (`LocalStore`), or
any store given to `Checkpoint.open` (`MemoryStore`, one for object storage). This module does no file I/O
of its own: it lists, reads, writes (whole, and without overwriting unless it replaces a small JSON file),
deletes and locks through the store, and the store keeps the invariants below that are about files. In a
directory, a checkpoint is:

    manifest.json                  {"format": 1, "job_id", "fingerprint", "service", "created_at",
                                   "instance" (a random id: this checkpoint), "enrich_version"}
    groups-000000001.parquet       task groups created: group_id
    intents-000000002.parquet      rows about to be sent in one add-runs request: batch_id, group_id, row_key,
                                   sent_at (when the request went out: a late commit is possible until a
                                   horizon after it)
    receipts-000000003.parquet     runs created: row_key, run_id, group_id, batch_id, created_at
    outcomes-000000004.parquet     runs finished: row_key, run_id, interaction_id (the service's, for a
                                   follow-up run; null in segments of an older enrich), status
                                   (completed, failed, cancelled, action_required), output, basis, error,
                                   finished_at, seconds (the run's time by the service's clock; null in
                                   segments of an older enrich)
    resolutions-000000005.parquet  in-doubt intent batches that reconciliation settled: batch_id
    duplicates-000000006.parquet   runs found for a row that already had one (a create committed after the
                                   job gave it up): row_key, run_id, group_id, found_at; paid, never joined
    pacing.json                    what the limiter learned of the service's quota (replaced atomically)
    warnings.json                  the service's warnings on the runs: message -> runs (replaced atomically)
    last_call.json                 the last call that opened it: rows, distinct inputs, when (replaced)
    pilot.json                     the report of the job's pilot (`enrich(pilot=N)`), once it ran (replaced)
    settled.parquet                a cache: the state when nothing was running or in doubt (its light
                                   columns, `state(outputs=False)`), tagged with
                                   the segments it was read from, used only while they are exactly the
                                   segments on disk (`record_settled`, `read_settled`; replaced)

Every segment row also holds `_order`, its place in the history (see below).

A large job is split into shards (`enrich._engine.shards`): its checkpoint is then a *root* whose manifest
says `"shards": n` (format 2, refused by an enrich that reads one area: it would see no runs and pay for
every row again; `record_shards`), with one ordinary checkpoint per shard in the sub-area `shards/XX/`.
The root records no segment; its pacing, warnings and last call are the job's.

Invariants, each chosen for "what if the process dies right here?":

* Whole files or nothing. Every file (the manifest and each segment) is made durable whole before the
  call that wrote it returns (`CheckpointStore.write`; in a directory: written under `<name>.tmp`,
  fsynced, linked or renamed into place, and the directory fsynced). A reader therefore sees a file
  complete or not at all. `*.tmp` files are debris of a write that died; opening for writing deletes them.
* Append-only. A segment is never modified after it appears: it is written only if its name is absent
  (the manifest too, when it is created). The number in its name (`seq`) is unique and grows across
  kinds; a failed write may leave a gap. Nothing is deleted except by compaction (below).
* Order. `_order` is `seq * 2**32 + i` for the i-th row of the write that first recorded it. "Latest" always
  means the greatest `_order`, never the file a row sits in, so compaction may move rows freely.
* Service. The manifest names the service whose runs the checkpoint records (the base URL, or "emulator"):
  run ids and answers of one service mean nothing to another, and answers of an emulator must never pass
  for a real service's. Opening with another service raises `ServiceMismatchError`. A checkpoint that
  recorded nothing takes the service it is opened with; one of an older enrich, which did not record it,
  takes it once the engine found one of its runs there (`adopt_service`).
* Identity. The manifest holds the job's fingerprint and `job_id`, a hash of it. Every segment holds the same
  `job_id` (and its kind, seq, tier and, for a merged segment, the seqs it replaces) in its Parquet key-value
  metadata. A segment of another job, or one that cannot be read (a torn write, a disk fault), is skipped and
  reported in `Checkpoint.warnings`; every other segment is still read, so nothing else is lost.
* One writer. `Checkpoint.open` holds the store's lock until `close()` (in a directory, an exclusive `flock`
  that the kernel drops when the process dies); `Checkpoint.read` takes no lock and changes nothing.

What a record means:

* A receipt is a run that exists and was paid for: `Checkpoint.runs` (distinct run ids of receipts and
  duplicates) is what was spent. A row's run is its latest receipt; a newer receipt for the same row (a
  retry) supersedes the older run. A duplicate is a run paid for that answers nothing: it never becomes
  a row's run.
* An outcome counts only when its `run_id` is the run of its row's latest receipt.
* A row is in doubt when its latest intent has no receipt with the same `batch_id` and that batch was not
  resolved: the add-runs request may or may not have created its runs, now or (a late commit) later. A
  later intent for the same row supersedes an earlier one. An intent written before `sent_at` existed
  reads with `sent_at` null: long past.

Compaction keeps the segment count bounded without ever rewriting the whole history on a flush. Each
segment has a tier: 0 when written by a record method, t + 1 when merged from segments of tier t. When a kind
has `compact_fanout` segments of one tier, they are merged into one segment of the next tier (keeping the
latest row per identity key: group_id; batch_id + row_key; batch_id; run_id; run_id; run_id), which is written
and made durable *before* its sources are deleted. A crash in between leaves the sources behind: the next open
finds their seqs in the merged segment's `enrich.replaces`, reads the merged segment instead, and deletes
them (if the merged segment proves unreadable, it reads the sources). A row is rewritten at most once per
tier, so writing n rows in w writes costs O(n log w) in total, and a kind keeps at most `compact_fanout - 1`
segments per tier, with about log(w) / log(fanout) tiers. Merged segments always hold older rows than
unmerged ones, and higher tiers older than lower, so reading them in that order yields rows in `_order`.

Memory: the object keeps groups, resolved batches, in-doubt rows, all receipts and the small columns of all
outcomes (run_id, interaction_id, status, error, finished_at), updated as it writes, so no call re-reads the
disk except `state(outputs=True)`, which reads the `output` and `basis` columns from the outcome segments on
each call. Intents are read at open only to find the rows in doubt. For 1,000,000 rows that is about 240 MB
kept (the interaction ids ~40 MB of it), and opening takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ._exceptions import CheckpointError, CheckpointMismatchError, ServiceMismatchError
from ._store import CheckpointStore, LocalStore, as_store

__all__ = ["Checkpoint", "Counts", "Intent", "Outcome", "Receipt"]

FORMAT: Final = 2  # the newest readable: 1, one area; 2, a root of shards (`"shards"` in the manifest)
MANIFEST: Final = "manifest.json"
#: The state of a checkpoint with nothing running or in doubt, kept in one file (`record_settled`).
SETTLED: Final = "settled.parquet"
_SETTLED_VERSION: Final = "3"  # 3: interaction_id among the columns (a file of 2 is not read: recomputed)
PACING: Final = "pacing.json"
SERVICE_WARNINGS: Final = "warnings.json"
LAST_CALL: Final = "last_call.json"
PILOT: Final = "pilot.json"

_ORDER = "_order"
_BUFFERED_ORDER = 1 << 62  # outcomes not yet flushed sort after everything on disk
_TS: Final[pl.Datetime] = pl.Datetime("us", "UTC")
_SCHEMAS: Final[dict[str, pl.Schema]] = {
    "groups": pl.Schema({"group_id": pl.String, _ORDER: pl.Int64}),
    "intents": pl.Schema(
        {
            "batch_id": pl.String,
            "group_id": pl.String,
            "row_key": pl.String,
            "sent_at": _TS,
            _ORDER: pl.Int64,
        }
    ),
    "resolutions": pl.Schema({"batch_id": pl.String, _ORDER: pl.Int64}),
    "receipts": pl.Schema(
        {
            "row_key": pl.String(),
            "run_id": pl.String(),
            "group_id": pl.String(),
            "batch_id": pl.String(),
            "created_at": _TS,
            _ORDER: pl.Int64(),
        }
    ),
    "outcomes": pl.Schema(
        {
            "row_key": pl.String(),
            "run_id": pl.String(),
            "interaction_id": pl.String(),
            "status": pl.String(),
            "output": pl.String(),
            "basis": pl.String(),
            "error": pl.String(),
            "finished_at": _TS,
            "seconds": pl.Float64(),
            _ORDER: pl.Int64(),
        }
    ),
    "duplicates": pl.Schema(
        {
            "row_key": pl.String(),
            "run_id": pl.String(),
            "group_id": pl.String(),
            "found_at": _TS,
            _ORDER: pl.Int64(),
        }
    ),
}
# Columns added after segments without them were written: such a segment reads them as null.
_ADDED: Final[dict[str, frozenset[str]]] = {
    "intents": frozenset({"sent_at"}),
    "outcomes": frozenset({"interaction_id", "seconds"}),
}
# The identity of a record: compaction keeps the latest row per key.
_KEYS: Final[dict[str, list[str]]] = {
    "groups": ["group_id"],
    "intents": ["batch_id", "row_key"],
    "resolutions": ["batch_id"],
    "receipts": ["run_id"],
    "outcomes": ["run_id"],
    "duplicates": ["run_id"],
}
# Outcome columns that can be large: read from disk only by `state(outputs=True)`, never kept in memory.
_HEAVY: Final = ("output", "basis")
# What stays in memory of the two kinds that grow with the job (the others are reduced to sets at open).
_MEMORY: Final[dict[str, list[str]]] = {
    "receipts": ["row_key", "run_id", "group_id", "created_at", _ORDER],
    "outcomes": ["run_id", "interaction_id", "status", "error", "finished_at", _ORDER],
}
_KINDS: Final = tuple(_SCHEMAS)
_SEGMENT_RE: Final = re.compile(rf"({'|'.join(_KINDS)})-(\d{{9,}})\.parquet")
_ROW_KEY_RE: Final = r"^[0-9a-fA-F]{32}$"
#: What an outcome records: a run's end as the service named it. A checkpoint of an older enrich recorded
#: every end but "completed" as "failed" (with the service's status in its error).
_STATUSES: Final = ("completed", "failed", "cancelled", "action_required")
_PENDING_SLICE: Final = 100_000  # intents compared with receipts at a time, on open
_LIGHT_STATE: Final = (
    "row_key",
    "run_id",
    "interaction_id",
    "group_id",
    "status",
    "error",
    "created_at",
    "finished_at",
)
_STATE_COLUMNS: Final = (
    "row_key",
    "run_id",
    "interaction_id",
    "group_id",
    "status",
    "output",
    "basis",
    "error",
    "created_at",
    "finished_at",
)


@dataclass(frozen=True, slots=True)
class Intent:
    """An add-runs request about to be sent (or, from `Checkpoint.in_doubt`, one whose answer is unknown).

    `group_id` is None for runs created outside a task group. From `in_doubt()`, `row_keys` holds only the
    keys still in doubt, in the order they were recorded. `sent_at` is when the request went out (UTC; None
    for an intent recorded before enrich kept it): the service may still commit it for a while after.
    """

    batch_id: str
    group_id: str | None
    row_keys: tuple[str, ...]
    sent_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A run the API created for a row. `created_at` is the API's timestamp (a naive one is taken as UTC)."""

    row_key: str
    run_id: str
    group_id: str | None
    batch_id: str
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished run. `output` and `basis` are JSON text, stored verbatim; `error` says why it has no answer
    (it failed, was cancelled, or waits for an action on the service's side: `action_required`).
    `interaction_id` is the service's id of the run's research, which a follow-up run names
    (`previous_interaction_id`); None when the service gave none."""

    row_key: str
    run_id: str
    status: Literal["completed", "failed", "cancelled", "action_required"]
    output: str | None = None
    basis: str | None = None
    error: str | None = None
    finished_at: datetime | None = None
    interaction_id: str | None = None
    #: How long the run took by the service's clock (its `modified_at` - `created_at` when it ended);
    #: None when the service gave no times (and in outcomes an older enrich recorded).
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    """How far a job got. Row counts are by `row_key`; `runs` is the number of runs created (paid for)."""

    rows: int
    """Rows with at least one run: submitted + completed + failed + cancelled + action_required."""
    submitted: int
    """Rows whose latest run has no outcome yet."""
    completed: int
    failed: int
    in_doubt: int
    """Rows whose latest add-runs request may or may not have created a run (see `Checkpoint.in_doubt`)."""
    runs: int
    """Distinct runs created, retries and duplicates included: what the job has spent, in runs."""
    duplicates: int = 0
    """Runs created for a row that already had one (a create the service committed after the job gave it
    up and sent again): paid for, never joined."""
    cancelled: int = 0
    """Rows whose run was cancelled: no answer, and not sent again unless asked by name (`retry_failed`)."""
    action_required: int = 0
    """Rows whose run stopped waiting for an action on the service's side: no answer, not waited for, and
    not sent again unless asked by name."""


@dataclass(slots=True)
class _Segment:
    kind: str
    seq: int
    tier: int
    replaces: tuple[int, ...] = ()  # for a merged segment: the seqs of its sources

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.seq:09d}.parquet"


class _Chunks:
    """A table that grows by appends, kept as a few frames; appends must keep it sorted by `_order`."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._parts = [frame]

    def append(self, frame: pl.DataFrame) -> None:
        self._parts.append(frame)
        if len(self._parts) > 64:  # amortised: copy everything once per 64 appends
            self._parts = [pl.concat(self._parts)]

    def frame(self) -> pl.DataFrame:
        return pl.concat(self._parts, rechunk=False) if len(self._parts) > 1 else self._parts[0]


class _Vanished(Exception):
    """A segment disappeared while a read-only reader listed the directory (a writer compacted it)."""


class _Reload(Exception):
    """A merged segment proved unreadable while its sources are still on disk: read again, using them."""


class Checkpoint:
    """The durable record of one job, in one store: a directory by default (see the module docstring).

    Open it with `Checkpoint.open` to run a job (one process at a time) or `Checkpoint.read` to look at one.
    Methods that record (`record_group`, `record_intents`, `record_receipts`, `resolve_intents`, `flush`)
    return only once the record is durable; if they raise `CheckpointError` nothing they were given is in
    memory, and the caller must stop creating runs. `add_outcomes` buffers. All methods are thread-safe.

    Example:

        with Checkpoint.open("companies.enrich", {"processor": "base", "output_schema": schema}) as cp:
            for intent in cp.in_doubt():
                ...  # reconcile: record_receipts(found) or resolve_intents(intent.batch_id)
            done = cp.state(outputs=False)
            cp.record_intents("b-0001", group_id, keys)
            cp.record_receipts(receipts)
            cp.add_outcomes(outcomes)
    """

    warnings: list[str]
    """Problems met while reading or compacting: skipped segments, postponed compactions. One line each."""

    def __init__(
        self,
        store: CheckpointStore,
        manifest: dict[str, Any],
        *,
        readonly: bool,
        compact_fanout: int = 16,
        flush_rows: int = 1000,
        flush_seconds: float = 5.0,
    ) -> None:
        """Use `Checkpoint.open` or `Checkpoint.read`."""
        if compact_fanout < 2:
            raise ValueError("compact_fanout must be at least 2")
        self._store = store
        self._path = store.path if isinstance(store, LocalStore) else Path(store.location)
        self._where = store.location  # for messages
        self._manifest = manifest
        self._job_id: str = manifest["job_id"]
        self._readonly = readonly
        self._closed = False
        self._forgotten = False  # close(forget=True) dropped the in-memory tables
        self._lock = threading.RLock()
        self._fanout = compact_fanout
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self.warnings = []
        self._next_seq = 1
        self._segments: dict[str, list[_Segment]] = {kind: [] for kind in _KINDS}
        self._compact_backoff: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self._groups: list[str] = []
        self._resolved: set[str] = set()
        # row_key -> (batch_id, group_id, _order, sent_at) of its latest intent, while it is in doubt.
        self._pending: dict[str, tuple[str, str | None, int, datetime | None]] = {}
        # Duplicate runs: run_id -> row_key (few: each is a create committed after its horizon).
        self._duplicates: dict[str, str] = {}
        self._pacing: dict[str, Any] | None = None
        # Receipts and outcomes in memory (columns of _MEMORY), each sorted by _order.
        self._receipts = _Chunks(_empty("receipts").select(_MEMORY["receipts"]))
        self._outcomes = _Chunks(_empty("outcomes").select(_MEMORY["outcomes"]))
        self._runs = 0  # distinct run ids among the receipts
        # hash() of every run id among the receipts: a new receipt's run is looked up here, not in a scan
        # of every receipt (which made recording receipts O(history)). ~64 MB per million runs. Built on
        # the first receipt recorded after opening: a resume with nothing left to submit never needs it.
        self._run_hashes: set[int] | None = set()
        self._buffer: list[pl.DataFrame] = []  # outcomes not yet flushed, all columns, no _order
        self._buffered = 0
        self._buffer_since: float | None = None
        self._light: pl.DataFrame | None = None  # cached state without the heavy columns
        self._unreadable: dict[int, str] = {}  # seq -> warning, for segments whose rows failed to read
        self._load()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | CheckpointStore,
        fingerprint: Mapping[str, Any],
        *,
        create: bool = True,
        service: str | None = None,
        compact_fanout: int = 16,
        flush_rows: int = 1000,
        flush_seconds: float = 5.0,
    ) -> Checkpoint:
        """Open the checkpoint at `path` for writing, creating it (and missing parents) when `create` is true.

        `path` is a directory or a `CheckpointStore` (a directory means `LocalStore(path)`).
        `fingerprint` is a JSON-able mapping that names the job (output schema, processor, mode, ...). A
        checkpoint made with a different fingerprint raises `CheckpointMismatchError`, whose one line names
        the keys that differ. The keys an older enrich fingerprinted and this one does not (`_RETIRED`)
        are ignored. `service` names the service the runs are created
        on; a checkpoint of another service raises `ServiceMismatchError`. Outcomes given to
        `add_outcomes` are flushed once `flush_rows` are buffered or the oldest has waited
        `flush_seconds` (checked when outcomes are added), and by
        `flush()`/`close()`. `compact_fanout` is how many segments of one tier are merged into one.

        Raises `CheckpointError` when the directory cannot be read or written, is locked by another process,
        holds other files, or its manifest is damaged (it is never overwritten).

        Example: `cp = Checkpoint.open("out.enrich", {"processor": "core", "schema": schema})`
        """
        store = as_store(path)
        where = store.location
        canonical_fp = _normalise(fingerprint)
        job_id = _job_id(canonical_fp)
        try:
            if not create and not store.exists():
                raise CheckpointError(f"no checkpoint at {where}")
            store.create()
            store.lock()
        except NotADirectoryError:
            raise CheckpointError(f"checkpoint path {where} is not a directory") from None
        except OSError as exc:
            raise CheckpointError(f"cannot open checkpoint {where}: {_reason(exc)}") from exc
        try:
            manifest = _read_manifest(store)
            if manifest is None:
                _check_empty(store)
                manifest = {
                    "format": 1,  # 2 once it is made a root of shards (`record_shards`)
                    "job_id": job_id,
                    "fingerprint": canonical_fp,
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    # This checkpoint, not another of the same job (a settled state names it).
                    "instance": uuid.uuid4().hex,
                    "enrich_version": _version(),
                }
                if service is not None:
                    manifest["service"] = service
                _write_json(store, MANIFEST, manifest, overwrite=False)
            else:
                if _differences(manifest["fingerprint"], canonical_fp, known=True):
                    raise CheckpointMismatchError(
                        _mismatch_message(where, manifest["fingerprint"], canonical_fp)
                    )
                recorded = manifest.get("service")
                if service is not None and recorded != service:
                    if manifest.get("shards", 1) == 1 and not any(
                        _SEGMENT_RE.fullmatch(n) for n in _list(store)
                    ):
                        # It recorded nothing (a wrong address refused before any group, or an older
                        # enrich's never used): no run binds it to a service.
                        manifest = {**manifest, "service": service}
                        _write_json(store, MANIFEST, manifest, overwrite=True)
                    elif recorded is not None:
                        raise ServiceMismatchError(_service_message(where, recorded, service))
                    # else an older enrich's, with runs: the engine looks one up, then `adopt_service`
            return cls(
                store,
                manifest,
                readonly=False,
                compact_fanout=compact_fanout,
                flush_rows=flush_rows,
                flush_seconds=flush_seconds,
            )
        except BaseException:
            store.unlock()
            raise

    @classmethod
    def read(cls, path: str | os.PathLike[str] | CheckpointStore) -> Checkpoint:
        """Open the checkpoint at `path` (a directory or a `CheckpointStore`) read-only, whatever its
        fingerprint (for `enrich status`).

        Takes no lock and changes nothing, so it may look at a checkpoint a running job is writing.
        Record methods raise `CheckpointError`.
        """
        store = as_store(path)
        try:
            exists = store.exists()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {store.location}: {_reason(exc)}") from exc
        if not exists:
            raise CheckpointError(f"no checkpoint at {store.location}")
        manifest = _read_manifest(store)
        if manifest is None:
            raise CheckpointError(f"no checkpoint at {store.location}: it has no {MANIFEST}")
        return cls(store, manifest, readonly=True)

    # -- what it is --------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The checkpoint's directory (for a store that is not a directory: its `location` as a path)."""
        return self._path

    @property
    def store(self) -> CheckpointStore:
        """Where the checkpoint's files are."""
        return self._store

    @property
    def directory(self) -> Path | None:
        """The checkpoint's local directory, or None when its store is not one (memory, object storage)."""
        return self._path if isinstance(self._store, LocalStore) else None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint the checkpoint was created with (a copy)."""
        return json.loads(json.dumps(self._manifest["fingerprint"]))  # type: ignore[no-any-return]

    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise `CheckpointMismatchError` (naming what differs) unless `fingerprint` is this checkpoint's.

        `open` checks this itself; a read-only checkpoint (a dry run) asks here.
        """
        canonical_fp = _normalise(fingerprint)
        if _differences(self._manifest["fingerprint"], canonical_fp, known=True):
            raise CheckpointMismatchError(
                _mismatch_message(self._where, self._manifest["fingerprint"], canonical_fp)
            )

    @property
    def service(self) -> str | None:
        """The service whose runs this checkpoint records (None: written by an older enrich, not opened
        since)."""
        service = self._manifest.get("service")
        return service if isinstance(service, str) else None

    def adopt_service(self, service: str) -> None:
        """Record `service` in a checkpoint written before services were recorded (the caller has
        checked that the service knows the checkpoint's runs); durable on return."""
        with self._lock:
            self._check_writable()
            if self.service is not None:
                raise CheckpointError(f"checkpoint {self._where} already records {self.service}")
            manifest = {**self._manifest, "service": service}
            self._write_json(MANIFEST, manifest)
            self._manifest = manifest

    def check_service(self, service: str) -> None:
        """Raise `ServiceMismatchError` if this checkpoint records runs of another service than `service`.

        `open` checks this itself; a read-only checkpoint (a dry run) asks here.
        """
        recorded = self.service
        if recorded is not None and recorded != service and (any(self._segments.values()) or self.shards > 1):
            raise ServiceMismatchError(_service_message(self._where, recorded, service))

    @property
    def shards(self) -> int:
        """How many shards the job is split into (`enrich._engine.shards`); 1: this directory records
        every run."""
        shards = self._manifest.get("shards", 1)
        return shards if isinstance(shards, int) and shards >= 1 else 1

    @property
    def recorded_nothing(self) -> bool:
        """No segment at all (no group, intent or run): the job's layout may still be chosen. Asked of the
        store's listing, not of the segments read: one that could not be read still holds runs."""
        return not self._buffer and not any(_SEGMENT_RE.fullmatch(n) for n in _list(self._store))

    def record_shards(self, count: int) -> None:
        """Make this checkpoint, which recorded nothing, the root of `count` shards, each recorded in its
        own directory under it. The manifest becomes format 2, which an older enrich refuses to open
        (it would see no runs here and pay for every row again). Durable on return."""
        with self._lock:
            self._check_writable()
            if not self.recorded_nothing:
                raise CheckpointError(f"checkpoint {self._where} recorded runs: it cannot be split in shards")
            manifest = {**self._manifest, "format": 2, "shards": int(count)}
            self._write_json(MANIFEST, manifest)
            self._manifest = manifest

    @property
    def job_id(self) -> str:
        """The hash of the fingerprint, stamped on every segment."""
        return self._job_id

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def buffered(self) -> int:
        """Outcomes added but not yet flushed (lost if the process dies now)."""
        return self._buffered

    def run_ids(self, row_keys: Iterable[str]) -> set[str]:
        """Every run recorded for `row_keys`: all their receipts, not only the latest, and their duplicates
        (from memory)."""
        with self._lock:
            if self._forgotten:
                raise CheckpointError(f"checkpoint {self._where} was closed and its tables dropped")
            if not self._runs:  # a new job (a million keys to look up, for nothing)
                return set()
            keys = pl.Series(list(row_keys), dtype=pl.String)
            receipts = self._receipts.frame()
            found = set(receipts.filter(pl.col("row_key").is_in(keys.implode()))["run_id"].to_list())
            if self._duplicates:
                wanted = set(keys.to_list())
                found |= {run for run, key in self._duplicates.items() if key in wanted}
            return found

    @property
    def groups(self) -> list[str]:
        """Task group ids recorded, oldest first."""
        with self._lock:
            return list(self._groups)

    def __repr__(self) -> str:
        mode = "closed" if self._closed else "read-only" if self._readonly else "open"
        segments = sum(len(s) for s in self._segments.values())
        return (
            f"<Checkpoint {self._where!r} {mode} segments={segments} in_doubt={len(self._pending)} "
            f"buffered={self._buffered}>"
        )

    # -- recording ---------------------------------------------------------------------------------

    def record_group(self, group_id: str) -> None:
        """Record a task group; durable on return. Call it before any run is added to the group.

        Recording a group already recorded does nothing.
        """
        _check_id(group_id, "group_id")
        with self._lock:
            self._check_writable()
            if group_id in self._groups:
                return
            self._append("groups", pl.DataFrame({"group_id": [group_id]}))
            self._groups.append(group_id)

    def record_intents(
        self,
        batch_id: str,
        group_id: str | None,
        row_keys: Iterable[str],
        *,
        sent_at: datetime | None = None,
    ) -> Intent:
        """Record that an add-runs request for `row_keys` is about to be sent; durable on return.

        Until receipts with this `batch_id` are recorded for them (or the batch is resolved), the keys are
        in doubt. Duplicate keys are recorded once. `sent_at` (default: now) is when the request goes out;
        recording the same batch again (its request sent again after a 429) moves it. Returns the intent as
        recorded.
        """
        keys = list(dict.fromkeys(row_keys))
        if not keys:
            raise ValueError("record_intents needs at least one row key")
        sent_at = sent_at if sent_at is not None else datetime.now(UTC)
        self.record_intent_rows([(batch_id, group_id, key) for key in keys], sent_at=sent_at)
        return Intent(batch_id, group_id, tuple(keys), sent_at)

    def record_intent_rows(
        self, rows: Sequence[tuple[str, str | None, str]], *, sent_at: datetime | None = None
    ) -> None:
        """Record many intents at once, as `(batch_id, group_id, row_key)` rows, in one segment; durable
        on return. The group commit of runs mode: creates sent at the same moment share one fsync.

        Rows of one batch behave as `record_intents(batch_id, group_id, keys, sent_at=sent_at)`; later rows
        of a key win.
        """
        if not rows:
            return
        sent_at = _utc(sent_at if sent_at is not None else datetime.now(UTC))
        for batch_id, group_id, _ in rows:
            _check_id(batch_id, "batch_id")
            if group_id is not None:
                _check_id(group_id, "group_id")
        frame = pl.DataFrame(
            {
                "batch_id": [r[0] for r in rows],
                "group_id": [r[1] for r in rows],
                "row_key": [r[2] for r in rows],
            },
            schema={"batch_id": pl.String, "group_id": pl.String, "row_key": pl.String},
        ).with_columns(pl.lit(sent_at, dtype=_TS).alias("sent_at"))
        _check_row_keys(frame["row_key"])
        with self._lock:
            self._check_writable()
            written = self._append("intents", frame)
            first = int(written[_ORDER][0])
            for i, (batch_id, group_id, key) in enumerate(rows):
                # this intent is now the row's latest: it decides the doubt
                if batch_id in self._resolved:
                    self._pending.pop(key, None)
                else:
                    self._pending[key] = (batch_id, group_id, first + i, sent_at)

    def record_receipts(self, receipts: Iterable[Receipt] | pl.DataFrame) -> None:
        """Record runs the API created; durable on return. Call it before sending the next add-runs request.

        Takes `Receipt`s or a DataFrame with their columns (`group_id` and `created_at` may be missing). A
        receipt settles its row's intent when their `batch_id`s match: record the runs that reconciliation
        finds under the in-doubt intent's `batch_id`. Recording a run again is harmless.
        """
        frame = _receipts_frame(receipts)
        if frame.is_empty():
            return
        with self._lock:
            self._check_writable()
            new_runs = frame["run_id"].unique().to_list()
            hashes = [hash(r) for r in new_runs]
            if self._run_hashes is None:
                self._run_hashes = {hash(r) for r in self._receipts.frame()["run_id"].unique().to_list()}
            maybe = [r for r, h in zip(new_runs, hashes, strict=True) if h in self._run_hashes]
            seen = 0
            if maybe:  # rare: a run recorded again, or a hash collision; settle it exactly
                known = self._receipts.frame()["run_id"]
                seen = known.filter(known.is_in(pl.Series(maybe, dtype=pl.String).implode())).n_unique()
            written = self._append("receipts", frame)
            self._receipts.append(written.select(_MEMORY["receipts"]))
            was_duplicate = [r for r in new_runs if r in self._duplicates]
            for run in was_duplicate:  # paid for once, whichever way it was recorded first
                del self._duplicates[run]
            self._runs += len(new_runs) - seen - len(was_duplicate)
            self._run_hashes.update(hashes)
            self._light = None
            for key, batch in zip(frame["row_key"].to_list(), frame["batch_id"].to_list(), strict=True):
                pending = self._pending.get(key)
                if pending is not None and pending[0] == batch:
                    del self._pending[key]

    def resolve_intents(self, batch_id: str) -> None:
        """Settle an in-doubt batch: its rows without a receipt are no longer in doubt; durable on return.

        Call it once reconciliation has recorded every run the batch created; the rest may be sent again.
        """
        _check_id(batch_id, "batch_id")
        with self._lock:
            self._check_writable()
            if batch_id in self._resolved:
                return
            self._append("resolutions", pl.DataFrame({"batch_id": [batch_id]}))
            self._resolved.add(batch_id)
            self._pending = {k: v for k, v in self._pending.items() if v[0] != batch_id}

    def record_duplicates(self, duplicates: Iterable[tuple[str, str, str | None]]) -> None:
        """Record runs found for rows that already have a run, as `(row_key, run_id, group_id)`; durable
        on return. They count in `runs` (they were paid for) and never become a row's run. A run recorded
        already (as a receipt or a duplicate) is skipped."""
        rows = [d for d in duplicates if d[1] not in self._duplicates and not self.knows_run(d[1])]
        if not rows:
            return
        frame = pl.DataFrame(
            {
                "row_key": [r[0] for r in rows],
                "run_id": [r[1] for r in rows],
                "group_id": [r[2] for r in rows],
            },
            schema={"row_key": pl.String, "run_id": pl.String, "group_id": pl.String},
        ).with_columns(pl.lit(datetime.now(UTC), dtype=_TS).alias("found_at"))
        _check_row_keys(frame["row_key"])
        _check_ids(frame, "run_id")
        with self._lock:
            self._check_writable()
            self._append("duplicates", frame)
            for key, run_id, _ in rows:
                self._duplicates[run_id] = key
            self._runs += len({r[1] for r in rows})

    def knows_run(self, run_id: str) -> bool:
        """Whether `run_id` is recorded, as a receipt or a duplicate (from memory)."""
        with self._lock:
            if run_id in self._duplicates:
                return True
            if self._forgotten:
                raise CheckpointError(f"checkpoint {self._where} was closed and its tables dropped")
            if self._run_hashes is None or not self._run_hashes:
                self._run_hashes = {hash(r) for r in self._receipts.frame()["run_id"].unique().to_list()}
            if hash(run_id) not in self._run_hashes:
                return False
            known = self._receipts.frame()["run_id"]
            return bool((known == run_id).any())

    @property
    def duplicates(self) -> dict[str, str]:
        """Duplicate runs recorded: run_id -> row_key (a copy)."""
        with self._lock:
            return dict(self._duplicates)

    @property
    def pacing(self) -> dict[str, Any] | None:
        """What the rate limiter learned of the service's quota, as last recorded (`record_pacing`)."""
        with self._lock:
            return json.loads(json.dumps(self._pacing)) if self._pacing is not None else None

    @property
    def service_warnings(self) -> dict[str, int]:
        """The warnings the service attached to the job's runs: each distinct message -> how many runs
        carried it (`record_service_warnings`)."""
        data = _read_json(self._store, SERVICE_WARNINGS) or {}
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    @property
    def pilot(self) -> dict[str, Any] | None:
        """The report of the job's pilot (`record_pilot`), or None: no pilot ran to its end."""
        return _read_json(self._store, PILOT)

    def record_pilot(self, report: Mapping[str, Any]) -> None:
        """Keep the pilot's report (JSON-able), replacing one kept before; durable on return. From then on
        the job goes on past its pilot."""
        with self._lock:
            self._check_writable()
            self._write_json(PILOT, dict(report))

    @property
    def last_call(self) -> dict[str, Any] | None:
        """What `record_last_call` kept of the last call (rows, distinct inputs, ...), or None."""
        return _read_json(self._store, LAST_CALL)

    def record_last_call(self, info: Mapping[str, Any]) -> None:
        """Keep a JSON-able summary of the call that has the checkpoint open (for `enrich status`)."""
        with self._lock:
            self._check_writable()
            self._write_json(LAST_CALL, dict(info))

    def record_service_warnings(self, counts: Mapping[str, int]) -> None:
        """Add `counts` (message -> runs that carried it) to the warnings kept; durable on return."""
        if not counts:
            return
        with self._lock:
            self._check_writable()
            data = self.service_warnings
            for message, n in counts.items():
                data[message] = data.get(message, 0) + int(n)
            self._write_json(SERVICE_WARNINGS, data)

    def record_pacing(self, pacing: Mapping[str, Any]) -> None:
        """Keep what the rate limiter learned (a JSON-able mapping), replacing what was kept; durable on
        return. A resume starts from it instead of the defaults."""
        data = dict(pacing)
        with self._lock:
            self._check_writable()
            if data == self._pacing:
                return
            self._write_json(PACING, data)
            self._pacing = data

    def _write_json(self, name: str, data: Mapping[str, Any]) -> None:
        _write_json(self._store, name, data, overwrite=True)

    def add_outcomes(self, outcomes: Iterable[Outcome] | pl.DataFrame) -> None:
        """Buffer finished runs; they are written by the next flush (see `open` for when that happens).

        Takes `Outcome`s or a DataFrame with their columns. Buffered outcomes show in `state()` at once, but
        are lost if the process dies before a flush (the engine collects them again). If a flush started
        here fails, `CheckpointError` is raised and the outcomes stay buffered.
        """
        frame = _outcomes_frame(outcomes)
        if frame.is_empty():
            return
        with self._lock:
            self._check_writable()
            self._buffer.append(frame)
            self._buffered += frame.height
            now = time.monotonic()
            if self._buffer_since is None:
                self._buffer_since = now
            self._light = None
            if self._buffered >= self._flush_rows or now - self._buffer_since >= self._flush_seconds:
                self.flush()

    def flush(self) -> None:
        """Write the buffered outcomes as one segment; durable on return. On failure they stay buffered."""
        with self._lock:
            if not self._buffer:
                return
            self._check_writable()
            written = self._append("outcomes", pl.concat(self._buffer))
            self._buffer.clear()
            self._buffered = 0
            self._buffer_since = None
            self._outcomes.append(written.select(_MEMORY["outcomes"]))
            self._light = None

    def record_settled(self) -> bool:
        """Keep the state in one file (`SETTLED`) when no row is running or in doubt, so that a later
        call finding the checkpoint unchanged reads that file (`read_settled`) instead of every segment:
        a finished shard of a resumed job is joined without loading its tables.

        A cache derived from the record, like the typed answers: it is tagged with the names of the
        segments it was read from, and used only while exactly those segments are on disk (segments are
        never changed once written; a new record or a compaction makes a new name). Returns whether it
        holds this state now; never raises for a write that fails (the next call reads the segments).
        """
        with self._lock:
            if self._readonly or self._closed or self._forgotten or self.service is None:
                return False
            try:
                self.flush()
                if self._pending:
                    return False
                light = self._light_state().select(_LIGHT_STATE)
                if light.is_empty() or (light["status"] == "submitted").any():
                    return False
                segments = sorted(n for n in _list(self._store) if _SEGMENT_RE.fullmatch(n))
                if read_settled(self._store, self._job_id) is not None:
                    return True  # (it lists these very segments)
                table = light.to_arrow()
                table = table.replace_schema_metadata(
                    {
                        "enrich.kind": "settled",
                        "enrich.version": _SETTLED_VERSION,
                        "enrich.job_id": self._job_id,
                        "enrich.instance": _instance(self._manifest),
                        "enrich.segments": json.dumps(segments),
                        "enrich.runs": str(self._runs),
                        "enrich.duplicates": str(len(self._duplicates)),
                        "enrich.groups": json.dumps(self._groups),
                        "enrich.warnings": json.dumps(self.warnings),
                    }
                )
                self._store.write(
                    SETTLED,
                    lambda f: pq.write_table(table, f, compression="zstd", write_page_checksum=True),
                    overwrite=True,
                )
                return True
            except (OSError, CheckpointError, pa.ArrowException) as exc:
                self._warn(f"the finished state is not kept in one file ({_reason(exc)}); nothing is lost")
                return False
            finally:  # (the shard closes next: what this borrowed goes back before the next one opens)
                self._light = None
                pa.default_memory_pool().release_unused()

    def close(self, *, forget: bool = False) -> None:
        """Flush buffered outcomes and release the directory. Reading methods still work afterwards,
        unless `forget`: then the in-memory tables are dropped too (a job at its end: ~400 MB at a
        million rows) and reading raises `CheckpointError`."""
        with self._lock:
            try:
                if not self._closed and not self._readonly:
                    self.flush()
            finally:
                if not self._closed:
                    self._closed = True
                    if not self._readonly:
                        self._store.unlock()
                if forget:
                    self._forgotten = True
                    self._receipts = _Chunks(_empty("receipts").select(_MEMORY["receipts"]))
                    self._outcomes = _Chunks(_empty("outcomes").select(_MEMORY["outcomes"]))
                    self._pending = {}
                    self._run_hashes = None
                    self._duplicates = {}
                    self._light = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Flush even on KeyboardInterrupt: Ctrl-C must keep every outcome collected so far.
        self.close()

    def _abandon(self) -> None:
        """Drop unflushed outcomes and release the directory without writing, as SIGKILL would (tests)."""
        with self._lock:
            self._buffer.clear()
            self._buffered = 0
            self._closed = True
            if not self._readonly:
                self._store.unlock()

    # -- reading -----------------------------------------------------------------------------------

    def state(self, *, outputs: bool = True, basis: bool = True) -> pl.DataFrame:
        """One row per row_key that has a run, in the order their latest runs were recorded.

        Columns: row_key, run_id, interaction_id (of the run's outcome: null while it runs, and in
        outcomes an older enrich recorded), group_id (of the latest receipt), status (the outcome of that run:
        "completed", "failed", "cancelled" or "action_required"; else "submitted"), output, basis,
        error, created_at, finished_at. Buffered outcomes are included. With `outputs=False` the
        `output` and `basis` columns are left out and nothing is read from disk; with `outputs=True`
        they are read from the outcome segments, and with `basis=False` the `basis` column (most of the
        bytes) is left null without being read.
        """
        with self._lock:
            light = self._light_state()
            if not outputs:
                return light.select(_LIGHT_STATE)
            heavy = self._heavy(light.select("run_id", "_outcome_order"), basis=basis)
            joined = light.join(heavy, on="run_id", how="left", maintain_order="left")
            return joined.select(_STATE_COLUMNS)

    def drop_cache(self) -> None:
        """Forget the state cached by `state()` (rebuilt when next asked; ~130 MB at a million rows)."""
        with self._lock:
            self._light = None

    def interactions(self) -> pl.DataFrame:
        """run_id, interaction_id of every run with an outcome (its latest record; buffered ones included),
        from memory. interaction_id is null where the service gave none, and in outcomes recorded by an
        enrich that did not keep it."""
        with self._lock:
            records = self._outcome_records()
            return records.filter(pl.col("run_id").is_last_distinct()).select("run_id", "interaction_id")

    def latencies(self) -> pl.DataFrame:
        """run_id, status, seconds of every run with an outcome (its latest record; buffered ones
        included), read from the outcome segments: `seconds` is how long the run took by the service's
        clock, null where it gave no times or an older enrich recorded the outcome."""
        columns = ["run_id", "status", "seconds", _ORDER]
        with self._lock:
            frames = []
            for segment in list(self._segments["outcomes"]):
                try:
                    frames.append(_read_table(self._store, segment.name, columns, "outcomes"))
                except (OSError, pa.ArrowException, ValueError) as exc:
                    self._warn(f"run times in {segment.name} could not be read ({_reason(exc)})")
            if self._buffer:
                frames.append(self._buffered_frame().select(columns))
        if not frames:
            return _empty("outcomes").select(columns[:-1])
        records = pl.concat(frames).sort(_ORDER)
        return records.filter(pl.col("run_id").is_last_distinct()).select(columns[:-1])

    def in_doubt(self) -> list[Intent]:
        """Intent batches some of whose rows may or may not have a run, oldest first.

        Each holds only the rows still in doubt. Reconcile each one by reading its group's runs, then
        `record_receipts` for the runs found (with this `batch_id`) and `resolve_intents(batch_id)`.
        """
        with self._lock:
            if self._forgotten:
                raise CheckpointError(f"checkpoint {self._where} was closed and its tables dropped")
            batches: dict[str, tuple[str | None, datetime | None, list[tuple[int, str]]]] = {}
            for key, (batch, group, order, sent_at) in self._pending.items():
                entry = batches.setdefault(batch, (group, sent_at, []))
                entry[2].append((order, key))
                if sent_at is not None and (entry[1] is None or sent_at > entry[1]):
                    batches[batch] = (group, sent_at, entry[2])  # the latest send of the batch
            ordered = sorted(batches.items(), key=lambda item: min(item[1][2]))
            return [Intent(b, g, tuple(k for _, k in sorted(keys)), t) for b, (g, t, keys) in ordered]

    @property
    def runs(self) -> int:
        """Runs created (distinct run ids of all receipts, retries included): what the job has paid for.

        Kept up to date as receipts are recorded, so it is cheap to ask before every add-runs request.
        """
        return self._runs

    def counts(self) -> Counts:
        """Rows by status, rows in doubt and runs created.

        Computed from memory like `state(outputs=False)` and cached until the next record; after a record it
        costs about half a second per million rows, so ask `runs` for a cost check before each request.
        """
        with self._lock:
            light = self._light_state()
            by_status = dict(light.group_by("status").len().iter_rows())
            return Counts(
                rows=light.height,
                submitted=by_status.get("submitted", 0),
                completed=by_status.get("completed", 0),
                failed=by_status.get("failed", 0),
                in_doubt=len(self._pending),
                runs=self._runs,
                duplicates=len(self._duplicates),
                cancelled=by_status.get("cancelled", 0),
                action_required=by_status.get("action_required", 0),
            )

    # -- internals: state --------------------------------------------------------------------------

    def _buffered_frame(self) -> pl.DataFrame:
        frame = pl.concat(self._buffer)
        return frame.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + _BUFFERED_ORDER).alias(_ORDER))

    def _outcome_records(self) -> pl.DataFrame:
        """Every outcome record in memory (`_MEMORY` columns), buffered ones last, sorted by `_order`."""
        if self._forgotten:
            raise CheckpointError(
                f"checkpoint {self._where} was closed and its tables dropped; open it again"
            )
        outcomes = self._outcomes.frame()
        if self._buffer:
            outcomes = pl.concat([outcomes, self._buffered_frame().select(_MEMORY["outcomes"])])
        return outcomes

    def _light_state(self) -> pl.DataFrame:
        if self._forgotten:
            raise CheckpointError(
                f"checkpoint {self._where} was closed and its tables dropped; open it again"
            )
        if self._light is None:
            # Both tables are sorted by _order, so a key's last occurrence is its latest record.
            receipts = self._receipts.frame()
            latest = receipts.filter(pl.col("row_key").is_last_distinct())
            outcomes = self._outcome_records()
            finished = outcomes.filter(pl.col("run_id").is_last_distinct()).rename({_ORDER: "_outcome_order"})
            self._light = (
                latest.drop(_ORDER)
                .join(finished, on="run_id", how="left", maintain_order="left")
                .with_columns(pl.col("status").fill_null("submitted"))
                .select(*_LIGHT_STATE, "_outcome_order")
            )
        return self._light

    def answers(
        self,
        run_ids: pl.Series | pl.DataFrame,
        *,
        basis: bool = True,
        each: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    ) -> pl.DataFrame:
        """run_id, output, basis (JSON text) of the recorded outcomes of `run_ids`, buffered ones included.

        Read a row group at a time; `each` transforms each part as it is read (the engine decodes the
        basis there into typed columns), so no more than one row group's text is in memory at a time
        besides what `each` returns. The basis is left null, unread, with `basis=False`. `run_ids` may be
        a frame with a `run_id` column: its other columns are carried onto each part (matched once,
        not once per part).
        """
        carry = run_ids if isinstance(run_ids, pl.DataFrame) else pl.DataFrame({"run_id": run_ids})
        with self._lock:
            # From the outcome records themselves, not the latest receipt per row: a run that answers a
            # row may not be its latest receipt (a duplicate committed late is recorded after it).
            wanted = self._outcome_records().filter(
                pl.col("run_id").is_in(carry["run_id"].implode()) & pl.col("run_id").is_last_distinct()
            )
            light = wanted.select("run_id", pl.col(_ORDER).alias("_outcome_order"))
            if carry.width > 1:
                light = light.join(carry, on="run_id", how="inner")
            return self._heavy(light, basis=basis, each=each)

    def _heavy(
        self,
        light: pl.DataFrame,
        *,
        basis: bool = True,
        each: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    ) -> pl.DataFrame:
        """output and basis of the outcomes `light` uses, read from the outcome segments and the buffer
        (the basis left null, unread, with `basis=False`); `each` as in `answers`."""
        heavy_columns = _HEAVY if basis else ("output",)
        columns = ["run_id", *heavy_columns, _ORDER]

        carried = [c for c in light.columns if c not in ("run_id", "_outcome_order")]

        def part(frame: pl.DataFrame) -> pl.DataFrame:
            if not basis:
                frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("basis"))
            frame = frame.select("run_id", *_HEAVY, *carried)
            return each(frame) if each is not None else frame

        # Only the outcomes `light` points at, filtered segment by segment as they are read, so that no
        # more than one segment's superseded or unwanted outputs are in memory at a time.
        wanted = light.select(pl.col("_outcome_order").alias(_ORDER), *carried).drop_nulls(_ORDER)
        frames = []
        for segment in list(self._segments["outcomes"]):
            got: list[pl.DataFrame] = []
            try:  # a row group at a time: no more than one group's text is held before `each` types it
                for group in _read_groups(self._store, segment.name, columns, "outcomes"):
                    got.append(part(_wanted(group, wanted)))
                    del group
            except (OSError, pa.ArrowException, ValueError) as exc:
                self._warn(f"outputs in {segment.name} could not be read ({_reason(exc)}); they show as null")
                continue
            frames.extend(got)
        if self._buffer:
            frames.append(part(_wanted(self._buffered_frame().select(columns), wanted)))
        if not frames:
            frames.append(part(_empty("outcomes").select(columns)))
        heavy = pl.concat(frames) if len(frames) > 1 else frames[0]
        return heavy.unique("run_id", keep="any")

    # -- internals: writing ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._readonly:
            raise CheckpointError(f"checkpoint {self._where} was opened read-only")
        if self._closed:
            raise CheckpointError(f"checkpoint {self._where} is closed")

    def _warn(self, message: str) -> None:
        if message not in self.warnings:  # a damaged segment is met again by each state(outputs=True)
            self.warnings.append(message)

    def _append(self, kind: str, frame: pl.DataFrame) -> pl.DataFrame:
        """Write `frame` as a new tier-0 segment; return it with `_order`. Durable when this returns."""
        seq = self._next_seq
        self._next_seq += 1  # consumed even if the write fails: a gap is harmless, a reused name is not
        frame = frame.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + (seq << 32)).alias(_ORDER))
        frame = frame.select(pl.col(name).cast(dtype) for name, dtype in _SCHEMAS[kind].items())
        segment = _Segment(kind, seq, 0)
        self._write_segment(segment, frame, replaces=[])
        self._segments[kind].append(segment)
        self._compact(kind)
        return frame

    def _segment_metadata(self, segment: _Segment, replaces: list[int]) -> dict[str, str]:
        return {
            "enrich.format": str(FORMAT),
            "enrich.job_id": self._job_id,
            "enrich.kind": segment.kind,
            "enrich.seq": str(segment.seq),
            "enrich.tier": str(segment.tier),
            "enrich.replaces": json.dumps(replaces),
        }

    def _write_segment(self, segment: _Segment, frame: pl.DataFrame, *, replaces: list[int]) -> None:
        table = frame.to_arrow().replace_schema_metadata(self._segment_metadata(segment, replaces))

        def write(f: BinaryIO) -> None:
            pq.write_table(table, f, compression="zstd", write_page_checksum=True)

        _write(self._store, segment.name, write)

    def _write_merged(self, segment: _Segment, parts: list[tuple[_Segment, pl.Series]]) -> None:
        """Write `segment` from `parts` (a source and the mask of its rows to keep), one row group of a
        source at a time, each as a row group: a merge holds one row group in memory, not a segment."""
        kind = segment.kind
        columns = list(_SCHEMAS[kind])
        schema = (
            _empty(kind)
            .to_arrow()
            .schema.with_metadata(self._segment_metadata(segment, list(segment.replaces)))
        )

        def write(f: BinaryIO) -> None:
            with pq.ParquetWriter(f, schema, compression="zstd", write_page_checksum=True) as writer:
                for source, keep in parts:
                    # A row group at a time: a source of a higher tier holds thousands of answers. Only a
                    # failed read makes the source bad; a failed write is the target's (raised as is).
                    groups = _read_groups(self._store, source.name, columns, kind)
                    start = 0
                    while True:
                        try:
                            frame = next(groups, None)
                        except (OSError, pa.ArrowException, ValueError, pl.exceptions.PolarsError) as exc:
                            raise _BadSource(source, exc) from exc
                        if frame is None:
                            break
                        mask = keep.slice(start, frame.height)
                        start += frame.height
                        writer.write_table(frame.filter(mask).to_arrow().cast(schema))
                        del frame

        _write(self._store, segment.name, write)

    def _compact(self, kind: str) -> None:
        """Merge every tier whose segment count reached the fanout, lowest tier first."""
        if self._compact_backoff[kind] > 0:
            self._compact_backoff[kind] -= 1
            return
        tier = 0
        while True:
            group = [s for s in self._segments[kind] if s.tier == tier]
            if len(group) < self._fanout:
                return
            if not self._merge(kind, group, tier + 1):
                self._compact_backoff[kind] = self._fanout
                return
            tier += 1

    def _merge(self, kind: str, group: list[_Segment], tier: int) -> bool:
        """Merge `group` into one segment of `tier`: every row, the last of each key, in `_order`.

        First only the keys and `_order` of every source are read, to decide which rows stay; then the
        sources are copied one at a time (`_write_merged`). Outcome segments carry every answer and its
        basis: reading a tier of them whole took ~1.5 GB at a million rows.
        """
        key_columns = [*_KEYS[kind], _ORDER]
        keys = []
        for segment in group:
            try:
                frame = self._read_segment(segment, key_columns)
            except (OSError, pa.ArrowException, ValueError) as exc:
                # Leave it where it is, out of future merges: the next open reports it.
                self._segments[kind].remove(segment)
                self._warn(f"compaction skipped {segment.name}: it cannot be read ({_reason(exc)})")
                return False
            keys.append(frame)
        ordered = sorted(range(len(group)), key=lambda i: keys[i][_ORDER].min() if keys[i].height else 0)
        # Copied one after another, the sources must each be sorted and not overlap; they are, for
        # segments of one tier (each covers a run of consecutive seqs). Anything else is merged in memory.
        bounds = [(keys[i][_ORDER].min(), keys[i][_ORDER].max()) for i in ordered if keys[i].height]
        streamable = all(keys[i][_ORDER].is_sorted() for i in ordered) and all(
            a[1] < b[0] for a, b in itertools.pairwise(bounds)
        )
        seq = self._next_seq
        self._next_seq += 1
        target = _Segment(kind, seq, tier, tuple(s.seq for s in group))
        try:
            if streamable:
                every = pl.concat([keys[i] for i in ordered]).with_row_index("_row")
                kept = every.unique(_KEYS[kind], keep="last", maintain_order=True)["_row"]
                keep = every["_row"].is_in(kept.implode())
                parts, start = [], 0
                for i in ordered:
                    n = keys[i].height
                    parts.append((group[i], keep.slice(start, n)))
                    start += n
                self._write_merged(target, parts)
            else:
                merged = self._merged_in_memory(kind, group)
                self._write_segment(target, merged, replaces=list(target.replaces))
        except _BadSource as bad:  # its other columns cannot be read: out of future merges, as above
            self._segments[kind].remove(bad.segment)
            self._warn(f"compaction skipped {bad.segment.name}: it cannot be read ({_reason(bad.error)})")
            return False
        except CheckpointError as exc:
            self._warn(f"compaction of {kind} postponed: {exc}")
            return False
        except (OSError, pa.ArrowException, ValueError) as exc:  # a source went bad between the reads
            self._warn(f"compaction of {kind} postponed: a segment cannot be read ({_reason(exc)})")
            return False
        # The merged segment is durable: only now may its sources go. If the process dies before they are all
        # gone, the next open finds their seqs in the merged segment's `enrich.replaces` and deletes them.
        live = self._segments[kind]
        for segment in group:
            live.remove(segment)
        live.append(target)
        for segment in group:
            try:
                self._store.delete(segment.name)
            except OSError as exc:
                self._warn(
                    f"could not delete merged segment {segment.name} ({_reason(exc)}); the next open will"
                )
        return True

    def _read_segment(self, segment: _Segment, columns: list[str]) -> pl.DataFrame:
        """`columns` of one segment, pages checksummed, cast to the kind's schema."""
        return _read_table(self._store, segment.name, columns, segment.kind)

    def _merged_in_memory(self, kind: str, group: list[_Segment]) -> pl.DataFrame:
        columns = list(_SCHEMAS[kind])
        merged = pl.concat([self._read_segment(segment, columns) for segment in group]).sort(_ORDER)
        return merged.unique(_KEYS[kind], keep="last", maintain_order=True)

    # -- internals: loading ------------------------------------------------------------------------

    def _load(self) -> None:
        for _ in range(10):
            try:
                self._load_once()
                return
            except (_Vanished, _Reload):
                continue  # a writer compacted while we listed, or a merged segment is bad: list again
        raise CheckpointError(f"checkpoint {self._where} kept changing while it was read; try again")

    def _load_once(self) -> None:
        try:
            names = _list(self._store)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {self._where}: {_reason(exc)}") from exc
        found: list[tuple[int, str, str]] = []
        for name in names:  # (the store's lock removed the debris of writes that died: `*.tmp`)
            match = _SEGMENT_RE.fullmatch(name)
            if match:
                found.append((int(match[2]), match[1], name))
        found.sort()
        self._next_seq = found[-1][0] + 1 if found else 1
        self.warnings = []

        inspected: list[_Segment] = []
        for seq, kind, name in found:
            if seq in self._unreadable:
                self._warn(self._unreadable[seq])
            elif (segment := self._inspect(kind, seq, name)) is not None:
                inspected.append(segment)
        # The sources of a merge that was made durable: every row of theirs is in the merged segment.
        on_disk = {segment.seq for segment in inspected}
        replaced = {seq for segment in inspected for seq in segment.replaces}
        self._segments = {kind: [] for kind in _KINDS}
        for segment in inspected:
            if segment.seq not in replaced:
                self._segments[segment.kind].append(segment)

        groups = self._read_kind("groups", on_disk).unique("group_id", keep="first", maintain_order=True)
        self._groups = groups["group_id"].to_list()
        self._resolved = set(self._read_kind("resolutions", on_disk)["batch_id"].to_list())
        receipts = self._read_kind("receipts", on_disk)
        self._pending = self._find_pending(self._read_kind("intents", on_disk), receipts)
        self._receipts = _Chunks(receipts.select(_MEMORY["receipts"]))
        duplicates = self._read_kind("duplicates", on_disk)
        duplicates = duplicates.filter(~pl.col("run_id").is_in(receipts["run_id"].implode()))
        self._duplicates = dict(
            zip(duplicates["run_id"].to_list(), duplicates["row_key"].to_list(), strict=True)
        )
        self._runs = receipts["run_id"].n_unique() + len(self._duplicates)
        self._run_hashes = None if self._runs else set()
        self._pacing = _read_json(self._store, PACING)
        self._outcomes = _Chunks(self._read_kind("outcomes", on_disk))
        self._light = None
        pa.default_memory_pool().release_unused()  # give back what reading borrowed

        # Only now that every merged segment has been read whole may the sources of its merge go.
        if not self._readonly:
            for seq, _, name in found:
                if seq in replaced and seq in on_disk:
                    with suppress(OSError):
                        self._store.delete(name)

    def _find_pending(
        self, intents: pl.DataFrame, receipts: pl.DataFrame
    ) -> dict[str, tuple[str, str | None, int, datetime | None]]:
        """Rows whose latest intent has no receipt of its batch, and whose batch was not resolved."""
        resolved = list(self._resolved)
        parts = []
        # A slice at a time, against the receipts of its batches only: hash tables stay small.
        for chunk in intents.iter_slices(_PENDING_SLICE):
            batches = chunk["batch_id"].unique().to_list()
            settled = receipts.filter(pl.col("batch_id").is_in(batches)).select("batch_id", "row_key")
            unsettled = chunk.join(settled, on=["batch_id", "row_key"], how="anti")
            parts.append(unsettled.filter(~pl.col("batch_id").is_in(resolved)))
        unsettled = pl.concat(parts) if parts else intents
        if unsettled.is_empty():  # the usual case: no need to find every row's latest intent
            return {}
        latest = (
            intents.join(unsettled.select("row_key"), on="row_key", how="semi")
            .filter(pl.col("row_key").is_last_distinct())
            .select("row_key", _ORDER)
        )
        pending = unsettled.join(latest, on=["row_key", _ORDER], how="semi").sort(_ORDER)
        rows = pending.select("row_key", "batch_id", "group_id", _ORDER, "sent_at").iter_rows()
        return {key: (batch, group, order, sent_at) for key, batch, group, order, sent_at in rows}

    def _inspect(self, kind: str, seq: int, name: str) -> _Segment | None:
        """Check a segment's footer: its job, kind and columns."""
        try:
            with self._store.open(name) as f:
                footer = pq.read_metadata(f)
            meta = {k.decode(): v.decode() for k, v in (footer.metadata or {}).items()}
            job = meta.get("enrich.job_id")
            if job != self._job_id:
                self._warn(
                    f"skipped {name}: segment from another job "
                    f"(job {job or 'unknown'}, this checkpoint is job {self._job_id})"
                )
                return None
            if meta.get("enrich.kind") != kind or int(meta.get("enrich.format", "0")) > FORMAT:
                self._warn(
                    f"skipped {name}: its metadata says kind {meta.get('enrich.kind')!r}, "
                    f"format {meta.get('enrich.format')!r}"
                )
                return None
            missing = set(_SCHEMAS[kind]) - set(footer.schema.names) - _ADDED.get(kind, frozenset())
            if missing:
                self._warn(f"skipped {name}: it lacks the columns {sorted(missing)}")
                return None
            tier = int(meta.get("enrich.tier", "0"))
            replaces = [int(s) for s in json.loads(meta.get("enrich.replaces", "[]"))]
        except FileNotFoundError:
            if self._readonly:
                raise _Vanished from None
            self._warn(f"skipped {name}: it vanished while being read")
            return None
        except (OSError, pa.ArrowException, ValueError, TypeError) as exc:
            self._warn(f"skipped {name}: it cannot be read, its records are lost ({_reason(exc)})")
            return None
        return _Segment(kind, seq, tier, tuple(replaces))

    def _read_kind(self, kind: str, on_disk: set[int]) -> pl.DataFrame:
        """The rows of every live segment of `kind` (without heavy columns), sorted by `_order`.

        A segment whose rows cannot be read is reported and dropped from the live list; if it is a merged
        segment whose sources are still on disk (`on_disk`), the load starts again and uses them instead.
        """
        columns = _MEMORY["outcomes"] if kind == "outcomes" else list(_SCHEMAS[kind])
        # Merged segments hold older rows than unmerged ones, and a higher tier older rows than a lower.
        self._segments[kind].sort(key=lambda s: (-s.tier, s.seq))
        frames = []
        for segment in list(self._segments[kind]):
            try:
                table = _read_table(self._store, segment.name, columns, kind)
            except FileNotFoundError:
                if self._readonly:
                    raise _Vanished from None
                table = None
                reason = "it vanished while being read"
            except (OSError, pa.ArrowException, ValueError) as exc:
                table = None
                reason = _reason(exc)
            if table is None:
                message = f"skipped {segment.name}: it cannot be read, its records are lost ({reason})"
                if on_disk.intersection(segment.replaces):
                    self._unreadable[segment.seq] = message
                    raise _Reload
                self._segments[kind].remove(segment)
                self._warn(message)
                continue
            frames.append(table)
        frame = pl.concat(frames, rechunk=False) if frames else _empty(kind).select(columns)
        if not frame[_ORDER].is_sorted():
            frame = frame.sort(_ORDER)
        return frame


# -- helpers ---------------------------------------------------------------------------------------


def _empty(kind: str) -> pl.DataFrame:
    return pl.DataFrame(schema=_SCHEMAS[kind])


def _conform(frame: pl.DataFrame | pl.Series, columns: list[str], kind: str) -> pl.DataFrame:
    assert isinstance(frame, pl.DataFrame)
    schema = _SCHEMAS[kind]
    return frame.select(
        pl.col(c).cast(schema[c]) if c in frame.columns else pl.lit(None, dtype=schema[c]).alias(c)
        for c in columns
    )


def read_pilot(path: str | os.PathLike[str] | CheckpointStore) -> dict[str, Any] | None:
    """The pilot's report kept in the checkpoint at `path` (`Checkpoint.record_pilot`), read without
    opening it; None when there is none (or no checkpoint)."""
    store = as_store(path)
    try:
        if not store.exists():
            return None
    except OSError:
        return None
    data = _read_json(store, PILOT)
    return data if isinstance(data, dict) else None


def _read_groups(store: CheckpointStore, name: str, columns: list[str], kind: str) -> Iterator[pl.DataFrame]:
    """`_read_table`, a row group at a time: a merged outcome segment holds the answers of thousands of
    runs (16,000 rows with citations: 340 MB of text), read whole only to be filtered and typed."""
    with store.open(name) as f, pq.ParquetFile(f, page_checksum_verification=True) as parquet:
        added = _ADDED.get(kind, frozenset())
        present = set(parquet.schema_arrow.names) if added else set()
        wanted = [c for c in columns if c not in added or c in present]
        for i in range(parquet.num_row_groups):
            yield _conform(pl.from_arrow(parquet.read_row_group(i, columns=wanted)), columns, kind)


def _read_table(store: CheckpointStore, name: str, columns: list[str], kind: str) -> pl.DataFrame:
    """`columns` of the segment `name`, pages checksummed, cast to the kind's schema; a column added to
    the kind after the segment was written reads as null."""
    with store.open(name) as f, pq.ParquetFile(f, page_checksum_verification=True) as parquet:
        added = _ADDED.get(kind, frozenset())
        present = set(parquet.schema_arrow.names) if added else set()
        wanted = [c for c in columns if c not in added or c in present]
        return _conform(pl.from_arrow(parquet.read(columns=wanted)), columns, kind)


def _list(store: CheckpointStore) -> list[str]:
    """The names of the checkpoint's own files (not those of its sub-areas: `typed/`, ...)."""
    return [name for name in store.list() if "/" not in name]


@dataclass(frozen=True, slots=True)
class Settled:
    """The state of a checkpoint with nothing running or in doubt (`Checkpoint.record_settled`)."""

    #: One row per row_key with a run: row_key, run_id, interaction_id, group_id, status, error,
    #: created_at, finished_at.
    state: pl.DataFrame
    #: Runs created, as `Checkpoint.runs`.
    runs: int
    #: Duplicate runs (paid, never joined), as `Counts.duplicates`.
    duplicates: int = 0
    #: The task groups created, and what reading the segments warned of, as `Checkpoint.groups` and
    #: `Checkpoint.warnings` when the state was kept.
    groups: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: Rows in doubt: none in a settled checkpoint (`shards.area_states` reads unsettled ones too).
    in_doubt: int = 0

    def counts(self) -> Counts:
        """`Checkpoint.counts()` of the settled checkpoint."""
        by_status = dict(self.state.group_by("status").len().iter_rows())
        return Counts(
            rows=self.state.height,
            submitted=by_status.get("submitted", 0),
            completed=by_status.get("completed", 0),
            failed=by_status.get("failed", 0),
            in_doubt=self.in_doubt,
            runs=self.runs,
            duplicates=self.duplicates,
            cancelled=by_status.get("cancelled", 0),
            action_required=by_status.get("action_required", 0),
        )


def _instance(manifest: Mapping[str, Any]) -> str:
    """What tells this checkpoint from another of the same job (an older enrich's: its creation time)."""
    return str(manifest.get("instance") or manifest.get("created_at"))


def read_settled(store: CheckpointStore, job_id: str, columns: Sequence[str] | None = None) -> Settled | None:
    """The settled state kept in `store` for the job `job_id`, if it was read from exactly the segments
    on disk now, in this very checkpoint (its manifest's `instance`: segment names are sequence
    numbers, so another checkpoint of the job copied over this one could show the same names); else
    None (never kept, of another job or checkpoint, or the checkpoint recorded since). Its state
    holds `columns` (None: all of `_LIGHT_STATE`)."""
    try:
        names = _list(store)
        if SETTLED not in names:
            return None
        segments = sorted(n for n in names if _SEGMENT_RE.fullmatch(n))
        manifest = _read_json(store, MANIFEST)
        if manifest is None:
            return None
        with store.open(SETTLED) as f, pq.ParquetFile(f, page_checksum_verification=True) as parquet:
            meta = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
            if (
                meta.get("enrich.kind") != "settled"
                or meta.get("enrich.version") != _SETTLED_VERSION
                or meta.get("enrich.job_id") != job_id
                or meta.get("enrich.instance") != _instance(manifest)
                or json.loads(meta.get("enrich.segments", "null")) != segments
            ):
                return None
            if parquet.schema_arrow.names != list(_LIGHT_STATE):
                return None
            frame = pl.from_arrow(parquet.read(columns=list(columns or _LIGHT_STATE)))
        assert isinstance(frame, pl.DataFrame)
        return Settled(
            frame,
            int(meta["enrich.runs"]),
            int(meta["enrich.duplicates"]),
            tuple(json.loads(meta["enrich.groups"])),
            tuple(json.loads(meta["enrich.warnings"])),
        )
    except (OSError, pa.ArrowException, ValueError, KeyError, AssertionError):
        return None


def _read_json(store: CheckpointStore, name: str) -> dict[str, Any] | None:
    """A JSON object file's mapping, or None when it is missing or unreadable (pacing.json, for one, is
    only a head start)."""
    try:
        with store.open(name) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _wanted(outcomes: pl.DataFrame, wanted: pl.DataFrame) -> pl.DataFrame:
    """The rows of `outcomes` whose `_order` is in `wanted` (an `_order` names one outcome record), with
    the other columns of `wanted` (carried by `Checkpoint.answers`)."""
    extra = [c for c in wanted.columns if c != _ORDER]
    if outcomes.is_empty():
        return outcomes.with_columns(pl.lit(None, dtype=wanted.schema[c]).alias(c) for c in extra)
    orders = outcomes[_ORDER]
    near = wanted.filter(pl.col(_ORDER).is_between(orders.min(), orders.max()))
    return outcomes.join(near, on=_ORDER, how="semi" if not extra else "inner", maintain_order="left")


def _check_id(value: object, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _check_row_keys(keys: pl.Series) -> None:
    bad = keys.filter(keys.is_null() | ~keys.str.contains(_ROW_KEY_RE))
    if bad.len():
        raise ValueError(f"row_key must be 32 hex digits, got {bad[0]!r}")


def _check_ids(frame: pl.DataFrame, *names: str) -> None:
    for name in names:
        column = frame[name]
        if column.null_count() or (column.str.len_bytes() == 0).any():
            raise ValueError(f"{name} must be a non-empty string in every row")


def _records_frame(
    records: Iterable[Any] | pl.DataFrame, record_type: type, kind: str, optional: tuple[str, ...]
) -> pl.DataFrame:
    schema = {name: dtype for name, dtype in _SCHEMAS[kind].items() if name != _ORDER}
    if isinstance(records, pl.DataFrame):
        missing = [c for c in schema if c not in records.columns and c not in optional]
        if missing:
            raise ValueError(f"{kind} frame lacks the columns {missing}")
        exprs = []
        for name, dtype in schema.items():
            if name not in records.columns:
                exprs.append(pl.lit(None, dtype).alias(name))
            elif dtype == _TS and isinstance(records.schema[name], pl.Datetime):
                column = pl.col(name).cast(pl.Datetime("us", records.schema[name].time_zone))  # type: ignore[attr-defined]
                if records.schema[name].time_zone is None:  # type: ignore[attr-defined]
                    exprs.append(column.dt.replace_time_zone("UTC").alias(name))
                else:
                    exprs.append(column.dt.convert_time_zone("UTC").alias(name))
            else:
                exprs.append(pl.col(name).cast(dtype))
        return records.select(exprs)
    rows = list(records)
    for row in rows:
        if not isinstance(row, record_type):
            raise TypeError(f"expected {record_type.__name__}, got {type(row).__name__}")
    return pl.DataFrame({name: [getattr(r, name) for r in rows] for name in schema}, schema=schema)


def _receipts_frame(receipts: Iterable[Receipt] | pl.DataFrame) -> pl.DataFrame:
    frame = _records_frame(receipts, Receipt, "receipts", optional=("group_id", "created_at"))
    _check_row_keys(frame["row_key"])
    _check_ids(frame, "run_id", "batch_id")
    return frame


def _outcomes_frame(outcomes: Iterable[Outcome] | pl.DataFrame) -> pl.DataFrame:
    frame = _records_frame(
        outcomes,
        Outcome,
        "outcomes",
        optional=("interaction_id", "output", "basis", "error", "finished_at", "seconds"),
    )
    _check_row_keys(frame["row_key"])
    _check_ids(frame, "run_id")
    bad = frame["status"].filter(frame["status"].is_null() | ~frame["status"].is_in(_STATUSES))
    if bad.len():
        raise ValueError(f"outcome status must be one of {', '.join(_STATUSES)}, got {bad[0]!r}")
    return frame


def _normalise(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as JSON would give it back: tuples become lists, keys strings."""
    try:
        value = json.loads(_canonical(dict(fingerprint)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the checkpoint fingerprint must be JSON-able: {exc}") from exc
    assert isinstance(value, dict)
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _job_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(fingerprint).encode()).hexdigest()[:32]


_ABSENT: Final = object()


#: Keys an older enrich put in the fingerprint and this one does not (rows are keyed by the input they
#: send, so the mapping that built it names no job): ignored when a stored fingerprint is compared.
_RETIRED: Final = frozenset({"columns", "prompt"})


def _differences(old: Any, new: Any, path: str = "", *, known: bool = False) -> list[tuple[str, Any, Any]]:
    """Where `old` and `new` differ; with `known`, the `_RETIRED` top-level keys that `new` lacks are not
    compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        keys = set(old) | set(new)
        if known:
            keys -= {k for k in _RETIRED if k not in new}
        for key in sorted(keys):
            where = f"{path}.{key}" if path else key
            found.extend(_differences(old.get(key, _ABSENT), new.get(key, _ABSENT), where))
        return found
    if old is not _ABSENT and new is not _ABSENT and _canonical(old) == _canonical(new):
        return []
    return [(path or "fingerprint", old, new)]


def _shorten(value: Any, width: int = 40) -> str:
    if value is _ABSENT:
        return "(none)"
    text = _canonical(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _mismatch_message(root: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    found = _differences(old, new)
    shown = "; ".join(f"{where}: {_shorten(a)} → {_shorten(b)}" for where, a, b in found[:5])
    if len(found) > 5:
        shown += f"; and {len(found) - 5} more"
    return (
        f"checkpoint {root} was made for a different job ({shown}); to start over, use another checkpoint "
        f"path or delete {root} (the results it holds are then lost)"
    )


def _service_message(root: str, recorded: str, service: str) -> str:
    return (
        f"checkpoint {root} holds runs of {recorded}, not of {service}: its answers are never used for "
        f"another service; use a new checkpoint for this one (--checkpoint DIR, or checkpoint=), or point "
        f"back at {recorded}"
    )


def _write_json(store: CheckpointStore, name: str, data: Mapping[str, Any], *, overwrite: bool) -> None:
    """Write the JSON file `name` (the manifest, pacing.json, ...) whole, replacing it with `overwrite`;
    durable on return."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    _write(store, name, lambda f: f.write(text.encode()), overwrite=overwrite)


def _file(store: CheckpointStore, name: str) -> str:
    """The file `name` of `store`, for messages."""
    return str(store.path / name) if isinstance(store, LocalStore) else f"{store.location}/{name}"


def _read_manifest(store: CheckpointStore) -> dict[str, Any] | None:
    root, path = store.location, _file(store, MANIFEST)
    try:
        with store.open(MANIFEST) as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint manifest {path}: {_reason(exc)}") from exc
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        for field, kind in (("format", int), ("job_id", str), ("fingerprint", dict)):
            if not isinstance(data.get(field), kind):
                raise ValueError(f"its {field!r} is missing or not a {kind.__name__}")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(
            f"checkpoint manifest {path} is damaged ({_reason(exc)}); it was left as it is: "
            "restore it, or use another checkpoint path"
        ) from exc
    if data["format"] > FORMAT:
        raise CheckpointError(
            f"checkpoint {root} was written by a newer enrich (format {data['format']}); "
            "upgrade enrich to use it"
        )
    if data["job_id"] != _job_id(data["fingerprint"]):
        raise CheckpointError(
            f"checkpoint manifest {path} is damaged (its job_id does not match its fingerprint); "
            "it was left as it is: restore it, or use another checkpoint path"
        )
    return data


def _check_empty(store: CheckpointStore) -> None:
    """Refuse to make a checkpoint where one was lost, or in a directory that holds other things."""
    root = store.location
    for name in store.list():
        if name.endswith(".tmp") or name.startswith("."):
            continue
        if _SEGMENT_RE.fullmatch(name):
            raise CheckpointError(
                f"checkpoint {root} has segments but no {MANIFEST}; it was left as it is: "
                "restore the manifest, or use another checkpoint path"
            )
        raise CheckpointError(
            f"{root} is not a checkpoint and not empty (it holds {name!r}); choose another path"
        )


def _version() -> str:
    try:
        return importlib.metadata.version("enrich")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:199] + "…"


# -- helpers: files --------------------------------------------------------------------------------


class _BadSource(Exception):
    """A merge's source segment failed to read while being copied."""

    def __init__(self, segment: _Segment, error: BaseException) -> None:
        super().__init__(str(error))
        self.segment = segment
        self.error = error


def _write(
    store: CheckpointStore, name: str, write: Callable[[BinaryIO], object], *, overwrite: bool = False
) -> None:
    """`store.write`, its failures (a full disk, a name taken) as `CheckpointError`s naming the store."""
    try:
        store.write(name, write, overwrite=overwrite)
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"cannot write checkpoint {store.location}: {_reason(exc)}") from exc
