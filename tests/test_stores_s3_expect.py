"""The `Expect: 100-continue` hang of notes/infra.md, reproduced against a silent server."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

from loopbridge._exceptions import StoreError
from loopbridge.stores import S3Store
from tests.fixtures.s3 import SilentServer

MiB = 1 << 20


class TestExpectContinueHang:
    async def test_a_default_client_waits_for_100_continue_past_its_read_timeout(
        self, silent_server: SilentServer, aws_env: None
    ) -> None:
        """Control: stock aiobotocore sends Expect, holds back the body, ignores read_timeout."""
        import aioboto3
        from aiobotocore.config import AioConfig

        config = AioConfig(read_timeout=0.2, connect_timeout=1, retries={"total_max_attempts": 1})
        session = aioboto3.Session()
        async with session.client("s3", endpoint_url=silent_server.url, config=config) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    await client.put_object(Bucket="b", Key="k", Body=io.BytesIO(b"x" * MiB))
            # Only our outer timeout ended the call, well after read_timeout.
            assert time.monotonic() - started >= 1.5
        assert silent_server.headers[0].get("expect") == "100-continue"
        assert silent_server.body_bytes == 0

    async def test_the_store_sends_no_expect_and_times_out(
        self, silent_server: SilentServer, aws_env: None
    ) -> None:
        """S3Store drops the Expect header and bounds the call, naming the key in its error."""
        store = S3Store(
            "bucket",
            endpoint_url=silent_server.url,
            read_timeout=30.0,
            call_timeout=1.0,
            max_attempts=2,
            retry_base_delay=0.0,
        )
        started = time.monotonic()
        try:
            with pytest.raises(
                StoreError, match=r"s3://bucket/ckpt/k failed after 2 attempts: timed out"
            ):
                await store.put_bytes("ckpt/k", b"x" * (2 * MiB))
        finally:
            await store.aclose()
        elapsed = time.monotonic() - started
        assert 2.0 <= elapsed < 10.0
        assert await asyncio.to_thread(silent_server.got_body.wait, 10)
        assert len(silent_server.headers) == 2
        assert all("expect" not in headers for headers in silent_server.headers)

    async def test_a_multipart_upload_to_a_silent_server_is_bounded(
        self, silent_server: SilentServer, aws_env: None, tmp_path: Path
    ) -> None:
        """A large file against a server that never answers fails by its deadline too."""
        source = tmp_path / "big.bin"
        source.write_bytes(b"\0" * (6 * MiB))
        store = S3Store(
            "bucket",
            endpoint_url=silent_server.url,
            part_size=5 * MiB,
            call_timeout=0.5,
            max_attempts=1,
        )
        try:
            async with asyncio.timeout(10):
                with pytest.raises(StoreError, match=r"CreateMultipartUpload.*timed out"):
                    await store.put_file("big", source)
        finally:
            await store.aclose()
