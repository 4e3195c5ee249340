"""The emulator as an ASGI application, `EmulatorApp`, and `create_app()` that builds one.

A request goes through `EmulatorApp.__call__`: the route table (wire.py), an injected fault if one is
drawn, the API key, the per-key request budget (quota.py), then the route's handler (`_h_create_run`,
`_h_add_runs`, ...). A handler that creates runs validates the body (validate.py), admits the runs against
the run budget and the credit (`_admit`), and creates them in the state (state.py), at once or as a late
commit (`_commit`). The event endpoints answer SSE streams that wait on asyncio timers and futures
(`_wait`), never on polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from enrich._emulator.config import FAULT_KINDS, EmulatorConfig, _draw_seed, _id_source
from enrich._emulator.quota import _Bucket, _budget, _Window
from enrich._emulator.state import (
    _ALL_STATUSES,
    _COMPLETED,
    _STATUSES,
    EmulatorState,
    _Group,
    _Prepared,
    _Run,
    _Spec,
)
from enrich._emulator.synth import PREMIUM_TIERS
from enrich._emulator.validate import (
    _MAX_INPUTS_PER_ADD,
    _MAX_SPEC_INPUT_CHARS,
    _RUN_INPUT_FIELDS,
    _beta_problems,
    _check_advanced,
    _check_data_sources_use,
    _check_extra,
    _check_mcp_servers,
    _check_metadata,
    _check_object,
    _check_source_policy,
    _check_str,
    _check_webhook,
    _Errors,
    _input_warnings,
    _Loc,
    _parse_betas,
)
from enrich._emulator.wire import (
    _HTML_5XX,
    _MSG_408,
    _MSG_422,
    _MSG_FORBIDDEN,
    _MSG_GROUP_404,
    _MSG_NO_RETRY,
    _MSG_PAYMENT,
    _MSG_RATE,
    _MSG_RESULT_404,
    _MSG_RUN_404,
    _MSG_UNAUTHORIZED,
    _ROUTES,
    STATS_PATH,
    _canonical,
    _ClientGone,
    _compact,
    _ConnectionDropped,
    _HTTPError,
    _json_bytes,
    _Request,
    _Response,
    _Route,
    _sse,
    _Stream,
)
from enrich._processors import PROCESSORS

__all__ = ["EmulatorApp", "create_app"]

# How long the service waits and streams (task-api.md §3 and §6).
_MAX_RESULT_TIMEOUT = 3_600  # seconds; docs use 3600, the default is 600
_DEFAULT_RESULT_TIMEOUT = 600
_MAX_GROUP_EVENTS_SECONDS = 3_600.0
_RUN_EVENTS_SECONDS = 570.0


class EmulatorApp:
    """The emulator as an ASGI 3 application; `create_app()` builds one.

    `state` is the `EmulatorState` (runs, groups, credit); `stats()` returns the test counters. The
    app is not bound to an event loop: the same instance can serve several `asyncio.run()` calls
    through `httpx.ASGITransport`, one after another.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.state = EmulatorState(config)
        self._faults_rng = random.Random(f"{_draw_seed(config)}:faults")
        self._late_rng = random.Random(f"{_draw_seed(config)}:late")
        self._refs = _id_source(config, "refs")
        self._requests: Counter[str] = Counter()
        self._responses: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._rate_limited = 0
        self._first_request: float | None = None
        self._rate_limited_at: list[float] = []  # seconds after the first request, the first 100,000
        self._request_windows: dict[str, _Window | _Bucket] = {}
        self._run_windows: dict[str, _Window | _Bucket] = {}
        self._per_key: dict[str, dict[str, Any]] = {}  # by a hash of the key: what each key spent
        self._waiters: set[asyncio.Future[str]] = set()
        self._closing = False
        self._late_pending: set[asyncio.Task[_Response]] = set()
        self._answering: asyncio.Task[None] | None = None
        self._late_commits = 0
        self._streams_closed_early = 0

    def _answer_soon(self) -> None:
        """Make the answers of the runs just created while they run (`EmulatorState.prepare_answers`), a
        few at a time between requests, so that no request waits on them."""
        if self._answering is None or self._answering.done():
            self._answering = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        while self.state.prepare_answers(16):  # noqa: ASYNC110 (it waits for nothing: it lets requests in)
            await asyncio.sleep(0)

    def __repr__(self) -> str:
        s = self.state
        return f"<EmulatorApp runs={len(s.runs)} groups={len(s.groups)} active={s.stats()['active_runs']}>"

    # -- inspection

    def stats(self) -> dict[str, Any]:
        """Counters for tests: requests, 429s, faults, late commits, early stream closes, runs, credit.

        Also duplicates and runs by status (`EmulatorState.stats`), and `per_key`: for each API key
        (named by the first 12 hex digits of its SHA-256), its requests, 429s, runs created, when it
        created its first and last runs, and each call that created runs (the first 100,000), as
        (time, runs), all on the emulator's clock in seconds: how well each key's quota was used.
        """
        out = {
            "requests": dict(sorted(self._requests.items())),
            "requests_total": sum(self._requests.values()),
            "responses": {str(k): v for k, v in sorted(self._responses.items())},
            "rate_limited": self._rate_limited,
            "rate_limited_at": list(self._rate_limited_at),
            "faults": {kind: self._faults[kind] for kind in sorted(FAULT_KINDS)},
            "late_commits": self._late_commits,
            "late_commits_pending": len(self._late_pending),
            "streams_closed_early": self._streams_closed_early,
            "per_key": {k: {**v, "creates": list(v["creates"])} for k, v in sorted(self._per_key.items())},
        }
        out.update(self.state.stats())
        return out

    def close(self) -> None:
        """Wake every waiting request so streams end and blocking calls answer; call on the app's loop."""
        self._closing = True
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result("closing")
        if self._answering is not None:
            self._answering.cancel()

    # -- ASGI entry point

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._closing = False
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if path == STATS_PATH and method == "GET":
            await self._send(send, _Response(200, _compact(self.stats()).encode()), count=False)
            return
        route, params, allowed = self._match(method, path)
        self._requests[route.name if route else "unmatched"] += 1
        if self._first_request is None:
            self._first_request = self.state.now()
        fault = self._draw_fault(route)
        if fault == "html_5xx":
            status = self._faults_rng.choice((502, 503))
            await self._send(send, self._html_5xx(status))
            return
        if fault == "no_retry":
            no_retry = [(b"x-should-retry", b"false")]
            await self._send(send, self._error(503, _MSG_NO_RETRY, None, no_retry).response)
            return
        if fault == "drop":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            raise _ConnectionDropped
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            # A header sent on several lines is one comma-separated list (RFC 9110 §5.3).
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        query = {
            k: v[-1]
            for k, v in parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"), True).items()
        }
        req = _Request(method, path, params, query, headers, body, receive)
        try:
            try:
                response = await self._dispatch(route, allowed, req)
            except _HTTPError as exc:
                response = exc.response
            except _ClientGone:
                return
            if fault == "lost_create":
                if isinstance(response, _Stream):
                    await response.chunks.aclose()
                response = self._html_5xx(502)
            elif fault == "slow" and await self._wait(req, self.config.slow_seconds) == "disconnect":
                if isinstance(response, _Stream):
                    await response.chunks.aclose()
                return
            await self._send(send, response)
        finally:
            req.close()

    def _match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str], list[str]]:
        allowed = []
        for route in _ROUTES:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, m.groupdict(), []
            allowed.append(route.method)
        return None, {}, allowed

    def _draw_fault(self, route: _Route | None) -> str | None:
        cfg = self.config
        if cfg.fault_rate <= 0 or self._faults_rng.random() >= cfg.fault_rate:
            return None
        kinds = sorted(k for k in cfg.faults if k != "lost_create" or (route is not None and route.creates))
        if not kinds:
            return None
        kind = self._faults_rng.choice(kinds)
        self._faults[kind] += 1
        return kind

    async def _send(self, send: Any, response: _Response | _Stream, *, count: bool = True) -> None:
        if count:
            self._responses[response.status] += 1
        if isinstance(response, _Stream):
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            async with contextlib.aclosing(response.chunks) as chunks:
                if self.config.stream_close_seconds is None:
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                else:
                    await self._send_until(send, chunks, self.config.stream_close_seconds)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def _send_until(self, send: Any, chunks: AsyncGenerator[bytes, None], seconds: float) -> None:
        """Send a stream's chunks until it ends or `seconds` pass, whichever comes first.

        The caller then ends the body cleanly, as a proxy's stream timeout does.
        """
        loop = asyncio.get_running_loop()
        close_at = loop.time() + seconds
        while True:
            if loop.time() >= close_at:  # a stream that never waits (a long snapshot) ends here
                self._streams_closed_early += 1
                return
            try:
                # Only the generator's own wait is timed, never a send: a chunk goes out whole or not at all.
                async with asyncio.timeout_at(close_at):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self._streams_closed_early += 1
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _dispatch(self, route: _Route | None, allowed: list[str], req: _Request) -> _Response | _Stream:
        if route is None:
            if allowed:
                raise _HTTPError(
                    _Response(
                        405, b'{"detail":"Method Not Allowed"}', [(b"allow", ", ".join(allowed).encode())]
                    )
                )
            raise _HTTPError(_Response(404, b'{"detail":"Not Found"}'))
        cfg = self.config
        if not req.key or (cfg.api_key is not None and req.key != cfg.api_key):
            raise self._error(401, _MSG_UNAUTHORIZED)
        self.state.advance()
        tally = self._tally(req.key)
        tally["requests"] += 1
        window = None
        if cfg.rate_limit is not None and (cfg.count_gets or req.method != "GET"):
            window = self._request_windows.get(req.key)
            if window is None:
                window = self._request_windows[req.key] = _budget(
                    cfg.rate_limit, cfg.rate_window, cfg.rate_burst
                )
            now = self.state.now()
            wait = window.wait_time(now, 1)
            if wait:
                tally["rate_limited"] += 1
                raise self._rate_limit_error(wait)
            window.add(now, 1)
        handler: Callable[[_Request, _Route], Awaitable[_Response | _Stream]] = getattr(
            self, "_h_" + route.handler
        )
        try:
            return await handler(req, route)
        except _HTTPError as exc:
            if exc.rate_limited and window is not None:
                window.undo_last()
            raise

    # -- responses

    def _json(self, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
        return _Response(status, _compact(obj).encode(), headers or [])

    def _retry_headers(self) -> list[tuple[bytes, bytes]]:
        """`x-should-retry: true` when `should_retry_header` asks for it on 429s and injected 5xx."""
        return [(b"x-should-retry", b"true")] if self.config.should_retry_header else []

    def _html_5xx(self, status: int) -> _Response:
        """A proxy's HTML error page (an injected 5xx)."""
        return _Response(status, _HTML_5XX[status], self._retry_headers(), content_type=b"text/html")

    def _error(self, status: int, message: str, detail: Any = None, headers: Any = None) -> _HTTPError:
        ref = str(uuid.UUID(int=self._refs.getrandbits(128), version=4))
        body = {"type": "error", "error": {"ref_id": ref, "message": message, "detail": detail}}
        return _HTTPError(self._json(status, body, headers))

    def _tally(self, key: str) -> dict[str, Any]:
        """What the key spent (`stats()["per_key"]`, named by a hash: a key is never shown)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:12]
        tally = self._per_key.get(name)
        if tally is None:
            tally = self._per_key[name] = {
                "requests": 0,
                "rate_limited": 0,
                "runs": 0,
                "first_runs_at": None,
                "last_runs_at": None,
                "creates": [],
            }
        return tally

    def _rate_limit_error(self, wait: float) -> _HTTPError:
        self._rate_limited += 1
        if len(self._rate_limited_at) < 100_000:
            self._rate_limited_at.append(self.state.now() - (self._first_request or self.state.now()))
        headers = [(b"retry-after", f"{wait:.3f}".encode())] if self.config.retry_after_header else []
        exc = self._error(429, _MSG_RATE, None, headers + self._retry_headers())
        exc.rate_limited = True
        return exc

    def _invalid(self, route: _Route, errors: list[dict[str, Any]]) -> _HTTPError:
        if route.groups:
            return _HTTPError(self._json(422, {"detail": errors}))
        return self._error(422, _MSG_422, {"errors": errors})

    def _refused(self, refusals: list[dict[str, Any]]) -> _HTTPError:
        """422 as an ErrorResponse whose message says what is wrong (a missing beta, an unknown
        interaction): these are refused by the service's own checks, not by request validation, so
        the group endpoints answer them in the same shape as the run endpoints."""
        message = refusals[0]["msg"]
        if len(refusals) > 1:
            message += f" (and {len(refusals) - 1} more; see detail)"
        return self._error(422, message, {"errors": refusals})

    @staticmethod
    def _betas(req: _Request) -> frozenset[str]:
        return _parse_betas(req.headers.get("parallel-beta", ""))

    def _parse_json(self, req: _Request, route: _Route) -> Any:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if not req.body:
            raise self._invalid(route, [{"loc": ["body"], "msg": "Field required", "type": "missing"}])
        if ctype != "application/json":
            raise self._invalid(
                route,
                [
                    {
                        "loc": ["body"],
                        "msg": "Content-Type must be application/json",
                        "type": "model_attributes_type",
                    }
                ],
            )
        try:
            return json.loads(req.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            pos = getattr(exc, "pos", 0)
            raise self._invalid(
                route, [{"loc": ["body", pos], "msg": "JSON decode error", "type": "json_invalid"}]
            ) from None

    def _query_bool(self, req: _Request, route: _Route, name: str, default: bool) -> bool:
        raw = req.query.get(name)
        if raw is None:
            return default
        if raw in ("true", "false"):
            return raw == "true"
        raise self._invalid(
            route,
            [{"loc": ["query", name], "msg": "Input should be a valid boolean", "type": "bool_parsing"}],
        )

    def _query_cursor(self, req: _Request, route: _Route, group: _Group, prefix: str, limit: int) -> int:
        """The position after `last_event_id`; only cursors this group's stream handed out are valid."""
        raw = req.query.get("last_event_id")
        if raw is None or raw == "":
            return 0
        m = re.fullmatch(prefix + r"(\d{10})-([0-9a-f]{8})", raw)
        if m is None or m.group(2) != _group_tag(group) or int(m.group(1)) > limit:
            raise self._invalid(
                route,
                [{"loc": ["query", "last_event_id"], "msg": "Invalid event cursor", "type": "value_error"}],
            )
        return int(m.group(1))

    def _run(self, req: _Request, message: str = _MSG_RUN_404) -> _Run:
        run = self.state.runs.get(req.params["run_id"])
        if run is None:
            raise self._error(404, message)
        return run

    def _group(self, req: _Request) -> _Group:
        group = self.state.groups.get(req.params["group_id"])
        if group is None:
            raise self._error(404, _MSG_GROUP_404)
        return group

    # -- creating runs

    def _prepare(
        self,
        obj: Any,
        loc: _Loc,
        errs: _Errors,
        refusals: _Errors,
        betas: frozenset[str],
        default_spec: _Spec | None = None,
    ) -> tuple[_Prepared | None, str | None]:
        """Validate one TaskRunInput. Returns (prepared or None, processor name if unknown).

        Shape errors go to `errs`; `refusals` gets what a valid shape still cannot do: a beta field
        without its `parallel-beta` value (`betas`), a `previous_interaction_id` this emulator never
        handed out.
        """
        before = len(errs)
        if not _check_object(obj, loc, errs):
            return None, None
        _check_extra(obj, _RUN_INPUT_FIELDS, loc, errs)
        if "input" not in obj:
            errs.add((*loc, "input"), "Field required", "missing")
        elif not isinstance(obj["input"], str | dict):
            errs.add((*loc, "input"), "Input should be a valid string or object", "union_type")
        elif obj["input"] == "":
            errs.add((*loc, "input"), "The input must not be empty", "string_too_short")
        _check_str(obj, "processor", loc, errs, required=True)
        _check_metadata(obj.get("metadata"), (*loc, "metadata"), errs)
        _check_source_policy(obj.get("source_policy"), (*loc, "source_policy"), errs)
        _check_advanced(obj.get("advanced_settings"), (*loc, "advanced_settings"), errs)
        _check_mcp_servers(obj.get("mcp_servers"), (*loc, "mcp_servers"), errs)
        _check_webhook(obj.get("webhook"), (*loc, "webhook"), errs)
        for key in ("previous_interaction_id", "memory_scope_key"):
            _check_str(obj, key, loc, errs)
        events = obj.get("enable_events")
        if events is not None and not isinstance(events, bool):
            errs.add((*loc, "enable_events"), "Input should be a valid boolean", "bool_type")
        task_spec = obj.get("task_spec")
        if task_spec is None and default_spec is not None:
            spec = default_spec  # its errors, if any, were reported once by the caller
        else:
            spec = self.state.spec(task_spec)
            for err in spec.errors:
                errs.append({**err, "loc": [*loc, "task_spec", *err["loc"]]})
        if len(errs) == before:
            _check_data_sources_use(obj, loc, errs)
        if len(errs) > before:
            return None, None
        refusals.extend(_beta_problems(obj, betas, loc))
        previous = obj.get("previous_interaction_id")
        if previous is not None and self.state.interaction(previous) is None:
            refusals.add(
                (*loc, "previous_interaction_id"),
                f"previous_interaction_id {previous!r} is not an interaction id this API handed out",
                "unknown_interaction",
            )
        value = obj["input"]
        input_text = value if isinstance(value, str) else _compact(value)
        if spec.size + len(input_text) > _MAX_SPEC_INPUT_CHARS:
            errs.add(
                loc,
                f"Task spec and input are {spec.size + len(input_text)} characters; at most "
                f"{_MAX_SPEC_INPUT_CHARS} are allowed",
                "too_long",
            )
            return None, None
        processor = PROCESSORS.get(obj["processor"])
        if processor is None:
            return None, obj["processor"]
        body = {k: v for k, v in obj.items() if k not in ("task_spec", "metadata")}
        dedup_src = "\0".join((processor.name, spec.canonical, _canonical(value)))
        return (
            _Prepared(
                body=_compact(body),
                input=value,
                metadata=_compact(obj["metadata"]) if obj.get("metadata") is not None else None,
                spec=spec,
                processor=processor,
                events=events
                if events is not None
                else processor.name.removesuffix("-fast") in PREMIUM_TIERS,
                warnings=_input_warnings(value, spec),
                dedup=hashlib.blake2b(dedup_src.encode(), digest_size=16).digest(),
            ),
            None,
        )

    def _admit(self, req: _Request, items: list[_Prepared]) -> None:
        """Run-rate limit (429), then credit (402), for runs about to be created."""
        cfg = self.config
        window = None
        now = self.state.now()
        if cfg.run_rate_limit is not None:
            window = self._run_windows.get(req.key)
            if window is None:
                window = self._run_windows[req.key] = _budget(
                    cfg.run_rate_limit, cfg.rate_window, cfg.run_burst
                )
            wait = window.wait_time(now, len(items))
            if wait:
                self._tally(req.key)["rate_limited"] += 1
                raise self._rate_limit_error(wait)
        if not self.state.can_afford(items):
            raise self._error(402, _MSG_PAYMENT)
        if window is not None:
            window.add(now, len(items))
        tally = self._tally(req.key)
        tally["runs"] += len(items)
        if tally["first_runs_at"] is None:
            tally["first_runs_at"] = now
        tally["last_runs_at"] = now
        if len(tally["creates"]) < 100_000:
            tally["creates"].append((now, len(items)))

    async def _commit(
        self, req: _Request, items: list[_Prepared], commit: Callable[[bool], _Response]
    ) -> _Response:
        """Create the admitted runs now, or, for a late commit, on a timer of the emulator's own.

        The late commit is a task of the app, not of the request: cancelling the request or closing
        its connection does not stop it. `commit(reserved)` creates the runs and builds the answer.
        """
        cfg = self.config
        if cfg.late_commit_seconds <= 0 or self._late_rng.random() >= cfg.late_commit_rate:
            return commit(False)
        reserved = self.state.reserve(items)
        task = asyncio.get_running_loop().create_task(self._late_commit(reserved, commit))
        self._late_pending.add(task)
        task.add_done_callback(self._late_pending.discard)
        if cfg.late_commit_answer == "after":
            while not task.done():
                reason = await self._wait(req, cfg.late_commit_seconds, until=task)
                if reason == "disconnect":
                    raise _ClientGone
                if reason == "closing":
                    break
            if task.done():
                return task.result()
        return self._html_5xx(504)

    async def _late_commit(self, reserved: int, commit: Callable[[bool], _Response]) -> _Response:
        try:
            await asyncio.sleep(self.config.late_commit_seconds)
        except asyncio.CancelledError:  # the loop ends (an ASGITransport test, a server stop): no runs
            self.state.release(reserved)
            raise
        self._late_commits += 1
        return commit(True)

    # -- handlers: runs

    async def _h_create_run(self, req: _Request, route: _Route) -> _Response:
        obj = self._parse_json(req, route)
        errs, refusals = _Errors(), _Errors()
        prepared, unknown = self._prepare(obj, ("body",), errs, refusals, self._betas(req))
        if errs:
            raise self._invalid(route, errs)
        if refusals:
            raise self._refused(refusals)
        if unknown is not None or prepared is None:
            raise self._error(403, _MSG_FORBIDDEN, {"processor": unknown})
        self._admit(req, [prepared])

        def commit(reserved: bool) -> _Response:
            (run,) = self.state.create_runs([prepared], None, reserved=reserved)
            self._answer_soon()
            return self._json(202, self.state.run_json(run))

        return await self._commit(req, [prepared], commit)

    async def _h_get_run(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.run_json(self._run(req)))

    async def _h_get_input(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.run_input(self._run(req)))

    async def _h_get_result(self, req: _Request, route: _Route) -> _Response:
        run = self._run(req, _MSG_RESULT_404)
        raw = req.query.get("timeout")
        timeout = _DEFAULT_RESULT_TIMEOUT
        if raw is not None:
            if not re.fullmatch(r"\d+", raw) or int(raw) > _MAX_RESULT_TIMEOUT:
                raise self._invalid(
                    route,
                    [
                        {
                            "loc": ["query", "timeout"],
                            "msg": f"timeout must be an integer between 0 and {_MAX_RESULT_TIMEOUT}",
                            "type": "int_parsing",
                        }
                    ],
                )
            timeout = int(raw)
        state = self.state
        deadline = state.now() + timeout
        while run.state < _COMPLETED:
            now = state.now()
            if now >= deadline:
                raise self._error(408, _MSG_408)
            reason = await self._wait(req, min(deadline, run.end) - now + 0.0005)
            if reason != "timeout":
                raise self._error(408, _MSG_408)
            state.advance()
        if run.state != _COMPLETED:  # failed, cancelled or action_required: never an output
            raise self._error(404, _MSG_RESULT_404)
        body = _json_bytes({"run": state.run_json(run), "output": None}, state.output_json(run))
        return _Response(200, body, [])

    async def _h_run_events(self, req: _Request, route: _Route) -> _Stream:
        run = self._run(req)
        return _Stream(self._run_event_stream(req, run))

    def _progress_plan(self, run: _Run) -> list[tuple[float, str, str]]:
        span = run.end - run.start
        subject = _describe_input(json.loads(run.body)["input"])
        if not run.events:
            plan = [(0.0, "task_run.progress_msg.exec_status", f"Working on {subject}")]
        else:
            plan = [
                (0.0, "task_run.progress_msg.plan", f"Planning research for {subject}"),
                (0.15, "task_run.progress_msg.search", f"Searching the web for {subject}"),
                (0.4, "task_run.progress_msg.extract", "Reading and extracting from sources"),
                (0.65, "task_run.progress_msg.search", "Cross-checking findings"),
                (0.85, "task_run.progress_msg.result", "Compiling the output"),
            ]
        return [
            (run.start + f * span, kind, text) for f, kind, text in plan if run.start + f * span < run.end
        ]

    def _progress_stats(self, run: _Run, now: float) -> bytes:
        span = max(run.end - run.start, 1e-9)
        meter = 100.0 if run.state >= _COMPLETED else max(0.0, min(99.0, (now - run.start) / span * 100))
        read = int(meter / 10)
        host = _describe_input(json.loads(run.body)["input"])
        sample = [f"https://{_slugify(host)}.example.com/source/{i + 1}" for i in range(min(read, 3))]
        return _sse(
            "task_run.progress_stats",
            {
                "type": "task_run.progress_stats",
                "progress_meter": round(meter, 1),
                "source_stats": {
                    "num_sources_considered": read * 3,
                    "num_sources_read": read,
                    "sources_read_sample": sample,
                },
            },
        )

    def _run_state_event(self, run: _Run, *, output: bool) -> bytes:
        state = self.state
        return _sse(
            "task_run.state",
            {
                "type": "task_run.state",
                "event_id": _run_cursor(run.group, run.index + 1) if run.group is not None else None,
                "run": state.run_json(run),
                "input": None,
                "output": None,
            },
            state.output_json(run) if output and run.state == _COMPLETED else None,
        )

    async def _run_event_stream(self, req: _Request, run: _Run) -> AsyncGenerator[bytes, None]:
        state = self.state
        closes_at = state.now() + _RUN_EVENTS_SECONDS
        yield self._run_state_event(run, output=False)
        plan = self._progress_plan(run)
        sent = 0
        while True:
            state.advance()
            now = state.now()
            out = []
            while sent < len(plan) and plan[sent][0] <= now:
                t, kind, text = plan[sent]
                out.append(_sse(kind, {"type": kind, "message": text, "timestamp": state.timestamp(t)}))
                sent += 1
            if out:
                out.append(self._progress_stats(run, now))
                yield b"".join(out)
            if run.state >= _COMPLETED:
                yield self._run_state_event(run, output=True)
                return
            if now >= closes_at:
                return
            wake = min(closes_at, run.end, plan[sent][0] if sent < len(plan) else math.inf)
            if await self._wait(req, wake - now + 0.0005) != "timeout":
                return

    # -- handlers: groups

    async def _h_create_group(self, req: _Request, route: _Route) -> _Response:
        obj = self._parse_json(req, route)
        errs = _Errors()
        if _check_object(obj, ("body",), errs):
            _check_extra(obj, {"metadata"}, ("body",), errs)
            _check_metadata(obj.get("metadata"), ("body", "metadata"), errs)
        if errs:
            raise self._invalid(route, errs)
        group = self.state.create_group(obj.get("metadata"))
        return self._json(200, self.state.group_json(group))

    async def _h_get_group(self, req: _Request, route: _Route) -> _Response:
        return self._json(200, self.state.group_json(self._group(req)))

    async def _h_group_run(self, req: _Request, route: _Route) -> _Response:
        group = self._group(req)
        run = self._run(req)
        if run.group is not group:
            raise self._error(404, _MSG_RUN_404)
        return self._json(200, self.state.run_json(run))

    async def _h_add_runs(self, req: _Request, route: _Route) -> _Response:
        group = self._group(req)
        refresh = self._query_bool(req, route, "refresh_status", True)
        obj = self._parse_json(req, route)
        errs = _Errors()
        if not _check_object(obj, ("body",), errs):
            raise self._invalid(route, errs)
        _check_extra(obj, {"inputs", "default_task_spec"}, ("body",), errs)
        default_spec = None
        if obj.get("default_task_spec") is not None:
            default_spec = self.state.spec(obj["default_task_spec"])
            for err in default_spec.errors:
                errs.append({**err, "loc": ["body", "default_task_spec", *err["loc"]]})
        inputs = obj.get("inputs")
        if "inputs" not in obj:
            errs.add(("body", "inputs"), "Field required", "missing")
        elif not isinstance(inputs, list):
            errs.add(("body", "inputs"), "Input should be a valid list", "list_type")
        elif not inputs:
            errs.add(
                ("body", "inputs"), "List should have at least 1 item after validation, not 0", "too_short"
            )
        elif len(inputs) > _MAX_INPUTS_PER_ADD:
            errs.add(
                ("body", "inputs"),
                f"List should have at most {_MAX_INPUTS_PER_ADD} items after validation, not {len(inputs)}",
                "too_long",
            )
        if errs:
            raise self._invalid(route, errs)
        prepared: list[_Prepared] = []
        unknown: list[str] = []
        refusals = _Errors()
        betas = self._betas(req)
        for i, item in enumerate(inputs):
            p, bad = self._prepare(item, ("body", "inputs", i), errs, refusals, betas, default_spec)
            if p is not None:
                prepared.append(p)
            elif bad is not None:
                unknown.append(bad)
        if errs:
            raise self._invalid(route, errs)
        if refusals:
            raise self._refused(refusals)
        if unknown:
            raise self._error(403, _MSG_FORBIDDEN, {"processors": sorted(set(unknown))})
        self._admit(req, prepared)

        def commit(reserved: bool) -> _Response:
            before_runs = len(group.runs)
            before_events = len(group.events)
            cached = group.cached_status
            runs = self.state.create_runs(prepared, group, reserved=reserved)
            self._answer_soon()
            if refresh or cached is None:
                status = self.state.group_status(group)
            else:
                status = cached
                group.cached_status = cached
            return self._json(
                200,
                {
                    "run_ids": [r.run_id for r in runs],
                    "status": status,
                    "run_cursor": _run_cursor(group, before_runs) if before_runs else None,
                    "event_cursor": _event_cursor(group, before_events) if before_events else None,
                },
            )

        return await self._commit(req, prepared, commit)

    async def _h_group_runs(self, req: _Request, route: _Route) -> _Stream:
        group = self._group(req)
        include_input = self._query_bool(req, route, "include_input", False)
        include_output = self._query_bool(req, route, "include_output", False)
        status = req.query.get("status")
        if status is not None and status not in _ALL_STATUSES:
            raise self._invalid(
                route,
                [
                    {
                        "loc": ["query", "status"],
                        "msg": f"Input should be one of {_ALL_STATUSES}",
                        "type": "enum",
                    }
                ],
            )
        start = self._query_cursor(req, route, group, "r", len(group.runs))
        end = len(group.runs)
        wanted = -1 if status is None else _STATUSES.index(status)
        return _Stream(self._group_runs_stream(group, start, end, wanted, include_input, include_output))

    async def _group_runs_stream(
        self, group: _Group, start: int, end: int, wanted: int, include_input: bool, include_output: bool
    ) -> AsyncGenerator[bytes, None]:
        state = self.state
        buf: list[bytes] = []
        for i in range(start, end):
            run = group.runs[i]
            if wanted != -1 and run.state != wanted:
                continue
            event = {
                "type": "task_run.state",
                "event_id": _run_cursor(group, i + 1),
                "run": state.run_json(run),
                "input": state.run_input(run) if include_input else None,
                "output": None,
            }
            output = state.output_json(run) if include_output and run.state == _COMPLETED else None
            buf.append(_sse("task_run.state", event, output))
            if len(buf) >= 256:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)

    async def _h_group_events(self, req: _Request, route: _Route) -> _Stream:
        group = self._group(req)
        start = self._query_cursor(req, route, group, "e", len(group.events))
        timeout = _MAX_GROUP_EVENTS_SECONDS
        raw = req.query.get("timeout")
        if raw is not None:
            try:
                timeout = float(raw)
                if not 0 < timeout <= _MAX_GROUP_EVENTS_SECONDS:
                    raise ValueError
            except ValueError:
                raise self._invalid(
                    route,
                    [
                        {
                            "loc": ["query", "timeout"],
                            "msg": f"timeout must be a number in (0, {_MAX_GROUP_EVENTS_SECONDS:g}]",
                            "type": "float_parsing",
                        }
                    ],
                ) from None
        return _Stream(self._group_event_stream(req, group, start, timeout))

    async def _group_event_stream(
        self, req: _Request, group: _Group, start: int, timeout: float
    ) -> AsyncGenerator[bytes, None]:
        state = self.state
        keepalive = self.config.keepalive_seconds
        deadline = state.now() + timeout
        next_keepalive = state.now() + keepalive
        index = start
        while True:
            state.advance()
            log = group.events
            if index < len(log):
                end = len(log)
                buf = []
                for i in range(index, end):
                    entry = log[i]
                    eid = _event_cursor(group, i + 1)
                    if isinstance(entry, dict):
                        data = {"type": "task_group_status", "event_id": eid, "status": entry}
                        buf.append(_sse("task_group_status", data))
                    else:
                        data = {
                            "type": "task_run.state",
                            "event_id": eid,
                            "run": state.run_json(entry),
                            "input": None,
                            "output": None,
                        }
                        buf.append(_sse("task_run.state", data))
                    if len(buf) >= 256:
                        yield b"".join(buf)
                        buf = []
                if buf:
                    yield b"".join(buf)
                index = end
                next_keepalive = state.now() + keepalive
                continue
            if not group.active:
                return
            now = state.now()
            if now >= deadline:
                return
            due = state.next_transition()
            wake = min(deadline, next_keepalive, due if due is not None else math.inf)
            reason = await self._wait(req, wake - now + 0.0005, group)
            if reason in ("disconnect", "closing"):
                return
            if state.now() >= next_keepalive:
                yield b": keepalive\n\n"
                next_keepalive = state.now() + keepalive

    # -- waiting

    async def _wait(
        self,
        req: _Request,
        delay: float,
        group: _Group | None = None,
        until: asyncio.Future[Any] | None = None,
    ) -> str:
        """Wait `delay` seconds on a timer; end early on a group change, `until` being done, a
        disconnect or close().

        Returns "timeout", "wake", "disconnect" or "closing".
        """
        if self._closing:
            return "closing"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()

        def fire(reason: str) -> None:
            if not fut.done():
                fut.set_result(reason)

        handle = loop.call_later(max(delay, 0.0), fire, "timeout")
        watch = req.disconnect_watch()

        def on_disconnect(_: object) -> None:
            fire("disconnect")

        if watch.done():
            fire("disconnect")
        else:
            watch.add_done_callback(on_disconnect)

        def on_until(_: object) -> None:
            fire("wake")

        if until is not None:
            until.add_done_callback(on_until)
        self._waiters.add(fut)
        if group is not None:
            group.waiters.add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            watch.remove_done_callback(on_disconnect)
            if until is not None:
                until.remove_done_callback(on_until)
            self._waiters.discard(fut)
            if group is not None:
                group.waiters.discard(fut)


# Cursors are opaque on the wire (task-api.md §8). Ours are "<stream><position>-<group tag>": zero-padded
# so they sort in stream order, and tagged so a cursor from another group or stream is refused.


def _group_tag(group: _Group) -> str:
    return group.group_id[5:13]


def _run_cursor(group: _Group, n: int) -> str:
    return f"r{n:010d}-{_group_tag(group)}"


def _event_cursor(group: _Group, n: int) -> str:
    return f"e{n:010d}-{_group_tag(group)}"


def _describe_input(value: Any) -> str:
    if isinstance(value, dict):
        first = next(iter(value.values()), "")
        value = first if isinstance(first, str) else _compact(first)
    text = " ".join(str(value).split())
    return (text[:57] + "...") if len(text) > 60 else (text or "the input")


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "item"


def create_app(config: EmulatorConfig | None = None) -> EmulatorApp:
    """A new emulator ASGI app with its own empty state.

    >>> app = create_app(EmulatorConfig(latency=0.05, seed=1))
    >>> app.stats()["runs_created"]
    0
    """
    return EmulatorApp(config or EmulatorConfig())
