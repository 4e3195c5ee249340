"""An async client for Parallel's Task API, built on httpx.

Every call a bulk job needs, with typed answers (`enrich._models`), one exception tree
(`enrich._exceptions`), a shared rate limiter and retries that never pay twice:

- Read-only calls are retried on transport errors, 408, 409, 429 and 5xx with exponential backoff and
  full jitter, honouring the server's `Retry-After` / `retry-after-ms`. The service's `x-should-retry`
  header overrides the status, as in the official SDK: `true` is retried whatever the status, `false`
  never is (`enrich._retry.retryable`).
- Calls that create runs (`create_run`, `add_runs`) are retried only when the service certainly did
  nothing: the connection was never made, or it answered 429. When the request may have reached the
  service and the answer was lost (a 5xx, a dropped connection, a read timeout), `OutcomeUnknownError`
  is raised instead, so the caller can find out what was created before sending anything again.
  `x-should-retry` never changes that: a 5xx may have created the runs whether or not the service
  says to send it again (`true` does retry a create refused with a 4xx: nothing was created).

Example::

    async with TaskClient(api_key="...") as client:
        run = await client.create_run({"company": "Parallel"}, "core", task_spec=spec)
        run, output = await client.wait_for_result(run.run_id)
"""

from __future__ import annotations

import email.utils
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx

from enrich._exceptions import (
    STATUS_ERRORS,
    APIError,
    APIStatusError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitError,
    RequestInfo,
    ServerError,
    StillRunningError,
    TransportError,
    UsageError,
)
from enrich._models import (
    AddRunsResponse,
    StreamEvent,
    TaskGroup,
    TaskOutput,
    TaskRun,
    TaskRunResult,
    loads,
    parse_event,
)
from enrich._retry import RetryPolicy, retryable, should_retry_header
from enrich._sse import SSEDecoder

__all__ = ["DEFAULT_BASE_URL", "MAX_RUNS_PER_ADD", "Limiter", "TaskClient", "service_of"]

DEFAULT_BASE_URL = "https://api.parallel.ai"


def service_of(base_url: str | None) -> str:
    """The name of the service a base URL reaches, as a checkpoint records it: scheme, host, port (when
    not the scheme's default) and path, never a user name or password.

    >>> service_of("HTTPS://api.parallel.ai:443/")
    'https://api.parallel.ai'
    >>> service_of("http://user:secret@127.0.0.1:8787/v1/")
    'http://127.0.0.1:8787/v1'
    """
    text = base_url or os.environ.get("PARALLEL_BASE_URL") or DEFAULT_BASE_URL
    if not text.lower().startswith(("http://", "https://")):
        raise UsageError(f"base URL {text!r} must start with http:// or https://")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise UsageError(f"base URL {text!r} is not a URL: {exc}") from None
    scheme = url.scheme.lower()
    port = f":{url.port}" if url.port not in (None, {"http": 80, "https": 443}.get(scheme)) else ""
    host = f"[{url.host}]" if ":" in url.host else url.host.lower()
    return f"{scheme}://{host}{port}{url.path.rstrip('/')}"


#: The API refuses add-runs requests with more inputs than this.
MAX_RUNS_PER_ADD = 1000
_GROUPS = "/v1/tasks/groups"
_RUNS = "/v1/tasks/runs"
_USER_AGENT = "enrich/0.1 (+https://github.com/parallel-web)"
# Idle connections kept open. httpcore scans its whole pool on every request event, so a pool left with
# a burst's hundred idle connections made each request cost ~3 ms of CPU (vs ~0.5 ms); more than this
# many idle ones are closed, and a burst opens new ones.
_KEEPALIVE = 20


class Limiter(Protocol):
    """What the client needs of a rate limiter (`enrich.RateLimiter` is one).

    Each request acquires a grant first, then hands it back: `succeeded` (answered, not 429),
    `rate_limited` (a 429: nothing done), `settle` (no answer: it may have reached the service), or
    `refund` (never sent)."""

    async def acquire(self, runs: int = 0) -> Any: ...
    def settle(self, grant: Any) -> None: ...
    def rate_limited(self, retry_after: float | None = None, grant: Any = None) -> None: ...
    def succeeded(self, grant: Any = None) -> None: ...
    def refund(self, grant: Any) -> None: ...


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    """The server's wait in seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _error_from_response(response: httpx.Response, request: RequestInfo) -> APIStatusError:
    """Translate an error answer into the exception tree; reads both error-body shapes and HTML pages."""
    status = response.status_code
    message = ""
    ref_id = None
    detail: Any = None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # {"type": "error", "error": {...}}
        err = body["error"]
        message = str(err.get("message") or "")
        ref_id = err.get("ref_id")
        detail = err.get("detail")
    elif isinstance(body, dict) and "detail" in body:  # FastAPI's {"detail": [{"loc", "msg", "type"}]}
        detail = body["detail"]
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc") or ())
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            message = "; ".join(parts)
        else:
            message = str(detail)
    elif isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    if not message:
        text = _SPACE.sub(" ", _TAGS.sub(" ", response.text)).strip()
        reason = response.reason_phrase or "error"
        message = reason + (f": {text[:200]}" if text and text.lower() != reason.lower() else "")
    kwargs: dict[str, Any] = {
        "status": status,
        "request": request,
        "ref_id": ref_id,
        "detail": detail,
        "should_retry": should_retry_header(response.headers.get("x-should-retry")),
    }
    if status == 429:
        return RateLimitError(message, retry_after=_parse_retry_after(response.headers), **kwargs)
    cls = STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIStatusError)
    return cls(message, **kwargs)


# Transport errors raised before the request could have reached the service: safe to retry anything.
def _tls_context() -> ssl.SSLContext:
    """The TLS context httpx would make for a client (`httpx.create_ssl_context()`: certifi's CAs, or
    SSL_CERT_FILE / SSL_CERT_DIR), made once per process and per those variables: loading the CA bundle
    took 40-60 ms of every job's start, as long as the rest of a small job's preparation."""
    where = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _TLS.get(where)
    if context is None:
        context = _TLS[where] = httpx.create_ssl_context()
    return context


_TLS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def api_key_of(api_key: str | None) -> str:
    """`api_key`, or else PARALLEL_API_KEY's value; a UsageError if there is none or it looks mangled."""
    key = api_key if api_key is not None else os.environ.get("PARALLEL_API_KEY")
    if not key:
        raise UsageError(
            "no API key: set the PARALLEL_API_KEY environment variable or pass api_key= (to try enrich "
            "without one, `with enrich.Emulator() as emu:` and api_key=emu.api_key, base_url=emu.url)"
        )
    if any(c in key for c in "\r\n") or key != key.strip():
        raise UsageError("the API key has spaces or line breaks around it: copy it again")
    return key


class TaskClient:
    """Async client for the Task API.

    Args:
        api_key: sent as `x-api-key`; default: env `PARALLEL_API_KEY`. Never logged, printed or stored.
        base_url: default: env `PARALLEL_BASE_URL`, else `https://api.parallel.ai`.
        transport: an `httpx.AsyncBaseTransport` (tests use `httpx.MockTransport` or `httpx.ASGITransport`).
        limiter: shared rate limiter; every request first acquires from it (create calls spend their runs).
        retry: the retry policy (`RetryPolicy()` by default).
        timeout: seconds to wait for a connection, or for bytes of an answer (default 60); the blocking
            result call adds its server-side wait to it.
        max_connections: size of the connection pool (default 100).
        beta: `parallel-beta` values sent with every request (`enrich._run_options.KNOWN_BETAS`, or any
            other name), such as `["mcp-server-2025-07-17"]`.

    Use it as an async context manager, or call `aclose()`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: Limiter | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        max_connections: int = 100,
        beta: Sequence[str] = (),
    ) -> None:
        key = api_key_of(api_key)
        url = base_url or os.environ.get("PARALLEL_BASE_URL") or DEFAULT_BASE_URL
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"base URL {url!r} must start with http:// or https://")
        self.base_url = url.rstrip("/")
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        headers = {"x-api-key": key, "user-agent": _USER_AGENT, "accept": "application/json"}
        if beta:
            headers["parallel-beta"] = ",".join(beta)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=_KEEPALIVE),
            follow_redirects=False,
            verify=_tls_context(),
        )
        #: Requests sent, by kind: a bulk job reads its requests-per-row from these.
        self.requests_sent = 0
        self.answers_received = 0  # HTTP answers of any status: 0 means the service was never reached
        self.rate_limited_count = 0

    def __repr__(self) -> str:
        return f"TaskClient(base_url={self.base_url!r}, api_key=<hidden>)"

    async def __aenter__(self) -> TaskClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the request loop ------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        runs: int = 0,
        creates: bool = False,
        retry_408: bool = True,
        timeout: float | None = None,
        retry_429: bool = True,
        on_send: Callable[[], Awaitable[object]] | None = None,
        on_refused: Callable[[], object] | None = None,
        granted: Any = None,
    ) -> Any:
        """Send one request, retrying what is safe to retry; returns the decoded JSON body.

        `granted`: the rate limiter's grant for the first attempt, acquired by the caller (who sized the
        request by it); it is the caller's no more. Attempts after a 429 or a lost answer acquire again.

        With `retry_429=False` a 429 is reported to the limiter, then raised at once (nothing was done).
        `on_send` is awaited each time the request is about to go out, after the rate limiter let it
        through (a caller records there when it was sent); if it raises, nothing is sent. `on_refused`
        is called when a 429 answers it or it could not be sent (no connection): nothing was done, and
        until the next `on_send` nothing is on the wire (a caller cancelled while the request waits to
        go again knows nothing was created).
        """
        info = RequestInfo(method, self.base_url + path + _query(params))
        failures = 0
        rate_limited = 0
        while True:
            if granted is not None:
                grant, granted = granted, None
            else:
                grant = await self.limiter.acquire(runs) if self.limiter is not None else None
            if on_send is not None:
                try:
                    await on_send()
                except BaseException:
                    if self.limiter is not None:
                        self.limiter.refund(grant)
                    raise
            self.requests_sent += 1
            try:
                response = await self._http.request(
                    method,
                    path,
                    json=json_body,
                    params=_wire_params(params),
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0))
                    if timeout
                    else httpx.USE_CLIENT_DEFAULT,
                )
            except BaseException as exc:  # no answer; never leave a grant out (it may be a trial)
                if self.limiter is not None:
                    if isinstance(exc, _NOT_SENT):
                        self.limiter.refund(grant)
                    else:
                        self.limiter.settle(grant)  # it may have been counted: keep it in the window
                if not isinstance(exc, httpx.TransportError):
                    raise
                if isinstance(exc, _NOT_SENT) and on_refused is not None:
                    on_refused()  # never sent: nothing on the wire while it waits to be sent again
                error = TransportError(f"{type(exc).__name__}: {exc}".rstrip(": "), request=info)
                sent = creates and not isinstance(exc, _NOT_SENT)
                lost = "the request was sent but its answer was lost" if sent else None
                failures = await self._retry_or_raise(error, exc, failures, lost=lost, info=info)
                continue
            self.answers_received += 1
            if response.status_code != 429 and self.limiter is not None:
                self.limiter.succeeded(grant)
            if response.status_code < 400:
                try:
                    return loads(response.content)
                except ValueError as exc:
                    error = TransportError(f"malformed JSON in a {response.status_code} answer", request=info)
                    lost = (
                        "the runs may have been created but the answer could not be read" if creates else None
                    )
                    failures = await self._retry_or_raise(error, exc, failures, lost=lost, info=info)
                    continue
            error_ = _error_from_response(response, info)
            if isinstance(error_, RateLimitError):
                self.rate_limited_count += 1
                rate_limited += 1
                if on_refused is not None:
                    on_refused()
                if self.limiter is not None:
                    self.limiter.rate_limited(error_.retry_after, grant)
                if rate_limited > self.retry.max_rate_limited or error_.should_retry is False:
                    raise error_
                if not retry_429:
                    raise error_
                if self.limiter is None:
                    await self.retry.sleep(self.retry.delay(min(rate_limited - 1, 10), error_.retry_after))
                continue
            if creates and isinstance(error_, ServerError):
                # It may have created the runs (or the service may still): found out by the caller,
                # never sent again blindly, whatever `x-should-retry` says.
                raise OutcomeUnknownError(
                    f"the service answered {error_.status} after the request was sent",
                    cause=error_,
                    request=info,
                )
            # (408 from the blocking result call means "still running": its caller asks again itself)
            again = retryable(error_.status or 0, error_.should_retry) and (retry_408 or error_.status != 408)
            if creates:  # refused (4xx): nothing was created; sent again only when the service says so
                again = again and error_.should_retry is True
            failures += 1
            if not again or failures >= self.retry.max_attempts:
                raise error_
            if creates and on_refused is not None:
                on_refused()  # nothing on the wire until the next `on_send`
            await self.retry.sleep(self.retry.delay(failures - 1, _parse_retry_after(response.headers)))

    async def _retry_or_raise(
        self, error: TransportError, exc: Exception, failures: int, *, lost: str | None, info: RequestInfo
    ) -> int:
        """A request got no usable answer. When it may have created runs (`lost` says why), raise
        `OutcomeUnknownError`; when retries are spent, raise `error`; else wait, and count the failure."""
        if lost is not None:
            raise OutcomeUnknownError(lost, cause=error, request=info) from exc
        failures += 1
        if failures >= self.retry.max_attempts:
            raise error from exc
        await self.retry.sleep(self.retry.delay(failures - 1))
        return failures

    # -- runs --------------------------------------------------------------------------------------

    async def create_run(
        self,
        input: str | Mapping[str, Any],
        processor: str,
        *,
        task_spec: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> TaskRun:
        """Create one run (`POST /v1/tasks/runs`, 202). Never retried once it may have been received:
        a lost answer raises `OutcomeUnknownError`. `extra` passes other TaskRunInput fields as they are
        (`source_policy`, `webhook`, ...)."""
        body = _run_input(input, processor, task_spec, metadata, extra)
        return TaskRun.from_json(await self._request("POST", _RUNS, json_body=body, runs=1, creates=True))

    async def get_run(self, run_id: str) -> TaskRun:
        """A run's current state (`GET /v1/tasks/runs/{id}`; does not block)."""
        return TaskRun.from_json(await self._request("GET", f"{_RUNS}/{run_id}"))

    async def get_run_input(self, run_id: str) -> dict[str, Any]:
        """The TaskRunInput the run was created with."""
        data = await self._request("GET", f"{_RUNS}/{run_id}/input")
        return data if isinstance(data, dict) else {}

    async def get_result(self, run_id: str, *, timeout: int = 600) -> TaskRunResult:
        """The result of a run, waiting up to `timeout` seconds on the server for it to finish.

        Raises `StillRunningError` (408) when the wait ran out with the run still active, and
        `NotFoundError` (404) when the run failed (read its error with `get_run`) or does not exist.
        """
        data = await self._request(
            "GET",
            f"{_RUNS}/{run_id}/result",
            params={"timeout": int(timeout)},
            retry_408=False,
            timeout=self.timeout + timeout,
        )
        return TaskRunResult.from_json(data)

    async def wait_for_result(
        self, run_id: str, *, poll_timeout: int = 600
    ) -> tuple[TaskRun, TaskOutput | None]:
        """Wait until a run ends: `(run, output)` when it completed, `(run, None)` when it failed.

        Asks the blocking result call again on every 408; on a 404 reads the run to tell a failed
        run (returned, with `run.error`) from an unknown id (`NotFoundError` raised).
        """
        while True:
            try:
                result = await self.get_result(run_id, timeout=poll_timeout)
            except StillRunningError:
                continue
            except NotFoundError:
                run = await self.get_run(run_id)
                if run.is_active:  # the result vanished under us; ask again
                    continue
                return run, None
            return result.run, result.output

    # -- groups -------------------------------------------------------------------------------------

    async def create_group(self, metadata: Mapping[str, Any] | None = None) -> TaskGroup:
        """Create a task group (`POST /v1/tasks/groups`). Creating an empty group costs nothing, so a
        lost answer is retried like a read."""
        body = {"metadata": dict(metadata)} if metadata else {}
        return TaskGroup.from_json(await self._request("POST", _GROUPS, json_body=body))

    async def get_group(self, group_id: str) -> TaskGroup:
        """A group's status counters."""
        return TaskGroup.from_json(await self._request("GET", f"{_GROUPS}/{group_id}"))

    async def add_runs(
        self,
        group_id: str,
        inputs: Sequence[Mapping[str, Any]],
        *,
        default_task_spec: Mapping[str, Any] | None = None,
        refresh_status: bool = False,
        retry_rate_limited: bool = True,
        on_send: Callable[[], Awaitable[object]] | None = None,
        on_refused: Callable[[], object] | None = None,
        granted: Any = None,
    ) -> AddRunsResponse:
        """Add up to 1,000 runs to a group in one request; `run_ids` come back in input order.

        Each input is a TaskRunInput (`input`, `processor`, optional `metadata`, `task_spec`, ...).
        Spends `len(inputs)` from the limiter's runs budget. A lost answer raises `OutcomeUnknownError`.
        With `retry_rate_limited=False` a 429 is reported to the limiter and raised as `RateLimitError`
        instead of retried: nothing was created, and the caller may send the inputs again in smaller calls
        (a quota that counts runs may never fit this many in one call). `on_send` is awaited each time
        the request is about to go out (see `_request`): a caller records there that it was sent, and
        `on_refused` is called on each 429. `granted`: the limiter's grant for these runs, acquired by
        the caller (`RateLimiter.acquire(at_least=...)` sizes a call to what fits now).
        """
        if not inputs:
            raise UsageError("add_runs needs at least one input")
        if len(inputs) > MAX_RUNS_PER_ADD:
            raise UsageError(f"add_runs takes at most {MAX_RUNS_PER_ADD} inputs per call, got {len(inputs)}")
        body: dict[str, Any] = {"inputs": [dict(i) for i in inputs]}
        if default_task_spec is not None:
            body["default_task_spec"] = dict(default_task_spec)
        data = await self._request(
            "POST",
            f"{_GROUPS}/{group_id}/runs",
            json_body=body,
            params={"refresh_status": refresh_status},
            runs=len(inputs),
            creates=True,
            retry_429=retry_rate_limited,
            on_send=on_send,
            on_refused=on_refused,
            granted=granted,
        )
        return AddRunsResponse.from_json(data)

    async def get_group_run(self, group_id: str, run_id: str) -> TaskRun:
        return TaskRun.from_json(await self._request("GET", f"{_GROUPS}/{group_id}/runs/{run_id}"))

    def stream_group_runs(
        self,
        group_id: str,
        *,
        last_event_id: str | None = None,
        status: str | None = None,
        include_input: bool = False,
        include_output: bool = False,
    ) -> AsyncIterator[StreamEvent]:
        """The group's runs as a snapshot stream of `RunStateEvent`s, in creation order; it ends when the
        snapshot is sent. A stream cut mid-way is resumed from the last event received."""
        params = {
            "last_event_id": last_event_id,
            "status": status,
            "include_input": include_input,
            "include_output": include_output,
        }
        return self._stream(f"{_GROUPS}/{group_id}/runs", params)

    def stream_group_events(
        self, group_id: str, *, last_event_id: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[StreamEvent]:
        """The group's events: `GroupStatusEvent`s and a `RunStateEvent` (no output) each time a run
        ends. It stays open while runs are active, up to `timeout` seconds (server default: an hour)."""
        return self._stream(
            f"{_GROUPS}/{group_id}/events", {"last_event_id": last_event_id, "timeout": timeout}, long=True
        )

    async def _stream(
        self, path: str, params: dict[str, Any], *, long: bool = False
    ) -> AsyncIterator[StreamEvent]:
        last_id = params.get("last_event_id")
        failures = 0
        while True:
            query = {**params, "last_event_id": last_id}
            info = RequestInfo("GET", self.base_url + path + _query(query))
            grant = await self.limiter.acquire(0) if self.limiter is not None else None
            self.requests_sent += 1
            server_wait: float | None = None
            answered = False  # the grant handed back to the limiter
            try:
                async with self._http.stream(
                    "GET",
                    path,
                    params=_wire_params(query),
                    headers={"accept": "text/event-stream"},
                    # A long stream may be quiet for minutes between events; a dead one is resumed.
                    timeout=httpx.Timeout(max(self.timeout, 300.0), connect=10.0)
                    if long
                    else httpx.USE_CLIENT_DEFAULT,
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = _error_from_response(response, info)
                        answered = True
                        if isinstance(error, RateLimitError):
                            self.rate_limited_count += 1
                            if self.limiter is not None:
                                self.limiter.rate_limited(error.retry_after, grant)
                                if error.should_retry is not False:
                                    continue
                        elif self.limiter is not None:
                            self.limiter.succeeded(grant)
                        if not retryable(error.status or 0, error.should_retry):
                            raise error
                        raise _RetryStream(error, _parse_retry_after(response.headers))
                    answered = True
                    if self.limiter is not None:
                        self.limiter.succeeded(grant)
                    decoder = SSEDecoder()
                    async for chunk in response.aiter_bytes():
                        for sse in decoder.feed(chunk):
                            try:
                                data = loads(sse.data)
                            except ValueError:
                                raise _RetryStream(
                                    TransportError("malformed JSON in a stream event", request=info), None
                                ) from None
                            if not isinstance(data, dict):
                                raise _RetryStream(
                                    TransportError("a stream event is not a JSON object", request=info), None
                                )
                            event = parse_event(data)
                            if event.event_id is not None:
                                last_id = event.event_id
                            failures = 0
                            yield event
                    return
            except _RetryStream as retry:
                error_: APIError = retry.error
                server_wait = retry.server_wait
            except BaseException as exc:  # no answer: never leave the grant out (it may be a trial)
                if self.limiter is not None and not answered:
                    if isinstance(exc, _NOT_SENT):
                        self.limiter.refund(grant)
                    else:
                        self.limiter.settle(grant)
                if not isinstance(exc, httpx.TransportError):
                    raise
                error_ = TransportError(f"{type(exc).__name__}: {exc}".rstrip(": "), request=info)
            failures += 1
            if failures >= self.retry.max_attempts:
                raise error_
            await self.retry.sleep(self.retry.delay(failures - 1, server_wait))


class _RetryStream(Exception):
    def __init__(self, error: APIError, server_wait: float | None) -> None:
        self.error = error
        self.server_wait = server_wait


def _run_input(
    input: str | Mapping[str, Any],
    processor: str,
    task_spec: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"input": input if isinstance(input, str) else dict(input), "processor": processor}
    if task_spec is not None:
        body["task_spec"] = dict(task_spec)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    body.update(extra)
    return body


def _wire_params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Query parameters as the API expects them: booleans as true/false, None left out."""
    if not params:
        return None
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _query(params: Mapping[str, Any] | None) -> str:
    wire = _wire_params(params)
    return "?" + str(httpx.QueryParams(wire)) if wire else ""
