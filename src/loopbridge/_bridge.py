"""Bridge: one daemon thread running one asyncio loop, fed by a queue that any thread can fill.

This module is the callers' half: the lifecycle, `spawn`, `call`, `drain` and `close`. The
spawn path is the hot path: it allocates one TaskFuture, appends it to a deque (atomic under
the GIL) and wakes the loop only if the loop is asleep and no wake-up is on its way, so a
burst of spawns costs at most one cross-thread wake-up, and that one keeps the GIL
(`_waker.py`). What then happens on the loop thread (per-key order, the in-flight limit,
the ledger) is in `_scheduler.py`.

Every wait is bounded, all phases of a close together; the waits live in `_closing.py`.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from types import CoroutineType, TracebackType
from typing import Any, TypeVar

from loopbridge._closing import (
    CLOSE_MARGIN_S,
    abandon_work,
    cancel_all,
    close_work,
    drain_work,
)
from loopbridge._exceptions import BridgeClosedError, BridgeError, BridgeLoopThreadError
from loopbridge._future import BRIDGE_LOOPS, TaskFuture
from loopbridge._report import BridgeStats, DrainReport, Loss, TaskRecord
from loopbridge._scheduler import LoopSelector, Scheduler, record_of
from loopbridge._waker import Waker
from loopbridge._work import check_work

__all__ = ["CLOSE_MARGIN_S", "Bridge"]

logger = logging.getLogger("loopbridge.bridge")

T = TypeVar("T")
Work = Coroutine[Any, Any, T] | Callable[[], Awaitable[T]]

_perf_ns = time.perf_counter_ns


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


# spawn compares with a module global: an enum member lookup costs ~50 ns on 3.11.
_RUNNING = _State.RUNNING


class Bridge:
    """Runs async work for sync code on one background event loop; drains it on demand.

    Use it as a context manager, or let it start on the first `spawn` and `close()` it.

    Args:
        max_in_flight: tasks running at once on the loop.
        max_pending: tasks queued and not yet started; a spawn beyond it blocks its caller.
        exit_timeout: how long the interpreter-exit handler drains a bridge left open.
        name: names the loop thread.
        progress_every: while a drain or close waits longer than this, it logs a warning
            naming what it waits for, and again every `progress_every` s (0 turns it off).
    """

    def __init__(
        self,
        *,
        max_in_flight: int = 64,
        max_pending: int = 10_000,
        exit_timeout: float = 10.0,
        name: str = "loopbridge",
        progress_every: float = 5.0,
    ) -> None:
        for label, value in (("max_in_flight", max_in_flight), ("max_pending", max_pending)):
            if not isinstance(value, int) or value < 1:
                msg = f"Bridge({label}={value!r}): give a whole number of at least 1"
                raise ValueError(msg)
        self._max_pending = max_pending
        self._exit_timeout = exit_timeout
        self._name = name
        self._progress_every = progress_every

        self._state = _State.NEW
        self._lifecycle = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._selector: LoopSelector | None = None
        self._waker: Waker | None = None
        self._started_at = 0.0
        self._sched = Scheduler(max_in_flight=max_in_flight, max_pending=max_pending)
        self._seq = itertools.count(1)

        # Timings of the calling threads; approximate when several threads spawn at once.
        self._bp_waits = 0
        self._bp_ns = 0
        self._spawn_ns = 0

        self._shutdown_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._close_report: DrainReport | None = None
        self._closer: int | None = None
        """The thread running close(); it may re-enter close() if a Ctrl-C interrupted it."""
        self._callbacks_done = False
        self._leftover_wait = 1.0
        """How long the loop thread, once stopped, waits for the tasks it cancels."""

    def __repr__(self) -> str:
        return f"<Bridge {self._name!r} {self._state.value}>"

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # The block failed: cancel what is left rather than wait on it, and say what it was.
        report = self.close(timeout=0)
        if not report.ok:
            logger.warning("%r left by %s: %s", self, exc_type.__name__, report.summary())

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self._state in (_State.CLOSING, _State.CLOSED)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background event loop (starting the bridge if needed)."""
        self.start()
        loop = self._loop
        if loop is None:  # pragma: no cover - start() either sets it or raises
            raise BridgeError("the bridge's event loop did not start")
        return loop

    def in_loop_thread(self) -> bool:
        """True when called from the bridge's own event-loop thread."""
        return threading.get_ident() == self._thread_id

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop thread if it is not running yet; spawn does this on first use."""
        if self._state is _State.RUNNING:
            return
        with self._lifecycle:
            state: _State = self._state  # may have changed while we waited for the lock
            if state is _State.RUNNING:
                return
            if state is not _State.NEW:
                msg = (
                    f"{self!r} is closed and cannot be restarted; create a new Bridge, "
                    f"or spawn work before on_train_end returns"
                )
                raise BridgeClosedError(msg)
            ready = threading.Event()
            thread = threading.Thread(
                target=self._thread_main, args=(ready,), name=f"{self._name}-loop", daemon=True
            )
            thread.start()
            if not ready.wait(30):
                raise BridgeError(f"{self!r}: the event-loop thread did not start within 30 s")
            self._thread = thread
            self._started_at = time.monotonic()
            self._state = _State.RUNNING
            _LIVE_BRIDGES.add(self)

    def _thread_main(self, ready: threading.Event) -> None:
        selector = LoopSelector(self._sched)
        loop = asyncio.SelectorEventLoop(selector)
        asyncio.set_event_loop(loop)
        self._selector = selector
        self._sched.loop = loop
        self._waker = Waker(loop, self._sched.pump_soon)
        self._loop = loop
        BRIDGE_LOOPS.add(loop)
        self._thread_id = threading.get_ident()
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    wait = asyncio.wait(leftovers, timeout=self._leftover_wait)
                    loop.run_until_complete(wait)
                for task in leftovers:
                    if not task.done():
                        # It ignored its cancellation and dies with the loop; close() has
                        # reported it as abandoned, so asyncio need not print "Task was
                        # destroyed but it is pending!" when it is collected.
                        task._log_destroy_pending = False  # type: ignore[attr-defined]
                self._close_unstarted_work()
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                if self._waker is not None:
                    self._waker.detach()
                asyncio.set_event_loop(None)
                loop.close()

    def _close_unstarted_work(self) -> None:
        """Close the coroutines of tasks cancelled before their first step (on the loop thread)."""
        sched = self._sched
        for future in [*sched.outstanding.copy().values(), *sched.inbox]:
            work = future.work
            if type(work) is CoroutineType and inspect.getcoroutinestate(work) == "CORO_CREATED":
                work.close()

    def add_shutdown_callback(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Await `fn()` on the loop during close(), after the work is drained (close clients).

        Starts the bridge if it has not started: close() runs the callbacks on the loop, and a
        bridge that never started has none, so they would be dropped.
        """
        self.start()
        if fn not in self._shutdown_callbacks:
            self._shutdown_callbacks.append(fn)

    def close(self, timeout: float | None = None, *, cancel_grace: float = 5.0) -> DrainReport:
        """Drain for up to `timeout` s, cancel what is left, stop the loop and join its thread.

        Returns within `timeout + cancel_grace + CLOSE_MARGIN_S` s: cancelled work gets up
        to `cancel_grace` s to end, and the shutdown callbacks and the join share what is
        left of it plus the margin. Work that outlasts that is abandoned (the loop thread is
        a daemon) and named in the report and the log. Idempotent: a second call returns
        the first call's report; a close interrupted by Ctrl-C may be called again.
        """
        with self._lifecycle:
            if self._state is _State.NEW:
                self._state = _State.CLOSED
                self._close_report = DrainReport(losses=self._sched.take_losses())
                return self._close_report
            reentry = self._state is _State.CLOSING and self._closer == threading.get_ident()
            if self._state is not _State.RUNNING and not reentry:
                return self._close_report or DrainReport()
            if self.in_loop_thread():
                msg = "Bridge.close() cannot run on the bridge's own loop; close it from outside"
                raise BridgeLoopThreadError(msg)
            self._state = _State.CLOSING
            self._closer = threading.get_ident()
        started = time.monotonic()
        report = close_work(self, timeout, cancel_grace)
        report = report.merge(self._finish_close())
        self._close_report = DrainReport(
            completed=report.completed,
            failed=report.failed,
            cancelled=report.cancelled,
            pending=report.pending,
            losses=report.losses,
            elapsed=time.monotonic() - started,
            timed_out=report.timed_out,
            notes=report.notes,
        )
        return self._close_report

    def abandon(self) -> DrainReport:
        """Give up on all work now: cancel it without waiting, stop the loop, skip the join.

        For a third Ctrl-C, when nothing may delay the exit any more. The report names what
        was abandoned (as pending); shutdown callbacks do not run.
        """
        with self._lifecycle:
            if self._state is _State.NEW:
                self._state = _State.CLOSED
                self._close_report = DrainReport(losses=self._sched.take_losses())
                return self._close_report
            if self._state is _State.CLOSED:
                return self._close_report or DrainReport()
            if self.in_loop_thread():
                msg = "Bridge.abandon() cannot run on the bridge's own loop; call it from outside"
                raise BridgeLoopThreadError(msg)
            # Closed at once: no task may spawn more work after the report is taken.
            self._state = _State.CLOSED
            self._closer = threading.get_ident()
        report = abandon_work(self)
        report = report.merge(self._finish_close())
        self._close_report = report
        return report

    def _finish_close(self) -> DrainReport:
        """End every future left; report, as pending, work spawned after the close's report."""
        with self._lifecycle:
            self._state = _State.CLOSED
        late = self._sched.unfinished()
        report = DrainReport()
        if late:
            report = self._sched.take_report(
                0.0,
                timed_out=True,
                pending=late,
                notes=("work spawned while the bridge closed was cancelled",),
                give_up=True,
            )
        for future in self._sched.unfinished(given_up=True):
            # A task that never started never will: close its coroutine (no "never awaited").
            future.cancel()
            work = future.work
            if future.asyncio_task is None and isinstance(work, Coroutine):
                work.close()
            # Work that ignored its cancellation: its future ends too, so no waiter hangs.
            future._set_cancelled()
        _LIVE_BRIDGES.discard(self)
        with self._sched.space:
            self._sched.space.notify_all()
        return report

    # ------------------------------------------------------------------ spawn and call

    def spawn(
        self, work: Work[T], *, name: str | None = None, key: Hashable | None = None
    ) -> TaskFuture[T]:
        """Queue `work` (a coroutine or an async callable) on the loop and return its future.

        Safe from any thread, the loop's own included. Tasks sharing a `key` run one at a time
        in submission order. When `max_pending` tasks are already queued, the caller blocks
        until one starts (never on the loop's own thread, where blocking would deadlock).
        """
        started = _perf_ns()
        if self._state is not _RUNNING:
            self._check_can_spawn(work)
        if type(work) is not CoroutineType:
            check_work(work)  # before anything runs: a plain function would block the loop
        if key is not None:
            _check_key(key)
        seq = next(self._seq)
        future: TaskFuture[T] = TaskFuture(work, name, key, seq)
        sched = self._sched
        if seq - sched.taken > self._max_pending:
            self._wait_for_space(seq)
            if self._state is not _RUNNING:
                # close() began while we waited: queued now, the task would never run.
                self._check_can_spawn(work)
        sched.inbox.append(future)
        if not sched.wake_scheduled:
            sched.wake_scheduled = True
            # Set before `sleeping` is read: a busy loop then finds the work before it next
            # sleeps, and only a sleeping one needs waking (see LoopSelector).
            sched.unsent = True
            selector = self._selector
            assert selector is not None  # set before the state becomes RUNNING
            if selector.sleeping:
                waker = self._waker
                assert waker is not None  # set with the selector
                waker.wake()
        self._spawn_ns += _perf_ns() - started
        return future

    def _check_can_spawn(self, work: object) -> None:
        if self._state is _State.NEW:
            self.start()
            return
        if self._state is _State.CLOSING and self.in_loop_thread():
            return  # tasks may spawn follow-up work while close() drains
        if isinstance(work, Coroutine):
            work.close()
        msg = (
            f"{self!r} is {self._state.value}: no more work can be spawned; spawn work "
            f"before on_train_end returns, or use a new Bridge"
        )
        raise BridgeClosedError(msg)

    def _wait_for_space(self, seq: int) -> None:
        if self.in_loop_thread():
            return  # blocking here would stop the very loop that makes room
        started = _perf_ns()
        sched = self._sched
        with sched.space:
            sched.space_waiters += 1
            try:
                while seq - sched.taken > self._max_pending and self._state is not _State.CLOSED:
                    # The timeout is a safety net; the loop notifies as it starts tasks.
                    sched.space.wait(0.5)
            finally:
                sched.space_waiters -= 1
        self._bp_waits += 1
        self._bp_ns += _perf_ns() - started

    def call(self, work: Work[T], timeout: float | None = None) -> T:
        """Run `work` on the loop now, wait up to `timeout` s, and return its result.

        For rare work that needs an answer (create a remote run and keep its id). It skips the
        queue and the in-flight limit. On timeout the work is cancelled and TimeoutError raised.
        """
        if self.in_loop_thread():
            if isinstance(work, Coroutine):
                work.close()
            msg = (
                "Bridge.call() was called on the bridge's own event loop, where waiting would "
                "deadlock; `await` the work directly, or use spawn() and don't wait"
            )
            raise BridgeLoopThreadError(msg)
        if type(work) is not CoroutineType:
            check_work(work, "call")
        if self._state is not _State.RUNNING:
            self._check_can_spawn(work)
        future: TaskFuture[T] = TaskFuture(work, None, None, 0)
        loop = self.loop
        loop.call_soon_threadsafe(self._sched.start_call, future)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            msg = (
                f"Bridge.call({future.name!r}) did not finish within {timeout} s; it was cancelled"
            )
            raise TimeoutError(msg) from None

    # ------------------------------------------------------------------ drain and report

    def drain(
        self,
        timeout: float | None = None,
        *,
        cancel_pending: bool = False,
        cancel_grace: float = 2.0,
    ) -> DrainReport:
        """Wait up to `timeout` s for all work spawned so far, and the work it spawns.

        Returns by the deadline, always. The report covers what ended since the previous
        drain and names, in `pending`, what had not ended at the deadline. That work keeps
        running, unless `cancel_pending`: then it is cancelled, given up to `cancel_grace` s
        to end, and still reported under `pending` (not `cancelled`), noted as cancelled.
        Work reported so is given up: later drains neither wait for it nor report it again.
        """
        if self.in_loop_thread():
            msg = "Bridge.drain() cannot wait on the bridge's own loop; drain from outside it"
            raise BridgeLoopThreadError(msg)
        return drain_work(
            self,
            timeout,
            cancel_pending=cancel_pending,
            cancel_grace=cancel_grace,
            wait=self._loop is not None and self._state is not _State.CLOSED,
        )

    def cancel_all(self, timeout: float = 2.0) -> DrainReport:
        """Cancel every queued and running task, wait up to `timeout` s for them to end."""
        return cancel_all(self, timeout)

    def waiting(self) -> tuple[TaskRecord, ...]:
        """The tasks queued or running now, oldest first (not those a drain gave up on)."""
        return tuple(record_of(f) for f in self._sched.unfinished())

    def report_loss(self, source: str, count: int, detail: str) -> None:
        """Record data a callback dropped, so the next drain report shows it (and is not ok)."""
        if count <= 0:
            return
        logger.warning("%s dropped %d: %s", source, count, detail)
        self._sched.record_loss(Loss(source, count, detail))

    @property
    def stats(self) -> BridgeStats:
        """Counters and timings since the bridge was created."""
        uptime = time.monotonic() - self._started_at if self._started_at else 0.0
        idle_ns = self._selector.idle_ns if self._selector is not None else 0
        # Counted from where tasks are rather than on the spawn path; exact when quiet.
        sched = self._sched
        finished = sched.n_completed + sched.n_failed + sched.n_cancelled
        spawned = finished + len(sched.outstanding) + len(sched.inbox)
        return BridgeStats(
            spawned=spawned,
            completed=sched.n_completed,
            failed=sched.n_failed,
            cancelled=sched.n_cancelled,
            calls=sched.n_calls,
            spawn_seconds=self._spawn_ns / 1e9,
            backpressure_waits=self._bp_waits,
            backpressure_seconds=self._bp_ns / 1e9,
            busy_seconds=max(0.0, uptime - idle_ns / 1e9) if self._started_at else 0.0,
            uptime_seconds=uptime,
        )

    def _close_at_exit(self) -> None:
        if self._state is not _State.RUNNING:
            return
        # close() takes at most timeout + grace + CLOSE_MARGIN_S: keep that within exit_timeout.
        grace = min(2.0, self._exit_timeout / 4)
        report = self.close(
            max(0.0, self._exit_timeout - grace - CLOSE_MARGIN_S), cancel_grace=grace
        )
        if report.ok:
            logger.info("%r was closed at interpreter exit: %s", self, report.summary())
            return
        abandoned = report.pending + report.cancelled
        names = "; ".join(str(r) for r in abandoned) or "none"
        logger.warning(
            "%r was not closed before interpreter exit; drained for up to %.1f s and "
            "abandoned %d task(s): %s. Close it (or use `with Bridge()`) to wait for them. %s",
            self,
            self._exit_timeout,
            len(abandoned),
            names,
            report.summary(),
        )


def _check_key(key: object) -> None:
    try:
        hash(key)
    except TypeError:
        msg = (
            f"spawn(key={key!r}): a key must be hashable; use a str or a tuple, "
            f"such as the run name"
        )
        raise TypeError(msg) from None


_LIVE_BRIDGES: weakref.WeakSet[Bridge] = weakref.WeakSet()


@atexit.register
def _close_bridges_at_exit() -> None:
    for bridge in list(_LIVE_BRIDGES):
        bridge._close_at_exit()
