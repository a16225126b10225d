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


def _strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by its json_safe string."""
    if isinstance(value, float):
        return json_safe(value)
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


class JsonLinesWriter:
    """Appends one JSON object per line and flushes it, so a reader sees each row at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self.rows = 0

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row and flush it to the operating system."""
        try:
            line = json.dumps(row, separators=(",", ":"), allow_nan=False)
        except ValueError:
            # A NaN or infinite value: spelled as strings, so strict readers accept the line.
            line = json.dumps(_strict(row), separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        self.rows += 1

    def write_line(self, line: str) -> None:
        """Write one already encoded row and flush it."""
        self._file.write(line + "\n")
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
