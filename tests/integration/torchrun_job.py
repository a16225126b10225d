"""A `torchrun --nproc-per-node 2` job launched from a test, and helpers to check what it left.

Shared by the distributed tests (test_distributed.py, test_lightning_ranks.py): the worker
script gets one argument, a JSON config written into the job's base dir (with `base` added),
and each rank writes `base/pid-<rank>` as it starts and `base/result-<rank>.json` at its end.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from tests.fixtures.http import DashboardServer
from tests.fixtures.mlflow import MLflowServer
from tests.fixtures.s3 import FaultProxy

TORCHRUN = Path(sys.executable).with_name("torchrun")
WAIT = 90.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun_command(worker: Path, *args: str) -> list[str]:
    """`torchrun` with two CPU ranks on loopback, running `worker` with `args`."""
    return [
        str(TORCHRUN),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(worker),
        *args,
    ]


class TorchrunJob:
    """A `torchrun --nproc-per-node 2` job of `worker`, its config and its output."""

    def __init__(self, worker: Path, base: Path, **config: Any) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.config = {"base": str(base), **config}
        config_path = base / "config.json"
        config_path.write_text(json.dumps(self.config))
        self.log = base / "torchrun.log"
        command = torchrun_command(worker, str(config_path))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> int:
        """Wait for torchrun to exit; its exit code."""
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"torchrun did not finish within {WAIT}s:\n{self.output()}")

    def output(self) -> str:
        """The tail of torchrun's and the ranks' output."""
        return self.log.read_text(errors="replace")[-6000:]

    def pid(self, rank: int) -> int:
        """The pid a rank wrote as it started."""
        return int((self.base / f"pid-{rank}").read_text())

    def result(self, rank: int) -> dict[str, Any]:
        """What a rank wrote about its run."""
        path = self.base / f"result-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result:\n{self.output()}"
        data: dict[str, Any] = json.loads(path.read_text())
        return data


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a local file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resume_cli(out_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run `loopbridge resume OUT_DIR` in a subprocess, as a user would after the crash."""
    return subprocess.run(
        [sys.executable, "-m", "loopbridge.cli", "resume", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def logged_as_one_run(
    dashboard: DashboardServer, mlflow: MLflowServer, experiment: str
) -> list[int]:
    """Check the ranks logged one dashboard run and one FINISHED MLflow run; return the
    dashboard's step numbers, in the order posted."""
    runs = {post.json()["run"]["run_id"] for post in dashboard.posts()}
    assert len(runs) == 1
    found = mlflow.api("experiments/get-by-name", experiment_name=experiment)
    experiment_id = found["experiment"]["experiment_id"]
    listed = mlflow.post("runs/search", {"experiment_ids": [experiment_id]})
    assert [run["info"]["status"] for run in listed["runs"]] == ["FINISHED"]
    return [e["step"] for e in dashboard.events() if e["type"] == "step"]


def put_count(proxy: FaultProxy, key: str) -> int:
    """How many PUTs of exactly `key` reached the proxy (whose paths are URL-quoted)."""
    quoted = urllib.parse.quote(key, safe="/~")  # as botocore quotes a key: `=` is %3D
    return len(proxy.requests("PUT", rf"/{re.escape(quoted)}(\?|$)"))
