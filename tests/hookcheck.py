"""Shared helpers for the runner tests: the expected hook sequence, and a disk-checking probe.

The expected sequence is built from the nesting in spec/hooks.md, so a test states its
configuration and the helper derives every event that configuration must produce.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopbridge import (
    ArmResult,
    Callback,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)
from loopbridge.testing import HookCall, RecordingCallback

Event = tuple[Any, ...]


@dataclass(frozen=True)
class LoopPlan:
    """One run's configuration, as far as the order of its hooks is concerned."""

    run: str
    max_steps: int
    checkpoint_every: int | None = None
    eval_every: int | None = None
    evaluators: Sequence[str] = ()
    benchmarks: Sequence[str] = ()
    save: bool = True
    stop_at_eval_step: int | None = None
    """A callback asks to stop from on_eval at this step (1-based)."""


def loop_events(plan: LoopPlan) -> list[Event]:
    """The events of one TrainLoop.run(), from on_train_start to on_train_end."""
    run = plan.run
    events: list[Event] = [("on_train_start", run)]
    step = 0
    for step in range(1, plan.max_steps + 1):
        idx = step - 1
        events.append(("on_step_end", run, idx))
        stop = False
        if plan.eval_every is not None and step % plan.eval_every == 0:
            events.extend(("on_eval", run, idx, name) for name in plan.evaluators)
            events.extend(("on_benchmark_eval", run, name, step) for name in plan.benchmarks)
            stop = plan.stop_at_eval_step == step
        last = stop or step == plan.max_steps
        if last:
            break
        if plan.checkpoint_every is not None and step % plan.checkpoint_every == 0:
            events.append(("on_checkpoint", run, step, False))
    if plan.save and step > 0:
        events.append(("on_checkpoint", run, step, True))
    events.append(("on_train_end", run, step))
    return events


@dataclass(frozen=True)
class ArmPlan:
    """One arm: whether it has a group, and its runs in order."""

    name: str
    grouped: bool
    runs: Sequence[LoopPlan]
    post_benchmarks: Sequence[str] = ()
    statuses: Mapping[str, str] = field(default_factory=dict)
    """Run name -> status for runs that do not complete (default "completed")."""


def experiment_events(arms: Sequence[ArmPlan]) -> list[Event]:
    """The events of one Experiment.run(), following the nesting of spec/hooks.md."""
    events: list[Event] = [("on_experiment_start",)]
    for arm in arms:
        if arm.grouped:
            events.append(("on_group_start", arm.name))
        for plan in arm.runs:
            events.append(("on_run_start", plan.run))
            events.extend(loop_events(plan))
            events.extend(
                ("on_benchmark_eval", plan.run, name, None) for name in arm.post_benchmarks
            )
            events.append(("on_run_end", plan.run, arm.statuses.get(plan.run, "completed")))
    events.append(("on_experiment_end",))
    return events


def as_event(call: HookCall) -> Event:
    """Project a recorded call onto the shape `loop_events` and `experiment_events` use."""
    hook, args = call.hook, call.args
    if hook in {"on_experiment_start", "on_experiment_end"}:
        return (hook,)
    if hook == "on_group_start":
        return (hook, args[1])
    if hook in ("on_run_start",):
        return (hook, args[0].run_name)
    if hook == "on_train_start":
        return (hook, args[0].run_name)
    if hook == "on_step_end":
        return (hook, args[0].run_name, args[1])
    if hook == "on_eval":
        return (hook, args[0].run_name, args[1], args[2])
    if hook == "on_benchmark_eval":
        return (hook, args[0].run_name, args[1].name, call.kwargs["step"])
    if hook == "on_checkpoint":
        return (hook, args[0].run_name, args[1].step, args[1].is_final)
    if hook == "on_train_end":
        return (hook, args[0].run_name, call.step)
    if hook == "on_run_end":
        return (hook, args[0].run_name, str(args[1].status))
    raise AssertionError(f"unknown hook {hook}")


def read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    """The JSON rows of a file, or [] when it does not exist (or the loop wrote none)."""
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Probe(RecordingCallback):
    """Records every hook, and at each hook what is on disk and in the state at that moment.

    `facts[i]` belongs to `calls[i]`. A logger stand-in: it stores ids in the contexts as a
    real logger would (`experiment_id`, `group:<name>`, `run_id`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.facts: dict[int, dict[str, Any]] = {}

    def _fact(self, **facts: Any) -> None:
        self.facts[len(self.calls) - 1] = facts

    def on_experiment_start(self, ctx: LogContext) -> None:
        super().on_experiment_start(ctx)
        self._fact(ids=dict(ctx.ids))
        ctx.ids["experiment_id"] = f"exp:{ctx.experiment_name}"

    def on_group_start(self, ctx: LogContext, group_name: str) -> None:
        super().on_group_start(ctx, group_name)
        self._fact(ids=dict(ctx.ids), run_config=dict(ctx.run_config))
        ctx.ids[f"group:{group_name}"] = f"grp:{group_name}"

    def on_run_start(self, ctx: LogContext) -> None:
        super().on_run_start(ctx)
        self._fact(ids=dict(ctx.ids), run_config=dict(ctx.run_config))
        ctx.ids["run_id"] = f"run:{ctx.run_name}"

    def on_train_start(self, state: LoopState) -> None:
        super().on_train_start(state)
        self._fact(config=dict(state.config), step=state.step)

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        super().on_step_end(state, step_idx, batch, metrics)
        rows = read_jsonl(state.out_dir / "metrics.jsonl")
        self._fact(step=state.step, last_row=rows[-1] if rows else None)

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        super().on_checkpoint(state, row)
        rows = read_jsonl(state.out_dir / "manifest.jsonl")
        self._fact(
            step=state.step,
            last_manifest=ManifestRow.from_json(rows[-1]) if rows else None,
            exists=row.path.exists(),
        )

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        super().on_eval(state, step_idx, eval_name, metrics)
        self._fact(step=state.step)

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: Any,
        predictions: list[dict],  # type: ignore[type-arg]
        *,
        step: int | None = None,
    ) -> None:
        super().on_benchmark_eval(ctx, eval_result, predictions, step=step)
        self._fact(ids=dict(ctx.ids))

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        super().on_train_end(state, artifacts)
        final = artifacts.final_checkpoint
        rows = read_jsonl(artifacts.manifest_path)
        self._fact(
            step=state.step,
            final_exists=final is not None and final.path.exists(),
            manifest_on_disk=[ManifestRow.from_json(r) for r in rows],
        )

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        super().on_run_end(ctx, run_result, arm)
        self._fact(ids=dict(ctx.ids), status=run_result.status, n_runs=len(arm.runs))

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
        super().on_experiment_end(ctx, result)
        self._fact(ids=dict(ctx.ids))

    def indexed(self, hook: str) -> list[tuple[HookCall, dict[str, Any]]]:
        """The calls of one hook, each with the facts seen when it fired."""
        return [(call, self.facts[i]) for i, call in enumerate(self.calls) if call.hook == hook]


class StopOnEval(Callback):
    """Asks to stop from on_eval in one named run at one step (1-based)."""

    def __init__(self, run_name: str, step: int) -> None:
        self.run_name = run_name
        self.step = step

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if state.run_name == self.run_name and state.step == self.step:
            state.request_stop(f"early stop at {state.step}")
