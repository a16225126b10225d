"""TrainLoop: runs the user's step function and fires the hooks at their moments.

Per step: run the step, write its metric row, fire `on_step_end`; every `eval_every` steps,
run the evaluators (`on_eval`) and the loop's benchmarks (`on_benchmark_eval(step=N)`);
every `checkpoint_every` steps, save, record the manifest row, fire `on_checkpoint`. At the
end: the final checkpoint, `on_train_end`, then the drain of the background work.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._dispatch import CallbackList
from loopbridge._metrics import coerce_metrics
from loopbridge._out_dir import claim_out_dir, clear_stale_checkpoint
from loopbridge._profile import HookProfiler, ProfileMark
from loopbridge._records import JsonLinesWriter
from loopbridge._row_digest import digest_in_background, manifest_line, track_in_manifest
from loopbridge._run_policy import DrainPolicy, RunPolicy
from loopbridge._shutdown import CANCEL_WAIT_S, Shutdown
from loopbridge._types import (
    EvalResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    TrainingBatch,
)

if TYPE_CHECKING:
    from loopbridge.restore import Restored

__all__ = ["BenchmarkFn", "DrainPolicy", "EvalFn", "LoadFn", "SaveFn", "StepFn", "TrainLoop"]

logger = logging.getLogger("loopbridge.loop")

StepFn = Callable[[LoopState, TrainingBatch], Mapping[str, float] | None]
"""Runs one training step on a batch and returns its metrics."""
SaveFn = Callable[[LoopState, Path], None]
"""Writes a checkpoint, a file or a directory of shards, at the given path."""
LoadFn = Callable[[LoopState, Path], None]
"""Reads a checkpoint that `save` wrote (a file or a directory) back into the model."""
EvalFn = Callable[[LoopState], Mapping[str, float]]
"""Evaluates the model and returns metrics."""
BenchmarkFn = Callable[[LoopState], tuple[EvalResult, list[dict[str, Any]]]]
"""Scores a benchmark: its result and the per-task prediction rows."""

METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainLoop:
    """Runs `step` over `batches` and fires the callbacks' hooks at their moments.

    Args:
        step: `step(state, batch) -> metrics`, one training step.
        batches: an iterable of batches; items that are TrainingBatch are used as they are.
        max_steps: stop after this many steps (else when the batches run out).
        out_dir: where metric rows, the manifest and checkpoints are written:
            `metrics.jsonl` has `{"step", "time", "metrics"}` per step and
            `{"step", "time", "eval", "metrics"}` per evaluation (NaN as the string "NaN");
            `manifest.jsonl` has one ManifestRow per checkpoint; `checkpoints/step-%08d`.
        save: `save(state, path)` writes a checkpoint at `path`; needed for checkpoints.
        checkpoint_every: save every N steps; a final checkpoint is always saved if `save`.
        evaluators: `{name: fn(state) -> metrics}`, run every `eval_every` steps.
        benchmarks: `{name: fn(state) -> (EvalResult, predictions)}`, also every `eval_every`.
        callbacks: the loop's own callbacks (an Experiment puts its callbacks ahead of them).
        bridge: the background loop to use; by default the loop owns one for this run.
        drain_timeout: seconds to wait for background work after `on_train_end`.
        on_drain_failure: "raise" DrainError (after `on_train_end`) or "warn" when the drain
            finds work failed, cancelled or still pending.
        interrupt_grace: seconds in-flight work gets to finish after Ctrl-C, or after the
            run failed, before it is cancelled (a second Ctrl-C cancels it at once, a third
            abandons it; see the README's "Errors").
        profile: True, or a shared HookProfiler, to time every hook call.
        print_profile: at train end, write the profiler's table to stderr (True) or to the
            given stream; turns profiling on.
        hash_checkpoints: compute each checkpoint's digest (BLAKE3) for its manifest row, off the
            training thread (`row.digest` is filled in the background; see `wait_digest`).
        start_step: steps already completed by an earlier process (when resuming from a
            checkpoint), so step numbers, checkpoint names and `max_steps` carry on from it.
        resume_from: continue from the newest checkpoint of this run, before the first step:
            `"auto"` (the out dir, then the attached CheckpointUploader's store; fresh if
            none), or the uploader's destination (`s3://bucket/prefix` or a directory).
            The loop calls `load(state, path)` and carries on from that step; `loop.restored`
            says what it started from (None for a fresh start). See docs/restore.md.
        load: `load(state, path)` reads a checkpoint back; needed with `resume_from`.
    """

    def __init__(
        self,
        step: StepFn,
        batches: Iterable[Any],
        *,
        max_steps: int | None = None,
        out_dir: str | Path,
        save: SaveFn | None = None,
        checkpoint_every: int | None = None,
        evaluators: Mapping[str, EvalFn] | None = None,
        eval_every: int | None = None,
        benchmarks: Mapping[str, BenchmarkFn] | None = None,
        callbacks: Sequence[Callback] = (),
        bridge: Bridge | None = None,
        drain_timeout: float | None = 300.0,
        on_drain_failure: DrainPolicy = "raise",
        interrupt_grace: float = 5.0,
        profile: bool | HookProfiler = False,
        print_profile: bool | TextIO = False,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        hash_checkpoints: bool = True,
        start_step: int = 0,
        resume_from: str | os.PathLike[str] | None = None,
        load: LoadFn | None = None,
    ) -> None:
        from loopbridge._loop_restore import check_resume_from

        _check_positive("max_steps", max_steps)
        _check_positive("checkpoint_every", checkpoint_every)
        _check_positive("eval_every", eval_every)
        if not isinstance(start_step, int) or start_step < 0:
            msg = f"TrainLoop(start_step={start_step!r}): give the steps already completed, >= 0"
            raise ValueError(msg)
        check_resume_from(resume_from, load is not None, start_step)
        if checkpoint_every is not None and save is None:
            msg = (
                f"TrainLoop(checkpoint_every={checkpoint_every}) needs save=fn(state, path) "
                f"that writes the checkpoint"
            )
            raise ValueError(msg)
        if (evaluators or benchmarks) and eval_every is None:
            msg = (
                "TrainLoop got evaluators or benchmarks but no eval_every; pass eval_every=N "
                "to run them every N steps"
            )
            raise ValueError(msg)
        if on_drain_failure not in ("raise", "warn"):
            msg = f"on_drain_failure={on_drain_failure!r}: use 'raise' or 'warn'"
            raise ValueError(msg)
        if not callable(step):
            raise TypeError(f"step must be callable as step(state, batch), got {step!r}")
        self.step_fn = step
        self._step_label = f"step function {_label(step)}"
        self.batches = batches
        self.max_steps = max_steps
        self.out_dir = Path(out_dir)
        _check_out_dir(self.out_dir)
        self.save = save
        self.checkpoint_every = checkpoint_every
        self.evaluators = dict(evaluators or {})
        self.eval_every = eval_every
        self.benchmarks = dict(benchmarks or {})
        self.drain_timeout = drain_timeout
        self.on_drain_failure: DrainPolicy = on_drain_failure
        self.interrupt_grace = interrupt_grace
        self.hash_checkpoints = hash_checkpoints
        self._own_callbacks = tuple(callbacks)
        self._bridge = bridge
        self._owns_bridge = bridge is None
        self.print_profile = print_profile
        if print_profile and not profile:
            profile = True
        self.callbacks = CallbackList(callbacks, bridge=bridge, profile=profile)
        name = run_name or self.out_dir.name or "run"
        self.state = LoopState(
            run_name=name,
            run_id=uuid.uuid4().hex,
            max_steps=max_steps,
            out_dir=self.out_dir,
            config=dict(config or {}),
            step=start_step,
            rank=self.callbacks.rank.rank,
            world_size=self.callbacks.rank.world_size,
        )
        self._start_step = start_step
        self.resume_from = resume_from
        self.load = load
        self.restored: Restored | None = None
        self.ctx = LogContext(
            experiment_name=name,
            run_name=name,
            run_config=dict(config or {}),
            rank=self.state.rank,
            world_size=self.state.world_size,
        )
        self.artifacts: LoopArtifacts | None = None
        self._profile_mark: ProfileMark | None = None
        self._ran = False

    @property
    def profiler(self) -> HookProfiler | None:
        """The hook profiler, when profiling is on."""
        return self.callbacks.profiler

    @property
    def bridge(self) -> Bridge | None:
        """The bridge background work goes to (created when the run starts, if not given)."""
        return self._bridge

    def _adopt(
        self,
        callbacks: Sequence[Callback],
        bridge: Bridge,
        ctx: LogContext,
        profiler: HookProfiler | None,
    ) -> None:
        """Join an Experiment: its callbacks first, its bridge, its context and profiler."""
        self._bridge = bridge
        self._owns_bridge = False
        self.callbacks.release()
        profile: bool | HookProfiler = (
            profiler if profiler is not None else (self.callbacks.profiler or False)
        )
        self.callbacks = CallbackList(
            [*callbacks, *self._own_callbacks], bridge=bridge, profile=profile
        )
        self.ctx = ctx
        self.state.run_name = ctx.run_name or self.state.run_name
        self.state.config = dict(ctx.run_config)

    def run(self) -> LoopArtifacts:
        """Train until `max_steps`, the end of the batches, or a stop request."""
        if self._ran:
            raise RuntimeError("this TrainLoop has already run; build a new one for another run")
        self._ran = True
        # Before any hook: a used out dir is continued explicitly (start_step) or refused.
        if self.resume_from is None:
            claim_out_dir(self.out_dir, self._start_step)
        if self._bridge is None:
            self._bridge = Bridge(name=f"loopbridge-{self.state.run_name}")
        self.callbacks.bridge = self._bridge
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.resume_from is not None:
                self._restore(self.resume_from)
                # The step resume_from found is the one this run continues (0: none found).
                claim_out_dir(self.out_dir, self._start_step)
            return self._run()
        except KeyboardInterrupt as exc:
            self._on_interrupt(exc)
            raise
        except BaseException as exc:
            self.callbacks.annotate(exc)
            if self._owns_bridge:
                # A failing run stops its work within interrupt_grace, not drain_timeout.
                report = self._shutdown(exc).run(exc)
                if not report.ok:
                    logger.error("run %s failed; background work: %s", self.state.run_name, report)
            raise
        finally:
            self.callbacks.release()  # the run is over: its callbacks may join another
            if self._owns_bridge and not self._bridge.closed:
                # The drain at train end has spent the deadline already: close what is left.
                self._bridge.close(0, cancel_grace=CANCEL_WAIT_S)

    def _restore(self, resume_from: str | os.PathLike[str]) -> None:
        """Load the newest checkpoint of this run, if any, and carry on from its step."""
        from loopbridge._loop_restore import find_restore_point

        assert self._bridge is not None  # run() sets it
        assert self.load is not None  # __init__ checks it
        found = find_restore_point(
            resume_from,
            state=self.state,
            ctx=self.ctx,
            callbacks=self.callbacks.callbacks,
            bridge=self._bridge,
        )
        if found is not None:
            self.state.step = self._start_step = found.step
            self.load(self.state, found.path)
            self.restored = found

    def _run(self) -> LoopArtifacts:
        state, cbs = self.state, self.callbacks
        manifest: list[ManifestRow] = []
        metrics_path = self.out_dir / METRICS_FILE
        manifest_path = self.out_dir / MANIFEST_FILE
        self._profile_mark = self.profiler.mark() if self.profiler is not None else None
        with JsonLinesWriter(metrics_path) as metrics_out, JsonLinesWriter(manifest_path) as rows:
            cbs.on_train_start(state)
            batches = _batches(self.batches)
            # A run resumed at or past max_steps (start_step) has no step left to take.
            done = state.should_stop or (
                self.max_steps is not None and state.step >= self.max_steps
            )
            batch = None if done else next(batches, None)
            while batch is not None:
                metrics = coerce_metrics(self.step_fn(state, batch), self._step_label)
                step_idx = state.step
                state.step += 1
                state.metrics = metrics
                metrics_out.write({"step": state.step, "time": time.time(), "metrics": metrics})
                cbs.on_step_end(state, step_idx, batch, metrics)
                if self.eval_every is not None and state.step % self.eval_every == 0:
                    self._evaluate(step_idx, metrics_out)
                # Knowing whether this step is the last decides between a periodic and the
                # final checkpoint, so the next batch is fetched before saving.
                last = state.should_stop or (
                    self.max_steps is not None and state.step >= self.max_steps
                )
                batch = None if last else next(batches, None)
                last = last or batch is None
                if (
                    not last
                    and self.checkpoint_every is not None
                    and state.step % self.checkpoint_every == 0
                ):
                    self._checkpoint(manifest, rows, final=False)
                    if state.should_stop:
                        # Asked from on_checkpoint: that checkpoint is the run's last one.
                        break
            final = None
            if manifest and manifest[-1].step == state.step:
                # Saving again would overwrite a checkpoint that may be uploading.
                final = manifest[-1]
            elif self.save is not None and state.step > self._start_step:
                final = self._checkpoint(manifest, rows, final=True)
            elif self.restored is not None and state.step == self.restored.step:
                # Resumed with nothing left to do: the restored checkpoint is the final one.
                final = self.restored.row
        reason = state.stop_reason or (
            "max_steps"
            if self.max_steps is not None and state.step >= self.max_steps
            else "batches exhausted"
        )
        artifacts = LoopArtifacts(
            out_dir=self.out_dir,
            metrics_path=metrics_path,
            manifest_path=manifest_path,
            manifest=manifest,
            final_checkpoint=final,
            steps_completed=state.step,
            stop_reason=reason,
        )
        self.artifacts = artifacts
        assert self._bridge is not None  # run() sets it
        # The one run policy, shared with the framework adapters: on_train_end, the drain
        # (left running, this run's unfinished work would leak into the next run's report),
        # then raise or warn.
        policy = RunPolicy(self.drain_timeout, self.on_drain_failure, self.interrupt_grace)
        report = policy.end_training(cbs, state, artifacts, self._bridge)
        if self.profiler is not None:
            # A profiler shared across an experiment's runs: this run's calls only.
            artifacts.hook_timings = self.profiler.rows(since=self._profile_mark)
            if self.print_profile:
                self._print_profile(artifacts)
        policy.enforce(report, state.run_name)
        return artifacts

    def _print_profile(self, artifacts: LoopArtifacts) -> None:
        target = self.print_profile
        stream: TextIO = target if not isinstance(target, bool) else sys.stderr
        assert self.profiler is not None  # checked by the caller
        stats = artifacts.bridge_stats
        lines = [
            f"loopbridge hook profile, run {self.state.run_name}:",
            self.profiler.table(since=self._profile_mark),
        ]
        if stats is not None:
            lines.append(
                f"bridge: {stats.spawned} spawned, {stats.spawn_seconds * 1e3:.2f} ms in spawn "
                f"({stats.spawn_mean_us:.2f} µs each), {stats.backpressure_seconds * 1e3:.2f} ms "
                f"blocked by backpressure, {stats.busy_seconds:.3f} s busy in the background"
            )
        print("\n".join(lines), file=stream)

    def _evaluate(self, step_idx: int, metrics_out: JsonLinesWriter) -> None:
        state, cbs = self.state, self.callbacks
        for name, evaluate in self.evaluators.items():
            metrics = coerce_metrics(evaluate(state), f"evaluator {name!r} ({_label(evaluate)})")
            row = {"step": state.step, "time": time.time(), "eval": name, "metrics": metrics}
            metrics_out.write(row)
            cbs.on_eval(state, step_idx, name, metrics)
        for name, benchmark in self.benchmarks.items():
            result, predictions = benchmark(state)
            check_benchmark(name, result)
            cbs.on_benchmark_eval(self.ctx, result, predictions, step=state.step)

    def _checkpoint(
        self, manifest: list[ManifestRow], rows: JsonLinesWriter, *, final: bool
    ) -> ManifestRow:
        state = self.state
        assert self.save is not None  # callers check
        path = self.out_dir / CHECKPOINT_DIR / f"step-{state.step:08d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        # An earlier run's file there would pass the existence check below as this run's.
        clear_stale_checkpoint(path)
        self.save(state, path)
        if not path.exists():
            msg = (
                f"save() returned without writing a checkpoint at {path}; write a file or a "
                f"directory at exactly the path it is given"
            )
            raise FileNotFoundError(msg)
        row = ManifestRow.for_checkpoint(
            path,
            step=state.step,
            is_final=final,
            run_name=state.run_name,
            digest=self.hash_checkpoints,
        )
        rows.write_line(manifest_line(row))
        track_in_manifest(row, rows.path)
        manifest.append(row)
        self.callbacks.on_checkpoint(state, row)
        # Hashed off this thread: by an uploader as it reads the file, else in the background.
        digest_in_background(row)
        return row

    def _shutdown(self, exc: BaseException) -> Shutdown:
        assert self._bridge is not None  # run() sets it
        return Shutdown.after(
            exc,
            self._bridge,
            owner=f"run {self.state.run_name}",
            grace=self.interrupt_grace,
            close=self._owns_bridge,
            logger=logger,
        )

    def _on_interrupt(self, exc: KeyboardInterrupt) -> None:
        if self._bridge is None:
            return
        # Escalates with every further Ctrl-C: grace, cancel now, abandon (see _shutdown).
        report = self._shutdown(exc).run(exc)
        logger.warning(
            "run %s interrupted at step %d; background work: %s",
            self.state.run_name,
            self.state.step,
            report.summary(),
        )


def _batches(batches: Iterable[Any]) -> Iterator[TrainingBatch]:
    for index, item in enumerate(batches):
        if isinstance(item, TrainingBatch):
            yield item
        else:
            yield TrainingBatch(index=index, data=item, size=None)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        msg = f"TrainLoop({name}={value!r}): give a whole number of at least 1, or None"
        raise ValueError(msg)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an out dir that is a file, or lies under one, before anything is written."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        return
    if existing == out_dir:
        msg = (
            f"TrainLoop(out_dir={str(out_dir)!r}) is a regular file, not a directory: give a "
            f"directory for the run's metrics, manifest and checkpoints (created if missing)"
        )
    else:
        msg = (
            f"TrainLoop(out_dir={str(out_dir)!r}) cannot be created: {existing} is a regular "
            f"file, not a directory; give a path whose parents are directories"
        )
    raise NotADirectoryError(msg)


def _label(fn: object) -> str:
    """A function's name for messages: its qualified name, else its repr."""
    return str(getattr(fn, "__qualname__", None) or repr(fn))


def check_benchmark(name: str, result: object) -> None:
    """Refuse a benchmark whose result is not an EvalResult, naming the benchmark."""
    if not isinstance(result, EvalResult):
        msg = (
            f"benchmark {name!r} returned {type(result).__name__} where (EvalResult, "
            f"predictions) was expected"
        )
        raise TypeError(msg)
