"""One report for a torchrun job: every rank's drain report, gathered on rank 0 at train end.

Each rank drains its own bridge. Then it puts a summary of its report (counts, and what failed,
was cancelled, left pending or dropped) in torch.distributed's key-value store, the TCPStore
that torchrun (or `init_process_group`) already serves at `MASTER_ADDR:MASTER_PORT`. Rank 0
waits for the others' summaries with a bound and merges them into its own report, each task
named with its rank ("rank 1: upload step 4 ..."), so rank 0's `DrainReport` tells whether the
job lost anything, and the run's drain policy (raise or warn) applies to every rank's work.

Why the key-value store and not a collective: `all_gather_object` waits for as long as the
process group's timeout (30 minutes by default) and needs an initialised group on every rank;
`TCPStore.wait` takes its own deadline, and a rank that never reports becomes a named failure in
rank 0's report instead of a hang. It runs after the drain, outside every hook.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from loopbridge._exceptions import LoopbridgeError
from loopbridge._ranks import RankInfo
from loopbridge._report import DrainReport, Loss, TaskRecord

__all__ = ["RankTaskError", "gather_reports"]

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 30.0
_runs: Counter[tuple[int, str]] = Counter()  # reports sent per (rank, run name) in this process


class RankTaskError(LoopbridgeError):
    """A background task failed on another rank; the message is that rank's error."""


def gather_reports(
    report: DrainReport, rank: RankInfo, *, run_name: str, timeout: float
) -> DrainReport:
    """Send this rank's report to rank 0; on rank 0, return its report merged with every rank's.

    A rank that sends nothing within `timeout` seconds is a failed record of rank 0's report.
    Without torch or a reachable store, each rank keeps its own report (logged once).
    """
    if not rank.distributed:
        return report
    store = _kv_store()
    if store is None:
        logger.warning(
            "%s: no torch.distributed key-value store to gather the ranks' reports; each "
            "rank's own report covers only its own background work",
            rank,
        )
        return report
    # Every rank runs the same program, so the n-th run of a name is the same run everywhere.
    _runs[rank.rank, run_name] += 1
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"loopbridge/report/{job}/{restart}/{run_name}/{_runs[rank.rank, run_name]}"
    store.set(f"{prefix}/{rank.rank}", json.dumps(_summary(report)))
    if not rank.is_zero:
        return report
    merged = report
    deadline = time.monotonic() + timeout  # one deadline for all ranks, not one each
    for other in range(1, rank.world_size):
        key = f"{prefix}/{other}"
        try:
            left = max(deadline - time.monotonic(), 0.001)
            store.wait([key], timedelta(seconds=left))
            data = json.loads(store.get(key))
        except Exception as exc:  # torch raises its own DistStoreError on a timeout
            detail = f"rank {other} sent no report of its background work within {timeout:g}s"
            error = RankTaskError(f"{detail}: {exc}")
            merged = merged.merge(DrainReport(failed=(TaskRecord(f"rank {other}", None, error),)))
            continue
        merged = merged.merge(_report_of(other, data))
    return merged


def _kv_store() -> Any:
    """A client of the job's TCPStore, or None when there is no torch or no store."""
    if "torch" not in sys.modules and not os.environ.get("MASTER_ADDR"):
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    try:
        if host and port:
            return dist.TCPStore(  # type: ignore[attr-defined]  # not in torch's stubs
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=_CONNECT_TIMEOUT),
                wait_for_workers=False,
            )
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception as exc:
        logger.warning("cannot reach torch.distributed's key-value store: %s", exc)
    return None


def _summary(report: DrainReport) -> dict[str, Any]:
    """A JSON summary of a report: counts, and every record that is not a completion."""

    def records(items: tuple[TaskRecord, ...]) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "key": None if r.key is None else str(r.key),
                "error": None
                if r.exception is None
                else f"{type(r.exception).__name__}: {r.exception}",
            }
            for r in items
        ]

    return {
        "completed": report.completed,
        "failed": records(report.failed),
        "cancelled": records(report.cancelled),
        "pending": records(report.pending),
        "losses": [
            {"source": loss.source, "count": loss.count, "detail": loss.detail}
            for loss in report.losses
        ],
        "timed_out": report.timed_out,
        "summary": report.summary(),
    }


def _report_of(rank: int, data: dict[str, Any]) -> DrainReport:
    """Another rank's summary as a report whose records name that rank."""

    def records(items: list[dict[str, Any]]) -> tuple[TaskRecord, ...]:
        out = []
        for item in items:
            error = item.get("error")
            exception = RankTaskError(f"on rank {rank}: {error}") if error else None
            out.append(TaskRecord(f"rank {rank}: {item['name']}", item.get("key"), exception))
        return tuple(out)

    return DrainReport(
        completed=int(data["completed"]),
        failed=records(data["failed"]),
        cancelled=records(data["cancelled"]),
        pending=records(data["pending"]),
        losses=tuple(
            Loss(f"rank {rank}: {x['source']}", int(x["count"]), str(x["detail"]))
            for x in data["losses"]
        ),
        timed_out=bool(data["timed_out"]),
        notes=(f"rank {rank}: {data['summary']}",),
    )
