"""The upload worker process: an `S3Store` on its own event loop, fed over a socket.

Started by `ProcessStore` as `python -m loopbridge.stores._upload_worker FD`, a fresh
interpreter (like multiprocessing's spawn, without re-importing the parent's `__main__`). It
makes the store's requests, and reads, hashes and sends the checkpoints' bytes, under this
process's GIL, not the training process's. Messages are pickled tuples over the inherited
socket:

    parent -> worker   ("init", store options)  ("call", id, method, args, kwargs)
                       ("cancel", id)  ("stop",)
    worker -> parent   ("ok", id, result, retries)  ("error", id, type name, message, key,
                       retries)  ("cancelled", id)

`retries` is this worker's running total, so the parent counts retries made here. A
cancelled call is cancelled here too (a put aborts its multipart upload) before the
"cancelled" reply. When the parent goes away (its end of the socket closes) the worker exits
at once without cleaning up, as the parent itself did: the journal's resume finishes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from loopbridge.stores._body import PartBody
from loopbridge.stores.s3 import S3Store

__all__ = ["CALLS", "main"]

logger = logging.getLogger(__name__)

_NICE = 5  # the training process comes first when the cores are busy
# No training thread shares this GIL: bodies go out in pieces, so that little of a part is
# copied into the transport's buffer (about a tenth less CPU per GiB, bench_upload.py).
_PIECE = 1 << 20

CALLS = frozenset(
    {
        "put_file",
        "put_bytes",
        "put_bytes_in_order",
        "get_bytes",
        "head",
        "list",
        "delete",
        "abort_stale_uploads",
    }
)
"""The store methods the parent may call here."""


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
        if kind == "call":
            _, ident, method, args, kwargs = message
            self.tasks[ident] = asyncio.create_task(self.call(ident, method, args, kwargs))
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "stop":
            self.stopped.set()

    async def call(
        self, ident: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            if method not in CALLS:
                msg = f"upload worker: no store call {method!r}"
                raise TypeError(msg)
            result = await getattr(self.store, method)(*args, **kwargs)
        except asyncio.CancelledError:
            self.conn.send(("cancelled", ident))
        except Exception as exc:
            key_of = getattr(exc, "key", None)
            retries = self.store.retries
            self.conn.send(("error", ident, type(exc).__name__, str(exc), key_of, retries))
        else:
            self.conn.send(("ok", ident, result, self.store.retries))
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
    """Serve store calls over the socket whose descriptor is `argv[0]` until told to stop."""
    # Ctrl-C is the parent's to handle: its first press lets in-flight uploads finish, which
    # they could not if it killed this process too. The parent stops this worker (or its
    # socket closes); `ProcessStore` also starts it in its own session, away from the
    # terminal's signals.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="loopbridge upload worker: %(message)s")
    with contextlib.suppress(OSError, AttributeError):
        os.nice(_NICE)
    conn = Connection(int(argv[0]))
    kind, options = conn.recv()
    if kind != "init":
        msg = f"upload worker: expected an init message first, got {kind!r}"
        raise SystemExit(msg)
    store = S3Store(**options)
    PartBody.piece = _PIECE
    asyncio.run(_Server(conn, store).serve())
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
