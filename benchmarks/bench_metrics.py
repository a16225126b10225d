"""What checking a step's metrics costs the training thread, per step.

After every step TrainLoop turns the step function's metrics into a new `dict[str, float]`:
`coerce_metrics` checks each value and converts numpy scalars and 0-d tensors (before the
check, it was `dict(metrics)`). This runs whole TrainLoops of no-op steps that return 4
metrics, with the check and with the old copy swapped in, interleaved in the same process;
medians of the per-round times. Target: on the fast path (plain floats) the check adds at
most 10% to TrainLoop's own per-step cost. Also shown: the bare function against
`dict(metrics)`, and the slow path for numpy and torch values, for scale.

Run: python benchmarks/bench_metrics.py [--steps N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loopbridge._loop as loop_module
from loopbridge import LoopState, TrainingBatch, TrainLoop
from loopbridge._metrics import coerce_metrics

TARGET_ADDED = 0.10


def _old_copy(out: Any, where: str) -> dict[str, float]:
    copy: dict[str, float] = dict(out or {})
    return copy


def _loop_ns_per_step(metrics: dict[str, Any], steps: int, out_dir: Path) -> float:
    def step(state: LoopState, batch: TrainingBatch) -> dict[str, Any]:
        return metrics

    loop = TrainLoop(step, range(steps), out_dir=out_dir)
    started = time.perf_counter_ns()
    loop.run()
    return (time.perf_counter_ns() - started) / steps


def _fn_ns(fn: Callable[[], object], number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5_000, help="steps per TrainLoop run")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds")
    args = parser.parse_args(argv)
    plain = {f"m{i}": 0.5 + i for i in range(4)}

    with_check: list[float] = []
    without: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lb-bench-metrics-") as tmp:
        for i in range(args.repeats):
            setattr(loop_module, "coerce_metrics", _old_copy)  # noqa: B010
            without.append(_loop_ns_per_step(plain, args.steps, Path(tmp) / f"old-{i}"))
            setattr(loop_module, "coerce_metrics", coerce_metrics)  # noqa: B010
            with_check.append(_loop_ns_per_step(plain, args.steps, Path(tmp) / f"new-{i}"))
    before, after = statistics.median(without), statistics.median(with_check)
    added = (after - before) / before
    print(f"TrainLoop, no-op step returning 4 plain floats, {args.steps:,} steps x {args.repeats}")
    print(f"{'per step':28} {'ns':>9}")
    print(f"{'dict(metrics) (before)':28} {before:9.0f}")
    print(f"{'coerce_metrics (now)':28} {after:9.0f}")
    print(f"{'added':28} {after - before:9.0f}  ({added:+.1%})")
    print()

    rows: dict[str, dict[str, Any]] = {
        f"{n} plain floats": {f"m{i}": 0.5 + i for i in range(n)} for n in (1, 4, 20)
    }
    try:
        import numpy as np

        rows["4 numpy float32"] = {f"m{i}": np.float32(i) for i in range(4)}
    except ImportError:
        pass
    try:
        import torch

        rows["4 torch 0-d tensors"] = {f"m{i}": torch.tensor(float(i)) for i in range(4)}
    except ImportError:
        pass
    print(f"the function alone, ns per call (median of {args.repeats})")
    print(f"{'metrics':22} {'dict(m)':>9} {'coerce':>9} {'added':>9}")
    for label, metrics in rows.items():
        old = [_fn_ns(lambda m=metrics: dict(m), 20_000) for _ in range(args.repeats)]  # type: ignore[misc]
        new = [
            _fn_ns(lambda m=metrics: coerce_metrics(m, "step"), 20_000)  # type: ignore[misc]
            for _ in range(args.repeats)
        ]
        a, b = statistics.median(old), statistics.median(new)
        print(f"{label:22} {a:9.0f} {b:9.0f} {b - a:9.0f}")
    print()
    ok = added <= TARGET_ADDED
    verdict = "PASS" if ok else "FAIL"
    print(
        f"{verdict}  checking 4 plain-float metrics adds {added:+.1%} to TrainLoop's per-step "
        f"cost (<= +{TARGET_ADDED:.0%})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
