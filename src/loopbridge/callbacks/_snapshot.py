"""Checkpoint snapshots: the uploader's own view of a checkpoint, which rotation cannot delete.

Frameworks rotate their checkpoints (Lightning's `save_top_k`, transformers'
`save_total_limit`): an older checkpoint is deleted as soon as a newer one is saved, which may
be while the older one is still uploading. Before `CheckpointUploader.on_checkpoint` returns,
the checkpoint is snapshotted into `<its dir>/.loopbridge-snapshots/<step>-<token>/<name>`,
and the upload (and the journal, so `loopbridge resume` too) reads the snapshot.

A snapshot is a hard link per file: no bytes are copied, and it lies next to the checkpoint so
it is on the same filesystem. Where a hard link is refused (another filesystem, a filesystem
without links), the file is copied. A hard link shares the file's inode, so deleting or
renaming the original leaves the snapshot intact, while rewriting the original in place
changes the snapshot too, which the upload's digest check then reports (`IntegrityError`).

The snapshot is removed once its upload has published, or has failed with nothing left to
retry it (no journal). A failed upload that is still open in the journal keeps its snapshot:
that is the file `loopbridge resume` (or the next run on the same out dir) will read, and it
removes the snapshot once the checkpoint is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

from loopbridge._digest import shard_files
from loopbridge._types import ManifestRow

__all__ = [
    "SNAPSHOT_DIR",
    "link_or_copy",
    "release_linked_snapshot",
    "release_snapshot",
    "snapshot_of",
    "take_snapshot",
]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")

SNAPSHOT_DIR = ".loopbridge-snapshots"


def take_snapshot(row: ManifestRow, *, link: bool = True) -> ManifestRow:
    """Snapshot the row's checkpoint (hard links, else copies); the row pointing at it.

    A checkpoint that cannot be snapshotted (gone already, unreadable) is logged and its row
    returned unchanged: its upload then reads the original and reports what is wrong.
    `link=False` copies every file (what a filesystem without hard links gets).
    """
    source = row.path
    holder = source.parent / SNAPSHOT_DIR / f"step-{row.step:08d}-{uuid.uuid4().hex[:12]}"
    target = holder / source.name
    try:
        _make_dir(holder)
        if source.is_dir():
            for file in shard_files(source):
                dest = target / file.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(file, dest, link)
        else:
            link_or_copy(source, target, link)
    except OSError as exc:
        shutil.rmtree(holder, ignore_errors=True)
        logger.warning(
            "checkpoint step %d: no snapshot of %s (%s); uploading the original, which the "
            "framework may delete before the upload ends",
            row.step,
            source,
            exc,
        )
        return row
    return dataclasses.replace(row, path=target)


def snapshot_of(path: Path) -> Path | None:
    """The snapshot directory that holds `path`, or None when `path` is not a snapshot."""
    holder = path.parent
    return holder if holder.parent.name == SNAPSHOT_DIR else None


def release_snapshot(path: Path) -> None:
    """Remove the snapshot `path` lies in; nothing when it is not a snapshot."""
    holder = snapshot_of(path)
    if holder is None:
        return
    try:
        shutil.rmtree(holder)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("could not remove the checkpoint snapshot %s: %s", holder, exc)
        return
    with contextlib.suppress(OSError):  # only once empty; `_make_dir` retries if we race it
        holder.parent.rmdir()


def release_linked_snapshot(path: Path) -> bool:
    """Remove a one-file snapshot whose bytes are still linked elsewhere; True once nothing
    is left to remove (a path that is no snapshot included).

    Dropping a link that is not the last frees no data, so this is a few quick system calls,
    fit to run on the bridge's loop. Anything else (a directory, a copy, the last link of a
    large file, whose blocks the filesystem must free) returns False, for `release_snapshot`
    in a thread.
    """
    holder = snapshot_of(path)
    if holder is None:
        return True
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink < 2:
            return False
        os.unlink(path)
        os.rmdir(holder)
    except FileNotFoundError:
        return not holder.exists()
    except OSError:
        return False  # something else in the holder, or a refusal: the thorough way says
    with contextlib.suppress(OSError):  # only once empty; `_make_dir` retries if we race it
        holder.parent.rmdir()
    return True


def _make_dir(holder: Path) -> None:
    """Create the snapshot's directory (a few tries: a parallel clean-up may race us)."""
    for _ in range(3):
        try:
            holder.mkdir(parents=True)
        except FileNotFoundError:
            continue
        return
    holder.mkdir(parents=True)


def link_or_copy(source: Path, dest: Path, link: bool = True) -> None:
    """Hard-link `source` at `dest`, or copy it where the filesystem refuses the link."""
    if not link:
        shutil.copyfile(source, dest)
        return
    try:
        os.link(source, dest)
    except FileNotFoundError:
        raise
    except OSError:
        # EXDEV (another filesystem), EPERM/ENOTSUP (no hard links there), EMLINK.
        shutil.copyfile(source, dest)
