"""The one run policy (RunPolicy, close_run) and ForeignRun, the adapters' shared part."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import loopbridge as lb
from loopbridge.integrations import ForeignRun
from loopbridge.testing import RecordingCallback


class Failing(lb.Callback):
    """Spawns background work that fails, at train start."""

    def on_train_start(self, state: lb.LoopState) -> None:
        async def boom() -> None:
            raise RuntimeError("the store said no")

        self.spawn(boom(), name="doomed upload")


def _start(run: ForeignRun, tmp_path: Path) -> lb.LoopState:
    return run.start(run_name="r", experiment_name="fw", out_dir=tmp_path, max_steps=4)


class TestRunPolicy:
    def test_a_bad_policy_is_refused_with_the_choices(self) -> None:
        """on_drain_failure must be raise or warn; the message says so."""
        with pytest.raises(ValueError, match="use 'raise' or 'warn'"):
            lb.RunPolicy(on_drain_failure="ignore")  # type: ignore[arg-type]

    def test_enforce_raises_or_warns(self, caplog: pytest.LogCaptureFixture) -> None:
        """A report with a failure raises DrainError by default, and only logs with warn."""
        failed = lb.DrainReport(failed=(lb.TaskRecord("upload", None, RuntimeError("no")),))
        with pytest.raises(lb.DrainError, match="run r: background work not done") as caught:
            lb.RunPolicy().enforce(failed, "r")
        assert caught.value.report is failed
        with caplog.at_level(logging.WARNING, logger="loopbridge.loop"):
            lb.RunPolicy(on_drain_failure="warn").enforce(failed, "r")
        assert "background work not done" in caplog.text
        lb.RunPolicy().enforce(lb.DrainReport(completed=3), "r")  # ok: nothing happens

    def test_trainloop_uses_it(self, tmp_path: Path) -> None:
        """TrainLoop's drain failure comes from the same policy: DrainError with its report."""
        loop = lb.TrainLoop(
            lambda state, batch: {"loss": 1.0}, range(2), out_dir=tmp_path, callbacks=[Failing()]
        )
        with pytest.raises(lb.DrainError) as caught:
            loop.run()
        assert caught.value.report.failed[0].name == "doomed upload"


class TestCloseRun:
    def test_a_completed_and_a_failed_run(self, tmp_path: Path) -> None:
        """on_run_end gets the run's real RunResult inside a one-run ArmResult."""
        recorder = RecordingCallback()
        callbacks = lb.CallbackList([recorder])
        ctx = lb.LogContext(experiment_name="e", run_name="r", run_config={"lr": 0.1})
        state = lb.LoopState("r", "id", None, tmp_path, metrics={"loss": 0.5})
        done = lb.close_run(callbacks, ctx, state, None, duration_s=2.0)
        assert done.status is lb.RunStatus.COMPLETED
        assert done.final_metrics == {"loss": 0.5}
        error = lb.DrainError("x", lb.DrainReport(completed=1))
        failed = lb.close_run(callbacks, ctx, state, None, error=error)
        assert failed.status is lb.RunStatus.FAILED
        assert failed.drain_report is error.report
        (first, second) = recorder.calls_to("on_run_end")
        assert first.args[1] is done
        assert first.args[2].runs == [done]
        assert first.args[2].config == {"lr": 0.1}
        assert second.args[1] is failed


class TestForeignRun:
    def test_a_run_fires_the_hooks_and_drains(self, tmp_path: Path) -> None:
        """start, steps, a checkpoint and end fire the documented hooks, then drain."""
        recorder = RecordingCallback()
        run = ForeignRun([recorder])
        state = _start(run, tmp_path)
        for step in (1, 2):
            state.step = step
            run.callbacks.on_step_end(state, step - 1, lb.TrainingBatch(step - 1, None), {})
        checkpoint = tmp_path / "ckpt"
        checkpoint.write_bytes(b"weights")
        row = run.checkpoint(checkpoint, 2)
        report = run.end("max_steps")
        assert report.ok
        assert recorder.hooks == [
            "on_run_start",
            "on_train_start",
            "on_step_end",
            "on_step_end",
            "on_checkpoint",
            "on_train_end",
            "on_run_end",
        ]
        artifacts = recorder.calls_to("on_train_end")[0].args[1]
        assert artifacts.manifest == [row]
        assert artifacts.final_checkpoint == row
        assert artifacts.metrics_path is None
        assert artifacts.manifest_path is None
        assert row.digest is not None
        assert row.size_bytes == 7
        assert recorder.calls_to("on_run_start")[0].args[0].experiment_name == "fw"
        assert run.bridge is not None
        assert run.bridge.closed
        assert not run.active

    def test_failed_background_work_raises_drain_error_after_on_run_end(
        self, tmp_path: Path
    ) -> None:
        """The default policy raises once the run is closed; warn only keeps the report."""
        recorder = RecordingCallback()
        run = ForeignRun([Failing(), recorder])
        _start(run, tmp_path)
        with pytest.raises(lb.DrainError):
            run.end("max_steps")
        assert recorder.hooks[-1] == "on_run_end"
        assert run.drain_report is not None
        assert len(run.drain_report.failed) == 1
        warn = ForeignRun([Failing()], on_drain_failure="warn")
        _start(warn, tmp_path)
        assert not warn.end("max_steps").ok

    def test_a_failed_framework_run_is_closed_as_failed(self, tmp_path: Path) -> None:
        """fail() fires on_run_end with the error and closes the bridge; it never raises."""
        recorder = RecordingCallback()
        run = ForeignRun([recorder])
        _start(run, tmp_path)
        error = ValueError("the model diverged")
        run.fail(error)
        (end,) = recorder.calls_to("on_run_end")
        assert end.args[1].status is lb.RunStatus.FAILED
        assert end.args[1].error is error
        assert run.bridge is not None
        assert run.bridge.closed
        run.fail(error)  # nothing open: a no-op

    def test_a_given_bridge_is_drained_not_closed(self, tmp_path: Path) -> None:
        """The caller's bridge stays open for their next run."""
        with lb.Bridge() as bridge:
            run = ForeignRun([RecordingCallback()], bridge=bridge)
            _start(run, tmp_path)
            run.end("max_steps")
            assert not bridge.closed
            assert bridge.call(asyncio.sleep(0, result=5)) == 5

    def test_two_runs_may_not_overlap(self, tmp_path: Path) -> None:
        """A second start before the first ended is refused, naming the open run."""
        run = ForeignRun([])
        _start(run, tmp_path)
        with pytest.raises(RuntimeError, match="run r is still open"):
            _start(run, tmp_path)
        run.end("max_steps")


def test_importing_loopbridge_imports_no_framework() -> None:
    """`import loopbridge` (and its integrations package) loads no torch or framework."""
    code = (
        "import json, sys, loopbridge, loopbridge.integrations, loopbridge.callbacks; "
        "print(json.dumps(sorted(m for m in ('torch', 'lightning', 'transformers', "
        "'pytorch_lightning', 'accelerate') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []


def test_step_batch_is_a_training_batch() -> None:
    """The hot path's batch equals the dataclass built the usual way, and stays frozen."""
    from dataclasses import FrozenInstanceError

    from loopbridge.integrations._run import step_batch

    batch = step_batch(3, "data")
    assert batch == lb.TrainingBatch(3, "data")
    with pytest.raises(FrozenInstanceError):
        batch.index = 4  # type: ignore[misc]
