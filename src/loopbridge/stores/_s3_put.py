"""Single-request puts of `S3Store`: bytes, and files at or under the multipart threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopbridge._digest import bytes_digest
from loopbridge.stores._checksums import Checksums
from loopbridge.stores._s3_client import S3Connection, _Counter, _etag
from loopbridge.stores._source import SourceFile
from loopbridge.stores.protocol import PutResult

__all__ = ["SinglePut"]


def _body(data: bytes | memoryview) -> Any:
    """A request body aiohttp sends in one write (aiohttp comes with the s3 extra)."""
    from loopbridge.stores._body import PartBody

    return PartBody(data)


class SinglePut(S3Connection):
    """PutObject of bytes or of a small file, checked against what was sent."""

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        """Store `data` at `key` in one verified request."""
        full_key = self._full_key(key)
        counter = _Counter()
        etag, _ = await self._put_object(
            full_key, data, self._checksums(data), counter, content_type
        )
        digest = bytes_digest(data)
        return PutResult(key=key, size=len(data), digest=digest, etag=etag, retries=counter.retries)

    async def put_bytes_in_order(self, items: Sequence[tuple[str, bytes]]) -> list[PutResult]:
        """Store each `(key, data)` in turn; the first failure stops the rest."""
        return [await self.put_bytes(key, data) for key, data in items]

    async def _put_object(
        self, full_key: str, data: bytes, sums: Checksums, counter: _Counter, content_type: str
    ) -> tuple[str, bool]:
        """PutObject with the store's checksums: the checked ETag, and whether the store
        confirmed the body's CRC (then the stored object needs no HEAD to be trusted)."""
        client = await self._client()

        async def put() -> dict[str, Any]:
            # A fresh stream per attempt; it shares `data` rather than copying it.
            result: dict[str, Any] = await client.put_object(
                Bucket=self._bucket,
                Key=full_key,
                Body=_body(data),
                ContentLength=len(data),
                ContentType=content_type,
                **sums.headers(),
            )
            return result

        response = await self._call("PutObject", full_key, put, counter)
        self._check_sent(full_key, response, sums, "PutObject")
        confirmed = sums.crc is not None and response.get(sums.crc_field) == sums.crc
        return _etag(response), confirmed

    async def _put_small(
        self, key: str, full_key: str, source: SourceFile, expected_digest: str | None
    ) -> PutResult:
        """Read the whole (small) file, check it, then PutObject and HEAD it."""
        counter = _Counter()
        # One pass over the bytes: read, the digest and the request's checksums together.
        data, sums = await source.read_part(self._threshold + 1, self._checksums)
        # Checked before sending: a changed file never reaches the key.
        await source.check_unchanged(expected_digest)
        etag, confirmed = await self._put_object(
            full_key, data, sums, counter, content_type="application/octet-stream"
        )
        if not confirmed:
            await self._verify_stored(full_key, len(data), etag, counter)
        return PutResult(
            key=key, size=len(data), digest=source.digest, etag=etag, retries=counter.retries
        )
