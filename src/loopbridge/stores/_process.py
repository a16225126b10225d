"""`ProcessStore`: an S3Store whose requests run in a worker process.

Reading, hashing and sending a checkpoint's bytes is Python and C work under a GIL; in a
thread of the training process it takes that GIL from the training thread thousands of times
per upload, and each S3 request costs about a millisecond of botocore there too.
`ProcessStore` sends every call (`put_file`, and the small ones: markers, manifests,
listings, deletes) to one worker process (started on first use, reused, see
`_upload_worker`) and awaits its answer on the caller's event loop, so everything above the
store (retries, journal, drain, cancellation, resume) is unchanged. Only `get_file` (restore,
before training) runs in-process on the wrapped store.

- A cancelled call is cancelled in the worker too, and waits (bounded) until the worker has
  cleaned up (a put aborts its multipart upload).
- A worker that dies fails the calls it had with a `StoreError` naming each key and the exit
  status; the next call starts a new worker.
- `aclose()` stops the worker within `_STOP_TIMEOUT` seconds (then kills it); the bridge
  runs it at close, and its exit handler closes unclosed bridges. A process that exits
  without that (work abandoned by a third Ctrl-C, a crash) leaves the worker to see its
  socket close and exit at once; the journal's resume clears what it left half-sent.
- The store's options reach the worker over an inherited socket, never on a command line or
  in a log; credentials come from the environment it inherits, as for the parent.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loopbridge import _exceptions
from loopbridge._digest import algorithm_of
from loopbridge._exceptions import StoreError
from loopbridge.stores.protocol import ClosingStore, GetResult, ObjectInfo, PutResult
from loopbridge.stores.s3 import S3Store

__all__ = ["ProcessStore"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT = 5.0
_CANCEL_TIMEOUT = 15.0  # the worker's abort of a multipart upload is bounded well within this

_stores: weakref.WeakSet[ProcessStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forget_worker()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_Pending = tuple[asyncio.AbstractEventLoop, "asyncio.Future[tuple[Any, ...]]", str]


class _Worker:
    """One worker process and the puts it is running; answers reach their callers' loops."""

    def __init__(self, options: dict[str, Any]) -> None:
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loopbridge.stores._upload_worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C (or SIGTSTP, SIGHUP) from the terminal reaches the
            # training process, which decides what happens to the uploads, not the worker.
            start_new_session=True,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(("init", options))
        self.lock = threading.Lock()
        self.pending: dict[int, _Pending] = {}
        self.dead: str | None = None
        self.retries = 0  # the worker's running total of retries, from its answers
        self.reader = threading.Thread(
            target=self._read, name="loopbridge-upload-worker", daemon=True
        )
        self.reader.start()

    def _read(self) -> None:
        """Hand each answer to the loop awaiting it; on EOF fail everything still pending."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                entry = self.pending.pop(message[1], None)
            if entry is not None:
                _settle(entry, message)
        code = self.proc.wait()
        with self.lock:
            self.dead = f"the upload worker process (pid {self.proc.pid}) exited with status {code}"
            entries, self.pending = list(self.pending.values()), {}
        for entry in entries:
            _settle(entry, ("died", 0))

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            if self.dead is not None:
                msg = self.dead
                raise StoreError(msg)
            self.conn.send(message)

    def stop(self, timeout: float) -> None:
        """Ask the worker to stop; kill it if it has not within `timeout`."""
        with contextlib.suppress(OSError, StoreError):
            self.send(("stop",))
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the upload worker did not stop within %.0f s; killing it", timeout)
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout)
        self.conn.close()


def _settle(entry: _Pending, message: tuple[Any, ...]) -> None:
    loop, future, _ = entry

    def settle() -> None:
        if not future.done():
            future.set_result(message)

    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)


def _error(message: tuple[Any, ...], key: str, what: str, dead: str | None) -> StoreError:
    """The exception a worker's answer stands for, of the same loopbridge class.

    `what` is the failed call, as in "upload s3://bucket/key".
    """
    if message[0] == "died":
        msg = f"cannot {what}: {dead or 'the upload worker process exited'}"
        return StoreError(msg, key=key)
    if message[0] == "cancelled":
        msg = f"cannot {what}: the upload worker process cancelled it while stopping"
        return StoreError(msg, key=key)
    _, _, name, text, err_key, _ = message
    cls = getattr(_exceptions, name, None)
    if not (isinstance(cls, type) and issubclass(cls, StoreError)):
        return StoreError(f"{name}: {text}", key=err_key or key)
    return cls(text, key=err_key)


class ProcessStore(ClosingStore):
    """An `S3Store` whose requests run in a worker process; downloads to files stay here."""

    def __init__(self, store: S3Store) -> None:
        self.inner = store
        self._options = store.options
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._retired_retries = 0  # made by workers that have since stopped or died
        _stores.add(self)

    def __repr__(self) -> str:
        return f"ProcessStore({self.inner!r})"

    @property
    def url(self) -> str:
        """The wrapped store's URL."""
        return self.inner.url

    @property
    def retries(self) -> int:
        """Retries here and in the worker process."""
        worker = self._worker
        current = worker.retries if worker is not None else 0
        return self.inner.retries + self._retired_retries + current

    def _started(self) -> _Worker:
        with self._lock:
            worker = self._worker
            if worker is None or worker.dead is not None:
                if worker is not None:
                    self._retired_retries += worker.retries
                worker = self._worker = _Worker(self._options)
            return worker

    def _forget_worker(self) -> None:
        """In a forked child: the worker and its socket are the parent's; start afresh."""
        self._lock = threading.Lock()
        self._worker = None

    async def _call(self, verb: str, key: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped store's `method` in the worker process and return its result.

        `verb` and `key` name what failed in an error: "cannot upload s3://bucket/key".
        """
        worker = self._worker
        if worker is None or worker.dead is not None:
            # Starting a process blocks for a moment: not on the event loop.
            worker = await asyncio.to_thread(self._started)
        ident = next(self._ids)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        with worker.lock:
            worker.pending[ident] = (loop, answer, key)
        full_key = f"{self.inner.prefix}/{key}" if self.inner.prefix else key
        url = f"s3://{self.inner.bucket}/{full_key}"
        try:
            worker.send(("call", ident, method, args, kwargs))
            message = await asyncio.shield(answer)
        except asyncio.CancelledError:
            await self._cancel(worker, ident, answer)
            raise
        except (StoreError, OSError) as exc:
            with worker.lock:
                worker.pending.pop(ident, None)
            msg = f"cannot {verb} {url}: {exc}"
            raise StoreError(msg, key=full_key) from exc
        if message[0] == "ok":
            worker.retries = max(worker.retries, message[3])
            return message[2]
        if message[0] == "error":
            worker.retries = max(worker.retries, message[5])
        raise _error(message, full_key, f"{verb} {url}", worker.dead)

    async def put_file(
        self, key: str, path: Path, *, expected_digest: str | None = None
    ) -> PutResult:
        """Upload `path` to `key` in the worker process, as `S3Store.put_file` does."""
        algorithm_of(expected_digest)  # a malformed digest is refused here, as a ValueError
        result: PutResult = await self._call(
            "upload", key, "put_file", key, path, expected_digest=expected_digest
        )
        return result

    async def _cancel(
        self, worker: _Worker, ident: int, answer: asyncio.Future[tuple[Any, ...]]
    ) -> None:
        """Cancel a call in the worker and wait, bounded, until it has cleaned up."""
        with contextlib.suppress(OSError, StoreError):
            worker.send(("cancel", ident))
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(_CANCEL_TIMEOUT):
                await asyncio.shield(answer)
        with worker.lock:
            worker.pending.pop(ident, None)

    async def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> PutResult:
        """Upload a small object (a marker, a manifest) from the worker process."""
        result: PutResult = await self._call(
            "upload", key, "put_bytes", key, data, content_type=content_type
        )
        return result

    async def put_bytes_in_order(self, items: Sequence[tuple[str, bytes]]) -> list[PutResult]:
        """Upload small objects in order (a marker, a manifest, `latest`) in one worker call."""
        if not items:
            return []
        results: list[PutResult] = await self._call(
            "upload", items[0][0], "put_bytes_in_order", list(items)
        )
        return results

    async def get_bytes(self, key: str) -> bytes | None:
        """Read the object at `key`, or None when there is none."""
        data: bytes | None = await self._call("read", key, "get_bytes", key)
        return data

    async def get_file(
        self,
        key: str,
        path: Path,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> GetResult:
        """Download in this process: a restore runs before training, with nothing to spare."""
        return await self.inner.get_file(
            key, path, expected_digest=expected_digest, expected_size=expected_size
        )

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the object at `key`, or None."""
        info: ObjectInfo | None = await self._call("read", key, "head", key)
        return info

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""
        found: builtins.list[ObjectInfo] = await self._call("list", prefix, "list", prefix)
        return found

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete `keys`; missing keys are not an error."""
        keys = builtins.list(keys)
        await self._call("delete", keys[0] if keys else "", "delete", keys)

    async def abort_stale_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under `prefix` (see `S3Store`)."""
        aborted: int = await self._call(
            "clean up multipart uploads under", prefix, "abort_stale_uploads", prefix
        )
        return aborted

    def _stop_worker(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._retired_retries += worker.retries
        if worker is not None:
            worker.stop(_STOP_TIMEOUT)

    async def aclose(self) -> None:
        """Close the in-process client and stop the worker (bounded)."""
        await self.inner.aclose()
        await asyncio.to_thread(self._stop_worker)
