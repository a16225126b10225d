"""Which files of a sharded step directory are this rank's to upload, and its part's snapshot.

Under Lightning (and any job whose ranks share one out dir) every rank saves into the SAME
step directory: torch.distributed.checkpoint's `FileSystemWriter` names each rank's data files
`__<rank>_<n>.distcp`, and its coordinator (rank 0) writes `.metadata`; a framework may add
files of its own (Lightning's `meta.pt`, written by rank 0). The rule (`rank_part`):

- a directory that holds another rank's `__<r>_<n>.distcp` file is shared: a rank owns its
  own `__<rank>_*.distcp` files, and every other file (`.metadata`, `meta.pt`, a `.distcp`
  file not named by rank) belongs to rank 0;
- a directory with no other rank's data file is the rank's own (each rank its own out dir):
  the rank owns every file in it.

In a shared directory the uploader uploads a snapshot of its own files only (`take_part`),
hard links in `.loopbridge-snapshots` beside the checkpoint, as for any snapshot: the upload,
the journal and `loopbridge resume` read that part, and never another rank's files, which
may still be being written while this rank's upload runs.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from loopbridge._digest import combine_shard_digests, shard_files
from loopbridge._row_digest import PendingDigest
from loopbridge._types import ManifestRow
from loopbridge.callbacks._publish import Shard
from loopbridge.callbacks._snapshot import SNAPSHOT_DIR, link_or_copy
from loopbridge.callbacks._transfer import settle_claim, upload_dir
from loopbridge.stores import ObjectStore

__all__ = ["dcp_rank", "is_part", "rank_part", "take_part", "upload_part"]

_DCP_DATA = re.compile(r"__(\d+)_(\d+)\.distcp")


def dcp_rank(rel: str) -> int | None:
    """The rank whose torch.distributed.checkpoint data file `rel` is, or None if it is none."""
    match = _DCP_DATA.fullmatch(rel.rpartition("/")[2])
    return int(match.group(1)) if match else None


def rank_part(rels: Iterable[str], rank: int) -> list[str]:
    """The files (relative to the step directory) that `rank` uploads, sorted."""
    files = sorted(set(rels))
    owners = {rel: dcp_rank(rel) for rel in files}
    shared = any(owner is not None and owner != rank for owner in owners.values())
    if not shared:
        return files
    return [rel for rel in files if (owners[rel] if owners[rel] is not None else 0) == rank]


def take_part(row: ManifestRow, rank: int) -> ManifestRow | None:
    """A row for this rank's files of a shared step directory; None when all are its own.

    The part is a snapshot (hard links, else copies) of only those files, which may be none;
    its row is built by `ManifestRow.for_checkpoint`, with the digest still to come.

    Raises:
        OSError: the part could not be made (the checkpoint is not uploaded half-owned).
    """
    source = row.path
    if not source.is_dir():
        return None
    rels = [file.relative_to(source).as_posix() for file in shard_files(source)]
    part = rank_part(rels, rank)
    if len(part) == len(rels):
        return None
    token = uuid.uuid4().hex[:12]
    holder = source.parent / SNAPSHOT_DIR / f"step-{row.step:08d}-{token}.rank-{rank:05d}"
    target = holder / source.name
    try:
        target.mkdir(parents=True)
        for rel in part:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source / rel, dest)
    except OSError:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    return ManifestRow.for_checkpoint(
        target, step=row.step, is_final=row.is_final, run_name=row.run_name
    )


def is_part(path: Path) -> bool:
    """Whether `path` is a rank's part made by `take_part` (which may hold no files)."""
    holder = path.parent
    return holder.parent.name == SNAPSHOT_DIR and ".rank-" in holder.name


async def upload_part(
    store: ObjectStore,
    row: ManifestRow,
    step_prefix: str,
    sent: list[str],
    claim: PendingDigest | None,
) -> list[Shard]:
    """Upload a rank's part like any directory of shards; a part with no files sends nothing.

    An empty part is still this rank's finished share of the step: its rank marker (with no
    files) tells the publisher not to wait for it.
    """
    if await asyncio.to_thread(shard_files, row.path):
        return await upload_dir(store, row, step_prefix, sent, claim)
    if claim is not None:
        await asyncio.to_thread(settle_claim, claim, combine_shard_digests([]), step_prefix)
    return []
