"""Sharded checkpoints under torchrun: every rank uploads its files, one rank publishes.

Coordination goes through the object store itself, never through a collective:

1. each rank uploads the files it wrote into the step, verified as for any checkpoint;
2. it then writes its rank marker, `step-N/_RANK-00001.json`, listing those files with their
   sizes and digests (a rank that fails writes `_RANK-00001.failed.json` instead, best effort);
3. the publishing rank (global rank 0), on its background loop, waits (bounded) until every
   rank's marker is there, checks the listed files are in the store with their sizes, and only
   then writes `_COMPLETE`, the manifest and `latest` with the files of all ranks.

Why the store and not torch.distributed's key-value store: the markers outlive the processes.
After a crash, `loopbridge resume` on each rank's out dir re-uploads that rank's files and
re-writes its marker, and the publisher publishes once every marker is there, with no process
group (and no torchrun) alive. Waiting happens on the bridge, so no training thread waits for
another rank's upload, and a rank that never reports only fails the step, after the timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loopbridge._digest import combine_shard_digests
from loopbridge._exceptions import IntegrityError, StoreError
from loopbridge._ranks import RankInfo
from loopbridge._types import ManifestRow
from loopbridge.callbacks._layout import encode_document, read_files
from loopbridge.callbacks._upload_journal import resume_shortcut
from loopbridge.stores import CleansStaleUploads, ObjectStore
from loopbridge.stores.keys import join_key

__all__ = ["RANKS_FILE", "RankMode", "ShardedCommit", "ranks_file", "read_ranks_file"]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")

RankMode = Literal["zero", "sharded"]
"""How the ranks of a torchrun job save: rank 0 the whole checkpoint, or every rank its part."""

RANKS_FILE = "loopbridge-ranks.json"
"""Written in a sharded rank's out dir, so `loopbridge resume` knows its rank and world size."""


def ranks_file(rank: int) -> str:
    """The ranks file's name for a rank, beside its journal (see `journal.journal_file`)."""
    return RANKS_FILE if rank == 0 else f"loopbridge-ranks.rank-{rank:05d}.json"


_MARKER_TIMEOUT = 10.0  # writing a failure marker is best effort: the store may be what failed
_POLL_FIRST = 0.05
_POLL_MAX = 1.0


def rank_marker(rank: int) -> str:
    """The name of a rank's marker inside the step's prefix."""
    return f"_RANK-{rank:05d}.json"


def failed_marker(rank: int) -> str:
    """The name of the marker a rank writes when its part of the step failed."""
    return f"_RANK-{rank:05d}.failed.json"


@dataclass(frozen=True, slots=True)
class ShardedCommit:
    """One rank's side of committing sharded checkpoints; rank 0 publishes.

    Args:
        rank: this process's rank and the world size.
        timeout: how long the publisher waits for the other ranks' markers of a step.
    """

    rank: RankInfo
    timeout: float = 600.0

    @property
    def publishes(self) -> bool:
        """Whether this rank writes the step's marker, the manifest and `latest`."""
        return self.rank.is_zero

    @property
    def marker(self) -> str:
        """This rank's marker name, which also tells a resumed upload that its part is done."""
        return rank_marker(self.rank.rank)

    def write_ranks_file(self, out_dir: Path) -> None:
        """Record the rank in the out dir, for `loopbridge resume` (training thread, once)."""
        path = out_dir / ranks_file(self.rank.rank)
        data = {
            "mode": "sharded",
            "rank": self.rank.rank,
            "world_size": self.rank.world_size,
            "timeout": self.timeout,
        }
        text = json.dumps(data, sort_keys=True)
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    async def commit(
        self,
        store: ObjectStore,
        row: ManifestRow,
        step_prefix: str,
        files: Sequence[dict[str, Any]],
        sent: list[str],
    ) -> None:
        """Write this rank's marker for its verified files (its key is added to `sent`)."""
        marker = {
            "rank": self.rank.rank,
            "world_size": self.rank.world_size,
            "step": row.step,
            "digest": row.digest or combine_shard_digests(_triples(files)),
            "size_bytes": row.size_bytes,
            "files": list(files),
            "finished_at": time.time(),
        }
        key = join_key(step_prefix, self.marker)
        await store.put_bytes(key, encode_document(marker))
        sent.append(key)

    async def gather(
        self, store: ObjectStore, row: ManifestRow, step_prefix: str
    ) -> tuple[ManifestRow, list[dict[str, Any]]]:
        """Wait for every rank's marker; return the step's row and files across all ranks.

        Raises:
            IntegrityError: a rank failed, did not report within the timeout, or its files
                are not in the store as listed; the step must not be published.
        """
        markers = await self._wait_for_markers(store, row.step, step_prefix)
        present = {info.key: info.size for info in await store.list(step_prefix + "/")}
        merged: dict[str, dict[str, Any]] = {}
        for rank, marker in sorted(markers.items()):
            for file in marker["files"]:
                rel = str(file["path"])
                key = join_key(step_prefix, rel)
                if present.get(key) != int(file["size"]):
                    msg = (
                        f"checkpoint step {row.step}: rank {rank}'s file {rel} is not in the "
                        f"store with its {file['size']} bytes; the step is not published; run "
                        f"`loopbridge resume` on rank {rank}'s out dir"
                    )
                    raise IntegrityError(msg, key=key)
                other = merged.get(rel)
                if other is not None and other["digest"] != file["digest"]:
                    msg = (
                        f"checkpoint step {row.step}: ranks {other['rank']} and {rank} both "
                        f"wrote {rel} with different contents; give each rank's files their "
                        f"own names (as torch.distributed.checkpoint does)"
                    )
                    raise IntegrityError(msg, key=key)
                merged[rel] = {**file, "rank": rank}
        files = [merged[rel] for rel in sorted(merged)]
        total = sum(int(f["size"]) for f in files)
        whole = ManifestRow(
            step=row.step,
            path=row.path,
            size_bytes=total,
            digest=combine_shard_digests(_triples(files)),
            created_at=row.created_at,
            is_final=row.is_final,
            run_name=row.run_name,
        )
        return whole, files

    async def report_failure(
        self, store: ObjectStore, row: ManifestRow, step_prefix: str, error: BaseException
    ) -> None:
        """Tell the publisher this rank's part failed, naming its files (best effort)."""
        try:
            names = await asyncio.to_thread(_local_files, row.path)
            failure = {
                "rank": self.rank.rank,
                "step": row.step,
                "files": names,
                "error": f"{type(error).__name__}: {error}",
                "failed_at": time.time(),
            }
            async with asyncio.timeout(_MARKER_TIMEOUT):
                key = join_key(step_prefix, failed_marker(self.rank.rank))
                await store.put_bytes(key, encode_document(failure))
        except Exception as exc:
            logger.warning(
                "rank %d could not tell the publisher step %d failed: %s; it times out instead",
                self.rank.rank,
                row.step,
                exc,
            )

    async def discard(
        self, store: ObjectStore, row: ManifestRow, step_prefix: str, sent: list[str]
    ) -> None:
        """Delete what this rank sent for a failed step, its unfinished uploads too.

        Only this rank's own files (the ones it saved, and what it sent): the other ranks'
        parts of the step stay, so their resumed uploads need not send them again.

        Raises:
            StoreError: something could not be deleted (the message names where).
        """
        names = await asyncio.to_thread(_local_files, row.path)
        keys = sorted({join_key(step_prefix, name) for name in names} | set(sent))
        problems: list[str] = []
        try:
            async with asyncio.timeout(_MARKER_TIMEOUT):  # bounded: the store may have failed
                if isinstance(store, CleansStaleUploads):
                    for key in keys:
                        try:
                            await store.abort_stale_uploads(key)
                        except (StoreError, OSError) as exc:
                            problems.append(f"unfinished upload of {key} not aborted: {exc}")
                await store.delete(keys)
        except Exception as exc:
            problems.append("timed out" if isinstance(exc, TimeoutError) else str(exc))
        if problems:
            msg = (
                f"rank {self.rank.rank}'s files under {store.url}/{step_prefix}/ could not be "
                f"deleted ({'; '.join(problems)}); `loopbridge resume` on its out dir uploads "
                f"them again"
            )
            raise StoreError(msg, key=step_prefix + "/")

    async def resume_shortcut(
        self, store: ObjectStore, row: ManifestRow, step_prefix: str
    ) -> list[dict[str, Any]] | None:
        """Prepare a resumed upload of this rank's part; its files if its marker says done.

        Stale multipart uploads are cleared under this rank's own file names only: other ranks
        may be uploading into the same step right now (all ranks resume at once on a restart).
        """
        # An earlier attempt's failure must not fail the step while this one is under way.
        await store.delete([join_key(step_prefix, failed_marker(self.rank.rank))])
        if isinstance(store, CleansStaleUploads) and await asyncio.to_thread(row.path.exists):
            for rel in await asyncio.to_thread(_local_files, row.path):
                key = join_key(step_prefix, rel)
                try:  # best effort, as for a whole step: stale parts cost storage only
                    await store.abort_stale_uploads(key)
                except (StoreError, OSError) as exc:
                    logger.warning("could not clear unfinished uploads of %s (%s)", key, exc)
        return await resume_shortcut(store, row, step_prefix, self.marker, clean_stale=False)

    async def _wait_for_markers(
        self, store: ObjectStore, step: int, step_prefix: str
    ) -> dict[int, dict[str, Any]]:
        """Poll the step's prefix until every rank's marker is there (bounded)."""
        world = self.rank.world_size
        found: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout
        pause = _POLL_FIRST
        while True:
            keys = {info.key for info in await store.list(join_key(step_prefix, "_RANK-"))}
            for rank in range(world):
                if rank in found:
                    continue
                failed = join_key(step_prefix, failed_marker(rank))
                if failed in keys and join_key(step_prefix, rank_marker(rank)) not in keys:
                    raise await _failure_error(store, step, rank, failed)
                key = join_key(step_prefix, rank_marker(rank))
                if key in keys:
                    raw = await store.get_bytes(key)
                    if raw is not None:
                        found[rank] = _marker(raw, key, step)
            if len(found) == world:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world) if r not in found]
                names = ", ".join(str(r) for r in missing)
                msg = (
                    f"checkpoint step {step}: rank(s) {names} did not finish uploading their "
                    f"files within {self.timeout:g}s (no {rank_marker(missing[0])} under "
                    f"{step_prefix}); the step is not published. Run `loopbridge resume` on "
                    f"those ranks' out dirs, then on rank 0's. Every rank must upload to the "
                    f"same destination with the same run_name"
                )
                raise IntegrityError(msg, key=step_prefix)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 1.5, _POLL_MAX)


def read_ranks_file(out_dir: Path, rank: int = 0) -> ShardedCommit | None:
    """The sharded rank recorded in an out dir for the journal of `rank`, or None.

    None when there is no ranks file (one process), or it is unreadable.
    """
    try:
        data = json.loads((out_dir / ranks_file(rank)).read_text())
        info = RankInfo(rank=int(data["rank"]), world_size=int(data["world_size"]))
        return ShardedCommit(info, timeout=float(data.get("timeout", 600.0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s is unreadable (%s); resuming as a single process", out_dir, exc)
        return None


async def _failure_error(store: ObjectStore, step: int, rank: int, key: str) -> IntegrityError:
    """The error naming a failed rank and its files, from its failure marker."""
    raw = await store.get_bytes(key)
    files: list[str] = []
    error = "unknown error"
    if raw is not None:
        try:
            data = json.loads(raw)
            files, error = [str(f) for f in data["files"]], str(data["error"])
        except (ValueError, KeyError, TypeError):
            pass
    msg = (
        f"checkpoint step {step}: rank {rank} failed to upload its files "
        f"({', '.join(files) or 'unknown'}): {error}; the step is not published"
    )
    return IntegrityError(msg, key=key)


def _marker(raw: bytes, key: str, step: int) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(raw)
        # Read as this version writes them, whichever version wrote them.
        data["files"] = read_files(data["files"])
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"checkpoint step {step}: the rank marker {key} is unreadable ({exc})"
        raise IntegrityError(msg, key=key) from exc
    return data


def _local_files(path: Path) -> list[str]:
    """The names of the files a rank saved for a step, relative to the step."""
    if path.is_dir():
        return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return [path.name]


def _triples(files: Sequence[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return [(str(f["path"]), int(f["size"]), str(f["digest"])) for f in files]
