"""The loggers' optional libraries: never imported by loopbridge, named when missing."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge.callbacks import TensorBoardLogger, WandbLogger


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make `package` (and its submodules) unimportable for this test."""
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_import_loopbridge_imports_no_logger_library() -> None:
    """`import loopbridge` and its callbacks load none of tensorboard, wandb, tqdm."""
    code = (
        "import sys, loopbridge, loopbridge.callbacks\n"
        "heavy = ('tensorboard', 'wandb', 'tqdm', 'google_crc32c', 'ipywidgets', 'numpy')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("package", "make", "extra"),
    [
        ("tensorboard", TensorBoardLogger, "loopbridge[tensorboard]"),
        ("wandb", lambda tmp: WandbLogger("p", mode="offline", dir=tmp), "loopbridge[wandb]"),
    ],
)
def test_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, package: str, make: Any, extra: str
) -> None:
    """Without the library, the run fails at train start with MissingExtraError naming it."""
    hide(monkeypatch, package)
    loop = lb.TrainLoop(
        lambda state, batch: {"loss": 1.0},
        range(3),
        out_dir=tmp_path / "run",
        callbacks=[make(tmp_path)],
    )
    with pytest.raises(lb.MissingExtraError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        loop.run()


def test_tensorboard_dir_that_cannot_be_made_is_reported(tmp_path: Path) -> None:
    """A log_dir that is a file: the open fails by name and the rows count as a loss."""
    blocker = tmp_path / "tb"
    blocker.write_text("not a directory")
    loop = lb.TrainLoop(
        lambda state, batch: {"loss": 1.0},
        range(5),
        out_dir=tmp_path / "run",
        callbacks=[TensorBoardLogger(blocker)],
        on_drain_failure="warn",
    )
    report = loop.run().drain_report
    assert report is not None
    assert [r.name for r in report.failed] == ["TensorBoardLogger.open"]
    assert sum(loss.count for loss in report.losses) == 5
    assert "did not open" in report.losses[0].detail


def test_wandb_init_that_hangs_fails_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wandb.init that never returns: its task fails at init_timeout; rows are a loss."""
    import wandb

    release = threading.Event()

    def hung_init(**kwargs: Any) -> None:
        release.wait(60)

    monkeypatch.setattr(wandb, "init", hung_init)
    loop = lb.TrainLoop(
        lambda state, batch: {"loss": 1.0},
        range(4),
        out_dir=tmp_path / "run",
        callbacks=[WandbLogger("p", mode="offline", dir=tmp_path, init_timeout=0.5)],
        on_drain_failure="warn",
    )
    try:
        report = loop.run().drain_report
    finally:
        release.set()
    assert report is not None
    (failed,) = report.failed
    assert failed.name == "WandbLogger.open"
    assert isinstance(failed.exception, TimeoutError)
    assert "init for run 'run' did not return within 0.5 s" in str(failed.exception)
    assert sum(loss.count for loss in report.losses) == 4
