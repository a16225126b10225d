"""ConsoleProgress: throttled redraws on a terminal, plain lines elsewhere, background status."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import pytest

from loopbridge import Callback, LoopArtifacts, LoopState, TrainingBatch, TrainLoop
from loopbridge.callbacks import ConsoleProgress
from loopbridge.callbacks.progress import format_metrics


class FakeClock:
    """A clock the step function moves forward by a fixed tick."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_loop(
    tmp_path: Path, progress: ConsoleProgress, clock: FakeClock, steps: int = 40, **kw: Any
) -> TrainLoop:
    """Run a loop whose every step advances the fake clock by its tick."""

    def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
        clock.now += clock.tick
        return {"loss": 1.0 / (state.step + 1), "acc": 0.123456789, "lr": 0.001}

    callbacks = [*kw.pop("callbacks", []), progress]
    loop = TrainLoop(
        step,
        range(1000),
        max_steps=steps,
        out_dir=tmp_path / "run",
        callbacks=callbacks,
        **kw,
    )
    loop.run()
    return loop


class TestTerminal:
    """On a terminal the line is redrawn in place, at most refresh_per_second times a second."""

    def test_redraws_in_place_and_throttled(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """40 steps of 0.1 s at 4 redraws/s give about 16 redraws, each starting with a CR."""
        monkeypatch.setenv("COLUMNS", "400")
        stream, clock = TtyStream(), FakeClock(0.1)
        progress = ConsoleProgress(stream, refresh_per_second=4, clock=clock)
        run_loop(tmp_path, progress, clock)
        out = stream.getvalue()
        redraws = out.count("\r")
        assert 12 <= redraws <= 17
        assert redraws == progress.lines_written
        assert out.endswith("\n")
        assert out.count("\n") == 1
        assert "[####################] 40/40" in out
        assert "done in 4.0 s (max_steps)" in out

    def test_detects_a_terminal_from_the_stream(self, tmp_path: Path) -> None:
        """A stream whose isatty() is True gets in-place redraws without being told."""
        stream, clock = TtyStream(), FakeClock(1.0)
        run_loop(tmp_path, ConsoleProgress(stream, clock=clock), clock, steps=3)
        assert stream.getvalue().startswith("\r")

    def test_shorter_line_blanks_the_rest_of_the_longer_one(self, tmp_path: Path) -> None:
        """A redraw pads with spaces over what a longer previous line left behind."""
        stream, clock = TtyStream(), FakeClock(1.0)
        calls = iter(["x" * 30, ""] + [""] * 10)
        progress = ConsoleProgress(stream, clock=clock, status=lambda: next(calls))
        run_loop(tmp_path, progress, clock, steps=2)
        first, second = stream.getvalue().split("\r")[1:3]
        assert len(second) >= len(first)

    def test_line_fits_the_terminal(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a narrow terminal each redraw is cut to its width, so it never wraps."""
        monkeypatch.setenv("COLUMNS", "50")
        stream, clock = TtyStream(), FakeClock(1.0)
        run_loop(tmp_path, ConsoleProgress(stream, clock=clock), clock, steps=3)
        assert all(len(part.rstrip("\n")) <= 49 for part in stream.getvalue().split("\r"))


class TestPlain:
    """When the stream is not a terminal, whole lines are written every interval_s seconds."""

    def test_plain_lines_every_interval(self, tmp_path: Path) -> None:
        """40 steps of 1 s with a 10 s interval give 4 lines and the final line."""
        stream, clock = io.StringIO(), FakeClock(1.0)
        progress = ConsoleProgress(stream, interval_s=10, clock=clock)
        run_loop(tmp_path, progress, clock)
        lines = stream.getvalue().splitlines()
        assert "\r" not in stream.getvalue()
        assert len(lines) == 5
        assert lines[0].startswith("run | [#####...............] 10/40 | 1 steps/s")
        assert lines[-1].endswith("(max_steps)")

    def test_unknown_length_shows_the_step(self, tmp_path: Path) -> None:
        """Without max_steps there is no bar, only the step count."""
        stream, clock = io.StringIO(), FakeClock(1.0)

        def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
            clock.now += clock.tick
            return {"loss": 0.5}

        progress = ConsoleProgress(stream, interval_s=5, clock=clock)
        TrainLoop(step, range(7), out_dir=tmp_path / "r", callbacks=[progress]).run()
        assert stream.getvalue().splitlines()[0].startswith("r | step 5 |")


class TestContent:
    """The line carries chosen metrics, evals, checkpoints, background work and a status."""

    def test_selected_metrics_and_evals(self, tmp_path: Path) -> None:
        """Only the chosen metrics show, compactly, then the latest eval metrics by name."""
        stream, clock = io.StringIO(), FakeClock(1.0)
        progress = ConsoleProgress(stream, metrics=["acc", "missing"], interval_s=1, clock=clock)
        run_loop(
            tmp_path,
            progress,
            clock,
            steps=4,
            evaluators={"val": lambda state: {"loss": 0.25}},
            eval_every=2,
            save=lambda state, path: path.write_bytes(b"x"),
            checkpoint_every=2,
        )
        last = stream.getvalue().splitlines()[-1]
        assert "acc=0.1235" in last
        assert "loss=" not in last.split("val/")[0]
        assert "val/loss=0.25" in last
        assert "ckpt 2" in last

    def test_all_metrics_up_to_the_limit(self) -> None:
        """Without a selection the first max_metrics metrics are shown."""
        text = format_metrics({"a": 1.0, "b": 2.5, "c": 3.0}, None, 2)
        assert text == "a=1 b=2.5"

    def test_background_work_in_flight(self, tmp_path: Path) -> None:
        """Spawned tasks still running show as in flight; done ones as done."""
        release = threading.Event()

        class Spawner(Callback):
            def on_step_end(
                self,
                state: LoopState,
                step_idx: int,
                batch: TrainingBatch,
                metrics: dict[str, float],
            ) -> None:
                if state.step <= 2:
                    self.spawn(asyncio.to_thread(release.wait, 10), name=f"wait {state.step}")

        class Releaser(Callback):
            def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
                release.set()

        stream, clock = io.StringIO(), FakeClock(1.0)
        progress = ConsoleProgress(stream, interval_s=3, clock=clock)
        loop = run_loop(tmp_path, progress, clock, steps=4, callbacks=[Spawner(), Releaser()])
        first = stream.getvalue().splitlines()[0]
        assert "bg 2 in flight, 0 done" in first
        assert loop.artifacts is not None
        assert loop.artifacts.drain_report is not None
        assert loop.artifacts.drain_report.completed == 2

    def test_status_is_formatted_only_when_drawing(self, tmp_path: Path) -> None:
        """The status function runs once per line drawn, not once per step."""
        calls: list[int] = []

        def status() -> str:
            calls.append(1)
            return "uploaded 3"

        stream, clock = io.StringIO(), FakeClock(1.0)
        progress = ConsoleProgress(stream, interval_s=10, clock=clock, status=status)
        run_loop(tmp_path, progress, clock, steps=40)
        assert len(calls) == progress.lines_written == 5
        assert stream.getvalue().splitlines()[-1].count("uploaded 3") == 1


class TestArguments:
    """Bad arguments are refused with the values named."""

    @pytest.mark.parametrize(
        "kwargs", [{"refresh_per_second": 0}, {"interval_s": -1}, {"width": -1}]
    )
    def test_refused(self, kwargs: dict[str, Any]) -> None:
        """Non-positive rates and negative widths raise ValueError naming the argument."""
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ConsoleProgress(**kwargs)
