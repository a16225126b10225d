"""MLflowLogger against a real `mlflow server` (sqlite backend, proxied artifacts)."""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fixtures.mlflow import MLFLOW_BUCKET, MLflowServer

import loopbridge as lb
from loopbridge.callbacks._http import HttpRetryPolicy
from loopbridge.callbacks._mlflow_limits import MAX_KEY_CHARS
from loopbridge.callbacks.mlflow import MLflowLogger

N_STEPS = 12
FAST_RETRY = HttpRetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)


def loss_at(arm: str, repeat: int, step: int) -> float:
    """The loss a run logs at `step` (steps completed); NaN at step 5, inf at step 7."""
    if step == 5:
        return math.nan
    if step == 7:
        return math.inf
    return 1.0 / step + (0.5 if arm == "big" else 0.0) + repeat / 100


def as_number(value: Any) -> float:
    """MLflow returns non-finite values as strings; other values as numbers."""
    return float(value)


def stored(value: float) -> float:
    """What MLflow's SQL store keeps: NaN as NaN, but ±inf as ±float max (SQL has no inf)."""
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value


def history(server: MLflowServer, run_id: str, key: str) -> list[tuple[int, float]]:
    """The metric's (step, value) points, sorted by step."""
    found = server.api("metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
    points = [(int(m.get("step", 0)), as_number(m["value"])) for m in found.get("metrics", [])]
    return sorted(points)


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Equal point lists, NaN equal to NaN."""
    return len(a) == len(b) and all(
        sa == sb and (va == vb or (math.isnan(va) and math.isnan(vb)))
        for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


def search_runs(server: MLflowServer, experiment_id: str) -> list[dict[str, Any]]:
    """Every run of the experiment."""
    found = server.post("runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})
    runs: list[dict[str, Any]] = found.get("runs", [])
    return runs


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    """A run's tags as a dict."""
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict[str, Any]) -> dict[str, str]:
    """A run's params as a dict."""
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def build_loop(tmp_path: Path, *, fail_at: int | None = None) -> Any:
    """A `build(ctx)` for Experiment: a tiny loop with an evaluator and a benchmark."""

    def build(ctx: lb.LogContext) -> lb.TrainLoop:
        arm = ctx.arm_name or ""
        repeat = ctx.repeat_index or 0

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if fail_at is not None and state.step + 1 == fail_at:
                raise RuntimeError("diverged")
            return {"loss": loss_at(arm, repeat, state.step + 1), "lr": 0.1}

        def evaluate(state: lb.LoopState) -> dict[str, float]:
            return {"acc": state.step / N_STEPS}

        def bench(state: lb.LoopState) -> tuple[lb.EvalResult, list[dict[str, Any]]]:
            result = lb.EvalResult(
                "qa",
                {"score": state.step / 100},
                {"easy": {"score": 1.0}, "hard": {"score": 0.25}},
                {"dataset": "toy"},
            )
            return result, [{"id": i, "pred": f"p{i}", "step": state.step} for i in range(3)]

        return lb.TrainLoop(
            step,
            range(N_STEPS),
            max_steps=N_STEPS,
            out_dir=tmp_path / (ctx.run_name or "run"),
            evaluators={"val": evaluate},
            eval_every=6,
            benchmarks={"qa": bench},
        )

    return build


class TestExperiment:
    def test_two_arms_two_repeats(self, mlflow_server: MLflowServer, tmp_path: Path) -> None:
        """Experiment, groups, nested runs, params, exact histories, evals, benchmarks, status."""
        name = f"exp-{uuid.uuid4().hex[:8]}"
        logger = MLflowLogger(mlflow_server.url, retry=FAST_RETRY)
        arms = {
            "small": {"model": {"width": 64, "depth": 2}, "lr": 0.1},
            "big": {"model": {"width": 256, "depth": 4}, "lr": 0.05},
        }
        exp = lb.Experiment(
            name,
            arms=arms,
            build=build_loop(tmp_path),
            n_repeats=2,
            benchmarks={"qa": build_loop(tmp_path)(lb.LogContext("x")).benchmarks["qa"]},
            callbacks=[logger],
        )
        result = exp.run()
        assert result.ok, [r.drain_report for r in result.runs]

        found = mlflow_server.api("experiments/get-by-name", experiment_name=name)
        experiment_id = found["experiment"]["experiment_id"]
        assert result.ids["experiment_id"] == experiment_id
        runs = search_runs(mlflow_server, experiment_id)
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == {"small", "big", "small-r0", "small-r1", "big-r0", "big-r1"}

        for arm, config in arms.items():
            group = by_name[arm]
            assert result.ids[f"group:{arm}"] == group["info"]["run_id"]
            assert group["info"]["status"] == "FINISHED"
            for repeat in range(2):
                run = by_name[f"{arm}-r{repeat}"]
                run_id = run["info"]["run_id"]
                assert run["info"]["status"] == "FINISHED"
                assert tags_of(run)["mlflow.parentRunId"] == group["info"]["run_id"]
                params = params_of(run)
                assert params["model.width"] == str(config["model"]["width"])  # type: ignore[index]
                assert params["model.depth"] == str(config["model"]["depth"])  # type: ignore[index]
                assert params["lr"] == str(config["lr"])
                expected = [(s, stored(loss_at(arm, repeat, s))) for s in range(1, N_STEPS + 1)]
                got = history(mlflow_server, run_id, "loss")
                assert same(got, expected), f"{got} != {expected}"
                assert history(mlflow_server, run_id, "lr") == [
                    (s, 0.1) for s in range(1, N_STEPS + 1)
                ]
                assert history(mlflow_server, run_id, "val/acc") == [(6, 0.5), (12, 1.0)]
                # In-loop at steps 6 and 12, then once after training at the last step.
                assert history(mlflow_server, run_id, "bench/qa/score") == [
                    (6, 0.06),
                    (12, 0.12),
                    (12, 0.12),
                ]
                assert history(mlflow_server, run_id, "bench/qa/hard/score")[0] == (6, 0.25)
                assert tags_of(run)["bench.qa.dataset"] == "toy"
                listed = mlflow_server.api("artifacts/list", run_id=run_id, path="benchmarks/qa")
                files = sorted(f["path"] for f in listed["files"])
                assert files == [
                    "benchmarks/qa/final.json",
                    "benchmarks/qa/step-00000006.json",
                    "benchmarks/qa/step-00000012.json",
                ]
                body = download(mlflow_server, run_id, "benchmarks/qa/final.json")
                assert body["rows"][0] == {"id": 0, "pred": "p0", "step": 12}

    def test_a_run_that_raises_ends_failed(
        self, mlflow_server: MLflowServer, tmp_path: Path
    ) -> None:
        """A run whose step raises is FAILED, its group too; metrics before it are kept."""
        name = f"exp-{uuid.uuid4().hex[:8]}"
        exp = lb.Experiment(
            name,
            arms={"only": {"lr": 1.0}},
            build=build_loop(tmp_path, fail_at=4),
            n_repeats=2,
            callbacks=[MLflowLogger(mlflow_server.url, retry=FAST_RETRY)],
        )
        result = exp.run()
        assert [r.status for r in result.runs] == [lb.RunStatus.FAILED] * 2
        experiment_id = result.ids["experiment_id"]
        by_name = {r["info"]["run_name"]: r for r in search_runs(mlflow_server, experiment_id)}
        assert by_name["only-r0"]["info"]["status"] == "FAILED"
        assert by_name["only-r1"]["info"]["status"] == "FAILED"
        assert by_name["only"]["info"]["status"] == "FAILED"
        run_id = by_name["only-r0"]["info"]["run_id"]
        assert [s for s, _ in history(mlflow_server, run_id, "loss")] == [1, 2, 3]


class TestPlainLoop:
    def test_plain_train_loop_gets_experiment_and_run(
        self, mlflow_server: MLflowServer, tmp_path: Path
    ) -> None:
        """Without an Experiment the run is created at train start and FINISHED at train end."""
        name = f"plain-{uuid.uuid4().hex[:8]}"
        long_key = "k" * (MAX_KEY_CHARS + 30)
        long_value = "v" * 7000
        loop = lb.TrainLoop(
            lambda state, batch: {"loss": float(batch.data), long_key: 1.0},
            range(2500),
            out_dir=tmp_path,
            run_name="solo",
            config={"opt": {"name": "adam", "betas": [0.9, 0.99]}, "notes": long_value},
            callbacks=[MLflowLogger(mlflow_server.url, experiment_name=name, retry=FAST_RETRY)],
        )
        artifacts = loop.run()
        assert artifacts.drain_report is not None
        assert artifacts.drain_report.ok, artifacts.drain_report
        found = mlflow_server.api("experiments/get-by-name", experiment_name=name)
        runs = search_runs(mlflow_server, found["experiment"]["experiment_id"])
        assert len(runs) == 1
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        params = params_of(run)
        assert params["opt.name"] == "adam"
        assert params["opt.betas"] == "[0.9, 0.99]"
        assert params["notes"].startswith("v" * 100)
        assert "shortened from 7000 chars" in params["notes"]
        assert len(params["notes"]) <= 6000
        run_id = run["info"]["run_id"]
        # 2,500 steps x 2 metrics = 5,000 points: several log-batch requests, all points kept.
        assert history(mlflow_server, run_id, "loss") == [(s, float(s - 1)) for s in range(1, 2501)]
        tags = tags_of(run)
        originals = [v for k, v in tags.items() if k.startswith("loopbridge.original_key.")]
        assert originals == [long_key]
        short_keys = [k for k in run["data"]["metrics"] if k["key"].startswith("kkk")]
        assert len(short_keys) == 1
        assert len(short_keys[0]["key"]) <= MAX_KEY_CHARS
        full = download(mlflow_server, run_id, "loopbridge/long_values.json")
        assert full["param"]["notes"] == long_value

    def test_plain_loop_that_raises_ends_failed(
        self, mlflow_server: MLflowServer, tmp_path: Path
    ) -> None:
        """A plain loop whose step raises: its run is FAILED when the bridge closes."""
        name = f"plain-{uuid.uuid4().hex[:8]}"

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if state.step == 3:
                raise RuntimeError("diverged")
            return {"loss": 1.0}

        loop = lb.TrainLoop(
            step,
            range(10),
            out_dir=tmp_path,
            callbacks=[MLflowLogger(mlflow_server.url, experiment_name=name, retry=FAST_RETRY)],
        )
        with pytest.raises(RuntimeError, match="diverged"):
            loop.run()
        found = mlflow_server.api("experiments/get-by-name", experiment_name=name)
        (run,) = search_runs(mlflow_server, found["experiment"]["experiment_id"])
        assert run["info"]["status"] == "FAILED"
        assert [s for s, _ in history(mlflow_server, run["info"]["run_id"], "loss")] == [1, 2, 3]


def download(server: MLflowServer, run_id: str, path: str) -> Any:
    """An artifact of the run, parsed as JSON, through the proxied artifact API."""
    info = server.api("runs/get", run_id=run_id)["run"]["info"]
    root = info["artifact_uri"].split(":", 1)[1].strip("/")
    response = httpx.get(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{root}/{path}")
    response.raise_for_status()
    return response.json()


@pytest.fixture(autouse=True)
def _quiet_httpx(caplog: pytest.LogCaptureFixture) -> None:
    """httpx logs every request at INFO; keep failure output readable."""
    caplog.set_level("WARNING", logger="httpx")


class TestArtifactRoots:
    """Artifacts land where the server's artifact root says, as the mlflow client puts them."""

    def run_experiment(self, server: MLflowServer, tmp_path: Path) -> tuple[str, list[str]]:
        """One arm, two repeats, with benchmarks; returns the experiment id and run ids."""
        name = f"exp-{uuid.uuid4().hex[:8]}"
        exp = lb.Experiment(
            name,
            arms={"a": {"lr": 0.1, "notes": "n" * 7000}},
            build=build_loop(tmp_path),
            n_repeats=2,
            benchmarks={"qa": build_loop(tmp_path)(lb.LogContext("x")).benchmarks["qa"]},
            callbacks=[MLflowLogger(server.url, retry=FAST_RETRY)],
        )
        result = exp.run()
        assert result.ok, [r.drain_report for r in result.runs]
        experiment_id = result.ids["experiment_id"]
        runs = search_runs(server, experiment_id)
        run_ids = [r["info"]["run_id"] for r in runs if r["info"]["run_name"] != "a"]
        assert len(run_ids) == 2
        for run in runs:
            assert run["info"]["artifact_uri"].startswith(server.artifact_root.rstrip("/"))
        return experiment_id, run_ids

    def test_s3_artifact_root(
        self,
        mlflow_server_s3: MLflowServer,
        moto_endpoint: str,
        aws_env: None,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """An s3:// root: every artifact is in the bucket, read back with boto3."""
        import boto3

        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_endpoint)
        experiment_id, run_ids = self.run_experiment(mlflow_server_s3, tmp_path)
        client = boto3.client("s3", endpoint_url=moto_endpoint)
        for run_id in run_ids:
            prefix = f"root/{experiment_id}/{run_id}/artifacts/"
            listed = client.list_objects_v2(Bucket=MLFLOW_BUCKET, Prefix=prefix)
            keys = sorted(item["Key"][len(prefix) :] for item in listed.get("Contents", []))
            assert keys == [
                "benchmarks/qa/final.json",
                "benchmarks/qa/step-00000006.json",
                "benchmarks/qa/step-00000012.json",
                "loopbridge/long_values.json",
            ]
            body = client.get_object(Bucket=MLFLOW_BUCKET, Key=prefix + "benchmarks/qa/final.json")
            assert json.loads(body["Body"].read())["rows"][0] == {"id": 0, "pred": "p0", "step": 12}
        client.close()

    def test_local_artifact_root(self, mlflow_server_local: MLflowServer, tmp_path: Path) -> None:
        """A local directory root: every artifact is a file under it."""
        experiment_id, run_ids = self.run_experiment(mlflow_server_local, tmp_path)
        root = Path(mlflow_server_local.artifact_root)
        for run_id in run_ids:
            base = root / experiment_id / run_id / "artifacts"
            files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
            assert files == [
                "benchmarks/qa/final.json",
                "benchmarks/qa/step-00000006.json",
                "benchmarks/qa/step-00000012.json",
                "loopbridge/long_values.json",
            ]
            final = json.loads((base / "benchmarks/qa/final.json").read_text())
            assert final["rows"][0] == {"id": 0, "pred": "p0", "step": 12}
