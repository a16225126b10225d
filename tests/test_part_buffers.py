"""PartBuffers: which buffers come back, how many are kept, and when they are freed."""

from __future__ import annotations

import asyncio

from loopbridge.stores._part_buffers import PartBuffers


def _run_after(delay: float) -> asyncio.Future[None]:
    """A future done `delay` seconds from now, by the loop's timers (no sleep)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.call_later(delay, done.set_result, None)
    return done


class TestReuse:
    async def test_a_buffer_given_back_for_reuse_is_the_next_of_its_size(self) -> None:
        pool = PartBuffers(keep=2)
        first = pool.take(16)
        pool.give_back(first, reuse=True)
        assert pool.take(16) is first

    async def test_one_not_for_reuse_is_dropped(self) -> None:
        pool = PartBuffers(keep=2)
        first = pool.take(16)
        pool.give_back(first, reuse=False)
        assert pool.kept == 0
        assert pool.take(16) is not first

    async def test_a_kept_buffer_of_another_size_is_freed_not_handed_out(self) -> None:
        pool = PartBuffers(keep=2)
        small = pool.take(8)
        pool.give_back(small, reuse=True)
        big = pool.take(16)
        assert len(big) == 16
        assert big is not small
        assert pool.kept == 0

    async def test_no_more_than_keep_are_kept(self) -> None:
        pool = PartBuffers(keep=2)
        taken = [pool.take(4) for _ in range(5)]
        for buffer in taken:
            pool.give_back(buffer, reuse=True)
        assert pool.kept == 2


class TestIdleRelease:
    async def test_kept_buffers_are_freed_once_none_is_out_for_the_idle_time(self) -> None:
        pool = PartBuffers(keep=4, idle=0.01)
        a, b = pool.take(4), pool.take(4)
        pool.give_back(a, reuse=True)
        await _run_after(0.05)
        assert pool.kept == 1, "one buffer is still out: nothing is freed"
        pool.give_back(b, reuse=True)
        assert pool.kept == 2
        await _run_after(0.05)
        assert pool.kept == 0

    async def test_taking_a_buffer_cancels_the_pending_release(self) -> None:
        pool = PartBuffers(keep=4, idle=0.02)
        pool.give_back(pool.take(4), reuse=True)
        kept = pool.take(4)  # before the idle time is up: the release is off
        other = pool.take(4)
        await _run_after(0.06)
        pool.give_back(kept, reuse=True)
        assert pool.kept == 1
        pool.give_back(other, reuse=True)
        assert pool.kept == 2
