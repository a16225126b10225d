"""Per-run chains of upload tasks: uploads overlap, but publish strictly in order.

Uploads of a run overlap (the next one sends its bytes while the server assembles the last),
but each publishes only after the one before it has finished, so the manifest and `latest`
move forward in order. A link ends once its task has ended, however it ended, and the link
before it has ended too: a checkpoint that fails early must not let the next one publish
ahead of the one before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, InvalidStateError
from typing import Any

from loopbridge._future import TaskFuture

__all__ = ["RunChains", "wait_for"]


class RunChains:
    """The last link of each run's chain (touched on the training thread only)."""

    def __init__(self) -> None:
        self._tails: dict[str, Future[None]] = {}

    def spawn(
        self,
        run_prefix: str,
        make: Callable[[Future[None] | None], Coroutine[Any, Any, object]],
        spawn: Callable[[Coroutine[Any, Any, object]], TaskFuture[Any]],
    ) -> None:
        """Spawn `make(previous link)` and make its task end the run's next link."""
        previous = self._tails.get(run_prefix)
        link: Future[None] = Future()
        self._tails[run_prefix] = link

        def task_ended(_: object) -> None:
            if previous is None:
                _resolve(link)
            else:
                previous.add_done_callback(lambda _: _resolve(link))

        try:
            task = spawn(make(previous))
        except BaseException:
            task_ended(None)
            raise
        task.add_done_callback(task_ended)


def _resolve(link: Future[None]) -> None:
    """End a link of a run's chain (once; from any thread)."""
    with contextlib.suppress(InvalidStateError):
        link.set_result(None)


async def wait_for(link: Future[None]) -> None:
    """Wait for a link to end, without cancelling it if this waiter is cancelled."""
    if link.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_: Future[None]) -> None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            # Ended by a task of this loop (the usual case): no wake-up through the loop's
            # socket, whose write and read each give up the training process's GIL.
            loop.call_soon(settle)
        else:
            loop.call_soon_threadsafe(settle)

    link.add_done_callback(wake)
    await waiter
