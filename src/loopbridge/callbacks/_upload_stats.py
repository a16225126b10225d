"""What an uploader did so far: the `UploadSummary` and the thread-safe tally behind it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loopbridge.stores.s3 import MiB

__all__ = ["UploadSummary", "UploadTally"]

_MAX_ERRORS_KEPT = 20


@dataclass(frozen=True, slots=True)
class UploadSummary:
    """What the uploader did so far: checkpoints published and failed, bytes, retries, time."""

    uploaded: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    seconds: float = 0.0
    pruned: int = 0
    errors: tuple[str, ...] = ()

    def __str__(self) -> str:
        rate = self.bytes_uploaded / self.seconds / MiB if self.seconds > 0 else 0.0
        return (
            f"{self.uploaded} uploaded ({self.bytes_uploaded / MiB:.1f} MiB, {rate:.1f} MiB/s), "
            f"{self.failed} failed, {self.retries} retries, {self.pruned} pruned, "
            f"{self.seconds:.2f}s uploading"
        )


class UploadTally:
    """Counts published and failed checkpoints, bytes, and the time any upload was running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploaded = 0
        self._failed = 0
        self._bytes = 0
        self._seconds = 0.0
        self._active = 0
        self._busy_since = 0.0
        self._errors: list[str] = []

    def busy(self, delta: int) -> None:
        """Count uploads in progress; `seconds` is the time at least one was."""
        now = time.monotonic()
        with self._lock:
            if self._active == 0 and delta > 0:
                self._busy_since = now
            self._active += delta
            if self._active == 0:
                self._seconds += now - self._busy_since

    def published(self, n_bytes: int) -> None:
        """Count a published checkpoint and the bytes it sent."""
        with self._lock:
            self._uploaded += 1
            self._bytes += n_bytes

    def failed(self, step: int, error: BaseException) -> None:
        """Count a failed checkpoint and keep its error (the newest few)."""
        with self._lock:
            self._failed += 1
            self._errors.append(f"step {step}: {error}")
            del self._errors[:-_MAX_ERRORS_KEPT]

    def summary(self, *, retries: int, pruned: int) -> UploadSummary:
        """A snapshot, with the store's retries and the publisher's prunes."""
        with self._lock:
            return UploadSummary(
                uploaded=self._uploaded,
                failed=self._failed,
                bytes_uploaded=self._bytes,
                retries=retries,
                seconds=self._seconds,
                pruned=pruned,
                errors=tuple(self._errors),
            )
