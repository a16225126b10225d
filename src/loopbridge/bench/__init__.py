"""`loopbridge bench`: what the callback layer costs, against the baselines users know.

Two benchmarks, each measuring its baselines in the same run and printing ratios, because
absolute times on shared machines drift:

- `dispatch`: the cost of firing a hook (loopbridge.bench.dispatch);
- `spawn`: the cost of handing work to the background loop (loopbridge.bench.spawn).

The spawn benchmark runs first, before the dispatch baselines import torch and fill the
heap that the garbage collector walks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from loopbridge.bench import dispatch, spawn

__all__ = ["machine", "main"]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        # Other work on a shared machine moves every number; the ratios hold up better.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopbridge bench",
        description="Measure hook dispatch and spawn costs against baselines, in one run.",
    )
    parser.add_argument(
        "--full", action="store_true", help="more repeats and full-size bursts (a few minutes)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--only", choices=("dispatch", "spawn"), help="run one benchmark")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and print their tables (or JSON); 1 if any target fails."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.json:
            print(f"  ... {message}", file=sys.stderr, flush=True)

    info = machine()
    mode = "full" if args.full else "quick"
    if not args.json:
        print(
            f"loopbridge bench ({mode}) on {info['cpus']} CPUs ({info['cpu_model']}), "
            f"{info['implementation']} {info['python']}, load average "
            f"{info['load_average_1m']:.2f} at start"
        )
    results: dict[str, Any] = {"mode": mode, "machine": info}
    tables = []
    if args.only in (None, "spawn"):
        spawned = spawn.run(full=args.full, progress=progress)
        results["spawn"] = spawned.to_json()
        tables.append(spawned.table())
    if args.only in (None, "dispatch"):
        dispatched = dispatch.run(full=args.full, progress=progress)
        results["dispatch"] = dispatched.to_json()
        tables.append(dispatched.table())
    results["seconds"] = time.perf_counter() - started
    targets = [
        t for part in ("spawn", "dispatch") for t in results.get(part, {}).get("targets", [])
    ]
    passed = sum(t["pass"] for t in targets)
    if args.json:
        print(json.dumps(_finite(results), indent=2))
    else:
        print("\n\n".join(tables))
        verdict = "PASS" if passed == len(targets) else "FAIL"
        print(f"\n{verdict}: {passed}/{len(targets)} targets met in {results['seconds']:.0f} s")
    return 0 if passed == len(targets) else 1


def _finite(value: Any) -> Any:
    """NaN (a baseline that was not measured) as null, which JSON has."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
