"""Metrics as the hooks receive them: a new `dict[str, float]`, whatever the step returned.

Step functions and evaluators return what their framework hands them: numpy scalars, 0-d
torch tensors, Python ints. Those become plain floats here, once, so every callback and the
metric file see floats. Anything else is refused, naming the function, the key and the type.
A dict of str keys and plain float values, the common case, takes a fast path (a copy and
one type test per item); see benchmarks/bench_metrics.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["coerce_metrics", "describe"]

_EXPECTED = "a number: a float, an int or bool, a numpy scalar, or a 0-d tensor"


def coerce_metrics(out: object, where: str) -> dict[str, float]:
    """`out` as a new dict of str to float; None is no metrics. `where` names the function."""
    if type(out) is dict:
        for key, value in out.items():
            if type(value) is not float or type(key) is not str:
                break
        else:
            return out.copy()
    return _coerce(out, where)


def _coerce(out: object, where: str) -> dict[str, float]:
    """The slow path: convert each value, or raise naming what is wrong and how to fix it."""
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        msg = (
            f"{where} returned {describe(out)}; expected a mapping of metric names to numbers "
            f"(or None), e.g. {{'loss': 0.25}}: return a dict"
        )
        raise TypeError(msg)
    metrics: dict[str, float] = {}
    for key, value in out.items():
        if type(key) is not str:
            msg = (
                f"{where} returned a metric named {key!r} ({type(key).__name__}); metric "
                f"names must be str: use str(name) as the key"
            )
            raise TypeError(msg)
        metrics[key] = _as_float(value, key, where)
    return metrics


def _as_float(value: Any, key: str, where: str) -> float:
    """One metric value as a float: numbers, numpy scalars and 0-d tensors; else TypeError."""
    if isinstance(value, float | int):  # bool is an int: True counts as 1.0
        try:
            return float(value)
        except OverflowError:
            pass  # an int too large for a float: refused below
    elif not isinstance(value, str | bytes | complex) and getattr(value, "ndim", 0) == 0:
        try:
            # .item() first: numpy scalars and tensors (where float() warns under autograd).
            item = getattr(value, "item", None)
            plain = item() if callable(item) else value
            if hasattr(type(plain), "__float__") and not isinstance(plain, complex):
                return float(plain)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            pass
    fix = _fix_for(value)
    msg = f"{where} returned metrics[{key!r}] = {describe(value)}; expected {_EXPECTED}: {fix}"
    raise TypeError(msg)


def _fix_for(value: object) -> str:
    """The usual way to turn such a value into a float."""
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int) and ndim > 0:
        shape = tuple(getattr(value, "shape", ()))
        return f"it has shape {shape}; reduce it to one number, e.g. x.mean().item()"
    if value is None:
        return "return a number for every key, or leave the key out"
    if isinstance(value, str | bytes):
        return "return the number itself, not its text (float(text) if it must be parsed)"
    if isinstance(value, int):
        return "it is too large for a float; scale it or log it as a parameter instead"
    return "convert it to a float, e.g. float(x) or x.item()"


def describe(value: object) -> str:
    """A short, bounded description of a value: its type and a clipped repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__qualname__} {text}"
