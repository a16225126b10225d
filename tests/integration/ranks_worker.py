"""One rank of a torchrun job for the distributed tests: a tiny DDP model, checkpoints, loggers.

Run as `torchrun --nproc-per-node 2 ... ranks_worker.py CONFIG.json`. The config names the
saving mode ("zero" or "sharded"), the base dir (rank r works in `base/rank-r`), the S3
destination and endpoint, and optionally a dashboard URL and an MLflow tracking URI. Each rank
writes its pid to `base/pid-r` as it starts and its outcome to `base/result-r.json` at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader, HttpDashboard, JsonlLogger, MLflowLogger

RUN = "dist-run"


def main(config_path: str) -> int:
    cfg: dict[str, Any] = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = Path(cfg["base"])
    (base / f"pid-{rank}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    shard_bytes = int(cfg.get("shard_bytes", 4096))

    def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        x = torch.full((2, 4), float(batch.index + rank + 1))
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here: the ranks step together
        optimizer.step()
        return {"loss": loss.item()}

    def save(state: lb.LoopState, path: Path) -> None:
        if cfg["mode"] == "zero":
            # Every rank writes (as careless user code does); only rank 0's is uploaded.
            torch.save({"model": model.module.state_dict(), "rank": rank}, path)
            return
        path.mkdir()
        body = bytes([rank + 1]) * shard_bytes + state.step.to_bytes(8, "big")
        (path / f"shard-{rank:05d}.bin").write_bytes(body)
        if rank == 0:
            (path / "meta.json").write_text(json.dumps({"step": state.step}))

    uploader = CheckpointUploader(
        cfg["dest"],
        endpoint_url=cfg["endpoint"],
        ranks=cfg["mode"],
        rank_timeout=float(cfg.get("rank_timeout", 60.0)),
        call_timeout=30.0,
        max_attempts=int(cfg.get("max_attempts", 3)),
    )
    callbacks: list[lb.Callback] = [
        uploader,
        JsonlLogger(),  # rank 0 only: base/rank-0/events.jsonl
        lb.every_rank(JsonlLogger(base / f"all-ranks-{rank}.jsonl")),
    ]
    if cfg.get("dashboard"):
        callbacks.append(HttpDashboard(cfg["dashboard"], flush_interval_s=0.5))
    if cfg.get("mlflow"):
        callbacks.append(MLflowLogger(cfg["mlflow"], experiment_name=cfg["experiment"]))
    steps = int(cfg.get("steps", 4))
    loop = lb.TrainLoop(
        step,
        range(steps),
        max_steps=steps,
        out_dir=base / f"rank-{rank}",
        save=save,
        checkpoint_every=int(cfg.get("checkpoint_every", 2)),
        callbacks=callbacks,
        run_name=RUN,
        drain_timeout=float(cfg.get("drain_timeout", 60.0)),
    )
    result: dict[str, Any] = {"rank": rank}
    started = time.monotonic()
    try:
        artifacts = loop.run()
    except lb.DrainError as exc:
        result.update(ok=False, error=str(exc), report=exc.report.summary())
    else:
        report = artifacts.drain_report
        result.update(ok=report is not None and report.ok, report=str(report))
    result["uploaded"] = uploader.summary.bytes_uploaded
    result["seconds"] = time.monotonic() - started
    (base / f"result-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
