"""Rows hashed with sha256 (loopbridge before BLAKE3, resumed): uploaded, published, restored.

A journal written by an older version holds `sha256:` digests. Its rows must still upload,
be checked against those digests, publish a marker whose files add up to them, and restore.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from tests.fixtures.s3 import S3Bucket

import loopbridge as lb
from loopbridge._types import LoopState, ManifestRow
from loopbridge.callbacks import CheckpointUploader


def _sha256_row(path: Path, step: int) -> ManifestRow:
    """A row as an older version hashed it: `sha256:` of the file, or of the shard lines."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        lines = "".join(
            f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}\t"
            f"{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
            for p in files
        )
        digest = hashlib.sha256(lines.encode()).hexdigest()
        size = sum(p.stat().st_size for p in files)
    else:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        size = path.stat().st_size
    return ManifestRow(
        step=step, path=path, size_bytes=size, digest=f"sha256:{digest}", created_at=time.time()
    )


def _checkpoints(out: Path) -> list[Path]:
    """A single-file checkpoint and a directory of shards (one in a subdirectory)."""
    out.mkdir()
    single = out / "step-1.ckpt"
    single.write_bytes(b"weights " * 70_000)
    shards = out / "step-2"
    (shards / "sub").mkdir(parents=True)
    (shards / "a.distcp").write_bytes(b"shard a " * 90_000)
    (shards / "sub" / "b.distcp").write_bytes(b"shard b " * 10)
    return [single, shards]


def _upload(dest: str, rows: list[ManifestRow], out: Path, **options: object) -> lb.DrainReport:
    state = LoopState(run_name="old", run_id="old", max_steps=2, out_dir=out)
    with lb.Bridge(name="older-digests") as bridge:
        uploader = CheckpointUploader(dest, **options)  # type: ignore[arg-type]
        callbacks = lb.CallbackList([uploader], bridge=bridge)
        for row in rows:
            callbacks.on_checkpoint(state, row)
        return bridge.drain(timeout=120)


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, object]]:
    if request.param == "local":
        return str(tmp_path / "remote"), {}
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket.name}/ckpts", {"endpoint_url": bucket.endpoint}


def test_sha256_rows_publish_their_digests_and_restore(
    dest: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    """Each row is published with its sha256 digest, and restores to the same bytes."""
    url, options = dest
    paths = _checkpoints(tmp_path / "out")
    rows = [_sha256_row(path, step) for step, path in enumerate(paths, 1)]
    report = _upload(url, rows, tmp_path / "out", **options)
    assert report.ok, report.summary()
    for row in rows:
        restored = lb.restore(url, run="old", step=row.step, to=tmp_path / "back", **options)
        assert restored.row.digest == row.digest
        assert _sha256_row(restored.path, row.step).digest == row.digest


def test_a_sha256_row_whose_shard_changed_is_refused(
    dest: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    """The saved sha256 still guards the upload: a shard rewritten since is not published."""
    url, options = dest
    paths = _checkpoints(tmp_path / "out")
    row = _sha256_row(paths[1], 2)
    (paths[1] / "sub" / "b.distcp").write_bytes(b"shard B " * 10)
    report = _upload(url, [row], tmp_path / "out", **options)
    assert not report.ok
    assert "a shard changed after it was saved" in report.summary()
    with pytest.raises(lb.RestoreError):
        lb.restore(url, run="old", step=2, to=tmp_path / "back", **options)
