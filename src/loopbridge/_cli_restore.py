"""`loopbridge ls DEST` and `loopbridge download DEST --run RUN [--step N] OUT`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from loopbridge._exceptions import LoopbridgeError
from loopbridge._remote_runs import RunListing, describe_run, display_name, list_runs
from loopbridge.stores import ObjectStore, open_store

__all__ = ["download_main", "ls_main"]

MiB = 1 << 20


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dest", metavar="DEST", help="the uploader's destination: s3://bucket/prefix or a directory"
    )
    parser.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (else AWS config)")
    parser.add_argument("--region", metavar="NAME", help="S3 region (else AWS config)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Store options from the command line (only S3 takes any)."""
    if str(args.dest).startswith("s3://"):
        return {"endpoint_url": args.endpoint_url, "region": args.region}
    return {}


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    if n_bytes < MiB:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / MiB:.1f} MiB"


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def ls_main(argv: list[str]) -> int:
    """List the runs under DEST with their published steps, `latest`, and leftovers."""
    parser = argparse.ArgumentParser(
        prog="loopbridge ls",
        description=(
            "List the checkpoints CheckpointUploader published under DEST: each run, its "
            "published steps and sizes, which one `latest` names, and leftovers of uploads "
            "that never published (never restored)."
        ),
    )
    _store_arguments(parser)
    parser.add_argument("--run", metavar="RUN", help="only this run (its path or a unique tail)")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    try:
        store = open_store(args.dest, **_options(args))
        runs = asyncio.run(_describe(store, args.run))
    except (LoopbridgeError, ValueError) as exc:
        print(f"loopbridge ls: {exc}", file=sys.stderr)
        return 1
    if not runs:
        print(f"loopbridge ls: no checkpoints under {store.url}", file=sys.stderr)
        return 1
    print(f"{store.url}: {len(runs)} run(s)")
    for run in runs:
        _print_run(run)
    return 0


async def _describe(store: ObjectStore, run: str | None) -> list[RunListing]:
    from loopbridge.restore import resolve_run

    try:
        runs = await list_runs(store)
        if run is not None:
            key = await resolve_run(store, run)
            runs = {key: runs.get(key, [])}
        return [await describe_run(store, key, objects) for key, objects in runs.items()]
    finally:
        await store.aclose()


def _print_run(run: RunListing) -> None:
    name = display_name(run.key)
    parts = name.split("/")
    where = f"  (experiment {parts[-3]}, arm {parts[-2]})" if len(parts) >= 3 else ""
    print(f"\nrun {name}{where}")
    if run.problem:
        print(f"  DAMAGED: {run.problem}")
    if not run.steps:
        print("  no checkpoints")
        return
    print(f"  {'step':>10}  {'size':>10}  {'files':>5}  status")
    for step in run.steps:
        files = len(step.published.files) if step.published is not None else step.objects
        if step.published is None:
            status = f"unpublished leftover ({step.problem}); never restored"
        else:
            status = "published"
            if step.step == run.latest:
                status += ", latest"
            if step.problem:
                status += f"; DAMAGED: {step.problem}"
        print(f"  {step.step:>10}  {_size(step.size):>10}  {files:>5}  {status}")


def download_main(argv: list[str]) -> int:
    """Restore one published checkpoint to OUT, verified; non-zero naming what is missing."""
    parser = argparse.ArgumentParser(
        prog="loopbridge download",
        description=(
            "Download a published checkpoint into OUT/step-XXXXXXXX/, checking every file "
            "against the digest it was published with. Follows the run's `latest` unless "
            "--step is given."
        ),
    )
    _store_arguments(parser)
    parser.add_argument("--run", metavar="RUN", help="the run's path under DEST, or a unique tail")
    parser.add_argument("--step", metavar="N", type=int, help="this step instead of latest")
    parser.add_argument("out", metavar="OUT", type=Path, help="the local directory to write")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    from loopbridge.restore import arestore

    try:
        restored = asyncio.run(
            arestore(args.dest, run=args.run, step=args.step, to=args.out, **_options(args))
        )
    except (LoopbridgeError, ValueError, OSError) as exc:
        print(f"loopbridge download: {exc}", file=sys.stderr)
        return 1
    print(
        f"restored step {restored.step} of {display_name(restored.run)} to {restored.path} "
        f"({_size(restored.downloaded_bytes)} downloaded, {restored.reused_files} files "
        f"already there and verified)"
    )
    return 0
