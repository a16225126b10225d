"""What the loggers cost the training thread, measured against baselines in the same run.

1. `on_step_end` with 10 metrics, per step, for TensorBoardLogger, WandbLogger (offline) and
   HttpDashboard (posting to a server in a subprocess), each live on its own bridge so that
   the background writing competes for the GIL as in training, next to a bare list append.
   Wall clock, median over runs. Target: each logger within 2x of HttpDashboard.
2. ConsoleProgress on a terminal stream, per step with a real clock at 4 redraws/s and at
   1000 redraws/s (where drawing dominates): the tqdm renderer against the hand-written one it
   replaced (kept below), measured in the same run. Target: at 4/s, new within 1.25x of old.
3. MLflowLogger's blocking at run boundaries (on_run_start + on_run_end on the loop thread)
   against a real `mlflow server` (the tests' .venv-mlflow; skipped with --no-mlflow): now
   (runs/create only) against the old behaviour (params and the end status waited for).
   Target: now below old.

Run: .venv/bin/python benchmarks/bench_loggers.py [--quick] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import loopbridge as lb

# Run as a script, the benchmarks directory is on sys.path; mypy does not see it.
from bench_dashboard import dashboard_server  # type: ignore[import-not-found]
from loopbridge import Bridge
from loopbridge._types import LoopArtifacts, LoopState, TrainingBatch
from loopbridge.callbacks import ConsoleProgress, HttpDashboard, TensorBoardLogger, WandbLogger
from loopbridge.callbacks.mlflow import MLflowLogger

METRICS = {f"metric_{i}": float(i) / 7 for i in range(10)}
REPO = Path(__file__).resolve().parents[1]
FAILED: list[str] = []
drain_ns: dict[str, list[float]] = {}


def verdict(name: str, value: float, limit: float) -> str:
    """PASS or FAIL of `value <= limit`, remembered for the exit code."""
    ok = value <= limit
    if not ok:
        FAILED.append(name)
    return "PASS" if ok else "FAIL"


def artifacts(tmp: Path, steps: int) -> LoopArtifacts:
    """A finished loop's artifacts, for on_train_end."""
    return LoopArtifacts(
        out_dir=tmp,
        metrics_path=tmp / "m.jsonl",
        manifest_path=tmp / "manifest.jsonl",
        manifest=[],
        final_checkpoint=None,
        steps_completed=steps,
        stop_reason="max_steps",
    )


# -- 1. the loggers' per-step cost ---------------------------------------------------------


def live_ns(make: Callable[[], lb.Callback], steps: int, tmp: Path) -> float:
    """Per-step ns of `on_step_end` in a live run: bridge, background writes, drain after."""
    batch = TrainingBatch(0, None)
    with Bridge(name="bench") as bridge:
        callback = make()
        callback._loopbridge_bridge = bridge
        state = LoopState(run_name="bench", run_id="bench", max_steps=None, out_dir=tmp)
        callback.on_train_start(state)
        # Steady state: the run is open (wandb.init has returned) before the timing starts.
        opened = bridge.drain(120)
        if not opened.ok:
            raise RuntimeError(f"{type(callback).__name__} did not open: {opened}")
        hook = callback.on_step_end
        start = time.perf_counter_ns()
        for i in range(steps):
            state.step = i + 1
            hook(state, i, batch, METRICS)
        elapsed = time.perf_counter_ns() - start
        callback.on_train_end(state, artifacts(tmp, steps))
        report = bridge.drain(300)
        if not report.ok:
            raise RuntimeError(f"{type(callback).__name__} lost data: {report}")
        # What the background still had to do after the loop: the writing a tight loop
        # outruns, which in real training shares the GIL with the steps.
        after = time.perf_counter_ns() - start - elapsed
    drain_ns.setdefault(type(callback).__name__, []).append(after / steps)
    return elapsed / steps


def bare_append_ns(steps: int) -> float:
    """A list append per step: the floor."""
    rows: list[object] = []
    append = rows.append
    start = time.perf_counter_ns()
    for i in range(steps):
        append((i, METRICS))
    return (time.perf_counter_ns() - start) / steps


def loggers_part(steps: int, runs: int, tmp: Path) -> None:
    """Part 1: live per-step cost, interleaved so drift hits every case alike."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True)
    samples: dict[str, list[float]] = {}
    with dashboard_server(0.0) as url:
        cases: dict[str, Callable[[], float]] = {
            "bare list append": lambda: bare_append_ns(steps),
            "HttpDashboard": lambda: live_ns(
                lambda: HttpDashboard(url, max_buffer_rows=steps + 1), steps, tmp
            ),
            "TensorBoardLogger": lambda: live_ns(lambda: TensorBoardLogger(tmp / "tb"), steps, tmp),
            "WandbLogger (offline)": lambda: live_ns(
                lambda: WandbLogger("bench", mode="offline", dir=tmp, settings=settings),
                steps,
                tmp,
            ),
        }
        for _ in range(runs):
            for name, case in cases.items():
                samples.setdefault(name, []).append(case())
    wandb.teardown()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    dash = medians["HttpDashboard"]
    print(
        f"\n1. loop-thread cost of on_step_end, 10 metrics, live on a bridge: median of "
        f"{runs} runs x {steps:,} steps (wall clock)"
    )
    print(
        f"   {'':24} {'ns/step':>9} {'x append':>9} {'x dashboard':>12} {'drain ns/step':>14}"
        f"  target <= 2x dashboard"
    )
    for name, ns in medians.items():
        mark = ""
        if name in ("TensorBoardLogger", "WandbLogger (offline)"):
            mark = verdict(f"{name} per step", ns / dash, 2.0)
        after = drain_ns.get(name.split(" ")[0])
        after_text = f"{statistics.median(after):14.0f}" if after else f"{'':14}"
        print(
            f"   {name:24} {ns:9.0f} {ns / medians['bare list append']:9.1f} "
            f"{ns / dash:12.2f} {after_text}  {mark}"
        )
    print(
        "   drain ns/step: background work left when the loop ended, per step (the tight loop\n"
        "   outruns the writers; in training that work shares the GIL with the steps)"
    )


# -- 2. ConsoleProgress, tqdm against the hand-written line it replaced -----------------------


class OldConsoleProgress(lb.Callback):
    """The hand-written terminal renderer before tqdm: its per-step path and its redraw."""

    def __init__(self, stream: io.StringIO, refresh_per_second: float) -> None:
        self._stream = stream
        self._period = 1.0 / refresh_per_second
        self._clock = time.monotonic
        self._next_draw = math.inf
        self._started = 0.0
        self._last_len = 0
        self._max_steps: int | None = None
        self._run = ""
        self.lines_written = 0

    def on_train_start(self, state: LoopState) -> None:
        self._run, self._max_steps = state.run_name, state.max_steps
        self._started = self._clock()
        self._next_draw = self._started + self._period

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        now = self._clock()
        if now < self._next_draw:
            return
        self._next_draw = now + self._period
        self._draw(state.step, metrics, now)

    def _draw(self, step: int, metrics: dict[str, float], now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        total = self._max_steps or 1
        filled = min(20, 20 * step // total)
        shown = " ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])
        parts = [
            self._run,
            f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{total}",
            f"{step / elapsed:.0f} steps/s",
            shown,
            "ckpt 0",
        ]
        line = " | ".join(parts)[:119]
        pad = " " * max(0, self._last_len - len(line))
        self._last_len = len(line)
        self._stream.write("\r" + line + pad)
        self._stream.flush()
        self.lines_written += 1


class TtyStream(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def progress_ns(make: Callable[[TtyStream], lb.Callback], steps: int) -> tuple[float, int]:
    """Per-step ns of on_step_end (draws included) and the number of draws."""
    stream = TtyStream()
    callback = make(stream)
    state = LoopState(run_name="bench", run_id="bench", max_steps=steps, out_dir=Path("/tmp"))
    callback.on_train_start(state)
    batch = TrainingBatch(0, None)
    hook = callback.on_step_end
    start = time.perf_counter_ns()
    for i in range(steps):
        state.step = i + 1
        hook(state, i, batch, METRICS)
    elapsed = time.perf_counter_ns() - start
    draws: int = getattr(callback, "lines_written", 0)
    if isinstance(callback, ConsoleProgress):
        callback._close_bar()
    return elapsed / steps, draws


def progress_part(steps: int, runs: int) -> None:
    """Part 2: ConsoleProgress new against old, per step, interleaved."""
    print(f"\n2. ConsoleProgress on a terminal stream: median of {runs} runs x {steps:,} steps")
    print(f"   {'':34} {'ns/step':>9} {'draws':>6} {'new/old':>8}")
    for rate, limit in ((4.0, 1.25), (1000.0, None)):
        new: list[tuple[float, int]] = []
        old: list[tuple[float, int]] = []
        for i in range(2 * runs):
            # Alternate which goes first, so warm-up and drift hit both alike.
            cases = [
                (old, lambda s: OldConsoleProgress(s, rate)),  # noqa: B023
                (new, lambda s: ConsoleProgress(s, refresh_per_second=rate)),  # noqa: B023
            ]
            for samples, make in cases if i % 2 == 0 else cases[::-1]:
                samples.append(progress_ns(make, steps))
        old_ns = statistics.median(ns for ns, _ in old)
        new_ns = statistics.median(ns for ns, _ in new)
        ratio = new_ns / old_ns
        mark = "" if limit is None else f"{verdict('ConsoleProgress', ratio, limit)} (<= {limit}x)"
        print(f"   {f'old, hand-written, {rate:g}/s':34} {old_ns:9.0f} {old[0][1]:6d}")
        print(f"   {f'new, tqdm, {rate:g}/s':34} {new_ns:9.0f} {new[0][1]:6d} {ratio:8.2f}  {mark}")


# -- 3. MLflow run boundaries -------------------------------------------------------------


class OldBlockingMLflowLogger(MLflowLogger):
    """The behaviour before: params waited for at run start, the end status at run end."""

    def _spawn_setup(self, info: Any, setup: Any, params: dict[str, str], key: object) -> None:
        self.call(self._log_setup(info, setup, params), timeout=120)

    def on_run_end(self, ctx: lb.LogContext, run_result: lb.RunResult, arm: lb.ArmResult) -> None:
        run = self._run
        super().on_run_end(ctx, run_result, arm)
        if run is not None:

            async def after_end() -> None:
                return None

            self.spawn(after_end(), key=run.key).result(120)


@contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """The tests' mlflow server (installed into .venv-mlflow on first use)."""
    sys.path.insert(0, str(REPO))
    from tests.fixtures.mlflow import _serve

    root = tmp / "mlflow"
    root.mkdir()
    args = ["--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    with _serve(root, args, "") as server:
        yield server.url


def boundary_ms(logger: MLflowLogger, runs: int, tmp: Path) -> list[float]:
    """Loop-thread ms of on_run_start + on_run_end, per run, under one experiment."""
    config = {f"p{i}": i for i in range(20)}
    times = []
    with Bridge(name="bench-mlflow") as bridge:
        logger._loopbridge_bridge = bridge
        ctx = lb.LogContext(experiment_name=f"bench-{time.time_ns()}")
        logger.on_experiment_start(ctx)
        for i in range(runs):
            run_ctx = lb.LogContext(
                experiment_name=ctx.experiment_name,
                arm_name="a",
                run_name=f"a-{i}",
                run_config=config,
                ids=dict(ctx.ids),
            )
            result = lb.RunResult(run_name=f"a-{i}", status=lb.RunStatus.COMPLETED)
            start = time.perf_counter()
            logger.on_run_start(run_ctx)
            logger.on_run_end(run_ctx, result, lb.ArmResult("a", config))
            times.append((time.perf_counter() - start) * 1e3)
            # As the Experiment does after each run.
            report = bridge.drain(60)
            if not report.ok:
                raise RuntimeError(f"MLflow run {i} not logged: {report}")
    return times


def mlflow_part(runs: int, tmp: Path) -> None:
    """Part 3: blocking at run boundaries, now against before."""
    with mlflow_server(tmp) as url:
        old: list[float] = []
        new: list[float] = []
        for _ in range(2):
            old += boundary_ms(OldBlockingMLflowLogger(url), runs, tmp)
            new += boundary_ms(MLflowLogger(url), runs, tmp)
    old_ms, new_ms = statistics.median(old), statistics.median(new)
    print(f"\n3. MLflowLogger, loop-thread ms per run (on_run_start + on_run_end), {2 * runs} runs")
    print(f"   old: params and end status waited for  {old_ms:7.1f} ms")
    print(f"   new: runs/create only                  {new_ms:7.1f} ms")
    print(
        f"   new/old {new_ms / old_ms:.2f}  {verdict('MLflow run boundary', new_ms / old_ms, 1.0)}"
    )


def main() -> None:
    """Run the parts, print the tables, exit non-zero if a target failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer steps and runs")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow part")
    args = parser.parse_args()
    steps, runs = (5_000, 3) if args.quick else (20_000, 7)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        loggers_part(steps, runs, tmp)
        progress_part(steps * 10, runs)
        if not args.no_mlflow:
            mlflow_part(5 if args.quick else 15, tmp)
    if FAILED:
        print(f"\nFAIL: {', '.join(FAILED)}")
        sys.exit(1)
    print("\nall targets PASS")


if __name__ == "__main__":
    main()
