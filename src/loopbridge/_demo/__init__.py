"""`loopbridge demo`: a small real experiment that shows inline hooks, offloaded uploads and drains.

Two arms (a steady and a far too high learning rate) x repeats of a pure-Python logistic
regression on synthetic data. Each checkpoint (the parameters, padded to `--checkpoint-mb` as
optimizer state would pad them) is uploaded in the background by CheckpointUploader; every
step goes to a JSON-lines log; a progress line shows the run; early stopping ends the hot arm.
The exit code is 0 only if nothing was lost.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "parse_args"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, or an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    from loopbridge._demo.experiment import ARMS

    parser = argparse.ArgumentParser(
        prog="loopbridge demo",
        formatter_class=_DefaultsFormatter,
        description=(
            "Train 2 arms x 2 repeats of a small model with checkpoints uploaded in the "
            "background, JSON-lines logs, a progress bar and early stopping, then print what "
            "each run cost the training loop and what was offloaded."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("loopbridge-demo"), help="output directory"
    )
    parser.add_argument("--name", help="experiment name (default: demo-<date>-<time>)")
    parser.add_argument(
        "--store",
        help="checkpoint destination: s3://bucket/prefix or a directory (default: OUT/store)",
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint, for an S3-compatible server")
    parser.add_argument("--dashboard", metavar="URL", help="also post to an HTTP dashboard")
    parser.add_argument("--mlflow", metavar="URL", help="also log to an MLflow tracking server")
    parser.add_argument("--steps", type=_positive_int, default=300, help="steps per run")
    parser.add_argument(
        "--checkpoint-mb", type=_non_negative, default=64.0, help="size of each checkpoint, MiB"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help="steps between checkpoints (default: steps/3)",
    )
    parser.add_argument("--eval-every", type=_positive_int, default=10, help="steps between evals")
    parser.add_argument(
        "--patience", type=_positive_int, default=5, help="early-stopping patience, in evals"
    )
    parser.add_argument("--repeats", type=_positive_int, default=2, help="runs per arm")
    parser.add_argument(
        "--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="arms to run"
    )
    parser.add_argument(
        "--step-ms",
        type=_non_negative,
        default=10.0,
        help="simulated accelerator time per step, spent off the GIL (0 for none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line (the summary still prints)"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the messages on stderr (URLs show their origin only)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's arguments."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 if every run, drain and upload is ok, else 1."""
    from loopbridge._demo.experiment import DemoOptions, run_demo
    from loopbridge._demo.report import losses, summary
    from loopbridge._redact import redact_text

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    options = DemoOptions(
        out=args.out,
        name=args.name or time.strftime("demo-%Y%m%d-%H%M%S"),
        store=args.store,
        endpoint_url=args.endpoint_url,
        dashboard=args.dashboard,
        mlflow=args.mlflow,
        steps=args.steps,
        checkpoint_mb=args.checkpoint_mb,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        patience=args.patience,
        repeats=args.repeats,
        arms=tuple(args.arms),
        step_ms=args.step_ms,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(
        f"loopbridge demo {options.name}: arms {', '.join(options.arms)} x {options.repeats} "
        f"repeats, {options.steps} steps, {options.checkpoint_mb:g} MiB checkpoints -> "
        f"{options.store_url}",
        flush=True,
    )
    try:
        outcome = run_demo(options)
    except KeyboardInterrupt:
        # The loop gave in-flight uploads a grace period and logged what it cancelled.
        print("loopbridge demo interrupted; see the log above for unfinished work", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"loopbridge demo failed: {type(exc).__name__}: {redact_text(str(exc))}",
            file=sys.stderr,
        )
        return 1
    print(summary(options, outcome), flush=True)
    return 1 if losses(outcome) else 0
