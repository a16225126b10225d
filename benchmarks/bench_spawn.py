"""What handing work to the background loop costs: Bridge.spawn against the usual ways.

A thin wrapper over `loopbridge bench --only spawn`; see loopbridge.bench.spawn. Bursts of
100,000 no-op coroutines and a steady loop of ~50 µs GIL-releasing steps, against
run_coroutine_threadsafe, call_soon_threadsafe, anyio's blocking portal, a thread pool and
create_task on the loop's own thread.

Run: python benchmarks/bench_spawn.py [--full] [--json]
"""

from __future__ import annotations

import sys

from loopbridge.bench import main

if __name__ == "__main__":
    sys.exit(main(["--only", "spawn", *sys.argv[1:]]))
