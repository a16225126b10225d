"""The hook profiler: exact counts, time on the right callback and hook, nothing when off."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import MethodType
from typing import Any

import pytest

import loopbridge as lb
from loopbridge import (
    Callback,
    CallbackList,
    HookProfiler,
    LogContext,
    LoopState,
    TrainingBatch,
    _profile,
)
from loopbridge._callback import HOOK_NAMES
from loopbridge._dispatch import _NOOPS

MS = 1_000_000  # nanoseconds


def _state() -> LoopState:
    return LoopState(run_name="r", run_id="id", max_steps=None, out_dir=Path("."))


def _batch() -> TrainingBatch:
    return TrainingBatch(index=0, data=None)


class FakeClock:
    """Stands in for the profiler's clock; hooks move it forward by exact amounts."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_profile, "_perf_ns", fake)
    return fake


class Steps(Callback):
    """Overrides on_step_end and on_train_start; each call advances `clock` by its cost."""

    def __init__(self, clock: FakeClock | None = None, step_ns: int = 0) -> None:
        self.clock = clock
        self.step_ns = step_ns
        self.calls = 0

    def on_train_start(self, state: LoopState) -> None:
        if self.clock is not None:
            self.clock.advance(1)

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        self.calls += 1
        if self.clock is not None:
            self.clock.advance(self.step_ns)


class Evals(Callback):
    """Overrides on_eval only; each call advances `clock` by `eval_ns`."""

    def __init__(self, clock: FakeClock, eval_ns: int) -> None:
        self.clock = clock
        self.eval_ns = eval_ns

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        self.clock.advance(self.eval_ns)


class Fails(Callback):
    """Raises from on_train_start."""

    def on_train_start(self, state: LoopState) -> None:
        raise ValueError("boom")


class Spins(Callback):
    """Spins for 2 ms of real time in on_train_start."""

    def on_train_start(self, state: LoopState) -> None:
        until = time.perf_counter() + 0.002
        while time.perf_counter() < until:
            pass


class Uploads(Callback):
    """Spawns a no-op upload per step."""

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        async def upload() -> None:
            pass

        self.spawn(upload())


class Spy(Callback):
    """Records whether `stream` already had output when on_train_end fired."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream
        self.printed_before_end: bool | None = None

    def on_train_end(self, state: LoopState, artifacts: lb.LoopArtifacts) -> None:
        self.printed_before_end = bool(self.stream.getvalue())


class Runs(Callback):
    """An experiment-level callback with a run hook and a step hook."""

    def on_run_start(self, ctx: LogContext) -> None:
        pass

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        pass


def _rows(profiler: HookProfiler | None) -> dict[tuple[str, str], lb.TimingRow]:
    assert profiler is not None
    return {(row.callback, row.hook): row for row in profiler.rows()}


def _fire_steps(callbacks: CallbackList, n: int) -> None:
    state, batch = _state(), _batch()
    for i in range(n):
        callbacks.on_step_end(state, i, batch, {})


class TestCounts:
    def test_counts_are_exact_per_callback_and_hook(self) -> None:
        """Each (callback, hook) row counts exactly the calls made, and no more rows exist."""
        callbacks = CallbackList([Steps(), Callback(), Steps()], profile=True)
        _fire_steps(callbacks, 1000)
        for _ in range(3):
            callbacks.on_train_start(_state())
        callbacks.on_checkpoint(_state(), None)  # type: ignore[arg-type]  # nobody overrides it
        counts = {key: row.count for key, row in _rows(callbacks.profiler).items()}
        assert counts == {
            ("Steps", "on_step_end"): 1000,
            ("Steps#2", "on_step_end"): 1000,
            ("Steps", "on_train_start"): 3,
            ("Steps#2", "on_train_start"): 3,
        }

    def test_single_overrider_is_counted(self) -> None:
        """With profiling on, a hook only one callback overrides is still timed per call."""
        callback = Steps()
        callbacks = CallbackList([callback], profile=True)
        _fire_steps(callbacks, 7)
        assert callback.calls == 7
        assert _rows(callbacks.profiler)[("Steps", "on_step_end")].count == 7

    def test_a_raising_hook_is_counted_and_named(self) -> None:
        """A call that raises is still recorded, and the error's note names the callback."""

        callbacks = CallbackList([Steps(), Fails()], profile=True)
        for _ in range(2):
            with pytest.raises(ValueError, match="boom") as caught:
                callbacks.on_train_start(_state())
            notes = caught.value.__notes__
            assert notes == ["raised in hook Fails.on_train_start (loopbridge callback)"]
        assert _rows(callbacks.profiler)[("Fails", "on_train_start")].count == 2


class TestAttribution:
    def test_time_lands_on_the_right_callback_and_hook(self, clock: FakeClock) -> None:
        """Each row's total, mean, p99 and max are exactly the time its own hook took."""
        slow, fast, evals = Steps(clock, 7 * MS), Steps(clock, 0), Evals(clock, 3 * MS)
        callbacks = CallbackList([fast, slow, evals], profile=True)
        _fire_steps(callbacks, 10)
        for i in range(4):
            callbacks.on_eval(_state(), i, "val", {})
        rows = _rows(callbacks.profiler)
        summary = {
            key: (row.count, row.total_s, row.mean_us, row.p99_us, row.max_us)
            for key, row in rows.items()
        }
        assert summary == {
            ("Steps#2", "on_step_end"): (10, pytest.approx(0.070), 7000, 7000, 7000),
            ("Steps", "on_step_end"): (10, 0, 0, 0, 0),
            ("Evals", "on_eval"): (4, pytest.approx(0.012), 3000, 3000, 3000),
        }
        assert next(iter(rows)) == ("Steps#2", "on_step_end")  # costliest first

    def test_p99_is_the_nearest_rank(self, clock: FakeClock) -> None:
        """Of 100 calls taking 1..100 ms, the p99 is 99 ms and the max 100 ms."""
        callback = Steps(clock)
        callbacks = CallbackList([callback], profile=True)
        for ms in range(100, 0, -1):
            callback.step_ns = ms * MS
            _fire_steps(callbacks, 1)
        row = _rows(callbacks.profiler)[("Steps", "on_step_end")]
        assert (row.count, row.p99_us, row.max_us, row.mean_us) == (100, 99_000, 100_000, 50_500)

    def test_real_time_of_a_busy_hook_is_at_least_its_work(self) -> None:
        """With the real clock, a hook that spins for 2 ms is charged at least 2 ms per call."""

        callbacks = CallbackList([Steps(), Spins()], profile=True)
        for _ in range(5):
            callbacks.on_train_start(_state())
        rows = _rows(callbacks.profiler)
        assert rows[("Spins", "on_train_start")].total_s >= 0.010
        assert rows[("Spins", "on_train_start")].max_us >= 2000
        assert rows[("Steps", "on_train_start")].count == 5


def _fire_functions(callbacks: CallbackList) -> dict[str, Any]:
    return {hook: callbacks.__dict__[hook] for hook in HOOK_NAMES}


class TestProfilingOff:
    def test_no_overrider_is_the_shared_noop(self) -> None:
        """With profiling off, every hook nobody overrides is the shared no-op itself."""
        callbacks = CallbackList([Callback(), Callback()])
        assert callbacks.profiler is None
        for hook, fire in _fire_functions(callbacks).items():
            assert fire is _NOOPS[hook]

    def test_single_overrider_is_the_bound_method(self) -> None:
        """With profiling off, a hook one callback overrides is its bound method, unwrapped."""
        callback = Steps()
        fire = CallbackList([Callback(), callback]).__dict__["on_step_end"]
        assert isinstance(fire, MethodType)
        assert fire.__self__ is callback
        assert fire.__func__ is Steps.on_step_end

    def test_several_overriders_call_the_bound_methods_directly(self) -> None:
        """With profiling off, the fan-out for several callbacks closes over their own methods."""
        a, b = Steps(), Steps()
        fire = CallbackList([a, b]).__dict__["on_step_end"]
        assert not hasattr(fire, "__wrapped__")
        closed_over = [cell.cell_contents for cell in fire.__closure__ or ()]
        methods = [m for m in closed_over if isinstance(m, MethodType)]
        assert [(m.__self__, m.__func__) for m in methods] == [
            (a, Steps.on_step_end),
            (b, Steps.on_step_end),
        ]

    def test_profiling_on_wraps_the_same_hooks(self) -> None:
        """The contrast: with profiling on, the callee is the profiler's wrapper."""
        callback = Steps()
        fire = CallbackList([callback], profile=True).__dict__["on_step_end"]
        assert not isinstance(fire, MethodType)
        closed_over = [cell.cell_contents for cell in fire.__closure__ or ()]
        wrapped = [getattr(f, "__wrapped__", None) for f in closed_over if callable(f)]
        assert callback.on_step_end in wrapped

    def test_train_loop_without_profile_records_nothing(self, tmp_path: Path) -> None:
        """A TrainLoop without profile has no profiler, and its artifacts carry no timings."""
        loop = lb.TrainLoop(
            lambda state, batch: {"loss": 1.0},
            range(5),
            out_dir=tmp_path,
            callbacks=[Steps()],
        )
        artifacts = loop.run()
        assert loop.profiler is None
        assert loop.callbacks.__dict__["on_step_end"].__func__ is Steps.on_step_end
        assert artifacts.hook_timings == []


class TestTrainLoopAndExperiment:
    def test_table_printed_at_train_end(self, tmp_path: Path) -> None:
        """print_profile=stream writes the table and the bridge line there, at train end."""
        out = io.StringIO()
        spy = Spy(out)
        loop = lb.TrainLoop(
            lambda state, batch: {"loss": 1.0},
            range(12),
            out_dir=tmp_path,
            run_name="printed",
            callbacks=[Steps(), Uploads(), spy],
            print_profile=out,
        )
        artifacts = loop.run()
        text = out.getvalue()
        assert spy.printed_before_end is False
        assert text.startswith("loopbridge hook profile, run printed:\n")
        header = text.splitlines()[1].split()
        assert header[:3] == ["callback", "hook", "calls"]
        table_rows = {tuple(line.split()[:3]) for line in text.splitlines()[2:]}
        assert ("Steps", "on_step_end", "12") in table_rows
        assert ("Uploads", "on_step_end", "12") in table_rows
        assert ("Spy", "on_train_end", "1") in table_rows
        assert "bridge: 12 spawned" in text
        counts = {(r.callback, r.hook): r.count for r in artifacts.hook_timings}
        assert counts[("Uploads", "on_step_end")] == 12
        assert artifacts.bridge_stats is not None
        assert artifacts.bridge_stats.spawned == 12

    def test_profile_without_print_stays_quiet(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """profile=True records timings on the artifacts and prints nothing."""
        loop = lb.TrainLoop(
            lambda state, batch: None, range(3), out_dir=tmp_path, callbacks=[Steps()], profile=True
        )
        artifacts = loop.run()
        assert capsys.readouterr() == ("", "")
        assert sorted((r.callback, r.hook, r.count) for r in artifacts.hook_timings) == [
            ("Steps", "on_step_end", 3),
            ("Steps", "on_train_start", 1),
        ]

    def test_experiment_shares_one_profiler_across_runs(self, tmp_path: Path) -> None:
        """One profiler gathers every run's hooks: the experiment's callback and each loop's own."""

        loops: list[lb.TrainLoop] = []

        def build(ctx: LogContext) -> lb.TrainLoop:
            loop = lb.TrainLoop(
                lambda state, batch: {"loss": 0.0},
                range(4),
                out_dir=tmp_path / (ctx.run_name or "run"),
                callbacks=[Steps()],
            )
            loops.append(loop)
            return loop

        experiment = lb.Experiment(
            "shared", {"a": {}, "b": {}}, build, n_repeats=2, callbacks=[Runs()], profile=True
        )
        result = experiment.run()
        assert result.ok
        assert len(loops) == 4
        assert all(loop.profiler is experiment.profiler for loop in loops)
        counts = {key: row.count for key, row in _rows(experiment.profiler).items()}
        assert counts[("Runs", "on_run_start")] == 4
        assert counts[("Runs", "on_step_end")] == 16
        assert counts[("Steps", "on_step_end")] == 16
        assert counts[("Steps", "on_train_start")] == 4
