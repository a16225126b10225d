"""Checkpoint snapshots: the uploader's own view of a checkpoint, which rotation cannot delete.

Frameworks rotate their checkpoints (Lightning's `save_top_k`, transformers'
`save_total_limit`): an older checkpoint is deleted as soon as a newer one is saved, which may
be while the older one is still uploading. Before `CheckpointUploader.on_checkpoint` returns,
the checkpoint is snapshotted into `<its dir>/.loopbridge-snapshots/<holder>/<name>`, and
the upload (and the journal, so `loopbridge resume` too) reads the snapshot. The holder
directory of each snapshot after the first is made ahead, on the bridge's loop
(`SnapshotHolders`), so the training thread only links.

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
import threading
from pathlib import Path

from loopbridge._digest import shard_files
from loopbridge._types import ManifestRow

__all__ = [
    "SNAPSHOT_DIR",
    "SnapshotHolders",
    "link_or_copy",
    "release_linked_snapshot",
    "release_snapshot",
    "snapshot_of",
    "take_snapshot",
]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")

SNAPSHOT_DIR = ".loopbridge-snapshots"


def take_snapshot(
    row: ManifestRow, *, link: bool = True, holders: SnapshotHolders | None = None
) -> ManifestRow:
    """Snapshot the row's checkpoint (hard links, else copies); the row pointing at it.

    A checkpoint that cannot be snapshotted (gone already, unreadable) is logged and its row
    returned unchanged: its upload then reads the original and reports what is wrong.
    `link=False` copies every file (what a filesystem without hard links gets). With
    `holders`, a directory made ahead for this checkpoint's dir is used when there is one.
    """
    source = row.path
    holder = holders.take(source.parent) if holders is not None else None
    try:
        if holder is not None:
            try:
                return _snapshot_into(holder, row, link)
            except FileNotFoundError:
                shutil.rmtree(holder, ignore_errors=True)
                if not os.path.lexists(source):
                    raise
                # The directory made ahead is gone (removed by hand?): make one now.
        # 48 random bits: apart from other processes' snapshots of the same step in this dir.
        holder = source.parent / SNAPSHOT_DIR / f"step-{row.step:08d}-{os.urandom(6).hex()}"
        _make_dir(holder)
        return _snapshot_into(holder, row, link)
    except OSError as exc:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)
            with contextlib.suppress(OSError):  # only once empty
                holder.parent.rmdir()
        logger.warning(
            "checkpoint step %d: no snapshot of %s (%s); uploading the original, which the "
            "framework may delete before the upload ends",
            row.step,
            source,
            exc,
        )
        return row


def _snapshot_into(holder: Path, row: ManifestRow, link: bool) -> ManifestRow:
    """Link (or copy) the row's checkpoint into the existing directory `holder`."""
    source = row.path
    target = holder / source.name
    if source.is_dir():
        for file in shard_files(source):
            dest = target / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(file, dest, link)
    else:
        link_or_copy(source, target, link)
    return dataclasses.replace(row, path=target)


class SnapshotHolders:
    """Empty snapshot directories made ahead, off the training thread: one per checkpoint dir.

    Making a snapshot's directory is a mkdir (two when `.loopbridge-snapshots` is gone), which
    cost the training thread 120-270 µs per checkpoint, cache-cold after a large save. With a
    directory made on the bridge's loop after each checkpoint, the next snapshot is a link.
    """

    def __init__(self) -> None:
        self._ready: dict[Path, Path] = {}
        self._lock = threading.Lock()

    def beside(self, snapshot: Path) -> bool:
        """Whether a directory made ahead lies beside `snapshot` (so its parent is not empty)."""
        with self._lock:
            return snapshot.parent.parent.parent in self._ready

    def take(self, checkpoint_dir: Path) -> Path | None:
        """The directory made ahead for snapshots of `checkpoint_dir`'s checkpoints, if any."""
        with self._lock:
            return self._ready.pop(checkpoint_dir, None)

    def prepare_after(self, snapshot: Path) -> None:
        """Make a directory ahead for the next snapshot beside `snapshot` (one mkdir)."""
        holder = snapshot_of(snapshot)
        if holder is None:
            return
        checkpoint_dir = holder.parent.parent
        with self._lock:
            if checkpoint_dir in self._ready:
                return
        spare = holder.parent / os.urandom(6).hex()
        try:
            _make_dir(spare)
        except OSError as exc:
            logger.debug("no snapshot directory made ahead in %s: %s", holder.parent, exc)
            return
        with self._lock:
            self._ready[checkpoint_dir] = spare

    def discard(self) -> None:
        """Remove the directories made ahead, and `.loopbridge-snapshots` once it is empty."""
        with self._lock:
            spares, self._ready = list(self._ready.values()), {}
        for spare in spares:
            with contextlib.suppress(OSError):
                spare.rmdir()
            with contextlib.suppress(OSError):
                spare.parent.rmdir()


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


def release_linked_snapshot(path: Path, *, keep_parent: bool = False) -> bool:
    """Remove a one-file snapshot whose bytes are still linked elsewhere; True once nothing
    is left to remove (a path that is no snapshot included).

    Dropping a link that is not the last frees no data, so this is a few quick system calls,
    fit to run on the bridge's loop. Anything else (a directory, a copy, the last link of a
    large file, whose blocks the filesystem must free) returns False, for `release_snapshot`
    in a thread. `keep_parent`: `.loopbridge-snapshots` is known not to be empty (a
    directory made ahead is in it), so no rmdir is tried.
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
    if not keep_parent:
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
