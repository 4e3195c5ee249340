"""The emulator's HTTP plumbing: request and response records, the route table, SSE framing, the
service's error messages and its proxy's HTML 5xx pages, and the JSON encodings (compact, canonical).

Nothing here decides what to answer; `EmulatorApp` (app.py) does.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ["STATS_PATH"]

#: The route of the emulator's counters (`EmulatorApp.stats()`): no key needed, never faulted.
STATS_PATH = "/_emulator/stats"

_MSG_UNAUTHORIZED = "Unauthorized: invalid or missing credentials"
_MSG_FORBIDDEN = "Forbidden: invalid processor in request"
_MSG_PAYMENT = "Payment required: insufficient credit in account"
_MSG_RATE = "Too many requests: quota temporarily exceeded"
_MSG_422 = "Unprocessable content: request validation error"
_MSG_RUN_404 = "Run id not found"
_MSG_RESULT_404 = "Run failed or run id not found"
_MSG_GROUP_404 = "TaskGroup not found"
_MSG_408 = "Request timed out; run still active"
_MSG_NO_RETRY = "Service unavailable: the request was not processed; do not retry it"

_HTML_5XX = {
    502: b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
    b"</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    503: b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center>"
    b"<h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
    b"</html>\r\n",
    504: b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n<center><h1>504 Gateway "
    b"Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _compact(value: Any) -> str:
    # `json.dumps(value, separators=(",", ":"), ensure_ascii=False)` without building an encoder per call.
    return _COMPACT.encode(value)


class _ConnectionDropped(httpx.RemoteProtocolError):
    """Raised inside the app to drop the connection (the `drop` fault).

    Under uvicorn the connection closes after the response head, so the client sees a protocol error;
    through `httpx.ASGITransport` the client sees this exception, which is an httpx.RemoteProtocolError.
    """

    def __init__(self) -> None:
        super().__init__("Server disconnected without sending a complete response (emulated fault).")


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


@dataclass(slots=True)
class _Stream:
    chunks: AsyncGenerator[bytes, None]
    status: int = 200


class _ClientGone(Exception):
    """The client went away while its answer was pending: there is nobody to answer."""


class _HTTPError(Exception):
    def __init__(self, response: _Response, *, rate_limited: bool = False) -> None:
        super().__init__(response.status)
        self.response = response
        self.rate_limited = rate_limited


class _Request:
    __slots__ = ("_watch", "body", "headers", "key", "method", "params", "path", "query", "receive")

    def __init__(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        receive: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body
        self.receive = receive
        self.key = headers.get("x-api-key", "")
        self._watch: asyncio.Task[None] | None = None

    def disconnect_watch(self) -> asyncio.Task[None]:
        """A task that finishes when the client goes away."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_disconnect())
        return self._watch

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: str
    creates: bool = False  # creates runs: eligible for the lost_create fault
    groups: bool = False  # answers validation errors in the FastAPI shape


def _routes() -> list[_Route]:
    run = r"(?P<run_id>[^/]+)"
    grp = r"(?P<group_id>[^/]+)"
    table: list[_Route] = []

    def add(method: str, template: str, regex: str, handler: str, **kw: bool) -> None:
        table.append(_Route(method, re.compile(regex + r"\Z"), f"{method} {template}", handler, **kw))

    add("POST", "/v1/tasks/runs", r"/v1/tasks/runs", "create_run", creates=True)
    add("GET", "/v1/tasks/runs/{run_id}", rf"/v1/tasks/runs/{run}", "get_run")
    add("GET", "/v1/tasks/runs/{run_id}/result", rf"/v1/tasks/runs/{run}/result", "get_result")
    add("GET", "/v1/tasks/runs/{run_id}/input", rf"/v1/tasks/runs/{run}/input", "get_input")
    for prefix in ("/v1", "/v1beta"):
        add("GET", prefix + "/tasks/runs/{run_id}/events", rf"{prefix}/tasks/runs/{run}/events", "run_events")
        base = prefix + "/tasks/groups"
        add("POST", base, base, "create_group", groups=True)
        add("GET", base + "/{taskgroup_id}", rf"{base}/{grp}", "get_group", groups=True)
        add(
            "POST",
            base + "/{taskgroup_id}/runs",
            rf"{base}/{grp}/runs",
            "add_runs",
            creates=True,
            groups=True,
        )
        add("GET", base + "/{taskgroup_id}/runs", rf"{base}/{grp}/runs", "group_runs", groups=True)
        add("GET", base + "/{taskgroup_id}/events", rf"{base}/{grp}/events", "group_events", groups=True)
        add(
            "GET",
            base + "/{taskgroup_id}/runs/{run_id}",
            rf"{base}/{grp}/runs/{run}",
            "group_run",
            groups=True,
        )
    return table


_ROUTES = _routes()


def _sse(kind: str, data: Mapping[str, Any], output: bytes | None = None) -> bytes:
    # Never an `id:` line: the SDK decoder keeps the last id, and a later blank line would then yield
    # an empty-data event (task-api.md §2.5). The cursor travels in the JSON as `event_id`.
    return b"event: " + kind.encode() + b"\ndata: " + _json_bytes(data, output) + b"\n\n"


def _json_bytes(data: Mapping[str, Any], output: bytes | None = None) -> bytes:
    """`data` as compact JSON; with `output` (JSON already made), that is the value of its last key,
    `"output"` (None in `data`)."""
    try:  # (orjson: a run's answer with its basis in a tenth of json's time, for the same JSON value)
        encoded = orjson.dumps(data)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate: json writes those
        encoded = _compact(data).encode()
    if output is not None:
        assert encoded.endswith(_NO_OUTPUT), "the output goes last"
        encoded = encoded[: -len(_NO_OUTPUT)] + b'"output":' + output + b"}"
    return encoded


_NO_OUTPUT = b'"output":null}'
