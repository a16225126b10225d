"""What the framework adapters cost each framework's training step, against native callbacks.

For Lightning's Trainer and transformers' Trainer, in one training run per framework, the
callback list is switched every CHUNK steps between these configurations, in rotation: no
callback (the base), one native no-op callback, 20 of them, the adapter carrying N = 1, 5,
20 no-op loopbridge callbacks, and the adapter carrying 1 and 20 loopbridge callbacks that
listen to every step (they override the per-step hooks with `pass`). A no-op callback is a
subclass of the framework's or loopbridge's callback class that overrides nothing; the
framework still calls each of its own for every event, loopbridge's CallbackList calls a
callback only for the hooks it overrides. A step's time is the
interval between two consecutive forward passes of a tiny model on CPU, so it includes every
hook the framework fires; a configuration's step time is the median of its intervals. Its
cost is that minus the base's (differencing: the model and the framework cancel out). Fine
interleaving in one run cancels the drift of a shared machine's load; the run is repeated
and the medians of the runs' costs are reported.

Target, per framework: the adapter carrying 20 no-op loopbridge callbacks costs at most 1.5x
what one native no-op callback costs. The listening rows show what each callback that does
take `on_step_end` adds (with no target). The cost of 20 native no-ops / 20 is printed too:
it is lower than one native no-op's own, because the first callback of a list pays for the
cold caches the others then find warm. Exit status 1 on a FAIL.

Run: .venv/bin/python benchmarks/bench_adapters.py [--quick] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import loopbridge as lb

TARGET = 1.5
N_LOOPBRIDGE = (1, 5, 20)
CHUNK = 50  # steps per configuration before the next one is switched in
CONFIGS: list[tuple[str, str, int]] = [
    ("base (no callback)", "base", 0),
    ("1 native no-op", "native", 1),
    ("20 native no-ops", "native", 20),
    *[(f"adapter + {n} loopbridge no-ops", "silent", n) for n in N_LOOPBRIDGE],
    ("adapter + 1 listening callback", "adapter", 1),
    ("adapter + 20 listening callbacks", "adapter", 20),
]


class ListeningLoopbridge(lb.Callback):
    """A loopbridge callback that overrides the per-step hooks and does nothing in them."""

    def on_step_end(
        self,
        state: lb.LoopState,
        step_idx: int,
        batch: lb.TrainingBatch,
        metrics: dict[str, float],
    ) -> None:
        pass

    def on_eval(
        self, state: lb.LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        pass

    def on_checkpoint(self, state: lb.LoopState, row: lb.ManifestRow) -> None:
        pass


class NoopLoopbridge(lb.Callback):
    """A no-op loopbridge callback: it overrides no hook, so CallbackList never calls it."""


def _lists(native: type, adapter: Callable[[list[lb.Callback]], Any]) -> list[list[Any]]:
    """The framework's callback list of each configuration, in CONFIGS order."""
    lists: list[list[Any]] = []
    for _, kind, n in CONFIGS:
        if kind == "adapter":
            lists.append([adapter([ListeningLoopbridge() for _ in range(n)])])
        elif kind == "silent":
            lists.append([adapter([NoopLoopbridge() for _ in range(n)])])
        else:
            lists.append([native() for _ in range(n)])
    return lists


class Switcher:
    """Rotates the framework's callback list through the configurations, CHUNK steps each.

    `tick()` is called first thing in each forward pass: it stamps the time and, at a chunk
    boundary, switches the list (outside any of the framework's callback loops).
    """

    def __init__(self, lists: Sequence[list[Any]], live: list[Any], steps: int) -> None:
        self.lists = lists
        self.live = live
        self.base = list(live)  # what the framework installs itself (transformers' flow)
        self.stamps: list[int] = []
        self.steps = steps

    def tick(self) -> None:
        step = len(self.stamps)
        self.stamps.append(time.perf_counter_ns())
        if step % CHUNK == 0:
            config = (step // CHUNK) % len(self.lists)
            self.live[:] = [*self.base, *self.lists[config]]

    def costs(self) -> list[float]:
        """Per configuration, the median of its step intervals minus the base's, in µs."""
        gaps: list[list[int]] = [[] for _ in self.lists]
        for i in range(self.steps // 10, len(self.stamps) - 1):
            if i % CHUNK == 0:
                continue  # the first interval after a switch: caches still warming
            config = (i // CHUNK) % len(self.lists)
            gaps[config].append(self.stamps[i + 1] - self.stamps[i])
        medians = [statistics.median(values) / 1e3 for values in gaps]
        return [median - medians[0] for median in medians]


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- Lightning -------------------------------------------------------------------------------


def lightning_costs(steps: int, tmp: Path) -> list[float]:
    """One Lightning run rotating the configurations; each one's cost per step in µs."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from loopbridge.integrations.lightning import LoopbridgeCallback

    class NativeNoop(pl.Callback):
        pass

    lists = _lists(NativeNoop, LoopbridgeCallback)
    adapters = [cb for cbs in lists for cb in cbs if isinstance(cb, LoopbridgeCallback)]

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.switcher: Switcher | None = None

        def on_fit_start(self) -> None:
            # The adapters are out of the list at fit start: start their runs by hand.
            for adapter in adapters:
                adapter.setup(self.trainer, self, "fit")
                adapter.on_fit_start(self.trainer, self)
            live: list[Any] = self.trainer.callbacks  # type: ignore[attr-defined]
            self.switcher = Switcher(lists, live, steps)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            assert self.switcher is not None
            self.switcher.tick()
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.zeros(steps + 1, 1)
    trainer = pl.Trainer(
        max_steps=steps,
        default_root_dir=tmp,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    model = Tiny()
    trainer.fit(model, DataLoader(TensorDataset(data, data), batch_size=1))
    for adapter in adapters:
        adapter.on_fit_end(trainer, model)
        adapter.teardown(trainer, model, "fit")
    assert model.switcher is not None
    return model.switcher.costs()


# -- transformers ----------------------------------------------------------------------------


def transformers_costs(steps: int, tmp: Path) -> list[float]:
    """One transformers run rotating the configurations; each one's cost per step in µs."""
    import torch
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from loopbridge.integrations.transformers import LoopbridgeTrainerCallback

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    class NativeNoop(transformers.TrainerCallback):
        pass

    lists = _lists(NativeNoop, LoopbridgeTrainerCallback)
    adapters = [cb for cbs in lists for cb in cbs if isinstance(cb, LoopbridgeTrainerCallback)]
    holder: dict[str, Any] = {}

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            switcher: Switcher | None = holder.get("switcher")
            if switcher is None:
                trainer = holder["trainer"]
                for adapter in adapters:  # out of the list at train start: start them by hand
                    adapter.on_train_begin(trainer.args, trainer.state, trainer.control)
                live = trainer.callback_handler.callbacks
                switcher = holder["switcher"] = Switcher(lists, live, steps)
            switcher.tick()
            return {"loss": torch.nn.functional.mse_loss(self.layer(x), labels)}

    class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return steps + 1

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"x": torch.zeros(1), "labels": torch.zeros(1)}

    args = transformers.TrainingArguments(
        output_dir=str(tmp / "hf"),
        max_steps=steps,
        per_device_train_batch_size=1,
        save_strategy="no",
        optim="sgd",  # the cheapest step: less of it for the machine's noise to scale
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=10 * steps,  # no log during the measured steps
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=Rows())
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    holder["trainer"] = trainer
    trainer.train()
    for adapter in adapters:
        adapter.on_train_end(trainer.args, trainer.state, trainer.control)
    switcher = holder["switcher"]
    assert isinstance(switcher, Switcher)
    return switcher.costs()


# -- the comparison --------------------------------------------------------------------------


def report(name: str, runs: list[list[float]], steps: int) -> bool:
    """Print one framework's table and verdict; return whether it passes."""
    cost = [statistics.median(run[i] for run in runs) for i in range(len(CONFIGS))]
    native1 = cost[1]
    print(
        f"\n{name}: cost per step over the base, µs (median of {len(runs)} runs of {steps} "
        f"steps; in each, a configuration's median step minus the base's)"
    )
    print(f"one native no-op callback: {native1:.2f} µs/step; 20 of them / 20: {cost[2] / 20:.2f}")
    print(f"{'configuration':34} {'cost µs':>9} {'x 1 native':>11}   per run")
    for index, ((label, _, _), value) in enumerate(zip(CONFIGS, cost, strict=True)):
        shown = f"{value / native1:11.2f}" if native1 > 0 else f"{'n/a':>11}"
        runs_text = " ".join(f"{run[index]:6.2f}" for run in runs)
        print(f"{label:34} {value:9.2f} {shown}   {runs_text}")
    adapter20 = cost[CONFIGS.index(("adapter + 20 loopbridge no-ops", "silent", 20))]
    listening = cost[CONFIGS.index(("adapter + 20 listening callbacks", "adapter", 20))]
    ratio = adapter20 / native1 if native1 > 0 else float("inf")
    ok = ratio <= TARGET
    print(
        f"{'PASS' if ok else 'FAIL'}  {name}: the adapter with 20 no-op loopbridge callbacks "
        f"costs {adapter20:.2f} µs/step = {ratio:.2f}x one native no-op callback "
        f"({native1:.2f} µs/step); target <= {TARGET}x"
    )
    print(
        f"info  {name}: with 20 callbacks listening to every step it costs {listening:.2f} "
        f"µs/step = {listening / native1:.2f}x one native no-op callback"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=12000, help="steps per training run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per framework")
    parser.add_argument("--quick", action="store_true", help="4800 steps, 1 run")
    parser.add_argument("--only", choices=("lightning", "transformers"), help="one framework")
    args = parser.parse_args(argv)
    steps, repeats = (4800, 1) if args.quick else (args.steps, args.repeats)
    _quiet()
    frameworks: list[tuple[str, Callable[[int, Path], list[float]]]] = [
        ("Lightning", lightning_costs),
        ("transformers", transformers_costs),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, costs in frameworks:
            if args.only not in (None, name.lower()):
                continue
            runs: list[list[float]] = []
            for _ in range(repeats):
                gc.collect()
                gc.disable()  # collections would land in some configuration's steps
                try:
                    runs.append(costs(steps, Path(tmp)))
                finally:
                    gc.enable()
            results.append(report(name, runs, steps))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
