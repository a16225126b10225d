"""What firing a hook costs: CallbackList against a direct call, a plain loop and frameworks.

A thin wrapper over `loopbridge bench --only dispatch`; see loopbridge.bench.dispatch.
pluggy, transformers and Lightning come from the bench extra (`pip install
'loopbridge[bench]'`, or `make bench-full`); without them their columns say so.

Run: python benchmarks/bench_dispatch.py [--full] [--json]
"""

from __future__ import annotations

import sys

from loopbridge.bench import main

if __name__ == "__main__":
    sys.exit(main(["--only", "dispatch", *sys.argv[1:]]))
