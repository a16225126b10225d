"""A re-run in a used out dir: refused before its first step, or continued with start_step.

A checkpoint is only what this run's `save` wrote: an earlier run's file at the same path is
removed before `save` is called, rows past `start_step` are superseded rather than duplicated,
and the remote manifest follows the new history.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge._exceptions import OutDirInUseError
from loopbridge._types import LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks import CheckpointUploader
from loopbridge.journal import JOURNAL_FILE, UploadJournal


def _step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    return {"loss": float(state.step)}


def _save(tag: str) -> Callable[[LoopState, Path], None]:
    def save(state: LoopState, path: Path) -> None:
        path.write_bytes(f"{tag} step {state.step}".encode())

    return save


def _loop(out_dir: Path, *, steps: int, start_step: int = 0, **options: Any) -> lb.TrainLoop:
    options.setdefault("save", _save("first"))
    return lb.TrainLoop(
        _step,
        range(steps),
        max_steps=start_step + steps,
        out_dir=out_dir,
        checkpoint_every=1,
        start_step=start_step,
        run_name="run",
        **options,
    )


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


class Recorder(lb.Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_start(self, state: LoopState) -> None:
        self.calls.append("on_train_start")

    def on_step_end(self, state: LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.calls.append("on_step_end")


class TestRefused:
    @pytest.mark.parametrize(
        "leftover", ["metrics.jsonl", "manifest.jsonl", "checkpoints/step-00000001"]
    )
    def test_a_run_from_step_0_in_a_used_out_dir_is_refused_before_anything(
        self, tmp_path: Path, leftover: str
    ) -> None:
        """Any trace of an earlier run refuses a new one, naming the out dir and the fix."""
        out = tmp_path / "out"
        (out / leftover).parent.mkdir(parents=True, exist_ok=True)
        (out / leftover).write_text('{"step": 1}\n')
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        recorder = Recorder()
        stepped: list[int] = []

        def step(state: LoopState, batch: TrainingBatch) -> None:
            stepped.append(state.step)

        loop = lb.TrainLoop(step, range(3), out_dir=out, callbacks=[recorder])
        with pytest.raises(OutDirInUseError) as caught:
            loop.run()
        message = str(caught.value)
        assert str(out) in message
        assert "new out_dir" in message
        assert "start_step=N" in message
        assert isinstance(caught.value, FileExistsError)
        assert stepped == []
        assert recorder.calls == []
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    def test_an_out_dir_with_empty_files_only_is_not_used(self, tmp_path: Path) -> None:
        """A run that crashed before its first row left nothing to duplicate."""
        out = tmp_path / "out"
        (out / "checkpoints").mkdir(parents=True)
        (out / "metrics.jsonl").write_text("")
        (out / "manifest.jsonl").write_text("")
        artifacts = _loop(out, steps=2).run()
        assert _steps(out / "metrics.jsonl") == [1, 2]
        assert [row.step for row in artifacts.manifest] == [1, 2]

    def test_the_same_out_dir_for_every_repeat_fails_the_later_runs(self, tmp_path: Path) -> None:
        """An Experiment that gives its runs one out dir: the second run is refused, named."""
        shared = tmp_path / "shared"
        experiment = lb.Experiment(
            "exp",
            {"a": {}},
            lambda ctx: lb.TrainLoop(_step, range(2), out_dir=shared),
            n_repeats=2,
        )
        result = experiment.run()
        first, second = result.arms["a"].runs
        assert first.status is lb.RunStatus.COMPLETED
        assert second.status is lb.RunStatus.FAILED
        assert isinstance(second.error, OutDirInUseError)
        assert "ctx.run_name" in str(second.error)
        assert _steps(shared / "metrics.jsonl") == [1, 2]


class TestContinued:
    def test_rows_past_start_step_are_superseded_not_duplicated(self, tmp_path: Path) -> None:
        """Run to step 4, continue from 2 to 5: every step appears once, from the right run."""
        out = tmp_path / "out"
        _loop(out, steps=4).run()
        artifacts = _loop(out, steps=3, start_step=2, save=_save("second")).run()
        assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5]
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert [row["step"] for row in manifest] == [1, 2, 3, 4, 5]
        assert [row.step for row in artifacts.manifest] == [3, 4, 5]
        for row in artifacts.manifest:
            assert row.path.read_bytes() == f"second step {row.step}".encode()
        assert (out / "checkpoints" / "step-00000002").read_bytes() == b"first step 2"

    def test_a_save_that_writes_nothing_never_passes_off_a_stale_file(self, tmp_path: Path) -> None:
        """The earlier run's file at the path is gone before save runs, so the check holds."""
        out = tmp_path / "out"
        _loop(out, steps=3).run()
        seen: list[bool] = []

        def save_nothing(state: LoopState, path: Path) -> None:
            seen.append(path.exists())

        remote = tmp_path / "remote"
        uploader = CheckpointUploader(str(remote))
        loop = _loop(out, steps=1, start_step=1, save=save_nothing, callbacks=[uploader])
        with pytest.raises(FileNotFoundError, match="save\\(\\) returned without writing"):
            loop.run()
        assert seen == [False]
        assert not (remote / "run" / "step-00000002").exists()

    def test_a_stale_directory_checkpoint_is_removed_before_save(self, tmp_path: Path) -> None:
        """Shards an earlier run left do not mix with this run's."""
        out = tmp_path / "out"

        def save_dir(tag: str, names: tuple[str, ...]) -> Callable[[LoopState, Path], None]:
            def save(state: LoopState, path: Path) -> None:
                path.mkdir(exist_ok=True)
                for name in names:
                    (path / name).write_text(tag)

            return save

        _loop(out, steps=2, save=save_dir("first", ("a", "b"))).run()
        artifacts = _loop(out, steps=1, start_step=1, save=save_dir("second", ("a",))).run()
        (row,) = artifacts.manifest
        assert sorted(p.name for p in row.path.iterdir()) == ["a"]
        assert (row.path / "a").read_text() == "second"

    def test_the_remote_history_follows_the_continued_run(self, tmp_path: Path) -> None:
        """Published steps past start_step are superseded remotely; latest moves back."""
        out, remote = tmp_path / "out", tmp_path / "remote"
        _loop(out, steps=5, callbacks=[CheckpointUploader(str(remote))]).run()
        second = CheckpointUploader(str(remote))
        artifacts = _loop(
            out, steps=1, start_step=2, save=_save("second"), callbacks=[second]
        ).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        manifest = json.loads((remote / "run" / "manifest.json").read_text())
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 2, 3]
        assert json.loads((remote / "run" / "latest").read_text())["step"] == 3
        assert sorted(p.name for p in (remote / "run").glob("step-*")) == [
            "step-00000001",
            "step-00000002",
            "step-00000003",
        ]
        step3 = remote / "run" / "step-00000003" / "step-00000003"
        assert step3.read_bytes() == b"second step 3"

    def test_open_uploads_past_start_step_are_withdrawn_not_resumed(self, tmp_path: Path) -> None:
        """An earlier process's unfinished uploads of superseded steps never publish."""
        out, remote = tmp_path / "out", tmp_path / "remote"
        _loop(out, steps=4).run()
        rows = [
            ManifestRow.from_json(json.loads(line))
            for line in (out / "manifest.jsonl").read_text().splitlines()
        ]
        with UploadJournal(out / JOURNAL_FILE) as journal:
            for row in rows:
                journal.record_intent(remote.as_uri(), "run", row)
        uploader = CheckpointUploader(remote.as_uri())
        artifacts = _loop(
            out, steps=1, start_step=2, save=_save("second"), callbacks=[uploader]
        ).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        with UploadJournal(out / JOURNAL_FILE) as journal:
            assert journal.open_intents() == []
            assert sorted(i.row.step for i in journal.intents()) == [1, 2, 3]
        manifest = json.loads((remote / "run" / "manifest.json").read_text())
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 2, 3]
        step3 = remote / "run" / "step-00000003" / "step-00000003"
        assert step3.read_bytes() == b"second step 3"

    def test_continual_stages_in_one_out_dir_carry_on(self, tmp_path: Path) -> None:
        """Stages that share an out dir and continue from the previous stage are valid."""
        shared = tmp_path / "shared"

        def build(ctx: lb.LogContext) -> lb.TrainLoop:
            start = ctx.resume_from.step if ctx.resume_from is not None else 0
            return _loop(shared, steps=2, start_step=start)

        result = lb.Experiment("exp", {"a": {}}, build, stages=[{}, {}, {}]).run()
        assert [run.status for run in result.arms["a"].runs] == [lb.RunStatus.COMPLETED] * 3
        assert _steps(shared / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
        assert _steps(shared / "manifest.jsonl") == [1, 2, 3, 4, 5, 6]


class TestOutDirShape:
    """An out_dir that cannot be a directory is refused when the TrainLoop is built."""

    def test_out_dir_that_is_a_file(self, tmp_path: Path) -> None:
        """A file where the out dir should be is named, before any step."""
        target = tmp_path / "out"
        target.write_text("a file")
        with pytest.raises(NotADirectoryError, match=r"out'\) is a regular file, not a directory"):
            lb.TrainLoop(lambda s, b: {}, range(1), out_dir=target)

    def test_out_dir_under_a_file(self, tmp_path: Path) -> None:
        """A file among the out dir's parents is named."""
        blocker = tmp_path / "blocker"
        blocker.write_text("a file")
        with pytest.raises(NotADirectoryError, match=f"{blocker} is a regular file"):
            lb.TrainLoop(lambda s, b: {}, range(1), out_dir=blocker / "runs" / "x")

    def test_a_missing_out_dir_is_created_at_run(self, tmp_path: Path) -> None:
        """A directory that does not exist yet is fine, and created when the run starts."""
        out = tmp_path / "new" / "run"
        lb.TrainLoop(lambda s, b: {}, range(1), out_dir=out).run()
        assert (out / "metrics.jsonl").exists()
