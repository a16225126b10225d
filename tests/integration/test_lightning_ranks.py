"""Lightning's `Trainer(strategy="ddp")` with loopbridge under a real `torchrun` (2 CPU ranks).

Each test launches `torchrun --nproc-per-node 2` on `lightning_ranks_worker.py`: both ranks
share one `default_root_dir`, as Lightning has it. The uploads go to moto through the fault
proxy, which counts the requests and injects the faults. In "sharded" mode every rank writes
torch.distributed.checkpoint files (`__<rank>_0.distcp`) into the same step directory and
rank 0 adds `.metadata` and `meta.pt`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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

WORKER = Path(__file__).with_name("lightning_ranks_worker.py")
RUN = "pl-ranks"
SHARD_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
_LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}


class Job(TorchrunJob):
    """A job of lightning_ranks_worker.py; both ranks in `base/out`."""

    def __init__(self, base: Path, **config: Any) -> None:
        super().__init__(WORKER, base, **config)
        self.out = base / "out"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint ModelCheckpoint wrote at `step` (a file, or a directory of shards)."""
        return self.out / "checkpoints" / f"epoch=0-step={step}.ckpt"


def _seen_steps(result: dict[str, Any]) -> list[int]:
    return [int(row["step"]) for row in result["seen"]]


class TestRankZeroSaves:
    def test_uploaded_once_by_rank_zero_and_logged_once(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        dashboard_server: DashboardServer,
        mlflow_server: MLflowServer,
        tmp_path: Path,
    ) -> None:
        """DDP: rank 0's hooks see each checkpoint once and upload it once; rank 1's see none."""
        experiment = f"pl-ddp-{uuid.uuid4().hex[:8]}"
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
        rank0, rank1 = job.result(0), job.result(1)
        assert rank0["ok"], job.output()
        assert rank1["ok"], job.output()
        # Both ranks fire hooks (all_ranks=True), but only rank 0 wrote a checkpoint.
        assert _seen_steps(rank0) == [2, 4]
        assert rank1["seen"] == []
        assert rank1["uploaded"] == 0
        for step in (2, 4):
            local = job.checkpoint(step)
            key = f"ddp/lightning/{RUN}/step-{step:08d}/{local.name}"
            assert put_count(fault_proxy, key) == 1
            assert s3_bucket.sha256(key) == sha256_of(local)
        assert put_count(fault_proxy, f"ddp/lightning/{RUN}/latest") == 2
        assert json.loads(s3_bucket.read(f"ddp/lightning/{RUN}/latest"))["step"] == 4
        assert not list(job.out.glob("upload-journal.rank-*"))
        # One dashboard run with every step once; one MLflow run.
        steps = logged_as_one_run(dashboard_server, mlflow_server, experiment)
        assert sorted(steps) == sorted(set(steps))
        assert len(steps) == 4


class TestSharded:
    def test_every_rank_uploads_its_files_and_rank_zero_publishes_last(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """Shared step dirs: each rank uploads its own files; each step published once, last."""
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/sh",
            endpoint=fault_proxy.url,
            steps=4,
            checkpoint_every=2,
        )
        assert job.wait() == 0, job.output()
        rank0, rank1 = job.result(0), job.result(1)
        assert rank0["ok"], job.output()
        assert rank1["ok"], job.output()
        # Each rank's hooks saw each save once: the directory, after every rank finished it
        # (Lightning's barrier), so each rank's row of the whole directory has its digest.
        assert _seen_steps(rank0) == _seen_steps(rank1) == [2, 4]
        for result in (rank0, rank1):
            assert len(result["digests"]) == 2
            assert all(str(digest).startswith("blake3:") for digest in result["digests"])
        prefix = f"sh/lightning/{RUN}"
        for step in (2, 4):
            local = job.checkpoint(step)
            assert sorted(p.name for p in local.iterdir()) == SHARD_FILES
            step_prefix = f"{prefix}/step-{step:08d}"
            for name in SHARD_FILES:
                key = f"{step_prefix}/{name}"
                assert put_count(fault_proxy, key) == 1, key
                assert s3_bucket.sha256(key) == sha256_of(local / name)
            owned = {
                rank: sorted(
                    f["path"]
                    for f in json.loads(s3_bucket.read(f"{step_prefix}/_RANK-{rank:05d}.json"))[
                        "files"
                    ]
                )
                for rank in (0, 1)
            }
            assert owned == {0: [".metadata", "__0_0.distcp", "meta.pt"], 1: ["__1_0.distcp"]}
            assert put_count(fault_proxy, f"{step_prefix}/_COMPLETE") == 1
            complete = json.loads(s3_bucket.read(f"{step_prefix}/_COMPLETE"))
            assert sorted(f["path"] for f in complete["files"]) == SHARD_FILES
            finished = [
                json.loads(s3_bucket.read(f"{step_prefix}/_RANK-{rank:05d}.json"))["finished_at"]
                for rank in (0, 1)
            ]
            assert complete["uploaded_at"] >= max(finished)
        assert put_count(fault_proxy, f"{prefix}/latest") == 2
        assert json.loads(s3_bucket.read(f"{prefix}/latest"))["step"] == 4
        manifest = json.loads(s3_bucket.read(f"{prefix}/manifest.json"))
        assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
        # One journal per rank in the shared out dir; no part snapshot left behind.
        journals = sorted(p.name for p in job.out.glob("upload-journal*.sqlite3"))
        assert journals == ["upload-journal.rank-00001.sqlite3", "upload-journal.sqlite3"]
        assert not list((job.out / "checkpoints" / ".loopbridge-snapshots").glob("*/*"))

    def test_rank_one_killed_mid_upload_leaves_the_step_unpublished_until_resumed(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """SIGKILL on rank 1 mid-upload: nothing published; one `loopbridge resume` publishes."""
        fault_proxy.add(FaultRule((Throttle(16 * 1024),), method="PUT", path=r"__1_0\.distcp"))
        arrived = fault_proxy.arrived("PUT", r"__1_0\.distcp")
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/kill",
            endpoint=fault_proxy.url,
            steps=2,
            checkpoint_every=2,
            layers=8,  # about 270 KB per rank's file: many seconds at the throttled rate
            drain_timeout=10.0,
        )
        assert arrived.wait(WAIT), job.output()
        os.kill(job.pid(1), signal.SIGKILL)
        assert job.wait() != 0
        prefix = f"kill/lightning/{RUN}"
        keys = s3_bucket.list_keys(prefix)
        assert not [k for k in keys if k.endswith(("/_COMPLETE", "/latest", "/manifest.json"))]
        assert f"{prefix}/step-00000002/__1_0.distcp" not in keys
        fault_proxy.clear()
        done = resume_cli(job.out)  # both ranks' journals are in the shared out dir
        assert done.returncode == 0, done.stdout + done.stderr
        step_prefix = f"{prefix}/step-00000002"
        complete = json.loads(s3_bucket.read(f"{step_prefix}/_COMPLETE"))
        assert sorted(f["path"] for f in complete["files"]) == SHARD_FILES
        local = job.checkpoint(2)
        for name in SHARD_FILES:
            assert s3_bucket.sha256(f"{step_prefix}/{name}") == sha256_of(local / name)
        assert json.loads(s3_bucket.read(f"{prefix}/latest"))["step"] == 2

    def test_a_permanent_failure_on_rank_one_fails_rank_zeros_fit_naming_it(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """403 on rank 1's shard: DrainError out of rank 0's fit, naming rank 1 and its file."""
        denied = Status(403, "AccessDenied", "Access Denied")
        fault_proxy.add(FaultRule((denied,), method="PUT", path=r"__1_0\.distcp"))
        job = Job(
            tmp_path,
            mode="sharded",
            dest=f"s3://{s3_bucket.name}/deny",
            endpoint=fault_proxy.url,
            steps=2,
            checkpoint_every=2,
        )
        assert job.wait() != 0
        result = job.result(0)
        assert not result["ok"]
        error = result["error"]
        assert "DrainError" not in error, error  # it was a DrainError, caught as such
        assert "rank 1 failed to upload its files (__1_0.distcp)" in error, error
        assert "rank 1: upload step 2" in error, error
        assert not job.result(1)["ok"]
        keys = s3_bucket.list_keys(f"deny/lightning/{RUN}")
        assert not [k for k in keys if k.endswith(("/_COMPLETE", "/latest"))]


class TestRefused:
    def test_a_sharded_uploader_without_all_ranks_is_refused_on_every_rank(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """all_ranks=False would leave rank 1 silent: both ranks fail at setup, naming the fix."""
        job = Job(
            tmp_path,
            mode="sharded",
            all_ranks=False,
            dest=f"s3://{s3_bucket.name}/refused",
            endpoint=fault_proxy.url,
            steps=2,
        )
        assert job.wait() != 0
        for rank in (0, 1):
            error = job.result(rank)["error"]
            assert error.startswith("ValueError: LoopbridgeCallback(all_ranks=False)"), error
            assert "CheckpointUploader(" in error, error
            assert "ranks='sharded'" in error, error
            assert "Pass LoopbridgeCallback(..., all_ranks=True)" in error, error
            assert job.result(rank)["seen"] == []
        assert s3_bucket.list_keys("refused") == []

    def test_all_ranks_under_lightnings_own_launcher_is_refused(self, tmp_path: Path) -> None:
        """Without torchrun the ranks are unknown when the callbacks are made: refused."""
        config = tmp_path / "config.json"
        config.write_text(
            json.dumps(
                {"base": str(tmp_path), "mode": "zero", "dest": str(tmp_path / "store"), "steps": 2}
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
        done = subprocess.run(
            [sys.executable, str(WORKER), str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert done.returncode != 0
        for rank, seen_as in ((0, "rank 0/1"), (1, "rank 0/2")):
            path = tmp_path / f"result-{rank}.json"
            assert path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
            error = json.loads(path.read_text())["error"]
            assert f"the callbacks took this process for {seen_as}" in error, error
            assert f"Lightning runs it as rank {rank}/2" in error, error
            assert "Launch the job with torchrun" in error, error
        assert not (tmp_path / "store").exists()
