"""JsonlLogger: every row written off the loop thread, complete after the drain, never lost."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from loopbridge import (
    DrainError,
    EvalResult,
    Experiment,
    LogContext,
    LoopState,
    TrainingBatch,
    TrainLoop,
)
from loopbridge.callbacks import JsonlLogger
from loopbridge.callbacks import jsonl as jsonl_module


def step_fn(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
    """Metrics that name the step, and a NaN every 5th step."""
    return {"loss": math.nan if state.step % 5 == 4 else 1.0 / (state.step + 1)}


def bench_fn(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
    """A benchmark with a breakdown, a tag and two predictions."""
    result = EvalResult("quiz", {"score": 0.5}, {"easy": {"score": 1.0}}, {"split": "test"})
    return result, [{"id": 1}, {"id": 2}]


def make_loop(out: Path, logger: JsonlLogger, steps: int = 12, **kw: Any) -> TrainLoop:
    """A loop with an evaluator and a benchmark every 4 steps and a checkpoint every 5."""
    options: dict[str, Any] = {
        "max_steps": steps,
        "out_dir": out,
        "save": lambda state, path: path.write_bytes(b"w"),
        "checkpoint_every": 5,
        "evaluators": {"val": lambda state: {"acc": state.step / 100}},
        "benchmarks": {"quiz": bench_fn},
        "eval_every": 4,
        "callbacks": [logger],
    }
    options.update(kw)
    return TrainLoop(step_fn, range(1000), **options)


def strict_rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows, parsed as strict JSON (a bare NaN would fail)."""

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


class TestRows:
    """Each hook's row is in the file, in hook order, once the loop has returned."""

    def test_every_kind_of_row_in_order(self, tmp_path: Path) -> None:
        """train_start, 12 steps, evals and benchmarks at 4, 8, 12, checkpoints, train_end."""
        logger = JsonlLogger(tmp_path / "log.jsonl")
        make_loop(tmp_path / "run", logger).run()
        rows = strict_rows(tmp_path / "log.jsonl")
        kinds = [(row["kind"], row["step"]) for row in rows]
        assert kinds[0] == ("train_start", None)
        assert [s for k, s in kinds if k == "step"] == list(range(1, 13))
        assert [s for k, s in kinds if k == "eval"] == [4, 8, 12]
        assert [s for k, s in kinds if k == "benchmark"] == [4, 8, 12]
        assert [s for k, s in kinds if k == "checkpoint"] == [5, 10, 12]
        assert kinds[-1] == ("train_end", 12)
        assert kinds.index(("eval", 4)) == kinds.index(("step", 4)) + 1
        assert {row["run"] for row in rows} == {"run"}
        assert rows[-1]["stop_reason"] == "max_steps"

    def test_row_contents(self, tmp_path: Path) -> None:
        """Metrics nest under "metrics"; NaN becomes "NaN"; checkpoints carry their digest."""
        logger = JsonlLogger(tmp_path / "log.jsonl")
        make_loop(tmp_path / "run", logger).run()
        rows = strict_rows(tmp_path / "log.jsonl")
        steps = {row["step"]: row for row in rows if row["kind"] == "step"}
        assert steps[1]["metrics"] == {"loss": 1.0}
        assert steps[5]["metrics"] == {"loss": "NaN"}
        bench = next(row for row in rows if row["kind"] == "benchmark")
        assert bench["breakdowns"] == {"easy": {"score": 1.0}}
        assert bench["tags"] == {"split": "test"}
        assert bench["n_predictions"] == 2
        final = [row for row in rows if row["kind"] == "checkpoint"][-1]
        assert final["is_final"] is True
        assert final["digest"].startswith("blake3:")
        assert final["size_bytes"] == 1

    def test_default_file_is_in_the_out_dir(self, tmp_path: Path) -> None:
        """With no path, each run writes events.jsonl in its own out dir."""
        logger = JsonlLogger()
        make_loop(tmp_path / "run", logger, steps=3).run()
        assert logger.path == tmp_path / "run" / "events.jsonl"
        # train_start, 3 steps, the final checkpoint, train_end.
        assert len(strict_rows(tmp_path / "run" / "events.jsonl")) == 6


class TestOffLoop:
    """The loop thread only appends; files are written by the bridge, in batches, in order."""

    def test_written_on_another_thread_in_batches(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With batch_rows=10, 40 steps go out in batches of 10, none on the loop thread."""
        threads: list[int] = []
        sizes: list[int] = []
        real_append = jsonl_module._append

        def spy(path: Path, rows: list[Any], fsync: bool) -> int:
            threads.append(threading.get_ident())
            sizes.append(len(rows))
            return real_append(path, rows, fsync)

        monkeypatch.setattr(jsonl_module, "_append", spy)
        logger = JsonlLogger(tmp_path / "log.jsonl", batch_rows=10)
        loop = TrainLoop(step_fn, range(40), out_dir=tmp_path / "run", callbacks=[logger])
        loop.run()
        assert threading.get_ident() not in threads
        # train_start, 40 steps and train_end: 42 rows.
        assert sizes == [10, 10, 10, 10, 2]
        assert logger.rows_written == 42
        rows = strict_rows(tmp_path / "log.jsonl")
        assert [row["step"] for row in rows if row["kind"] == "step"] == list(range(1, 41))

    def test_age_triggers_a_flush(self, tmp_path: Path) -> None:
        """A row older than flush_interval_s sends the buffer even when it is small."""
        logger = JsonlLogger(tmp_path / "log.jsonl", flush_interval_s=1e-9)
        TrainLoop(step_fn, range(5), out_dir=tmp_path / "r", callbacks=[logger]).run()
        # Without the age limit these 7 rows would go out as one batch at train end.
        assert logger.batches_spawned > 1
        assert len(strict_rows(tmp_path / "log.jsonl")) == 7

    def test_directory_gets_a_file_per_run(self, tmp_path: Path) -> None:
        """Given a directory, each run of an Experiment writes <run>.jsonl in it."""
        logs = tmp_path / "logs"
        logs.mkdir()
        logger = JsonlLogger(logs)

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(step_fn, range(3), out_dir=tmp_path / (ctx.run_name or "x"))

        result = Experiment("e", {"a": {}}, build, n_repeats=2, callbacks=[logger]).run()
        assert result.ok
        assert sorted(p.name for p in logs.iterdir()) == ["a-r0.jsonl", "a-r1.jsonl"]
        assert all(len(strict_rows(p)) == 5 for p in logs.iterdir())

    def test_shared_file_keeps_runs_apart_and_post_training_benchmarks(
        self, tmp_path: Path
    ) -> None:
        """Runs of an Experiment share a .jsonl file; post-training scores land after the drain."""
        logger = JsonlLogger(tmp_path / "all.jsonl")

        def build(ctx: LogContext) -> TrainLoop:
            return TrainLoop(step_fn, range(3), out_dir=tmp_path / (ctx.run_name or "x"))

        experiment = Experiment(
            "e", {"a": {}, "b": {}}, build, benchmarks={"quiz": bench_fn}, callbacks=[logger]
        )
        assert experiment.run().ok
        rows = strict_rows(tmp_path / "all.jsonl")
        for run in ("a", "b"):
            mine = [row for row in rows if row["run"] == run]
            assert [row["kind"] for row in mine] == [
                "train_start",
                *["step"] * 3,
                "train_end",
                "benchmark",
            ]
            assert mine[-1]["step"] is None


class TestFailure:
    """A batch that cannot be written fails its task, and the drain report says so."""

    def test_rows_of_a_crashed_run_are_written_by_the_next(self, tmp_path: Path) -> None:
        """A run that raises before on_train_end leaves rows; the next run writes them first."""
        logger = JsonlLogger(tmp_path / "logs")

        def crash(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            if state.step == 4:
                raise RuntimeError("out of memory")
            return {"loss": 1.0}

        first = TrainLoop(crash, range(10), out_dir=tmp_path / "first", callbacks=[logger])
        with pytest.raises(RuntimeError, match="out of memory"):
            first.run()
        second = TrainLoop(step_fn, range(2), out_dir=tmp_path / "second", callbacks=[logger])
        second.run()
        crashed = strict_rows(tmp_path / "logs" / "first.jsonl")
        assert [row["kind"] for row in crashed] == ["train_start", *["step"] * 4]
        assert len(strict_rows(tmp_path / "logs" / "second.jsonl")) == 4

    def test_unwritable_path_fails_the_drain(self, tmp_path: Path) -> None:
        """A file where the log's directory should be makes the run raise DrainError."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        logger = JsonlLogger(blocker / "log.jsonl", batch_rows=4)
        loop = TrainLoop(step_fn, range(10), out_dir=tmp_path / "run", callbacks=[logger])
        with pytest.raises(DrainError) as info:
            loop.run()
        report = info.value.report
        assert len(report.failed) == 3
        assert all("jsonl log.jsonl batch" in record.name for record in report.failed)
        assert all(isinstance(record.exception, OSError) for record in report.failed)

    @pytest.mark.parametrize("kwargs", [{"batch_rows": 0}, {"flush_interval_s": 0}])
    def test_bad_arguments(self, kwargs: dict[str, Any]) -> None:
        """Zero rows per batch or a zero interval is refused, naming the argument."""
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            JsonlLogger(**kwargs)
