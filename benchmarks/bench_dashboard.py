"""What HttpDashboard costs the training thread, and whether its memory stays flat.

1. Loop-thread cost of `on_step_end` with 10 metrics, against baselines measured in the same
   run: an empty hook call, a bare list append, a dict copy, and append + copy + time.time()
   (the floor of what the hook must do). Medians over repeats; ratios printed.
2. Memory while logging 100,000 steps to a slow dashboard (50 ms per request) with a small
   buffer: tracemalloc and RSS sampled every 10,000 steps; drops reported.

The dashboard server runs in a subprocess, so it does not compete for this process's GIL.

Targets (PASS/FAIL, exit 1 on a FAIL): traced memory flat within 1 MiB, and every step
delivered or counted as dropped.

Run: .venv/bin/python benchmarks/bench_dashboard.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loopbridge import Bridge
from loopbridge._types import LoopArtifacts, LoopState, TrainingBatch
from loopbridge.callbacks import HttpDashboard

FLAT_MIB = 1.0

METRICS = {f"metric_{i}": float(i) / 7 for i in range(10)}

_SERVER = textwrap.dedent(
    """
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    DELAY = float(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle plus delayed ACKs
        # add about 40 ms to every response.
        disable_nagle_algorithm = True

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            if DELAY:
                time.sleep(DELAY)
            body = b'{"ok":true}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever()
    """
)


@contextmanager
def dashboard_server(delay_s: float) -> Iterator[str]:
    """A plain HTTP server in a subprocess that answers every POST after `delay_s`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(port), str(delay_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark's dashboard server did not start")
        yield f"http://127.0.0.1:{port}/ingest"
    finally:
        proc.terminate()
        proc.wait(10)


def per_call_ns(fn: Callable[[int], None], n: int, repeats: int) -> float:
    """Median over repeats of the time per call, in nanoseconds; `fn(n)` makes n calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn(n)
        times.append((time.perf_counter_ns() - start) / n)
    return statistics.median(times)


def new_state(tmp: Path) -> LoopState:
    """A fresh run state."""
    return LoopState(run_name="bench", run_id="bench", max_steps=None, out_dir=tmp)


def cost_of_on_step_end(n: int, repeats: int, n_live: int, live_repeats: int, url: str) -> None:
    """Part 1: the hook's cost next to its floor.

    The in-process cases keep every row they make, as a dashboard that never posts would;
    runs of `n` calls keep that retained memory (and the GC work it causes) near what a
    pumped buffer holds. The live case runs long enough for the pump to compete for the GIL.
    """
    batch = TrainingBatch(0, None)
    metrics = METRICS
    tmp = Path("/tmp")

    def empty_call(k: int) -> None:
        def hook(state: object, idx: int, b: object, m: object) -> None:
            pass

        state = new_state(tmp)
        for i in range(k):
            hook(state, i, batch, metrics)

    def bare_append(k: int) -> None:
        rows: list[object] = []
        append = rows.append
        for i in range(k):
            append((i, metrics))

    def dict_copy(k: int) -> None:
        for _ in range(k):
            metrics.copy()

    def floor(k: int) -> None:
        rows: list[object] = []
        append = rows.append
        now = time.time
        for i in range(k):
            append((i, i + 1, now(), metrics.copy()))

    def hook_isolated(k: int) -> None:
        # The hook alone: a stream whose pump is marked running, so nothing is spawned.
        dash = HttpDashboard(url, max_buffer_rows=k + 1, max_batch_rows=k + 1)
        stream = dash._open({"run_name": "bench"})
        stream.pump_running = True
        state = new_state(tmp)
        hook = dash.on_step_end
        for i in range(k):
            state.step = i + 1
            hook(state, i, batch, metrics)

    def hook_live(k: int) -> None:
        # The real thing: a bridge, a pump posting to a live server, spawns included.
        with Bridge(name="bench") as bridge:
            # A buffer that holds the whole run: a bare loop outruns any dashboard, and this
            # part measures the hook, not the overflow (part 2 does that).
            dash = HttpDashboard(url, max_batch_rows=500, max_buffer_rows=k + 1)
            dash._loopbridge_bridge = bridge
            state = new_state(tmp)
            dash.on_train_start(state)
            hook = dash.on_step_end
            start = time.perf_counter_ns()
            for i in range(k):
                state.step = i + 1
                hook(state, i, batch, metrics)
            elapsed = time.perf_counter_ns() - start
            dash.on_train_end(state, _artifacts(tmp, k))
            report = bridge.drain(120)
            if not report.ok:
                raise RuntimeError(f"live run lost data: {report}")
        live_ns.append(elapsed / k)

    live_ns: list[float] = []
    results = {
        "empty hook call": per_call_ns(empty_call, n, repeats),
        "bare list append": per_call_ns(bare_append, n, repeats),
        "dict copy (10 keys)": per_call_ns(dict_copy, n, repeats),
        "floor: append+copy+time": per_call_ns(floor, n, repeats),
        "on_step_end, hook only": per_call_ns(hook_isolated, n, repeats),
    }
    for _ in range(live_repeats):
        hook_live(n_live)
    results["on_step_end, live pump"] = statistics.median(live_ns)

    floor_ns = results["floor: append+copy+time"]
    append_ns = results["bare list append"]
    print(
        f"\n1. loop-thread cost per call, 10 metrics: median of {repeats} x {n:,} calls "
        f"(live pump: {live_repeats} runs x {n_live:,} steps to a server in a subprocess)"
    )
    print(f"   {'':28} {'ns/call':>9} {'x append':>9} {'x floor':>8}")
    for name, ns in results.items():
        print(f"   {name:28} {ns:9.0f} {ns / append_ns:9.1f} {ns / floor_ns:8.2f}")


def _artifacts(tmp: Path, steps: int) -> LoopArtifacts:
    return LoopArtifacts(
        out_dir=tmp,
        metrics_path=tmp / "m.jsonl",
        manifest_path=tmp / "manifest.jsonl",
        manifest=[],
        final_checkpoint=None,
        steps_completed=steps,
        stop_reason="max_steps",
    )


def rss_mib() -> float:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_with_slow_dashboard(n_steps: int, url: str) -> bool:
    """Part 2: memory sampled while a slow dashboard makes the buffer overflow; True if the
    targets are met (memory flat, every step delivered or counted as dropped)."""
    buffer_rows = 2_000
    tmp = Path("/tmp")
    batch = TrainingBatch(0, None)
    samples: list[tuple[int, float, float, float]] = []
    tracemalloc.start()
    with Bridge(name="bench-memory") as bridge:
        dash = HttpDashboard(url, max_batch_rows=500, max_buffer_rows=buffer_rows)
        dash._loopbridge_bridge = bridge
        state = new_state(tmp)
        dash.on_train_start(state)
        started = time.perf_counter()
        for i in range(n_steps):
            state.step = i + 1
            # A fresh dict per step, as TrainLoop hands over.
            dash.on_step_end(state, i, batch, dict(METRICS))
            if state.step % (n_steps // 10) == 0:
                current, peak = tracemalloc.get_traced_memory()
                samples.append((state.step, current / 2**20, peak / 2**20, rss_mib()))
        loop_s = time.perf_counter() - started
        dash.on_train_end(state, _artifacts(tmp, n_steps))
        report = bridge.drain(120)
    tracemalloc.stop()
    summary = dash.summary
    print(
        f"\n2. memory, {n_steps:,} steps to a dashboard answering in 50 ms "
        f"(max_buffer_rows={buffer_rows:,}, max_batch_rows=500; tracemalloc on)"
    )
    print(f"   {'step':>8} {'traced MiB':>11} {'peak MiB':>9} {'RSS MiB':>8}")
    for step, traced_mib, peak_mib, rss in samples:
        print(f"   {step:8,} {traced_mib:11.2f} {peak_mib:9.2f} {rss:8.1f}")
    first, last = samples[1], samples[-1]
    growth = last[1] - first[1]
    flat = abs(growth) < FLAT_MIB
    print(
        f"   traced memory from step {first[0]:,} to {last[0]:,}: {growth:+.2f} MiB "
        f"({'flat' if flat else 'NOT flat'})"
    )
    accounted = summary.step_rows + summary.dropped_rows
    print(
        f"   loop ran {loop_s:.2f} s; delivered {summary.step_rows:,} step rows in "
        f"{summary.requests:,} requests; dropped {summary.dropped_rows:,} "
        f"(drain report losses: {sum(loss.count for loss in report.losses):,}); "
        f"delivered + dropped = {accounted:,}"
    )
    counted = accounted == n_steps
    print("\ndashboard targets:")
    print(
        f"{'PASS' if flat else 'FAIL'}  traced memory growth from step {first[0]:,} to "
        f"{last[0]:,}: {growth:+.2f} MiB (|growth| < {FLAT_MIB:g} MiB)"
    )
    print(
        f"{'PASS' if counted else 'FAIL'}  every step delivered or counted as dropped: "
        f"{accounted:,} of {n_steps:,}"
    )
    return flat and counted


def main() -> int:
    """Run both parts and print the tables; 1 if a target is not met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    args = parser.parse_args()
    n, repeats, n_live, live_repeats = (
        (20_000, 3, 20_000, 2) if args.quick else (20_000, 25, 200_000, 5)
    )
    with dashboard_server(0.0) as url:
        cost_of_on_step_end(n, repeats, n_live, live_repeats, url)
    with dashboard_server(0.05) as url:
        ok = memory_with_slow_dashboard(20_000 if args.quick else 100_000, url)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
