"""Side-by-side measurement: rows of timings, A B A B alternation and medians of per-pair ratios.

Alternating the two engines exposes both to the same background load, and the median over pairs
discards a pair that a burst of other work disturbed (BENCHMARKS.md: busy figures are off by 2-4x).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One timed run of one engine (one CSV row)."""

    engine: str
    rep: int
    wall_s: float
    """Wall clock around the whole call."""
    prefill_s: float
    decode_s: float
    tokens: int
    """Generated tokens."""

    @property
    def busy_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput(self) -> float:
        """Generated tokens per second of prefill + decode (FlexGen's definition)."""
        return self.tokens / self.busy_s if self.busy_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput": self.throughput}


def alternate(a: Callable[[int], T], b: Callable[[int], T], repeats: int) -> list[tuple[T, T]]:
    """a(0) b(0) a(1) b(1) ...: `repeats` pairs; warm both up before calling this."""
    return [(a(rep), b(rep)) for rep in range(repeats)]


def median_ratio(pairs: Sequence[tuple[Row, Row]], value: Callable[[Row], float]) -> float:
    return statistics.median(value(a) / value(b) for a, b in pairs)


def median_row(rows: Sequence[Row]) -> Row:
    """Per-field medians of one engine's rows (rep -1): the figures printed for the record."""
    med = lambda f: statistics.median(f(r) for r in rows)
    return Row(rows[0].engine, -1, med(lambda r: r.wall_s), med(lambda r: r.prefill_s),
               med(lambda r: r.decode_s), rows[0].tokens)


class OtherLoad:
    """CPU time that other processes used while a benchmark ran, in cores on average.

    The load average would count this process too; this subtracts it: (busy jiffies of the whole machine
    - this process's CPU time, and its children's once they have exited) / wall time, so read it after
    joining any worker processes. Linux only; None elsewhere.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    def cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        (busy0, own0, t0), (busy1, own1, t1) = self._start, end
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        ticks = os.sysconf("SC_CLK_TCK")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return (sum(fields[:8]) - idle) / ticks, own, time.monotonic()
