"""Bridge: one daemon thread running one asyncio loop, fed by a queue that any thread can fill.

This module is the callers' half: the lifecycle, `spawn`, `call`, `drain` and `close`. The
spawn path is the hot path: it allocates one TaskFuture, appends it to a deque (atomic under
the GIL) and wakes the loop only if the loop is asleep and no wake-up is on its way, so a
burst of spawns costs at most one cross-thread wake-up, and that one keeps the GIL
(`_waker.py`). What then happens on the loop thread (per-key order, the in-flight limit,
the ledger) is in `_scheduler.py`.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from types import CoroutineType, TracebackType
from typing import Any, TypeVar

from loopbridge._exceptions import BridgeClosedError, BridgeError, BridgeLoopThreadError
from loopbridge._future import BRIDGE_LOOPS, TaskFuture
from loopbridge._report import BridgeStats, DrainReport, Loss
from loopbridge._scheduler import LoopSelector, Scheduler, record_of
from loopbridge._waker import Waker
from loopbridge._work import check_work

__all__ = ["Bridge"]

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
    """

    def __init__(
        self,
        *,
        max_in_flight: int = 64,
        max_pending: int = 10_000,
        exit_timeout: float = 10.0,
        name: str = "loopbridge",
    ) -> None:
        for label, value in (("max_in_flight", max_in_flight), ("max_pending", max_pending)):
            if not isinstance(value, int) or value < 1:
                msg = f"Bridge({label}={value!r}): give a whole number of at least 1"
                raise ValueError(msg)
        self._max_pending = max_pending
        self._exit_timeout = exit_timeout
        self._name = name

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
                    loop.run_until_complete(asyncio.wait(leftovers, timeout=1.0))
                for task in leftovers:
                    if not task.done():
                        # It ignored its cancellation and dies with the loop; close() has
                        # reported it as abandoned, so asyncio need not print "Task was
                        # destroyed but it is pending!" when it is collected.
                        task._log_destroy_pending = False  # type: ignore[attr-defined]
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                if self._waker is not None:
                    self._waker.detach()
                asyncio.set_event_loop(None)
                loop.close()

    def add_shutdown_callback(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Await `fn()` on the loop during close(), after the work is drained (close clients)."""
        if fn not in self._shutdown_callbacks:
            self._shutdown_callbacks.append(fn)

    def close(self, timeout: float | None = None, *, cancel_grace: float = 5.0) -> DrainReport:
        """Drain for up to `timeout` s, cancel what is left, stop the loop and join its thread.

        Idempotent: a second call returns the first call's report.
        """
        with self._lifecycle:
            if self._state is _State.NEW:
                self._state = _State.CLOSED
                self._close_report = DrainReport(losses=self._sched.take_losses())
                return self._close_report
            if self._state is not _State.RUNNING:
                return self._close_report or DrainReport()
            if self.in_loop_thread():
                msg = "Bridge.close() cannot run on the bridge's own loop; close it from outside"
                raise BridgeLoopThreadError(msg)
            self._state = _State.CLOSING
        started = time.monotonic()
        report = self.drain(timeout, cancel_pending=True, cancel_grace=cancel_grace)
        # Stray call()s, and anything spawned while the drain was ending.
        report = report.merge(self.cancel_all(timeout=cancel_grace))
        self._run_shutdown_callbacks(cancel_grace)
        self._stop_loop(cancel_grace)
        for future in self._sched.unfinished():
            # Work that ignored its cancellation: its future ends too, so no waiter hangs.
            future._set_cancelled()
        with self._lifecycle:
            self._state = _State.CLOSED
        _LIVE_BRIDGES.discard(self)
        with self._sched.space:
            self._sched.space.notify_all()
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

    def _run_shutdown_callbacks(self, timeout: float) -> None:
        if not self._shutdown_callbacks or self._loop is None:
            return

        async def run_all() -> None:
            for fn in self._shutdown_callbacks:
                try:
                    async with asyncio.timeout(timeout):
                        await fn()
                except Exception:
                    logger.exception("shutdown callback %r of %r failed", fn, self)

        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        try:
            future.result(timeout * (len(self._shutdown_callbacks) + 1))
        except TimeoutError:
            future.cancel()
            logger.warning("%r: shutdown callbacks did not finish in time", self)

    def _stop_loop(self, timeout: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            busy = ", ".join(str(record_of(f)) for f in self._sched.running()) or "unknown"
            logger.warning(
                "%r: the loop thread is still busy (%s) and was abandoned; it is a daemon "
                "thread and will not keep the process alive",
                self,
                busy,
            )

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
        """
        if self.in_loop_thread():
            msg = "Bridge.drain() cannot wait on the bridge's own loop; drain from outside it"
            raise BridgeLoopThreadError(msg)
        started = time.monotonic()
        idle = True
        sched = self._sched
        if self._loop is not None and self._state is not _State.CLOSED:
            idle = sched.wait_idle(timeout)
        if idle:
            return sched.take_report(time.monotonic() - started, timed_out=False)
        pending = sched.unfinished()
        notes: tuple[str, ...] = ()
        if cancel_pending:
            if not self._cancel_everything(cancel_grace, started=time.monotonic()):
                notes = ("some pending work ignored its cancellation and may still run",)
            notes = ("work still pending at the deadline was cancelled", *notes)
        return sched.take_report(
            time.monotonic() - started, timed_out=True, pending=pending, notes=notes
        )

    def cancel_all(self, timeout: float = 2.0) -> DrainReport:
        """Cancel every queued and running task, wait up to `timeout` s for them to end."""
        started = time.monotonic()
        idle = self._cancel_everything(timeout, started=started)
        return self._sched.take_report(time.monotonic() - started, timed_out=not idle)

    def _cancel_everything(self, timeout: float, *, started: float) -> bool:
        """Cancel all tasks and calls; True once none is left within `timeout` s."""
        loop, sched = self._loop, self._sched
        if loop is None or loop.is_closed() or self.in_loop_thread():
            return sched.is_idle()
        done = threading.Event()

        def cancel_on_loop() -> None:
            sched.cancel_everything()
            done.set()

        loop.call_soon_threadsafe(cancel_on_loop)
        if not done.wait(timeout):
            return False
        return sched.wait_idle(max(0.0, timeout - (time.monotonic() - started)))

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
        # close() may spend its cancel grace about four times over (cancel, stray calls,
        # shutdown callbacks, joining the thread): keep the whole within exit_timeout.
        grace = min(2.0, self._exit_timeout / 8)
        report = self.close(max(0.0, self._exit_timeout - 4 * grace), cancel_grace=grace)
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
