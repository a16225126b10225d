"""Registration refuses misspelled hooks, one instance twice, and an instance live elsewhere."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import Callback, CallbackList, CallbackValidationError, LoopState

WAIT = 10.0


class Counter(Callback):
    """Counts on_train_start calls."""

    def __init__(self) -> None:
        self.starts = 0

    def on_train_start(self, state: LoopState) -> None:
        self.starts += 1


def _loop(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> lb.TrainLoop:
    kwargs.setdefault("max_steps", 2)
    return lb.TrainLoop(
        kwargs.pop("step", lambda s, b: {"loss": 1.0}),
        range(10),
        out_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


@pytest.fixture
def bridges() -> Iterator[tuple[lb.Bridge, lb.Bridge]]:
    with lb.Bridge(name="one") as one, lb.Bridge(name="two") as two:
        yield one, two


class TestMisspelledHooks:
    """A public `on_*` method that is not a hook is refused, naming the closest hook."""

    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [
            ("on_step_ended", "on_step_end"),
            ("on_checkpoints", "on_checkpoint"),
            ("on_train_begin", "on_train_"),
            ("on_evaluate", "on_eval"),
            ("on_run_started", "on_run_start"),
            ("on_experiment_finish", "on_experiment_"),
            ("on_epoch_end", "did you mean on_"),
        ],
    )
    def test_refused_with_suggestion(self, name: str, suggestion: str) -> None:
        """The error names class and method, suggests the closest hook, and says how to keep it."""

        def method(self: Callback, *args: object) -> None:
            pass

        cls = type("Typo", (Callback,), {name: method})
        with pytest.raises(CallbackValidationError) as info:
            CallbackList([cls()])
        message = str(info.value)
        assert f"Typo.{name} is not a loopbridge hook" in message
        assert suggestion in message
        assert "@loopbridge.not_a_hook" in message
        assert info.value.hook == name

    def test_no_close_match_lists_the_hooks(self) -> None:
        """A name like no hook still lists every hook."""

        class Odd(Callback):
            def on_zzz(self) -> None:
                pass

        with pytest.raises(CallbackValidationError, match="The hooks are on_experiment_start, "):
            CallbackList([Odd()])

    def test_in_a_base_class_static_and_class_methods(self) -> None:
        """Inherited, static and class methods are checked too."""

        class Mixin(Callback):
            def on_stepend(self) -> None:
                pass

        class Child(Mixin):
            pass

        class Static(Callback):
            @staticmethod
            def on_checkpiont() -> None:
                pass

        class Klass(Callback):
            @classmethod
            def on_train_ending(cls) -> None:
                pass

        for callback, hint in [
            (Child(), "Mixin.on_stepend"),
            (Static(), "did you mean on_checkpoint"),
            (Klass(), "did you mean on_train_end"),
        ]:
            with pytest.raises(CallbackValidationError, match=hint):
                CallbackList([callback])

    def test_marked_private_and_data_attributes_accepted(self) -> None:
        """@not_a_hook methods, `_on_*` helpers and non-callable `on_*` settings are fine."""

        class Fine(Callback):
            on_error = "raise"

            @lb.not_a_hook
            def on_upload_done(self) -> None:
                pass

            def _on_step(self) -> None:
                pass

            def on_step_end(
                self,
                state: LoopState,
                step_idx: int,
                batch: lb.TrainingBatch,
                metrics: dict[str, float],
            ) -> None:
                pass

        assert len(CallbackList([Fine()])) == 1

    def test_foreign_mixins_are_not_checked(self) -> None:
        """Another library's callback base, mixed in, keeps its own on_* names."""

        class ForeignCallback:
            def on_fit_start(self) -> None:
                pass

        class Both(ForeignCallback, Callback):
            pass

        assert len(CallbackList([Both()])) == 1

    def test_refused_before_the_first_step(self, tmp_path: Path) -> None:
        """TrainLoop refuses it at construction: the step function never runs."""

        class Typo(Callback):
            def on_step_ended(self, *args: object) -> None:
                pass

        steps: list[int] = []
        with pytest.raises(CallbackValidationError, match="on_step_ended"):
            _loop(tmp_path, [Typo()], step=lambda s, b: steps.append(1))
        assert steps == []


class TestOneInstanceOneList:
    """One instance is registered once per list, and in one live list at a time."""

    def test_twice_in_one_list(self) -> None:
        """Twice in the constructor, or added again later: refused, nothing registered."""
        a, b = Counter(), Counter()
        with pytest.raises(CallbackValidationError, match="registered twice in one"):
            CallbackList([a, b, a])
        callbacks = CallbackList([a])
        with pytest.raises(CallbackValidationError, match=r"position 0 already holds it"):
            callbacks.add(b, a)
        assert callbacks.callbacks == (a,)

    def test_experiment_and_loop_share_an_instance(self, tmp_path: Path) -> None:
        """One instance in both the experiment's and the loop's callbacks: refused, no step."""
        shared = Counter()
        steps: list[int] = []

        def build(ctx: lb.LogContext) -> lb.TrainLoop:
            return _loop(tmp_path / str(ctx.run_name), [shared], step=lambda s, b: steps.append(1))

        result = lb.Experiment("e", {"a": {}}, build, callbacks=[shared]).run()
        (run,) = result.runs
        assert isinstance(run.error, CallbackValidationError)
        assert "registered twice" in str(run.error)
        assert steps == []

    def test_live_on_another_bridge(self, bridges: tuple[lb.Bridge, lb.Bridge]) -> None:
        """A list on another open bridge holding the instance makes registration fail."""
        one, two = bridges
        cb = Counter()
        first = CallbackList([cb], bridge=one)
        with pytest.raises(CallbackValidationError) as info:
            CallbackList([cb], bridge=two)
        message = str(info.value)
        assert "already registered with a live CallbackList" in message
        assert "<Bridge 'one' running>" in message
        assert "Create one Counter(...) per loop" in message
        idle = CallbackList([cb])  # no bridge, not live: checked once it gets one
        with pytest.raises(CallbackValidationError, match="live CallbackList"):
            idle.bridge = two
        late = CallbackList([])
        late.bridge = two
        with pytest.raises(CallbackValidationError, match="live CallbackList"):
            late.add(cb)
        assert CallbackList([cb], bridge=one).callbacks == (cb,)  # the same bridge may share
        first.release()

    def test_released_or_closed_lists_let_go(self, bridges: tuple[lb.Bridge, lb.Bridge]) -> None:
        """Once a list is released, or its bridge closed, the instance can join another."""
        one, two = bridges
        cb = Counter()
        first = CallbackList([cb], bridge=one)
        first.release()
        second = CallbackList([cb], bridge=two)
        one_more = lb.Bridge(name="three")
        one_more.start()
        with pytest.raises(CallbackValidationError):
            CallbackList([cb], bridge=one_more)
        two.close()
        third = CallbackList([cb], bridge=one_more)
        assert third.callbacks == (cb,)
        assert second.callbacks == (cb,)
        one_more.close()

    def test_two_live_loops_refused_before_training(self, tmp_path: Path) -> None:
        """While a loop runs, a second loop with the same instance is refused at its run(),
        built before or during the first one's run, before its first step."""
        cb = Counter()
        started, release = threading.Event(), threading.Event()

        def blocking_step(state: LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
            started.set()
            release.wait(WAIT)
            return {}

        built_before = _loop(tmp_path / "before", [cb], step=lambda s, b: steps.append(1))
        steps: list[int] = []
        first = _loop(tmp_path / "first", [cb], step=blocking_step, max_steps=1)
        errors: list[BaseException] = []
        runner = threading.Thread(target=lambda: _run_into(first, errors))
        runner.start()
        try:
            assert started.wait(WAIT)
            during = _loop(tmp_path / "during", [cb], step=lambda s, b: steps.append(1))
            with pytest.raises(CallbackValidationError, match="live CallbackList"):
                during.run()
            with pytest.raises(CallbackValidationError, match="live CallbackList"):
                built_before.run()
            assert steps == []
        finally:
            release.set()
            runner.join(WAIT)
        assert errors == []
        assert cb.starts == 1

    def test_sequential_loops_and_experiments_reuse_instances(self, tmp_path: Path) -> None:
        """Runs one after another may share an instance: loops, repeats, and experiments."""
        cb = Counter()
        _loop(tmp_path / "l1", [cb]).run()
        _loop(tmp_path / "l2", [cb]).run()
        attempt = iter(range(2))
        root = tmp_path / "e"
        experiment = lb.Experiment(
            "e",
            {"a": {}, "b": {}},
            # Each run of the experiment in out dirs of its own (a used out dir is refused).
            lambda ctx: _loop(root / str(ctx.run_name), []),
            n_repeats=2,
            callbacks=[cb],
        )
        root = tmp_path / "e" / str(next(attempt))
        assert experiment.run().ok
        root = tmp_path / "e" / str(next(attempt))
        assert experiment.run().ok  # the same experiment again
        other = lb.Experiment(
            "f", {"a": {}}, lambda ctx: _loop(tmp_path / "f" / str(ctx.run_name), [cb])
        )
        assert other.run().ok
        assert cb.starts == 2 + 4 + 4 + 1


def _run_into(loop: lb.TrainLoop, errors: list[BaseException]) -> None:
    try:
        loop.run()
    except BaseException as exc:
        errors.append(exc)
