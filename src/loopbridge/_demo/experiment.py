"""The demo's experiment: two learning-rate arms, checkpoints uploaded, logs, early stopping."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._demo.model import Dataset, LogisticModel, make_data
from loopbridge._demo.verify import check_store
from loopbridge._experiment import Experiment
from loopbridge._loop import SaveFn, StepFn, TrainLoop
from loopbridge._profile import HookProfiler
from loopbridge._report import DrainReport
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    RunResult,
    TrainingBatch,
)
from loopbridge.callbacks import (
    CheckpointUploader,
    ConsoleProgress,
    EarlyStopping,
    JsonlLogger,
    UploadSummary,
)

__all__ = ["ARMS", "DemoOptions", "DemoOutcome", "RunMeter", "RunStats", "run_demo", "score"]

logger = logging.getLogger(__name__)

MiB = 1 << 20
DIM = 16
MAGIC = b"LBDEMO01"

ARMS: dict[str, dict[str, Any]] = {
    # A learning rate that keeps improving for the whole run.
    "steady": {"lr": 0.05},
    # One far too high: the validation loss is best early, then wanders up, so it stops early.
    "hot": {"lr": 5.0},
}


@dataclass
class DemoOptions:
    """Everything the demo's command line can set."""

    out: Path
    name: str
    store: str | None = None
    endpoint_url: str | None = None
    dashboard: str | None = None
    mlflow: str | None = None
    steps: int = 300
    checkpoint_mb: float = 64.0
    checkpoint_every: int | None = None
    eval_every: int = 10
    patience: int = 5
    repeats: int = 2
    arms: tuple[str, ...] = ("steady", "hot")
    step_ms: float = 10.0
    batch_size: int = 32
    seed: int = 0
    progress: bool = True
    drain_timeout: float = 600.0

    @property
    def run_root(self) -> Path:
        """Where the runs' local files go."""
        return self.out / self.name

    @property
    def store_url(self) -> str:
        """Where checkpoints are uploaded: the given store, or a directory under `out`."""
        return self.store or str(self.out / "store")

    @property
    def jsonl_path(self) -> Path:
        """The JSON-lines log of every run."""
        return self.run_root / "events.jsonl"


@dataclass
class RunStats:
    """What one run cost the loop thread and what it offloaded."""

    run_name: str
    train_seconds: float = 0.0
    steps: int = 0
    hook_seconds: float = 0.0
    uploads: UploadSummary = field(default_factory=UploadSummary)


class RunMeter(Callback):
    """Times each run's training and takes per-run deltas of the uploader and the profiler."""

    def __init__(self, uploader: CheckpointUploader, profiler: HookProfiler) -> None:
        self.uploader = uploader
        self.profiler = profiler
        self.runs: dict[str, RunStats] = {}
        self._current: RunStats | None = None
        self._uploads_before = UploadSummary()
        self._hooks_before = 0.0
        self._started = 0.0

    def on_run_start(self, ctx: LogContext) -> None:
        """Take the baselines that this run's numbers are measured from."""
        self._current = RunStats(ctx.run_name or "")
        self._uploads_before = self.uploader.summary
        self._hooks_before = _hook_seconds(self.profiler)

    def on_train_start(self, state: LoopState) -> None:
        """Start the run's training clock."""
        self._started = time.perf_counter()

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Stop the run's training clock (before the drain)."""
        if self._current is not None:
            self._current.train_seconds = time.perf_counter() - self._started
            self._current.steps = state.step

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Record the run's deltas; its uploads are done, since its drain has returned."""
        stats = self._current
        if stats is None:
            return
        stats.hook_seconds = _hook_seconds(self.profiler) - self._hooks_before
        stats.uploads = _minus(self.uploader.summary, self._uploads_before)
        self.runs[stats.run_name] = stats
        self._current = None

    def status(self) -> str:
        """The current run's uploads, for the progress line."""
        done = _minus(self.uploader.summary, self._uploads_before)
        failed = f", {done.failed} failed" if done.failed else ""
        return f"uploaded {done.uploaded} ({done.bytes_uploaded / MiB:.0f} MiB){failed}"


@dataclass
class DemoOutcome:
    """The experiment's result and everything the summary reports."""

    result: ExperimentResult
    stats: dict[str, RunStats]
    uploads: UploadSummary
    close_report: DrainReport
    profiler: HookProfiler
    uploader: CheckpointUploader
    published: int
    """Checkpoints found in the store's manifests after the runs."""
    store_problems: list[str]
    """What the read-back found missing or wrong; empty when the store is right."""


def run_demo(options: DemoOptions) -> DemoOutcome:
    """Run the demo experiment and return what happened."""
    options.run_root.mkdir(parents=True, exist_ok=True)
    train, val, test = make_data(4096, 1024, 1024, DIM, seed=options.seed)
    profiler = HookProfiler()
    uploader = CheckpointUploader(options.store_url, endpoint_url=options.endpoint_url)
    meter = RunMeter(uploader, profiler)
    callbacks: list[Callback] = [uploader, JsonlLogger(options.jsonl_path), meter]
    callbacks.extend(_remote_loggers(options))
    if options.progress:
        callbacks.append(ConsoleProgress(metrics=["loss"], status=meter.status, interval_s=2.0))
    models: dict[str, LogisticModel] = {}
    payload = _payload(options)

    def build(ctx: LogContext) -> TrainLoop:
        run_name = ctx.run_name or "run"
        seed = options.seed * 1000 + (ctx.repeat_index or 0) + 1
        model = LogisticModel(DIM, seed=seed)
        lr = float(ctx.run_config["lr"])
        models[run_name] = model
        stopper = EarlyStopping(
            monitor="loss",
            mode="min",
            patience=options.patience,
            min_delta=1e-3,
            eval_name="val",
        )
        return TrainLoop(
            _step_fn(model, lr, options.step_ms / 1000.0),
            _batches(train, options.batch_size, random.Random(seed)),
            max_steps=options.steps,
            out_dir=options.run_root / "runs" / run_name,
            save=_save_fn(model, run_name, payload),
            checkpoint_every=options.checkpoint_every or max(1, options.steps // 3),
            evaluators={"val": lambda state: model.evaluate(val)},
            eval_every=options.eval_every,
            callbacks=[stopper],
        )

    def heldout(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
        return score(models[state.run_name], test)

    arms = {name: ARMS[name] for name in options.arms}
    bridge = Bridge(name="loopbridge-demo")
    experiment = Experiment(
        options.name,
        arms,
        build,
        n_repeats=options.repeats,
        benchmarks={"heldout": heldout},
        callbacks=callbacks,
        bridge=bridge,
        drain_timeout=options.drain_timeout,
        profile=profiler,
    )
    try:
        result = experiment.run()
        published, problems = _check(bridge, uploader, result)
    finally:
        close_report = bridge.close(options.drain_timeout)
    return DemoOutcome(
        result=result,
        stats=meter.runs,
        uploads=uploader.summary,
        close_report=close_report,
        profiler=profiler,
        uploader=uploader,
        published=published,
        store_problems=problems,
    )


def _check(
    bridge: Bridge, uploader: CheckpointUploader, result: ExperimentResult
) -> tuple[int, list[str]]:
    """Read back the store's manifests on the bridge, where the store's client lives."""
    try:
        return bridge.call(check_store(uploader.store, result), timeout=120.0)
    except Exception as exc:
        return 0, [f"could not read the store back: {type(exc).__name__}: {exc}"]


def score(model: LogisticModel, data: Dataset) -> tuple[EvalResult, list[dict[str, Any]]]:
    """The held-out benchmark: loss and accuracy overall and per true class, a few predictions."""
    metrics = model.evaluate(data)
    breakdowns = {}
    for label in (0.0, 1.0):
        rows = [i for i, y in enumerate(data.y) if y == label]
        subset = Dataset([data.x[i] for i in rows], [data.y[i] for i in rows])
        breakdowns[f"class_{int(label)}"] = model.evaluate(subset)
    predictions = [
        {"index": i, "label": data.y[i], "p": model.predict(data.x[i])} for i in range(10)
    ]
    result = EvalResult("heldout", metrics, breakdowns, tags={"split": "test"})
    return result, predictions


def _remote_loggers(options: DemoOptions) -> list[Callback]:
    loggers: list[Callback] = []
    if options.dashboard:
        from loopbridge.callbacks import HttpDashboard

        loggers.append(HttpDashboard(options.dashboard))
    if options.mlflow:
        from loopbridge.callbacks.mlflow import MLflowLogger

        loggers.append(MLflowLogger(options.mlflow))
    return loggers


def _step_fn(model: LogisticModel, lr: float, sleep_s: float) -> StepFn:
    def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
        x, y = batch.data
        metrics = model.step(x, y, lr)
        if sleep_s > 0:
            # Stands in for the accelerator's forward and backward pass, which waits off
            # the GIL just as this does.
            time.sleep(sleep_s)
        return metrics

    return step


def _batches(data: Dataset, size: int, rng: random.Random) -> Iterator[TrainingBatch]:
    offset = rng.randrange(len(data))
    index = 0
    while True:
        yield TrainingBatch(index, data.batch(offset + index, size), size)
        index += 1


def _payload(options: DemoOptions) -> bytes:
    """Random bytes that pad each checkpoint to its size, like optimizer state would."""
    size = int(options.checkpoint_mb * MiB)
    return random.Random(options.seed).randbytes(max(0, size))


def _save_fn(model: LogisticModel, run_name: str, payload: bytes) -> SaveFn:
    def save(state: LoopState, path: Path) -> None:
        meta = json.dumps({"run": run_name, "step": state.step, "dim": DIM}).encode()
        params = model.to_bytes()
        head = MAGIC + len(meta).to_bytes(4, "little") + meta + params
        with path.open("wb") as fh:
            fh.write(head)
            # A view, not a slice: no 64 MiB copy per save.
            fh.write(memoryview(payload)[len(head) :])

    return save


def _hook_seconds(profiler: HookProfiler) -> float:
    return sum(row.total_s for row in profiler.rows())


def _minus(after: UploadSummary, before: UploadSummary) -> UploadSummary:
    return UploadSummary(
        uploaded=after.uploaded - before.uploaded,
        failed=after.failed - before.failed,
        bytes_uploaded=after.bytes_uploaded - before.bytes_uploaded,
        retries=after.retries - before.retries,
        seconds=after.seconds - before.seconds,
        pruned=after.pruned - before.pruned,
        errors=after.errors[len(before.errors) :],
    )
