"""ForeignRun: one run of someone else's training loop, seen through loopbridge's hooks.

The adapters translate their framework's events into calls on a ForeignRun, which owns
what every foreign loop needs the same way: the CallbackList, the bridge (its own unless one
is given), the LoopState and LogContext, the manifest rows of the checkpoints it was shown,
and the end of the run through the same `RunPolicy` as `TrainLoop`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._dispatch import CallbackList
from loopbridge._profile import HookProfiler
from loopbridge._report import DrainReport
from loopbridge._row_digest import digest_in_background
from loopbridge._run_policy import DrainPolicy, RunPolicy, close_run
from loopbridge._types import LogContext, LoopArtifacts, LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks.checkpoint_uploader import CheckpointUploader

__all__ = [
    "ForeignRun",
    "check_ranks_agree",
    "needs_every_rank",
    "refuse_rank_zero_only",
    "step_batch",
]

logger = logging.getLogger("loopbridge.integrations")


def step_batch(
    index: int,
    data: Any,
    _new: Any = object.__new__,
    _cls: type[TrainingBatch] = TrainingBatch,
    _set_index: Any = TrainingBatch.__dict__["index"].__set__,  # the slots' descriptors
    _set_data: Any = TrainingBatch.__dict__["data"].__set__,
    _set_size: Any = TrainingBatch.__dict__["size"].__set__,
) -> TrainingBatch:
    """`TrainingBatch(index, data)`, built for the per-step hot path.

    The frozen dataclass's own `__init__` sets each field with `object.__setattr__`, which
    measured about 0.5 µs a batch here, as much as half of what a framework's native no-op
    callback costs it per step; setting the slots directly costs about a third of that.
    """
    batch = _new(_cls)
    _set_index(batch, index)
    _set_data(batch, data)
    _set_size(batch, None)
    return batch  # type: ignore[no-any-return]


def needs_every_rank(callback: Callback) -> bool:
    """Whether a callback only works when its hooks fire on every rank of a torchrun job.

    A sharded `CheckpointUploader` (each rank uploads its own files, rank 0 waits for them),
    and a rank-0-only callback switched on for every rank with `every_rank()`.
    """
    if getattr(type(callback), "rank_zero_only", False) and not callback.rank_zero_only:
        return True
    return isinstance(callback, CheckpointUploader) and callback.ranks == "sharded"


def refuse_rank_zero_only(run: ForeignRun, adapter: str, world_size: int) -> None:
    """Refuse, on every rank, an adapter firing on rank 0 alone with a callback needing all.

    Raises:
        ValueError: naming the callback and the fix (`all_ranks=True`).
    """
    needing = [cb for cb in run.callbacks if needs_every_rank(cb)]
    if not needing:
        return
    names = ", ".join(
        f"CheckpointUploader({cb.destination!r}, ranks='sharded')"
        if isinstance(cb, CheckpointUploader)
        else f"every_rank({type(cb).__name__}(...))"
        for cb in needing
    )
    msg = (
        f"{adapter}(all_ranks=False) fires the loopbridge hooks on global rank 0 only, but "
        f"{names} needs them on every rank of this {world_size}-process job: the other ranks "
        f"would stay silent (a sharded uploader's rank 0 would wait rank_timeout for their "
        f"files, then fail the step). Pass {adapter}(..., all_ranks=True)"
    )
    raise ValueError(msg)


def check_ranks_agree(run: ForeignRun, adapter: str, framework: str, rank: int, world: int) -> None:
    """Refuse hooks on every rank when loopbridge took this process for another rank.

    The rank is detected when the callbacks are made (`RANK`, `WORLD_SIZE`); a framework
    that starts its own processes (Lightning without torchrun) sets them only later, or not
    at all, and every process would then act as rank 0.

    Raises:
        ValueError: naming both ranks and the fix.
    """
    seen = [("the callbacks", run.callbacks.rank)]
    for cb in run.callbacks:
        if isinstance(cb, CheckpointUploader) and cb.ranks == "sharded":
            seen.append((f"CheckpointUploader({cb.destination!r}, ranks='sharded')", cb.rank))
    for what, info in seen:
        if (info.rank, info.world_size) != (rank, world):
            msg = (
                f"{adapter}(all_ranks=True): {what} took this process for {info}, but "
                f"{framework} runs it as rank {rank}/{world}, so rank-0-only callbacks and "
                f"uploads would act as the wrong rank. Launch the job with torchrun (it sets "
                f"RANK and WORLD_SIZE before your script creates the callbacks)"
            )
            raise ValueError(msg)


class ForeignRun:
    """The loopbridge side of one framework run: hooks, bridge, state, manifest, run policy.

    Call `start` when the framework's training starts, then fire hooks through `callbacks`
    (for steps and evals) and `checkpoint` (for each written checkpoint), and `end` when it
    ends, or `fail` when it raised. One ForeignRun serves several runs in turn.

    Args:
        callbacks: the loopbridge callbacks; checked against the hook contract here.
        bridge: the background loop to use; by default each run gets its own, closed at the
            run's end.
        drain_timeout, on_drain_failure, interrupt_grace: the `RunPolicy` at train end.
        experiment_name, run_name: names for `LogContext` and `LoopState`; by default the
            adapter names them (the framework, and its output directory).
        profile: True, or a shared HookProfiler, to time every hook call.
        hash_checkpoints: compute each checkpoint's digest (BLAKE3) for its manifest row.
        all_ranks: the adapter fires hooks on every rank, so under torchrun every rank ends
            its run here and rank 0's report gathers every rank's (docs/distributed.md).
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        *,
        bridge: Bridge | None = None,
        drain_timeout: float | None = 300.0,
        on_drain_failure: DrainPolicy = "raise",
        interrupt_grace: float = 5.0,
        experiment_name: str | None = None,
        run_name: str | None = None,
        profile: bool | HookProfiler = False,
        hash_checkpoints: bool = True,
        all_ranks: bool = False,
    ) -> None:
        self.all_ranks = all_ranks
        self.policy = RunPolicy(drain_timeout, on_drain_failure, interrupt_grace)
        self.callbacks = CallbackList(callbacks, bridge=bridge, profile=profile)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.hash_checkpoints = hash_checkpoints
        self._given_bridge = bridge
        self.bridge: Bridge | None = bridge
        self.state: LoopState | None = None
        self.ctx: LogContext | None = None
        self.manifest: list[ManifestRow] = []
        self.artifacts: LoopArtifacts | None = None
        self.drain_report: DrainReport | None = None
        self._started = 0.0

    @property
    def active(self) -> bool:
        """Whether a run has started and not yet ended."""
        return self.state is not None

    def start(
        self,
        *,
        run_name: str,
        experiment_name: str,
        out_dir: Path,
        max_steps: int | None,
        step: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> LoopState:
        """Begin a run: fire `on_run_start`, then `on_train_start`; return its LoopState.

        `run_name` and `experiment_name` are the adapter's defaults for names not given.
        """
        if self.state is not None:
            msg = (
                f"run {self.state.run_name} is still open: a framework run started before the "
                f"previous one ended; end it (or call close()) first"
            )
            raise RuntimeError(msg)
        name = self.run_name or run_name
        if self._given_bridge is None:
            self.bridge = Bridge(name=f"loopbridge-{name}")
        self.callbacks.bridge = self.bridge
        self.manifest = []
        self.artifacts = None
        self.drain_report = None
        self._started = time.monotonic()
        settings = dict(config or {})
        state = LoopState(
            run_name=name,
            run_id=uuid.uuid4().hex,
            max_steps=max_steps,
            out_dir=out_dir,
            config=settings,
            step=step,
            rank=self.callbacks.rank.rank,
            world_size=self.callbacks.rank.world_size,
        )
        ctx = LogContext(
            experiment_name=self.experiment_name or experiment_name,
            run_name=name,
            run_config=settings,
            rank=state.rank,
            world_size=state.world_size,
        )
        self.state, self.ctx = state, ctx
        try:
            self.callbacks.on_run_start(ctx)
            self.callbacks.on_train_start(state)
        except BaseException as exc:
            self.fail(exc)
            raise
        return state

    def checkpoint(self, path: Path, step: int) -> ManifestRow:
        """Describe a checkpoint the framework has completely written; fire `on_checkpoint`."""
        state = self._state()
        row = ManifestRow.for_checkpoint(
            path, step=step, run_name=state.run_name, digest=self.hash_checkpoints
        )
        self.manifest.append(row)
        self.callbacks.on_checkpoint(state, row)
        # No uploader claimed the hashing: do it off the training thread (each byte once).
        digest_in_background(row)
        return row

    def end(self, stop_reason: str) -> DrainReport:
        """Fire `on_train_end`, drain, fire `on_run_end`; then apply the run policy.

        `stop_reason` is used unless a callback asked to stop (its reason wins).

        Raises:
            DrainError: background work failed or was left undone, with policy "raise".
        """
        state, ctx = self._state(), self.ctx
        assert ctx is not None
        assert self.bridge is not None
        final = self.manifest[-1] if self.manifest else None
        artifacts = LoopArtifacts(
            out_dir=state.out_dir,
            metrics_path=None,
            manifest_path=None,
            manifest=list(self.manifest),
            final_checkpoint=final if final is not None and final.step == state.step else None,
            steps_completed=state.step,
            stop_reason=state.stop_reason or stop_reason,
        )
        self.artifacts = artifacts
        try:
            report = self.policy.end_training(
                self.callbacks, state, artifacts, self.bridge, gather_ranks=self.all_ranks
            )
            profiler = self.callbacks.profiler
            if profiler is not None:
                artifacts.hook_timings = profiler.rows()
            close_run(
                self.callbacks, ctx, state, artifacts, duration_s=time.monotonic() - self._started
            )
        except BaseException as exc:
            self.fail(exc)
            raise
        # Work spawned by on_run_end belongs to this run's report too.
        if self._given_bridge is None:
            after = self.bridge.close(self.policy.drain_timeout)
        else:
            after = self.bridge.drain(self.policy.drain_timeout, cancel_pending=True)
        if after.completed or not after.ok:
            report = report.merge(after)
            artifacts.drain_report = report
        self.drain_report = report
        self.state = None
        self.policy.enforce(report, state.run_name)
        return report

    def fail(self, exc: BaseException) -> None:
        """The framework's loop raised: close the run as failed and drain, without raising.

        After Ctrl-C, in-flight work gets `interrupt_grace` seconds, not the whole drain
        timeout. What did not finish is logged, and kept in `drain_report`.
        """
        state, ctx, bridge = self.state, self.ctx, self.bridge
        if state is None or ctx is None or bridge is None:
            return
        self.state = None
        self.callbacks.annotate(exc)
        try:
            close_run(
                self.callbacks,
                ctx,
                state,
                self.artifacts,
                error=exc,
                duration_s=time.monotonic() - self._started,
            )
        except Exception as hook_error:
            logger.error("run %s: on_run_end failed too: %r", state.run_name, hook_error)
        grace = self.policy.cancel_grace
        timeout = grace if isinstance(exc, KeyboardInterrupt) else self.policy.drain_timeout
        if self._given_bridge is None:
            report = bridge.close(timeout, cancel_grace=grace)
        else:
            report = bridge.drain(timeout, cancel_pending=True, cancel_grace=grace)
        self.drain_report = report
        if not report.ok:
            logger.error("run %s failed; background work: %s", state.run_name, report.summary())

    def _state(self) -> LoopState:
        state = self.state
        if state is None:
            msg = "no run is open: the framework's training has not started (or has ended)"
            raise RuntimeError(msg)
        return state
