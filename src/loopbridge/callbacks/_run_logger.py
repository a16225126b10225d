"""RunLogger: the hook side shared by TensorBoardLogger and WandbLogger.

The loop thread only appends `(step, wall time, {tag: value})` rows to the open run's buffer.
Every `flush_rows` rows, or `flush_interval_s` seconds after the last hand-off, the buffer is
handed to one task spawned on the bridge with the run's own key, so a run's open, writes and
close run one at a time in the order the hooks fired. Subclasses implement the four async
steps (`_open`, `_write`, `_benchmark`, `_close`) and do their blocking library calls off the
bridge loop themselves.

A run opened at `on_run_start` (an Experiment) is closed at `on_run_end`, after its
post-training benchmarks; one opened at `on_train_start` (a plain TrainLoop) is closed at
`on_train_end`, or as failed when its bridge closes after the loop raised.

Under torchrun both log on global rank 0 only; made to act on every rank
(`loopbridge.every_rank`), each rank's run is its own, named `<run name>.rank-<N>`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopbridge._callback import Callback
from loopbridge._types import (
    ArmResult,
    EvalResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    RunResult,
    RunStatus,
    TrainingBatch,
)

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = ["Row", "RunEnd", "RunLogger", "RunSink", "flat_config", "numbers"]

logger = logging.getLogger(__name__)

Row = tuple[int, float, dict[str, Any]]
"""A row as the loop thread queues it: (step, unix time, {tag: value})."""


@dataclass
class RunEnd:
    """How a run ended, as its close step records it."""

    ok: bool
    steps_completed: int
    stop_reason: str | None = None
    error: str | None = None


@dataclass
class RunSink:
    """One run as a logger sees it: where it sits, its buffer, and the library's handle."""

    name: str
    run_id: str | None
    experiment: str | None
    arm: str | None
    group: str | None
    repeat: int | None
    stage: int | None
    config: dict[str, Any]
    key: tuple[str, int, int]
    owns_lifecycle: bool = False
    train_started: bool = False
    rows: list[Row] = field(default_factory=list)
    next_flush: float = 0.0
    last_step: int = 0
    stop_reason: str | None = None
    handle: Any = None
    """The writer or run object, set by `_open` on the bridge loop."""
    open_error: BaseException | None = None


class RunLogger(Callback):
    """Buffers a run's rows on the loop thread and writes them through ordered bridge tasks."""

    source = "RunLogger"
    """The name used in task names, logs and the drain report."""

    rank_zero_only = True  # under torchrun, one set of rows: rank 0's (every_rank() to change)

    def __init__(self, *, flush_interval_s: float = 2.0, flush_rows: int = 1000) -> None:
        if flush_interval_s <= 0 or flush_rows < 1:
            msg = (
                f"{self.source}(flush_interval_s={flush_interval_s}, flush_rows={flush_rows}): "
                f"give a positive interval and at least one row"
            )
            raise ValueError(msg)
        self._flush_interval_s = flush_interval_s
        self._flush_rows = flush_rows
        self._run: RunSink | None = None
        self._counter = 0
        self._bridges: list[Bridge] = []

    # ------------------------------------------------------------------ hooks (loop thread)

    def on_run_start(self, ctx: LogContext) -> None:
        """Open the run's sink (an Experiment run); it is closed at on_run_end."""
        self._start(
            name=self._ranked(ctx.run_name or ctx.arm_name or "run", ctx.rank, ctx.world_size),
            run_id=None,
            experiment=ctx.experiment_name,
            arm=ctx.arm_name,
            group=ctx.group_name,
            repeat=ctx.repeat_index,
            stage=ctx.stage_index,
            config=dict(ctx.run_config),
            owns=False,
        )

    def on_train_start(self, state: LoopState) -> None:
        """Without an Experiment (or for a second loop in one run), open the run here."""
        run = self._run
        if run is None or run.train_started:
            run = self._start(
                name=self._ranked(state.run_name, state.rank, state.world_size),
                run_id=state.run_id,
                experiment=None,
                arm=None,
                group=None,
                repeat=None,
                stage=None,
                config=dict(state.config),
                owns=True,
            )
        run.run_id = state.run_id
        run.train_started = True
        run.last_step = state.step
        run.next_flush = time.time() + self._flush_interval_s

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Append the step's row; hand the buffer to the bridge when it is full or old."""
        run = self._run
        if run is None:
            return
        rows = run.rows
        now = time.time()
        # A copy, because the loop or another callback may reuse the dict after this hook.
        rows.append((state.step, now, metrics.copy()))
        # Wall clock for the deadline too (one clock read); a clock jump only moves a flush.
        if len(rows) >= self._flush_rows or now >= run.next_flush:
            self._flush(run)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Queue `eval/<name>/<metric>` at `state.step`."""
        run = self._run
        if run is not None:
            values = {f"eval/{eval_name}/{key}": value for key, value in metrics.items()}
            run.rows.append((state.step, time.time(), values))

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Queue `bench/<name>/<metric>` and `bench/<name>/<slice>/<metric>`, then the extras."""
        run = self._run
        if run is None:
            return
        name = eval_result.name
        at = run.last_step if step is None else step
        values: dict[str, Any] = eval_result.flat_metrics()
        run.rows.append((at, time.time(), values))
        self._flush(run)
        # Copies: the caller may reuse the result and the rows after the hook.
        result = EvalResult(
            name, dict(eval_result.metrics), dict(eval_result.breakdowns), dict(eval_result.tags)
        )
        rows = [dict(row) for row in predictions]
        self.spawn(
            self._guarded(run, "benchmark", self._benchmark(run, at, step, result, rows)),
            name=f"{self.source}.benchmark",
            key=run.key,
        )

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Hand over what is buffered; a run without an Experiment is also closed here."""
        run = self._run
        if run is None:
            return
        run.last_step = state.step
        run.stop_reason = artifacts.stop_reason
        self._flush(run)
        if run.owns_lifecycle:
            self._run = None
            end = RunEnd(True, artifacts.steps_completed, artifacts.stop_reason)
            self._spawn_close(run, end)

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Close the run with its final status; the Experiment drains the close next."""
        run = self._run
        if run is None:
            return
        self._run = None
        self._flush(run)
        error = run_result.error
        end = RunEnd(
            run_result.status is RunStatus.COMPLETED,
            run.last_step,
            run.stop_reason,
            None if error is None else f"{type(error).__name__}: {error}",
        )
        self._spawn_close(run, end)

    # ------------------------------------------------------------------ loop-thread helpers

    def _ranked(self, name: str, rank: int, world_size: int) -> str:
        """The run's name; on every rank of a torchrun job, with the rank, one run per rank."""
        if world_size > 1 and not self.rank_zero_only:
            return f"{name}.rank-{rank}"
        return name

    def _start(self, *, owns: bool, **fields: Any) -> RunSink:
        bridge = self._attached_bridge()
        if not any(b is bridge for b in self._bridges):
            self._bridges.append(bridge)
            # A plain TrainLoop whose step raised never reaches on_train_end.
            bridge.add_shutdown_callback(self._close_abandoned)
        self._counter += 1
        run = RunSink(key=(self.source, id(self), self._counter), owns_lifecycle=owns, **fields)
        self._run = run
        self.spawn(
            self._guarded(run, "open", self._open(run)), name=f"{self.source}.open", key=run.key
        )
        return run

    def _flush(self, run: RunSink) -> None:
        run.next_flush = time.time() + self._flush_interval_s
        rows, run.rows = run.rows, []
        if rows:
            run.last_step = max(run.last_step, rows[-1][0])
            self.spawn(
                self._guarded(run, "write", self._write(run, rows), rows=len(rows)),
                name=f"{self.source}.write",
                key=run.key,
            )

    def _spawn_close(self, run: RunSink, end: RunEnd) -> None:
        self.spawn(
            self._guarded(run, "close", self._close(run, end)),
            name=f"{self.source}.close",
            key=run.key,
        )

    # ------------------------------------------------------------------ bridge loop

    async def _guarded(self, run: RunSink, step: str, work: Any, *, rows: int = 0) -> None:
        """Run one step of the run, unless its open failed: then count what is lost."""
        if step != "open" and run.open_error is not None:
            work.close()
            if rows:
                detail = (
                    f"{rows} rows of run {run.name!r} not written: the run did not open "
                    f"({type(run.open_error).__name__}: {run.open_error})"
                )
                self._report_loss(rows, detail)
            return
        try:
            await work
        except BaseException as exc:
            if step == "open":
                run.open_error = exc
            raise

    def _report_loss(self, count: int, detail: str) -> None:
        bridge = self._bridges[-1] if self._bridges else None
        if bridge is None:
            logger.error("%s: %s", self.source, detail)
        else:
            bridge.report_loss(self.source, count, detail)

    async def _close_abandoned(self) -> None:
        """At bridge close: close as failed a run this logger opened and nobody closed."""
        run = self._run
        if run is None or not run.owns_lifecycle:
            return
        self._run = None
        logger.error(
            "%s: run %s ended without on_train_end (the loop raised); closing it as failed",
            self.source,
            run.name,
        )
        rows, run.rows = run.rows, []
        await self._guarded(run, "write", self._write(run, rows), rows=len(rows))
        end = RunEnd(False, run.last_step, None, "the training loop raised")
        await self._guarded(run, "close", self._close(run, end))

    async def _open(self, run: RunSink) -> None:
        """Open the run's writer or run object and record its config."""
        raise NotImplementedError

    async def _write(self, run: RunSink, rows: list[Row]) -> None:
        """Write rows of `{tag: value}` at their steps."""
        raise NotImplementedError

    async def _benchmark(
        self,
        run: RunSink,
        at: int,
        step: int | None,
        result: EvalResult,
        predictions: list[dict[str, Any]],
    ) -> None:
        """Record a benchmark's extras (tags, predictions); its metrics came as a row."""

    async def _close(self, run: RunSink, end: RunEnd) -> None:
        """Record the final state and release the run's writer or run object."""
        raise NotImplementedError


def numbers(values: Mapping[str, Any], source: str, step: int) -> dict[str, float]:
    """The values that are numbers, as floats; others are skipped with a warning."""
    out: dict[str, float] = {}
    for key, value in values.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            logger.warning(
                "%s: metric %r = %r at step %d is not a number; not logged",
                source,
                key,
                value,
                step,
            )
    return out


def _finite(value: bool | str | float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | float | str]:
    """Nested mappings as dotted keys; bools, numbers and strings kept, the rest as text."""
    flat: dict[str, bool | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | str | int | float) and _finite(value):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
