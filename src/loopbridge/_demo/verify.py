"""Check the demo's store against its runs: every checkpoint published, manifests right."""

from __future__ import annotations

import json
from typing import Any

from loopbridge._types import ExperimentResult, RunResult
from loopbridge.callbacks._layout import LATEST, MANIFEST, MARKER, step_dir
from loopbridge.stores import ObjectStore
from loopbridge.stores.keys import escape_segment, join_key

__all__ = ["check_store", "run_prefix"]


def run_prefix(experiment: str, arm: str, run: str) -> str:
    """A run's key prefix in the uploader's layout: `<experiment>/<arm>/<run>`."""
    return join_key(*(escape_segment(name) for name in (experiment, arm, run)))


async def check_store(store: ObjectStore, result: ExperimentResult) -> tuple[int, list[str]]:
    """Compare each run's local manifest with its remote manifest and `latest`.

    Returns how many checkpoints were found published, and a list of problems (empty if none).
    It reads the small JSON documents only; tests re-hash the checkpoint bytes themselves.
    """
    found = 0
    problems: list[str] = []
    for arm in result.arms.values():
        for run in arm.runs:
            n, issues = await _check_run(store, result.name, arm.name, run)
            found += n
            problems.extend(issues)
    return found, problems


async def _check_run(
    store: ObjectStore, experiment: str, arm: str, run: RunResult
) -> tuple[int, list[str]]:
    if run.artifacts is None:
        return 0, [f"{run.run_name}: no artifacts (the run failed before training ended)"]
    prefix = run_prefix(experiment, arm, run.run_name)
    local = {row.step: row.digest for row in run.artifacts.manifest}
    manifest = await _json(store, join_key(prefix, MANIFEST))
    if manifest is None:
        return 0, [f"{run.run_name}: no manifest.json at {prefix}"]
    remote: dict[int, Any] = {
        int(entry["step"]): entry.get("digest") for entry in manifest.get("checkpoints", [])
    }
    problems = []
    for step, digest in sorted(local.items()):
        if step not in remote:
            problems.append(f"{run.run_name}: checkpoint of step {step} is not in the manifest")
        elif remote[step] != digest:
            problems.append(
                f"{run.run_name}: step {step} digest {remote[step]} differs from local {digest}"
            )
        elif await store.head(join_key(prefix, step_dir(step), MARKER)) is None:
            problems.append(f"{run.run_name}: step {step} has no completion marker")
    latest = await _json(store, join_key(prefix, LATEST))
    newest = max(local) if local else None
    if latest is None or latest.get("step") != newest:
        seen = None if latest is None else latest.get("step")
        problems.append(f"{run.run_name}: latest points at step {seen}, not {newest}")
    published = sum(1 for step in local if step in remote)
    return published, problems


async def _json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    raw = await store.get_bytes(key)
    if raw is None:
        return None
    data = json.loads(raw)
    return data if isinstance(data, dict) else None
