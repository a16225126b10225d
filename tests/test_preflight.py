"""Destinations that cannot work fail before the first training step, with the fix."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import loopbridge as lb
from loopbridge import DestinationError, MissingExtraError, PermanentStoreError
from loopbridge.callbacks import CheckpointUploader
from loopbridge.callbacks._preflight import PROBE_PREFIX
from loopbridge.stores import LocalStore, open_store
from tests.fixtures.s3 import FaultProxy, S3Bucket, SilentServer

RUN = "run-a"


def _save(state: lb.LoopState, path: Path) -> None:
    path.write_bytes(b"weights" * 100)


def _train(tmp_path: Path, uploader: CheckpointUploader) -> tuple[list[int], Any]:
    """Run 3 steps with a checkpoint each; return the steps the step function saw."""
    steps: list[int] = []

    def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        steps.append(state.step)
        return {"loss": 1.0}

    loop = lb.TrainLoop(
        step,
        range(3),
        out_dir=tmp_path / "out",
        save=_save,
        checkpoint_every=1,
        callbacks=[uploader],
        run_name=RUN,
        drain_timeout=30,
    )
    return steps, loop.run


def _refused(tmp_path: Path, uploader: CheckpointUploader) -> DestinationError:
    steps, run = _train(tmp_path, uploader)
    with pytest.raises(DestinationError) as info:
        run()
    assert steps == [], "the step function ran before the destination was refused"
    message = str(info.value)
    assert "preflight=False" in message
    return info.value


@contextlib.contextmanager
def _unwritable(directory: Path) -> Iterator[None]:
    """Make `directory` unwritable for this process: immutable as root, read-only otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


class TestLocalDestinations:
    """Local destinations: a file, a path under a file, a directory nobody can write."""

    def test_a_regular_file(self, tmp_path: Path) -> None:
        """A destination that is a regular file is named as one."""
        target = tmp_path / "store"
        target.write_text("not a directory")
        error = _refused(tmp_path, CheckpointUploader(target))
        assert f"checkpoint destination {target} is a regular file, not a directory" in str(error)

    def test_under_a_regular_file(self, tmp_path: Path) -> None:
        """A destination whose parent is a file names that parent."""
        blocker = tmp_path / "blocker"
        blocker.write_text("in the way")
        error = _refused(tmp_path, CheckpointUploader(blocker / "a" / "store"))
        assert f"{blocker} is a regular file, not a directory" in str(error)

    def test_a_directory_that_cannot_be_written(self, tmp_path: Path) -> None:
        """A directory this process may not write in fails with what to change."""
        locked = tmp_path / "locked"
        with _unwritable(locked):
            error = _refused(tmp_path, CheckpointUploader(locked / "store"))
        message = str(error)
        assert f"no permission to create files in {locked}" in message
        assert "chmod, chown, chattr -i" in message

    def test_a_writable_directory_is_left_clean(self, tmp_path: Path) -> None:
        """A good destination passes, is created, and keeps no probe; uploads then work."""
        store = tmp_path / "store"
        uploader = CheckpointUploader(store)
        steps, run = _train(tmp_path, uploader)
        run()
        assert steps == [0, 1, 2]
        assert not [p for p in store.rglob(f"{PROBE_PREFIX}*")]
        assert uploader.summary.uploaded == 3

    def test_can_be_turned_off(self, tmp_path: Path) -> None:
        """With preflight=False the run trains, and the failure shows in the drain instead."""
        target = tmp_path / "store"
        target.write_text("not a directory")
        steps, run = _train(tmp_path, CheckpointUploader(target, preflight=False))
        with pytest.raises(lb.DrainError):
            run()
        assert steps == [0, 1, 2]


class _NoDelete(LocalStore):
    """A local store whose deletes are refused, like upload-only credentials (pure logic)."""

    async def delete(self, keys: Iterable[str]) -> None:
        raise PermanentStoreError("DeleteObject was refused: AccessDenied (HTTP 403)")


class TestDeletePermission:
    """A probe that cannot be deleted: a warning, or an error when keep_last must delete."""

    def test_warns_and_trains_without_keep_last(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Uploads need no delete: the run trains, and the leftover probe is named."""
        store = _NoDelete(tmp_path / "store")
        steps, run = _train(tmp_path, CheckpointUploader("", store=store))
        run()
        assert steps == [0, 1, 2]
        warned = [
            r.getMessage() for r in caplog.records if "could not be deleted" in r.getMessage()
        ]
        assert len(warned) == 1
        assert PROBE_PREFIX in warned[0]

    def test_keep_last_needs_delete(self, tmp_path: Path) -> None:
        """keep_last prunes by deleting, so a refused delete fails before training."""
        store = _NoDelete(tmp_path / "store")
        error = _refused(tmp_path, CheckpointUploader("", store=store, keep_last=2))
        assert "keep_last needs to delete: allow DeleteObject" in str(error)


class TestS3Destinations:
    """S3: no extra, no bucket, refused credentials, a server that does not answer."""

    def test_missing_s3_extra(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without aioboto3, an s3:// destination fails before training naming the extra."""
        monkeypatch.setitem(sys.modules, "aioboto3", None)
        steps, run = _train(tmp_path, CheckpointUploader("s3://bucket/prefix"))
        with pytest.raises(MissingExtraError, match=r"pip install 'loopbridge\[s3\]'"):
            run()
        assert steps == []

    def test_bucket_that_does_not_exist(self, tmp_path: Path, s3_bucket: S3Bucket) -> None:
        """A missing bucket is named, with the fix, before the first step."""
        uploader = CheckpointUploader(
            "s3://no-such-bucket-here/ckpts", endpoint_url=s3_bucket.endpoint
        )
        message = str(_refused(tmp_path, uploader))
        assert "s3://no-such-bucket-here/ckpts/run-a cannot be written" in message
        assert "NoSuchBucket" in message
        assert "create the bucket or fix the bucket name" in message

    def test_refused_credentials(self, tmp_path: Path, s3_bucket: S3Bucket) -> None:
        """Credentials the server does not know are refused before the first step."""
        with _moto_auth(s3_bucket.endpoint):
            uploader = CheckpointUploader(
                f"s3://{s3_bucket.name}/ckpts", endpoint_url=s3_bucket.endpoint
            )
            message = str(_refused(tmp_path, uploader))
        assert "InvalidAccessKeyId" in message
        assert "check the AWS credentials" in message

    def test_a_server_that_does_not_answer(
        self, tmp_path: Path, s3_bucket: S3Bucket, silent_server: SilentServer
    ) -> None:
        """An endpoint that never answers fails within the pre-flight timeout."""
        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=silent_server.url, preflight_timeout=1.0
        )
        message = str(_refused(tmp_path, uploader))
        assert "within 1 s before training" in message
        assert "check the endpoint URL" in message

    def test_probe_uses_only_what_uploading_needs(
        self, tmp_path: Path, s3_bucket: S3Bucket, fault_proxy: FaultProxy
    ) -> None:
        """The check is one PUT and one DELETE of a probe under the run's prefix: no bucket
        calls (HeadBucket, ListBucket), and nothing left behind."""
        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url, preflight_timeout=10.0
        )
        bridge = lb.Bridge(name="preflight")
        try:
            uploader_list = lb.CallbackList([uploader], bridge=bridge)
            state = lb.LoopState(run_name=RUN, run_id="x", max_steps=1, out_dir=tmp_path)
            uploader.journal = False
            uploader_list.on_train_start(state)
        finally:
            bridge.close(10)
        seen = [(r.method, r.raw_path) for r in fault_proxy.requests()]
        prefix = f"/{s3_bucket.name}/ckpts/{RUN}/{PROBE_PREFIX}"
        # S3Store deletes through DeleteObjects (POST ?delete), as for pruning.
        assert [m for m, _ in seen] == ["PUT", "POST"]
        assert seen[0][1].startswith(prefix)
        assert seen[1][1] == f"/{s3_bucket.name}?delete"
        assert s3_bucket.list_keys() == []


@contextlib.contextmanager
def _moto_auth(endpoint: str) -> Iterator[None]:
    """Have the moto server check credentials (it accepts any by default), then stop again."""
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


def test_open_store_refuses_mistyped_urls() -> None:
    """`s3:/b/x`, `s3:b`, `s3//b` and the like are refused, not made local directories."""
    for text, suggestion in [
        ("s3:/bucket/x", "'s3://bucket/x'"),
        ("s3:bucket", "'s3://bucket'"),
        ("S3:/bucket/x", "'s3://bucket/x'"),
        ("s3//bucket/x", "'s3://bucket/x'"),
        ("s3:", "'s3://bucket/prefix'"),
        ("gs:/bucket", "'gs://bucket'"),
        ("https:/host/x", "'https://host/x'"),
    ]:
        with pytest.raises(ValueError, match="looks like a mistyped") as info:
            open_store(text)
        assert suggestion in str(info.value), text
        assert f"'./{text}' if you do mean a local directory" in str(info.value)
    with pytest.raises(ValueError, match="has no bucket"):
        open_store("S3://")
    assert open_store("file:/tmp/x").url == "file:///tmp/x"
    for text in ("runs:v2/x", "./s3:/x", "s3"):  # not a scheme we know, or clearly a path
        store = open_store(text)
        assert isinstance(store, LocalStore)
        assert store.root == Path(text).absolute()
