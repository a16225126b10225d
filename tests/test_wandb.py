"""WandbLogger in offline mode, read back with wandb's own reader of .wandb files.

`wandb leet inspect --json` is wandb's reader of a run's transaction log (the records that
`wandb sync` would upload): one JSON record per line, `run` (name, group, job_type, config),
`history` (one row per step), `summary` and `exit` (the exit code).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge.callbacks import WandbLogger

N_STEPS = 8
WANDB = Path(sys.executable).with_name("wandb")


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline wandb whose every directory is under tmp_path; no account, no network.

    wandb reads its environment once per process (its setup singleton), so the fixture tears
    that down after each test, and the tests also pass `dir=` explicitly.
    """
    import wandb

    root = tmp_path / "wandb-root"
    for var, sub in (
        ("WANDB_DIR", "dir"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (root / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    yield root / "dir"
    wandb.teardown()


def settings() -> Any:
    """Settings that keep a test run small: no console capture, no system stats."""
    import wandb

    return wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True)


def read_run(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records, through `wandb leet inspect --json`."""
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(run_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


class OfflineRun:
    """One offline run read back: its run record, history rows by step, summary, exit code."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        records = read_run(run_dir)
        self.run = next(r["run"] for r in records if r["type"] == "run")
        self.history = [r["history"]["item"] for r in records if r["type"] == "history"]
        self.summary: dict[str, Any] = {}
        for r in records:
            if r["type"] == "summary":
                self.summary.update(r["summary"].get("update", {}))
        exits = [r["exit"] for r in records if r["type"] == "exit"]
        self.exit_code = exits[-1].get("exit_code", 0) if exits else None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every history row that has `key`, in order; NaN as NaN."""
        return [(int(row["_step"]), float(row[key])) for row in self.history if key in row]


def runs_in(wandb_dir: Path) -> dict[str, OfflineRun]:
    """Every offline run under WANDB_DIR, by display name."""
    found = {}
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run = OfflineRun(run_dir)
        found[run.run["display_name"]] = run
    return found


def build_loop(tmp_path: Path, *, fail_at: int | None = None) -> Any:
    """A `build(ctx)`: a tiny loop with an evaluator and a benchmark with predictions."""

    def build(ctx: lb.LogContext) -> lb.TrainLoop:
        repeat = ctx.repeat_index or 0

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if fail_at is not None and state.step + 1 == fail_at:
                raise RuntimeError("diverged")
            s = state.step + 1
            return {"loss": math.nan if s == 3 else 1.0 / s + repeat}

        return lb.TrainLoop(
            step,
            range(N_STEPS),
            max_steps=N_STEPS,
            out_dir=tmp_path / "out" / (ctx.run_name or "run"),
            evaluators={"val": lambda state: {"acc": state.step / N_STEPS}},
            eval_every=4,
            benchmarks={"qa": bench},
        )

    return build


def bench(state: lb.LoopState) -> tuple[lb.EvalResult, list[dict[str, Any]]]:
    """A benchmark with a breakdown, a tag and three prediction rows."""
    result = lb.EvalResult(
        "qa", {"score": state.step / 100}, {"hard": {"score": 0.25}}, {"dataset": "toy"}
    )
    return result, [{"id": i, "pred": f"p{i}"} for i in range(3)]


class TestOffline:
    def test_experiment_runs_read_back(self, wandb_env: Path, tmp_path: Path) -> None:
        """Groups, job types, config, every step's metrics, evals, benchmarks, final state."""
        arms: dict[str, dict[str, Any]] = {
            "small": {"model": {"width": 64}, "lr": 0.1},
            "big": {"lr": 0.05},
        }
        logger = WandbLogger(
            "lb-test", mode="offline", dir=wandb_env, settings=settings(), flush_rows=3
        )
        result = lb.Experiment(
            "exp-w",
            arms=arms,
            build=build_loop(tmp_path),
            n_repeats=2,
            benchmarks={"qa": bench},
            callbacks=[logger],
        ).run()
        assert result.ok, [r.drain_report for r in result.runs]
        runs = runs_in(wandb_env)
        assert set(runs) == {"small-r0", "small-r1", "big-r0", "big-r1"}
        for arm, config in arms.items():
            for repeat in range(2):
                run = runs[f"{arm}-r{repeat}"]
                assert run.run["run_group"] == "exp-w"
                assert run.run["job_type"] == arm
                got_config = {k: v for k, v in run.run["config"]["update"].items() if k != "_wandb"}
                assert got_config == config
                loss = run.series("loss")
                assert [s for s, _ in loss] == list(range(1, N_STEPS + 1))
                for s, value in loss:
                    if s == 3:
                        assert math.isnan(value)
                    else:
                        assert value == pytest.approx(1.0 / s + repeat)
                assert run.series("eval/val/acc") == [(4, 0.5), (8, 1.0)]
                assert [s for s, _ in run.series("bench/qa/score")] == [4, 8]
                assert run.series("bench/qa/hard/score")[0] == (4, 0.25)
                tables = [row for row in run.history if "bench/qa/predictions._type" in row]
                assert [row["_step"] for row in tables] == [4, 8]
                table = json.loads(
                    (run.dir / "files" / tables[0]["bench/qa/predictions.path"]).read_text()
                )
                assert table["columns"] == ["id", "pred"]
                assert table["data"] == [[0, "p0"], [1, "p1"], [2, "p2"]]
                assert run.summary["bench/qa/tags/dataset"] == "toy"
                assert run.summary["loopbridge/status"] == "completed"
                assert run.summary["loopbridge/steps_completed"] == N_STEPS
                assert run.exit_code == 0

    def test_a_run_that_raises_ends_failed(self, wandb_env: Path, tmp_path: Path) -> None:
        """A failed run keeps its steps and finishes with a non-zero exit code."""
        logger = WandbLogger("lb-test", mode="offline", dir=wandb_env, settings=settings())
        result = lb.Experiment(
            "exp-fail",
            arms={"only": {"lr": 1.0}},
            build=build_loop(tmp_path, fail_at=4),
            callbacks=[logger],
        ).run()
        assert [r.status for r in result.runs] == [lb.RunStatus.FAILED]
        run = runs_in(wandb_env)["only"]
        assert [s for s, _ in run.series("loss")] == [1, 2, 3]
        assert run.exit_code == 1
        assert run.summary["loopbridge/status"] == "failed"
        assert "diverged" in run.summary["loopbridge/error"]

    def test_plain_loop_that_raises_ends_failed(self, wandb_env: Path, tmp_path: Path) -> None:
        """A plain TrainLoop whose step raises: its run is finished as failed at bridge close."""

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if state.step == 3:
                raise RuntimeError("diverged")
            return {"loss": 1.0}

        loop = lb.TrainLoop(
            step,
            range(10),
            out_dir=tmp_path / "plain",
            callbacks=[WandbLogger("lb-test", mode="offline", dir=wandb_env, settings=settings())],
        )
        with pytest.raises(RuntimeError, match="diverged"):
            loop.run()
        run = runs_in(wandb_env)["plain"]
        assert [s for s, _ in run.series("loss")] == [1, 2, 3]
        assert run.exit_code == 1


class TestHangingFinish:
    def test_drain_deadline_holds_and_names_the_finish(
        self, wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A finish() that never returns: the drain ends at its deadline naming the finish."""
        import wandb

        release = threading.Event()
        entered = threading.Event()
        finished = threading.Event()
        real_finish = wandb.Run.finish

        def hung_finish(self: Any, *args: Any, **kwargs: Any) -> None:
            # The real wandb run's finish, held until the test lets it go.
            entered.set()
            release.wait(60)
            real_finish(self, *args, **kwargs)
            finished.set()

        monkeypatch.setattr(wandb.Run, "finish", hung_finish)
        logger = WandbLogger("lb-test", mode="offline", dir=wandb_env, settings=settings())
        loop = lb.TrainLoop(
            lambda state, batch: {"loss": 1.0},
            range(5),
            out_dir=tmp_path / "hang",
            callbacks=[logger],
            drain_timeout=2.0,
            on_drain_failure="warn",
            interrupt_grace=0.5,
        )
        try:
            artifacts = loop.run()
            assert entered.is_set()
            report = artifacts.drain_report
            assert report is not None
            assert report.timed_out
            assert [r.name for r in report.pending] == ["WandbLogger.close"]
            assert report.elapsed < 2.0 + 0.5 + 2.0
        finally:
            release.set()
        # Released, the real finish completes in its thread and the run's log is whole.
        assert finished.wait(30)
        run_dir = next((wandb_env / "wandb").glob("offline-run-*"))
        assert [s for s, _ in OfflineRun(run_dir).series("loss")] == [1, 2, 3, 4, 5]
