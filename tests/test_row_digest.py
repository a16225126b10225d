"""Checkpoint digests off the training thread: who hashes, when `row.digest` is known."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest

import loopbridge as lb
from loopbridge import _digest, _row_digest
from loopbridge._exceptions import IntegrityError
from loopbridge._types import LoopState, ManifestRow
from loopbridge.callbacks import CheckpointUploader


def _save(state: LoopState, path: Path) -> None:
    path.write_bytes(f"weights {state.step}".encode() * 1000)


def _step(state: LoopState, batch: Any) -> dict[str, float]:
    return {"loss": 1.0}


def _blake3(path: Path) -> str:
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


def _loop(tmp_path: Path, *callbacks: lb.Callback) -> lb.TrainLoop:
    return lb.TrainLoop(
        _step,
        range(4),
        max_steps=4,
        out_dir=tmp_path / "out",
        save=_save,
        checkpoint_every=2,
        callbacks=list(callbacks),
        run_name="r",
    )


@pytest.fixture
def hashed_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that hash whole checkpoints (spied, not replaced)."""
    threads: list[str] = []
    real = _digest.digest_path

    def spy(path: Path) -> tuple[int, str]:
        threads.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(_row_digest, "digest_path", spy)
    return threads


def _manifest(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


class TestWithoutUploader:
    def test_hashed_on_a_background_thread_and_written_to_the_manifest(
        self, tmp_path: Path, hashed_on: list[str]
    ) -> None:
        """No uploader: each checkpoint is hashed once, off the training thread."""
        seen: list[ManifestRow] = []

        class Keep(lb.Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                seen.append(row)

        artifacts = _loop(tmp_path, Keep()).run()
        assert len(hashed_on) == len(seen) == 2
        assert threading.current_thread().name not in hashed_on
        for row, line in zip(seen, _manifest(tmp_path), strict=True):
            assert row.digest == _blake3(row.path) == line["digest"]
        assert artifacts.final_checkpoint is not None
        assert artifacts.final_checkpoint.digest == _blake3(artifacts.final_checkpoint.path)

    def test_a_hook_that_needs_the_digest_waits_for_it(self, tmp_path: Path) -> None:
        """`wait_digest` in on_checkpoint gives the digest of what was saved."""
        got: list[str | None] = []

        class Needs(lb.Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                got.append(row.wait_digest(timeout=10))

        _loop(tmp_path, Needs()).run()
        assert got == [line["digest"] for line in _manifest(tmp_path)]
        assert all(d is not None and d.startswith("blake3:") for d in got)

    def test_a_checkpoint_changed_after_save_gets_no_digest(self, tmp_path: Path) -> None:
        """A rewrite between save and hashing is refused, not hashed as if it were saved."""
        path = tmp_path / "ckpt"
        path.write_bytes(b"original")
        row = ManifestRow.for_checkpoint(path, step=1)
        assert row.digest is None
        path.write_bytes(b"tampered")
        with pytest.raises(IntegrityError, match="modified after it was saved"):
            row.wait_digest(timeout=10)

    def test_hashing_off_means_no_digest(self, tmp_path: Path) -> None:
        """digest=False rows carry the size and never a digest."""
        path = tmp_path / "ckpt"
        path.write_bytes(b"abc")
        row = ManifestRow.for_checkpoint(path, step=1, digest=False)
        assert (row.size_bytes, row.wait_digest(timeout=1)) == (3, None)

    def test_rows_built_by_hand_compare_equal_whatever_their_digest(self) -> None:
        """A row read back from manifest.jsonl before its digest was known equals the row."""
        a = ManifestRow(step=1, path=Path("x"), size_bytes=1, digest=None, created_at=1.0)
        b = ManifestRow(step=1, path=Path("x"), size_bytes=1, digest="sha256:00", created_at=1.0)
        assert a == b
        assert hash(a) == hash(b)


class TestWithUploader:
    def test_the_upload_pass_is_the_only_hashing(
        self, tmp_path: Path, hashed_on: list[str]
    ) -> None:
        """With an uploader the digest comes from the bytes read for upload: no second pass."""
        remote = tmp_path / "remote"
        artifacts = _loop(tmp_path, CheckpointUploader(str(remote))).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok
        assert hashed_on == []
        lines = _manifest(tmp_path)
        assert [line["digest"] for line in lines] == [_blake3(Path(line["path"])) for line in lines]
        marker = json.loads((remote / "r" / "step-00000004" / "_COMPLETE").read_text())
        assert marker["digest"] == lines[-1]["digest"]


def test_rows_with_a_pending_digest_copy_and_pickle(tmp_path: Path) -> None:
    """asdict, deepcopy and pickle work on a fresh row; a pickled row carries what is known."""
    import copy
    import dataclasses
    import pickle

    path = tmp_path / "ckpt"
    path.write_bytes(b"abc")
    row = ManifestRow.for_checkpoint(path, step=1)
    assert dataclasses.asdict(row)["digest"] is None
    assert copy.deepcopy(row) == row
    assert pickle.loads(pickle.dumps(row)).wait_digest() is None
    digest = row.wait_digest(timeout=10)
    assert digest == _blake3(path)
    assert pickle.loads(pickle.dumps(row)).digest == digest


class TestFollowSnapshot:
    """A pending digest reads the snapshot only when it holds the bytes stamped at save time."""

    @staticmethod
    def _saved(tmp_path: Path) -> tuple[Path, _row_digest.PendingDigest, Path]:
        """A checkpoint just saved, its pending digest, and where its snapshot will go."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        row = ManifestRow.for_checkpoint(original, step=1)
        assert row._pending is not None
        snap = tmp_path / "snap" / "ckpt"
        snap.parent.mkdir()
        return original, row._pending, snap

    def test_a_link_to_the_unchanged_file_is_followed(self, tmp_path: Path) -> None:
        original, pending, snap = self._saved(tmp_path)
        stamps = pending.stamps
        snap.hardlink_to(original)
        pending.follow(snap)
        assert pending.path == snap
        assert pending.stamps == stamps

    def test_a_copy_of_the_unchanged_file_is_followed_with_its_own_stamps(
        self, tmp_path: Path
    ) -> None:
        _, pending, snap = self._saved(tmp_path)
        snap.write_bytes(b"weights")
        pending.follow(snap)
        assert pending.path == snap
        assert pending.stamps == _row_digest.stamp_path(snap)

    @pytest.mark.parametrize("how", ["rewritten in place", "replaced", "deleted"])
    def test_a_file_changed_before_its_snapshot_is_not_followed(
        self, tmp_path: Path, how: str
    ) -> None:
        """The upload keeps checking the original, which then reports the change."""
        import os

        original, pending, snap = self._saved(tmp_path)
        if how == "rewritten in place":
            original.write_bytes(b"WEIGHTS")
            os.utime(original, ns=(1, 1))
            snap.hardlink_to(original)
        elif how == "replaced":  # a new inode of the same size and mtime
            stamp = pending.stamps[0]
            fresh = tmp_path / "fresh"
            fresh.write_bytes(b"WEIGHTS")
            os.utime(fresh, ns=(stamp.mtime_ns, stamp.mtime_ns))
            fresh.replace(original)
            snap.hardlink_to(original)
        else:
            snap.write_bytes(b"weights")
            original.unlink()
        pending.follow(snap)
        assert pending.path == original
        assert pending.changed() is not None
