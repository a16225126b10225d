"""Checkpoint uploads against a second S3 server: rclone, which checks SigV4 signatures.

rclone behaves unlike moto where it matters to integrity: after a multipart upload its HEAD
answers the plain MD5 of the whole object, and `ListMultipartUploads` answers 404 on a fresh
server. These tests run the uploader, the store and `loopbridge resume` against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.rclone import (
    RCLONE_SECRET,
    RcloneBucket,
    RcloneServer,
    make_bucket,
)
from tests.fixtures.s3 import FaultProxy, FaultRule, Throttle

import loopbridge as lb
from loopbridge._exceptions import DestinationError, PermanentStoreError
from loopbridge._types import LoopState, TrainingBatch
from loopbridge.callbacks import CheckpointUploader
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.resume import resume_out_dir
from loopbridge.stores import S3Store

MiB = 1 << 20
RUN = "run-r"
PART = 5 * MiB


def _save(state: LoopState, path: Path) -> None:
    """Step 1: a file over the part size (multipart); step 2: a directory of shards."""
    if state.step == 1:
        path.write_bytes(os.urandom(PART + 123_457))
    else:
        path.mkdir()
        (path / "sub").mkdir()
        (path / "shard-0.bin").write_bytes(os.urandom(PART + 1))
        (path / "sub" / "meta.json").write_bytes(b'{"ok": true}')


def _step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    return {"loss": 1.0}


def _train(out_dir: Path, uploader: CheckpointUploader, steps: int = 2) -> lb.LoopArtifacts:
    loop = lb.TrainLoop(
        _step,
        range(steps),
        max_steps=steps,
        out_dir=out_dir,
        save=_save,
        checkpoint_every=1,
        callbacks=[uploader],
        run_name=RUN,
        on_drain_failure="warn",
    )
    return loop.run()


def _uploader(
    bucket: RcloneBucket, endpoint: str, *, preflight: bool = True, **options: object
) -> CheckpointUploader:
    return CheckpointUploader(
        f"s3://{bucket.name}/ckpts",
        endpoint_url=endpoint,
        part_size=PART,
        store_options={"retry_base_delay": 0.01, "retry_max_delay": 0.05, **options},
        preflight=preflight,
    )


def _local_files(row: lb.ManifestRow) -> dict[str, tuple[int, str]]:
    """rel path -> (size, sha256) of a checkpoint's local files."""
    paths = [p for p in row.path.rglob("*") if p.is_file()] if row.path.is_dir() else [row.path]
    base = row.path if row.path.is_dir() else row.path.parent
    return {
        p.relative_to(base).as_posix(): (
            p.stat().st_size,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in paths
    }


def _check_remote(bucket: RcloneBucket, rows: list[lb.ManifestRow]) -> None:
    """Every file of every checkpoint is there with its size and sha256; manifest and latest."""
    manifest = json.loads(bucket.read(f"ckpts/{RUN}/manifest.json"))
    assert [e["step"] for e in manifest["checkpoints"]] == [row.step for row in rows]
    assert json.loads(bucket.read(f"ckpts/{RUN}/latest"))["step"] == rows[-1].step
    sizes = {
        item["Key"]: item["Size"]
        for item in bucket.client.list_objects_v2(Bucket=bucket.name).get("Contents", [])
    }
    for row in rows:
        step_prefix = f"ckpts/{RUN}/step-{row.step:08d}"
        for rel, (size, sha) in _local_files(row).items():
            key = f"{step_prefix}/{rel}"
            assert sizes[key] == size, key
            assert bucket.sha256(key) == sha, key
        assert json.loads(bucket.read(f"{step_prefix}/_COMPLETE"))["digest"] == row.digest


@pytest.fixture
def rclone_proxy(rclone_server: RcloneServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's rclone server, to count requests."""
    proxy = FaultProxy(rclone_server.endpoint)
    try:
        proxy.start()
    except Exception as exc:
        proxy.stop()
        pytest.fail(f"the fault proxy did not start: {exc!r}")
    yield proxy
    proxy.stop()


class TestRcloneHappyPath:
    def test_a_multipart_file_and_a_shard_directory_publish_verified(
        self, rclone_bucket: RcloneBucket, tmp_path: Path
    ) -> None:
        """Multipart (whose HEAD ETag is the plain MD5 on rclone) and shards publish, verified."""
        uploader = _uploader(rclone_bucket, rclone_bucket.endpoint)
        artifacts = _train(tmp_path / "out", uploader)
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        assert uploader.summary.uploaded == 2
        assert uploader.summary.retries == 0
        _check_remote(rclone_bucket, artifacts.manifest)

    async def test_head_after_multipart_checks_the_size(
        self, rclone_bucket: RcloneBucket, tmp_path: Path
    ) -> None:
        """rclone's HEAD answers the whole MD5; the upload stands, and the size is checked."""
        data = os.urandom(2 * PART + 5)
        path = tmp_path / "big.bin"
        path.write_bytes(data)
        async with S3Store(
            rclone_bucket.name, endpoint_url=rclone_bucket.endpoint, part_size=PART
        ) as store:
            result = await store.put_file("big.bin", path)
            assert result.parts == 3
            head = await store.head("big.bin")
        assert head is not None
        assert head.size == len(data)
        assert head.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
        assert rclone_bucket.sha256("big.bin") == hashlib.sha256(data).hexdigest()


class TestRcloneRefusals:
    def test_a_wrong_secret_fails_once_naming_bucket_and_key_without_the_secret(
        self,
        rclone_bucket: RcloneBucket,
        rclone_proxy: FaultProxy,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """SignatureDoesNotMatch is permanent: one request, the key named, no secret logged.

        The pre-flight check is off here, so the refusal meets the upload itself.
        """
        wrong = "wrong-secret-" + RCLONE_SECRET[::-1]
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        caplog.set_level(logging.DEBUG)
        uploader = _uploader(rclone_bucket, rclone_proxy.url, preflight=False)
        artifacts = _train(tmp_path / "out", uploader, steps=1)
        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, PermanentStoreError)
        key = f"ckpts/{RUN}/step-00000001/step-00000001"
        assert error.key == key
        assert f"s3://{rclone_bucket.name}/{key}" in str(error)
        # One attempt at the object, no retry storm (CreateMultipartUpload: it is multipart).
        assert len(rclone_proxy.requests("POST", f"{key}\\?uploads")) == 1
        assert uploader.summary.retries == 0
        assert rclone_bucket.list_keys() == []
        # Every logger, at DEBUG (botocore's and aiohttp's included), formatted with tracebacks.
        logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
        assert caplog.records
        assert wrong not in logged
        assert RCLONE_SECRET not in logged
        assert wrong not in str(error)
        assert wrong not in report.summary()

    def test_a_wrong_secret_is_caught_before_the_first_step(
        self,
        rclone_bucket: RcloneBucket,
        rclone_proxy: FaultProxy,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The pre-flight probe meets the refusal: one request, before training, no secret."""
        wrong = "wrong-secret-" + RCLONE_SECRET[::-1]
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        caplog.set_level(logging.DEBUG)
        steps: list[int] = []

        def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
            steps.append(state.step)
            return {}

        loop = lb.TrainLoop(
            step,
            range(1),
            out_dir=tmp_path / "out",
            save=_save,
            callbacks=[_uploader(rclone_bucket, rclone_proxy.url)],
            run_name=RUN,
        )
        with pytest.raises(DestinationError) as caught:
            loop.run()
        assert steps == []
        assert f"s3://{rclone_bucket.name}/ckpts/{RUN}/" in str(caught.value)
        assert len(rclone_proxy.requests("PUT", ".loopbridge-preflight")) == 1
        assert rclone_bucket.list_keys() == []
        logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
        assert caplog.records
        assert wrong not in logged
        assert RCLONE_SECRET not in logged
        assert wrong not in str(caught.value)

    def test_a_missing_bucket_is_named(
        self, rclone_server: RcloneServer, rclone_env: None, tmp_path: Path
    ) -> None:
        """NoSuchBucket is permanent and names the bucket; nothing is created.

        Pre-flight catches it before training; with it off, the upload meets it.
        """
        checked = CheckpointUploader(
            "s3://no-such-bucket-here/ckpts", endpoint_url=rclone_server.endpoint
        )
        with pytest.raises(DestinationError, match=r"s3://no-such-bucket-here/.*NoSuchBucket"):
            _train(tmp_path / "checked", checked, steps=1)
        uploader = CheckpointUploader(
            "s3://no-such-bucket-here/ckpts", endpoint_url=rclone_server.endpoint, preflight=False
        )
        artifacts = _train(tmp_path / "out", uploader, steps=1)
        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, PermanentStoreError)
        assert "s3://no-such-bucket-here/" in str(error)
        assert "NoSuchBucket" in str(error)
        assert uploader.summary.retries == 0
        assert not (rclone_server.root / "no-such-bucket-here").exists()


class TestRcloneFreshServer:
    async def test_stale_upload_cleanup_on_a_fresh_server_finds_nothing(
        self, rclone_env: None, tmp_path: Path
    ) -> None:
        """rclone answers ListMultipartUploads with 404 NoSuchUpload until its first upload."""
        server = RcloneServer(tmp_path / "s3")
        server.start()
        try:
            bucket = make_bucket(server)
            async with S3Store(bucket.name, endpoint_url=server.endpoint) as store:
                assert await store.abort_stale_uploads("ckpts/") == 0
            bucket.client.close()
        finally:
            server.stop()


class TestRcloneCrash:
    def test_resume_publishes_after_the_server_was_killed_mid_upload(
        self, rclone_env: None, tmp_path: Path
    ) -> None:
        """SIGKILL rclone while a part is in flight; a new server on the same dir; resume."""
        server = RcloneServer(tmp_path / "s3")
        server.start()
        proxy = FaultProxy(server.endpoint)
        proxy.start()
        try:
            bucket = make_bucket(server)
            # Parts crawl through the proxy, so the kill lands while one is in flight.
            proxy.add(FaultRule((Throttle(4 * MiB),), method="PUT", path="partNumber=", times=1))
            in_flight = proxy.arrived("PUT", "partNumber=")

            def kill_when_in_flight() -> None:
                if in_flight.wait(60):
                    server.kill()

            killer = threading.Thread(target=kill_when_in_flight, daemon=True)
            killer.start()
            uploader = _uploader(bucket, proxy.url, max_attempts=2)
            artifacts = _train(tmp_path / "out", uploader, steps=1)
            killer.join(60)
            report = artifacts.drain_report
            assert report is not None
            assert len(report.failed) == 1, report.summary()
            proxy.clear()

            again = RcloneServer(server.root, port=server.port)
            again.start()
            try:
                assert not bucket.list_keys(f"ckpts/{RUN}/")
                resumed = resume_out_dir(tmp_path / "out")
                assert resumed.ok, resumed.lines()
                with UploadJournal(tmp_path / "out" / JOURNAL_FILE) as journal:
                    assert journal.open_intents() == []
                _check_remote(bucket, artifacts.manifest)
            finally:
                again.stop()
            bucket.client.close()
        finally:
            proxy.stop()
            server.stop()
