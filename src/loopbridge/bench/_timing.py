"""Timing helpers for the benchmarks: medians over repeats, ratios, verdicts, plain tables."""

from __future__ import annotations

import gc
import math
import statistics
import time
import timeit
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INSTALL_HINT",
    "NOT_INSTALLED",
    "Target",
    "fmt_ns",
    "fmt_ratio",
    "format_table",
    "interleaved_ns",
    "median",
    "ratio",
    "seconds_per_sample",
]

NOT_INSTALLED = "not installed"
INSTALL_HINT = "pip install 'loopbridge[bench]'"


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratio(value: float, reference: float) -> float:
    """`value / reference`, NaN when either is missing or the reference is zero."""
    if math.isnan(reference) or math.isnan(value) or reference == 0:
        return float("nan")
    return value / reference


def seconds_per_sample(*, full: bool) -> float:
    """How long one timed sample runs: long enough to swamp the clock, short enough to repeat."""
    return 0.02 if full else 0.004


def _timer(stmt: str, namespace: Mapping[str, Any]) -> timeit.Timer:
    # Each name is bound to a local in the timed function, as a training loop's would be.
    # timeit turns the garbage collector off while it times; real loops run with it on.
    # The clock is this thread's CPU time: on a shared machine, time spent descheduled for
    # other processes is not the code's cost, and it swamped wall-clock samples here.
    setup = "\n".join(["_gc_enable()", *(f"{name} = _ns[{name!r}]" for name in namespace)])
    globals_ = {"_ns": dict(namespace), "_gc_enable": gc.enable}
    return timeit.Timer(stmt, setup, timer=time.thread_time, globals=globals_)


def interleaved_ns(
    cases: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    repeat: int,
    sample_s: float,
) -> dict[str, float]:
    """Median nanoseconds of thread CPU time per execution of each case's statement.

    The cases take turns within each repeat, so drift on a shared machine hits them alike.
    Each sample runs a statement enough times to take about `sample_s` seconds; nothing
    (not even the timing loop's own cost) is subtracted.
    """
    timers = {name: _timer(stmt, ns) for name, (stmt, ns) in cases.items()}
    numbers: dict[str, int] = {}
    for name, timer in timers.items():
        number = 1
        while True:
            took = timer.timeit(number)
            if took >= sample_s / 10 or number >= 1 << 30:
                break
            number *= 10
        numbers[name] = max(1, int(number * sample_s / max(took, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeat):
        for name, timer in timers.items():
            number = numbers[name]
            samples[name].append(timer.timeit(number) / number * 1e9)
    return {name: median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Target:
    """One performance target: a measured ratio against its limit."""

    name: str
    value: float
    limit: float
    at_most: bool = True
    """True: pass when value <= limit; False: pass when value >= limit."""
    unit: str = "x"
    why: str = ""
    """Why the value is missing (NaN), shown instead of a bound that cannot be met."""

    @property
    def passed(self) -> bool:
        """Whether the target is met; a missing measurement fails."""
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        """`PASS  name: 1.23 (<= 1.50)`."""
        verdict = "PASS" if self.passed else "FAIL"
        op = "<=" if self.at_most else ">="
        if self.why and math.isnan(self.value):
            return f"{verdict}  {self.name}: not measured: {self.why}"
        if self.unit == "x":
            return f"{verdict}  {self.name}: {fmt_ratio(self.value)} ({op} {self.limit:g}x)"
        value = "n/a" if math.isnan(self.value) else f"{self.value:.2f}"
        return f"{verdict}  {self.name}: {value}{self.unit} ({op} {self.limit:.2f}{self.unit})"

    def to_json(self) -> dict[str, Any]:
        """The target as plain data."""
        return {
            "name": self.name,
            "value": None if math.isnan(self.value) else self.value,
            "limit": self.limit,
            "op": "<=" if self.at_most else ">=",
            "unit": self.unit,
            "pass": self.passed,
        }


def fmt_ratio(value: float) -> str:
    """`1.23x`, or `n/a`."""
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def fmt_ns(value: float) -> str:
    """Nanoseconds with a precision that suits their size."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """A plain-text table; the first `left` columns align left, the rest right."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            str(cell).ljust(widths[i]) if i < left else str(cell).rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(row) for row in rows)])
