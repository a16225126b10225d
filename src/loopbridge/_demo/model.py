"""A tiny logistic-regression model and synthetic data, in pure Python, for the demo."""

from __future__ import annotations

import math
import random
import struct
from array import array
from dataclasses import dataclass

__all__ = ["Dataset", "LogisticModel", "make_data"]


@dataclass(frozen=True)
class Dataset:
    """Feature rows and 0/1 labels."""

    x: list[list[float]]
    y: list[float]

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, index: int, size: int) -> tuple[list[list[float]], list[float]]:
        """The `index`-th batch of `size` rows, wrapping around the data."""
        start = (index * size) % len(self.y)
        rows = [(start + i) % len(self.y) for i in range(size)]
        return [self.x[r] for r in rows], [self.y[r] for r in rows]


def make_data(
    n_train: int, n_val: int, n_test: int, dim: int, *, seed: int, flip: float = 0.1
) -> tuple[Dataset, Dataset, Dataset]:
    """Linearly separable points with `flip` of the labels flipped: train, val and test."""
    rng = random.Random(seed)
    true_w = [rng.gauss(0.0, 1.0) for _ in range(dim)]

    def sample(n: int) -> Dataset:
        xs, ys = [], []
        for _ in range(n):
            x = [rng.gauss(0.0, 1.0) for _ in range(dim)]
            label = 1.0 if sum(w * v for w, v in zip(true_w, x, strict=True)) > 0 else 0.0
            if rng.random() < flip:
                label = 1.0 - label
            xs.append(x)
            ys.append(label)
        return Dataset(xs, ys)

    return sample(n_train), sample(n_val), sample(n_test)


def _sigmoid(z: float) -> float:
    # Two branches so that exp never overflows, however large the weights grow.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _log_loss(p: float, y: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


class LogisticModel:
    """Logistic regression trained by minibatch SGD with plain Python floats."""

    def __init__(self, dim: int, *, seed: int) -> None:
        rng = random.Random(seed)
        self.w = [rng.gauss(0.0, 0.01) for _ in range(dim)]
        self.b = 0.0

    def step(self, x: list[list[float]], y: list[float], lr: float) -> dict[str, float]:
        """One SGD step on a batch; returns the batch's loss, accuracy and gradient norm."""
        w, n = self.w, len(y)
        grad = [0.0] * len(w)
        grad_b = loss = correct = 0.0
        for row, label in zip(x, y, strict=True):
            p = _sigmoid(sum(wi * xi for wi, xi in zip(w, row, strict=True)) + self.b)
            err = p - label
            for i, xi in enumerate(row):
                grad[i] += err * xi
            grad_b += err
            loss += _log_loss(p, label)
            correct += (p >= 0.5) == (label == 1.0)
        self.w = [wi - lr * gi / n for wi, gi in zip(w, grad, strict=True)]
        self.b -= lr * grad_b / n
        norm = math.sqrt(sum(g * g for g in grad) + grad_b * grad_b) / n
        return {"loss": loss / n, "acc": correct / n, "grad_norm": norm}

    def predict(self, x: list[float]) -> float:
        """The predicted probability of label 1."""
        return _sigmoid(sum(wi * xi for wi, xi in zip(self.w, x, strict=True)) + self.b)

    def evaluate(self, data: Dataset) -> dict[str, float]:
        """Mean log loss and accuracy on a dataset."""
        loss = correct = 0.0
        for row, label in zip(data.x, data.y, strict=True):
            p = self.predict(row)
            loss += _log_loss(p, label)
            correct += (p >= 0.5) == (label == 1.0)
        return {"loss": loss / len(data), "acc": correct / len(data)}

    def to_bytes(self) -> bytes:
        """The parameters as little-endian doubles, prefixed by their count."""
        params = array("d", [*self.w, self.b])
        if params.itemsize != 8:  # pragma: no cover - every CPython platform has 8-byte doubles
            raise RuntimeError("this platform's C double is not 8 bytes")
        return struct.pack("<I", len(params)) + params.tobytes()
