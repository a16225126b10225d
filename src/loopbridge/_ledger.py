"""The scheduler's ledger: what ended since the last drain report, and the work given up.

Each task is reported exactly once. A task still unfinished when a drain gave up on it
(a drain that cancelled it, `cancel_all`, `close`, `abandon`) is reported then, as pending,
and is "given up": no later drain waits for it or reports it again, and if it ends after
all, that is logged rather than reported a second time.

The loop thread writes the ledger as tasks end; draining threads take reports from it. One
lock (the scheduler's `idle` condition) guards it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from loopbridge._future import TaskFuture
from loopbridge._report import DrainReport, Loss, TaskRecord

__all__ = ["Ledger", "record_of"]

logger = logging.getLogger("loopbridge.bridge")


class Ledger:
    """Failures, cancellations, losses and completions not yet reported; the given-up work."""

    def __init__(self, lock: threading.Condition) -> None:
        self.lock = lock
        self.given_up: set[int] = set()
        """Seqs of tasks a report named as pending while giving up on them."""
        self.n_completed = 0
        """Every completion; the loop thread adds to it without the lock (see completed)."""
        self._late_completed = 0
        self._reported_completed = 0
        self._failed: list[TaskRecord] = []
        self._cancelled: list[TaskRecord] = []
        self._losses: list[Loss] = []

    def failed(self, future: TaskFuture[Any], exc: BaseException) -> None:
        """A task failed (loop thread)."""
        self._add(future, self._failed, record_of(future, exc), "failed")

    def cancelled(self, future: TaskFuture[Any]) -> None:
        """A task ended by cancellation, running or queued (loop thread)."""
        self._add(future, self._cancelled, record_of(future), "was cancelled")

    def completed(self, future: TaskFuture[Any]) -> None:
        """A task completed while some work is given up (loop thread; else just count it)."""
        # Both counters move under the lock, so a report never counts a given-up task.
        with self.lock:
            self.n_completed += 1
            late = future.seq in self.given_up
            if late:
                self.given_up.discard(future.seq)
                self._late_completed += 1
        if late:
            _log_late(future, "completed")

    def _add(
        self, future: TaskFuture[Any], records: list[TaskRecord], record: TaskRecord, how: str
    ) -> None:
        with self.lock:
            late = future.seq in self.given_up
            if late:
                self.given_up.discard(future.seq)
            else:
                records.append(record)
        if late:
            _log_late(future, how)

    def record_loss(self, loss: Loss) -> None:
        """Add data a callback dropped to the next report (any thread)."""
        with self.lock:
            self._losses.append(loss)

    def take_losses(self) -> tuple[Loss, ...]:
        """The losses recorded since the last report, forgetting them."""
        with self.lock:
            losses, self._losses = tuple(self._losses), []
        return losses

    def take_report(
        self,
        elapsed: float,
        *,
        timed_out: bool,
        pending: list[TaskFuture[Any]],
        notes: tuple[str, ...] = (),
        give_up: bool = False,
    ) -> DrainReport:
        """The report of what ended since the last one; `pending` names what had not.

        `pending` is the work unfinished at the deadline. Of it, what has since completed or
        failed is reported as that instead; what was cancelled or still runs stays pending.
        With `give_up`, the pending work is given up (see the module docstring).
        """
        with self.lock:
            # Ended with a result or an error: reported by its outcome, not as pending.
            pending = [f for f in pending if not f.done() or f.cancelled()]
            pending_seqs = {f.seq for f in pending}
            completed = self.n_completed - self._late_completed - self._reported_completed
            self._reported_completed += completed
            failed, self._failed = tuple(self._failed), []
            cancelled, self._cancelled = tuple(self._cancelled), []
            losses, self._losses = tuple(self._losses), []
            if give_up:
                ended = {r.seq for r in cancelled}
                self.given_up.update(seq for seq in pending_seqs if seq not in ended)
        return DrainReport(
            completed=completed,
            failed=failed,
            # Work pending at the deadline is reported once, as pending.
            cancelled=tuple(r for r in cancelled if r.seq not in pending_seqs),
            pending=tuple(record_of(f) for f in pending),
            losses=losses,
            elapsed=elapsed,
            timed_out=timed_out,
            notes=notes,
        )


def _log_late(future: TaskFuture[Any], how: str) -> None:
    logger.info(
        "background task %r, reported pending by an earlier drain, %s after all", future.name, how
    )


def record_of(future: TaskFuture[Any], exc: BaseException | None = None) -> TaskRecord:
    """The report's record of a task."""
    return TaskRecord(future.name, future.key, exc, seq=future.seq)
