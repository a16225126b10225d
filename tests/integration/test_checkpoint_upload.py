"""CheckpointUploader end to end: TrainLoop, bridge, then S3 (moto behind a proxy) or files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from tests.fixtures.s3 import (
    FaultProxy,
    FaultRule,
    Hang,
    ResetBeforeResponse,
    ResetMidBody,
    S3Bucket,
    Status,
    Throttle,
)

import loopbridge as lb
from loopbridge._digest import combine_shard_digests
from loopbridge._exceptions import IntegrityError, PermanentStoreError
from loopbridge._types import LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks import CheckpointUploader
from loopbridge.stores import LocalStore, S3Store

MiB = 1 << 20
RUN = "run-a"

TRANSIENT = (
    Status(503, "SlowDown", "Please reduce your request rate."),
    Status(500, "InternalError", "We encountered an internal error."),
    ResetBeforeResponse(),
    ResetMidBody(),
)

# What each step saves: a small file, a small file, a directory of shards, a 64 MiB file
# (multipart), and a small final file.
BIG = 64 * MiB


def _save(state: LoopState, path: Path) -> None:
    step = state.step
    seed = hashlib.sha256(f"step {step}".encode()).digest()
    if step == 3:
        path.mkdir()
        (path / "nested").mkdir()
        for name, size in (
            ("shard-0.bin", 300_000),
            ("shard-1.bin", 7 * MiB),
            ("nested/meta.json", 99),
        ):
            (path / name).write_bytes(seed * (size // len(seed)) + os.urandom(size % len(seed)))
    elif step == 4:
        path.write_bytes(os.urandom(BIG))
    else:
        path.write_bytes(seed * 1000 + os.urandom(step))


def _step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    return {"loss": 1.0 / (1 + batch.index)}


def _train(
    tmp_path: Path,
    uploader: CheckpointUploader,
    *,
    steps: int = 5,
    save: Callable[[LoopState, Path], None] = _save,
    before: tuple[lb.Callback, ...] = (),
    **options: Any,
) -> lb.LoopArtifacts:
    """Train `steps` steps with a checkpoint each; `before` run ahead of the uploader."""
    loop = lb.TrainLoop(
        _step,
        range(steps),
        max_steps=steps,
        out_dir=tmp_path / "out",
        save=save,
        checkpoint_every=1,
        callbacks=[*before, uploader],
        run_name=RUN,
        on_drain_failure="warn",
        **options,
    )
    return loop.run()


def _remote_digest(row: ManifestRow, files: dict[str, str]) -> str:
    """The digest of a checkpoint rebuilt from its remote files' digests (rel path -> digest)."""
    if row.path.is_dir():
        sizes = {
            p.relative_to(row.path).as_posix(): p.stat().st_size
            for p in row.path.rglob("*")
            if p.is_file()
        }
        return combine_shard_digests((rel, sizes[rel], d) for rel, d in files.items())
    (only,) = files.values()
    return only


def _check_published(
    rows: list[ManifestRow],
    keys: list[str],
    read: Callable[[str], bytes],
    digest: Callable[[str], str],
    *,
    run_prefix: str,
    kept_steps: list[int],
) -> None:
    """Kept checkpoints read back identical; manifest, latest and keep_last are right."""
    manifest = json.loads(read(f"{run_prefix}/manifest.json"))
    assert [entry["step"] for entry in manifest["checkpoints"]] == kept_steps
    latest = json.loads(read(f"{run_prefix}/latest"))
    assert latest["step"] == rows[-1].step
    assert latest["prefix"] == f"step-{rows[-1].step:08d}"
    by_step = {row.step: row for row in rows}
    for entry in manifest["checkpoints"]:
        row = by_step[entry["step"]]
        step_prefix = f"{run_prefix}/{entry['prefix']}"
        files = {f["path"]: digest(f"{step_prefix}/{f['path']}") for f in entry["files"]}
        assert _remote_digest(row, files) == row.digest == entry["digest"]
        marker = json.loads(read(f"{step_prefix}/_COMPLETE"))
        assert marker["digest"] == row.digest
        assert sum(f["size"] for f in entry["files"]) == row.size_bytes
    steps_present = sorted({int(k.split("step-")[1][:8]) for k in keys if "/step-" in k})
    assert steps_present == kept_steps


class TestHappyPathThroughFaults:
    def test_five_checkpoints_survive_a_third_of_requests_failing(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Every checkpoint publishes through 503/500/resets, verified, with keep_last honoured."""
        rule = fault_proxy.add(FaultRule(TRANSIENT, every=3))
        store = S3Store(
            s3_bucket.name,
            endpoint_url=fault_proxy.url,
            part_size=8 * MiB,
            max_concurrency=4,
            max_attempts=6,
            retry_base_delay=0.01,
            retry_max_delay=0.1,
            retry_slowdown_delay=0.05,
            call_timeout=30.0,
        )
        uploader = CheckpointUploader("ckpts", store=store, keep_last=3)
        artifacts = _train(tmp_path, uploader)

        report = artifacts.drain_report
        assert report is not None
        assert report.ok, report.summary()
        assert len(artifacts.manifest) == 5
        assert artifacts.manifest[3].size_bytes == BIG
        summary = uploader.summary
        assert (summary.uploaded, summary.failed, summary.pruned) == (5, 0, 2)
        assert summary.bytes_uploaded == sum(row.size_bytes for row in artifacts.manifest)
        requests = fault_proxy.requests()
        faults = [r.fault for r in requests if r.fault is not None]
        assert len(faults) == rule.fired > 0
        # Every answered fault costs exactly one retry; a reset may instead be re-sent by
        # aiohttp itself (a dropped reused connection), which the store cannot count.
        assert faults.count("status") <= summary.retries <= rule.fired
        assert summary.retries == store.retries
        assert rule.fired == len(requests) // 3  # a third of all requests failed
        assert {"status", "reset_before_response", "reset_mid_body"} <= {r.fault for r in requests}
        assert len(fault_proxy.requests("PUT", r"partNumber=")) >= 8
        _check_published(
            artifacts.manifest,
            s3_bucket.list_keys(),
            s3_bucket.read,
            s3_bucket.digest,
            run_prefix=f"ckpts/{RUN}",
            kept_steps=[3, 4, 5],
        )
        assert s3_bucket.open_multipart_uploads() == []

    def test_the_same_run_against_the_local_store(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The local store publishes the same layout, verified, with keep_last honoured."""
        caplog.set_level(logging.INFO, logger="loopbridge.callbacks.checkpoint_uploader")
        remote = tmp_path / "remote"
        uploader = CheckpointUploader(remote.as_uri(), keep_last=3)
        artifacts = _train(tmp_path, uploader)
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        assert uploader.summary.uploaded == 5
        keys = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())

        def digest(key: str) -> str:
            return "blake3:" + blake3.blake3((remote / key).read_bytes()).hexdigest()

        _check_published(
            artifacts.manifest,
            keys,
            lambda key: (remote / key).read_bytes(),
            digest,
            run_prefix=RUN,
            kept_steps=[3, 4, 5],
        )
        assert not [key for key in keys if ".lb-tmp-" in key]
        # The summary is logged once the run's uploads are done, not before.
        assert f"({RUN}): 5 uploaded" in caplog.text


def _small_save(state: LoopState, path: Path) -> None:
    path.write_bytes(f"checkpoint {state.step}".encode() * 100)


class TestOrdering:
    def test_a_slow_checkpoint_still_publishes_before_a_later_fast_one(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Uploads overlap, but markers, manifest and latest follow the step order."""
        fault_proxy.add(FaultRule((Throttle(2 * MiB),), method="PUT", path="step-00000001/step-"))

        def save(state: LoopState, path: Path) -> None:
            path.write_bytes(os.urandom(MiB if state.step == 1 else 1000))

        uploader = CheckpointUploader(f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url)
        artifacts = _train(tmp_path, uploader, steps=3, save=save)
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report.summary()
        puts = [r.raw_path for r in fault_proxy.requests("PUT")]

        def first(fragment: str) -> int:
            return next(i for i, path in enumerate(puts) if fragment in path)

        # Step 2's bytes went up while step 1's were still crawling...
        assert first("step-00000002/step-00000002") < first("step-00000001/_COMPLETE")
        # ...but the publications kept the step order.
        assert (
            first("step-00000001/_COMPLETE")
            < first("step-00000002/_COMPLETE")
            < first("step-00000003/_COMPLETE")
        )
        latest = json.loads(s3_bucket.read(f"ckpts/{RUN}/latest"))
        assert latest["step"] == 3


class TestFailures:
    def test_permanent_403_is_reported_with_its_key_and_not_retried(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A 403 on one checkpoint fails it once, names the key, and later ones still publish."""
        fault_proxy.add(
            FaultRule(
                (Status(403, "AccessDenied", "Access Denied"),), method="PUT", path="step-00000002/"
            )
        )
        uploader = CheckpointUploader(f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url)
        artifacts = _train(tmp_path, uploader, steps=3, save=_small_save)

        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, PermanentStoreError)
        key = f"ckpts/{RUN}/step-00000002/step-00000002"
        assert error.key == key
        assert f"s3://{s3_bucket.name}/{key}" in str(error)
        assert "AccessDenied" in str(error)
        assert len(fault_proxy.requests("PUT", "step-00000002/")) == 1
        assert uploader.summary.failed == 1
        assert uploader.summary.uploaded == 2
        manifest = json.loads(s3_bucket.read(f"ckpts/{RUN}/manifest.json"))
        assert [entry["step"] for entry in manifest["checkpoints"]] == [1, 3]
        assert json.loads(s3_bucket.read(f"ckpts/{RUN}/latest"))["step"] == 3
        assert not [k for k in s3_bucket.list_keys() if "step-00000002" in k]

    def test_a_server_that_never_answers_cannot_outlast_the_drain(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """The drain returns by its deadline and names the upload still waiting on the server."""
        fault_proxy.add(FaultRule((Hang(),)))
        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts",
            endpoint_url=fault_proxy.url,
            call_timeout=60.0,
            preflight=False,  # the server hangs from the start: the pre-flight would say so
        )
        started = time.monotonic()
        artifacts = _train(
            tmp_path, uploader, steps=1, save=_small_save, drain_timeout=1.0, interrupt_grace=2.0
        )
        elapsed = time.monotonic() - started
        report = artifacts.drain_report
        assert report is not None
        assert report.timed_out
        unfinished = [record.name for record in (*report.pending, *report.cancelled)]
        # The upload, and the summary log queued behind it on the run's key.
        assert sorted(unfinished) == [
            f"log upload summary of {RUN}",
            f"upload step 1 to s3://{s3_bucket.name}/ckpts/{RUN}",
        ]
        # The deadline, plus the grace given to cancelled work, plus slack for a busy machine.
        assert elapsed < 1.0 + 2.0 + 3.0
        assert uploader.summary.uploaded == 0
        assert s3_bucket.list_keys() == []

    def test_a_checkpoint_deleted_mid_upload_is_not_published(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Deleting the local file while its parts are in flight fails the upload, unpublished."""
        fault_proxy.add(FaultRule((Throttle(16 * MiB),), method="PUT", path="partNumber="))
        arrived = fault_proxy.arrived("PUT", "partNumber=")
        checkpoint = tmp_path / "out" / "checkpoints" / "step-00000001"

        def delete_when_parts_arrive() -> None:
            if arrived.wait(30):
                checkpoint.unlink()

        deleter = threading.Thread(target=delete_when_parts_arrive, daemon=True)
        deleter.start()

        def save(state: LoopState, path: Path) -> None:
            path.write_bytes(os.urandom(16 * MiB))

        # Without a snapshot the upload reads the original file itself (with one, deleting the
        # original is survived: tests/integration/test_snapshot_upload.py).
        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts",
            endpoint_url=fault_proxy.url,
            part_size=5 * MiB,
            snapshot=False,
        )
        artifacts = _train(tmp_path, uploader, steps=1, save=save)
        deleter.join(5)
        assert arrived.is_set()

        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, IntegrityError)
        assert "deleted while it was uploaded" in str(error)
        assert uploader.summary.failed == 1
        assert s3_bucket.list_keys() == []
        assert s3_bucket.open_multipart_uploads() == []

    def test_a_shard_changed_after_save_is_not_published(self, tmp_path: Path) -> None:
        """A shard rewritten between save and upload breaks the digest: no marker, no manifest."""

        class Tamper(lb.Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                (row.path / "a.bin").write_bytes(b"tampered")

        def save(state: LoopState, path: Path) -> None:
            path.mkdir()
            (path / "a.bin").write_bytes(b"original")

        remote = tmp_path / "remote"
        uploader = CheckpointUploader(str(remote))
        artifacts = _train(tmp_path, uploader, steps=1, save=save, before=(Tamper(),))
        report = artifacts.drain_report
        assert report is not None
        assert len(report.failed) == 1
        assert isinstance(report.failed[0].exception, IntegrityError)
        assert [p for p in remote.rglob("*") if p.is_file()] == []

    @pytest.mark.parametrize("snapshot", [True, False])
    def test_a_file_rewritten_after_save_is_not_published(
        self, tmp_path: Path, s3_bucket: S3Bucket, snapshot: bool
    ) -> None:
        """A file rewritten (same size) between its save and its upload is refused against
        its stamp at save time: the bytes went up, but nothing is published or left."""

        class Tamper(lb.Callback):
            def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
                row.path.write_bytes(b"tampered")
                os.utime(row.path, ns=(1, 1))  # not the save's mtime, however coarse the clock

        def save(state: LoopState, path: Path) -> None:
            path.write_bytes(b"original")

        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=s3_bucket.endpoint, snapshot=snapshot
        )
        report = _train(tmp_path, uploader, steps=1, save=save, before=(Tamper(),)).drain_report
        assert report is not None
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert isinstance(error, IntegrityError)
        assert "modified after it was saved" in str(error)
        assert s3_bucket.list_keys() == []

    @pytest.mark.parametrize("refused", ["manifest.json", "latest"])
    def test_a_step_refused_after_its_marker_is_left_out_of_later_manifests(
        self, tmp_path: Path, s3_bucket: S3Bucket, fault_proxy: FaultProxy, refused: str
    ) -> None:
        """A publish that fails part-way (its manifest or `latest` refused) fails that step,
        and the next step's manifest lists only what was published."""
        denied = Status(403, "AccessDenied", "Access Denied")
        fault_proxy.add(FaultRule((denied,), method="PUT", path=rf"/{refused}$", times=1))
        uploader = CheckpointUploader(
            f"s3://{s3_bucket.name}/ckpts", endpoint_url=fault_proxy.url, max_attempts=1
        )
        report = _train(tmp_path, uploader, steps=2).drain_report
        assert report is not None
        assert [type(f.exception) for f in report.failed] == [PermanentStoreError]
        manifest = json.loads(s3_bucket.read(f"ckpts/{RUN}/manifest.json"))
        assert [entry["step"] for entry in manifest["checkpoints"]] == [2]
        assert json.loads(s3_bucket.read(f"ckpts/{RUN}/latest"))["step"] == 2
        assert not any("/step-00000001/" in key for key in s3_bucket.list_keys())


class TestConstruction:
    def test_bad_destinations_fail_in_init(self) -> None:
        """dest and keep_last are checked on the caller's thread, with the fix in the message."""
        with pytest.raises(ValueError, match="no bucket"):
            CheckpointUploader("s3:///x")
        with pytest.raises(ValueError, match="keep_last=0"):
            CheckpointUploader("s3://bucket/x", keep_last=0)
        with pytest.raises(ValueError, match="unsafe object key part"):
            CheckpointUploader("a/../b", store=LocalStore("/tmp"))

    def test_an_experiment_uploads_under_experiment_arm_and_run(self, tmp_path: Path) -> None:
        """Through an Experiment, each run's checkpoints land under <exp>/<arm>/<run>/."""
        remote = tmp_path / "remote"
        uploader = CheckpointUploader(str(remote))

        def build(ctx: lb.LogContext) -> lb.TrainLoop:
            return lb.TrainLoop(
                _step,
                range(2),
                max_steps=2,
                out_dir=tmp_path / "out" / str(ctx.run_name),
                save=_small_save,
                checkpoint_every=1,
            )

        result = lb.Experiment(
            "sweep",
            {"lr/0.1": {"lr": 0.1}, "big": {"lr": 1.0}},
            build,
            n_repeats=2,
            callbacks=[uploader],
        ).run()
        assert result.ok
        runs = sorted(p.parent.relative_to(remote).as_posix() for p in remote.rglob("latest"))
        assert runs == [
            "sweep/big/big-r0",
            "sweep/big/big-r1",
            "sweep/lr%2F0.1/lr%2F0.1-r0",
            "sweep/lr%2F0.1/lr%2F0.1-r1",
        ]
        assert uploader.summary.uploaded == 8

    def test_layout_follows_the_experiment(self, tmp_path: Path) -> None:
        """Within an experiment, keys are <prefix>/<experiment>/<arm>/<run>/step-N."""
        uploader = CheckpointUploader(str(tmp_path))
        uploader.on_run_start(
            lb.LogContext(experiment_name="exp 1", arm_name="lr/0.1", run_name="r0")
        )
        state = LoopState(run_name="r0", run_id="x", max_steps=1, out_dir=tmp_path)
        assert uploader.run_prefix(state) == "exp%201/lr%2F0.1/r0"
        # The next arm, then no experiment at all: each asked again, each its own prefix.
        uploader.on_run_start(lb.LogContext(experiment_name="exp 1", arm_name="big"))
        assert uploader.run_prefix(state) == "exp%201/big/r0"
        uploader.on_run_end(lb.LogContext(experiment_name="exp 1"), None, None)  # type: ignore[arg-type]
        assert uploader.run_prefix(state) == "r0"
        other = LoopState(run_name="r1", run_id="y", max_steps=1, out_dir=tmp_path)
        assert uploader.run_prefix(other) == "r1"
