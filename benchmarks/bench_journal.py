"""What the upload journal costs the training thread per checkpoint.

Three cases take turns in every repeat, each a batch of calls timed one by one (wall clock,
since a journal commit is a write system call, not only CPU):
  - `CheckpointUploader.on_checkpoint` with `journal=False` (the baseline: spawn only),
  - the same with `journal=True` (record the intent durably, then spawn),
  - `UploadJournal.record_intent` alone.
The uploader writes to a store that does nothing, so the background work stays small; the
bridge is drained between batches, untimed. The journal's cost on the loop thread is the
difference of the two `on_checkpoint` medians; the target is under 100 µs.

Run: .venv/bin/python benchmarks/bench_journal.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import builtins
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from loopbridge import Bridge, CallbackList
from loopbridge._types import LoopState, ManifestRow
from loopbridge.callbacks import CheckpointUploader
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.stores import ObjectInfo, PutResult

TARGET_US = 100.0
CHECKPOINT_BYTES = 100


class NullStore:
    """An ObjectStore that stores nothing, so only the loop-thread side is measured."""

    url = "null://bench"
    retries = 0

    async def put_file(
        self, key: str, path: Path, *, expected_sha256: str | None = None
    ) -> PutResult:
        return PutResult(key=key, size=CHECKPOINT_BYTES, sha256="", etag=None)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        return PutResult(key=key, size=len(data), sha256="", etag=None)

    async def get_bytes(self, key: str) -> bytes | None:
        return None

    async def head(self, key: str) -> ObjectInfo | None:
        return None

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return []

    async def delete(self, keys: Iterable[str]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _time_calls(call: Callable[[int], None], steps: range) -> list[float]:
    """Wall-clock microseconds of each call, one sample per step."""
    samples = []
    clock = time.perf_counter_ns
    for step in steps:
        started = clock()
        call(step)
        samples.append((clock() - started) / 1e3)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--dir", type=Path, help="where the journals go (default: system temp)")
    args = parser.parse_args(argv)
    repeats, batch = (6, 30) if args.quick else (25, 60)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, Bridge(name="bench-journal") as bridge:
        root = Path(tmp)
        checkpoint = root / "step.bin"
        checkpoint.write_bytes(b"x" * CHECKPOINT_BYTES)

        def row(step: int) -> ManifestRow:
            return ManifestRow(
                step, checkpoint, CHECKPOINT_BYTES, None, time.time(), run_name="bench"
            )

        uploaders: dict[str, tuple[CheckpointUploader, LoopState]] = {}
        for name, journal in (("without", False), ("with", True)):
            out_dir = root / name
            out_dir.mkdir()
            uploader = CheckpointUploader("", store=NullStore(), journal=journal)
            CallbackList([uploader], bridge=bridge)
            uploaders[name] = (uploader, LoopState("bench", name, None, out_dir))
        alone = UploadJournal(root / JOURNAL_FILE)

        def on_checkpoint(name: str) -> Callable[[int], None]:
            uploader, state = uploaders[name]
            return lambda step: uploader.on_checkpoint(state, row(step))

        def record(step: int) -> None:
            alone.record_intent("null://bench", "bench", row(step))

        cases: dict[str, Callable[[int], None]] = {
            "on_checkpoint, journal=False": on_checkpoint("without"),
            "on_checkpoint, journal=True": on_checkpoint("with"),
            "record_intent alone": record,
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        medians: dict[str, list[float]] = {name: [] for name in cases}
        step = 0
        # One untimed warm-up batch per case opens the journals and the bridge's paths.
        for rep in range(repeats + 1):
            for name, call in cases.items():
                took = _time_calls(call, range(step, step + batch))
                step += batch
                bridge.drain(60).raise_for_failures()
                if rep:
                    samples[name].extend(took)
                    medians[name].append(statistics.median(took))
        alone.close()
        fs = _filesystem(root)

    base = statistics.median(samples["on_checkpoint, journal=False"])
    print(f"journal cost on the loop thread: {repeats} repeats x {batch} calls per case")
    print(f"journals in {fs}; wall-clock µs per call, medians over all calls\n")
    print(f"{'case':32} {'median':>9} {'p90':>9} {'spread':>9} {'ratio':>7}")
    for name in cases:
        values = samples[name]
        med = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        spread = max(medians[name]) - min(medians[name])
        print(f"{name:32} {med:9.1f} {p90:9.1f} {spread:9.1f} {med / base:6.2f}x")
    cost = statistics.median(samples["on_checkpoint, journal=True"]) - base
    verdict = "PASS" if cost < TARGET_US else "FAIL"
    print(
        f"\njournal cost per checkpoint (with - without): {cost:.1f} µs; "
        f"target < {TARGET_US:.0f} µs: {verdict}"
    )
    print("(spread: max - min of the per-repeat medians)")
    return 0 if verdict == "PASS" else 1


def _filesystem(path: Path) -> str:
    """The directory and the type of the filesystem it is on, where /proc/mounts says."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return str(path)
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return f"{path} ({kind})"


if __name__ == "__main__":
    sys.exit(main())
