"""`lb.restore`: published checkpoints come back verified, from moto, rclone and a directory.

Checkpoints are published by a real `CheckpointUploader` under a real `TrainLoop`, so the
reader is tested against the layout the writer actually makes. Damage is done underneath the
store's API (boto3 or the filesystem), as a bad disk, a bug or another tool would do it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tests.fixtures.s3 import Delay, FaultProxy, FaultRule, Hang, S3Bucket, Status
from tests.restore_helpers import (
    Dest,
    ScriptWorker,
    checkpoint_bytes,
    publish,
    shard_saver,
    tree,
)

import loopbridge as lb
from loopbridge._digest import digest_path

WORKER = Path(__file__).with_name("restore_worker.py")


@pytest.fixture(params=["local", "s3", "rclone"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Dest:
    """A destination to publish to: a directory, or a prefix of a fresh moto or rclone bucket."""
    if request.param == "local":
        root = tmp_path / "store"
        return Dest(url=str(root), root=root)
    fixture = "s3_bucket" if request.param == "s3" else "rclone_bucket"
    bucket: S3Bucket = request.getfixturevalue(fixture)
    return Dest(
        url=f"s3://{bucket.name}/ckpts", options={"endpoint_url": bucket.endpoint}, bucket=bucket
    )


def _restore(dest: Dest, to: Path, **kwargs: object) -> lb.Restored:
    return lb.restore(dest.url, to=to, **kwargs, **dest.options)  # type: ignore[arg-type]


class TestRestore:
    def test_latest_file_checkpoint(self, dest: Dest, tmp_path: Path) -> None:
        """With no step, the checkpoint `latest` names comes back with its bytes and row."""
        artifacts = publish(dest, tmp_path / "out")
        final = artifacts.manifest[-1]
        restored = _restore(dest, tmp_path / "back", run="run-a")
        assert restored.step == final.step == 6
        assert restored.path.read_bytes() == final.path.read_bytes()
        assert restored.row.digest == final.digest == digest_path(restored.path)[1]
        assert restored.row.is_final
        assert restored.downloaded_bytes == final.size_bytes
        assert (tmp_path / "back" / "step-00000006.complete.json").is_file()

    def test_given_step_directory_of_shards(self, dest: Dest, tmp_path: Path) -> None:
        """An older step, a directory of shards, comes back as the same directory."""
        artifacts = publish(dest, tmp_path / "out", save=shard_saver)
        saved = artifacts.manifest[1]
        restored = _restore(dest, tmp_path / "back", run="run-a", step=4)
        assert restored.path == tmp_path / "back" / "step-00000004"
        assert restored.path.is_dir()
        assert tree(restored.path) == tree(saved.path)
        assert restored.row.digest == saved.digest

    def test_second_restore_keeps_verified_files(self, dest: Dest, tmp_path: Path) -> None:
        """Files already restored with the published sha256 are kept, not downloaded again."""
        publish(dest, tmp_path / "out", save=shard_saver)
        _restore(dest, tmp_path / "back")
        again = _restore(dest, tmp_path / "back")
        assert (again.downloaded_bytes, again.reused_files) == (0, 3)

    def test_stray_files_in_the_step_directory_are_removed(
        self, dest: Dest, tmp_path: Path
    ) -> None:
        """The restored directory holds exactly the checkpoint's files, nothing left over."""
        artifacts = publish(dest, tmp_path / "out", save=shard_saver)
        (tmp_path / "back" / "step-00000006").mkdir(parents=True)
        (tmp_path / "back" / "step-00000006" / "extra.bin").write_bytes(b"not a shard")
        restored = _restore(dest, tmp_path / "back")
        assert tree(restored.path) == tree(artifacts.manifest[-1].path)

    def test_run_named_by_trailing_part_inside_an_experiment(
        self, dest: Dest, tmp_path: Path
    ) -> None:
        """An experiment's run is found by its full path or a unique tail of it."""
        uploader = dest.uploader()

        def build(ctx: lb.LogContext) -> lb.TrainLoop:
            def save(state: lb.LoopState, path: Path) -> None:
                path.write_bytes(str(ctx.run_name).encode())

            return lb.TrainLoop(
                lambda state, batch: None,
                range(2),
                max_steps=2,
                out_dir=tmp_path / "exp" / str(ctx.run_name),
                save=save,
            )

        result = lb.Experiment(
            "my exp", {"a": {}, "b": {}}, build, n_repeats=2, callbacks=[uploader]
        ).run()
        assert result.ok
        restored = _restore(dest, tmp_path / "b1", run="b-r1")
        assert restored.run == "my%20exp/b/b-r1"
        assert restored.path.read_bytes() == b"b-r1"
        assert _restore(dest, tmp_path / "a0", run="my exp/a/a-r0").path.read_bytes() == b"a-r0"

    def test_missing_or_ambiguous_run_lists_the_runs(self, dest: Dest, tmp_path: Path) -> None:
        """A run that is not there, or no run named where there are several, lists them."""
        publish(dest, tmp_path / "a", run_name="run-a", steps=2)
        publish(dest, tmp_path / "b", run_name="run-b", steps=2)
        with pytest.raises(lb.RestoreError, match=r"no run 'run-c'.*run-a, run-b"):
            _restore(dest, tmp_path / "back", run="run-c")
        with pytest.raises(lb.RestoreError, match=r"holds 2 runs; choose one.*run-a, run-b"):
            _restore(dest, tmp_path / "back")


class TestRefusals:
    def test_corrupted_object_is_refused_naming_it(self, dest: Dest, tmp_path: Path) -> None:
        """Bytes that differ from the published digest fail the restore; nothing looks restored."""
        publish(dest, tmp_path / "out")
        key = "run-a/step-00000006/step-00000006"
        data = bytearray(dest.read(key))
        data[100] ^= 0xFF
        dest.write(key, bytes(data))
        with pytest.raises(lb.IntegrityError, match=rf"{key}.*its digest is blake3:") as caught:
            _restore(dest, tmp_path / "back")
        assert caught.value.key is not None
        assert caught.value.key.endswith(key)
        back = tmp_path / "back"
        assert not (back / "step-00000006" / "step-00000006").exists()
        assert not (back / "step-00000006.complete.json").exists()
        assert list(back.rglob(".lb-tmp-*")) == []

    def test_missing_shard_is_refused_naming_it(self, dest: Dest, tmp_path: Path) -> None:
        """A published checkpoint with a shard gone is an error naming the shard, no fall-back."""
        publish(dest, tmp_path / "out", save=shard_saver)
        key = "run-a/step-00000006/opt/state.bin"
        dest.delete(key)
        with pytest.raises(lb.IntegrityError, match=rf"{key} is missing: step 6 was published"):
            _restore(dest, tmp_path / "back")
        assert not (tmp_path / "back" / "step-00000006.complete.json").exists()

    def test_unpublished_step_is_never_restored(self, dest: Dest, tmp_path: Path) -> None:
        """Objects of a step with no marker and no manifest entry are not a checkpoint."""
        publish(dest, tmp_path / "out")
        dest.write("run-a/step-00000008/step-00000008", checkpoint_bytes(8))
        with pytest.raises(lb.RestoreError, match=r"step 8 .* not published.*never restored"):
            _restore(dest, tmp_path / "back", step=8)
        # `latest` still names step 6, which comes back; step 8 is not taken for newer.
        assert _restore(dest, tmp_path / "back").step == 6

    def test_marker_missing_for_a_manifest_step_is_refused(
        self, dest: Dest, tmp_path: Path
    ) -> None:
        """A manifest entry whose completion marker is gone is refused, naming the marker."""
        publish(dest, tmp_path / "out")
        dest.delete("run-a/step-00000006/_COMPLETE")
        with pytest.raises(lb.IntegrityError, match=r"step-00000006/_COMPLETE is missing"):
            _restore(dest, tmp_path / "back")

    def test_run_with_only_leftovers_has_nothing_to_restore(
        self, dest: Dest, tmp_path: Path
    ) -> None:
        """A run that never published anything is refused, even though objects exist."""
        dest.write("run-z/step-00000002/step-00000002", b"half")
        with pytest.raises(lb.RestoreError, match=r"run-z has no published checkpoint"):
            _restore(dest, tmp_path / "back", run="run-z")

    def test_latest_and_manifest_disagreeing_is_refused(self, dest: Dest, tmp_path: Path) -> None:
        """`latest` naming a step the manifest lacks is damage, not a reason to guess."""
        publish(dest, tmp_path / "out")
        latest = json.loads(dest.read("run-a/latest"))
        dest.write("run-a/latest", json.dumps({**latest, "step": 99}).encode())
        with pytest.raises(lb.IntegrityError, match=r"run-a/latest names step 99"):
            _restore(dest, tmp_path / "back")


class TestS3Refusals:
    def test_403_names_the_object(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A store answering 403 for a checkpoint file fails at once, naming that object."""
        direct = Dest(
            url=f"s3://{s3_bucket.name}/ckpts",
            options={"endpoint_url": s3_bucket.endpoint},
            bucket=s3_bucket,
        )
        publish(direct, tmp_path / "out")
        rule = fault_proxy.add(
            FaultRule(
                (Status(403, "AccessDenied", "Access Denied"),),
                path=r"step-00000006/step-00000006",
            )
        )
        proxied = Dest(url=direct.url, options={"endpoint_url": fault_proxy.url})
        with pytest.raises(lb.PermanentStoreError, match=r"ckpts/run-a/step-00000006/step-0+6"):
            _restore(proxied, tmp_path / "back")
        assert rule.fired == 1  # refused, not retried
        assert not (tmp_path / "back" / "step-00000006" / "step-00000006").exists()

    def test_transient_errors_are_retried(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A 503 on a ranged part is retried under the store's policy; the restore succeeds."""
        direct = Dest(
            url=f"s3://{s3_bucket.name}/ckpts",
            options={"endpoint_url": s3_bucket.endpoint},
            bucket=s3_bucket,
        )
        size = 11 * (1 << 20)
        publish(direct, tmp_path / "out", steps=2, save=_big_saver(size))
        fault_proxy.add(
            FaultRule((Status(503),), method="GET", path=r"step-00000002/step-0+2", times=2)
        )
        restored = lb.restore(
            direct.url,
            to=tmp_path / "back",
            endpoint_url=fault_proxy.url,
            part_size=5 << 20,
            retry_base_delay=0,
        )
        assert restored.path.read_bytes() == checkpoint_bytes(2, size)
        gets = fault_proxy.requests("GET", r"step-00000002/step-00000002")
        assert len(gets) == 3 + 2  # three ranged parts, two of them answered 503 first

    def test_object_replaced_mid_download_is_refused(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A GET that reaches an object replaced since the HEAD fails (If-Match), no mixing."""
        key = "ckpts/obj"
        s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"old" * 1000)
        arrived = fault_proxy.arrived("GET", r"/ckpts/obj")
        fault_proxy.add(FaultRule((Delay(2.0),), method="GET", path=r"/ckpts/obj", times=1))

        async def get() -> None:
            store = lb.stores.S3Store(s3_bucket.name, "ckpts", endpoint_url=fault_proxy.url)
            async with store:
                task = asyncio.create_task(store.get_file("obj", tmp_path / "obj"))
                assert await asyncio.to_thread(arrived.wait, 30)
                s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"new" * 1000)
                await task

        with pytest.raises(lb.PermanentStoreError, match=r"ckpts/obj.*PreconditionFailed"):
            asyncio.run(get())
        assert list(tmp_path.iterdir()) == []


def _big_saver(size: int):  # type: ignore[no-untyped-def]
    def save(state: lb.LoopState, path: Path) -> None:
        path.write_bytes(checkpoint_bytes(state.step, size))

    return save


class TestInterrupted:
    def test_killed_restore_leaves_nothing_that_looks_complete(
        self, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """SIGKILL mid-download: no partial file under a final name; the next restore finishes."""
        direct = Dest(
            url=f"s3://{s3_bucket.name}/ckpts",
            options={"endpoint_url": s3_bucket.endpoint},
            bucket=s3_bucket,
        )
        size = 11 * (1 << 20)

        def save(state: lb.LoopState, path: Path) -> None:
            shard_saver(state, path)
            (path / "big.bin").write_bytes(checkpoint_bytes(state.step, size))

        artifacts = publish(direct, tmp_path / "out", steps=2, save=save)
        saved = tree(artifacts.manifest[-1].path)
        # Every second GET of the big shard never answers: its first range lands, the next hangs.
        fault_proxy.add(FaultRule((Hang(),), method="GET", path=r"big\.bin", every=2))
        back = tmp_path / "back"
        worker = ScriptWorker(WORKER, [direct.url, fault_proxy.url, str(back)])
        try:
            worker.wait_for(lambda line: line.startswith("wrote big.bin "), "a first piece")
        finally:
            worker.kill()
        step_dir = back / "step-00000002"
        assert not (back / "step-00000002.complete.json").exists()
        assert not (step_dir / "big.bin").exists()
        # What arrived is in a temporary file (ranges land at their offsets, in any order).
        assert len(list(step_dir.glob(".lb-tmp-*big.bin"))) == 1
        for rel, data in tree(step_dir).items():
            if not Path(rel).name.startswith(".lb-tmp-"):
                assert data == saved[rel], f"{rel} is under its final name but not complete"

        fault_proxy.clear()
        restored = lb.restore(direct.url, to=back, endpoint_url=s3_bucket.endpoint)
        assert tree(restored.path) == saved
        assert restored.downloaded_bytes >= size
        assert list(back.rglob(".lb-tmp-*")) == []
        assert (back / "step-00000002.complete.json").is_file()
