"""`S3Store.get_file`: stream an object to a local file, in parallel ranged GETs when large.

A HEAD gives the size and ETag. An object up to the store's multipart threshold comes in one
GET; a larger one in `part_size` ranges, up to `max_concurrency` at once across every download
of the store on a loop. Each range carries `If-Match` with the ETag, so an object replaced
mid-download fails (412) instead of mixing two versions. A part is written at its offset as
soon as it arrives and then frees its slot, so memory stays within `part_size *
max_concurrency` and a slow part never stalls the others; one hasher follows the written
prefix in order (reading it back from the page cache), so the sha256 is ready when the last
byte lands. Every GET runs under the store's retry and timeout policy (a short body is
retried like a reset connection). The file appears at its path only once complete and checked.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopbridge._exceptions import IntegrityError, ObjectNotFoundError
from loopbridge.stores._sink import FileSink
from loopbridge.stores._source import hash_thread
from loopbridge.stores.protocol import GetResult

if TYPE_CHECKING:
    from loopbridge.stores.s3 import S3Store

__all__ = ["download"]

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
    expected_sha256: str | None = None,
    expected_size: int | None = None,
) -> GetResult:
    """Download `key` of `store` to `path`; see the module docstring.

    Raises:
        ObjectNotFoundError: no object at `key`.
        IntegrityError: the size or sha256 differ from what was expected.
        StoreError, PermanentStoreError: the store failed or refused (403...), naming the key.
    """
    from loopbridge.stores.s3 import _Counter

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
    sink = await asyncio.to_thread(FileSink.open, Path(path), full_key)
    try:
        parts = await _fetch(store, full_key, info.size, info.etag, sink=sink, counter=counter)
        size, sha = await hash_thread(sink.commit, info.size, expected_sha256)
    except BaseException:
        sink.discard()
        raise
    return GetResult(
        key=key, path=Path(path), size=size, sha256=sha, parts=parts, retries=counter.retries
    )


async def _fetch(
    store: S3Store, full_key: str, size: int, etag: str | None, *, sink: FileSink, counter: Any
) -> int:
    """GET the object into `sink`, in ranges when larger than the threshold; returns the parts."""
    client = await store._client()
    part_size = store._part_size
    ranged = size > store._threshold
    count = max(1, -(-size // part_size)) if ranged else 1
    slots = _loop_slots(store, store._max_concurrency)
    written: set[int] = set()
    progress = asyncio.Event()

    def bounds(number: int) -> tuple[int, int]:
        start = number * part_size
        return start, (min(size, start + part_size) if ranged else size) - 1

    async def fetch(number: int) -> None:
        try:
            start, end = bounds(number)
            extra: dict[str, str] = {}
            if ranged:
                extra["Range"] = f"bytes={start}-{end}"
                if etag:
                    extra["IfMatch"] = f'"{etag}"'

            async def get() -> bytes:
                response = await client.get_object(Bucket=store.bucket, Key=full_key, **extra)
                body = response["Body"]
                try:
                    data: bytes = await body.read()
                except BaseException:
                    body.close()  # a half-read connection cannot go back to the pool
                    raise
                # Read to the end, the connection returns to the pool by itself; closing it
                # (as `async with body` does) would make every part open a new connection.
                if len(data) != end - start + 1:
                    # Retried like a reset: the connection ended before the range did.
                    msg = f"got {len(data)} of {end - start + 1} bytes"
                    raise ConnectionError(msg)
                return data

            what = f"GetObject bytes={start}-{end}" if ranged else "GetObject"
            data = await store._call(what, full_key, get, counter)
            await hash_thread(sink.write_at, start, data)
        finally:
            slots.release()
        written.add(number)
        progress.set()

    async def hash_in_order() -> None:
        for number in range(count):
            while number not in written:
                progress.clear()
                await progress.wait()
            start, end = bounds(number)
            await hash_thread(sink.hash_written, end - start + 1)

    tasks: list[asyncio.Task[None]] = [asyncio.create_task(hash_in_order())]
    try:
        for number in range(count):
            # A slot is taken before each GET and given back once its bytes are on disk.
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
    return count
