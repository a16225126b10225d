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

A checkpoint counts as published only once its marker, then the manifest, then `latest` are
written, and each of them only after every byte was uploaded and verified: the bytes
hashed while streaming must match the row's digest, sizes and ETags must match, and the
local files must not have changed or disappeared meanwhile (`IntegrityError` otherwise). A
failed checkpoint leaves no marker and no manifest entry, and what it had uploaded is deleted.
Uploads overlap (up to two checkpoints send bytes at once, which hides the server's work
of assembling the previous one), but a run's checkpoints publish strictly in order: each
waits for the one before it to finish, published or failed. Runs upload independently.
`latest` always points at the newest step in the manifest, so it never moves backwards.

With `journal=True` (the default) each upload is recorded in the run's upload journal
(`loopbridge.journal`) before it is queued, and marked published after `latest` is written.
When a run starts again on the same out dir, its open intents are uploaded first; `loopbridge
resume OUT_DIR` does the same without training. Publishing a checkpoint twice is harmless.

Under torchrun (`ranks=`, see docs/distributed.md): by default only global rank 0 uploads
(DDP: rank 0 saves the whole checkpoint); with `ranks="sharded"` every rank uploads the files
it saved into the step and rank 0 publishes it once every rank's files are verified in the
store (`callbacks/_sharded.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopbridge._bridge import Bridge
from loopbridge._callback import Callback
from loopbridge._digest import combine_shard_digests, shard_files
from loopbridge._exceptions import IntegrityError, JournalError
from loopbridge._ranks import RankInfo, detect_rank
from loopbridge._types import (
    ArmResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
)
from loopbridge.callbacks._sharded import RankMode, ShardedCommit
from loopbridge.callbacks._upload_journal import (
    JournalBook,
    JournalEntry,
    resume_shortcut,
    store_options,
)
from loopbridge.journal import UploadIntent, UploadJournal
from loopbridge.stores import ObjectStore, open_store
from loopbridge.stores.keys import escape_segment, join_key, normalize_prefix
from loopbridge.stores.s3 import MiB

__all__ = ["CheckpointUploader", "UploadSummary"]

logger = logging.getLogger(__name__)

MARKER = "_COMPLETE"
MANIFEST = "manifest.json"
LATEST = "latest"
_MAX_ERRORS_KEPT = 20
_DISCARD_TIMEOUT = 10.0
_CHECKPOINTS_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class UploadSummary:
    """What the uploader did so far: checkpoints published and failed, bytes, retries, time."""

    uploaded: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    seconds: float = 0.0
    pruned: int = 0
    errors: tuple[str, ...] = ()

    def __str__(self) -> str:
        rate = self.bytes_uploaded / self.seconds / MiB if self.seconds > 0 else 0.0
        return (
            f"{self.uploaded} uploaded ({self.bytes_uploaded / MiB:.1f} MiB, {rate:.1f} MiB/s), "
            f"{self.failed} failed, {self.retries} retries, {self.pruned} pruned, "
            f"{self.seconds:.2f}s uploading"
        )


@dataclass(frozen=True, slots=True)
class _Shard:
    """One uploaded file of a checkpoint, relative to its step prefix."""

    rel: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.rel, "size": self.size, "sha256": self.sha256}


def _expected_hex(digest: str | None) -> str | None:
    """The hex part of a `sha256:<hex>` digest."""
    if digest is None:
        return None
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not hexdigest:
        msg = f"unsupported checkpoint digest {digest!r}: expected 'sha256:<hex>'"
        raise ValueError(msg)
    return hexdigest


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
        ranks: under torchrun, "zero" (the default: only global rank 0 uploads, other ranks
            do nothing) or "sharded" (every rank uploads its files of each step; rank 0
            publishes the step once all ranks' files are in the store).
        rank_timeout: with "sharded", how long rank 0 waits for the other ranks' files of a
            step before failing it (on the background loop, never the training thread).
        rank: the rank to act as; detected from torchrun's environment by default.
        part_size, max_concurrency, endpoint_url, region, call_timeout, max_attempts:
            passed to `S3Store` when `dest` is an `s3://` URL.

    Raises:
        ValueError: `dest` or an option is invalid (checked here, on the caller's thread).
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        store: ObjectStore | None = None,
        part_size: int = 8 * MiB,
        max_concurrency: int = 8,
        endpoint_url: str | None = None,
        region: str | None = None,
        call_timeout: float = 120.0,
        max_attempts: int = 5,
        journal: bool = True,
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
        self.ranks: RankMode = ranks
        # Rank-0 saving: on the other ranks the uploader is left out of the callback list.
        self.rank_zero_only = ranks == "zero"
        self._sharded = ShardedCommit(rank, rank_timeout) if ranks == "sharded" else None
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            msg = f"keep_last={keep_last!r}: give a whole number of at least 1, or None to keep all"
            raise ValueError(msg)
        self.keep_last = keep_last
        if store is None:
            text = os.fspath(dest)
            if text.startswith("s3://"):
                store = open_store(
                    text,
                    part_size=part_size,
                    max_concurrency=max_concurrency,
                    endpoint_url=endpoint_url,
                    region=region,
                    call_timeout=call_timeout,
                    max_attempts=max_attempts,
                )
            else:
                store = open_store(text)
            self._prefix = ""
        else:
            self._prefix = normalize_prefix(os.fspath(dest))
        self.store: ObjectStore = store
        self._ctx: LogContext | None = None
        self._bridge_with_close: Bridge | None = None
        # Manifests per run prefix; only touched by that run's upload tasks, which run in order.
        self._manifests: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._uploaded = 0
        self._failed = 0
        self._bytes = 0
        self._seconds = 0.0
        self._active = 0
        self._busy_since = 0.0
        # The last link of each run's chain (training thread only), and per-loop limits.
        self._tails: dict[str, Future[None]] = {}
        self._pipeline: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._pruned = 0
        self._errors: list[str] = []
        self._retries_at_start = store.retries
        self.journal = journal
        self._journals = JournalBook()
        self._journal_errors: set[JournalError] = set()  # already reported (kept, so by identity)
        self._store_options = store_options(store)

    def __repr__(self) -> str:
        return f"CheckpointUploader({self.destination!r}, keep_last={self.keep_last!r})"

    @property
    def destination(self) -> str:
        """The store URL and prefix uploads go to."""
        return f"{self.store.url}/{self._prefix}".rstrip("/")

    @property
    def summary(self) -> UploadSummary:
        """A snapshot of what was uploaded so far; complete after the loop's drain."""
        with self._lock:
            return UploadSummary(
                uploaded=self._uploaded,
                failed=self._failed,
                bytes_uploaded=self._bytes,
                retries=self.store.retries - self._retries_at_start,
                seconds=self._seconds,
                pruned=self._pruned,
                errors=tuple(self._errors),
            )

    # -- hooks (training thread) -----------------------------------------------------------

    def on_run_start(self, ctx: LogContext) -> None:
        """Remember where the run sits, for the remote layout."""
        self._ctx = ctx

    def on_train_start(self, state: LoopState) -> None:
        """Open the run's journal; queue the uploads an earlier process left unfinished in it."""
        if self._sharded is not None:
            self._sharded.write_ranks_file(state.out_dir)
        if not self.journal:
            return
        # Opened here, before the first step: creating a journal can take ~20 ms of fsyncs.
        journal = self._journal(state.out_dir)
        if journal is None:
            return
        try:
            intents = journal.open_intents()
        except JournalError as exc:
            self._report_journal_error(exc)
            return
        mine = [i for i in intents if i.dest == self.store.url]
        if len(mine) < len(intents):
            logger.warning(
                "%s: %d open uploads to other destinations are left for `loopbridge resume`",
                journal.path,
                len(intents) - len(mine),
            )
        if mine:
            logger.info("%s: resuming %d unfinished uploads", journal.path, len(mine))
            self._close_store_with(self._attached_bridge())
        for intent in mine:
            self._spawn_upload(
                intent.row,
                intent.run_prefix,
                self._journals.entry(state.out_dir, journal, intent.id),
                resume=True,
            )

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Record the upload in the journal, then start it; it publishes after earlier ones."""
        run_prefix = self.run_prefix(state)
        self._close_store_with(self._attached_bridge())
        entry = None
        if self.journal:
            journal = self._journal(state.out_dir)
            if journal is not None:
                try:
                    intent_id = journal.record_intent(
                        self.store.url, run_prefix, row, self._store_options
                    )
                except JournalError as exc:
                    # Reported once; later checkpoints of this out dir skip the journal.
                    self._journals.set_broken(state.out_dir, exc)
                    self._report_journal_error(exc)
                else:
                    entry = self._journals.entry(state.out_dir, journal, intent_id)
        self._spawn_upload(row, run_prefix, entry)

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
        self, row: ManifestRow, run_prefix: str, entry: JournalEntry | None, *, resume: bool = False
    ) -> None:
        """Queue one checkpoint's upload on its run's chain."""
        again = "resume " if resume else ""
        self._spawn_in_order(
            run_prefix,
            lambda previous: self._upload(row, run_prefix, previous, entry, resume=resume),
            name=f"{again}upload step {row.step} to {self.store.url}/{run_prefix}",
        )

    def _journal(self, out_dir: Path) -> UploadJournal | None:
        """The out dir's journal, or None (its error reported once) when it cannot be used."""
        journal = self._journals.get(out_dir)
        if isinstance(journal, JournalError):
            self._report_journal_error(journal)
            return None
        return journal

    def _report_journal_error(self, exc: JournalError) -> None:
        """Put a journal failure in the drain report once; uploads go on without the journal."""
        if exc in self._journal_errors:
            return
        self._journal_errors.add(exc)
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
        """Spawn work that gets the previous link of the run's chain and ends the next one.

        Uploads of a run overlap (the next one sends its bytes while the server assembles the
        last), but each publishes only after the one before it has finished, so the manifest
        and `latest` move forward in order. A link ends once its task has ended, however it
        ended, and the link before it has ended too: a checkpoint that fails early must not let
        the next one publish ahead of the one before it.
        """
        previous = self._tails.get(run_prefix)
        link: Future[None] = Future()
        self._tails[run_prefix] = link

        def task_ended(_: object) -> None:
            if previous is None:
                _resolve(link)
            else:
                previous.add_done_callback(lambda _: _resolve(link))

        try:
            task = self.spawn(make(previous), name=name)
        except BaseException:
            task_ended(None)
            raise
        task.add_done_callback(task_ended)

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Forget the run's context."""
        self._ctx = None

    def run_prefix(self, state: LoopState) -> str:
        """The key prefix of this run's checkpoints: `<prefix>/<experiment>/<arm>/<run>`."""
        ctx = self._ctx
        names: list[str | None] = [state.run_name]
        if ctx is not None and ctx.experiment_name:
            names = [ctx.experiment_name, ctx.arm_name, ctx.run_name or state.run_name]
        return join_key(self._prefix, *(escape_segment(n) for n in names if n))

    def _close_store_with(self, bridge: Bridge) -> None:
        """Have the bridge close our store's client on its own loop when it shuts down."""
        if bridge is not self._bridge_with_close:
            bridge.add_shutdown_callback(self.store.aclose)
            bridge.add_shutdown_callback(self._journals.aclose_all)
            self._bridge_with_close = bridge

    async def resume_intent(self, intent: UploadIntent, journal: UploadJournal) -> int:
        """Finish one journaled upload on the running loop; return the bytes it sent.

        Raises:
            StoreError: the checkpoint could not be published (its local file is gone, the
                store refused, or what was uploaded does not match).
        """
        entry = JournalEntry(journal, intent.id)
        return await self._upload(intent.row, intent.run_prefix, None, entry, resume=True)

    # -- background work (bridge loop) -----------------------------------------------------

    async def _upload(
        self,
        row: ManifestRow,
        run_prefix: str,
        previous: Future[None] | None,
        entry: JournalEntry | None = None,
        *,
        resume: bool = False,
    ) -> int:
        """Upload, verify and publish one checkpoint; clean up what it sent if it fails."""
        self._busy(+1)
        step_dir = f"step-{row.step:08d}"
        step_prefix = join_key(run_prefix, step_dir)
        sent: list[str] = []
        total = 0
        try:
            if entry is not None:
                entry.attempt()
            done = None
            if resume and self._sharded is not None:
                done = await self._sharded.resume_shortcut(self.store, row, step_prefix)
            elif resume:
                done = await resume_shortcut(self.store, row, step_prefix, MARKER)
            if done is not None:
                shards = [_Shard(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in done]
            else:
                # Two checkpoints' bytes at most in flight per loop; the store bounds the parts.
                async with self._slots():
                    if await asyncio.to_thread(row.path.is_dir):
                        shards = await self._upload_dir(row, step_prefix, sent)
                    else:
                        shards = await self._upload_file(row, step_prefix, sent)
                total = sum(shard.size for shard in shards)
            size = sum(shard.size for shard in shards)
            if size != row.size_bytes:
                msg = (
                    f"checkpoint step {row.step} at {row.path}: uploaded {size} bytes, but the "
                    f"manifest row says {row.size_bytes}; it was modified after it was saved"
                )
                raise IntegrityError(msg, key=step_prefix)
            sharded = self._sharded
            if sharded is not None:
                files = [shard.to_json() for shard in shards]
                await sharded.commit(self.store, row, step_prefix, files, sent)
            if previous is not None:
                await _wait_for(previous)
            if sharded is None:
                await self._publish(row, run_prefix, step_dir, shards)
            elif sharded.publishes:
                row, files = await sharded.gather(self.store, row, step_prefix)
                shards = [_Shard(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files]
                await self._publish(row, run_prefix, step_dir, shards)
            if entry is not None:
                entry.published()
        except Exception as exc:
            if self._sharded is not None:
                await self._sharded.report_failure(self.store, row, step_prefix, exc)
            await self._discard(sent)
            if entry is not None:
                entry.failed(exc)
            with self._lock:
                self._failed += 1
                self._errors.append(f"step {row.step}: {exc}")
                del self._errors[:-_MAX_ERRORS_KEPT]
            raise
        finally:
            self._busy(-1)
            if entry is not None:
                entry.done()
        with self._lock:
            self._uploaded += 1
            self._bytes += total
        return total

    def _busy(self, delta: int) -> None:
        """Count uploads in progress; `seconds` is the time at least one was."""
        now = time.monotonic()
        with self._lock:
            if self._active == 0 and delta > 0:
                self._busy_since = now
            self._active += delta
            if self._active == 0:
                self._seconds += now - self._busy_since

    def _slots(self) -> asyncio.Semaphore:
        """The running loop's limit on checkpoints sending bytes at once."""
        loop = asyncio.get_running_loop()
        return self._pipeline.setdefault(loop, asyncio.Semaphore(_CHECKPOINTS_IN_FLIGHT))

    async def _upload_file(
        self, row: ManifestRow, step_prefix: str, sent: list[str]
    ) -> list[_Shard]:
        """Upload a single-file checkpoint, checked against the row's digest while streamed."""
        key = join_key(step_prefix, row.path.name)
        result = await self.store.put_file(key, row.path, expected_sha256=_expected_hex(row.digest))
        sent.append(key)
        return [_Shard(rel=row.path.name, size=result.size, sha256=result.sha256)]

    async def _upload_dir(
        self, row: ManifestRow, step_prefix: str, sent: list[str]
    ) -> list[_Shard]:
        """Upload a directory of shards file by file, then check the set and the digest."""
        files = await asyncio.to_thread(shard_files, row.path)
        rels = [file.relative_to(row.path).as_posix() for file in files]
        if not files:
            msg = f"checkpoint step {row.step}: the directory {row.path} has no files to upload"
            raise IntegrityError(msg, key=step_prefix)
        shards = []
        for file, rel in zip(files, rels, strict=True):
            key = join_key(step_prefix, rel)
            result = await self.store.put_file(key, file)
            sent.append(key)
            shards.append(_Shard(rel=rel, size=result.size, sha256=result.sha256))
        now = await asyncio.to_thread(shard_files, row.path)
        if [file.relative_to(row.path).as_posix() for file in now] != rels:
            msg = (
                f"checkpoint step {row.step}: files were added to or removed from {row.path} "
                f"while it was uploaded"
            )
            raise IntegrityError(msg, key=step_prefix)
        digest = combine_shard_digests((s.rel, s.size, s.sha256) for s in shards)
        if row.digest is not None and digest != row.digest:
            msg = (
                f"checkpoint step {row.step}: the shards in {row.path} hash to {digest}, not "
                f"the saved {row.digest}; a shard changed after it was saved"
            )
            raise IntegrityError(msg, key=step_prefix)
        return shards

    async def _publish(
        self, row: ManifestRow, run_prefix: str, step_dir: str, shards: list[_Shard]
    ) -> None:
        """Write the marker, then the manifest, then `latest`; then prune past keep_last."""
        digest = row.digest or combine_shard_digests((s.rel, s.size, s.sha256) for s in shards)
        entry = {
            "step": row.step,
            "prefix": step_dir,
            "digest": digest,
            "size_bytes": row.size_bytes,
            "is_final": row.is_final,
            "created_at": row.created_at,
            "uploaded_at": time.time(),
            "source": str(row.path),
            "files": [shard.to_json() for shard in shards],
        }
        await self.store.put_bytes(join_key(run_prefix, step_dir, MARKER), _json(entry))
        entries = await self._manifest(run_prefix)
        entries[:] = sorted(
            [e for e in entries if e["step"] != row.step] + [entry], key=lambda e: int(e["step"])
        )
        doomed: list[dict[str, Any]] = []
        if self.keep_last is not None and len(entries) > self.keep_last:
            # Never the newest and never the one `latest` is about to point at.
            doomed = [e for e in entries[: -self.keep_last] if e["prefix"] != step_dir]
            entries[:] = [e for e in entries if e not in doomed]
        manifest = {"version": 1, "run": run_prefix, "checkpoints": entries}
        await self.store.put_bytes(join_key(run_prefix, MANIFEST), _json(manifest))
        # The newest step, not this one: a resumed older checkpoint must not move it back.
        newest = entries[-1]
        latest = {
            "step": newest["step"],
            "prefix": newest["prefix"],
            "digest": newest["digest"],
            "manifest": MANIFEST,
        }
        await self.store.put_bytes(join_key(run_prefix, LATEST), _json(latest))
        for old in doomed:
            await self._prune(run_prefix, str(old["prefix"]))

    async def _manifest(self, run_prefix: str) -> list[dict[str, Any]]:
        """The run's manifest entries, read from the store the first time (to resume)."""
        entries = self._manifests.get(run_prefix)
        if entries is None:
            raw = await self.store.get_bytes(join_key(run_prefix, MANIFEST))
            entries = []
            if raw is not None:
                try:
                    entries = list(json.loads(raw)["checkpoints"])
                except (ValueError, KeyError, TypeError):
                    logger.warning(
                        "the remote manifest of %s is unreadable; starting a new one", run_prefix
                    )
            self._manifests[run_prefix] = entries
        return entries

    async def _prune(self, run_prefix: str, step_dir: str) -> None:
        """Delete an older checkpoint already dropped from the manifest."""
        prefix = join_key(run_prefix, step_dir) + "/"
        try:
            objects = await self.store.list(prefix)
            # The marker goes last, so a half-pruned checkpoint never looks complete.
            markers = [o.key for o in objects if o.key.endswith("/" + MARKER)]
            await self.store.delete(o.key for o in objects if o.key not in markers)
            await self.store.delete(markers)
        except Exception as exc:
            logger.warning("could not prune %s from %s: %s", prefix, self.store.url, exc)
            return
        with self._lock:
            self._pruned += 1

    async def _discard(self, keys: list[str]) -> None:
        """Best-effort removal of what a failed upload sent; it is unreferenced either way."""
        if not keys:
            return
        # Bounded: the store may be what failed, and the keys are unreferenced anyway.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DISCARD_TIMEOUT):
                await self.store.delete(keys)

    async def _log_summary(self, run_prefix: str, previous: Future[None] | None) -> None:
        """Log the uploader's summary once a run's uploads are done."""
        if previous is not None:
            await _wait_for(previous)
        logger.info("checkpoint uploads to %s (%s): %s", self.store.url, run_prefix, self.summary)


def _resolve(link: Future[None]) -> None:
    """End a link of a run's chain (once; from any thread)."""
    with contextlib.suppress(InvalidStateError):
        link.set_result(None)


async def _wait_for(link: Future[None]) -> None:
    """Wait for a link to end, without cancelling it if this waiter is cancelled."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_: Future[None]) -> None:
        loop.call_soon_threadsafe(settle)

    link.add_done_callback(wake)
    await waiter


def _json(data: dict[str, Any]) -> bytes:
    """Encode a small JSON document for the store."""
    return json.dumps(data, indent=1, sort_keys=True).encode()
