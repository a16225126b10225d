"""A bridge's bounded waits: drain, cancel, close and abandon, under one deadline each.

`Bridge.drain(timeout, cancel_pending=True, cancel_grace=g)` returns within `timeout + g`;
`Bridge.close(timeout, cancel_grace=g)` within `timeout + g + CLOSE_MARGIN_S`, all phases
together (drain, cancel, shutdown callbacks, joining the thread) rather than each with its
own full timeout; `Bridge.abandon()` waits for nothing. A wait longer than the bridge's
`progress_every` logs what it waits for, every `progress_every` s. These run on the caller's
thread (never the loop's) and read the bridge's scheduler, loop and thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from loopbridge._future import TaskFuture
from loopbridge._report import DrainReport
from loopbridge._scheduler import record_of

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = [
    "CLOSE_MARGIN_S",
    "abandon_work",
    "cancel_all",
    "close_work",
    "drain_work",
    "task_names",
]

logger = logging.getLogger("loopbridge.bridge")

CLOSE_MARGIN_S = 1.0
"""What close() may spend beyond its timeout and cancel grace: shutdown callbacks and the join."""
_JOIN_SHARE = 0.25
"""The part of CLOSE_MARGIN_S kept for stopping and joining the loop thread."""
_LEFTOVER_WAIT_S = 0.2
"""How long the stopped loop lets the tasks it cancels end; they had their grace already."""
_SHOW_TASKS = 5


def drain_work(
    bridge: Bridge,
    timeout: float | None,
    *,
    cancel_pending: bool,
    cancel_grace: float,
    wait: bool,
) -> DrainReport:
    """The body of `Bridge.drain`: wait (if `wait`), then report, cancel, give up what is left."""
    started = time.monotonic()
    sched = bridge._sched
    idle = True
    if wait:
        deadline = None if timeout is None else started + timeout
        idle = _wait_settled(bridge, deadline, started, "drain")
    if idle:
        return sched.take_report(time.monotonic() - started, timed_out=False)
    pending = sched.unfinished()
    notes: tuple[str, ...] = ()
    if cancel_pending:
        if not _cancel_everything(bridge, time.monotonic() + cancel_grace):
            notes = ("some pending work ignored its cancellation and may still run",)
        notes = ("work still pending at the deadline was cancelled", *notes)
    return sched.take_report(
        time.monotonic() - started,
        timed_out=True,
        pending=pending,
        notes=notes,
        give_up=cancel_pending,
    )


def cancel_all(bridge: Bridge, timeout: float) -> DrainReport:
    """The body of `Bridge.cancel_all`."""
    started = time.monotonic()
    idle = _cancel_everything(bridge, started + timeout)
    return bridge._sched.take_report(time.monotonic() - started, timed_out=not idle, give_up=True)


def close_work(bridge: Bridge, timeout: float | None, cancel_grace: float) -> DrainReport:
    """The body of `Bridge.close` once it is CLOSING: drain, cancel, callbacks, stop, join."""
    started = time.monotonic()
    sched = bridge._sched
    deadline = None if timeout is None else started + timeout
    settled = _wait_settled(bridge, deadline, started, "close")
    pending = [] if settled else sched.unfinished()
    cancel_deadline = time.monotonic() + cancel_grace
    # Always: stray call()s, and anything spawned while the drain was ending.
    if not _cancel_everything(bridge, cancel_deadline):
        settled = False
        known = {f.seq for f in pending}
        pending += [f for f in sched.unfinished() if f.seq not in known]
    notes: tuple[str, ...] = ()
    if not settled:
        notes = ("work still pending at the deadline was cancelled",)
        if not sched.is_settled():
            notes += ("some pending work ignored its cancellation and was abandoned",)
            # The caller may drop the report: name what is given up in the log too.
            logger.warning(
                "%r: closed; work that ignored its cancellation was abandoned: %s",
                bridge,
                task_names(sched.unfinished()) or "unknown",
            )
    report = sched.take_report(
        time.monotonic() - started,
        timed_out=not settled,
        pending=pending,
        notes=notes,
        give_up=True,
    )
    end = max(cancel_deadline, time.monotonic()) + CLOSE_MARGIN_S
    _run_shutdown_callbacks(bridge, end - _JOIN_SHARE * CLOSE_MARGIN_S)
    _stop_loop(bridge, end)
    return report


def abandon_work(bridge: Bridge) -> DrainReport:
    """The body of `Bridge.abandon`: cancel and stop without waiting; report what is left."""
    sched, loop = bridge._sched, bridge._loop
    bridge._leftover_wait = 0.0
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed in the meantime
            loop.call_soon_threadsafe(sched.cancel_everything)
            loop.call_soon_threadsafe(loop.stop)
    pending = sched.unfinished()
    notes = ("abandoned without waiting",) if pending else ()
    return sched.take_report(
        0.0, timed_out=bool(pending), pending=pending, notes=notes, give_up=True
    )


def _cancel_everything(bridge: Bridge, deadline: float) -> bool:
    """Cancel all tasks and calls; True if none is left by `deadline` (given-up work aside)."""
    loop, sched = bridge._loop, bridge._sched
    if loop is None or loop.is_closed() or bridge.in_loop_thread():
        return sched.is_settled()
    done = threading.Event()

    def cancel_on_loop() -> None:
        sched.cancel_everything()
        done.set()

    try:
        loop.call_soon_threadsafe(cancel_on_loop)
    except RuntimeError:  # closed in the meantime
        return sched.is_settled()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        return False
    return sched.wait_idle(max(0.0, deadline - time.monotonic()))


def _wait_settled(bridge: Bridge, deadline: float | None, started: float, what: str) -> bool:
    """Wait until the scheduler is settled or `deadline`; log what it waits for meanwhile."""
    sched, every = bridge._sched, bridge._progress_every
    next_log = started + every if every > 0 else None
    while True:
        ends = [t for t in (deadline, next_log) if t is not None]
        if sched.wait_idle(max(0.0, min(ends) - time.monotonic()) if ends else None):
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if next_log is not None and now >= next_log:
            next_log = now + every
            _log_waiting(bridge, what, now - started, deadline, now)


def _log_waiting(
    bridge: Bridge, what: str, waited: float, deadline: float | None, now: float
) -> None:
    waiting = bridge._sched.unfinished()
    running = [f for f in waiting if f.running()]
    limit = "no deadline" if deadline is None else f"gives up in {deadline - now:.1f} s"
    logger.warning(
        "%r: %s still waiting after %.1f s (%s) for %d task(s), %d running: %s",
        bridge,
        what,
        waited,
        limit,
        len(waiting),
        len(running),
        task_names(running or waiting) or "none",
    )


def _run_shutdown_callbacks(bridge: Bridge, deadline: float) -> None:
    loop = bridge._loop
    if not bridge._shutdown_callbacks or loop is None or bridge._callbacks_done:
        return
    bridge._callbacks_done = True
    callbacks = list(bridge._shutdown_callbacks)

    async def run_all() -> None:
        for fn in callbacks:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await fn()
            except TimeoutError:
                logger.warning("%r: shutdown callback %r did not finish in time", bridge, fn)
            except Exception:
                logger.exception("shutdown callback %r of %r failed", fn, bridge)

    try:
        future = asyncio.run_coroutine_threadsafe(run_all(), loop)
    except RuntimeError:  # the loop is closed already
        return
    try:
        # A little past the deadline: run_all times itself out on the loop.
        future.result(max(0.0, deadline - time.monotonic()) + 0.05)
    except TimeoutError:
        future.cancel()
        logger.warning("%r: shutdown callbacks did not finish in time", bridge)


def _stop_loop(bridge: Bridge, deadline: float) -> None:
    loop, thread = bridge._loop, bridge._thread
    if loop is None or thread is None:
        return
    # What still runs had its cancel grace already (or was abandoned): the stopped loop only
    # lets well-behaved stragglers (connection pools) end.
    bridge._leftover_wait = max(0.0, min(_LEFTOVER_WAIT_S, deadline - time.monotonic() - 0.05))
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed in the meantime
            loop.call_soon_threadsafe(loop.stop)
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        busy = task_names(bridge._sched.running()) or "unknown"
        logger.warning(
            "%r: the loop thread is still busy (%s) and was abandoned; it is a daemon "
            "thread and will not keep the process alive",
            bridge,
            busy,
        )


def task_names(futures: list[TaskFuture[Any]]) -> str:
    """The first few tasks' names (with keys), for a log line."""
    shown = ", ".join(str(record_of(f)) for f in futures[:_SHOW_TASKS])
    more = len(futures) - _SHOW_TASKS
    return f"{shown} (+{more} more)" if more > 0 else shown
