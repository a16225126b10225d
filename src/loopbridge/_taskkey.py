"""TaskKey: a spawn key that is unique by identity and reads as a label in reports."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["TaskKey"]


@dataclass(frozen=True, slots=True)
class TaskKey:
    """A key for `spawn(key=...)`: equal only with the same `label` and `identity`, shown as
    `label` alone. Callbacks key their tasks per instance and per run (`identity`, such as
    `(id(self), run_number)`) without that identity showing up in drain reports and logs.
    """

    label: str
    identity: Hashable = field(default=None)

    def __repr__(self) -> str:
        return self.label
