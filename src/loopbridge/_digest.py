"""Content digests of checkpoints: one file, or a directory of shards.

A digest names its algorithm: `blake3:<hex>` for new ones (BLAKE3, a cryptographic hash
like sha256, hashes about four times faster here, SHA extensions included), `sha256:<hex>`
for those of older runs, which are still checked. A file's digest hashes its bytes. A directory's
hashes one line per file, `<relative posix path>\\t<size>\\t<hex>\\n`, sorted by path, with the
files' algorithm, so an uploader that hashes each shard as it streams it can rebuild the
directory digest without reading anything twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import blake3

from loopbridge._exceptions import CheckpointFilesError

__all__ = [
    "ALGORITHM",
    "CHUNK_BYTES",
    "Hasher",
    "algorithm_of",
    "bytes_digest",
    "combine_shard_digests",
    "digest_path",
    "file_digest",
    "new_hasher",
    "shard_files",
    "size_of",
    "split_digest",
]

CHUNK_BYTES = 1 << 20
"""Read size for hashing; large enough that the hashers release the GIL for most of the work."""

ALGORITHM = "blake3"
"""The algorithm of every digest loopbridge computes anew."""


class Hasher(Protocol):
    """The part of a hashlib-style hasher that digests use."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


_HASHERS: dict[str, Callable[[], Hasher]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}


def new_hasher(algorithm: str = ALGORITHM) -> Hasher:
    """An empty hasher for `algorithm` (one of the digest algorithms, see `split_digest`)."""
    return _HASHERS[algorithm]()


def split_digest(digest: str) -> tuple[str, str]:
    """`(algorithm, hex)` of a digest like `blake3:<hex>`.

    Raises:
        ValueError: not `<algorithm>:<hex>` with an algorithm loopbridge can check.
    """
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm not in _HASHERS or not hexdigest:
        known = " or ".join(f"'{name}:<hex>'" for name in _HASHERS)
        msg = f"unsupported checkpoint digest {digest!r}: expected {known}"
        raise ValueError(msg)
    return algorithm, hexdigest


def algorithm_of(digest: str | None) -> str:
    """The algorithm to check `digest` with; for no digest, the one new digests use."""
    return ALGORITHM if digest is None else split_digest(digest)[0]


def bytes_digest(data: bytes, algorithm: str = ALGORITHM) -> str:
    """The digest (`<algorithm>:<hex>`) of `data`."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def file_digest(path: Path, algorithm: str = ALGORITHM) -> tuple[int, str]:
    """Return the size and digest (`<algorithm>:<hex>`) of one file, read in chunks."""
    hasher = new_hasher(algorithm)
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return size, f"{algorithm}:{hasher.hexdigest()}"


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
    """Combine `(relative path, size, digest)` of each shard into the directory digest.

    Raises:
        ValueError: the shards were hashed with different algorithms.
    """
    lines = sorted((rel, size, *split_digest(digest)) for rel, size, digest in shards)
    algorithms = {algorithm for _, _, algorithm, _ in lines} or {ALGORITHM}
    if len(algorithms) > 1:
        msg = f"shards hashed with different algorithms ({', '.join(sorted(algorithms))})"
        raise ValueError(msg)
    (algorithm,) = algorithms
    hasher = new_hasher(algorithm)
    for rel, size, _, hexdigest in lines:
        hasher.update(f"{rel}\t{size}\t{hexdigest}\n".encode())
    return f"{algorithm}:{hasher.hexdigest()}"


def digest_path(path: Path, algorithm: str = ALGORITHM) -> tuple[int, str]:
    """Return the total size and the digest of a checkpoint file or directory of shards."""
    if path.is_dir():
        shards = []
        total = 0
        for file in shard_files(path):
            size, digest = file_digest(file, algorithm)
            shards.append((file.relative_to(path).as_posix(), size, digest))
            total += size
        return total, combine_shard_digests(shards)
    return file_digest(path, algorithm)


def size_of(path: Path) -> int:
    """Return the total size of a checkpoint file or directory of shards, without reading it."""
    if path.is_dir():
        return sum(file.stat().st_size for file in shard_files(path))
    return path.stat().st_size
