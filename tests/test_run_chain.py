"""`wait_for`: a run's next link waits for the one before, however that one ends."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from loopbridge.callbacks._run_chain import wait_for


def _run(coro_fn: object) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout=10))  # type: ignore[operator]


def test_a_link_already_ended_is_not_waited_for() -> None:
    async def main() -> None:
        link: Future[None] = Future()
        link.set_result(None)
        await wait_for(link)

    _run(main)


def test_a_link_ended_by_a_task_of_the_same_loop_wakes_the_waiter() -> None:
    """The usual case, settled with call_soon: no cross-thread wake-up is written."""

    async def main() -> None:
        link: Future[None] = Future()
        loop = asyncio.get_running_loop()
        written: list[object] = []
        real = loop._write_to_self  # type: ignore[attr-defined]

        def spy() -> None:
            written.append(None)
            real()

        loop._write_to_self = spy  # type: ignore[attr-defined]

        async def end() -> None:
            link.set_result(None)

        waiting = asyncio.create_task(wait_for(link))
        await asyncio.sleep(0)
        await asyncio.create_task(end())
        await waiting
        assert written == []

    _run(main)


def test_a_link_ended_by_another_thread_wakes_the_waiter() -> None:
    async def main() -> None:
        link: Future[None] = Future()
        waiting = asyncio.create_task(wait_for(link))
        await asyncio.sleep(0)
        ender = threading.Thread(target=link.set_result, args=(None,))
        ender.start()
        await waiting
        ender.join(5)

    _run(main)


def test_cancelling_the_waiter_leaves_the_link_alone() -> None:
    async def main() -> None:
        link: Future[None] = Future()
        waiting = asyncio.create_task(wait_for(link))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not link.cancelled()
        link.set_result(None)

    _run(main)
