"""Part buffers kept for reuse while uploads run, so that parts are read into warm memory.

A fresh buffer per part is fresh memory each time: the kernel faults in and zeroes its pages
as the part is read into it, and takes them back when it is freed. That churn was about a
quarter of the upload worker's CPU per GiB (bench_upload.py). Kept buffers skip it. They are
freed once no part has been in flight for `idle` seconds, so a job that checkpoints every
few minutes does not hold part-sized memory between its checkpoints.
"""

from __future__ import annotations

import asyncio

__all__ = ["IDLE_SECONDS", "PartBuffers"]

IDLE_SECONDS = 10.0


class PartBuffers:
    """Up to `keep` free buffers, handed out by size, for the parts of one event loop."""

    def __init__(self, keep: int, idle: float = IDLE_SECONDS) -> None:
        self._keep = keep
        self._idle = idle
        self._free: list[bytearray] = []
        self._out = 0
        self._release: asyncio.TimerHandle | None = None

    @property
    def kept(self) -> int:
        """How many free buffers are kept now."""
        return len(self._free)

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes: a kept one, or a new one. Give it back later."""
        self._out += 1
        if self._release is not None:
            self._release.cancel()
            self._release = None
        while self._free:
            buffer = self._free.pop()
            if len(buffer) == size:
                return buffer
        return bytearray(size)

    def give_back(self, buffer: bytearray, *, reuse: bool) -> None:
        """Return a taken buffer; with `reuse`, keep it for a later part (its contents are dead).

        Pass `reuse=False` when something may still read it: a failed request's connection
        can hold a view of its body while it closes.
        """
        self._out -= 1
        if reuse and len(self._free) < self._keep:
            self._free.append(buffer)
        if self._out == 0 and self._free:
            loop = asyncio.get_running_loop()
            self._release = loop.call_later(self._idle, self._free.clear)
