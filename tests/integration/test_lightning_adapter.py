"""Lightning's Trainer with loopbridge callbacks, through LoopbridgeCallback, on CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
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
from torch.utils.data import DataLoader, TensorDataset

import loopbridge as lb
from loopbridge.callbacks import CheckpointUploader, EarlyStopping, JsonlLogger
from loopbridge.integrations.lightning import LoopbridgeCallback
from loopbridge.testing import RecordingCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

RUN = "pl-run"
STEPS = 24
CKPT_EVERY = 4
VAL_EVERY = 6


class TinyModule(pl.LightningModule):
    """A linear regression whose checkpoints are about 70 KB."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(128, 128)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(n: int = 256) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 128, generator=generator)
    return DataLoader(TensorDataset(x, x.flip(1)), batch_size=4)


def _fit(
    tmp_path: Path,
    callbacks: list[lb.Callback],
    *,
    save_top_k: int = -1,
    max_steps: int = STEPS,
    **options: Any,
) -> LoopbridgeCallback:
    adapter = LoopbridgeCallback(callbacks, run_name=RUN, **options)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=CKPT_EVERY, save_top_k=save_top_k
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=VAL_EVERY,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        default_root_dir=tmp_path / "out",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[adapter, checkpoints],
    )
    trainer.fit(TinyModule(), _data(), _data(16))
    return adapter


def _uploader(bucket: S3Bucket, endpoint: str | None = None) -> CheckpointUploader:
    return CheckpointUploader(f"s3://{bucket.name}/ckpts", endpoint_url=endpoint or bucket.endpoint)


class TestFit:
    def test_every_checkpoint_reaches_s3_and_the_hooks_follow_the_table(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Each checkpoint ModelCheckpoint wrote is published; hooks fire as documented."""
        recorder, witness = RecordingCallback(), Witness()
        events = tmp_path / "events.jsonl"
        adapter = _fit(tmp_path, [witness, _uploader(s3_bucket), JsonlLogger(events), recorder])

        assert adapter.drain_report is not None
        assert adapter.drain_report.ok
        saved = set(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
        evals = set(range(VAL_EVERY, STEPS + 1, VAL_EVERY))
        assert recorded(recorder) == expected_hooks(
            STEPS, evals=evals, checkpoints=saved, eval_first=False
        )
        rows = checkpoint_rows(recorder)
        written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
        assert sorted(row.path for row in rows) == written
        check_published(s3_bucket, f"ckpts/lightning/{RUN}", rows, witness.files)

        step_metrics = metrics_of(recorder, "on_step_end")
        assert all(set(m) == {"train_loss"} for m in step_metrics)
        assert all(set(m) == {"val_loss"} for m in metrics_of(recorder, "on_eval"))
        assert [c.args[1] for c in recorder.calls_to("on_step_end")] == list(range(STEPS))
        lines = [json.loads(line) for line in events.read_text().splitlines()]
        assert [line["step"] for line in lines if line["kind"] == "step"] == list(
            range(1, STEPS + 1)
        )
        (run_end,) = recorder.calls_to("on_run_end")
        result, arm = run_end.args[1], run_end.args[2]
        assert result.status is lb.RunStatus.COMPLETED
        assert arm.runs == [result]
        artifacts = recorder.calls_to("on_train_end")[0].args[1]
        assert artifacts.metrics_path is None
        assert artifacts.stop_reason == "max_steps"
        assert artifacts.final_checkpoint == rows[-1]

    def test_early_stopping_stops_lightning(self, tmp_path: Path) -> None:
        """loopbridge's EarlyStopping sets trainer.should_stop; the fit ends early."""
        recorder = RecordingCallback()
        stopper = EarlyStopping("val_loss", patience=1, min_delta=1e9)
        _fit(tmp_path, [stopper, recorder], max_steps=200)
        (end,) = recorder.calls_to("on_train_end")
        artifacts = end.args[1]
        assert artifacts.steps_completed == 2 * VAL_EVERY
        assert "did not improve" in artifacts.stop_reason
        assert len(recorder.calls_to("on_eval")) == 2


class TestFailures:
    def test_a_failing_upload_makes_fit_raise_drain_error(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A refused upload ends fit() with DrainError naming it (the default policy)."""
        # The checkpoint objects only: the pre-flight probe gets through, the uploads do not.
        fault_proxy.add(
            FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT", path="/step-")
        )
        recorder = RecordingCallback()
        with pytest.raises(lb.DrainError) as caught:
            _fit(tmp_path, [_uploader(s3_bucket, fault_proxy.url), recorder], max_steps=8)
        assert caught.value.report.failed
        # Every checkpoint fails; the report lists them in the order they ended.
        assert any("upload step 4" in r.name for r in caught.value.report.failed)
        assert recorder.hooks[-2:] == ["on_train_end", "on_run_end"]

    def test_warn_policy_only_logs(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """With on_drain_failure="warn", fit() returns and one warning names the failure."""
        # The checkpoint objects only: the pre-flight probe gets through, the uploads do not.
        fault_proxy.add(
            FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT", path="/step-")
        )
        with caplog.at_level(logging.WARNING, logger="loopbridge.loop"):
            adapter = _fit(
                tmp_path,
                [_uploader(s3_bucket, fault_proxy.url)],
                max_steps=8,
                on_drain_failure="warn",
            )
        assert adapter.drain_report is not None
        assert len(adapter.drain_report.failed) == 2
        warnings = [r for r in caplog.records if r.name == "loopbridge.loop"]
        assert len(warnings) == 1
        assert "background work not done" in warnings[0].getMessage()


class TestErrors:
    def test_a_failing_step_closes_the_run_as_failed_and_restores_checkpoint_io(
        self, tmp_path: Path
    ) -> None:
        """on_exception: on_run_end gets status FAILED and the error; the plugin is put back."""

        class Diverges(lb.Callback):
            def on_step_end(
                self,
                state: lb.LoopState,
                step_idx: int,
                batch: lb.TrainingBatch,
                metrics: dict[str, float],
            ) -> None:
                if state.step == 5:
                    raise FloatingPointError("loss is NaN")

        recorder = RecordingCallback()
        adapter = LoopbridgeCallback([recorder, Diverges()])
        trainer = pl.Trainer(
            max_steps=STEPS,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[adapter],
        )
        original = trainer.strategy.checkpoint_io
        with pytest.raises(FloatingPointError, match="loss is NaN") as caught:
            trainer.fit(TinyModule(), _data())
        assert any("Diverges.on_step_end" in note for note in caught.value.__notes__)
        (end,) = recorder.calls_to("on_run_end")
        assert end.args[1].status is lb.RunStatus.FAILED
        assert end.args[1].error is caught.value
        assert "on_train_end" not in recorder.hooks
        assert trainer.strategy.checkpoint_io is original
        assert "save_checkpoint" not in vars(trainer.strategy)  # the class's method again
        assert "save_checkpoint" not in vars(trainer)


class TestRotation:
    def test_save_top_k_1_with_slow_uploads_loses_no_checkpoint(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Uploads held back until training ends still publish every rotated-away checkpoint."""
        gate, witness, recorder = UploadGate(), Witness(), RecordingCallback()
        with lb.Bridge(max_in_flight=1) as bridge:
            _fit(
                tmp_path,
                [gate, witness, _uploader(s3_bucket), recorder],
                save_top_k=1,
                bridge=bridge,
            )
        assert gate.held.is_set()
        rows = checkpoint_rows(recorder)
        assert [row.step for row in rows] == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
        # ModelCheckpoint kept only the newest file; the others were gone before their upload.
        assert sorted((tmp_path / "ckpt").glob("*.ckpt")) == [rows[-1].path]
        check_published(s3_bucket, f"ckpts/lightning/{RUN}", rows, witness.files)
        assert no_snapshots_left(tmp_path)


class DirectorySaves(pl.strategies.SingleDeviceStrategy):
    """A strategy that writes each checkpoint as a directory itself, bypassing CheckpointIO.

    What FSDP's sharded save and torch.distributed.checkpoint strategies do on every rank.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(filepath)
        path.mkdir(parents=True)
        torch.save(checkpoint["state_dict"], path / "model.pt")
        torch.save({"global_step": checkpoint["global_step"]}, path / "meta.pt")


class TestStrategySaves:
    def _trainer(self, tmp_path: Path, strategy: Any, adapter: LoopbridgeCallback) -> pl.Trainer:
        checkpoints = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=CKPT_EVERY, save_top_k=-1
        )
        return pl.Trainer(
            max_steps=2 * CKPT_EVERY,
            default_root_dir=tmp_path / "out",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            strategy=strategy,
            callbacks=[adapter, checkpoints],
        )

    def test_a_save_that_bypasses_checkpoint_io_is_seen_once_and_published(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """A strategy writing checkpoint directories itself: each fires on_checkpoint once."""
        recorder, witness = RecordingCallback(), Witness()
        adapter = LoopbridgeCallback([witness, _uploader(s3_bucket), recorder], run_name=RUN)
        strategy = DirectorySaves(device=torch.device("cpu"))
        trainer = self._trainer(tmp_path, strategy, adapter)
        trainer.fit(TinyModule(), _data())
        assert adapter.drain_report is not None
        assert adapter.drain_report.ok
        rows = checkpoint_rows(recorder)
        assert [row.step for row in rows] == [CKPT_EVERY, 2 * CKPT_EVERY]
        assert all(row.path.is_dir() for row in rows)
        assert sorted(witness.files[CKPT_EVERY]) == ["meta.pt", "model.pt"]
        check_published(s3_bucket, f"ckpts/lightning/{RUN}", rows, witness.files)
        assert "save_checkpoint" not in vars(strategy)
        assert "save_checkpoint" not in vars(trainer)

    def test_a_save_through_checkpoint_io_fires_once_and_a_users_override_is_kept(
        self, tmp_path: Path
    ) -> None:
        """The default path is seen by both observers and fires once; an instance override stays."""
        recorder = RecordingCallback()
        strategy = pl.strategies.SingleDeviceStrategy(device=torch.device("cpu"))
        calls: list[str] = []
        own = strategy.save_checkpoint

        def users_save(
            checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
        ) -> None:
            calls.append(str(filepath))
            own(checkpoint, filepath, storage_options=storage_options)

        strategy.save_checkpoint = users_save  # type: ignore[method-assign]
        trainer = self._trainer(tmp_path, strategy, LoopbridgeCallback([recorder]))
        trainer.fit(TinyModule(), _data())
        rows = checkpoint_rows(recorder)
        assert [row.step for row in rows] == [CKPT_EVERY, 2 * CKPT_EVERY]
        assert [str(row.path) for row in rows] == calls
        assert all(row.path.is_file() for row in rows)
        assert vars(strategy)["save_checkpoint"] is users_save
