"""EarlyStopping: stop a run when an eval metric has not improved for `patience` evals."""

from __future__ import annotations

import math
from typing import Literal

from loopbridge._callback import Callback
from loopbridge._types import LoopArtifacts, LoopState, TrainingBatch

__all__ = ["EarlyStopping"]

Mode = Literal["min", "max"]


class EarlyStopping(Callback):
    """Asks the loop to stop when `monitor` stops improving, through `state.request_stop`.

    An eval improves on the best so far when it is lower (mode "min") or higher ("max") by
    more than `min_delta`. After `patience` evals in a row without improvement, the run stops
    at the end of the current step, with a reason naming the metric, its best value and step.
    A NaN or infinite value counts as no improvement, or stops at once with `stop_on_nonfinite`.

    A monitor that no evaluator reports is a ValueError listing the keys there are: at once
    when `eval_name` is given, otherwise right after the first round of evals (one step
    later). A run of at least one step that saw no eval at all, and was not stopped by
    anyone else, fails at train end.

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
        self._found = False
        self._round_step: int | None = None
        self._missing: dict[str, list[str]] = {}
        self._in_step_metrics = False
        self._start_step = 0

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, min_delta={self.min_delta})"
        )

    def on_train_start(self, state: LoopState) -> None:
        """Forget the previous run's best."""
        self._reset()
        self._start_step = state.step

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Until the monitor is found: fail as soon as a round of evals went by without it."""
        if self._found:
            return
        if self._round_step is not None:
            # The evals of the previous step all ran, and none of them reported the metric.
            self._raise_missing(self._missing)
        if self.monitor in metrics:
            self._in_step_metrics = True

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Compare the monitored metric with the best so far; request a stop past patience."""
        if not self._found:
            self._find_source(step_idx, eval_name, metrics)
            if not self._found:
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
        """Fail loudly if no evaluator reported the monitored metric, or no eval ran at all."""
        if self._found:
            return
        if self._missing:
            self._raise_missing(self._missing)
        if state.stop_reason is not None or state.step == self._start_step:
            return  # stopped by someone else, or no step taken: nothing was missed
        where = f"the evaluator {self.eval_name!r}" if self.eval_name else "any evaluator"
        msg = (
            f"EarlyStopping(monitor={self.monitor!r}) saw no eval from {where} in the "
            f"{state.step - self._start_step} steps of run {state.run_name!r}, so it could "
            f"never stop it{self._step_hint()}; pass TrainLoop(evaluators={{name: fn}}, "
            f"eval_every=N) with N at most the run's length, or remove EarlyStopping"
        )
        raise ValueError(msg)

    def _find_source(self, step_idx: int, eval_name: str, metrics: dict[str, float]) -> None:
        if self.eval_name is not None and eval_name != self.eval_name:
            # Another evaluator: noted, in case the one named never reports.
            self._missing.setdefault(eval_name, sorted(metrics))
            return
        if self.monitor in metrics:
            self._source = eval_name
            self._found = True
            return
        if self.eval_name is not None:
            self._raise_missing({eval_name: sorted(metrics)})
        self._round_step = step_idx
        self._missing[eval_name] = sorted(metrics)

    def _step_hint(self) -> str:
        if not self._in_step_metrics:
            return ""
        return (
            f" ({self.monitor!r} is a metric of the step function, but EarlyStopping watches "
            f"eval metrics)"
        )

    def _raise_missing(self, seen: dict[str, list[str]]) -> None:
        where = "; ".join(
            f"{name!r} has {', '.join(keys) or 'no metrics'}" for name, keys in seen.items()
        )
        named = "" if self.eval_name is None else f" of the evaluator {self.eval_name!r}"
        msg = (
            f"EarlyStopping(monitor={self.monitor!r}): no such metric in the eval results"
            f"{named} ({where}){self._step_hint()}; set monitor to one of those keys"
            + ("" if self.eval_name is None else " or change eval_name")
            + ", or have an evaluator return it"
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
