"""`TrainLoop(resume_from=..., load=...)` and `Experiment(resume_from=...)`, on a local store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge._loop_restore import RESTORED_DIR
from tests.restore_helpers import Dest


class Counter:
    """A model whose whole state is a running sum of the steps it took."""

    def __init__(self) -> None:
        self.total = 0
        self.loaded: list[Path] = []

    def step(self, state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        self.total += state.step + 1
        return {"total": float(self.total)}

    def save(self, state: lb.LoopState, path: Path) -> None:
        path.write_text(json.dumps({"total": self.total, "step": state.step}))

    def load(self, state: lb.LoopState, path: Path) -> None:
        saved = json.loads(path.read_text())
        assert saved["step"] == state.step
        self.total = saved["total"]
        self.loaded.append(path)


def _loop(
    model: Counter, out: Path, max_steps: int, callbacks: list[lb.Callback], **kwargs: Any
) -> lb.TrainLoop:
    return lb.TrainLoop(
        model.step,
        range(100),
        max_steps=max_steps,
        out_dir=out,
        save=model.save,
        load=model.load,
        checkpoint_every=3,
        callbacks=callbacks,
        run_name="r",
        **kwargs,
    )


def _sum_to(n: int) -> int:
    return n * (n + 1) // 2


@pytest.fixture
def dest(tmp_path: Path) -> Dest:
    return Dest(url=str(tmp_path / "store"), root=tmp_path / "store")


class TestArguments:
    def test_resume_from_needs_load(self, tmp_path: Path) -> None:
        """resume_from without load= is refused, naming load."""
        with pytest.raises(ValueError, match=r"needs load=fn\(state, path\)"):
            lb.TrainLoop(lambda s, b: None, [], out_dir=tmp_path, resume_from="auto")

    def test_resume_from_and_start_step_exclude_each_other(self, tmp_path: Path) -> None:
        """resume_from finds the step itself, so start_step with it is refused."""
        with pytest.raises(ValueError, match=r"both resume_from and start_step=3"):
            lb.TrainLoop(
                lambda s, b: None,
                [],
                out_dir=tmp_path,
                resume_from="auto",
                load=lambda s, p: None,
                start_step=3,
            )

    def test_resume_from_must_be_a_destination(self, tmp_path: Path) -> None:
        """An empty or non-path resume_from is refused with what to give instead."""
        with pytest.raises(ValueError, match=r"give 'auto', the uploader's destination"):
            lb.TrainLoop(
                lambda s, b: None, [], out_dir=tmp_path, resume_from="", load=lambda s, p: None
            )


class TestAuto:
    def test_nothing_to_resume_starts_fresh_and_says_so(
        self, tmp_path: Path, dest: Dest, caplog: pytest.LogCaptureFixture
    ) -> None:
        """'auto' with no checkpoint anywhere trains from step 0 and logs it."""
        model = Counter()
        with caplog.at_level(logging.INFO, logger="loopbridge.loop"):
            loop = _loop(model, tmp_path / "out", 4, [dest.uploader()], resume_from="auto")
            loop.run()
        assert loop.restored is None
        assert model.total == _sum_to(4)
        assert "no checkpoint to resume from" in caplog.text
        assert "starting fresh" in caplog.text

    def test_new_machine_restores_from_the_uploaders_store(
        self, tmp_path: Path, dest: Dest
    ) -> None:
        """A fresh out dir resumes from the newest published checkpoint, restored locally."""
        first = Counter()
        _loop(first, tmp_path / "one", 7, [dest.uploader()]).run()
        second = Counter()
        loop = _loop(second, tmp_path / "two", 10, [dest.uploader()], resume_from="auto")
        artifacts = loop.run()
        assert loop.restored is not None
        assert loop.restored.step == 7
        assert second.loaded == [
            tmp_path / "two" / RESTORED_DIR / "step-00000007" / "step-00000007"
        ]
        assert second.total == _sum_to(10)
        assert [row.step for row in artifacts.manifest] == [9, 10]
        assert json.loads(dest.read("r/latest"))["step"] == 10

    def test_intact_out_dir_is_used_before_the_store(self, tmp_path: Path, dest: Dest) -> None:
        """Resuming on the same machine loads the out dir's own checkpoint, no download."""
        _loop(Counter(), tmp_path / "out", 6, [dest.uploader()]).run()
        model = Counter()
        loop = _loop(model, tmp_path / "out", 8, [dest.uploader()], resume_from="auto")
        loop.run()
        assert model.loaded == [tmp_path / "out" / "checkpoints" / "step-00000006"]
        assert not (tmp_path / "out" / RESTORED_DIR).exists()
        assert model.total == _sum_to(8)

    def test_damaged_local_checkpoint_falls_back_to_the_store(
        self, tmp_path: Path, dest: Dest
    ) -> None:
        """A local checkpoint that lost its digest is skipped; the store's copy is restored."""
        _loop(Counter(), tmp_path / "out", 6, [dest.uploader()]).run()
        (tmp_path / "out" / "checkpoints" / "step-00000006").write_text("garbage")
        model = Counter()
        _loop(model, tmp_path / "out", 8, [dest.uploader()], resume_from="auto").run()
        assert model.loaded == [tmp_path / "out" / RESTORED_DIR / "step-00000006" / "step-00000006"]
        assert model.total == _sum_to(8)

    def test_without_an_uploader_only_the_out_dir_counts(self, tmp_path: Path) -> None:
        """'auto' with no uploader resumes from the out dir alone."""
        _loop(Counter(), tmp_path / "out", 3, []).run()
        model = Counter()
        _loop(model, tmp_path / "out", 5, [], resume_from="auto").run()
        assert model.total == _sum_to(5)

    def test_used_out_dir_with_nothing_to_resume_is_refused(self, tmp_path: Path) -> None:
        """A fresh start in an out dir an earlier run wrote to is refused, as without resume."""
        lb.TrainLoop(lambda s, b: None, range(2), max_steps=2, out_dir=tmp_path / "out").run()
        with pytest.raises(lb.OutDirInUseError, match="already holds an earlier run"):
            _loop(Counter(), tmp_path / "out", 4, [], resume_from="auto").run()

    def test_resumed_at_max_steps_takes_no_step(self, tmp_path: Path, dest: Dest) -> None:
        """A run that had finished restores its final checkpoint and reports it as final."""
        _loop(Counter(), tmp_path / "one", 6, [dest.uploader()]).run()
        model = Counter()
        loop = _loop(model, tmp_path / "two", 6, [dest.uploader()], resume_from="auto")
        artifacts = loop.run()
        assert artifacts.steps_completed == 6
        assert artifacts.manifest == []
        assert artifacts.final_checkpoint is not None
        assert artifacts.final_checkpoint.step == 6
        assert model.total == _sum_to(6)


class TestExplicitDestination:
    def test_destination_without_an_uploader(self, tmp_path: Path, dest: Dest) -> None:
        """The uploader's destination string finds the run by its name, with no uploader."""
        _loop(Counter(), tmp_path / "one", 4, [dest.uploader()]).run()
        model = Counter()
        _loop(model, tmp_path / "two", 6, [], resume_from=dest.url).run()
        assert model.loaded[0].parent.name == "step-00000004"
        assert model.total == _sum_to(6)

    def test_nothing_at_the_destination_is_an_error(self, tmp_path: Path, dest: Dest) -> None:
        """An explicit destination with no checkpoint of the run fails, listing the runs there."""
        _loop(Counter(), tmp_path / "one", 3, [dest.uploader()]).run()
        loop = lb.TrainLoop(
            Counter().step,
            range(3),
            out_dir=tmp_path / "two",
            load=lambda state, path: None,
            run_name="other",
            resume_from=dest.url,
        )
        with pytest.raises(lb.RestoreError, match=r"no run 'other' .*runs found: r"):
            loop.run()


class TestExperiment:
    def test_stages_resume_per_run_and_pass_the_final_checkpoint_on(
        self, tmp_path: Path, dest: Dest
    ) -> None:
        """Experiment(resume_from='auto'): a finished stage hands its restored final on."""
        seen: dict[str, Any] = {}

        def experiment(root: Path, fail_at: int | None) -> lb.ExperimentResult:
            def build(ctx: lb.LogContext) -> lb.TrainLoop:
                model = Counter()
                if ctx.resume_from is not None:
                    model.total = json.loads(ctx.resume_from.path.read_text())["total"]
                seen[str(ctx.run_name)] = ctx.resume_from

                def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
                    if ctx.stage_index == 1 and state.step == fail_at:
                        raise RuntimeError("preempted")
                    return model.step(state, batch)

                return lb.TrainLoop(
                    step,
                    range(100),
                    max_steps=6,
                    out_dir=root / str(ctx.run_name),
                    save=model.save,
                    load=model.load,
                    checkpoint_every=3,
                )

            return lb.Experiment(
                "exp",
                {"arm": {}},
                build,
                stages=[{}, {}],
                callbacks=[dest.uploader()],
                resume_from="auto",
            ).run()

        first = experiment(tmp_path / "m1", fail_at=4)
        assert [run.status for run in first.runs] == [lb.RunStatus.COMPLETED, lb.RunStatus.FAILED]
        seen.clear()
        second = experiment(tmp_path / "m2", fail_at=None)
        assert second.ok
        stage0, stage1 = second.runs
        assert stage0.artifacts is not None
        assert stage0.artifacts.steps_completed == 6
        assert stage0.artifacts.manifest == []
        handed = seen["arm-s1"]
        assert handed is not None
        assert handed.step == 6
        assert handed.path.is_relative_to(tmp_path / "m2" / "arm-s0" / RESTORED_DIR)
        assert stage1.final_metrics["total"] == 2 * _sum_to(6)

    def test_explicit_destination_finds_each_run_by_experiment_and_arm(
        self, tmp_path: Path, dest: Dest
    ) -> None:
        """Without an uploader, each run is found under <experiment>/<arm>/<run>."""
        models: dict[str, Counter] = {}

        def experiment(root: Path, steps: int, **kwargs: Any) -> lb.ExperimentResult:
            def build(ctx: lb.LogContext) -> lb.TrainLoop:
                model = models[str(ctx.run_name)] = Counter()
                return _loop(model, root / str(ctx.run_name), steps, [])

            return lb.Experiment("exp", {"a": {}, "b": {}}, build, n_repeats=2, **kwargs).run()

        assert experiment(tmp_path / "m1", 3, callbacks=[dest.uploader()]).ok
        assert experiment(tmp_path / "m2", 5, resume_from=dest.url).ok
        assert sorted(models) == ["a-r0", "a-r1", "b-r0", "b-r1"]
        for name, model in models.items():
            assert model.loaded[0].parent.parent == tmp_path / "m2" / name / RESTORED_DIR
            assert model.total == _sum_to(5)
        assert dest.keys("exp/b/b-r1/step-00000003/")

    def test_loop_without_load_is_a_failed_run(self, tmp_path: Path) -> None:
        """Experiment(resume_from=...) refuses a loop that cannot load, naming the run."""
        result = lb.Experiment(
            "exp",
            {"arm": {}},
            lambda ctx: lb.TrainLoop(lambda s, b: None, range(2), out_dir=tmp_path / "o"),
            resume_from="auto",
        ).run()
        error = result.runs[0].error
        assert isinstance(error, ValueError)
        assert "run arm's TrainLoop has no load=fn(state, path)" in str(error)
