"""CheckpointUploader's snapshots end to end: rotation mid-upload, and `loopbridge resume`."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from tests.fixtures.s3 import FaultProxy, FaultRule, S3Bucket, Throttle

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader
from loopbridge.callbacks._snapshot import SNAPSHOT_DIR, snapshot_of
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.resume import resume_out_dir

MiB = 1 << 20
RUN = "run-s"


def _step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
    return {"loss": 0.5}


def _snapshot_files(root: Path) -> list[Path]:
    return [p for d in root.rglob(SNAPSHOT_DIR) for p in d.rglob("*") if p.is_file()]


class TestRotationMidUpload:
    def test_the_original_deleted_while_its_parts_are_in_flight_still_publishes(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """The upload reads the snapshot, so deleting the checkpoint loses nothing."""
        fault_proxy.add(FaultRule((Throttle(16 * MiB),), method="PUT", path="partNumber="))
        arrived = fault_proxy.arrived("PUT", "partNumber=")
        checkpoint = tmp_path / "out" / "checkpoints" / "step-00000001"
        content = os.urandom(16 * MiB)

        def delete_when_parts_arrive() -> None:
            if arrived.wait(30):
                checkpoint.unlink()

        deleter = threading.Thread(target=delete_when_parts_arrive, daemon=True)
        deleter.start()

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(content)

        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url, part_size=5 * MiB
        )
        lb.TrainLoop(
            _step,
            range(1),
            max_steps=1,
            out_dir=tmp_path / "out",
            save=save,
            callbacks=[uploader],
            run_name=RUN,
        ).run()
        deleter.join(5)
        assert arrived.is_set()
        assert not checkpoint.exists()
        key = f"ckpts/{RUN}/step-00000001/step-00000001"
        assert s3_bucket.sha256(key) == hashlib.sha256(content).hexdigest()
        assert json.loads(s3_bucket.read(f"ckpts/{RUN}/latest"))["step"] == 1
        assert _snapshot_files(tmp_path) == []


class TestNothingLeftBehind:
    def test_a_run_leaves_no_snapshot_directory(self, tmp_path: Path) -> None:
        """Each checkpoint after the first is linked into a directory made ahead on the
        bridge's loop; after the run neither those nor `.loopbridge-snapshots` remain."""
        remote = tmp_path / "remote"

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(f"weights {state.step}".encode())

        uploader = CheckpointUploader(str(remote))
        artifacts = lb.TrainLoop(
            _step,
            range(4),
            max_steps=4,
            out_dir=tmp_path / "out",
            save=save,
            checkpoint_every=1,
            callbacks=[uploader],
            run_name=RUN,
        ).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok
        assert uploader.summary.uploaded == 4
        assert list(tmp_path.rglob(SNAPSHOT_DIR)) == []
        published = remote / RUN / "step-00000004" / "step-00000004"
        assert published.read_bytes() == b"weights 4"


class TestResumeReadsTheSnapshot:
    def test_a_failed_upload_keeps_its_snapshot_for_resume(self, tmp_path: Path) -> None:
        """The journal points at the snapshot; resume publishes it after rotation, then drops it."""
        remote = tmp_path / "remote"
        remote.write_bytes(b"in the way")  # the store's root is a file: every upload fails
        out = tmp_path / "out"

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(f"step {state.step}".encode() * 1000)

        artifacts = lb.TrainLoop(
            _step,
            range(2),
            max_steps=2,
            out_dir=out,
            save=save,
            checkpoint_every=1,
            # The destination is a file: the uploads fail (pre-flight would stop the run first).
            callbacks=[CheckpointUploader(remote.as_uri(), preflight=False)],
            run_name=RUN,
            on_drain_failure="warn",
        ).run()
        assert artifacts.drain_report is not None
        assert len(artifacts.drain_report.failed) == 2
        with UploadJournal(out / JOURNAL_FILE) as journal:
            intents = journal.open_intents()
        assert [i.row.step for i in intents] == [1, 2]
        for intent, row in zip(intents, artifacts.manifest, strict=True):
            assert snapshot_of(intent.row.path) is not None
            assert intent.row.path.read_bytes() == row.path.read_bytes()
            assert intent.row.digest == row.digest
            row.path.unlink()  # the framework rotated the original away

        remote.unlink()
        report = resume_out_dir(out)
        assert report.ok, report.lines()
        (prefix,) = [p.parent for p in remote.rglob("manifest.json")]
        manifest = json.loads((prefix / "manifest.json").read_bytes())
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 2]
        assert _snapshot_files(out) == []
