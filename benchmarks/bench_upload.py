"""What uploading checkpoints costs a training loop: loopbridge against the usual ways.

One run, the same CPU-bound pure-Python training loop (about 10 ms steps) saving four 64 MiB
checkpoints, four ways:

  none         no upload (the floor)
  loopbridge   CheckpointUploader to the local S3 server, in the background
  inline       boto3 `upload_file` called inside on_checkpoint (what many users do)
  thread pool  boto3 `upload_file` submitted to a ThreadPoolExecutor, awaited at train end

and, as the throughput baseline, boto3 `upload_file` of the same files with no training.
For each way it prints the loop's wall time (until every upload is done) and its ratio to
`none`, the p99 and max step time (the gap between step starts, minus the save and hash of
a checkpoint, which every way pays alike), the training thread's off-CPU share while it
trains (1 - thread CPU time / wall time: waiting on I/O or the GIL), and upload MiB/s.
Medians over repeats, the ways interleaved within each repeat.

moto's S3 server runs in a subprocess, so its request parsing does not compete for this
process's GIL, as a real S3 endpoint would not.

Run: .venv/bin/python benchmarks/bench_upload.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

import loopbridge as lb
from loopbridge._digest import digest_path
from loopbridge._types import LoopArtifacts, LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks import CheckpointUploader

MiB = 1 << 20
BUCKET = "bench-upload"

_MOTO = textwrap.dedent(
    """
    import logging, sys
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()
    server.stop()
    """
)


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a subprocess on a free loopback port; stops when stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout is not None else ""
        if not line.isdigit():
            raise RuntimeError("moto's S3 server did not start in the benchmark's subprocess")
        yield f"http://127.0.0.1:{line}"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the training loop ------------------------------------------------------------------------


def _burn(n: int) -> int:
    """Pure-Python work that holds the GIL, like a Python-heavy training step."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFF
    return x


def calibrate(target_s: float = 0.010) -> int:
    """The `_burn` size that takes about `target_s` on this machine right now."""
    n = 10_000
    while True:
        started = time.perf_counter()
        _burn(n)
        took = time.perf_counter() - started
        if took > 0.002:
            break
        n *= 2
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        _burn(n)
        samples.append(time.perf_counter() - started)
    return max(1, int(n * target_s / statistics.median(samples)))


class Timer(lb.Callback):
    """Records when steps start, when checkpoints were ready, and the training thread's CPU."""

    def __init__(self) -> None:
        self.step_starts: list[float] = []
        self.saves: list[tuple[float, float]] = []  # (save started, row ready: saved + hashed)
        self.save_started = 0.0
        self.train_wall = 0.0
        self.train_cpu = 0.0

    def on_train_start(self, state: LoopState) -> None:
        self.train_wall = -time.perf_counter()
        self.train_cpu = -time.thread_time()

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        self.saves.append((self.save_started, time.perf_counter()))

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        # Registered first, so this runs before a thread pool's wait at train end.
        self.train_wall += time.perf_counter()
        self.train_cpu += time.thread_time()

    def step_times(self) -> list[float]:
        """Gaps between step starts, minus the checkpoint save and hash inside each gap."""
        gaps = []
        for before, after in zip(self.step_starts, self.step_starts[1:], strict=False):
            saving = sum(ready - start for start, ready in self.saves if before <= start < after)
            gaps.append(after - before - saving)
        return gaps


class InlineBoto3(lb.Callback):
    """boto3 upload_file inside the hook: the loop waits for every upload."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.seconds = 0.0
        self.bytes = 0

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        started = time.perf_counter()
        self.client.upload_file(str(row.path), BUCKET, f"{self.prefix}/{row.path.name}")
        self.seconds += time.perf_counter() - started
        self.bytes += row.size_bytes


class PoolBoto3(lb.Callback):
    """boto3 upload_file on a one-thread pool (in order, like one run's uploads), awaited at end."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-upload")
        self.futures: list[Future[float]] = []
        self.bytes = 0

    def _upload(self, path: Path) -> float:
        started = time.perf_counter()
        self.client.upload_file(str(path), BUCKET, f"{self.prefix}/{path.name}")
        return time.perf_counter() - started

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        self.futures.append(self.pool.submit(self._upload, row.path))
        self.bytes += row.size_bytes

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self.seconds = sum(future.result() for future in self.futures)
        self.pool.shutdown()


@dataclass
class Result:
    """One way's numbers from one repeat."""

    wall: float
    p99_step: float
    max_step: float
    off_cpu: float
    mb_per_s: float | None
    upload_seconds: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_way(
    way: str,
    *,
    endpoint: str,
    work: int,
    steps: int,
    every: int,
    payload: bytes,
    tmp: Path,
    tag: str,
) -> Result:
    """Train once with `way` of uploading, and measure."""
    timer = Timer()
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
    )
    extra: list[lb.Callback] = []
    uploader: CheckpointUploader | None = None
    boto_way: InlineBoto3 | PoolBoto3 | None = None
    if way == "loopbridge":
        uploader = CheckpointUploader(f"s3://{BUCKET}/{tag}", endpoint_url=endpoint)
        extra.append(uploader)
    elif way == "inline":
        boto_way = InlineBoto3(client, tag)
        extra.append(boto_way)
    elif way == "thread pool":
        boto_way = PoolBoto3(client, tag)
        extra.append(boto_way)

    def step(state: LoopState, batch: TrainingBatch) -> None:
        timer.step_starts.append(time.perf_counter())
        _burn(work)

    def save(state: LoopState, path: Path) -> None:
        timer.save_started = time.perf_counter()
        with path.open("wb") as fh:
            fh.write(state.step.to_bytes(8, "little"))  # each checkpoint's bytes differ
            fh.write(payload[8:])

    # Every way starts warm: boto3's client exists already, so open the uploader's client
    # on the bridge loop too (botocore loads its service model once per client).
    bridge = lb.Bridge(name=f"bench-{tag}")
    if uploader is not None:
        bridge.call(uploader.store.head("warm-up"))
    loop = lb.TrainLoop(
        step,
        range(steps),
        max_steps=steps,
        out_dir=tmp / tag,
        save=save,
        checkpoint_every=every,
        callbacks=[timer, *extra],
        run_name=tag,
        bridge=bridge,
    )
    started = time.perf_counter()
    artifacts = loop.run()
    wall = time.perf_counter() - started
    bridge.close()
    mb_per_s: float | None = None
    if uploader is not None:
        summary = uploader.summary
        if summary.failed or summary.uploaded != len(artifacts.manifest):
            raise RuntimeError(f"loopbridge uploads failed: {summary}")
        mb_per_s = summary.bytes_uploaded / MiB / summary.seconds
    elif boto_way is not None:
        mb_per_s = boto_way.bytes / MiB / boto_way.seconds
    gaps = timer.step_times()
    for row in artifacts.manifest:
        row.path.unlink()
    _empty_bucket(client)
    client.close()
    return Result(
        wall=wall,
        p99_step=_percentile(gaps, 0.99),
        max_step=max(gaps),
        off_cpu=1 - timer.train_cpu / timer.train_wall,
        mb_per_s=mb_per_s,
    )


def boto3_alone(endpoint: str, payload: bytes, tmp: Path, count: int) -> float:
    """MiB/s of boto3 upload_file of the same checkpoints, one after another, no training."""
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
    )
    paths = []
    for i in range(count):
        path = tmp / f"alone-{i}"
        path.write_bytes(i.to_bytes(8, "little") + payload[8:])
        paths.append(path)
    started = time.perf_counter()
    for path in paths:
        client.upload_file(str(path), BUCKET, f"alone/{path.name}")
    seconds = time.perf_counter() - started
    for path in paths:
        path.unlink()
    _empty_bucket(client)
    client.close()
    return len(paths) * len(payload) / MiB / seconds


def loopbridge_alone(endpoint: str, payload: bytes, tmp: Path, count: int) -> float:
    """MiB/s of CheckpointUploader for the same, already saved checkpoints, no training."""
    rows = []
    for i in range(count):
        path = tmp / f"lb-alone-{i}"
        path.write_bytes(i.to_bytes(8, "little") + payload[8:])
        size, digest = digest_path(path)
        rows.append(ManifestRow(i + 1, path, size, digest, time.time(), run_name="alone"))
    state = LoopState(run_name="alone", run_id="alone", max_steps=count, out_dir=tmp)
    with lb.Bridge(name="bench-alone") as bridge:
        uploader = CheckpointUploader(f"s3://{BUCKET}/alone", endpoint_url=endpoint)
        callbacks = lb.CallbackList([uploader], bridge=bridge)
        bridge.call(uploader.store.head("warm-up"))
        started = time.perf_counter()
        for row in rows:
            callbacks.on_checkpoint(state, row)
        report = bridge.drain()
        seconds = time.perf_counter() - started
    if not report.ok:
        raise RuntimeError(f"loopbridge uploads failed: {report.summary()}")
    for row in rows:
        row.path.unlink()
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
    )
    _empty_bucket(client)
    client.close()
    return count * len(payload) / MiB / seconds


def _empty_bucket(client: Any) -> None:
    """Delete everything, so moto's memory stays flat across repeats."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 MiB checkpoints")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    size = (16 if args.quick else 64) * MiB
    checkpoints, every = 4, 50
    steps = every * checkpoints  # checkpoints at 50, 100, 150, and the final one at 200

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    payload = os.urandom(size)
    work = calibrate()
    ways = ["none", "loopbridge", "inline", "thread pool"]
    results: dict[str, list[Result]] = {way: [] for way in ways}
    alone: list[float] = []
    lb_alone: list[float] = []
    print(
        f"bench_upload: {steps} steps of ~10 ms pure Python ({work} iterations), "
        f"{checkpoints} checkpoints of {size // MiB} MiB, {repeats} repeat(s), "
        f"{os.cpu_count()} CPUs"
    )
    with moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        client = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
        )
        client.create_bucket(Bucket=BUCKET)
        client.close()
        for repeat in range(repeats):
            alone.append(boto3_alone(endpoint, payload, Path(tmp), checkpoints))
            lb_alone.append(loopbridge_alone(endpoint, payload, Path(tmp), checkpoints))
            for way in ways:
                tag = f"r{repeat}-{way.replace(' ', '-')}"
                results[way].append(
                    run_way(
                        way,
                        endpoint=endpoint,
                        work=work,
                        steps=steps,
                        every=every,
                        payload=payload,
                        tmp=Path(tmp),
                        tag=tag,
                    )
                )
                print(f"  repeat {repeat + 1}: {way} done", file=sys.stderr)
    report(results, statistics.median(alone), statistics.median(lb_alone), size)


def report(
    results: dict[str, list[Result]], alone_mb_s: float, lb_alone_mb_s: float, size: int
) -> None:
    """Print medians per way, ratios to `none`, and the issue's three targets."""
    med: Callable[[list[float]], float] = statistics.median
    base_wall = med([r.wall for r in results["none"]])
    print()
    print(
        f"{'way':<12} {'wall s':>7} {'x none':>7} {'p99 step ms':>12} {'max step ms':>12} "
        f"{'off-CPU %':>10} {'upload MiB/s':>13}"
    )
    rows: dict[str, dict[str, float]] = {}
    for way, runs in results.items():
        speeds = [r.mb_per_s for r in runs if r.mb_per_s is not None]
        row = {
            "wall": med([r.wall for r in runs]),
            "p99": med([r.p99_step for r in runs]) * 1e3,
            "max": med([r.max_step for r in runs]) * 1e3,
            "off": med([r.off_cpu for r in runs]) * 100,
            "mbs": med(speeds) if speeds else float("nan"),
        }
        rows[way] = row
        speed = f"{row['mbs']:13.1f}" if speeds else f"{'-':>13}"
        print(
            f"{way:<12} {row['wall']:7.2f} {row['wall'] / base_wall:7.2f} {row['p99']:12.1f} "
            f"{row['max']:12.1f} {row['off']:10.1f} {speed}"
        )
    for label, speed_alone in (("boto3 alone", alone_mb_s), ("lb alone", lb_alone_mb_s)):
        print(f"{label:<12} {'':>7} {'':>7} {'':>12} {'':>12} {'':>10} {speed_alone:13.1f}")
    lbr = rows["loopbridge"]
    upload_ms = size / MiB * 1e3 / lbr["mbs"] if lbr["mbs"] else float("nan")
    print()
    print(
        f"loop never waits:     loopbridge p99 step {lbr['p99']:.1f} ms vs one upload "
        f"~{upload_ms:.0f} ms ({lbr['p99'] / upload_ms:.3f}x)"
    )
    print(
        f"stall vs thread pool: off-CPU {lbr['off']:.1f}% vs {rows['thread pool']['off']:.1f}%, "
        f"p99 step {lbr['p99']:.1f} vs {rows['thread pool']['p99']:.1f} ms "
        f"(ratio {lbr['p99'] / rows['thread pool']['p99']:.2f}x)"
    )
    pool = rows["thread pool"]
    print(
        f"throughput:           with no training, loopbridge {lb_alone_mb_s:.1f} MiB/s vs boto3 "
        f"upload_file {alone_mb_s:.1f} MiB/s ({lb_alone_mb_s / alone_mb_s:.2f}x; target >= 0.8x)"
    )
    print(
        f"                      while training, loopbridge {lbr['mbs']:.1f} MiB/s vs thread pool "
        f"{pool['mbs']:.1f} MiB/s ({lbr['mbs'] / pool['mbs']:.2f}x)"
    )


if __name__ == "__main__":
    main()
