"""What `spawn` and `call` accept as work, and the explicit way to hand them blocking code.

Work is a coroutine (`upload(path)`) or an async callable (`upload`, a partial of it, or an
object whose `__call__` is `async def`). Anything else is refused before it runs: a plain
function handed to the background loop would run on the loop's thread, block every other
task, and only then fail. Blocking code goes through `to_thread`, which runs it in a worker
thread (anyio's, bounded by a capacity limiter) and gives the loop a coroutine to await.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import ParamSpec, TypeVar

import anyio.to_thread

__all__ = ["check_work", "to_thread"]

P = ParamSpec("P")
T = TypeVar("T")

_CO_COROUTINE = inspect.CO_COROUTINE


def check_work(work: object, where: str = "spawn") -> None:
    """Refuse `work` unless it is a coroutine or an async callable; the message has the fix.

    Callers test `type(work) is CoroutineType` first, so this runs only for the rest.
    """
    if type(work) is FunctionType and work.__code__.co_flags & _CO_COROUTINE:
        return  # an `async def` function: the common case, decided in one test
    if _is_async_callable(work):
        return
    if inspect.isawaitable(work):
        msg = (
            f"{where}() got {type(work).__qualname__}, an awaitable that is not a coroutine; "
            f"wrap it in one: `async def run(): return await obj`, then {where}(run())"
        )
        raise TypeError(msg)
    if callable(work):
        label = getattr(work, "__qualname__", None) or type(work).__qualname__
        msg = (
            f"{where}() got {label}, a plain (not async) callable: on the background loop it "
            f"would block every other task and then fail. Define it with `async def`, pass "
            f"the coroutine itself ({where}(fn(...)) for an async fn), or run blocking code "
            f"in a thread with {where}(loopbridge.to_thread(fn, *args))"
        )
        raise TypeError(msg)
    msg = (
        f"{where}() takes a coroutine or an async callable, not {type(work).__name__}; "
        f"pass `fn()` for an async def fn, or `fn` itself"
    )
    raise TypeError(msg)


def _is_async_callable(work: object) -> bool:
    """True for an `async def` function or method, a partial of one, or an async `__call__`."""
    if type(work) is FunctionType and work.__code__.co_flags & _CO_COROUTINE:
        return True  # the usual case, without inspect's unwrapping
    while isinstance(work, functools.partial):
        work = work.func
    if isinstance(work, MethodType):
        work = work.__func__
    if inspect.iscoroutinefunction(work):
        return True
    if callable(work) and inspect.iscoroutinefunction(inspect.unwrap(work)):
        return True  # a sync-looking wrapper (functools.wraps) around an async def
    call = getattr(type(work), "__call__", None)  # noqa: B004  (the class's, not callable())
    return not isinstance(work, type) and inspect.iscoroutinefunction(call)


async def to_thread(
    fn: Callable[P, T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run blocking `fn(*args, **kwargs)` in a worker thread; spawn the returned coroutine.

    `self.spawn(loopbridge.to_thread(write_file, path), key=...)` keeps the background loop
    free while the file is written. The threads are anyio's (at most 40 at once, its default
    limiter, shared with anything else that uses it). Cancelling the task waits for `fn` to
    return, since a thread cannot be interrupted.
    """
    call: Callable[[], T] = functools.partial(fn, *args, **kwargs)
    return await anyio.to_thread.run_sync(call)
