"""Test doubles for the engine tests: a streaming in-process transport and an ASGI tap around the emulator.

`httpx.ASGITransport` buffers a whole answer before the client sees a byte, so in-process the group
events stream (which stays open while runs are active) reaches the engine only once the group is idle.
`StreamingASGITransport` hands each body chunk over as the app sends it, like a socket would, and tells
the app when the client hung up, so the engine meets the emulator in-process as it would over HTTP.

`FullDisk` stands in for `os.replace`/`os.link`/`os.fsync` so that the checkpoint's writes fail as on a
full disk.

`Tap` wraps the emulator app: a subclass overrides `request` (answer without forwarding), `response`
(look at or delay an answer that was carried out) or `event` (rewrite, drop or cut the events of an SSE
stream). It counts the runs-stream requests and the outputs they carried, and passes everything else
(`stats()`, `state`, `close()`) through to the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Cut", "FullDisk", "StreamingASGITransport", "Tap", "is_add_runs", "is_runs_stream", "sse"]


def is_add_runs(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/v1") and path.endswith("/runs") and "/groups/" in path


def is_runs_stream(method: str, path: str) -> bool:
    return method == "GET" and "/groups/" in path and path.endswith("/runs")


def sse(data: dict[str, Any]) -> bytes:
    kind = str(data.get("type", "message"))
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


class Cut(Exception):
    """Raised by `Tap.event`: send `partial` bytes of the event, then drop the connection."""

    def __init__(self, partial: bytes) -> None:
        super().__init__("cut")
        self.partial = partial


class _Body(httpx.AsyncByteStream):
    def __init__(self, queue: asyncio.Queue[bytes | BaseException | None], task: asyncio.Task[None]) -> None:
        self._queue = queue
        self._task = task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Like `httpx.ASGITransport`, but the body streams: chunks reach the client as the app sends them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        loop = asyncio.get_running_loop()
        started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = loop.create_future()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        hung_up = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.set_result((message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    queue.put_nowait(message["body"])
                if not message.get("more_body", False):
                    queue.put_nowait(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                error = exc if isinstance(exc, httpx.TransportError) else httpx.RemoteProtocolError(str(exc))
                if not started.done():
                    started.set_exception(error)
                else:
                    queue.put_nowait(error)
                return
            finally:
                hung_up.set()
            if not started.done():
                started.set_exception(httpx.RemoteProtocolError("the app sent no answer"))
            queue.put_nowait(None)  # harmless after the closing body message: the reader stopped there

        task = loop.create_task(run())
        try:
            status, headers = await started
        except BaseException:
            task.cancel()
            await asyncio.wait([task])
            raise
        return httpx.Response(status, headers=headers, stream=_Body(queue, task), request=request)


class Tap:
    """An ASGI app in front of the emulator app; override the hooks to change what the client sees."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.runs_streams = 0  # GET .../groups/{id}/runs requests answered
        self.outputs_served = 0  # run outputs those streams carried
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    # -- hooks

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        """Return (status, body) to answer without forwarding (nothing is carried out); None forwards."""
        return None

    async def response(self, method: str, path: str, status: int, body: bytes) -> bytes:
        """A plain (not SSE) answer that was carried out; may wait, inspect or replace its body."""
        return body

    def event(self, method: str, path: str, data: dict[str, Any]) -> bytes | None:
        """One SSE event of a stream, decoded; return the bytes to send instead (None drops it)."""
        return sse(data)

    # -- ASGI

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        self.calls.append((method, path))
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        canned = await self.request(method, path, body)
        if canned is not None:
            status, payload = canned
            ctype = b"application/json" if payload[:1] in (b"{", b"[") else b"text/html"
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": payload, "more_body": False})
            return
        replayed = False

        async def inner_receive() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # type: ignore[no-any-return]

        start: dict[str, Any] = {}
        plain: list[bytes] = []
        pending = b""
        streaming = False
        if is_runs_stream(method, path):
            self.runs_streams += 1

        async def inner_send(message: dict[str, Any]) -> None:
            nonlocal pending, streaming
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if streaming:
                    await send(message)
                else:
                    start.update(message)
                return
            data = message.get("body", b"")
            more = message.get("more_body", False)
            if not streaming:
                plain.append(data)
                if not more:
                    payload = await self.response(method, path, start["status"], b"".join(plain))
                    headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                    headers.append((b"content-length", str(len(payload)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": payload, "more_body": False})
                return
            pending += data
            out = []
            while b"\n\n" in pending:
                raw, pending = pending.split(b"\n\n", 1)
                decoded = _decode(raw)
                if decoded is None:
                    out.append(raw + b"\n\n")
                    continue
                if is_runs_stream(method, path) and decoded.get("output") is not None:
                    self.outputs_served += 1
                try:
                    replaced = self.event(method, path, decoded)
                except Cut as cut:
                    await send(
                        {"type": "http.response.body", "body": b"".join(out) + cut.partial, "more_body": True}
                    )
                    raise httpx.RemoteProtocolError("peer closed connection mid-event") from None
                if replaced is not None:
                    out.append(replaced)
            if out or not more:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

        await self.app(scope, inner_receive, inner_send)


def _decode(raw: bytes) -> dict[str, Any] | None:
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            with contextlib.suppress(ValueError):
                data = json.loads(line[5:].strip())
                if isinstance(data, dict):
                    return data
    return None


class FullDisk:
    """os.replace / os.link / os.fsync failing with `code` for the checkpoint's files from a chosen write on.

    `kind` picks the segment kind whose `after`-th write (0-based) fails first ("" for any file); from
    then on every checkpoint write fails, as on a full disk. `filled()` is called once, at the first
    failure (a subclass records what it needs then). Patch `enrich._store.os.replace` with `replace`,
    `enrich._store.os.link` with `link` (a new file is linked into place) and `enrich._store.os.fsync`
    with `fsync`.
    """

    def __init__(self, checkpoint: Path, kind: str, after: int, code: int = errno.ENOSPC) -> None:
        self.checkpoint, self.kind, self.after, self.code = checkpoint, kind, after, code
        self.failing = False
        self.seen = 0
        self.real_replace, self.real_link, self.real_fsync = os.replace, os.link, os.fsync

    def filled(self) -> None:
        """Called once, when the first write fails."""

    def _fail(self, name: str) -> bool:
        if not self.failing and name.startswith(self.kind):
            self.seen += 1
            if self.seen > self.after:
                self.failing = True
                self.filled()
        return self.failing

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(dst)
        if path.parent == self.checkpoint and self._fail(path.name):
            raise OSError(self.code, os.strerror(self.code))
        self.real_replace(src, dst, *args, **kwargs)

    def link(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(dst)
        if path.parent == self.checkpoint and self._fail(path.name):
            raise OSError(self.code, os.strerror(self.code))
        self.real_link(src, dst, *args, **kwargs)

    def fsync(self, fd: int) -> None:
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            path = Path()
        if self.checkpoint in (path, path.parent) and self._fail(path.name):
            raise OSError(self.code, os.strerror(self.code))
        self.real_fsync(fd)
