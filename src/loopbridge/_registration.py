"""Registration rules beyond the hook signatures: misspelled hooks, and one instance, one list.

A method named like a hook that is not one (`on_step_ended`) never fires, so it is refused
with the closest hook's name. The rule: every public callable attribute of the callback's
class (and of its bases up to `Callback`) whose name starts with `on_` must be a hook of the
contract, unless it is marked with `@loopbridge.not_a_hook`. Base classes that are not
`Callback`s (another framework's callback class mixed in) are not checked.

A callback instance belongs to one live list at a time. A `CallbackList` is *live* while it
has a bridge that is open and it has not been released; `TrainLoop` releases its list when
its run ends, `Experiment` when its run ends. Registering an instance that a live list on
another bridge holds is
refused, as is registering one instance twice in one list: its background work would land
in the other run's report, and it would break when that run's bridge closes. A list without a
bridge is not live; it is checked when it gets one, which `TrainLoop.run` does before the
first step. Lists on the
same bridge may share callbacks: an experiment's callbacks sit in the experiment's list and
in each of its loops' lists.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from loopbridge._callback import HOOK_NAMES, Callback
from loopbridge._exceptions import CallbackValidationError

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge
    from loopbridge._dispatch import CallbackList

__all__ = ["check_hook_names", "check_not_live_elsewhere", "check_unique", "not_a_hook"]

F = TypeVar("F", bound=Callable[..., object])

_NOT_A_HOOK = "__loopbridge_not_a_hook__"
_HOOKS = frozenset(HOOK_NAMES)
_BASE_NAMES = frozenset(vars(Callback))

LIVE_LISTS: weakref.WeakSet[CallbackList] = weakref.WeakSet()
"""The lists that have a bridge and have not been released; see `CallbackList.release`."""


def not_a_hook(method: F) -> F:
    """Mark a method whose name starts with `on_` as your own, not a misspelled hook."""
    setattr(method, _NOT_A_HOOK, True)
    return method


def check_hook_names(callback: Callback) -> None:
    """Refuse an `on_*` method that is not a hook, suggesting the hook it resembles."""
    cls = type(callback)
    for klass in cls.__mro__:
        if klass is Callback or not issubclass(klass, Callback):
            continue  # another library's base class (a mixin) follows its own naming
        for name, value in vars(klass).items():
            if not name.startswith("on_") or name in _HOOKS or name in _BASE_NAMES:
                continue
            function = getattr(value, "__func__", value)  # staticmethod, classmethod
            if not callable(function) or getattr(function, _NOT_A_HOOK, False):
                continue
            close = difflib.get_close_matches(name, HOOK_NAMES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            msg = (
                f"{klass.__qualname__}.{name} is not a loopbridge hook, so it would never be "
                f"called; {hint}The hooks are {', '.join(HOOK_NAMES)}. Rename it to the hook "
                f"you meant, or, if it is a method of your own, mark it @loopbridge.not_a_hook"
            )
            raise CallbackValidationError(msg, callback=callback, hook=name)


def check_unique(callbacks: Iterable[Callback], registered: Iterable[Callback]) -> None:
    """Refuse an instance that is already in the list, or that comes twice among the new."""
    seen = {id(cb): i for i, cb in enumerate(registered)}
    for callback in callbacks:
        where = seen.get(id(callback))
        if where is not None:
            name = type(callback).__qualname__
            msg = (
                f"this {name} instance is registered twice in one CallbackList (position "
                f"{where} already holds it), so every hook would fire on it twice; register "
                f"it once, or create a second {name}(...) if you want two"
            )
            raise CallbackValidationError(msg, callback=callback)
        seen[id(callback)] = len(seen)


def check_not_live_elsewhere(
    callbacks: Iterable[Callback], owner: CallbackList, bridge: Bridge | None
) -> None:
    """Refuse instances that a live list on another bridge holds.

    A list without a bridge is not live and cannot conflict yet: it is checked when it gets
    one (TrainLoop.run does that before the first step).
    """
    if bridge is None:
        return
    others = [
        other
        for other in list(LIVE_LISTS)
        if other is not owner
        and other.bridge is not None
        and not other.bridge.closed
        and other.bridge is not bridge
    ]
    if not others:
        return
    for callback in callbacks:
        for other in others:
            if callback in other:
                name = type(callback).__qualname__
                msg = (
                    f"this {name} instance is already registered with a live CallbackList "
                    f"{other!r} on {other.bridge!r}, whose run has not finished; one instance "
                    f"cannot serve two live runs (its background work would land in the other "
                    f"run's report). Create one {name}(...) per loop, for example inside the "
                    f"function that builds the loop, or wait until the other run has ended"
                )
                raise CallbackValidationError(msg, callback=callback)
