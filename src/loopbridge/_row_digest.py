"""A checkpoint's digest, computed off the training thread and filled into its ManifestRow.

`ManifestRow.for_checkpoint` only stats the checkpoint (a few syscalls per file, nothing per
byte) and leaves `row.digest` None with a `PendingDigest` behind it. Exactly one party then
computes the digest, whoever claims it first:

- an uploader, in `on_checkpoint`: it hashes the bytes in the same pass that reads them for
  upload, so each byte is read and hashed once;
- else the loop, right after `on_checkpoint`: a background thread of loopbridge's hashes it;
- else whoever calls `row.wait_digest()` first, in its own thread.

The stat taken at save time (device, inode, size, mtime of every file) is what a later reader
checks the file against: a checkpoint rewritten between its save and its hashing is refused
(`IntegrityError`), as it was when the digest was computed at save time. On filesystems with
coarse timestamps, a same-size rewrite within one clock tick of the save is not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from loopbridge._digest import ALGORITHM, digest_path, shard_files
from loopbridge._exceptions import IntegrityError

if TYPE_CHECKING:
    from loopbridge._types import ManifestRow

__all__ = [
    "FileStamp",
    "PendingDigest",
    "claim_digest",
    "digest_in_background",
    "manifest_line",
    "patch_manifest_digest",
    "stamp_path",
    "track_in_manifest",
    "wait_for_digests",
]

logger = logging.getLogger(__name__)


class FileStamp(NamedTuple):
    """What changes when a file is rewritten or replaced: its identity, size and mtime."""

    rel: str
    dev: int
    ino: int
    size: int
    mtime_ns: int


def _stamp(st: os.stat_result, rel: str) -> FileStamp:
    return FileStamp(rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stamp_path(path: Path) -> tuple[FileStamp, ...]:
    """Stamps of a checkpoint file, or of every file of a directory of shards (sorted)."""
    st = os.stat(path)  # one system call for a file: this runs on the training thread
    if stat.S_ISDIR(st.st_mode):
        return tuple(_stamp(f.stat(), f.relative_to(path).as_posix()) for f in shard_files(path))
    return (_stamp(st, path.name),)


class PendingDigest:
    """The digest of one checkpoint: claimed once, then set or failed by its claimant."""

    def __init__(self, row: ManifestRow, stamps: tuple[FileStamp, ...]) -> None:
        self.row = row
        self.stamps = stamps
        self.future: Future[str] = Future()
        self._lock = threading.Lock()
        self._claimed = False
        self.manifest: Path | None = None
        self.path = row.path  # what is read: the checkpoint, or a snapshot of it

    def __deepcopy__(self, memo: dict[int, object]) -> PendingDigest:
        """A handle, not a value: copies of a row (`dataclasses.asdict`) share it."""
        return self

    def claim(self) -> bool:
        """Become the one who computes the digest; False if someone already is."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def follow(self, snapshot: Path) -> None:
        """Read the checkpoint from `snapshot` (taken just now) instead, if it is unchanged.

        A snapshot made of hard links has the checkpoint's stamps; a copy has its own, which
        are taken here. A checkpoint that changed before its snapshot keeps being checked
        where it lies, so its upload reports the change.
        """
        if snapshot == self.path:
            return
        try:
            # A one-file snapshot that is a link to the very file stamped at save time,
            # unchanged since: one stat shows it.
            if self.stamps == (_stamp(os.stat(snapshot), snapshot.name),):
                self.path = snapshot
                return
            if self.changed() is None:
                self.stamps = stamp_path(snapshot)
                self.path = snapshot
        except OSError:
            return  # unreadable now (a broken link): the upload names what it cannot read

    def changed(self) -> str | None:
        """How the checkpoint differs from what was saved, or None when it does not."""
        try:
            now = stamp_path(self.path)
        except FileNotFoundError:
            return "was deleted after it was saved"
        if now != self.stamps:
            return "was modified after it was saved (files, sizes or mtimes differ)"
        return None

    def check_unchanged(self, key: str) -> None:
        """Raise IntegrityError when the checkpoint changed since its save."""
        problem = self.changed()
        if problem is not None:
            msg = f"checkpoint step {self.row.step} at {self.path} {problem}"
            raise IntegrityError(msg, key=key)

    def set(self, digest: str) -> None:
        """Record the digest (claimant only) and fill it into the row."""
        # The row is frozen for its users; the digest is the one field filled in later.
        object.__setattr__(self.row, "digest", digest)
        if self.manifest is not None:
            try:
                patch_manifest_digest(self.manifest, self.row.step, self.row.created_at, digest)
            except OSError as exc:
                logger.error(
                    "could not write the digest of step %d into %s: %s",
                    self.row.step,
                    self.manifest,
                    exc,
                )
        self._settle(lambda: self.future.set_result(digest))

    def fail(self, exc: BaseException) -> None:
        """Record that the digest cannot be known (claimant only)."""
        self._settle(lambda: self.future.set_exception(exc))

    def _settle(self, action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except InvalidStateError:
            logger.debug("digest of step %d settled twice", self.row.step)

    def compute(self) -> str:
        """Hash the checkpoint here (claimant only, off the training thread), checked."""
        try:
            self.check_unchanged(str(self.path))
            _, digest = digest_path(self.path)
            self.check_unchanged(str(self.path))
        except BaseException as exc:
            self.fail(exc)
            raise
        self.set(digest)
        return digest

    def release(self) -> None:
        """Give up a claim without a digest: it is then computed on a background thread."""
        if not self.future.done():
            _executor().submit(self.compute_quietly)

    def compute_quietly(self) -> None:
        """`compute` on a background thread: a failure is logged, and the digest stays None."""
        try:
            self.compute()
        except Exception as exc:
            logger.error("digest of checkpoint step %d not computed: %s", self.row.step, exc)

    def wait(self, timeout: float | None) -> str:
        """The digest; computed in the calling thread if nobody has claimed it yet."""
        if self.claim():
            return self.compute()
        return self.future.result(timeout)


def _lower_priority() -> None:
    """Let the training thread go first when the cores are busy (a Linux per-thread nice)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)


class _Executor:
    """One lazily started background thread for released claims."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, "loopbridge-digest", initializer=_lower_priority)
            return self.pool

    def forget(self) -> None:
        self.lock = threading.Lock()
        self.pool = None


_pool = _Executor()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.forget)


def _executor() -> ThreadPoolExecutor:
    return _pool.get()


def claim_digest(row: ManifestRow) -> PendingDigest | None:
    """Claim the row's pending digest for the caller to compute; None if known or taken."""
    pending = row._pending
    if pending is None or not pending.claim():
        return None
    return pending


def digest_in_background(row: ManifestRow) -> None:
    """Unless someone claimed it, hash the row's checkpoint on the background digest thread."""
    pending = claim_digest(row)
    if pending is not None:
        _executor().submit(pending.compute_quietly)


_NULL = '"digest":null'
# A manifest line whose digest is still coming leaves room for it: `null` and spaces (valid
# JSON) that the digest overwrites in place once known, so the file is never rewritten while
# the loop appends to it, and a crash leaves a readable line with a null digest.
_PADDING = " " * (len(f'"{ALGORITHM}:' + "0" * 64 + '"') - len("null"))


def manifest_line(row: ManifestRow) -> str:
    """The row's manifest.jsonl line; with room for its digest when that is still coming."""
    line = json.dumps(row.to_json(), separators=(",", ":"))
    if row.digest is None and row._pending is not None:
        line = line.replace(_NULL, _NULL + _PADDING, 1)
    return line


def track_in_manifest(row: ManifestRow, manifest: Path) -> None:
    """Have the row's digest written into its line of `manifest` as soon as it is known."""
    if row._pending is not None:
        row._pending.manifest = manifest


def patch_manifest_digest(manifest: Path, step: int, created_at: float, digest: str) -> bool:
    """Write `digest` into the waiting line of (step, created_at) in place; True if found."""
    value = json.dumps(digest).encode()
    hole = (_NULL + _PADDING).encode()
    if len(value) != len(hole) - len(_NULL) + len("null"):
        return False
    offset = 0
    with manifest.open("r+b") as fh:
        for raw in fh.read().splitlines(keepends=True):
            at = raw.find(hole)
            if at >= 0:
                data = json.loads(raw)
                if data.get("step") == step and data.get("created_at") == created_at:
                    fh.seek(offset + at + len(_NULL) - len("null"))
                    fh.write(value)
                    fh.flush()
                    return True
            offset += len(raw)
    return False


def wait_for_digests(rows: Iterable[ManifestRow], timeout: float | None) -> None:
    """Wait, within `timeout` in all (None: as long as it takes), for the rows' digests."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for row in rows:
        pending = row._pending
        if pending is None:
            continue
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending.future.result(left)
        except Exception as exc:
            # Whoever computed it reported why; the row keeps a null digest.
            logger.warning("manifest row of step %d has no digest: %r", row.step, exc)
