"""A local file being uploaded: read in order, hashed as read, and checked for changes.

The file is opened once and read through that descriptor, so a file deleted mid-upload
still reads consistently; what catches the deletion, or a rewrite, is comparing the path's
stat (device, inode, size, mtime) and the bytes read with what they were at the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from loopbridge._digest import ALGORITHM, new_hasher
from loopbridge._exceptions import IntegrityError

T = TypeVar("T")

__all__ = ["SourceFile", "hash_thread"]

# Reading and hashing is most of an upload's CPU. It runs on anyio's worker threads, at most
# `_HASH_THREADS` at once per event loop, and each such thread runs at a slightly lower priority
# (a Linux nice per thread), so that when the cores are busy the scheduler favours the training
# thread over background hashing. anyio keeps its worker threads per event loop: on the bridge's
# loop these are loopbridge's own.
_NICE = 5
_HASH_THREADS = 4
_THREAD_NAME = "loopbridge-hash"

_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)
_lowered = threading.local()


def _lower_priority() -> None:
    """Lower this worker thread's priority once (where the OS allows it)."""
    if getattr(_lowered, "done", False):
        return
    _lowered.done = True
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)


def _limiter() -> anyio.CapacityLimiter:
    """The running loop's bound on threads reading and hashing at once."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(_HASH_THREADS)
    return limiter


def _on_hash_thread(func: Callable[..., T], *args: Any) -> T:
    """Run `func` in a worker thread, named and niced as a hashing thread while it runs."""
    _lower_priority()
    thread = threading.current_thread()
    name, thread.name = thread.name, _THREAD_NAME
    try:
        return func(*args)
    finally:
        thread.name = name


async def hash_thread(func: Callable[..., T], *args: Any) -> T:
    """Run read-and-hash work on a lower-priority worker thread, a bounded number at once."""
    return await anyio.to_thread.run_sync(_on_hash_thread, func, *args, limiter=_limiter())


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    """The parts of a stat that change when a file is replaced or rewritten."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SourceFile:
    """An open local file whose bytes are hashed (a digest) in order as they are read."""

    def __init__(
        self, path: Path, key: str, handle: io.BufferedIOBase, algorithm: str = ALGORITHM
    ) -> None:
        self.path = path
        self.key = key
        self._handle = handle
        self._before = _fingerprint(os.fstat(handle.fileno()))
        self._algorithm = algorithm
        self._hasher = new_hasher(algorithm)
        self._read = 0

    @classmethod
    async def open(cls, path: Path, key: str, algorithm: str = ALGORITHM) -> SourceFile:
        """Open `path` for upload to `key`, to be hashed with `algorithm`.

        Raises:
            IntegrityError: the file is gone (deleted while its upload was queued).
        """
        try:
            handle = await anyio.to_thread.run_sync(path.open, "rb")
        except FileNotFoundError as exc:
            msg = f"cannot upload {key!r}: the local file {str(path)!r} disappeared before upload"
            raise IntegrityError(msg, key=key) from exc
        return cls(path, key, handle, algorithm)

    @property
    def size(self) -> int:
        """The size when the file was opened."""
        return self._before[2]

    @property
    def digest(self) -> str:
        """The digest (`<algorithm>:<hex>`) of the bytes read so far."""
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    def _read_part(self, size: int, checksums: Callable[[bytes], T]) -> tuple[bytes, T]:
        """Read up to `size` bytes and hash them (the digest and `checksums`), in one worker thread
        trip, while they are fresh in the cache; hashing frees the GIL."""
        data = self._handle.read(size)
        self._hasher.update(data)
        self._read += len(data)
        return data, checksums(data)

    async def read_part(self, size: int, checksums: Callable[[bytes], T]) -> tuple[bytes, T]:
        """The next `size` bytes (fewer at the end), with `checksums(data)` computed as read."""
        return await hash_thread(self._read_part, size, checksums)

    def _read_part_into(
        self, buffer: bytearray, checksums: Callable[[memoryview], T]
    ) -> tuple[memoryview, T]:
        """Fill `buffer` (less at the end) and hash what was read, as `_read_part` does."""
        view = memoryview(buffer)
        filled = 0
        while filled < len(view):
            got = self._handle.readinto(view[filled:])
            if not got:
                break
            filled += got
        data = view[:filled].toreadonly()
        self._hasher.update(data)
        self._read += filled
        return data, checksums(data)

    async def read_part_into(
        self, buffer: bytearray, checksums: Callable[[memoryview], T]
    ) -> tuple[memoryview, T]:
        """The next `len(buffer)` bytes read into `buffer` (fewer at the end), as a read-only
        view of it, with `checksums(data)` computed as read."""
        return await hash_thread(self._read_part_into, buffer, checksums)

    def _problem(self, expected_digest: str | None) -> str | None:
        """What changed since the file was opened, or None."""
        try:
            after = _fingerprint(self.path.stat())
        except FileNotFoundError:
            return "was deleted while it was uploaded"
        if after != self._before:
            return "changed while it was uploaded (size, mtime or inode differ)"
        if self._read != self._before[2]:
            return f"gave {self._read} bytes, not the {self._before[2]} it had when opened"
        if expected_digest is not None and self.digest != expected_digest:
            return f"has digest {self.digest}, not the expected {expected_digest}"
        return None

    async def check_unchanged(self, expected_digest: str | None = None) -> None:
        """Raise IntegrityError if the file changed or vanished, or its bytes are not expected."""
        problem = await anyio.to_thread.run_sync(self._problem, expected_digest)
        if problem is not None:
            msg = f"refusing to publish {self.key!r}: the local file {str(self.path)!r} {problem}"
            raise IntegrityError(msg, key=self.key)

    def close(self) -> None:
        """Close the file."""
        self._handle.close()
