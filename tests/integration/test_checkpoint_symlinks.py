"""Checkpoints that hold symlinks: every file is uploaded through its links, or the error names it.

A common layout puts shards on a fast disk and links them into the checkpoint directory. The
digest (on the training thread) and the uploader list a directory's files the same way
(`shard_files`), so what is hashed is what is uploaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.fixtures.s3 import S3Bucket

import loopbridge as lb
from loopbridge._digest import digest_path, shard_files, size_of
from loopbridge._exceptions import CheckpointFilesError
from loopbridge._types import LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks import CheckpointUploader

MiB = 1 << 20
RUN = "run-links"


def _step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    return {"loss": 1.0}


def _train(
    tmp_path: Path,
    save: Callable[[LoopState, Path], None],
    uploader: CheckpointUploader,
    callbacks: tuple[lb.Callback, ...] = (),
) -> lb.LoopArtifacts:
    loop = lb.TrainLoop(
        _step,
        range(1),
        max_steps=1,
        out_dir=tmp_path / "out",
        save=save,
        callbacks=[*callbacks, uploader],
        run_name=RUN,
        on_drain_failure="warn",
    )
    return loop.run()


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def _fast_disk(tmp_path: Path) -> Path:
    """Shards written elsewhere, to be linked into the checkpoint."""
    fast = tmp_path / "fast-disk" / "shards"
    _write(fast / "model-0.bin", 6 * MiB)  # multipart with part_size=5 MiB
    _write(fast / "model-1.bin", 1234)
    _write(fast / "deeper" / "opt.bin", 777)
    _write(tmp_path / "fast-disk" / "tokenizer.json", 55)
    return fast


class TestSymlinkedCheckpointsUpload:
    def test_a_symlinked_subdirectory_and_file_upload_every_byte(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Files behind a linked subdirectory and a linked file arrive with sizes and sha256."""
        fast = _fast_disk(tmp_path)

        def save(state: LoopState, path: Path) -> None:
            path.mkdir()
            (path / "config.json").write_bytes(b'{"layers": 2}')
            (path / "shards").symlink_to(fast, target_is_directory=True)
            (path / "tokenizer.json").symlink_to(tmp_path / "fast-disk" / "tokenizer.json")

        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=s3_bucket.endpoint, part_size=5 * MiB
        )
        artifacts = _train(tmp_path, save, uploader)
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        (row,) = artifacts.manifest
        local = {
            "config.json": row.path / "config.json",
            "shards/deeper/opt.bin": fast / "deeper" / "opt.bin",
            "shards/model-0.bin": fast / "model-0.bin",
            "shards/model-1.bin": fast / "model-1.bin",
            "tokenizer.json": tmp_path / "fast-disk" / "tokenizer.json",
        }
        assert row.size_bytes == sum(p.stat().st_size for p in local.values())
        prefix = f"ckpts/{RUN}/step-00000001/"
        listing = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix=prefix)
        sizes = {item["Key"][len(prefix) :]: item["Size"] for item in listing["Contents"]}
        assert sizes == {"_COMPLETE": sizes["_COMPLETE"]} | {
            rel: p.stat().st_size for rel, p in local.items()
        }
        for rel, path in local.items():
            expected = hashlib.sha256(path.read_bytes()).hexdigest()
            assert s3_bucket.sha256(prefix + rel) == expected, rel
        marker = json.loads(s3_bucket.read(prefix + "_COMPLETE"))
        assert marker["digest"] == row.digest == digest_path(row.path)[1]
        assert sorted(f["path"] for f in marker["files"]) == sorted(local)

    def test_two_links_to_one_directory_are_not_a_loop(self, tmp_path: Path) -> None:
        """The same directory linked twice (not an ancestor) is listed under both names."""
        fast = _fast_disk(tmp_path)
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        (checkpoint / "a").symlink_to(fast)
        (checkpoint / "b").symlink_to(fast)
        rels = [p.relative_to(checkpoint).as_posix() for p in shard_files(checkpoint)]
        assert rels == [
            "a/deeper/opt.bin",
            "a/model-0.bin",
            "a/model-1.bin",
            "b/deeper/opt.bin",
            "b/model-0.bin",
            "b/model-1.bin",
        ]


def _loop_to_parent(path: Path) -> str:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "a.bin").write_bytes(b"a")
    (path / "sub" / "back").symlink_to(path, target_is_directory=True)
    return "sub/back"


def _self_link(path: Path) -> str:
    path.mkdir()
    (path / "a.bin").write_bytes(b"a")
    (path / "me").symlink_to(path / "me")
    return "me"


def _dangling(path: Path) -> str:
    path.mkdir()
    (path / "a.bin").write_bytes(b"a")
    (path / "gone.bin").symlink_to(path.parent / "never-written.bin")
    return "gone.bin"


def _dangling_dir(path: Path) -> str:
    path.mkdir()
    (path / "a.bin").write_bytes(b"a")
    (path / "shards").symlink_to(path.parent / "unmounted-disk", target_is_directory=True)
    return "shards"


def _fifo(path: Path) -> str:
    path.mkdir()
    (path / "a.bin").write_bytes(b"a")
    os.mkfifo(path / "pipe")
    return "pipe"


BROKEN = {
    "loop to an ancestor": (_loop_to_parent, "symlink loop"),
    "link to itself": (_self_link, "symlink loop"),
    "dangling file link": (_dangling, "dangling symlink"),
    "dangling directory link": (_dangling_dir, "dangling symlink"),
    "a FIFO": (_fifo, "not a regular file"),
}


class TestUnreadableCheckpointsFail:
    @pytest.mark.parametrize("case", sorted(BROKEN))
    def test_listing_names_what_it_cannot_read(self, case: str, tmp_path: Path) -> None:
        """The digest, the size and the uploader's listing all refuse it, naming the path."""
        make, why = BROKEN[case]
        checkpoint = tmp_path / "ckpt"
        culprit = make(checkpoint)
        for read in (shard_files, digest_path, size_of):
            with pytest.raises(CheckpointFilesError, match=why) as caught:
                read(checkpoint)
            assert str(checkpoint / culprit) in str(caught.value)

    @pytest.mark.parametrize("case", sorted(BROKEN))
    def test_a_run_whose_save_leaves_one_fails_at_the_checkpoint(
        self, case: str, tmp_path: Path
    ) -> None:
        """Saving such a checkpoint fails the run at once; nothing is uploaded."""
        make, why = BROKEN[case]
        remote = tmp_path / "remote"
        uploader = CheckpointUploader(str(remote))

        def save(state: LoopState, path: Path) -> None:
            make(path)

        with pytest.raises(CheckpointFilesError, match=why):
            _train(tmp_path, save, uploader)
        assert not [p for p in remote.rglob("*") if p.is_file()]

    def test_a_link_that_breaks_before_upload_fails_the_upload_naming_it(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """A shard disk that goes away between save and upload: the upload fails, unpublished."""
        fast = _fast_disk(tmp_path)

        def save(state: LoopState, path: Path) -> None:
            path.mkdir()
            (path / "shards").symlink_to(fast, target_is_directory=True)

        class Unmount(lb.Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                fast.rename(fast.with_name("unmounted"))

        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=s3_bucket.endpoint
        )
        artifacts = _train(tmp_path, save, uploader, callbacks=(Unmount(),))
        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, CheckpointFilesError)
        assert "dangling symlink" in str(error)
        assert str(artifacts.manifest[0].path / "shards") in str(error)
        assert s3_bucket.list_keys() == []
