"""loopbridge callbacks in transformers: `Trainer(callbacks=[LoopbridgeTrainerCallback([...])])`.

transformers logs a step's metrics (`loss`, `grad_norm`, `learning_rate`, `epoch`) after its
`on_step_end` event, in `on_log`, and only on logging steps. So the adapter fires loopbridge's
`on_step_end` at transformers' `on_step_end` when the step will not log, and otherwise at
the `on_log` that follows, with those metrics under transformers' own names. `on_save` fires
after the checkpoint directory (`<output_dir>/checkpoint-<step>`) is completely written.

transformers has no event for a failed `train()`: when it raises, call `close()` on the
adapter (or let the process exit: the bridge's exit handler drains it, bounded).

The mapping of transformers' events onto loopbridge's hooks is in docs/integrations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._dispatch import CallbackList
from loopbridge._exceptions import MissingExtraError
from loopbridge._profile import HookProfiler
from loopbridge._report import DrainReport
from loopbridge._run_policy import DrainPolicy
from loopbridge._types import LoopArtifacts, LoopState
from loopbridge.integrations._run import (
    ForeignRun,
    check_ranks_agree,
    refuse_rank_zero_only,
    step_batch,
)

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    _msg = (
        "loopbridge.integrations.transformers needs transformers and accelerate: pip install "
        "'loopbridge[transformers]' (install torch for your platform first)"
    )
    raise MissingExtraError(_msg) from exc

__all__ = ["LoopbridgeTrainerCallback"]

logger = logging.getLogger(__name__)

EVAL_NAME = "eval"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
_NOT_STEP_LOGS = ("train_runtime",)  # the summary transformers logs once after training


class LoopbridgeTrainerCallback(TrainerCallback):
    """Fire loopbridge callbacks from `transformers.Trainer.train`, on world process zero.

    Args:
        callbacks: loopbridge callbacks (`CheckpointUploader`, `JsonlLogger`, your own...).
        bridge: the background loop to use; by default each train() gets its own.
        drain_timeout: seconds to wait for background work after `on_train_end`.
        on_drain_failure: "raise" `DrainError` out of `train()` (the default) or "warn" when
            the drain finds work failed, cancelled or pending; the same policy as TrainLoop.
        experiment_name: the LogContext's experiment (default "transformers"); the uploader's
            remote layout is `<prefix>/<experiment>/<run>/`.
        run_name: the run's name (default: the TrainingArguments' `run_name`, else the name
            of `output_dir`).
        profile: True, or a HookProfiler, to time every loopbridge hook call.
        interrupt_grace: seconds in-flight work gets to finish after an error.
        hash_checkpoints: compute each checkpoint's digest (BLAKE3) for its manifest row.
        all_ranks: fire the hooks on every process, not only on world process zero.

    After `train()`, `drain_report` is the run's DrainReport.
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        *,
        bridge: Bridge | None = None,
        drain_timeout: float | None = 300.0,
        on_drain_failure: DrainPolicy = "raise",
        experiment_name: str | None = None,
        run_name: str | None = None,
        profile: bool | HookProfiler = False,
        interrupt_grace: float = 5.0,
        hash_checkpoints: bool = True,
        all_ranks: bool = False,
    ) -> None:
        self.run = ForeignRun(
            callbacks,
            bridge=bridge,
            drain_timeout=drain_timeout,
            on_drain_failure=on_drain_failure,
            interrupt_grace=interrupt_grace,
            experiment_name=experiment_name,
            run_name=run_name,
            profile=profile,
            hash_checkpoints=hash_checkpoints,
            all_ranks=all_ranks,
        )
        self.all_ranks = all_ranks
        self._state: LoopState | None = None  # set while train() runs on a firing process
        self._pending = False  # a step ended whose on_step_end waits for its logs
        self._fire_step_end = self.run.callbacks.on_step_end
        self._listens = True

    @property
    def callbacks(self) -> CallbackList:
        """The loopbridge callbacks this adapter fires."""
        return self.run.callbacks

    @property
    def artifacts(self) -> LoopArtifacts | None:
        """The last run's LoopArtifacts (manifest rows, steps, stop reason), once it ended."""
        return self.run.artifacts

    @property
    def drain_report(self) -> DrainReport | None:
        """The last run's DrainReport, once its train() has ended."""
        return self.run.drain_report

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Fire `on_run_start` and `on_train_start`."""
        if self.all_ranks:
            where = (args.process_index, args.world_size)
            check_ranks_agree(self.run, "LoopbridgeTrainerCallback", "transformers", *where)
        elif args.world_size > 1:
            refuse_rank_zero_only(self.run, "LoopbridgeTrainerCallback", args.world_size)
        if not (self.all_ranks or state.is_world_process_zero):
            return
        out_dir = Path(args.output_dir or ".")
        name = args.run_name or out_dir.resolve().name or "transformers"
        self._pending = False
        self._state = self.run.start(
            run_name=name,
            experiment_name="transformers",
            out_dir=out_dir,
            max_steps=state.max_steps if state.max_steps > 0 else None,
            step=state.global_step,
            config=args.to_sanitized_dict(),
        )
        self._fire_step_end = self.run.callbacks.on_step_end
        self._listens = bool(self.run.callbacks.overriding("on_step_end"))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """After an optimizer step: fire `on_step_end` now, or at the `on_log` that follows."""
        # The per-step hot path: kept inline (see benchmarks/bench_adapters.py).
        lb_state = self._state
        if lb_state is None:
            return
        if self._pending:
            self._step_end({})
        step = lb_state.step = state.global_step
        if control.should_log:
            self._pending = True  # its metrics arrive in on_log
            return
        metrics: dict[str, float] = {}
        lb_state.metrics = metrics
        if self._listens:
            self._fire_step_end(lb_state, step - 1, step_batch(step - 1, None), metrics)
        if lb_state.stop_reason is not None:
            control.should_training_stop = True  # the same object transformers holds

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> TrainerControl | None:
        """The step's training logs: fire the waiting `on_step_end` with them."""
        if not self._pending:
            return None
        if logs and not any(k.startswith("eval_") or k in _NOT_STEP_LOGS for k in logs):
            self._step_end(_floats(logs))
        else:
            self._step_end({})
        return self._control(control)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> TrainerControl | None:
        """After each evaluation during train(): fire `on_eval` with transformers' names."""
        lb_state = self._state
        if lb_state is not None:
            if self._pending:
                self._step_end({})
            lb_state.step = state.global_step
            values = _floats(metrics)
            self.run.callbacks.on_eval(lb_state, state.global_step - 1, EVAL_NAME, values)
        if args.world_size > 1:
            _share_stop(lb_state, control)
        return self._control(control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl | None:
        """The checkpoint directory is written: fire `on_checkpoint`."""
        lb_state = self._state
        if lb_state is None:
            return None
        if self._pending:
            self._step_end({})
        path = Path(args.output_dir or ".") / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if not path.is_dir():
            logger.error(
                "transformers saved step %d, but %s is not a directory (a hyperparameter search "
                "run?); the loopbridge callbacks are not told about this checkpoint",
                state.global_step,
                path,
            )
            return None
        self.run.checkpoint(path, state.global_step)
        return self._control(control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Fire `on_train_end`, drain, fire `on_run_end`; raise DrainError per the policy."""
        lb_state = self._state
        if lb_state is None:
            return
        if self._pending:
            self._step_end({})
        self._state = None
        reason = "max_steps" if state.global_step >= state.max_steps else "should_training_stop"
        self.run.end(reason)

    def close(self) -> None:
        """End a run left open because train() raised: drain and close its bridge."""
        self._state = None
        self._pending = False
        self.run.fail(RuntimeError("LoopbridgeTrainerCallback.close() with the run still open"))

    def _step_end(self, metrics: dict[str, float]) -> None:
        """Fire loopbridge's `on_step_end` for the step that last ended."""
        self._pending = False
        state = self._state
        if state is None:
            return
        state.metrics = metrics
        step_idx = state.step - 1
        self._fire_step_end(state, step_idx, step_batch(step_idx, None), metrics)

    def _control(self, control: TrainerControl) -> TrainerControl | None:
        """Stop transformers' loop the transformers way when a callback asked to stop."""
        state = self._state
        if state is None or state.stop_reason is None:
            return None
        control.should_training_stop = True
        return control


def _share_stop(state: LoopState | None, control: TrainerControl) -> None:
    """Broadcast process zero's stop request (a collective: every process calls this)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    box = [state.stop_reason if state is not None else None]
    dist.broadcast_object_list(box, src=0)
    reason = box[0]
    if reason is not None:
        if state is not None:
            state.request_stop(str(reason))
        control.should_training_stop = True


def _floats(values: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of a transformers log or metrics dict, as floats."""
    if not values:
        return {}
    return {
        name: float(value)
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
