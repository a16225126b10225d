"""Spawn keys read as labels in reports, never as internal ids."""

from __future__ import annotations

import re
from pathlib import Path

import loopbridge as lb
from loopbridge.callbacks.http_dashboard import HttpDashboard
from tests.fixtures.http import DashboardServer


def test_task_key_equality_and_repr() -> None:
    """Keys are equal by label and identity; they show only the label."""
    a = lb.TaskKey("Uploader run a", (1, 2))
    assert a == lb.TaskKey("Uploader run a", (1, 2))
    assert a != lb.TaskKey("Uploader run a", (1, 3))
    assert hash(a) == hash(lb.TaskKey("Uploader run a", (1, 2)))
    assert repr(a) == "Uploader run a"


def test_unfinished_dashboard_work_names_the_run_not_an_id(
    tmp_path: Path, dashboard_server: DashboardServer
) -> None:
    """Dashboard work cut off by the drain deadline is reported with a readable key."""
    dashboard_server.delay_s = 2.0
    loop = lb.TrainLoop(
        lambda s, b: {"loss": 1.0},
        range(3),
        out_dir=tmp_path,
        run_name="run-7",
        callbacks=[HttpDashboard(dashboard_server.url)],
        on_drain_failure="warn",
        drain_timeout=0.2,
        interrupt_grace=0.5,
    )
    report = loop.run().drain_report
    assert report is not None
    assert report.pending
    text = report.summary()
    assert "[key=HttpDashboard run run-7]" in text
    assert not re.search(r"\d{9,}", text), text  # no id() of an object
