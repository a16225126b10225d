"""A run's out dir holds one history: a re-run continues it explicitly or is refused.

`metrics.jsonl` and `manifest.jsonl` are appended to, and checkpoints are saved at fixed
paths, so a second run in the same out dir would duplicate rows and could pass off an earlier
run's checkpoint as its own. `claim_out_dir` refuses a used out dir unless the run continues
it (`start_step=N`); then the rows past step N are superseded (dropped), and
`clear_stale_checkpoint` removes a path an earlier run left before `save` writes there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from loopbridge._exceptions import OutDirInUseError

__all__ = ["claim_out_dir", "clear_stale_checkpoint"]

logger = logging.getLogger("loopbridge.loop")

METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.jsonl"
CHECKPOINT_DIR = "checkpoints"


def _used(out_dir: Path) -> list[str]:
    """What an earlier run left in `out_dir`: non-empty row files, saved checkpoints."""
    found = []
    for name in (METRICS_FILE, MANIFEST_FILE):
        path = out_dir / name
        if path.is_file() and path.stat().st_size > 0:
            found.append(name)
    checkpoints = out_dir / CHECKPOINT_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{CHECKPOINT_DIR}/")
    return found


def claim_out_dir(out_dir: Path, start_step: int) -> None:
    """Refuse a used out dir for a run from step 0; supersede rows past `start_step` otherwise.

    Raises:
        OutDirInUseError: `out_dir` holds an earlier run's rows or checkpoints, and
            `start_step` is 0.
    """
    used = _used(out_dir)
    if not used:
        return
    if start_step == 0:
        msg = (
            f"out_dir {out_dir} already holds an earlier run ({', '.join(used)}); a new run "
            f"there would duplicate its rows and could publish its checkpoints as its own. "
            f"Give this run a new out_dir (in an Experiment, one per run, e.g. "
            f"root / ctx.run_name), or continue that run with start_step=N (the step of the "
            f"checkpoint you resume from; its rows past N are then replaced)"
        )
        raise OutDirInUseError(msg)
    for name in (METRICS_FILE, MANIFEST_FILE):
        dropped = _drop_rows_after(out_dir / name, start_step)
        if dropped:
            logger.warning(
                "%s: %d rows past step %d superseded by this run (start_step=%d)",
                out_dir / name,
                dropped,
                start_step,
                start_step,
            )


def _drop_rows_after(path: Path, step: int) -> int:
    """Rewrite a JSON-lines file without its rows past `step` (atomically); return how many."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                # A torn last line from a crash, or a foreign row: it is not kept either way.
                dropped += 1
                continue
            if row_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        temporary = path.with_name(path.name + ".superseding")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, path)
    return dropped


def clear_stale_checkpoint(path: Path) -> None:
    """Remove what an earlier run left at `path`, so only this run's save can put it there."""
    if not os.path.lexists(path):
        return
    logger.warning("removing %s, an earlier run's checkpoint this run saves over", path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
