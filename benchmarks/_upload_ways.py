"""bench_upload.py's parts: the S3 server, the step kinds, the ways of uploading, CPU clocks."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

import loopbridge as lb
from loopbridge._types import LoopArtifacts, LoopState, ManifestRow

MiB = 1 << 20
BUCKET = "bench-upload"
SERVER_CPU = 1  # the core the S3 server is pinned to; the training thread gets the other one
TRAIN_CPU = 0

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


# The server's own memory churn is noise that every way would share: moto spills any object
# over 5 MiB (each part) to a temporary file on disk, and glibc hands the freed buffers of
# each request back to the kernel, so the next request faults fresh pages in. Measured with
# four 64 MiB uploads, that was 3-5.5 s of the server's system time per GiB and about 1.4
# million page faults per GiB; with objects kept in memory and freed memory kept by the
# allocator it is 0.3-0.8 s and a few thousand, and the server's throughput varies far less.
_SERVER_ENV = {
    "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(1 << 30),  # objects up to 1 GiB stay in memory
    "MALLOC_ARENA_MAX": "1",  # one heap for all the server's threads ...
    "MALLOC_MMAP_MAX_": "0",  # ... large buffers from it too, not from fresh mappings ...
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # ... and freed memory stays with the process
    "MALLOC_TOP_PAD_": str(256 << 20),  # grown 256 MiB at a time
}


def _pin_and_lower() -> None:
    """In the server's process before it starts: its own core (if there are two), nice 19."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {SERVER_CPU})
    os.nice(19)


@contextmanager
def moto_server() -> Iterator[tuple[str, str]]:
    """moto's S3 server in its own process, pinned and niced; yields (endpoint, how)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO],
        env={**os.environ, **_SERVER_ENV},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pin_and_lower,  # noqa: PLW1509 - no threads yet in the child's parent side
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout is not None else ""
        if not line.isdigit():
            raise RuntimeError("moto's S3 server did not start in the benchmark's subprocess")
        pinned = (os.cpu_count() or 1) > 1
        how = (
            f"moto S3 server in its own process (pid {proc.pid}), "
            + (f"pinned to CPU {SERVER_CPU}, " if pinned else "")
            + "at nice 19, objects kept in memory and freed memory kept by its allocator "
            + "(MOTO_S3_DEFAULT_KEY_BUFFER_SIZE, MALLOC_*); the training thread pinned to CPU "
            + f"{TRAIN_CPU} while it trains, the clients' background threads and worker "
            + f"processes to CPU {SERVER_CPU}; the same for every way"
        )
        yield f"http://127.0.0.1:{line}", how
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pin_training_thread(pin: bool) -> None:
    """Pin the calling (training) thread to its core, away from the S3 server's, or unpin it.

    Only while it trains: threads and processes started from a pinned thread inherit its
    mask, so every way's client threads and workers are started before (all cores).
    """
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {TRAIN_CPU} if pin else set(range(os.cpu_count() or 1)))


def pin_to_client_core() -> None:
    """Pin the calling thread (and what it starts later) to the clients' core, the server's."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {SERVER_CPU})


def s3_client(endpoint: str) -> Any:
    """A boto3 client with its defaults (path-style addressing for the local server)."""
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def empty_bucket(client: Any) -> None:
    """Delete everything, so the server's memory stays flat across repeats."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def run_queue_wait() -> float:
    """Seconds the calling thread has been runnable but waiting for a core (Linux schedstat)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def context_switches() -> int:
    """The calling thread's context switches so far, voluntary and not (-1 if unknown)."""
    try:
        usage = resource.getrusage(resource.RUSAGE_THREAD)
    except (AttributeError, OSError):
        return -1
    return int(usage.ru_nvcsw + usage.ru_nivcsw)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- step kinds ----------------------------------------------------------------------------


def _burn(n: int) -> int:
    """Pure-Python work that holds the GIL, like a Python-heavy training step."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFF
    return x


def python_step(target_s: float = 0.010) -> Callable[[], None]:
    """A pure-Python step of about `target_s` on this machine right now."""
    n = 10_000
    while True:
        started = time.perf_counter()
        _burn(n)
        if time.perf_counter() - started > 0.002:
            break
        n *= 2
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        _burn(n)
        samples.append(time.perf_counter() - started)
    work = max(1, int(n * target_s / statistics.median(samples)))

    def step() -> None:
        _burn(work)

    return step


def torch_step() -> Callable[[], None] | None:
    """A real torch step (MLP forward, backward, SGD) on one CPU thread; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 512), torch.randn(64, 512)

    def step() -> None:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


# -- ways of uploading -------------------------------------------------------------------------


class Timer(lb.Callback):
    """Step starts, user save times, and the training thread's CPU and wall while it trains.

    "While it trains" runs from the first step to train end, each checkpoint's hooks
    included. What the other callbacks' `on_train_start` costs (loopbridge's pre-flight check
    of the store, once per run) is measured apart, as `start_wall`: a one-off cost before
    any step, which in a run of a few seconds would otherwise swamp the share.

    `stolen` is wall time lost between two step starts in which the thread never left its
    core (no context switch, voluntary or not): the hypervisor running something else on this
    vCPU (steal in /proc/stat). Counted for the record; the shares keep it.
    """

    def __init__(self) -> None:
        self.step_starts: list[float] = []
        self.saves: list[tuple[float, float]] = []  # (user save began, user save returned)
        self.save_ended_cpu = 0.0
        self.added_cpu: list[float] = []  # training-thread CPU after save(), per checkpoint
        self.added_wall: list[float] = []
        self.start_wall = 0.0  # from this on_train_start (registered first) to the first step
        self.train_wall = 0.0
        self.train_cpu = 0.0
        self.train_queued = 0.0  # runnable but waiting for a core (other tenants' load)
        self.stolen = 0.0  # lost without a context switch: the hypervisor's (see above)
        self._mark = (0.0, 0.0, 0)  # wall, CPU and context switches at the last step start

    def on_train_start(self, state: LoopState) -> None:
        pin_training_thread(True)
        self.start_wall = -time.perf_counter()

    def step_began(self) -> None:
        """Called first thing in each step: closes the checkpoint's added time, if any."""
        now = time.perf_counter()
        if not self.step_starts:
            self.start_wall += now
            self.train_wall = -now
            self.train_cpu = -time.thread_time()
            self.train_queued = -run_queue_wait()
        self._count_stolen(now)
        self._close_checkpoint(now)
        self.step_starts.append(now)

    def _close_checkpoint(self, now: float) -> None:
        """The time since the last save() returned is that checkpoint's added time, once."""
        if self.saves and len(self.added_wall) < len(self.saves):
            self.added_wall.append(now - self.saves[-1][1])
            self.added_cpu.append(time.thread_time() - self.save_ended_cpu)

    def _count_stolen(self, now: float) -> None:
        """Close one interval; what it lost with no context switch at all is stolen."""
        cpu, switches = time.thread_time(), context_switches()
        wall_then, cpu_then, switches_then = self._mark
        if self.step_starts and switches == switches_then >= 0:
            self.stolen += max(0.0, (now - wall_then) - (cpu - cpu_then))
        self._mark = (now, cpu, switches)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        # Registered first, so this runs before a pool's wait at train end, and right after
        # the final checkpoint's hooks, which are that checkpoint's added time.
        now = time.perf_counter()
        self._close_checkpoint(now)
        self._count_stolen(now)
        self.train_wall += now
        self.train_cpu += time.thread_time()
        self.train_queued += run_queue_wait()
        pin_training_thread(False)

    def step_times(self) -> list[float]:
        """Gaps between step starts, minus the user's own save() inside each gap."""
        gaps = []
        for before, after in zip(self.step_starts, self.step_starts[1:], strict=False):
            saving = sum(end - start for start, end in self.saves if before <= start < after)
            gaps.append(after - before - saving)
        return gaps


class InlineBoto3(lb.Callback):
    """boto3 upload_file inside the hook: the loop waits for every upload."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix, self.seconds, self.bytes = client, prefix, 0.0, 0

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        started = time.perf_counter()
        self.client.upload_file(str(row.path), BUCKET, f"{self.prefix}/{row.path.name}")
        self.seconds += time.perf_counter() - started
        self.bytes += row.size_bytes

    def worker_pids(self) -> list[int]:
        return []


def _upload_file(endpoint: str, path: str, key: str) -> float:
    """boto3 upload_file with its defaults (in a pool's worker); returns its seconds."""
    client = _pool_client(endpoint)
    started = time.perf_counter()
    client.upload_file(path, BUCKET, key)
    return time.perf_counter() - started


_clients: dict[str, Any] = {}


def _pool_client(endpoint: str) -> Any:
    client = _clients.get(endpoint)
    if client is None:
        client = _clients[endpoint] = s3_client(endpoint)
    return client


class PoolBoto3(lb.Callback):
    """boto3 upload_file in a one-worker thread or process pool, awaited at train end."""

    def __init__(self, endpoint: str, prefix: str, *, processes: bool) -> None:
        self.endpoint, self.prefix, self.bytes, self.seconds = endpoint, prefix, 0, 0.0
        self.pool: ThreadPoolExecutor | ProcessPoolExecutor
        if processes:
            # As Composer's RemoteUploaderDownloader does: upload_file in worker processes.
            import multiprocessing

            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        else:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-upload")
        self.futures: list[Future[float]] = []

    def warm(self, path: Path) -> None:
        """Start the pool's worker and its client before training, as a long job would."""
        self.pool.submit(pin_to_client_core).result()
        self.pool.submit(_upload_file, self.endpoint, str(path), f"{self.prefix}/warm").result()

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        key = f"{self.prefix}/{row.path.name}"
        self.futures.append(self.pool.submit(_upload_file, self.endpoint, str(row.path), key))
        self.bytes += row.size_bytes

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self.seconds = sum(future.result() for future in self.futures)

    def worker_pids(self) -> list[int]:
        processes = getattr(self.pool, "_processes", None) or {}
        return list(processes)

    def close(self) -> None:
        self.pool.shutdown()
