"""S3Store against moto on loopback, through the fault-injecting proxy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from loopbridge._digest import file_digest
from loopbridge._exceptions import (
    IntegrityError,
    MissingExtraError,
    PermanentStoreError,
    StoreError,
)
from loopbridge.stores import ObjectStore, S3Store
from loopbridge.stores._s3_multipart import plan_part_size
from loopbridge.stores._source import hash_thread
from tests.fixtures.s3 import (
    Delay,
    FaultProxy,
    FaultRule,
    Hang,
    ResetBeforeResponse,
    ResetMidBody,
    S3Bucket,
    Status,
    Throttle,
)

MiB = 1 << 20
StoreFactory = Callable[..., S3Store]

SLOWDOWN = Status(503, "SlowDown", "Please reduce your request rate.")
INTERNAL = Status(500, "InternalError", "We encountered an internal error.")
DENIED = Status(403, "AccessDenied", "Access Denied")


@pytest.fixture
async def make_store(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> AsyncIterator[StoreFactory]:
    """Build S3Stores on the test's loop, through the proxy; close their clients after."""
    stores: list[S3Store] = []

    def make(**options: Any) -> S3Store:
        settings: dict[str, Any] = {
            "endpoint_url": fault_proxy.url,
            "part_size": 5 * MiB,
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "retry_slowdown_delay": 0.02,
            "call_timeout": 10.0,
        }
        settings.update(options)
        store = S3Store(s3_bucket.name, "pre", **settings)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()
    # Let the transports that aclose() and cancelled requests closed finish closing on this
    # loop (their connection_lost is scheduled, not run), before pytest closes the loop.
    for _ in range(3):
        await asyncio.sleep(0)


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


class TestRoundTrip:
    async def test_is_an_object_store(self, make_store: StoreFactory) -> None:
        """S3Store satisfies the ObjectStore protocol."""
        assert isinstance(make_store(), ObjectStore)

    async def test_bytes_head_list_delete(
        self, make_store: StoreFactory, s3_bucket: S3Bucket
    ) -> None:
        """Objects land under the prefix, and head, list, get and delete see them."""
        store = make_store()
        result = await store.put_bytes("a/one", b"hello")
        assert result.etag == hashlib.md5(b"hello", usedforsecurity=False).hexdigest()
        await store.put_bytes("a/two", b"world!")
        assert s3_bucket.list_keys() == ["pre/a/one", "pre/a/two"]
        head = await store.head("a/two")
        assert head is not None
        assert (head.key, head.size) == ("a/two", 6)
        assert [i.key for i in await store.list("a/")] == ["a/one", "a/two"]
        assert await store.get_bytes("a/one") == b"hello"
        assert await store.get_bytes("a/missing") is None
        assert await store.head("a/missing") is None
        await store.delete(["a/one", "a/two", "a/missing"])
        assert s3_bucket.list_keys() == []

    async def test_small_file_is_one_verified_put(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """A file under the threshold goes up in one PUT and reads back identical."""
        source = tmp_path / "small.bin"
        sha = _random_file(source, 2 * MiB)
        digest = file_digest(source)[1]
        result = await make_store().put_file("ckpt/small.bin", source, expected_digest=digest)
        assert (result.size, result.digest, result.parts) == (2 * MiB, digest, 1)
        assert s3_bucket.sha256("pre/ckpt/small.bin") == sha

    @pytest.mark.parametrize("size", [1024, 6 * MiB], ids=["single-put", "multipart"])
    async def test_a_sha256_digest_of_an_older_run_is_checked_with_sha256(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, tmp_path: Path, size: int
    ) -> None:
        """An expected `sha256:` digest (a row of an older version) is hashed and checked."""
        source = tmp_path / "old.bin"
        sha = _random_file(source, size)
        store = make_store()
        result = await store.put_file("k/old", source, expected_digest=f"sha256:{sha}")
        assert result.digest == f"sha256:{sha}"
        with pytest.raises(IntegrityError, match="not the expected sha256:0000"):
            await store.put_file("k/bad", source, expected_digest="sha256:" + "0" * 64)
        assert s3_bucket.list_keys() == ["pre/k/old"]

    @pytest.mark.parametrize("digest", ["0" * 64, "md5:00", "blake3:", "sha256"])
    async def test_a_malformed_expected_digest_is_refused_by_name(
        self, make_store: StoreFactory, fault_proxy: FaultProxy, tmp_path: Path, digest: str
    ) -> None:
        """An expected digest without a known algorithm is an error naming it; nothing is sent."""
        source = tmp_path / "f.bin"
        _random_file(source, 1024)
        with pytest.raises(ValueError, match=re.escape(repr(digest)) + ".*'blake3:<hex>'"):
            await make_store().put_file("k/f", source, expected_digest=digest)
        assert fault_proxy.requests() == []

    async def test_large_file_goes_multipart_with_a_verified_etag(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """A file over the threshold goes up in parts, and its -N ETag is checked."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 12 * MiB)
        result = await make_store(max_concurrency=3).put_file(
            "ckpt/big.bin", source, expected_digest=file_digest(source)[1]
        )
        assert result.parts == 3
        assert result.etag is not None
        assert result.etag.endswith("-3")
        assert s3_bucket.sha256("pre/ckpt/big.bin") == sha
        assert len(fault_proxy.requests("PUT", r"partNumber=")) == 3
        assert s3_bucket.open_multipart_uploads() == []
        # A checksum the server checks (CRC32C, by default) is on every body, so bodies are
        # not hashed a second time for signing, nor a third time for Content-MD5.
        puts = fault_proxy.requests("PUT")
        assert {r.headers["x-amz-content-sha256"] for r in puts} == {"UNSIGNED-PAYLOAD"}
        assert all("x-amz-checksum-crc32c" in r.headers for r in puts)
        assert not any("content-md5" in r.headers for r in puts)

    @pytest.mark.parametrize(
        ("option", "env", "sent"),
        [
            (None, None, "crc32c"),
            ("crc32c", None, "crc32c"),
            ("crc32", None, "crc32"),
            ("none", None, None),
            (None, "when_required", None),
            ("crc32", "when_required", "crc32"),
        ],
    )
    async def test_bodies_carry_the_configured_crc(
        self,
        *,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        option: str | None,
        env: str | None,
        sent: str | None,
    ) -> None:
        """Parts and single puts carry the CRC S3 checks: CRC32C by default, CRC32 or none by
        option, none by the AWS setting; multipart uploads declare it at creation."""
        if env is not None:
            monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", env)
        source = tmp_path / "big.bin"
        data = os.urandom(11 * MiB)
        source.write_bytes(data)
        store = make_store(checksum=option, part_size=8 * MiB)
        result = await store.put_file("k", source)
        await store.put_bytes("small", b"abc")
        assert result.parts == 2
        assert s3_bucket.sha256("pre/k") == hashlib.sha256(data).hexdigest()
        parts = fault_proxy.requests("PUT", r"partNumber=")
        (single,) = fault_proxy.requests("PUT", r"/pre/small")
        (create,) = fault_proxy.requests("POST", r"\?uploads")
        names = ("x-amz-checksum-crc32", "x-amz-checksum-crc32c")
        if sent is None:
            assert all(not {*names} & set(r.headers) for r in [*parts, single])
            assert "x-amz-checksum-algorithm" not in create.headers
            assert all("content-md5" in r.headers for r in [*parts, single])
            return
        compute = zlib.crc32 if sent == "crc32" else google_crc32c.value

        def crc(body: bytes) -> str:
            return base64.b64encode(compute(body).to_bytes(4, "big")).decode()

        header = f"x-amz-checksum-{sent}"
        expected = [crc(data[i : i + 8 * MiB]) for i in (0, 8 * MiB)]
        assert sorted(r.headers.get(header, "") for r in parts) == sorted(expected)
        assert single.headers.get(header) == crc(b"abc")
        assert create.headers.get("x-amz-checksum-algorithm") == sent.upper()
        assert all(not ({*names} - {header}) & set(r.headers) for r in [*parts, single])

    async def test_a_store_refusing_the_checksum_says_how_to_change_it(
        self, make_store: StoreFactory, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A server that rejects x-amz-checksum-crc32c: one request, and the fix named."""
        refused = Status(400, "InvalidRequest", "Unsupported checksum algorithm: CRC32C")
        fault_proxy.add(FaultRule((refused,), method="PUT"))
        with pytest.raises(PermanentStoreError, match=r"checksum='crc32' or 'none'"):
            await make_store().put_bytes("k/marker", b"{}")
        assert len(fault_proxy.requests("PUT")) == 1

    def test_a_checksum_that_is_not_one_is_refused_naming_the_choices(self) -> None:
        """checksum= takes 'crc32c', 'crc32' or 'none'."""
        with pytest.raises(ValueError, match=r"checksum='md5'.*'crc32c', 'crc32' or 'none'"):
            S3Store("bucket", checksum="md5")  # type: ignore[arg-type]

    async def test_content_md5_on_request_for_servers_that_check_only_it(
        self, make_store: StoreFactory, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """content_md5=True adds Content-MD5 next to the CRC32, and the ETags are checked."""
        source = tmp_path / "big.bin"
        data = os.urandom(6 * MiB)
        source.write_bytes(data)
        store = make_store(content_md5=True)
        result = await store.put_file("md5/big.bin", source)
        small = await store.put_bytes("md5/small", b"abc")
        puts = fault_proxy.requests("PUT")
        assert len(puts) == 3
        assert all({"content-md5", "x-amz-checksum-crc32c"} <= set(r.headers) for r in puts)
        part_md5s = b"".join(
            hashlib.md5(data[i : i + 5 * MiB], usedforsecurity=False).digest() for i in (0, 5 * MiB)
        )
        assert result.etag == hashlib.md5(part_md5s, usedforsecurity=False).hexdigest() + "-2"
        assert small.etag == hashlib.md5(b"abc", usedforsecurity=False).hexdigest()

    async def test_signed_payloads_work_too(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """With sign_payload=True botocore hashes each body (reading and rewinding it) first."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 6 * MiB)
        store = make_store(sign_payload=True)
        result = await store.put_file(
            "signed/big.bin", source, expected_digest=file_digest(source)[1]
        )
        await store.put_bytes("signed/small", b"x" * 1000)
        assert result.parts == 2
        assert s3_bucket.sha256("pre/signed/big.bin") == sha
        assert s3_bucket.read("pre/signed/small") == b"x" * 1000
        hashes = {r.headers["x-amz-content-sha256"] for r in fault_proxy.requests("PUT")}
        assert "UNSIGNED-PAYLOAD" not in hashes
        assert hashlib.sha256(b"x" * 1000).hexdigest() in hashes


class TestConcurrency:
    async def test_parts_go_in_parallel_within_the_store_wide_bound(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """Two big files at once share max_concurrency part slots: parallel, never more."""
        fault_proxy.add(FaultRule((Delay(0.2),), method="PUT", path="partNumber="))
        sources = [tmp_path / "a.bin", tmp_path / "b.bin"]
        for source in sources:
            _random_file(source, 15 * MiB)
        store = make_store(max_concurrency=3)
        results = await asyncio.gather(*(store.put_file(f"c/{s.name}", s) for s in sources))
        assert [r.digest for r in results] == [file_digest(s)[1] for s in sources]
        assert fault_proxy.peak_in_flight("PUT", "partNumber=") == 3
        assert len(fault_proxy.requests("PUT", "partNumber=")) == 6

    async def test_a_small_file_is_spread_over_the_concurrency_slots(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """With the default 16 MiB parts, a 24 MiB file goes up as 3 parts of 8 MiB, not 2."""
        source = tmp_path / "ckpt.bin"
        sha = _random_file(source, 24 * MiB)
        result = await make_store(part_size=16 * MiB, max_concurrency=8).put_file("c/k", source)
        assert result.parts == 3
        assert result.etag is not None
        assert result.etag.endswith("-3")
        sizes = sorted(int(r.headers["content-length"]) for r in fault_proxy.requests("PUT"))
        assert sizes == [8 * MiB] * 3
        assert s3_bucket.sha256("pre/c/k") == sha


class TestPartBufferReuse:
    """Parts are read into buffers kept from earlier parts; what goes up is still the file."""

    async def test_files_with_more_parts_than_slots_arrive_intact(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        """Three files of 5 parts (the last one short) through 2 slots: each part reuses a
        buffer that held another part, of this file or the one before, and every byte is right.
        """
        store = make_store(max_concurrency=2)
        for index, size in enumerate((23 * MiB, 21 * MiB + 17, 25 * MiB)):
            source = tmp_path / f"ckpt-{index}.bin"
            sha = _random_file(source, size)
            result = await store.put_file(f"c/{index}", source, expected_digest=None)
            assert result.parts == 5
            assert result.digest == file_digest(source)[1]
            assert s3_bucket.sha256(f"pre/c/{index}") == sha
        buffers = store._part_buffers[asyncio.get_running_loop()]
        assert buffers.kept == 2  # one per slot, kept for the next upload

    async def test_after_a_failed_request_its_uploads_buffers_are_not_reused(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """A part answered with a 500 is retried from its buffer, and no buffer of that upload
        is kept: a failed attempt's connection may still hold a view of one."""
        fault_proxy.add(FaultRule((INTERNAL,), method="PUT", path="partNumber=2", times=1))
        source = tmp_path / "ckpt.bin"
        sha = _random_file(source, 12 * MiB)
        store = make_store(max_concurrency=2)
        result = await store.put_file("c/k", source)
        assert result.retries == 1
        assert s3_bucket.sha256("pre/c/k") == sha
        assert store._part_buffers[asyncio.get_running_loop()].kept == 0

    @pytest.mark.parametrize(
        "size", [0, 1, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 5 * MiB + 3]
    )
    def test_crc32c_of_a_view_equals_that_of_the_bytes(self, size: int) -> None:
        """CRC32C over a view of a reused buffer (fed in pieces) is the CRC32C of its bytes."""
        from loopbridge.stores._checksums import CRC32, CRC32C

        data = os.urandom(size)
        buffer = bytearray(data + b"tail that is not part of the view")
        view = memoryview(buffer)[:size].toreadonly()
        for crc in (CRC32C, CRC32):
            assert crc.header(view) == crc.header(data)


class TestPartPlan:
    """`plan_part_size` over the whole range of sizes, part sizes and concurrencies."""

    @pytest.mark.parametrize("part_size", [5 * MiB, 8 * MiB, 16 * MiB, 100 * MiB, 5 << 30])
    @pytest.mark.parametrize("concurrency", [1, 3, 8, 64])
    def test_invariants(self, part_size: int, concurrency: int) -> None:
        sizes = [1, 5 * MiB, 8 * MiB + 1, 24 * MiB, 64 * MiB, 1 << 30, 10 << 30, 5 << 40]
        sizes += [part_size * concurrency + d for d in (-1, 0, 1)]
        for size in sizes:
            part = plan_part_size(size, part_size, concurrency)
            needed = -(-size // 10_000)  # S3's limit of 10,000 parts
            assert -(-size // part) <= 10_000
            assert part >= min(part_size, 8 * MiB)
            if needed > part_size:  # only the limit makes a part larger than asked
                assert part == needed
                continue
            assert part <= part_size
            if size >= part_size * concurrency:  # enough to fill the slots: as asked
                assert part == part_size
            elif part < part_size:  # spread, never finer than filling the slots needs
                assert part == max(8 * MiB, -(-size // concurrency))

    def test_examples(self) -> None:
        assert plan_part_size(64 * MiB, 16 * MiB, 8) == 8 * MiB
        assert plan_part_size(96 * MiB, 16 * MiB, 8) == 12 * MiB
        assert plan_part_size(10 << 30, 16 * MiB, 8) == 16 * MiB
        assert plan_part_size(64 * MiB, 5 * MiB, 8) == 5 * MiB
        assert plan_part_size(200 << 30, 16 * MiB, 8) == -(-(200 << 30) // 10_000)


class TestRetries:
    async def test_transient_faults_are_retried_and_counted(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """503 SlowDown, 500, resets before the response and mid-body are all retried."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 11 * MiB)
        fault_proxy.add(
            FaultRule((SLOWDOWN, INTERNAL, ResetBeforeResponse(), ResetMidBody()), every=2)
        )
        store = make_store(max_attempts=4)
        result = await store.put_file(
            "ckpt/big.bin", source, expected_digest=file_digest(source)[1]
        )
        faults = [r.fault for r in fault_proxy.requests() if r.fault is not None]
        assert {"status", "reset_before_response", "reset_mid_body"} <= set(faults)
        # aiohttp itself re-sends an idempotent request once when a reused connection drops,
        # so resets may not all reach the store's count; answered errors always do.
        assert result.retries == store.retries
        assert faults.count("status") <= store.retries <= len(faults)
        assert s3_bucket.sha256("pre/ckpt/big.bin") == sha
        assert s3_bucket.open_multipart_uploads() == []

    async def test_slowdown_waits_at_least_the_slowdown_delay(
        self, make_store: StoreFactory, fault_proxy: FaultProxy
    ) -> None:
        """After a SlowDown the store backs off for at least its SlowDown delay."""
        fault_proxy.add(FaultRule((SLOWDOWN,), method="PUT", times=1))
        store = make_store(retry_base_delay=0.0, retry_max_delay=5.0, retry_slowdown_delay=0.3)
        started = time.monotonic()
        await store.put_bytes("k", b"x")
        assert time.monotonic() - started >= 0.3
        assert store.retries == 1

    async def test_permanent_403_fails_at_once_naming_bucket_and_key(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, fault_proxy: FaultProxy
    ) -> None:
        """AccessDenied is not retried, and the error names bucket and key but no secret."""
        fault_proxy.add(FaultRule((DENIED,), method="PUT"))
        store = make_store()
        with pytest.raises(PermanentStoreError) as info:
            await store.put_bytes("ckpt/denied.bin", b"x")
        message = str(info.value)
        assert f"s3://{s3_bucket.name}/pre/ckpt/denied.bin" in message
        assert "AccessDenied" in message
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
        assert os.environ["AWS_ACCESS_KEY_ID"] not in message
        assert info.value.key == "pre/ckpt/denied.bin"
        assert len(fault_proxy.requests("PUT")) == 1
        assert store.retries == 0

    async def test_answered_faults_are_counted_exactly(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """Each answered 503 or 500 costs exactly one retry and one more request."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 11 * MiB)
        rule = fault_proxy.add(FaultRule((SLOWDOWN, INTERNAL), every=2))
        store = make_store(max_attempts=4)
        result = await store.put_file(
            "ckpt/big.bin", source, expected_digest=file_digest(source)[1]
        )
        assert rule.fired > 0
        assert store.retries == rule.fired
        assert result.retries == rule.fired
        # create + 3 parts + complete + HEAD, each sent once more per fault it met.
        assert len(fault_proxy.requests()) == 6 + rule.fired
        assert s3_bucket.sha256("pre/ckpt/big.bin") == sha

    async def test_exhausted_retries_name_the_key(
        self, make_store: StoreFactory, fault_proxy: FaultProxy
    ) -> None:
        """A fault that never clears fails after max_attempts requests, not forever."""
        fault_proxy.add(FaultRule((INTERNAL,), method="PUT"))
        store = make_store(max_attempts=3)
        with pytest.raises(StoreError, match=r"pre/k failed after 3 attempts: InternalError"):
            await store.put_bytes("k", b"x")
        assert len(fault_proxy.requests("PUT")) == 3

    async def test_missing_bucket_is_permanent(
        self, make_store: StoreFactory, fault_proxy: FaultProxy
    ) -> None:
        """NoSuchBucket says to fix the bucket name and is tried once, with no retry counted."""
        store_elsewhere = S3Store("no-such-bucket-here", endpoint_url=fault_proxy.url)
        try:
            with pytest.raises(PermanentStoreError, match=r"NoSuchBucket.*fix the bucket name"):
                await store_elsewhere.put_bytes("k", b"x")
            # The store that was refused, not one never used: it retried nothing.
            assert store_elsewhere.retries == 0
        finally:
            await store_elsewhere.aclose()
        assert len(fault_proxy.requests("PUT", "no-such-bucket-here")) == 1


class TestMultipartSafety:
    async def test_lost_complete_reply_is_recognised(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """If Complete succeeded but its reply was lost, the retry's NoSuchUpload is accepted."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 11 * MiB)
        fault_proxy.add(
            FaultRule((ResetBeforeResponse(),), method="POST", path=r"uploadId=", times=1)
        )
        result = await make_store().put_file(
            "k/big", source, expected_digest=file_digest(source)[1]
        )
        assert result.etag is not None
        assert result.etag.endswith("-3")
        assert s3_bucket.sha256("pre/k/big") == sha

    async def test_lost_create_reply_leaves_no_stray_upload(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """An upload started by a create whose reply was lost is aborted afterwards."""
        source = tmp_path / "big.bin"
        sha = _random_file(source, 11 * MiB)
        fault_proxy.add(
            FaultRule((ResetBeforeResponse(),), method="POST", path=r"\?uploads", times=1)
        )
        await make_store().put_file("k/big", source, expected_digest=file_digest(source)[1])
        assert len(fault_proxy.requests("POST", r"\?uploads")) == 2
        assert s3_bucket.open_multipart_uploads() == []
        assert s3_bucket.sha256("pre/k/big") == sha

    async def test_failed_part_aborts_the_upload(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """A part refused for good aborts the multipart upload: no object, no parts left."""
        source = tmp_path / "big.bin"
        _random_file(source, 16 * MiB)
        fault_proxy.add(FaultRule((DENIED,), method="PUT", path=r"partNumber=2$"))
        with pytest.raises(PermanentStoreError, match="UploadPart"):
            await make_store(max_concurrency=2).put_file("k/big", source)
        assert len(fault_proxy.requests("DELETE", r"uploadId=")) == 1
        assert s3_bucket.open_multipart_uploads() == []
        assert s3_bucket.list_keys() == []

    async def test_cancelled_upload_is_aborted(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """Cancelling a multipart upload mid-way aborts it on the server."""
        source = tmp_path / "big.bin"
        _random_file(source, 11 * MiB)
        fault_proxy.add(FaultRule((Hang(),), method="PUT", path=r"partNumber="))
        arrived = fault_proxy.arrived("PUT", r"partNumber=")
        task = asyncio.create_task(make_store().put_file("k/big", source))
        await asyncio.to_thread(arrived.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(fault_proxy.requests("DELETE", r"uploadId=")) == 1
        assert s3_bucket.open_multipart_uploads() == []
        assert s3_bucket.list_keys() == []

    async def test_cancelled_while_creating_aborts_the_created_upload(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """Parts are read while the upload is created; cancelled then, the upload is aborted."""
        source = tmp_path / "big.bin"
        _random_file(source, 11 * MiB)
        fault_proxy.add(FaultRule((Delay(0.5),), method="POST", path=r"\?uploads"))
        arrived = fault_proxy.arrived("POST", r"\?uploads")
        task = asyncio.create_task(make_store().put_file("k/big", source))
        await asyncio.to_thread(arrived.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fault_proxy.requests("PUT", r"partNumber=") == []
        assert len(fault_proxy.requests("DELETE", r"uploadId=")) == 1
        assert s3_bucket.open_multipart_uploads() == []
        assert s3_bucket.list_keys() == []

    async def test_refused_create_sends_no_part(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A create refused for good fails once, naming the operation; no part is sent."""
        source = tmp_path / "big.bin"
        _random_file(source, 11 * MiB)
        fault_proxy.add(FaultRule((DENIED,), method="POST", path=r"\?uploads"))
        with pytest.raises(PermanentStoreError, match="CreateMultipartUpload"):
            await make_store().put_file("k/big", source)
        assert len(fault_proxy.requests("POST", r"\?uploads")) == 1
        assert fault_proxy.requests("PUT") == []
        assert fault_proxy.requests("DELETE") == []
        assert s3_bucket.list_keys() == []

    async def test_file_deleted_mid_upload_is_not_published(
        self,
        make_store: StoreFactory,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        tmp_path: Path,
    ) -> None:
        """A file deleted while its parts are in flight is refused and the upload aborted."""
        source = tmp_path / "big.bin"
        _random_file(source, 11 * MiB)
        fault_proxy.add(FaultRule((Throttle(8 * MiB),), method="PUT", path=r"partNumber="))
        arrived = fault_proxy.arrived("PUT", r"partNumber=")
        task = asyncio.create_task(make_store().put_file("k/big", source))
        await asyncio.to_thread(arrived.wait, 10)
        source.unlink()
        with pytest.raises(IntegrityError, match="was deleted while it was uploaded"):
            await task
        assert s3_bucket.open_multipart_uploads() == []
        assert s3_bucket.list_keys() == []

    async def test_digest_mismatch_is_refused_before_anything_is_sent(
        self, make_store: StoreFactory, s3_bucket: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        """A small file whose bytes differ from the expected digest never reaches the server."""
        source = tmp_path / "small.bin"
        _random_file(source, 1024)
        with pytest.raises(IntegrityError, match="not the expected"):
            await make_store().put_file("k/small", source, expected_digest="blake3:" + "0" * 64)
        assert fault_proxy.requests("PUT") == []


class TestConfiguration:
    async def test_endpoint_comes_from_the_standard_environment(
        self,
        s3_bucket: S3Bucket,
        fault_proxy: FaultProxy,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """AWS_ENDPOINT_URL_S3 points the store at a server, as for any AWS tool."""
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.url)
        store = S3Store(s3_bucket.name, addressing_style="path")
        try:
            await store.put_bytes("env", b"x")
        finally:
            await store.aclose()
        assert len(fault_proxy.requests("PUT", "/env")) == 1
        assert s3_bucket.list_keys() == ["env"]

    async def test_one_client_per_loop_is_reused(self, make_store: StoreFactory) -> None:
        """Calls on one loop share one client; aclose forgets it."""
        store = make_store()
        first = await store._client()
        await store.put_bytes("a", b"1")
        assert await store._client() is first
        await store.aclose()
        assert store._clients == {}

    async def test_async_with_closes_the_client(self, make_store: StoreFactory) -> None:
        """`async with` hands back the store and closes its client on the way out."""
        async with make_store() as store:
            await store.put_bytes("ctx", b"1")
            assert store._clients != {}
        assert store._clients == {}
        assert await store.get_bytes("ctx") == b"1"  # a later call opens a fresh client
        await store.aclose()

    @pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
    async def test_hashing_runs_on_lower_priority_threads(self) -> None:
        """Reading and hashing parts yields the CPU to the training thread when cores are busy."""

        def where() -> tuple[str, int]:
            tid = threading.get_native_id()
            return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)

        name, nice = await hash_thread(where)
        assert name.startswith("loopbridge-hash")
        assert nice >= 5

    async def test_missing_aioboto3_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without aioboto3 the store says to install loopbridge[s3]."""
        monkeypatch.setitem(sys.modules, "aioboto3", None)
        store = S3Store("bucket")
        with pytest.raises(MissingExtraError, match=r"install loopbridge\[s3\]"):
            await store.put_bytes("k", b"x")


class TestChecksumChoice:
    """Which CRC a store sends, by option, AWS setting and what google-crc32c offers."""

    def test_without_a_hardware_crc32c_the_default_is_crc32(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No google-crc32c C implementation: CRC32 by default; asking for CRC32C says how."""
        from loopbridge.stores import _checksums

        monkeypatch.setattr(_checksums, "_hardware_crc32c", lambda: False)
        assert _checksums.resolve_checksum(None) is _checksums.CRC32
        assert _checksums.resolve_checksum("crc32") is _checksums.CRC32
        assert _checksums.resolve_checksum("none") is None
        with pytest.raises(ValueError, match=r"pip install 'loopbridge\[s3\]'.*checksum='crc32'"):
            _checksums.resolve_checksum("crc32c")

    def test_with_it_the_default_is_crc32c_unless_aws_says_when_required(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The s3 extra's google-crc32c makes CRC32C the default; the AWS setting turns it off."""
        from loopbridge.stores import _checksums

        assert _checksums.resolve_checksum(None) is _checksums.CRC32C
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
        assert _checksums.resolve_checksum(None) is None
        assert _checksums.resolve_checksum("crc32c") is _checksums.CRC32C

    def test_composite_checksums_follow_s3s_rule(self) -> None:
        """A multipart object's checksum is the CRC of its parts' CRCs, then -N."""
        from loopbridge.stores._checksums import CRC32, CRC32C

        parts = [b"a" * 100, b"b" * 50]
        for crc, compute in ((CRC32, zlib.crc32), (CRC32C, google_crc32c.value)):
            raw = b"".join(compute(p).to_bytes(4, "big") for p in parts)
            expected = base64.b64encode(compute(raw).to_bytes(4, "big")).decode() + "-2"
            assert crc.composite([crc.header(p) for p in parts]) == expected
