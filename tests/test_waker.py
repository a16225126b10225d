"""The waker wakes a sleeping loop from another thread, and never blocks the writer."""

from __future__ import annotations

import asyncio
import threading

from loopbridge._waker import Waker, _gil_holding_write


class TestWaker:
    """A byte in the pipe runs the callback on the loop."""

    def test_libc_write_is_found(self) -> None:
        """On this platform the GIL-holding libc write is available."""
        assert _gil_holding_write() is not None

    def test_wake_from_another_thread_runs_callback(self) -> None:
        """A wake-up from another thread runs on_wake on the loop's thread."""
        loop = asyncio.new_event_loop()
        seen: list[int] = []
        woken = threading.Event()

        def on_wake() -> None:
            seen.append(threading.get_ident())
            woken.set()
            loop.stop()

        waker = Waker(loop, on_wake)
        thread = threading.Thread(target=waker.wake)
        try:
            thread.start()
            loop.run_forever()  # returns once on_wake stops it
            thread.join(5)
            assert woken.is_set()
            assert seen == [threading.get_ident()]
        finally:
            waker.detach()
            loop.close()

    def test_many_wakes_never_block(self) -> None:
        """More wake-ups than the pipe holds return at once; the loop wakes exactly once."""
        loop = asyncio.new_event_loop()
        calls: list[None] = []

        def on_wake() -> None:
            calls.append(None)
            # Two more loop iterations, each polling the pipe: a byte left in it would
            # call on_wake again before the loop stops.
            loop.call_soon(loop.call_soon, loop.stop)

        waker = Waker(loop, on_wake)
        try:
            for _ in range(200_000):  # far beyond a pipe's 64 KiB
                waker.wake()
            loop.run_forever()
            assert len(calls) == 1
            waker.wake()  # and a later wake-up still wakes it
            loop.run_forever()
            assert len(calls) == 2
        finally:
            waker.detach()
            loop.close()
