"""What a checkpoint snapshot costs the training thread: hard links against copies.

`CheckpointUploader` snapshots each checkpoint in `on_checkpoint` (see
loopbridge.callbacks._snapshot), on the training thread. Measured here, on this machine's
disk: a directory of many small files (the cost per file) and one large file (the cost per
GiB), each snapshotted with hard links (what the uploader does on the checkpoint's own
filesystem) and with copies (its fallback elsewhere), medians over repeats, with the time to
write the checkpoint in the first place as the baseline. No target: the numbers go in
docs/integrations.md.

Run: .venv/bin/python benchmarks/bench_snapshot.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loopbridge import ManifestRow
from loopbridge.callbacks._snapshot import release_snapshot, take_snapshot

MiB = 1 << 20
GiB = 1 << 30


def _row(path: Path) -> ManifestRow:
    return ManifestRow(step=1, path=path, size_bytes=0, digest=None, created_at=0.0)


def _time_snapshot(path: Path, *, link: bool, repeats: int) -> float:
    """Median seconds for one snapshot of `path` (each removed before the next)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        snap = take_snapshot(_row(path), link=link)
        times.append(time.perf_counter() - start)
        assert snap.path != path, "the snapshot was not taken"
        release_snapshot(snap.path)
    return statistics.median(times)


def _write(path: Path, size: int) -> float:
    """Write `size` random-ish bytes with an fsync; return the seconds it took."""
    block = os.urandom(MiB)
    start = time.perf_counter()
    with path.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(block)
        fh.write(block[: size % MiB])
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller files, fewer repeats")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args(argv)
    n_files, big, repeats = (100, 256 * MiB, 3) if args.quick else (1000, GiB, 5)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        shards = root / "shards"
        shards.mkdir()
        for i in range(n_files):
            (shards / f"shard-{i:05d}.bin").write_bytes(os.urandom(4096))
        write_big = _write(root / "big.bin", big)
        rows = []
        for label, path, count, size in (
            (f"{n_files} files of 4 KiB", shards, n_files, n_files * 4096),
            (f"1 file of {big // MiB} MiB", root / "big.bin", 1, big),
        ):
            for how, link in (("hard links", True), ("copies", False)):
                seconds = _time_snapshot(path, link=link, repeats=repeats)
                rows.append((label, how, seconds, seconds / count, seconds / size * GiB))
        print(
            f"snapshot cost on {root} (median of {repeats}); writing the big file: "
            f"{write_big:.3f} s ({big / MiB / write_big:.0f} MiB/s, with fsync)"
        )
        print(f"{'checkpoint':24} {'snapshot':11} {'total ms':>10} {'µs/file':>10} {'s/GiB':>8}")
        for label, how, seconds, per_file, per_gib in rows:
            print(
                f"{label:24} {how:11} {seconds * 1e3:10.2f} {per_file * 1e6:10.1f} {per_gib:8.3f}"
            )
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
