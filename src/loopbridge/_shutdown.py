"""Stopping a run's background work after Ctrl-C or a failure: faster with every Ctrl-C.

A run that ends badly stops its bridge in escalating levels, and every Ctrl-C while it does
moves to the next level at once (the KeyboardInterrupt is caught and counted):

1. first Ctrl-C, or a failure: in-flight work gets `grace` s (`interrupt_grace`) to finish;
   what is left is cancelled and gets `CANCEL_WAIT_S` to end; a bridge the run owns is then
   closed (shutdown callbacks and join within `CLOSE_MARGIN_S`). At most
   `grace + CANCEL_WAIT_S + CLOSE_MARGIN_S` in all.
2. second Ctrl-C: what is left is cancelled now, gets `CANCEL_WAIT_S` to end, and the bridge
   is closed: at most `CANCEL_WAIT_S + CLOSE_MARGIN_S` after that Ctrl-C.
3. third Ctrl-C: what is left is abandoned: cancelled without waiting, the loop stopped, its
   (daemon) thread not joined. Nothing more is waited for.

Each level logs a warning naming the work it waits for or gives up, and the exception that
ended the run gets a note naming the work that did not complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from loopbridge._bridge import CLOSE_MARGIN_S, Bridge
from loopbridge._report import DrainReport, TaskRecord

__all__ = ["CANCEL_WAIT_S", "CLOSE_MARGIN_S", "Shutdown"]

CANCEL_WAIT_S = 1.0
"""How long cancelled work gets to end (run its cleanup) before it is abandoned."""

_ATTR = "_loopbridge_shutdown"
_SHOW = 5


@dataclass
class Shutdown:
    """One escalating stop of a bridge's work, for the run or experiment named `owner`."""

    bridge: Bridge
    owner: str
    grace: float
    close: bool
    """The owner's own bridge: close it (else only cancel what is left)."""
    cause: str
    logger: logging.Logger
    level: int = 1
    grace_spent: bool = False
    report: DrainReport = field(default_factory=DrainReport)

    @classmethod
    def after(
        cls,
        exc: BaseException,
        bridge: Bridge,
        *,
        owner: str,
        grace: float,
        close: bool,
        logger: logging.Logger,
    ) -> Shutdown:
        """The shutdown for `exc`, carrying on from one an inner run already did for it."""
        if isinstance(exc, KeyboardInterrupt):
            cause = "was interrupted (Ctrl-C)"
        else:
            cause = f"failed ({type(exc).__name__})"
        shutdown = cls(bridge, owner, grace, close, cause, logger)
        inner = getattr(exc, _ATTR, None)
        if isinstance(inner, Shutdown):
            # Ctrl-C pressed twice during the run's own shutdown stays twice pressed.
            shutdown.level, shutdown.grace_spent = inner.level, inner.grace_spent
        return shutdown

    def run(self, exc: BaseException) -> DrainReport:
        """Stop the work, escalating on each Ctrl-C; log and note on `exc` what was left."""
        announced = 0
        while True:
            try:
                if announced < self.level:
                    announced = self.level
                    self._announce()
                self._step()
                break
            except KeyboardInterrupt:
                self.level = min(self.level + 1, 3)
        setattr(exc, _ATTR, self)
        self._finish(exc)
        return self.report

    def _step(self) -> None:
        bridge = self.bridge
        window_end = time.monotonic() + CANCEL_WAIT_S
        if self.level == 1 and not self.grace_spent:
            window_end += self.grace
            self.add(bridge.drain(self.grace, cancel_pending=True, cancel_grace=CANCEL_WAIT_S))
            self.grace_spent = True
        if self.level <= 2:
            # What is left of the cancel window, so the close adds only CLOSE_MARGIN_S.
            left = max(0.0, window_end - time.monotonic())
            if self.close:
                self.add(bridge.close(0, cancel_grace=left))
            else:
                self.add(bridge.cancel_all(left))
            return
        if self.close:
            self.add(bridge.abandon())
        else:
            self.add(bridge.cancel_all(0))

    def add(self, report: DrainReport) -> None:
        """Merge a report into the shutdown's report."""
        self.report = self.report.merge(report)

    def _announce(self) -> None:
        waiting = self.bridge.waiting()
        if not waiting and self.level == 1:
            return
        names = _names(waiting)
        n = len(waiting)
        if self.level == 1:
            again = "; press Ctrl-C again to cancel them now" if "Ctrl-C" in self.cause else ""
            self.logger.warning(
                "%s %s: waiting up to %.1f s for %d background task(s) to finish: %s%s",
                self.owner,
                self.cause,
                self.grace,
                n,
                names,
                again,
            )
        elif self.level == 2:
            self.logger.warning(
                "Ctrl-C again: %s cancels %d background task(s) now, waiting up to %.1f s for "
                "them to end: %s; press Ctrl-C once more to abandon them",
                self.owner,
                n,
                CANCEL_WAIT_S,
                names,
            )
        else:
            self.logger.warning(
                "Ctrl-C a third time: %s abandons %d background task(s) without waiting: %s",
                self.owner,
                n,
                names,
            )

    def _finish(self, exc: BaseException) -> None:
        report = self.report
        if report.pending or report.cancelled:
            note = (
                f"loopbridge: {self.owner} {self.cause}; its background work did not "
                f"complete: {report.summary()}"
            )
            exc.add_note(note)


def _names(records: list[TaskRecord] | tuple[TaskRecord, ...]) -> str:
    shown = ", ".join(str(r) for r in records[:_SHOW])
    more = len(records) - _SHOW
    return (f"{shown} (+{more} more)" if more > 0 else shown) or "none"
