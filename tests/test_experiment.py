"""Experiment: arms x repeats or continual stages, every hook at its moment, failures recorded."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    ArmResult,
    Callback,
    DrainError,
    EvalResult,
    Experiment,
    ExperimentResult,
    LogContext,
    LoopState,
    ManifestRow,
    RunResult,
    RunStatus,
    TrainingBatch,
    TrainLoop,
)
from loopbridge.testing import RecordingCallback
from tests.hookcheck import (
    ArmPlan,
    LoopPlan,
    Probe,
    StopOnEval,
    as_event,
    experiment_events,
)

ARMS: dict[str, dict[str, Any]] = {
    "lr=1e-3": {"lr": 1e-3, "depth": 2},
    "lr=1e-4": {"lr": 1e-4, "depth": 2},
}


def step_fn(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    """A step whose loss depends on the run's learning rate and the step."""
    return {"loss": float(state.config["lr"]) * 1000 / (state.step + 1)}


def save_fn(state: LoopState, path: Path) -> None:
    """Writes a checkpoint naming the run and step."""
    path.write_text(f"{state.run_name}@{state.step}")


def val_fn(state: LoopState) -> dict[str, float]:
    """An evaluator."""
    return {"acc": state.step / 10}


def inloop_fn(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
    """An in-loop benchmark."""
    return EvalResult("inloop", {"score": float(state.step)}), [{"i": state.step}]


def heldout_fn(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
    """A post-training benchmark with breakdowns and tags."""
    result = EvalResult(
        "heldout",
        {"score": 1.0 - float(state.config["lr"])},
        breakdowns={"easy": {"score": 1.0}},
        tags={"split": "test"},
    )
    return result, [{"q": "1+1", "pred": "2", "steps": state.step}]


def builder(
    tmp_path: Path, built: list[LogContext] | None = None
) -> Callable[[LogContext], TrainLoop]:
    """A build function for 7-step runs with checkpoints, an evaluator and an in-loop benchmark."""

    def build(ctx: LogContext) -> TrainLoop:
        if built is not None:
            built.append(ctx)
        assert ctx.run_name is not None
        return TrainLoop(
            step_fn,
            range(100),
            max_steps=7,
            out_dir=tmp_path / ctx.run_name,
            save=save_fn,
            checkpoint_every=3,
            evaluators={"val": val_fn},
            eval_every=2,
            benchmarks={"inloop": inloop_fn},
        )

    return build


def plan(run: str, stop_at: int | None = None) -> LoopPlan:
    """The hook plan of one run built by `builder`."""
    return LoopPlan(
        run=run,
        max_steps=7,
        checkpoint_every=3,
        eval_every=2,
        evaluators=("val",),
        benchmarks=("inloop",),
        stop_at_eval_step=stop_at,
    )


EARLY = "lr=1e-4-r1"


@pytest.fixture(scope="module")
def repeats(tmp_path_factory: pytest.TempPathFactory) -> tuple[Probe, ExperimentResult]:
    """The 2 arms x 2 repeats experiment, run once for the module."""
    tmp_path = tmp_path_factory.mktemp("repeats")
    probe = Probe()
    result = Experiment(
        "sweep",
        arms=ARMS,
        build=builder(tmp_path),
        n_repeats=2,
        benchmarks={"heldout": heldout_fn},
        callbacks=[probe, StopOnEval(EARLY, 4)],
    ).run()
    return probe, result


class TestRepeats:
    """2 arms x 2 repeats with checkpoints, evals, both kinds of benchmark and an early stop."""

    def test_exact_hook_sequence(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """Hooks fire exactly in the contract's nesting; the early stop cuts one run short."""
        probe, _ = repeats
        arms = [
            ArmPlan(
                name=arm,
                grouped=True,
                runs=[plan(f"{arm}-r{i}", 4 if f"{arm}-r{i}" == EARLY else None) for i in range(2)],
                post_benchmarks=("heldout",),
            )
            for arm in ARMS
        ]
        expected = experiment_events(arms)
        assert [as_event(c) for c in probe.calls] == expected
        assert probe.hooks.count("on_step_end") == 7 * 3 + 4

    def test_experiment_start(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """on_experiment_start gets a fresh context naming the experiment."""
        probe, _ = repeats
        ((call, facts),) = probe.indexed("on_experiment_start")
        (ctx,) = call.args
        assert isinstance(ctx, LogContext)
        assert ctx.experiment_name == "sweep"
        assert (ctx.arm_name, ctx.group_name, ctx.run_name) == (None, None, None)
        assert facts["ids"] == {}

    def test_group_start(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """on_group_start fires once per arm with the group name and the experiment's id."""
        probe, _ = repeats
        calls = probe.indexed("on_group_start")
        assert [c.args[1] for c, _ in calls] == list(ARMS)
        for (call, facts), arm in zip(calls, ARMS, strict=True):
            ctx, group_name = call.args
            assert isinstance(ctx, LogContext)
            assert isinstance(group_name, str)
            assert (ctx.experiment_name, ctx.arm_name, ctx.group_name) == ("sweep", arm, arm)
            assert facts["run_config"] == ARMS[arm]
            assert facts["ids"]["experiment_id"] == "exp:sweep"

    def test_run_start(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """on_run_start gets the run's config and the ids of its experiment and group only."""
        probe, _ = repeats
        calls = probe.indexed("on_run_start")
        names = [f"{arm}-r{i}" for arm in ARMS for i in range(2)]
        assert [c.args[0].run_name for c, _ in calls] == names
        for call, facts in calls:
            (ctx,) = call.args
            arm = ctx.arm_name
            assert arm in ARMS
            assert ctx.experiment_name == "sweep"
            assert ctx.group_name == arm
            assert ctx.repeat_index == int(ctx.run_name[-1])
            assert ctx.stage_index is None
            assert ctx.resume_from is None
            assert facts["run_config"] == ARMS[arm]
            assert facts["ids"]["experiment_id"] == "exp:sweep"
            assert facts["ids"][f"group:{arm}"] == f"grp:{arm}"
            assert "run_id" not in facts["ids"]  # no leak from the previous run

    def test_train_start_state_from_run_config(
        self, repeats: tuple[Probe, ExperimentResult]
    ) -> None:
        """Each loop's state carries the run's name and its run_config."""
        probe, _ = repeats
        starts = probe.indexed("on_train_start")
        runs = probe.calls_to("on_run_start")
        for (call, facts), run in zip(starts, runs, strict=True):
            (state,) = call.args
            assert isinstance(state, LoopState)
            assert state.run_name == run.args[0].run_name
            assert facts == {"config": run.args[0].run_config, "step": 0}

    def test_step_end_values_and_rows_on_disk(
        self, repeats: tuple[Probe, ExperimentResult]
    ) -> None:
        """In every run, state.step == step_idx + 1 and the step's row is on disk at on_step_end."""
        probe, _ = repeats
        for call, facts in probe.indexed("on_step_end"):
            state, step_idx, batch, metrics = call.args
            assert facts["step"] == step_idx + 1
            assert batch.index == step_idx
            lr = state.config["lr"]
            assert metrics == {"loss": lr * 1000 / (step_idx + 1)}
            row = facts["last_row"]
            assert {k: v for k, v in row.items() if k != "time"} == {
                "step": step_idx + 1,
                "metrics": metrics,
            }

    def test_checkpoints_recorded_before_hook(
        self, repeats: tuple[Probe, ExperimentResult]
    ) -> None:
        """At on_checkpoint the manifest row is on disk and the checkpoint file exists."""
        probe, _ = repeats
        calls = probe.indexed("on_checkpoint")
        assert len(calls) == 3 * 3 + 2  # three full runs, and the early-stopped one (3, final 4)
        for call, facts in calls:
            state, row = call.args
            assert isinstance(row, ManifestRow)
            assert facts["last_manifest"] == row
            assert facts["exists"]
            assert row.path.read_text() == f"{state.run_name}@{row.step}"

    def test_train_end_after_final_checkpoint(
        self, repeats: tuple[Probe, ExperimentResult]
    ) -> None:
        """At on_train_end the final checkpoint is saved and in the manifest."""
        probe, _ = repeats
        for call, facts in probe.indexed("on_train_end"):
            state, artifacts = call.args
            assert facts["final_exists"]
            assert facts["manifest_on_disk"] == artifacts.manifest
            assert artifacts.final_checkpoint.step == state.step
            expected_steps = 4 if state.run_name == EARLY else 7
            assert artifacts.steps_completed == expected_steps

    def test_benchmarks_in_loop_and_after(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """In-loop benchmarks carry step=N, post-training ones step=None; both get the run's ctx."""
        probe, _ = repeats
        run_ctx = {c.args[0].run_name: c.args[0] for c in probe.calls_to("on_run_start")}
        for call, facts in probe.indexed("on_benchmark_eval"):
            ctx, result, predictions = call.args
            assert ctx is run_ctx[ctx.run_name]
            assert facts["ids"]["run_id"] == f"run:{ctx.run_name}"
            assert facts["ids"]["experiment_id"] == "exp:sweep"
            assert isinstance(result, EvalResult)
            assert isinstance(predictions, list)
            if result.name == "inloop":
                assert call.kwargs["step"] in (2, 4, 6)
                assert predictions == [{"i": call.kwargs["step"]}]
            else:
                assert result.name == "heldout"
                assert call.kwargs == {"step": None}
                assert result.breakdowns == {"easy": {"score": 1.0}}
                assert result.tags == {"split": "test"}
                steps = 4 if ctx.run_name == EARLY else 7
                assert predictions == [{"q": "1+1", "pred": "2", "steps": steps}]

    def test_run_end(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """on_run_end gets the run's ctx with its ids, its completed RunResult and its ArmResult."""
        probe, result = repeats
        run_ctx = {c.args[0].run_name: c.args[0] for c in probe.calls_to("on_run_start")}
        calls = probe.indexed("on_run_end")
        assert len(calls) == 4
        for call, facts in calls:
            ctx, run_result, arm = call.args
            assert ctx is run_ctx[ctx.run_name]
            assert facts["ids"]["run_id"] == f"run:{ctx.run_name}"
            assert isinstance(run_result, RunResult)
            assert run_result.run_name == ctx.run_name
            assert run_result.status is RunStatus.COMPLETED
            assert run_result.artifacts is not None
            assert [e.name for e in run_result.eval_results] == ["heldout"]
            assert run_result.drain_report is not None
            assert run_result.drain_report.ok
            assert isinstance(arm, ArmResult)
            assert arm is result.arms[ctx.arm_name]

    def test_experiment_end(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """on_experiment_end gets the result: both arms, four runs, the ids the loggers made."""
        probe, result = repeats
        ((call, facts),) = probe.indexed("on_experiment_end")
        ctx, seen = call.args
        assert seen is result
        assert ctx is probe.calls[0].args[0]
        assert facts["ids"] == {
            "experiment_id": "exp:sweep",
            "group:lr=1e-3": "grp:lr=1e-3",
            "group:lr=1e-4": "grp:lr=1e-4",
        }

    def test_result(self, repeats: tuple[Probe, ExperimentResult]) -> None:
        """The result holds the arms in order, each run's status, metrics and the early stop."""
        _, result = repeats
        assert result.name == "sweep"
        assert list(result.arms) == list(ARMS)
        assert [r.run_name for r in result.runs] == [f"{a}-r{i}" for a in ARMS for i in range(2)]
        assert result.ok
        assert result.duration_s > 0
        assert result.ids["experiment_id"] == "exp:sweep"
        early = result.arms["lr=1e-4"].runs[1]
        assert early.artifacts is not None
        assert early.artifacts.stop_reason == "early stop at 4"
        assert early.final_metrics == {"loss": 1e-4 * 1000 / 4}
        assert result.arms["lr=1e-3"].summary == {"loss": 1e-3 * 1000 / 7}
        assert result.arms["lr=1e-3"].config == ARMS["lr=1e-3"]


STAGES: list[dict[str, Any]] = [{"data": "code"}, {"data": "math", "lr": 0.5}, {"epochs": 2}]


@pytest.fixture(scope="module")
def stages(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Probe, ExperimentResult, list[LogContext]]:
    """Two arms through three continual stages, run once for the module."""
    tmp_path = tmp_path_factory.mktemp("stages")
    probe = Probe()
    built: list[LogContext] = []
    arms = {"a": {"lr": 1.0, "data": "web"}, "b": {"lr": 2.0, "data": "books"}}
    result = Experiment(
        "continual",
        arms=arms,
        build=builder(tmp_path, built),
        stages=STAGES,
        benchmarks={"heldout": heldout_fn},
        callbacks=[probe, StopOnEval("b-s1", 2)],
    ).run()
    return probe, result, built


class TestStages:
    """Continual stages: merged configs, one group per arm, each stage resuming from the last."""

    def test_exact_hook_sequence(
        self, stages: tuple[Probe, ExperimentResult, list[LogContext]]
    ) -> None:
        """One group per arm, then each stage as a run, in the contract's nesting."""
        probe, _, _ = stages
        arms = [
            ArmPlan(
                name=arm,
                grouped=True,
                runs=[
                    plan(f"{arm}-s{i}", 2 if f"{arm}-s{i}" == "b-s1" else None) for i in range(3)
                ],
                post_benchmarks=("heldout",),
            )
            for arm in ("a", "b")
        ]
        assert [as_event(c) for c in probe.calls] == experiment_events(arms)

    def test_stage_configs_merged_over_arm(
        self, stages: tuple[Probe, ExperimentResult, list[LogContext]]
    ) -> None:
        """Each stage's run_config is its stage dict merged over the arm's config."""
        probe, _, _ = stages
        configs = [(f["run_config"]) for _, f in probe.indexed("on_run_start")]
        assert configs == [
            {"lr": 1.0, "data": "code"},
            {"lr": 0.5, "data": "math"},
            {"lr": 1.0, "data": "web", "epochs": 2},
            {"lr": 2.0, "data": "code"},
            {"lr": 0.5, "data": "math"},
            {"lr": 2.0, "data": "books", "epochs": 2},
        ]
        states = [f["config"] for _, f in probe.indexed("on_train_start")]
        assert states == configs

    def test_stage_contexts(self, stages: tuple[Probe, ExperimentResult, list[LogContext]]) -> None:
        """Stage runs name arm, group and stage index; experiment and group ids pass down."""
        probe, _, _ = stages
        for call, facts in probe.indexed("on_run_start"):
            (ctx,) = call.args
            assert ctx.group_name == ctx.arm_name
            assert ctx.stage_index == int(ctx.run_name[-1])
            assert ctx.repeat_index is None
            assert facts["ids"] == {
                "experiment_id": "exp:continual",
                **{f"group:{g}": f"grp:{g}" for g in ("a", "b") if g <= ctx.arm_name},
            }
        assert [c.args[1] for c in probe.calls_to("on_group_start")] == ["a", "b"]

    def test_resume_from_previous_final_checkpoint(
        self, stages: tuple[Probe, ExperimentResult, list[LogContext]]
    ) -> None:
        """Stage 0 resumes from nothing; each later stage from the previous stage's final row."""
        _, result, built = stages
        for arm in ("a", "b"):
            runs = result.arms[arm].runs
            contexts = [c for c in built if c.arm_name == arm]
            assert contexts[0].resume_from is None
            for previous, ctx in zip(runs, contexts[1:], strict=False):
                assert previous.artifacts is not None
                final = previous.artifacts.final_checkpoint
                assert final is not None
                assert final.is_final
                assert ctx.resume_from == final
                assert ctx.resume_from.path.read_text() == f"{previous.run_name}@{final.step}"
        # The early-stopped stage hands on its early final checkpoint.
        b2 = next(c for c in built if c.run_name == "b-s2")
        assert b2.resume_from is not None
        assert b2.resume_from.step == 2

    def test_stage_without_checkpoint_passes_on_the_last_one(self, tmp_path: Path) -> None:
        """A stage that saved nothing (stopped before any step) hands on the last checkpoint."""

        class SkipStage1(Callback):
            def on_train_start(self, state: LoopState) -> None:
                if state.run_name == "a-s1":
                    state.request_stop("nothing to learn")

        built: list[LogContext] = []
        result = Experiment(
            "e",
            {"a": {"lr": 1.0}},
            builder(tmp_path, built),
            stages=[{}, {}, {}],
            callbacks=[SkipStage1()],
        ).run()
        s0, s1, _ = result.runs
        assert s1.artifacts is not None
        assert s1.artifacts.steps_completed == 0
        assert s1.artifacts.final_checkpoint is None
        assert s0.artifacts is not None
        assert built[2].resume_from == s0.artifacts.final_checkpoint

    def test_result(self, stages: tuple[Probe, ExperimentResult, list[LogContext]]) -> None:
        """Every stage completed; the results are in stage order."""
        _, result, _ = stages
        assert result.ok
        assert [r.run_name for r in result.runs] == [f"{a}-s{i}" for a in "ab" for i in range(3)]


def failing_builder(tmp_path: Path, bad_runs: set[str]) -> Callable[[LogContext], TrainLoop]:
    """Builds 3-step loops; the named runs' step function raises at the second step."""

    def build(ctx: LogContext) -> TrainLoop:
        assert ctx.run_name is not None
        bad = ctx.run_name in bad_runs

        def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            if bad and state.step == 1:
                raise FloatingPointError(f"loss is nan in {state.run_name}")
            return {"loss": 1.0}

        return TrainLoop(
            step, range(10), max_steps=3, out_dir=tmp_path / ctx.run_name, save=save_fn
        )

    return build


class TestFailures:
    """A run that raises is recorded as failed, and the experiment goes on unless told to stop."""

    def test_failed_run_recorded_and_experiment_goes_on(self, tmp_path: Path) -> None:
        """The failing run is FAILED with its error; the other runs and hooks carry on."""
        recorder = RecordingCallback()
        result = Experiment(
            "e",
            {"a": {}, "b": {}},
            failing_builder(tmp_path, {"a-r0"}),
            n_repeats=2,
            callbacks=[recorder],
        ).run()
        statuses = {r.run_name: r.status for r in result.runs}
        assert statuses == {
            "a-r0": RunStatus.FAILED,
            "a-r1": RunStatus.COMPLETED,
            "b-r0": RunStatus.COMPLETED,
            "b-r1": RunStatus.COMPLETED,
        }
        failed = result.runs[0]
        assert isinstance(failed.error, FloatingPointError)
        assert str(failed.error) == "loss is nan in a-r0"
        assert failed.artifacts is None
        assert not failed.ok
        assert not result.ok
        run_ends = recorder.calls_to("on_run_end")
        assert [str(c.args[1].status) for c in run_ends] == [
            "failed",
            "completed",
            "completed",
            "completed",
        ]
        assert run_ends[0].args[1] is failed
        assert recorder.hooks[-1] == "on_experiment_end"
        # The failed run started training but never reached on_train_end.
        assert [c.args[0].run_name for c in recorder.calls_to("on_train_end")] == [
            "a-r1",
            "b-r0",
            "b-r1",
        ]

    def test_failed_run_is_logged(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A failed run is logged with its name and error."""
        Experiment("e", {"a": {}}, failing_builder(tmp_path, {"a"})).run()
        messages = [r.getMessage() for r in caplog.records if r.name == "loopbridge.experiment"]
        assert any(
            re.search(r"run a failed: FloatingPointError: loss is nan in a", m) for m in messages
        )

    def test_hook_error_in_run_recorded_with_note(self, tmp_path: Path) -> None:
        """A hook that raises inside a run fails that run; its error names callback and hook."""

        class BadCheckpoint(Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                raise OSError("disk full")

        result = Experiment(
            "e", {"a": {}, "b": {}}, failing_builder(tmp_path, set()), callbacks=[BadCheckpoint()]
        ).run()
        assert [r.status for r in result.runs] == [RunStatus.FAILED, RunStatus.FAILED]
        error = result.runs[0].error
        assert isinstance(error, OSError)
        (note,) = error.__notes__
        assert re.fullmatch(r"raised in hook (.*\.)?BadCheckpoint\.on_checkpoint .*", note)

    def test_stop_on_failure_reraises(self, tmp_path: Path) -> None:
        """With stop_on_failure=True the run's error propagates after its on_run_end."""
        recorder = RecordingCallback()
        experiment = Experiment(
            "e",
            {"a": {}, "b": {}},
            failing_builder(tmp_path, {"a"}),
            callbacks=[recorder],
            stop_on_failure=True,
        )
        with pytest.raises(FloatingPointError, match="loss is nan in a"):
            experiment.run()
        assert recorder.hooks[-1] == "on_run_end"
        assert str(recorder.calls_to("on_run_end")[0].args[1].status) == "failed"
        assert "on_experiment_end" not in recorder.hooks
        assert [c.args[0].run_name for c in recorder.calls_to("on_run_start")] == ["a"]
        assert experiment.bridge is not None
        assert experiment.bridge.closed

    def test_failed_stage_skips_later_stages(self, tmp_path: Path) -> None:
        """When a stage fails, the arm's later stages are not run; the next arm still runs."""
        result = Experiment(
            "e",
            {"a": {}, "b": {}},
            failing_builder(tmp_path, {"a-s0"}),
            stages=[{}, {}],
        ).run()
        assert [(r.run_name, r.status) for r in result.runs] == [
            ("a-s0", RunStatus.FAILED),
            ("b-s0", RunStatus.COMPLETED),
            ("b-s1", RunStatus.COMPLETED),
        ]

    def test_build_returning_wrong_type(self, tmp_path: Path) -> None:
        """A build function that returns something other than a TrainLoop fails that run."""
        result = Experiment("e", {"a": {}}, lambda ctx: "not a loop").run()  # type: ignore[arg-type,return-value]
        (run,) = result.runs
        assert run.status is RunStatus.FAILED
        assert isinstance(run.error, TypeError)
        assert "build(ctx) returned str; it must return a TrainLoop" in str(run.error)

    def test_drain_failure_raise_fails_run(self, tmp_path: Path) -> None:
        """With the default policy, failed background work fails the run with a DrainError."""

        class SpawnsFailure(Callback):
            def on_train_end(self, state: LoopState, artifacts: lb.LoopArtifacts) -> None:
                async def upload() -> None:
                    raise ConnectionError("s3 unreachable")

                self.spawn(upload(), name=f"upload-{state.run_name}")

        result = Experiment(
            "e", {"a": {}}, failing_builder(tmp_path, set()), callbacks=[SpawnsFailure()]
        ).run()
        (run,) = result.runs
        assert run.status is RunStatus.FAILED
        assert isinstance(run.error, DrainError)
        assert run.drain_report is run.error.report
        assert [f.name for f in run.drain_report.failed] == ["upload-a"]

    def test_drain_failure_warn_completes_run(self, tmp_path: Path) -> None:
        """With on_drain_failure="warn", the run completes but its result is not ok."""

        class SpawnsFailure(Callback):
            def on_train_end(self, state: LoopState, artifacts: lb.LoopArtifacts) -> None:
                async def upload() -> None:
                    raise ConnectionError("s3 unreachable")

                self.spawn(upload(), name="upload")

        result = Experiment(
            "e",
            {"a": {}},
            failing_builder(tmp_path, set()),
            callbacks=[SpawnsFailure()],
            on_drain_failure="warn",
        ).run()
        (run,) = result.runs
        assert run.status is RunStatus.COMPLETED
        assert run.drain_report is not None
        assert [f.name for f in run.drain_report.failed] == ["upload"]
        assert not run.ok
        assert not result.ok


def plain_bench(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
    """A post-training benchmark that needs no config."""
    return EvalResult("heldout", {"score": 1.0}), [{"q": 1}]


class StorePredictions(Callback):
    """A logger stand-in: stores post-training predictions in the background; run 'a' fails."""

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]
        *,
        step: int | None = None,
    ) -> None:
        if step is not None:
            return
        run = ctx.run_name

        async def store() -> None:
            if run == "a":
                raise ConnectionError(f"predictions of {run} not stored")

        self.spawn(store(), name=f"store-predictions-{run}")


class TestPostTrainingWork:
    """Background work spawned by post-training benchmark hooks is reported with its own run."""

    def test_failure_not_blamed_on_next_run(self, tmp_path: Path) -> None:
        """Run a's failed prediction upload does not fail run b."""
        result = Experiment(
            "e",
            {"a": {}, "b": {}},
            failing_builder(tmp_path, set()),
            benchmarks={"heldout": plain_bench},
            callbacks=[StorePredictions()],
            on_drain_failure="warn",
        ).run()
        a, b = result.runs
        assert (a.status, b.status) == (RunStatus.COMPLETED, RunStatus.COMPLETED)
        assert b.drain_report is not None
        assert b.drain_report.failed == ()
        assert a.drain_report is not None
        assert [r.name for r in a.drain_report.failed] == ["store-predictions-a"]

    def test_last_run_failure_makes_result_not_ok(self, tmp_path: Path) -> None:
        """A failed prediction upload of the last run makes the experiment's result not ok."""
        result = Experiment(
            "e",
            {"b": {}, "a": {}},
            failing_builder(tmp_path, set()),
            benchmarks={"heldout": plain_bench},
            callbacks=[StorePredictions()],
            on_drain_failure="warn",
        ).run()
        assert [r.status for r in result.runs] == [RunStatus.COMPLETED, RunStatus.COMPLETED]
        assert not result.ok


class TestLateWork:
    """Work spawned by on_run_end and on_experiment_end is drained and reported too."""

    def test_run_end_work_in_its_own_run(self, tmp_path: Path) -> None:
        """A failing upload spawned in on_run_end is in that run's report, not the next run's."""

        class Finalize(Callback):
            def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
                run = ctx.run_name

                async def finalize() -> None:
                    if run == "a":
                        raise TimeoutError("tracking server did not answer")

                self.spawn(finalize(), name=f"finalize-{run}")

        result = Experiment(
            "e", {"a": {}, "b": {}}, failing_builder(tmp_path, set()), callbacks=[Finalize()]
        ).run()
        a, b = result.runs
        assert a.drain_report is not None
        assert [r.name for r in a.drain_report.failed] == ["finalize-a"]
        assert not a.ok
        assert b.drain_report is not None
        assert b.drain_report.ok
        assert b.drain_report.completed == 1
        assert not result.ok

    def test_experiment_end_work_reported(self, tmp_path: Path) -> None:
        """A failing upload spawned in on_experiment_end makes the result not ok."""

        class Summary(Callback):
            def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
                async def upload_summary() -> None:
                    raise PermissionError("403")

                self.spawn(upload_summary(), name="upload-summary")

        result = Experiment(
            "e", {"a": {}}, failing_builder(tmp_path, set()), callbacks=[Summary()]
        ).run()
        assert all(run.ok for run in result.runs)
        assert result.drain_report is not None
        assert [r.name for r in result.drain_report.failed] == ["upload-summary"]
        assert not result.ok

    def test_pending_at_deadline_survives_post_training_work(self, tmp_path: Path) -> None:
        """Work cut off at the train-end deadline stays in the run's report after later drains."""

        class Hangs(Callback):
            def on_train_end(self, state: LoopState, artifacts: lb.LoopArtifacts) -> None:
                self.spawn(_forever(), name="stuck-upload")

        result = Experiment(
            "e",
            {"a": {}},
            failing_builder(tmp_path, set()),
            benchmarks={"heldout": plain_bench},
            callbacks=[Hangs(), StorePredictions()],  # predictions of run "a" fail
            on_drain_failure="warn",
            drain_timeout=0.3,
        ).run()
        (run,) = result.runs
        report = run.drain_report
        assert report is not None
        assert [r.name for r in report.pending + report.cancelled] == ["stuck-upload"]
        assert [r.name for r in report.failed] == ["store-predictions-a"]
        assert report.timed_out
        assert not run.ok


async def _forever() -> None:
    await asyncio.Event().wait()


class TestCallbacks:
    """The experiment's callbacks are attached to every loop, ahead of the loop's own."""

    def test_experiment_callbacks_fire_first(self, tmp_path: Path) -> None:
        """In each run, experiment callbacks fire before the loop's callbacks."""
        log: list[str] = []

        class Tag(Callback):
            def __init__(self, tag: str) -> None:
                self.tag = tag

            def on_train_start(self, state: LoopState) -> None:
                log.append(f"{self.tag}:{state.run_name}")

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(
                lambda s, b: {},
                range(1),
                out_dir=tmp_path / str(ctx.run_name),
                callbacks=[Tag("loop")],
            )

        Experiment("e", {"a": {}, "b": {}}, build, callbacks=[Tag("exp")]).run()
        assert log == ["exp:a", "loop:a", "exp:b", "loop:b"]

    def test_single_run_arm_has_no_group(self, tmp_path: Path) -> None:
        """With n_repeats=1 and no stages, no group starts and the run is named after its arm."""
        probe = Probe()
        result = Experiment(
            "e", {"a": {"x": 1}}, failing_builder(tmp_path, set()), callbacks=[probe]
        ).run()
        assert "on_group_start" not in probe.hooks
        (ctx,) = [c.args[0] for c in probe.calls_to("on_run_start")]
        assert (ctx.run_name, ctx.group_name, ctx.repeat_index) == ("a", None, 0)
        assert ctx.run_config == {"x": 1}
        assert result.runs[0].ok

    def test_loop_callbacks_see_post_training_benchmarks(self, tmp_path: Path) -> None:
        """Post-training benchmark results reach the loop's own callbacks too."""
        recorder = RecordingCallback()

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(
                lambda s, b: {}, range(1), out_dir=tmp_path / "r", callbacks=[recorder]
            )

        Experiment("e", {"a": {"lr": 0.1}}, build, benchmarks={"heldout": heldout_fn}).run()
        (call,) = recorder.calls_to("on_benchmark_eval")
        assert call.kwargs == {"step": None}
        assert call.args[1].name == "heldout"


class TestInterrupt:
    """Ctrl-C anywhere in an experiment gives background work a short grace, never the full wait."""

    def test_sigint_in_run_start(self, tmp_path: Path) -> None:
        """SIGINT during on_run_start exits promptly with KeyboardInterrupt, work cancelled."""
        script = """
            import asyncio
            import sys
            import threading
            import loopbridge as lb

            class Logger(lb.Callback):
                def on_run_start(self, ctx):
                    async def create_run():
                        await asyncio.Event().wait()

                    self.spawn(create_run(), name="create-run")
                    print("ready", flush=True)
                    threading.Event().wait(60)

            def build(ctx):
                return lb.TrainLoop(lambda s, b: {}, range(2), out_dir=sys.argv[1])

            lb.Experiment("e", {"a": {}}, build, callbacks=[Logger()], drain_timeout=60).run()
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signal.SIGINT)
            # A grace of a few seconds is fine; waiting out drain_timeout (60 s) is not.
            _, err = proc.communicate(timeout=8)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == -signal.SIGINT
        assert "KeyboardInterrupt" in err
        assert "create-run" in err


class TestRerun:
    """An Experiment object can be run again."""

    def test_second_run_gets_a_working_bridge(self, tmp_path: Path) -> None:
        """A second run() does not reuse the bridge the first run closed."""

        class Uploads(Callback):
            def on_step_end(
                self, state: LoopState, step_idx: int, batch: TrainingBatch, m: dict[str, float]
            ) -> None:
                async def upload() -> None:
                    pass

                self.spawn(upload())

        runs = iter(range(100))

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(lambda s, b: {}, range(2), out_dir=tmp_path / f"run{next(runs)}")

        experiment = Experiment("e", {"a": {}}, build, callbacks=[Uploads()])
        assert experiment.run().ok
        second = experiment.run()
        assert [(r.status, r.error) for r in second.runs] == [(RunStatus.COMPLETED, None)]
        assert second.ok


class TestValidation:
    """Experiment refuses bad arguments at construction."""

    def build(self, ctx: LogContext) -> TrainLoop:
        return TrainLoop(lambda s, b: {}, range(1), out_dir=Path("unused"))

    def test_no_arms(self) -> None:
        """An experiment needs at least one arm."""
        with pytest.raises(ValueError, match=r"Experiment\('e'\) has no arms"):
            Experiment("e", {}, self.build)

    @pytest.mark.parametrize("n", [0, -1, 1.5])
    def test_n_repeats(self, n: Any) -> None:
        """n_repeats must be a whole number of at least 1."""
        with pytest.raises(ValueError, match=r"n_repeats=.*whole number >= 1"):
            Experiment("e", {"a": {}}, self.build, n_repeats=n)

    def test_stages_and_repeats(self) -> None:
        """Stages and n_repeats > 1 are exclusive."""
        with pytest.raises(ValueError, match="n_repeats or stages, not both"):
            Experiment("e", {"a": {}}, self.build, n_repeats=2, stages=[{}])

    def test_empty_stages(self) -> None:
        """An empty stage list is refused."""
        with pytest.raises(ValueError, match=r"stages=\[\]\) has no stages"):
            Experiment("e", {"a": {}}, self.build, stages=[])

    def test_drain_policy(self) -> None:
        """on_drain_failure takes only 'raise' or 'warn'."""
        with pytest.raises(ValueError, match="use 'raise' or 'warn'"):
            Experiment("e", {"a": {}}, self.build, on_drain_failure="maybe")  # type: ignore[arg-type]
