"""CallbackList: fires each hook on the callbacks that override it, at about one call's cost.

At registration the list checks every callback and builds, per hook, the tuple of bound
methods that override it. It then installs, as an instance attribute named like the hook,
the cheapest callable that fires them: a shared no-op when nobody overrides the hook, the
bound method itself when one callback does, and a small loop otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from types import MethodType, TracebackType
from typing import TYPE_CHECKING, Any

from loopbridge._callback import HOOK_NAMES, Callback
from loopbridge._exceptions import CallbackValidationError
from loopbridge._profile import HookProfiler
from loopbridge._ranks import RankInfo, detect_rank
from loopbridge._registration import (
    LIVE_LISTS,
    check_hook_names,
    check_not_live_elsewhere,
    check_unique,
)
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = ["CallbackList"]

Method = Callable[..., None]

# Positional arguments each hook receives, and its keyword-only ones.
_ARITY: dict[str, tuple[int, tuple[str, ...]]] = {
    "on_experiment_start": (1, ()),
    "on_group_start": (2, ()),
    "on_run_start": (1, ()),
    "on_train_start": (1, ()),
    "on_step_end": (4, ()),
    "on_checkpoint": (2, ()),
    "on_eval": (4, ()),
    "on_benchmark_eval": (3, ("step",)),
    "on_train_end": (2, ()),
    "on_run_end": (3, ()),
    "on_experiment_end": (2, ()),
}

_NOTE_ATTR = "__loopbridge_hook__"


# What a hook no callback overrides fires: Callback's own no-op, bound once to a stand-in.
# It has the hook's exact signature, so it costs one plain call; a `*args, **kwargs` no-op
# packs a tuple and a dict on every call and measured twice a direct call.
_NOOPS: dict[str, Method] = {
    hook: MethodType(Callback.__dict__[hook], Callback()) for hook in HOOK_NAMES
}


def _add_note(exc: BaseException, method: Method, hook: str) -> None:
    """Name the callback and hook on an exception, once."""
    if getattr(exc, _NOTE_ATTR, None) is not None:
        return
    owner = getattr(method, "__self__", None)
    if owner is None:  # the profiler's wrapper: name the callback it times
        owner = getattr(getattr(method, "__wrapped__", None), "__self__", None)
    label = type(owner).__qualname__ if owner is not None else repr(method)
    exc.add_note(f"raised in hook {label}.{hook} (loopbridge callback)")
    # Some exception types refuse new attributes; the note is what matters.
    with contextlib.suppress(AttributeError):
        setattr(exc, _NOTE_ATTR, (owner, hook))


def _fan_out(hook: str, methods: tuple[Method, ...]) -> Method:
    """A straight-line call of each of `methods` with the hook's exact arity.

    Unrolled rather than a `for` loop: the loop's per-item cost and the per-item `try` made
    five callbacks cost 1.35x a plain inline loop; unrolled they cost about 1.1x, and twenty
    cost less than the inline loop. Exact arity, because *args packing would cost a quarter
    of a fast hook. The one `try` names the culprit from the line the exception passed.
    """
    fire: Method = _maker(hook, len(methods))(methods, hook, *methods)
    fire.__qualname__ = f"CallbackList.{hook}"
    return fire


@functools.cache
def _maker(hook: str, n: int) -> Callable[..., Method]:
    """Compile, once per hook and count, the function that builds a `_fan_out` caller."""
    npos, keywords = _ARITY[hook]
    params = args = ", ".join("abcd"[:npos])
    if keywords:
        params += ", *, " + ", ".join(f"{k}=None" for k in keywords)
        args += ", " + ", ".join(f"{k}={k}" for k in keywords)
    names = [f"m{i}" for i in range(n)]
    source = "\n".join(
        [
            f"def make(_methods, _hook, {', '.join(names)}):",
            f"    def {hook}({params}):",
            "        try:",
            *(f"            {name}({args})" for name in names),
            "        except BaseException as exc:",
            "            _note_culprit(exc, _methods, _hook)",
            "            raise",
            f"    return {hook}",
        ]
    )
    namespace: dict[str, Any] = {"_note_culprit": _note_culprit}
    exec(compile(source, f"<loopbridge CallbackList.{hook}>", "exec"), namespace)
    make: Callable[..., Method] = namespace["make"]
    return make


# The line of the first call in _fan_out's source; the traceback's line gives the culprit.
_FIRST_CALL = 4


def _note_culprit(exc: BaseException, methods: tuple[Method, ...], hook: str) -> None:
    """Add the note for the method whose call, in a _fan_out function, `exc` passed through."""
    tb = exc.__traceback__  # its head is the _fan_out frame, at the line of the call
    index = -1 if tb is None else tb.tb_lineno - _FIRST_CALL
    if 0 <= index < len(methods):
        _add_note(exc, methods[index], hook)


def _validate(obj: object) -> dict[str, Method]:
    """Check a callback against the contract; return its overriding hooks, bound."""
    if not isinstance(obj, Callback):
        msg = (
            f"{obj!r} ({type(obj).__qualname__}) is not a loopbridge Callback: subclass "
            f"loopbridge.Callback and override the hooks you need"
        )
        raise CallbackValidationError(msg, callback=obj)
    check_hook_names(obj)
    cls = type(obj).__qualname__
    overrides: dict[str, Method] = {}
    for hook in HOOK_NAMES:
        method = getattr(obj, hook)
        if getattr(method, "__func__", None) is Callback.__dict__[hook]:
            continue
        where = f"{cls}.{hook}"
        if not callable(method):
            msg = f"{where} is a {type(method).__name__}, not a method; define it with `def`"
            raise CallbackValidationError(msg, callback=obj, hook=hook)
        function = inspect.unwrap(getattr(method, "__func__", method))
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            msg = (
                f"{where} is `async def`, but hooks run inline and must be plain `def`; "
                f"keep the hook sync and hand the async part to self.spawn(...)"
            )
            raise CallbackValidationError(msg, callback=obj, hook=hook)
        if inspect.isgeneratorfunction(function):
            msg = f"{where} is a generator function, so its body would never run; remove `yield`"
            raise CallbackValidationError(msg, callback=obj, hook=hook)
        npos, keywords = _ARITY[hook]
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):
            signature = None  # some builtins have no signature; trust them
        if signature is not None:
            try:
                signature.bind(*range(npos), **dict.fromkeys(keywords))
            except TypeError as exc:
                expected = inspect.signature(getattr(Callback, hook))
                msg = (
                    f"{where}{signature} cannot take the hook's arguments ({exc}); "
                    f"give it the signature of Callback.{hook}: {hook}{expected}"
                )
                raise CallbackValidationError(msg, callback=obj, hook=hook) from None
        overrides[hook] = method
    return overrides


class CallbackList:
    """An ordered list of callbacks, with one method per hook that fires it on all of them.

    `callbacks.on_step_end(state, step_idx, batch, metrics)` calls `on_step_end` on every
    callback that overrides it, in registration order. An exception propagates with a note
    naming the callback and hook; with a single overriding callback the bound method is
    called directly, so the runners (TrainLoop, Experiment) add that note.

    Args:
        callbacks: the callbacks, checked against the hook contract as they are added.
        bridge: where `Callback.spawn` sends background work.
        profile: True, or a HookProfiler to share, to time every hook call per callback.
        rank: this process's rank (detected from torchrun's environment by default); a
            callback with `rank_zero_only` is left out on every rank but 0, so it costs nothing.
    """

    def __init__(
        self,
        callbacks: Iterable[Callback] = (),
        *,
        bridge: Bridge | None = None,
        profile: bool | HookProfiler = False,
        rank: RankInfo | None = None,
    ) -> None:
        self.rank = detect_rank() if rank is None else rank
        self._callbacks: list[Callback] = []
        self._overrides: list[dict[str, Method]] = []
        self._bridge = bridge
        if isinstance(profile, HookProfiler):
            self.profiler: HookProfiler | None = profile
        else:
            self.profiler = HookProfiler() if profile else None
        self.add(*callbacks)
        if bridge is not None:
            LIVE_LISTS.add(self)

    def __iter__(self) -> Iterator[Callback]:
        return iter(tuple(self._callbacks))

    def __len__(self) -> int:
        return len(self._callbacks)

    def __contains__(self, callback: object) -> bool:
        return any(callback is cb for cb in self._callbacks)

    def __repr__(self) -> str:
        names = ", ".join(type(cb).__qualname__ for cb in self._callbacks)
        return f"CallbackList([{names}])"

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        """The registered callbacks, in order."""
        return tuple(self._callbacks)

    @property
    def bridge(self) -> Bridge | None:
        """The bridge that the callbacks' spawn and call reach."""
        return self._bridge

    @bridge.setter
    def bridge(self, bridge: Bridge | None) -> None:
        if bridge is not None:
            check_not_live_elsewhere(self._callbacks, self, bridge)
        self._bridge = bridge
        for callback in self._callbacks:
            _attach(callback, bridge)
        if bridge is None:
            LIVE_LISTS.discard(self)
        else:
            LIVE_LISTS.add(self)

    def release(self) -> None:
        """End this list's claim on its callbacks (its run is over): they may join another.

        Hooks still fire and spawn as before; the list becomes live again when it is given a
        bridge. See `loopbridge._registration` for the rules this enables.
        """
        LIVE_LISTS.discard(self)

    def add(self, *callbacks: Callback) -> None:
        """Check and append callbacks; all are refused if one is invalid."""
        checked = [(cb, _validate(cb)) for cb in callbacks]
        check_unique(callbacks, self._callbacks)
        check_not_live_elsewhere(callbacks, self, self._bridge)
        for callback, overrides in checked:
            if callback.rank_zero_only and not self.rank.is_zero:
                continue  # checked like the others, then left out: this rank never calls it
            _attach(callback, self._bridge)
            self._callbacks.append(callback)
            self._overrides.append(overrides)
        self._rebuild()

    def remove(self, callback: Callback) -> None:
        """Remove a callback; ValueError if it is not in the list."""
        for i, cb in enumerate(self._callbacks):
            if cb is callback:
                del self._callbacks[i]
                del self._overrides[i]
                _attach(callback, None)
                self._rebuild()
                return
        msg = f"{callback!r} is not in this CallbackList; nothing to remove"
        raise ValueError(msg)

    def overriding(self, hook: str) -> tuple[Callback, ...]:
        """The callbacks that override `hook`, in the order it fires on them."""
        return tuple(
            cb
            for cb, overrides in zip(self._callbacks, self._overrides, strict=True)
            if hook in overrides
        )

    def _labels(self) -> list[str]:
        counts: dict[str, int] = {}
        labels = []
        for cb in self._callbacks:
            name = type(cb).__qualname__
            counts[name] = counts.get(name, 0) + 1
            labels.append(name if counts[name] == 1 else f"{name}#{counts[name]}")
        return labels

    def _rebuild(self) -> None:
        labels = self._labels()
        for hook in HOOK_NAMES:
            methods: list[Method] = []
            for label, overrides in zip(labels, self._overrides, strict=True):
                method = overrides.get(hook)
                if method is None:
                    continue
                if self.profiler is not None:
                    method = self.profiler.wrap(label, hook, method)
                methods.append(method)
            if not methods:
                fire: Method = _NOOPS[hook]
            elif len(methods) == 1 and self.profiler is None:
                fire = methods[0]
            else:
                fire = _fan_out(hook, tuple(methods))
            # Shadows the class-level method below; that one documents the signature.
            self.__dict__[hook] = fire

    def annotate(self, exc: BaseException) -> None:
        """Add the callback-and-hook note to `exc` if a hook of this list raised it."""
        if getattr(exc, _NOTE_ATTR, None) is not None:
            return
        tb: TracebackType | None = exc.__traceback__
        wanted = {
            id(getattr(m, "__func__", m).__code__): (hook, m)
            for overrides in self._overrides
            for hook, m in overrides.items()
            if hasattr(getattr(m, "__func__", m), "__code__")
        }
        while tb is not None:
            found = wanted.get(id(tb.tb_frame.f_code))
            if found is not None:
                hook, method = found
                owner = tb.tb_frame.f_locals.get("self")
                if owner is not None:
                    method = getattr(owner, hook, method)
                _add_note(exc, method, hook)
                return
            tb = tb.tb_next

    # The methods below fire through the instance attributes that _rebuild installs; they
    # exist for the signature, the docs and static typing.

    def on_experiment_start(self, ctx: LogContext) -> None:
        """Fire `on_experiment_start` on every callback that overrides it."""
        self.__dict__["on_experiment_start"](ctx)

    def on_group_start(self, ctx: LogContext, group_name: str) -> None:
        """Fire `on_group_start` on every callback that overrides it."""
        self.__dict__["on_group_start"](ctx, group_name)

    def on_run_start(self, ctx: LogContext) -> None:
        """Fire `on_run_start` on every callback that overrides it."""
        self.__dict__["on_run_start"](ctx)

    def on_train_start(self, state: LoopState) -> None:
        """Fire `on_train_start` on every callback that overrides it."""
        self.__dict__["on_train_start"](state)

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Fire `on_step_end` on every callback that overrides it."""
        self.__dict__["on_step_end"](state, step_idx, batch, metrics)

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Fire `on_checkpoint` on every callback that overrides it."""
        self.__dict__["on_checkpoint"](state, row)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Fire `on_eval` on every callback that overrides it."""
        self.__dict__["on_eval"](state, step_idx, eval_name, metrics)

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Fire `on_benchmark_eval` on every callback that overrides it."""
        self.__dict__["on_benchmark_eval"](ctx, eval_result, predictions, step=step)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Fire `on_train_end` on every callback that overrides it."""
        self.__dict__["on_train_end"](state, artifacts)

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Fire `on_run_end` on every callback that overrides it."""
        self.__dict__["on_run_end"](ctx, run_result, arm)

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
        """Fire `on_experiment_end` on every callback that overrides it."""
        self.__dict__["on_experiment_end"](ctx, result)


def _attach(callback: Callback, bridge: Bridge | None) -> None:
    try:
        callback._loopbridge_bridge = bridge
    except AttributeError as exc:
        msg = (
            f"{type(callback).__qualname__} defines __slots__ without room for loopbridge's "
            f"bridge reference; add '_loopbridge_bridge' to its __slots__"
        )
        raise CallbackValidationError(msg, callback=callback) from exc
