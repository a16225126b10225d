"""What spawn and call accept as work, and `loopbridge.to_thread` for blocking code."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import Bridge

WAIT = 10.0


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    with Bridge(name="test-work") as b:
        yield b


ran: list[str] = []


def plain(*args: object) -> None:
    ran.append("plain")


async def asynchronous(*args: object) -> str:
    return "async"


class SyncCall:
    def __call__(self) -> None:
        ran.append("SyncCall")

    def method(self) -> None:
        ran.append("method")

    async def amethod(self) -> str:
        return "amethod"


class AsyncCall:
    async def __call__(self) -> str:
        return "AsyncCall"


class Awaitable:
    def __await__(self) -> Generator[Any, None, str]:
        ran.append("Awaitable")
        return "never"
        yield  # pragma: no cover


def sync_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: object) -> Any:
        return fn(*args)

    return wrapper


async def agen() -> Any:
    yield 1


def gen() -> Iterator[int]:
    ran.append("gen")
    yield 1


REFUSED_CALLABLES: dict[str, Any] = {
    "plain def": plain,
    "lambda": lambda: ran.append("lambda"),
    "builtin": print,
    "sync method": SyncCall().method,
    "sync __call__": SyncCall(),
    "partial of a def": functools.partial(plain, 1),
    "a class": SyncCall,
    "generator function": gen,
    "async generator function": agen,
}
ACCEPTED: dict[str, tuple[Any, str]] = {
    "async def": (asynchronous, "async"),
    "partial of an async def": (functools.partial(asynchronous, 1), "async"),
    "async method": (SyncCall().amethod, "amethod"),
    "async __call__": (AsyncCall(), "AsyncCall"),
    "wraps-decorated async def": (sync_wrapper(asynchronous), "async"),
}


class TestSpawnRefusesNonAsyncWork:
    """spawn and call refuse anything but a coroutine or an async callable, before it runs."""

    @pytest.mark.parametrize("label", sorted(REFUSED_CALLABLES))
    def test_sync_callables_refused_before_running(self, bridge: Bridge, label: str) -> None:
        """A sync callable of any kind is a TypeError at spawn with the fix; it never runs."""
        ran.clear()
        with pytest.raises(TypeError) as info:
            bridge.spawn(REFUSED_CALLABLES[label])
        message = str(info.value)
        assert "plain (not async) callable" in message
        assert "async def" in message
        assert "loopbridge.to_thread" in message
        assert ran == []
        report = bridge.drain(WAIT)
        assert report.ok
        assert report.completed == 0

    @pytest.mark.parametrize("work", [None, 42, "upload", b"x", [asynchronous]])
    def test_non_callables_refused(self, bridge: Bridge, work: object) -> None:
        """A value that is neither a coroutine nor callable is refused, naming its type."""
        with pytest.raises(TypeError, match="takes a coroutine or an async callable, not "):
            bridge.spawn(work)  # type: ignore[arg-type]

    def test_awaitable_that_is_not_a_coroutine_refused(self, bridge: Bridge) -> None:
        """An awaitable object is refused with how to wrap it in a coroutine."""
        ran.clear()
        with pytest.raises(TypeError, match="an awaitable that is not a coroutine; wrap it"):
            bridge.spawn(Awaitable())  # type: ignore[arg-type]
        assert ran == []

    @pytest.mark.parametrize("label", sorted(ACCEPTED))
    def test_async_callables_accepted(self, bridge: Bridge, label: str) -> None:
        """Async functions, partials, async methods and async __call__ objects all run."""
        work, expected = ACCEPTED[label]
        assert bridge.spawn(work).result(WAIT) == expected
        assert bridge.call(work, timeout=WAIT) == expected

    def test_call_refuses_a_plain_function(self, bridge: Bridge) -> None:
        """Bridge.call refuses a sync function the same way, naming call()."""
        ran.clear()
        with pytest.raises(TypeError, match=r"call\(\) got plain, a plain \(not async\)"):
            bridge.call(plain, timeout=WAIT)  # type: ignore[arg-type]
        assert ran == []

    def test_callback_spawn_refuses_too(self, tmp_path: Path) -> None:
        """Callback.spawn reaches the same check, so a hook learns at once."""

        class Hooked(lb.Callback):
            def on_train_start(self, state: lb.LoopState) -> None:
                self.spawn(plain)  # type: ignore[arg-type]

        calls: list[int] = []

        def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
            calls.append(1)
            return {}

        with Bridge() as b:
            loop = lb.TrainLoop(step, range(3), out_dir=tmp_path, callbacks=[Hooked()], bridge=b)
            with pytest.raises(TypeError, match="plain \\(not async\\) callable"):
                loop.run()
        assert calls == []


class TestToThread:
    """`loopbridge.to_thread` runs blocking code in a worker thread, off the loop."""

    def test_runs_in_another_thread_with_args(self, bridge: Bridge) -> None:
        """It gets its arguments and runs on neither the caller's thread nor the loop's."""

        def where(a: int, *, b: int) -> tuple[int, int]:
            return threading.get_ident(), a + b

        async def loop_thread() -> int:
            return threading.get_ident()

        ident, total = bridge.spawn(lb.to_thread(where, 1, b=2)).result(WAIT)
        assert total == 3
        assert ident not in (threading.get_ident(), bridge.call(loop_thread, timeout=WAIT))

    def test_blocking_work_leaves_the_loop_free(self, bridge: Bridge) -> None:
        """While a thread blocks, other tasks on the loop finish."""
        release = threading.Event()
        blocked = bridge.spawn(lb.to_thread(release.wait, WAIT))

        async def quick() -> str:
            await asyncio.sleep(0)
            return "done"

        assert bridge.spawn(quick).result(WAIT) == "done"
        assert not blocked.done()
        release.set()
        assert blocked.result(WAIT) is True

    def test_errors_reach_the_future(self, bridge: Bridge) -> None:
        """An exception in the thread fails the task with that exception."""

        def boom() -> None:
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            bridge.spawn(lb.to_thread(boom)).result(WAIT)
        report = bridge.drain(WAIT)
        assert len(report.failed) == 1
