"""EarlyStopping: stop a run when an eval metric has not improved for `patience` evals."""

from __future__ import annotations

import math
from typing import Literal

from loopbridge._callback import Callback
from loopbridge._types import LoopArtifacts, LoopState

__all__ = ["EarlyStopping"]

Mode = Literal["min", "max"]


class EarlyStopping(Callback):
    """Asks the loop to stop when `monitor` stops improving, through `state.request_stop`.

    An eval improves on the best so far when it is lower (mode "min") or higher ("max") by
    more than `min_delta`. After `patience` evals in a row without improvement, the run stops
    at the end of the current step, with a reason naming the metric, its best value and step.
    A NaN or infinite value counts as no improvement, or stops at once with `stop_on_nonfinite`.

    Args:
        monitor: the metric's key in the eval metrics, e.g. "loss".
        mode: "min" when lower is better, "max" when higher is better.
        patience: evals in a row without improvement after which the run stops (>= 1).
        min_delta: the least change that counts as an improvement.
        eval_name: the evaluator to watch; None watches whichever evaluator reports `monitor`.
        stop_on_nonfinite: stop at once when the metric is NaN or infinite.
    """

    def __init__(
        self,
        monitor: str,
        mode: Mode = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        eval_name: str | None = None,
        *,
        stop_on_nonfinite: bool = False,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            msg = f"EarlyStopping(monitor={monitor!r}): name the eval metric to watch, e.g. 'loss'"
            raise ValueError(msg)
        if mode not in ("min", "max"):
            msg = (
                f"EarlyStopping(mode={mode!r}): use 'min' when lower {monitor} is better, "
                f"'max' when higher is better"
            )
            raise ValueError(msg)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            msg = f"EarlyStopping(patience={patience!r}): give a whole number of evals, >= 1"
            raise ValueError(msg)
        if not math.isfinite(min_delta) or min_delta < 0:
            msg = f"EarlyStopping(min_delta={min_delta!r}): give a finite number >= 0"
            raise ValueError(msg)
        self.monitor = monitor
        self.mode: Mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.eval_name = eval_name
        self.stop_on_nonfinite = stop_on_nonfinite
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        """The best value seen in the current run."""
        self.best_step: int | None = None
        """The step (steps completed) at which `best` was seen."""
        self.wait = 0
        """Evals since the last improvement."""
        self.stopped_step: int | None = None
        """The step at which this callback asked the run to stop, if it did."""
        self._source: str | None = self.eval_name
        self._round_step: int | None = None
        self._missing: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, min_delta={self.min_delta})"
        )

    def on_train_start(self, state: LoopState) -> None:
        """Forget the previous run's best."""
        self._reset()

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Compare the monitored metric with the best so far; request a stop past patience."""
        if self._source is None:
            self._find_source(step_idx, eval_name, metrics)
            if self._source is None:
                return
        if eval_name != self._source:
            return
        if self.monitor not in metrics:
            self._raise_missing({eval_name: sorted(metrics)})
        value = float(metrics[self.monitor])
        if not math.isfinite(value) and self.stop_on_nonfinite:
            self._stop(state, f"{self._label()} is {value} at step {state.step}")
            return
        if self._improved(value):
            self.best, self.best_step, self.wait = value, state.step, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            why = f"{self._label()} did not improve{delta} in {self.wait} evals"
            self._stop(state, why)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Fail loudly if no evaluator ever reported the monitored metric."""
        if self._source is None and self._missing:
            self._raise_missing(self._missing)

    def _find_source(self, step_idx: int, eval_name: str, metrics: dict[str, float]) -> None:
        if self.monitor in metrics:
            self._source = eval_name
            return
        if self._round_step is not None and step_idx != self._round_step:
            # A whole round of evals went by and none of them reported the metric.
            self._raise_missing(self._missing)
        self._round_step = step_idx
        self._missing[eval_name] = sorted(metrics)

    def _raise_missing(self, seen: dict[str, list[str]]) -> None:
        where = "; ".join(
            f"{name!r} has {', '.join(keys) or 'no metrics'}" for name, keys in seen.items()
        )
        msg = (
            f"EarlyStopping(monitor={self.monitor!r}): no such metric in the eval results "
            f"({where}); set monitor to one of those keys"
            + ("" if self.eval_name is None else " or change eval_name")
        )
        raise ValueError(msg)

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.best
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _label(self) -> str:
        return f"{self._source}/{self.monitor}"

    def _stop(self, state: LoopState, why: str) -> None:
        best = "none" if self.best is None else f"{self.best:.6g} at step {self.best_step}"
        reason = f"early stop: {why} (mode {self.mode}); best {best}"
        self.stopped_step = state.step
        state.request_stop(reason)
