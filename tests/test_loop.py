"""TrainLoop: every hook at its moment, the files on disk when it fires, stops and validation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    Callback,
    EvalResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    TrainingBatch,
    TrainLoop,
)
from loopbridge.testing import RecordingCallback
from tests.hookcheck import LoopPlan, Probe, StopOnEval, as_event, loop_events, read_jsonl


def step_fn(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    """A step whose metrics are a function of the step and the batch."""
    return {"loss": 1.0 / (state.step + 1), "batch": float(batch.data)}


def save_fn(state: LoopState, path: Path) -> None:
    """Writes a small checkpoint file whose content names the step."""
    path.write_text(f"weights at {state.step}")


def val_fn(state: LoopState) -> dict[str, float]:
    """An evaluator."""
    return {"acc": state.step / 100}


def bench_fn(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
    """An in-loop benchmark with one prediction row."""
    result = EvalResult(
        "inloop", {"score": float(state.step)}, {"easy": {"score": 1.0}}, {"t": "x"}
    )
    return result, [{"id": 1, "step": state.step}]


def make_loop(tmp_path: Path, *callbacks: Callback, **overrides: Any) -> TrainLoop:
    """A loop of 7 steps: checkpoints every 3, evals every 2, one evaluator, one benchmark."""
    options: dict[str, Any] = {
        "max_steps": 7,
        "out_dir": tmp_path / "run",
        "save": save_fn,
        "checkpoint_every": 3,
        "evaluators": {"val": val_fn},
        "eval_every": 2,
        "benchmarks": {"inloop": bench_fn},
        "callbacks": list(callbacks),
    }
    options.update(overrides)
    batches = options.pop("batches", range(100, 200))
    return TrainLoop(step_fn, batches, **options)


PLAN = LoopPlan(
    run="run",
    max_steps=7,
    checkpoint_every=3,
    eval_every=2,
    evaluators=("val",),
    benchmarks=("inloop",),
)


class TestSequence:
    """The loop fires its hooks in exactly the order of the contract's nesting."""

    def test_exact_sequence(self, tmp_path: Path) -> None:
        """Steps, evals, in-loop benchmarks, periodic and final checkpoints, then train end."""
        probe = Probe()
        make_loop(tmp_path, probe).run()
        assert [as_event(c) for c in probe.calls] == loop_events(PLAN)

    def test_profiling_does_not_change_the_sequence(self, tmp_path: Path) -> None:
        """With profile=True the hooks fire exactly as without it, and are timed."""
        probe = Probe()
        artifacts = make_loop(tmp_path, probe, profile=True).run()
        assert [as_event(c) for c in probe.calls] == loop_events(PLAN)
        timed = {(row.callback, row.hook) for row in artifacts.hook_timings}
        assert ("Probe", "on_step_end") in timed

    def test_checkpoint_on_last_step_is_only_the_final_one(self, tmp_path: Path) -> None:
        """When the last step is a multiple of checkpoint_every, one (final) checkpoint is saved."""
        probe = Probe()
        make_loop(tmp_path, probe, max_steps=6).run()
        expected = loop_events(LoopPlan(**{**PLAN.__dict__, "max_steps": 6}))
        assert [as_event(c) for c in probe.calls] == expected
        assert [(c.args[1].step, c.args[1].is_final) for c in probe.calls_to("on_checkpoint")] == [
            (3, False),
            (6, True),
        ]

    def test_two_evaluators_and_benchmarks_in_order(self, tmp_path: Path) -> None:
        """Evaluators fire in the given order, then benchmarks, each at every eval_every."""
        probe = Probe()

        def other(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
            return EvalResult("other", {}), []

        make_loop(
            tmp_path,
            probe,
            evaluators={"val": val_fn, "test": val_fn},
            benchmarks={"inloop": bench_fn, "other": other},
        ).run()
        plan = LoopPlan(
            **{**PLAN.__dict__, "evaluators": ("val", "test"), "benchmarks": ("inloop", "other")}
        )
        assert [as_event(c) for c in probe.calls] == loop_events(plan)

    def test_without_save_no_checkpoints(self, tmp_path: Path) -> None:
        """Without a save function no checkpoint hook fires and there is no final checkpoint."""
        probe = Probe()
        artifacts = make_loop(tmp_path, probe, save=None, checkpoint_every=None).run()
        expected = loop_events(
            LoopPlan(**{**PLAN.__dict__, "save": False, "checkpoint_every": None})
        )
        assert [as_event(c) for c in probe.calls] == expected
        assert artifacts.final_checkpoint is None
        assert artifacts.manifest == []


class TestArguments:
    """Each hook receives the contract's arguments, with the files already on disk."""

    @pytest.fixture
    def ran(self, tmp_path: Path) -> tuple[Probe, TrainLoop, LoopArtifacts]:
        probe = Probe()
        loop = make_loop(tmp_path, probe)
        return probe, loop, loop.run()

    def test_train_start(self, ran: tuple[Probe, TrainLoop, LoopArtifacts]) -> None:
        """on_train_start gets the live LoopState at step 0 with the run's names and limits."""
        probe, loop, _ = ran
        ((call, facts),) = probe.indexed("on_train_start")
        (state,) = call.args
        assert state is loop.state
        assert facts["step"] == 0
        assert state.max_steps == 7
        assert state.out_dir == loop.out_dir
        assert state.run_name == "run"
        assert re.fullmatch(r"[0-9a-f]{32}", state.run_id)

    def test_step_end(self, ran: tuple[Probe, TrainLoop, LoopArtifacts]) -> None:
        """on_step_end: step_idx from 0, state.step == step_idx + 1, the batch, the metrics."""
        probe, loop, _ = ran
        calls = probe.indexed("on_step_end")
        assert [c.args[1] for c, _ in calls] == list(range(7))
        for call, facts in calls:
            state, step_idx, batch, metrics = call.args
            assert state is loop.state
            assert facts["step"] == call.step == step_idx + 1
            assert isinstance(batch, TrainingBatch)
            assert (batch.index, batch.data) == (step_idx, 100 + step_idx)
            assert metrics == {"loss": 1.0 / (step_idx + 1), "batch": float(100 + step_idx)}

    def test_metric_row_on_disk_at_step_end(
        self, ran: tuple[Probe, TrainLoop, LoopArtifacts]
    ) -> None:
        """When on_step_end fires, the step's metric row is the last line of metrics.jsonl."""
        probe, _, _ = ran
        for call, facts in probe.indexed("on_step_end"):
            row = facts["last_row"]
            assert row is not None
            metrics = call.args[3]
            assert {k: v for k, v in row.items() if k != "time"} == {
                "step": call.args[1] + 1,
                "metrics": metrics,
            }

    def test_eval(self, ran: tuple[Probe, TrainLoop, LoopArtifacts]) -> None:
        """on_eval gets the step index, the evaluator's name and its metrics, also written."""
        probe, loop, artifacts = ran
        calls = probe.calls_to("on_eval")
        assert [(c.args[1], c.args[2], c.args[3]) for c in calls] == [
            (i, "val", {"acc": (i + 1) / 100}) for i in (1, 3, 5)
        ]
        assert all(c.args[0] is loop.state for c in calls)
        eval_rows = [r for r in read_jsonl(artifacts.metrics_path) if r.get("eval") == "val"]
        assert [(r["step"], r["metrics"]["acc"]) for r in eval_rows] == [
            (2, 0.02),
            (4, 0.04),
            (6, 0.06),
        ]

    def test_in_loop_benchmark(self, ran: tuple[Probe, TrainLoop, LoopArtifacts]) -> None:
        """on_benchmark_eval fires with the loop's context, the result, predictions and step=N."""
        probe, loop, _ = ran
        calls = probe.calls_to("on_benchmark_eval")
        assert [c.kwargs for c in calls] == [{"step": 2}, {"step": 4}, {"step": 6}]
        for call in calls:
            ctx, result, predictions = call.args
            assert ctx is loop.ctx
            assert isinstance(ctx, LogContext)
            assert isinstance(result, EvalResult)
            assert result.breakdowns == {"easy": {"score": 1.0}}
            assert result.tags == {"t": "x"}
            assert predictions == [{"id": 1, "step": call.kwargs["step"]}]

    def test_checkpoint_row_recorded_before_hook(
        self, ran: tuple[Probe, TrainLoop, LoopArtifacts]
    ) -> None:
        """When on_checkpoint fires, its row is the last of manifest.jsonl and the file exists."""
        probe, loop, _ = ran
        calls = probe.indexed("on_checkpoint")
        assert len(calls) == 3
        for call, facts in calls:
            state, row = call.args
            assert state is loop.state
            assert isinstance(row, ManifestRow)
            assert facts["last_manifest"] == row
            assert facts["exists"]
            assert row.step == facts["step"]
            assert row.path.read_text() == f"weights at {row.step}"
            assert row.size_bytes == len(f"weights at {row.step}")
            assert row.digest is not None
            assert row.digest.startswith("blake3:")
            assert row.run_name == "run"

    def test_final_checkpoint_before_train_end(
        self, ran: tuple[Probe, TrainLoop, LoopArtifacts]
    ) -> None:
        """The final checkpoint is on disk and in the manifest when on_train_end fires."""
        probe, loop, artifacts = ran
        ((call, facts),) = probe.indexed("on_train_end")
        state, seen = call.args
        assert state is loop.state
        assert seen is artifacts
        assert facts["step"] == 7
        assert facts["final_exists"]
        assert facts["manifest_on_disk"] == artifacts.manifest
        final = artifacts.final_checkpoint
        assert final is not None
        assert final.is_final
        assert final.step == 7
        assert artifacts.manifest[-1] == final

    def test_artifacts(self, ran: tuple[Probe, TrainLoop, LoopArtifacts]) -> None:
        """The artifacts name the files, the rows, the steps and why the loop stopped."""
        _, loop, artifacts = ran
        assert artifacts.out_dir == loop.out_dir
        assert artifacts.metrics_path == loop.out_dir / "metrics.jsonl"
        assert artifacts.manifest_path == loop.out_dir / "manifest.jsonl"
        assert [(r.step, r.is_final) for r in artifacts.manifest] == [
            (3, False),
            (6, False),
            (7, True),
        ]
        assert artifacts.steps_completed == 7
        assert artifacts.stop_reason == "max_steps"
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok
        assert loop.artifacts is artifacts


class TestStopping:
    """The loop stops at max_steps, at the end of the batches, or on a stop request."""

    def test_batches_exhausted(self, tmp_path: Path) -> None:
        """Without max_steps the loop runs every batch, then saves the final checkpoint."""
        probe = Probe()
        artifacts = make_loop(tmp_path, probe, max_steps=None, batches=range(5)).run()
        assert artifacts.steps_completed == 5
        assert artifacts.stop_reason == "batches exhausted"
        expected = loop_events(LoopPlan(**{**PLAN.__dict__, "max_steps": 5}))
        assert [as_event(c) for c in probe.calls] == expected

    def test_training_batches_passed_as_given(self, tmp_path: Path) -> None:
        """Items that already are TrainingBatch reach the step and the hooks unchanged."""
        batches = [TrainingBatch(index=10 + i, data=i, size=32) for i in range(3)]
        recorder = RecordingCallback()
        make_loop(tmp_path, recorder, max_steps=None, batches=batches).run()
        assert [c.args[2] for c in recorder.calls_to("on_step_end")] == batches

    def test_stop_from_eval(self, tmp_path: Path) -> None:
        """A stop request in on_eval ends the loop after that step, with a final checkpoint."""
        probe = Probe()
        artifacts = make_loop(tmp_path, probe, StopOnEval("run", 4)).run()
        expected = loop_events(LoopPlan(**{**PLAN.__dict__, "stop_at_eval_step": 4}))
        assert [as_event(c) for c in probe.calls] == expected
        assert artifacts.stop_reason == "early stop at 4"
        assert artifacts.steps_completed == 4
        assert artifacts.final_checkpoint is not None
        assert artifacts.final_checkpoint.step == 4

    def test_stop_from_step_end(self, tmp_path: Path) -> None:
        """A stop request in on_step_end ends the loop after that step."""

        class StopAt2(Callback):
            def on_step_end(
                self, state: LoopState, step_idx: int, batch: TrainingBatch, m: dict[str, float]
            ) -> None:
                if step_idx == 1:
                    state.request_stop("enough")
                    state.request_stop("ignored: the first reason is kept")

        recorder = RecordingCallback()
        artifacts = make_loop(tmp_path, StopAt2(), recorder).run()
        assert [c.args[1] for c in recorder.calls_to("on_step_end")] == [0, 1]
        assert artifacts.stop_reason == "enough"
        assert artifacts.steps_completed == 2
        assert recorder.hooks[-2:] == ["on_checkpoint", "on_train_end"]

    def test_stop_from_checkpoint(self, tmp_path: Path) -> None:
        """A stop request in on_checkpoint ends the loop after the current step."""

        class StopOnCheckpoint(Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                state.request_stop("disk full")

        recorder = RecordingCallback()
        artifacts = make_loop(tmp_path, StopOnCheckpoint(), recorder).run()
        assert [c.args[1] for c in recorder.calls_to("on_step_end")] == [0, 1, 2]
        assert artifacts.steps_completed == 3
        assert artifacts.stop_reason == "disk full"
        assert recorder.hooks[-1] == "on_train_end"
        # The checkpoint that asked to stop is the last one; it is not saved a second time.
        assert len(recorder.calls_to("on_checkpoint")) == 1
        assert artifacts.final_checkpoint is not None
        assert artifacts.final_checkpoint.step == 3
        assert [row.step for row in artifacts.manifest] == [3]

    def test_stop_from_train_start(self, tmp_path: Path) -> None:
        """A stop request in on_train_start runs no step, saves nothing, and still ends."""

        class StopAtStart(Callback):
            def on_train_start(self, state: LoopState) -> None:
                state.request_stop("nothing to do")

        recorder = RecordingCallback()
        artifacts = make_loop(tmp_path, StopAtStart(), recorder).run()
        assert recorder.hooks == ["on_train_start", "on_train_end"]
        assert artifacts.steps_completed == 0
        assert artifacts.final_checkpoint is None
        assert artifacts.stop_reason == "nothing to do"

    def test_start_step_carries_numbering_on(self, tmp_path: Path) -> None:
        """With start_step, step indices, evals, checkpoints and max_steps continue from it."""
        recorder = RecordingCallback()
        artifacts = make_loop(
            tmp_path, recorder, max_steps=8, start_step=5, checkpoint_every=2, eval_every=3
        ).run()
        assert [c.args[1] for c in recorder.calls_to("on_step_end")] == [5, 6, 7]
        assert [c.step for c in recorder.calls_to("on_step_end")] == [6, 7, 8]
        assert [c.args[1] for c in recorder.calls_to("on_eval")] == [5]
        assert [(r.step, r.is_final) for r in artifacts.manifest] == [(6, False), (8, True)]
        assert artifacts.stop_reason == "max_steps"

    def test_start_step_at_max_steps_runs_nothing(self, tmp_path: Path) -> None:
        """Resuming a run that already reached max_steps trains no further step."""
        recorder = RecordingCallback()
        artifacts = make_loop(tmp_path, recorder, max_steps=8, start_step=8).run()
        assert recorder.hooks == ["on_train_start", "on_train_end"]
        assert artifacts.steps_completed == 8
        assert artifacts.final_checkpoint is None
        assert artifacts.stop_reason == "max_steps"

    def test_state_should_stop(self) -> None:
        """request_stop sets should_stop and keeps the first reason."""
        state = LoopState(run_name="r", run_id="i", max_steps=None, out_dir=Path("."))
        assert not state.should_stop
        state.request_stop("a")
        state.request_stop("b")
        assert state.should_stop
        assert state.stop_reason == "a"

    def test_directory_checkpoint(self, tmp_path: Path) -> None:
        """A save that writes a directory of shards gets a row with the total size and a digest."""

        def save_shards(state: LoopState, path: Path) -> None:
            path.mkdir()
            (path / "shard-0.bin").write_bytes(b"a" * 10)
            (path / "shard-1.bin").write_bytes(b"b" * 5)

        artifacts = make_loop(tmp_path, save=save_shards, max_steps=2).run()
        final = artifacts.final_checkpoint
        assert final is not None
        assert final.path.is_dir()
        assert final.size_bytes == 15
        assert final.digest is not None


class TestFiles:
    """The metric and manifest files are JSON lines that any strict reader accepts."""

    def test_non_finite_metrics_are_strict_json(self, tmp_path: Path) -> None:
        """A NaN or infinite loss is written in a form strict JSON parsers accept."""

        def diverging(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            return {"loss": float("nan"), "grad_norm": float("inf")}

        artifacts = TrainLoop(diverging, range(2), out_dir=tmp_path).run()

        def reject(token: str) -> float:
            raise ValueError(f"not strict JSON: {token}")

        assert artifacts.metrics_path is not None
        lines = artifacts.metrics_path.read_text().splitlines()
        assert len(lines) == 2
        for line in lines:
            json.loads(line, parse_constant=reject)

    def test_row_step_not_overwritten_by_a_metric(self, tmp_path: Path) -> None:
        """A metric that happens to be called "step" does not replace the row's step number."""

        def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            return {"loss": 1.0, "step": 1000.0}

        artifacts = TrainLoop(step, range(2), out_dir=tmp_path).run()
        assert [row["step"] for row in read_jsonl(artifacts.metrics_path)] == [1, 2]

    def test_hashing_off(self, tmp_path: Path) -> None:
        """With hash_checkpoints=False rows carry the size and no digest."""
        artifacts = make_loop(tmp_path, max_steps=1, hash_checkpoints=False).run()
        assert artifacts.final_checkpoint is not None
        assert artifacts.final_checkpoint.digest is None
        assert artifacts.final_checkpoint.size_bytes == len("weights at 1")


class TestFailures:
    """Misuse and errors inside the run surface as clear exceptions."""

    def test_save_that_writes_nothing(self, tmp_path: Path) -> None:
        """A save function that writes nothing at its path is an error naming the path."""
        loop = make_loop(tmp_path, save=lambda state, path: None)
        with pytest.raises(FileNotFoundError, match="save\\(\\) returned without writing"):
            loop.run()

    def test_benchmark_returning_wrong_type(self, tmp_path: Path) -> None:
        """A benchmark that does not return (EvalResult, predictions) is a TypeError."""
        loop = make_loop(tmp_path, benchmarks={"bad": lambda state: ({"score": 1.0}, [])})
        with pytest.raises(TypeError, match="benchmark 'bad' returned dict"):
            loop.run()

    def test_runs_once(self, tmp_path: Path) -> None:
        """A TrainLoop cannot be run twice."""
        loop = make_loop(tmp_path, max_steps=1)
        loop.run()
        with pytest.raises(RuntimeError, match="already run"):
            loop.run()

    def test_owned_bridge_closed_after_run(self, tmp_path: Path) -> None:
        """A loop that created its own bridge closes it when the run ends, even on error."""

        def failing(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            raise RuntimeError("diverged")

        ok = make_loop(tmp_path, max_steps=1)
        ok.run()
        assert ok.bridge is not None
        assert ok.bridge.closed
        bad = TrainLoop(failing, range(3), out_dir=tmp_path / "bad")
        with pytest.raises(RuntimeError, match="diverged"):
            bad.run()
        assert bad.bridge is not None
        assert bad.bridge.closed

    def test_given_bridge_left_open(self, tmp_path: Path) -> None:
        """A loop given a bridge uses it and leaves it open for its owner."""
        with lb.Bridge() as bridge:
            loop = make_loop(tmp_path, max_steps=1, bridge=bridge)
            loop.run()
            assert loop.bridge is bridge
            assert not bridge.closed


@pytest.fixture
def ok_args(tmp_path: Path) -> dict[str, Any]:
    return {"step": step_fn, "batches": range(3), "out_dir": tmp_path}


class TestValidation:
    """TrainLoop refuses bad arguments at construction, with a message saying what to pass."""

    @pytest.mark.parametrize("name", ["max_steps", "checkpoint_every", "eval_every"])
    @pytest.mark.parametrize("value", [0, -1, 1.5, "3"])
    def test_counts_must_be_positive_ints(
        self, ok_args: dict[str, Any], name: str, value: Any
    ) -> None:
        """max_steps, checkpoint_every and eval_every must be whole numbers of at least 1."""
        args: dict[str, Any] = {**ok_args, name: value}
        if name == "checkpoint_every":
            args["save"] = save_fn
        with pytest.raises(ValueError, match=rf"TrainLoop\({name}=.*whole number of at least 1"):
            TrainLoop(**args)

    def test_checkpoint_every_needs_save(self, ok_args: dict[str, Any]) -> None:
        """checkpoint_every without save is refused."""
        with pytest.raises(ValueError, match=r"checkpoint_every=2\) needs save="):
            TrainLoop(**ok_args, checkpoint_every=2)

    def test_evaluators_need_eval_every(self, ok_args: dict[str, Any]) -> None:
        """Evaluators without eval_every are refused."""
        with pytest.raises(ValueError, match="no eval_every; pass eval_every=N"):
            TrainLoop(**ok_args, evaluators={"val": val_fn})

    def test_benchmarks_need_eval_every(self, ok_args: dict[str, Any]) -> None:
        """Benchmarks without eval_every are refused."""
        with pytest.raises(ValueError, match="no eval_every"):
            TrainLoop(**ok_args, benchmarks={"b": bench_fn})

    def test_drain_policy(self, ok_args: dict[str, Any]) -> None:
        """on_drain_failure takes only 'raise' or 'warn'."""
        with pytest.raises(ValueError, match="use 'raise' or 'warn'"):
            TrainLoop(**ok_args, on_drain_failure="ignore")  # type: ignore[arg-type]

    def test_step_must_be_callable(self, ok_args: dict[str, Any]) -> None:
        """A step that is not callable is a TypeError."""
        ok_args["step"] = 3
        with pytest.raises(TypeError, match="step must be callable"):
            TrainLoop(**ok_args)

    def test_start_step_non_negative(self, ok_args: dict[str, Any]) -> None:
        """start_step below zero is refused."""
        with pytest.raises(ValueError, match="start_step=-1"):
            TrainLoop(**ok_args, start_step=-1)
