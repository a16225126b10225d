"""The S3 connection under `S3Store`: its configuration, one client per event loop, and
the retrying call wrapper with the checks every request shares.

Configuration is that of any AWS tool: credentials, region and endpoint come from the
standard environment variables and config files (`AWS_ENDPOINT_URL_S3` and
`AWS_ENDPOINT_URL` included); explicit arguments override them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from loopbridge._exceptions import IntegrityError, MissingExtraError
from loopbridge.stores._checksums import ChecksumName, Checksums, resolve_checksum
from loopbridge.stores._part_buffers import PartBuffers
from loopbridge.stores._retry import RetryPolicy, call_with_retries, error_code
from loopbridge.stores.keys import join_key, normalize_prefix
from loopbridge.stores.protocol import ClosingStore, ObjectInfo

__all__ = [
    "MiB",
    "S3Connection",
    "comparable_etag",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

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


def _etag(response: dict[str, Any]) -> str:
    """The ETag of a response without its quotes."""
    return str(response.get("ETag", "")).strip('"')


_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-([0-9]+)")


def comparable_etag(got: str, expected: str) -> bool:
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


class S3Connection(ClosingStore):
    """One S3 bucket and prefix, its settings, and a client per event loop."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: Literal["auto", "path", "virtual"] | None = None,
        part_size: int = 16 * MiB,
        multipart_threshold: int | None = None,
        max_concurrency: int = 10,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        call_timeout: float = 120.0,
        max_attempts: int = 5,
        retry_base_delay: float = 0.25,
        retry_max_delay: float = 20.0,
        retry_slowdown_delay: float = 1.0,
        verify_etag: bool = True,
        sign_payload: bool = False,
        checksum: ChecksumName | None = None,
        content_md5: bool | None = None,
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
        # What it takes to build this store again (in an upload worker process).
        self.options: dict[str, Any] = {
            "bucket": bucket,
            "prefix": prefix,
            "endpoint_url": endpoint_url,
            "region": region,
            "profile": profile,
            "addressing_style": addressing_style,
            "part_size": part_size,
            "multipart_threshold": multipart_threshold,
            "max_concurrency": max_concurrency,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "call_timeout": call_timeout,
            "max_attempts": max_attempts,
            "retry_base_delay": retry_base_delay,
            "retry_max_delay": retry_max_delay,
            "retry_slowdown_delay": retry_slowdown_delay,
            "verify_etag": verify_etag,
            "sign_payload": sign_payload,
            "checksum": checksum,
            "content_md5": content_md5,
        }
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
        self._crc = resolve_checksum(checksum)
        # MD5 only where no CRC is sent (or asked for): one checksum the server checks.
        self._send_md5 = (self._crc is None) if content_md5 is None else content_md5
        self._retries = 0
        # One client per event loop: aiohttp sessions belong to the loop that made them.
        self._clients: dict[asyncio.AbstractEventLoop, tuple[Any, contextlib.AsyncExitStack]] = {}
        self._client_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # Parts in flight per loop, across every upload of this store: the memory bound.
        self._part_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._part_buffers: dict[asyncio.AbstractEventLoop, PartBuffers] = {}

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
    def prefix(self) -> str:
        """The key prefix every key is under ("" for the bucket's root)."""
        return self._prefix

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
            # We send our own CRC (or Content-MD5); skip botocore's extra pass over every body.
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
        self._part_buffers.pop(loop, None)
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

    def _checksums(self, data: bytes | memoryview) -> Checksums:
        """The checksums this store sends `data` with (CPU work: call it on a worker thread)."""
        md5 = hashlib.md5(data, usedforsecurity=False).digest() if self._send_md5 else None
        crc = self._crc
        if crc is None:
            return Checksums(md5, None, "")
        return Checksums(md5, crc.header(data), crc.field)

    def _check_sent(
        self, full_key: str, response: dict[str, Any], sums: Checksums, what: str
    ) -> None:
        """Check a PutObject or UploadPart reply: ETag against our MD5, CRC against ours."""
        if sums.md5 is not None:
            self._check_etag(full_key, _etag(response), sums.md5.hex(), what)
        if sums.crc is not None:
            self._check_crc(full_key, response.get(sums.crc_field), sums.crc, what)

    def _check_crc(self, full_key: str, got: object, expected: str | None, what: str) -> None:
        """Raise IntegrityError when the server reports a CRC that is not what we sent."""
        if expected is not None and got is not None and got != expected:
            name = self._crc.name if self._crc is not None else "CRC"
            msg = (
                f"{self._what(what, full_key)}: the store's {name} {got!r} is not the {name} "
                f"of what was sent ({expected!r}); the object is not trusted"
            )
            raise IntegrityError(msg, key=full_key)

    def _check_etag(self, full_key: str, got: str, expected: str, what: str) -> None:
        """Raise IntegrityError when a comparable ETag is not the MD5 we computed (if checking).

        An ETag is compared only when it has the form S3 gives it for what was sent: 32 hex
        digits for one body, `<32 hex>-<parts>` for a multipart object. Any other form (an
        empty ETag, an opaque one) says nothing about the bytes, so it is not held against
        a correct upload; the size check still applies.
        """
        if not self._verify_etag or got == expected:
            return
        if not comparable_etag(got, expected):
            logger.debug("%s: ETag %r is not comparable; size checked only", what, got)
            return
        msg = (
            f"{self._what(what, full_key)}: the store's ETag {got!r} is not the MD5 of what "
            f"was sent ({expected!r}); the object is not trusted. For buckets with SSE-KMS, "
            f"pass verify_etag=False"
        )
        raise IntegrityError(msg, key=full_key)

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

    async def _head_object(
        self, full_key: str, counter: _Counter | None = None, *, checksum: bool = False
    ) -> dict[str, Any] | None:
        """HeadObject's reply (with the object's CRC if `checksum`), or None when it is missing."""
        client = await self._client()
        extra = {"ChecksumMode": "ENABLED"} if checksum else {}

        async def head() -> dict[str, Any] | None:
            try:
                result: dict[str, Any] = await client.head_object(
                    Bucket=self._bucket, Key=full_key, **extra
                )
            except Exception as exc:
                if error_code(exc)[0] in _MISSING:
                    return None
                raise
            return result

        return await self._call("HeadObject", full_key, head, counter)

    async def _head(self, full_key: str, counter: _Counter | None = None) -> ObjectInfo | None:
        """Size and ETag of the object at `full_key`, or None when there is no such object."""
        response = await self._head_object(full_key, counter)
        if response is None:
            return None
        modified = response.get("LastModified")
        return ObjectInfo(
            key=full_key,
            size=int(response["ContentLength"]),
            etag=_etag(response),
            last_modified=modified.timestamp() if modified is not None else None,
        )
