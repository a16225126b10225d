"""How `LoopbridgeCallback` sees Lightning's checkpoint writes: two observers, one firing.

`ObservedCheckpointIO` wraps the strategy's CheckpointIO and tells the adapter each file it
wrote; `StrategySaveWatch` wraps the strategy's `save_checkpoint` (an instance attribute) and,
once a save returned, has the adapter fire `on_checkpoint` once for what this rank wrote:
the CheckpointIO's file, or else the checkpoint directory the strategy wrote itself (FSDP's
sharded save, a torch.distributed.checkpoint strategy). See docs/integrations.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from loopbridge._exceptions import MissingExtraError

try:
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    _msg = (
        "loopbridge.integrations.lightning needs Lightning: pip install 'loopbridge[lightning]' "
        "(install torch for your platform first)"
    )
    raise MissingExtraError(_msg) from exc

__all__ = ["ObservedCheckpointIO", "SaveListener", "StrategySaveWatch"]


class SaveListener(Protocol):
    """The adapter's side: a file written by the CheckpointIO, a finished save to fire."""

    def _written(self, trainer: Any, path: str, step: int) -> None: ...

    def _saved(self, trainer: Any, path: str, step: int) -> None: ...


class ObservedCheckpointIO(CheckpointIO):
    """The user's CheckpointIO, telling the adapter each file it has finished writing."""

    def __init__(self, inner: CheckpointIO, adapter: SaveListener, trainer: Any) -> None:
        super().__init__()
        self.inner = inner
        self._adapter = adapter
        self._trainer = trainer

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        step = checkpoint.get("global_step", self._trainer.global_step)
        self._adapter._written(self._trainer, str(path), int(step))

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        loaded: dict[str, Any] = self.inner.load_checkpoint(*args, **kwargs)
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class StrategySaveWatch:
    """The strategy's `save_checkpoint`, and one `on_checkpoint` per save for what this rank wrote.

    Installed as an instance attribute over the strategy's own method (and over one a user
    may have set on the instance, which `restore` puts back).
    """

    def __init__(self, strategy: Any, adapter: SaveListener, trainer: Any) -> None:
        self.strategy = strategy
        self.saving = False
        self.written: list[str] = []
        self._adapter = adapter
        self._trainer = trainer
        previous = strategy.__dict__.get("save_checkpoint")
        # A watch left by an earlier fit that ended abnormally: wrap what it wrapped.
        self._previous = getattr(previous, "_loopbridge_wrapped", previous)
        self._inner = self._previous or type(strategy).save_checkpoint.__get__(strategy)

        def save_checkpoint(
            checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
        ) -> None:
            self.save(checkpoint, filepath, storage_options)

        save_checkpoint._loopbridge_wrapped = self._previous  # type: ignore[attr-defined]
        self._wrapper = save_checkpoint
        strategy.save_checkpoint = save_checkpoint

    def save(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any) -> None:
        """Save through the strategy, then fire once for what this rank wrote."""
        if self.saving:  # a strategy whose save calls save_checkpoint again: the outer fires
            self._inner(checkpoint, filepath, storage_options=storage_options)
            return
        self.saving, self.written = True, []
        try:
            self._inner(checkpoint, filepath, storage_options=storage_options)
        finally:
            self.saving = False
        step = int(checkpoint.get("global_step", self._trainer.global_step))
        written = list(dict.fromkeys(self.written))
        if not written and "://" not in str(filepath) and Path(filepath).is_dir():
            written = [str(filepath)]  # written on every rank, not through the CheckpointIO
        for path in written:
            self._adapter._saved(self._trainer, path, step)

    def restore(self) -> None:
        """Put back the strategy's own `save_checkpoint` (or the one the user had set)."""
        if self.strategy.__dict__.get("save_checkpoint") is not self._wrapper:
            return
        if self._previous is None:
            del self.strategy.save_checkpoint
        else:
            self.strategy.save_checkpoint = self._previous
