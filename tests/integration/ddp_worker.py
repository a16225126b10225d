"""One rank of a two-process DDP run through an adapter, for test_adapters_ddp.py.

Run by torchrun: `ddp_worker.py lightning|transformers OUT_DIR [every-rank-logger]`. Each
rank trains with a RecordingCallback and an EarlyStopping that stops at the second
evaluation, then writes the hooks it saw and the step it stopped at to OUT_DIR/rank<N>.json.
With `every-rank-logger` it adds `every_rank(JsonlLogger(...))`, which the adapters (firing
on rank 0 only) refuse: the file gets the error instead of the step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from loopbridge import every_rank
from loopbridge.callbacks import EarlyStopping, JsonlLogger
from loopbridge.testing import RecordingCallback

EVAL_EVERY = 4


def _lightning(out: Path, callbacks: list[Any]) -> int:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from loopbridge.integrations.lightning import LoopbridgeCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("val_loss", loss, sync_dist=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(512, 4), torch.randn(512, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=100,
        val_check_interval=EVAL_EVERY,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=out / "pl",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoopbridgeCallback(callbacks, run_name="ddp")],
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    return int(trainer.global_step)


def _transformers(out: Path, callbacks: list[Any]) -> int:
    import transformers

    from loopbridge.integrations.transformers import LoopbridgeTrainerCallback

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, n: int) -> None:
            self.ids = torch.randint(0, 100, (n, 16), generator=torch.Generator().manual_seed(1))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[index], "labels": self.ids[index]}

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=100,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=Tokens(512),
        eval_dataset=Tokens(16),
        callbacks=[LoopbridgeTrainerCallback(callbacks, run_name="ddp")],
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    return int(trainer.state.global_step)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    framework, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    recorder = RecordingCallback()
    monitor = "val_loss" if framework == "lightning" else "eval_loss"
    stopper = EarlyStopping(monitor, patience=1, min_delta=1e9)
    train = _lightning if framework == "lightning" else _transformers
    callbacks: list[Any] = [stopper, recorder]
    if sys.argv[3:] == ["every-rank-logger"]:
        # Needs every rank, but the adapter fires on rank 0 only: refused on every rank.
        callbacks.append(every_rank(JsonlLogger(out / f"rank{rank}.jsonl")))
    result: dict[str, Any]
    try:
        step = train(out, callbacks)
    except ValueError as exc:
        result = {"hooks": recorder.hooks, "error": str(exc)}
    else:
        result = {"hooks": recorder.hooks, "step": step}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Left to the interpreter's exit, gloo's threads sometimes abort the process.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
