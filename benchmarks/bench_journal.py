"""What the upload journal costs the training thread per checkpoint.

Three cases take turns in every repeat, each a batch of calls timed one by one (wall clock,
since a journal commit is a write system call, not only CPU), twice: spaced (the bridge idle
before each call, as when checkpoints are seconds apart) and back to back (a stress case):
  - `CheckpointUploader.on_checkpoint` with `journal=False` (the baseline: spawn only),
  - the same with `journal=True` (record the intent durably, then spawn),
  - `UploadJournal.record_intent` alone.
The uploader writes to a store that does nothing, so the background work stays small; the
bridge is drained between batches, untimed. The journal's cost on the loop thread is the
difference of the two `on_checkpoint` medians; the target is under 100 µs. Creating a run's
journal, once in `on_train_start` before the first step, is timed on its own.

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
from loopbridge.stores import GetResult, ObjectInfo, PutResult

TARGET_US = 100.0
CHECKPOINT_BYTES = 100
SPACING_S = 0.002


class NullStore:
    """An ObjectStore that stores nothing, so only the loop-thread side is measured."""

    url = "null://bench"
    retries = 0

    async def put_file(
        self, key: str, path: Path, *, expected_digest: str | None = None
    ) -> PutResult:
        return PutResult(key=key, size=CHECKPOINT_BYTES, digest="blake3:" + "0" * 64, etag=None)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        return PutResult(key=key, size=len(data), digest="blake3:" + "0" * 64, etag=None)

    async def get_bytes(self, key: str) -> bytes | None:
        return None

    async def get_file(
        self,
        key: str,
        path: Path,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        raise NotImplementedError("the benchmark never reads")

    async def head(self, key: str) -> ObjectInfo | None:
        return None

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return []

    async def delete(self, keys: Iterable[str]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _time_calls(
    call: Callable[[int], None], steps: range, settle: Callable[[], object] | None
) -> list[float]:
    """Wall-clock microseconds of each call, one sample per step; `settle` runs untimed after."""
    samples = []
    clock = time.perf_counter_ns
    for step in steps:
        started = clock()
        call(step)
        samples.append((clock() - started) / 1e3)
        if settle is not None:
            settle()
    return samples


Cases = dict[str, Callable[[int], None]]


def _measure(
    cases: Cases, bridge: Bridge, *, repeats: int, batch: int, spaced: bool, first_step: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """All samples and the per-repeat medians of each case, the cases taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    medians: dict[str, list[float]] = {name: [] for name in cases}

    def settle() -> None:
        # The background work finishes, then the thread idles a moment, as between checkpoints.
        bridge.drain(60).raise_for_failures()
        time.sleep(SPACING_S)

    step = first_step
    # One untimed warm-up batch per case first.
    for rep in range(repeats + 1):
        for name, call in cases.items():
            took = _time_calls(call, range(step, step + batch), settle if spaced else None)
            step += batch
            bridge.drain(60).raise_for_failures()
            if rep:
                samples[name].extend(took)
                medians[name].append(statistics.median(took))
    return samples, medians


def _report(title: str, samples: dict[str, list[float]], medians: dict[str, list[float]]) -> bool:
    """Print one table; return whether the journal's cost met the target."""
    base = statistics.median(samples["on_checkpoint, journal=False"])
    print(f"\n{title}")
    print(f"{'case':32} {'median':>9} {'p90':>9} {'p99':>9} {'spread':>9} {'ratio':>7}")
    for name, values in samples.items():
        med = statistics.median(values)
        cuts = statistics.quantiles(values, n=100)
        spread = max(medians[name]) - min(medians[name])
        print(
            f"{name:32} {med:9.1f} {cuts[89]:9.1f} {cuts[98]:9.1f} {spread:9.1f} {med / base:6.2f}x"
        )
    cost = statistics.median(samples["on_checkpoint, journal=True"]) - base
    ok = cost < TARGET_US
    print(
        f"journal cost per checkpoint (with - without): {cost:.1f} µs; "
        f"target < {TARGET_US:.0f} µs: {'PASS' if ok else 'FAIL'}"
    )
    return ok


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

        cases: Cases = {
            "on_checkpoint, journal=False": on_checkpoint("without"),
            "on_checkpoint, journal=True": on_checkpoint("with"),
            "record_intent alone": record,
        }
        spaced = _measure(cases, bridge, repeats=repeats, batch=batch, spaced=True, first_step=0)
        burst = _measure(
            cases, bridge, repeats=repeats, batch=batch, spaced=False, first_step=1_000_000
        )
        alone.close()
        fs = _filesystem(root)
        opens = _time_opens(root / "opens", repeats)

    print(f"journal cost on the loop thread: {repeats} repeats x {batch} calls per case")
    print(f"journals in {fs}; wall-clock µs per call, over all calls")
    print("(spread: max - min of the per-repeat medians; ratio: median to journal=False)")
    ok = _report(
        "spaced checkpoints (the bridge idle before each, as when they are seconds apart):",
        *spaced,
    )
    ok &= _report("back to back (each call's background marks contend with the next call):", *burst)
    print(
        "\nThe tail back to back: a journal commit releases the GIL inside SQLite, and a bridge\n"
        "thread busy with Python work may then hold it for up to the switch interval (5 ms)."
    )
    print(
        f"once per run, in on_train_start (before the first step): creating its journal, "
        f"median {statistics.median(opens) / 1e3:.2f} ms over {len(opens)} creations"
    )
    return 0 if ok else 1


def _time_opens(root: Path, count: int) -> list[float]:
    """Wall-clock microseconds to create and open a new journal, `count` times."""
    took = []
    for index in range(count):
        path = root / str(index) / JOURNAL_FILE
        started = time.perf_counter_ns()
        journal = UploadJournal(path)
        took.append((time.perf_counter_ns() - started) / 1e3)
        journal.close()
    return took


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
