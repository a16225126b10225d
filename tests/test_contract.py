"""The hook contract of spec/hooks.md, checked on `Callback` and `CallbackList` by introspection."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    ArmResult,
    Callback,
    CallbackList,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)

P = inspect.Parameter
POS = P.POSITIONAL_OR_KEYWORD
KW = P.KEYWORD_ONLY
EMPTY = P.empty

# The contract, written out by hand from spec/hooks.md: (name, kind, annotation, default).
CONTRACT: dict[str, list[tuple[str, Any, object, object]]] = {
    "on_experiment_start": [("ctx", POS, LogContext, EMPTY)],
    "on_group_start": [("ctx", POS, LogContext, EMPTY), ("group_name", POS, str, EMPTY)],
    "on_run_start": [("ctx", POS, LogContext, EMPTY)],
    "on_train_start": [("state", POS, LoopState, EMPTY)],
    "on_step_end": [
        ("state", POS, LoopState, EMPTY),
        ("step_idx", POS, int, EMPTY),
        ("batch", POS, TrainingBatch, EMPTY),
        ("metrics", POS, dict[str, float], EMPTY),
    ],
    "on_checkpoint": [("state", POS, LoopState, EMPTY), ("row", POS, ManifestRow, EMPTY)],
    "on_eval": [
        ("state", POS, LoopState, EMPTY),
        ("step_idx", POS, int, EMPTY),
        ("eval_name", POS, str, EMPTY),
        ("metrics", POS, dict[str, float], EMPTY),
    ],
    "on_benchmark_eval": [
        ("ctx", POS, LogContext, EMPTY),
        ("eval_result", POS, EvalResult, EMPTY),
        ("predictions", POS, list[dict], EMPTY),  # type: ignore[type-arg]  # the contract's type
        ("step", KW, int | None, None),
    ],
    "on_train_end": [
        ("state", POS, LoopState, EMPTY),
        ("artifacts", POS, LoopArtifacts, EMPTY),
    ],
    "on_run_end": [
        ("ctx", POS, LogContext, EMPTY),
        ("run_result", POS, RunResult, EMPTY),
        ("arm", POS, ArmResult, EMPTY),
    ],
    "on_experiment_end": [
        ("ctx", POS, LogContext, EMPTY),
        ("result", POS, ExperimentResult, EMPTY),
    ],
}
HOOKS = list(CONTRACT)


def _described(fn: object) -> list[tuple[str, Any, object, object]]:
    """A function's parameters, without self, as (name, kind, annotation, default)."""
    signature = inspect.signature(fn, eval_str=True)  # type: ignore[arg-type]
    return [
        (p.name, p.kind, p.annotation, p.default)
        for p in signature.parameters.values()
        if p.name != "self"
    ]


class TestHookNames:
    """Callback has exactly the eleven hooks of the contract, in the contract's order."""

    def test_hook_names_in_contract_order(self) -> None:
        """HOOK_NAMES lists the contract's hooks in the order a run meets them."""
        assert list(lb.HOOK_NAMES) == HOOKS

    def test_no_extra_public_hooks(self) -> None:
        """Callback defines no `on_*` method beyond the contract's eleven."""
        on_methods = sorted(name for name in dir(Callback) if name.startswith("on_"))
        assert on_methods == sorted(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
class TestCallbackSignatures:
    """Every hook of Callback has the contract's parameters, types, defaults and return."""

    def test_parameters_names_kinds_annotations_defaults(self, hook: str) -> None:
        """Parameter names, order, kinds, evaluated annotations and defaults match the contract."""
        assert _described(getattr(Callback, hook)) == CONTRACT[hook]

    def test_self_is_first_and_positional(self, hook: str) -> None:
        """The first parameter is `self`, so the hooks are plain instance methods."""
        first = next(iter(inspect.signature(getattr(Callback, hook)).parameters.values()))
        assert (first.name, first.kind) == ("self", POS)

    def test_return_annotation_is_none(self, hook: str) -> None:
        """Each hook is annotated `-> None`."""
        signature = inspect.signature(getattr(Callback, hook), eval_str=True)
        assert signature.return_annotation is None

    def test_plain_sync_function(self, hook: str) -> None:
        """Each hook is a plain `def`: neither a coroutine nor a generator function."""
        fn = getattr(Callback, hook)
        assert inspect.isfunction(fn)
        assert not inspect.iscoroutinefunction(fn)
        assert not inspect.isgeneratorfunction(fn)
        assert not inspect.isasyncgenfunction(fn)

    def test_has_docstring(self, hook: str) -> None:
        """Each hook documents its moment."""
        assert (getattr(Callback, hook).__doc__ or "").strip()

    def test_body_is_a_noop(self, hook: str) -> None:
        """Calling the base hook with stand-in arguments does nothing and returns None."""
        positional = [p for p in CONTRACT[hook] if p[1] is POS]
        args = [object() for _ in positional]
        kwargs = {name: 3 for name, kind, _, _ in CONTRACT[hook] if kind is KW}
        callback = Callback()
        before = dict(vars(callback))
        assert getattr(callback, hook)(*args, **kwargs) is None
        assert vars(callback) == before


@pytest.mark.parametrize("hook", HOOKS)
class TestCallbackListSignatures:
    """CallbackList has one method per hook, with Callback's exact signature."""

    def test_same_signature_as_callback(self, hook: str) -> None:
        """`CallbackList.<hook>` has the parameters and return annotation of `Callback.<hook>`."""
        ours = inspect.signature(getattr(CallbackList, hook), eval_str=True)
        theirs = inspect.signature(getattr(Callback, hook), eval_str=True)
        assert _described(getattr(CallbackList, hook)) == CONTRACT[hook]
        assert ours == theirs

    def test_empty_list_fires_as_noop(self, hook: str) -> None:
        """A hook that no callback overrides can be fired with the contract's arguments."""
        positional = [p for p in CONTRACT[hook] if p[1] is POS]
        callbacks = CallbackList([Callback()])
        assert getattr(callbacks, hook)(*[object() for _ in positional]) is None
