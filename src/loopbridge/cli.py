"""The `loopbridge` command: `loopbridge demo`, `loopbridge bench` and `loopbridge resume`."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loopbridge import __version__
from loopbridge.journal import MAX_DEPTH

__all__ = ["main"]


def _demo(argv: list[str]) -> int:
    from loopbridge._demo import main as demo_main

    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    # Imported here: `loopbridge demo` need not load the benchmarks.
    from loopbridge.bench import main as bench_main

    return bench_main(argv)


def _resume(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loopbridge resume",
        description=(
            "Finish the checkpoint uploads that a killed run left open in its journal. Run it "
            "only once that run's process is gone: unfinished uploads under a checkpoint's "
            "prefix are aborted before it is uploaded again."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="a run's out dir, or above")
    parser.add_argument("--store", metavar="URL", help="publish to this store, not the recorded")
    parser.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint, not the recorded")
    parser.add_argument(
        "--timeout", metavar="S", type=_seconds, help="give up after S seconds (default: no limit)"
    )
    parser.add_argument(
        "--store-option",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an S3 store option over the recorded ones (e.g. verify_etag=false); repeatable",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    problem = _resume_dir_problem(args.out_dir)
    if problem is not None:
        print(f"loopbridge resume: {problem}", file=sys.stderr)
        return 2
    from loopbridge.callbacks._store_options import decode_options
    from loopbridge.resume import resume_out_dir

    options: dict[str, str] = {}
    for item in args.store_option:
        name, sep, value = item.partition("=")
        if not name or not sep:
            print(f"loopbridge resume: --store-option {item!r}: give NAME=VALUE", file=sys.stderr)
            return 2
        options[name] = value
    try:
        decode_options(options)
    except ValueError as exc:
        print(f"loopbridge resume: {exc}", file=sys.stderr)
        return 2

    report = resume_out_dir(
        args.out_dir,
        store=args.store,
        endpoint_url=args.endpoint_url,
        timeout=args.timeout,
        store_options=options,
    )
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def _seconds(text: str) -> float:
    """A --timeout value: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = (
            f"expected a positive number of seconds, got {text!r}; leave --timeout out to "
            f"wait as long as the uploads take"
        )
        raise argparse.ArgumentTypeError(msg)
    return value


def _resume_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot be searched for journals, or None."""
    if not out_dir.is_dir():
        return f"{out_dir} is not a directory; give a run's out dir, or the directory above"
    resolved = out_dir.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        what = "the filesystem root" if resolved == Path(resolved.anchor) else "your home directory"
        return (
            f"{out_dir} is {what}; searching it for upload journals would walk unrelated "
            f"files. Give a run's out dir, or the experiment directory that holds the runs "
            f"(journals are found up to {MAX_DEPTH} levels below it)"
        )
    return None


_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "run a small experiment with background uploads and a summary"),
    "bench": (
        _bench,
        "measure hook dispatch and spawn costs against baselines: "
        "[--full] [--json] [--only dispatch|spawn]",
    ),
    "resume": (
        _resume,
        "finish checkpoint uploads a killed run left open: OUT_DIR [--store URL] "
        "[--endpoint-url URL] [--timeout S]",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; its own options follow its name (`loopbridge bench --help`)."""
    parser = argparse.ArgumentParser(
        prog="loopbridge", description="The callback layer of an ML training loop."
    )
    parser.add_argument("--version", action="version", version=f"loopbridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in _COMMANDS.items():
        # The subcommand parses its own options, --help included.
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    run, _ = _COMMANDS[args.command]
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
