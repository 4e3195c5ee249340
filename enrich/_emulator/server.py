"""Serving the emulator over HTTP with uvicorn: `Emulator` (127.0.0.1, in a thread of its own, for tests
and notebooks) and `serve` (blocking, for `enrich emulate`), with the log filter that keeps the `drop`
fault's deliberate disconnects out of uvicorn's error log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from dataclasses import replace
from typing import Any

import uvicorn

from enrich._emulator.app import EmulatorApp, create_app
from enrich._emulator.config import EmulatorConfig
from enrich._emulator.wire import _ConnectionDropped

__all__ = ["DEMO_API_KEY", "Emulator", "serve"]

#: The key `Emulator` hands out when its config names none (any non-empty key is then accepted).
DEMO_API_KEY = "emulator-demo-key"


class _DropFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ConnectionDropped))


_DROP_FILTER = _DropFilter()
_filter_users = 0
_filter_lock = threading.Lock()


def _install_drop_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users += 1
        logging.getLogger("uvicorn.error").addFilter(_DROP_FILTER)


def _remove_drop_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users -= 1
        if _filter_users <= 0:
            _filter_users = 0
            logging.getLogger("uvicorn.error").removeFilter(_DROP_FILTER)


class _Server(uvicorn.Server):
    """uvicorn that reports when it listens, and wakes the app's waiters before it drains."""

    def __init__(
        self, config: uvicorn.Config, app: EmulatorApp, ready: threading.Event | None = None
    ) -> None:
        super().__init__(config)
        self.emulator = app
        self.ready = ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            if self.ready is not None:
                self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Long-lived streams and blocking /result calls would hold the graceful drain open.
        self.emulator.close()
        await super().shutdown(sockets=sockets)


def _uvicorn_config(app: EmulatorApp, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        timeout_graceful_shutdown=5,
        **kw,
    )


class Emulator:
    """The emulator served by uvicorn on 127.0.0.1, in a background thread with its own event loop.

        >>> with Emulator(latency=0.05) as emu:                     # doctest: +SKIP
        ...     r = httpx.post(emu.url + "/v1/tasks/runs", headers={"x-api-key": emu.api_key},
        ...                    json={"input": "Acme", "processor": "base"})
        ...     r.status_code, emu.stats()["runs_created"]
        (202, 1)

    Pass an `EmulatorConfig`, or its fields as keyword arguments (or both: keywords override), e.g.
    `Emulator(late_commit_seconds=2.0, stream_close_seconds=30, run_rate_limit=2_000, run_burst=500)`
    for a service that is unkind to clients (see `EmulatorConfig`).
    `url` is `http://127.0.0.1:<port>` (a free port unless `port` is given); `api_key` is the config's
    key or `DEMO_API_KEY`; `app` is the ASGI app, usable with `httpx.ASGITransport` as well. Entering
    returns once the port accepts connections; leaving ends open streams and stops the server.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        /,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **options: Any,
    ) -> None:
        config = config or EmulatorConfig()
        if options:
            config = replace(config, **options)
        self.config = config
        self.app = create_app(config)
        self.api_key = config.api_key or DEMO_API_KEY
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return f"<Emulator {self.url} {state}>"

    def start(self) -> Emulator:
        """Start serving; returns when the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        server = _Server(
            _uvicorn_config(self.app, log_level="warning", access_log=False, log_config=None), self.app, ready
        )
        self._server = server
        _install_drop_filter()
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="enrich-emulator", daemon=True
        )
        self._thread = thread
        thread.start()
        ready.wait(30)
        if not server.started:
            self.close()
            raise RuntimeError("the emulator did not start")
        return self

    def close(self) -> None:
        """Stop serving (idempotent): open streams end, then uvicorn drains and the thread exits."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            if server.loop is not None and not server.loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    server.loop.call_soon_threadsafe(self.app.close)
            thread.join(30)
            _remove_drop_filter()
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def stats(self) -> dict[str, Any]:
        """`app.stats()`, computed on the server's loop so it is consistent."""
        server = self._server
        if server is None or server.loop is None:
            return self.app.stats()

        async def _stats() -> dict[str, Any]:
            return self.app.stats()

        return asyncio.run_coroutine_threadsafe(_stats(), server.loop).result(30)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve the emulator on `host:port` until Ctrl-C, then return; for `enrich emulate`.

    Binds 127.0.0.1 by default: the emulator has no real authentication and is meant for one machine.
    Logs go through uvicorn's loggers at INFO (one access line per request). On Ctrl-C, open streams
    end and blocking calls answer at once, so shutdown does not wait for them.

        >>> serve(EmulatorConfig(latency=2.0, failure_rate=0.05), port=8787)  # doctest: +SKIP
    """
    app = create_app(config)
    server = _Server(_uvicorn_config(app, host=host, port=port, log_level="info"), app)
    _install_drop_filter()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; like uvicorn.run, swallow it
        pass
    finally:
        _remove_drop_filter()
