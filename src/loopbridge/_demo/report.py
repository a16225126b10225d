"""The demo's closing summary: a table per run, the profiler's table, and what was lost."""

from __future__ import annotations

from collections.abc import Sequence

from loopbridge._demo.experiment import DemoOptions, DemoOutcome, RunStats
from loopbridge._types import RunResult

__all__ = ["losses", "summary"]

MiB = 1 << 20


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Plain-text columns: the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(row) for row in rows)])


def _run_row(run: RunResult, stats: RunStats | None) -> list[str]:
    steps = run.artifacts.steps_completed if run.artifacts is not None else 0
    stop = "failed" if run.artifacts is None else _short_stop(run.artifacts.stop_reason)
    if stats is None:
        return [run.run_name, run.status.value, str(steps), stop, *["-"] * 7]
    rate = steps / stats.train_seconds if stats.train_seconds > 0 else 0.0
    hooks_us = stats.hook_seconds / steps * 1e6 if steps else 0.0
    up = stats.uploads
    mib_s = up.bytes_uploaded / MiB / up.seconds if up.seconds > 0 else 0.0
    drain = run.drain_report.elapsed if run.drain_report is not None else float("nan")
    status = run.status.value if run.ok else f"{run.status.value}, NOT OK"
    return [
        run.run_name,
        status,
        str(steps),
        stop,
        f"{rate:.0f}",
        f"{hooks_us:.1f}",
        f"{up.uploaded}" + (f" ({up.failed} failed)" if up.failed else ""),
        f"{up.bytes_uploaded / MiB:.1f}",
        f"{mib_s:.0f}",
        str(up.retries),
        f"{drain:.3f}",
    ]


def _short_stop(reason: str) -> str:
    return "early stop" if reason.startswith("early stop") else reason


def summary(options: DemoOptions, outcome: DemoOutcome) -> str:
    """The whole closing report, as text."""
    result = outcome.result
    header = (
        "run",
        "status",
        "steps",
        "stopped by",
        "steps/s",
        "hooks µs/step",
        "uploads",
        "MiB",
        "MiB/s",
        "retries",
        "drain s",
    )
    rows = [_run_row(run, outcome.stats.get(run.run_name)) for run in result.runs]
    parts = [
        f"loopbridge demo {result.name}: {len(result.runs)} runs in {result.duration_s:.1f} s",
        "",
        table(header, rows, left=2),
        "",
    ]
    for run in result.runs:
        if run.artifacts is not None and run.artifacts.stop_reason.startswith("early stop"):
            parts.append(f"{run.run_name}: {run.artifacts.stop_reason}")
        if run.error is not None:
            parts.append(f"{run.run_name} failed: {type(run.error).__name__}: {run.error}")
    parts += [
        "",
        "Loop-thread time per callback and hook, all runs (the hook profiler):",
        outcome.profiler.table(),
        "",
        f"uploads: {outcome.uploads}",
        f"store:   {outcome.uploader.destination}",
        f"runs:    {options.run_root / 'runs'}",
        f"log:     {options.jsonl_path}",
        "",
    ]
    lost = losses(outcome)
    if lost:
        parts.append("LOST OR UNVERIFIED:")
        parts.extend(f"  - {line}" for line in lost)
    else:
        saved = sum(len(r.artifacts.manifest) for r in result.runs if r.artifacts is not None)
        parts.append(
            f"nothing lost: {outcome.published}/{saved} checkpoints published and read back, "
            f"every drain report ok"
        )
    return "\n".join(parts)


def losses(outcome: DemoOutcome) -> list[str]:
    """Everything that went wrong: failed runs, drains not ok, failed uploads, store problems."""
    lost: list[str] = []
    for run in outcome.result.runs:
        report = run.drain_report
        if report is not None and not report.ok:
            problems = [*report.failed, *report.cancelled, *report.pending]
            first = f"; first: {_clip(str(problems[0]))}" if problems else ""
            lost.append(
                f"{run.run_name}: drain not ok: {report.completed} completed, "
                f"{len(report.failed)} failed, {len(report.cancelled)} cancelled, "
                f"{len(report.pending)} pending, {len(report.losses)} losses{first}"
            )
        elif not run.ok:
            error = f"{type(run.error).__name__}: {run.error}" if run.error else run.status.value
            lost.append(f"{run.run_name}: {error}")
    if outcome.uploads.failed:
        lost.append(f"{outcome.uploads.failed} checkpoint upload(s) failed")
        lost.extend(_clip(error) for error in outcome.uploads.errors[:3])
    if not outcome.close_report.ok:
        lost.append(f"bridge close: {_clip(outcome.close_report.summary())}")
    lost.extend(outcome.store_problems)
    return lost


def _clip(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
