"""The plain dataclasses that the hooks receive and the runners return."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loopbridge._profile import TimingRow
    from loopbridge._report import BridgeStats, DrainReport
    from loopbridge._row_digest import PendingDigest

__all__ = [
    "ArmResult",
    "EvalResult",
    "ExperimentResult",
    "LogContext",
    "LoopArtifacts",
    "LoopState",
    "ManifestRow",
    "RunResult",
    "RunStatus",
    "TrainingBatch",
]


@dataclass
class LoopState:
    """The live state of one training run, shared by every hook of that run.

    `step` counts the steps completed so far: inside `on_step_end` it equals `step_idx + 1`.
    """

    run_name: str
    run_id: str
    max_steps: int | None
    out_dir: Path
    config: Mapping[str, Any] = field(default_factory=dict)
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    rank: int = 0
    """This process's global rank in a distributed run (0 when there is one process)."""
    world_size: int = 1
    """How many processes the run has (torchrun's WORLD_SIZE)."""

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step; the first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def should_stop(self) -> bool:
        """Whether a hook has asked the loop to stop."""
        return self.stop_reason is not None


@dataclass(frozen=True, slots=True)
class TrainingBatch:
    """One batch as the step function sees it: its 0-based index, the data, and its size."""

    index: int
    data: Any
    size: int | None = None


@dataclass(frozen=True)
class ManifestRow:
    """One saved checkpoint: where it lies, how big it is, and its content digest.

    `path` is a file or a directory of shards. `digest` is `blake3:<hex>` of the file, or of
    the sorted `(relative path, size, hex)` lines of a directory (`sha256:<hex>` in rows of
    older versions, still checked); None when hashing is off.
    A row from `for_checkpoint` gets its digest off the training thread: `digest` may still be
    None in `on_checkpoint`, and `wait_digest()` returns it once known. Equality and hashing
    leave the digest out, since it can be filled in after the row is made.
    """

    step: int
    path: Path
    size_bytes: int
    digest: str | None = field(compare=False)
    created_at: float
    is_final: bool = False
    run_name: str = ""
    _pending: PendingDigest | None = field(default=None, init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The row as the JSON object written to the manifest file."""
        return {
            "step": self.step,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "digest": self.digest,
            "created_at": self.created_at,
            "is_final": self.is_final,
            "run_name": self.run_name,
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its pending digest (a handle to this process's threads)."""
        state = dict(self.__dict__)
        state["_pending"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def wait_digest(self, timeout: float | None = None) -> str | None:
        """The digest, waiting up to `timeout` seconds while it is computed in the background.

        None when the row has no digest and none is coming (hashing off). If nobody computes
        it yet, it is computed in the calling thread.

        Raises:
            TimeoutError: it is not known within `timeout`.
            IntegrityError: the checkpoint changed or vanished after it was saved.
        """
        if self.digest is not None or self._pending is None:
            return self.digest
        return self._pending.wait(timeout)

    @classmethod
    def for_checkpoint(
        cls,
        path: Path,
        *,
        step: int,
        is_final: bool = False,
        run_name: str = "",
        digest: bool = True,
    ) -> ManifestRow:
        """Describe a checkpoint already written at `path` (a file or a directory of shards).

        For foreign loops and adapters as for `TrainLoop`. Only the files' sizes and stamps
        are read here; unless `digest=False`, the digest comes later, off the calling thread
        (see `wait_digest`): an uploader computes it while it reads the files for upload, or
        `loopbridge._row_digest.digest_in_background` does once `on_checkpoint` returned.
        """
        from loopbridge._row_digest import PendingDigest, stamp_path

        stamps = stamp_path(path)
        row = cls(
            step=step,
            path=path,
            size_bytes=sum(stamp.size for stamp in stamps),
            digest=None,
            created_at=time.time(),
            is_final=is_final,
            run_name=run_name,
        )
        if digest:
            object.__setattr__(row, "_pending", PendingDigest(row, stamps))
        return row

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManifestRow:
        """Read a row back from its JSON object."""
        return cls(
            step=int(data["step"]),
            path=Path(data["path"]),
            size_bytes=int(data["size_bytes"]),
            digest=data.get("digest"),
            created_at=float(data["created_at"]),
            is_final=bool(data.get("is_final", False)),
            run_name=str(data.get("run_name", "")),
        )


@dataclass
class LoopArtifacts:
    """What a finished loop leaves behind, and why it stopped.

    `metrics_path` and `manifest_path` are the files TrainLoop writes; they are None for a
    loop that writes no such file (a framework's, through an adapter): its rows are then
    only in `manifest` and in the framework's own logs.
    """

    out_dir: Path
    metrics_path: Path | None
    manifest_path: Path | None
    manifest: list[ManifestRow]
    final_checkpoint: ManifestRow | None
    steps_completed: int
    stop_reason: str
    drain_report: DrainReport | None = None
    hook_timings: list[TimingRow] = field(default_factory=list)
    """Per (callback, hook) timings on the loop thread, when profiling is on."""
    bridge_stats: BridgeStats | None = None
    """The bridge's counters and timings when the run ended (cumulative if shared)."""


@dataclass
class LogContext:
    """Where a run sits in its experiment, and the ids that loggers create for it.

    Loggers store the ids they create in `ids` (`experiment_id`, `group:<name>`, `run_id`);
    the same dict travels from experiment to group to run, so a run can find its parents.
    """

    experiment_name: str
    arm_name: str | None = None
    group_name: str | None = None
    repeat_index: int | None = None
    stage_index: int | None = None
    run_name: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    resume_from: ManifestRow | None = None
    rank: int = 0
    """This process's global rank in a distributed run (0 when there is one process)."""
    world_size: int = 1
    """How many processes the run has (torchrun's WORLD_SIZE)."""


@dataclass
class EvalResult:
    """One benchmark's score: metrics, per-slice breakdowns and free-form tags."""

    name: str
    metrics: dict[str, float]
    breakdowns: dict[str, dict[str, float]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def flat_metrics(self, prefix: str = "bench") -> dict[str, float]:
        """Metrics and breakdowns under one key each: `<prefix>/<name>/[<slice>/]<metric>`."""
        head = f"{prefix}/{self.name}"
        values = {f"{head}/{key}": value for key, value in self.metrics.items()}
        for slice_name, slice_metrics in self.breakdowns.items():
            values.update({f"{head}/{slice_name}/{k}": v for k, v in slice_metrics.items()})
        return values


class RunStatus(enum.StrEnum):
    """How a run ended."""

    COMPLETED = "completed"
    FAILED = "failed"


@dataclass
class RunResult:
    """The outcome of one run: status, final metrics, artifacts, evals and its drain report."""

    run_name: str
    status: RunStatus
    final_metrics: dict[str, float] = field(default_factory=dict)
    artifacts: LoopArtifacts | None = None
    eval_results: list[EvalResult] = field(default_factory=list)
    drain_report: DrainReport | None = None
    duration_s: float = 0.0
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """True when the run completed and its background work all finished."""
        report_ok = self.drain_report is None or self.drain_report.ok
        return self.status is RunStatus.COMPLETED and report_ok


@dataclass
class ArmResult:
    """One arm's runs (replicates or stages) and a summary across them."""

    name: str
    config: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, float]:
        """The mean of each final metric over the arm's completed runs."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for run in self.runs:
            if run.status is not RunStatus.COMPLETED:
                continue
            for name, value in run.final_metrics.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        return {name: sums[name] / counts[name] for name in sums}


@dataclass
class ExperimentResult:
    """The arms of a finished experiment, how long it took, and the ids loggers created."""

    name: str
    arms: dict[str, ArmResult]
    duration_s: float
    ids: dict[str, str] = field(default_factory=dict)
    drain_report: DrainReport | None = None
    """Background work spawned after the last run (by on_experiment_end), drained at the end."""

    @property
    def runs(self) -> list[RunResult]:
        """Every run of every arm, in the order they ran."""
        return [run for arm in self.arms.values() for run in arm.runs]

    @property
    def ok(self) -> bool:
        """True when every run is ok and the final drain found nothing amiss."""
        final_ok = self.drain_report is None or self.drain_report.ok
        return final_ok and all(run.ok for run in self.runs)
