"""EarlyStopping: stops through the state's stop request, with a reason; refuses bad setups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from loopbridge import Callback, Experiment, LogContext, LoopState, TrainingBatch, TrainLoop
from loopbridge.callbacks import EarlyStopping


def step_fn(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    """A step with a constant metric."""
    return {"loss": 1.0}


def curve(values: Sequence[float], key: str = "loss") -> Any:
    """An evaluator that returns `values` one eval at a time (the last one repeated)."""
    seen: list[float] = []

    def evaluate(state: LoopState) -> dict[str, float]:
        value = values[min(len(seen), len(values) - 1)]
        seen.append(value)
        return {key: value, "other": 0.0}

    return evaluate


def run(
    tmp_path: Path,
    stopper: EarlyStopping,
    evaluators: dict[str, Any],
    steps: int = 100,
    eval_every: int = 10,
) -> TrainLoop:
    """Run a loop of `steps` steps with evals every `eval_every` steps."""
    loop = TrainLoop(
        step_fn,
        range(10_000),
        max_steps=steps,
        out_dir=tmp_path / "run",
        evaluators=evaluators,
        eval_every=eval_every,
        callbacks=[stopper],
    )
    loop.run()
    return loop


class TestStopping:
    """The run stops after `patience` evals without improvement, and says why."""

    def test_min_mode_stops_with_a_reason(self, tmp_path: Path) -> None:
        """Best 0.5 at step 20, then 3 worse evals: the run stops at step 50."""
        stopper = EarlyStopping("loss", patience=3)
        loop = run(tmp_path, stopper, {"val": curve([0.9, 0.5, 0.6, 0.7, 0.55, 0.4])})
        assert loop.state.step == 50
        assert stopper.stopped_step == 50
        reason = loop.state.stop_reason
        assert reason is not None
        assert "val/loss" in reason
        assert "best 0.5 at step 20" in reason
        assert "3 evals" in reason
        assert loop.artifacts is not None
        assert loop.artifacts.stop_reason == reason

    def test_max_mode(self, tmp_path: Path) -> None:
        """In max mode higher is better: falling accuracy stops the run."""
        stopper = EarlyStopping("acc", mode="max", patience=2)
        loop = run(tmp_path, stopper, {"val": curve([0.1, 0.8, 0.7, 0.6], key="acc")})
        assert loop.state.step == 40
        assert stopper.best == 0.8
        assert stopper.best_step == 20

    def test_improving_runs_to_the_end(self, tmp_path: Path) -> None:
        """A metric that keeps improving never stops the run."""
        values = [1.0 / (i + 1) for i in range(20)]
        loop = run(tmp_path, EarlyStopping("loss", patience=1), {"val": curve(values)})
        assert loop.state.step == 100
        assert loop.state.stop_reason is None

    def test_min_delta(self, tmp_path: Path) -> None:
        """Improvements no larger than min_delta do not count."""
        values = [1.0, 0.999, 0.998, 0.997, 0.5]
        stopper = EarlyStopping("loss", patience=3, min_delta=0.01)
        loop = run(tmp_path, stopper, {"val": curve(values)})
        assert loop.state.step == 40
        assert "by more than 0.01" in (loop.state.stop_reason or "")

    def test_nan_is_no_improvement(self, tmp_path: Path) -> None:
        """A diverged (NaN) metric counts against patience."""
        stopper = EarlyStopping("loss", patience=2)
        loop = run(tmp_path, stopper, {"val": curve([0.5, math.nan])})
        assert loop.state.step == 30
        assert stopper.best == 0.5

    def test_stop_on_nonfinite(self, tmp_path: Path) -> None:
        """With stop_on_nonfinite, the first NaN stops the run at once."""
        stopper = EarlyStopping("loss", patience=5, stop_on_nonfinite=True)
        loop = run(tmp_path, stopper, {"val": curve([0.5, 0.4, math.inf])})
        assert loop.state.step == 30
        assert "val/loss is inf at step 30" in (loop.state.stop_reason or "")

    def test_resets_between_runs(self, tmp_path: Path) -> None:
        """One instance watching two runs starts each run with no best."""
        stopper = EarlyStopping("loss", patience=2)
        steps: list[int] = []

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(
                step_fn,
                range(1000),
                max_steps=60,
                out_dir=tmp_path / (ctx.run_name or "x"),
                evaluators={"val": curve([0.5, 0.6, 0.7])},
                eval_every=10,
                callbacks=[stopper],
            )

        result = Experiment("e", {"a": {}}, build, n_repeats=2).run()
        steps = [r.artifacts.steps_completed for r in result.runs if r.artifacts is not None]
        assert steps == [30, 30]


class TestWhichEval:
    """eval_name picks the evaluator; without it, the one that reports the metric."""

    def test_eval_name_ignores_other_evaluators(self, tmp_path: Path) -> None:
        """A worsening metric in another evaluator does not stop the run."""
        stopper = EarlyStopping("loss", patience=1, eval_name="val")
        evaluators = {
            "val": curve([1.0 / (i + 1) for i in range(20)]),
            "train": curve([0.1, 0.9, 0.9, 0.9]),
        }
        loop = run(tmp_path, stopper, evaluators)
        assert loop.state.step == 100

    def test_finds_the_evaluator_with_the_metric(self, tmp_path: Path) -> None:
        """Without eval_name, the evaluator whose metrics hold the key is watched."""
        stopper = EarlyStopping("bleu", mode="max", patience=1)
        evaluators = {"val": curve([0.5]), "gen": curve([0.3, 0.2], key="bleu")}
        loop = run(tmp_path, stopper, evaluators)
        assert loop.state.step == 20
        assert "gen/bleu" in (loop.state.stop_reason or "")


class TestErrors:
    """Mistakes are refused with messages that name the problem and the fix."""

    def test_missing_key_names_the_keys_there_are(self, tmp_path: Path) -> None:
        """A monitor key absent from the named evaluator's metrics raises, listing its keys."""
        stopper = EarlyStopping("val_loss", eval_name="val")
        with pytest.raises(ValueError, match=r"'val' has loss, other") as info:
            run(tmp_path, stopper, {"val": curve([0.5])})
        assert "val_loss" in str(info.value)

    def test_missing_everywhere_raises_after_a_round(self, tmp_path: Path) -> None:
        """Without eval_name, a key no evaluator reports raises at the next round of evals."""
        stopper = EarlyStopping("val_loss")
        with pytest.raises(ValueError, match=r"'a' has loss, other; 'b' has") as info:
            run(tmp_path, stopper, {"a": curve([0.5]), "b": curve([0.5], key="x")})
        assert "no such metric" in str(info.value)

    def test_missing_in_a_single_eval_round_raises_at_train_end(self, tmp_path: Path) -> None:
        """If the only round of evals lacked the key, train end raises."""
        with pytest.raises(ValueError, match="no such metric"):
            run(tmp_path, EarlyStopping("nope"), {"val": curve([0.5])}, steps=10)

    def test_key_only_the_step_returns_fails_after_the_first_eval_round(
        self, tmp_path: Path
    ) -> None:
        """A monitor the step returns but no evaluator does fails one step after the first
        evals, saying it is a step metric, listing the eval keys."""
        steps: list[int] = []

        def counting_step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            steps.append(state.step)
            return {"loss": 1.0}

        loop = TrainLoop(
            counting_step,
            range(10_000),
            max_steps=100,
            out_dir=tmp_path,
            evaluators={"val": curve([0.5], key="val_loss")},
            eval_every=10,
            callbacks=[EarlyStopping("loss")],
        )
        with pytest.raises(ValueError, match=r"no such metric") as info:
            loop.run()
        message = str(info.value)
        assert "'val' has other, val_loss" in message
        assert "'loss' is a metric of the step function" in message
        assert len(steps) == 11  # the evals at step 10, then the next step's hooks

    def test_no_evaluator_at_all_fails_at_train_end(self, tmp_path: Path) -> None:
        """With no evaluator (or eval_every past the run), train end raises, naming the monitor."""
        for evaluators, eval_every in (({}, None), ({"val": curve([0.5])}, 500)):
            loop = TrainLoop(
                step_fn,
                range(100),
                max_steps=20,
                out_dir=tmp_path / str(eval_every),
                evaluators=evaluators,
                eval_every=eval_every,
                callbacks=[EarlyStopping("loss")],
            )
            with pytest.raises(ValueError, match=r"monitor='loss'\) saw no eval") as info:
                loop.run()
            message = str(info.value)
            assert "in the 20 steps" in message
            assert "'loss' is a metric of the step function" in message
            assert "eval_every=N" in message

    def test_named_evaluator_that_never_reports(self, tmp_path: Path) -> None:
        """eval_name naming an evaluator that does not exist fails, listing those that do."""
        with pytest.raises(ValueError, match=r"of the evaluator 'val' \('test' has loss"):
            run(tmp_path, EarlyStopping("loss", eval_name="val"), {"test": curve([0.5])})

    def test_no_error_when_another_callback_stopped_first(self, tmp_path: Path) -> None:
        """A run another callback stopped before any eval is not an EarlyStopping mistake."""

        class StopAt3(Callback):
            def on_step_end(
                self,
                state: LoopState,
                step_idx: int,
                batch: TrainingBatch,
                metrics: dict[str, float],
            ) -> None:
                if state.step == 3:
                    state.request_stop("enough")

        loop = TrainLoop(
            step_fn,
            range(100),
            max_steps=50,
            out_dir=tmp_path,
            evaluators={"val": curve([0.5])},
            eval_every=10,
            callbacks=[StopAt3(), EarlyStopping("loss")],
        )
        assert loop.run().stop_reason == "enough"

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"monitor": ""}, "name the eval metric"),
            ({"monitor": "loss", "mode": "lowest"}, "use 'min'"),
            ({"monitor": "loss", "patience": 0}, "patience=0"),
            ({"monitor": "loss", "patience": 1.5}, "patience=1.5"),
            ({"monitor": "loss", "min_delta": -0.1}, "min_delta=-0.1"),
            ({"monitor": "loss", "min_delta": math.nan}, "min_delta=nan"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, Any], match: str) -> None:
        """Each bad argument raises ValueError naming it."""
        with pytest.raises(ValueError, match=match):
            EarlyStopping(**kwargs)
