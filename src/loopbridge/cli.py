"""The `loopbridge` command: `loopbridge demo` and `loopbridge bench`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _demo(argv: list[str]) -> int:
    from loopbridge._demo import main as demo_main

    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    # Imported here: `loopbridge demo` need not load the benchmarks.
    from loopbridge.bench import main as bench_main

    return bench_main(argv)


_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "run a small experiment with background uploads and a summary"),
    "bench": (
        _bench,
        "measure hook dispatch and spawn costs against baselines: "
        "[--full] [--json] [--only dispatch|spawn]",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; its own options follow its name (`loopbridge bench --help`)."""
    parser = argparse.ArgumentParser(
        prog="loopbridge", description="The callback layer of an ML training loop."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in _COMMANDS.items():
        # The subcommand parses its own options, --help included.
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    run, _ = _COMMANDS[args.command]
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
