"""A deterministic training run for the preemption test, resumable with resume_from="auto".

Run as `python preempt_worker.py OUT DEST ENDPOINT MAX_STEPS STOP_AT RESULT`. The model is a
pure-Python linear regression trained by SGD on data drawn per step from a seeded RNG, so two
runs that take the same steps from the same parameters end bit-identical. With STOP_AT > 0 it
waits, after that step, until its uploads are published, prints `published`, and blocks until
the test kills it. Otherwise it trains to MAX_STEPS and writes the final parameters to RESULT.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader

RUN = "preempted"
DIM = 8
TRUE_W = [random.Random(7).uniform(-1, 1) for _ in range(DIM)]


class Model:
    """Linear regression weights and the SGD step that updates them."""

    def __init__(self) -> None:
        self.w = [0.0] * DIM

    def step(self, state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        rng = random.Random(1000 + state.step)  # the data of step N, whoever runs it
        loss = 0.0
        grad = [0.0] * DIM
        for _ in range(16):
            x = [rng.uniform(-1, 1) for _ in range(DIM)]
            y = sum(a * b for a, b in zip(TRUE_W, x, strict=True)) + rng.gauss(0, 0.01)
            err = sum(a * b for a, b in zip(self.w, x, strict=True)) - y
            loss += err * err / 16
            grad = [g + 2 * err * xi / 16 for g, xi in zip(grad, x, strict=True)]
        self.w = [w - 0.1 * g for w, g in zip(self.w, grad, strict=True)]
        return {"loss": loss}

    def save(self, state: lb.LoopState, path: Path) -> None:
        path.write_text(json.dumps({"w": self.w, "step": state.step}))

    def load(self, state: lb.LoopState, path: Path) -> None:
        saved = json.loads(path.read_text())
        assert saved["step"] == state.step, (saved["step"], state.step)
        self.w = [float(v) for v in saved["w"]]


class StopAt(lb.Callback):
    """After step `at`: wait for the uploads to publish, say so, and wait to be killed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(
        self, state: lb.LoopState, step_idx: int, batch: lb.TrainingBatch, metrics: dict[str, float]
    ) -> None:
        if state.step == self.at:
            report = self._attached_bridge().drain(60)
            assert report.ok, report.summary()
            print("published", flush=True)
            sys.stdin.readline()  # never answered: the test kills this process


def main(argv: list[str]) -> int:
    out, dest, endpoint, max_steps, stop_at, result = argv
    model = Model()
    callbacks: list[lb.Callback] = [
        CheckpointUploader(dest, endpoint_url=endpoint, part_size=5 << 20)
    ]
    if int(stop_at):
        callbacks.append(StopAt(int(stop_at)))
    loop = lb.TrainLoop(
        model.step,
        itertools.count(),
        max_steps=int(max_steps),
        out_dir=out,
        save=model.save,
        load=model.load,
        checkpoint_every=4,
        callbacks=callbacks,
        run_name=RUN,
        resume_from="auto",
    )
    artifacts = loop.run()
    resumed = loop.restored.step if loop.restored is not None else 0
    print(f"resumed {resumed}", flush=True)
    Path(result).write_text(json.dumps({"w": model.w, "steps": artifacts.steps_completed}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
