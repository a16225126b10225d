"""What the framework adapter tests check the same way for Lightning and transformers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from tests.fixtures.s3 import S3Bucket

import loopbridge as lb
from loopbridge.callbacks._snapshot import SNAPSHOT_DIR
from loopbridge.testing import RecordingCallback

__all__ = [
    "UploadGate",
    "Witness",
    "check_published",
    "expected_hooks",
    "no_snapshots_left",
    "recorded",
]


def sha256_hex(path: Path) -> str:
    """The sha256 hex digest of a local file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_hooks(
    steps: int, *, evals: set[int], checkpoints: set[int], eval_first: bool
) -> list[tuple[str, int | None]]:
    """The hook sequence of the mapping table in docs/integrations.md, as (hook, state.step).

    Per optimizer step: `on_step_end`, then that step's `on_eval` and `on_checkpoint` in the
    framework's order (`eval_first`: transformers evaluates before it saves; Lightning's
    ModelCheckpoint saves in the batch end, before validation runs).
    """
    calls: list[tuple[str, int | None]] = [("on_run_start", None), ("on_train_start", 0)]
    for step in range(1, steps + 1):
        calls.append(("on_step_end", step))
        after = [("on_eval", step)] if step in evals else []
        saved = [("on_checkpoint", step)] if step in checkpoints else []
        calls.extend(after + saved if eval_first else saved + after)
    calls += [("on_train_end", steps), ("on_run_end", None)]
    return calls


def recorded(recorder: RecordingCallback) -> list[tuple[str, int | None]]:
    """The recorded hook sequence as (hook, state.step)."""
    return [(call.hook, call.step) for call in recorder.calls]


def checkpoint_rows(recorder: RecordingCallback) -> list[lb.ManifestRow]:
    """The manifest rows `on_checkpoint` received, in order."""
    rows = [call.args[1] for call in recorder.calls_to("on_checkpoint")]
    assert all(isinstance(row, lb.ManifestRow) for row in rows)
    return rows


def check_published(
    bucket: S3Bucket, run_prefix: str, rows: list[lb.ManifestRow], files: dict[int, dict[str, str]]
) -> None:
    """Every checkpoint is in the store, each file with its sha256; manifest and latest right.

    `files` maps each step to `{path relative to the step prefix: sha256 hex}`, taken from
    the local files when they were written.
    """
    keys = bucket.list_keys(run_prefix + "/")
    for row in rows:
        step_prefix = f"{run_prefix}/step-{row.step:08d}"
        for rel, digest in files[row.step].items():
            key = f"{step_prefix}/{rel}"
            assert key in keys, f"{key} missing from the store"
            assert bucket.sha256(key) == digest, key
        marker = json.loads(bucket.read(f"{step_prefix}/_COMPLETE"))
        assert marker["digest"] == row.digest
    manifest = json.loads(bucket.read(f"{run_prefix}/manifest.json"))
    assert [entry["step"] for entry in manifest["checkpoints"]] == [row.step for row in rows]
    latest = json.loads(bucket.read(f"{run_prefix}/latest"))
    assert latest["step"] == max(row.step for row in rows)
    assert latest["digest"] == rows[-1].digest


def local_files(path: Path) -> dict[str, str]:
    """`{relative path: sha256}` of a checkpoint file or directory, as the store names them."""
    if path.is_dir():
        return {
            p.relative_to(path).as_posix(): sha256_hex(p)
            for p in sorted(path.rglob("*"))
            if p.is_file()
        }
    return {path.name: sha256_hex(path)}


def no_snapshots_left(root: Path) -> bool:
    """Whether every snapshot under `root` was removed after its upload."""
    return not any(p.is_file() for d in root.rglob(SNAPSHOT_DIR) for p in d.rglob("*"))


class UploadGate(lb.Callback):
    """Holds the bridge's only in-flight slot from train start to train end.

    With `Bridge(max_in_flight=1)`, no upload can start before training has ended, so every
    checkpoint the framework rotates away is deleted before its upload reads a byte.
    """

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.held = threading.Event()

    def on_train_start(self, state: lb.LoopState) -> None:
        async def hold() -> None:
            self.held.set()
            await asyncio.to_thread(self.opened.wait, 60)

        self.spawn(hold(), name="upload gate")

    def on_train_end(self, state: lb.LoopState, artifacts: lb.LoopArtifacts) -> None:
        self.opened.set()


def metrics_of(recorder: RecordingCallback, hook: str) -> list[dict[str, Any]]:
    """The metrics dicts a hook received, in order."""
    return [call.args[-1] for call in recorder.calls_to(hook)]


class Witness(lb.Callback):
    """Hashes each checkpoint's files when `on_checkpoint` fires, before any rotation."""

    def __init__(self) -> None:
        self.files: dict[int, dict[str, str]] = {}

    def on_checkpoint(self, state: lb.LoopState, row: lb.ManifestRow) -> None:
        self.files[row.step] = local_files(row.path)
