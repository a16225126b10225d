"""transformers' Trainer with loopbridge callbacks, through LoopbridgeTrainerCallback, on CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tests.fixtures.s3 import FaultProxy, FaultRule, S3Bucket, Status
from tests.integration.adapter_checks import (
    UploadGate,
    Witness,
    check_published,
    checkpoint_rows,
    expected_hooks,
    metrics_of,
    no_snapshots_left,
    recorded,
)

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader, EarlyStopping, JsonlLogger
from loopbridge.integrations.transformers import LoopbridgeTrainerCallback
from loopbridge.testing import RecordingCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

RUN = "hf-run"
PREFIX = f"ckpts/transformers/{RUN}"
STEPS = 24
LOG_EVERY = 2
EVAL_EVERY = 6
SAVE_EVERY = 5


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences, the same for every run."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, 100, (n, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _train(
    tmp_path: Path,
    callbacks: list[lb.Callback],
    *,
    max_steps: int = STEPS,
    save_total_limit: int | None = None,
    keep: Any = None,
    **options: Any,
) -> LoopbridgeTrainerCallback:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    adapter = LoopbridgeTrainerCallback(callbacks, run_name=RUN, **options)
    if keep is not None:
        keep(adapter)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        logging_steps=LOG_EVERY,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        save_steps=SAVE_EVERY,
        save_total_limit=save_total_limit,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=Tokens(256),
        eval_dataset=Tokens(8),
        callbacks=[adapter],
    )
    # The console printer would print every log dict; the tests read the hooks instead.
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    return adapter


def _uploader(bucket: S3Bucket, endpoint: str | None = None) -> CheckpointUploader:
    return CheckpointUploader(f"s3://{bucket.name}/ckpts", endpoint_url=endpoint or bucket.endpoint)


class TestTrain:
    def test_every_checkpoint_reaches_s3_and_the_hooks_follow_the_table(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Each checkpoint directory is published file by file; hooks fire as documented."""
        recorder, witness = RecordingCallback(), Witness()
        events = tmp_path / "events.jsonl"
        adapter = _train(tmp_path, [witness, _uploader(s3_bucket), JsonlLogger(events), recorder])

        assert adapter.drain_report is not None
        assert adapter.drain_report.ok
        # transformers also evaluates and saves at max_steps.
        saved = {*range(SAVE_EVERY, STEPS + 1, SAVE_EVERY), STEPS}
        evals = {*range(EVAL_EVERY, STEPS + 1, EVAL_EVERY), STEPS}
        assert recorded(recorder) == expected_hooks(
            STEPS, evals=evals, checkpoints=saved, eval_first=True
        )
        rows = checkpoint_rows(recorder)
        written = sorted((tmp_path / "out").glob("checkpoint-*"))
        assert sorted(row.path for row in rows) == written
        check_published(s3_bucket, PREFIX, rows, witness.files)

        step_metrics = metrics_of(recorder, "on_step_end")
        for step, metrics in enumerate(step_metrics, start=1):
            logged = step % LOG_EVERY == 0
            assert ({"loss", "grad_norm", "learning_rate", "epoch"} <= set(metrics)) is logged
            assert bool(metrics) is logged
        assert all("eval_loss" in m for m in metrics_of(recorder, "on_eval"))
        lines = [json.loads(line) for line in events.read_text().splitlines()]
        assert [line["step"] for line in lines if line["kind"] == "step"] == list(
            range(1, STEPS + 1)
        )
        (run_end,) = recorder.calls_to("on_run_end")
        assert run_end.args[1].status is lb.RunStatus.COMPLETED
        artifacts = recorder.calls_to("on_train_end")[0].args[1]
        assert artifacts.manifest_path is None
        assert artifacts.stop_reason == "max_steps"
        assert artifacts.final_checkpoint == rows[-1]

    def test_early_stopping_stops_transformers(self, tmp_path: Path) -> None:
        """loopbridge's EarlyStopping sets control.should_training_stop; train() ends early."""
        recorder = RecordingCallback()
        stopper = EarlyStopping("eval_loss", patience=1, min_delta=1e9)
        _train(tmp_path, [stopper, recorder], max_steps=200)
        artifacts = recorder.calls_to("on_train_end")[0].args[1]
        assert artifacts.steps_completed == 2 * EVAL_EVERY
        assert "did not improve" in artifacts.stop_reason
        assert len(recorder.calls_to("on_eval")) == 2


class TestFailures:
    def test_a_failing_upload_makes_train_raise_drain_error(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A refused upload ends train() with DrainError naming it (the default policy)."""
        # The checkpoint objects only: the pre-flight probe gets through, the uploads do not.
        fault_proxy.add(
            FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT", path="/step-")
        )
        recorder = RecordingCallback()
        with pytest.raises(lb.DrainError) as caught:
            _train(tmp_path, [_uploader(s3_bucket, fault_proxy.url), recorder], max_steps=6)
        assert caught.value.report.failed
        # Every checkpoint fails; the report lists them in the order they ended.
        assert any("upload step 5" in r.name for r in caught.value.report.failed)
        assert recorder.hooks[-2:] == ["on_train_end", "on_run_end"]

    def test_warn_policy_only_logs(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """With on_drain_failure="warn", train() returns and one warning names the failure."""
        # The checkpoint objects only: the pre-flight probe gets through, the uploads do not.
        fault_proxy.add(
            FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT", path="/step-")
        )
        with caplog.at_level(logging.WARNING, logger="loopbridge.loop"):
            adapter = _train(
                tmp_path,
                [_uploader(s3_bucket, fault_proxy.url)],
                max_steps=6,
                on_drain_failure="warn",
            )
        assert adapter.drain_report is not None
        assert len(adapter.drain_report.failed) == 2
        warnings = [r for r in caplog.records if r.name == "loopbridge.loop"]
        assert len(warnings) == 1
        assert "background work not done" in warnings[0].getMessage()


class TestErrors:
    def test_close_after_a_failed_train_closes_the_run_as_failed(self, tmp_path: Path) -> None:
        """transformers has no error event: close() fires on_run_end with status FAILED."""

        class Diverges(lb.Callback):
            def on_eval(
                self, state: lb.LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
            ) -> None:
                raise FloatingPointError("eval_loss is NaN")

        recorder = RecordingCallback()
        adapter: LoopbridgeTrainerCallback | None = None

        def keep(callback: LoopbridgeTrainerCallback) -> None:
            nonlocal adapter
            adapter = callback

        with pytest.raises(FloatingPointError, match="eval_loss is NaN"):
            _train(tmp_path, [recorder, Diverges()], max_steps=EVAL_EVERY, keep=keep)
        assert adapter is not None
        assert "on_run_end" not in recorder.hooks
        adapter.close()
        (end,) = recorder.calls_to("on_run_end")
        assert end.args[1].status is lb.RunStatus.FAILED
        assert adapter.run.bridge is not None
        assert adapter.run.bridge.closed


class TestRotation:
    def test_save_total_limit_1_with_slow_uploads_loses_no_checkpoint(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Uploads held back until training ends still publish every rotated-away checkpoint."""
        gate, witness, recorder = UploadGate(), Witness(), RecordingCallback()
        with lb.Bridge(max_in_flight=1) as bridge:
            _train(
                tmp_path,
                [gate, witness, _uploader(s3_bucket), recorder],
                save_total_limit=1,
                bridge=bridge,
            )
        assert gate.held.is_set()
        rows = checkpoint_rows(recorder)
        assert [row.step for row in rows] == [5, 10, 15, 20, 24]
        # transformers kept only the newest directory; the others were gone before upload.
        assert sorted((tmp_path / "out").glob("checkpoint-*")) == [rows[-1].path]
        check_published(s3_bucket, PREFIX, rows, witness.files)
        assert no_snapshots_left(tmp_path)
