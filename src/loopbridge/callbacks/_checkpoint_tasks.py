"""One checkpoint's upload, on the bridge's loop: send, verify, publish in order, or clean up.

`CheckpointTasks.upload` is the background half of `CheckpointUploader`: the hooks record a
checkpoint and queue this on its run's chain (`_run_chain`). It sends the bytes (a file, a
directory of shards, or a rank's part of a shared one), checks sizes and the digest, waits
for the checkpoint before it in the run, then publishes (`_publish`; under torchrun's
sharded mode through `_sharded`), and marks the journal. A failure or a cancellation deletes
what it sent; the error keeps its type and says if even that clean-up failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Future
from pathlib import Path

from loopbridge._exceptions import IntegrityError, StoreError
from loopbridge._row_digest import PendingDigest
from loopbridge._types import ManifestRow
from loopbridge.callbacks._layout import step_dir
from loopbridge.callbacks._publish import MARKER, Publisher, Shard
from loopbridge.callbacks._rank_files import is_part, upload_part
from loopbridge.callbacks._run_chain import wait_for
from loopbridge.callbacks._sharded import ShardedCommit
from loopbridge.callbacks._snapshot import (
    SnapshotHolders,
    release_linked_snapshot,
    release_snapshot,
)
from loopbridge.callbacks._transfer import digest_known, upload_dir, upload_file
from loopbridge.callbacks._upload_journal import JournalEntry, resume_shortcut
from loopbridge.callbacks._upload_stats import UploadTally
from loopbridge.stores import ObjectStore
from loopbridge.stores.keys import join_key

__all__ = ["CheckpointTasks"]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")

_CHECKPOINTS_IN_FLIGHT = 2


class CheckpointTasks:
    """The uploads of one `CheckpointUploader`: its store, publisher, ranks and tally."""

    def __init__(
        self,
        store: ObjectStore,
        publisher: Publisher,
        sharded: ShardedCommit | None,
        tally: UploadTally,
        holders: SnapshotHolders,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.sharded = sharded
        self.tally = tally
        self.holders = holders
        self._pipeline: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    async def upload(
        self,
        row: ManifestRow,
        run_prefix: str,
        previous: Future[None] | None,
        entry: JournalEntry | None = None,
        *,
        resume: bool = False,
        claim: PendingDigest | None = None,
    ) -> int:
        """Upload, verify and publish one checkpoint; clean up what it sent if it fails.

        With `claim`, the row's digest is computed here from the bytes read for upload.
        Returns the bytes sent.
        """
        self.tally.busy(+1)
        if not resume and not is_part(row.path):
            # Here, not on the training thread: the next checkpoint's snapshot then only links.
            self.holders.prepare_after(row.path)
        step_name = step_dir(row.step)
        step_prefix = join_key(run_prefix, step_name)
        sent: list[str] = []
        total = 0
        try:
            if entry is not None:
                entry.attempt()
            done = None
            if resume and self.sharded is not None:
                done = await self.sharded.resume_shortcut(self.store, row, step_prefix)
            elif resume:
                done = await resume_shortcut(self.store, row, step_prefix, MARKER)
            if done is not None:
                shards = [Shard.from_json(f) for f in done]
            else:
                # Two checkpoints' bytes at most in flight per loop; the store bounds the parts.
                async with self._slots():
                    if is_part(row.path):
                        shards = await upload_part(self.store, row, step_prefix, sent, claim)
                    elif row.path.is_dir():  # one stat, on the loop like the journal's writes
                        shards = await upload_dir(self.store, row, step_prefix, sent, claim)
                    else:
                        shards = await upload_file(self.store, row, step_prefix, sent, claim)
                total = sum(shard.size for shard in shards)
                row = await digest_known(row, shards, entry, claim)
            size = sum(shard.size for shard in shards)
            if size != row.size_bytes:
                msg = (
                    f"checkpoint step {row.step} at {row.path}: uploaded {size} bytes, but the "
                    f"manifest row says {row.size_bytes}; it was modified after it was saved"
                )
                raise IntegrityError(msg, key=step_prefix)
            sharded = self.sharded
            if sharded is not None:
                files = [shard.to_json() for shard in shards]
                await sharded.commit(self.store, row, step_prefix, files, sent)
            if previous is not None:
                await wait_for(previous)
            if sharded is None:
                await self.publisher.publish(row, run_prefix, step_name, shards)
            elif sharded.publishes:
                whole, files = await sharded.gather(self.store, row, step_prefix)
                shards = [Shard.from_json(f) for f in files]
                await self.publisher.publish(whole, run_prefix, step_name, shards)
            if entry is not None:
                entry.published()
            await _release(row.path, keep_parent=self.holders.beside(row.path))
        except Exception as exc:
            if self.sharded is not None:
                await self.sharded.report_failure(self.store, row, step_prefix, exc)
            await self._discard(row, step_prefix, sent, exc)
            if claim is not None and entry is not None and not claim.future.done():
                # The journal keeps the save-time digest for the resume that retries it.
                with contextlib.suppress(Exception):
                    entry.digest_known(await asyncio.to_thread(claim.compute))
            if entry is None:  # nothing will retry it; an open journal intent keeps it
                await _release(row.path)
            if entry is not None:
                entry.failed(exc)
            self.tally.failed(row.step, exc)
            raise
        except asyncio.CancelledError as exc:
            # Cancelled by the drain's deadline: still clear what was sent, briefly.
            await self._discard(row, step_prefix, sent, exc)
            raise
        finally:
            if claim is not None:
                claim.release()  # a no-op once the digest is known
            self.tally.busy(-1)
            if entry is not None:
                entry.done()
        self.tally.published(total)
        return total

    async def _discard(
        self, row: ManifestRow, step_prefix: str, sent: list[str], error: BaseException
    ) -> None:
        """Delete a failed checkpoint's objects; if that fails too, say so in `error`."""
        try:
            if self.sharded is None:
                await self.publisher.discard(step_prefix, sent)
            else:  # this rank's files only: the step's other files are other ranks'
                await self.sharded.discard(self.store, row, step_prefix, sent)
        except StoreError as exc:
            logger.error("checkpoint %s failed (%s), and %s", step_prefix, error, exc)
            # Its type kept, so callers still tell a refusal from an integrity failure.
            error.args = (f"{error}; and {exc}",)

    def _slots(self) -> asyncio.Semaphore:
        """The running loop's limit on checkpoints sending bytes at once."""
        loop = asyncio.get_running_loop()
        return self._pipeline.setdefault(loop, asyncio.Semaphore(_CHECKPOINTS_IN_FLIGHT))


async def _release(path: Path, *, keep_parent: bool = False) -> None:
    """Remove the checkpoint's snapshot: on the loop when that frees no data, else in a thread.

    The usual case (the framework's own file still there) is an unlink and an rmdir or two; a
    trip to a worker thread would wake two more threads of the training process.
    """
    if not release_linked_snapshot(path, keep_parent=keep_parent):
        await asyncio.to_thread(release_snapshot, path)
