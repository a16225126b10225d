"""Benchmarks with targets print PASS/FAIL and fail their process on a FAIL."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from loopbridge import bench
from loopbridge.bench import spawn
from loopbridge.bench._timing import Target


class _Result:
    """Stands in for a benchmark's result: its table and targets (pure logic under test)."""

    def __init__(self, targets: list[Target]) -> None:
        self._targets = targets

    def table(self) -> str:
        return "\n".join(t.line() for t in self._targets)

    def to_json(self) -> dict[str, Any]:
        return {"targets": [t.to_json() for t in self._targets]}


@pytest.mark.parametrize("json", [False, True])
def test_loopbridge_bench_exit_code_follows_the_targets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json: bool
) -> None:
    """All targets met: 0 and PASS; one missed: 1 and FAIL, also with --json."""
    args = ["--only", "spawn", *(["--json"] if json else [])]
    good = Target("fast", 1.0, 2.0)
    bad = Target("slow", 3.0, 2.0)
    monkeypatch.setattr(spawn, "run", lambda **_: _Result([good]))
    assert bench.main(args) == 0
    if not json:
        assert "PASS: 1/1 targets met" in capsys.readouterr().out
    monkeypatch.setattr(spawn, "run", lambda **_: _Result([good, bad]))
    assert bench.main(args) == 1
    if not json:
        out = capsys.readouterr().out
        assert "FAIL  slow: 3.00x (<= 2x)" in out
        assert "FAIL: 1/2 targets met" in out


def _steady(no_handover: float, ours: float, theirs: float) -> spawn.SpawnResult:
    """A steady result whose per-step wall times give the added costs wanted."""
    return spawn.SpawnResult(
        steady={
            "no hand-over": [no_handover] * 3,
            "loopbridge spawn": [no_handover + ours] * 3,
            "run_coroutine_threadsafe": [no_handover + theirs] * 3,
        }
    )


def test_a_baseline_below_the_noise_is_not_a_negative_bound() -> None:
    """A baseline whose added cost measured <= 0 fails as 'not measured', never '<= -9 µs'."""
    (target,) = _steady(100e-6, 5e-6, -9.03e-6).targets()
    line = target.line()
    assert line.startswith("FAIL")
    assert "not measured" in line
    assert "-9.03 µs added, within the noise" in line
    assert "<= -" not in line
    assert math.isnan(target.value)
    (measured,) = _steady(100e-6, 5e-6, 20e-6).targets()
    assert measured.line() == (
        "PASS  steady: µs per step spawn adds, against run_coroutine_threadsafe's: "
        "5.00 µs (<= 20.00 µs)"
    )


def test_every_spawn_table_column_has_a_label() -> None:
    """The burst table's header names every column, the notes column included."""
    extra = {"backpressure_s": 0.0, "spawn_us": 1.0}
    result = spawn.SpawnResult(
        burst={
            spawn.BIG: [spawn.BurstSample(0.1, 0.2, extra)],
            spawn.RCTS: [spawn.BurstSample(1.0, 2.0)],
            spawn.FLOOR: [spawn.BurstSample(0.5, 0.5)],
        },
        burst_n={spawn.BIG: 1000, spawn.RCTS: 1000, spawn.FLOOR: 1000},
    )
    lines = result.table().splitlines()
    header, rule = lines[1], lines[2]
    assert header.split()[-1] == "note"
    # Each column (a run of dashes in the rule line) has a label above it.
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    assert len(spans) == 8
    assert all(header[a:b].strip() for a, b in spans), (header, rule)
