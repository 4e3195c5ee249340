"""Progress reporting: the engine reports counts to a sink; tqdm plugs in here, at the edge.

The engine never imports tqdm. A sink is any callable taking a `Progress`; `TqdmSink` draws a
bar with tqdm.auto (a widget in notebooks, a line on a terminal's stderr), and tests pass a list's
`append` to assert on the events.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Progress", "ProgressSink", "TqdmSink"]


@dataclass(frozen=True, slots=True)
class Progress:
    """Counts of distinct inputs (runs) in a job at one moment.

    `total` distinct inputs; `completed`, `failed`, `cancelled` and `action_required` are finished (the
    last two: runs the service stopped, without an answer); `running` are submitted and not finished;
    `waiting` are not submitted yet; `rate_limited` is the number of requests waiting for the rate
    limiter now; `refused` the number of answers 429 (rate limited) so far; `spent` the dollars
    spent on the job so far, every run the checkpoint records at list prices (None: no known price).
    `message` carries a one-off notice (where the checkpoint is, a reconciliation) or None.
    """

    total: int
    completed: int
    failed: int
    running: int
    waiting: int
    rate_limited: int = 0
    message: str | None = None
    refused: int = 0
    spent: float | None = None
    cancelled: int = 0
    action_required: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled + self.action_required


ProgressSink = Callable[[Progress], None]


class TqdmSink:
    """A tqdm.auto bar: finished of total with an ETA, then failed (cancelled and action required, when
    any), running, waiting, requests waiting for the rate limiter, 429 answers, and the dollars spent so
    far."""

    def __init__(self, desc: str = "enrich", file: Any = None) -> None:
        self._desc = desc
        self._file = file if file is not None else sys.stderr
        self._bar: Any = None

    def __call__(self, progress: Progress) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(  # rows already done (a resume) start the bar: they are no part of its rate
                total=progress.total,
                initial=progress.finished,
                desc=self._desc,
                unit="run",
                file=self._file,
                dynamic_ncols=True,
            )
        bar = self._bar
        if progress.message:
            bar.write(f"enrich: {progress.message}", file=self._file)
        if bar.total != progress.total:
            bar.total = progress.total
        if progress.finished >= bar.n:
            bar.update(progress.finished - bar.n)  # update(), not n=: tqdm's rate and ETA follow it
        else:
            bar.n = progress.finished
        postfix: dict[str, Any] = {"failed": progress.failed}
        if progress.cancelled:
            postfix["cancelled"] = progress.cancelled
        if progress.action_required:
            postfix["action-required"] = progress.action_required
        postfix |= {
            "running": progress.running,
            "waiting": progress.waiting,
            "rate-wait": progress.rate_limited,
            "429s": progress.refused,
        }
        if progress.spent is not None:
            postfix["spent"] = f"${progress.spent:,.2f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
