"""What restoring a checkpoint costs: `lb.restore` against boto3 `download_file`.

One 256 MiB checkpoint is published by `CheckpointUploader` to a local S3 server (moto, in its
own process, so its request handling does not compete for this process's GIL). Then, in the
same run and interleaved within each repeat:

  boto3        `download_file` of the checkpoint's object with boto3's defaults (s3transfer:
               8 MiB ranged GETs on 10 threads, no digest check), the usual way to fetch it
  boto3 tuned  the same, tuned to the range size and concurrency loopbridge picks for this
               object (16 MiB x 8 for 256 MiB): not a target; it shows how much of the
               difference is loopbridge making fewer, larger requests (moto reads the whole
               object for every ranged GET, so on moto the request count weighs more than
               it would on S3)
  get_file     `S3Store.get_file` of the same object with S3Store's defaults (ranges of at
               least 8 MiB, 8 at once, streamed to disk), hashing (BLAKE3) while streaming
  lb.restore   the whole restore: `latest`, manifest and marker, the file, every check

Throughput is MiB/s (medians over repeats; ratios to boto3). Peak memory is measured in a
separate pass (tracing slows allocation): Python's peak allocation during the download
(tracemalloc; response bodies and buffers are Python objects, so this is where an
implementation that held parts or the whole object would show). The resident set is not
used: after the first runs the heap is warm and its growth says nothing. Targets:
`lb.restore` at least 1.0x boto3's throughput, and its traced peak within part_size x
max_concurrency (the store streams each range to disk 1 MiB at a time, so it needs less).

Run: .venv/bin/python benchmarks/bench_restore.py [--repeats 5] [--size-mb 256] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader
from loopbridge.stores import S3Store
from loopbridge.stores._s3_download import plan_ranges

MiB = 1 << 20
BUCKET = "bench-restore"
RUN = "bench"
PART = 8 * MiB
CONCURRENCY = 8

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


def publish(endpoint: str, tmp: Path, size: int) -> str:
    """Publish one checkpoint of `size` random bytes; return its object key."""
    path = tmp / "step-00000001"
    path.write_bytes(os.urandom(size))
    row = lb.ManifestRow.for_checkpoint(path, step=1, is_final=True, run_name=RUN)
    state = lb.LoopState(run_name=RUN, run_id=RUN, max_steps=1, out_dir=tmp)
    with lb.Bridge(name="bench-publish") as bridge:
        uploader = CheckpointUploader(f"s3://{BUCKET}/ckpts", endpoint_url=endpoint)
        callbacks = lb.CallbackList([uploader], bridge=bridge)
        callbacks.on_checkpoint(state, row)
        report = bridge.drain()
    if not report.ok or uploader.summary.uploaded != 1:
        raise RuntimeError(f"publishing the checkpoint failed: {report.summary()}")
    path.unlink()
    return f"ckpts/{RUN}/step-00000001/step-00000001"


def _boto3(endpoint: str, config: TransferConfig | None = None) -> Callable[[Path], None]:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=CONCURRENCY * 2),
    )
    key = f"ckpts/{RUN}/step-00000001/step-00000001"
    client.head_object(Bucket=BUCKET, Key=key)  # warm: the client and its connection exist

    def run(out: Path) -> None:
        client.download_file(BUCKET, key, str(out / "boto3.bin"), Config=config)

    return run


def _get_file(endpoint: str) -> Callable[[Path], None]:
    key = f"{RUN}/step-00000001/step-00000001"

    def run(out: Path) -> None:
        async def go() -> None:
            async with S3Store(
                BUCKET, "ckpts", endpoint_url=endpoint, part_size=PART, max_concurrency=CONCURRENCY
            ) as store:
                await store.get_file(key, out / "get_file.bin")

        asyncio.run(go())

    return run


def _restore(endpoint: str) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        lb.restore(
            f"s3://{BUCKET}/ckpts",
            run=RUN,
            to=out / "restored",
            endpoint_url=endpoint,
            part_size=PART,
            max_concurrency=CONCURRENCY,
        )

    return run


def _clean(out: Path) -> None:
    for path in sorted(out.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


def measure(
    ways: dict[str, Callable[[Path], None]], out: Path, repeats: int, size: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """MiB/s per way per repeat (interleaved, order alternating), then a traced pass each."""
    speed: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
        for name in order:
            started = time.perf_counter()
            ways[name](out)
            speed[name].append(size / MiB / (time.perf_counter() - started))
            _clean(out)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr)
    traced: dict[str, float] = {}
    for name, way in ways.items():
        tracemalloc.start()
        way(out)
        traced[name] = tracemalloc.get_traced_memory()[1] / MiB
        tracemalloc.stop()
        _clean(out)
    return speed, traced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 64 MiB")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    size = (64 if args.quick else args.size_mb) * MiB
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    print(
        f"bench_restore: one {size // MiB} MiB checkpoint from moto S3 (own process), "
        f"{repeats} repeat(s), part {PART // MiB} MiB x {CONCURRENCY}, {os.cpu_count()} CPUs"
    )
    with moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        client = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
        )
        client.create_bucket(Bucket=BUCKET)
        client.close()
        publish(endpoint, Path(tmp), size)
        out = Path(tmp) / "out"
        out.mkdir()
        ranges = plan_ranges(size, PART, CONCURRENCY, PART)
        span = ranges[0][1] + 1
        print(f"loopbridge plans {len(ranges)} ranges of {span // MiB} MiB for this object")
        ways = {
            "boto3": _boto3(endpoint),
            "boto3 tuned": _boto3(
                endpoint, TransferConfig(multipart_chunksize=span, max_concurrency=CONCURRENCY)
            ),
            "get_file": _get_file(endpoint),
            "lb.restore": _restore(endpoint),
        }
        speed, traced = measure(ways, out, repeats, size)
    return report(speed, traced)


def report(speed: dict[str, list[float]], traced: dict[str, float]) -> int:
    base = statistics.median(speed["boto3"])
    print(f"\n{'way':<12} {'MiB/s':>8} {'x boto3':>8} {'runs MiB/s':<30} {'peak traced':>12}")
    for name, runs in speed.items():
        med = statistics.median(runs)
        runs_text = " ".join(f"{r:.0f}" for r in runs)
        print(f"{name:<12} {med:8.1f} {med / base:8.2f} {runs_text:<30} {traced[name]:8.1f} MiB")
    ratio = statistics.median(speed["lb.restore"]) / base
    bound = PART * CONCURRENCY / MiB
    checks = [
        (f"lb.restore throughput >= 1.0x boto3 download_file ({ratio:.2f}x)", ratio >= 1.0),
        (
            f"lb.restore traced peak {traced['lb.restore']:.1f} MiB <= part x concurrency "
            f"= {bound:.0f} MiB",
            traced["lb.restore"] <= bound,
        ),
    ]
    failed = 0
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
