"""ConsoleProgress: a progress bar with live metrics and the state of the background work.

tqdm renders it: in a Jupyter notebook as a live widget (tqdm.auto's notebook bar, one updating
display), on a terminal as one line redrawn in place (`\\r`), at most `refresh_per_second`
times a second in both. On a pipe or file, where a redrawn line would be a mess of carriage
returns, a plain line is written every `interval_s` seconds instead. Each step costs the loop
thread one clock read and a comparison, as before tqdm; the bar is updated only when drawn.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from loopbridge._callback import Callback
from loopbridge._types import LoopArtifacts, LoopState, ManifestRow, TrainingBatch

__all__ = ["ConsoleProgress", "format_metrics"]

logger = logging.getLogger(__name__)

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
        notebook: render as a Jupyter widget (True), never (False), or when running in a
            notebook kernel with no `stream` given (None); needs ipywidgets in the kernel.
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
        notebook: bool | None = None,
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
        self._notebook_setting = notebook
        self._bar: Any = None  # the run's tqdm bar, created at its first draw
        self._bar_class: Any = None
        self.lines_written = 0
        """How many lines (or in-place redraws, or widget updates) were drawn."""

    @property
    def stream(self) -> TextIO:
        """The stream written to."""
        return self._stream if self._stream is not None else sys.stderr

    def on_train_start(self, state: LoopState) -> None:
        """Reset for a new run and pick widget, terminal or plain output."""
        self._close_bar()
        stream = self.stream
        self._bar_class = self._widget_class()
        # Imported here, before the first step, not at the first draw inside one (~10 ms).
        import tqdm  # noqa: F401

        if self._bar_class is not None:
            self._tty = True
        elif self._tty_setting is None:
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

    def _widget_class(self) -> Any:
        """tqdm.auto's notebook bar when it should be used, else None (text output)."""
        wanted = self._notebook_setting
        if wanted is False or (wanted is None and self._stream is not None):
            return None
        if wanted is None and "ipykernel" not in sys.modules:
            return None  # not in a Jupyter kernel: skip importing the notebook machinery
        from tqdm.auto import tqdm as auto_tqdm

        if any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__):
            return auto_tqdm
        if wanted:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        return None

    def _draw(
        self, step: int, metrics: dict[str, float], now: float, final: str | None = None
    ) -> None:
        elapsed = max(now - self._started, 1e-9)
        parts = [f"{step / elapsed:.0f} steps/s"]
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
        # Braces in metric names or status would be read as tqdm's format fields.
        text = " | ".join(parts).replace("{", "{{").replace("}", "}}")
        bar_format = self._bar_format(widget=self._bar_class is not None) + text
        if self._tty:
            self._redraw(step, bar_format, final=final is not None)
        else:
            self._write_plain(step, bar_format)

    def _bar_format(self, *, widget: bool) -> str:
        """tqdm's format for the start of the line: the run, the bar and the count."""
        if self._max_steps is None:
            return "{desc} | step {n} | "
        if widget:
            return "{desc} | {bar} {n}/{total} | "
        if self._width == 0:
            return "{desc} | {n}/{total} | "
        return "{desc} | [{bar:" + str(self._width) + "}] {n}/{total} | "

    def _redraw(self, step: int, bar_format: str, *, final: bool) -> None:
        """Update the run's tqdm bar (a widget or a terminal line); create it on first use."""
        bar = self._bar
        if bar is None:
            bar = self._new_bar(step, bar_format)
        else:
            bar.n = step
            bar.bar_format = bar_format
            if not final:
                bar.refresh()
                self.lines_written += 1
        if final:
            self._close_bar()

    def _new_bar(self, step: int, bar_format: str) -> Any:
        from tqdm import tqdm as std_tqdm

        options: dict[str, Any] = {
            "total": self._max_steps,
            "initial": step,
            "desc": self._run,
            "bar_format": bar_format,
            "ascii": ".#",
            "leave": True,
            "dynamic_ncols": False,
        }
        bar_class = self._bar_class
        if bar_class is None:
            bar_class = std_tqdm
            options.update(file=self.stream, ncols=max(self._columns - 1, 10))
        try:
            bar = bar_class(**options)  # draws once
        except ImportError as exc:  # a notebook without ipywidgets: terminal lines instead
            logger.warning("ConsoleProgress: no Jupyter widget (%s); drawing text lines", exc)
            self._bar_class = None
            return self._new_bar(
                step, bar_format.replace("{bar}", "[{bar:" + str(self._width) + "}]")
            )
        self._bar = bar
        self.lines_written += 1
        return bar

    def _close_bar(self) -> None:
        """End the run's bar: a terminal line gets its last redraw and a newline."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
            self.lines_written += 1

    def _write_plain(self, step: int, bar_format: str) -> None:
        """A whole line, formatted by tqdm, for streams that are not terminals."""
        from tqdm import tqdm as std_tqdm

        line = std_tqdm.format_meter(
            step,
            self._max_steps,
            0,
            prefix=self._run,
            ascii=".#",
            bar_format=bar_format,
        )
        stream = self.stream
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
