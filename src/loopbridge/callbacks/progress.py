"""ConsoleProgress: a progress line with live metrics and the state of the background work.

On a terminal the line is redrawn in place (`\\r`) at most `refresh_per_second` times a second;
on a pipe or file a plain line is written every `interval_s` seconds instead. Each step costs the
loop thread one clock read and a comparison; the line is formatted only when it is drawn.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from loopbridge._callback import Callback
from loopbridge._types import LoopArtifacts, LoopState, ManifestRow, TrainingBatch

__all__ = ["ConsoleProgress", "format_metrics"]

StatusFn = Callable[[], str]
"""Returns a short extra status, such as "ckpt 3/4 up", shown at the end of the line."""


class ConsoleProgress(Callback):
    """Shows each run's progress, its latest metrics and its background work on a stream.

    Args:
        stream: where to write; stderr by default.
        metrics: the step metrics to show, in order; all of them (up to `max_metrics`) if None.
        refresh_per_second: the most redraws per second on a terminal.
        interval_s: seconds between plain lines when the stream is not a terminal.
        status: an optional `fn() -> str` whose text ends the line (e.g. an uploader's count).
        tty: force terminal (True) or plain-line (False) output; detected from the stream if None.
        width: the bar's width in characters.
        max_metrics: how many metrics to show when `metrics` is None.
        clock: the time source, `time.monotonic` by default.
    """

    rank_zero_only = True  # under torchrun, one set of rows: rank 0's (every_rank() to change)

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        metrics: Sequence[str] | None = None,
        refresh_per_second: float = 4.0,
        interval_s: float = 10.0,
        status: StatusFn | None = None,
        tty: bool | None = None,
        width: int = 20,
        max_metrics: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_per_second <= 0 or interval_s <= 0:
            msg = (
                f"ConsoleProgress(refresh_per_second={refresh_per_second}, "
                f"interval_s={interval_s}): give positive numbers"
            )
            raise ValueError(msg)
        if width < 0 or max_metrics < 0:
            msg = f"ConsoleProgress(width={width}, max_metrics={max_metrics}): give values >= 0"
            raise ValueError(msg)
        self._stream = stream
        self._metrics = tuple(metrics) if metrics is not None else None
        self._status = status
        self._tty_setting = tty
        self._tty = False
        self._width = width
        self._max_metrics = max_metrics
        self._clock = clock
        self._period_tty = 1.0 / refresh_per_second
        self._period_plain = interval_s
        self._period = self._period_plain
        self._columns = 120
        # Per run; reset by on_train_start.
        self._next_draw = math.inf
        self._started = 0.0
        self._run = ""
        self._max_steps: int | None = None
        self._eval: dict[str, float] = {}
        self._checkpoints = 0
        self._done_at_start = 0
        self._last_len = 0
        self.lines_written = 0
        """How many lines (or in-place redraws) were written, for tests and curiosity."""

    @property
    def stream(self) -> TextIO:
        """The stream written to."""
        return self._stream if self._stream is not None else sys.stderr

    def on_train_start(self, state: LoopState) -> None:
        """Reset for a new run and pick terminal or plain output."""
        stream = self.stream
        if self._tty_setting is None:
            isatty = getattr(stream, "isatty", None)
            self._tty = bool(isatty()) if callable(isatty) else False
        else:
            self._tty = self._tty_setting
        self._period = self._period_tty if self._tty else self._period_plain
        self._columns = shutil.get_terminal_size((120, 24)).columns if self._tty else 10_000
        self._run = state.run_name
        if state.world_size > 1:  # acting on every rank (loopbridge.every_rank): say which
            self._run = f"{state.run_name} [rank {state.rank}]"
        self._max_steps = state.max_steps
        self._eval = {}
        self._checkpoints = 0
        self._done_at_start = self._finished_tasks()
        self._last_len = 0
        self._started = self._clock()
        # The first line comes one period in, so a short run is not all progress lines.
        self._next_draw = self._started + self._period

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Check the clock; draw only when the period has passed."""
        now = self._clock()
        if now < self._next_draw:
            return
        self._next_draw = now + self._period
        self._draw(state.step, metrics, now)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Keep the latest eval metrics to show beside the step metrics."""
        for name, value in metrics.items():
            self._eval[f"{eval_name}/{name}"] = value

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Count the checkpoints saved."""
        self._checkpoints += 1

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Draw the run's last line and end it, whatever the clock says."""
        self._draw(state.step, state.metrics, self._clock(), final=artifacts.stop_reason)
        self._next_draw = math.inf

    def _finished_tasks(self) -> int:
        bridge = self._loopbridge_bridge
        if bridge is None:
            return 0
        stats = bridge.stats
        return stats.completed + stats.failed + stats.cancelled

    def _background(self) -> str:
        bridge = self._loopbridge_bridge
        if bridge is None:
            return ""
        stats = bridge.stats
        finished = stats.completed + stats.failed + stats.cancelled
        running = max(0, stats.spawned - finished)
        failed = f", {stats.failed} failed" if stats.failed else ""
        return f"bg {running} in flight, {finished - self._done_at_start} done{failed}"

    def _draw(
        self, step: int, metrics: dict[str, float], now: float, final: str | None = None
    ) -> None:
        elapsed = max(now - self._started, 1e-9)
        parts = [self._run, self._bar(step), f"{step / elapsed:.0f} steps/s"]
        shown = format_metrics(metrics, self._metrics, self._max_metrics)
        if shown:
            parts.append(shown)
        if self._eval:
            parts.append(format_metrics(self._eval, None, self._max_metrics))
        parts.append(f"ckpt {self._checkpoints}")
        background = self._background()
        if background:
            parts.append(background)
        if self._status is not None:
            parts.append(self._status())
        if final is not None:
            parts.append(f"done in {elapsed:.1f} s ({final})")
        line = " | ".join(parts)
        self._write(line, final=final is not None)

    def _bar(self, step: int) -> str:
        total = self._max_steps
        if total is None or self._width == 0:
            return f"step {step}"
        filled = min(self._width, self._width * step // total)
        bar = "#" * filled + "." * (self._width - filled)
        return f"[{bar}] {step}/{total}"

    def _write(self, line: str, *, final: bool) -> None:
        stream = self.stream
        if self._tty:
            line = line[: max(self._columns - 1, 10)]
            pad = " " * max(0, self._last_len - len(line))
            self._last_len = len(line)
            stream.write("\r" + line + pad + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()
        self.lines_written += 1


def format_metrics(
    metrics: dict[str, float], keys: Sequence[str] | None = None, limit: int = 4
) -> str:
    """Format metrics compactly (`loss=0.231 acc=0.91`); the given keys, or the first `limit`."""
    if keys is None:
        items = list(metrics.items())[:limit]
    else:
        items = [(key, metrics[key]) for key in keys if key in metrics]
    return " ".join(f"{name}={_number(value)}" for name, value in items)


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
