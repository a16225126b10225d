"""The upload worker process: `S3Store.put_file` on its own event loop, fed over a socket.

Started by `ProcessStore` as `python -m loopbridge.stores._upload_worker FD`, a fresh
interpreter (like multiprocessing's spawn, without re-importing the parent's `__main__`). It
reads and hashes the bytes and sends them here, under this process's GIL, not the training
process's. Messages are pickled tuples over the inherited socket:

    parent -> worker   ("init", store options)  ("put", id, key, path, expected_sha256)
                       ("cancel", id)  ("stop",)
    worker -> parent   ("ok", id, PutResult)  ("error", id, type name, message, key)
                       ("cancelled", id)

A cancelled put is cancelled here too, which aborts its multipart upload before the
"cancelled" reply. When the parent goes away (its end of the socket closes) the worker exits
at once without cleaning up, as the parent itself did: the journal's resume finishes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loopbridge.stores.s3 import S3Store

__all__ = ["main"]

logger = logging.getLogger(__name__)

_NICE = 5  # the training process comes first when the cores are busy


class _Server:
    """Runs the parent's puts as tasks and answers each one."""

    def __init__(self, conn: Connection, store: S3Store) -> None:
        self.conn = conn
        self.store = store
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopped = asyncio.Event()

    def handle(self, message: tuple[Any, ...]) -> None:
        """Act on one message from the parent (on the loop thread)."""
        kind = message[0]
        if kind == "put":
            _, ident, key, path, expected = message
            self.tasks[ident] = asyncio.create_task(self.put(ident, key, Path(path), expected))
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "stop":
            self.stopped.set()

    async def put(self, ident: int, key: str, path: Path, expected: str | None) -> None:
        try:
            result = await self.store.put_file(key, path, expected_sha256=expected)
        except asyncio.CancelledError:
            self.conn.send(("cancelled", ident))
        except Exception as exc:
            key_of = getattr(exc, "key", None)
            self.conn.send(("error", ident, type(exc).__name__, str(exc), key_of))
        else:
            self.conn.send(("ok", ident, result))
        finally:
            self.tasks.pop(ident, None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()

        def read() -> None:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    # The parent is gone: leave as abruptly as it did (resume cleans up).
                    os._exit(0)
                loop.call_soon_threadsafe(self.handle, message)

        threading.Thread(target=read, name="loopbridge-upload-worker-reader", daemon=True).start()
        await self.stopped.wait()
        for task in list(self.tasks.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.store.aclose()


def main(argv: list[str]) -> None:
    """Serve puts over the socket whose descriptor is `argv[0]` until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="loopbridge upload worker: %(message)s")
    with contextlib.suppress(OSError, AttributeError):
        os.nice(_NICE)
    conn = Connection(int(argv[0]))
    kind, options = conn.recv()
    if kind != "init":
        msg = f"upload worker: expected an init message first, got {kind!r}"
        raise SystemExit(msg)
    store = S3Store(**options)
    asyncio.run(_Server(conn, store).serve())
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
