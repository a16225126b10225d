"""TaskFuture: a light, thread-safe handle on one piece of background work.

`concurrent.futures.Future` allocates a Condition per future, which alone costs about as much
as the whole spawn budget. This handle allocates nothing until somebody waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from concurrent.futures import CancelledError
from typing import Any, Generic, TypeVar

from loopbridge._exceptions import BridgeLoopThreadError

__all__ = ["TaskFuture"]

logger = logging.getLogger("loopbridge.bridge")

T = TypeVar("T")

# Lifecycle of a task; one int so `done()` is a single comparison.
QUEUED = 0
RUNNING = 1
FINISHED = 2
CANCELLED = 3

# One lock for every future: waiting and callbacks are rare, and contention is negligible.
_LOCK = threading.Lock()


class TaskFuture(Generic[T]):
    """The future of one spawned task: `result(timeout)`, `exception()`, `done()`, `cancel()`."""

    __slots__ = (
        "_callbacks",
        "_exception",
        "_result",
        "_state",
        "_waiter",
        "asyncio_task",
        "key",
        "seq",
        "work",
        "work_name",
    )

    def __init__(
        self,
        work: Coroutine[Any, Any, T] | Callable[[], Awaitable[T]] | None,
        name: str | None,
        key: Hashable | None,
        seq: int,
    ) -> None:
        self.work = work
        self.work_name = name
        self.key = key
        self.seq = seq
        self.asyncio_task: asyncio.Task[Any] | None = None
        self._state = QUEUED
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._waiter: threading.Event | None = None
        self._callbacks: list[Callable[[TaskFuture[T]], object]] | None = None

    def __repr__(self) -> str:
        states = {
            QUEUED: "queued",
            RUNNING: "running",
            FINISHED: "finished",
            CANCELLED: "cancelled",
        }
        key = "" if self.key is None else f" key={self.key!r}"
        return f"<TaskFuture {self.name!r}{key} {states[self._state]}>"

    @property
    def name(self) -> str:
        """The task's name: the one given to spawn, or the qualified name of the work."""
        if self.work_name is None:
            work = self.work
            label = getattr(work, "__qualname__", None) or type(work).__qualname__
            self.work_name = f"{label}#{self.seq}"
        return self.work_name

    def done(self) -> bool:
        """True once the task finished, failed or was cancelled."""
        return self._state >= FINISHED

    def running(self) -> bool:
        """True while the task runs on the background loop."""
        return self._state == RUNNING

    def cancelled(self) -> bool:
        """True if the task was cancelled."""
        return self._state == CANCELLED

    def result(self, timeout: float | None = None) -> T:
        """Wait up to `timeout` seconds and return the result, or raise the task's error.

        Raises:
            TimeoutError: the task did not finish in time (it keeps running).
            concurrent.futures.CancelledError: the task was cancelled.
        """
        self._wait(timeout)
        if self._state == CANCELLED:
            raise CancelledError(self.name)
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait up to `timeout` seconds and return the task's error, or None if it succeeded."""
        self._wait(timeout)
        if self._state == CANCELLED:
            raise CancelledError(self.name)
        return self._exception

    def cancel(self) -> bool:
        """Cancel the task: at once if queued, on the loop if running; False if already done."""
        with _LOCK:
            state = self._state
            if state >= FINISHED:
                return False
            if state == QUEUED:
                self._state = CANCELLED
            task = self.asyncio_task
        if state == QUEUED:
            self._finish_callbacks()
            return True
        # Scheduled rather than called: it then runs after the task's first step, so the
        # bookkeeping around the work always runs, even for a task cancelled at once.
        if task is not None:
            loop = task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        return True

    def add_done_callback(self, fn: Callable[[TaskFuture[T]], object]) -> None:
        """Call `fn(future)` when the task ends, on the thread that ends it (now if done)."""
        with _LOCK:
            if self._state < FINISHED:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    def _wait(self, timeout: float | None) -> None:
        if self._state >= FINISHED:
            return
        if _on_bridge_loop():
            msg = (
                f"waiting for task {self.name!r} on the bridge's own loop would block the loop "
                f"that runs it; `await` the work directly there instead of spawning it"
            )
            raise BridgeLoopThreadError(msg)
        with _LOCK:
            if self._state >= FINISHED:
                return
            if self._waiter is None:
                self._waiter = threading.Event()
            waiter = self._waiter
        if not waiter.wait(timeout):
            msg = f"task {self.name!r} did not finish within {timeout} s"
            raise TimeoutError(msg)

    def _start(self, loop: asyncio.AbstractEventLoop, runner: Coroutine[Any, Any, None]) -> bool:
        """Run `runner` as the task's asyncio task; False (and closed) if it was cancelled.

        State and task change together under the lock, so cancel() never sees a running
        task without the asyncio task it has to cancel.
        """
        with _LOCK:
            if self._state == QUEUED:
                self._state = RUNNING
                self.asyncio_task = loop.create_task(runner)
                return True
        runner.close()
        return False

    def _set_result(self, result: T) -> None:
        with _LOCK:
            self._result = result
            self._state = FINISHED
            waiter, callbacks, self._callbacks = self._waiter, self._callbacks, None
        self._notify(waiter, callbacks)

    def _set_exception(self, exc: BaseException) -> None:
        with _LOCK:
            self._exception = exc
            self._state = FINISHED
            waiter, callbacks, self._callbacks = self._waiter, self._callbacks, None
        self._notify(waiter, callbacks)

    def _set_cancelled(self) -> None:
        with _LOCK:
            if self._state >= FINISHED:
                return
            self._state = CANCELLED
            waiter, callbacks, self._callbacks = self._waiter, self._callbacks, None
        self._notify(waiter, callbacks)

    def _finish_callbacks(self) -> None:
        with _LOCK:
            waiter, callbacks, self._callbacks = self._waiter, self._callbacks, None
        self._notify(waiter, callbacks)

    def _notify(
        self,
        waiter: threading.Event | None,
        callbacks: list[Callable[[TaskFuture[T]], object]] | None,
    ) -> None:
        # The state is final now, so no waiter or callback can be added after the swap.
        if waiter is not None:
            waiter.set()
        if callbacks:
            for fn in callbacks:
                _run_callback(fn, self)


BRIDGE_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""The event loops that bridges run; a blocking wait on one of them is refused."""


def _on_bridge_loop() -> bool:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return loop in BRIDGE_LOOPS


def _run_callback(fn: Callable[[TaskFuture[Any]], object], future: TaskFuture[Any]) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("done callback %r of task %r raised", fn, future.name)
