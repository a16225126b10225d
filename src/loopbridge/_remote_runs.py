"""What a checkpoint store holds: its runs, their published steps, and unpublished leftovers.

A run is found by its objects: a key with a step directory (`.../<run>/step-00000100/...`) or a
`manifest.json` or `latest` right under it. `describe_run` reads the run's manifest and
`latest` and checks each published step against the listing (every file there, with its
size); step directories that are not in the manifest are leftovers that were never published.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from loopbridge._exceptions import IntegrityError
from loopbridge.callbacks._layout import (
    LATEST,
    MANIFEST,
    MARKER,
    STEP_DIR,
    PublishedCheckpoint,
    parse_latest,
    parse_manifest,
)
from loopbridge.stores import ObjectInfo, ObjectStore
from loopbridge.stores.keys import join_key

__all__ = ["RunListing", "StepListing", "describe_run", "display_name", "group_runs", "list_runs"]


@dataclass(frozen=True, slots=True)
class StepListing:
    """One step directory of a run: published or not, its size, and what is wrong with it."""

    step: int
    prefix: str
    size: int
    objects: int
    published: PublishedCheckpoint | None = None
    problem: str | None = None


@dataclass
class RunListing:
    """One run in a store: its key, its steps and which step `latest` names."""

    key: str
    steps: list[StepListing] = field(default_factory=list)
    latest: int | None = None
    problem: str | None = None

    @property
    def published(self) -> list[StepListing]:
        """The steps in the manifest."""
        return [s for s in self.steps if s.published is not None]

    @property
    def leftovers(self) -> list[StepListing]:
        """Step directories with objects but no manifest entry: never published."""
        return [s for s in self.steps if s.published is None]


def display_name(run_key: str) -> str:
    """A run key with its escaped segments read back (`my%20exp/a/r0` -> `my exp/a/r0`)."""
    return "/".join(unquote(segment) for segment in run_key.split("/"))


def group_runs(objects: Iterable[ObjectInfo]) -> dict[str, builtins.list[ObjectInfo]]:
    """Group a listing by run key (see the module docstring); other objects are skipped."""
    runs: dict[str, builtins.list[ObjectInfo]] = {}
    for info in objects:
        segments = info.key.split("/")
        run = None
        for index, segment in enumerate(segments[:-1]):
            if index > 0 and STEP_DIR.match(segment):
                run = "/".join(segments[:index])
                break
        if run is None and len(segments) > 1 and segments[-1] in {MANIFEST, LATEST}:
            run = "/".join(segments[:-1])
        if run is not None:
            runs.setdefault(run, []).append(info)
    return dict(sorted(runs.items()))


async def list_runs(store: ObjectStore, prefix: str = "") -> dict[str, builtins.list[ObjectInfo]]:
    """Every run under `prefix` in `store`, with its objects, by run key."""
    return group_runs(await store.list(join_key(prefix) + "/" if prefix else ""))


async def describe_run(
    store: ObjectStore, run_key: str, objects: builtins.list[ObjectInfo]
) -> RunListing:
    """Read a run's manifest and `latest`, and check its published steps against `objects`."""
    listing = RunListing(key=run_key)
    sizes = {info.key: info.size for info in objects}
    manifest_key = join_key(run_key, MANIFEST)
    entries: dict[int, PublishedCheckpoint] = {}
    raw = await store.get_bytes(manifest_key) if manifest_key in sizes else None
    if raw is not None:
        try:
            entries = {entry.step: entry for entry in parse_manifest(raw, manifest_key)}
        except IntegrityError as exc:
            listing.problem = str(exc)
    latest_key = join_key(run_key, LATEST)
    raw = await store.get_bytes(latest_key) if latest_key in sizes else None
    if raw is not None:
        try:
            listing.latest = parse_latest(raw, latest_key).step
        except IntegrityError as exc:
            listing.problem = listing.problem or str(exc)
    dirs: dict[str, builtins.list[ObjectInfo]] = {}
    for info in objects:
        rest = info.key[len(run_key) + 1 :]
        head, sep, _ = rest.partition("/")
        if sep and STEP_DIR.match(head):
            dirs.setdefault(head, []).append(info)
    steps: dict[int, StepListing] = {}
    for name, infos in dirs.items():
        match = STEP_DIR.match(name)
        assert match is not None  # filtered above
        step = int(match.group(1))
        entry = entries.get(step)
        problem = None
        if entry is None:
            has_marker = any(i.key.endswith("/" + MARKER) for i in infos)
            problem = "has a marker but is not in the manifest" if has_marker else "no marker"
        else:
            problem = _check_entry(run_key, entry, sizes)
        total = sum(i.size for i in infos if not i.key.endswith("/" + MARKER))
        steps[step] = StepListing(step, name, total, len(infos), entry, problem)
    for step, entry in entries.items():
        if step not in steps:
            problem = f"no objects under {join_key(run_key, entry.prefix)}/"
            steps[step] = StepListing(step, entry.prefix, 0, 0, entry, problem)
    listing.steps = [steps[step] for step in sorted(steps)]
    return listing


def _check_entry(run_key: str, entry: PublishedCheckpoint, sizes: dict[str, int]) -> str | None:
    """What is missing or wrong in the listing for a published step, or None."""
    if join_key(run_key, entry.prefix, MARKER) not in sizes:
        return "its completion marker is missing"
    for file in entry.files:
        key = join_key(run_key, entry.prefix, file.path)
        size = sizes.get(key)
        if size is None:
            return f"{key} is missing"
        if size != file.size:
            return f"{key} has {size} bytes, not {file.size}"
    return None
