"""`loopbridge demo` end to end: its store, manifests, `latest` and logs are complete and right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest
from tests.fixtures.http import DashboardServer
from tests.fixtures.mlflow import MLflowServer
from tests.fixtures.s3 import S3Bucket

from loopbridge._demo import main

# Short settings: 4 runs of up to 40 steps, a checkpoint every 10 steps of 256 KiB.
SHORT = [
    "--steps",
    "40",
    "--checkpoint-mb",
    "0.25",
    "--checkpoint-every",
    "10",
    "--eval-every",
    "5",
    "--patience",
    "2",
    "--step-ms",
    "0",
    "--no-progress",
]


def digest(path: Path) -> str:
    """A file's digest as loopbridge names it, `blake3:<hex>`, computed here."""
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_run_in_store(store_run: Path, local_run: Path) -> list[int]:
    """Assert one run's store matches its local checkpoints; return the steps checked."""
    local_rows = read_jsonl(local_run / "manifest.jsonl")
    assert local_rows, f"{local_run} saved no checkpoints"
    manifest = json.loads((store_run / "manifest.json").read_text())
    entries = {entry["step"]: entry for entry in manifest["checkpoints"]}
    assert sorted(entries) == [row["step"] for row in local_rows]
    for row in local_rows:
        local_file = Path(row["path"])
        step_dir = store_run / f"step-{row['step']:08d}"
        stored = step_dir / local_file.name
        # Recomputed from the bytes on both sides, not taken from either manifest.
        assert digest(stored) == digest(local_file) == row["digest"]
        assert entries[row["step"]]["digest"] == row["digest"]
        assert entries[row["step"]]["size_bytes"] == local_file.stat().st_size
        marker = json.loads((step_dir / "_COMPLETE").read_text())
        assert marker["digest"] == row["digest"]
    latest = json.loads((store_run / "latest").read_text())
    newest = local_rows[-1]
    assert newest["is_final"]
    assert latest["step"] == newest["step"]
    assert latest["digest"] == newest["digest"]
    return [row["step"] for row in local_rows]


class TestDemo:
    """The demo, run as the CLI runs it, leaves a complete and verifiable store."""

    def test_store_and_logs_are_complete(self, tmp_path: Path) -> None:
        """Every checkpoint of every run is in the store with matching digests; logs complete."""
        out = tmp_path / "demo"
        command = [sys.executable, "-m", "loopbridge.cli", "demo", "--out", str(out)]
        done = subprocess.run(
            [*command, "--name", "ci", *SHORT],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "nothing lost:" in done.stdout
        assert "early stop" in done.stdout

        runs = sorted(p.name for p in (out / "ci" / "runs").iterdir())
        assert runs == ["hot-r0", "hot-r1", "steady-r0", "steady-r1"]
        events = read_jsonl(out / "ci" / "events.jsonl")
        stopped_early = 0
        for run in runs:
            arm = run.split("-")[0]
            local_run = out / "ci" / "runs" / run
            steps = check_run_in_store(out / "store" / "ci" / arm / run, local_run)
            metric_rows = [r for r in read_jsonl(local_run / "metrics.jsonl") if "eval" not in r]
            completed = len(metric_rows)
            assert steps[-1] == completed
            logged = [e["step"] for e in events if e["run"] == run and e["kind"] == "step"]
            assert logged == list(range(1, completed + 1))
            kinds = {e["kind"] for e in events if e["run"] == run}
            assert kinds == {"train_start", "step", "eval", "checkpoint", "train_end", "benchmark"}
            stopped_early += completed < 40
        assert stopped_early >= 1

    def test_lost_uploads_give_a_nonzero_exit(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A store that cannot be written fails the run before training (the pre-flight);
        the demo says why and exits 1."""
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the store's directory should be")
        code = main(
            [
                "--out",
                str(tmp_path / "demo"),
                "--store",
                str(blocker / "store"),
                "--repeats",
                "1",
                "--arms",
                "steady",
                *SHORT,
            ]
        )
        assert code == 1
        out = capsys.readouterr().out
        assert "LOST OR UNVERIFIED" in out
        assert f"DestinationError: checkpoint destination {blocker / 'store'}" in out
        assert f"{blocker} is a regular file" in out
        assert "nothing lost" not in out


class TestDemoRemote:
    """With --store s3://... and --dashboard, the same demo goes to real servers on loopback."""

    def test_s3_store_and_dashboard(
        self,
        tmp_path: Path,
        s3_bucket: S3Bucket,
        dashboard_server: DashboardServer,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Every checkpoint lands in the bucket with the local bytes; every step is posted."""
        out = tmp_path / "demo"
        code = main(
            [
                "--out",
                str(out),
                "--name",
                "s3demo",
                "--store",
                f"s3://{s3_bucket.name}/demos",
                "--endpoint-url",
                s3_bucket.endpoint,
                "--dashboard",
                dashboard_server.url,
                "--repeats",
                "1",
                *SHORT,
            ]
        )
        assert code == 0, capsys.readouterr().out
        steps_posted = [e for e in dashboard_server.events() if e["type"] == "step"]
        total_steps = 0
        for run in ("steady", "hot"):
            local_run = out / "s3demo" / "runs" / run
            prefix = f"demos/s3demo/{run}/{run}"
            manifest = json.loads(s3_bucket.read(f"{prefix}/manifest.json"))
            local_rows = read_jsonl(local_run / "manifest.jsonl")
            assert [e["step"] for e in manifest["checkpoints"]] == [r["step"] for r in local_rows]
            for row in local_rows:
                name = Path(row["path"]).name
                key = f"{prefix}/step-{row['step']:08d}/{name}"
                assert s3_bucket.digest(key) == digest(Path(row["path"]))
            latest = json.loads(s3_bucket.read(f"{prefix}/latest"))
            assert latest["step"] == local_rows[-1]["step"]
            total_steps += local_rows[-1]["step"]
        assert len(steps_posted) == total_steps

    def test_mlflow(
        self, tmp_path: Path, mlflow_server: MLflowServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With --mlflow, each run is a finished MLflow run with its params and metrics."""
        code = main(
            [
                "--out",
                str(tmp_path / "demo"),
                "--name",
                "mlf",
                "--mlflow",
                mlflow_server.url,
                "--repeats",
                "1",
                *SHORT,
            ]
        )
        assert code == 0, capsys.readouterr().out
        experiment = mlflow_server.api("experiments/get-by-name", experiment_name="mlf")
        found = mlflow_server.post(
            "runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
        )
        runs = {run["info"]["run_name"]: run for run in found["runs"]}
        assert set(runs) == {"steady", "hot"}
        for run in runs.values():
            assert run["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert "lr" in params
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"loss", "val/loss", "bench/heldout/class_0/acc"} <= metrics
