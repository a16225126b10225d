"""One run's dashboard buffer and the JSON encoding of its batches.

The loop thread appends rows and drops the oldest step rows when full; the run's pump on the
bridge loop pops batches. Both sides pop from the left of the same deque, which is atomic,
so a row is either dropped or sent, never both, and never lost uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["RunStream", "encode_payload"]

# A step row: (seq, step, unix time, metrics). Tuples, because the loop thread builds one per step.
StepRow = tuple[int, int, float, dict[str, float]]
# Any other event: (seq, unix time, JSON-ready dict).
EventRow = tuple[int, float, dict[str, Any]]


class RunStream:
    """One run's buffer: filled by the loop thread, emptied by that run's pump on the bridge."""

    def __init__(self, run: dict[str, Any], key: Hashable) -> None:
        self.run = run
        self.key = key
        self.steps: deque[StepRow] = deque()
        self.events: deque[EventRow] = deque()
        self.seq = 0
        self.batch = 0
        # Written by the loop thread only.
        self.dropped = 0
        self.dropped_first: int | None = None
        self.dropped_last: int | None = None
        self.dropped_reported = 0
        # Read by the pump to emit "gap" events.
        self.dropped_announced = 0
        self.closing = False
        self.train_started = False
        # True while a pump task is queued or running; flipped under `lock` only.
        self.pump_running = False
        self.lock = threading.Lock()
        self.wake_pending = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None

    def next_seq(self) -> int:
        """The next sequence number of this run (hook order)."""
        seq = self.seq
        self.seq = seq + 1
        return seq

    def oldest_age(self) -> float | None:
        """Seconds since the oldest waiting row was queued, or None when nothing waits."""
        oldest: float | None = None
        with contextlib.suppress(IndexError):
            oldest = self.steps[0][2]
        try:
            event_time = self.events[0][1]
        except IndexError:
            pass
        else:
            oldest = event_time if oldest is None else min(oldest, event_time)
        return None if oldest is None else time.time() - oldest

    def take(self, limit: int) -> list[dict[str, Any]]:
        """Pop up to a batch of rows, merging steps and events back into hook order."""
        out: list[dict[str, Any]] = []
        steps, events = self.steps, self.events
        dropped = self.dropped
        if dropped > self.dropped_announced:
            out.append(
                {
                    "seq": None,
                    "type": "gap",
                    "time": time.time(),
                    "dropped_steps": dropped - self.dropped_announced,
                }
            )
            self.dropped_announced = dropped
        while len(out) < limit:
            try:
                # popleft, not a peek: the loop thread may drop the oldest row at any moment.
                seq, step, when, metrics = steps.popleft()
            except IndexError:
                while events and len(out) < limit:
                    out.append(events.popleft()[2])
                break
            while events and events[0][0] < seq:
                out.append(events.popleft()[2])
            out.append({"seq": seq, "type": "step", "time": when, "step": step, "metrics": metrics})
        return out

    def take_all(self, limit: int) -> list[dict[str, Any]]:
        """Pop every row left, in hook order."""
        rows: list[dict[str, Any]] = []
        while more := self.take(limit):
            rows.extend(more)
        return rows


def encode_payload(payload: dict[str, Any]) -> bytes:
    """JSON bytes; non-finite numbers become "NaN"/"Infinity"/"-Infinity" strings."""
    try:
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"), default=_default)
    except ValueError:
        text = json.dumps(
            _finite(payload), allow_nan=False, separators=(",", ":"), default=_default
        )
    return text.encode()


def _nonfinite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _nonfinite(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    """Numbers from numpy or torch as floats, anything else as its str."""
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else _nonfinite(value)
