"""The emulator in a process of its own, for benchmarks that measure the client alone.

In a thread of the bench's process the emulator shares the GIL, the peak RSS and the CPU counters with
the engine under test; at 100k or 1M rows that hides what the client costs. `EmulatorProcess` serves
`enrich._emulator.serve(EmulatorConfig(**config))` in a spawned interpreter on a free port of 127.0.0.1,
reads its counters over HTTP (`GET /_emulator/stats`), and its CPU and peak RSS from /proc (Linux;
None elsewhere). `config` is any `EmulatorConfig` field whose value JSON carries: `basis_bytes=4000`
gives answers the size of real core/pro ones (several KB of basis per field).

    with EmulatorProcess(latency=2.0, rate_limit=2000, run_rate_limit=2000, rate_window=6.0) as emu:
        await aenrich(df, fields, base_url=emu.url, api_key=emu.api_key, ...)
        emu.stats()["runs_created"], emu.cpu_seconds(), emu.peak_rss_mb()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from enrich._emulator import STATS_PATH, EmulatorConfig

API_KEY = "bench-key"

_SERVE = """
import json, sys
from enrich._emulator import EmulatorConfig, serve
config = json.loads(sys.argv[1])
serve(EmulatorConfig(**config), host="127.0.0.1", port=int(sys.argv[2]))
"""


def stat_cpu(path: str) -> float | None:
    """User + system CPU seconds from a /proc `stat` file (a process's or a thread's); None if unreadable."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmulatorProcess:
    """`enrich`'s emulator served by a child process; a context manager."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("api_key", API_KEY)
        EmulatorConfig(**config)  # a bad value fails here, with its message, not as a child's exit code
        self.config = config
        self.api_key: str = config["api_key"]
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30.0) -> EmulatorProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, json.dumps(self.config), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # uvicorn's access log: one line per request
            env=env,
        )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the emulator process exited with {self.proc.returncode}")
            try:
                httpx.get(self.url + STATS_PATH, timeout=1.0).raise_for_status()
                return self
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(
                        f"the emulator did not answer on {self.url} within {ready_timeout} s"
                    ) from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (`app.stats()`), read over HTTP."""
        r = httpx.get(self.url + STATS_PATH, timeout=120.0)
        r.raise_for_status()
        return dict(r.json())

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the emulator process has used (Linux /proc)."""
        return None if self.proc is None else stat_cpu(f"/proc/{self.proc.pid}/stat")

    def peak_rss_mb(self) -> float | None:
        """The emulator process's peak resident set size (VmHWM), in MB."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
