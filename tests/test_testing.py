"""loopbridge.testing.RecordingCallback: records every hook call for users' own assertions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    ArmResult,
    CallbackList,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    RunStatus,
    TrainingBatch,
)
from loopbridge.testing import HookCall, RecordingCallback


def _state(step: int = 0) -> LoopState:
    return LoopState(run_name="r", run_id="id", max_steps=10, out_dir=Path("."), step=step)


def _fire_all(callbacks: CallbackList, state: LoopState) -> dict[str, Any]:
    """Fire each of the eleven hooks once, in contract order; return the objects passed."""
    ctx = LogContext(experiment_name="e", run_name="r")
    batch = TrainingBatch(index=0, data=[1, 2], size=2)
    row = ManifestRow(step=1, path=Path("ckpt"), size_bytes=3, digest=None, created_at=0.0)
    result = EvalResult("bench", {"score": 1.0})
    predictions: list[dict[str, Any]] = [{"id": 1}]
    artifacts = LoopArtifacts(
        out_dir=Path("."),
        metrics_path=Path("m"),
        manifest_path=Path("n"),
        manifest=[row],
        final_checkpoint=row,
        steps_completed=1,
        stop_reason="max_steps",
    )
    run_result = RunResult(run_name="r", status=RunStatus.COMPLETED)
    arm = ArmResult(name="a", config={})
    experiment = ExperimentResult(name="e", arms={"a": arm}, duration_s=1.0)
    metrics = {"loss": 0.5}
    callbacks.on_experiment_start(ctx)
    callbacks.on_group_start(ctx, "g")
    callbacks.on_run_start(ctx)
    callbacks.on_train_start(state)
    state.step = 1
    callbacks.on_step_end(state, 0, batch, metrics)
    callbacks.on_checkpoint(state, row)
    callbacks.on_eval(state, 0, "val", metrics)
    callbacks.on_benchmark_eval(ctx, result, predictions, step=1)
    callbacks.on_train_end(state, artifacts)
    callbacks.on_benchmark_eval(ctx, result, predictions)
    callbacks.on_run_end(ctx, run_result, arm)
    callbacks.on_experiment_end(ctx, experiment)
    return {
        "ctx": ctx,
        "batch": batch,
        "row": row,
        "result": result,
        "predictions": predictions,
        "artifacts": artifacts,
        "run_result": run_result,
        "arm": arm,
        "experiment": experiment,
        "metrics": metrics,
    }


class TestRecording:
    """Every hook call is recorded in order with its arguments."""

    def test_overrides_every_hook(self) -> None:
        """RecordingCallback overrides all eleven hooks and passes registration."""
        callbacks = CallbackList([RecordingCallback()])
        assert all(len(callbacks.overriding(hook)) == 1 for hook in lb.HOOK_NAMES)

    def test_records_each_hook_with_arguments(self) -> None:
        """Each call is kept as (hook, args, kwargs), in the order the hooks fired."""
        recorder = RecordingCallback()
        state = _state()
        passed = _fire_all(CallbackList([recorder]), state)
        ctx = passed["ctx"]
        assert recorder.hooks == [
            "on_experiment_start",
            "on_group_start",
            "on_run_start",
            "on_train_start",
            "on_step_end",
            "on_checkpoint",
            "on_eval",
            "on_benchmark_eval",
            "on_train_end",
            "on_benchmark_eval",
            "on_run_end",
            "on_experiment_end",
        ]
        calls = recorder.calls
        assert all(isinstance(call, HookCall) for call in calls)
        assert calls[0].args == (ctx,)
        assert calls[1].args == (ctx, "g")
        assert calls[4].args == (state, 0, passed["batch"], {"loss": 0.5})
        assert calls[5].args == (state, passed["row"])
        assert calls[6].args == (state, 0, "val", {"loss": 0.5})
        assert calls[7].args == (ctx, passed["result"], passed["predictions"])
        assert calls[7].kwargs == {"step": 1}
        assert calls[9].kwargs == {"step": None}
        assert calls[8].args == (state, passed["artifacts"])
        assert calls[10].args == (ctx, passed["run_result"], passed["arm"])
        assert calls[11].args == (ctx, passed["experiment"])
        assert all(call.kwargs == {} for call in calls if call.hook != "on_benchmark_eval")

    def test_live_objects_kept(self) -> None:
        """Arguments are the live objects passed, not copies (except metrics dicts)."""
        recorder = RecordingCallback()
        state = _state()
        passed = _fire_all(CallbackList([recorder]), state)
        assert recorder.calls[0].args[0] is passed["ctx"]
        assert recorder.calls[3].args[0] is state
        assert recorder.calls[7].args[2] is passed["predictions"]

    def test_metrics_copied(self) -> None:
        """A metrics dict mutated after the hook does not rewrite the recorded call."""
        recorder = RecordingCallback()
        metrics = {"loss": 1.0}
        recorder.on_step_end(_state(1), 0, TrainingBatch(0, None), metrics)
        metrics["loss"] = 99.0
        metrics["extra"] = 1.0
        assert recorder.calls[0].args[3] == {"loss": 1.0}

    def test_step_at_call(self) -> None:
        """`step` is state.step at the time of the call for state hooks, None for ctx hooks."""
        recorder = RecordingCallback()
        state = _state()
        _fire_all(CallbackList([recorder]), state)
        state.step = 50
        steps = {call.hook: call.step for call in recorder.calls}
        assert steps["on_train_start"] == 0
        assert steps["on_step_end"] == 1
        assert steps["on_checkpoint"] == 1
        assert steps["on_eval"] == 1
        assert steps["on_train_end"] == 1
        assert steps["on_run_start"] is None
        assert steps["on_experiment_end"] is None


class TestQueries:
    """calls_to and clear help assertions."""

    def test_calls_to(self) -> None:
        """calls_to returns the calls of one hook in order."""
        recorder = RecordingCallback()
        _fire_all(CallbackList([recorder]), _state())
        benchmarks = recorder.calls_to("on_benchmark_eval")
        assert [c.kwargs["step"] for c in benchmarks] == [1, None]
        assert recorder.calls_to("on_group_start")[0].args[1] == "g"

    def test_calls_to_unknown_hook(self) -> None:
        """Asking for a name that is not a hook is a ValueError listing the hooks."""
        recorder = RecordingCallback()
        with pytest.raises(
            ValueError, match="'on_step' is not a hook; hooks are on_experiment_start"
        ):
            recorder.calls_to("on_step")

    def test_clear(self) -> None:
        """clear forgets every recorded call."""
        recorder = RecordingCallback()
        _fire_all(CallbackList([recorder]), _state())
        recorder.clear()
        assert recorder.calls == []
        assert recorder.hooks == []


class TestInLoop:
    """RecordingCallback works as a user would use it: in a TrainLoop."""

    def test_records_a_training_run(self, tmp_path: Path) -> None:
        """A short run records train start, each step, the final checkpoint and train end."""

        def save(state: LoopState, path: Path) -> None:
            path.write_text("w")

        recorder = RecordingCallback()
        lb.TrainLoop(
            lambda s, b: {"loss": float(b.data)},
            range(3),
            out_dir=tmp_path,
            save=save,
            callbacks=[recorder],
        ).run()
        assert recorder.hooks == [
            "on_train_start",
            "on_step_end",
            "on_step_end",
            "on_step_end",
            "on_checkpoint",
            "on_train_end",
        ]
        assert [c.args[3] for c in recorder.calls_to("on_step_end")] == [
            {"loss": 0.0},
            {"loss": 1.0},
            {"loss": 2.0},
        ]
        assert [c.step for c in recorder.calls_to("on_step_end")] == [1, 2, 3]

    def test_subclass_extends_a_hook(self) -> None:
        """A subclass can extend one hook and still record through super()."""
        seen: list[str] = []

        class Mine(RecordingCallback):
            def on_eval(
                self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
            ) -> None:
                seen.append(eval_name)
                super().on_eval(state, step_idx, eval_name, metrics)

        mine = Mine()
        CallbackList([mine]).on_eval(_state(), 0, "val", {})
        assert seen == ["val"]
        assert mine.hooks == ["on_eval"]
