"""loopbridge callbacks inside PyTorch Lightning: `Trainer(callbacks=[LoopbridgeCallback([...])])`.

Lightning's `on_save_checkpoint` fires before the checkpoint file exists, so the adapter
sees checkpoints where they are written, at two levels, both set up in `setup()` and undone
in `teardown()` (and `on_exception`):

- the strategy's current `CheckpointIO` (`trainer.strategy.checkpoint_io`, whatever plugin
  the user gave) is wrapped in an observer that calls the inner plugin and notes the file it
  wrote. DDP calls it on global rank 0 only;
- the strategy's `save_checkpoint` (an instance attribute over the class's method) is
  wrapped too: FSDP's and ModelParallel's sharded saves, and a user's strategy that writes
  torch.distributed.checkpoint directories, write on every rank without any CheckpointIO;
- and the trainer's `save_checkpoint`, which waits at a barrier after the strategy's save.

Once the save is complete (`trainer.save_checkpoint` returned; a strategy save called on its
own, when it returns), each rank fires `on_checkpoint` exactly once for what it wrote: the
file its CheckpointIO wrote during the save, or else the checkpoint directory the strategy
left (a strategy that writes on every rank). A rank that wrote nothing (DDP's rank 1) fires
nothing. A CheckpointIO called outside a strategy save fires at once. Every save during fit
is seen: `ModelCheckpoint`, `trainer.save_checkpoint`.

Under torchrun the hooks fire on global rank 0 only unless `all_ranks=True`; a callback
that needs every rank (`CheckpointUploader(ranks="sharded")`, an `every_rank(...)` logger)
is refused at `setup()` without it, on every rank (docs/distributed.md).

The mapping of Lightning's events onto loopbridge's hooks is in docs/integrations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from loopbridge.integrations._lightning_saves import (
    LIGHTNING_MISSING,
    ObservedCheckpointIO,
    StrategySaveWatch,
)
from loopbridge.integrations._run import (
    ForeignRun,
    check_ranks_agree,
    refuse_rank_zero_only,
    step_batch,
)

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise MissingExtraError(LIGHTNING_MISSING) from exc

__all__ = ["LoopbridgeCallback"]

logger = logging.getLogger(__name__)

EVAL_NAME = "validation"


class LoopbridgeCallback(pl.Callback):
    """Fire loopbridge callbacks from Lightning's `Trainer.fit`, on global rank 0 by default.

    Args:
        callbacks: loopbridge callbacks (`CheckpointUploader`, `JsonlLogger`, your own...).
        bridge: the background loop to use; by default each fit gets its own, closed at its end.
        drain_timeout: seconds to wait for background work after `on_train_end`.
        on_drain_failure: "raise" `DrainError` out of `fit()` (the default) or "warn" when
            the drain finds work failed, cancelled or pending; the same policy as TrainLoop.
        experiment_name: the LogContext's experiment (default "lightning"); the uploader's
            remote layout is `<prefix>/<experiment>/<run>/`.
        run_name: the run's name (default: the name of `trainer.default_root_dir`).
        profile: True, or a HookProfiler, to time every loopbridge hook call.
        interrupt_grace: seconds in-flight work gets to finish after Ctrl-C or an error.
        hash_checkpoints: compute each checkpoint's digest (BLAKE3) for its manifest row.
        all_ranks: fire the hooks on every rank, not only on global rank 0.

    After `fit()`, `drain_report` is the run's DrainReport.
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
        super().__init__()
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
        self._state: LoopState | None = None  # set while a fit runs on a firing rank
        self._fires = False
        self._observer: ObservedCheckpointIO | None = None
        self._save_watch: StrategySaveWatch | None = None
        self._fire_step_end = self.run.callbacks.on_step_end
        self._listens = True
        self._progress: Any = None  # Lightning's optimizer-step counter, read per batch
        self._results: Any = None  # the training loop's logged values, read per step

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
        """The last run's DrainReport, once its fit has ended."""
        return self.run.drain_report

    # -- set-up and tear-down --------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Decide whether this rank fires hooks; observe the strategy's checkpoint writes."""
        if stage != "fit":
            return
        rank, world = trainer.global_rank, trainer.world_size
        if self.all_ranks:
            check_ranks_agree(self.run, "LoopbridgeCallback", "Lightning", rank, world)
        elif world > 1:
            refuse_rank_zero_only(self.run, "LoopbridgeCallback", world)
        self._fires = self.all_ranks or trainer.global_rank == 0
        if not self._fires:
            return
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, ObservedCheckpointIO):
            current = current.inner  # left by an earlier fit that ended abnormally
        if isinstance(current, AsyncCheckpointIO):
            msg = (
                "LoopbridgeCallback cannot tell when AsyncCheckpointIO has finished writing a "
                "checkpoint, so it could upload half a file; use the synchronous CheckpointIO"
            )
            raise ValueError(msg)
        self._observer = ObservedCheckpointIO(current, self, trainer)
        strategy.checkpoint_io = self._observer
        self._save_watch = StrategySaveWatch(strategy, self, trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the strategy its own CheckpointIO and `save_checkpoint` back."""
        self._unobserve(trainer)

    def _unobserve(self, trainer: pl.Trainer) -> None:
        observer, self._observer = self._observer, None
        if observer is not None and trainer.strategy.checkpoint_io is observer:
            trainer.strategy.checkpoint_io = observer.inner
        watch, self._save_watch = self._save_watch, None
        if watch is not None:
            watch.restore()

    # -- the run ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fire `on_run_start` and `on_train_start`."""
        if not self._fires:
            return
        out_dir = Path(trainer.default_root_dir)
        max_steps = trainer.max_steps if trainer.max_steps > 0 else None
        self._state = self.run.start(
            run_name=out_dir.resolve().name or "lightning",
            experiment_name="lightning",
            out_dir=out_dir,
            max_steps=max_steps,
            step=trainer.global_step,
            config=dict(pl_module.hparams),
        )
        self._fire_step_end = self.run.callbacks.on_step_end
        # Nobody listens to on_step_end: skip the per-step float conversion (a device sync).
        self._listens = bool(self.run.callbacks.overriding("on_step_end"))
        self._progress, self._results = _step_sources(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step: fire `on_step_end` with the step's logged metrics."""
        # The per-step hot path: kept inline (see benchmarks/bench_adapters.py).
        state = self._state
        if state is None:
            return
        progress = self._progress
        step = trainer.global_step if progress is None else progress.completed
        if step == state.step:
            return  # accumulating gradients: no optimizer step in this batch
        state.step = step
        if not self._listens:
            return
        results = self._results
        metrics = _step_metrics(trainer) if results is None else _logged(results)
        state.metrics = metrics
        self._fire_step_end(state, step - 1, step_batch(batch_idx, batch), metrics)
        if state.stop_reason is not None:
            self._stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After each validation of the fit (not the sanity check): fire `on_eval`."""
        if trainer.sanity_checking:
            return
        state = self._state
        if state is not None:
            state.step = trainer.global_step
            metrics = _eval_metrics(trainer)
            self.run.callbacks.on_eval(state, state.step - 1, EVAL_NAME, metrics)
            if state.stop_reason is not None:
                self._stop(trainer)
        self._share_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DDP, make a stop request of rank 0 every rank's."""
        self._share_stop(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fire `on_train_end`, drain, fire `on_run_end`; raise DrainError per the policy."""
        state, self._state = self._state, None
        if state is None:
            return
        if not self._listens:
            state.metrics = _step_metrics(trainer)  # for the RunResult's final metrics
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            reason = "max_steps"
        elif trainer.should_stop:
            reason = "trainer.should_stop"
        else:
            reason = "max_epochs"
        self.run.end(reason)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the run as failed and drain it briefly; put the CheckpointIO back."""
        self._state = None
        self.run.fail(exception)
        self._unobserve(trainer)

    def close(self) -> None:
        """End a run left open (its fit never ended): drain and close its bridge."""
        self._state = None
        self.run.fail(RuntimeError("LoopbridgeCallback.close() with the run still open"))

    # -- checkpoints (called by the observers) -----------------------------------------------

    def _written(self, trainer: pl.Trainer, path: str, step: int) -> None:
        """The CheckpointIO wrote `path`: fire now, or once the strategy's save returned."""
        watch = self._save_watch
        if watch is not None and watch.saving:
            watch.written.append(path)
        else:
            self._saved(trainer, path, step)

    def _saved(self, trainer: pl.Trainer, path: str, step: int) -> None:
        """A checkpoint file is completely written: fire `on_checkpoint`."""
        if self._state is None:
            logger.warning(
                "checkpoint %s was written outside Trainer.fit's training; the loopbridge "
                "callbacks are not told about it",
                path,
            )
            return
        if "://" in path:
            logger.warning(
                "checkpoint %s is not a local file; the loopbridge callbacks are not told", path
            )
            return
        self.run.checkpoint(Path(path), step)
        if self._state.stop_reason is not None:
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        """Stop Lightning's loop the Lightning way; under DDP at the next shared decision."""
        if trainer.world_size <= 1:
            trainer.should_stop = True

    def _share_stop(self, trainer: pl.Trainer) -> None:
        """Broadcast rank 0's stop request (a collective: every rank calls this)."""
        if trainer.world_size <= 1:
            return
        state = self._state
        reason = trainer.strategy.broadcast(state.stop_reason if state else None, src=0)
        if reason is not None:
            if state is not None:
                state.request_stop(reason)
            trainer.should_stop = True


def _step_sources(trainer: Any, pl_module: Any) -> tuple[Any, Any]:
    """Lightning's optimizer-step counter and the training loop's result collection.

    `trainer.global_step` and `trainer.callback_metrics` reach these through several
    properties each (about 5 µs a step together, measured in benchmarks/bench_adapters.py);
    the adapter holds on to them instead. (None, None) where Lightning's internals moved:
    the adapter then uses the public properties.
    """
    try:
        epoch_loop = trainer.fit_loop.epoch_loop
        if pl_module.automatic_optimization:
            progress = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            progress = epoch_loop.manual_optimization.optim_step_progress.total
        if progress.completed != trainer.global_step:
            return None, None
        return progress, epoch_loop._results
    except AttributeError:
        return None, None


def _logged(results: Any) -> dict[str, float]:
    """The latest value of each metric logged with `on_step=True`, by its logged name."""
    metrics: dict[str, float] = {}
    for result in results.values():
        value = result._forward_cache
        if value is not None and result.meta.on_step:
            metrics[result.meta.name] = value.item()
    return metrics


def _step_metrics(trainer: Any) -> dict[str, float]:
    """The values of this step's metrics logged with `on_step=True`, by the logged name.

    Read from the training loop's result collection (what `trainer.callback_metrics` is
    built from): a quarter of the cost of that property, which rebuilds several dicts.
    """
    metrics: dict[str, float] = {}
    try:
        results = trainer._results
        if results is None:
            return metrics
        for result in results.values():
            value = result._forward_cache
            if value is not None and result.meta.on_step:
                metrics[result.meta.name] = float(value)
    except AttributeError:  # a Lightning whose internals moved: the public, slower way
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return metrics


def _eval_metrics(trainer: Any) -> dict[str, float]:
    """The metrics logged during the validation that just ended, by the logged name."""
    try:
        values = trainer.fit_loop.epoch_loop.val_loop._results.metrics(False)["callback"]
    except (AttributeError, KeyError):
        values = trainer.callback_metrics
    return {name: float(value) for name, value in values.items() if value.numel() == 1}
