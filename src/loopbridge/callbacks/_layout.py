"""The remote layout `CheckpointUploader` publishes, as names, key builders and parsers.

Shared by the writer (the uploader) and the readers (`loopbridge.restore`, `loopbridge ls`)::

    <prefix>/<experiment>/<arm>/<run>/      (or <prefix>/<run>/ for a bare TrainLoop)
        step-00000100/<files>               the checkpoint's file, or its shards
        step-00000100/_COMPLETE             marker: JSON like a manifest entry
        manifest.json                       {"version": 1, "run": ..., "checkpoints": [entry...]}
        latest                              {"step", "prefix", "digest", "manifest"}

An entry (in the manifest, and the marker) has `step`, `prefix` (the step directory),
`digest`, `size_bytes`, `is_final`, `created_at`, `uploaded_at`, `source` and `files`
(`[{"path", "size", "digest"}]`, paths relative to the step directory; runs of older versions
wrote a bare sha256 hex as `"sha256"` instead of `"digest"`, and are still read). A checkpoint
is published when its marker and its manifest entry both exist and agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loopbridge._digest import combine_shard_digests, split_digest
from loopbridge._exceptions import IntegrityError
from loopbridge._types import ManifestRow
from loopbridge.stores.keys import escape_segment, join_key

__all__ = [
    "LATEST",
    "MANIFEST",
    "MARKER",
    "STEP_DIR",
    "LatestPointer",
    "PublishedCheckpoint",
    "RemoteFile",
    "encode_document",
    "file_entry",
    "read_files",
    "parse_latest",
    "parse_manifest",
    "parse_marker",
    "run_key",
    "step_dir",
]

MARKER = "_COMPLETE"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
"""A step directory's name; group 1 is the step."""


def encode_document(data: Mapping[str, Any]) -> bytes:
    """A marker, manifest or `latest` as stored: compact JSON, keys sorted.

    Compact, so that the C encoder runs: an indent takes the pure-Python one, about five times
    slower, on a manifest that grows with every checkpoint.
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def step_dir(step: int) -> str:
    """The name of a step's directory: `step-00000100`."""
    return f"step-{step:08d}"


def run_key(prefix: str, *, run: str, experiment: str | None = None, arm: str | None = None) -> str:
    """A run's key prefix as the uploader lays it out: `<prefix>/<experiment>/<arm>/<run>`.

    Without an experiment the run sits right under the prefix; each name is escaped into
    one safe segment, and a missing arm is left out.
    """
    names = [experiment, arm, run] if experiment else [run]
    return join_key(prefix, *(escape_segment(n) for n in names if n))


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of a published checkpoint, relative to its step directory."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class PublishedCheckpoint:
    """A manifest entry or marker: one published checkpoint and its files."""

    step: int
    prefix: str
    digest: str
    size_bytes: int
    files: tuple[RemoteFile, ...]
    is_final: bool = False
    created_at: float = 0.0
    uploaded_at: float = 0.0
    source: str = ""

    @property
    def kind(self) -> Literal["file", "dir"]:
        """Whether it was one file or a directory of shards (its digest tells them apart)."""
        if len(self.files) == 1 and self.digest == self.files[0].digest:
            return "file"
        return "dir"

    def files_digest(self) -> str:
        """The checkpoint digest its files add up to (for a file, that file's digest)."""
        if self.kind == "file":
            return self.files[0].digest
        return combine_shard_digests((f.path, f.size, f.digest) for f in self.files)

    def row(self, path: Path, run_name: str = "") -> ManifestRow:
        """The checkpoint as a `ManifestRow` for a local copy at `path`."""
        return ManifestRow(
            step=self.step,
            path=path,
            size_bytes=self.size_bytes,
            digest=self.digest,
            created_at=self.created_at,
            is_final=self.is_final,
            run_name=run_name,
        )


@dataclass(frozen=True, slots=True)
class LatestPointer:
    """What `latest` points at: a step, its directory and its digest."""

    step: int
    prefix: str
    digest: str


def _document(raw: bytes, key: str, what: str) -> Any:
    """Decode a small JSON document of the layout, or refuse it naming the key."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        msg = f"{key}: the {what} is not valid JSON ({exc}); the run's remote layout is damaged"
        raise IntegrityError(msg, key=key) from exc


def file_entry(data: Mapping[str, Any]) -> tuple[str, int, str]:
    """`(path, size, digest)` of one file in a marker or manifest entry, old or new.

    Raises:
        KeyError, TypeError, ValueError: a field is missing or malformed.
    """
    digest = data["digest"] if "digest" in data else "sha256:" + str(data["sha256"])
    split_digest(str(digest))
    return str(data["path"]), int(data["size"]), str(digest)


def read_files(files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A marker's file list as this version writes it, `{"path", "size", "digest"}` each.

    Raises:
        KeyError, TypeError, ValueError: a field is missing or malformed.
    """
    return [dict(zip(("path", "size", "digest"), file_entry(f), strict=True)) for f in files]


def _entry(data: Mapping[str, Any], key: str) -> PublishedCheckpoint:
    """One manifest entry or marker, checked for the fields a reader needs."""
    try:
        files = tuple(RemoteFile(*file_entry(f)) for f in data["files"])
        entry = PublishedCheckpoint(
            step=int(data["step"]),
            prefix=str(data["prefix"]),
            digest=str(data["digest"]),
            size_bytes=int(data["size_bytes"]),
            files=files,
            is_final=bool(data.get("is_final", False)),
            created_at=float(data.get("created_at") or 0.0),
            uploaded_at=float(data.get("uploaded_at") or 0.0),
            source=str(data.get("source", "")),
        )
        split_digest(entry.digest)
        entry.files_digest()  # the files' digests share one algorithm
    except (KeyError, TypeError, ValueError) as exc:
        msg = (
            f"{key}: a checkpoint entry lacks or mangles {exc}; the run's remote layout is damaged"
        )
        raise IntegrityError(msg, key=key) from exc
    if not files:
        msg = f"{key}: the entry of step {entry.step} lists no files"
        raise IntegrityError(msg, key=key)
    for file in files:
        # Keys from the store become local paths: refuse any that could climb out.
        try:
            join_key(file.path)
        except ValueError as exc:
            msg = f"{key}: step {entry.step} lists an unsafe file path {file.path!r}"
            raise IntegrityError(msg, key=key) from exc
    return entry


def parse_marker(raw: bytes, key: str) -> PublishedCheckpoint:
    """Read a `_COMPLETE` marker.

    Raises:
        IntegrityError: it is not the JSON the uploader writes.
    """
    data = _document(raw, key, "completion marker")
    if not isinstance(data, dict):
        msg = f"{key}: the completion marker is not a JSON object"
        raise IntegrityError(msg, key=key)
    return _entry(data, key)


def parse_manifest(raw: bytes, key: str) -> list[PublishedCheckpoint]:
    """Read a run's `manifest.json`: its published checkpoints, by step.

    Raises:
        IntegrityError: it is not the JSON the uploader writes.
    """
    data = _document(raw, key, "manifest")
    checkpoints = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(checkpoints, list):
        msg = f"{key}: the manifest has no 'checkpoints' list"
        raise IntegrityError(msg, key=key)
    return sorted((_entry(e, key) for e in checkpoints), key=lambda e: e.step)


def parse_latest(raw: bytes, key: str) -> LatestPointer:
    """Read a run's `latest` pointer.

    Raises:
        IntegrityError: it is not the JSON the uploader writes.
    """
    data = _document(raw, key, "latest pointer")
    try:
        return LatestPointer(
            step=int(data["step"]), prefix=str(data["prefix"]), digest=str(data["digest"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"{key}: the latest pointer lacks or mangles {exc}"
        raise IntegrityError(msg, key=key) from exc
