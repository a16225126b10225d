"""Callback: the eleven typed, no-op hooks of the contract, and the way to offload work."""

# No `from __future__ import annotations` here: the hook annotations are real objects, so
# that `inspect.signature` shows exactly the types of the contract.

from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from loopbridge._exceptions import CallbackNotAttachedError
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

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge
    from loopbridge._future import TaskFuture

__all__ = ["HOOK_NAMES", "Callback"]

T = TypeVar("T")

HOOK_NAMES: tuple[str, ...] = (
    "on_experiment_start",
    "on_group_start",
    "on_run_start",
    "on_train_start",
    "on_step_end",
    "on_checkpoint",
    "on_eval",
    "on_benchmark_eval",
    "on_train_end",
    "on_run_end",
    "on_experiment_end",
)
"""Every hook, in the order a run meets them."""


class Callback:
    """Base class for callbacks: override the hooks you need; every other hook is a no-op.

    Hooks run inline on the training-loop thread, so they should be quick. Slow work (uploads,
    HTTP posts) goes to the background loop through `self.spawn(...)`; blocking code through
    `self.spawn(loopbridge.to_thread(fn, *args))`. A public method named `on_...` must be one
    of the hooks (a misspelling is refused at registration); mark a method of your own that
    starts with `on_` with `@loopbridge.not_a_hook`.
    """

    # Set by CallbackList at registration; a class default so subclasses need not call
    # super().__init__().
    _loopbridge_bridge: "Bridge | None" = None

    rank_zero_only: bool = False
    """Under torchrun, fire this callback's hooks on global rank 0 only (the loggers set it).

    Set it to False on an instance (or use `loopbridge.every_rank(cb)`) to act on every rank.
    """

    def on_experiment_start(self, ctx: LogContext) -> None:
        """Called once before the first arm; create the experiment record here."""

    def on_group_start(self, ctx: LogContext, group_name: str) -> None:
        """Called when an arm needs a run group (repeats or continual stages)."""

    def on_run_start(self, ctx: LogContext) -> None:
        """Called per run, before training; `ctx.run_config` is set."""

    def on_train_start(self, state: LoopState) -> None:
        """Called once before the first training step."""

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Called after every step, once its metric row is written; `state.step == step_idx + 1`."""

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Called after each checkpoint is saved and its manifest row recorded."""

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Called per evaluator after each in-loop evaluation."""

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Called per benchmark scored: in the loop (`step` = train step) or after it (None)."""

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Called once after the loop and its final checkpoint; background work drains next."""

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Called per run after its evals, before the run is marked completed."""

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
        """Called once at the end of the experiment."""

    def _attached_bridge(self) -> "Bridge":
        """The bridge of the callback list this callback is attached to, or a clear error."""
        bridge = self._loopbridge_bridge
        if bridge is None:
            name = type(self).__qualname__
            msg = (
                f"{name} is not attached to a bridge: add it to a TrainLoop or Experiment "
                f"(callbacks=[...]) or to CallbackList(..., bridge=...) before spawning work"
            )
            raise CallbackNotAttachedError(msg)
        return bridge

    def spawn(
        self,
        work: Coroutine[Any, Any, T] | Callable[[], Awaitable[T]],
        *,
        name: str | None = None,
        key: Hashable | None = None,
    ) -> "TaskFuture[T]":
        """Run `work` on the background loop and return its future at once; see `Bridge.spawn`."""
        try:
            bridge = self._attached_bridge()
        except CallbackNotAttachedError:
            _close_if_coroutine(work)
            raise
        return bridge.spawn(work, name=name, key=key)

    def call(
        self,
        work: Coroutine[Any, Any, T] | Callable[[], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """Run `work` on the background loop and wait for its result; see `Bridge.call`."""
        try:
            bridge = self._attached_bridge()
        except CallbackNotAttachedError:
            _close_if_coroutine(work)
            raise
        return bridge.call(work, timeout=timeout)


def _close_if_coroutine(work: object) -> None:
    """Close a coroutine that will never run, so Python does not warn it was never awaited."""
    if isinstance(work, Coroutine):
        work.close()
