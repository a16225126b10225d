"""Moving one checkpoint's bytes: its file or shards to the store, verified, and its digest.

The uploader's background half for one checkpoint, below the per-run ordering and above the
store: every file is sent with `put_file`, checked against the row's digest (or, when the
uploader claimed the digest, against the file's stamps at save time, the digest hashed while
streaming becoming the row's), and the shard set is checked unchanged after the upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from loopbridge._digest import algorithm_of, combine_shard_digests, file_digest, shard_files
from loopbridge._exceptions import IntegrityError
from loopbridge._loop import MANIFEST_FILE
from loopbridge._row_digest import PendingDigest, patch_manifest_digest
from loopbridge._types import ManifestRow
from loopbridge.callbacks._publish import Shard
from loopbridge.callbacks._upload_journal import JournalEntry
from loopbridge.stores import ObjectStore
from loopbridge.stores.keys import join_key

__all__ = ["digest_known", "settle_claim", "upload_dir", "upload_file"]


async def upload_file(
    store: ObjectStore,
    row: ManifestRow,
    step_prefix: str,
    sent: list[str],
    claim: PendingDigest | None,
) -> list[Shard]:
    """Upload a single-file checkpoint, checked against the row's digest while streamed.

    With `claim`, the file is checked against its stamp at save time instead, once the bytes
    are sent (the store saw them unchanged while it read them, so a rewrite before the upload
    shows then too), and the digest hashed while streaming becomes the row's.
    """
    key = join_key(step_prefix, row.path.name)
    expected = None if claim is not None else row.digest
    result = await store.put_file(key, row.path, expected_digest=expected)
    sent.append(key)
    if claim is not None:
        # On the loop: a stat and a write of a few bytes, like the journal's own writes here;
        # a trip to a worker thread would wake two more threads in the training process.
        settle_claim(claim, result.digest, step_prefix)
    return [Shard(rel=row.path.name, size=result.size, digest=result.digest)]


def settle_claim(claim: PendingDigest, digest: str, key: str) -> None:
    """Check the checkpoint is still as saved, then give the row its digest (and its line in
    manifest.jsonl)."""
    claim.check_unchanged(key)
    claim.set(digest)


async def upload_dir(
    store: ObjectStore,
    row: ManifestRow,
    step_prefix: str,
    sent: list[str],
    claim: PendingDigest | None,
) -> list[Shard]:
    """Upload a directory of shards file by file, then check the set and the digest."""
    if claim is not None:
        await asyncio.to_thread(claim.check_unchanged, step_prefix)
    files = await asyncio.to_thread(shard_files, row.path)
    rels = [file.relative_to(row.path).as_posix() for file in files]
    if not files:
        msg = f"checkpoint step {row.step}: the directory {row.path} has no files to upload"
        raise IntegrityError(msg, key=step_prefix)
    shards = []
    for file, rel in zip(files, rels, strict=True):
        key = join_key(step_prefix, rel)
        result = await store.put_file(key, file)
        sent.append(key)
        shards.append(Shard(rel=rel, size=result.size, digest=result.digest))
    now = await asyncio.to_thread(shard_files, row.path)
    if [file.relative_to(row.path).as_posix() for file in now] != rels:
        msg = (
            f"checkpoint step {row.step}: files were added to or removed from {row.path} "
            f"while it was uploaded"
        )
        raise IntegrityError(msg, key=step_prefix)
    shards = await _in_row_algorithm(row, shards)
    digest = combine_shard_digests((s.rel, s.size, s.digest) for s in shards)
    if row.digest is not None and digest != row.digest:
        msg = (
            f"checkpoint step {row.step}: the shards in {row.path} hash to {digest}, not "
            f"the saved {row.digest}; a shard changed after it was saved"
        )
        raise IntegrityError(msg, key=step_prefix)
    if claim is not None:
        await asyncio.to_thread(settle_claim, claim, digest, step_prefix)
    return shards


async def _in_row_algorithm(row: ManifestRow, shards: list[Shard]) -> list[Shard]:
    """The shards with their digests in the algorithm of the row's digest.

    A directory row hashed by an older version (sha256), resumed from its journal, is checked
    and published with sha256: its shards were hashed with BLAKE3 as they were sent, so they
    are read again.
    """
    if row.digest is None:
        return shards
    algorithm = algorithm_of(row.digest)
    if all(algorithm_of(shard.digest) == algorithm for shard in shards):
        return shards

    def rehash() -> list[Shard]:
        return [
            Shard(s.rel, s.size, file_digest(row.path.joinpath(*s.rel.split("/")), algorithm)[1])
            for s in shards
        ]

    return await asyncio.to_thread(rehash)


async def digest_known(
    row: ManifestRow,
    shards: list[Shard],
    entry: JournalEntry | None,
    claim: PendingDigest | None = None,
) -> ManifestRow:
    """The row with the digest hashed during its upload, recorded for a later resume.

    With `claim` the digest is the one it gave the saved row (and its manifest.jsonl line).
    A row resumed from the journal of a process that died before hashing it gets it here,
    and so does its waiting line in the run's manifest.jsonl.
    """
    if row.digest is None and claim is not None and claim.row.digest is not None:
        row = dataclasses.replace(row, digest=claim.row.digest)
    if row.digest is None:
        if await asyncio.to_thread(row.path.is_dir):
            digest = combine_shard_digests((s.rel, s.size, s.digest) for s in shards)
        else:
            digest = shards[0].digest
        if entry is not None:
            manifest = entry.journal.path.parent / MANIFEST_FILE
            with contextlib.suppress(OSError):
                await asyncio.to_thread(
                    patch_manifest_digest, manifest, row.step, row.created_at, digest
                )
        row = dataclasses.replace(row, digest=digest)
    if entry is not None and row.digest is not None:
        entry.digest_known(row.digest)
    return row
