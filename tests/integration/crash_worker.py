"""A training run for the crash tests: saves checkpoints, uploads them, and waits to be killed.

Run as `python crash_worker.py OUT_DIR DEST ENDPOINT STEPS SIZE`. Each checkpoint is SIZE random
bytes. It prints `recorded <step>` after each checkpoint's intent is journaled and its upload
queued, then `all recorded`, and then drains its (throttled) uploads until the test kills it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader

MiB = 1 << 20
RUN = "crash-run"


class Announce(lb.Callback):
    """Tell the test, through stdout, what the run has recorded so far."""

    def on_checkpoint(self, state: lb.LoopState, row: lb.ManifestRow) -> None:
        print(f"recorded {row.step}", flush=True)

    def on_train_end(self, state: lb.LoopState, artifacts: lb.LoopArtifacts) -> None:
        print("all recorded", flush=True)


def main(argv: list[str]) -> int:
    out_dir, dest, endpoint, steps, size = argv
    n_steps, n_bytes = int(steps), int(size)

    def save(state: lb.LoopState, path: Path) -> None:
        path.write_bytes(os.urandom(n_bytes))

    def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        return {"loss": 1.0 / (1 + batch.index)}

    uploader = CheckpointUploader(dest, endpoint_url=endpoint, part_size=5 * MiB, call_timeout=60)
    loop = lb.TrainLoop(
        step,
        range(n_steps),
        max_steps=n_steps,
        out_dir=out_dir,
        save=save,
        checkpoint_every=1,
        callbacks=[uploader, Announce()],
        run_name=RUN,
        drain_timeout=120,
    )
    loop.run()
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
