"""Two ranks under a real `torchrun` (gloo, CPU): who uploads, who logs, who publishes, and when.

Each test launches `torchrun --nproc-per-node 2` on `ranks_worker.py` against moto through the
fault proxy (which counts the requests and injects the faults), and reads the store, the
dashboard, MLflow and each rank's result file afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from tests.fixtures.http import DashboardServer
from tests.fixtures.mlflow import MLflowServer
from tests.fixtures.s3 import FaultProxy, FaultRule, S3Bucket, Status, Throttle
from tests.integration.torchrun_job import (
    WAIT,
    TorchrunJob,
    logged_as_one_run,
    put_count,
    resume_cli,
    sha256_of,
)

WORKER = Path(__file__).with_name("ranks_worker.py")
RUN = "dist-run"


class Job(TorchrunJob):
    """A job of ranks_worker.py, each rank in its own out dir."""

    def __init__(self, base: Path, **config: Any) -> None:
        super().__init__(WORKER, base, **config)

    def out_dir(self, rank: int) -> Path:
        """A rank's out dir."""
        return self.base / f"rank-{rank}"


class TestRankZeroSaves:
    def test_uploaded_once_by_rank_zero_and_logged_once(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        dashboard_server: DashboardServer,
        mlflow_server: MLflowServer,
        tmp_path: Path,
    ) -> None:
        """DDP: rank 0 uploads each checkpoint once; one dashboard run, one MLflow run."""
        experiment = f"ddp-{uuid.uuid4().hex[:8]}"
        job = Job(
            tmp_path,
            mode="zero",
            dest=f"s3://{s3_bucket.name}/ddp",
            endpoint=fault_proxy.url,
            dashboard=dashboard_server.url,
            mlflow=mlflow_server.url,
            experiment=experiment,
            steps=4,
            checkpoint_every=2,
        )
        assert job.wait() == 0, job.output()
        assert job.result(0)["ok"], job.output()
        assert job.result(1)["ok"], job.output()
        assert job.result(1)["uploaded"] == 0
        for step in (2, 4):
            key = f"ddp/{RUN}/step-{step:08d}/step-{step:08d}"
            assert put_count(fault_proxy, key) == 1
            local = job.out_dir(0) / "checkpoints" / f"step-{step:08d}"
            assert s3_bucket.sha256(key) == sha256_of(local)
            # Rank 1 saved a different file; it went nowhere.
            other = job.out_dir(1) / "checkpoints" / f"step-{step:08d}"
            assert sha256_of(other) != sha256_of(local)
        assert len(fault_proxy.requests("PUT", r"/latest")) == 2
        assert not list(job.out_dir(1).glob("upload-journal*"))
        # One dashboard run with every step once, in order; one MLflow run.
        steps = logged_as_one_run(dashboard_server, mlflow_server, experiment)
        assert steps == [1, 2, 3, 4]
        # The default JsonlLogger wrote on rank 0 only; every_rank() tags each rank's rows.
        assert (job.out_dir(0) / "events.jsonl").exists()
        assert not (job.out_dir(1) / "events.jsonl").exists()
        for rank in (0, 1):
            rows = (tmp_path / f"all-ranks-{rank}.jsonl").read_text().splitlines()
            assert rows
            assert {json.loads(row)["rank"] for row in rows} == {rank}


class TestSharded:
    def test_every_rank_uploads_and_rank_zero_publishes_last(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Both ranks' shards are stored intact; each step is published once, after both."""
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/sh",
            endpoint=fault_proxy.url,
            steps=4,
            checkpoint_every=2,
        )
        assert job.wait() == 0, job.output()
        assert job.result(0)["ok"], job.output()
        assert job.result(1)["ok"], job.output()
        for step in (2, 4):
            step_dir = f"step-{step:08d}"
            prefix = f"sh/{RUN}/{step_dir}"
            for rank in (0, 1):
                name = f"shard-{rank:05d}.bin"
                local = job.out_dir(rank) / "checkpoints" / step_dir / name
                assert s3_bucket.sha256(f"{prefix}/{name}") == sha256_of(local)
            assert put_count(fault_proxy, f"{prefix}/_COMPLETE") == 1
            complete = json.loads(s3_bucket.read(f"{prefix}/_COMPLETE"))
            assert sorted(f["path"] for f in complete["files"]) == [
                "meta.json",
                "shard-00000.bin",
                "shard-00001.bin",
            ]
            finished = [
                json.loads(s3_bucket.read(f"{prefix}/_RANK-{rank:05d}.json"))["finished_at"]
                for rank in (0, 1)
            ]
            assert complete["uploaded_at"] >= max(finished)
        assert put_count(fault_proxy, f"sh/{RUN}/latest") == 2
        latest = json.loads(s3_bucket.read(f"sh/{RUN}/latest"))
        assert latest["step"] == 4
        manifest = json.loads(s3_bucket.read(f"sh/{RUN}/manifest.json"))
        assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]

    def test_a_rank_killed_mid_upload_leaves_the_step_unpublished_until_resumed(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """SIGKILL on rank 1 mid-upload: nothing published; resume on both out dirs publishes."""
        fault_proxy.add(FaultRule((Throttle(16 * 1024),), method="PUT", path=r"shard-00001"))
        arrived = fault_proxy.arrived("PUT", r"shard-00001")
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/kill",
            endpoint=fault_proxy.url,
            steps=2,
            checkpoint_every=100,  # only the final checkpoint, at step 2
            shard_bytes=256 * 1024,
        )
        assert arrived.wait(WAIT), job.output()
        os.kill(job.pid(1), signal.SIGKILL)
        assert job.wait() != 0
        prefix = f"kill/{RUN}"
        keys = s3_bucket.list_keys(prefix)
        assert not [k for k in keys if k.endswith(("/_COMPLETE", "/latest", "/manifest.json"))]
        assert f"{prefix}/step-00000002/shard-00001.bin" not in keys
        fault_proxy.clear()
        for rank in (1, 0):  # the publisher last, so it finds rank 1's marker at once
            done = resume_cli(job.out_dir(rank))
            assert done.returncode == 0, done.stdout + done.stderr
        step_prefix = f"{prefix}/step-00000002"
        complete = json.loads(s3_bucket.read(f"{step_prefix}/_COMPLETE"))
        assert len(complete["files"]) == 3
        for rank in (0, 1):
            name = f"shard-{rank:05d}.bin"
            local = job.out_dir(rank) / "checkpoints" / "step-00000002" / name
            assert s3_bucket.sha256(f"{step_prefix}/{name}") == sha256_of(local)
        assert json.loads(s3_bucket.read(f"{prefix}/latest"))["step"] == 2

    def test_a_permanent_failure_on_rank_one_fails_rank_zero_naming_it(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """403 on rank 1's shard: rank 0's run fails, its report names rank 1 and the file."""
        denied = Status(403, "AccessDenied", "Access Denied")
        fault_proxy.add(FaultRule((denied,), method="PUT", path=r"shard-00001"))
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/deny",
            endpoint=fault_proxy.url,
            steps=2,
            checkpoint_every=100,
        )
        assert job.wait() != 0
        result = job.result(0)
        assert not result["ok"]
        error = result["error"]
        assert "rank 1 failed to upload its files (shard-00001.bin)" in error, error
        assert "rank 1: upload step 2" in error, error
        assert not job.result(1)["ok"]
        keys = s3_bucket.list_keys(f"deny/{RUN}")
        assert not [k for k in keys if k.endswith(("/_COMPLETE", "/latest"))]
