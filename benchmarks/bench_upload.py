"""What uploading checkpoints costs a training loop: loopbridge against the usual ways.

The same training loop (200 steps, a checkpoint every 50: four 64 MiB checkpoints) runs once
per way of uploading, for each step kind: a pure-Python step (~10 ms, holds the GIL) and,
when torch is installed, a real torch MLP step on one CPU thread.

  none               no upload (the floor)
  loopbridge         CheckpointUploader to the local S3 server (default: a worker process)
  loopbridge thread  the same with upload_in="thread" (the bridge's threads, this process)
  inline             boto3 upload_file called inside on_checkpoint
  thread pool        boto3 upload_file in a ThreadPoolExecutor, awaited at train end
  process pool       boto3 upload_file in a ProcessPoolExecutor (as Composer does)

Step times include everything the library does on the training thread (only the user's own
save() is taken out, which every way pays alike). Per way: wall time, p99 and max step; the
training thread's off-CPU share while it trains (1 - its CPU time / wall time, from the
first step to train end, every checkpoint's hooks included) and its blocked share (the same
minus the time it was runnable but waiting for a core, from Linux schedstat: the part other
tenants' load does not explain; the GIL and I/O); upload MiB/s; client CPU seconds per GiB
uploaded (this process's CPU minus the training thread's, plus its worker processes'; for
`inline` the upload's CPU is on the training thread instead); the training thread's wall and
CPU time added per checkpoint (from the end of save() to the next step, or to train end for
the final one; the mean over the run's four); its wall time at train start, before the first
step (the other callbacks' `on_train_start`: for loopbridge, its pre-flight check that the
store can be written, a put and a delete, once per run); and the time stolen from it.

The train-start time is printed on its own rather than folded into the shares: a one-off
cost which, in a run of seconds, would stand for far more than it costs a run of hours.

Stolen time is printed too, and stays in the shares: wall time lost in a step in which the
training thread never left its core (no context switch at all, so neither the GIL, nor
I/O, nor another thread of the guest), which /proc/stat shows as steal on CPU 0: the
hypervisor running something else on this vCPU. It comes as single stalls of 9 to 30 ms,
in the middle of an upload, not at a checkpoint's hooks. It is not spread evenly: here the
torch step's loopbridge row has one of about 9 ms in most runs, even with the ways' order
rotated, and the other rows rarely. Yet with uploads made from a separate process beside the
same torch steps, loopbridge's store and boto3 drew as much steal as each other (see
docs/performance.md). Until that is understood it is counted against loopbridge.

With no training, boto3 upload_file alone and loopbridge alone give the throughput and
client CPU per GiB baselines: after one untimed pair (the server's first uploads are
slower), `ALONE_PAIRS` back-to-back pairs per repeat, in alternating order, each pair giving
one ratio; the targets take the median ratio, and the spread is printed. Medians over
repeats, ways interleaved, their order rotated by one each repeat: a way does not always run
at the same point of the sequence (right after the same other way, the same time after the
"alone" uploads), so what that point brings falls on every way in turn.

The S3 server (moto) runs in its own process, pinned to the other core and at nice 19, with
its objects kept in memory and its freed memory kept by its allocator (left to itself, moto
writes each part over 5 MiB to a temporary file, and glibc hands each request's buffers back
to the kernel: seconds of the server's system time per GiB, in page faults, that no client
caused and that varied from run to run); the training thread is pinned to its own core while
it trains, and each client's background threads and worker processes to the server's core:
identically for every way (the "alone" runs are not pinned). Only the loopbridge ways
compute checkpoint digests (in the upload's own read pass); `none` and the boto3 ways run
with `hash_checkpoints=False`, since they need none, so no way pays for a cost that only
loopbridge imposes. Before training, each way's client makes one upload of a checkpoint's
size, untimed: a long job's state after its first checkpoint (models loaded, connections
open, loopbridge's part buffers allocated). A cold worker's first checkpoint faults its part
buffers in; on this VM, stalls of 9-30 ms of hypervisor steal on the training core came most
often during that upload (docs/performance.md).

Run: .venv/bin/python benchmarks/bench_upload.py [--repeats 5] [--quick]
Exit status 1 when a target fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._upload_ways import (
    BUCKET,
    InlineBoto3,
    MiB,
    PoolBoto3,
    Timer,
    empty_bucket,
    moto_server,
    pin_to_client_core,
    proc_cpu,
    python_step,
    s3_client,
    torch_step,
)

import loopbridge as lb
from loopbridge._types import LoopState, ManifestRow, TrainingBatch
from loopbridge.callbacks import CheckpointUploader
from loopbridge.stores._process import ProcessStore

GiB = 1 << 30
ALONE_PAIRS = 3  # no-training pairs per repeat; the throughput and CPU targets use these
WAYS = ["none", "loopbridge", "loopbridge thread", "inline", "thread pool", "process pool"]


@dataclass
class Result:
    """One way's numbers from one repeat."""

    wall: float
    p99: float
    max_step: float
    off_cpu: float
    blocked: float
    mb_s: float
    cpu_gib: float
    added_ms: float
    added_cpu_ms: float
    start_ms: float
    stolen_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _worker_pids(uploader: CheckpointUploader | None, boto: object) -> list[int]:
    if uploader is not None and isinstance(uploader.store, ProcessStore):
        worker = uploader.store._worker
        return [worker.proc.pid] if worker is not None else []
    pids = getattr(boto, "worker_pids", None)
    return pids() if pids is not None else []


async def _pinned() -> None:
    pin_to_client_core()


async def _warm_up(uploader: CheckpointUploader, path: Path) -> None:
    """Every request kind the uploader makes, once: botocore loads models on first use."""
    store = uploader.store
    await store.put_file("warm/file", path)
    await store.put_bytes("warm/small", b"{}")
    await store.get_bytes("warm/small")
    await store.list("warm/")
    await store.delete(["warm/file", "warm/small"])


def run_way(
    way: str, step_fn: Callable[[], None], *, endpoint: str, payload: bytes, tmp: Path, tag: str
) -> Result:
    """Train once with `way` of uploading, and measure."""
    steps, every = 200, 50
    timer = Timer()
    # Every way's client is warmed with one checkpoint-sized upload before training, as a
    # long job's is after its first checkpoint: botocore loads each operation's model on first
    # use, once per process, and loopbridge's store allocates the part buffers it then keeps.
    warm = tmp / f"{tag}-warm"
    warm.write_bytes(b"w" * len(payload))
    uploader: CheckpointUploader | None = None
    boto: InlineBoto3 | PoolBoto3 | None = None
    client = s3_client(endpoint)
    bridge = lb.Bridge(name=f"bench-{tag}")
    # The bridge thread, and the threads and worker it starts, on the clients' core.
    bridge.call(_pinned())
    if way.startswith("loopbridge"):
        mode = "thread" if way.endswith("thread") else "process"
        uploader = CheckpointUploader(
            f"s3://{BUCKET}/{tag}",
            endpoint_url=endpoint,
            upload_in=mode,  # type: ignore[arg-type]
        )
        # Started before training, as a long job's would be: the worker, and both clients.
        bridge.call(_warm_up(uploader, warm))
    elif way == "inline":
        boto = InlineBoto3(client, tag)
        client.upload_file(str(warm), BUCKET, f"{tag}/warm")
    elif way in ("thread pool", "process pool"):
        boto = PoolBoto3(endpoint, tag, processes=way == "process pool")
        boto.warm(warm)

    def step(state: LoopState, batch: TrainingBatch) -> None:
        timer.step_began()
        step_fn()

    def save(state: LoopState, path: Path) -> None:
        began = time.perf_counter()
        with path.open("wb") as fh:
            fh.write(state.step.to_bytes(8, "little"))  # each checkpoint's bytes differ
            fh.write(payload[8:])
        timer.saves.append((began, time.perf_counter()))
        timer.save_ended_cpu = time.thread_time()

    callbacks: list[lb.Callback] = [timer, *(c for c in (uploader, boto) if c is not None)]
    loop = lb.TrainLoop(
        step,
        range(steps),
        max_steps=steps,
        out_dir=tmp / tag,
        save=save,
        checkpoint_every=every,
        callbacks=callbacks,
        run_name=tag,
        bridge=bridge,
        # Only loopbridge needs a digest (its uploader hashes in the pass that reads for upload):
        # the other ways, and the no-upload floor, do not pay for one.
        hash_checkpoints=uploader is not None,
    )
    pids = _worker_pids(uploader, boto)
    workers_before = sum(proc_cpu(pid) for pid in pids)
    cpu_before, thread_before = time.process_time(), time.thread_time()
    started = time.perf_counter()
    artifacts = loop.run()
    wall = time.perf_counter() - started
    thread_cpu = time.thread_time() - thread_before
    workers = sum(proc_cpu(pid) for pid in pids) - workers_before
    client_cpu = time.process_time() - cpu_before - thread_cpu + workers
    bridge.close()
    uploaded = len(artifacts.manifest) * len(payload)
    mb_s = float("nan")
    if uploader is not None:
        summary = uploader.summary
        if summary.failed or summary.uploaded != len(artifacts.manifest):
            raise RuntimeError(f"loopbridge uploads failed: {summary}")
        mb_s = summary.bytes_uploaded / MiB / summary.seconds
    elif boto is not None:
        mb_s = boto.bytes / MiB / boto.seconds
    if isinstance(boto, PoolBoto3):
        boto.close()
    gaps = timer.step_times()
    for row in artifacts.manifest:
        row.path.unlink()
    empty_bucket(client)
    client.close()
    return Result(
        wall=wall,
        p99=_percentile(gaps, 0.99) * 1e3,
        max_step=max(gaps) * 1e3,
        off_cpu=(1 - timer.train_cpu / timer.train_wall) * 100,
        blocked=(1 - (timer.train_cpu + timer.train_queued) / timer.train_wall) * 100,
        mb_s=mb_s,
        cpu_gib=client_cpu / (uploaded / GiB) if way != "none" else float("nan"),
        # The mean over the run's checkpoints, the first's one-off costs and the final one's
        # included.
        added_ms=statistics.fmean(timer.added_wall) * 1e3,
        added_cpu_ms=statistics.fmean(timer.added_cpu) * 1e3,
        start_ms=timer.start_wall * 1e3,
        stolen_ms=timer.stolen * 1e3,
    )


def _files(tmp: Path, payload: bytes, count: int, name: str) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp / f"{name}-{i}"
        path.write_bytes(i.to_bytes(8, "little") + payload[8:])
        paths.append(path)
    return paths


def boto3_alone(endpoint: str, payload: bytes, tmp: Path, count: int) -> tuple[float, float]:
    """(MiB/s, client CPU s per GiB) of boto3 upload_file with its defaults, no training."""
    client = s3_client(endpoint)
    client.upload_file(str(_files(tmp, b"w" * len(payload), 1, "alone-warm")[0]), BUCKET, "warm")
    paths = _files(tmp, payload, count, "alone")
    cpu, started = time.process_time(), time.perf_counter()
    for path in paths:
        client.upload_file(str(path), BUCKET, f"alone/{path.name}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    for path in paths:
        path.unlink()
    empty_bucket(client)
    client.close()
    size = count * len(payload)
    return size / MiB / seconds, cpu / (size / GiB)


def loopbridge_alone(endpoint: str, payload: bytes, tmp: Path, count: int) -> tuple[float, float]:
    """(MiB/s, client CPU s per GiB) of CheckpointUploader (defaults), no training."""
    state = LoopState(run_name="alone", run_id="alone", max_steps=count, out_dir=tmp)
    with lb.Bridge(name="bench-alone") as bridge:
        uploader = CheckpointUploader(f"s3://{BUCKET}/alone", endpoint_url=endpoint)
        callbacks = lb.CallbackList([uploader], bridge=bridge)
        bridge.call(_warm_up(uploader, _files(tmp, b"w" * len(payload), 1, "lb-warm")[0]))
        pids = _worker_pids(uploader, None)
        paths = _files(tmp, payload, count, "lb-alone")
        workers = sum(proc_cpu(pid) for pid in pids)
        cpu, started = time.process_time(), time.perf_counter()
        for step, path in enumerate(paths, 1):
            row = ManifestRow.for_checkpoint(path, step=step, run_name="alone")
            callbacks.on_checkpoint(state, row)
        report = bridge.drain()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        cpu += sum(proc_cpu(pid) for pid in pids) - workers
    if not report.ok:
        raise RuntimeError(f"loopbridge uploads failed: {report.summary()}")
    for path in paths:
        path.unlink()
    client = s3_client(endpoint)
    empty_bucket(client)
    client.close()
    size = count * len(payload)
    return size / MiB / seconds, cpu / (size / GiB)


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 MiB checkpoints")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    size = (16 if args.quick else 64) * MiB
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    kinds: dict[str, Callable[[], None]] = {"python": python_step()}
    torch_fn = torch_step()
    if torch_fn is not None:
        kinds["torch"] = torch_fn
    payload = os.urandom(size)
    load_before = os.getloadavg()
    print(f"bench_upload: {_machine()}; load average {load_before[0]:.2f} at start")
    print(
        f"  200 steps, 4 checkpoints of {size // MiB} MiB, {repeats} repeat(s), step kinds: "
        + ", ".join(kinds)
        + ("" if torch_fn is not None else " (torch not installed: no torch step kind)")
    )
    results = {(k, w): [] for k in kinds for w in WAYS}  # type: dict[tuple[str, str], list[Result]]
    alone: dict[str, list[tuple[float, float]]] = {"boto3": [], "loopbridge": []}
    with moto_server() as (endpoint, how), tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        print(f"  {how}")
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.close()
        boto3_alone(endpoint, payload, Path(tmp), 4)  # untimed: warms the server up
        loopbridge_alone(endpoint, payload, Path(tmp), 4)
        for repeat in range(repeats):
            for pair in range(ALONE_PAIRS):
                ways = [("boto3", boto3_alone), ("loopbridge", loopbridge_alone)]
                for name, alone_way in ways if pair % 2 == 0 else ways[::-1]:
                    alone[name].append(alone_way(endpoint, payload, Path(tmp), 4))
            order = WAYS[repeat % len(WAYS) :] + WAYS[: repeat % len(WAYS)]
            for kind, step_fn in kinds.items():
                for way in order:
                    tag = f"r{repeat}-{kind}-{way.replace(' ', '-')}"
                    one = run_way(
                        way, step_fn, endpoint=endpoint, payload=payload, tmp=Path(tmp), tag=tag
                    )
                    results[(kind, way)].append(one)
                    print(f"  repeat {repeat + 1}: {kind} / {way} done", file=sys.stderr)
    return report(results, alone, kinds, os.getloadavg())


def report(
    results: dict[tuple[str, str], list[Result]],
    alone: dict[str, list[tuple[float, float]]],
    kinds: dict[str, Callable[[], None]],
    load_after: tuple[float, float, float],
) -> int:
    """Print medians per way and kind, the targets with PASS/FAIL; return the exit status."""
    med = statistics.median
    rows: dict[tuple[str, str], dict[str, float]] = {}
    header = (
        f"{'kind':<7} {'way':<18} {'wall s':>7} {'p99 ms':>7} {'max ms':>7} {'off-CPU%':>8} "
        f"{'blocked%':>8} "
        f"{'MiB/s':>7} {'CPU s/GiB':>9} {'ckpt +ms':>8} {'ckpt +CPU ms':>12} {'start ms':>8} "
        f"{'stolen ms':>9}"
    )
    print()
    print(header)
    for (kind, way), runs in results.items():
        row = {f: med([getattr(r, f) for r in runs]) for f in Result.__dataclass_fields__}
        rows[(kind, way)] = row
        print(
            f"{kind:<7} {way:<18} {row['wall']:7.2f} {row['p99']:7.1f} {row['max_step']:7.1f} "
            f"{row['off_cpu']:8.1f} {row['blocked']:8.1f} {row['mb_s']:7.1f} {row['cpu_gib']:9.2f} "
            f"{row['added_ms']:8.2f} {row['added_cpu_ms']:12.2f} {row['start_ms']:8.1f} "
            f"{row['stolen_ms']:9.1f}"
        )
    pairs = list(zip(alone["boto3"], alone["loopbridge"], strict=True))
    boto_mbs, boto_cpu = med([a[0] for a in alone["boto3"]]), med([a[1] for a in alone["boto3"]])
    lb_mbs = med([a[0] for a in alone["loopbridge"]])
    lb_cpu = med([a[1] for a in alone["loopbridge"]])
    mbs_ratios = sorted(lb[0] / boto[0] for boto, lb in pairs)
    cpu_ratios = sorted(lb[1] / boto[1] for boto, lb in pairs)
    print(f"{'alone':<7} {'boto3 upload_file':<18} {'':>49} {boto_mbs:7.1f} {boto_cpu:9.2f}")
    print(f"{'alone':<7} {'loopbridge':<18} {'':>49} {lb_mbs:7.1f} {lb_cpu:9.2f}")
    print(
        f"alone, {len(pairs)} pairs, loopbridge / boto3 per pair: throughput "
        f"{mbs_ratios[0]:.2f}-{mbs_ratios[-1]:.2f}, CPU per GiB {cpu_ratios[0]:.2f}-"
        f"{cpu_ratios[-1]:.2f}"
    )
    print(f"load average at the end: {load_after[0]:.2f}")
    checks: list[tuple[str, float, str, float]] = [
        ("client CPU per GiB vs boto3 upload_file (no training)", med(cpu_ratios), "<=", 1.0),
        ("throughput vs boto3 upload_file (no training)", med(mbs_ratios), ">=", 1.0),
    ]
    for kind in kinds:
        lbr, pool = rows[(kind, "loopbridge")], rows[(kind, "thread pool")]
        none = rows[(kind, "none")]
        checks += [
            (f"{kind}: off-CPU share vs thread pool", lbr["off_cpu"] / pool["off_cpu"], "<=", 0.2),
            (f"{kind}: p99 step vs no upload", lbr["p99"] / none["p99"], "<=", 1.3),
            (f"{kind}: training-thread ms added per checkpoint", lbr["added_ms"], "<=", 1.0),
        ]
    print()
    failed = 0
    for label, value, op, bound in checks:
        ok = value <= bound if op == "<=" else value >= bound
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value:.3f} (target {op} {bound})")
    for kind in kinds:
        lbr, pool = rows[(kind, "loopbridge")], rows[(kind, "thread pool")]
        none = rows[(kind, "none")]
        print(
            f"INFO  {kind}: train start, once per run before the first step: loopbridge "
            f"{lbr['start_ms']:.1f} ms (its pre-flight put and delete), no upload "
            f"{none['start_ms']:.1f} ms, thread pool {pool['start_ms']:.1f} ms"
        )
        floor = none["off_cpu"]
        added, pool_added = lbr["off_cpu"] - floor, pool["off_cpu"] - floor
        print(
            f"INFO  {kind}: off-CPU share added over no upload's {floor:.1f}% (which has no "
            f"upload to blame): {added:+.1f} points vs thread pool {pool_added:+.1f}"
        )
        ratio = lbr["blocked"] / pool["blocked"] if pool["blocked"] > 0 else float("nan")
        print(
            f"INFO  {kind}: blocked share (off-CPU minus run-queue wait: the GIL, I/O) vs "
            f"thread pool: {lbr['blocked']:.1f}% vs {pool['blocked']:.1f}% ({ratio:.3f}x)"
        )
        anchor = rows[(kind, "process pool")]["off_cpu"] / pool["off_cpu"]
        spreads = ", ".join(
            f"{way} {_spread(results[(kind, way)], 'off_cpu')}%"
            for way in ("loopbridge", "process pool", "thread pool")
        )
        print(
            f"INFO  {kind}: off-CPU share over the repeats: {spreads}; the process-pool "
            f"anchor's median is {anchor:.3f}x the thread pool's"
        )
        print(
            f"INFO  {kind}: training-thread ms per checkpoint over the repeats: loopbridge "
            f"{_spread(results[(kind, 'loopbridge')], 'added_ms')}"
        )
    return 1 if failed else 0


def _spread(runs: list[Result], field: str) -> str:
    """`low-high` of one column over a way's repeats."""
    values = [getattr(run, field) for run in runs]
    return f"{min(values):.2f}-{max(values):.2f}"


if __name__ == "__main__":
    sys.exit(main())
