"""TensorBoardLogger: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

import loopbridge as lb
from loopbridge.callbacks import TensorBoardLogger

N_STEPS = 12


def loss_at(arm: str, repeat: int, step: int) -> float:
    """The loss a run logs at `step` (steps completed); NaN at step 5."""
    if step == 5:
        return math.nan
    return 1.0 / step + (0.5 if arm == "big" else 0.0) + repeat / 100


def build_loop(tmp_path: Path, *, fail_at: int | None = None) -> Any:
    """A `build(ctx)` for Experiment: a tiny loop with an evaluator and a benchmark."""

    def build(ctx: lb.LogContext) -> lb.TrainLoop:
        arm = ctx.arm_name or ""
        repeat = ctx.repeat_index or 0

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if fail_at is not None and state.step + 1 == fail_at:
                raise RuntimeError("diverged")
            return {"loss": loss_at(arm, repeat, state.step + 1), "lr": 0.1}

        def evaluate(state: lb.LoopState) -> dict[str, float]:
            return {"acc": state.step / N_STEPS}

        return lb.TrainLoop(
            step,
            range(N_STEPS),
            max_steps=N_STEPS,
            out_dir=tmp_path / "out" / (ctx.run_name or "run"),
            evaluators={"val": evaluate},
            eval_every=6,
            benchmarks={"qa": bench},
        )

    return build


def bench(state: lb.LoopState) -> tuple[lb.EvalResult, list[dict[str, Any]]]:
    """A benchmark with a breakdown and a tag."""
    result = lb.EvalResult(
        "qa", {"score": state.step / 100}, {"hard": {"score": 0.25}}, {"dataset": "toy"}
    )
    return result, [{"id": i, "pred": f"p{i}"} for i in range(3)]


def load(run_dir: Path) -> ea.EventAccumulator:
    """Every event of a run directory, nothing sampled away."""
    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def points(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points of a scalar tag, in file order."""
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Equal point lists at float32 precision, NaN equal to NaN."""
    return len(a) == len(b) and all(
        sa == sb and (math.isclose(va, vb, rel_tol=1e-6) or (math.isnan(va) and math.isnan(vb)))
        for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


class TestExperiment:
    def test_two_arms_two_repeats(self, tmp_path: Path) -> None:
        """Each run's steps once and in order, evals, benchmarks, hparams and status."""
        log_dir = tmp_path / "tb"
        arms = {
            "small": {"model": {"width": 64}, "lr": 0.1},
            "big": {"model": {"width": 256}, "lr": 0.05},
        }
        tb = TensorBoardLogger(log_dir, flush_rows=5)
        exp = lb.Experiment(
            "exp1",
            arms=arms,
            build=build_loop(tmp_path),
            n_repeats=2,
            benchmarks={"qa": bench},
            callbacks=[tb],
        )
        result = exp.run()
        assert result.ok, [r.drain_report for r in result.runs]
        expected_dirs = [log_dir / "exp1" / f"{a}-r{r}" for a in arms for r in range(2)]
        assert tb.run_dirs == expected_dirs
        for arm, config in arms.items():
            for repeat in range(2):
                acc = load(log_dir / "exp1" / f"{arm}-r{repeat}")
                want = [(s, loss_at(arm, repeat, s)) for s in range(1, N_STEPS + 1)]
                got = points(acc, "loss")
                assert same(got, want), got
                assert math.isnan(dict(got)[5])
                assert same(points(acc, "lr"), [(s, 0.1) for s in range(1, N_STEPS + 1)])
                assert points(acc, "eval/val/acc") == [(6, 0.5), (12, 1.0)]
                score = points(acc, "bench/qa/score")
                assert [s for s, _ in score] == [6, 12, 12]
                assert points(acc, "bench/qa/hard/score")[0] == (6, 0.25)
                content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
                start = hparams_metadata.parse_session_start_info_plugin_data(
                    content[hparams_metadata.SESSION_START_INFO_TAG]
                )
                hparams = {k: v.number_value for k, v in start.hparams.items()}
                assert hparams == {"model.width": config["model"]["width"], "lr": config["lr"]}  # type: ignore[index]
                assert start.group_name == f"exp1/{arm}"
                end = hparams_metadata.parse_session_end_info_plugin_data(
                    content[hparams_metadata.SESSION_END_INFO_TAG]
                )
                assert end.status == api_pb2.STATUS_SUCCESS
                tags = acc.Tensors("bench/qa/tags")
                assert b"toy" in tags[0].tensor_proto.string_val[0]

    def test_failed_run_ends_with_failure_status(self, tmp_path: Path) -> None:
        """A run whose step raises keeps the steps before it and ends as STATUS_FAILURE."""
        log_dir = tmp_path / "tb"
        exp = lb.Experiment(
            "exp2",
            arms={"only": {"lr": 1.0}},
            build=build_loop(tmp_path, fail_at=4),
            callbacks=[TensorBoardLogger(log_dir)],
        )
        result = exp.run()
        assert [r.status for r in result.runs] == [lb.RunStatus.FAILED]
        acc = load(log_dir / "exp2" / "only")
        assert [s for s, _ in points(acc, "loss")] == [1, 2, 3]
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        end = hparams_metadata.parse_session_end_info_plugin_data(
            content[hparams_metadata.SESSION_END_INFO_TAG]
        )
        assert end.status == api_pb2.STATUS_FAILURE


class TestPlainLoop:
    def test_plain_loop_and_a_second_run_of_the_same_name(self, tmp_path: Path) -> None:
        """A TrainLoop writes <log_dir>/<run>; the same name again goes to <run>.2."""
        log_dir = tmp_path / "tb"
        for attempt in range(2):
            tb = TensorBoardLogger(log_dir, flush_interval_s=60)
            loop = lb.TrainLoop(
                lambda state, batch: {"loss": float(batch.data)},
                range(2500),
                # Two out dirs (a used one is refused), one run name: both are "solo".
                out_dir=tmp_path / f"attempt-{attempt}" / "solo",
                config={"opt": {"name": "adam"}},
                callbacks=[tb],
            )
            artifacts = loop.run()
            assert artifacts.drain_report is not None
            assert artifacts.drain_report.ok
        assert sorted(p.name for p in log_dir.iterdir()) == ["solo", "solo.2"]
        for name in ("solo", "solo.2"):
            acc = load(log_dir / name)
            assert points(acc, "loss") == [(s, float(s - 1)) for s in range(1, 2501)]

    def test_plain_loop_that_raises_is_closed_as_failed(self, tmp_path: Path) -> None:
        """The bridge's close writes the buffered rows and the failure status."""

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if state.step == 3:
                raise RuntimeError("diverged")
            return {"loss": 1.0}

        log_dir = tmp_path / "tb"
        loop = lb.TrainLoop(
            step, range(10), out_dir=tmp_path / "r", callbacks=[TensorBoardLogger(log_dir)]
        )
        with pytest.raises(RuntimeError, match="diverged"):
            loop.run()
        acc = load(log_dir / "r")
        assert [s for s, _ in points(acc, "loss")] == [1, 2, 3]
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        end = hparams_metadata.parse_session_end_info_plugin_data(
            content[hparams_metadata.SESSION_END_INFO_TAG]
        )
        assert end.status == api_pb2.STATUS_FAILURE


def test_arguments_are_checked() -> None:
    """A non-positive flush interval is refused with the value named."""
    with pytest.raises(ValueError, match="flush_interval_s=0"):
        TensorBoardLogger(flush_interval_s=0)
