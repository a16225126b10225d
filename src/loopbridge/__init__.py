"""loopbridge: the callback layer of a training loop.

Hooks run inline on the loop thread; slow work is spawned onto one background event loop
and drained, with a report, when training ends.
"""

# The built-in callbacks and stores, so that `lb.callbacks.CheckpointUploader` works after
# `import loopbridge as lb`; their optional dependencies (aioboto3) load only when used.
from loopbridge import callbacks, stores
from loopbridge._bridge import Bridge
from loopbridge._callback import HOOK_NAMES, Callback
from loopbridge._dispatch import CallbackList
from loopbridge._exceptions import (
    BridgeClosedError,
    BridgeError,
    BridgeLoopThreadError,
    CallbackNotAttachedError,
    CallbackValidationError,
    CheckpointFilesError,
    DestinationError,
    DrainError,
    IntegrityError,
    JournalError,
    LoopbridgeError,
    MissingExtraError,
    ObjectNotFoundError,
    OutDirInUseError,
    PermanentStoreError,
    RestoreError,
    StoreError,
)
from loopbridge._experiment import Experiment
from loopbridge._future import TaskFuture
from loopbridge._loop import TrainLoop
from loopbridge._profile import HookProfiler, TimingRow
from loopbridge._ranks import RankInfo, detect_rank, every_rank
from loopbridge._registration import not_a_hook
from loopbridge._report import BridgeStats, DrainReport, Loss, TaskRecord
from loopbridge._run_policy import RunPolicy, close_run
from loopbridge._taskkey import TaskKey
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    RunStatus,
    TrainingBatch,
)
from loopbridge._work import to_thread
from loopbridge.restore import Restored, arestore, restore

__version__ = "0.1.0"

__all__ = [
    "ArmResult",
    "Bridge",
    "BridgeClosedError",
    "BridgeError",
    "BridgeLoopThreadError",
    "BridgeStats",
    "Callback",
    "CallbackList",
    "CallbackNotAttachedError",
    "CallbackValidationError",
    "CheckpointFilesError",
    "DestinationError",
    "DrainError",
    "DrainReport",
    "EvalResult",
    "Experiment",
    "ExperimentResult",
    "HOOK_NAMES",
    "HookProfiler",
    "IntegrityError",
    "JournalError",
    "LogContext",
    "LoopArtifacts",
    "LoopState",
    "LoopbridgeError",
    "Loss",
    "ManifestRow",
    "MissingExtraError",
    "ObjectNotFoundError",
    "OutDirInUseError",
    "PermanentStoreError",
    "RankInfo",
    "RestoreError",
    "Restored",
    "RunPolicy",
    "RunResult",
    "RunStatus",
    "StoreError",
    "TaskFuture",
    "TaskKey",
    "TaskRecord",
    "TimingRow",
    "TrainLoop",
    "TrainingBatch",
    "arestore",
    "callbacks",
    "close_run",
    "detect_rank",
    "every_rank",
    "not_a_hook",
    "restore",
    "stores",
    "to_thread",
]
