"""`S3Store`: an `ObjectStore` on S3 or any S3-compatible server, through aioboto3.

Configuration is that of any AWS tool: credentials, region and endpoint come from the
standard environment variables and config files (`AWS_ENDPOINT_URL_S3` and
`AWS_ENDPOINT_URL` included); `endpoint_url=`, `region=` and `profile=` override them.

The store opens one client per running event loop, on first use, and reuses it; `aclose()`
closes the client of the loop it runs on. Files larger than `multipart_threshold` go up in
parts of `part_size`, read from disk in order (hashing as they go) and sent up to
`max_concurrency` at a time across all the store's uploads on a loop, so memory stays within
`part_size * max_concurrency` however many files upload at once. A failed
or cancelled multipart upload is aborted. Every request carries `Content-MD5`, and each ETag
is checked against the MD5 of what was sent (disable with `verify_etag=False` for buckets
whose ETags are not MD5s, such as SSE-KMS ones); a put of a file ends with a HEAD that
checks the stored size. An ETag is compared only where it has the form of what was sent (an
MD5, or an MD5 of the part MD5s with the part count): after a multipart upload some stores
(rclone) answer HEAD with the whole object's MD5, which confirms nothing more than the size;
what guards the bytes there is the server's Content-MD5 check of every part. Because the
server checks every body against its Content-MD5, the body's SHA-256 is not also signed
(botocore makes the same choice over HTTPS); over plain HTTP botocore would otherwise hash
every body again on the event loop. Pass `sign_payload=True` to sign bodies anyway.

Multipart uploads also carry a CRC32 per part (`x-amz-checksum-crc32`, as boto3 sends by
default), which S3 checks against each body and combines at completion; the ETag checks are
unchanged. For S3-compatible servers that reject checksum headers, pass `checksum_crc32=False`
or set `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`, as for any AWS tool.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import logging
import os
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from loopbridge._exceptions import IntegrityError, MissingExtraError, PermanentStoreError
from loopbridge.stores._retry import RetryPolicy, call_with_retries, error_code
from loopbridge.stores._source import SourceFile, hash_thread
from loopbridge.stores.keys import join_key, normalize_prefix
from loopbridge.stores.protocol import ClosingStore, GetResult, ObjectInfo, PutResult

__all__ = ["S3Store"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
_MIN_PART = 5 * MiB
_MAX_PART = 5 * 1024 * MiB
_MAX_PARTS = 10_000
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_ABORT_TIMEOUT = 5.0


def _import_aioboto3() -> Any:
    """Import aioboto3, or explain which extra installs it."""
    try:
        import aioboto3
    except ImportError as exc:
        msg = "S3Store needs aioboto3: install loopbridge[s3] (pip install 'loopbridge[s3]')"
        raise MissingExtraError(msg) from exc
    return aioboto3


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


def _part_digests(data: bytes) -> tuple[bytes, str]:
    """A part's MD5 digest and its base64 CRC32 (`x-amz-checksum-crc32`), in one thread trip."""
    crc = zlib.crc32(data).to_bytes(4, "big")
    return _md5(data), base64.b64encode(crc).decode("ascii")


def _crc32_by_default() -> bool:
    """Whether the AWS configuration asks for checksums when supported (the default)."""
    setting = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    return setting.strip().lower() != "when_required"


def _etag(response: dict[str, Any]) -> str:
    """The ETag of a response without its quotes."""
    return str(response.get("ETag", "")).strip('"')


_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-([0-9]+)")


def _comparable(got: str, expected: str) -> bool:
    """Whether `got` has the form of `expected` (an MD5, or an MD5 of MD5s with a part count).

    Only an ETag of the same form can be compared: a whole-object MD5 answered for a
    multipart object (rclone's HEAD), an empty or an opaque ETag carry no multipart digest.
    """
    multipart = _MULTIPART_ETAG.fullmatch(expected)
    if multipart is None:
        return _MD5_ETAG.fullmatch(got) is not None
    return _MULTIPART_ETAG.fullmatch(got) is not None


class _Counter:
    """Retries of one operation, next to the store-wide total."""

    def __init__(self) -> None:
        self.retries = 0


class S3Store(ClosingStore):
    """An `ObjectStore` in one S3 bucket, with keys relative to `prefix`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: Literal["auto", "path", "virtual"] | None = None,
        part_size: int = 8 * MiB,
        multipart_threshold: int | None = None,
        max_concurrency: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        call_timeout: float = 120.0,
        max_attempts: int = 5,
        retry_base_delay: float = 0.25,
        retry_max_delay: float = 20.0,
        retry_slowdown_delay: float = 1.0,
        verify_etag: bool = True,
        sign_payload: bool = False,
        checksum_crc32: bool | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            msg = f"invalid S3 bucket name {bucket!r}: give the bare bucket name, like 'my-bucket'"
            raise ValueError(msg)
        if not _MIN_PART <= part_size <= _MAX_PART:
            msg = f"part_size must be between 5 MiB and 5 GiB (S3's limits), got {part_size} bytes"
            raise ValueError(msg)
        if max_concurrency < 1:
            msg = f"max_concurrency must be at least 1, got {max_concurrency}"
            raise ValueError(msg)
        threshold = part_size if multipart_threshold is None else multipart_threshold
        if threshold < 1:
            msg = f"multipart_threshold must be positive, got {threshold}"
            raise ValueError(msg)
        self._bucket = bucket
        self._prefix = normalize_prefix(prefix)
        self._endpoint_url = endpoint_url
        self._region = region
        self._profile = profile
        self._addressing_style = addressing_style
        self._part_size = part_size
        self._threshold = threshold
        self._max_concurrency = max_concurrency
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._policy = RetryPolicy(
            max_attempts=max_attempts,
            base_delay=retry_base_delay,
            max_delay=retry_max_delay,
            slowdown_delay=retry_slowdown_delay,
            call_timeout=call_timeout,
        )
        self._verify_etag = verify_etag
        self._sign_payload = sign_payload
        self._crc32 = _crc32_by_default() if checksum_crc32 is None else checksum_crc32
        self._retries = 0
        # One client per event loop: aiohttp sessions belong to the loop that made them.
        self._clients: dict[asyncio.AbstractEventLoop, tuple[Any, contextlib.AsyncExitStack]] = {}
        self._client_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # Parts in flight per loop, across every upload of this store: the memory bound.
        self._part_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def url(self) -> str:
        """`s3://bucket/prefix`."""
        return f"s3://{self._bucket}/{self._prefix}".rstrip("/")

    @property
    def bucket(self) -> str:
        """The bucket written to."""
        return self._bucket

    @property
    def retries(self) -> int:
        """Requests retried since the store was created."""
        return self._retries

    @property
    def endpoint_url(self) -> str | None:
        """The explicit endpoint, without any user or password in it; None for the default."""
        if self._endpoint_url is None:
            return None
        parts = urlsplit(self._endpoint_url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))

    @property
    def region(self) -> str | None:
        """The explicit region, or None when the AWS configuration decides."""
        return self._region

    # -- client lifecycle ------------------------------------------------------------------

    async def _client(self) -> Any:
        """The client of the running loop, created on first use."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is not None:
            return entry[0]
        lock = self._client_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            entry = self._clients.get(loop)
            if entry is None:
                entry = await self._open_client()
                self._clients[loop] = entry
        return entry[0]

    async def _open_client(self) -> tuple[Any, contextlib.AsyncExitStack]:
        """Open an aiobotocore S3 client with our timeouts and retry policy."""
        aioboto3 = _import_aioboto3()
        import botocore.handlers
        from aiobotocore.config import AioConfig

        s3_config: dict[str, Any] = {"payload_signing_enabled": self._sign_payload}
        if self._addressing_style:
            s3_config["addressing_style"] = self._addressing_style
        config = AioConfig(
            s3=s3_config,
            # Our tenacity policy owns retries, so that each one is counted and bounded.
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            max_pool_connections=max(10, 2 * self._max_concurrency),
            # We send Content-MD5 ourselves; skip botocore's extra CRC pass over every body.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = aioboto3.Session(profile_name=self._profile, region_name=self._region)
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            session.client("s3", endpoint_url=self._endpoint_url, config=config)
        )
        # botocore asks for `Expect: 100-continue` on file-like bodies, and aiohttp then waits
        # for the "100 Continue" with no timeout: a silent server hangs the upload forever.
        client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        return client, stack

    async def aclose(self) -> None:
        """Close the client of the running loop, if one was opened."""
        loop = asyncio.get_running_loop()
        self._client_locks.pop(loop, None)
        self._part_slots.pop(loop, None)
        entry = self._clients.pop(loop, None)
        if entry is not None:
            await entry[1].aclose()

    # -- helpers ---------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        """The bucket key for a store key, checked for safety."""
        return join_key(self._prefix, key)

    def _what(self, operation: str, full_key: str) -> str:
        """`S3 <Operation> s3://bucket/key`, for logs and errors."""
        return f"S3 {operation} s3://{self._bucket}/{full_key}"

    async def _call(
        self,
        operation: str,
        full_key: str,
        call: Callable[[], Awaitable[T]],
        counter: _Counter | None = None,
    ) -> T:
        """Run one remote call under the retry policy and the per-attempt timeout."""

        def on_retry() -> None:
            self._retries += 1
            if counter is not None:
                counter.retries += 1

        return await call_with_retries(
            call,
            policy=self._policy,
            what=self._what(operation, full_key),
            key=full_key,
            on_retry=on_retry,
        )

    def _check_etag(self, full_key: str, got: str, expected: str, what: str) -> None:
        """Raise IntegrityError when a comparable ETag is not the MD5 we computed (if checking).

        An ETag is compared only when it has the form S3 gives it for what was sent: 32 hex
        digits for one body, `<32 hex>-<parts>` for a multipart object. Any other form (an
        empty ETag, an opaque one) says nothing about the bytes, so it is not held against
        a correct upload; the size check still applies.
        """
        if not self._verify_etag or got == expected:
            return
        if not _comparable(got, expected):
            logger.debug("%s: ETag %r is not comparable; size checked only", what, got)
            return
        msg = (
            f"{self._what(what, full_key)}: the store's ETag {got!r} is not the MD5 of what "
            f"was sent ({expected!r}); the object is not trusted. For buckets with SSE-KMS, "
            f"pass verify_etag=False"
        )
        raise IntegrityError(msg, key=full_key)

    # -- ObjectStore -----------------------------------------------------------------------

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

    async def put_file(
        self, key: str, path: Path, *, expected_sha256: str | None = None
    ) -> PutResult:
        """Stream `path` to `key`, multipart above the threshold, verified before it counts."""
        full_key = self._full_key(key)
        source = await SourceFile.open(Path(path), full_key)
        try:
            if source.size <= self._threshold:
                return await self._put_small(key, full_key, source, expected_sha256)
            return await self._put_multipart(key, full_key, source, expected_sha256)
        finally:
            source.close()

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

    async def _verify_stored(self, full_key: str, size: int, etag: str, counter: _Counter) -> None:
        """HEAD the object and check its size, and its ETag where the store keeps it comparable.

        After a multipart upload some stores (rclone) answer HEAD with the MD5 of the whole
        object rather than the multipart ETag they returned at completion: that ETag was
        already checked, so such a HEAD confirms the size only.
        """
        info = await self._head(full_key, counter)
        if info is None or info.size != size:
            found = "nothing" if info is None else f"{info.size} bytes"
            msg = f"{self._what('HeadObject', full_key)}: expected {size} bytes, found {found}"
            raise IntegrityError(msg, key=full_key)
        if info.etag is not None:
            self._check_etag(full_key, info.etag, etag, "HeadObject")

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
            if info is None or (
                info.etag != expected_etag and _comparable(info.etag or "", expected_etag)
            ):
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

    async def _head(self, full_key: str, counter: _Counter | None = None) -> ObjectInfo | None:
        """HeadObject, or None when there is no such object."""
        client = await self._client()

        async def head() -> dict[str, Any] | None:
            try:
                result: dict[str, Any] = await client.head_object(Bucket=self._bucket, Key=full_key)
            except Exception as exc:
                if error_code(exc)[0] in _MISSING:
                    return None
                raise
            return result

        response = await self._call("HeadObject", full_key, head, counter)
        if response is None:
            return None
        modified = response.get("LastModified")
        return ObjectInfo(
            key=full_key,
            size=int(response["ContentLength"]),
            etag=_etag(response),
            last_modified=modified.timestamp() if modified is not None else None,
        )

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
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        """Stream `key` into the file `path` (parallel ranged GETs when large), verified."""
        from loopbridge.stores._s3_download import download

        return await download(
            self, key, path, expected_sha256=expected_sha256, expected_size=expected_size
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
