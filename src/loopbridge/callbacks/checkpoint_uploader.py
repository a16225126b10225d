"""`CheckpointUploader`: ship each checkpoint to an object store in the background.

Remote layout, under the destination's prefix (`s3://bucket/prefix` or a local directory)::

    <prefix>/<experiment>/<arm>/<run>/
        step-00000100/<file>            a single-file checkpoint, or
        step-00000100/<shard paths>     every file of a directory of shards
        step-00000100/_COMPLETE         completion marker (JSON: digest, sizes, files)
        manifest.json                   every published checkpoint of the run, by step
        latest                          JSON pointer to the newest published checkpoint

`<experiment>` and `<arm>` come from the `LogContext` of `on_run_start` when the run is part
of an `Experiment` (the arm is left out when there is none); a bare `TrainLoop` run is
`<prefix>/<run>/`. Names are percent-escaped into single safe key segments.

A directory's files are listed through symlinks (`_digest.shard_files`, as for its digest):
a linked subdirectory or file is uploaded like any other, and a dangling link, a link loop
or a non-file fails the checkpoint naming it (`CheckpointFilesError`).

A checkpoint counts as published only once its marker, then the manifest, then `latest` are
written, and each of them only after every byte was uploaded and verified: the bytes
hashed while streaming must match the row's digest, sizes must match, ETags too where the
store keeps them comparable, and the local files must not have changed or disappeared
meanwhile (`IntegrityError` otherwise). A failed checkpoint, or one cancelled by the drain's
deadline, leaves no marker and no manifest entry, and everything under its step prefix is
deleted (listed, not remembered, so an object stored although its reply was lost goes too;
unfinished multipart uploads are aborted). If that clean-up fails as well, it is logged and
added to the checkpoint's error, and `loopbridge resume` removes the leftovers later.
The hooks here run on the training thread and only record and queue; each checkpoint's
upload runs on the bridge's loop (`callbacks/_checkpoint_tasks.py`).
Uploads overlap (up to two checkpoints send bytes at once, which hides the server's work
of assembling the previous one), but a run's checkpoints publish strictly in order: each
waits for the one before it to finish, published or failed. Runs upload independently.
`latest` always points at the newest step in the manifest, so it never moves backwards.

With `journal=True` (the default) each upload is recorded in the run's upload journal
(`loopbridge.journal`) before it is queued, and marked published after `latest` is written.
The store options it was opened with (endpoint, part size, `verify_etag`, ...; never
credentials) are recorded with each intent. When a run continues on the same out dir
(`start_step=N`), its open intents up to step N are uploaded first and those past N are
withdrawn, and its first publish drops the remote steps past N, which it saves anew.
`loopbridge resume OUT_DIR` finishes open intents without training, then removes what
failed uploads left under unpublished steps. Publishing a checkpoint twice is harmless.

Under torchrun (`ranks=`, see docs/distributed.md): by default only global rank 0 uploads
(DDP: rank 0 saves the whole checkpoint); with `ranks="sharded"` every rank uploads the files
it saved into the step and rank 0 publishes it once every rank's files are verified in the
store (`callbacks/_sharded.py`). A sharded rank's failure deletes only its own files. Where
the ranks share one step directory (Lightning's shared out dir, torch.distributed.checkpoint
files), each rank uploads a snapshot of the files it owns (`callbacks/_rank_files.py`) and
keeps its own journal in the out dir (`journal.journal_file`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future
from typing import Any, Literal

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._exceptions import JournalError
from loopbridge._ranks import RankInfo, detect_rank
from loopbridge._row_digest import PendingDigest, claim_digest
from loopbridge._types import (
    ArmResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
)
from loopbridge.callbacks._checkpoint_tasks import CheckpointTasks
from loopbridge.callbacks._preflight import check_destination
from loopbridge.callbacks._publish import Publisher
from loopbridge.callbacks._rank_files import take_part
from loopbridge.callbacks._run_chain import RunChains, wait_for
from loopbridge.callbacks._sharded import RankMode, ShardedCommit
from loopbridge.callbacks._snapshot import SnapshotHolders, take_snapshot
from loopbridge.callbacks._store_options import open_upload_store
from loopbridge.callbacks._upload_journal import (
    JournalBook,
    JournalEntry,
    journal_options,
)
from loopbridge.callbacks._upload_stats import UploadSummary, UploadTally
from loopbridge.journal import UploadIntent, UploadJournal, journal_file
from loopbridge.stores import ObjectStore, S3Store
from loopbridge.stores._process import ProcessStore
from loopbridge.stores.keys import escape_segment, join_key
from loopbridge.stores.s3 import MiB

__all__ = ["CheckpointUploader", "UploadSummary"]

logger = logging.getLogger(__name__)


class CheckpointUploader(Callback):
    """Upload every checkpoint to `dest` in the background, verified, in order per run.

    Args:
        dest: `s3://bucket/prefix`, `file:///dir` or a directory path. With `store=`, a key
            prefix inside that store instead (`""` for its root).
        keep_last: keep only this many newest checkpoints per run remotely; older ones are
            pruned after each successful upload. None keeps everything.
        store: an `ObjectStore` to write to instead of opening one from `dest`.
        journal: record each upload in the run's upload journal first, and finish the open
            ones of an earlier process when a run starts again on the same out dir.
        preflight: before the first step, prove the destination can be written (a small
            probe object put and deleted under the run's prefix, within `preflight_timeout`
            seconds); a destination that cannot work raises DestinationError then.
        snapshot: upload from a snapshot (hard links, else a copy) taken in `on_checkpoint`,
            so a checkpoint the framework rotates away mid-upload is still published.
        part_size, max_concurrency, endpoint_url, region, call_timeout, max_attempts:
            passed to `S3Store` when `dest` is an `s3://` URL.
        store_options: any other `S3Store` keyword by name, such as `verify_etag`,
            `multipart_threshold`, `addressing_style` or `checksum` (they win over the
            keywords above). Recorded in the journal, so `loopbridge resume` reopens the
            store the same way; never credentials.
        upload_in: for an `s3://` dest, where checkpoint files are read, hashed and sent:
            "process" (default), one worker process started on first use, so the bytes never
            hold the training process's GIL; or "thread", the bridge's threads in this process.
        ranks: under torchrun, "zero" (the default: only global rank 0 uploads, other ranks
            do nothing) or "sharded" (every rank uploads its files of each step; rank 0
            publishes the step once all ranks' files are in the store).
        rank_timeout: with "sharded", how long rank 0 waits for the other ranks' files of a
            step before failing it (on the background loop, never the training thread).
        rank: the rank to act as; detected from torchrun's environment by default.

    Raises:
        ValueError: `dest` or an option is invalid (checked here, on the caller's thread).
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        store: ObjectStore | None = None,
        part_size: int = 16 * MiB,
        max_concurrency: int = 10,
        endpoint_url: str | None = None,
        region: str | None = None,
        call_timeout: float = 120.0,
        max_attempts: int = 5,
        journal: bool = True,
        store_options: Mapping[str, Any] | None = None,
        preflight: bool = True,
        preflight_timeout: float = 10.0,
        snapshot: bool = True,
        upload_in: Literal["process", "thread"] = "process",
        ranks: RankMode = "zero",
        rank_timeout: float = 600.0,
        rank: RankInfo | None = None,
    ) -> None:
        if ranks not in ("zero", "sharded"):
            msg = (
                f"CheckpointUploader(ranks={ranks!r}): use 'zero' (rank 0 saves the whole "
                f"checkpoint, as with DDP) or 'sharded' (every rank saves its own files)"
            )
            raise ValueError(msg)
        if not rank_timeout > 0:
            msg = f"CheckpointUploader(rank_timeout={rank_timeout!r}): give seconds, > 0"
            raise ValueError(msg)
        rank = detect_rank() if rank is None else rank
        self.rank = rank  # detected (or given) here, as the rank this uploader acts as
        self.ranks: RankMode = ranks
        # Rank-0 saving: on the other ranks the uploader is left out of the callback list.
        self.rank_zero_only = ranks == "zero"
        self._sharded = ShardedCommit(rank, rank_timeout) if ranks == "sharded" else None
        if upload_in not in ("process", "thread"):
            msg = (
                f"upload_in={upload_in!r}: give 'process' (a worker process sends the bytes) "
                f"or 'thread' (the bridge's threads in this process do)"
            )
            raise ValueError(msg)
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            msg = f"keep_last={keep_last!r}: give a whole number of at least 1, or None to keep all"
            raise ValueError(msg)
        explicit = {
            "part_size": part_size,
            "max_concurrency": max_concurrency,
            "endpoint_url": endpoint_url,
            "region": region,
            "call_timeout": call_timeout,
            "max_attempts": max_attempts,
        }
        user_store = store
        store, self._prefix, options = open_upload_store(dest, store, explicit, store_options)
        # What reopening the store needs besides its URL (for `loopbridge resume`).
        self._store_options = journal_options(store, options)
        if upload_in == "process" and isinstance(store, S3Store) and store is not user_store:
            # The bytes are read, hashed and sent under the worker's GIL, not training's.
            store = ProcessStore(store)
        self.store: ObjectStore = store
        self._publisher = Publisher(store, keep_last)
        self._ctx: LogContext | None = None
        self._run_prefixes: dict[tuple[str | None, ...], str] = {}
        self._bridge_with_close: Bridge | None = None
        self._tally = UploadTally()
        # The background half: each checkpoint's upload task, on the bridge's loop.
        self._holders = SnapshotHolders()
        self._tasks = CheckpointTasks(
            store, self._publisher, self._sharded, self._tally, self._holders
        )
        # The last link of each run's chain (training thread only).
        self._chains = RunChains()
        self._retries_at_start = store.retries
        self.journal = journal
        self.preflight, self.preflight_timeout, self._preflight_ok = (
            preflight,
            preflight_timeout,
            False,
        )
        self.snapshot = snapshot
        # Sharded ranks may share an out dir (Lightning): each keeps its own journal there.
        self._journals = JournalBook(journal_file(rank.rank if ranks == "sharded" else 0))

    def __repr__(self) -> str:
        return f"CheckpointUploader({self.destination!r}, keep_last={self.keep_last!r})"

    @property
    def keep_last(self) -> int | None:
        """How many newest checkpoints per run are kept remotely; None keeps all."""
        return self._publisher.keep_last

    @property
    def destination(self) -> str:
        """The store URL and prefix uploads go to."""
        return f"{self.store.url}/{self._prefix}".rstrip("/")

    @property
    def summary(self) -> UploadSummary:
        """A snapshot of what was uploaded so far; complete after the loop's drain."""
        return self._tally.summary(
            retries=self.store.retries - self._retries_at_start, pruned=self._publisher.pruned
        )

    # -- hooks (training thread) -----------------------------------------------------------

    def on_run_start(self, ctx: LogContext) -> None:
        """Remember where the run sits, for the remote layout."""
        self._ctx = ctx

    def on_train_start(self, state: LoopState) -> None:
        """Open the run's journal; queue the uploads an earlier process left unfinished in it."""
        if self.preflight and not self._preflight_ok:  # a dead destination fails before step 1
            self._close_store_with(self._attached_bridge())
            check_destination(
                self.store,
                self.run_prefix(state),
                self._attached_bridge(),
                timeout=self.preflight_timeout,
                need_delete=self.keep_last is not None,
            )
            self._preflight_ok = True
        if self._sharded is not None:
            self._sharded.write_ranks_file(state.out_dir)
        if state.step > 0:
            self._publisher.supersede_after(self.run_prefix(state), state.step)
        if not self.journal:
            return
        # Opened here, before the first step: creating a journal can take ~20 ms of fsyncs,
        # and opening it again at the first checkpoint ~1 ms of the training thread's time.
        found = self._journals.unfinished(state.out_dir, self.store.url, after=state.step)
        if isinstance(found, JournalError):
            self._report_journal_error(found)
            return
        # Held open for the run: `on_train_end` closes it after the run's last upload, and if
        # the run fails first, the bridge's shutdown does.
        self._close_store_with(self._attached_bridge())
        for intent, entry in found:
            self._spawn_upload(intent.row, intent.run_prefix, entry, resume=True)

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Record the upload in the journal, then start it; it publishes after earlier ones."""
        # The digest is hashed as the upload reads the file, not on this thread.
        claim = claim_digest(row)
        try:
            part = self._rank_part(row)
            if part is not None:
                # Its own files of a shared step dir: the whole dir's digest is not ours.
                if claim is not None:
                    claim.release()
                row, claim = part, claim_digest(part)
            elif self.snapshot:
                # The upload and the journal read the snapshot.
                row = take_snapshot(row, holders=self._holders)
                if claim is not None:
                    claim.follow(row.path)
            self._record_and_spawn(state, row, claim)
        except BaseException:
            if claim is not None:
                claim.release()
            raise

    def _rank_part(self, row: ManifestRow) -> ManifestRow | None:
        """A sharded rank's own files of a step dir that other ranks share (`_rank_files`)."""
        sharded = self._sharded
        if sharded is None or not sharded.rank.distributed:
            return None
        return take_part(row, sharded.rank.rank)

    def _record_and_spawn(
        self, state: LoopState, row: ManifestRow, claim: PendingDigest | None
    ) -> None:
        run_prefix = self.run_prefix(state)
        self._close_store_with(self._attached_bridge())
        entry = None
        if self.journal:
            recorded = self._journals.record(
                state.out_dir, self.store.url, run_prefix, row, self._store_options
            )
            if isinstance(recorded, JournalError):
                # Reported once; later checkpoints of this out dir skip the journal.
                self._report_journal_error(recorded)
            else:
                entry = recorded
        self._spawn_upload(row, run_prefix, entry, claim=claim)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Log the summary once this run's uploads are done; then close the run's journal."""
        run_prefix = self.run_prefix(state)
        self._spawn_in_order(
            run_prefix,
            lambda previous: self._log_summary(run_prefix, previous),
            name=f"log upload summary of {run_prefix}",
        )
        self._journals.close(state.out_dir)

    def _spawn_upload(
        self,
        row: ManifestRow,
        run_prefix: str,
        entry: JournalEntry | None,
        *,
        resume: bool = False,
        claim: PendingDigest | None = None,
    ) -> None:
        """Queue one checkpoint's upload on its run's chain."""
        again = "resume " if resume else ""
        self._spawn_in_order(
            run_prefix,
            lambda previous: self._tasks.upload(
                row, run_prefix, previous, entry, resume=resume, claim=claim
            ),
            name=f"{again}upload step {row.step} to {self.store.url}/{run_prefix}",
        )

    def _report_journal_error(self, exc: JournalError) -> None:
        """Put a journal failure in the drain report once; uploads go on without the journal."""
        if not self._journals.first_report(exc):
            return
        logger.error("%s; uploads continue without crash protection", exc)

        async def fail() -> None:
            raise exc

        self.spawn(fail(), name="upload journal")

    def _spawn_in_order(
        self,
        run_prefix: str,
        make: Callable[[Future[None] | None], Coroutine[Any, Any, object]],
        *,
        name: str,
    ) -> None:
        """Spawn work on the run's chain: it gets the link before it (see `_run_chain`)."""
        self._chains.spawn(run_prefix, make, lambda work: self.spawn(work, name=name))

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Forget the run's context."""
        self._ctx = None

    def run_prefix(self, state: LoopState) -> str:
        """The key prefix of this run's checkpoints: `<prefix>/<experiment>/<arm>/<run>`."""
        ctx = self._ctx
        names: tuple[str | None, ...] = (state.run_name,)
        if ctx is not None and ctx.experiment_name:
            names = (ctx.experiment_name, ctx.arm_name, ctx.run_name or state.run_name)
        # Asked for on the training thread at each checkpoint: built once per set of names.
        cached = self._run_prefixes.get(names)
        if cached is None:
            cached = join_key(self._prefix, *(escape_segment(n) for n in names if n))
            self._run_prefixes[names] = cached
        return cached

    def _close_store_with(self, bridge: Bridge) -> None:
        """Have the bridge close our store's client on its own loop when it shuts down."""
        if bridge is not self._bridge_with_close:
            bridge.add_shutdown_callback(self.store.aclose)
            bridge.add_shutdown_callback(self._discard_holders)
            bridge.add_shutdown_callback(self._journals.aclose_all)
            self._bridge_with_close = bridge

    async def resume_intent(self, intent: UploadIntent, journal: UploadJournal) -> int:
        """Finish one journaled upload on the running loop; return the bytes it sent.

        Raises:
            StoreError: the checkpoint could not be published (its local file is gone, the
                store refused, or what was uploaded does not match).
        """
        entry = JournalEntry(journal, intent.id)
        return await self._tasks.upload(intent.row, intent.run_prefix, None, entry, resume=True)

    async def sweep_unpublished(self, run_prefix: str) -> list[str]:
        """Delete what failed uploads left under the run's unpublished steps; return them.

        Only for runs no live process uploads to (`loopbridge resume` checks the journal's
        lock).

        Raises:
            StoreError: the run's manifest is unreadable, or a delete failed.
        """
        if self._sharded is not None:
            # Other ranks' parts of a step wait there, unpublished, until rank 0 publishes it.
            return []
        return await self._publisher.sweep_unpublished(run_prefix)

    async def _log_summary(self, run_prefix: str, previous: Future[None] | None) -> None:
        """Log the uploader's summary once a run's uploads are done."""
        if previous is not None:
            await wait_for(previous)
        self._holders.discard()
        logger.info("checkpoint uploads to %s (%s): %s", self.store.url, run_prefix, self.summary)

    async def _discard_holders(self) -> None:
        """Remove the snapshot directories made ahead (at bridge close, after a crash too)."""
        self._holders.discard()
