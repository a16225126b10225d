"""Checkpoint uploads under torchrun: what they cost each rank's training thread, and bytes.

Real `torchrun` jobs (gloo, CPU, a tiny DDP model whose all-reduce makes the ranks step
together) train `STEPS` steps with a checkpoint every `EVERY` steps into a local store:
  - 1 rank (the baseline), "zero" mode;
  - 2 ranks, "zero" mode (rank 0 saves and uploads the whole checkpoint, DDP);
  - 2 ranks, "sharded" mode (each rank uploads its shard; rank 0 publishes);
  - 2 ranks, "sharded", with rank 1's store slowed by `SLOW_S` per file (a slow upload).
Each rank reports the time the uploader's `on_checkpoint` took on its training thread (timed
by two callbacks around it), its training time up to `on_train_end` (before the drain), and
the bytes its uploader sent. Medians over checkpoints, then over repeats.

Targets (PASS/FAIL, exit 1 on FAIL):
  - no rank's training thread waits for another rank's upload: with rank 1's uploads slowed
    by SLOW_S each, every rank's training time grows by less than a quarter of the upload
    delay it could have absorbed (checkpoints x SLOW_S) against the unslowed sharded run;
  - "zero" mode uploads once: rank 1 sends 0 bytes.
The per-checkpoint hook time with 2 ranks against 1 is printed as a ratio.

Run: .venv/bin/python benchmarks/bench_distributed.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STEPS = 24
EVERY = 3
SHARD_BYTES = 256 * 1024
SLOW_S = 0.25
WAIT_FRACTION = 0.25


# -- the worker: one rank, run by torchrun ---------------------------------------------------


def _worker(config_path: str) -> int:
    import torch
    import torch.distributed as dist

    import loopbridge as lb
    from loopbridge.callbacks import CheckpointUploader
    from loopbridge.stores import GetResult, LocalStore, ObjectInfo, PutResult

    cfg: dict[str, Any] = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    delay = float(cfg["slow_s"]) if rank == 1 else 0.0

    class CountingStore:
        """A local store that counts the bytes put, and waits `delay` per file (rank 1)."""

        def __init__(self, inner: LocalStore) -> None:
            self.inner = inner
            self.url = inner.url
            self.retries = 0
            self.sent = 0

        async def put_file(
            self, key: str, path: Path, *, expected_digest: str | None = None
        ) -> PutResult:
            if delay:
                await asyncio.sleep(delay)  # a slow link, on the background loop only
            result = await self.inner.put_file(key, path, expected_digest=expected_digest)
            self.sent += result.size
            return result

        async def put_bytes(
            self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
        ) -> PutResult:
            return await self.inner.put_bytes(key, data, content_type=content_type)

        async def get_bytes(self, key: str) -> bytes | None:
            return await self.inner.get_bytes(key)

        async def get_file(
            self,
            key: str,
            path: Path,
            *,
            expected_digest: str | None = None,
            expected_size: int | None = None,
        ) -> GetResult:
            return await self.inner.get_file(
                key, path, expected_digest=expected_digest, expected_size=expected_size
            )

        async def head(self, key: str) -> ObjectInfo | None:
            return await self.inner.head(key)

        async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
            return await self.inner.list(prefix)

        async def delete(self, keys: Iterable[str]) -> None:
            await self.inner.delete(keys)

        async def aclose(self) -> None:
            await self.inner.aclose()

    class Clock(lb.Callback):
        """Times the callbacks between a `Clock(start=True)` and a `Clock(start=False)`."""

        marks: dict[str, float] = {}  # noqa: RUF012  # shared by the pair, on purpose
        hook_s: list[float] = []  # noqa: RUF012

        def __init__(self, start: bool) -> None:
            self.start = start

        def on_train_start(self, state: lb.LoopState) -> None:
            if self.start:
                self.marks["train"] = time.perf_counter()

        def on_checkpoint(self, state: lb.LoopState, row: lb.ManifestRow) -> None:
            now = time.perf_counter()
            if self.start:
                self.marks["hook"] = now
            else:
                self.hook_s.append(now - self.marks["hook"])

        def on_train_end(self, state: lb.LoopState, artifacts: lb.LoopArtifacts) -> None:
            if not self.start:
                self.marks["train_s"] = time.perf_counter() - self.marks["train"]

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        loss = model(torch.ones(4, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def save(state: lb.LoopState, path: Path) -> None:
        body = os.urandom(int(cfg["shard_bytes"]))
        if cfg["mode"] == "zero":
            path.write_bytes(body)
        else:
            path.mkdir()
            (path / f"shard-{rank:05d}.bin").write_bytes(body)

    store = CountingStore(LocalStore(cfg["store"]))
    uploader = CheckpointUploader(
        "", store=store, ranks=cfg["mode"], journal=False, rank_timeout=120
    )
    loop = lb.TrainLoop(
        step,
        range(STEPS),
        max_steps=STEPS,
        out_dir=Path(cfg["base"]) / f"rank-{rank}",
        save=save,
        checkpoint_every=EVERY,
        callbacks=[Clock(start=True), uploader, Clock(start=False)],
        run_name="bench",
        drain_timeout=120,
    )
    artifacts = loop.run()
    report = artifacts.drain_report
    result = {
        "rank": rank,
        "ok": report is not None and report.ok,
        "hook_us": statistics.median(Clock.hook_s) * 1e6,
        "train_s": Clock.marks["train_s"],
        "checkpoints": len(Clock.hook_s),
        "sent": store.sent,
    }
    (Path(cfg["base"]) / f"result-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


# -- the driver ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _job(ranks: int, mode: str, slow_s: float) -> list[dict[str, Any]]:
    """One torchrun job; every rank's result."""
    with tempfile.TemporaryDirectory(prefix="lb-bench-dist-") as tmp:
        base = Path(tmp)
        config = base / "config.json"
        cfg = {
            "base": str(base),
            "store": str(base / "store"),
            "mode": mode,
            "slow_s": slow_s,
            "shard_bytes": SHARD_BYTES,
        }
        config.write_text(json.dumps(cfg))
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [
            str(torchrun),
            "--nproc-per-node",
            str(ranks),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            __file__,
            "--worker",
            str(config),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            msg = f"torchrun ({ranks} ranks, {mode}) failed with exit code {done.returncode}"
            raise RuntimeError(msg)
        return [json.loads((base / f"result-{r}.json").read_text()) for r in range(ranks)]


CASES: dict[str, tuple[int, str, float]] = {
    "1 rank": (1, "zero", 0.0),
    "2 ranks, zero": (2, "zero", 0.0),
    "2 ranks, sharded": (2, "sharded", 0.0),
    "2 ranks, sharded, rank 1 slow": (2, "sharded", SLOW_S),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker)
    repeats = 1 if args.quick else 3
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, (ranks, mode, slow) in CASES.items():  # cases take turns in every repeat
            runs[name].append(_job(ranks, mode, slow))

    def med(name: str, rank: int, field: str) -> float:
        return statistics.median(float(job[rank][field]) for job in runs[name])

    print(f"{STEPS} steps, a checkpoint every {EVERY}, {SHARD_BYTES // 1024} KiB per rank's file")
    print(f"{'case':32} {'rank':>4} {'hook µs/ckpt':>13} {'train s':>8} {'KiB sent':>9}")
    for name, (ranks, _, _) in CASES.items():
        for rank in range(ranks):
            print(
                f"{name:32} {rank:>4} {med(name, rank, 'hook_us'):>13.1f} "
                f"{med(name, rank, 'train_s'):>8.3f} {med(name, rank, 'sent') / 1024:>9.0f}"
            )
    baseline = med("1 rank", 0, "hook_us")
    for name in ("2 ranks, zero", "2 ranks, sharded"):
        for rank in (0, 1):
            ratio = med(name, rank, "hook_us") / baseline
            print(f"hook time per checkpoint, {name}, rank {rank} vs 1 rank: {ratio:.2f}x")
    ok = all(job[r]["ok"] for jobs in runs.values() for job in jobs for r in range(len(job)))
    print(f"every drain report ok: {'PASS' if ok else 'FAIL'}")
    checkpoints = int(runs["2 ranks, sharded"][0][0]["checkpoints"])
    could_absorb = checkpoints * SLOW_S
    for rank in (0, 1):
        grew = med("2 ranks, sharded, rank 1 slow", rank, "train_s") - med(
            "2 ranks, sharded", rank, "train_s"
        )
        passed = grew < WAIT_FRACTION * could_absorb
        ok = ok and passed
        print(
            f"rank {rank} training time with rank 1's uploads slowed by {SLOW_S}s x "
            f"{checkpoints}: +{grew:.3f}s (target < {WAIT_FRACTION * could_absorb:.2f}s): "
            f"{'PASS' if passed else 'FAIL'}"
        )
    once = med("2 ranks, zero", 1, "sent") == 0 and med("2 ranks, zero", 0, "sent") > 0
    ok = ok and once
    print(f"zero mode uploads once (rank 1 sends 0 bytes): {'PASS' if once else 'FAIL'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
