"""The `ObjectStore` protocol that the checkpoint uploader writes through, and its results."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = [
    "ClosingStore",
    "CleansStaleUploads",
    "GetResult",
    "ObjectInfo",
    "ObjectStore",
    "PutResult",
    "PutsInOrder",
    "put_in_order",
]


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a put verified: the key, the bytes sent, their digest, and the store's ETag.

    `digest` (`blake3:<hex>`, or `sha256:<hex>` when the put checked against one) is of
    exactly the bytes that were read and stored, hashed while streaming. `parts` is 1 for a
    single request. `retries` counts retried requests of this put.
    """

    key: str
    size: int
    digest: str
    etag: str | None
    parts: int = 1
    retries: int = 0


@dataclass(frozen=True, slots=True)
class GetResult:
    """What a get-to-file wrote: the key, the local path, the bytes and their digest.

    `digest` is of exactly the bytes written to `path`, hashed while streaming, with the
    expected digest's algorithm (BLAKE3 when none was given).
    `parts` counts the (ranged) requests; `retries` the retried requests of this get.
    """

    key: str
    path: Path
    size: int
    digest: str
    parts: int = 1
    retries: int = 0


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object as `head` and `list` see it."""

    key: str
    size: int
    etag: str | None = None
    last_modified: float | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """An async object store: keys are `/`-separated and relative to the store's own prefix.

    Implementations verify what they store: a put returns only after the stored size (and,
    where the store offers one, its checksum or ETag) matches what was read, and raises
    `IntegrityError` otherwise. Permanent refusals raise `PermanentStoreError`; other failures,
    after the store's own retries, raise `StoreError`. Each error names the key.
    """

    @property
    def url(self) -> str:
        """Where the store writes, as a URL without credentials (`s3://b/p`, `file:///d`)."""
        ...

    @property
    def retries(self) -> int:
        """How many requests this store has retried since it was created."""
        ...

    async def put_file(
        self, key: str, path: Path, *, expected_digest: str | None = None
    ) -> PutResult:
        """Stream the file at `path` to `key`; refuse to publish it if it changed meanwhile.

        If `expected_digest` (`blake3:<hex>` or `sha256:<hex>`) is given and the bytes read
        differ, nothing is published at `key` where the store can avoid it, and
        `IntegrityError` is raised.
        """
        ...

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        """Store `data` at `key` in one request."""
        ...

    async def get_bytes(self, key: str) -> bytes | None:
        """Read the object at `key`, or None when there is none."""
        ...

    async def get_file(
        self,
        key: str,
        path: Path,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        """Stream the object at `key` into the file `path`, hashing it on the way.

        The bytes land in a temporary name beside `path` and are renamed onto it only once
        complete and, when `expected_digest` or `expected_size` is given, matching: a
        failed, cancelled or killed get never leaves a file at `path` that looks complete.

        Raises:
            ObjectNotFoundError: there is no object at `key`.
            IntegrityError: the bytes read differ from `expected_digest` or `expected_size`.
        """
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """Describe the object at `key`, or None when there is none."""
        ...

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete the objects at `keys`; keys that do not exist are ignored."""
        ...

    async def aclose(self) -> None:
        """Release the clients this store opened on the running event loop."""
        ...


@runtime_checkable
class CleansStaleUploads(Protocol):
    """A store that can clear what a dead process left half-written (multipart, temp files)."""

    async def abort_stale_uploads(self, prefix: str) -> int:
        """Abort or remove unfinished uploads under `prefix`; return how many."""
        ...


@runtime_checkable
class PutsInOrder(Protocol):
    """A store that takes several small objects in one call, each put after the one before."""

    async def put_bytes_in_order(self, items: Sequence[tuple[str, bytes]]) -> list[PutResult]:
        """Put each `(key, data)` in turn, as `put_bytes`; the first failure stops the rest."""
        ...


async def put_in_order(store: ObjectStore, items: Sequence[tuple[str, bytes]]) -> None:
    """Put small objects in order: in one call where the store can (one round trip to an
    upload worker, not one per object), else one `put_bytes` after another."""
    if isinstance(store, PutsInOrder):
        await store.put_bytes_in_order(items)
        return
    for key, data in items:
        await store.put_bytes(key, data)


class ClosingStore:
    """Makes a store an async context manager that calls its `aclose()` on exit."""

    async def aclose(self) -> None:
        """Release the store's clients; stores override this."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
