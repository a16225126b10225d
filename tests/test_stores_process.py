"""ProcessStore: S3Store's file uploads in a worker process, against moto via the fault proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from loopbridge._digest import file_digest
from loopbridge._exceptions import PermanentStoreError, StoreError
from loopbridge.callbacks import CheckpointUploader
from loopbridge.stores import ObjectStore, PutsInOrder, S3Store, put_in_order
from loopbridge.stores._process import ProcessStore
from tests.fixtures.s3 import FaultProxy, FaultRule, Hang, S3Bucket, Status

MiB = 1 << 20
Factory = Callable[..., ProcessStore]


@pytest.fixture
async def make_store(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> AsyncIterator[Factory]:
    """ProcessStores through the proxy; closed (worker stopped) after the test."""
    stores: list[ProcessStore] = []

    def make(**options: Any) -> ProcessStore:
        settings: dict[str, Any] = {
            "endpoint_url": fault_proxy.url,
            "part_size": 5 * MiB,
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "call_timeout": 10.0,
        }
        settings.update(options)
        store = ProcessStore(S3Store(s3_bucket.name, "pre", **settings))
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode()


def _worker_pid(store: ProcessStore) -> int:
    worker = store._worker
    assert worker is not None
    return worker.proc.pid


async def test_files_go_up_from_one_reused_worker_process(
    make_store: Factory, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """put_file runs in another process, the same one each time; small calls stay here."""
    store = make_store()
    assert isinstance(store, ObjectStore)
    shas = []
    for name, size in (("big", 12 * MiB), ("small", 1000)):
        shas.append(_random_file(tmp_path / name, size))
        digest = file_digest(tmp_path / name)[1]
        result = await store.put_file(f"k/{name}", tmp_path / name, expected_digest=digest)
        assert result.digest == digest
        assert s3_bucket.sha256(f"pre/k/{name}") == shas[-1]
        pid = _worker_pid(store)
        assert pid != os.getpid()
        if name == "big":
            first = pid
    assert _worker_pid(store) == first
    await store.put_bytes("k/marker", b"{}")
    assert await store.get_bytes("k/marker") == b"{}"


async def test_errors_come_back_as_the_same_class_naming_the_key(
    make_store: Factory, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A refused upload in the worker is the PermanentStoreError the caller would get here."""
    fault_proxy.add(FaultRule((Status(403, "AccessDenied", "Access Denied"),), method="PUT"))
    _random_file(tmp_path / "f", 1000)
    with pytest.raises(PermanentStoreError, match="AccessDenied") as caught:
        await make_store().put_file("k/f", tmp_path / "f")
    assert caught.value.key == "pre/k/f"


async def test_a_dead_worker_fails_its_upload_by_name_and_the_next_one_starts_afresh(
    make_store: Factory, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """SIGKILL of the worker mid-upload is a StoreError naming the key, not a hang."""
    rule = FaultRule((Hang(),), method="PUT", path="partNumber=")
    fault_proxy.add(rule)
    arrived = fault_proxy.arrived("PUT", "partNumber=")
    _random_file(tmp_path / "big", 11 * MiB)
    store = make_store()
    task = asyncio.create_task(store.put_file("k/big", tmp_path / "big"))
    assert await asyncio.to_thread(arrived.wait, 30)
    os.kill(_worker_pid(store), signal.SIGKILL)
    with pytest.raises(StoreError, match=r"/pre/k/big: .*exited with status -9") as caught:
        await asyncio.wait_for(task, 30)
    assert caught.value.key == "pre/k/big"
    fault_proxy.clear()
    _random_file(tmp_path / "next", 1000)
    result = await store.put_file("k/next", tmp_path / "next")
    assert result.digest == file_digest(tmp_path / "next")[1]


async def test_a_cancelled_upload_is_aborted_by_the_worker(
    make_store: Factory, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Cancelling the caller cancels the worker's upload, which aborts it before returning."""
    fault_proxy.add(FaultRule((Hang(),), method="PUT", path="partNumber="))
    arrived = fault_proxy.arrived("PUT", "partNumber=")
    _random_file(tmp_path / "big", 11 * MiB)
    task = asyncio.create_task(make_store().put_file("k/big", tmp_path / "big"))
    assert await asyncio.to_thread(arrived.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fault_proxy.requests("DELETE", r"uploadId=")) == 1
    assert s3_bucket.open_multipart_uploads() == []


async def test_aclose_stops_the_worker(make_store: Factory, tmp_path: Path) -> None:
    """aclose() ends the worker process (bounded) and a later put starts another."""
    store = make_store()
    _random_file(tmp_path / "f", 100)
    await store.put_file("k/f", tmp_path / "f")
    worker = store._worker
    assert worker is not None
    await store.aclose()
    assert worker.proc.poll() == 0
    await store.put_file("k/f", tmp_path / "f")
    assert store._worker is not None
    assert store._worker is not worker


def test_the_uploader_uses_a_worker_for_s3_unless_told_otherwise() -> None:
    """upload_in='process' is the default for s3:// destinations; 'thread' keeps it here."""
    assert isinstance(CheckpointUploader("s3://b/x").store, ProcessStore)
    assert isinstance(CheckpointUploader("s3://b/x", upload_in="thread").store, S3Store)
    with pytest.raises(ValueError, match="upload_in='gpu'"):
        CheckpointUploader("s3://b/x", upload_in="gpu")  # type: ignore[arg-type]


async def test_settings_reach_the_worker_over_its_socket_not_its_command_line(
    make_store: Factory, tmp_path: Path
) -> None:
    """The worker's argv is the module and a descriptor: no endpoint, bucket or option."""
    store = make_store()
    _random_file(tmp_path / "f", 100)
    await store.put_file("k/f", tmp_path / "f")
    argv = _cmdline(_worker_pid(store)).split("\0")[:-1]
    assert argv[1:3] == ["-m", "loopbridge.stores._upload_worker"]
    assert len(argv) == 4
    assert argv[3].isdigit()


async def test_the_worker_leaves_ctrl_c_to_the_training_process(
    make_store: Factory, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """The worker is in its own session (a terminal's Ctrl-C does not reach it) and ignores
    SIGINT sent to it anyway: the uploads in flight live on for the parent's grace period."""
    store = make_store()
    sha = _random_file(tmp_path / "f", 1000)
    await store.put_file("k/f", tmp_path / "f")
    pid = _worker_pid(store)
    assert os.getsid(pid) == pid != os.getsid(0)
    os.kill(pid, signal.SIGINT)
    _random_file(tmp_path / "big", 11 * MiB)
    result = await store.put_file("k/big", tmp_path / "big")
    assert (result.digest, _worker_pid(store)) == (file_digest(tmp_path / "big")[1], pid)
    assert s3_bucket.sha256("pre/k/f") == sha


async def test_a_malformed_expected_digest_is_refused_here_by_name(
    make_store: Factory, tmp_path: Path
) -> None:
    """The same ValueError as from S3Store, raised before the worker is asked."""
    _random_file(tmp_path / "f", 10)
    with pytest.raises(ValueError, match=r"unsupported checkpoint digest 'sha1:00'"):
        await make_store().put_file("k/f", tmp_path / "f", expected_digest="sha1:00")


async def test_objects_put_in_order_go_in_one_call_and_stop_at_the_first_failure(
    make_store: Factory, s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    """A marker, manifest and `latest` reach the store in order; one refused stops the rest."""
    store = make_store()
    assert isinstance(store, PutsInOrder)
    items = [("run/a", b"1"), ("run/b", b"22"), ("run/c", b"333")]
    results = await store.put_bytes_in_order(items)
    assert [(r.key, r.size) for r in results] == [("run/a", 1), ("run/b", 2), ("run/c", 3)]
    assert [s3_bucket.read(f"pre/{key}") for key, _ in items] == [b"1", b"22", b"333"]
    await store.delete(key for key, _ in items)
    fault_proxy.add(FaultRule((Status(403, "AccessDenied", "Access Denied"),), path="run/b"))
    with pytest.raises(PermanentStoreError, match=r"pre/run/b") as caught:
        await put_in_order(store, items)
    assert caught.value.key == "pre/run/b"
    assert s3_bucket.list_keys() == ["pre/run/a"]
