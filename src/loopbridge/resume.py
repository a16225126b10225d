"""Finish the checkpoint uploads a dead process left open: what `loopbridge resume` runs.

Every upload journal under the out dir is read; each open intent is uploaded again (what a
dead process left half-written under its step is cleared first, and a checkpoint already
complete remotely is not sent twice), then the run's manifest and `latest` are published.
Intents of one run go in recorded order; runs go concurrently, and so do the journals of the
ranks of a sharded job (one per rank in a shared out dir, or one in each rank's out dir): rank
0's resume publishes a step once the others' resumes wrote their rank markers. Nothing here
raises for a bad journal, a missing file or a refusing store: each becomes a failed line of
the report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopbridge._exceptions import JournalError, LoopbridgeError
from loopbridge.callbacks._sharded import ShardedCommit, read_ranks_file
from loopbridge.callbacks._store_options import decode_options
from loopbridge.callbacks.checkpoint_uploader import CheckpointUploader
from loopbridge.journal import (
    RESUME_HOLDER,
    UploadIntent,
    UploadJournal,
    find_journals,
    journal_rank,
)
from loopbridge.stores import ObjectStore, open_store

__all__ = ["ResumeOutcome", "ResumeReport", "resume_out_dir"]

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What became of one open upload (or of a journal that could not be read)."""

    journal: Path
    detail: str
    ok: bool
    step: int | None = None
    destination: str | None = None


@dataclass
class ResumeReport:
    """Every journal found and every open upload resumed, with how each ended."""

    out_dir: Path
    journals: list[Path] = field(default_factory=list)
    outcomes: list[ResumeOutcome] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether everything that was open is now published and every journal was readable."""
        return all(outcome.ok for outcome in self.outcomes)

    @property
    def failed(self) -> list[ResumeOutcome]:
        """The outcomes that are not published."""
        return [outcome for outcome in self.outcomes if not outcome.ok]

    def lines(self) -> list[str]:
        """The report as text lines, one per outcome, then a summary."""
        if not self.journals:
            return [f"no upload journals under {self.out_dir}; nothing to resume"]
        out = []
        for outcome in self.outcomes:
            mark = "ok    " if outcome.ok else "FAILED"
            what = ""
            if outcome.step is not None:
                what = f"step {outcome.step} -> {outcome.destination}: "
            out.append(f"{mark} {what}{outcome.detail}")
        steps = [o for o in self.outcomes if o.step is not None]
        published = sum(o.ok for o in steps)
        out.append(
            f"{len(self.journals)} journal(s), {len(steps)} open upload(s): {published} "
            f"published, {len(self.failed)} failed, in {self.elapsed:.1f}s"
        )
        return out


def resume_out_dir(
    out_dir: Path,
    *,
    store: str | None = None,
    endpoint_url: str | None = None,
    timeout: float | None = None,
    store_options: Mapping[str, str] | None = None,
) -> ResumeReport:
    """Finish the open uploads of every journal under `out_dir`.

    Args:
        out_dir: a run's out dir, or a directory that holds several (an experiment's).
        store: publish to this store URL instead of the one each journal recorded.
        endpoint_url: the S3 endpoint to use instead of the recorded one.
        timeout: give up on what is still open after this many seconds (reported as failed).
        store_options: S3 store options by name (`verify_etag`, `part_size`, ...), as
            strings, over the ones each journal recorded.
    """
    # Absolute, as UploadJournal.path is: outcomes are matched to journals by path.
    report = ResumeReport(out_dir=out_dir, journals=list(find_journals(out_dir.absolute())))
    started = time.monotonic()
    overrides = dict(store_options or {})
    if endpoint_url is not None:
        overrides["endpoint_url"] = endpoint_url
    asyncio.run(_resume_all(report, store=store, overrides=overrides, limit=timeout))
    report.elapsed = time.monotonic() - started
    return report


async def _resume_all(
    report: ResumeReport, *, store: str | None, overrides: dict[str, str], limit: float | None
) -> None:
    """Open every journal and store, then resume each run's open intents on this loop."""
    journals: list[UploadJournal] = []
    uploaders: dict[
        tuple[str, tuple[tuple[str, str], ...], ShardedCommit | None], CheckpointUploader | str
    ] = {}
    runs: dict[tuple[Path, str, str], list[tuple[UploadJournal, UploadIntent]]] = {}
    # Every run a journal names, open uploads or not: each is swept for stale leftovers.
    known: dict[tuple[Path, str, str], UploadIntent] = {}
    finished: set[tuple[Path, int]] = set()
    try:
        for path in report.journals:
            try:
                journal = UploadJournal(path, holder=RESUME_HOLDER)
                journals.append(journal)
                every = journal.intents()
            except JournalError as exc:
                report.outcomes.append(ResumeOutcome(path, str(exc), ok=False))
                continue
            intents = [i for i in every if i.state != "published"]
            if not intents:
                report.outcomes.append(
                    ResumeOutcome(path, f"{path}: nothing open ({len(every)} published)", ok=True)
                )
            for intent in every:
                known.setdefault((path, intent.dest, intent.run_prefix), intent)
            for intent in intents:
                runs.setdefault((path, intent.dest, intent.run_prefix), []).append(
                    (journal, intent)
                )
        tasks = []
        for (path, dest, run_prefix), first in known.items():
            options = {**first.store_options, **overrides}
            url = store or dest
            # A sharded rank's out dir says which rank it was (docs/distributed.md); ranks
            # sharing one out dir each have their own journal and ranks file there.
            sharded = read_ranks_file(path.parent, journal_rank(path) or 0)
            key = (url, tuple(sorted(options.items())), sharded)
            if key not in uploaders:
                uploaders[key] = _uploader(url, options, sharded)
            items = runs.get((path, dest, run_prefix), [])
            tasks.append(
                _resume_run(report, path, uploaders[key], items, finished, run_prefix=run_prefix)
            )
        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass
        _report_unfinished(report, runs.values(), finished, limit)
    finally:
        for uploader in uploaders.values():
            if isinstance(uploader, CheckpointUploader):
                await _close_store(uploader.store)
        for journal in journals:
            journal.close()


def _uploader(
    url: str, options: dict[str, str], sharded: ShardedCommit | None = None
) -> CheckpointUploader | str:
    """An uploader over the store `url` names (as the recorded rank), or why it cannot open."""
    try:
        kwargs: dict[str, Any] = decode_options(options) if url.startswith("s3://") else {}
        store = open_store(url, **kwargs)
    except (ValueError, TypeError, LoopbridgeError) as exc:
        return (
            f"cannot open the store {url}: {exc}; pass --store URL (and --endpoint-url, "
            f"--store-option NAME=VALUE)"
        )
    if sharded is None:
        return CheckpointUploader("", store=store, journal=False)
    return CheckpointUploader(
        "",
        store=store,
        journal=False,
        ranks="sharded",
        rank=sharded.rank,
        rank_timeout=sharded.timeout,
    )


async def _resume_run(
    report: ResumeReport,
    path: Path,
    uploader: CheckpointUploader | str,
    items: list[tuple[UploadJournal, UploadIntent]],
    finished: set[tuple[Path, int]],
    *,
    run_prefix: str,
) -> None:
    """Resume one run's open intents in the order they were recorded; then sweep the run."""
    for journal, intent in items:
        row = intent.row
        if isinstance(uploader, str):
            where = f"{intent.dest}/{intent.run_prefix}"
            outcome = ResumeOutcome(path, uploader, False, row.step, where)
        else:
            where = f"{uploader.store.url}/{intent.run_prefix}"
            try:
                sent = await uploader.resume_intent(intent, journal)
            except Exception as exc:
                detail = str(exc) if str(row.path) in str(exc) else f"{row.path}: {exc}"
                outcome = ResumeOutcome(path, detail, False, row.step, where)
            else:
                how = f"uploaded {_size(sent)}" if sent else "already uploaded"
                outcome = ResumeOutcome(path, f"published ({how})", True, row.step, where)
        report.outcomes.append(outcome)
        finished.add((path, intent.id))
    if isinstance(uploader, CheckpointUploader):
        report.outcomes.extend(await _sweep(path, uploader, run_prefix))


async def _sweep(path: Path, uploader: CheckpointUploader, run_prefix: str) -> list[ResumeOutcome]:
    """Remove what failed or abandoned uploads left under the run's unpublished steps."""
    where = f"{uploader.store.url}/{run_prefix}"
    try:
        removed = await uploader.sweep_unpublished(run_prefix)
    except Exception as exc:
        return [ResumeOutcome(path, f"{where}: stale leftovers not removed: {exc}", ok=False)]
    if not removed:
        return []
    detail = f"{where}: removed stale leftovers of unpublished {', '.join(removed)}"
    logger.info("%s", detail)
    return [ResumeOutcome(path, detail, ok=True)]


def _report_unfinished(
    report: ResumeReport,
    runs: Iterable[list[tuple[UploadJournal, UploadIntent]]],
    finished: set[tuple[Path, int]],
    limit: float | None,
) -> None:
    """Add a failed outcome for every intent the deadline cut off."""
    for items in runs:
        for journal, intent in items:
            if (journal.path, intent.id) in finished:
                continue
            detail = f"not finished within --timeout {limit}s; run `loopbridge resume` again"
            where = f"{intent.dest}/{intent.run_prefix}"
            report.outcomes.append(
                ResumeOutcome(journal.path, detail, False, intent.row.step, where)
            )


def _size(n_bytes: int) -> str:
    """A byte count for people: bytes, KiB or MiB."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < MiB:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / MiB:.1f} MiB"


async def _close_store(store: ObjectStore) -> None:
    """Close a store's client, logging rather than raising (the report matters more)."""
    try:
        await store.aclose()
    except Exception as exc:
        logger.warning("could not close %s: %s", store.url, exc)
