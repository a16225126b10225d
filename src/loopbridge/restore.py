"""Restore a published checkpoint from a store: the way back after a lost machine.

`restore(dest, run=..., step=None, to=dir)` finds the run under `dest` (the same
`s3://bucket/prefix` or directory given to `CheckpointUploader`), follows its `latest` pointer
(or takes `step`), and downloads every file of that checkpoint into `to/step-XXXXXXXX/`,
checking each against the digest in the run's manifest and completion marker, then the
checkpoint's digest. Only published checkpoints are restored: a step with objects but no
marker or manifest entry is refused, and a published one that fails a check is an error
naming the object, never a quiet fall-back to an older step.

Each file is written under a temporary name and renamed only once verified; a file already
in `to` with the published size and digest is kept rather than downloaded again, and
`to/step-XXXXXXXX.complete.json` is written last, once the whole checkpoint is in place.

(`loopbridge.resume` is another thing: it finishes a dead process's pending *uploads*.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopbridge._digest import algorithm_of, file_digest
from loopbridge._exceptions import IntegrityError, ObjectNotFoundError, RestoreError
from loopbridge._remote_runs import display_name, list_runs
from loopbridge._types import ManifestRow
from loopbridge.callbacks._layout import (
    LATEST,
    MANIFEST,
    MARKER,
    STEP_DIR,
    PublishedCheckpoint,
    parse_latest,
    parse_manifest,
    parse_marker,
    step_dir,
)
from loopbridge.stores import ObjectStore, open_store
from loopbridge.stores._sink import remove_stale
from loopbridge.stores.keys import escape_segment, join_key

__all__ = ["Restored", "arestore", "find_published", "fetch_checkpoint", "restore"]

logger = logging.getLogger(__name__)

_FILES_AT_ONCE = 4
COMPLETE_SUFFIX = ".complete.json"


@dataclass(frozen=True, slots=True)
class Restored:
    """A checkpoint restored to local disk.

    `path` is what `save` wrote (the file, or the directory of shards); `row` describes it as
    a `ManifestRow`; `run` is the run's key in the store and `source` where it came from.
    """

    step: int
    path: Path
    row: ManifestRow
    run: str
    source: str
    downloaded_bytes: int = 0
    reused_files: int = 0


def restore(
    dest: str | os.PathLike[str],
    *,
    run: str | None = None,
    step: int | None = None,
    to: str | os.PathLike[str],
    **store_options: Any,
) -> Restored:
    """Download and verify a published checkpoint of `run` under `dest` into `to`.

    Args:
        dest: the `s3://bucket/prefix`, `file:///dir` or directory given to the uploader.
        run: the run's path under `dest` (`experiment/arm/run`, or `run` for a bare
            TrainLoop); a unique trailing part (`run`) will do. None when `dest` holds one run.
        step: the step to restore; None follows the run's `latest`.
        to: the local directory to restore into.
        store_options: for `S3Store` (`endpoint_url=`, `region=`, `part_size=`...).

    Raises:
        RestoreError: no such run, or no such published step (the message lists what exists).
        IntegrityError: a published file is missing, or its bytes do not match.
        StoreError: the store failed or refused (403...); the message names the object.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        msg = "restore() blocks; inside a running event loop use `await loopbridge.arestore(...)`"
        raise RuntimeError(msg)
    return asyncio.run(arestore(dest, run=run, step=step, to=to, **store_options))


async def arestore(
    dest: str | os.PathLike[str] | ObjectStore,
    *,
    run: str | None = None,
    step: int | None = None,
    to: str | os.PathLike[str],
    **store_options: Any,
) -> Restored:
    """`restore` on the running event loop; `dest` may also be an open `ObjectStore`."""
    if isinstance(dest, ObjectStore):
        return await _restore(dest, run, step, Path(to))
    store = open_store(dest, **store_options)
    try:
        return await _restore(store, run, step, Path(to))
    finally:
        await store.aclose()


async def _restore(store: ObjectStore, run: str | None, step: int | None, to: Path) -> Restored:
    run_key = await resolve_run(store, run)
    entry = await find_published(store, run_key, step)
    if entry is None:
        msg = f"{store.url}/{run_key} has no published checkpoint to restore"
        raise RestoreError(msg)
    return await fetch_checkpoint(store, run_key, entry, to)


async def resolve_run(store: ObjectStore, run: str | None) -> str:
    """The key of the run `run` names in `store` (see `restore`).

    Raises:
        RestoreError: no run, or more than one, matches; the message lists the runs found.
    """
    if run is not None:
        text = run.strip("/")
        escaped = "/".join(escape_segment(s) for s in text.split("/") if s)
        for candidate in dict.fromkeys([text, escaped]):
            try:
                key = join_key(candidate, MANIFEST)
            except ValueError:
                continue
            if await store.head(key) is not None:
                return candidate
    runs = list(await list_runs(store))
    names = {key: display_name(key) for key in runs}
    if run is None:
        if len(runs) == 1:
            return runs[0]
        found = ", ".join(names.values()) or "none"
        msg = (
            f"{store.url} holds {len(runs)} runs; choose one with run=... "
            f"(`loopbridge ls {store.url}` lists them): {found}"
        )
        raise RestoreError(msg)
    wanted = run.strip("/")
    matches = [
        key
        for key, name in names.items()
        if wanted in (key, name) or key.endswith("/" + wanted) or name.endswith("/" + wanted)
    ]
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(names.values()) or "none"
    if matches:
        msg = f"run {run!r} matches {len(matches)} runs in {store.url}: " + ", ".join(
            names[key] for key in matches
        )
        msg += "; give more of its path (experiment/arm/run)"
    else:
        msg = f"no run {run!r} in {store.url}; runs found: {found}"
    raise RestoreError(msg)


async def find_published(
    store: ObjectStore, run_key: str, step: int | None = None
) -> PublishedCheckpoint | None:
    """The published checkpoint `latest` names (or `step`); None when the run published none.

    Raises:
        RestoreError: `step` was given and is not published (listing the steps that are).
        IntegrityError: `latest` and the manifest disagree, or one is unreadable.
    """
    manifest_key = join_key(run_key, MANIFEST)
    raw = await store.get_bytes(manifest_key)
    entries = parse_manifest(raw, manifest_key) if raw is not None else []
    if step is not None:
        for entry in entries:
            if entry.step == step:
                return entry
        published = ", ".join(str(e.step) for e in entries) or "none"
        msg = (
            f"step {step} of {store.url}/{run_key} is not published (published steps: {published})"
        )
        leftovers = await store.list(join_key(run_key, step_dir(step)) + "/")
        if leftovers:
            msg += (
                f"; {len(leftovers)} objects exist under its step directory, but without a "
                f"completion marker and manifest entry they are never restored"
            )
        raise RestoreError(msg)
    latest_key = join_key(run_key, LATEST)
    raw = await store.get_bytes(latest_key)
    if raw is None:
        if entries:
            # The manifest is written before `latest`: a crash in between leaves this.
            logger.warning(
                "%s/%s: no `latest`; taking the manifest's newest step", store.url, run_key
            )
            return entries[-1]
        return None
    pointer = parse_latest(raw, latest_key)
    for entry in entries:
        if entry.step == pointer.step:
            if entry.digest != pointer.digest:
                msg = (
                    f"{store.url}/{latest_key} names step {pointer.step} with digest "
                    f"{pointer.digest}, but the manifest says {entry.digest}"
                )
                raise IntegrityError(msg, key=latest_key)
            return entry
    msg = (
        f"{store.url}/{latest_key} names step {pointer.step}, which is not in "
        f"{manifest_key}; the run's remote layout is damaged (restore a step with step=N)"
    )
    raise IntegrityError(msg, key=latest_key)


async def fetch_checkpoint(
    store: ObjectStore, run_key: str, entry: PublishedCheckpoint, to: Path
) -> Restored:
    """Download and verify every file of a published checkpoint into `to/<step dir>/`.

    Raises:
        IntegrityError: its marker, a file or the digest is missing or does not match.
    """
    if not STEP_DIR.match(entry.prefix):
        msg = f"{store.url}/{run_key}: step {entry.step} has an unexpected prefix {entry.prefix!r}"
        raise IntegrityError(msg, key=join_key(run_key, MANIFEST))
    step_key = join_key(run_key, entry.prefix)
    marker_key = join_key(step_key, MARKER)
    raw = await store.get_bytes(marker_key)
    if raw is None:
        msg = (
            f"{store.url}/{marker_key} is missing: step {entry.step} is in the manifest but has "
            f"no completion marker, so it is not restored"
        )
        raise IntegrityError(msg, key=marker_key)
    marker = parse_marker(raw, marker_key)
    if marker.digest != entry.digest or marker.files != entry.files:
        msg = (
            f"{store.url}/{marker_key} does not agree with the manifest about step "
            f"{entry.step} (digest {marker.digest} vs {entry.digest}, or its file list)"
        )
        raise IntegrityError(msg, key=marker_key)
    if entry.files_digest() != entry.digest:
        msg = (
            f"{store.url}/{marker_key}: the files listed add up to {entry.files_digest()}, not "
            f"the published digest {entry.digest}"
        )
        raise IntegrityError(msg, key=marker_key)
    local_dir = to / entry.prefix
    complete = to / f"{entry.prefix}{COMPLETE_SUFFIX}"
    await asyncio.to_thread(_prepare, local_dir, complete, {f.path for f in entry.files})
    gate = asyncio.Semaphore(_FILES_AT_ONCE)
    downloaded = reused = 0

    async def one(rel: str, size: int, digest: str) -> None:
        nonlocal downloaded, reused
        target = local_dir.joinpath(*rel.split("/"))
        key = join_key(step_key, rel)
        async with gate:
            if await asyncio.to_thread(_intact, target, size, digest):
                reused += 1
                return
            try:
                await store.get_file(key, target, expected_digest=digest, expected_size=size)
            except ObjectNotFoundError as exc:
                msg = (
                    f"{store.url}/{key} is missing: step {entry.step} was published with it, "
                    f"so the checkpoint cannot be restored ({exc})"
                )
                raise IntegrityError(msg, key=key) from exc
            downloaded += size

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            for file in entry.files:
                group.create_task(one(file.path, file.size, file.digest))
    except BaseExceptionGroup as group_error:
        # One failure cancels the rest; raise the first real one, not the group.
        first = group_error.exceptions[0]
        raise first from None
    await asyncio.to_thread(_write_complete, complete, entry)
    path = local_dir / entry.files[0].path if entry.kind == "file" else local_dir
    logger.info(
        "restored step %d of %s/%s to %s (%d bytes downloaded, %d files kept) in %.2fs",
        entry.step,
        store.url,
        run_key,
        path,
        downloaded,
        reused,
        time.monotonic() - started,
    )
    run_name = display_name(run_key).rsplit("/", 1)[-1]
    return Restored(
        step=entry.step,
        path=path,
        row=entry.row(path, run_name=run_name),
        run=run_key,
        source=f"{store.url}/{step_key}",
        downloaded_bytes=downloaded,
        reused_files=reused,
    )


def _prepare(local_dir: Path, complete: Path, wanted: set[str]) -> None:
    """Forget an earlier restore's completion note, its half-written files, and strays.

    The step directory must hold exactly the checkpoint's files: a file that is not one of
    them (left by another checkpoint restored here) would look like a shard to `load`.
    """
    complete.unlink(missing_ok=True)
    removed = remove_stale(local_dir)
    if removed:
        logger.info("removed %d unfinished downloads under %s", removed, local_dir)
    if not local_dir.is_dir():
        return
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path.relative_to(local_dir).as_posix() not in wanted:
            logger.warning("removing %s: it is not a file of the checkpoint restored there", path)
            path.unlink()


def _intact(path: Path, size: int, digest: str) -> bool:
    """Whether `path` already holds exactly the published bytes."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
    except OSError:
        return False
    return file_digest(path, algorithm_of(digest))[1] == digest


def _write_complete(complete: Path, entry: PublishedCheckpoint) -> None:
    """Note, last and atomically, that every file of the step is in place and verified."""
    data = {
        "step": entry.step,
        "prefix": entry.prefix,
        "digest": entry.digest,
        "size_bytes": entry.size_bytes,
        "restored_at": time.time(),
        "files": [{"path": f.path, "size": f.size, "digest": f.digest} for f in entry.files],
    }
    tmp = complete.with_name(f".lb-tmp-{complete.name}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, complete)
