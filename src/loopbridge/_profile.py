"""The hook profiler: what each (callback, hook) pair costs the training-loop thread."""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HookProfiler", "HookTiming", "ProfileMark", "TimingRow"]

_perf_ns = time.perf_counter_ns


ProfileMark = dict[tuple[str, str], int]
"""How many calls each (callback, hook) pair had recorded at some moment."""


class HookTiming:
    """Every duration of one (callback, hook) pair, in nanoseconds."""

    __slots__ = ("durations",)

    def __init__(self) -> None:
        # 8 bytes a call: exact counts and percentiles without a reservoir's guesswork.
        self.durations = array("q")


@dataclass(frozen=True, slots=True)
class TimingRow:
    """The summary of one (callback, hook) pair."""

    callback: str
    hook: str
    count: int
    total_s: float
    mean_us: float
    p99_us: float
    max_us: float


class HookProfiler:
    """Collects the time each callback's hooks take on the loop thread, per hook."""

    def __init__(self) -> None:
        self._timings: dict[tuple[str, str], HookTiming] = {}

    def wrap(self, label: str, hook: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """Return `method` wrapped so that every call's duration is recorded."""
        timing = self._timings.setdefault((label, hook), HookTiming())
        record = timing.durations.append

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = _perf_ns()
            try:
                return method(*args, **kwargs)
            finally:
                record(_perf_ns() - start)

        timed.__wrapped__ = method  # type: ignore[attr-defined]
        return timed

    def mark(self) -> ProfileMark:
        """Where the recordings stand now, so `rows(since=...)` can cover one run alone."""
        return {pair: len(timing.durations) for pair, timing in self._timings.items()}

    def rows(self, since: ProfileMark | None = None) -> list[TimingRow]:
        """One row per (callback, hook) called (since the mark, if given), costliest first."""
        rows = []
        for (label, hook), timing in self._timings.items():
            start = since.get((label, hook), 0) if since is not None else 0
            values = sorted(timing.durations[start:])
            if not values:
                continue
            total = sum(values)
            # Nearest rank, in integers: int(n * 0.99) was one rank high whenever n was
            # a multiple of 100, so 100 calls reported their max as the p99.
            p99 = values[-(-len(values) * 99 // 100) - 1]
            rows.append(
                TimingRow(
                    callback=label,
                    hook=hook,
                    count=len(values),
                    total_s=total / 1e9,
                    mean_us=total / len(values) / 1e3,
                    p99_us=p99 / 1e3,
                    max_us=values[-1] / 1e3,
                )
            )
        rows.sort(key=lambda r: r.total_s, reverse=True)
        return rows

    def table(self, since: ProfileMark | None = None) -> str:
        """The rows as a plain-text table."""
        header = ("callback", "hook", "calls", "total ms", "mean µs", "p99 µs", "max µs")
        lines = [
            (
                r.callback,
                r.hook,
                str(r.count),
                f"{r.total_s * 1e3:.2f}",
                f"{r.mean_us:.2f}",
                f"{r.p99_us:.2f}",
                f"{r.max_us:.2f}",
            )
            for r in self.rows(since)
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            left = [row[i].ljust(widths[i]) for i in range(2)]
            right = [row[i].rjust(widths[i]) for i in range(2, len(row))]
            return "  ".join(left + right)

        return "\n".join([fmt(header), *(fmt(row) for row in lines)])
