"""`get_file` on LocalStore and on S3Store (moto): streamed, verified, atomic."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import loopbridge as lb
from loopbridge._digest import bytes_digest
from loopbridge.stores import LocalStore, ObjectStore, S3Store
from tests.fixtures.s3 import S3Bucket

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """An empty store of each kind; S3 with small parts so ranged GETs happen."""
    opened: ObjectStore
    if request.param == "local":
        opened = LocalStore(tmp_path / "store")
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        opened = S3Store(bucket.name, "p", endpoint_url=bucket.endpoint, part_size=5 * MiB)
    async with opened:
        yield opened


async def _put(store: ObjectStore, key: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(data)
    await store.put_file(key, source)


class TestGetFile:
    @pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
    async def test_large_object_round_trips_with_its_digest(
        self, store: ObjectStore, tmp_path: Path, algorithm: str
    ) -> None:
        """An object over the part size comes back whole; the result names its digest, in the
        algorithm of the expected one (sha256 for a run of an older version)."""
        data = os.urandom(12 * MiB + 7)
        await _put(store, "a/big", data, tmp_path)
        digest = bytes_digest(data, algorithm)
        result = await store.get_file(
            "a/big", tmp_path / "out" / "big", expected_digest=digest, expected_size=len(data)
        )
        assert (result.size, result.digest) == (len(data), digest)
        assert (tmp_path / "out" / "big").read_bytes() == data
        assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "big"]

    async def test_empty_object(self, store: ObjectStore, tmp_path: Path) -> None:
        """An empty object gives an empty file."""
        await _put(store, "empty", b"", tmp_path)
        result = await store.get_file("empty", tmp_path / "e")
        assert result.size == 0
        assert (tmp_path / "e").read_bytes() == b""

    async def test_missing_object_names_the_key(self, store: ObjectStore, tmp_path: Path) -> None:
        """No object: ObjectNotFoundError naming the key, and no file."""
        with pytest.raises(lb.ObjectNotFoundError, match="nope"):
            await store.get_file("nope", tmp_path / "x")
        assert not (tmp_path / "x").exists()

    @pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
    async def test_wrong_digest_leaves_no_file(
        self, store: ObjectStore, tmp_path: Path, algorithm: str
    ) -> None:
        """Bytes that are not the expected ones never appear at the path."""
        await _put(store, "k", b"payload", tmp_path)
        (tmp_path / "out").mkdir()
        with pytest.raises(lb.IntegrityError, match=rf"k' refused: its digest is {algorithm}:"):
            await store.get_file("k", tmp_path / "out" / "k", expected_digest=f"{algorithm}:00")
        assert list((tmp_path / "out").iterdir()) == []

    async def test_a_malformed_digest_is_refused_before_downloading(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        """An expected digest without a known algorithm is an error naming it."""
        await _put(store, "k", b"payload", tmp_path)
        with pytest.raises(ValueError, match=r"'00'.*expected 'blake3:<hex>' or 'sha256:<hex>'"):
            await store.get_file("k", tmp_path / "out" / "k", expected_digest="00")
        assert not (tmp_path / "out").exists()

    async def test_wrong_size_is_refused_before_downloading(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        """An object of another size than expected is refused up front."""
        await _put(store, "k", b"payload", tmp_path)
        with pytest.raises(lb.IntegrityError, match=r"has 7 bytes, not the published 8"):
            await store.get_file("k", tmp_path / "k", expected_size=8)

    async def test_cancelled_download_leaves_nothing(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        """A download cancelled midway removes its temporary file."""
        await _put(store, "big", os.urandom(12 * MiB), tmp_path)
        (tmp_path / "out").mkdir()
        task = asyncio.create_task(store.get_file("big", tmp_path / "out" / "big"))
        await asyncio.sleep(0)  # let it start; the cancellation lands wherever it is
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert list((tmp_path / "out").iterdir()) == []
