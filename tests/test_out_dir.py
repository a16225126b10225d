"""An out_dir that cannot be a directory is refused when the TrainLoop is built."""

from __future__ import annotations

from pathlib import Path

import pytest

import loopbridge as lb


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    """A file where the out dir should be is named, before any step."""
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"out'\) is a regular file, not a directory"):
        lb.TrainLoop(lambda s, b: {}, range(1), out_dir=target)


def test_out_dir_under_a_file(tmp_path: Path) -> None:
    """A file among the out dir's parents is named."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a regular file"):
        lb.TrainLoop(lambda s, b: {}, range(1), out_dir=blocker / "runs" / "x")


def test_a_missing_out_dir_is_created_at_run(tmp_path: Path) -> None:
    """A directory that does not exist yet is fine, and created when the run starts."""
    out = tmp_path / "new" / "run"
    lb.TrainLoop(lambda s, b: {}, range(1), out_dir=out).run()
    assert (out / "metrics.jsonl").exists()
