"""Part buffers kept for reuse, so that each part is read into memory an earlier part used.

A fresh buffer per part is fresh memory each time: the kernel faults in and zeroes its pages
as the part is read into it, and takes them back when it is freed. Against moto that churn
was about a quarter of the client CPU per GiB (1.6 s against 1.2 s); on a VM that hands
freed memory back to its host, it also came with hypervisor steal on the training core
(docs/performance.md). Kept buffers skip it after the first upload.
"""

from __future__ import annotations

__all__ = ["PartBuffers"]


class PartBuffers:
    """Buffers for the parts of one event loop: those taken and those kept number `keep` at
    most, so memory stays within the store's bound (`keep` is its `max_concurrency`)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[bytearray] = []  # the longest unused first
        self._out = 0

    @property
    def kept(self) -> int:
        """How many free buffers are kept now."""
        return len(self._free)

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes: a kept one, or a new one. Give it back later."""
        self._out += 1
        for index in range(len(self._free) - 1, -1, -1):
            if len(self._free[index]) == size:
                return self._free.pop(index)
        # None fits: free the longest unused, so that kept and taken stay within `keep`.
        del self._free[: max(0, len(self._free) + self._out - self._keep)]
        return bytearray(size)

    def give_back(self, buffer: bytearray, *, reuse: bool) -> None:
        """Return a taken buffer; with `reuse`, keep it for a later part (its contents are dead).

        Pass `reuse=False` when something may still read it: a failed request's connection
        can hold a view of its body while it closes.
        """
        self._out -= 1
        if reuse:
            self._free.append(buffer)
