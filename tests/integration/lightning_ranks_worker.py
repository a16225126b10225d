"""One rank of a torchrun job training with Lightning (`strategy="ddp"`, CPU, gloo) and loopbridge.

Run as `torchrun --nproc-per-node 2 ... lightning_ranks_worker.py CONFIG.json` (or with
`python`, when Lightning's own launcher starts the second process). Both ranks
share one `default_root_dir` (`base/out`), as Lightning users have it. The config's `mode`:

- "zero": `strategy="ddp"`; `ModelCheckpoint` saves through Lightning's CheckpointIO on rank
  0; `CheckpointUploader()` (ranks="zero") with a dashboard and MLflow logger;
- "sharded": a `DDPStrategy` whose `save_checkpoint` writes the model with
  `torch.distributed.checkpoint.save` into the checkpoint path as a directory on every rank,
  and rank 0 also writes `meta.pt` (Lightning's FSDP sharded save does the same);
  `CheckpointUploader(ranks="sharded")`.

Each rank writes its pid to `base/pid-<rank>` as it starts and its outcome (ok, the error out
of `trainer.fit`, its drain report, the checkpoints its hooks saw and their digests, the
bytes it uploaded) to `base/result-<rank>.json` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.utils.data import DataLoader, TensorDataset

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader, HttpDashboard, MLflowLogger
from loopbridge.integrations.lightning import LoopbridgeCallback

RUN = "pl-ranks"
WIDTH = 128


class Tiny(pl.LightningModule):
    """A few linear layers; `layers` sets the checkpoint's size (about 66 KB each)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DCPStrategy(DDPStrategy):
    """DDP whose checkpoints are torch.distributed.checkpoint directories, one file per rank."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(filepath)
        dcp_save({"model": checkpoint["state_dict"]}, checkpoint_id=path)
        if self.is_global_zero:
            meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
            torch.save(meta, path / "meta.pt")


class Seen(lb.Callback):
    """The checkpoints this rank's hooks were told about."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_checkpoint(self, state: lb.LoopState, row: lb.ManifestRow) -> None:
        self.rows.append({"step": row.step, "path": str(row.path), "rank": state.rank})


def main(config_path: str) -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cfg: dict[str, Any] = json.loads(Path(config_path).read_text())
    # Under Lightning's own launcher (no torchrun) a child has LOCAL_RANK only.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    base = Path(cfg["base"])
    (base / f"pid-{rank}").write_text(str(os.getpid()))
    out = base / "out"
    mode = cfg["mode"]
    uploader = CheckpointUploader(
        cfg["dest"],
        endpoint_url=cfg.get("endpoint"),
        ranks=mode,
        rank_timeout=float(cfg.get("rank_timeout", 60.0)),
        call_timeout=30.0,
        max_attempts=int(cfg.get("max_attempts", 3)),
    )
    seen = Seen()
    callbacks: list[lb.Callback] = [uploader, seen]
    if cfg.get("dashboard"):
        callbacks.append(HttpDashboard(cfg["dashboard"], flush_interval_s=0.5))
    if cfg.get("mlflow"):
        callbacks.append(MLflowLogger(cfg["mlflow"], experiment_name=cfg["experiment"]))
    adapter = LoopbridgeCallback(
        callbacks,
        run_name=RUN,
        all_ranks=bool(cfg.get("all_ranks", True)),
        drain_timeout=float(cfg.get("drain_timeout", 60.0)),
    )
    strategy: str | DDPStrategy = "ddp" if mode == "zero" else DCPStrategy()
    steps = int(cfg.get("steps", 4))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[
            pl.callbacks.ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=int(cfg.get("checkpoint_every", 2)),
                save_top_k=-1,
            ),
            adapter,
        ],
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, WIDTH, generator=generator)
    data = DataLoader(TensorDataset(x, x.flip(1)), batch_size=4)
    result: dict[str, Any] = {"rank": rank}
    started = time.monotonic()
    try:
        trainer.fit(Tiny(int(cfg.get("layers", 2))), data)
    except lb.DrainError as exc:
        result.update(ok=False, error=str(exc), report=exc.report.summary())
    except Exception as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", report=None)
    else:
        report = adapter.drain_report
        result.update(ok=report is not None and report.ok, report=str(report))
    result["seen"] = seen.rows
    artifacts = adapter.artifacts
    result["digests"] = [row.digest for row in artifacts.manifest] if artifacts else []
    result["uploaded"] = uploader.summary.bytes_uploaded
    result["seconds"] = time.monotonic() - started
    (base / f"result-{rank}.json").write_text(json.dumps(result))
    # Left to the interpreter's exit, gloo's threads sometimes abort the process.
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
