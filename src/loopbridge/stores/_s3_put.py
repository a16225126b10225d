"""Single-request puts of `S3Store`: bytes, and files at or under the multipart threshold."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from loopbridge.stores._s3_client import S3Connection, _Counter, _etag
from loopbridge.stores._source import SourceFile, hash_thread
from loopbridge.stores.protocol import PutResult

__all__ = ["SinglePut"]


def _body(data: bytes) -> Any:
    """A request body aiohttp sends in one write (aiohttp comes with the s3 extra)."""
    from loopbridge.stores._body import PartBody

    return PartBody(data)


def _md5(data: bytes) -> bytes:
    """The MD5 digest S3 checks bodies and builds ETags with."""
    return hashlib.md5(data, usedforsecurity=False).digest()


def _md5_header(digest: bytes) -> str:
    """The base64 `Content-MD5` header value of an MD5 digest."""
    return base64.b64encode(digest).decode("ascii")


class SinglePut(S3Connection):
    """PutObject of bytes or of a small file, checked against what was sent."""

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        """Store `data` at `key` in one verified request."""
        full_key = self._full_key(key)
        counter = _Counter()
        etag = await self._put_object(full_key, data, _md5(data), counter, content_type)
        sha = hashlib.sha256(data).hexdigest()
        return PutResult(key=key, size=len(data), sha256=sha, etag=etag, retries=counter.retries)

    async def _put_object(
        self, full_key: str, data: bytes, md5: bytes, counter: _Counter, content_type: str
    ) -> str:
        """PutObject with Content-MD5, returning the checked ETag."""
        client = await self._client()

        async def put() -> dict[str, Any]:
            # A fresh stream per attempt; it shares `data` rather than copying it.
            result: dict[str, Any] = await client.put_object(
                Bucket=self._bucket,
                Key=full_key,
                Body=_body(data),
                ContentLength=len(data),
                ContentMD5=_md5_header(md5),
                ContentType=content_type,
            )
            return result

        response = await self._call("PutObject", full_key, put, counter)
        etag = _etag(response)
        self._check_etag(full_key, etag, md5.hex(), "PutObject")
        return etag

    async def _put_small(
        self, key: str, full_key: str, source: SourceFile, expected_sha256: str | None
    ) -> PutResult:
        """Read the whole (small) file, check it, then PutObject and HEAD it."""
        counter = _Counter()
        data = await source.read_part(self._threshold + 1)
        md5 = await hash_thread(_md5, data)
        # Checked before sending: a changed file never reaches the key.
        await source.check_unchanged(expected_sha256)
        etag = await self._put_object(
            full_key, data, md5, counter, content_type="application/octet-stream"
        )
        await self._verify_stored(full_key, len(data), etag, counter)
        return PutResult(
            key=key, size=len(data), sha256=source.sha256, etag=etag, retries=counter.retries
        )
