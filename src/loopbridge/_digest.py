"""Content digests of checkpoints: one file, or a directory of shards.

A file's digest is `sha256:<hex>`. A directory's is the sha256 of one line per file,
`<relative posix path>\\t<size>\\t<sha256 hex>\\n`, sorted by path, so an uploader that hashes
each shard as it streams it can rebuild the directory digest without reading anything twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from loopbridge._exceptions import CheckpointFilesError

__all__ = [
    "CHUNK_BYTES",
    "combine_shard_digests",
    "digest_path",
    "sha256_file",
    "shard_files",
    "size_of",
]

CHUNK_BYTES = 1 << 20
"""Read size for hashing; large enough that hashlib releases the GIL for most of the work."""


def sha256_file(path: Path) -> tuple[int, str]:
    """Return the size and sha256 hex digest of one file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


def shard_files(directory: Path) -> list[Path]:
    """Every file under `directory`, through symlinks too, sorted by relative posix path.

    Symlinked subdirectories are walked and symlinked files read through their links, so a
    checkpoint whose shards live on another disk is complete. A dangling link, a link loop,
    an unreadable directory or anything that is not a regular file (a socket, a FIFO) is an
    error naming it: a checkpoint with a part left out is never described as whole.

    Raises:
        CheckpointFilesError: something under `directory` cannot be read as a file.
    """
    files: list[Path] = []
    _walk(directory, directory, [_identity(directory, directory)], files)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _identity(path: Path, root: Path) -> tuple[int, int]:
    """A directory's (device, inode), following links; the error names it if it cannot."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _unreadable(path, root, exc) from exc
    return st.st_dev, st.st_ino


def _walk(directory: Path, root: Path, ancestors: list[tuple[int, int]], files: list[Path]) -> None:
    """Add the files under `directory`; `ancestors` are the real directories above it."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise _unreadable(directory, root, exc) from exc
    for entry in entries:
        path = directory / entry.name
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            raise _unreadable(path, root, exc) from exc
        if stat.S_ISDIR(st.st_mode):
            identity = (st.st_dev, st.st_ino)
            if identity in ancestors:
                target = os.readlink(path) if entry.is_symlink() else path
                msg = (
                    f"checkpoint {root}: {path} links back to a directory that contains it "
                    f"({target}), a symlink loop; remove the link or point it elsewhere"
                )
                raise CheckpointFilesError(msg)
            _walk(path, root, [*ancestors, identity], files)
        elif stat.S_ISREG(st.st_mode):
            files.append(path)
        else:
            msg = (
                f"checkpoint {root}: {path} is not a regular file or directory (mode "
                f"{stat.filemode(st.st_mode)}); a checkpoint holds only files: remove it"
            )
            raise CheckpointFilesError(msg)


def _unreadable(path: Path, root: Path, exc: OSError) -> CheckpointFilesError:
    """The error for a path under a checkpoint that cannot be read, naming it and why."""
    if path.is_symlink() and not path.exists() and exc.errno == errno.ENOENT:
        why = f"is a dangling symlink to {os.readlink(path)}"
    elif exc.errno == errno.ELOOP:
        why = "is a symlink loop"
    else:
        why = f"cannot be read ({exc.strerror or exc})"
    msg = f"checkpoint {root}: {path} {why}; fix or remove it so the whole checkpoint uploads"
    return CheckpointFilesError(msg)


def combine_shard_digests(shards: Iterable[tuple[str, int, str]]) -> str:
    """Combine `(relative path, size, sha256 hex)` of each shard into the directory digest."""
    hasher = hashlib.sha256()
    for rel, size, hexdigest in sorted(shards):
        hasher.update(f"{rel}\t{size}\t{hexdigest}\n".encode())
    return "sha256:" + hasher.hexdigest()


def digest_path(path: Path) -> tuple[int, str]:
    """Return the total size and the digest of a checkpoint file or directory of shards."""
    if path.is_dir():
        shards = []
        total = 0
        for file in shard_files(path):
            size, hexdigest = sha256_file(file)
            shards.append((file.relative_to(path).as_posix(), size, hexdigest))
            total += size
        return total, combine_shard_digests(shards)
    size, hexdigest = sha256_file(path)
    return size, "sha256:" + hexdigest


def size_of(path: Path) -> int:
    """Return the total size of a checkpoint file or directory of shards, without reading it."""
    if path.is_dir():
        return sum(file.stat().st_size for file in shard_files(path))
    return path.stat().st_size
