"""Shared by the restore tests: a destination (moto S3 or a directory) and runs published to it."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader

MiB = 1 << 20


@dataclass
class Dest:
    """Where checkpoints are published, and how a test reaches under the store's API."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    bucket: Any = None  # tests.fixtures.s3.S3Bucket for S3
    root: Path | None = None  # the directory of a local store

    @property
    def kind(self) -> str:
        return "s3" if self.bucket is not None else "local"

    def uploader(self, **kwargs: Any) -> CheckpointUploader:
        return CheckpointUploader(self.url, **self.options, **kwargs)

    def _prefix(self) -> str:
        return self.url.split("/", 3)[3] if self.bucket is not None else ""

    def keys(self, under: str = "") -> list[str]:
        """Store keys (relative to the destination) under `under`."""
        if self.bucket is not None:
            base = self._prefix() + "/"
            return [k[len(base) :] for k in self.bucket.list_keys(base + under)]
        assert self.root is not None
        found = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]
        return sorted(k for k in found if k.startswith(under))

    def write(self, key: str, data: bytes) -> None:
        if self.bucket is not None:
            name = f"{self._prefix()}/{key}"
            self.bucket.client.put_object(Bucket=self.bucket.name, Key=name, Body=data)
            return
        assert self.root is not None
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def read(self, key: str) -> bytes:
        if self.bucket is not None:
            return bytes(self.bucket.read(f"{self._prefix()}/{key}"))
        assert self.root is not None
        return (self.root / key).read_bytes()

    def delete(self, key: str) -> None:
        if self.bucket is not None:
            self.bucket.client.delete_object(Bucket=self.bucket.name, Key=f"{self._prefix()}/{key}")
            return
        assert self.root is not None
        (self.root / key).unlink()


def checkpoint_bytes(step: int, size: int = 3000) -> bytes:
    """Deterministic content for a step's checkpoint."""
    seed = hashlib.sha256(f"step {step}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def file_saver(size: int = 3000) -> Callable[[lb.LoopState, Path], None]:
    def save(state: lb.LoopState, path: Path) -> None:
        path.write_bytes(checkpoint_bytes(state.step, size))

    return save


def shard_saver(state: lb.LoopState, path: Path) -> None:
    """A directory of shards, one of them nested."""
    (path / "opt").mkdir(parents=True)
    (path / "model.bin").write_bytes(checkpoint_bytes(state.step, 5000))
    (path / "opt" / "state.bin").write_bytes(checkpoint_bytes(-state.step, 700))
    (path / "config.json").write_text(f'{{"step": {state.step}}}')


def publish(
    dest: Dest,
    out_dir: Path,
    *,
    run_name: str = "run-a",
    steps: int = 6,
    every: int = 2,
    save: Callable[[lb.LoopState, Path], None] | None = None,
) -> lb.LoopArtifacts:
    """Train a tiny loop that uploads a checkpoint every `every` steps; every upload published."""
    uploader = dest.uploader()
    loop = lb.TrainLoop(
        lambda state, batch: {"loss": 1.0},
        range(steps),
        max_steps=steps,
        out_dir=out_dir,
        save=save or file_saver(),
        checkpoint_every=every,
        callbacks=[uploader],
        run_name=run_name,
    )
    artifacts = loop.run()
    assert uploader.summary.uploaded == len(artifacts.manifest), uploader.summary
    return artifacts


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) by relative name."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def wipe(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        os.unlink(path)


WAIT = 60.0


class ScriptWorker:
    """A Python script in a subprocess, its stdout read line by line on a thread."""

    def __init__(self, script: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def wait_for(self, wanted: Callable[[str], bool], what: str) -> str:
        """Block until the script prints a line `wanted` accepts; fail if it never does."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"the worker did not print {what} within {WAIT}s")
            self.seen.append(line)
            if wanted(line):
                return line
            if line == "<eof>":
                self.proc.wait(WAIT)
                stderr = self.proc.stderr.read() if self.proc.stderr is not None else ""
                pytest.fail(f"the worker ended before printing {what}: {self.seen}\n{stderr}")

    def kill(self) -> None:
        """SIGKILL the script and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        assert self.proc.returncode == -signal.SIGKILL
        self.close()

    def finish(self) -> str:
        """Wait for the script to exit 0; return its stderr."""
        self.proc.wait(WAIT)
        stderr = self.proc.stderr.read() if self.proc.stderr is not None else ""
        self.close()
        assert self.proc.returncode == 0, f"{self.seen}\n{stderr}"
        return stderr

    def close(self) -> None:
        self._reader.join(WAIT)  # the pipe is at EOF; close it only once nobody reads it
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
