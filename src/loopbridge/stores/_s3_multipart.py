"""Multipart uploads of `S3Store`: parts read in order and sent in parallel, within a
store-wide bound, aborted on any failure or cancellation, and checked before they count.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import logging
import zlib
from typing import Any

from loopbridge._exceptions import PermanentStoreError
from loopbridge.stores._retry import error_code
from loopbridge.stores._s3_client import (
    _ABORT_TIMEOUT,
    _MAX_PARTS,
    S3Connection,
    _Counter,
    _etag,
)
from loopbridge.stores._s3_put import _body, _md5, _md5_header
from loopbridge.stores._source import SourceFile, hash_thread
from loopbridge.stores.protocol import PutResult

__all__ = ["Multipart"]

logger = logging.getLogger(__name__)


def _part_digests(data: bytes) -> tuple[bytes, str]:
    """A part's MD5 digest and its base64 CRC32 (`x-amz-checksum-crc32`), in one thread trip."""
    crc = zlib.crc32(data).to_bytes(4, "big")
    return _md5(data), base64.b64encode(crc).decode("ascii")


class Multipart(S3Connection):
    """Multipart upload of large files, and the cleanup of unfinished ones."""

    async def _put_multipart(
        self, key: str, full_key: str, source: SourceFile, expected_sha256: str | None
    ) -> PutResult:
        """Upload in parallel parts read in order; abort on any failure or cancellation."""
        counter = _Counter()
        client = await self._client()
        part_size = max(self._part_size, -(-source.size // _MAX_PARTS))

        async def create() -> dict[str, Any]:
            extra = {"ChecksumAlgorithm": "CRC32"} if self._crc32 else {}
            result: dict[str, Any] = await client.create_multipart_upload(
                Bucket=self._bucket, Key=full_key, ContentType="application/octet-stream", **extra
            )
            return result

        # Created while the first parts are read and hashed; each part waits for it to send.
        created = asyncio.ensure_future(
            self._call("CreateMultipartUpload", full_key, create, counter)
        )
        create_retries: builtins.list[int] = []
        created.add_done_callback(lambda _: create_retries.append(counter.retries))
        upload_id: str | None = None
        completed = False
        try:
            parts, part_md5s = await self._send_parts(
                client=client,
                full_key=full_key,
                created=created,
                source=source,
                part_size=part_size,
                counter=counter,
            )
            # Every part waited for the creation, so it is done.
            upload_id = str(created.result()["UploadId"])
            # Nothing is published until here: a file that changed while read is refused.
            await source.check_unchanged(expected_sha256)
            expected_etag = (
                hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
                + f"-{len(parts)}"
            )
            etag = await self._complete(
                client=client,
                full_key=full_key,
                upload_id=upload_id,
                parts=parts,
                expected_etag=expected_etag,
                counter=counter,
            )
            completed = True
        except BaseException:
            upload_id = await self._created_id(created)
            if upload_id is not None:
                await self._abort(client, full_key, upload_id)
            raise
        finally:
            if create_retries and create_retries[0] > 0:
                # A retried create may have started uploads whose replies were lost.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_ABORT_TIMEOUT * 2):
                        await self._abort_strays(
                            client, full_key, keep=upload_id if completed else None
                        )
        self._check_etag(full_key, etag, expected_etag, "CompleteMultipartUpload")
        await self._verify_stored(full_key, source.size, etag, counter)
        return PutResult(
            key=key,
            size=source.size,
            sha256=source.sha256,
            etag=etag,
            parts=len(parts),
            retries=counter.retries,
        )

    async def _created_id(self, created: asyncio.Future[dict[str, Any]]) -> str | None:
        """The id of an upload whose creation may be in flight (to abort it); None if none."""
        try:
            if not created.done():
                # Bounded: this runs while a failed or cancelled upload unwinds.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_ABORT_TIMEOUT):
                        await asyncio.wait([created])
        finally:
            if not created.done():
                created.cancel()
        if created.cancelled() or created.exception() is not None:
            return None
        return str(created.result()["UploadId"])

    async def _send_parts(
        self,
        *,
        client: Any,
        full_key: str,
        created: asyncio.Future[dict[str, Any]],
        source: SourceFile,
        part_size: int,
        counter: _Counter,
    ) -> tuple[builtins.list[dict[str, Any]], builtins.list[bytes]]:
        """Read parts in order and upload up to `max_concurrency` of them at once."""
        loop = asyncio.get_running_loop()
        slots = self._part_slots.setdefault(loop, asyncio.Semaphore(self._max_concurrency))
        tasks: builtins.list[asyncio.Task[dict[str, Any]]] = []
        md5s: dict[int, bytes] = {}
        failed = asyncio.Event()

        async def send(number: int, data: bytes) -> dict[str, Any]:
            try:
                # Hashed here, not by the reader, so parts hash in parallel with reading.
                md5, crc = await hash_thread(_part_digests, data)
                md5s[number] = md5
                extra = {"ChecksumCRC32": crc} if self._crc32 else {}
                # Shielded: a part cancelled here must not cancel the creation it waits for.
                upload_id = str((await asyncio.shield(created))["UploadId"])

                async def upload() -> dict[str, Any]:
                    result: dict[str, Any] = await client.upload_part(
                        Bucket=self._bucket,
                        Key=full_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=_body(data),
                        ContentLength=len(data),
                        ContentMD5=_md5_header(md5),
                        **extra,
                    )
                    return result

                response = await self._call("UploadPart", full_key, upload, counter)
                etag = _etag(response)
                self._check_etag(full_key, etag, md5.hex(), f"UploadPart #{number}")
                return {"PartNumber": number, "ETag": response["ETag"], **extra}
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        try:
            number = 0
            while True:
                # The slot is taken before the read, so at most max_concurrency parts are held.
                await slots.acquire()
                if failed.is_set():
                    slots.release()
                    break
                data = await source.read_part(part_size)
                if not data and number > 0:
                    slots.release()
                    break
                number += 1
                tasks.append(asyncio.create_task(send(number, data)))
                if len(data) < part_size:
                    break
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        parts = [r for r in results if not isinstance(r, BaseException)]
        return parts, [md5s[number] for number in sorted(md5s)]

    async def _complete(
        self,
        *,
        client: Any,
        full_key: str,
        upload_id: str,
        parts: builtins.list[dict[str, Any]],
        expected_etag: str,
        counter: _Counter,
    ) -> str:
        """CompleteMultipartUpload, accepting a lost reply when the object is already there."""

        async def complete() -> dict[str, Any]:
            result: dict[str, Any] = await client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            return result

        retries_before = counter.retries
        try:
            response = await self._call("CompleteMultipartUpload", full_key, complete, counter)
        except PermanentStoreError as exc:
            code, _ = error_code(exc.__cause__)
            if code != "NoSuchUpload" or counter.retries == retries_before:
                raise
            # An earlier attempt completed but its reply was lost; trust it only if it matches.
            info = await self._head(full_key, counter)
            if info is None or info.etag != expected_etag:
                raise
            return expected_etag
        return _etag(response)

    async def _abort(self, client: Any, full_key: str, upload_id: str) -> None:
        """Abort a multipart upload so no parts are left behind; bounded even when cancelled."""

        async def abort() -> object:
            return await client.abort_multipart_upload(
                Bucket=self._bucket, Key=full_key, UploadId=upload_id
            )

        try:
            # Bounded tightly: this also runs while a cancelled upload unwinds, and the
            # bridge gives cancelled work only a short grace period.
            async with asyncio.timeout(min(self._policy.call_timeout, _ABORT_TIMEOUT)):
                await self._call("AbortMultipartUpload", full_key, abort)
        except Exception as exc:
            logger.warning(
                "could not abort multipart upload %s of s3://%s/%s (%s); a bucket lifecycle "
                "rule (AbortIncompleteMultipartUpload) will clean its parts",
                upload_id,
                self._bucket,
                full_key,
                type(exc).__name__,
            )

    async def _abort_strays(self, client: Any, full_key: str, keep: str | None) -> None:
        """Abort multipart uploads of `full_key` other than `keep` (from lost create replies)."""

        async def uploads() -> dict[str, Any]:
            result: dict[str, Any] = await client.list_multipart_uploads(
                Bucket=self._bucket, Prefix=full_key
            )
            return result

        try:
            listing = await self._call("ListMultipartUploads", full_key, uploads)
        except Exception as exc:
            logger.warning("could not list stray multipart uploads of %s: %s", full_key, exc)
            return
        for upload in listing.get("Uploads", []):
            if upload.get("Key") == full_key and upload.get("UploadId") != keep:
                await self._abort(client, full_key, str(upload["UploadId"]))

    async def abort_stale_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under `prefix` (left by a dead process).

        Returns how many were aborted. Only for prefixes no live process is uploading to.

        Raises:
            StoreError: the uploads could not be listed or aborted.
        """
        client = await self._client()
        base = f"{self._prefix}/" if self._prefix else ""
        full_prefix = base + prefix
        aborted = 0
        markers: dict[str, str] = {}
        while True:

            async def page(markers: dict[str, str] = markers) -> dict[str, Any]:
                result: dict[str, Any] = await client.list_multipart_uploads(
                    Bucket=self._bucket, Prefix=full_prefix, **markers
                )
                return result

            listing = await self._call("ListMultipartUploads", full_prefix, page)
            for upload in listing.get("Uploads", []):
                key, upload_id = str(upload["Key"]), str(upload["UploadId"])

                async def abort(key: str = key, upload_id: str = upload_id) -> None:
                    try:
                        await client.abort_multipart_upload(
                            Bucket=self._bucket, Key=key, UploadId=upload_id
                        )
                    except Exception as exc:
                        if error_code(exc)[0] != "NoSuchUpload":  # already gone is fine
                            raise

                await self._call("AbortMultipartUpload", key, abort)
                logger.info(
                    "aborted stale multipart upload %s of s3://%s/%s", upload_id, self._bucket, key
                )
                aborted += 1
            if not listing.get("IsTruncated"):
                return aborted
            markers = {
                "KeyMarker": str(listing.get("NextKeyMarker", "")),
                "UploadIdMarker": str(listing.get("NextUploadIdMarker", "")),
            }
