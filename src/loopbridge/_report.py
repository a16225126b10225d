"""What the background loop did: the DrainReport of a drain, and the bridge's running stats."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from loopbridge._exceptions import DrainError
from loopbridge._redact import redact_text

__all__ = ["BridgeStats", "DrainReport", "Loss", "TaskRecord"]


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task named in a report: its name, key, and the exception it raised if any."""

    name: str
    key: Hashable | None = None
    exception: BaseException | None = None
    seq: int = field(default=0, compare=False, repr=False)
    """The task's spawn number, unique within its bridge."""

    def __str__(self) -> str:
        key = "" if self.key is None else f" [key={self.key!r}]"
        error = "" if self.exception is None else f": {type(self.exception).__name__}: "
        return redact_text(f"{self.name}{key}{error}{self.exception if self.exception else ''}")

    def __repr__(self) -> str:
        return redact_text(
            f"TaskRecord(name={self.name!r}, key={self.key!r}, exception={self.exception!r})"
        )


@dataclass(frozen=True, slots=True)
class Loss:
    """Data a callback had to drop (a full buffer), counted and explained."""

    source: str
    count: int
    detail: str

    def __str__(self) -> str:
        return redact_text(f"{self.source} dropped {self.count}: {self.detail}")


@dataclass(frozen=True)
class DrainReport:
    """What became of the background work since the previous drain.

    `completed` counts the tasks that finished; `failed`, `cancelled` and `pending` name the
    others. `pending` lists the tasks still queued or running when the deadline hit.
    """

    completed: int = 0
    failed: tuple[TaskRecord, ...] = ()
    cancelled: tuple[TaskRecord, ...] = ()
    pending: tuple[TaskRecord, ...] = ()
    losses: tuple[Loss, ...] = ()
    elapsed: float = 0.0
    timed_out: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every task completed and nothing was dropped."""
        return not (self.failed or self.cancelled or self.pending or self.losses)

    def raise_for_failures(self) -> None:
        """Raise an ExceptionGroup of the failed tasks' exceptions, if there are any."""
        if self.failed:
            errors = [_as_exception(record) for record in self.failed]
            msg = f"{len(self.failed)} background task(s) failed"
            raise ExceptionGroup(msg, errors)

    def raise_if_not_ok(self) -> None:
        """Raise DrainError (with this report) unless every task completed and nothing dropped."""
        if not self.ok:
            raise DrainError(f"background work not done: {self.summary()}", self)

    def summary(self) -> str:
        """One line: the counts, then the names of what did not complete."""
        parts = [f"{self.completed} completed"]
        for label, records in (
            ("failed", self.failed),
            ("cancelled", self.cancelled),
            ("pending", self.pending),
        ):
            if records:
                names = ", ".join(str(r) for r in records[:5])
                more = f" (+{len(records) - 5} more)" if len(records) > 5 else ""
                parts.append(f"{len(records)} {label} ({names}{more})")
        parts.extend(str(loss) for loss in self.losses)
        timeout = " [deadline hit]" if self.timed_out else ""
        return redact_text(f"{'; '.join(parts)} in {self.elapsed:.3f} s{timeout}")

    def __str__(self) -> str:
        return f"DrainReport({self.summary()})"

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in (
                "completed",
                "failed",
                "cancelled",
                "pending",
                "losses",
                "elapsed",
                "timed_out",
                "notes",
            )
        )
        return redact_text(f"DrainReport({fields})")

    def merge(self, other: DrainReport) -> DrainReport:
        """Combine two reports, as when a run drains twice (at train end and at close).

        A task named in both is named once: a later failure or cancellation replaces an
        earlier `pending`, and otherwise the first mention stays.
        """
        outcome = {r.seq for r in other.failed + other.cancelled if r.seq}
        pending = tuple(r for r in self.pending if not r.seq or r.seq not in outcome)
        kept = self.failed + self.cancelled + pending
        return DrainReport(
            completed=self.completed + other.completed,
            failed=self.failed + _new_records(kept, other.failed),
            cancelled=self.cancelled + _new_records(kept, other.cancelled),
            pending=pending + _new_records(kept, other.pending),
            losses=self.losses + other.losses,
            elapsed=self.elapsed + other.elapsed,
            timed_out=self.timed_out or other.timed_out,
            notes=self.notes + tuple(n for n in other.notes if n not in self.notes),
        )


def _new_records(
    seen: tuple[TaskRecord, ...], records: tuple[TaskRecord, ...]
) -> tuple[TaskRecord, ...]:
    """`records` without the tasks already in `seen` (the same task reported twice)."""
    known = {r.seq for r in seen if r.seq}
    return tuple(r for r in records if not r.seq or r.seq not in known)


def _as_exception(record: TaskRecord) -> Exception:
    exc = record.exception
    if isinstance(exc, Exception):
        return exc
    # ExceptionGroup only holds Exceptions; wrap the rare BaseException so none is lost.
    return RuntimeError(f"task {record.name!r} raised {exc!r}")


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """Counters and timings of a bridge since it was created."""

    spawned: int
    completed: int
    failed: int
    cancelled: int
    calls: int
    spawn_seconds: float
    backpressure_waits: int
    backpressure_seconds: float
    busy_seconds: float
    uptime_seconds: float

    @property
    def spawn_mean_us(self) -> float:
        """Mean time a caller spent inside spawn, in microseconds."""
        return self.spawn_seconds / self.spawned * 1e6 if self.spawned else 0.0
