"""`TrainLoop(resume_from=..., load=...)`: find where an interrupted run left off.

Before the first step the loop looks for the newest checkpoint of this run: in its own out
dir (a manifest row whose file is still there with its digest), and in the store, where only
published checkpoints count. The newer wins (the out dir on a tie, as it needs no download);
a store checkpoint is restored into `<out_dir>/restored/`. `"auto"` reads the store of the
`CheckpointUploader` attached to the loop and starts fresh, saying so, when there is
nothing; an explicit destination is the `s3://bucket/prefix` or directory given to the
uploader, and finding no checkpoint of the run there is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._digest import digest_path
from loopbridge._exceptions import RestoreError
from loopbridge._types import LogContext, LoopState, ManifestRow
from loopbridge.callbacks._layout import run_key
from loopbridge.callbacks.checkpoint_uploader import CheckpointUploader
from loopbridge.restore import Restored, fetch_checkpoint, find_published, resolve_run
from loopbridge.stores import ObjectStore, open_store

__all__ = ["RESTORED_DIR", "check_resume_from", "find_restore_point"]

logger = logging.getLogger("loopbridge.loop")

RESTORED_DIR = "restored"
AUTO = "auto"


def check_resume_from(resume_from: object, has_load: bool, start_step: int) -> None:
    """Refuse a `resume_from` the loop cannot act on, naming the fix."""
    if resume_from is None:
        return
    if not isinstance(resume_from, str | os.PathLike) or not os.fspath(resume_from):
        msg = (
            f"TrainLoop(resume_from={resume_from!r}): give 'auto', the uploader's destination "
            f"(s3://bucket/prefix or a directory), or None"
        )
        raise ValueError(msg)
    if not has_load:
        msg = (
            f"TrainLoop(resume_from={os.fspath(resume_from)!r}) needs load=fn(state, path) "
            f"that reads a checkpoint back (the inverse of save)"
        )
        raise ValueError(msg)
    if start_step:
        msg = (
            f"TrainLoop got both resume_from and start_step={start_step}; resume_from finds "
            f"the step itself, so pass one of them"
        )
        raise ValueError(msg)


def find_restore_point(
    resume_from: str | os.PathLike[str],
    *,
    state: LoopState,
    ctx: LogContext,
    callbacks: Sequence[Callback],
    bridge: Bridge,
) -> Restored | None:
    """The newest checkpoint of this run, local or restored from the store; None for none.

    Raises:
        RestoreError: an explicit destination holds no published checkpoint of this run.
        IntegrityError, StoreError: the store's checkpoint is damaged or cannot be read.
    """
    local = newest_local(state.out_dir)
    text = os.fspath(resume_from)
    uploader = _uploader(callbacks, None if text == AUTO else text)
    store: ObjectStore | None = None
    owned = False
    if uploader is not None:
        store, key = uploader.store, uploader.run_prefix(state)
    elif text == AUTO:
        key = ""
        logger.info(
            "run %s: resume_from='auto' without a CheckpointUploader; looking only in %s",
            state.run_name,
            state.out_dir,
        )
    else:
        store, owned = open_store(text), True
        if ctx.arm_name is not None:  # in an Experiment: <experiment>/<arm>/<run>
            key = run_key("", experiment=ctx.experiment_name, arm=ctx.arm_name, run=state.run_name)
        else:
            key = run_key("", run=state.run_name)
    remote = None
    try:
        if store is not None:
            bridge.add_shutdown_callback(store.aclose)
            remote = bridge.call(find_published(store, key))
            if remote is None and text != AUTO and local is None:
                # Lists the runs that are there, or says the run published nothing.
                bridge.call(resolve_run(store, key))
                msg = (
                    f"{store.url}/{key} has no published checkpoint to resume run "
                    f"{state.run_name} from"
                )
                raise RestoreError(msg)
        if local is not None and (remote is None or local.step >= remote.step):
            logger.info(
                "run %s: resuming from step %d in its out dir (%s)",
                state.run_name,
                local.step,
                local.path,
            )
            return Restored(local.step, local.path, local, key, str(state.out_dir))
        if remote is None or store is None:
            logger.info(
                "run %s: no checkpoint to resume from (resume_from=%r); starting fresh",
                state.run_name,
                text,
            )
            return None
        restored = bridge.call(fetch_checkpoint(store, key, remote, state.out_dir / RESTORED_DIR))
    finally:
        if owned and store is not None:
            bridge.call(store.aclose())
    logger.info(
        "run %s: resuming from step %d restored from %s",
        state.run_name,
        restored.step,
        restored.source,
    )
    return restored


def _uploader(callbacks: Sequence[Callback], dest: str | None) -> CheckpointUploader | None:
    """The attached uploader (for `dest`, when given, the one writing there)."""
    for callback in callbacks:
        if not isinstance(callback, CheckpointUploader):
            continue
        if dest is None or _same_destination(callback.destination, dest):
            return callback
    return None


def _same_destination(uploader_dest: str, dest: str) -> bool:
    """Whether a destination string names where the uploader writes."""
    if "://" not in dest:
        dest = Path(dest).expanduser().absolute().as_uri()
    return uploader_dest.rstrip("/") == dest.rstrip("/")


def newest_local(out_dir: Path) -> ManifestRow | None:
    """The newest checkpoint in the out dir's manifest that is still there, with its digest."""
    manifest = out_dir / "manifest.jsonl"
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    rows = []
    for line in lines:
        try:
            rows.append(ManifestRow.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    for row in sorted(rows, key=lambda r: r.step, reverse=True):
        if row.digest is None or not row.path.exists():
            continue
        try:
            _, digest = digest_path(row.path)
        except OSError:
            continue
        if digest == row.digest:
            return row
        logger.warning(
            "%s: step %d at %s no longer matches its digest", manifest, row.step, row.path
        )
    return None
