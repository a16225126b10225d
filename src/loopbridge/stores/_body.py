"""Request bodies that aiohttp sends in one write, for S3 parts and objects.

aiohttp sends an `io.BytesIO` in 256 KiB chunks with a loop turn between them, and warns
about raw `bytes` over 1 MiB. A loop turn is a GIL hand-off, and next to a Python-heavy
training thread each hand-off can wait a whole switch interval, so chunking halves upload
throughput and costs the training thread more. `PartBody` is a read-only stream over the
bytes (for botocore, which may hash or rewind it), and its payload writes them at once: the
transport then sends as much as the socket takes per wake-up.

In the upload worker process no training thread shares the GIL, and there a body is written
in pieces instead (`PartBody.piece`): what the socket does not take at once is then at most
one piece, not most of the part, copied into the transport's buffer.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, ClassVar

from aiohttp import payload

__all__ = ["PartBody"]


class PartBody:
    """A seekable, read-only view of bytes, sent by aiohttp in a single write."""

    piece: ClassVar[int | None] = None
    """Send bodies in writes of this many bytes, in this process; None: one write each."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self._view = memoryview(data)
        self._pos = 0

    def __len__(self) -> int:
        return len(self.data)

    def read(self, size: int = -1) -> bytes:
        """Read like a file, for botocore (payload signing, content length)."""
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self._pos + size)
        chunk = self._view[self._pos : end].tobytes()
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position, like a file."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self.data)}[whence]
        self._pos = max(0, min(len(self.data), base + offset))
        return self._pos

    def tell(self) -> int:
        """The read position."""
        return self._pos


class _PartBodyPayload(payload.Payload):
    """aiohttp's payload for a PartBody: one write of the whole body."""

    _value: PartBody

    def __init__(self, value: PartBody, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)

    @property
    def size(self) -> int:
        return len(self._value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value.data).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view = self._value._view
        if content_length is not None:
            view = view[:content_length]
        # Headers on their own: coalesced with the body, they would be joined to it (a copy
        # of the whole body, under the GIL, on Pythons whose transports lack writelines).
        writer.send_headers()
        # A memoryview, so the part the socket does not take at once is copied only once,
        # into the transport's buffer, not sliced into a new bytes object first.
        piece = PartBody.piece
        try:
            if piece is None or len(view) <= piece:
                await writer.write(view)
            else:
                for start in range(0, len(view), piece):
                    await writer.write(view[start : start + piece])
        except asyncio.CancelledError:
            # Half sent, the connection is useless. A graceful close would wait for the
            # peer to read the rest, which a stuck server never does: the socket would
            # outlive its loop. Abort drops the buffer and closes at once.
            transport = getattr(writer, "transport", None)
            if transport is not None:
                transport.abort()
            raise


# Registered for this exact type only, so no other body changes how it is sent.
payload.register_payload(_PartBodyPayload, PartBody)
