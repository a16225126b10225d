"""The loop-thread half of a Bridge: per-key queues, the in-flight limit, and the ledger.

Everything here runs on the bridge's event-loop thread, except the few methods that say
otherwise. Work arrives through `inbox`, a deque that spawning threads append to (atomic
under the GIL); `pump` moves it into the ready queue or behind a running task of its key,
and starts what the in-flight limit allows. The ledger (`_ledger.py`) records what ended,
for the next drain report, each task once.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import threading
import time
from collections import deque
from collections.abc import Awaitable, Coroutine, Hashable
from types import CoroutineType
from typing import Any, TypeVar

from loopbridge._future import TaskFuture
from loopbridge._ledger import Ledger, record_of
from loopbridge._report import DrainReport, Loss

__all__ = ["LoopSelector", "Scheduler", "record_of"]

logger = logging.getLogger("loopbridge.bridge")

T = TypeVar("T")

_perf_ns = time.perf_counter_ns

# An inbox at least this long when the loop wakes means a burst is under way.
_BURST = 256
_BURST_SETTLE_S = 0.0005
_BURST_QUIET_S = 0.005
# After moving work, look at the inbox again this soon: see Scheduler.pump.
_LINGER_S = 0.0005


class LoopSelector(selectors.DefaultSelector):
    """The loop's selector: it times the loop's waits, and looks for unsent work before each.

    A spawn that finds no wake-up on its way sets `Scheduler.unsent`, then reads `sleeping`,
    and sends a wake-up only if the loop sleeps. The selector sets `sleeping`, then reads
    `unsent`. So either spawn sees the loop asleep and wakes it, or the loop sees the work
    before it sleeps. A spawn onto a busy loop thus needs no wake-up: the wake-up's socket
    write releases the GIL, and winning it back from a busy loop thread can cost the
    training thread a whole switch interval (5 ms).
    """

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self.idle_ns = 0
        self.sleeping = False
        self._scheduler = scheduler

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        scheduler = self._scheduler
        self.sleeping = True
        if scheduler.unsent:
            timeout = 0
        start = _perf_ns()
        try:
            return super().select(timeout)
        finally:
            self.sleeping = False
            self.idle_ns += _perf_ns() - start
            if scheduler.unsent:
                scheduler.unsent = False
                scheduler.pump_soon()


class Scheduler:
    """Runs spawned tasks on one loop: in order per key, at most `max_in_flight` at once."""

    def __init__(self, *, max_in_flight: int, max_pending: int) -> None:
        self._max_in_flight = max_in_flight
        self._max_pending = max_pending
        self.loop: asyncio.AbstractEventLoop | None = None

        # Shared with spawning threads.
        self.inbox: deque[TaskFuture[Any]] = deque()
        self.wake_scheduled = False
        """A pump is on its way: a spawn need not arrange one."""
        self.unsent = False
        """A spawn arranged a pump without waking the loop; the selector will see to it."""
        self.taken = 0
        """Tasks taken off the queues (started, or retired as cancelled); any thread reads it."""
        self.space = threading.Condition()
        self.space_waiters = 0

        # The loop thread's own.
        self._pump_queued = False
        self._timer: asyncio.TimerHandle | None = None
        self._burst_seen = 0
        self._burst_grew_at = 0.0
        self._ready: deque[TaskFuture[Any]] = deque()
        self._key_queues: dict[Hashable, deque[TaskFuture[Any]]] = {}
        self.outstanding: dict[int, TaskFuture[Any]] = {}
        self._calls: set[asyncio.Task[Any]] = set()
        self._in_flight = 0

        # Totals, written on the loop thread (completions are counted by the ledger).
        self.n_failed = 0
        self.n_cancelled = 0
        self.n_calls = 0

        # The ledger: what the next drain reports, guarded by idle's lock.
        self.idle = threading.Condition()
        self._idle_waiters = 0
        self.ledger = Ledger(self.idle)
        self._given_up = self.ledger.given_up

    # ------------------------------------------------------------------ queues

    def pump_soon(self) -> None:
        """Schedule a pump from the loop thread itself, once."""
        if not self._pump_queued:
            self._pump_queued = True
            loop = self.loop
            assert loop is not None  # runs on the loop
            loop.call_soon(self.pump)

    def pump(self) -> None:
        """Move newly spawned tasks from the inbox to their queues and start what may start."""
        self._pump_queued = False
        inbox = self.inbox
        size = len(inbox)
        if _BURST <= size < self._max_pending // 2:
            now = time.monotonic()
            if size != self._burst_seen:
                self._burst_seen, self._burst_grew_at = size, now
            if now - self._burst_grew_at < _BURST_QUIET_S:
                # A burst is still arriving: wait, off the GIL, rather than contend with the
                # submitting thread for it task by task. A pause shorter than _BURST_QUIET_S
                # (the submitter's garbage collection, say) does not end the burst.
                # Backpressure bounds the wait.
                self._arm(_BURST_SETTLE_S)
                self.wake_scheduled = True
                return
        self._burst_seen = 0
        # Cleared before draining: a spawn from here on arranges its own pump.
        self.wake_scheduled = False
        outstanding, ready, key_queues = self.outstanding, self._ready, self._key_queues
        moved = bool(inbox)
        while inbox:
            future = inbox[0]
            # Registered before it leaves the inbox, so a drain never sees it in neither.
            outstanding[future.seq] = future
            inbox.popleft()
            key = future.key
            if key is None:
                ready.append(future)
            elif key in key_queues:
                key_queues[key].append(future)
            else:
                key_queues[key] = deque()
                ready.append(future)
        self._start_ready()
        if moved:
            # Spawns come in a rhythm (one per training step): look again shortly, on this
            # loop's own timer, so that the next ones need no cross-thread wake-up. That
            # wake-up cost the spawning thread ~8 µs of CPU here, several times the rest of
            # spawn; the loop stops looking after one empty look.
            self._arm(_LINGER_S)
        if self._timer is not None:
            # The armed timer pumps again: until then a spawn need arrange nothing.
            self.wake_scheduled = True

    def _arm(self, delay: float) -> None:
        """Pump again after `delay` s, unless a pump is already timed."""
        if self._timer is None:
            loop = self.loop
            assert loop is not None  # runs on the loop
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def _start_ready(self) -> None:
        ready, loop = self._ready, self.loop
        assert loop is not None  # only called on the running loop
        while self._in_flight < self._max_in_flight and ready:
            future = ready.popleft()
            self.taken += 1
            if not future._start(loop, self._run(future)):
                self._retire_cancelled(future)
                continue
            self._in_flight += 1
        if self.space_waiters:
            with self.space:
                self.space.notify_all()

    async def _run(self, future: TaskFuture[Any]) -> None:
        abandoned = False
        try:
            work = future.work
            # Awaited here, not through a helper coroutine: one frame less per task.
            if type(work) is CoroutineType:
                result = await work
            else:
                result = await _awaitable_of(future)
        except GeneratorExit:
            # The loop is gone (close() abandoned this task) and the coroutine is being
            # garbage-collected, on whatever thread: there is nothing left to account to.
            abandoned = True
            raise
        except asyncio.CancelledError:
            future._set_cancelled()
            self.n_cancelled += 1
            self.ledger.cancelled(future)
        except BaseException as exc:
            future._set_exception(exc)
            self.n_failed += 1
            self.ledger.failed(future, exc)
            key = "" if future.key is None else f" (key={future.key!r})"
            logger.error(
                "background task %r%s failed: %s: %s",
                future.name,
                key,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            # Even SystemExit or KeyboardInterrupt stays a failed task: re-raised here, it
            # would stop the loop under every other task.
        else:
            future._set_result(result)
            if self._given_up:  # rare: only after a drain gave up on some work
                self.ledger.completed(future)
            else:
                self.ledger.n_completed += 1
        finally:
            if not abandoned:
                self._in_flight -= 1
                self._finish(future)

    def _finish(self, future: TaskFuture[Any]) -> None:
        del self.outstanding[future.seq]
        key = future.key
        if key is not None:
            queue = self._key_queues[key]
            if queue:
                self._ready.append(queue.popleft())
            else:
                del self._key_queues[key]
        self._start_ready()
        # Settled when every task left is one a drain gave up on (see is_settled); the
        # waiter checks exactly, this only avoids waking it for nothing.
        if self._idle_waiters and not self.inbox and len(self.outstanding) <= len(self._given_up):
            with self.idle:
                self.idle.notify_all()

    def _retire_cancelled(self, future: TaskFuture[Any]) -> None:
        """Account for a task cancelled while it was still queued."""
        work = future.work
        if isinstance(work, Coroutine):
            work.close()
        self.n_cancelled += 1
        self.ledger.cancelled(future)
        self._finish(future)

    # ------------------------------------------------------------------ calls

    def start_call(self, future: TaskFuture[Any]) -> None:
        """Start a `Bridge.call`: at once, outside the queues and the in-flight limit."""
        loop = self.loop
        assert loop is not None  # runs on the loop
        if not future._start(loop, _run_call(future)):
            # call() timed out (and cancelled) before the loop got here: the work never runs.
            if isinstance(future.work, Coroutine):
                future.work.close()
            return
        self.n_calls += 1
        task = future.asyncio_task
        assert task is not None  # set by _start
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def cancel_everything(self) -> None:
        """Cancel every task, queued or running, and every call."""
        loop = self.loop
        assert loop is not None  # runs on the loop
        self.pump()
        # TaskFuture.cancel() schedules the asyncio cancel after the task's first step:
        # a task cancelled before it starts would skip the bookkeeping in _run.
        for future in list(self.outstanding.values()):
            future.cancel()
        for task in list(self._calls):
            loop.call_soon(task.cancel)
        self._retire_queued()
        self._start_ready()

    def _retire_queued(self) -> None:
        """Retire the cancelled tasks still queued, now: behind a stuck task of their key
        they would never reach the front, and so never be reported."""
        dropped = [f for f in self._ready if f.cancelled()]
        if dropped:
            self._ready = deque(f for f in self._ready if not f.cancelled())
        for queue in self._key_queues.values():
            cancelled = [f for f in queue if f.cancelled()]
            if cancelled:
                kept = [f for f in queue if not f.cancelled()]
                queue.clear()
                queue.extend(kept)
                dropped += cancelled
        for future in dropped:
            self.taken += 1
            work = future.work
            if isinstance(work, Coroutine):
                work.close()
            self.n_cancelled += 1
            self.ledger.cancelled(future)
            del self.outstanding[future.seq]
        if dropped and self._idle_waiters:
            with self.idle:
                self.idle.notify_all()

    # ------------------------------------------------------------------ any thread

    def is_idle(self) -> bool:
        """True when nothing is queued or running, given-up work included."""
        return not self.inbox and not self.outstanding

    def is_settled(self) -> bool:
        """True when nothing is queued or running except work a drain already gave up on."""
        if self.inbox:
            return False
        given_up = self._given_up
        return all(seq in given_up for seq in self.outstanding.copy())

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s until the scheduler is settled (`is_settled`); True if so."""
        with self.idle:
            # Counted under the lock before the check, so the loop, which notifies only
            # when someone waits, cannot miss this waiter.
            self._idle_waiters += 1
            try:
                return self.idle.wait_for(self.is_settled, timeout)
            finally:
                self._idle_waiters -= 1

    def unfinished(self, *, given_up: bool = False) -> list[TaskFuture[Any]]:
        """Queued and running tasks, oldest first (a snapshot safe from any thread).

        Work a drain already gave up on is left out, unless `given_up`.
        """
        waiting = list(self.outstanding.copy().values()) + list(self.inbox)
        waiting.sort(key=lambda f: f.seq)
        skip = () if given_up else self._given_up
        # A task cancelled while queued stays here until retired: it is not over yet.
        return [
            f
            for f in waiting
            if (not f.done() or (f.cancelled() and f.asyncio_task is None)) and f.seq not in skip
        ]

    def running(self) -> list[TaskFuture[Any]]:
        """Tasks running now (a snapshot safe from any thread)."""
        return [f for f in self.outstanding.copy().values() if f.running()]

    @property
    def n_completed(self) -> int:
        """Tasks completed so far."""
        return self.ledger.n_completed

    def record_loss(self, loss: Loss) -> None:
        """Add data a callback dropped to the next report."""
        self.ledger.record_loss(loss)

    def take_losses(self) -> tuple[Loss, ...]:
        """The losses recorded since the last report, forgetting them."""
        return self.ledger.take_losses()

    def take_report(
        self,
        elapsed: float,
        *,
        timed_out: bool,
        pending: list[TaskFuture[Any]] | None = None,
        notes: tuple[str, ...] = (),
        give_up: bool = False,
    ) -> DrainReport:
        """The ledger's report; `pending` defaults to what is unfinished now, if timed out."""
        if pending is None:
            pending = self.unfinished() if timed_out else []
        return self.ledger.take_report(
            elapsed, timed_out=timed_out, pending=pending, notes=notes, give_up=give_up
        )


async def _run_call(future: TaskFuture[Any]) -> None:
    try:
        result = await _awaitable_of(future)
    except asyncio.CancelledError:
        future._set_cancelled()
    except BaseException as exc:
        future._set_exception(exc)
    else:
        future._set_result(result)


async def _awaitable_of(future: TaskFuture[T]) -> T:
    work = future.work
    if type(work) is CoroutineType:
        return await work  # type: ignore[no-any-return]
    assert work is not None  # spawn refuses None
    awaitable = work()  # type: ignore[operator]
    if not isinstance(awaitable, Awaitable):
        msg = (
            f"spawned work {future.name!r} returned {type(awaitable).__name__}, not an "
            f"awaitable; spawn takes a coroutine or an async callable (`async def`)"
        )
        raise TypeError(msg)
    return await awaitable
