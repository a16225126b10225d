"""Experiment: arms x (repeats | continual stages), one TrainLoop per run, one shared bridge."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._dispatch import CallbackList
from loopbridge._exceptions import DrainError
from loopbridge._loop import BenchmarkFn, DrainPolicy, TrainLoop, check_benchmark
from loopbridge._profile import HookProfiler
from loopbridge._shutdown import CANCEL_WAIT_S, Shutdown
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    ManifestRow,
    RunResult,
    RunStatus,
)

__all__ = ["BuildFn", "Experiment"]

logger = logging.getLogger("loopbridge.experiment")

BuildFn = Callable[[LogContext], TrainLoop]
"""Builds one run's TrainLoop from its context (`ctx.run_config`, `ctx.resume_from`)."""


class Experiment:
    """Runs each arm `n_repeats` times, or through continual `stages`, firing every hook.

    Args:
        name: the experiment's name.
        arms: `{arm name: config}`; each run's `ctx.run_config` starts from its arm's config.
        build: `build(ctx) -> TrainLoop` for one run.
        n_repeats: replicates per arm; more than one puts each arm's runs in a group.
        stages: continual stages; each is merged over the arm's config, and each stage's
            `ctx.resume_from` is the previous stage's final checkpoint.
        benchmarks: `{name: fn(state) -> (EvalResult, predictions)}`, scored after training.
        callbacks: fired at every level, ahead of each loop's own callbacks.
        stop_on_failure: re-raise a run's error instead of recording it and going on.
        interrupt_grace: seconds in-flight work gets to finish after Ctrl-C or a failure
            (a second Ctrl-C cancels it at once, a third abandons it).
        resume_from: given to every run's TrainLoop that has none of its own (see
            `TrainLoop(resume_from=...)`): each run continues from its own newest checkpoint.
            A continual stage's `ctx.resume_from` is still the previous stage's final
            checkpoint, where a stage starts; a stage that had already finished restores its
            final checkpoint and passes it on.
    """

    def __init__(
        self,
        name: str,
        arms: Mapping[str, Mapping[str, Any]],
        build: BuildFn,
        *,
        n_repeats: int = 1,
        stages: Sequence[Mapping[str, Any]] | None = None,
        benchmarks: Mapping[str, BenchmarkFn] | None = None,
        callbacks: Sequence[Callback] = (),
        bridge: Bridge | None = None,
        drain_timeout: float | None = 300.0,
        on_drain_failure: DrainPolicy = "raise",
        stop_on_failure: bool = False,
        profile: bool | HookProfiler = False,
        interrupt_grace: float = 5.0,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        if not arms:
            raise ValueError(f"Experiment({name!r}) has no arms; pass arms={{'name': config}}")
        if not isinstance(n_repeats, int) or n_repeats < 1:
            raise ValueError(f"Experiment(n_repeats={n_repeats!r}): give a whole number >= 1")
        if stages is not None and n_repeats != 1:
            msg = "Experiment takes n_repeats or stages, not both; run stages once per arm"
            raise ValueError(msg)
        if stages is not None and not stages:
            raise ValueError("Experiment(stages=[]) has no stages; pass None or some stages")
        if on_drain_failure not in ("raise", "warn"):
            raise ValueError(f"on_drain_failure={on_drain_failure!r}: use 'raise' or 'warn'")
        self.name = name
        self.arms = {arm: dict(config) for arm, config in arms.items()}
        self.build = build
        self.n_repeats = n_repeats
        self.stages = [dict(stage) for stage in stages] if stages is not None else None
        self.benchmarks = dict(benchmarks or {})
        self.drain_timeout = drain_timeout
        self.on_drain_failure: DrainPolicy = on_drain_failure
        self.stop_on_failure = stop_on_failure
        self.interrupt_grace = interrupt_grace
        self.resume_from = resume_from
        self._callbacks = tuple(callbacks)
        self._bridge = bridge
        self._owns_bridge = bridge is None
        if isinstance(profile, HookProfiler):
            self.profiler: HookProfiler | None = profile
        else:
            self.profiler = HookProfiler() if profile else None
        # Validates the callbacks now, where a mistake is cheapest to see.
        self.callbacks = CallbackList(callbacks, bridge=bridge, profile=self.profiler or False)

    @property
    def bridge(self) -> Bridge | None:
        """The bridge shared by every run (created when the experiment starts, if not given)."""
        return self._bridge

    def run(self) -> ExperimentResult:
        """Run every arm and return the results; failed runs are recorded, not raised."""
        started = time.monotonic()
        if self._bridge is None or (self._owns_bridge and self._bridge.closed):
            # A bridge of our own that an earlier run() closed cannot take work: start afresh.
            self._bridge = Bridge(name=f"loopbridge-{self.name}")
        bridge = self._bridge
        self.callbacks.bridge = bridge
        rank = self.callbacks.rank
        ctx = LogContext(experiment_name=self.name, rank=rank.rank, world_size=rank.world_size)
        result = ExperimentResult(name=self.name, arms={}, duration_s=0.0, ids=ctx.ids)
        try:
            self.callbacks.on_experiment_start(ctx)
            for arm, config in self.arms.items():
                result.arms[arm] = self._run_arm(ctx, arm, config)
            result.duration_s = time.monotonic() - started
            self.callbacks.on_experiment_end(ctx, result)
        except BaseException as exc:
            self.callbacks.annotate(exc)
            if self._owns_bridge:
                # Ctrl-C or a failure: a short grace, not the whole drain deadline, and
                # faster with every further Ctrl-C (carried on from the run's own).
                shutdown = Shutdown.after(
                    exc,
                    bridge,
                    owner=f"experiment {self.name}",
                    grace=self.interrupt_grace,
                    close=True,
                    logger=logger,
                )
                report = shutdown.run(exc)
                if not report.ok:
                    logger.error("experiment %s failed; background work: %s", self.name, report)
            raise
        if self._owns_bridge:
            result.drain_report = bridge.close(self.drain_timeout)
        else:
            result.drain_report = bridge.drain(self.drain_timeout, cancel_pending=True)
        if not result.drain_report.ok:
            logger.warning(
                "experiment %s: background work after the last run: %s",
                self.name,
                result.drain_report.summary(),
            )
        self.callbacks.release()
        return result

    def _run_arm(self, exp_ctx: LogContext, arm: str, config: dict[str, Any]) -> ArmResult:
        arm_result = ArmResult(name=arm, config=config)
        group = arm if (self.n_repeats > 1 or self.stages is not None) else None
        if group is not None:
            group_ctx = LogContext(
                experiment_name=self.name,
                arm_name=arm,
                group_name=group,
                run_config=dict(config),
                ids=exp_ctx.ids,
                rank=exp_ctx.rank,
                world_size=exp_ctx.world_size,
            )
            self.callbacks.on_group_start(group_ctx, group)
        resume_from: ManifestRow | None = None
        for index, overrides in self._plan():
            is_stage = self.stages is not None
            run_name = arm if group is None else f"{arm}-{'s' if is_stage else 'r'}{index}"
            ctx = LogContext(
                experiment_name=self.name,
                arm_name=arm,
                group_name=group,
                repeat_index=None if is_stage else index,
                stage_index=index if is_stage else None,
                run_name=run_name,
                run_config={**config, **overrides},
                # A copy, so one run's ids (its run_id) do not leak into the next run.
                ids=dict(exp_ctx.ids),
                resume_from=resume_from,
                rank=exp_ctx.rank,
                world_size=exp_ctx.world_size,
            )
            run = self._run_one(ctx, arm_result)
            arm_result.runs.append(run)
            if is_stage:
                if run.status is not RunStatus.COMPLETED or run.artifacts is None:
                    logger.error(
                        "arm %s: stage %d failed, so its later stages were not run", arm, index
                    )
                    break
                # A stage that saved nothing (it ran no step) leaves the model as it found it.
                resume_from = run.artifacts.final_checkpoint or resume_from
        return arm_result

    def _plan(self) -> list[tuple[int, dict[str, Any]]]:
        if self.stages is not None:
            return list(enumerate(self.stages))
        return [(i, {}) for i in range(self.n_repeats)]

    def _run_one(self, ctx: LogContext, arm: ArmResult) -> RunResult:
        started = time.monotonic()
        bridge = self._bridge
        assert bridge is not None  # run() sets it
        result = RunResult(run_name=ctx.run_name or "", status=RunStatus.COMPLETED)
        loop: TrainLoop | None = None
        try:
            self.callbacks.on_run_start(ctx)
            built: object = self.build(ctx)
            if not isinstance(built, TrainLoop):
                # Not kept as `loop`: the error handler below would treat it as a TrainLoop.
                msg = f"build(ctx) returned {type(built).__name__}; it must return a TrainLoop"
                raise TypeError(msg)
            loop = built
            loop.drain_timeout = self.drain_timeout
            loop.on_drain_failure = self.on_drain_failure
            loop.interrupt_grace = self.interrupt_grace
            if self.resume_from is not None and loop.resume_from is None:
                if loop.load is None:
                    msg = (
                        f"Experiment(resume_from={os.fspath(self.resume_from)!r}): run "
                        f"{ctx.run_name}'s TrainLoop has no load=fn(state, path) to read a "
                        f"checkpoint back; pass load= when build(ctx) creates it"
                    )
                    raise ValueError(msg)
                loop.resume_from = self.resume_from
            loop._adopt(self._callbacks, bridge, ctx, self.profiler)
            artifacts = loop.run()
            result.artifacts = artifacts
            result.drain_report = artifacts.drain_report
            result.final_metrics = dict(loop.state.metrics)
            result.eval_results = self._score(loop, ctx)
        except Exception as exc:
            if loop is not None:
                loop.callbacks.annotate(exc)
                result.artifacts = loop.artifacts
                result.final_metrics = dict(loop.state.metrics)
            self.callbacks.annotate(exc)
            result.status = RunStatus.FAILED
            result.error = exc
            if isinstance(exc, DrainError):
                result.drain_report = exc.report
            logger.error("run %s failed: %s: %s", result.run_name, type(exc).__name__, exc)
        result.duration_s = time.monotonic() - started
        self.callbacks.on_run_end(ctx, result, arm)
        # Post-training benchmarks and on_run_end may have spawned work: it belongs to this
        # run's report, not to the next run's. A failed run gets interrupt_grace, as alone.
        failed = result.error is not None
        after = bridge.drain(
            self.interrupt_grace if failed else self.drain_timeout,
            cancel_pending=True,
            cancel_grace=CANCEL_WAIT_S if failed else 2.0,
        )
        if failed and after.pending and result.error is not None:
            names = ", ".join(str(r) for r in after.pending[:5])
            result.error.add_note(f"loopbridge: background work of the failed run cut off: {names}")
        if after.completed or not after.ok:
            before = result.drain_report
            result.drain_report = after if before is None else before.merge(after)
            if not after.ok:
                logger.warning(
                    "run %s: background work after training: %s", result.run_name, after.summary()
                )
        if result.error is not None and self.stop_on_failure:
            raise result.error
        return result

    def _score(self, loop: TrainLoop, ctx: LogContext) -> list[EvalResult]:
        results = []
        for name, benchmark in self.benchmarks.items():
            evaluated, predictions = benchmark(loop.state)
            check_benchmark(name, evaluated)
            # Through the loop's list, so the run's own callbacks see its final scores too.
            loop.callbacks.on_benchmark_eval(ctx, evaluated, predictions, step=None)
            results.append(evaluated)
        return results
