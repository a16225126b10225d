"""Checkpoint snapshots: hard links (or copies) that survive the framework deleting the original."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from loopbridge import ManifestRow
from loopbridge.callbacks._snapshot import (
    SNAPSHOT_DIR,
    SnapshotHolders,
    release_linked_snapshot,
    release_snapshot,
    snapshot_of,
    take_snapshot,
)


def _row(path: Path, step: int = 3) -> ManifestRow:
    return ManifestRow(step=step, path=path, size_bytes=0, digest=None, created_at=0.0)


def _shards(path: Path) -> None:
    (path / "nested").mkdir(parents=True)
    (path / "a.bin").write_bytes(b"a" * 100)
    (path / "nested" / "b.json").write_bytes(b"{}")


class TestTake:
    def test_a_file_is_hard_linked_next_to_it(self, tmp_path: Path) -> None:
        """The snapshot keeps the name, shares the inode, and lies under .loopbridge-snapshots."""
        original = tmp_path / "epoch=0-step=3.ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        assert snap.name == original.name
        assert snap.parent.parent == tmp_path / SNAPSHOT_DIR
        assert snap.stat().st_ino == original.stat().st_ino
        assert snapshot_of(snap) == snap.parent

    def test_deleting_the_original_leaves_the_snapshot(self, tmp_path: Path) -> None:
        """Rotation deletes the original; the snapshot still has every byte."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights" * 100)
        snap = take_snapshot(_row(original)).path
        original.unlink()
        assert snap.read_bytes() == b"weights" * 100

    def test_rewriting_the_original_in_place_shows_in_the_snapshot(self, tmp_path: Path) -> None:
        """A hard link shares the inode, so the upload's digest check sees an in-place rewrite."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"first")
        snap = take_snapshot(_row(original)).path
        with original.open("r+b") as fh:
            fh.write(b"SECON")
        assert snap.read_bytes() == b"SECON"

    def test_a_directory_is_mirrored_file_by_file(self, tmp_path: Path) -> None:
        """Every shard is linked at the same relative path; the original can then go."""
        original = tmp_path / "checkpoint-5"
        _shards(original)
        snap = take_snapshot(_row(original, 5)).path
        rels = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        assert rels == ["a.bin", "nested/b.json"]
        for path in sorted(original.rglob("*"), reverse=True):
            if path.is_file():
                path.unlink()
            else:
                path.rmdir()
        assert (snap / "a.bin").read_bytes() == b"a" * 100

    def test_a_refused_link_falls_back_to_a_copy(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another filesystem (EXDEV) gets a copy: its own inode, the same bytes."""

        def refuse(src: object, dst: object) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", refuse)
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        assert snap.read_bytes() == b"weights"
        assert snap.stat().st_ino != original.stat().st_ino

    def test_a_missing_checkpoint_is_logged_and_its_row_kept(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Nothing to snapshot: the row comes back unchanged, a warning says why."""
        row = _row(tmp_path / "gone")
        with caplog.at_level(logging.WARNING):
            assert take_snapshot(row) is row
        assert "no snapshot of" in caplog.text
        assert not any((tmp_path / SNAPSHOT_DIR).rglob("*"))


class TestHoldersMadeAhead:
    """The next snapshot's directory, made off the training thread after each checkpoint."""

    @staticmethod
    def _snapshot_then_one_ahead(
        tmp_path: Path, name: str = "ckpt", data: bytes = b"weights", step: int = 3
    ) -> tuple[SnapshotHolders, Path, Path]:
        """A checkpoint written and snapshotted, and the next one's directory made ahead."""
        holders = SnapshotHolders()
        original = tmp_path / name
        original.write_bytes(data)
        snap = take_snapshot(_row(original, step), holders=holders).path
        holders.prepare_after(snap)
        return holders, original, snap

    def test_the_next_snapshot_goes_into_the_directory_made_ahead(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        holders, _, snap = self._snapshot_then_one_ahead(tmp_path, "ckpt-1", b"one", 1)
        ahead = [p for p in (tmp_path / SNAPSHOT_DIR).iterdir() if p != snap.parent]
        assert len(ahead) == 1
        assert not any(ahead[0].iterdir())
        second = tmp_path / "ckpt-2"
        second.write_bytes(b"two")
        made: list[object] = []
        real_mkdir = Path.mkdir

        def spy(self: Path, *args: object, **kwargs: object) -> None:
            made.append(self)
            real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "mkdir", spy)
        snap2 = take_snapshot(_row(second, 2), holders=holders).path
        assert made == []  # a link only
        assert snap2 == ahead[0] / "ckpt-2"
        assert snap2.read_bytes() == b"two"
        assert holders.take(tmp_path) is None  # used up

    def test_each_checkpoint_dir_gets_its_own(self, tmp_path: Path) -> None:
        holders = SnapshotHolders()
        snaps = {}
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "ckpt").write_bytes(name.encode())
            snaps[name] = take_snapshot(_row(tmp_path / name / "ckpt"), holders=holders).path
            holders.prepare_after(snaps[name])
            holders.prepare_after(snaps[name])  # a second call makes no second directory
        for name in ("a", "b"):
            ahead = holders.take(tmp_path / name)
            assert ahead is not None
            assert ahead.parent == tmp_path / name / SNAPSHOT_DIR
            assert sorted((tmp_path / name / SNAPSHOT_DIR).iterdir()) == sorted(
                [ahead, snaps[name].parent]
            )

    def test_a_directory_made_ahead_then_removed_is_made_again(self, tmp_path: Path) -> None:
        """Someone cleaned `.loopbridge-snapshots` by hand: the snapshot is still taken."""
        holders = SnapshotHolders()
        first = tmp_path / "ckpt-1"
        first.write_bytes(b"one")
        release_snapshot(take_snapshot(_row(first, 1), holders=holders).path)
        holders.prepare_after(tmp_path / SNAPSHOT_DIR / "x" / "ckpt-1")
        for path in sorted((tmp_path / SNAPSHOT_DIR).rglob("*"), reverse=True):
            path.rmdir()
        second = tmp_path / "ckpt-2"
        second.write_bytes(b"two")
        snap = take_snapshot(_row(second, 2), holders=holders).path
        assert snapshot_of(snap) is not None
        assert snap.read_bytes() == b"two"
        assert snap.stat().st_ino == second.stat().st_ino

    def test_a_checkpoint_gone_before_its_snapshot_still_gets_its_row_back(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With a directory made ahead too: nothing left behind, a warning says why."""
        holders, _, snap = self._snapshot_then_one_ahead(tmp_path, "ckpt-1", b"one", 1)
        release_snapshot(snap)
        row = _row(tmp_path / "gone", 2)
        with caplog.at_level(logging.WARNING):
            assert take_snapshot(row, holders=holders) is row
        assert "no snapshot of" in caplog.text
        assert not (tmp_path / SNAPSHOT_DIR).exists()

    def test_discard_leaves_no_directory_behind(self, tmp_path: Path) -> None:
        """After the last release and the discard, `.loopbridge-snapshots` is gone."""
        holders, original, snap = self._snapshot_then_one_ahead(tmp_path)
        assert release_linked_snapshot(snap)
        assert (tmp_path / SNAPSHOT_DIR).exists()  # the directory made ahead is in it
        holders.discard()
        assert not (tmp_path / SNAPSHOT_DIR).exists()
        assert original.read_bytes() == b"weights"

    def test_a_release_beside_a_directory_made_ahead_tries_no_rmdir_of_the_parent(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The parent cannot be empty then: the system call, which gives up the GIL, is
        skipped."""
        holders = SnapshotHolders()
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original), holders=holders).path
        assert not holders.beside(snap)
        holders.prepare_after(snap)
        assert holders.beside(snap)
        removed: list[str] = []
        real_rmdir = os.rmdir

        def spy(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
            removed.append(os.fspath(path))
            real_rmdir(path)

        monkeypatch.setattr(os, "rmdir", spy)
        assert release_linked_snapshot(snap, keep_parent=holders.beside(snap))
        assert removed == [os.fspath(snap.parent)]

    def test_discard_keeps_snapshots_still_held(self, tmp_path: Path) -> None:
        """A snapshot kept for a journaled retry stays; only the directory made ahead goes."""
        holders, _, snap = self._snapshot_then_one_ahead(tmp_path)
        holders.discard()
        assert list((tmp_path / SNAPSHOT_DIR).iterdir()) == [snap.parent]
        assert snap.read_bytes() == b"weights"


class TestRelease:
    def test_release_removes_the_snapshot_only(self, tmp_path: Path) -> None:
        """The snapshot's directory goes; the original stays."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        release_snapshot(snap)
        assert not snap.parent.exists()
        assert original.read_bytes() == b"weights"
        release_snapshot(snap)  # twice is harmless

    def test_a_path_that_is_no_snapshot_is_left_alone(self, tmp_path: Path) -> None:
        """A checkpoint the uploader did not snapshot is never deleted."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        release_snapshot(original)
        assert original.exists()
        assert snapshot_of(original) is None
        assert os.path.exists(original)


class TestReleaseLinked:
    """The quick release, on the bridge's loop: only a file whose bytes stay linked elsewhere."""

    def test_a_file_still_linked_is_released_inline(self, tmp_path: Path) -> None:
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        assert release_linked_snapshot(snap)
        assert not snap.parent.exists()
        assert not (tmp_path / SNAPSHOT_DIR).exists()
        assert original.read_bytes() == b"weights"
        assert release_linked_snapshot(snap)  # twice is harmless

    def test_the_last_link_is_left_to_the_thorough_release(self, tmp_path: Path) -> None:
        """The framework deleted its file: removing the snapshot frees the bytes, in a thread."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        original.unlink()
        assert not release_linked_snapshot(snap)
        assert snap.read_bytes() == b"weights"
        release_snapshot(snap)
        assert not snap.parent.exists()

    def test_a_copied_snapshot_is_left_to_the_thorough_release(self, tmp_path: Path) -> None:
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original), link=False).path
        assert not release_linked_snapshot(snap)
        assert snap.exists()

    def test_a_directory_is_left_to_the_thorough_release(self, tmp_path: Path) -> None:
        original = tmp_path / "ckpt"
        _shards(original)
        snap = take_snapshot(_row(original)).path
        assert not release_linked_snapshot(snap)
        assert (snap / "a.bin").exists()

    def test_a_holder_with_more_in_it_is_left_to_the_thorough_release(self, tmp_path: Path) -> None:
        """The file goes, the holder stays; the thorough release then clears the holder."""
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        snap = take_snapshot(_row(original)).path
        (snap.parent / "stray").write_bytes(b"")
        assert not release_linked_snapshot(snap)
        release_snapshot(snap)
        assert not snap.parent.exists()
        assert original.exists()

    def test_a_path_that_is_no_snapshot_is_left_alone(self, tmp_path: Path) -> None:
        original = tmp_path / "ckpt"
        original.write_bytes(b"weights")
        assert release_linked_snapshot(original)
        assert original.exists()
