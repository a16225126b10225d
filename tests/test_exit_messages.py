"""Work abandoned at close is reported once by loopbridge, not again by asyncio at exit."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, gc, threading, loopbridge as lb

bridge = lb.Bridge(name="exit-test")

async def stubborn():
    while True:
        try:
            await asyncio.sleep(1000)
        except asyncio.CancelledError:
            pass

future = bridge.spawn(stubborn)
report = bridge.close(0.1, cancel_grace=0.2)
print("pending:", [r.name for r in report.pending], flush=True)
for thread in threading.enumerate():
    if thread.name == "exit-test-loop":
        thread.join(30)
        assert not thread.is_alive()
del future, report
gc.collect()
"""


def test_no_task_destroyed_message_after_abandoned_work() -> None:
    """A task that ignored its cancellation is named in the report, and asyncio stays quiet."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pending: ['stubborn#1']" in done.stdout
    assert "was abandoned" in done.stderr
    assert "Task was destroyed but it is pending" not in done.stderr
