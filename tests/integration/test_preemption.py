"""Preemption: a run killed with SIGKILL continues on a "new machine" from its S3 checkpoints.

The first process trains with `CheckpointUploader` to moto, publishes steps 4 and 8, trains
on to step 10 and is killed. A second process, with a fresh empty out dir and
`resume_from="auto"`, restores step 8 from S3 and trains to `max_steps`; its final parameters
must equal, bit for bit, those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures.s3 import S3Bucket
from tests.restore_helpers import ScriptWorker

from loopbridge.journal import JOURNAL_FILE, UploadJournal

WORKER = Path(__file__).with_name("preempt_worker.py")
MAX_STEPS = 20


def _train(
    bucket: S3Bucket, out: Path, prefix: str, result: Path, stop_at: int = 0
) -> ScriptWorker:
    dest = f"s3://{bucket.name}/{prefix}"
    args = [str(out), dest, bucket.endpoint, str(MAX_STEPS), str(stop_at), str(result)]
    return ScriptWorker(WORKER, args)


class TestPreemption:
    def test_killed_run_resumes_from_s3_on_a_new_machine(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """SIGKILL, then a fresh out dir with resume_from="auto": same final parameters."""
        first = _train(s3_bucket, tmp_path / "machine-1", "ckpts", tmp_path / "unused", 10)
        try:
            first.wait_for(lambda line: line == "published", "published")
        finally:
            first.kill()
        manifest = json.loads(s3_bucket.read("ckpts/preempted/manifest.json"))
        assert [e["step"] for e in manifest["checkpoints"]] == [4, 8]

        resumed = _train(s3_bucket, tmp_path / "machine-2", "ckpts", tmp_path / "resumed.json")
        resumed.wait_for(lambda line: line.startswith("resumed"), "resumed")
        stderr = resumed.finish()
        assert resumed.seen[-1] == "resumed 8", stderr

        reference = _train(s3_bucket, tmp_path / "reference", "ref", tmp_path / "reference.json")
        reference.wait_for(lambda line: line.startswith("resumed"), "resumed")
        reference.finish()
        assert reference.seen[-1] == "resumed 0"

        got = json.loads((tmp_path / "resumed.json").read_text())
        want = json.loads((tmp_path / "reference.json").read_text())
        assert got == want
        assert got["steps"] == MAX_STEPS
        # The run's remote manifest and `latest` carried on forward from the restored step.
        manifest = json.loads(s3_bucket.read("ckpts/preempted/manifest.json"))
        assert [e["step"] for e in manifest["checkpoints"]] == [4, 8, 12, 16, 20]
        assert json.loads(s3_bucket.read("ckpts/preempted/latest"))["step"] == MAX_STEPS
        with UploadJournal(tmp_path / "machine-2" / JOURNAL_FILE) as journal:
            assert journal.open_intents() == []
            assert sorted(i.row.step for i in journal.intents()) == [12, 16, 20]
