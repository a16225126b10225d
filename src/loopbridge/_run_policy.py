"""How a run ends, for TrainLoop and for foreign loops (the framework adapters) alike.

`RunPolicy.end_training` fires `on_train_end`, then drains the bridge into a `DrainReport`
(under torchrun, rank 0's report then holds every rank's: `loopbridge._rank_reports`);
`RunPolicy.enforce` turns a report that is not ok into `DrainError` (the default) or a
warning. `close_run` fires `on_run_end` for a run that is not part of an `Experiment`, with
the run's real `RunResult` inside a one-run `ArmResult`, so loggers can close what they
opened in `on_run_start`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loopbridge._exceptions import DrainError
from loopbridge._rank_reports import gather_reports
from loopbridge._row_digest import wait_for_digests
from loopbridge._types import ArmResult, LogContext, LoopArtifacts, LoopState, RunResult, RunStatus

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge
    from loopbridge._dispatch import CallbackList
    from loopbridge._report import DrainReport

__all__ = ["DrainPolicy", "RunPolicy", "close_run"]

logger = logging.getLogger("loopbridge.loop")

DrainPolicy = Literal["raise", "warn"]
"""What a run does when its drain finds work failed, cancelled or still pending."""


@dataclass(frozen=True, slots=True)
class RunPolicy:
    """How a run's background work is drained at train end, and what a bad report does.

    Args:
        drain_timeout: seconds to wait for background work after `on_train_end` (None: no
            limit); what is still pending then is cancelled and reported.
        on_drain_failure: "raise" `DrainError` or "warn" (a log line) when the drain finds
            work failed, cancelled or still pending.
        cancel_grace: seconds cancelled work gets to finish its clean-up.
    """

    drain_timeout: float | None = 300.0
    on_drain_failure: DrainPolicy = "raise"
    cancel_grace: float = 5.0

    def __post_init__(self) -> None:
        if self.on_drain_failure not in ("raise", "warn"):
            msg = f"on_drain_failure={self.on_drain_failure!r}: use 'raise' or 'warn'"
            raise ValueError(msg)
        if self.drain_timeout is not None and not self.drain_timeout >= 0:
            msg = f"drain_timeout={self.drain_timeout!r}: give seconds >= 0, or None to wait"
            raise ValueError(msg)

    def end_training(
        self,
        callbacks: CallbackList,
        state: LoopState,
        artifacts: LoopArtifacts,
        bridge: Bridge,
        *,
        gather_ranks: bool = True,
    ) -> DrainReport:
        """Fire `on_train_end`, then drain; the report and the bridge's stats go on `artifacts`.

        Work still pending at the deadline is cancelled, so it cannot leak into the report of
        the next run on the same bridge. Under torchrun with `gather_ranks` (every rank ends
        its run here), rank 0's report also holds every other rank's (docs/distributed.md).
        """
        callbacks.on_train_end(state, artifacts)
        report = bridge.drain(
            self.drain_timeout, cancel_pending=True, cancel_grace=self.cancel_grace
        )
        if gather_ranks:
            report = gather_reports(
                report,
                callbacks.rank,
                run_name=state.run_name,
                timeout=(self.drain_timeout or 300.0) + 30.0,
            )
        # Digests hashed in the background (by an uploader or on their own) are known, and in
        # manifest.jsonl where the loop writes one, once the run returns.
        wait_for_digests(artifacts.manifest, timeout=self.drain_timeout)
        artifacts.drain_report = report
        artifacts.bridge_stats = bridge.stats
        return report

    def enforce(self, report: DrainReport, run_name: str) -> None:
        """Raise `DrainError` (policy "raise") or log a warning when `report` is not ok."""
        if report.ok:
            return
        if self.on_drain_failure == "raise":
            msg = f"run {run_name}: background work not done: {report.summary()}"
            raise DrainError(msg, report)
        logger.warning("run %s: background work not done: %s", run_name, report)


def close_run(
    callbacks: CallbackList,
    ctx: LogContext,
    state: LoopState,
    artifacts: LoopArtifacts | None,
    *,
    error: BaseException | None = None,
    duration_s: float = 0.0,
) -> RunResult:
    """Fire `on_run_end` for a run outside an Experiment and return its `RunResult`.

    The run is its own arm (named after `ctx.arm_name`, else the run): a failed run carries
    `error`; the drain report is the one on `artifacts`, or the one a `DrainError` carries.
    """
    result = RunResult(
        run_name=ctx.run_name or state.run_name,
        status=RunStatus.FAILED if error is not None else RunStatus.COMPLETED,
        final_metrics=dict(state.metrics),
        artifacts=artifacts,
        drain_report=artifacts.drain_report if artifacts is not None else None,
        duration_s=duration_s,
        error=error,
    )
    if isinstance(error, DrainError):
        result.drain_report = error.report
    arm = ArmResult(name=ctx.arm_name or result.run_name, config=dict(ctx.run_config))
    arm.runs.append(result)
    callbacks.on_run_end(ctx, result, arm)
    return result
