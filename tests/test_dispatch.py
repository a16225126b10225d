"""CallbackList: firing order, registration checks, errors with notes, and spawn/call wiring."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    Callback,
    CallbackList,
    CallbackNotAttachedError,
    CallbackValidationError,
    EvalResult,
    LogContext,
    LoopState,
    TrainingBatch,
)


def _state() -> LoopState:
    return LoopState(run_name="r", run_id="id", max_steps=None, out_dir=Path("."))


def _batch() -> TrainingBatch:
    return TrainingBatch(index=0, data=None)


@pytest.fixture
def bridge() -> Iterator[lb.Bridge]:
    with lb.Bridge(name="test-dispatch") as bridge:
        yield bridge


class Log(Callback):
    """Appends (label, hook) to a shared log on on_train_start and on_step_end."""

    def __init__(self, label: str, log: list[tuple[str, str]]) -> None:
        self.label = label
        self.log = log

    def on_train_start(self, state: LoopState) -> None:
        self.log.append((self.label, "on_train_start"))

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        self.log.append((self.label, "on_step_end"))


class OnlyEval(Callback):
    """Overrides on_eval only."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        self.log.append(("eval", eval_name))


class TestFiring:
    """Hooks fire on the overriding callbacks, in registration order."""

    def test_registration_order(self) -> None:
        """Each hook fires on every overriding callback in the order they were registered."""
        log: list[tuple[str, str]] = []
        callbacks = CallbackList([Log("a", log), Log("b", log), Log("c", log)])
        callbacks.on_train_start(_state())
        callbacks.on_step_end(_state(), 0, _batch(), {})
        assert log == [
            ("a", "on_train_start"),
            ("b", "on_train_start"),
            ("c", "on_train_start"),
            ("a", "on_step_end"),
            ("b", "on_step_end"),
            ("c", "on_step_end"),
        ]

    def test_arguments_passed_through(self) -> None:
        """The hook receives exactly the objects given to the list's method."""
        seen: list[tuple[Any, ...]] = []

        class Bench(Callback):
            def on_benchmark_eval(
                self,
                ctx: LogContext,
                eval_result: EvalResult,
                predictions: list[dict],  # type: ignore[type-arg]
                *,
                step: int | None = None,
            ) -> None:
                seen.append((ctx, eval_result, predictions, step))

        ctx = LogContext(experiment_name="e")
        result = EvalResult("b", {"x": 1.0})
        rows: list[dict[str, Any]] = [{"q": 1}]
        callbacks = CallbackList([Bench(), Bench()])
        callbacks.on_benchmark_eval(ctx, result, rows, step=7)
        callbacks.on_benchmark_eval(ctx, result, rows)
        assert seen == [(ctx, result, rows, 7)] * 2 + [(ctx, result, rows, None)] * 2

    def test_only_overriders_fire(self) -> None:
        """A callback that does not override a hook is not called for it."""
        log: list[tuple[str, str]] = []
        callbacks = CallbackList([OnlyEval(log), Log("a", log)])
        callbacks.on_eval(_state(), 0, "val", {})
        callbacks.on_train_start(_state())
        assert log == [("eval", "val"), ("a", "on_train_start")]
        assert callbacks.overriding("on_eval") == (callbacks.callbacks[0],)
        assert callbacks.overriding("on_checkpoint") == ()

    def test_no_overrider_is_one_shared_noop(self) -> None:
        """A hook no callback overrides is the same no-op whatever the number of callbacks."""
        few = CallbackList([Callback()])
        many = CallbackList([Callback() for _ in range(50)])
        assert few.__dict__["on_checkpoint"] is many.__dict__["on_checkpoint"]

    def test_single_overrider_is_its_bound_method(self) -> None:
        """With one overriding callback the hook is that callback's bound method itself."""
        log: list[tuple[str, str]] = []
        callback = OnlyEval(log)
        callbacks = CallbackList([Callback(), callback, Callback()])
        assert callbacks.__dict__["on_eval"] == callback.on_eval

    def test_lists_of_the_same_shape_stay_separate(self) -> None:
        """Two lists with as many callbacks on the same hook each fire only their own."""
        log: list[tuple[str, str]] = []
        first = CallbackList([Log("a", log), Log("b", log)])
        second = CallbackList([Log("c", log), Log("d", log)])
        second.on_train_start(_state())
        first.on_train_start(_state())
        assert [label for label, _ in log] == ["c", "d", "a", "b"]

    def test_add_rebuilds(self) -> None:
        """A callback added later fires after the earlier ones."""
        log: list[tuple[str, str]] = []
        callbacks = CallbackList([Log("a", log)])
        callbacks.on_train_start(_state())
        callbacks.add(Log("b", log), OnlyEval(log))
        callbacks.on_train_start(_state())
        callbacks.on_eval(_state(), 1, "v", {})
        assert log == [
            ("a", "on_train_start"),
            ("a", "on_train_start"),
            ("b", "on_train_start"),
            ("eval", "v"),
        ]
        assert len(callbacks) == 3

    def test_remove_rebuilds(self) -> None:
        """A removed callback no longer fires, and removing an absent one is a ValueError."""
        log: list[tuple[str, str]] = []
        a, b = Log("a", log), Log("b", log)
        callbacks = CallbackList([a, b])
        callbacks.remove(a)
        callbacks.on_train_start(_state())
        assert log == [("b", "on_train_start")]
        assert a not in callbacks
        assert b in callbacks
        with pytest.raises(ValueError, match="not in this CallbackList"):
            callbacks.remove(a)

    def test_add_is_all_or_nothing(self) -> None:
        """When one of several added callbacks is refused, none of them is added."""
        log: list[tuple[str, str]] = []
        callbacks = CallbackList()
        with pytest.raises(CallbackValidationError):
            callbacks.add(Log("a", log), object())  # type: ignore[arg-type]
        assert len(callbacks) == 0
        callbacks.on_train_start(_state())
        assert log == []

    def test_same_instance_twice_is_refused(self) -> None:
        """One instance registered twice is refused (tests/test_registration.py has the rest)."""
        a = Log("a", [])
        with pytest.raises(CallbackValidationError, match="registered twice in one"):
            CallbackList([a, a])


def _refusal(callback: object) -> CallbackValidationError:
    with pytest.raises(CallbackValidationError) as info:
        CallbackList([callback])  # type: ignore[list-item]
    return info.value


class TestRefusals:
    """Registration refuses callbacks that break the contract, naming class, hook and fix."""

    def test_error_is_a_type_error(self) -> None:
        """The refusal is a TypeError subclass, so `except TypeError` catches it."""
        assert issubclass(CallbackValidationError, TypeError)

    def test_async_hook(self) -> None:
        """An `async def` hook is refused with advice to spawn the async part."""

        class AsyncHook(Callback):
            async def on_train_start(self, state: LoopState) -> None:  # type: ignore[override]
                pass

        error = _refusal(AsyncHook())
        assert re.search(r"AsyncHook\.on_train_start is `async def`", str(error))
        assert "self.spawn(" in str(error)
        assert error.hook == "on_train_start"
        assert isinstance(error.callback, AsyncHook)

    def test_async_generator_hook(self) -> None:
        """An async generator hook is refused like an `async def` hook."""

        class AsyncGen(Callback):
            async def on_train_start(  # type: ignore[override]
                self, state: LoopState
            ) -> AsyncIterator[None]:
                yield

        error = _refusal(AsyncGen())
        assert re.search(r"AsyncGen\.on_train_start is `async def`.*self\.spawn", str(error))

    def test_generator_hook(self) -> None:
        """A generator hook (whose body would never run) is refused with advice to drop yield."""

        class GenHook(Callback):
            def on_checkpoint(  # type: ignore[override]
                self, state: LoopState, row: lb.ManifestRow
            ) -> Iterator[None]:
                yield

        error = _refusal(GenHook())
        assert re.search(
            r"GenHook\.on_checkpoint is a generator function.*remove `yield`", str(error)
        )
        assert error.hook == "on_checkpoint"

    def test_too_few_parameters(self) -> None:
        """A hook that cannot take all the contract's arguments is refused with the signature."""

        class TooFew(Callback):
            def on_step_end(self, state: LoopState) -> None:  # type: ignore[override]
                pass

        error = _refusal(TooFew())
        message = str(error)
        assert re.search(
            r"TooFew\.on_step_end\(state\W+LoopState\W*\).* cannot take the hook's arguments",
            message,
        )
        assert "too many positional arguments" in message
        assert re.search(
            r"give it the signature of Callback\.on_step_end: on_step_end\(self, state: "
            r"\S*LoopState, step_idx: int, batch: \S*TrainingBatch, metrics: dict\[str, float\]\)",
            message,
        )
        assert error.hook == "on_step_end"

    def test_too_many_parameters(self) -> None:
        """A hook that needs an argument the contract does not give is refused."""

        class TooMany(Callback):
            def on_eval(  # type: ignore[override]
                self,
                state: LoopState,
                step_idx: int,
                eval_name: str,
                metrics: dict[str, float],
                extra: int,
            ) -> None:
                pass

        error = _refusal(TooMany())
        assert re.search(
            r"TooMany\.on_eval\(.*extra.*\).* cannot take .*missing a required argument: 'extra'.*"
            r"signature of Callback\.on_eval",
            str(error),
        )

    def test_missing_keyword_step(self) -> None:
        """An on_benchmark_eval without the keyword `step` is refused."""

        class NoStep(Callback):
            def on_benchmark_eval(  # type: ignore[override]
                self,
                ctx: LogContext,
                eval_result: EvalResult,
                predictions: list[dict],  # type: ignore[type-arg]
            ) -> None:
                pass

        error = _refusal(NoStep())
        assert re.search(
            r"NoStep\.on_benchmark_eval\(.*\).* cannot take .*unexpected keyword argument 'step'",
            str(error),
        )
        assert "step: int | None = None" in str(error)

    def test_flexible_signatures_accepted(self) -> None:
        """Overrides that can take the contract's arguments (*args, defaults) are accepted."""

        class Flexible(Callback):
            def on_step_end(self, *args: Any) -> None:
                pass

            def on_benchmark_eval(
                self, ctx: Any, result: Any, predictions: Any, step: Any = None, extra: int = 0
            ) -> None:
                pass

        assert len(CallbackList([Flexible()])) == 1

    def test_not_a_callback(self) -> None:
        """An object that is not a Callback is refused with advice to subclass Callback."""

        class Duck:
            def on_step_end(self, *args: object) -> None:
                pass

        error = _refusal(Duck())
        assert re.search(r"\(.*Duck\) is not a loopbridge Callback: subclass", str(error))
        assert "loopbridge.Callback" in str(error)

    def test_not_callable_attribute(self) -> None:
        """A hook name bound to a non-callable is refused with advice to use `def`."""

        class NotCallable(Callback):
            on_eval = 5  # type: ignore[assignment]

        error = _refusal(NotCallable())
        assert re.search(
            r"NotCallable\.on_eval is a int, not a method; define it with `def`", str(error)
        )
        assert error.hook == "on_eval"

    def test_refused_at_experiment_and_loop_construction(self, tmp_path: Path) -> None:
        """TrainLoop and Experiment check their callbacks when they are built."""

        class AsyncHook(Callback):
            async def on_train_start(self, state: LoopState) -> None:  # type: ignore[override]
                pass

        with pytest.raises(CallbackValidationError, match=r"AsyncHook\.on_train_start"):
            lb.TrainLoop(lambda s, b: {}, [], out_dir=tmp_path, callbacks=[AsyncHook()])
        with pytest.raises(CallbackValidationError, match=r"AsyncHook\.on_train_start"):
            lb.Experiment(
                "e",
                {"a": {}},
                lambda ctx: lb.TrainLoop(lambda s, b: {}, [], out_dir=tmp_path),
                callbacks=[AsyncHook()],
            )


class Boom(Callback):
    """Raises from on_step_end."""

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        raise ValueError("boom in step end")


class TestExceptions:
    """An exception from a hook propagates with a note naming the callback and the hook."""

    def test_note_through_callback_list(self) -> None:
        """With two or more callbacks, the list adds a note naming the culprit and hook."""
        log: list[tuple[str, str]] = []
        callbacks = CallbackList([Log("a", log), Boom(), Log("c", log)])
        with pytest.raises(ValueError, match="boom in step end") as info:
            callbacks.on_step_end(_state(), 0, _batch(), {})
        assert info.value.__notes__ == ["raised in hook Boom.on_step_end (loopbridge callback)"]
        assert log == [("a", "on_step_end")]  # later callbacks do not run

    def test_note_with_profiling(self) -> None:
        """With profiling on, the note still names the callback, not the profiler's wrapper."""
        callbacks = CallbackList([Boom()], profile=True)
        with pytest.raises(ValueError, match="boom in step end") as info:
            callbacks.on_step_end(_state(), 0, _batch(), {})
        assert info.value.__notes__ == ["raised in hook Boom.on_step_end (loopbridge callback)"]

    def test_note_names_the_right_one_of_many(self) -> None:
        """Among many callbacks, the note names the one that raised, whatever its position."""
        log: list[tuple[str, str]] = []
        for position in range(6):
            callbacks: list[Callback] = [Log(str(i), log) for i in range(5)]
            callbacks.insert(position, Boom())
            with pytest.raises(ValueError, match="boom in step end") as info:
                CallbackList(callbacks).on_step_end(_state(), 0, _batch(), {})
            assert info.value.__notes__ == ["raised in hook Boom.on_step_end (loopbridge callback)"]

    def test_note_through_train_loop_single_callback(self, tmp_path: Path) -> None:
        """With a single callback the TrainLoop adds the note as the exception leaves the run."""
        loop = lb.TrainLoop(lambda s, b: {}, range(3), out_dir=tmp_path, callbacks=[Boom()])
        with pytest.raises(ValueError, match="boom in step end") as info:
            loop.run()
        assert info.value.__notes__ == ["raised in hook Boom.on_step_end (loopbridge callback)"]

    def test_note_added_once(self, tmp_path: Path) -> None:
        """An exception passing through the list and then the runner carries a single note."""
        log: list[tuple[str, str]] = []
        loop = lb.TrainLoop(
            lambda s, b: {}, range(3), out_dir=tmp_path, callbacks=[Log("a", log), Boom()]
        )
        with pytest.raises(ValueError, match="boom in step end") as info:
            loop.run()
        assert info.value.__notes__ == ["raised in hook Boom.on_step_end (loopbridge callback)"]

    def test_note_through_experiment_hook(self, tmp_path: Path) -> None:
        """An experiment-level hook that raises propagates with the note from the Experiment."""

        class BadStart(Callback):
            def on_experiment_start(self, ctx: LogContext) -> None:
                raise KeyError("no tracking server")

        experiment = lb.Experiment(
            "e",
            {"a": {}},
            lambda ctx: lb.TrainLoop(lambda s, b: {}, range(1), out_dir=tmp_path),
            callbacks=[BadStart()],
        )
        with pytest.raises(KeyError, match="no tracking server") as info:
            experiment.run()
        (note,) = info.value.__notes__
        assert re.fullmatch(
            r"raised in hook (.*\.)?BadStart\.on_experiment_start \(loopbridge callback\)", note
        )

    def test_step_function_error_has_no_hook_note(self, tmp_path: Path) -> None:
        """An error from the user's step function is not blamed on a callback."""

        def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            raise RuntimeError("nan loss")

        log: list[tuple[str, str]] = []
        loop = lb.TrainLoop(step, range(3), out_dir=tmp_path, callbacks=[Log("a", log)])
        with pytest.raises(RuntimeError, match="nan loss") as info:
            loop.run()
        assert getattr(info.value, "__notes__", []) == []


class NoInit(Callback):
    """A subclass whose __init__ does not call super().__init__()."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.seen: list[int] = []

    def on_train_start(self, state: LoopState) -> None:
        self.seen.append(self.value)


class TestAttachment:
    """Callbacks reach the bridge of their list, without needing super().__init__()."""

    def test_subclass_without_super_init_fires(self) -> None:
        """A subclass that skips super().__init__() registers and fires."""
        callback = NoInit(3)
        CallbackList([callback]).on_train_start(_state())
        assert callback.seen == [3]

    def test_subclass_without_super_init_spawns(self, bridge: lb.Bridge) -> None:
        """A subclass that skips super().__init__() can spawn and call on its list's bridge."""
        callback = NoInit(3)
        CallbackList([callback], bridge=bridge)

        async def answer() -> int:
            return 42

        assert callback.spawn(answer(), name="answer").result(timeout=10) == 42
        assert callback.call(answer, timeout=10) == 42

    def test_unattached_spawn_raises(self) -> None:
        """spawn on a callback in no list raises CallbackNotAttachedError saying how to attach."""
        ran = []

        async def work() -> None:
            ran.append(1)

        coro = work()
        with pytest.raises(
            CallbackNotAttachedError,
            match=r"NoInit is not attached to a bridge: add it to a TrainLoop or Experiment",
        ):
            NoInit(1).spawn(coro)
        assert (
            inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        )  # closed, so no "never awaited" warning
        assert ran == []

    def test_unattached_call_raises(self) -> None:
        """call on a callback in no list raises CallbackNotAttachedError."""

        async def work() -> int:
            return 1

        with pytest.raises(
            CallbackNotAttachedError, match=r"CallbackList\(\.\.\., bridge=\.\.\.\)"
        ):
            NoInit(1).call(work)

    def test_list_without_bridge_leaves_unattached(self) -> None:
        """A CallbackList without a bridge does not attach its callbacks to one."""
        callback = NoInit(1)
        CallbackList([callback])

        async def work() -> None:
            pass

        with pytest.raises(CallbackNotAttachedError):
            callback.spawn(work)

    def test_removed_callback_is_detached(self, bridge: lb.Bridge) -> None:
        """A callback removed from its list can no longer spawn."""
        callback = NoInit(1)
        callbacks = CallbackList([callback], bridge=bridge)
        callbacks.remove(callback)

        async def work() -> None:
            pass

        with pytest.raises(CallbackNotAttachedError):
            callback.spawn(work)

    def test_bridge_setter_attaches(self, bridge: lb.Bridge) -> None:
        """Setting the list's bridge attaches every registered callback to it."""
        callback = NoInit(1)
        callbacks = CallbackList([callback])
        callbacks.bridge = bridge

        async def work() -> str:
            return "ok"

        assert callback.spawn(work).result(timeout=10) == "ok"

    def test_not_attached_error_is_runtime_error(self) -> None:
        """CallbackNotAttachedError is a RuntimeError and a LoopbridgeError."""
        assert issubclass(CallbackNotAttachedError, RuntimeError)
        assert issubclass(CallbackNotAttachedError, lb.LoopbridgeError)
