"""Crash-safe uploads: a run killed mid-upload is finished by `loopbridge resume` or a restart.

The crash tests run `crash_worker.py` in a subprocess that uploads to moto through a throttling
proxy, and SIGKILL it once every checkpoint is recorded, two are sending parts and the rest
are queued. The other tests build the journal a crash leaves (intents recorded, nothing
uploaded) directly, which is quicker and just as real for the resume side.
"""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tests.fixtures.s3 import FaultProxy, FaultRule, Hang, S3Bucket, Status, Throttle

import loopbridge as lb
from loopbridge._digest import digest_path
from loopbridge._exceptions import JournalError
from loopbridge.callbacks import CheckpointUploader
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.resume import resume_out_dir

MiB = 1 << 20
RUN = "crash-run"
WORKER = Path(__file__).with_name("crash_worker.py")
WAIT = 30.0


# -- helpers ---------------------------------------------------------------------------------


class Worker:
    """The crash worker subprocess, with its stdout read line by line on a thread."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for_line(self, wanted: str) -> None:
        """Block until the worker prints `wanted`; fail (with its stderr) if it never does."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"the worker did not print {wanted!r} within {WAIT}s")
            if line == wanted:
                return
            if line == "finished":
                pytest.fail(f"the worker finished before printing {wanted!r}")

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        assert self.proc.returncode == -signal.SIGKILL
        self._reader.join(WAIT)  # the pipe is at EOF now; close it only once nobody reads it
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _crash(out_dir: Path, bucket: S3Bucket, proxy: FaultProxy, steps: int = 4) -> None:
    """Train in a subprocess and SIGKILL it with uploads in flight and queued."""
    proxy.add(FaultRule((Throttle(512 * 1024),), method="PUT", path="partNumber="))
    in_flight = [proxy.arrived("PUT", rf"step-0000000{n}/.*partNumber=") for n in (1, 2)]
    worker = Worker(
        [str(out_dir), f"s3://{bucket.name}/ckpts", proxy.url, str(steps), str(6 * MiB)]
    )
    try:
        worker.wait_for_line("all recorded")
        for event in in_flight:
            assert event.wait(WAIT), "the first two checkpoints never started sending parts"
    finally:
        worker.kill()
    # At the kill: two checkpoints were sending parts, the later ones still queued behind them.
    assert proxy.requests(path="step-00000003") == []
    with UploadJournal(out_dir / JOURNAL_FILE) as journal:
        assert len(journal.open_intents()) == steps
    assert len(bucket.open_multipart_uploads()) == 2
    proxy.clear()


def _rows(out_dir: Path) -> list[lb.ManifestRow]:
    """The checkpoints the run recorded in its local manifest."""
    lines = (out_dir / "manifest.jsonl").read_text().splitlines()
    return [lb.ManifestRow.from_json(json.loads(line)) for line in lines]


def _resume_cli(out_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopbridge.cli", "resume", str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )


def _check_published(bucket: S3Bucket, rows: list[lb.ManifestRow], prefix: str) -> None:
    """Every row is published with its digest; manifest and latest agree; no stray uploads."""
    steps = sorted(row.step for row in rows)
    manifest = json.loads(bucket.read(f"{prefix}/manifest.json"))
    assert [entry["step"] for entry in manifest["checkpoints"]] == steps
    for row, entry in zip(sorted(rows, key=lambda r: r.step), manifest["checkpoints"], strict=True):
        step_prefix = f"{prefix}/step-{row.step:08d}"
        assert bucket.digest(f"{step_prefix}/{row.path.name}") == row.digest
        assert entry["digest"] == row.digest
        assert json.loads(bucket.read(f"{step_prefix}/_COMPLETE"))["digest"] == row.digest
    latest = json.loads(bucket.read(f"{prefix}/latest"))
    assert (latest["step"], latest["prefix"]) == (steps[-1], f"step-{steps[-1]:08d}")
    assert bucket.open_multipart_uploads() == []


def _journaled(
    out_dir: Path, dest: str, steps: list[int], options: dict[str, str] | None = None
) -> list[lb.ManifestRow]:
    """The state a crash before any upload leaves: checkpoints, manifest rows, open intents."""
    rows = []
    (out_dir / "checkpoints").mkdir(parents=True)
    with UploadJournal(out_dir / JOURNAL_FILE) as journal:
        for step in steps:
            path = out_dir / "checkpoints" / f"step-{step:08d}"
            path.write_bytes(f"checkpoint {step} ".encode() * 100)
            size, digest = digest_path(path)
            row = lb.ManifestRow(step, path, size, digest, 1000.0 + step, run_name=RUN)
            journal.record_intent(dest, RUN, row, options)
            rows.append(row)
    return rows


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """The crashed run's out dir."""
    return tmp_path / "out"


# -- the crash, then resume ------------------------------------------------------------------


class TestCrashThenResume:
    def test_resume_command_publishes_everything_recorded(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """After SIGKILL mid-upload, `loopbridge resume` publishes every recorded checkpoint."""
        _crash(out_dir, s3_bucket, fault_proxy)
        assert [row.step for row in _rows(out_dir)] == [1, 2, 3, 4]

        done = _resume_cli(out_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        # Read after the resume: digests are hashed as checkpoints upload, and the resume
        # writes those the killed process never got to into manifest.jsonl.
        rows = _rows(out_dir)
        assert "4 open upload(s): 4 published, 0 failed" in done.stdout
        _check_published(s3_bucket, rows, f"ckpts/{RUN}")
        with UploadJournal(out_dir / JOURNAL_FILE) as journal:
            assert journal.open_intents() == []
        # The journal's recorded store options were used, no --endpoint-url or part size given:
        # step 4 (queued at the kill) went through the proxy, in the run's 5 MiB parts.
        assert len(fault_proxy.requests("POST", r"step-00000004/.*\?uploads")) == 1
        assert len(fault_proxy.requests("PUT", r"step-00000004/step-00000004\?.*partNumber=")) == 2

    def test_restarting_the_run_publishes_old_checkpoints_before_new_ones(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """A TrainLoop started again on the out dir finishes the dead run's uploads first."""
        _crash(out_dir, s3_bucket, fault_proxy)
        last = _rows(out_dir)[-1].step
        published: list[int] = []

        class Watch(lb.Callback):
            def on_train_end(self, state: lb.LoopState, artifacts: lb.LoopArtifacts) -> None:
                published.extend(row.step for row in artifacts.manifest)

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(f"after restart {state.step}".encode() * 1000)

        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url, part_size=5 * MiB
        )
        artifacts = lb.TrainLoop(
            lambda state, batch: {"loss": 0.5},
            range(10),
            max_steps=last + 2,
            start_step=last,
            out_dir=out_dir,
            save=save,
            checkpoint_every=1,
            callbacks=[uploader, Watch()],
            run_name=RUN,
        ).run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        assert published == [last + 1, last + 2]
        assert uploader.summary.uploaded == last + 2
        rows = _rows(out_dir)
        assert [row.step for row in rows] == list(range(1, last + 3))
        _check_published(s3_bucket, rows, f"ckpts/{RUN}")
        # Old checkpoints were published in order, before the new ones.
        marker_puts = [
            r.raw_path for r in fault_proxy.requests("PUT", r"/_COMPLETE") if "step-" in r.raw_path
        ]
        assert [int(p.split("step-")[1][:8]) for p in marker_puts] == list(range(1, last + 3))
        with UploadJournal(out_dir / JOURNAL_FILE) as journal:
            assert journal.open_intents() == []
            assert len(journal.intents()) == last + 2


class TestExperimentRestart:
    def test_an_experiment_started_again_finishes_what_failed_before(self, tmp_path: Path) -> None:
        """Uploads that failed in an experiment's first attempt publish when it runs again."""
        remote = tmp_path / "remote"
        remote.write_bytes(b"in the way")  # the store's root is a file: every upload fails

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(f"{state.run_name} {state.step}".encode() * 100)

        def experiment(start_step: int) -> lb.ExperimentResult:
            def build(ctx: lb.LogContext) -> lb.TrainLoop:
                return lb.TrainLoop(
                    lambda state, batch: {"loss": 0.5},
                    range(10),
                    max_steps=start_step + 2,
                    start_step=start_step,
                    out_dir=tmp_path / "runs" / str(ctx.run_name),
                    save=save,
                    checkpoint_every=1,
                )

            # No pre-flight: this test is about uploads that fail during training.
            uploader = CheckpointUploader(remote.as_uri(), preflight=False)
            return lb.Experiment(
                "exp", {"arm": {}}, build, callbacks=[uploader], on_drain_failure="warn"
            ).run()

        first = experiment(0)
        (run,) = first.arms["arm"].runs
        assert run.drain_report is not None
        assert len(run.drain_report.failed) == 2
        remote.unlink()

        second = experiment(2)
        (run,) = second.arms["arm"].runs
        assert run.drain_report is not None
        assert run.drain_report.ok, run.drain_report.summary()
        (prefix,) = [p.parent for p in remote.rglob("manifest.json")]
        manifest = json.loads((prefix / "manifest.json").read_bytes())
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 2, 3, 4]
        assert json.loads((prefix / "latest").read_bytes())["step"] == 4
        assert prefix.relative_to(remote).parts[:2] == ("exp", "arm")


# -- what cannot be published is reported -----------------------------------------------------


class TestBadCases:
    def test_a_missing_local_file_is_named_and_the_rest_published(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """A checkpoint deleted locally fails with its step and path; exit status is 1."""
        rows = _journaled(
            out_dir, f"s3://{s3_bucket.name}/ckpts", [1, 2], {"endpoint_url": fault_proxy.url}
        )
        rows[1].path.unlink()
        done = _resume_cli(out_dir)
        assert done.returncode == 1, done.stdout + done.stderr
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 1
        assert "step 2" in failed[0]
        assert str(rows[1].path) in failed[0]
        assert "is gone" in failed[0]
        _check_published(s3_bucket, rows[:1], f"ckpts/{RUN}")
        with UploadJournal(out_dir / JOURNAL_FILE) as journal:
            (still_open,) = journal.open_intents()
        assert (still_open.row.step, still_open.state) == (2, "failed")

    def test_corrupt_and_foreign_journals_are_reported_and_others_resumed(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Garbage bytes and another program's SQLite file each get a clear line; exit 1."""
        good = _journaled(
            tmp_path / "exp" / "good",
            f"s3://{s3_bucket.name}/ckpts",
            [1],
            {"endpoint_url": fault_proxy.url},
        )
        corrupt = tmp_path / "exp" / "corrupt" / JOURNAL_FILE
        corrupt.parent.mkdir(parents=True)
        corrupt.write_bytes(b"\xde\xad\xbe\xef not sqlite " * 300)
        foreign = tmp_path / "exp" / "foreign" / JOURNAL_FILE
        foreign.parent.mkdir(parents=True)
        with sqlite3.connect(foreign) as db:
            db.execute("CREATE TABLE t (x)")
        db.close()

        done = _resume_cli(tmp_path / "exp")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        out = done.stdout
        assert f"FAILED {corrupt} cannot be read as an upload journal" in out
        assert f"FAILED {foreign} is not a loopbridge upload journal" in out
        assert "3 journal(s), 1 open upload(s): 1 published, 2 failed" in out
        _check_published(s3_bucket, good, f"ckpts/{RUN}")

    def test_a_refusing_store_names_the_key(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """A 403 from the store fails the resume with the key it refused, once, exit 1."""
        _journaled(out_dir, f"s3://{s3_bucket.name}/ckpts", [1], {"endpoint_url": fault_proxy.url})
        fault_proxy.add(FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT"))
        done = _resume_cli(out_dir)
        assert done.returncode == 1, done.stdout + done.stderr
        key = f"s3://{s3_bucket.name}/ckpts/{RUN}/step-00000001/step-00000001"
        assert f"S3 PutObject {key} was refused: AccessDenied (HTTP 403)" in done.stdout
        assert len(fault_proxy.requests("PUT")) == 1
        assert s3_bucket.list_keys() == []

    def test_a_server_that_never_answers_is_cut_off_by_timeout(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """`--timeout` bounds the resume: what is unfinished is reported, exit 1, no hang."""
        _journaled(
            out_dir, f"s3://{s3_bucket.name}/ckpts", [1, 2], {"endpoint_url": fault_proxy.url}
        )
        fault_proxy.add(FaultRule((Hang(),), method="PUT"))
        done = _resume_cli(out_dir, "--timeout", "1")
        assert done.returncode == 1, done.stdout + done.stderr
        lines = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        assert [line.split(" -> ")[0] for line in lines] == ["FAILED step 1", "FAILED step 2"]
        assert all("not finished within --timeout 1.0s" in line for line in lines)
        with UploadJournal(out_dir / JOURNAL_FILE) as journal:
            assert len(journal.open_intents()) == 2

    def test_a_corrupt_journal_at_restart_is_reported_and_uploads_go_on(
        self, tmp_path: Path
    ) -> None:
        """A restarted run with a corrupt journal reports it in the drain and still uploads."""
        out = tmp_path / "out"
        out.mkdir()
        (out / JOURNAL_FILE).write_bytes(b"garbage" * 500)
        remote = tmp_path / "remote"

        def save(state: lb.LoopState, path: Path) -> None:
            path.write_bytes(b"x" * 100)

        artifacts = lb.TrainLoop(
            lambda state, batch: {"loss": 0.5},
            range(2),
            max_steps=2,
            out_dir=out,
            save=save,
            checkpoint_every=1,
            callbacks=[CheckpointUploader(remote.as_uri())],
            run_name=RUN,
            on_drain_failure="warn",
        ).run()
        report = artifacts.drain_report
        assert report is not None
        (failure,) = report.failed
        assert failure.name == "upload journal"
        assert isinstance(failure.exception, JournalError)
        assert str(out / JOURNAL_FILE) in str(failure.exception)
        assert json.loads((remote / RUN / "latest").read_bytes())["step"] == 2


# -- resuming is idempotent ---------------------------------------------------------------------


class TestIdempotence:
    def test_resuming_twice_and_republishing_are_harmless(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, out_dir: Path
    ) -> None:
        """A second resume finds nothing; an older step republished leaves `latest` alone."""
        rows = _journaled(
            out_dir, f"s3://{s3_bucket.name}/ckpts", [1, 2, 3], {"endpoint_url": fault_proxy.url}
        )
        first = _resume_cli(out_dir)
        assert first.returncode == 0, first.stdout + first.stderr
        _check_published(s3_bucket, rows, f"ckpts/{RUN}")
        keys = s3_bucket.list_keys()

        again = _resume_cli(out_dir)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing open (3 published)" in again.stdout

        # As if the process died after publishing step 2 but before the journal said so.
        with sqlite3.connect(out_dir / JOURNAL_FILE) as db:
            db.execute("UPDATE intents SET state = 'pending' WHERE step = 2")
        db.close()
        puts_before = len(fault_proxy.requests("PUT"))
        republished = _resume_cli(out_dir)
        assert republished.returncode == 0, republished.stdout + republished.stderr
        assert "step 2" in republished.stdout
        assert "published (already uploaded)" in republished.stdout
        # No checkpoint bytes are sent again: only the marker, the manifest and latest.
        new_puts = [r.raw_path for r in fault_proxy.requests("PUT")[puts_before:]]
        assert sorted(p.rsplit("/", 1)[1] for p in new_puts) == [
            "_COMPLETE",
            "latest",
            "manifest.json",
        ]
        assert s3_bucket.list_keys() == keys
        _check_published(s3_bucket, rows, f"ckpts/{RUN}")

    def test_store_option_publishes_somewhere_else(self, tmp_path: Path) -> None:
        """`--store` replaces the recorded destination; keys stay relative to it."""
        out = tmp_path / "out"
        _journaled(out, (tmp_path / "gone").as_uri(), [1])
        moved = tmp_path / "moved"
        report = resume_out_dir(out, store=moved.as_uri())
        assert report.ok, report.lines()
        assert json.loads((moved / RUN / "latest").read_bytes())["step"] == 1
        assert not (tmp_path / "gone").exists()

    def test_a_store_that_cannot_be_reopened_is_reported(self, tmp_path: Path) -> None:
        """A journal whose destination has no URL scheme loopbridge knows says to use --store."""
        out = tmp_path / "out"
        _journaled(out, "custom://bucket/x", [1])
        report = resume_out_dir(out)
        assert not report.ok
        (failure,) = report.failed
        assert failure.step == 1
        assert "cannot open the store custom://bucket/x" in failure.detail
        assert "--store URL" in failure.detail

    def test_local_store_resume_clears_stale_temp_files(self, tmp_path: Path) -> None:
        """A dead process's half-written temp file is removed and the checkpoint published."""
        remote = tmp_path / "remote"
        out = tmp_path / "out"
        rows = _journaled(out, remote.as_uri(), [1, 2])
        stale = remote / RUN / "step-00000001" / ".lb-tmp-deadbeef-step-00000001"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"half")
        report = resume_out_dir(out)
        assert report.ok, report.lines()
        assert not stale.exists()
        manifest = json.loads((remote / RUN / "manifest.json").read_bytes())
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 2]
        for row in rows:
            stored = remote / RUN / f"step-{row.step:08d}" / row.path.name
            assert stored.read_bytes() == row.path.read_bytes()
        assert json.loads((remote / RUN / "latest").read_bytes())["step"] == 2
