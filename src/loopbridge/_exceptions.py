"""The errors loopbridge raises.

LoopbridgeError
├── CallbackValidationError (also TypeError)   a callback refused at registration
├── CallbackNotAttachedError (also RuntimeError) spawn/call on a callback in no list
├── BridgeError (also RuntimeError)
│   ├── BridgeClosedError                      spawn/call after close()
│   └── BridgeLoopThreadError                  a blocking call made on the bridge's own loop
├── CheckpointFilesError (also OSError)       a checkpoint holds something that is not a file
├── DrainError                                 background work of a run failed or was left undone
├── OutDirInUseError (also FileExistsError)    a new run in an out dir an earlier run wrote to
├── StoreError                                 an object store refused an operation
│   ├── PermanentStoreError                    not worth retrying (403, NoSuchBucket, 400)
│   │   └── DestinationError                   a destination failed its pre-flight check
│   └── IntegrityError                         what was uploaded is not what was saved
└── MissingExtraError (also ImportError)       an optional dependency is not installed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loopbridge._report import DrainReport

__all__ = [
    "BridgeClosedError",
    "BridgeError",
    "BridgeLoopThreadError",
    "CallbackNotAttachedError",
    "CallbackValidationError",
    "CheckpointFilesError",
    "DestinationError",
    "DrainError",
    "IntegrityError",
    "JournalError",
    "LoopbridgeError",
    "MissingExtraError",
    "OutDirInUseError",
    "PermanentStoreError",
    "StoreError",
]


class LoopbridgeError(Exception):
    """The base of every error loopbridge raises on purpose."""


class CallbackValidationError(LoopbridgeError, TypeError):
    """A callback was refused at registration; `callback` and `hook` say which and where."""

    def __init__(self, message: str, *, callback: object, hook: str | None = None) -> None:
        super().__init__(message)
        self.callback = callback
        self.hook = hook


class CallbackNotAttachedError(LoopbridgeError, RuntimeError):
    """`Callback.spawn` or `Callback.call` was used on a callback that is in no bridged list."""


class BridgeError(LoopbridgeError, RuntimeError):
    """The bridge was used in a way its lifecycle does not allow."""


class BridgeClosedError(BridgeError):
    """Work was handed to a bridge after it was closed."""


class BridgeLoopThreadError(BridgeError):
    """A blocking bridge method was called from the bridge's own event loop."""


class CheckpointFilesError(LoopbridgeError, OSError):
    """A checkpoint holds a dangling link, a link loop, an unreadable directory or a non-file."""


class OutDirInUseError(LoopbridgeError, FileExistsError):
    """A run from step 0 was started in an out dir an earlier run already wrote to."""


class DrainError(LoopbridgeError):
    """Background work failed, was cancelled, or was still pending when the drain ended.

    `report` is the full `DrainReport`.
    """

    def __init__(self, message: str, report: DrainReport) -> None:
        super().__init__(message)
        self.report = report


class JournalError(LoopbridgeError):
    """An upload journal cannot be used: corrupt, foreign, or from another schema."""


class StoreError(LoopbridgeError):
    """An object store operation failed; `key` names the object, never the credentials."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class PermanentStoreError(StoreError):
    """A store error that retrying cannot fix, such as access denied or a missing bucket."""


class DestinationError(PermanentStoreError):
    """A checkpoint destination cannot work (found before training); the message has the fix."""


class IntegrityError(StoreError):
    """The stored object does not match the local file: size, digest or ETag differ."""


class MissingExtraError(LoopbridgeError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""
