"""MLflow's request limits, and how MLflowLogger stays within them without silent truncation.

log-batch takes at most 1000 metrics, 100 params, 100 tags and 1000 items in all; keys are at
most 250 characters of letters, digits and `_ - . space : /`; the server cuts param values
over 6000 and tag values over 8000 characters without a word. Here, keys MLflow would refuse
are made safe (characters replaced; too long: a prefix plus a hash) and the original goes in a
`loopbridge.original_key.<hash>` tag; over-long values get a visible marker, a warning, and
their full text kept for an artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "MAX_ITEMS_PER_BATCH",
    "MAX_KEY_CHARS",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_CHARS",
    "MAX_TAGS_PER_BATCH",
    "MAX_TAG_VALUE_CHARS",
    "KeyShortener",
    "LongValues",
    "flatten_config",
    "log_batches",
    "mlflow_value",
    "shorten",
]

logger = logging.getLogger("loopbridge.callbacks.mlflow")

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ITEMS_PER_BATCH = 1000
MAX_KEY_CHARS = 250
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000

# MLflow's own rule for metric, param and tag names (mlflow.utils.validation).
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")

LongValues = dict[str, dict[str, str]]
"""Full texts of shortened values: {"param" | "tag": {key: value}}, uploaded as an artifact."""


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys, every value as the text MLflow stores for a param."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, str):
            flat[name] = value
        elif isinstance(value, list | tuple | Mapping):
            flat[name] = json.dumps(value, default=str, sort_keys=True)
        else:
            flat[name] = str(value)
    return flat


def mlflow_value(value: float) -> float | str:
    """A metric value MLflow keeps: non-finite numbers as the strings protobuf JSON reads."""
    number = float(value)
    if math.isfinite(number):
        return number
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class KeyShortener:
    """Makes keys MLflow accepts, once per key, and remembers the originals to tag."""

    def __init__(self) -> None:
        # Every key seen -> the key logged; a dict hit is the fast path for metric names.
        self._known: dict[str, str] = {}
        self._originals: dict[str, str] = {}
        # Originals shortened since the last tag_originals(); their tags go in the next batch.
        self._pending: list[str] = []

    def key(self, key: str) -> str:
        """`key` itself, or a safe one (invalid characters replaced, long keys hashed).

        A changed key is announced once with a warning, and its original goes in a tag.
        """
        known = self._known.get(key)
        if known is not None:
            return known
        safe = _INVALID_KEY_CHARS.sub("_", key)
        taken = self._originals.get(safe)
        if len(safe) > MAX_KEY_CHARS or (taken is not None and taken != key):
            # Too long, or "acc@1" and "acc#1" both becoming "acc_1": a hash keeps them apart.
            hashed = digest(key)
            safe = f"{safe[: MAX_KEY_CHARS - len(hashed) - 1]}-{hashed}"
        self._known[key] = safe
        self._originals[safe] = key
        if safe != key:
            self._pending.append(key)
            logger.warning(
                "MLflowLogger: key %r (%d characters) is not a valid MLflow key (at most %d "
                "characters of letters, digits and _ - . space : /); logged as %r, the original "
                "is in tag loopbridge.original_key.%s",
                key[:80],
                len(key),
                MAX_KEY_CHARS,
                safe,
                digest(key),
            )
        return safe

    def tag_originals(self, long_values: LongValues) -> list[dict[str, str]]:
        """Tags recording the original of each key shortened since the last call."""
        pending, self._pending = self._pending, []
        return [
            {
                "key": f"loopbridge.original_key.{digest(k)}",
                "value": shorten("tag", f"loopbridge.original_key.{digest(k)}", k, long_values),
            }
            for k in pending
        ]

    def params(self, params: Mapping[str, str], long_values: LongValues) -> list[dict[str, str]]:
        """Params as log-batch items, keys and values within limits."""
        return [
            {"key": self.key(k), "value": shorten("param", k, v, long_values)}
            for k, v in params.items()
        ]

    def tags(self, tags: Mapping[str, str], long_values: LongValues) -> list[dict[str, str]]:
        """Tags as log-batch items, keys and values within limits."""
        return [
            {"key": self.key(k), "value": shorten("tag", k, v, long_values)}
            for k, v in tags.items()
        ]


def shorten(kind: str, key: str, value: str, long_values: LongValues) -> str:
    """`value`, or a visibly marked prefix of it (full value kept in `long_values`)."""
    limit = MAX_PARAM_VALUE_CHARS if kind == "param" else MAX_TAG_VALUE_CHARS
    if len(value) <= limit:
        return value
    marker = f"...[shortened from {len(value)} chars, sha256:{digest(value)}]"
    long_values.setdefault(kind, {})[key] = value
    logger.warning(
        "MLflowLogger: %s %r has %d characters, over MLflow's %d; logged shortened, the full "
        "value goes to an artifact under loopbridge/",
        kind,
        key,
        len(value),
        limit,
    )
    return value[: limit - len(marker)] + marker


def log_batches(
    run_id: str,
    metrics: list[dict[str, Any]],
    params: list[dict[str, str]],
    tags: list[dict[str, str]],
) -> Iterator[dict[str, Any]]:
    """log-batch bodies that each respect MLflow's per-request limits."""
    m = p = t = 0
    while m < len(metrics) or p < len(params) or t < len(tags):
        n_tags = min(MAX_TAGS_PER_BATCH, len(tags) - t)
        n_params = min(MAX_PARAMS_PER_BATCH, len(params) - p, MAX_ITEMS_PER_BATCH - n_tags)
        room = MAX_ITEMS_PER_BATCH - n_tags - n_params
        n_metrics = min(MAX_METRICS_PER_BATCH, len(metrics) - m, room)
        yield {
            "run_id": run_id,
            "metrics": metrics[m : m + n_metrics],
            "params": params[p : p + n_params],
            "tags": tags[t : t + n_tags],
        }
        m, p, t = m + n_metrics, p + n_params, t + n_tags
