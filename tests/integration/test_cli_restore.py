"""`loopbridge ls` and `loopbridge download` against moto S3, rclone and a directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.fixtures.s3 import S3Bucket
from tests.restore_helpers import Dest, checkpoint_bytes, publish, shard_saver

from loopbridge.cli import main


@pytest.fixture(params=["local", "s3", "rclone"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Dest:
    if request.param == "local":
        root = tmp_path / "store"
        return Dest(url=str(root), root=root)
    fixture = "s3_bucket" if request.param == "s3" else "rclone_bucket"
    bucket: S3Bucket = request.getfixturevalue(fixture)
    return Dest(
        url=f"s3://{bucket.name}/ckpts", options={"endpoint_url": bucket.endpoint}, bucket=bucket
    )


def _args(dest: Dest) -> list[str]:
    endpoint = dest.options.get("endpoint_url")
    return ["--endpoint-url", endpoint] if endpoint else []


class TestLs:
    def test_lists_runs_steps_latest_and_leftovers(
        self, dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each run with its published steps and sizes, `latest` marked, leftovers flagged."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=4)
        publish(dest, tmp_path / "b", run_name="run-b", steps=2, save=shard_saver)
        dest.write("run-a/step-00000006/step-00000006", checkpoint_bytes(6))
        assert main(["ls", dest.url, *_args(dest)]) == 0
        out = capsys.readouterr().out
        assert ": 2 run(s)" in out
        a, b = out.split("\nrun run-b")
        assert "run run-a" in a
        assert re.search(r"^ +2 +2\.9 KiB +1  published$", a, re.M)
        assert re.search(r"^ +4 +2\.9 KiB +1  published, latest$", a, re.M)
        leftover = r"^ +6 +2\.9 KiB +1  unpublished leftover \(no marker\); never restored$"
        assert re.search(leftover, a, re.M)
        assert re.search(r"^ +2 +5\.6 KiB +3  published, latest$", b, re.M)

    def test_damaged_step_is_flagged(
        self, dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A published step with a file missing is marked DAMAGED, naming the object."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=2, save=shard_saver)
        dest.delete("run-a/step-00000002/model.bin")
        assert main(["ls", dest.url, *_args(dest), "--run", "run-a"]) == 0
        out = capsys.readouterr().out
        assert "published, latest; DAMAGED: run-a/step-00000002/model.bin is missing" in out

    def test_missing_run_is_an_error_listing_the_runs(
        self, dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--run naming nothing exits 1 and lists the runs found."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=2)
        assert main(["ls", dest.url, *_args(dest), "--run", "run-x"]) == 1
        assert "no run 'run-x'" in capsys.readouterr().err

    def test_empty_destination_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing under DEST exits 1 saying so."""
        assert main(["ls", str(tmp_path / "nothing")]) == 1
        assert "no checkpoints under" in capsys.readouterr().err


class TestDownload:
    def test_downloads_latest_and_a_step(
        self, dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The latest step, then an older one, land verified under OUT."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=4)
        out = tmp_path / "dl"
        assert main(["download", dest.url, *_args(dest), "--run", "run-a", str(out)]) == 0
        assert "restored step 4 of run-a" in capsys.readouterr().out
        assert (out / "step-00000004" / "step-00000004").read_bytes() == checkpoint_bytes(4)
        args = ["download", dest.url, *_args(dest), "--run", "run-a", "--step", "2", str(out)]
        assert main(args) == 0
        assert (out / "step-00000002" / "step-00000002").read_bytes() == checkpoint_bytes(2)

    def test_missing_step_run_or_object_exit_1_naming_it(
        self, dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A step, run or object that is not there exits 1 with a message that names it."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=4, save=shard_saver)
        out = str(tmp_path / "dl")
        base = ["download", dest.url, *_args(dest)]
        assert main([*base, "--run", "run-a", "--step", "3", out]) == 1
        assert "step 3 of" in capsys.readouterr().err
        assert main([*base, "--run", "run-q", out]) == 1
        assert "no run 'run-q'" in capsys.readouterr().err
        dest.delete("run-a/step-00000004/opt/state.bin")
        assert main([*base, "--run", "run-a", out]) == 1
        assert "run-a/step-00000004/opt/state.bin is missing" in capsys.readouterr().err
