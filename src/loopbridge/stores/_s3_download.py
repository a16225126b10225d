"""`S3Store.get_file`: stream an object to a local file, in parallel ranged GETs when large.

A HEAD gives the size and ETag. An object up to the store's multipart threshold comes in one
GET; a larger one in byte ranges (`plan_ranges`: at least `part_size`, about two per slot),
up to `max_concurrency` at once across every download of the store on a loop. Every GET
carries `If-Match` with the ETag, so an object replaced mid-download fails (412) instead of
mixing two versions. Each range is streamed: its bytes are written at their offset every
1 MiB, so memory stays within `max_concurrency` x 1 MiB (plus aiohttp's read buffer) however
large the ranges, well under `part_size * max_concurrency`. One hasher follows the written
prefix in order (reading it back from the page cache), so the digest is ready when the last
byte lands. Every GET runs under the store's retry and timeout policy, and a retried range
asks only for the bytes it still lacks. The file appears at its path only once complete and
checked.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopbridge._digest import algorithm_of
from loopbridge._exceptions import IntegrityError, ObjectNotFoundError
from loopbridge.stores._sink import FileSink
from loopbridge.stores._source import hash_thread
from loopbridge.stores.protocol import GetResult

if TYPE_CHECKING:
    from loopbridge.stores._s3_client import S3Connection as S3Store

__all__ = ["CHUNK", "download", "plan_ranges"]

CHUNK = 1 << 20
"""Bytes a range gathers before writing them: per range in flight, the memory it holds."""

# Parts in flight per store and loop, across all of the store's downloads: the memory bound.
_slots: weakref.WeakKeyDictionary[S3Store, dict[asyncio.AbstractEventLoop, asyncio.Semaphore]]
_slots = weakref.WeakKeyDictionary()


def _loop_slots(store: S3Store, limit: int) -> asyncio.Semaphore:
    """The running loop's download slots for `store`."""
    per_loop = _slots.setdefault(store, {})
    loop = asyncio.get_running_loop()
    slots = per_loop.get(loop)
    if slots is None:
        # Loops that have ended keep no semaphore alive.
        for old in [other for other in per_loop if other.is_closed()]:
            del per_loop[old]
        slots = per_loop[loop] = asyncio.Semaphore(limit)
    return slots


async def download(
    store: S3Store,
    key: str,
    path: Path,
    *,
    expected_digest: str | None = None,
    expected_size: int | None = None,
) -> GetResult:
    """Download `key` of `store` to `path`; see the module docstring.

    Raises:
        ObjectNotFoundError: no object at `key`.
        IntegrityError: the size or digest differ from what was expected.
        StoreError, PermanentStoreError: the store failed or refused (403...), naming the key.
    """
    from loopbridge.stores._s3_client import _Counter

    algorithm = algorithm_of(expected_digest)
    full_key = store._full_key(key)
    counter = _Counter()
    info = await store._head(full_key, counter)
    if info is None:
        msg = f"{store._what('HeadObject', full_key)}: no such object"
        raise ObjectNotFoundError(msg, key=full_key)
    if expected_size is not None and info.size != expected_size:
        msg = (
            f"s3://{store.bucket}/{full_key} has {info.size} bytes, not the published "
            f"{expected_size}; it was changed or truncated after it was published"
        )
        raise IntegrityError(msg, key=full_key)
    sink = await asyncio.to_thread(FileSink.open, Path(path), full_key, algorithm)
    try:
        parts = await _fetch(store, full_key, info.size, info.etag, sink=sink, counter=counter)
        size, digest = await hash_thread(sink.commit, info.size, expected_digest)
    except BaseException:
        sink.discard()
        raise
    return GetResult(
        key=key, path=Path(path), size=size, digest=digest, parts=parts, retries=counter.retries
    )


def plan_ranges(
    size: int, part_size: int, concurrency: int, threshold: int
) -> list[tuple[int, int]]:
    """The byte ranges (inclusive) to GET: one for a small object, else about 2 per slot.

    A range is at least `part_size` and at most 8 of them: few enough requests that each
    is worth its round trip (and its fee), enough that a slow one does not hold up the end.
    """
    if size <= threshold:
        return [(0, size - 1)]
    span = min(max(part_size, -(-size // (2 * concurrency))), 8 * part_size)
    span = -(-span // CHUNK) * CHUNK
    return [(start, min(size, start + span) - 1) for start in range(0, size, span)]


async def _fetch(
    store: S3Store, full_key: str, size: int, etag: str | None, *, sink: FileSink, counter: Any
) -> int:
    """GET the object into `sink`, in streamed ranges when large; returns the requests planned."""
    client = await store._client()
    ranges = plan_ranges(size, store._part_size, store._max_concurrency, store._threshold)
    ranged = len(ranges) > 1
    slots = _loop_slots(store, store._max_concurrency)
    written = [0] * len(ranges)
    progress = asyncio.Event()

    async def fetch(number: int) -> None:
        start, end = ranges[number]

        async def attempt() -> None:
            # A retry asks only for what the failed attempt did not deliver.
            first = start + written[number]
            extra: dict[str, str] = {}
            if ranged or first > start:
                extra["Range"] = f"bytes={first}-{end}"
            if etag:
                extra["IfMatch"] = f'"{etag}"'
            response = await client.get_object(Bucket=store.bucket, Key=full_key, **extra)
            body = response["Body"]
            buffer = bytearray()
            try:
                while chunk := await body.read(CHUNK):
                    buffer += chunk
                    if len(buffer) >= CHUNK:
                        buffer = await flush(buffer)
                buffer = await flush(buffer)
            except BaseException:
                body.close()  # a half-read connection cannot go back to the pool
                raise
            # Read to the end, the connection returns to the pool by itself.
            if start + written[number] != end + 1:
                # Retried like a reset: the connection ended before the range did.
                msg = f"got {written[number]} of {end - start + 1} bytes"
                raise ConnectionError(msg)

        async def flush(buffer: bytearray) -> bytearray:
            if buffer:
                await hash_thread(sink.write_at, start + written[number], buffer)
                written[number] += len(buffer)
                progress.set()
            return bytearray()

        what = f"GetObject bytes={start}-{end}" if ranged else "GetObject"
        try:
            await store._call(what, full_key, attempt, counter)
        finally:
            slots.release()

    async def hash_in_order() -> None:
        for number, (start, end) in enumerate(ranges):
            hashed = 0
            while hashed < end - start + 1:
                ready = written[number] - hashed
                if ready <= 0:
                    progress.clear()
                    await progress.wait()
                    continue
                await hash_thread(sink.hash_written, ready)
                hashed += ready

    tasks: list[asyncio.Task[None]] = [asyncio.create_task(hash_in_order())]
    try:
        for number in range(len(ranges)):
            # A slot is taken before each range's GET and given back when it is on disk.
            await slots.acquire()
            tasks.append(asyncio.create_task(fetch(number)))
            if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                break
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return len(ranges)
