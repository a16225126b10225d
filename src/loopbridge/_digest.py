"""Content digests of checkpoints: one file, or a directory of shards.

A file's digest is `sha256:<hex>`. A directory's is the sha256 of one line per file,
`<relative posix path>\\t<size>\\t<sha256 hex>\\n`, sorted by path, so an uploader that hashes
each shard as it streams it can rebuild the directory digest without reading anything twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

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
    """The regular files under `directory`, sorted by their relative posix path."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


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
