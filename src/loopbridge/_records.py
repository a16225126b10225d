"""The run's files: metric rows and manifest rows, as JSON lines flushed row by row."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["JsonLinesWriter", "json_safe"]


def json_safe(value: float) -> float | str:
    """NaN and infinities as the strings strict JSON readers accept; other floats unchanged."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


class JsonLinesWriter:
    """Appends one JSON object per line and flushes it, so a reader sees each row at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self.rows = 0

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row and flush it to the operating system."""
        self._file.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._file.flush()
        self.rows += 1

    def close(self) -> None:
        """Close the file; further writes fail."""
        self._file.close()

    def __enter__(self) -> JsonLinesWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
