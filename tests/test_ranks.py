"""Ranks without torchrun: detection, rank-0 gating, sharded commits and report merging."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge._rank_reports import RankTaskError, _report_of, _summary, gather_reports
from loopbridge.callbacks import CheckpointUploader, JsonlLogger, TensorBoardLogger, WandbLogger
from loopbridge.callbacks._sharded import (
    RANKS_FILE,
    ShardedCommit,
    failed_marker,
    ranks_file,
    read_ranks_file,
)
from loopbridge.integrations._run import (
    ForeignRun,
    check_ranks_agree,
    needs_every_rank,
    refuse_rank_zero_only,
)
from loopbridge.journal import JOURNAL_FILE, journal_file
from loopbridge.stores import LocalStore


class TestDetect:
    def test_torchrun_environment(self) -> None:
        """RANK, WORLD_SIZE and LOCAL_RANK give the rank."""
        info = lb.detect_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
        assert info == lb.RankInfo(rank=3, world_size=4, local_rank=1)
        assert info.distributed
        assert not info.is_zero

    def test_no_environment_is_one_process(self) -> None:
        """Without the variables a process is rank 0 of 1."""
        assert lb.detect_rank({}) == lb.RankInfo()

    @pytest.mark.parametrize(
        ("env", "named"),
        [
            ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2"),
            ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ],
    )
    def test_bad_environment_is_named(self, env: dict[str, str], named: str) -> None:
        """A rank out of range or not a number is refused, naming the variables."""
        with pytest.raises(ValueError, match=named):
            lb.detect_rank(env)

    def test_import_does_not_import_torch(self) -> None:
        """`import loopbridge` leaves torch alone."""
        import subprocess
        import sys

        code = "import sys, loopbridge; print('torch' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert out.stdout.strip() == "False", out.stderr


class Recorder(lb.Callback):
    """A logger-like callback that records the steps it saw."""

    rank_zero_only = True

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(
        self, state: lb.LoopState, step_idx: int, batch: lb.TrainingBatch, metrics: dict[str, float]
    ) -> None:
        self.steps.append(state.step)


class TestGating:
    def test_rank_zero_only_is_left_out_on_other_ranks(self) -> None:
        """On rank 1 a rank-0-only callback is not registered; every_rank() brings it back."""
        gated, everywhere = Recorder(), lb.every_rank(Recorder())
        callbacks = lb.CallbackList([gated, everywhere], rank=lb.RankInfo(1, 2))
        assert list(callbacks) == [everywhere]
        on_zero = lb.CallbackList([Recorder()], rank=lb.RankInfo(0, 2))
        assert len(on_zero) == 1

    def test_gated_callbacks_are_still_checked(self) -> None:
        """A bad callback is refused on every rank, not only where it would run."""

        class Bad(lb.Callback):
            rank_zero_only = True

            async def on_train_start(self, state: lb.LoopState) -> None:  # type: ignore[override]
                pass

        with pytest.raises(lb.CallbackValidationError):
            lb.CallbackList([Bad()], rank=lb.RankInfo(1, 2))

    def test_loggers_act_on_rank_zero_by_default(self) -> None:
        """The built-in loggers and the default uploader are rank-0-only; sharded is not."""
        assert JsonlLogger.rank_zero_only
        assert TensorBoardLogger.rank_zero_only
        assert WandbLogger.rank_zero_only
        assert CheckpointUploader("/tmp/unused").rank_zero_only
        assert not CheckpointUploader("/tmp/unused", ranks="sharded").rank_zero_only

    def test_loop_state_and_context_carry_the_rank(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Under torchrun's environment, LoopState and LogContext say rank and world size."""
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        seen = lb.every_rank(Recorder())
        loop = lb.TrainLoop(lambda s, b: {}, range(2), out_dir=tmp_path, callbacks=[seen])
        assert (loop.state.rank, loop.state.world_size) == (1, 2)
        assert (loop.ctx.rank, loop.ctx.world_size) == (1, 2)
        loop.run()
        assert seen.steps == [1, 2]

    def test_run_loggers_on_every_rank_name_each_ranks_run(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Made to act on every rank, TensorBoard gets one run directory per rank."""
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        logger = lb.every_rank(TensorBoardLogger(tmp_path / "tb"))
        loop = lb.TrainLoop(
            lambda s, b: {"loss": 1.0},
            range(2),
            out_dir=tmp_path / "out",
            callbacks=[logger],
            run_name="r",
        )
        loop.run()
        assert [p.name for p in (tmp_path / "tb").iterdir()] == ["r.rank-1"]

    def test_bad_mode_is_named(self) -> None:
        """An unknown saving mode names both choices."""
        with pytest.raises(ValueError, match=r"'zero'.*'sharded'"):
            CheckpointUploader("/tmp/unused", ranks="all")  # type: ignore[arg-type]


def _files(store: LocalStore, key: str, data: bytes) -> list[dict[str, object]]:
    result = asyncio.run(store.put_bytes(key, data))
    return [{"path": key.rsplit("/", 1)[-1], "size": result.size, "digest": result.digest}]


def _row(step: int, path: Path) -> lb.ManifestRow:
    return lb.ManifestRow(step, path, 0, None, 0.0)


class TestShardedCommit:
    def test_gather_merges_every_rank(self, tmp_path: Path) -> None:
        """With both markers present the publisher gets all files and their total size."""
        store = LocalStore(tmp_path / "store")
        for rank in (0, 1):
            files = _files(store, f"run/step-1/shard-{rank}", bytes([rank]) * 10)
            commit = ShardedCommit(lb.RankInfo(rank, 2), timeout=5)
            asyncio.run(commit.commit(store, _row(1, tmp_path), "run/step-1", files, []))
        publisher = ShardedCommit(lb.RankInfo(0, 2), timeout=5)
        row, files = asyncio.run(publisher.gather(store, _row(1, tmp_path), "run/step-1"))
        assert [f["path"] for f in files] == ["shard-0", "shard-1"]
        assert row.size_bytes == 20
        assert row.digest is not None

    def test_a_failed_rank_is_named_with_its_files(self, tmp_path: Path) -> None:
        """A failure marker fails the step at once, naming the rank, its files and error."""
        store = LocalStore(tmp_path / "store")
        local = tmp_path / "ckpt"
        local.mkdir()
        (local / "shard-1").write_bytes(b"x")
        failing = ShardedCommit(lb.RankInfo(1, 2), timeout=5)
        asyncio.run(failing.report_failure(store, _row(1, local), "run/step-1", OSError("denied")))
        assert asyncio.run(store.get_bytes(f"run/step-1/{failed_marker(1)}")) is not None
        publisher = ShardedCommit(lb.RankInfo(0, 2), timeout=5)
        with pytest.raises(lb.IntegrityError, match=r"rank 1 failed .*\(shard-1\): OSError"):
            asyncio.run(publisher.gather(store, _row(1, local), "run/step-1"))

    def test_a_missing_rank_times_out_naming_it(self, tmp_path: Path) -> None:
        """No marker from rank 1 within the timeout: the step is not published, rank 1 named."""
        store = LocalStore(tmp_path / "store")
        publisher = ShardedCommit(lb.RankInfo(0, 2), timeout=0.2)
        files = _files(store, "run/step-1/shard-0", b"0")
        asyncio.run(publisher.commit(store, _row(1, tmp_path), "run/step-1", files, []))
        with pytest.raises(lb.IntegrityError, match=r"rank\(s\) 1 did not finish"):
            asyncio.run(publisher.gather(store, _row(1, tmp_path), "run/step-1"))

    def test_two_ranks_writing_one_name_differently_is_refused(self, tmp_path: Path) -> None:
        """The same file name with different contents from two ranks cannot be published."""
        store = LocalStore(tmp_path / "store")
        for rank in (0, 1):
            commit = ShardedCommit(lb.RankInfo(rank, 2))
            marker_files = [{"path": "same", "size": 1, "digest": f"blake3:{rank}" + "0" * 63}]
            asyncio.run(store.put_bytes("run/step-1/same", b"x"))
            asyncio.run(commit.commit(store, _row(1, tmp_path), "run/step-1", marker_files, []))
        with pytest.raises(lb.IntegrityError, match="both wrote same"):
            asyncio.run(
                ShardedCommit(lb.RankInfo(0, 2)).gather(store, _row(1, tmp_path), "run/step-1")
            )

    def test_a_failed_rank_discards_only_its_own_files(self, tmp_path: Path) -> None:
        """A rank's failure deletes what it sent, never another rank's part of the step."""
        store = LocalStore(tmp_path / "store")
        local = tmp_path / "ckpt"
        local.mkdir()
        (local / "shard-0").write_bytes(b"0")
        other = ShardedCommit(lb.RankInfo(1, 2))
        files = _files(store, "run/step-1/shard-1", b"1")
        asyncio.run(other.commit(store, _row(1, tmp_path), "run/step-1", files, []))
        _files(store, "run/step-1/shard-0", b"0")
        failing = ShardedCommit(lb.RankInfo(0, 2))
        sent = ["run/step-1/_RANK-00000.json"]
        asyncio.run(failing.report_failure(store, _row(1, local), "run/step-1", OSError("x")))
        asyncio.run(failing.discard(store, _row(1, local), "run/step-1", sent))
        keys = sorted(info.key for info in asyncio.run(store.list("run/step-1/")))
        assert keys == [
            f"run/step-1/{failed_marker(0)}",
            "run/step-1/_RANK-00001.json",
            "run/step-1/shard-1",
        ]

    def test_resume_never_sweeps_other_ranks_parts(self, tmp_path: Path) -> None:
        """A sharded rank's resume leaves unpublished steps alone: other ranks' parts wait."""
        store = LocalStore(tmp_path / "store")
        _files(store, "run/step-00000001/shard-1", b"1")
        uploader = CheckpointUploader(
            "", store=store, journal=False, ranks="sharded", rank=lb.RankInfo(1, 2)
        )
        assert asyncio.run(uploader.sweep_unpublished("run")) == []
        assert asyncio.run(store.get_bytes("run/step-00000001/shard-1")) == b"1"

    def test_ranks_file_round_trip(self, tmp_path: Path) -> None:
        """The out dir remembers each rank for `loopbridge resume`, one file per rank."""
        ShardedCommit(lb.RankInfo(1, 2), timeout=7).write_ranks_file(tmp_path)
        ShardedCommit(lb.RankInfo(0, 2), timeout=7).write_ranks_file(tmp_path)
        assert ranks_file(1) == "loopbridge-ranks.rank-00001.json"
        assert json.loads((tmp_path / ranks_file(1)).read_text())["rank"] == 1
        assert json.loads((tmp_path / RANKS_FILE).read_text())["rank"] == 0
        assert read_ranks_file(tmp_path, 1) == ShardedCommit(lb.RankInfo(1, 2), timeout=7)
        assert read_ranks_file(tmp_path) == ShardedCommit(lb.RankInfo(0, 2), timeout=7)
        assert read_ranks_file(tmp_path / "none") is None


class TestShardedLoops:
    def test_two_ranks_in_threads_publish_one_checkpoint(self, tmp_path: Path) -> None:
        """Two loops acting as ranks 0 and 1 publish each step once, with both shards."""
        dest = tmp_path / "store"
        barrier = threading.Barrier(2)

        def run(rank: int) -> lb.LoopArtifacts:
            def save(state: lb.LoopState, path: Path) -> None:
                path.mkdir()
                (path / f"shard-{rank}").write_bytes(bytes([rank]) * 100 + bytes([state.step]))

            def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
                barrier.wait(10)  # the ranks step together, as DDP's all-reduce makes them
                return {}

            uploader = CheckpointUploader(
                dest, ranks="sharded", rank=lb.RankInfo(rank, 2), rank_timeout=30
            )
            loop = lb.TrainLoop(
                step,
                range(4),
                out_dir=tmp_path / f"rank-{rank}",
                save=save,
                checkpoint_every=2,
                callbacks=[uploader],
                run_name="run",
            )
            return loop.run()

        results: dict[int, lb.LoopArtifacts] = {}
        threads = [
            threading.Thread(target=lambda r=r: results.__setitem__(r, run(r))) for r in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results) == [0, 1]
        manifest = json.loads((dest / "run" / "manifest.json").read_text())
        assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
        for entry in manifest["checkpoints"]:
            assert [f["path"] for f in entry["files"]] == ["shard-0", "shard-1"]


class TestSharedOutDir:
    def test_two_ranks_in_one_step_dir_each_upload_their_own_files(self, tmp_path: Path) -> None:
        """Lightning's layout: one out dir, one DCP step dir; each rank sends only its files."""
        out, dest = tmp_path / "out", tmp_path / "store"
        step_dir = out / "checkpoints" / "step=2.ckpt"
        step_dir.mkdir(parents=True)
        for name, size in ((".metadata", 10), ("__0_0.distcp", 300), ("__1_0.distcp", 200)):
            (step_dir / name).write_bytes(b"x" * size)
        (step_dir / "meta.pt").write_bytes(b"m")
        barrier = threading.Barrier(2)

        def run(rank: int) -> ForeignRun:
            uploader = CheckpointUploader(
                dest, ranks="sharded", rank=lb.RankInfo(rank, 2), rank_timeout=30
            )
            foreign = ForeignRun([uploader], run_name="run")
            foreign.start(run_name="run", experiment_name="", out_dir=out, max_steps=2)
            barrier.wait(10)  # both ranks' journals are open in the out dir at once
            foreign.checkpoint(step_dir, 2)
            foreign.end("max_steps")
            return foreign

        runs: dict[int, ForeignRun] = {}
        threads = [threading.Thread(target=lambda r=r: runs.__setitem__(r, run(r))) for r in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(runs) == [0, 1]
        assert all(run.drain_report is not None and run.drain_report.ok for run in runs.values())
        step = dest / "run" / "step-00000002"
        markers = {
            rank: [
                f["path"]
                for f in json.loads((step / f"_RANK-{rank:05d}.json").read_text())["files"]
            ]
            for rank in (0, 1)
        }
        assert markers == {0: [".metadata", "__0_0.distcp", "meta.pt"], 1: ["__1_0.distcp"]}
        complete = json.loads((step / "_COMPLETE").read_text())
        assert [f["path"] for f in complete["files"]] == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "meta.pt",
        ]
        assert complete["size_bytes"] == 511
        journals = sorted(p.name for p in out.glob("*.sqlite3"))
        assert journals == [journal_file(1), JOURNAL_FILE]
        assert (out / RANKS_FILE).exists()
        assert (out / ranks_file(1)).exists()
        assert not list((out / "checkpoints" / ".loopbridge-snapshots").glob("*/*"))


class TestAdaptersOnRankZeroOnly:
    def test_which_callbacks_need_every_rank(self, tmp_path: Path) -> None:
        """A sharded uploader and an every_rank() logger; not loggers, zero-mode uploaders."""
        sharded = CheckpointUploader(tmp_path, ranks="sharded", rank=lb.RankInfo(1, 2))
        zero = CheckpointUploader(tmp_path, rank=lb.RankInfo(1, 2))
        logger = JsonlLogger(tmp_path / "a.jsonl")
        assert needs_every_rank(sharded)
        assert needs_every_rank(lb.every_rank(JsonlLogger(tmp_path / "b.jsonl")))
        assert not needs_every_rank(zero)
        assert not needs_every_rank(logger)
        assert not needs_every_rank(Recorder())

    def test_refused_naming_the_callback_and_the_fix(self, tmp_path: Path) -> None:
        """The message names the callback and `all_ranks=True`; other callbacks pass."""
        every = lb.every_rank(JsonlLogger(tmp_path / "b.jsonl"))
        run = ForeignRun([Recorder(), every])
        with pytest.raises(ValueError, match="all_ranks=True") as caught:
            refuse_rank_zero_only(run, "LoopbridgeTrainerCallback", 2)
        message = str(caught.value)
        assert "every_rank(JsonlLogger(...))" in message
        assert "2-process job" in message
        assert message.startswith("LoopbridgeTrainerCallback(all_ranks=False)")
        refuse_rank_zero_only(ForeignRun([Recorder()]), "LoopbridgeCallback", 2)

    def test_all_ranks_needs_the_rank_the_framework_gives(self, tmp_path: Path) -> None:
        """Callbacks made before the framework set the rank (its own launcher): refused."""
        run = ForeignRun([Recorder()])  # detected here: rank 0/1 (no torchrun environment)
        check_ranks_agree(run, "LoopbridgeCallback", "Lightning", 0, 1)
        with pytest.raises(ValueError, match="Launch the job with torchrun") as caught:
            check_ranks_agree(run, "LoopbridgeCallback", "Lightning", 1, 2)
        assert "the callbacks took this process for rank 0/1" in str(caught.value)
        assert "Lightning runs it as rank 1/2" in str(caught.value)
        uploader = CheckpointUploader(tmp_path, ranks="sharded", rank=lb.RankInfo(1, 2))
        with pytest.raises(ValueError, match="ranks='sharded'") as caught:
            check_ranks_agree(ForeignRun([uploader]), "LoopbridgeCallback", "Lightning", 0, 1)
        assert "took this process for rank 1/2" in str(caught.value)


class TestReports:
    def test_another_ranks_report_names_the_rank(self) -> None:
        """A rank's summary becomes records named after it, failures kept as errors."""
        failed = lb.TaskRecord("upload step 2", "k", OSError("denied"))
        report = lb.DrainReport(completed=3, failed=(failed,))
        merged = lb.DrainReport(completed=1).merge(_report_of(1, _summary(report)))
        assert merged.completed == 4
        assert not merged.ok
        (record,) = merged.failed
        assert record.name == "rank 1: upload step 2"
        assert isinstance(record.exception, RankTaskError)
        assert "OSError: denied" in str(record.exception)


class TestGatherOverTCPStore:
    """The real mechanism: a torch TCPStore on loopback, as torchrun serves one."""

    @pytest.fixture
    def tcp_store(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns when numpy is missing
            import torch.distributed as dist
        master = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
        )
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(master.port))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", uuid.uuid4().hex)
        return master

    def test_rank_zero_report_holds_rank_ones_failure(self, tcp_store: Any) -> None:
        """Rank 1's failed upload is in rank 0's merged report, named after rank 1."""
        failed = lb.TaskRecord("upload step 2", None, OSError("denied: shard-1.bin"))
        own = lb.DrainReport(completed=1, failed=(failed,))
        assert gather_reports(own, lb.RankInfo(1, 2), run_name="r", timeout=10) is own
        merged = gather_reports(
            lb.DrainReport(completed=2), lb.RankInfo(0, 2), run_name="r", timeout=10
        )
        assert merged.completed == 3
        assert [r.name for r in merged.failed] == ["rank 1: upload step 2"]
        assert "shard-1.bin" in merged.summary()

    def test_a_foreign_run_on_every_rank_gathers_on_rank_zero(
        self, tcp_store: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """An adapter firing on every rank ends its run with every rank's report on rank 0."""
        failed = lb.TaskRecord("upload step 2", None, OSError("denied"))
        gather_reports(
            lb.DrainReport(failed=(failed,)), lb.RankInfo(1, 2), run_name="fr", timeout=10
        )
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        run = ForeignRun([], all_ranks=True, drain_timeout=5)
        run.start(run_name="fr", experiment_name="e", out_dir=tmp_path, max_steps=1)
        with pytest.raises(lb.DrainError, match="rank 1: upload step 2"):
            run.end("max_steps")
        # Firing on rank 0 only (the adapters' default), no other rank reports: none awaited.
        alone = ForeignRun([], drain_timeout=5)
        alone.start(run_name="fr", experiment_name="e", out_dir=tmp_path, max_steps=1)
        assert alone.end("max_steps").ok

    def test_a_silent_rank_is_a_failure_on_rank_zero(self, tcp_store: Any) -> None:
        """A rank that sends no report within the bound fails rank 0's report, named."""
        merged = gather_reports(lb.DrainReport(), lb.RankInfo(0, 2), run_name="s", timeout=0.3)
        assert [r.name for r in merged.failed] == ["rank 1"]
        assert "rank 1 sent no report" in str(merged.failed[0].exception)
