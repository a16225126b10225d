"""Helpers for testing code that uses loopbridge: record hook calls and assert on them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from loopbridge._callback import HOOK_NAMES, Callback
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)

__all__ = ["HookCall", "RecordingCallback"]


@dataclass(frozen=True)
class HookCall:
    """One recorded hook call: its name, positional arguments and keyword arguments."""

    hook: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    """`state.step` at the call, for hooks that receive a LoopState."""


class RecordingCallback(Callback):
    """Records every hook call, in order, for assertions in tests.

    Arguments are kept as passed (the live objects), except `metrics` dicts, which are
    copied so later mutation cannot rewrite history.
    """

    def __init__(self) -> None:
        self.calls: list[HookCall] = []

    @property
    def hooks(self) -> list[str]:
        """The names of the hooks called, in order."""
        return [call.hook for call in self.calls]

    def calls_to(self, hook: str) -> list[HookCall]:
        """The recorded calls of one hook."""
        if hook not in HOOK_NAMES:
            raise ValueError(f"{hook!r} is not a hook; hooks are {', '.join(HOOK_NAMES)}")
        return [call for call in self.calls if call.hook == hook]

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    def _record(self, hook: str, *args: Any, **kwargs: Any) -> None:
        state = next((a for a in args if isinstance(a, LoopState)), None)
        kept = tuple(copy.copy(a) if isinstance(a, dict) else a for a in args)
        self.calls.append(HookCall(hook, kept, kwargs, None if state is None else state.step))

    def on_experiment_start(self, ctx: LogContext) -> None:
        self._record("on_experiment_start", ctx)

    def on_group_start(self, ctx: LogContext, group_name: str) -> None:
        self._record("on_group_start", ctx, group_name)

    def on_run_start(self, ctx: LogContext) -> None:
        self._record("on_run_start", ctx)

    def on_train_start(self, state: LoopState) -> None:
        self._record("on_train_start", state)

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        self._record("on_step_end", state, step_idx, batch, metrics)

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        self._record("on_checkpoint", state, row)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        self._record("on_eval", state, step_idx, eval_name, metrics)

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        self._record("on_benchmark_eval", ctx, eval_result, predictions, step=step)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self._record("on_train_end", state, artifacts)

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        self._record("on_run_end", ctx, run_result, arm)

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
        self._record("on_experiment_end", ctx, result)
