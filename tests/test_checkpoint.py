"""The checkpoint: round trips, state semantics, damage, failures, compaction, and a crash model.

Tests marked `@both` run on a local directory and on a `MemoryStore`: the checkpoint assumes no file system.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from enrich import _checkpoint
from enrich._checkpoint import Checkpoint, Counts, Intent, Outcome, Receipt
from enrich._exceptions import CheckpointError, CheckpointMismatchError, UsageError
from enrich._store import CheckpointStore, MemoryStore

FP = {
    "processor": "base",
    "mode": "group",
    "output_schema": {"type": "object", "properties": {"ceo": "string"}},
}
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def key(i: int) -> str:
    return f"{i:032x}"


def segments(path: Path | CheckpointStore, kind: str | None = None) -> list[str]:
    names = path.list() if isinstance(path, CheckpointStore) else [p.name for p in path.iterdir()]
    return sorted(
        n for n in names if "/" not in n and n.endswith(".parquet") and (kind is None or n.startswith(kind))
    )


@pytest.fixture
def root(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The checkpoint's directory; a `MemoryStore` in a test marked `@both` (typed as a Path for brevity)."""
    if getattr(request, "param", "local") == "memory":
        return MemoryStore()  # type: ignore[return-value]
    return tmp_path / "job.enrich"


#: Run the test on a local directory and on a MemoryStore (as `root`, and so `cp`).
both = pytest.mark.parametrize("root", ["local", "memory"], indirect=True)


@pytest.fixture
def cp(root: Path) -> Iterator[Checkpoint]:
    checkpoint = Checkpoint.open(root, FP, flush_seconds=float("inf"))
    yield checkpoint
    checkpoint.close()


def reopen(checkpoint: Checkpoint, **kwargs: Any) -> Checkpoint:
    checkpoint.close()
    return Checkpoint.open(checkpoint.store, FP, flush_seconds=float("inf"), **kwargs)


def rows(frame: pl.DataFrame, *columns: str) -> list[tuple[Any, ...]]:
    return sorted(frame.select(columns).iter_rows())


# -- opening and the manifest --------------------------------------------------------------------------------


def test_open_creates_directory_and_manifest(root: Path) -> None:
    with Checkpoint.open(root, FP) as cp:
        assert cp.fingerprint == FP
        assert cp.readonly is False
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["fingerprint"] == FP
    assert manifest["job_id"] == cp.job_id
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    assert "enrich_version" in manifest
    assert [p.name for p in root.iterdir()] == ["manifest.json"]


@both
def test_fingerprint_is_compared_as_json(root: Path) -> None:
    Checkpoint.open(root, {"a": [1, 2], "b": {"y": 1, "x": 2}}).close()
    with Checkpoint.open(root, {"b": {"x": 2, "y": 1}, "a": (1, 2)}) as cp:
        assert cp.fingerprint == {"a": [1, 2], "b": {"x": 2, "y": 1}}


@both
def test_fingerprint_mismatch_names_what_differs(root: Path) -> None:
    Checkpoint.open(root, FP).close()
    other: dict[str, Any] = {
        **FP,
        "processor": "core",
        "output_schema": {"type": "object", "properties": {"ceo": "x" * 200}},
    }
    other["new_key"] = True
    with pytest.raises(CheckpointMismatchError) as caught:
        Checkpoint.open(root, other)
    message = str(caught.value)
    assert isinstance(caught.value, UsageError)
    assert "\n" not in message
    assert 'processor: "base" → "core"' in message
    assert 'output_schema.properties.ceo: "string" → "xxx' in message
    assert "x" * 60 not in message  # long values are shortened
    assert "new_key: (none) → true" in message
    assert "mode" not in message  # equal keys are not named
    assert "another checkpoint path" in message
    assert f"delete {root}" in message
    Checkpoint.open(root, FP).close()  # the checkpoint was not touched


def test_garbled_manifest_is_an_error_and_left_alone(root: Path) -> None:
    with Checkpoint.open(root, FP) as cp:
        cp.record_group("g1")
    manifest = root / "manifest.json"
    for damaged in (manifest.read_bytes()[:25], b"", b"[1, 2]", b'{"format": 1}', b"\xff\xfe"):
        manifest.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=r"manifest .* is damaged"):
            Checkpoint.open(root, FP)
        with pytest.raises(CheckpointError, match="damaged"):
            Checkpoint.read(root)
        assert manifest.read_bytes() == damaged
    assert segments(root) == ["groups-000000001.parquet"]


def test_manifest_edited_by_hand_is_damaged(root: Path) -> None:
    Checkpoint.open(root, FP).close()
    manifest = root / "manifest.json"
    data = json.loads(manifest.read_text())
    data["fingerprint"]["processor"] = "ultra"
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="job_id does not match"):
        Checkpoint.open(root, FP)


def test_newer_format_is_refused(root: Path) -> None:
    Checkpoint.open(root, FP).close()
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 3'))
    with pytest.raises(CheckpointError, match="newer enrich"):
        Checkpoint.open(root, FP)


def test_a_root_of_shards_is_refused_by_an_enrich_that_reads_one_area(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older enrich would see no run in a root of shards and pay for every row again."""
    with Checkpoint.open(root, FP) as cp:
        assert cp.recorded_nothing and cp.shards == 1
        cp.record_shards(8)
    assert json.loads((root / "manifest.json").read_text())["format"] == 2
    with Checkpoint.open(root, FP) as cp:
        assert cp.shards == 8
    monkeypatch.setattr(_checkpoint, "FORMAT", 1)  # what the previous enrich read
    with pytest.raises(CheckpointError, match="newer enrich"):
        Checkpoint.open(root, FP)


def test_a_checkpoint_that_recorded_a_group_is_never_split(root: Path) -> None:
    with Checkpoint.open(root, FP) as cp:
        cp.record_group("tgrp_1")
        assert not cp.recorded_nothing
        with pytest.raises(CheckpointError, match="cannot be split"):
            cp.record_shards(4)


@both
def test_open_without_create(root: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpoint.open(root, FP, create=False)
    assert not root.exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpoint.read(root)


def test_refuses_directory_with_other_files(root: Path) -> None:
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Checkpoint.open(root, FP)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_refuses_segments_without_manifest(root: Path) -> None:
    with Checkpoint.open(root, FP) as cp:
        cp.record_group("g1")
    (root / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="segments but no manifest"):
        Checkpoint.open(root, FP)
    assert not (root / "manifest.json").exists()


def test_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(tmp_path / "file", FP)


def test_fingerprint_must_be_json(root: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        Checkpoint.open(root, {"x": object()})


@both
def test_one_writer_at_a_time(root: Path, cp: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="in use by another"):
        Checkpoint.open(root, FP)
    reader = Checkpoint.read(root)  # readers take no lock
    assert reader.counts().rows == 0


# -- round trips and state semantics -------------------------------------------------------------------------


@both
def test_round_trip_every_kind(cp: Checkpoint) -> None:
    cp.record_group("g1")
    cp.record_group("g1")  # idempotent
    cp.record_group("g2")
    intent = cp.record_intents("b1", "g1", [key(1), key(2), key(3), key(1)])
    assert intent == Intent("b1", "g1", (key(1), key(2), key(3)))
    cp.record_receipts(
        [
            Receipt(key(1), "run_1", "g1", "b1", T0),
            Receipt(key(2), "run_2", "g1", "b1", T0),
            Receipt(key(3), "run_3", "g1", "b1", T0),
        ]
    )
    cp.record_intents("b2", None, [key(4)])
    cp.resolve_intents("b2")
    cp.add_outcomes(
        [
            Outcome(key(1), "run_1", "completed", '{"ceo": "Ada"}', '[{"field": "ceo"}]', None, T0, "int_1"),
            Outcome(key(2), "run_2", "failed", error="timeout", finished_at=T0),
        ]
    )
    before = cp.state()
    cp = reopen(cp)
    assert cp.groups == ["g1", "g2"]
    assert cp.in_doubt() == []
    assert cp.warnings == []
    state = cp.state()
    assert state.equals(before)
    assert state.columns == [
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
    ]
    assert state.rows() == [
        (key(1), "run_1", "int_1", "g1", "completed", '{"ceo": "Ada"}', '[{"field": "ceo"}]', None, T0, T0),
        (key(2), "run_2", None, "g1", "failed", None, None, "timeout", T0, T0),
        (key(3), "run_3", None, "g1", "submitted", None, None, None, T0, None),
    ]
    assert cp.interactions().rows() == [("run_1", "int_1"), ("run_2", None)]
    assert cp.counts() == Counts(rows=3, submitted=1, completed=1, failed=1, in_doubt=0, runs=3)
    assert cp.state(outputs=False).columns == [
        "row_key",
        "run_id",
        "interaction_id",
        "group_id",
        "status",
        "error",
        "created_at",
        "finished_at",
    ]
    cp.close()


@both
def test_each_end_the_service_names_is_an_outcome_of_its_own(cp: Checkpoint) -> None:
    statuses = ["completed", "failed", "cancelled", "action_required"]
    cp.record_receipts([Receipt(key(i), f"run_{i}", "g1", "b1", T0) for i in range(5)])
    cp.add_outcomes(
        [
            Outcome(key(i), f"run_{i}", s, error=None if s == "completed" else s)
            for i, s in enumerate(statuses)
        ]
    )
    with pytest.raises(ValueError, match="outcome status must be one of completed, failed, cancelled"):
        cp.add_outcomes([Outcome(key(4), "run_4", "cancelling")])  # type: ignore[arg-type]
    cp = reopen(cp)
    assert cp.state(outputs=False)["status"].to_list() == [*statuses, "submitted"]
    assert cp.counts() == Counts(
        rows=5, submitted=1, completed=1, failed=1, in_doubt=0, runs=5, cancelled=1, action_required=1
    )


@both
def test_columnar_input(cp: Checkpoint) -> None:
    cp.record_receipts(
        pl.DataFrame(
            {
                "row_key": [key(1), key(2)],
                "run_id": ["r1", "r2"],
                "batch_id": ["b", "b"],
                "created_at": [datetime(2025, 1, 1, 12), None],  # naive: taken as UTC
            }
        )
    )
    cp.add_outcomes(pl.DataFrame({"row_key": [key(1)], "run_id": ["r1"], "status": ["completed"]}))
    cp = reopen(cp)
    assert cp.state().rows() == [
        (key(1), "r1", None, None, "completed", None, None, None, datetime(2025, 1, 1, 12, tzinfo=UTC), None),
        (key(2), "r2", None, None, "submitted", None, None, None, None, None),
    ]
    cp.close()


@both
def test_latest_receipt_wins_and_outcome_must_match_its_run(cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "run_a", "g1", "b1"), Receipt(key(2), "run_b", "g1", "b1")])
    cp.add_outcomes([Outcome(key(1), "run_a", "failed", error="boom")])
    cp.flush()
    # retry_failed: a new run for the same row supersedes the failed one
    cp.record_intents("b2", "g1", [key(1)])
    cp.record_receipts([Receipt(key(1), "run_a2", "g1", "b2")])
    assert rows(cp.state(), "row_key", "run_id", "status") == [
        (key(1), "run_a2", "submitted"),
        (key(2), "run_b", "submitted"),
    ]
    # a late outcome of the superseded run does not count
    cp.add_outcomes([Outcome(key(1), "run_a", "completed", output="{}")])
    assert cp.state().row(0, named=True)["status"] == "submitted"
    cp.add_outcomes([Outcome(key(1), "run_a2", "completed", output='{"v": 2}')])
    # the latest outcome of a run wins
    cp.add_outcomes([Outcome(key(2), "run_b", "failed", error="first")])
    cp.add_outcomes([Outcome(key(2), "run_b", "completed", output='{"v": 3}')])
    expected = [(key(1), "run_a2", "completed", '{"v": 2}'), (key(2), "run_b", "completed", '{"v": 3}')]
    assert rows(cp.state(), "row_key", "run_id", "status", "output") == expected
    cp = reopen(cp)
    assert rows(cp.state(), "row_key", "run_id", "status", "output") == expected
    assert cp.counts().runs == 3  # the superseded run was paid for too
    cp.close()


@both
def test_recording_a_run_twice_counts_it_once(cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "run_1", "g1", "b1")])
    cp.record_receipts([Receipt(key(1), "run_1", "g1", "b1")])
    assert cp.runs == cp.counts().runs == 1
    cp = reopen(cp)
    assert cp.runs == 1
    cp.close()


@both
def test_in_doubt(cp: Checkpoint) -> None:
    cp.record_intents("b1", "g1", [key(1), key(2), key(3)])
    cp.record_intents("b2", "g1", [key(4)])
    assert cp.in_doubt() == [Intent("b1", "g1", (key(1), key(2), key(3))), Intent("b2", "g1", (key(4),))]
    cp.record_receipts([Receipt(key(2), "r2", "g1", "b1")])
    assert cp.in_doubt()[0] == Intent("b1", "g1", (key(1), key(3)))
    # a receipt from another batch does not settle this one
    cp.record_receipts([Receipt(key(4), "r4", "g1", "b0")])
    assert Intent("b2", "g1", (key(4),)) in cp.in_doubt()
    # a later intent for a row supersedes the earlier one
    cp.record_intents("b3", None, [key(1)])
    assert cp.in_doubt() == [
        Intent("b1", "g1", (key(3),)),
        Intent("b2", "g1", (key(4),)),
        Intent("b3", None, (key(1),)),
    ]
    assert cp.counts().in_doubt == 3
    cp = reopen(cp)
    assert cp.in_doubt() == [
        Intent("b1", "g1", (key(3),)),
        Intent("b2", "g1", (key(4),)),
        Intent("b3", None, (key(1),)),
    ]
    cp.resolve_intents("b1")
    cp.resolve_intents("b1")
    cp.record_receipts([Receipt(key(4), "r4b", "g1", "b2")])
    assert cp.in_doubt() == [Intent("b3", None, (key(1),))]
    cp = reopen(cp)
    assert cp.in_doubt() == [Intent("b3", None, (key(1),))]
    # an intent recorded under a batch already resolved is not in doubt
    cp.record_intents("b1", "g1", [key(9)])
    assert cp.in_doubt() == [Intent("b3", None, (key(1),))]
    cp.close()


@both
def test_in_doubt_keeps_when_each_request_was_sent(cp: Checkpoint) -> None:
    t1 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    t2 = datetime(2026, 1, 1, 12, 0, 7, tzinfo=UTC)
    cp.record_intents("b1", "g1", [key(1), key(2)], sent_at=t1)
    cp.record_intent_rows([("b2", "g1", key(3))], sent_at=t2)
    assert [(i.batch_id, i.sent_at) for i in cp.in_doubt()] == [("b1", t1), ("b2", t2)]
    # the same batch sent again (after a 429) counts from its last send
    cp.record_intents("b1", "g1", [key(1), key(2)], sent_at=t2)
    cp = reopen(cp)
    assert [(i.batch_id, i.sent_at) for i in cp.in_doubt()] == [("b2", t2), ("b1", t2)]
    before = datetime.now(UTC)
    cp.record_intents("b3", "g1", [key(4)])  # default: now
    (b3,) = [i for i in cp.in_doubt() if i.batch_id == "b3"]
    assert b3.sent_at is not None and before <= b3.sent_at <= datetime.now(UTC)
    cp.close()


def test_intents_written_before_sent_at_existed_still_read(root: Path) -> None:
    """A checkpoint of an older enrich: its intents have no sent_at column; they read as long past."""
    with Checkpoint.open(root, FP) as cp:
        cp.record_intents("b1", "g1", [key(1)])
        job = cp.job_id
    (name,) = segments(root, "intents")
    table = pq.read_table(root / name)
    old = table.drop_columns(["sent_at"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(old, root / name)
    with Checkpoint.open(root, FP) as cp:
        assert cp.warnings == []
        assert cp.in_doubt() == [Intent("b1", "g1", (key(1),))]
        assert cp.in_doubt()[0].sent_at is None
        assert cp.job_id == job
        # and compaction carries it on
        for i in range(20):
            cp.record_intents(f"c{i}", "g1", [key(100 + i)])
        assert Intent("b1", "g1", (key(1),)) in cp.in_doubt()
    with Checkpoint.open(root, FP) as cp:
        assert Intent("b1", "g1", (key(1),)) in cp.in_doubt() and cp.warnings == []


@both
def test_duplicates_are_paid_for_and_never_a_rows_run(cp: Checkpoint) -> None:
    cp.record_intents("b1", "g1", [key(1), key(2)])
    cp.record_receipts([Receipt(key(1), "r1", "g1", "b1"), Receipt(key(2), "r2", "g1", "b1")])
    cp.record_duplicates([(key(1), "r1-late", "g1"), (key(1), "r1", "g1")])  # r1 is no duplicate: skipped
    cp.record_duplicates([(key(1), "r1-late", "g1")])  # recorded already: nothing written
    assert len(segments(cp.store, "duplicates")) == 1
    assert cp.runs == 3 and cp.duplicates == {"r1-late": key(1)}
    assert cp.knows_run("r1-late") and cp.knows_run("r2") and not cp.knows_run("r3")
    assert cp.run_ids([key(1)]) == {"r1", "r1-late"}
    state = cp.state(outputs=False)
    assert rows(state, "row_key", "run_id") == [(key(1), "r1"), (key(2), "r2")]
    assert cp.counts() == Counts(rows=2, submitted=2, completed=0, failed=0, in_doubt=0, runs=3, duplicates=1)
    cp = reopen(cp)
    assert cp.runs == 3 and cp.duplicates == {"r1-late": key(1)} and cp.counts().duplicates == 1
    assert rows(cp.state(outputs=False), "row_key", "run_id") == [(key(1), "r1"), (key(2), "r2")]
    # a run first taken for a duplicate and later recorded as a receipt is counted once
    cp.record_receipts([Receipt(key(3), "r1-late", "g1", "b9")])
    assert cp.runs == 3
    cp = reopen(cp)
    assert cp.runs == 3 and cp.duplicates == {}
    cp.close()


def test_pacing_is_kept_across_opens(root: Path) -> None:
    with Checkpoint.open(root, FP) as cp:
        assert cp.pacing is None
        cp.record_pacing({"runs_rate": 8.5, "size": 250})
        cp.record_pacing({"runs_rate": 8.5, "size": 250})  # unchanged: not written again
    assert json.loads((root / "pacing.json").read_text()) == {"runs_rate": 8.5, "size": 250}
    with Checkpoint.open(root, FP) as cp:
        assert cp.pacing == {"runs_rate": 8.5, "size": 250}
    assert Checkpoint.read(root).pacing == {"runs_rate": 8.5, "size": 250}
    (root / "pacing.json").write_text("{not json")  # damaged: only a head start is lost
    with Checkpoint.open(root, FP) as cp:
        assert cp.pacing is None and cp.warnings == []
        with pytest.raises(CheckpointError):
            Checkpoint.read(root).record_pacing({})


@both
def test_outcomes_are_buffered_until_flushed(root: Path) -> None:
    cp = Checkpoint.open(root, FP, flush_rows=3, flush_seconds=float("inf"))
    cp.record_receipts([Receipt(key(i), f"r{i}", None, "b") for i in range(5)])
    cp.add_outcomes([Outcome(key(0), "r0", "completed"), Outcome(key(1), "r1", "completed")])
    assert cp.buffered == 2
    assert cp.counts().completed == 2  # buffered outcomes show at once
    assert segments(root, "outcomes") == []
    cp.add_outcomes([Outcome(key(2), "r2", "completed")])  # reaches flush_rows
    assert cp.buffered == 0
    assert len(segments(root, "outcomes")) == 1
    cp.add_outcomes([Outcome(key(3), "r3", "failed")])
    cp._abandon()  # SIGKILL: the unflushed outcome is lost, the flushed ones are not
    cp = Checkpoint.open(root, FP)
    assert cp.counts() == Counts(rows=5, submitted=2, completed=3, failed=0, in_doubt=0, runs=5)
    cp.add_outcomes([Outcome(key(3), "r3", "failed")])
    cp.close()  # close flushes
    assert Checkpoint.read(root).counts().failed == 1


def test_outcomes_flush_after_flush_seconds(root: Path) -> None:
    cp = Checkpoint.open(root, FP, flush_seconds=0.0)
    cp.add_outcomes([Outcome(key(0), "r0", "completed")])
    assert cp.buffered == 0
    cp.close()


@both
def test_context_manager_flushes_on_interrupt(root: Path) -> None:
    with pytest.raises(KeyboardInterrupt), Checkpoint.open(root, FP) as cp:
        cp.record_receipts([Receipt(key(1), "r1", None, "b")])
        cp.add_outcomes([Outcome(key(1), "r1", "completed", output="{}")])
        raise KeyboardInterrupt
    assert Checkpoint.read(root).counts().completed == 1


def test_bad_records_are_refused(cp: Checkpoint) -> None:
    with pytest.raises(ValueError, match="row_key"):
        cp.record_intents("b", None, ["not-a-key"])
    with pytest.raises(ValueError, match="row_key"):
        cp.record_receipts([Receipt("A" * 31, "r", None, "b")])
    with pytest.raises(ValueError, match="run_id"):
        cp.record_receipts([Receipt(key(1), "", None, "b")])
    with pytest.raises(ValueError, match="status"):
        cp.add_outcomes([Outcome(key(1), "r", "running")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Receipt"):
        cp.record_receipts([Outcome(key(1), "r", "completed")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="lacks the columns"):
        cp.record_receipts(pl.DataFrame({"row_key": [key(1)]}))
    with pytest.raises(ValueError, match="at least one"):
        cp.record_intents("b", None, [])
    cp.record_receipts([])  # nothing to do
    assert segments(cp.store) == []


def test_read_only(root: Path, cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    (root / "receipts-000000099.parquet.tmp").write_bytes(b"half")
    reader = Checkpoint.read(root)
    assert reader.readonly
    assert reader.state()["run_id"].to_list() == ["r1"]
    with pytest.raises(CheckpointError, match="read-only"):
        reader.record_group("g")
    with pytest.raises(CheckpointError, match="read-only"):
        reader.add_outcomes([Outcome(key(1), "r1", "completed")])
    assert (root / "receipts-000000099.parquet.tmp").exists()  # a reader deletes nothing
    reader.close()


@both
def test_reader_lists_again_when_a_writer_compacts_under_it(root: Path, cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    store = type(cp.store)
    real_list = store.list
    calls = 0

    def listing(self: CheckpointStore, prefix: str = "") -> list[str]:
        nonlocal calls
        calls += 1
        names = real_list(self, prefix)
        return [*names, "receipts-000000000.parquet"] if calls == 1 else names  # gone when read

    with mock.patch.object(store, "list", listing):
        reader = Checkpoint.read(root)
    assert calls == 2
    assert reader.warnings == []
    assert reader.state()["run_id"].to_list() == ["r1"]


@both
def test_closed(cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    cp.close()
    cp.close()
    with pytest.raises(CheckpointError, match="closed"):
        cp.record_group("g")
    assert cp.counts().rows == 1
    assert "closed" in repr(cp)


@both
def test_close_forget_drops_the_tables_but_keeps_every_record(cp: Checkpoint, root: Path) -> None:
    """A job at its end frees the in-memory tables before its join; the disk has everything."""
    cp.record_intents("b", "g", [key(1), key(2)])
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    cp.add_outcomes([Outcome(key(1), "r1", "completed", output='{"ceo": "Ada"}')])  # buffered
    assert cp.state()["status"].to_list() == ["completed"]
    cp.drop_cache()  # only a cache: the next state() rebuilds it
    assert cp.state()["output"].to_list() == ['{"ceo": "Ada"}']
    cp.close(forget=True)
    with pytest.raises(CheckpointError, match="tables dropped"):
        cp.state()
    with pytest.raises(CheckpointError, match="tables dropped"):
        cp.run_ids([key(1)])
    cp.close(forget=True)  # again: nothing to do
    again = Checkpoint.read(root)  # the buffered outcome was flushed by the close
    assert again.state()["output"].to_list() == ['{"ceo": "Ada"}']
    assert [i.row_keys for i in again.in_doubt()] == [(key(2),)]


def test_a_merge_source_unreadable_past_its_keys_is_left_out_not_retried(root: Path) -> None:
    """Merges read the keys first, then copy each source a row group at a time: a source whose other
    columns fail to read is dropped from merges (reported), as one whose keys fail, and no temporary
    file stays."""
    import pyarrow.parquet as pq

    cp = Checkpoint.open(root, FP, compact_fanout=2, flush_rows=1)
    real_read = pq.ParquetFile.read_row_group
    failures: list[str] = []

    def read_row_group(self: Any, i: int, columns: Any = None, **kw: Any) -> Any:
        # the first read of a row group by a merge (past the key columns, read whole before)
        if not failures:
            failures.append("x")
            raise OSError("checksum mismatch in a data page")
        return real_read(self, i, columns=columns, **kw)

    with mock.patch.object(pq.ParquetFile, "read_row_group", read_row_group):
        for i in range(2):
            cp.record_receipts([Receipt(key(i), f"r{i}", "g", "b")])
    assert failures and any("compaction skipped" in w and "checksum" in w for w in cp.warnings)
    assert not list(root.glob("*.tmp"))
    for i in range(2, 6):  # later merges go on without the bad segment
        cp.record_receipts([Receipt(key(i), f"r{i}", "g", "b")])
    assert len([w for w in cp.warnings if "compaction skipped" in w]) == 1
    assert cp.state(outputs=False)["run_id"].to_list() == [f"r{i}" for i in range(6)]
    cp.close()


def test_durable_before_return(cp: Checkpoint, root: Path) -> None:
    """Each record call fsyncs the file, links it into place (a new file: never one replaced) and fsyncs
    the directory, in that order; a replaced file (pacing.json) is renamed over the old one."""
    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:
        events.append("link")
        real_link(src, dst)

    with mock.patch("os.fsync", fsync), mock.patch("os.replace", replace), mock.patch("os.link", link):
        cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
        assert events == ["fsync file", "link", "fsync dir"]
        events.clear()
        cp.record_pacing({"size": 1})
        cp.record_pacing({"size": 2})
    assert events == ["fsync file", "rename", "fsync dir"] * 2
    assert not list(root.glob("*.tmp"))


# -- damage on disk ------------------------------------------------------------------------------------------


def test_torn_segment_is_skipped_and_the_rest_kept(root: Path, cp: Checkpoint) -> None:
    cp.record_group("g1")
    cp.record_receipts([Receipt(key(1), "r1", "g1", "b1")])
    cp.record_receipts([Receipt(key(2), "r2", "g1", "b2")])
    cp.close()
    last = root / "receipts-000000003.parquet"
    data = last.read_bytes()
    for size in (0, 4, len(data) // 2, len(data) - 1):
        last.write_bytes(data[:size])
        cp = Checkpoint.open(root, FP)
        assert len(cp.warnings) == 1
        assert "skipped receipts-000000003.parquet" in cp.warnings[0]
        assert cp.state()["run_id"].to_list() == ["r1"]
        assert cp.groups == ["g1"]
        # the next write does not reuse the torn segment's name
        cp.record_group("g2")
        assert (root / "groups-000000004.parquet").exists()
        cp.close()
        (root / "groups-000000004.parquet").unlink()


def test_flipped_bytes_are_reported_or_harmless(root: Path, cp: Checkpoint) -> None:
    """A disk fault anywhere in a segment either shows as a warning or leaves every value as it was."""
    cp.record_receipts([Receipt(key(i), f"r{i}", "g", "b", T0) for i in range(3)])
    cp.add_outcomes(
        [Outcome(key(i), f"r{i}", "completed", output=f'{{"n": {i}}}', basis="[]") for i in range(3)]
    )
    cp.close()
    expected = Checkpoint.read(root).state()
    for name in segments(root):
        good = (root / name).read_bytes()
        for position in range(0, len(good), len(good) // 80 + 1):
            bad = bytearray(good)
            bad[position] ^= 0x55
            (root / name).write_bytes(bytes(bad))
            reader = Checkpoint.read(root)
            state = reader.state()
            assert reader.warnings or state.equals(expected), (name, position)
        (root / name).write_bytes(good)


def test_segment_from_another_job_is_skipped(tmp_path: Path, root: Path, cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    other = tmp_path / "other.enrich"
    with Checkpoint.open(other, {**FP, "processor": "pro"}) as foreign:
        foreign.record_receipts([Receipt(key(2), "r2", "g", "b")])
    shutil.copy(other / "receipts-000000001.parquet", root / "receipts-000000007.parquet")
    cp = reopen(cp)
    assert cp.warnings == [
        f"skipped receipts-000000007.parquet: segment from another job (job {foreign.job_id}, "
        f"this checkpoint is job {cp.job_id})"
    ]
    assert cp.state()["run_id"].to_list() == ["r1"]
    cp.close()


def test_stray_temp_files_are_removed_on_open(root: Path, cp: Checkpoint) -> None:
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    cp.close()
    (root / "receipts-000000002.parquet.tmp").write_bytes(b"PAR1 half a file")
    (root / "manifest.json.tmp").write_bytes(b"{")
    cp = Checkpoint.open(root, FP)
    assert cp.warnings == []
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "receipts-000000001.parquet"]
    cp.close()


def test_died_while_creating_leaves_only_temp_manifest(root: Path) -> None:
    root.mkdir()
    (root / "manifest.json.tmp").write_bytes(b'{"form')
    with Checkpoint.open(root, FP) as cp:
        assert cp.fingerprint == FP


# -- failures while writing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [("os.link", errno.ENOSPC), ("os.fsync", errno.EROFS), ("os.link", errno.EACCES)],
)
def test_write_failure_raises_and_loses_nothing(root: Path, cp: Checkpoint, target: str, code: int) -> None:
    cp.record_group("g1")
    cp.record_intents("b1", "g1", [key(1)])
    cp.record_receipts([Receipt(key(1), "r1", "g1", "b1")])
    cp.add_outcomes([Outcome(key(1), "r1", "completed", output="{}")])
    cp.flush()
    before = cp.state()
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    failure = OSError(code, os.strerror(code))
    with mock.patch(target, side_effect=failure):
        with pytest.raises(CheckpointError, match=f"cannot write checkpoint {root}: {os.strerror(code)}"):
            cp.record_intents("b2", "g1", [key(2)])
        with pytest.raises(CheckpointError):
            cp.record_receipts([Receipt(key(2), "r2", "g1", "b2")])
        with pytest.raises(CheckpointError):
            cp.record_group("g2")
        with pytest.raises(CheckpointError):
            cp.resolve_intents("b1")
        cp.add_outcomes([Outcome(key(1), "r1", "failed")])
        with pytest.raises(CheckpointError):
            cp.flush()
    # nothing that failed is in memory, and nothing durable changed on disk
    assert cp.in_doubt() == []
    assert cp.groups == ["g1"]
    assert cp.buffered == 1  # the outcome waits for the next flush
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
    cp.flush()
    assert cp.state()["status"].to_list() == ["failed"]
    cp.close()
    reopened = Checkpoint.open(root, FP)
    assert reopened.state().drop("status", "output").equals(before.drop("status", "output"))
    assert reopened.state()["status"].to_list() == ["failed"]
    reopened.close()


def test_cannot_create_checkpoint(root: Path) -> None:
    with (
        mock.patch("os.link", side_effect=OSError(errno.ENOSPC, "No space left on device")),
        pytest.raises(CheckpointError, match=r"cannot write checkpoint .*No space left"),
    ):
        Checkpoint.open(root, FP)
    assert list(root.iterdir()) == []
    Checkpoint.open(root, FP).close()


# -- compaction ----------------------------------------------------------------------------------------------


def write_history(cp: Checkpoint) -> None:
    """60 batches of 3 rows, every tenth with a retry (a new run supersedes) and a replaced outcome."""
    for batch in range(60):
        keys = [key(batch * 3 + i) for i in range(3)]
        cp.record_intents(f"b{batch}", "g", keys)
        cp.record_receipts([Receipt(k, f"r{batch}-{i}", "g", f"b{batch}") for i, k in enumerate(keys)])
        cp.add_outcomes([Outcome(keys[0], f"r{batch}-0", "completed", output=f'{{"n": {batch}}}')])
        if batch % 10 == 0:
            cp.record_intents(f"b{batch}r", "g", [keys[1]])
            cp.record_receipts([Receipt(keys[1], f"r{batch}-1r", "g", f"b{batch}r")])
            cp.add_outcomes([Outcome(keys[0], f"r{batch}-0", "failed", error="late")])


@both
def test_compaction_keeps_state_and_bounds_segments(tmp_path: Path, root: Path) -> None:
    fanout = 4
    cp = Checkpoint.open(root, FP, compact_fanout=fanout, flush_rows=1, flush_seconds=float("inf"))
    with mock.patch("os.fsync"):  # durability is tested above; here it would only cost time
        with Checkpoint.open(tmp_path / "plain", FP, compact_fanout=1000, flush_rows=1) as plain:
            write_history(plain)  # the same history, never compacted
            expected = plain.state()
        write_history(cp)
    state, counts = cp.state(), cp.counts()
    assert state.drop("created_at").equals(expected.drop("created_at"))
    for kind in ("intents", "receipts", "outcomes"):
        # 66 writes per kind: at most fanout - 1 segments per tier, and log_4(66) < 4 tiers
        assert len(segments(root, kind)) <= (fanout - 1) * 4
    assert cp.warnings == []
    cp = reopen(cp)
    assert cp.state().equals(state)
    assert cp.counts() == counts
    assert counts.runs == 186
    cp.close()
    reader = Checkpoint.read(root)
    assert reader.state().equals(state)


@both
def test_compaction_interrupted_before_deleting_sources(root: Path) -> None:
    cp = Checkpoint.open(root, FP, compact_fanout=3, flush_seconds=float("inf"))
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    cp.record_receipts([Receipt(key(2), "r2", "g", "b")])
    failing = OSError(errno.EIO, "Input/output error")
    with mock.patch.object(type(cp.store), "delete", side_effect=failing):
        cp.record_receipts([Receipt(key(1), "r1b", "g", "c")])  # the third segment triggers a merge
    assert len(segments(root, "receipts")) == 4  # 3 sources + the merged segment
    assert any("could not delete merged" in w for w in cp.warnings)
    state = cp.state()
    reader = Checkpoint.read(root)  # a reader dedupes without deleting
    assert reader.state().equals(state)
    assert reader.warnings == []
    assert len(segments(root, "receipts")) == 4
    cp._abandon()
    cp = Checkpoint.open(root, FP)
    assert segments(root, "receipts") == ["receipts-000000004.parquet"]
    assert cp.state().equals(state)
    assert cp.counts().runs == 3
    cp.close()


def test_unreadable_merged_segment_falls_back_to_its_sources(root: Path) -> None:
    cp = Checkpoint.open(root, FP, compact_fanout=2, flush_seconds=float("inf"))
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    with mock.patch("os.unlink", side_effect=OSError(errno.EIO, "Input/output error")):
        cp.record_receipts([Receipt(key(2), "r2", "g", "b")])  # merged into seq 3, sources kept
    state = cp.state()
    cp.close()
    merged = root / "receipts-000000003.parquet"
    data = bytearray(merged.read_bytes())
    data[8] ^= 0xFF  # in the first data page: the footer still reads, the rows do not
    merged.write_bytes(bytes(data))
    cp = Checkpoint.open(root, FP)
    assert len(cp.warnings) == 1 and "skipped receipts-000000003.parquet" in cp.warnings[0]
    assert cp.state().equals(state)
    assert segments(root, "receipts") == [
        "receipts-000000001.parquet",
        "receipts-000000002.parquet",
        "receipts-000000003.parquet",
    ]
    cp.close()


def test_compaction_failure_is_a_warning(root: Path) -> None:
    cp = Checkpoint.open(root, FP, compact_fanout=2, flush_seconds=float("inf"))
    cp.record_receipts([Receipt(key(1), "r1", "g", "b")])
    real_link = os.link

    def link(src: Any, dst: Any) -> None:
        if "receipts-000000003" in str(dst):  # the merge
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst)

    with mock.patch("os.link", link):
        cp.record_receipts([Receipt(key(2), "r2", "g", "b")])  # durable, its merge postponed
    assert cp.warnings == [
        f"compaction of receipts postponed: cannot write checkpoint {root}: No space left on device"
    ]
    assert segments(root, "receipts") == ["receipts-000000001.parquet", "receipts-000000002.parquet"]
    cp = reopen(cp)
    assert cp.counts().runs == 2
    cp.close()


@both
def test_write_cost_is_amortised(root: Path) -> None:
    """Compaction rewrites a row at most once per tier: total rows written stay O(n log n)."""
    written: list[int] = []
    cp = Checkpoint.open(root, FP, compact_fanout=4)
    real, real_merged = Checkpoint._write_segment, Checkpoint._write_merged

    def spy(self: Checkpoint, segment: Any, frame: pl.DataFrame, *, replaces: list[int]) -> None:
        written.append(frame.height)
        real(self, segment, frame, replaces=replaces)

    def spy_merged(self: Checkpoint, segment: Any, parts: list[tuple[Any, pl.Series]]) -> None:
        written.append(sum(int(keep.sum()) for _, keep in parts))  # merges stream their sources
        real_merged(self, segment, parts)

    with (
        mock.patch.object(Checkpoint, "_write_segment", spy),
        mock.patch.object(Checkpoint, "_write_merged", spy_merged),
        mock.patch("os.fsync"),
    ):
        for i in range(64):
            cp.record_receipts([Receipt(key(i * 10 + j), f"r{i}-{j}", "g", "b") for j in range(10)])
    assert sum(written) == 640 * 4  # written once, then merged at tiers 1, 2 and 3 (4**3 == 64)
    assert segments(root, "receipts") == ["receipts-000000085.parquet"]  # 64 writes + 16 + 4 + 1 merges
    cp.close()


# -- a random history with crashes, against a model ----------------------------------------------------------

KEYS = [key(i) for i in range(8)]


class CheckpointMachine(RuleBasedStateMachine):
    """Random writes, flushes, failed writes, crashes and torn segments; what is read back equals the model.

    The model holds what was made durable: every record call that returned, every outcome flushed. A crash
    loses only buffered outcomes; tearing the newest segment loses exactly the write that made it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.root = Path(tempfile.mkdtemp()) / "job.enrich"
        self.open()
        self.groups: list[str] = []
        self.intents: list[tuple[str, str | None, str]] = []
        self.resolved: list[str] = []
        self.receipts: list[Receipt] = []
        self.outcomes: list[Outcome] = []
        self.buffered: list[Outcome] = []
        self.undo: Any = (
            None  # (segment name, how to forget it) when the newest segment is exactly the last write
        )
        self.torn = 0

    def open(self) -> None:
        self.cp = Checkpoint.open(self.root, FP, compact_fanout=2, flush_rows=4, flush_seconds=float("inf"))

    def teardown(self) -> None:
        self.cp.close()
        shutil.rmtree(self.root.parent)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def write(self, call: Any, undo: Any) -> None:
        """Make a durable write; remember how to forget it if it left exactly one new segment."""
        before = set(segments(self.root))
        call()
        after = set(segments(self.root))
        new = after - before
        self.undo = (next(iter(new)), undo) if len(new) == 1 and before <= after else None

    @rule(new=st.booleans(), pick=st.integers(0, 100))
    def record_group(self, new: bool, pick: int) -> None:
        group = self.fresh("g") if new or not self.groups else self.groups[pick % len(self.groups)]
        if group in self.groups:
            self.cp.record_group(group)
            return
        self.write(lambda: self.cp.record_group(group), lambda: self.groups.remove(group))
        self.groups.append(group)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True), grouped=st.booleans())
    def record_intents(self, keys: list[str], grouped: bool) -> None:
        batch = self.fresh("b")
        group = self.groups[-1] if grouped and self.groups else None
        records = [(batch, group, k) for k in keys]
        self.write(
            lambda: self.cp.record_intents(batch, group, keys), lambda: self.forget(self.intents, records)
        )
        self.intents.extend(records)

    @rule(data=st.data())
    def record_receipts(self, data: st.DataObject) -> None:
        for_an_intent: bool = data.draw(st.booleans())
        if self.intents and for_an_intent:
            batch, group, _ = data.draw(st.sampled_from(self.intents))
            candidates = [k for b, _, k in self.intents if b == batch]
        else:
            batch, group, candidates = self.fresh("x"), None, KEYS
        keys = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
        records = [Receipt(k, self.fresh("run"), group, batch) for k in keys]
        again: bool = data.draw(st.booleans())
        if self.receipts and again:
            records.append(data.draw(st.sampled_from(self.receipts)))  # a run recorded again
        self.write(lambda: self.cp.record_receipts(records), lambda: self.forget(self.receipts, records))
        self.receipts.extend(records)

    @rule(data=st.data())
    def resolve_intents(self, data: st.DataObject) -> None:
        if not self.intents:
            return
        batch = data.draw(st.sampled_from(self.intents))[0]
        if batch in self.resolved:
            return
        self.write(lambda: self.cp.resolve_intents(batch), lambda: self.resolved.remove(batch))
        self.resolved.append(batch)

    @rule(data=st.data())
    def add_outcomes(self, data: st.DataObject) -> None:
        if not self.receipts:
            return
        picked = data.draw(st.lists(st.sampled_from(self.receipts), min_size=1, max_size=3))
        records = []
        for receipt in picked:
            status = data.draw(st.sampled_from(["completed", "failed"]))
            text = data.draw(st.text(max_size=5))
            if status == "completed":
                records.append(Outcome(receipt.row_key, receipt.run_id, "completed", output=json.dumps(text)))
            else:
                records.append(Outcome(receipt.row_key, receipt.run_id, "failed", error=text))
        self.buffered.extend(records)
        if len(self.buffered) >= 4:  # flush_rows
            flushed = list(self.buffered)
            self.write(lambda: self.cp.add_outcomes(records), lambda: self.forget(self.outcomes, flushed))
            self.outcomes.extend(flushed)
            self.buffered.clear()
        else:
            self.cp.add_outcomes(records)

    @rule()
    def flush(self) -> None:
        if not self.buffered:
            return
        flushed = list(self.buffered)
        self.write(self.cp.flush, lambda: self.forget(self.outcomes, flushed))
        self.outcomes.extend(flushed)
        self.buffered.clear()

    @rule(
        which=st.sampled_from(["receipts", "intents", "flush"]),
        code=st.sampled_from([errno.ENOSPC, errno.EROFS]),
    )
    def failed_write(self, which: str, code: int) -> None:
        with (
            mock.patch("os.link", side_effect=OSError(code, os.strerror(code))),
            pytest.raises(CheckpointError),
        ):
            if which == "receipts":
                self.cp.record_receipts([Receipt(KEYS[0], self.fresh("lost"), None, "b")])
            elif which == "intents":
                self.cp.record_intents(self.fresh("lost"), None, [KEYS[1]])
            else:
                self.buffered.append(Outcome(KEYS[0], "never", "failed"))
                self.cp.add_outcomes([Outcome(KEYS[0], "never", "failed")])  # may flush, and fail, itself
                self.cp.flush()
        self.undo = None

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
    def receipts_while_deletes_fail(self, keys: list[str]) -> None:
        """A merge whose sources cannot be deleted: as if the process died between the two steps."""
        records = [Receipt(k, self.fresh("run"), None, self.fresh("y")) for k in keys]
        with mock.patch("os.unlink", side_effect=OSError(errno.EIO, "Input/output error")):
            self.cp.record_receipts(records)
        self.receipts.extend(records)
        self.undo = None

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.cp.close()
            self.outcomes.extend(self.buffered)
        else:
            self.cp._abandon()  # SIGKILL
        self.buffered.clear()
        self.undo = None
        self.open()
        assert len(self.cp.warnings) == self.torn  # torn segments stay on disk and are reported each time

    @precondition(lambda self: self.undo is not None)
    @rule(fraction=st.floats(0, 0.999))
    def crash_tearing_newest_segment(self, fraction: float) -> None:
        name, forget = self.undo
        path = self.root / name
        data = path.read_bytes()
        self.cp._abandon()
        path.write_bytes(data[: int(len(data) * fraction)])
        forget()
        self.buffered.clear()
        self.undo = None
        self.torn += 1
        self.open()
        assert len(self.cp.warnings) == self.torn
        assert f"skipped {name}" in self.cp.warnings[-1]

    @staticmethod
    def forget(records: list[Any], written: list[Any]) -> None:
        for record in written:
            for i in range(len(records) - 1, -1, -1):
                if records[i] == record:
                    del records[i]
                    break

    # -- the model --

    def expected_state(self) -> list[tuple[Any, ...]]:
        latest: dict[str, Receipt] = {}
        for receipt in self.receipts:
            latest[receipt.row_key] = receipt
        outcome_of: dict[str, Outcome] = {}
        for outcome in [*self.outcomes, *self.buffered]:
            outcome_of[outcome.run_id] = outcome
        result: list[tuple[Any, ...]] = []
        for row_key, receipt in latest.items():
            found = outcome_of.get(receipt.run_id)
            if found is None:
                result.append((row_key, receipt.run_id, receipt.group_id, "submitted", None, None))
            else:
                result.append(
                    (row_key, receipt.run_id, receipt.group_id, found.status, found.output, found.error)
                )
        return sorted(result)

    def expected_in_doubt(self) -> dict[str, set[str]]:
        latest: dict[str, tuple[str, str | None]] = {}
        for batch, group, row_key in self.intents:
            latest[row_key] = (batch, group)
        settled = {(r.batch_id, r.row_key) for r in self.receipts}
        doubt: dict[str, set[str]] = {}
        for row_key, (batch, _) in latest.items():
            if (batch, row_key) not in settled and batch not in self.resolved:
                doubt.setdefault(batch, set()).add(row_key)
        return doubt

    @invariant()
    def matches_the_model(self) -> None:
        state = self.cp.state()
        assert (
            rows(state, "row_key", "run_id", "group_id", "status", "output", "error") == self.expected_state()
        )
        assert {i.batch_id: set(i.row_keys) for i in self.cp.in_doubt()} == self.expected_in_doubt()
        assert self.cp.groups == self.groups
        counts = self.cp.counts()
        assert counts.runs == len({r.run_id for r in self.receipts})
        assert counts.in_doubt == sum(len(v) for v in self.expected_in_doubt().values())
        assert self.cp.buffered == len(self.buffered)


def test_random_histories_with_crashes_match_the_model() -> None:
    # Crashes are simulated in-process, so fsync adds nothing here but time (it is tested above).
    with mock.patch("os.fsync"):
        run_state_machine_as_test(
            CheckpointMachine,
            settings=settings(
                max_examples=40,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


# -- performance (printed, not asserted) ---------------------------------------------------------------------


def write_job(root: Path, n_rows: int, batch: int = 1000) -> None:
    """Write a job as the engine would (per batch: an intent, receipts, outcomes flushed), reopen, read."""

    # Row keys and run ids as random as real ones (hashes), so that compression does not flatter the sizes.
    def digits(seed: int, width: int) -> pl.Expr:
        return pl.col("i").hash(seed).cast(pl.String).str.zfill(20).str.slice(20 - width)

    row_key = pl.concat_str(digits(1, 16), digits(2, 16))
    run_id = pl.concat_str(pl.lit("trun_"), digits(3, 16), digits(4, 16))
    output = pl.format('{{"ceo": "Person {}", "employees": {}}}', digits(5, 8), digits(6, 5))
    basis = pl.format(
        '[{{"field": "ceo", "citations": [{{"url": "https://example.com/{}"}}]}}]', digits(7, 12)
    )
    rows_written = 0
    real_write = Checkpoint._write_segment

    def counting_write(self: Checkpoint, segment: Any, frame: pl.DataFrame, *, replaces: list[int]) -> None:
        nonlocal rows_written
        rows_written += frame.height
        real_write(self, segment, frame, replaces=replaces)

    start = time.perf_counter()
    with (
        mock.patch.object(Checkpoint, "_write_segment", counting_write),
        Checkpoint.open(root, FP, flush_rows=batch, flush_seconds=float("inf")) as cp,
    ):
        group = "tgrp_0123456789abcdef0123456789abcdef"
        cp.record_group(group)
        for b in range(n_rows // batch):
            frame = pl.DataFrame({"i": range(b * batch, (b + 1) * batch)}).with_columns(row_key=row_key)
            batch_id = f"batch-{b:06d}"
            cp.record_intents(batch_id, group, frame["row_key"])
            cp.record_receipts(
                frame.select(
                    "row_key",
                    run_id=run_id,
                    group_id=pl.lit(group),
                    batch_id=pl.lit(batch_id),
                    created_at=pl.lit(T0),
                )
            )
            cp.add_outcomes(
                frame.select(
                    "row_key",
                    run_id=run_id,
                    status=pl.when(pl.col("i") % 50 == 0)
                    .then(pl.lit("failed"))
                    .otherwise(pl.lit("completed")),
                    output=output,
                    basis=basis,
                    finished_at=pl.lit(T0),
                )
            )
    write = time.perf_counter() - start
    start = time.perf_counter()
    cp = Checkpoint.open(root, FP)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    counts = cp.counts()
    light = time.perf_counter() - start
    start = time.perf_counter()
    full = cp.state()
    heavy = time.perf_counter() - start
    cp.close()
    assert counts.rows == n_rows == full.height and counts.runs == n_rows
    assert counts.failed == n_rows // 50
    size = sum(p.stat().st_size for p in root.iterdir())
    print(
        f"\n{n_rows:>9,} rows: write {write:.2f} s ({write / n_rows * 1e6:.1f} µs/row), open {opened:.2f} s, "
        f"counts {light:.2f} s, state() with outputs {heavy:.2f} s, {size / 1e6:.1f} MB in "
        f"{len(segments(root))} segments ({size / n_rows:.0f} B/row); compaction wrote each row "
        f"{rows_written / (3 * n_rows + 1):.1f} times"
    )


def test_perf_10k(root: Path) -> None:
    write_job(root, 10_000)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ENRICH_PERF"), reason="set ENRICH_PERF=1 to write a 1,000,000-row job"
)
def test_perf_1m(root: Path) -> None:
    write_job(root, 1_000_000)
