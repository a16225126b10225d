"""Where a download lands: a temporary file beside the target, renamed only once verified.

Bytes may arrive out of order (parallel ranged GETs): they are written at their offsets as
they come, and hashed in order as the written prefix grows (read back from the page cache),
so the digest is of the file as it will be and no part waits in memory for its turn. `commit`
checks the size and digest, fsyncs, and renames onto the target; `discard` removes the
temporary file.
A process killed before `commit` leaves only a `.lb-tmp-` name, which no reader takes for the
object (and `remove_stale` clears).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

from loopbridge._digest import ALGORITHM, CHUNK_BYTES, new_hasher
from loopbridge._exceptions import IntegrityError, StoreError

__all__ = ["TMP_MARK", "FileSink", "remove_stale"]

TMP_MARK = ".lb-tmp-"


class FileSink:
    """A temporary file beside `path` that becomes `path` when `commit` finds it complete."""

    def __init__(
        self, path: Path, key: str, fd: int, tmp: Path, algorithm: str = ALGORITHM
    ) -> None:
        self.path = path
        self.key = key
        self.tmp = tmp
        self._fd = fd
        self._algorithm = algorithm
        self._hasher = new_hasher(algorithm)
        self._hashed = 0
        # Worker threads write and read through the descriptor; `discard` (after a
        # cancellation, while one may still be running) must not close it under them.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, key: str, algorithm: str = ALGORITHM) -> FileSink:
        """Create the temporary file (and the target's directory), hashed with `algorithm`;
        blocking.

        Raises:
            StoreError: the directory or file cannot be created (naming the path).
        """
        tmp = path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            msg = f"cannot write the download of {key!r} to {str(path)!r}: {exc}"
            raise StoreError(msg, key=key) from exc
        return cls(path, key, fd, tmp, algorithm)

    @property
    def hashed(self) -> int:
        """Bytes hashed (and written) so far, in order from the start."""
        return self._hashed

    def _check_open(self) -> None:
        if self._fd < 0:
            msg = f"download of {self.key!r} was abandoned; {self.tmp} is gone"
            raise StoreError(msg, key=self.key)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`; blocking, for a worker thread."""
        view = memoryview(data)
        with self._lock:
            self._check_open()
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written

    def hash_written(self, length: int) -> None:
        """Hash the next `length` bytes, already written, reading them back; blocking."""
        end = self._hashed + length
        while self._hashed < end:
            with self._lock:
                self._check_open()
                chunk = os.pread(self._fd, min(CHUNK_BYTES, end - self._hashed), self._hashed)
            if not chunk:
                msg = f"download of {self.key!r}: {self.tmp} is shorter than what was written"
                raise StoreError(msg, key=self.key)
            self._hasher.update(chunk)
            self._hashed += len(chunk)

    def write_next(self, data: bytes) -> None:
        """Write `data` right after what was hashed so far, and hash it (the in-order path)."""
        self.write_at(self._hashed, data)
        self._hasher.update(data)
        self._hashed += len(data)

    def commit(
        self, size: int, expected_digest: str | None, *, fsync: bool = True
    ) -> tuple[int, str]:
        """Check the bytes, then rename the file onto the target; returns (size, digest).

        Raises:
            IntegrityError: fewer or more bytes than `size`, or a different digest.
        """
        digest = f"{self._algorithm}:{self._hasher.hexdigest()}"
        problem = None
        if self._hashed != size:
            problem = f"{self._hashed} bytes arrived, not the {size} the store announced"
        elif expected_digest is not None and digest != expected_digest:
            problem = f"its digest is {digest}, not the published {expected_digest}"
        if problem is not None:
            msg = f"download of {self.key!r} refused: {problem}; nothing was written to {self.path}"
            raise IntegrityError(msg, key=self.key)
        with self._lock:
            self._check_open()
            if fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
        if fsync:
            _fsync_dir(self.path.parent)
        return size, digest

    def discard(self) -> None:
        """Close and remove the temporary file (after a failure or cancellation).

        Waits for a write or read still running in a worker thread (at most one chunk).
        """
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory that holds the new name."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale(directory: Path) -> int:
    """Remove temporary download files a killed process left under `directory`; how many."""
    removed = 0
    if not directory.is_dir():
        return removed
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            if name.startswith(TMP_MARK):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                    removed += 1
    return removed
