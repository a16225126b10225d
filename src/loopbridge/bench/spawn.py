"""What handing work to a background event loop costs the thread that hands it over.

Burst: one thread submits N no-op coroutines as fast as it can. For each way, the submitting
thread's wall time per task (which includes whatever the background thread takes from it
through the GIL while the burst is still arriving), and the end-to-end time from the first
coroutine's creation until the last task has run. The floor creates the tasks with
`create_task` on the loop's own thread and is timed the same way.

Steady: a loop of steps that each do about 50 µs of GIL-releasing work (sha256 of a buffer
sized at start to take that long) and hand one no-op task over. For each way, the wall time
the hand-over adds per step against the same loop without it, paired within each round.

Every no-op counts itself with a C-level counter; the one that reaches N stamps the time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loopbridge import Bridge
from loopbridge.bench._timing import Target, format_table, median, ratio

__all__ = ["SpawnResult", "run"]

_pc = time.perf_counter

BURST_N = 100_000
BIG_PENDING = 200_000
STEADY_STEPS = 20_000
STEP_WORK_S = 50e-6


class _Counter:
    """Counts no-op runs; the N-th stamps the time and sets `done`."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tick = itertools.count(1).__next__
        self.done = threading.Event()
        self.last = 0.0

    def coroutine_fn(self) -> Callable[[], Coroutine[Any, Any, None]]:
        tick, n = self.tick, self.n

        async def noop() -> None:
            if tick() == n:
                self.last = _pc()
                self.done.set()

        return noop

    def sync_fn(self) -> Callable[[], None]:
        tick, n = self.tick, self.n

        def noop() -> None:
            if tick() == n:
                self.last = _pc()
                self.done.set()

        return noop


@contextmanager
def _loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """A plain asyncio loop on a daemon thread, stopped and closed on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


# ---------------------------------------------------------------------------- burst


@dataclass(frozen=True)
class BurstSample:
    """One burst: seconds the submitting thread spent, and until the last task ran."""

    submit_s: float
    end_to_end_s: float
    extra: dict[str, float] = field(default_factory=dict)


def _wait(counter: _Counter) -> None:
    if not counter.done.wait(300):
        raise RuntimeError(f"the burst of {counter.n} tasks did not finish within 300 s")


def burst_floor(n: int) -> BurstSample:
    """`create_task` n times on the loop's own thread."""
    counter = _Counter(n)
    noop = counter.coroutine_fn()
    times: list[float] = []
    with _loop_thread() as loop:

        def submit_all() -> None:
            create_task = loop.create_task
            started = _pc()
            for _ in range(n):
                create_task(noop())
            times.extend((started, _pc()))

        loop.call_soon_threadsafe(submit_all)
        _wait(counter)
    started, submitted = times
    return BurstSample(submitted - started, counter.last - started)


def burst_bridge(n: int, max_pending: int) -> BurstSample:
    """`Bridge.spawn` n times from this thread."""
    counter = _Counter(n)
    noop = counter.coroutine_fn()
    with Bridge(max_pending=max_pending, name="bench") as bridge:
        spawn = bridge.spawn
        started = _pc()
        for _ in range(n):
            spawn(noop())
        submitted = _pc()
        _wait(counter)
        stats = bridge.stats
    extra = {
        "spawn_us": stats.spawn_seconds / n * 1e6,
        "backpressure_s": stats.backpressure_seconds,
        "backpressure_waits": float(stats.backpressure_waits),
    }
    return BurstSample(submitted - started, counter.last - started, extra)


def burst_run_coroutine_threadsafe(n: int) -> BurstSample:
    """`asyncio.run_coroutine_threadsafe` n times from this thread."""
    counter = _Counter(n)
    noop = counter.coroutine_fn()
    with _loop_thread() as loop:
        submit = asyncio.run_coroutine_threadsafe
        started = _pc()
        for _ in range(n):
            submit(noop(), loop)
        submitted = _pc()
        _wait(counter)
    return BurstSample(submitted - started, counter.last - started)


def burst_call_soon_threadsafe(n: int) -> BurstSample:
    """`loop.call_soon_threadsafe(loop.create_task, coro)` n times from this thread."""
    counter = _Counter(n)
    noop = counter.coroutine_fn()
    with _loop_thread() as loop:
        call_soon, create_task = loop.call_soon_threadsafe, loop.create_task
        started = _pc()
        for _ in range(n):
            call_soon(create_task, noop())
        submitted = _pc()
        _wait(counter)
    return BurstSample(submitted - started, counter.last - started)


def burst_anyio_portal(n: int) -> BurstSample:
    """anyio's blocking portal, `start_task_soon` n times from this thread."""
    from anyio.from_thread import start_blocking_portal

    counter = _Counter(n)
    noop = counter.coroutine_fn()
    with start_blocking_portal() as portal:
        submit = portal.start_task_soon
        started = _pc()
        for _ in range(n):
            submit(noop)
        submitted = _pc()
        _wait(counter)
    return BurstSample(submitted - started, counter.last - started)


def burst_thread_pool(n: int) -> BurstSample:
    """`ThreadPoolExecutor().submit` of a sync no-op n times from this thread."""
    counter = _Counter(n)
    noop = counter.sync_fn()
    with ThreadPoolExecutor() as pool:
        submit = pool.submit
        started = _pc()
        for _ in range(n):
            submit(noop)
        submitted = _pc()
        _wait(counter)
    return BurstSample(submitted - started, counter.last - started)


BURST_WAYS: dict[str, Callable[[int], BurstSample]] = {
    "loopbridge spawn, max_pending=200,000": lambda n: burst_bridge(n, BIG_PENDING),
    "loopbridge spawn, default max_pending=10,000": lambda n: burst_bridge(n, 10_000),
    "run_coroutine_threadsafe": burst_run_coroutine_threadsafe,
    "call_soon_threadsafe(create_task)": burst_call_soon_threadsafe,
    "anyio portal start_task_soon": burst_anyio_portal,
    "ThreadPoolExecutor.submit (sync no-op)": burst_thread_pool,
    "create_task on the loop thread (floor)": burst_floor,
}
BIG, DEFAULT, RCTS = list(BURST_WAYS)[:3]
FLOOR = list(BURST_WAYS)[-1]
# The slow ways take 15 to 180 µs a task; the quick run gives them a smaller burst.
_QUICK_N = {RCTS: 20_000, "anyio portal start_task_soon": 5_000}


# ---------------------------------------------------------------------------- steady


def calibrate_buffer(target_s: float = STEP_WORK_S) -> bytes:
    """A buffer whose sha256 takes about `target_s` here (hashlib releases the GIL for it)."""
    size = 64 * 1024
    for _ in range(3):
        buf = bytes(size)
        took = []
        for _ in range(7):
            started = _pc()
            for _ in range(20):
                hashlib.sha256(buf)
            took.append((_pc() - started) / 20)
        size = max(4096, int(size * target_s / median(took)))
    return bytes(size)


Submit = Callable[[], object]


@contextmanager
def _steady_ways() -> Iterator[dict[str, tuple[Submit, Callable[[], None]]]]:
    """Each way's hand-over of one no-op, and how to wait for its tasks to finish."""
    from anyio.from_thread import start_blocking_portal

    async def noop() -> None:
        pass

    def sync_noop() -> None:
        pass

    with (
        Bridge(name="bench-steady") as bridge,
        _loop_thread() as loop_a,
        _loop_thread() as loop_b,
        start_blocking_portal() as portal,
        ThreadPoolExecutor() as pool,
    ):
        spawn, submit = bridge.spawn, pool.submit
        rcts = asyncio.run_coroutine_threadsafe
        call_soon, create_task = loop_b.call_soon_threadsafe, loop_b.create_task
        start_soon = portal.start_task_soon

        def settle_loop(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
            async def all_done() -> None:
                current = asyncio.current_task()
                await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current))

            return lambda: asyncio.run_coroutine_threadsafe(all_done(), loop).result(60)

        def settle_portal() -> None:
            portal.call(asyncio.sleep, 0)  # the portal's tasks are no-ops, done by the next turn

        def settle_pool() -> None:
            pool.submit(sync_noop).result(60)

        yield {
            "no hand-over": (lambda: None, lambda: None),
            "loopbridge spawn": (
                lambda: spawn(noop()),
                lambda: bridge.drain(60).raise_for_failures(),
            ),
            "run_coroutine_threadsafe": (lambda: rcts(noop(), loop_a), settle_loop(loop_a)),
            "call_soon_threadsafe(create_task)": (
                lambda: call_soon(create_task, noop()),
                settle_loop(loop_b),
            ),
            "anyio portal start_task_soon": (lambda: start_soon(noop), settle_portal),
            "ThreadPoolExecutor.submit (sync no-op)": (lambda: submit(sync_noop), settle_pool),
        }


def _steady_round(buf: bytes, steps: int, submit: Submit) -> float:
    sha256 = hashlib.sha256
    started = _pc()
    for _ in range(steps):
        sha256(buf)
        submit()
    return (_pc() - started) / steps


# ---------------------------------------------------------------------------- result


@dataclass
class SpawnResult:
    """Burst samples per way, and steady per-step times per way and round."""

    burst: dict[str, list[BurstSample]] = field(default_factory=dict)
    burst_n: dict[str, int] = field(default_factory=dict)
    steady: dict[str, list[float]] = field(default_factory=dict)
    steady_main_cpu: dict[str, list[float]] = field(default_factory=dict)
    """Per round, the training thread's CPU seconds per step."""
    steady_other_cpu: dict[str, list[float]] = field(default_factory=dict)
    """Per round, every other thread's CPU seconds per step, until the round's tasks ran."""
    steady_steps: int = 0
    step_work_us: float = 0.0
    buffer_bytes: int = 0

    def _submit_us(self, way: str) -> float:
        n = self.burst_n[way]
        return median([s.submit_s for s in self.burst[way]]) / n * 1e6

    def _e2e_s(self, way: str) -> float:
        return median([s.end_to_end_s for s in self.burst[way]])

    def _e2e_us(self, way: str) -> float:
        return self._e2e_s(way) / self.burst_n[way] * 1e6

    def added_us(self, way: str, times: dict[str, list[float]] | None = None) -> float:
        """Median over rounds of the way's per-step time minus no hand-over's, in µs."""
        times = self.steady if times is None else times
        base = times["no hand-over"]
        return median([(w - b) * 1e6 for w, b in zip(times[way], base, strict=True)])

    def targets(self) -> list[Target]:
        """The issue's targets for the burst and the steady case."""
        out = []
        for way in (BIG, DEFAULT):
            if way in self.burst:
                short = way.replace("loopbridge spawn, ", "")
                out.append(
                    Target(
                        f"burst ({short}): run_coroutine_threadsafe / spawn, submitting thread",
                        ratio(self._submit_us(RCTS), self._submit_us(way)),
                        10.0,
                        at_most=False,
                    )
                )
                out.append(
                    Target(
                        f"burst ({short}): spawn end-to-end / in-loop floor",
                        ratio(self._e2e_us(way), self._e2e_us(FLOOR)),
                        1.5,
                    )
                )
        if self.steady:
            ours = self.added_us("loopbridge spawn")
            for way in self.steady:
                if way in ("no hand-over", "loopbridge spawn"):
                    continue
                theirs = self.added_us(way)
                why = ""
                if not theirs > 0:
                    # Noise larger than the baseline's cost: there is no bound to meet.
                    why = (
                        f"{way} measured {theirs:.2f} µs added, within the noise; "
                        f"rerun on a quieter machine (or with --full)"
                    )
                out.append(
                    Target(
                        f"steady: µs per step spawn adds, against {way}'s",
                        ours if not why else math.nan,
                        max(theirs, 0.0),
                        unit=" µs",
                        why=why,
                    )
                )
        return out

    def table(self) -> str:
        """Burst and steady tables, then the targets."""
        lines = []
        if self.burst:
            rows = []
            for way in self.burst:
                extra = self.burst[way][0].extra
                note = ""
                if extra:
                    bp = median([s.extra["backpressure_s"] for s in self.burst[way]])
                    inside = median([s.extra["spawn_us"] for s in self.burst[way]])
                    note = (
                        f"{inside:.2f} µs inside spawn; {bp * 1e3:.0f} ms blocked by backpressure"
                    )
                rows.append(
                    (
                        way,
                        f"{self.burst_n[way]:,}",
                        f"{self._submit_us(way):.2f}",
                        f"{ratio(self._submit_us(RCTS), self._submit_us(way)):.1f}x",
                        f"{self._e2e_s(way) * 1e3:.0f}",
                        f"{self._e2e_us(way):.2f}",
                        f"{ratio(self._e2e_us(way), self._e2e_us(FLOOR)):.2f}x",
                        note,
                    )
                )
            repeats = len(next(iter(self.burst.values())))
            lines += [
                f"spawn burst: no-op tasks submitted from one thread, median of {repeats} "
                "bursts per way (GC on; submit time includes GIL time the loop takes meanwhile)",
                format_table(
                    (
                        "way",
                        "tasks",
                        "submit µs/task",
                        "rcts/this",
                        "end-to-end ms",
                        "µs/task",
                        "x floor",
                        "note",
                    ),
                    rows,
                ),
            ]
        if self.steady:
            rounds = len(self.steady["no hand-over"])
            steady_rows = []
            for way, per_step in self.steady.items():
                cells = ["", "", ""]
                if way != "no hand-over":
                    cells = [
                        f"{self.added_us(way):.2f}",
                        f"{self.added_us(way, self.steady_main_cpu):.2f}",
                        f"{self.added_us(way, self.steady_other_cpu):.2f}",
                    ]
                steady_rows.append((way, f"{median(per_step) * 1e6:.2f}", *cells))
            lines += [
                "",
                f"spawn steady: {self.steady_steps:,} steps of sha256 over "
                f"{self.buffer_bytes:,} bytes (sized for 50 µs; {self.step_work_us:.0f} µs "
                f"per step with no hand-over, GIL released) "
                f"+ one hand-over each, in {rounds} interleaved rounds; added = median of "
                "the per-round difference with no hand-over. The CPU columns (this thread's, "
                "and all other threads' until the tasks ran) hold up under load; the target "
                "is on wall time",
                format_table(
                    (
                        "way",
                        "wall µs per step",
                        "added wall µs",
                        "added CPU µs, this thread",
                        "added CPU µs, other threads",
                    ),
                    steady_rows,
                ),
            ]
        lines += ["", "spawn targets:", *(t.line() for t in self.targets())]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The results as plain data."""
        return {
            "burst": {
                way: {
                    "tasks": self.burst_n[way],
                    "submit_us_per_task": self._submit_us(way),
                    "end_to_end_s": self._e2e_s(way),
                    "samples": [
                        {"submit_s": s.submit_s, "end_to_end_s": s.end_to_end_s, **s.extra}
                        for s in samples
                    ],
                }
                for way, samples in self.burst.items()
            },
            "steady": {
                "steps": self.steady_steps,
                "buffer_bytes": self.buffer_bytes,
                "step_work_us": self.step_work_us,
                "us_per_step": {w: [t * 1e6 for t in v] for w, v in self.steady.items()},
                "added_us_per_step": {
                    w: self.added_us(w) for w in self.steady if w != "no hand-over"
                },
                "added_cpu_us_per_step_this_thread": {
                    w: self.added_us(w, self.steady_main_cpu)
                    for w in self.steady
                    if w != "no hand-over"
                },
                "added_cpu_us_per_step_other_threads": {
                    w: self.added_us(w, self.steady_other_cpu)
                    for w in self.steady
                    if w != "no hand-over"
                },
            },
            "targets": [t.to_json() for t in self.targets()],
        }


def run(*, full: bool = False, progress: Callable[[str], None] | None = None) -> SpawnResult:
    """Measure the burst and the steady case for every way."""
    result = SpawnResult()
    repeat = 5 if full else 3
    for way in BURST_WAYS:
        result.burst_n[way] = BURST_N if full else _QUICK_N.get(way, BURST_N)
        result.burst[way] = []
    for _ in range(repeat):
        for way, fn in BURST_WAYS.items():
            if progress is not None:
                progress(f"spawn burst: {way}")
            result.burst[way].append(fn(result.burst_n[way]))

    buf = calibrate_buffer()
    result.buffer_bytes = len(buf)
    # Many short rounds: a median of paired differences shrugs off the other processes'
    # bursts on a shared machine better than a few long rounds.
    rounds = 40 if full else 20
    steps = 5 * STEADY_STEPS // rounds if full else STEADY_STEPS // rounds
    result.steady_steps = steps * rounds
    with _steady_ways() as ways:
        for times in (result.steady, result.steady_main_cpu, result.steady_other_cpu):
            times.update({way: [] for way in ways})
        for _ in range(rounds):
            for way, (submit, settle) in ways.items():
                if progress is not None:
                    progress(f"spawn steady: {way}")
                process_cpu, thread_cpu = time.process_time(), time.thread_time()
                result.steady[way].append(_steady_round(buf, steps, submit))
                main_cpu = time.thread_time() - thread_cpu
                settle()
                other_cpu = time.process_time() - process_cpu - (time.thread_time() - thread_cpu)
                result.steady_main_cpu[way].append(main_cpu / steps)
                result.steady_other_cpu[way].append(other_cpu / steps)
    result.step_work_us = median(result.steady["no hand-over"]) * 1e6
    return result
