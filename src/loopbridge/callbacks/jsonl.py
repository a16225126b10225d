"""JsonlLogger: every step, eval, benchmark and checkpoint as one JSON line, written off the loop.

The loop thread appends a tuple to a list. When the list holds `batch_rows` rows, or its oldest
row is `flush_interval_s` old, the list is handed whole to a task on the bridge that encodes it
and appends it to the file in a worker thread. Batches for one file share a spawn key, so they
land in order. `on_train_end` hands over the rest, so the file is complete once the run's drain
returns; a batch that cannot be written fails its task, and the drain report names it.

Rows (one JSON object per line; "time" is unix seconds)::

    {"kind": "train_start", "run": str, "run_id": str, "time": t, "max_steps": int|null,
     "config": {...}}
    {"kind": "step", "run": str, "step": int, "time": t, "metrics": {...}}
    {"kind": "eval", "run": str, "step": int, "time": t, "name": str, "metrics": {...}}
    {"kind": "benchmark", "run": str, "step": int|null, "time": t, "name": str, "metrics": {...},
     "breakdowns": {...}, "tags": {...}, "n_predictions": int}
    {"kind": "checkpoint", "run": str, "step": int, "time": t, "path": str, "size_bytes": int,
     "digest": str|null, "is_final": bool}
    {"kind": "train_end", "run": str, "step": int, "time": t, "stop_reason": str}

`step` counts the steps completed, as `LoopState.step` does. NaN and infinities are written as
the strings "NaN", "Infinity" and "-Infinity". Under torchrun the logger acts on rank 0 only;
made to act on every rank (`loopbridge.every_rank`), each row also carries `"rank": int`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from loopbridge._callback import Callback
from loopbridge._types import (
    ArmResult,
    EvalResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)

__all__ = ["JsonlLogger"]

# (kind, run, step, unix time, payload). A tuple, because the loop thread builds one per step;
# a step row's payload is its metrics dict, nested under "metrics" by the writer.
_Row = tuple[str, str, int | None, float, dict[str, Any]]
_ROW = "row"  # a checkpoint row's payload: the ManifestRow itself, encoded by the writer

logger = logging.getLogger(__name__)


class JsonlLogger(Callback):
    """Logs a run's steps, evals, benchmarks and checkpoints as JSON lines, written off the loop.

    Args:
        path: a `.jsonl` file that every run appends to; or a directory, which gets one
            `<run name>.jsonl` per run; or None for `events.jsonl` in each run's out dir.
        batch_rows: hand rows to the writer once this many are buffered.
        flush_interval_s: or once the oldest buffered row is this old (checked at each row).
        fsync: fsync the file after each batch, for logs that must survive a power cut.
    """

    rank_zero_only = True  # under torchrun, one set of rows: rank 0's (every_rank() to change)

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        batch_rows: int = 1000,
        flush_interval_s: float = 1.0,
        fsync: bool = False,
    ) -> None:
        if batch_rows < 1 or flush_interval_s <= 0:
            msg = (
                f"JsonlLogger(batch_rows={batch_rows}, flush_interval_s={flush_interval_s}): "
                f"give at least 1 row and a positive interval"
            )
            raise ValueError(msg)
        self._target = Path(path) if path is not None else None
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._rows: list[_Row] = []
        self._oldest = 0.0
        self._path: Path | None = None
        self._run = ""
        self._rank: int | None = None  # set under torchrun, when acting on every rank
        self.batches_spawned = 0
        """How many batches were handed to the background writer."""
        self.rows_written = 0
        """Rows the writer has appended to files (updated on the background loop)."""

    @property
    def path(self) -> Path | None:
        """The file the current (or last) run writes to; None before the first run."""
        return self._path

    def _file_for(self, state: LoopState) -> Path:
        target = self._target
        if target is None:
            return state.out_dir / "events.jsonl"
        if target.suffix == ".jsonl" and not target.is_dir():
            return target
        return target / f"{state.run_name}.jsonl"

    def on_train_start(self, state: LoopState) -> None:
        """Choose this run's file and log the run's start."""
        # Rows left by a run that crashed before on_train_end still go to that run's file.
        self._flush()
        self._path = self._file_for(state)
        self._run = state.run_name
        self._rank = state.rank if state.world_size > 1 else None
        self._add(
            "train_start",
            None,
            {"run_id": state.run_id, "max_steps": state.max_steps, "config": dict(state.config)},
        )

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Buffer the step's metrics (a copy, since later hooks may change the dict)."""
        now = time.time()
        rows = self._rows
        if not rows:
            self._oldest = now
        rows.append(("step", self._run, state.step, now, dict(metrics)))
        if len(rows) >= self._batch_rows or now - self._oldest >= self._flush_interval_s:
            self._flush()

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Buffer the eval's metrics."""
        self._add("eval", state.step, {"name": eval_name, "metrics": dict(metrics)})

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Buffer the benchmark's result; after training, hand it to the writer at once."""
        payload = {
            "name": eval_result.name,
            "metrics": dict(eval_result.metrics),
            "breakdowns": {k: dict(v) for k, v in eval_result.breakdowns.items()},
            "tags": dict(eval_result.tags),
            "n_predictions": len(predictions),
        }
        self._add("benchmark", step, payload, run=ctx.run_name or self._run)
        if step is None:
            # Post-training scores come after the run's drain; the next drain (or the
            # bridge's close) covers this batch.
            self._flush()

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Buffer the checkpoint's manifest row; the writer waits for its digest if need be."""
        self._add("checkpoint", state.step, {_ROW: row})

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Log the run's end and hand every buffered row to the writer before the drain."""
        self._add("train_end", state.step, {"stop_reason": artifacts.stop_reason})
        self._flush()

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Hand over anything logged after training (post-training benchmarks)."""
        self._flush()

    def _add(self, kind: str, step: int | None, payload: dict[str, Any], run: str = "") -> None:
        now = time.time()
        if not self._rows:
            self._oldest = now
        self._rows.append((kind, run or self._run, step, now, payload))
        if len(self._rows) >= self._batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        path = self._path
        if path is None:  # pragma: no cover - on_train_start always comes first
            msg = "JsonlLogger got rows before on_train_start; add it to the TrainLoop's callbacks"
            raise RuntimeError(msg)
        # The batch changes hands here: the task owns `rows`, the loop thread a new list.
        rows, self._rows = self._rows, []
        self.batches_spawned += 1
        self.spawn(
            self._write(path, rows),
            name=f"jsonl {path.name} batch {self.batches_spawned}",
            key=("JsonlLogger", str(path)),
        )

    async def _write(self, path: Path, rows: list[_Row]) -> int:
        if self._rank is None:
            written = await asyncio.to_thread(_append, path, rows, self._fsync)
        else:
            written = await asyncio.to_thread(_append, path, rows, self._fsync, self._rank)
        self.rows_written += written
        return written


def _append(path: Path, rows: list[_Row], fsync: bool, rank: int | None = None) -> int:
    """Encode the rows and append them to `path` in one write; return how many were written."""
    lines = []
    for kind, run, step, when, payload in rows:
        obj: dict[str, Any] = {"kind": kind, "run": run, "step": step, "time": when}
        if rank is not None:
            obj["rank"] = rank
        if kind == "step":
            obj["metrics"] = payload  # nested here, off the loop thread, not per step there
        elif kind == "checkpoint":
            obj.update(_checkpoint_fields(payload[_ROW]))
        else:
            obj.update(payload)
        try:
            line = json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)
        except ValueError:  # a NaN or an infinity somewhere: the slow path, rarely taken
            line = json.dumps(_finite(obj), separators=(",", ":"), default=str)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return len(rows)


def _checkpoint_fields(row: ManifestRow) -> dict[str, Any]:
    """A checkpoint row's fields, with its digest once the background hashing has it."""
    try:
        row.wait_digest()
    except Exception as exc:
        # Whoever hashed it reported why (in the drain); the line says null.
        logger.debug("checkpoint step %d is logged without a digest: %r", row.step, exc)
    data = row.to_json()
    del data["step"], data["created_at"], data["run_name"]
    return data


def _finite(obj: Any) -> Any:
    """Replace NaN and infinities with strings, so the output is strict JSON."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if math.isnan(obj):
            return "NaN"
        return "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj
