"""Metrics from step functions and evaluators become plain floats, or a precise error."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch

import loopbridge as lb
from loopbridge._metrics import coerce_metrics
from loopbridge.testing import RecordingCallback

ACCEPTED: dict[str, tuple[Any, float]] = {
    "float": (0.25, 0.25),
    "int": (3, 3.0),
    "bool": (True, 1.0),
    "nan": (float("nan"), float("nan")),
    "numpy float32": (np.float32(0.5), 0.5),
    "numpy float64": (np.float64(0.75), 0.75),
    "numpy int64": (np.int64(7), 7.0),
    "numpy bool": (np.bool_(False), 0.0),
    "numpy 0-d array": (np.array(1.5), 1.5),
    "torch 0-d tensor": (torch.tensor(2.5), 2.5),
    "torch 0-d int tensor": (torch.tensor(4), 4.0),
    "torch tensor with grad": (torch.tensor(1.0, requires_grad=True) * 3, 3.0),
    "Decimal": (Decimal("1.25"), 1.25),
    "Fraction": (Fraction(1, 4), 0.25),
}

REFUSED_VALUES: dict[str, tuple[Any, str]] = {
    "str": ("0.5", "str '0.5'"),
    "bytes": (b"1", "bytes b'1'"),
    "None": (None, "NoneType None"),
    "list": ([0.5], "list [0.5]"),
    "complex": (1j, "complex 1j"),
    "int too large": (10**400, "int 1000"),
    "torch vector": (torch.ones(2), "Tensor tensor([1., 1.])"),
    "torch 1-element vector": (torch.ones(1), "Tensor tensor([1.])"),
    "numpy vector": (np.ones(3), "ndarray array([1., 1., 1.])"),
    "numpy complex": (np.complex128(1j), "complex128"),
    "object": (object(), "object <object object"),
}

REFUSED_RETURNS: dict[str, Any] = {
    "float": 0.5,
    "str": "loss=0.5",
    "list of pairs": [("loss", 0.5)],
    "tuple": (0.5, 0.1),
    "tensor": torch.tensor(0.5),
}


def _run(tmp_path: Path, step: Any, **kwargs: Any) -> tuple[RecordingCallback, lb.LoopArtifacts]:
    recorder = RecordingCallback()
    loop = lb.TrainLoop(
        step, range(3), max_steps=2, out_dir=tmp_path, callbacks=[recorder], **kwargs
    )
    return recorder, loop.run()


class TestStepMetrics:
    """What a step function may return, and the error for everything else."""

    @pytest.mark.parametrize("label", sorted(ACCEPTED))
    def test_number_like_values_become_floats(self, tmp_path: Path, label: str) -> None:
        """Each everyday number type reaches the hooks and the metric file as a plain float."""
        value, expected = ACCEPTED[label]

        def train_step(state: lb.LoopState, batch: lb.TrainingBatch) -> Mapping[str, Any]:
            return {"m": value}

        recorder, artifacts = _run(tmp_path, train_step)
        for call in recorder.calls_to("on_step_end"):
            metrics = call.args[3]
            assert type(metrics["m"]) is float
            assert metrics["m"] == expected or (math.isnan(expected) and math.isnan(metrics["m"]))
        assert artifacts.metrics_path is not None  # TrainLoop writes it
        rows = [json.loads(line) for line in artifacts.metrics_path.read_text().splitlines()]
        assert len(rows) == 2

    def test_mappings_and_none(self, tmp_path: Path) -> None:
        """A read-only mapping is accepted and copied; None means no metrics."""
        out = iter([MappingProxyType({"loss": np.float32(1.0)}), None])

        def train_step(state: lb.LoopState, batch: lb.TrainingBatch) -> Any:
            return next(out)

        recorder, _ = _run(tmp_path, train_step)
        assert [c.args[3] for c in recorder.calls_to("on_step_end")] == [{"loss": 1.0}, {}]

    def test_a_plain_dict_is_copied(self) -> None:
        """The fast path still hands the hooks a new dict, so the step may reuse its own."""
        out = {"loss": 0.5}
        copy = coerce_metrics(out, "step")
        assert copy == out
        assert copy is not out

    @pytest.mark.parametrize("label", sorted(REFUSED_VALUES))
    def test_other_values_name_function_key_and_type(self, tmp_path: Path, label: str) -> None:
        """Any other value is a TypeError naming the step function, the key and the type."""
        value, shown = REFUSED_VALUES[label]
        steps: list[int] = []

        def train_step(state: lb.LoopState, batch: lb.TrainingBatch) -> Mapping[str, Any]:
            steps.append(state.step)
            return {"loss": 0.1, "bad_metric": value}

        with pytest.raises(TypeError) as info:
            _run(tmp_path, train_step)
        message = str(info.value)
        assert "step function" in message
        assert "train_step" in message
        assert "metrics['bad_metric']" in message
        assert shown in message
        assert "expected a number" in message
        assert steps == [0]  # refused at the first step, before any hook saw it

    @pytest.mark.parametrize("label", sorted(REFUSED_RETURNS))
    def test_non_mappings_refused(self, tmp_path: Path, label: str) -> None:
        """A step returning a number, a string or a sequence is told to return a dict."""
        value = REFUSED_RETURNS[label]

        def train_step(state: lb.LoopState, batch: lb.TrainingBatch) -> Any:
            return value

        with pytest.raises(TypeError, match=r"step function .*train_step returned .*return a dict"):
            _run(tmp_path, train_step)

    def test_non_str_keys_refused(self, tmp_path: Path) -> None:
        """Metric names must be strings; the error says so and how to fix it."""

        def train_step(state: lb.LoopState, batch: lb.TrainingBatch) -> Any:
            return {1: 0.5}

        with pytest.raises(TypeError, match=r"a metric named 1 \(int\).*use str\(name\)"):
            _run(tmp_path, train_step)


class TestEvaluatorMetrics:
    """Evaluators follow the same rule, and the error names the evaluator."""

    def test_numpy_and_torch_values_become_floats(self, tmp_path: Path) -> None:
        """An evaluator's numpy and tensor values reach on_eval as plain floats."""

        def validate(state: lb.LoopState) -> Mapping[str, Any]:
            return {"acc": np.float64(0.9), "loss": torch.tensor(0.1)}

        recorder, _ = _run(
            tmp_path, lambda s, b: {"loss": 1.0}, evaluators={"val": validate}, eval_every=1
        )
        evals = recorder.calls_to("on_eval")
        assert len(evals) == 2
        assert all(type(v) is float for call in evals for v in call.args[3].values())

    def test_bad_value_names_the_evaluator(self, tmp_path: Path) -> None:
        """A string from an evaluator names the evaluator, its function and the key."""

        def validate(state: lb.LoopState) -> Mapping[str, Any]:
            return {"acc": "90%"}

        with pytest.raises(
            TypeError, match=r"evaluator 'val' \(.*validate\) returned metrics\['acc'\] = str"
        ):
            _run(tmp_path, lambda s, b: {}, evaluators={"val": validate}, eval_every=1)

    def test_non_mapping_names_the_evaluator(self, tmp_path: Path) -> None:
        """An evaluator returning a float is told to return a dict."""

        def validate(state: lb.LoopState) -> Any:
            return 0.5

        with pytest.raises(TypeError, match=r"evaluator 'val' .* returned float 0.5"):
            _run(tmp_path, lambda s, b: {}, evaluators={"val": validate}, eval_every=1)
