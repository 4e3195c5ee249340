"""Typed values read off the Task API's JSON (frozen, slotted dataclasses).

Every `from_json` accepts the current wire shape (../shared/task-api.md) and the older one of the product
page (`result` instead of a separate output, an `errors` list with `code`/`message`/`details`), and tolerates
unknown fields and unknown status values: a newer service must not crash an overnight job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "ACTIVE_STATUSES",
    "RUN_STATUSES",
    "AddRunsResponse",
    "Citation",
    "ErrorEvent",
    "ErrorObject",
    "FieldBasis",
    "GroupStatus",
    "GroupStatusEvent",
    "RunStateEvent",
    "RunWarning",
    "StreamEvent",
    "TaskGroup",
    "TaskOutput",
    "TaskRun",
    "TaskRunResult",
    "UnknownEvent",
]


class ExoticFloat(float):
    """A float the wire spelled in a way JSON has no spelling for: `NaN`, `Infinity`, `-Infinity` (which
    Python's json accepts), or a number too large for a double (read as infinity). Kept apart so that
    an answer is written back exactly as json would write it (`_engine.job.dumps`), never as null."""

    __slots__ = ()


def _float(text: str) -> float:
    value = float(text)
    return ExoticFloat(value) if value in (_INF, -_INF) else value


_INF = float("inf")
_DECODER = json.JSONDecoder(parse_constant=ExoticFloat, parse_float=_float)


# Nineteen digits in a row: an integer orjson may read as a float (beyond 64 bits: from -2**63 - 1, which
# has 19 digits), or text that merely looks like one (read by json then: slower, never wrong). Found by
# mapping every digit to "0" and everything else to " " (bytes.translate: ~1 us for an answer, where a
# regex took 100).
_DIGIT_MAP = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_DIGITS = b"0" * 19


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`, the same value, with `ExoticFloat` for what JSON cannot spell.

    orjson (3x faster on an answer with its basis) where it reads the same value as json; json where
    it would not: integers beyond 64 bits (orjson makes them floats), and what orjson refuses (NaN,
    infinities, 1e400, lone surrogates), read with `ExoticFloat` (the answers' floats are few).
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_DIGITS not in data.translate(_DIGIT_MAP):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return _DECODER.decode(text if isinstance(text, str) else text.decode())


#: Statuses in which a run is still doing something (`is_active` is true).
ACTIVE_STATUSES = frozenset({"queued", "running", "cancelling"})
#: Every status the API documents (../shared/task-api.md section 4). `action_required` is neither active
#: nor terminal: the run waits for an action on the service's side and may go on after it.
RUN_STATUSES = frozenset({*ACTIVE_STATUSES, "action_required", "completed", "failed", "cancelled"})


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class ErrorObject:
    """Why a run or request failed: `{ref_id, message, detail}` (legacy: `{code, message, details}`)."""

    message: str
    ref_id: str | None = None
    detail: Any = None
    code: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ErrorObject:
        if isinstance(data, str):
            return cls(message=data)
        d = _dict(data)
        return cls(
            message=str(d.get("message") or d.get("msg") or "unknown error"),
            ref_id=d.get("ref_id"),
            detail=d.get("detail", d.get("details")),
            code=d.get("code"),
        )


@dataclass(frozen=True, slots=True)
class RunWarning:
    """A warning attached to a run (`spec_validation_warning`, `input_validation_warning`, ...)."""

    type: str
    message: str
    detail: Any = None

    @classmethod
    def from_json(cls, data: Any) -> RunWarning:
        d = _dict(data)
        return cls(
            type=str(d.get("type", "warning")), message=str(d.get("message", "")), detail=d.get("detail")
        )


@dataclass(frozen=True, slots=True)
class Citation:
    url: str
    title: str | None = None
    excerpts: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> Citation:
        d = _dict(data)
        return cls(url=str(d.get("url", "")), title=d.get("title"), excerpts=tuple(d.get("excerpts") or ()))


@dataclass(frozen=True, slots=True)
class FieldBasis:
    """The research behind one output field: reasoning, citations and (on some processors) confidence."""

    field: str
    reasoning: str = ""
    citations: tuple[Citation, ...] = ()
    confidence: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> FieldBasis:
        d = _dict(data)
        return cls(
            field=str(d.get("field", "")),
            reasoning=str(d.get("reasoning") or ""),
            citations=tuple(Citation.from_json(c) for c in d.get("citations") or ()),
            confidence=d.get("confidence"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "reasoning": self.reasoning,
            "citations": [
                {"url": c.url, "title": c.title, "excerpts": list(c.excerpts)} for c in self.citations
            ],
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class TaskRun:
    """One run: its id, status and, when it failed, its error."""

    run_id: str
    status: str
    is_active: bool
    processor: str | None = None
    metadata: dict[str, Any] | None = None
    group_id: str | None = None
    created_at: str | None = None
    modified_at: str | None = None
    interaction_id: str | None = None
    error: ErrorObject | None = None
    warnings: tuple[RunWarning, ...] = ()

    @property
    def is_terminal(self) -> bool:
        """True once the run has stopped for good: completed, failed, cancelled, or a status this version
        does not know that the service says is inactive. `action_required` is not: it is inactive, but
        the run may go on once someone acts on it."""
        return not self.is_active and self.status != "action_required"

    @classmethod
    def from_json(cls, data: Any) -> TaskRun:
        d = _dict(data)
        status = str(d.get("status", "unknown"))
        is_active = d.get("is_active")
        if status in RUN_STATUSES or not isinstance(is_active, bool):
            # A documented status decides (is_active is true exactly for these): a run "cancelling" is
            # waited for like a running one even if a service called it inactive. An unknown one: its flag.
            is_active = status in ACTIVE_STATUSES
        error = d.get("error")
        if error is None and d.get("errors"):  # the product page's older shape
            errors = d["errors"]
            error = errors[0] if isinstance(errors, list) else errors
        return cls(
            run_id=str(d.get("run_id", "")),
            status=status,
            is_active=is_active,
            processor=d.get("processor"),
            metadata=d.get("metadata") if isinstance(d.get("metadata"), dict) else None,
            group_id=d.get("taskgroup_id", d.get("task_group_id")),
            created_at=d.get("created_at"),
            modified_at=d.get("modified_at"),
            interaction_id=d.get("interaction_id"),
            error=ErrorObject.from_json(error) if error else None,
            warnings=tuple(RunWarning.from_json(w) for w in d.get("warnings") or ()),
        )


@dataclass(frozen=True, slots=True)
class TaskOutput:
    """A run's answer: `type` is "json" (content is a dict) or "text" (content is a str).

    `basis_json` is the basis as the API sent it (a list of objects); `basis` parses it into
    `FieldBasis` objects on each access. A bulk job stores the basis without ever parsing it: at a
    million runs, building the objects was a fifth of the client's CPU.
    """

    type: str
    content: Any
    basis_json: tuple[Any, ...] = ()

    @property
    def basis(self) -> tuple[FieldBasis, ...]:
        return tuple(FieldBasis.from_json(b) for b in self.basis_json)

    @classmethod
    def from_json(cls, data: Any) -> TaskOutput:
        d = _dict(data)
        content = d.get("content")
        kind = d.get("type") or ("json" if isinstance(content, dict) else "text")
        if kind == "json" and isinstance(content, str):
            # Some documented examples carry the object JSON-encoded; the SDK accepts both.
            try:
                decoded = loads(content)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                content = decoded
        return cls(
            type=str(kind),
            content=content,
            basis_json=tuple(d.get("basis") or ()) if isinstance(d.get("basis"), list) else (),
        )


@dataclass(frozen=True, slots=True)
class TaskRunResult:
    """The result of a completed run: the run and its output."""

    run: TaskRun
    output: TaskOutput

    @classmethod
    def from_json(cls, data: Any) -> TaskRunResult:
        d = _dict(data)
        if "output" in d and isinstance(d.get("run"), dict):
            return cls(run=TaskRun.from_json(d["run"]), output=TaskOutput.from_json(d["output"]))
        # The product page's older shape: a run object with its answer under `result`.
        legacy = d.get("result")
        kind = "json" if isinstance(legacy, dict) else "text"
        return cls(run=TaskRun.from_json(d), output=TaskOutput(type=kind, content=legacy))


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A task group's counters: runs by status, and whether any is still active."""

    num_task_runs: int = 0
    task_run_status_counts: dict[str, int] = field(default_factory=dict)
    is_active: bool = False
    status_message: str | None = None
    modified_at: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> GroupStatus:
        d = _dict(data)
        return cls(
            num_task_runs=int(d.get("num_task_runs") or 0),
            task_run_status_counts={
                str(k): int(v) for k, v in _dict(d.get("task_run_status_counts")).items()
            },
            is_active=bool(d.get("is_active", False)),
            status_message=d.get("status_message"),
            modified_at=d.get("modified_at"),
        )


@dataclass(frozen=True, slots=True)
class TaskGroup:
    group_id: str
    status: GroupStatus
    metadata: dict[str, Any] | None = None
    created_at: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> TaskGroup:
        d = _dict(data)
        return cls(
            group_id=str(d.get("taskgroup_id", d.get("task_group_id", ""))),
            status=GroupStatus.from_json(d.get("status")),
            metadata=d.get("metadata") if isinstance(d.get("metadata"), dict) else None,
            created_at=d.get("created_at"),
        )


@dataclass(frozen=True, slots=True)
class AddRunsResponse:
    """The answer to an add-runs call: the new run ids, in the order of the inputs sent."""

    run_ids: tuple[str, ...]
    status: GroupStatus
    run_cursor: str | None = None
    event_cursor: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> AddRunsResponse:
        d = _dict(data)
        return cls(
            run_ids=tuple(str(r) for r in d.get("run_ids") or ()),
            status=GroupStatus.from_json(d.get("status")),
            run_cursor=d.get("run_cursor"),
            event_cursor=d.get("event_cursor"),
        )


@dataclass(frozen=True, slots=True)
class RunStateEvent:
    """`task_run.state`: a run's state, with its input and output when they were asked for and exist."""

    event_id: str | None
    run: TaskRun
    input: dict[str, Any] | None = None
    output: TaskOutput | None = None


@dataclass(frozen=True, slots=True)
class GroupStatusEvent:
    """`task_group_status`: the group's counters changed."""

    event_id: str | None
    status: GroupStatus


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """`error`: the stream reports an error."""

    error: ErrorObject
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event of a type this version does not know; kept, not fatal."""

    type: str
    data: dict[str, Any]
    event_id: str | None = None


StreamEvent = RunStateEvent | GroupStatusEvent | ErrorEvent | UnknownEvent


def parse_event(data: dict[str, Any]) -> StreamEvent:
    """Turn one decoded SSE `data:` object into a typed event."""
    kind = str(data.get("type", ""))
    event_id = data.get("event_id")
    event_id = str(event_id) if event_id is not None else None
    if kind == "task_run.state":
        inp = data.get("input")
        out = data.get("output")
        return RunStateEvent(
            event_id=event_id,
            run=TaskRun.from_json(data.get("run")),
            input=inp if isinstance(inp, dict) else None,
            output=TaskOutput.from_json(out) if isinstance(out, dict) else None,
        )
    if kind == "task_group_status":
        return GroupStatusEvent(event_id=event_id, status=GroupStatus.from_json(data.get("status")))
    if kind == "error":
        return ErrorEvent(error=ErrorObject.from_json(data.get("error")), event_id=event_id)
    return UnknownEvent(type=kind, data=data, event_id=event_id)
