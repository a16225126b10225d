"""How `LoopbridgeCallback` sees Lightning's checkpoint writes: two observers, one firing.

`ObservedCheckpointIO` wraps the strategy's CheckpointIO and tells the adapter each file it
wrote; `StrategySaveWatch` wraps the strategy's and the trainer's `save_checkpoint` (instance
attributes) and, once a save is complete, has the adapter fire `on_checkpoint` once for what
this rank wrote: the CheckpointIO's file, or else the checkpoint directory the strategy wrote
itself (FSDP's sharded save, a torch.distributed.checkpoint strategy). See
docs/integrations.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from loopbridge._exceptions import MissingExtraError

LIGHTNING_MISSING = (
    "loopbridge.integrations.lightning needs Lightning: pip install 'loopbridge[lightning]' "
    "(install torch for your platform first)"
)
"""What importing the Lightning integration without Lightning says."""

try:
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise MissingExtraError(LIGHTNING_MISSING) from exc

__all__ = ["LIGHTNING_MISSING", "ObservedCheckpointIO", "SaveListener", "StrategySaveWatch"]


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
    """The saves of a fit, and one `on_checkpoint` per save for what this rank wrote.

    Wraps, as instance attributes over the class's methods (or over ones the user had set on
    the instance, which `restore` puts back), the strategy's `save_checkpoint`, which tells
    what this rank wrote, and the trainer's, which fires it once the save is complete on
    every rank: `Trainer.save_checkpoint` waits at a barrier after the strategy's save, and
    until then rank 0 may still be adding files (`meta.pt`) to a directory the ranks share.
    A strategy save called on its own fires when it returns.
    """

    def __init__(self, strategy: Any, adapter: SaveListener, trainer: Any) -> None:
        self.saving = False
        self.written: list[str] = []
        self._adapter = adapter
        self._trainer = trainer
        self._in_trainer_save = 0
        self._done: list[tuple[str, int]] = []  # saved within a trainer save, fired after it
        self._patches = (
            _Patch(strategy, "save_checkpoint", self._strategy_save),
            _Patch(trainer, "save_checkpoint", self._trainer_save),
        )

    def _strategy_save(
        self,
        inner: Any,
        checkpoint: dict[str, Any],
        filepath: Any,
        storage_options: Any | None = None,
    ) -> None:
        """Save through the strategy; note (or fire) what this rank wrote, once."""
        if self.saving:  # a strategy whose save calls save_checkpoint again: the outer fires
            inner(checkpoint, filepath, storage_options=storage_options)
            return
        self.saving, self.written = True, []
        try:
            inner(checkpoint, filepath, storage_options=storage_options)
        finally:
            self.saving = False
        step = int(checkpoint.get("global_step", self._trainer.global_step))
        written = list(dict.fromkeys(self.written))
        if not written and "://" not in str(filepath) and Path(filepath).is_dir():
            written = [str(filepath)]  # written on every rank, not through the CheckpointIO
        if self._in_trainer_save:
            self._done.extend((path, step) for path in written)
            return
        for path in written:
            self._adapter._saved(self._trainer, path, step)

    def _trainer_save(self, inner: Any, *args: Any, **kwargs: Any) -> None:
        """`Trainer.save_checkpoint`; then fire what this rank wrote during it."""
        self._in_trainer_save += 1
        try:
            inner(*args, **kwargs)
        except BaseException:
            self._done.clear()
            raise
        finally:
            self._in_trainer_save -= 1
        if self._in_trainer_save:
            return
        done, self._done = self._done, []
        for path, step in done:
            self._adapter._saved(self._trainer, path, step)

    def restore(self) -> None:
        """Put back the strategy's and the trainer's own `save_checkpoint`."""
        for patch in self._patches:
            patch.restore()


class _Patch:
    """One method of one object replaced by an instance attribute, until `restore`."""

    def __init__(self, obj: Any, name: str, around: Any) -> None:
        self.obj, self.name = obj, name
        previous = obj.__dict__.get(name)
        # A patch left by an earlier fit that ended abnormally: wrap what it wrapped.
        self.previous = getattr(previous, "_loopbridge_wrapped", previous)
        inner = self.previous or getattr(type(obj), name).__get__(obj)

        def patched(*args: Any, **kwargs: Any) -> Any:
            return around(inner, *args, **kwargs)

        patched._loopbridge_wrapped = self.previous  # type: ignore[attr-defined]
        self.patched = patched
        setattr(obj, name, patched)

    def restore(self) -> None:
        """Put the method back, unless someone has replaced ours meanwhile."""
        if self.obj.__dict__.get(self.name) is not self.patched:
            return
        if self.previous is None:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.previous)
