"""LocalStore: atomic, verified writes under a root directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loopbridge._digest import file_digest
from loopbridge._exceptions import IntegrityError
from loopbridge.stores import LocalStore, ObjectStore


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


class TestLocalStore:
    def test_is_an_object_store(self, tmp_path: Path) -> None:
        """LocalStore satisfies the ObjectStore protocol."""
        assert isinstance(LocalStore(tmp_path), ObjectStore)

    async def test_put_file_copies_and_reports_the_hash(self, tmp_path: Path) -> None:
        """A put returns the size and digest of the bytes it stored, which read back the same."""
        source = tmp_path / "src.bin"
        sha = _write(source, os.urandom(3 << 20))
        digest = file_digest(source)[1]
        store = LocalStore(tmp_path / "root")
        result = await store.put_file("a/b/ckpt.bin", source, expected_digest=digest)
        assert (result.size, result.digest) == (3 << 20, digest)
        again = await store.put_file("a/b/old.bin", source, expected_digest=f"sha256:{sha}")
        assert again.digest == f"sha256:{sha}"
        stored = (tmp_path / "root/a/b/ckpt.bin").read_bytes()
        assert hashlib.sha256(stored).hexdigest() == sha
        assert [info.key for info in await store.list("a/")] == ["a/b/ckpt.bin", "a/b/old.bin"]

    async def test_async_with_gives_the_store(self, tmp_path: Path) -> None:
        """LocalStore works as an async context manager, closing on the way out."""
        async with LocalStore(tmp_path) as store:
            await store.put_bytes("k", b"v")
        assert (tmp_path / "k").read_bytes() == b"v"

    async def test_bytes_round_trip_head_list_delete(self, tmp_path: Path) -> None:
        """put_bytes, get_bytes, head, list and delete agree with each other."""
        store = LocalStore(tmp_path)
        await store.put_bytes("x/1", b"one")
        await store.put_bytes("x/2", b"two!")
        await store.put_bytes("y/1", b"other")
        assert await store.get_bytes("x/2") == b"two!"
        head = await store.head("x/2")
        assert head is not None
        assert head.size == 4
        assert [i.key for i in await store.list("x/")] == ["x/1", "x/2"]
        await store.delete(["x/1", "x/2", "x/missing"])
        assert await store.list("x/") == []
        assert not (tmp_path / "x").exists()
        assert await store.get_bytes("x/1") is None
        assert await store.head("x/1") is None

    async def test_digest_mismatch_publishes_nothing(self, tmp_path: Path) -> None:
        """A file whose bytes are not the expected digest is refused and leaves no object."""
        source = tmp_path / "src.bin"
        _write(source, b"actual bytes")
        store = LocalStore(tmp_path / "root")
        with pytest.raises(IntegrityError, match="not the expected") as info:
            await store.put_file("k/ckpt", source, expected_digest="blake3:" + "0" * 64)
        assert info.value.key == "k/ckpt"
        assert await store.list() == []
        assert list((tmp_path / "root").rglob("*.lb-tmp-*")) == []

    async def test_missing_source_is_an_integrity_error(self, tmp_path: Path) -> None:
        """A checkpoint deleted while its upload was queued is reported, not published."""
        store = LocalStore(tmp_path / "root")
        with pytest.raises(IntegrityError, match="disappeared before upload"):
            await store.put_file("k/ckpt", tmp_path / "gone.bin")

    async def test_unsafe_keys_are_refused(self, tmp_path: Path) -> None:
        """Keys cannot climb out of the root."""
        store = LocalStore(tmp_path / "root")
        with pytest.raises(ValueError, match="unsafe object key"):
            await store.put_bytes("../escape", b"x")
        assert not (tmp_path / "escape").exists()
