"""A restore for the interruption test: prints `wrote <file> <bytes>` as its verified prefix grows.

Run as `python restore_worker.py DEST ENDPOINT TO`; the test SIGKILLs it mid-download.
"""

from __future__ import annotations

import sys

import loopbridge as lb
from loopbridge.stores._sink import FileSink

_hash_written = FileSink.hash_written


def _announce(self: FileSink, length: int) -> None:
    _hash_written(self, length)
    print(f"wrote {self.path.name} {self.hashed}", flush=True)


def main(argv: list[str]) -> int:
    dest, endpoint, to = argv
    FileSink.hash_written = _announce  # type: ignore[method-assign]
    lb.restore(dest, to=to, endpoint_url=endpoint, part_size=5 << 20)
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
