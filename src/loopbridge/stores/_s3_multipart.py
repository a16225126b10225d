"""Multipart uploads of `S3Store`: parts read in order and sent in parallel, within a
store-wide bound, aborted on any failure or cancellation, and checked before they count.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import anyio

from loopbridge._exceptions import PermanentStoreError
from loopbridge.stores._checksums import Checksums, Crc
from loopbridge.stores._part_buffers import PartBuffers
from loopbridge.stores._retry import error_code
from loopbridge.stores._s3_client import (
    _ABORT_TIMEOUT,
    _MAX_PARTS,
    MiB,
    S3Connection,
    _Counter,
    _etag,
    comparable_etag,
)
from loopbridge.stores._s3_put import _body
from loopbridge.stores._source import SourceFile
from loopbridge.stores.protocol import PutResult

__all__ = ["Multipart", "plan_part_size"]

logger = logging.getLogger(__name__)

_SPREAD_FLOOR = 8 * MiB  # boto3's part size: no smaller, to spread a small file


def plan_part_size(size: int, part_size: int, concurrency: int) -> int:
    """The part size for a file of `size` bytes: `part_size` at most, but smaller (down to
    8 MiB) where that lets the file fill `concurrency` parts at once, and never so small that
    it needs more than S3's 10,000 parts.

    A 64 MiB checkpoint goes up as 8 parts of 8 MiB in parallel rather than 4 of 16 MiB:
    more of it in flight, at a few more requests; a large one keeps `part_size`.
    """
    spread = max(min(part_size, _SPREAD_FLOOR), -(-size // concurrency))
    return max(min(part_size, spread), -(-size // _MAX_PARTS))


class _Expected(NamedTuple):
    """What a completed multipart object must show: its ETag (with MD5s) and CRC checksum."""

    etag: str | None
    crc: str | None

    def matches(self, etag: str, crc: str | None) -> bool:
        """Whether a stored object is this one, by every check we can make (at least one)."""
        checks = []
        if self.etag is not None and comparable_etag(etag, self.etag):
            checks.append(etag == self.etag)
        if self.crc is not None and crc is not None:
            checks.append(crc == self.crc)
        # A store whose answers compare with nothing we sent (rclone: a whole-object MD5, no
        # CRC) is trusted here; the size check that follows a put still applies.
        return all(checks)


def _expected(sums: Iterable[Checksums], algorithm: Crc | None) -> _Expected:
    """The multipart ETag (MD5 of the parts' MD5s, `-N`) and composite CRC, when known."""
    md5s, crcs = [], []
    for part in sums:
        md5s.append(part.md5)
        crcs.append(part.crc)
    etag = None
    if md5s and all(md5 is not None for md5 in md5s):
        joined = b"".join(md5 for md5 in md5s if md5 is not None)
        etag = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(md5s)}"
    crc = None
    if algorithm is not None and crcs and all(crc is not None for crc in crcs):
        crc = algorithm.composite([c for c in crcs if c is not None])
    return _Expected(etag, crc)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that failed a task group (the others are the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


class Multipart(S3Connection):
    """Multipart upload of large files, and the cleanup of unfinished ones."""

    async def _put_multipart(
        self, key: str, full_key: str, source: SourceFile, expected_digest: str | None
    ) -> PutResult:
        """Upload in parallel parts read in order; abort on any failure or cancellation."""
        counter = _Counter()
        client = await self._client()
        part_size = plan_part_size(source.size, self._part_size, self._max_concurrency)

        async def create() -> dict[str, Any]:
            extra = {"ChecksumAlgorithm": self._crc.name} if self._crc is not None else {}
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
            sent = await self._send_parts(
                client=client,
                full_key=full_key,
                created=created,
                source=source,
                part_size=part_size,
                counter=counter,
            )
            parts = [part for part, _ in sent]
            # Every part waited for the creation, so it is done.
            upload_id = str(created.result()["UploadId"])
            # Nothing is published until here: a file that changed while read is refused.
            await source.check_unchanged(expected_digest)
            expected = _expected((sums for _, sums in sent), self._crc)
            etag, crc = await self._complete(
                client=client,
                full_key=full_key,
                upload_id=upload_id,
                parts=parts,
                expected=expected,
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
                    with anyio.fail_after(_ABORT_TIMEOUT * 2):
                        await self._abort_strays(
                            client, full_key, keep=upload_id if completed else None
                        )
        if expected.etag is not None:
            self._check_etag(full_key, etag, expected.etag, "CompleteMultipartUpload")
        self._check_crc(full_key, crc, expected.crc, "CompleteMultipartUpload")
        if expected.crc is None or crc != expected.crc:
            # Unless the store confirmed the CRC of every part and of their assembly.
            await self._verify_stored(full_key, source.size, etag, counter)
        return PutResult(
            key=key,
            size=source.size,
            digest=source.digest,
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
                    with anyio.fail_after(_ABORT_TIMEOUT):
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
    ) -> builtins.list[tuple[dict[str, Any], Checksums]]:
        """Read parts in order and upload up to `max_concurrency` of them at once.

        The parts run in a task group: the first failure cancels the others and the reading.
        """
        loop = asyncio.get_running_loop()
        slots = self._part_slots.setdefault(loop, asyncio.Semaphore(self._max_concurrency))
        buffers = self._part_buffers.setdefault(loop, PartBuffers(self._max_concurrency))
        sent: dict[int, tuple[dict[str, Any], Checksums]] = {}

        async def send(number: int, buffer: bytearray, data: memoryview, sums: Checksums) -> None:
            reuse = False
            try:
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
                        **sums.headers(),
                    )
                    return result

                response = await self._call("UploadPart", full_key, upload, counter)
                self._check_sent(full_key, response, sums, f"UploadPart #{number}")
                part = {"PartNumber": number, "ETag": response["ETag"]}
                if sums.crc is not None:
                    part[sums.crc_field] = sums.crc
                sent[number] = (part, sums)
                reuse = counter.retries == 0
            finally:
                # Reused only when no request of this upload failed: a failed attempt's
                # connection may still hold a view of its body while it closes.
                buffers.give_back(buffer, reuse=reuse)
                slots.release()

        try:
            async with anyio.create_task_group() as parts:
                number = 0
                while True:
                    # The slot is taken before the read: at most max_concurrency parts are held.
                    await slots.acquire()
                    buffer = buffers.take(part_size)
                    try:
                        # One pass: read, the file's digest, and the part's checksums.
                        data, sums = await source.read_part_into(buffer, self._checksums)
                    except BaseException:
                        buffers.give_back(buffer, reuse=False)
                        slots.release()
                        raise
                    if not data and number > 0:
                        buffers.give_back(buffer, reuse=True)
                        slots.release()
                        break
                    number += 1
                    parts.start_soon(send, number, buffer, data, sums)
                    if len(data) < part_size:
                        break
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        return [sent[number] for number in sorted(sent)]

    async def _complete(
        self,
        *,
        client: Any,
        full_key: str,
        upload_id: str,
        parts: builtins.list[dict[str, Any]],
        expected: _Expected,
        counter: _Counter,
    ) -> tuple[str, str | None]:
        """CompleteMultipartUpload, accepting a lost reply when the object is already there.

        Returns the ETag and the object's CRC checksum when the store reports one.
        """

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
            found = await self._stored(full_key, counter)
            if found is None or not expected.matches(*found):
                raise
            return found
        return self._etag_and_crc(response)

    async def _stored(self, full_key: str, counter: _Counter) -> tuple[str, str | None] | None:
        """ETag and CRC checksum of the object at `full_key`, or None when there is none."""
        response = await self._head_object(full_key, counter, checksum=True)
        if response is None:
            return None
        return self._etag_and_crc(response)

    def _etag_and_crc(self, response: dict[str, Any]) -> tuple[str, str | None]:
        """A reply's ETag, and the object's CRC when the store reports one."""
        crc = response.get(self._crc.field) if self._crc is not None else None
        return _etag(response), None if crc is None else str(crc)

    async def _abort(self, client: Any, full_key: str, upload_id: str) -> None:
        """Abort a multipart upload so no parts are left behind; bounded even when cancelled."""

        async def abort() -> object:
            return await client.abort_multipart_upload(
                Bucket=self._bucket, Key=full_key, UploadId=upload_id
            )

        try:
            # Bounded tightly: this also runs while a cancelled upload unwinds, and the
            # bridge gives cancelled work only a short grace period.
            with anyio.fail_after(min(self._policy.call_timeout, _ABORT_TIMEOUT)):
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
                try:
                    result: dict[str, Any] = await client.list_multipart_uploads(
                        Bucket=self._bucket, Prefix=full_prefix, **markers
                    )
                except Exception as exc:
                    # rclone answers 404 NoSuchUpload when it has seen no multipart upload
                    # since it started, where AWS lists none: there is nothing to abort.
                    if error_code(exc)[0] == "NoSuchUpload":
                        return {}
                    raise
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
