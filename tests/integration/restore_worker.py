"""A restore for the interruption test: prints `wrote <bytes>` after each piece written to disk.

Run as `python restore_worker.py DEST ENDPOINT TO`; the test SIGKILLs it mid-download.
"""

from __future__ import annotations

import sys

import loopbridge as lb
from loopbridge.stores._sink import FileSink

_write_next = FileSink.write_next


def _announce(self: FileSink, data: bytes) -> None:
    _write_next(self, data)
    print(f"wrote {self.path.name} {self.hashed}", flush=True)


def main(argv: list[str]) -> int:
    dest, endpoint, to = argv
    FileSink.write_next = _announce  # type: ignore[method-assign]
    lb.restore(dest, to=to, endpoint_url=endpoint, part_size=5 << 20)
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
