"""The uploader's side of the upload journal: one journal per out dir, entries, resume checks.

`JournalBook` opens a run's journal on first use, hands out a `JournalEntry` per upload and
closes the journal once the run ended and its last upload finished. `resume_shortcut` does
what a resumed upload needs before sending bytes: clear what a dead process left half-written
under the checkpoint's prefix, and skip the bytes when the checkpoint is already complete
remotely (marker present, same digest, every file there with its size).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopbridge._exceptions import IntegrityError, JournalError, StoreError
from loopbridge._types import ManifestRow
from loopbridge.callbacks._layout import read_files
from loopbridge.callbacks._store_options import encode_options
from loopbridge.journal import JOURNAL_FILE, UploadIntent, UploadJournal
from loopbridge.stores import CleansStaleUploads, ObjectStore, S3Store
from loopbridge.stores.keys import join_key

__all__ = [
    "JournalBook",
    "JournalEntry",
    "journal_options",
    "resume_shortcut",
    "store_options",
]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")


def store_options(store: ObjectStore) -> dict[str, str]:
    """What reopening `store` from its URL needs besides the URL; never credentials."""
    if not isinstance(store, S3Store):
        return {}
    options = {"endpoint_url": store.endpoint_url, "region": store.region}
    return {name: value for name, value in options.items() if value}


def journal_options(store: ObjectStore, opened_with: Mapping[str, Any] | None) -> dict[str, str]:
    """The options to record for `store`: those it was opened with, else what it tells."""
    recorded = store_options(store)
    if opened_with is not None and isinstance(store, S3Store):
        # The endpoint as the store shows it: without any user or password in the URL.
        recorded = {**encode_options(opened_with), **recorded}
    return recorded


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One upload's intent in a journal; journal failures are logged, never fail the upload."""

    journal: UploadJournal
    intent_id: int
    book: JournalBook | None = None
    out_dir: Path | None = None

    def attempt(self) -> None:
        """Count an attempt (bridge loop)."""
        self._safely(self.journal.mark_attempt, self.intent_id)

    def published(self) -> None:
        """Mark the checkpoint published (bridge loop)."""
        self._safely(self.journal.mark_published, self.intent_id)

    def digest_known(self, digest: str) -> None:
        """Record the digest hashed during the upload, for a later resume (bridge loop)."""
        self._safely(self.journal.set_digest, self.intent_id, digest)

    def failed(self, error: BaseException) -> None:
        """Mark the attempt failed; the intent stays open for the next resume (bridge loop)."""
        self._safely(self.journal.mark_failed, self.intent_id, f"{type(error).__name__}: {error}")

    def done(self) -> None:
        """Let the journal close once the run has ended and this was its last upload."""
        if self.book is not None and self.out_dir is not None:
            self.book.release(self.out_dir)

    def _safely(self, mark: Any, *args: object) -> None:
        try:
            mark(*args)
        except JournalError as exc:
            # The upload itself is unaffected; at worst a resume redoes it, harmlessly.
            logger.warning("upload journal entry %d not updated: %s", self.intent_id, exc)


class JournalBook:
    """The journals an uploader writes, one per out dir, shared by the loop and bridge threads.

    `name` is the journal's file name: `JOURNAL_FILE`, or a sharded rank's own
    (`journal.journal_file(rank)`), so ranks sharing an out dir keep separate journals.

    Keyed by the out dir itself: the loop passes the same `state.out_dir` object every time,
    whose hash is cached, so a lookup on the loop thread costs next to nothing.
    """

    def __init__(self, name: str = JOURNAL_FILE) -> None:
        self.name = name  # the journal's file name in each out dir (one per sharded rank)
        self._lock = threading.Lock()
        self._open: dict[Path, UploadJournal] = {}
        self._users: dict[Path, int] = {}
        self._closing: set[Path] = set()
        self._broken: dict[Path, JournalError] = {}
        self._reported: set[JournalError] = set()

    def get(self, out_dir: Path) -> UploadJournal | JournalError:
        """The out dir's journal, opened (or created) on first use; its error if unusable."""
        with self._lock:
            broken = self._broken.get(out_dir)
            if broken is not None:
                return broken
            journal = self._open.get(out_dir)
            if journal is not None:
                self._closing.discard(out_dir)
                return journal
            try:
                journal = UploadJournal(out_dir / self.name)
            except JournalError as exc:
                self._broken[out_dir] = exc
                return exc
            self._open[out_dir] = journal
            return journal

    def unfinished(
        self, out_dir: Path, dest: str, after: int
    ) -> list[tuple[UploadIntent, JournalEntry]] | JournalError:
        """The open intents an earlier process left for `dest`, each with its entry.

        A run continuing from step `after` > 0 supersedes the earlier run's steps past it:
        their open intents are withdrawn, never resumed, since this run saves those steps anew
        (a run from step 0 in a used out dir is refused by the loop before it gets here).
        """
        journal = self.get(out_dir)
        if isinstance(journal, JournalError):
            return journal
        try:
            intents = journal.open_intents()
            if after > 0:
                intents = self._withdraw_superseded(journal, intents, after)
        except JournalError as exc:
            return exc
        mine = [i for i in intents if i.dest == dest]
        if len(mine) < len(intents):
            logger.warning(
                "%s: %d open uploads to other destinations are left for `loopbridge resume`",
                journal.path,
                len(intents) - len(mine),
            )
        if mine:
            logger.info("%s: resuming %d unfinished uploads", journal.path, len(mine))
        return [(intent, self.entry(out_dir, journal, intent.id)) for intent in mine]

    @staticmethod
    def _withdraw_superseded(
        journal: UploadJournal, intents: list[UploadIntent], after: int
    ) -> list[UploadIntent]:
        """Withdraw the intents past step `after`; return the others."""
        superseded = [i for i in intents if i.row.step > after]
        for intent in superseded:
            journal.withdraw(intent.id)
            logger.warning(
                "%s: the unfinished upload of step %d (%s) is withdrawn: this run continues "
                "from step %d and saves that step anew",
                journal.path,
                intent.row.step,
                intent.row.path,
                after,
            )
        return [i for i in intents if i.row.step <= after]

    def record(
        self,
        out_dir: Path,
        dest: str,
        run_prefix: str,
        row: ManifestRow,
        options: dict[str, str],
    ) -> JournalEntry | JournalError:
        """Record an upload's intent; on failure the out dir's journal is not used again."""
        journal = self.get(out_dir)
        if isinstance(journal, JournalError):
            return journal
        try:
            intent_id = journal.record_intent(dest, run_prefix, row, options)
        except JournalError as exc:
            self.set_broken(out_dir, exc)
            return exc
        return self.entry(out_dir, journal, intent_id)

    def first_report(self, error: JournalError) -> bool:
        """Whether `error` is reported for the first time (errors are kept, so by identity)."""
        with self._lock:
            if error in self._reported:
                return False
            self._reported.add(error)
            return True

    def set_broken(self, out_dir: Path, error: JournalError) -> None:
        """Stop handing out the out dir's journal: `get` returns `error` until it is closed."""
        with self._lock:
            self._broken[out_dir] = error

    def entry(self, out_dir: Path, journal: UploadJournal, intent_id: int) -> JournalEntry:
        """An entry for one upload; the journal stays open until the entry is done."""
        with self._lock:
            self._users[out_dir] = self._users.get(out_dir, 0) + 1
        return JournalEntry(journal, intent_id, self, out_dir)

    def release(self, out_dir: Path) -> None:
        """One upload finished; close the journal if its run already ended."""
        with self._lock:
            users = self._users[out_dir] = self._users.get(out_dir, 1) - 1
            last = users <= 0 and out_dir in self._closing
        if last:
            self._close(out_dir)

    def close(self, out_dir: Path) -> None:
        """Close the out dir's journal now, or when its last upload finishes."""
        with self._lock:
            self._broken.pop(out_dir, None)
            if out_dir not in self._open:
                return
            self._closing.add(out_dir)
            idle = self._users.get(out_dir, 0) <= 0
        if idle:
            self._close(out_dir)

    def close_all(self) -> None:
        """Close every journal (the bridge is shutting down; no upload is left)."""
        with self._lock:
            out_dirs = list(self._open)
        for out_dir in out_dirs:
            self._close(out_dir)

    async def aclose_all(self) -> None:
        """`close_all` as a bridge shutdown callback."""
        self.close_all()

    def _close(self, out_dir: Path) -> None:
        with self._lock:
            journal = self._open.pop(out_dir, None)
            self._closing.discard(out_dir)
            self._users.pop(out_dir, None)
        if journal is not None:
            journal.close()


async def resume_shortcut(
    store: ObjectStore, row: ManifestRow, step_prefix: str, marker: str, *, clean_stale: bool = True
) -> list[dict[str, Any]] | None:
    """Prepare a resumed upload: the marker's file list if it is already complete, else None.

    `clean_stale=False` leaves unfinished uploads under the step alone (a sharded rank clears
    only its own files' uploads, since other ranks may be uploading into the same step).

    Raises:
        IntegrityError: it is not complete remotely and the local checkpoint is gone.
    """
    if clean_stale and isinstance(store, CleansStaleUploads):
        # Best effort: stale parts cost storage, never correctness, so a store that cannot
        # list them must not turn a publishable checkpoint into a failure.
        try:
            stale = await store.abort_stale_uploads(step_prefix + "/")
        except (StoreError, OSError) as exc:
            logger.warning(
                "could not clear unfinished uploads under %s (%s); a bucket lifecycle rule "
                "(AbortIncompleteMultipartUpload) will remove their parts",
                step_prefix,
                exc,
            )
        else:
            if stale:
                logger.info("cleared %d unfinished uploads under %s", stale, step_prefix)
    files = await _complete_files(store, row, step_prefix, marker)
    if files is not None:
        return files
    if not row.path.exists():
        msg = (
            f"checkpoint step {row.step}: the local checkpoint {row.path} is gone and was "
            f"never fully uploaded, so it cannot be published; restore it and run "
            f"`loopbridge resume` again, or move the run's {JOURNAL_FILE} aside to give it up"
        )
        raise IntegrityError(msg, key=step_prefix)
    return None


async def _complete_files(
    store: ObjectStore, row: ManifestRow, step_prefix: str, marker: str
) -> list[dict[str, Any]] | None:
    """The marker's files when the step is complete remotely with the row's digest, else None."""
    if row.digest is None:
        return None
    raw = await store.get_bytes(join_key(step_prefix, marker))
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        files = read_files(entry["files"])
        wanted = {join_key(step_prefix, str(f["path"])): int(f["size"]) for f in files}
    except (ValueError, KeyError, TypeError):
        return None
    if entry.get("digest") != row.digest:
        return None
    present = {info.key: info.size for info in await store.list(step_prefix + "/")}
    if any(present.get(key) != size for key, size in wanted.items()):
        return None
    return files
