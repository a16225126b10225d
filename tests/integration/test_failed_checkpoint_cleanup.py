"""A failed checkpoint leaves nothing remotely, or `loopbridge resume` lists and removes it.

Against moto behind the fault proxy: shards sent before a later one failed, multipart parts in
flight, objects the server stored although their reply was lost, uploads cancelled by the
drain deadline, a discard that itself fails (reported, never silent), and leftovers found
later under unpublished steps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from tests.fixtures.s3 import (
    FaultProxy,
    FaultRule,
    Hang,
    ResetBeforeResponse,
    S3Bucket,
    Status,
)

import loopbridge as lb
from loopbridge._exceptions import PermanentStoreError, StoreError
from loopbridge._types import LoopState, TrainingBatch
from loopbridge.callbacks import CheckpointUploader
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.resume import resume_out_dir

MiB = 1 << 20
RUN = "run-c"
STEP = f"ckpts/{RUN}/step-00000001"
DENIED = Status(403, "AccessDenied", "Access Denied")


def _save_shards(state: LoopState, path: Path) -> None:
    """shard-0 (small), shard-1 (multipart at 5 MiB parts), shard-2 (small)."""
    path.mkdir()
    (path / "shard-0.bin").write_bytes(os.urandom(1000))
    (path / "shard-1.bin").write_bytes(os.urandom(11 * MiB))
    (path / "shard-2.bin").write_bytes(os.urandom(1000))


def _step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    return {"loss": 1.0}


def _train(
    tmp_path: Path,
    uploader: CheckpointUploader,
    extra: tuple[lb.Callback, ...] = (),
    **options: object,
) -> lb.LoopArtifacts:
    loop = lb.TrainLoop(
        _step,
        range(1),
        max_steps=1,
        out_dir=tmp_path / "out",
        save=_save_shards,
        callbacks=[uploader, *extra],
        run_name=RUN,
        on_drain_failure="warn",
        **options,  # type: ignore[arg-type]
    )
    return loop.run()


def _uploader(bucket: S3Bucket, proxy: FaultProxy, **options: object) -> CheckpointUploader:
    return CheckpointUploader(
        f"s3://{bucket.name}/ckpts",
        endpoint_url=proxy.url,
        part_size=5 * MiB,
        store_options={"retry_base_delay": 0.01, "retry_max_delay": 0.05, **options},
    )


def _failure(artifacts: lb.LoopArtifacts) -> BaseException:
    report = artifacts.drain_report
    assert report is not None
    assert len(report.failed) == 1, report.summary()
    error = report.failed[0].exception
    assert error is not None
    return error


class TestNothingStays:
    def test_shards_sent_before_a_later_one_failed_are_deleted(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """shard-0 was stored and shard-1's parts were in flight when a part was refused."""
        fault_proxy.add(FaultRule((DENIED,), method="PUT", path=r"shard-1\.bin\?.*partNumber=2"))
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy))
        assert isinstance(_failure(artifacts), PermanentStoreError)
        assert fault_proxy.requests("PUT", r"shard-0\.bin")
        assert s3_bucket.list_keys() == []
        assert s3_bucket.open_multipart_uploads() == []

    def test_objects_stored_although_their_reply_was_lost_are_deleted(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """The server kept shard-2 on every attempt; the uploader never saw it succeed."""
        fault_proxy.add(FaultRule((ResetBeforeResponse(),), method="PUT", path=r"shard-2\.bin$"))
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy, max_attempts=2))
        error = _failure(artifacts)
        assert isinstance(error, StoreError)
        assert "failed after 2 attempts" in str(error)
        assert len(fault_proxy.requests("PUT", r"shard-2\.bin$")) >= 2
        assert s3_bucket.list_keys() == []

    def test_an_upload_cancelled_by_the_drain_deadline_is_cleared(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """The drain cancels a hung part; shard-0, sent before it, is deleted in the grace."""
        hung = r"shard-1\.bin\?.*partNumber=2"
        fault_proxy.add(FaultRule((Hang(),), method="PUT", path=hung))
        sent = fault_proxy.arrived("PUT", hung)

        class HoldUntilHung(lb.Callback):
            """The drain (and its deadline) starts only once the part hangs."""

            def on_train_end(self, state: LoopState, artifacts: lb.LoopArtifacts) -> None:
                assert sent.wait(60), "the hung part never arrived"

        artifacts = _train(
            tmp_path,
            _uploader(s3_bucket, fault_proxy),
            drain_timeout=1.0,
            interrupt_grace=5.0,
            extra=(HoldUntilHung(),),
        )
        report = artifacts.drain_report
        assert report is not None
        assert report.timed_out
        assert fault_proxy.requests("PUT", r"shard-0\.bin$")
        assert s3_bucket.list_keys() == []
        assert s3_bucket.open_multipart_uploads() == []

    def test_a_discard_that_fails_is_reported_and_resume_clears_it(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Deletes refused too: the drain failure says so, an error is logged; resume fixes it."""
        fault_proxy.add(FaultRule((DENIED,), method="PUT", path=r"shard-2\.bin$"))
        fault_proxy.add(FaultRule((DENIED,), method="POST", path=r"\?delete"))
        caplog.set_level(logging.ERROR)
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy))
        error = _failure(artifacts)
        assert isinstance(error, PermanentStoreError)
        message = str(error)
        assert "shard-2.bin" in message
        assert f"under s3://{s3_bucket.name}/ckpts/{STEP.removeprefix('ckpts/')}/" in message
        assert "could not be deleted" in message
        assert "loopbridge resume" in message
        assert artifacts.drain_report is not None
        assert "could not be deleted" in artifacts.drain_report.summary()
        assert any("could not be deleted" in r.getMessage() for r in caplog.records)
        assert [k for k in s3_bucket.list_keys() if k.startswith(STEP)]

        fault_proxy.clear()
        resumed = resume_out_dir(tmp_path / "out")
        assert resumed.ok, resumed.lines()
        with UploadJournal(tmp_path / "out" / JOURNAL_FILE) as journal:
            assert journal.open_intents() == []
        marker = json.loads(s3_bucket.read(f"{STEP}/_COMPLETE"))
        assert sorted(f["path"] for f in marker["files"]) == [
            "shard-0.bin",
            "shard-1.bin",
            "shard-2.bin",
        ]


class TestResumeSweepsLeftovers:
    def test_unpublished_steps_are_listed_and_removed(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Objects under steps the manifest does not list go; published steps stay."""
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy))
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        published = s3_bucket.list_keys()
        run = f"ckpts/{RUN}"
        leftovers = [
            f"{run}/step-00000007/shard-0.bin",  # sent before a crash, no marker
            f"{run}/step-00000007/nested/shard-1.bin",
            f"{run}/step-00000009/_COMPLETE",  # half-pruned: marker, but not in the manifest
        ]
        for key in leftovers:
            s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"stale")
        s3_bucket.client.create_multipart_upload(
            Bucket=s3_bucket.name, Key=f"{run}/step-00000007/shard-2.bin"
        )

        resumed = resume_out_dir(tmp_path / "out")
        assert resumed.ok, resumed.lines()
        text = "\n".join(resumed.lines())
        assert "removed stale leftovers of unpublished step-00000007, step-00000009" in text
        assert s3_bucket.list_keys() == published
        assert s3_bucket.open_multipart_uploads() == []

    def test_an_unreadable_manifest_leaves_everything_and_says_so(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Without a readable manifest nothing can be told stale: nothing is deleted."""
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy))
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok
        run = f"ckpts/{RUN}"
        s3_bucket.client.put_object(
            Bucket=s3_bucket.name, Key=f"{run}/manifest.json", Body=b"not json"
        )
        before = s3_bucket.list_keys()
        resumed = resume_out_dir(tmp_path / "out")
        assert not resumed.ok
        assert any("manifest" in o.detail and "unreadable" in o.detail for o in resumed.failed)
        assert s3_bucket.list_keys() == before


class TestStaleUploadCleanupIsBestEffort:
    @pytest.mark.parametrize(
        "refusal",
        [
            Status(404, "NoSuchUpload", "The specified upload does not exist."),
            Status(500, "InternalError", "We encountered an internal error."),
            Status(403, "AccessDenied", "Access Denied"),
        ],
        ids=["404 NoSuchUpload", "500", "403"],
    )
    def test_a_store_that_cannot_list_unfinished_uploads_still_gets_the_checkpoint(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
        refusal: Status,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """ListMultipartUploads refused on every try: resume publishes anyway, and says why."""
        caplog.set_level(logging.WARNING)
        fault_proxy.add(FaultRule((DENIED,), method="PUT", path=r"shard-2\.bin$", times=1))
        artifacts = _train(tmp_path, _uploader(s3_bucket, fault_proxy, max_attempts=2))
        assert isinstance(_failure(artifacts), PermanentStoreError)
        fault_proxy.add(FaultRule((refusal,), method="GET", path=r"\?uploads"))

        resumed = resume_out_dir(tmp_path / "out")
        assert resumed.ok, resumed.lines()
        assert fault_proxy.requests("GET", r"\?uploads")
        marker = json.loads(s3_bucket.read(f"{STEP}/_COMPLETE"))
        assert len(marker["files"]) == 3
        if refusal.code != "NoSuchUpload":  # rclone's "none yet": nothing to warn about
            assert any(
                "could not clear unfinished uploads" in r.getMessage() for r in caplog.records
            )
