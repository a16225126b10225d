"""Publishing a run's checkpoints remotely: marker, manifest, `latest`, pruning, discarding.

A `Publisher` owns what is written next to the uploaded bytes of one uploader's runs: the
step's `_COMPLETE` marker, the run's `manifest.json` (cached per run prefix, read from the
store the first time so a resumed run carries on) and `latest`; it prunes checkpoints past
`keep_last` and deletes what a failed upload had sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loopbridge._digest import combine_shard_digests
from loopbridge._exceptions import StoreError
from loopbridge._types import ManifestRow
from loopbridge.callbacks._layout import LATEST, MANIFEST, MARKER, encode_document, file_entry
from loopbridge.stores import CleansStaleUploads, ObjectStore, put_in_order
from loopbridge.stores.keys import join_key

__all__ = ["LATEST", "MANIFEST", "MARKER", "Publisher", "Shard"]

logger = logging.getLogger("loopbridge.callbacks.checkpoint_uploader")

_DISCARD_TIMEOUT = 10.0
_STEP_DIR = re.compile(r"step-[0-9]{8,}")


@dataclass(frozen=True, slots=True)
class Shard:
    """One uploaded file of a checkpoint, relative to its step prefix."""

    rel: str
    size: int
    digest: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Shard:
        """A file of a marker (this version's, or an older one's with a bare sha256)."""
        return cls(*file_entry(data))

    def to_json(self) -> dict[str, Any]:
        return {"path": self.rel, "size": self.size, "digest": self.digest}


class Publisher:
    """Writes the marker, manifest and `latest` of each checkpoint; prunes and discards."""

    def __init__(self, store: ObjectStore, keep_last: int | None) -> None:
        self.store = store
        self.keep_last = keep_last
        # Manifests per run prefix; only touched by that run's upload tasks, which run in order.
        self._manifests: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._pruned = 0
        # Runs continuing from a step: the earlier run's checkpoints past it are superseded.
        self._continues: dict[str, int] = {}

    @property
    def pruned(self) -> int:
        """Checkpoints pruned past `keep_last` so far."""
        with self._lock:
            return self._pruned

    def supersede_after(self, run_prefix: str, step: int) -> None:
        """The run continues from `step`: drop (and prune) its published steps past it."""
        with self._lock:
            self._continues[run_prefix] = step

    async def publish(
        self, row: ManifestRow, run_prefix: str, step_dir: str, shards: list[Shard]
    ) -> None:
        """Write the marker, then the manifest, then `latest`; then prune past keep_last."""
        digest = row.digest or combine_shard_digests((s.rel, s.size, s.digest) for s in shards)
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
        published = await self._manifest(run_prefix)
        # The new list is made aside and kept only once all three objects are stored.
        entries = sorted(
            [e for e in published if e["step"] != row.step] + [entry], key=lambda e: int(e["step"])
        )
        doomed: list[dict[str, Any]] = []
        with self._lock:
            after = self._continues.get(run_prefix)
        if after is not None:
            # Once, before this run's own steps join: an earlier run's later steps are
            # replaced by this run's history.
            doomed = [e for e in entries if int(e["step"]) > after and e["prefix"] != step_dir]
            entries = [e for e in entries if e not in doomed]
        if self.keep_last is not None and len(entries) > self.keep_last:
            # Never the newest and never the one `latest` is about to point at.
            past = [e for e in entries[: -self.keep_last] if e["prefix"] != step_dir]
            entries = [e for e in entries if e not in past]
            doomed += past
        manifest = {"version": 1, "run": run_prefix, "checkpoints": entries}
        # The newest step, not this one: a resumed older checkpoint must not move it back.
        newest = entries[-1]
        latest = {
            "step": newest["step"],
            "prefix": newest["prefix"],
            "digest": newest["digest"],
            "manifest": MANIFEST,
        }
        # Marker, then manifest, then `latest`, each only once the one before is stored (in
        # one call to an upload worker).
        await put_in_order(
            self.store,
            [
                (join_key(run_prefix, step_dir, MARKER), encode_document(entry)),
                (join_key(run_prefix, MANIFEST), encode_document(manifest)),
                (join_key(run_prefix, LATEST), encode_document(latest)),
            ],
        )
        published[:] = entries
        if after is not None:
            with self._lock:
                if self._continues.get(run_prefix) == after:
                    del self._continues[run_prefix]
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

    async def discard(self, step_prefix: str, sent: list[str]) -> None:
        """Delete everything under a failed checkpoint's step prefix, unfinished uploads too.

        Listed rather than remembered: an object whose put failed after the server stored it
        (a lost reply, a failed verification) is removed as well. The marker goes first, so
        a half-deleted checkpoint never looks complete.

        Raises:
            StoreError: something could not be deleted (the message names what is left);
                `loopbridge resume` removes such leftovers later.
        """
        prefix = step_prefix + "/"
        problems: list[str] = []
        try:
            # Bounded: the store may be what failed.
            async with asyncio.timeout(_DISCARD_TIMEOUT):
                if isinstance(self.store, CleansStaleUploads):
                    try:
                        await self.store.abort_stale_uploads(prefix)
                    except Exception as exc:
                        # The objects can still go; the parts are reported below.
                        problems.append(f"unfinished uploads not aborted: {_why(exc)}")
                keys = {info.key for info in await self.store.list(prefix)} | set(sent)
                markers = sorted(k for k in keys if k.endswith("/" + MARKER))
                await self.store.delete(markers)
                await self.store.delete(sorted(keys - set(markers)))
        except Exception as exc:
            problems.append(_why(exc))
        if problems:
            msg = (
                f"what it had uploaded under {self.store.url}/{prefix} could not be deleted "
                f"({'; '.join(problems)}); `loopbridge resume` removes it as stale"
            )
            raise StoreError(msg, key=prefix)

    async def sweep_unpublished(self, run_prefix: str) -> list[str]:
        """Delete the step prefixes of a run that are not published; return those removed.

        Published means listed in the run's `manifest.json` (and so complete, with its
        marker). Only for runs no live process is uploading to (`loopbridge resume`).

        Raises:
            StoreError: the manifest is unreadable (nothing is deleted then) or a delete failed.
        """
        raw = await self.store.get_bytes(join_key(run_prefix, MANIFEST))
        published: set[str] = set()
        if raw is not None:
            try:
                published = {str(e["prefix"]) for e in json.loads(raw)["checkpoints"]}
            except (ValueError, KeyError, TypeError) as exc:
                msg = (
                    f"the manifest of {self.store.url}/{run_prefix} is unreadable ({exc}); "
                    f"unpublished checkpoints there were left alone"
                )
                raise StoreError(msg, key=join_key(run_prefix, MANIFEST)) from exc
        base = run_prefix + "/" if run_prefix else ""
        stale: set[str] = set()
        for info in await self.store.list(base):
            step_dir = info.key[len(base) :].split("/", 1)[0]
            if _STEP_DIR.fullmatch(step_dir) and step_dir not in published:
                stale.add(step_dir)
        for step_dir in sorted(stale):
            await self.discard(join_key(run_prefix, step_dir), [])
        return sorted(stale)


def _why(exc: BaseException) -> str:
    """A short reason for a failed clean-up step."""
    return "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
