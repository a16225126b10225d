"""The `loopbridge` command line: --version, and `resume`'s refusals and working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader
from loopbridge.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`loopbridge --version` prints the version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"loopbridge {lb.__version__}"


class TestResumeRefusals:
    """Arguments that cannot work are refused with what to give instead."""

    @pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "-inf", "soon"])
    def test_timeout_must_be_positive_and_finite(
        self, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--timeout takes a positive, finite number of seconds."""
        with pytest.raises(SystemExit) as info:
            main(["resume", str(tmp_path), f"--timeout={value}"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --timeout: expected a positive number of seconds, got {value!r}" in err
        assert "leave --timeout out" in err

    def test_root_and_home_are_refused(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """`resume /` and `resume ~` do not walk the machine; they say what to give."""
        assert main(["resume", "/"]) == 2
        assert "/ is the filesystem root" in capsys.readouterr().err
        monkeypatch.setenv("HOME", str(tmp_path))
        assert main(["resume", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "is your home directory" in err
        assert "Give a run's out dir" in err

    def test_not_a_directory(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A path that is not a directory is named."""
        assert main(["resume", str(tmp_path / "missing")]) == 2
        assert "missing is not a directory" in capsys.readouterr().err


def _save(state: lb.LoopState, path: Path) -> None:
    path.write_bytes(b"weights" * 100)


def test_resume_works_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with a relative out_dir whose uploads failed is resumed from another directory."""
    (tmp_path / "train").mkdir()
    (tmp_path / "elsewhere").mkdir()
    store = tmp_path / "store"
    store.write_text("a file where the store should be: every upload fails")
    monkeypatch.chdir(tmp_path / "train")
    loop = lb.TrainLoop(
        lambda s, b: {"loss": 1.0},
        range(2),
        out_dir="runs/x",  # relative, as the bug report had it
        save=_save,
        checkpoint_every=1,
        callbacks=[CheckpointUploader(store, preflight=False)],
        on_drain_failure="warn",
    )
    loop.run()
    store.unlink()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = main(["resume", "../train/runs"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 open upload(s): 2 published, 0 failed" in out
    assert (store / "x" / "step-00000002" / "step-00000002").read_bytes() == b"weights" * 100


def test_demo_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """`loopbridge demo --help` shows each option's default."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("steps per run (default: 300)", "(default: 64.0)", "(default: loopbridge-demo)"):
        assert shown in out
    assert "(default: None)" not in out
