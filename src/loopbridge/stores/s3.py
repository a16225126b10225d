"""`S3Store`: an `ObjectStore` on S3 or any S3-compatible server, through aioboto3.

Configuration is that of any AWS tool: credentials, region and endpoint come from the
standard environment variables and config files (`AWS_ENDPOINT_URL_S3` and
`AWS_ENDPOINT_URL` included); `endpoint_url=`, `region=` and `profile=` override them.

The store opens one client per running event loop, on first use, and reuses it; `aclose()`
closes the client of the loop it runs on. Files larger than `multipart_threshold` go up in
parts of `part_size`, read from disk in order (hashing as they go) and sent up to
`max_concurrency` at a time across all the store's uploads on a loop, so memory stays within
`part_size * max_concurrency` however many files upload at once (160 MiB by default). Parts
are read into buffers kept from earlier parts (up to `max_concurrency` of them, until the
store closes on that loop), so after the first large upload no part needs fresh memory. A
failed or cancelled multipart upload is aborted. Parts are 16 MiB by default, not boto3's 8:
each request costs about a millisecond of client CPU (signing, botocore's hooks, parsing),
and S3 bills requests, so half as many per GiB is cheaper both ways. A file too small to fill
`max_concurrency` such parts is spread over smaller ones, down to 8 MiB (`plan_part_size`): a
64 MiB checkpoint goes up as 8 parts at once, not 4.

Each byte of a file is read once and hashed once per algorithm, in the same worker-thread
pass: the whole file's digest (BLAKE3, the checkpoint digest) and the checksum the server checks
each body against. By default that is a CRC32C (`x-amz-checksum-crc32c`, computed in
hardware by google-crc32c, about twice as fast as zlib's CRC32; `checksum="crc32"` sends
the CRC32 boto3 sends, and is the default where google-crc32c has no C implementation), per
part for multipart uploads, whose composite S3 reports at completion; where the server
reports CRCs they must equal ours. With no CRC (`checksum="none"`, or
`AWS_REQUEST_CHECKSUM_CALCULATION=when_required` as for any AWS tool, for servers that reject
checksum headers) bodies carry `Content-MD5` instead, and each ETag is checked against the MD5
of what was sent (`verify_etag=False` for buckets whose ETags are not MD5s, such as SSE-KMS
ones). `content_md5=True` sends both, for servers that check only Content-MD5 (rclone). A put
of a file ends with a HEAD that checks the stored size and ETag, unless the store's reply
already confirmed the CRC of the whole object (then that HEAD would prove nothing more).
Because the server checks every body against its checksum, the body's SHA-256 is not also
signed (botocore makes the same choice over HTTPS); pass `sign_payload=True` to sign bodies
anyway.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loopbridge._digest import algorithm_of
from loopbridge._exceptions import PermanentStoreError
from loopbridge.stores._retry import error_code
from loopbridge.stores._s3_client import _MISSING, MiB
from loopbridge.stores._s3_multipart import Multipart
from loopbridge.stores._s3_put import SinglePut
from loopbridge.stores._source import SourceFile
from loopbridge.stores.protocol import GetResult, ObjectInfo, PutResult

__all__ = ["MiB", "S3Store"]


class S3Store(Multipart, SinglePut):
    """An `ObjectStore` in one S3 bucket, with keys relative to `prefix`."""

    async def put_file(
        self, key: str, path: Path, *, expected_digest: str | None = None
    ) -> PutResult:
        """Stream `path` to `key`, multipart above the threshold, verified before it counts."""
        full_key = self._full_key(key)
        source = await SourceFile.open(Path(path), full_key, algorithm_of(expected_digest))
        try:
            if source.size <= self._threshold:
                return await self._put_small(key, full_key, source, expected_digest)
            return await self._put_multipart(key, full_key, source, expected_digest)
        finally:
            source.close()

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the object at `key`, or None when there is none."""
        info = await self._head(self._full_key(key))
        if info is None:
            return None
        return ObjectInfo(key=key, size=info.size, etag=info.etag, last_modified=info.last_modified)

    async def get_bytes(self, key: str) -> bytes | None:
        """Read the object at `key`, or None when there is none."""
        full_key = self._full_key(key)
        client = await self._client()

        async def get() -> bytes | None:
            try:
                response = await client.get_object(Bucket=self._bucket, Key=full_key)
            except Exception as exc:
                if error_code(exc)[0] in _MISSING:
                    return None
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data

        return await self._call("GetObject", full_key, get)

    async def get_file(
        self,
        key: str,
        path: Path,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        """Stream `key` into the file `path` (parallel ranged GETs when large), verified."""
        from loopbridge.stores._s3_download import download

        return await download(
            self, key, path, expected_digest=expected_digest, expected_size=expected_size
        )

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""
        client = await self._client()
        base = f"{self._prefix}/" if self._prefix else ""
        full_prefix = base + prefix
        found: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": full_prefix}
            if token is not None:
                kwargs["ContinuationToken"] = token

            async def page(kwargs: dict[str, Any] = kwargs) -> dict[str, Any]:
                result: dict[str, Any] = await client.list_objects_v2(**kwargs)
                return result

            response = await self._call("ListObjectsV2", full_prefix, page)
            for item in response.get("Contents", []):
                modified = item.get("LastModified")
                found.append(
                    ObjectInfo(
                        key=str(item["Key"])[len(base) :],
                        size=int(item["Size"]),
                        etag=str(item.get("ETag", "")).strip('"') or None,
                        last_modified=modified.timestamp() if modified is not None else None,
                    )
                )
            if not response.get("IsTruncated"):
                break
            token = response.get("NextContinuationToken")
        found.sort(key=lambda info: info.key)
        return found

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete `keys` in batches of 1000; missing keys are not an error."""
        client = await self._client()
        full_keys = [self._full_key(key) for key in keys]
        for start in range(0, len(full_keys), 1000):
            batch = full_keys[start : start + 1000]

            async def remove(batch: builtins.list[str] = batch) -> dict[str, Any]:
                result: dict[str, Any] = await client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                return result

            response = await self._call("DeleteObjects", batch[0], remove)
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                msg = (
                    f"{self._what('DeleteObjects', str(first.get('Key')))} failed for "
                    f"{len(errors)} keys: {first.get('Code')} {first.get('Message', '')}"
                )
                raise PermanentStoreError(msg, key=str(first.get("Key")))
