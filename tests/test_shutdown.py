"""Runs that end badly: Ctrl-C escalation, a failing hook, deadlines, and long drains that speak.

The Ctrl-C tests run real subprocesses (a TrainLoop or an Experiment uploading checkpoints to
moto through the fault proxy, whose PUTs hang, next to a task that ignores cancellation) and
send SIGINT 1, 2 and 3 times. Each press is sent once the previous one was acknowledged on
stderr, and the time from the last press to the exit is measured against the documented
bound (plus slack for a shared machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

import loopbridge as lb
from loopbridge import Bridge, Callback, DrainError, LoopState, TrainingBatch, TrainLoop
from loopbridge._bridge import CLOSE_MARGIN_S
from loopbridge._shutdown import CANCEL_WAIT_S
from tests.fixtures.s3 import FaultProxy, FaultRule, Hang, S3Bucket

WAIT = 30.0
SLACK_S = 4.0
"""Added to every documented bound: two shared cores, a child interpreter exiting."""
GRACE_S = 2.0

_SCRIPT = """
    import asyncio, sys, threading
    import loopbridge as lb
    from loopbridge.callbacks import CheckpointUploader

    kind, out_dir, endpoint, bucket = sys.argv[1:5]

    class Stubborn(lb.Callback):
        def on_train_start(self, state):
            async def flush_forever():  # ignores every cancellation
                while True:
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        pass

            self.spawn(flush_forever(), name="stubborn-flush")

    def save(state, path):
        path.write_bytes(b"weights" * 100)

    def step(state, batch):
        if state.step == 2:
            print("ready", flush=True)
            threading.Event().wait(120)
        return {"loss": 1.0}

    def callbacks():
        # Every PUT hangs, the pre-flight probe's too: these runs must reach their steps.
        # The uploads run in the default upload worker process.
        uploader = CheckpointUploader(
            f"s3://{bucket}/run", endpoint_url=endpoint, max_attempts=1, call_timeout=600,
            preflight=False,
        )
        return [uploader, Stubborn()]

    def build(ctx=None):
        return lb.TrainLoop(
            step, range(10), out_dir=out_dir, save=save, checkpoint_every=1,
            callbacks=callbacks(), interrupt_grace=GRACE,
        )

    if kind == "loop":
        build().run()
    else:
        lb.Experiment("exp", {"a": {}}, build, interrupt_grace=GRACE).run()
    print("not reached", flush=True)
"""


@dataclass
class Exit:
    """How a child run ended after its Ctrl-Cs."""

    returncode: int
    since_last_press: float
    since_first_press: float
    stderr: str
    stdout: str


def _interrupt(
    kind: str, presses: int, tmp_path: Path, proxy: FaultProxy, bucket: S3Bucket
) -> Exit:
    proxy.add(FaultRule((Hang(),), method="PUT"))
    put_arrived = proxy.arrived("PUT")
    script = textwrap.dedent(_SCRIPT).replace("GRACE", repr(GRACE_S))
    argv = [sys.executable, "-c", script, kind, str(tmp_path / "run"), proxy.url, bucket.name]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    err: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", "".join(err)
        assert put_arrived.wait(WAIT), "the checkpoint upload never reached the proxy"
        acks = ["waiting up to", "Ctrl-C again"]
        first = last = time.monotonic()
        proc.send_signal(signal.SIGINT)
        for ack in acks[: presses - 1]:
            _wait_for_line(lines, ack)
            last = time.monotonic()
            proc.send_signal(signal.SIGINT)
        # Not communicate(): it would read stderr too, racing the reader thread.
        proc.wait(timeout=60)
        ended = time.monotonic()
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(WAIT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return Exit(proc.returncode, ended - last, ended - first, "".join(err), out)


def _wait_for_line(lines: queue.Queue[str | None], text: str) -> None:
    while True:
        line = lines.get(timeout=WAIT)
        if line is None:
            pytest.fail(f"the child exited before logging {text!r}")
        if text in line:
            return


@pytest.fixture
def sigint(tmp_path: Path, fault_proxy: FaultProxy, s3_bucket: S3Bucket) -> Any:
    def run(kind: str, presses: int) -> Exit:
        return _interrupt(kind, presses, tmp_path, fault_proxy, s3_bucket)

    return run


# The documented bounds, from the last Ctrl-C to the exit (README "Errors", _shutdown.py).
BOUND_S = {
    1: GRACE_S + CANCEL_WAIT_S + CLOSE_MARGIN_S,
    2: CANCEL_WAIT_S + CLOSE_MARGIN_S,
    3: 0.0,
}


class TestCtrlC:
    """Every further Ctrl-C makes the exit faster; what is given up is named on stderr."""

    @pytest.mark.parametrize("kind", ["loop", "experiment"])
    @pytest.mark.parametrize("presses", [1, 2, 3])
    def test_presses(self, sigint: Any, kind: str, presses: int) -> None:
        """1: grace, cancel, close; 2: cancel now; 3: abandon; each within its bound."""
        ended: Exit = sigint(kind, presses)
        print(
            f"{kind}, {presses} Ctrl-C: exit {ended.since_last_press:.2f} s after the last "
            f"press ({ended.since_first_press:.2f} s after the first); "
            f"bound {BOUND_S[presses]:.1f} s"
        )
        assert ended.returncode == -signal.SIGINT, ended.stderr
        assert "not reached" not in ended.stdout
        assert ended.since_last_press < BOUND_S[presses] + SLACK_S, ended.stderr
        err = ended.stderr
        assert "KeyboardInterrupt" in err
        # Each level announced itself, naming what it waits for or gives up.
        assert "was interrupted (Ctrl-C): waiting up to 2.0 s for" in err
        assert ("Ctrl-C again:" in err) == (presses >= 2)
        assert ("Ctrl-C a third time:" in err) == (presses >= 3)
        # What did not complete is named in the log and in the exception's note.
        assert "interrupted at step 2; background work:" in err
        note = next(line for line in err.splitlines() if line.startswith("loopbridge: "))
        assert "stubborn-flush" in note
        assert "upload step 1 to s3://" in note, note


class Probe(Callback):
    """Spawns, per step, the tasks a test asks for; raises from a hook when told to."""

    def __init__(self, *, spawn: Any = None, raise_at: int | None = None) -> None:
        self.spawn_fn = spawn
        self.raise_at = raise_at

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        if self.spawn_fn is not None:
            self.spawn_fn(self, state.step)
        if self.raise_at == state.step:
            raise ValueError("hook exploded")


async def _hang() -> None:
    await asyncio.Event().wait()


async def _stubborn() -> None:
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


class TestFailingRun:
    """A run whose hook raises while its uploads hang stops within interrupt_grace, not 300 s."""

    @pytest.mark.parametrize("work", [_hang, _stubborn])
    def test_hook_raises_while_upload_hangs(
        self, tmp_path: Path, work: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The error reaches the caller within the grace bound, naming the abandoned work."""

        def spawn(cb: Callback, step: int) -> None:
            cb.spawn(work(), name=f"upload-{step}", key="uploads")

        loop = TrainLoop(
            lambda s, b: {},
            range(5),
            out_dir=tmp_path,
            callbacks=[Probe(spawn=spawn, raise_at=2)],
            drain_timeout=300,
            interrupt_grace=0.5,
        )
        started = time.monotonic()
        with pytest.raises(ValueError, match="hook exploded") as info:
            loop.run()
        elapsed = time.monotonic() - started
        print(f"failing run with {work.__name__} work raised after {elapsed:.2f} s")
        assert elapsed < 0.5 + CANCEL_WAIT_S + CLOSE_MARGIN_S + SLACK_S
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "run " in notes
        assert "failed (ValueError)" in notes
        assert "upload-1 [key='uploads']" in notes
        messages = [r.getMessage() for r in caplog.records]
        assert any("waiting up to 0.5 s for 2 background task(s)" in m for m in messages)
        assert any("failed; background work:" in m and "upload-1" in m for m in messages)
        assert loop.bridge is not None
        assert loop.bridge.closed

    def test_failing_run_in_experiment(self, tmp_path: Path) -> None:
        """In an Experiment the failed run's hung work is cut off after the grace too."""

        def spawn(cb: Callback, step: int) -> None:
            cb.spawn(_hang(), name=f"upload-{step}", key="uploads")

        def build(ctx: lb.LogContext) -> TrainLoop:
            return TrainLoop(
                lambda s, b: {},
                range(5),
                out_dir=tmp_path / str(ctx.run_name),
                callbacks=[Probe(spawn=spawn, raise_at=2)],
            )

        experiment = lb.Experiment("e", {"a": {}}, build, drain_timeout=300, interrupt_grace=0.5)
        started = time.monotonic()
        result = experiment.run()
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + CANCEL_WAIT_S + CLOSE_MARGIN_S + SLACK_S
        (run,) = result.runs
        assert isinstance(run.error, ValueError)
        assert run.drain_report is not None
        assert [r.name for r in run.drain_report.pending] == ["upload-1", "upload-2"]
        assert any("cut off" in n for n in getattr(run.error, "__notes__", []))


class TestDeadlines:
    """drain + cancel + close hold one deadline together; no task is reported twice."""

    @pytest.mark.parametrize("policy", ["raise", "warn"])
    def test_work_ignoring_cancellation(self, tmp_path: Path, policy: str) -> None:
        """run() ends within drain_timeout + interrupt_grace + CLOSE_MARGIN_S, each task once."""

        def spawn(cb: Callback, step: int) -> None:
            cb.spawn(_stubborn(), name=f"stubborn-{step}")
            cb.spawn(_hang(), name=f"hang-{step}")

        drain_timeout, grace = 0.5, 0.5
        loop = TrainLoop(
            lambda s, b: {},
            range(2),
            out_dir=tmp_path,
            callbacks=[Probe(spawn=spawn)],
            drain_timeout=drain_timeout,
            interrupt_grace=grace,
            on_drain_failure=policy,  # type: ignore[arg-type]
        )
        started = time.monotonic()
        if policy == "raise":
            with pytest.raises(DrainError) as info:
                loop.run()
            report = info.value.report
        else:
            artifacts = loop.run()
            assert artifacts.drain_report is not None
            report = artifacts.drain_report
        elapsed = time.monotonic() - started
        bound = drain_timeout + grace + CLOSE_MARGIN_S
        print(f"run() with work ignoring cancellation: {elapsed:.2f} s, bound {bound:.1f} s")
        assert elapsed < bound + SLACK_S
        names = [r.name for r in report.failed + report.cancelled + report.pending]
        assert sorted(names) == ["hang-1", "hang-2", "stubborn-1", "stubborn-2"]


@dataclass(frozen=True)
class Kind:
    """One kind of background task in the mixes below."""

    name: str


FINISH, FAIL, IGNORE, HANG, PARENT = (
    Kind("finish"),
    Kind("fail"),
    Kind("ignore"),
    Kind("hang"),
    Kind("parent"),
)


def _work(kind: Kind, bridge: Bridge, name: str, spawned: list[str]) -> Any:
    async def run() -> None:
        if kind is FINISH:
            await asyncio.sleep(0)
        elif kind is FAIL:
            raise RuntimeError(f"{name} broke")
        elif kind is IGNORE:
            await _stubborn()
        elif kind is HANG:
            await _hang()
        else:  # a parent: spawns a finishing, a failing and a hanging child
            for i, child in enumerate((FINISH, FAIL, HANG)):
                child_name = f"{name}.c{i}"
                bridge.spawn(_work(child, bridge, child_name, spawned), name=child_name)
                spawned.append(child_name)
            await asyncio.sleep(0)

    return run()


class TestEveryTaskOnce:
    """Property-style: over mixes of tasks and sequences of drains, each task is named once."""

    MIXES: ClassVar[list[list[Kind]]] = [
        [FINISH, FAIL, IGNORE, HANG, PARENT],
        [IGNORE, IGNORE, FINISH],
        [PARENT, PARENT, HANG],
        [FAIL, FAIL, FINISH, FINISH],
        [HANG, IGNORE, PARENT, FAIL, FINISH, HANG, IGNORE],
    ]

    @pytest.mark.parametrize("mix", range(len(MIXES)))
    @pytest.mark.parametrize("keyed", [False, True])
    @pytest.mark.parametrize(
        "sequence",
        [
            ("drain_cancel", "close"),
            ("drain_cancel", "drain_cancel", "close"),
            ("drain", "drain_cancel", "close"),
            ("close",),
            ("cancel_all", "close"),
            ("drain_cancel", "abandon"),
            ("abandon",),
        ],
    )
    def test_mix(self, mix: int, keyed: bool, sequence: tuple[str, ...]) -> None:
        """Completed + failed + cancelled + pending over all reports = every task, once."""
        bridge = Bridge(name="mix")
        spawned: list[str] = []
        for i, kind in enumerate(self.MIXES[mix]):
            name = f"t{i}-{kind.name}"
            key = f"k{i % 2}" if keyed else None
            bridge.spawn(_work(kind, bridge, name, spawned), name=name, key=key)
            spawned.append(name)
        total = lb.DrainReport()
        for action in sequence:
            if action == "drain":
                # Reports running work as pending without giving up on it: not merged.
                snapshot = bridge.drain(0.1)
                assert snapshot.completed == 0 or not snapshot.pending or snapshot.timed_out
                total = total.merge(
                    lb.DrainReport(
                        completed=snapshot.completed,
                        failed=snapshot.failed,
                        cancelled=snapshot.cancelled,
                    )
                )
                continue
            if action == "drain_cancel":
                report = bridge.drain(0.3, cancel_pending=True, cancel_grace=0.2)
            elif action == "cancel_all":
                report = bridge.cancel_all(0.2)
            elif action == "close":
                report = bridge.close(0.3, cancel_grace=0.2)
            else:
                report = bridge.abandon()
            total = total.merge(report)
        named = [r.name for r in total.failed + total.cancelled + total.pending]
        assert len(named) == len(set(named)), f"named twice: {total.summary()}"
        assert total.completed + len(named) == len(spawned), (total.summary(), spawned)
        assert set(named) <= set(spawned)
        # Failures are the failing tasks, or a parent whose spawn met the closed bridge.
        assert all(
            "fail" in r.name
            or r.name.endswith(".c1")
            or ("parent" in r.name and isinstance(r.exception, lb.BridgeClosedError))
            for r in total.failed
        ), total.summary()
        assert bridge.closed


class TestDrainProgress:
    """A long drain logs what it waits for and for how long, every progress_every seconds."""

    def test_logs_while_waiting(self, caplog: pytest.LogCaptureFixture) -> None:
        """Two progress lines name the task and the time so far; then the task is let go."""
        bridge = Bridge(name="slow", progress_every=0.05)
        release = asyncio.Event()
        seen = threading.Event()

        class Release(logging.Handler):
            count = 0

            def emit(self, record: logging.LogRecord) -> None:
                if "still waiting" in record.getMessage():
                    self.count += 1
                    if self.count == 2:
                        bridge.loop.call_soon_threadsafe(release.set)
                        seen.set()

        async def upload() -> None:
            await release.wait()

        handler = Release()
        logging.getLogger("loopbridge.bridge").addHandler(handler)
        try:
            with caplog.at_level(logging.WARNING, logger="loopbridge.bridge"):
                bridge.spawn(upload(), name="upload-step-7", key="run")
                report = bridge.drain(WAIT)
        finally:
            logging.getLogger("loopbridge.bridge").removeHandler(handler)
            bridge.close(1)
        assert seen.is_set()
        assert report.ok
        assert report.completed == 1
        lines = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
        assert len(lines) >= 2
        assert "upload-step-7 [key='run']" in lines[0]
        assert re.search(r"drain still waiting after \d+\.\d s \(gives up in", lines[0])
        assert "1 task(s), 1 running" in lines[0]

    def test_off(self, caplog: pytest.LogCaptureFixture) -> None:
        """progress_every=0 keeps the drain quiet."""
        bridge = Bridge(name="quiet", progress_every=0)
        bridge.spawn(_hang(), name="stuck")
        with caplog.at_level(logging.WARNING, logger="loopbridge.bridge"):
            bridge.drain(0.2)
        bridge.close(0, cancel_grace=0.5)
        assert not [r for r in caplog.records if "still waiting" in r.getMessage()]
