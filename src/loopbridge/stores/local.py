"""`LocalStore`: objects as files under a root directory, published atomically.

A put streams into a temporary name in the target directory, fsyncs it, checks that the
source did not change while it was read, and only then renames it into place (and fsyncs the
directory), so a reader sees either the old object or the whole new one. It suits a local
disk and shared filesystems alike.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import anyio.to_thread

from loopbridge._digest import CHUNK_BYTES, algorithm_of, bytes_digest, new_hasher
from loopbridge._exceptions import IntegrityError, ObjectNotFoundError, StoreError
from loopbridge.stores._sink import FileSink
from loopbridge.stores._source import hash_thread
from loopbridge.stores.keys import join_key
from loopbridge.stores.protocol import ClosingStore, GetResult, ObjectInfo, PutResult

__all__ = ["LocalStore"]

_TMP_MARK = ".lb-tmp-"


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    """The parts of a stat that change when a file is replaced or rewritten."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LocalStore(ClosingStore):
    """An `ObjectStore` over a directory; keys map to relative paths under `root`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self._root)!r})"

    @property
    def url(self) -> str:
        """The root as a `file://` URL."""
        return self._root.as_uri()

    @property
    def root(self) -> Path:
        """The directory that holds the objects."""
        return self._root

    @property
    def retries(self) -> int:
        """Always 0: local writes are not retried."""
        return 0

    def _path(self, key: str) -> Path:
        """The file for `key`, after the key passed the safety checks."""
        return self._root / join_key(key)

    async def put_file(
        self, key: str, path: Path, *, expected_digest: str | None = None
    ) -> PutResult:
        """Copy `path` to `key` through a temporary file; refuse it if the source changed."""
        target = self._path(key)
        algorithm_of(expected_digest)  # a malformed digest is refused before anything is read
        return await hash_thread(self._copy_file, key, Path(path), target, expected_digest)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        """Write `data` to `key` through a temporary file."""
        target = self._path(key)
        return await anyio.to_thread.run_sync(self._write_bytes, key, data, target)

    async def get_bytes(self, key: str) -> bytes | None:
        """Read the file for `key`, or None when there is none."""
        target = self._path(key)
        try:
            return await anyio.to_thread.run_sync(target.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def get_file(
        self,
        key: str,
        path: Path,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        """Copy the file for `key` to `path` through a temporary name, hashing as it goes."""
        source = self._path(key)
        algorithm_of(expected_digest)  # a malformed digest is refused before anything is read
        stop = threading.Event()
        copy = asyncio.ensure_future(
            asyncio.to_thread(
                functools.partial(
                    self._copy_out,
                    key,
                    source,
                    Path(path),
                    expected_digest=expected_digest,
                    expected_size=expected_size,
                    stop=stop,
                )
            )
        )
        try:
            return await asyncio.shield(copy)
        except asyncio.CancelledError:
            # The thread cannot be cancelled: tell it to stop, and wait until it cleaned up.
            stop.set()
            with contextlib.suppress(Exception):
                await copy
            raise

    def _copy_out(
        self,
        key: str,
        source: Path,
        path: Path,
        *,
        expected_digest: str | None,
        expected_size: int | None,
        stop: threading.Event,
    ) -> GetResult:
        """Stream `source` into a FileSink for `path`; runs in a worker thread."""
        try:
            src = source.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            msg = f"no object {key!r} in {self.url} (no file {str(source)!r})"
            raise ObjectNotFoundError(msg, key=key) from exc
        with src:
            size = os.fstat(src.fileno()).st_size
            if expected_size is not None and size != expected_size:
                msg = (
                    f"object {key!r} in {self.url} has {size} bytes, not the published "
                    f"{expected_size}; it was changed or truncated after it was published"
                )
                raise IntegrityError(msg, key=key)
            sink = FileSink.open(path, key, algorithm_of(expected_digest))
            try:
                while chunk := src.read(CHUNK_BYTES):
                    if stop.is_set():
                        msg = f"download of {key!r} cancelled"
                        raise StoreError(msg, key=key)
                    sink.write_next(chunk)
                _, digest = sink.commit(size, expected_digest)
            except BaseException:
                sink.discard()
                raise
        return GetResult(key=key, path=path, size=sink.hashed, digest=digest)

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and modification time of the file for `key`, or None when there is none."""
        target = self._path(key)
        try:
            st = await anyio.to_thread.run_sync(target.stat)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every file whose key starts with `prefix`, skipping unfinished temporary files."""
        return await anyio.to_thread.run_sync(self._list, prefix)

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the files for `keys`, then any directories that became empty."""
        targets = [self._path(key) for key in keys]
        await anyio.to_thread.run_sync(self._delete, targets)

    async def aclose(self) -> None:
        """Nothing to release: files are opened and closed per call."""

    async def abort_stale_uploads(self, prefix: str) -> int:
        """Remove temporary files under `prefix` left by a dead process; returns how many."""
        return await anyio.to_thread.run_sync(self._remove_stale, prefix)

    def _remove_stale(self, prefix: str) -> int:
        """Unlink unfinished temporary files whose key starts with `prefix`; a worker thread."""
        head, _, _ = prefix.rpartition("/")
        start = self._path(head) if head else self._root
        removed = 0
        if not start.is_dir():
            return removed
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                full = Path(dirpath) / name
                key = full.relative_to(self._root).as_posix()
                if name.startswith(_TMP_MARK) and key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        full.unlink()
                        removed += 1
        return removed

    def _copy_file(
        self, key: str, source: Path, target: Path, expected_digest: str | None
    ) -> PutResult:
        """Stream `source` into `target`, hashing as it goes; runs in a worker thread."""
        try:
            src = source.open("rb")
        except FileNotFoundError as exc:
            msg = f"cannot store {key!r}: the local file {str(source)!r} disappeared before upload"
            raise IntegrityError(msg, key=key) from exc
        algorithm = algorithm_of(expected_digest)
        hasher = new_hasher(algorithm)
        size = 0
        with src:
            before = _fingerprint(os.fstat(src.fileno()))
            tmp = self._tmp_path(target)
            try:
                with tmp.open("wb") as dst:
                    while chunk := src.read(CHUNK_BYTES):
                        hasher.update(chunk)
                        size += len(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                digest = f"{algorithm}:{hasher.hexdigest()}"
                self._check_unchanged(
                    key=key,
                    source=source,
                    before=before,
                    size=size,
                    digest=digest,
                    expected_digest=expected_digest,
                )
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        self._fsync_dir(target.parent)
        return PutResult(key=key, size=size, digest=digest, etag=None)

    def _write_bytes(self, key: str, data: bytes, target: Path) -> PutResult:
        """Write `data` into `target` atomically; runs in a worker thread."""
        tmp = self._tmp_path(target)
        try:
            with tmp.open("wb") as dst:
                dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fsync_dir(target.parent)
        return PutResult(key=key, size=len(data), digest=bytes_digest(data), etag=None)

    @staticmethod
    def _check_unchanged(
        *,
        key: str,
        source: Path,
        before: tuple[int, int, int, int],
        size: int,
        digest: str,
        expected_digest: str | None,
    ) -> None:
        """Raise IntegrityError if the source was replaced, rewritten or removed while read."""
        try:
            after: tuple[int, int, int, int] | None = _fingerprint(source.stat())
        except FileNotFoundError:
            after = None
        problem = None
        if after is None:
            problem = "was deleted while it was read"
        elif after != before or size != before[2]:
            problem = "changed while it was read (size, mtime or inode differ)"
        elif expected_digest is not None and digest != expected_digest:
            problem = f"has digest {digest}, not the expected {expected_digest}"
        if problem is not None:
            msg = f"refusing to store {key!r}: the local file {str(source)!r} {problem}"
            raise IntegrityError(msg, key=key)

    def _tmp_path(self, target: Path) -> Path:
        """A fresh temporary name beside `target`, creating its directory."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create the directory {str(target.parent)!r} in {self.url}: {exc}"
            raise StoreError(msg, key=str(target.relative_to(self._root))) from exc
        return target.with_name(f"{_TMP_MARK}{uuid.uuid4().hex}-{target.name}")

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        """Persist a rename: fsync the directory that holds the new name."""
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Walk only the directory that can hold keys with `prefix`; runs in a worker thread."""
        head, _, _ = prefix.rpartition("/")
        start = self._path(head) if head else self._root
        found: builtins.list[ObjectInfo] = []
        if not start.is_dir():
            return found
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(_TMP_MARK):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self._root).as_posix()
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = full.stat()
                    found.append(ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime))
        found.sort(key=lambda info: info.key)
        return found

    def _delete(self, targets: builtins.list[Path]) -> None:
        """Unlink files and prune the directories they leave empty, up to the root."""
        parents: set[Path] = set()
        for target in targets:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            parents.add(target.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            current = parent
            while current != self._root and self._root in current.parents:
                try:
                    current.rmdir()
                except OSError:
                    break
                current = current.parent
