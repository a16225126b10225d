"""PartBody: a file-like view of a part's bytes (or of a kept buffer), as botocore reads it."""

from __future__ import annotations

import io

import pytest
from aiohttp import payload

from loopbridge.stores._body import PartBody


def _bodies(data: bytes) -> list[PartBody]:
    """The same bytes as `bytes`, and as a read-only view of a larger reused buffer."""
    buffer = bytearray(data + b"stale bytes of an earlier part")
    return [PartBody(data), PartBody(memoryview(buffer)[: len(data)].toreadonly())]


@pytest.mark.parametrize("index", [0, 1], ids=["bytes", "view"])
def test_reads_seeks_and_tells_like_a_file(index: int) -> None:
    body = _bodies(b"0123456789")[index]
    assert len(body) == 10
    assert body.read(4) == b"0123"
    assert body.tell() == 4
    assert body.read() == b"456789"
    assert body.read(3) == b""
    assert body.seek(-3, io.SEEK_END) == 7
    assert body.read(-1) == b"789"
    assert body.seek(2) == 2
    assert body.read(100) == b"23456789"


@pytest.mark.parametrize("index", [0, 1], ids=["bytes", "view"])
def test_aiohttp_sends_it_as_one_payload_of_its_size(index: int) -> None:
    body = _bodies(b"hello")[index]
    sent = payload.get_payload(body)
    assert sent.size == 5
    assert sent.decode() == "hello"
