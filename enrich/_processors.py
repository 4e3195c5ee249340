"""The Task API's processors: names, prices and typical latencies (../shared/task-api.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROCESSORS", "Processor", "get_processor"]


@dataclass(frozen=True, slots=True)
class Processor:
    """One processor tier.

    `price_per_1k` is in USD per 1,000 runs (the price is per run, not per field). Latencies are in
    seconds, as the documented (low, high) range of the standard tier; `-fast` variants share the price.
    """

    name: str
    price_per_1k: float
    latency: tuple[float, float]
    fast_latency: tuple[float, float]
    max_fields: int

    @property
    def price_per_run(self) -> float:
        return self.price_per_1k / 1000.0


_BASE = [
    Processor("lite", 5, (10, 60), (10, 20), 2),
    Processor("base", 10, (15, 100), (15, 50), 5),
    Processor("core", 25, (60, 300), (15, 100), 10),
    Processor("core2x", 50, (60, 600), (15, 180), 10),
    Processor("pro", 100, (120, 600), (30, 300), 20),
    Processor("ultra", 300, (300, 1500), (60, 600), 20),
    Processor("ultra2x", 600, (300, 3000), (60, 1200), 25),
    Processor("ultra4x", 1200, (300, 5400), (60, 2400), 25),
    Processor("ultra8x", 2400, (300, 7200), (60, 3600), 25),
]

#: Every known processor name, standard and `-fast`, mapped to its tier.
PROCESSORS: dict[str, Processor] = {}
for _p in _BASE:
    PROCESSORS[_p.name] = _p
    PROCESSORS[_p.name + "-fast"] = Processor(
        _p.name + "-fast", _p.price_per_1k, _p.fast_latency, _p.fast_latency, _p.max_fields
    )


def get_processor(name: str) -> Processor | None:
    """The processor called `name`, or None when the name is not a known processor."""
    return PROCESSORS.get(name)
