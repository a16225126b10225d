"""The adapters under DDP: two CPU ranks by torchrun; hooks on rank 0, one stop for both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.integration.torchrun_job import torchrun_command

WORKER = Path(__file__).with_name("ddp_worker.py")
EVAL_EVERY = 4


def _torchrun(framework: str, out: Path, *extra: str) -> list[dict[str, object]]:
    command = torchrun_command(WORKER, framework, str(out), *extra)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_hooks_fire_on_rank_0_and_a_stop_stops_every_rank(framework: str, tmp_path: Path) -> None:
    """Rank 1 sees no hook; rank 0's EarlyStopping ends both ranks at the same step."""
    rank0, rank1 = _torchrun(framework, tmp_path)
    assert rank1["hooks"] == []
    hooks = rank0["hooks"]
    assert isinstance(hooks, list)
    assert hooks[:2] == ["on_run_start", "on_train_start"]
    assert hooks[-2:] == ["on_train_end", "on_run_end"]
    assert hooks.count("on_eval") == 2
    assert rank0["step"] == rank1["step"] == 2 * EVAL_EVERY


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_a_callback_needing_every_rank_is_refused_on_every_rank(
    framework: str, tmp_path: Path
) -> None:
    """every_rank(logger) with the adapter on rank 0 only: both ranks refuse it before step 1."""
    results = _torchrun(framework, tmp_path, "every-rank-logger")
    adapter = "LoopbridgeCallback" if framework == "lightning" else "LoopbridgeTrainerCallback"
    for result in results:
        error = str(result["error"])
        assert error.startswith(f"{adapter}(all_ranks=False)"), error
        assert "every_rank(JsonlLogger(...))" in error, error
        assert f"Pass {adapter}(..., all_ranks=True)" in error, error
        assert result["hooks"] == []
