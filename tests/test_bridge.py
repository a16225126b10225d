"""Bridge: spawn, call, drain and close, proven with events and futures rather than sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    Bridge,
    BridgeClosedError,
    BridgeLoopThreadError,
    Callback,
    DrainError,
    LogContext,
    LoopArtifacts,
    LoopState,
    TaskFuture,
    TrainingBatch,
    TrainLoop,
)

WAIT = 10.0
"""Upper bound for anything that should happen promptly; a hang fails instead of stalling."""


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    bridge = Bridge(name="test-bridge")
    yield bridge
    bridge.close(timeout=5, cancel_grace=1)


class Gate:
    """An asyncio.Event on the bridge's loop that a test thread opens."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    def open(self) -> None:
        self.bridge.loop.call_soon_threadsafe(self.event.set)


async def never() -> None:
    """Waits forever (until cancelled)."""
    await asyncio.Event().wait()


def run_loop_until(bridge: Bridge) -> None:
    """Return once the loop has processed everything already handed to it (a round trip)."""

    async def nothing() -> None:
        pass

    bridge.call(nothing, timeout=WAIT)


class TestSpawn:
    """spawn runs coroutines and async callables on the background loop."""

    def test_coroutine_and_async_callable(self, bridge: Bridge) -> None:
        """Both a coroutine object and an async callable are accepted and run."""

        async def answer() -> int:
            return 42

        assert bridge.spawn(answer()).result(WAIT) == 42
        assert bridge.spawn(answer).result(WAIT) == 42

    def test_runs_on_the_loop_thread(self, bridge: Bridge) -> None:
        """Spawned work runs on the bridge's daemon thread, not the caller's."""

        async def where() -> tuple[int, bool]:
            thread = threading.current_thread()
            return thread.ident or 0, thread.daemon

        ident, daemon = bridge.spawn(where).result(WAIT)
        assert ident != threading.get_ident()
        assert daemon

    def test_started_lazily(self) -> None:
        """A new bridge starts no thread until it is first used."""
        bridge = Bridge(name="lazy-bridge")
        try:
            assert not any(t.name == "lazy-bridge-loop" for t in threading.enumerate())

            async def one() -> int:
                return 1

            assert bridge.spawn(one).result(WAIT) == 1
            assert any(t.name == "lazy-bridge-loop" for t in threading.enumerate())
        finally:
            bridge.close(WAIT)

    def test_refuses_non_async_work(self, bridge: Bridge) -> None:
        """spawn refuses work that is neither a coroutine nor callable."""
        with pytest.raises(TypeError, match="spawn\\(\\) takes a coroutine or an async callable"):
            bridge.spawn(42)  # type: ignore[arg-type]

    def test_sync_callable_refused_at_spawn(self, bridge: Bridge) -> None:
        """A sync callable is refused by spawn itself, before it runs (tests/test_work.py)."""
        ran: list[int] = []
        with pytest.raises(TypeError, match="plain \\(not async\\) callable"):
            bridge.spawn(lambda: ran.append(3), name="sync-fn")  # type: ignore[arg-type,return-value]
        assert ran == []
        assert bridge.drain(WAIT).ok

    def test_names(self, bridge: Bridge) -> None:
        """A task is named by spawn's name, else by the work's qualified name and sequence."""

        async def upload() -> None:
            pass

        named = bridge.spawn(upload, name="upload-7")
        anonymous = bridge.spawn(upload)
        assert named.name == "upload-7"
        assert re.fullmatch(r".*upload#\d+", anonymous.name)
        bridge.drain(WAIT)

    def test_spawn_from_own_loop(self, bridge: Bridge) -> None:
        """A task may spawn onto its own bridge and get a future back at once."""

        async def child() -> str:
            return "child"

        async def parent() -> TaskFuture[str]:
            return bridge.spawn(child)

        inner = bridge.spawn(parent).result(WAIT)
        assert inner.result(WAIT) == "child"


class TestOrdering:
    """Tasks with one key run one at a time in order; different keys run concurrently."""

    def test_per_key_order_under_concurrency(self, bridge: Bridge) -> None:
        """Each key's tasks run in submission order, never two at once, interleaved across keys."""
        log: list[tuple[str, int]] = []
        running: dict[str, int] = {}
        overlap: list[str] = []

        def make(key: str, i: int) -> Any:
            async def work() -> None:
                running[key] = running.get(key, 0) + 1
                if running[key] > 1:
                    overlap.append(key)
                log.append((key, i))
                for _ in range(i % 3 + 1):
                    await asyncio.sleep(0)  # yield, so other keys get in between
                running[key] -= 1

            return work

        keys = ["run-a", "run-b", "run-c"]
        for i in range(60):
            for key in keys:
                bridge.spawn(make(key, i), key=key)
        report = bridge.drain(WAIT)
        assert report.completed == 180
        assert overlap == []
        for key in keys:
            assert [i for k, i in log if k == key] == list(range(60))
        assert len({k for k, _ in log[:6]}) > 1  # keys interleave

    def test_different_keys_run_concurrently(self, bridge: Bridge) -> None:
        """A task of one key can wait for a task of another key (it would deadlock if serial)."""
        gate = Gate(bridge)

        async def waiter() -> str:
            await gate.wait()
            return "released"

        async def opener() -> None:
            gate.event.set()

        first = bridge.spawn(waiter, key="a")
        second = bridge.spawn(opener, key="b")
        assert first.result(WAIT) == "released"
        assert second.result(WAIT) is None

    def test_cancelled_queued_task_keeps_key_order(self, bridge: Bridge) -> None:
        """Cancelling a queued task of a key skips it; the key's later tasks still run in order."""
        gate = Gate(bridge)
        log: list[int] = []

        def make(i: int) -> Any:
            async def work() -> None:
                if i == 0:
                    await gate.wait()
                log.append(i)

            return work

        futures = [bridge.spawn(make(i), key="k", name=f"t{i}") for i in range(4)]
        assert futures[1].cancel()
        gate.open()
        report = bridge.drain(WAIT)
        assert log == [0, 2, 3]
        assert report.completed == 3
        assert [r.name for r in report.cancelled] == ["t1"]

    def test_unhashable_key_is_an_error(self) -> None:
        """An unhashable key is refused by spawn or fails the task; it never hangs silently."""
        bridge = Bridge()
        try:

            async def work() -> int:
                return 1

            key: Any = ["run", 1]
            future: TaskFuture[int] | None = None
            with contextlib.suppress(TypeError):  # refused by spawn: fine
                future = bridge.spawn(work, key=key)
            if future is not None:  # or accepted, and the task fails with TypeError
                assert isinstance(future.exception(1), TypeError)
        finally:
            bridge.close(timeout=0.2, cancel_grace=0.2)

    def test_same_key_waits_for_predecessor(self, bridge: Bridge) -> None:
        """The second task of a key does not start while the first is still running."""
        gate = Gate(bridge)
        started = threading.Event()

        async def first() -> None:
            await gate.wait()

        async def second() -> None:
            started.set()

        one = bridge.spawn(first, key="k")
        two = bridge.spawn(second, key="k")
        run_loop_until(bridge)
        assert not started.is_set()
        assert one.running()
        assert not two.running()
        gate.open()
        assert started.wait(WAIT)
        assert bridge.drain(WAIT).completed == 2


class TestInFlight:
    """No more than `max_in_flight` tasks run at once."""

    def test_bound_reached_and_not_exceeded(self) -> None:
        """With max_in_flight=3 and ten blocked tasks, exactly three run until released."""
        with Bridge(max_in_flight=3) as bridge:
            gate = Gate(bridge)
            reached = threading.Event()
            counts = {"running": 0, "peak": 0}

            async def work() -> None:
                counts["running"] += 1
                counts["peak"] = max(counts["peak"], counts["running"])
                if counts["running"] == 3:
                    reached.set()
                await gate.wait()
                counts["running"] -= 1

            futures = [bridge.spawn(work) for _ in range(10)]
            assert reached.wait(WAIT)
            run_loop_until(bridge)
            assert counts == {"running": 3, "peak": 3}
            assert sum(f.running() for f in futures) == 3
            gate.open()
            report = bridge.drain(WAIT)
        assert report.completed == 10
        assert counts["peak"] == 3
        assert all(f.done() for f in futures)

    def test_validation(self) -> None:
        """max_in_flight and max_pending must be whole numbers of at least 1."""
        with pytest.raises(ValueError, match=r"Bridge\(max_in_flight=0\)"):
            Bridge(max_in_flight=0)
        with pytest.raises(ValueError, match=r"Bridge\(max_pending=-1\)"):
            Bridge(max_pending=-1)


class WatchedSpace(threading.Condition):
    """The scheduler's backpressure condition, reporting when a spawner starts waiting on it:
    proof that the spawner is blocked, without waiting to see that nothing happens."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.first_wait: tuple[float, float] | None = None

    def wait(self, timeout: float | None = None) -> bool:
        started = time.monotonic()
        self.waiting.set()
        try:
            return super().wait(timeout)
        finally:
            if self.first_wait is None:
                self.first_wait = (started, time.monotonic())


def watch_space(bridge: Bridge) -> WatchedSpace:
    """Install a WatchedSpace on the bridge's scheduler (before anything waits on it)."""
    space = WatchedSpace()
    bridge._sched.space = space
    return space


class TestBackpressure:
    """A full queue blocks the spawning thread until a task starts; never on the loop itself."""

    def test_blocks_and_releases(self) -> None:
        """A spawner blocks when max_pending tasks wait, and is released when one starts."""
        with Bridge(max_in_flight=1, max_pending=2) as bridge:
            first_gate, second_gate = Gate(bridge), Gate(bridge)
            first_running = threading.Event()

            async def first() -> None:
                first_running.set()
                await first_gate.wait()

            async def second() -> None:
                await second_gate.wait()

            async def quick() -> None:
                pass

            space = watch_space(bridge)
            bridge.spawn(first, name="first")
            assert first_running.wait(WAIT)
            bridge.spawn(second, name="second")  # queued: 1 of 2
            bridge.spawn(quick, name="third")  # queued: 2 of 2
            assert bridge.stats.backpressure_waits == 0
            returned = threading.Event()
            spawned: list[TaskFuture[None]] = []

            def spawner() -> None:
                spawned.append(bridge.spawn(quick, name="fourth"))
                returned.set()

            thread = threading.Thread(target=spawner)
            thread.start()
            # The spawner is inside the backpressure wait, and has not returned.
            assert space.waiting.wait(WAIT)
            assert not returned.is_set()
            first_gate.open()  # first ends, second starts (and blocks): a slot frees up
            assert returned.wait(WAIT)
            thread.join(WAIT)
            stats = bridge.stats
            assert stats.backpressure_waits == 1
            assert space.first_wait is not None
            began, ended = space.first_wait
            assert stats.backpressure_seconds >= ended - began > 0
            second_gate.open()
            report = bridge.drain(WAIT)
        assert report.completed == 4
        assert spawned[0].done()

    def test_spawn_from_own_loop_with_full_queue(self) -> None:
        """Spawning from the loop thread past max_pending does not block or deadlock."""
        with Bridge(max_in_flight=1, max_pending=1) as bridge:
            done: list[int] = []

            def make(i: int) -> Any:
                async def child() -> None:
                    done.append(i)

                return child

            async def parent() -> int:
                for i in range(20):
                    bridge.spawn(make(i))
                return 20

            assert bridge.call(parent, timeout=WAIT) == 20
            report = bridge.drain(WAIT)
        assert report.completed == 20
        assert done == list(range(20))

    def test_blocked_spawner_released_by_close(self) -> None:
        """A spawner blocked on a full queue when the bridge closes gets BridgeClosedError."""
        bridge = Bridge(max_in_flight=1, max_pending=1, name="bp-close")
        running, released = threading.Event(), threading.Event()

        async def stubborn() -> None:
            # An upload that ignores cancellation until the test releases it, so close()
            # cannot free the queue behind it.
            running.set()
            while not released.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.01)

        async def quick() -> None:
            pass

        space = watch_space(bridge)
        bridge.spawn(stubborn, key="k")
        assert running.wait(WAIT)
        queued = bridge.spawn(quick, key="k")  # waits behind the stubborn task: queue full
        outcome: list[object] = []

        def spawner() -> None:
            try:
                outcome.append(bridge.spawn(quick, key="k", name="late"))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=spawner)
        thread.start()
        assert space.waiting.wait(WAIT)  # blocked by backpressure, inside the wait
        assert thread.is_alive()
        assert outcome == []
        try:
            bridge.close(timeout=0.1, cancel_grace=0.3)
            thread.join(WAIT)
            assert not thread.is_alive()
            (result,) = outcome
            assert isinstance(result, BridgeClosedError), result
            assert "no more work can be spawned" in str(result)
            assert queued.cancelled()
        finally:
            released.set()
            for loop_thread in threading.enumerate():
                if loop_thread.name == "bp-close-loop":
                    loop_thread.join(WAIT)


class TestDrain:
    """drain waits for all work, reports it, and returns by its deadline."""

    def test_deadline_with_never_ending_task(self, bridge: Bridge) -> None:
        """drain returns near its deadline, naming the unfinished task in `pending`."""
        bridge.spawn(never, name="stuck-upload", key="run-1")
        started = time.monotonic()
        report = bridge.drain(timeout=0.3)
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 5.0
        assert report.timed_out
        assert not report.ok
        assert [(r.name, r.key) for r in report.pending] == [("stuck-upload", "run-1")]
        assert "1 pending (stuck-upload [key='run-1'])" in report.summary()
        assert report.elapsed >= 0.25
        assert [r.name for r in bridge.cancel_all(timeout=WAIT).cancelled] == ["stuck-upload"]

    def test_deadline_with_cancel_pending(self, bridge: Bridge) -> None:
        """drain(cancel_pending=True) cancels what is unfinished and names it once, as pending."""

        async def quick() -> None:
            pass

        stuck = bridge.spawn(never, name="stuck")
        bridge.spawn(quick, name="quick")
        started = time.monotonic()
        report = bridge.drain(timeout=0.2, cancel_pending=True, cancel_grace=WAIT)
        assert time.monotonic() - started < 5.0
        assert report.completed == 1
        assert [r.name for r in report.pending] == ["stuck"]
        assert report.cancelled == ()
        assert report.timed_out
        assert "work still pending at the deadline was cancelled" in report.notes
        assert stuck.cancelled()
        assert bridge.drain(WAIT).ok  # reported once, not again

    def test_cancel_pending_with_task_ignoring_cancellation(self, bridge: Bridge) -> None:
        """Work that ignores its cancellation is named, with a note that it may still run."""
        released = threading.Event()

        async def stubborn() -> None:
            while not released.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.01)

        future = bridge.spawn(stubborn, name="stubborn")
        try:
            report = bridge.drain(timeout=0.1, cancel_pending=True, cancel_grace=0.2)
            assert [r.name for r in report.pending] == ["stubborn"]
            assert "some pending work ignored its cancellation and may still run" in report.notes
            assert not future.done()
        finally:
            released.set()
        assert future.result(WAIT) is None

    def test_waits_for_tasks_spawned_by_tasks(self, bridge: Bridge) -> None:
        """Work that spawned work is drained together with its children and grandchildren."""
        futures: list[TaskFuture[Any]] = []

        async def grandchild() -> str:
            await asyncio.sleep(0)
            return "grandchild"

        async def child() -> None:
            await asyncio.sleep(0)
            futures.append(bridge.spawn(grandchild, name="grandchild"))

        async def parent() -> None:
            futures.append(bridge.spawn(child, name="child"))

        futures.append(bridge.spawn(parent, name="parent"))
        report = bridge.drain(WAIT)
        assert report.completed == 3
        by_name = {f.name: f for f in futures}
        assert sorted(by_name) == ["child", "grandchild", "parent"]
        assert all(f.done() for f in futures)
        assert by_name["grandchild"].result(0) == "grandchild"

    def test_futures_done_when_drain_returns(self, bridge: Bridge) -> None:
        """When drain returns, every completed and failed task's future is already done."""

        def make(i: int) -> Any:
            async def work() -> int:
                await asyncio.sleep(0)
                if i % 4 == 0:
                    raise ValueError(i)
                return i

            return work

        futures = [bridge.spawn(make(i), key=i % 3) for i in range(40)]
        report = bridge.drain(WAIT)
        assert [f.done() for f in futures] == [True] * 40
        assert report.completed == 30
        assert len(report.failed) == 10

    def test_failures_in_report_and_log(
        self, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failed task is in the report (name, key, exception) and logged when it fails."""
        caplog.set_level(logging.ERROR, logger="loopbridge.bridge")

        async def upload() -> None:
            raise ConnectionError("bucket unreachable")

        future = bridge.spawn(upload, name="upload-step-3", key="run-9")
        assert isinstance(future.exception(WAIT), ConnectionError)
        report = bridge.drain(WAIT)
        (record,) = [r for r in caplog.records if r.name == "loopbridge.bridge"]
        # Logged by the loop thread as the task failed, not later by the drain.
        assert record.threadName == "test-bridge-loop"
        assert record.levelno == logging.ERROR
        message = record.getMessage()
        assert "upload-step-3" in message
        assert "run-9" in message
        assert "ConnectionError: bucket unreachable" in message
        assert record.exc_info is not None
        (failed,) = report.failed
        assert (failed.name, failed.key) == ("upload-step-3", "run-9")
        assert isinstance(failed.exception, ConnectionError)
        assert not report.ok
        assert "1 failed (upload-step-3 [key='run-9']: ConnectionError" in report.summary()

    def test_failures_kept_for_next_drain_only(self, bridge: Bridge) -> None:
        """A failure is reported by the next drain, and not again by the one after."""

        async def bad() -> None:
            raise KeyError("x")

        bridge.spawn(bad, name="bad").exception(WAIT)
        assert [r.name for r in bridge.drain(WAIT).failed] == ["bad"]
        second = bridge.drain(WAIT)
        assert second.failed == ()
        assert second.ok

    def test_raise_for_failures(self, bridge: Bridge) -> None:
        """raise_for_failures raises an ExceptionGroup holding every failure."""

        async def bad_value() -> None:
            raise ValueError("v")

        async def bad_os() -> None:
            raise OSError("o")

        bridge.spawn(bad_value)
        bridge.spawn(bad_os)
        report = bridge.drain(WAIT)
        with pytest.raises(ExceptionGroup, match="2 background task\\(s\\) failed") as info:
            report.raise_for_failures()
        assert sorted(type(e).__name__ for e in info.value.exceptions) == ["OSError", "ValueError"]

    def test_raise_for_failures_quiet_when_ok(self, bridge: Bridge) -> None:
        """raise_for_failures does nothing when no task failed."""

        async def fine() -> None:
            pass

        bridge.spawn(fine)
        report = bridge.drain(WAIT)
        report.raise_for_failures()
        assert report.ok
        assert report.completed == 1

    def test_raise_if_not_ok(self, bridge: Bridge) -> None:
        """raise_if_not_ok raises DrainError carrying the report when work was not done."""

        async def bad() -> None:
            raise ValueError("bad")

        bridge.spawn(bad, name="bad")
        report = bridge.drain(WAIT)
        with pytest.raises(
            DrainError, match=r"background work not done: 0 completed; 1 failed"
        ) as info:
            report.raise_if_not_ok()
        assert info.value.report is report
        bridge.drain(WAIT).raise_if_not_ok()  # an ok report does not raise

    def test_report_loss_makes_report_not_ok(self, bridge: Bridge) -> None:
        """Data a callback reports as dropped appears in the next report, which is not ok."""
        bridge.report_loss("HttpDashboard", 12, "buffer full")
        bridge.report_loss("HttpDashboard", 0, "nothing lost")  # ignored
        report = bridge.drain(WAIT)
        assert not report.ok
        assert [(loss.source, loss.count) for loss in report.losses] == [("HttpDashboard", 12)]
        assert "HttpDashboard dropped 12: buffer full" in report.summary()
        assert bridge.drain(WAIT).ok

    def test_task_raising_system_exit_does_not_kill_bridge(self) -> None:
        """A task that raises SystemExit is a failed task; the bridge keeps running work."""
        # In a subprocess: a loop thread killed by SystemExit upsets the pytest process.
        script = """
            import threading
            import loopbridge as lb

            bridge = lb.Bridge()

            async def exits():
                raise SystemExit(3)

            async def after():
                return "still alive"

            future = bridge.spawn(exits, name="exits")
            print(type(future.exception(10)).__name__)
            report = bridge.drain(2)
            print([r.name for r in report.failed], report.timed_out)
            # Give a dying loop thread time to end (a live one just times out here).
            for thread in threading.enumerate():
                if thread.name == "loopbridge-loop":
                    thread.join(1)
            try:
                print(bridge.spawn(after).result(2))
            except BaseException as exc:
                print("error", repr(exc))
            bridge.close(0.5, cancel_grace=0.5)
        """
        proc = _run_script(script, timeout=60)
        assert proc.stdout.splitlines() == ["SystemExit", "['exits'] False", "still alive"]

    def test_drain_idle_and_unstarted(self) -> None:
        """Draining a bridge with nothing to do returns an ok report at once."""
        bridge = Bridge()
        try:
            report = bridge.drain(WAIT)
            assert report.ok
            assert report.completed == 0
            assert not report.timed_out
        finally:
            bridge.close(WAIT)

    def test_drain_from_own_loop_refused(self, bridge: Bridge) -> None:
        """drain on the bridge's own loop raises BridgeLoopThreadError instead of deadlocking."""

        async def inner() -> lb.DrainReport:
            return bridge.drain(1)

        future = bridge.spawn(inner)
        with pytest.raises(BridgeLoopThreadError, match="cannot wait on the bridge's own loop"):
            future.result(WAIT)
        bridge.drain(WAIT)


class TestCall:
    """call runs work on the loop and returns its result to the calling thread."""

    def test_result(self, bridge: Bridge) -> None:
        """call returns the work's result."""

        async def create_run() -> str:
            await asyncio.sleep(0)
            return "run-123"

        assert bridge.call(create_run(), timeout=WAIT) == "run-123"
        assert bridge.call(create_run, timeout=WAIT) == "run-123"
        assert bridge.stats.calls == 2

    def test_error(self, bridge: Bridge) -> None:
        """call raises the work's own exception."""

        async def fail() -> None:
            raise PermissionError("403")

        with pytest.raises(PermissionError, match="403"):
            bridge.call(fail, timeout=WAIT)

    def test_timeout_cancels_work(self, bridge: Bridge) -> None:
        """call raises TimeoutError at its timeout and cancels the work."""
        cancelled = threading.Event()

        async def slow() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"did not finish within 0\.2 s; it was cancelled"):
            bridge.call(slow, timeout=0.2)
        assert time.monotonic() - started < 5.0
        assert cancelled.wait(WAIT)

    def test_own_loop_refused(self, bridge: Bridge) -> None:
        """call from the bridge's own loop raises BridgeLoopThreadError saying what to do."""

        async def inner() -> int:
            return 1

        async def outer() -> int:
            return bridge.call(inner, timeout=1)

        with pytest.raises(BridgeLoopThreadError, match="`await` the work directly") as info:
            bridge.spawn(outer).result(WAIT)
        assert "own event loop" in str(info.value)
        bridge.drain(WAIT)

    def test_timeout_before_start_closes_work(self, bridge: Bridge) -> None:
        """A call that times out before the busy loop starts it never runs, and is closed."""
        hold, blocking = threading.Event(), threading.Event()
        ran: list[int] = []

        async def hog() -> None:
            blocking.set()
            hold.wait(WAIT)  # blocks the loop thread on purpose, so the call cannot start

        async def work() -> int:
            ran.append(1)
            return 1

        bridge.spawn(hog)
        assert blocking.wait(WAIT)
        coro = work()
        with pytest.raises(TimeoutError, match="it was cancelled"):
            bridge.call(coro, timeout=0.05)
        hold.set()
        run_loop_until(bridge)
        assert ran == []
        # Closed, so Python does not warn that the coroutine was never awaited.
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED

    def test_call_does_not_count_as_task(self, bridge: Bridge) -> None:
        """A call is not a spawned task: drain reports do not count it."""

        async def one() -> int:
            return 1

        bridge.call(one, timeout=WAIT)
        assert bridge.drain(WAIT).completed == 0


class TestClose:
    """close drains, cancels, stops the loop and joins its thread, once."""

    def test_use_after_close(self) -> None:
        """spawn and call after close raise BridgeClosedError saying what to do instead."""
        bridge = Bridge(name="closing")

        async def work() -> None:
            pass

        bridge.spawn(work)
        bridge.close(WAIT)
        coro = work()
        with pytest.raises(BridgeClosedError, match="spawn work before on_train_end returns"):
            bridge.spawn(coro)
        with pytest.raises(BridgeClosedError, match="or use a new Bridge"):
            bridge.call(work, timeout=1)
        with pytest.raises(BridgeClosedError, match="closed"):
            bridge.start()
        assert bridge.closed
        assert issubclass(BridgeClosedError, RuntimeError)

    def test_close_idempotent(self) -> None:
        """A second close returns the first close's report and does nothing else."""
        bridge = Bridge()

        async def work() -> None:
            pass

        bridge.spawn(work)
        first = bridge.close(WAIT)
        assert bridge.close(WAIT) is first
        assert first.completed == 1

    def test_close_never_started(self) -> None:
        """Closing a bridge that never started is fine and leaves it closed."""
        bridge = Bridge()
        report = bridge.close()
        assert report.ok
        assert bridge.closed
        assert bridge.close() is report

    def test_close_joins_thread(self) -> None:
        """After close the loop thread has ended."""
        bridge = Bridge(name="joined")

        async def work() -> None:
            pass

        bridge.spawn(work).result(WAIT)
        assert any(t.name == "joined-loop" for t in threading.enumerate())
        bridge.close(WAIT)
        assert not any(t.name == "joined-loop" for t in threading.enumerate())

    def test_close_cancels_and_reports_leftovers(self) -> None:
        """close with a deadline cancels unfinished work and names it in its report."""
        bridge = Bridge()
        future = bridge.spawn(never, name="forever")
        started = time.monotonic()
        report = bridge.close(timeout=0.2, cancel_grace=2)
        assert time.monotonic() - started < 5.0
        # Named once, as not done: pending at the deadline, or cancelled.
        assert [r.name for r in report.pending + report.cancelled] == ["forever"]
        assert future.cancelled()
        assert not report.ok

    def test_abandoned_task_future_ends_at_close(self) -> None:
        """Work abandoned by close() ends cancelled, and is not reported failed at GC later."""
        # In a subprocess: the garbage collection of abandoned work must not touch pytest.
        script = """
            import asyncio, gc, threading
            import loopbridge as lb

            bridge = lb.Bridge(name="abandon")

            async def stubborn():
                while True:
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        pass

            future = bridge.spawn(stubborn, name="stubborn")
            report = bridge.close(timeout=0.1, cancel_grace=0.1)
            for thread in threading.enumerate():
                if thread.name == "abandon-loop":
                    thread.join(10)
            print("done" if future.done() else "not done", flush=True)
            del bridge
            gc.collect()
        """
        proc = _run_script(script, timeout=60)
        assert proc.stdout == "done\n"
        assert "failed: GeneratorExit" not in proc.stderr

    def test_context_manager(self) -> None:
        """`with Bridge()` starts the bridge and closes it, after its work, on exit."""
        results: list[int] = []

        async def work() -> None:
            await asyncio.sleep(0)
            results.append(1)

        with Bridge() as bridge:
            bridge.spawn(work)
        assert results == [1]
        assert bridge.closed

    def test_exit_on_exception_does_not_wait_forever(self) -> None:
        """Leaving `with Bridge()` by an exception cancels unfinished work rather than hang."""
        futures: list[TaskFuture[None]] = []
        errors: list[BaseException] = []

        def body() -> None:
            try:
                with Bridge() as bridge:
                    futures.append(bridge.spawn(never, name="forever"))
                    raise RuntimeError("training crashed")
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=body)
        thread.start()
        thread.join(2)
        hung = thread.is_alive()
        if hung:  # unblock the close() that is waiting for the task
            futures[0].cancel()
            thread.join(WAIT)
        assert not hung
        assert [str(e) for e in errors] == ["training crashed"]
        assert futures[0].cancelled()

    def test_shutdown_callback_runs_on_loop_at_close(self) -> None:
        """A shutdown callback is awaited on the loop thread at close, after the work drained."""
        bridge = Bridge(name="shutdown")
        seen: dict[str, Any] = {}

        async def work() -> str:
            await asyncio.sleep(0)
            return "uploaded"

        future = bridge.spawn(work)

        async def close_clients() -> None:
            seen["thread"] = threading.current_thread().name
            seen["work_done"] = future.done()
            seen["calls"] = seen.get("calls", 0) + 1

        bridge.add_shutdown_callback(close_clients)
        bridge.add_shutdown_callback(close_clients)  # registered once
        assert seen == {}
        bridge.close(WAIT)
        assert seen == {"thread": "shutdown-loop", "work_done": True, "calls": 1}

    def test_shutdown_callback_runs_though_nothing_was_spawned(self) -> None:
        """A callback registered on a bridge that has not started still runs at close."""
        bridge = Bridge(name="idle")
        ran = threading.Event()

        async def close_clients() -> None:
            ran.set()

        bridge.add_shutdown_callback(close_clients)
        bridge.close(WAIT)
        assert ran.is_set()

    def test_close_from_own_loop_refused(self, bridge: Bridge) -> None:
        """close on the bridge's own loop raises BridgeLoopThreadError."""

        async def inner() -> None:
            bridge.close()

        with pytest.raises(BridgeLoopThreadError, match="close it from outside"):
            bridge.spawn(inner).result(WAIT)


class TestTaskFuture:
    """The future of a spawned task: result, exception, done, cancel, done callbacks."""

    def test_result_with_timeout(self, bridge: Bridge) -> None:
        """result(timeout) raises TimeoutError while the task runs, then returns its value."""
        gate = Gate(bridge)

        async def work() -> str:
            await gate.wait()
            return "value"

        future = bridge.spawn(work, name="slow")
        with pytest.raises(TimeoutError, match=r"task 'slow' did not finish within 0\.05 s"):
            future.result(timeout=0.05)
        assert not future.done()
        gate.open()
        assert future.result(WAIT) == "value"
        assert future.done()
        assert future.exception(0) is None

    def test_exception(self, bridge: Bridge) -> None:
        """exception() returns the task's error; result() raises it."""

        async def work() -> None:
            raise ArithmeticError("bad")

        future = bridge.spawn(work)
        error = future.exception(WAIT)
        assert isinstance(error, ArithmeticError)
        with pytest.raises(ArithmeticError, match="bad"):
            future.result(0)
        bridge.drain(WAIT)

    def test_cancel_queued(self) -> None:
        """Cancelling a queued task succeeds at once; it never runs and is reported cancelled."""
        with Bridge(max_in_flight=1) as bridge:
            gate = Gate(bridge)
            ran: list[str] = []

            async def blocker() -> None:
                await gate.wait()

            async def queued() -> None:
                ran.append("queued")

            bridge.spawn(blocker)
            future = bridge.spawn(queued, name="queued")
            run_loop_until(bridge)
            assert not future.running()
            assert future.cancel()
            assert future.done()
            assert future.cancelled()
            with pytest.raises(CancelledError):
                future.result(0)
            with pytest.raises(CancelledError):
                future.exception(0)
            gate.open()
            report = bridge.drain(WAIT)
        assert ran == []
        assert [r.name for r in report.cancelled] == ["queued"]
        assert report.completed == 1

    def test_cancel_running(self, bridge: Bridge) -> None:
        """Cancelling a running task cancels it on the loop; its future ends cancelled."""
        started = threading.Event()
        cleaned = threading.Event()

        async def work() -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.set()

        future = bridge.spawn(work, name="running")
        assert started.wait(WAIT)
        assert future.running()
        assert future.cancel()
        with pytest.raises(CancelledError):
            future.result(WAIT)
        assert cleaned.is_set()
        assert future.cancelled()
        report = bridge.drain(WAIT)
        assert [r.name for r in report.cancelled] == ["running"]

    def test_cancel_done_returns_false(self, bridge: Bridge) -> None:
        """A finished task cannot be cancelled."""

        async def work() -> int:
            return 1

        future = bridge.spawn(work)
        future.result(WAIT)
        assert not future.cancel()
        assert not future.cancelled()

    def test_done_callback_before_and_after(self, bridge: Bridge) -> None:
        """A done callback added before the end runs once at the end; one added after, at once."""
        gate = Gate(bridge)
        calls: list[tuple[str, TaskFuture[int], str]] = []
        ended = threading.Event()

        async def work() -> int:
            await gate.wait()
            return 5

        future = bridge.spawn(work)

        def before(f: TaskFuture[int]) -> None:
            calls.append(("before", f, threading.current_thread().name))
            ended.set()

        future.add_done_callback(before)
        assert calls == []
        gate.open()
        assert ended.wait(WAIT)
        future.add_done_callback(
            lambda f: calls.append(("after", f, threading.current_thread().name))
        )
        assert calls == [
            ("before", future, "test-bridge-loop"),
            ("after", future, threading.current_thread().name),
        ]

    def test_done_callback_error_is_logged(
        self, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A done callback that raises is logged, not propagated."""

        async def work() -> int:
            return 1

        future = bridge.spawn(work, name="cb-task")
        future.result(WAIT)

        def broken(f: TaskFuture[int]) -> None:
            raise RuntimeError("callback bug")

        future.add_done_callback(broken)
        assert any("cb-task" in r.getMessage() for r in caplog.records)


def awaitable(future: TaskFuture[Any]) -> asyncio.Future[Any]:
    """Adapt a bridge future for `await` on the running loop, without blocking that loop."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def settle(done: TaskFuture[Any]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.cancel()
        elif (error := done.exception(0)) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(done.result(0))

    future.add_done_callback(lambda done: loop.call_soon_threadsafe(settle, done))
    return waiter


class TestFromAsyncCode:
    """An async test (or app) on its own loop awaits bridge work through a future adapter."""

    async def test_await_spawned_work(self, bridge: Bridge) -> None:
        """Work runs on the bridge's loop while the test's own loop stays free."""
        own = asyncio.get_running_loop()

        async def where() -> bool:
            return asyncio.get_running_loop() is own

        async def fail() -> None:
            raise LookupError("missing")

        async with asyncio.timeout(WAIT):
            assert await awaitable(bridge.spawn(where)) is False
            with pytest.raises(LookupError, match="missing"):
                await awaitable(bridge.spawn(fail))


class TestStats:
    """The bridge counts what it did and how long spawners waited."""

    def test_counts(self, bridge: Bridge) -> None:
        """spawned, completed, failed and cancelled add up after a drain."""

        async def ok() -> None:
            pass

        async def bad() -> None:
            raise ValueError

        for _ in range(5):
            bridge.spawn(ok)
        bridge.spawn(bad)
        stuck = bridge.spawn(never)
        run_loop_until(bridge)
        stuck.cancel()
        bridge.drain(WAIT)
        stats = bridge.stats
        assert (stats.spawned, stats.completed, stats.failed, stats.cancelled) == (7, 5, 1, 1)
        assert stats.spawn_seconds > 0
        assert stats.spawn_mean_us > 0
        assert stats.backpressure_waits == 0
        assert 0 <= stats.busy_seconds <= stats.uptime_seconds


class TestManyThreads:
    """Spawning from several threads at once loses nothing."""

    def test_four_threads_100k_tasks(self) -> None:
        """4 threads spawning 25,000 tasks each: every task runs once and the drain sees all."""
        counter = [0]

        async def increment() -> None:
            counter[0] += 1  # on the loop thread only, so no race

        with Bridge(max_pending=5_000) as bridge:
            barrier = threading.Barrier(4)
            errors: list[BaseException] = []

            def spawner() -> None:
                try:
                    barrier.wait(WAIT)
                    for _ in range(25_000):
                        bridge.spawn(increment)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=spawner) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert errors == []
            report = bridge.drain(60)
            stats = bridge.stats
        assert counter[0] == 100_000
        assert report.completed == 100_000
        assert report.ok
        assert (stats.spawned, stats.completed) == (100_000, 100_000)

    def test_keys_cancels_and_backpressure_together(self) -> None:
        """Under threads, keys, cancels and a small queue, every task ends once, keys in order."""
        log: dict[str, list[tuple[int, int]]] = {}

        def make(key: str, thread: int, i: int) -> Any:
            async def work() -> None:
                log.setdefault(key, []).append((thread, i))
                if i % 3 == 0:
                    await asyncio.sleep(0)  # yield mid-task, so keys interleave

            return work

        futures: list[TaskFuture[None]] = []
        lock = threading.Lock()
        with Bridge(max_in_flight=4, max_pending=100) as bridge:

            def spawner(thread: int) -> None:
                mine = []
                for i in range(2_000):
                    key = f"k{(i * 7 + thread) % 8}"
                    future = bridge.spawn(make(key, thread, i), key=key)
                    if i % 10 == thread:
                        future.cancel()
                    mine.append(future)
                with lock:
                    futures.extend(mine)

            threads = [threading.Thread(target=spawner, args=(t,)) for t in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            report = bridge.drain(60)
        ran = sum(len(entries) for entries in log.values())
        cancelled = sum(f.cancelled() for f in futures)
        assert all(f.done() for f in futures)
        assert ran + cancelled == 8_000
        assert (report.completed, len(report.cancelled)) == (ran, cancelled)
        for entries in log.values():
            for number in range(4):
                indices = [i for t, i in entries if t == number]
                assert indices == sorted(indices)


def _run_script(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


class TestExitHandler:
    """A script that forgets to close its bridge exits within bounds and says what it abandoned."""

    def test_unclosed_bridge_exits_and_warns(self) -> None:
        """A never-ending task is abandoned at exit with a warning on stderr naming it."""
        script = """
            import asyncio
            import loopbridge as lb

            bridge = lb.Bridge(exit_timeout=0.5)

            async def forever():
                await asyncio.Event().wait()

            bridge.spawn(forever(), name="never-ending-upload", key="run-1")
            print("spawned", flush=True)
        """
        started = time.monotonic()
        proc = _run_script(script, timeout=60)
        elapsed = time.monotonic() - started
        assert proc.stdout == "spawned\n"
        assert proc.returncode == 0, proc.stderr
        assert elapsed < 20
        assert "was not closed before interpreter exit" in proc.stderr
        assert "never-ending-upload [key='run-1']" in proc.stderr
        assert "abandoned 1 task(s)" in proc.stderr

    def test_task_ignoring_cancellation_still_exits(self) -> None:
        """Even a task that swallows cancellation cannot hold the process at exit."""
        script = """
            import asyncio
            import loopbridge as lb

            bridge = lb.Bridge(exit_timeout=0.3)

            async def stubborn():
                while True:
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        pass

            bridge.spawn(stubborn(), name="stubborn-task")
            print("spawned", flush=True)
        """
        started = time.monotonic()
        proc = _run_script(script, timeout=60)
        assert time.monotonic() - started < 30
        assert proc.stdout == "spawned\n"
        assert "stubborn-task" in proc.stderr

    def test_closed_bridge_is_quiet_at_exit(self) -> None:
        """A bridge closed by the script produces no exit warning."""
        script = """
            import asyncio
            import loopbridge as lb

            async def work():
                await asyncio.sleep(0)

            with lb.Bridge() as bridge:
                bridge.spawn(work())
            print("done", flush=True)
        """
        proc = _run_script(script)
        assert proc.returncode == 0
        assert proc.stdout == "done\n"
        assert proc.stderr == ""


class TestInterrupt:
    """Ctrl-C during a run: a grace period, the rest cancelled and reported, and the re-raise."""

    def test_sigint_mid_run(self, tmp_path: Path) -> None:
        """SIGINT mid-step: work gets its grace, the rest is cancelled, reported, and re-raised."""
        script = """
            import asyncio
            import sys
            import threading
            import loopbridge as lb

            class Uploader(lb.Callback):
                def on_step_end(self, state, step_idx, batch, metrics):
                    async def quick():
                        await asyncio.sleep(0.3)  # an upload that needs a moment

                    async def stuck():
                        await asyncio.Event().wait()

                    self.spawn(quick(), name="upload-quick")
                    self.spawn(stuck(), name=f"upload-step-{state.step}", key="run")

            def step(state, batch):
                if state.step == 1:
                    print("ready", flush=True)
                    threading.Event().wait(60)
                return {"loss": 1.0}

            lb.TrainLoop(
                step, range(10), out_dir=sys.argv[1], callbacks=[Uploader()],
                interrupt_grace=1.5,
            ).run()
            print("not reached", flush=True)
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert time.monotonic() - started < 20
        assert "not reached" not in out
        assert proc.returncode == -signal.SIGINT
        assert "KeyboardInterrupt" in err
        assert "interrupted at step 1" in err
        # The quick upload finished within the grace period; the stuck one was cancelled
        # (named as cancelled, or as pending at the deadline).
        assert re.search(r"1 completed; 1 (cancelled|pending) \(upload-step-1 \[key='run'\]\)", err)


class Spawner(Callback):
    """Spawns one task per step; `fail` decides whether it raises, `hang` whether it never ends."""

    def __init__(self, *, fail: bool = False, hang: bool = False) -> None:
        self.fail = fail
        self.hang = hang
        self.train_end_seen: list[bool] = []
        self.futures: list[TaskFuture[None]] = []

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        fail, hang = self.fail, self.hang

        async def upload() -> None:
            if hang:
                await asyncio.Event().wait()
            if fail:
                raise ConnectionResetError("peer reset")

        self.futures.append(self.spawn(upload(), name=f"upload-{state.step}", key="run"))

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self.train_end_seen.append(True)


def _loop(tmp_path: Path, callback: Callback, **options: Any) -> TrainLoop:
    return TrainLoop(lambda s, b: {}, range(2), out_dir=tmp_path, callbacks=[callback], **options)


class TestLoopDrainPolicy:
    """The loop drains after on_train_end and raises or warns when work was not done."""

    def test_clean_run_reports_completions(self, tmp_path: Path) -> None:
        """A run whose work all finished has an ok report on its artifacts."""
        artifacts = _loop(tmp_path, Spawner()).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok
        assert artifacts.drain_report.completed == 2
        assert artifacts.bridge_stats is not None
        assert artifacts.bridge_stats.completed == 2

    def test_raise_policy(self, tmp_path: Path) -> None:
        """By default failed work raises DrainError with the report, after on_train_end ran."""
        callback = Spawner(fail=True)
        loop = _loop(tmp_path, callback)
        with pytest.raises(
            DrainError, match="background work not done: 0 completed; 2 failed"
        ) as info:
            loop.run()
        assert callback.train_end_seen == [True]
        report = info.value.report
        assert [(r.name, r.key) for r in report.failed] == [
            ("upload-1", "run"),
            ("upload-2", "run"),
        ]
        assert loop.artifacts is not None
        assert loop.artifacts.drain_report is report

    def test_warn_policy(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """With on_drain_failure="warn" the run returns its artifacts and logs a warning."""
        artifacts = _loop(tmp_path, Spawner(fail=True), on_drain_failure="warn").run()
        report = artifacts.drain_report
        assert report is not None
        assert not report.ok
        assert len(report.failed) == 2
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "loopbridge.loop" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1
        assert "background work not done" in warnings[0]
        assert "upload-1" in warnings[0]

    def test_deadline_cancels_and_raises(self, tmp_path: Path) -> None:
        """Work still pending at drain_timeout is cancelled, reported, and raised by default."""
        callback = Spawner(hang=True)
        loop = _loop(tmp_path, callback, drain_timeout=0.3, interrupt_grace=2)
        started = time.monotonic()
        with pytest.raises(DrainError) as info:
            loop.run()
        assert time.monotonic() - started < 10
        report = info.value.report
        assert report.timed_out
        assert [r.name for r in report.pending + report.cancelled] == ["upload-1", "upload-2"]
        assert callback.train_end_seen == [True]
        # Cancelled, so this run's work cannot leak into a later run's report.
        assert all(f.cancelled() for f in callback.futures)

    def test_deadline_warn(self, tmp_path: Path) -> None:
        """With "warn", a run whose work hit the deadline returns artifacts naming the work."""
        callback = Spawner(hang=True)
        artifacts = _loop(tmp_path, callback, drain_timeout=0.3, on_drain_failure="warn").run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.timed_out
        report = artifacts.drain_report
        assert [r.name for r in report.pending + report.cancelled] == ["upload-1", "upload-2"]
        assert all(f.cancelled() for f in callback.futures)


class TestExperimentBridge:
    """An Experiment runs every loop on one shared bridge and reports per run."""

    def test_one_bridge_for_all_runs(self, tmp_path: Path) -> None:
        """All runs use the experiment's bridge; each run's report counts its own work."""
        loops: list[TrainLoop] = []

        def build(ctx: LogContext) -> TrainLoop:
            loop = TrainLoop(lambda s, b: {}, range(3), out_dir=tmp_path / str(ctx.run_name))
            loops.append(loop)
            return loop

        experiment = lb.Experiment(
            "e", {"a": {}, "b": {}}, build, n_repeats=2, callbacks=[Spawner()]
        )
        result = experiment.run()
        assert experiment.bridge is not None
        assert len(loops) == 4
        assert all(loop.bridge is experiment.bridge for loop in loops)
        assert [r.drain_report.completed for r in result.runs if r.drain_report] == [3, 3, 3, 3]
        assert experiment.bridge.closed

    def test_given_bridge_left_open(self, tmp_path: Path) -> None:
        """An experiment given a bridge uses it and does not close it."""
        with Bridge() as bridge:
            experiment = lb.Experiment(
                "e",
                {"a": {}},
                lambda ctx: TrainLoop(lambda s, b: {}, range(1), out_dir=tmp_path),
                bridge=bridge,
                callbacks=[Spawner()],
            )
            result = experiment.run()
            assert experiment.bridge is bridge
            assert not bridge.closed
            assert result.ok
