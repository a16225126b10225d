"""ConsoleProgress in a real Jupyter kernel: one live widget, not hundreds of printed lines.

The notebook is built with nbformat and executed by nbclient under ipykernel, in a kernel
spec of the test's own that runs the interpreter running the tests (a "python3" spec found
elsewhere on the machine could run another Python), with widget state stored, as Jupyter
would save it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

CELL = """
import loopbridge as lb
from loopbridge.callbacks import ConsoleProgress

class Clock:
    now = 0.0
    def __call__(self):
        return self.now

clock = Clock()

def step(state, batch):
    clock.now += 0.1  # each step "takes" 0.1 s: 4 draws a second means one draw every 3 steps
    return {"loss": 1.0 / (state.step + 1)}

progress = ConsoleProgress(refresh_per_second=4, clock=clock)
lb.TrainLoop(step, range(300), max_steps=300, out_dir=OUT, callbacks=[progress]).run()
print("draws", progress.lines_written)
"""


KERNEL = "loopbridge-test"


@pytest.fixture
def kernel_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that starts ipykernel on this interpreter, found through JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "loopbridge test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def run_notebook(tmp_path: Path, kernel: str) -> Any:
    """Execute the one-cell notebook and return it with its outputs."""
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    source = f"OUT = {str(tmp_path / 'run')!r}\n" + CELL
    nb.cells = [nbformat.v4.new_code_cell(source)]  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=90,
        startup_timeout=60,
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb


def test_progress_is_one_updating_widget(tmp_path: Path, kernel_spec: str) -> None:
    """300 steps and ~100 redraws give one widget display and one printed line."""
    nb = run_notebook(tmp_path, kernel_spec)
    outputs = nb.cells[0].outputs
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    widgets = [o for o in outputs if o.output_type == "display_data" and WIDGET_VIEW in o.data]
    assert len(widgets) == 1
    streams = [o for o in outputs if o.output_type == "stream"]
    text = "".join(o.text for o in streams)
    assert text.count("\n") <= 3, text
    draws = int(text.split("draws")[1].split()[0])
    assert draws > 50  # the widget was redrawn many times, in place
    # The saved widget state: the bar reached 300 of 300 and shows the run's last metrics.
    state = nb.metadata.widgets[WIDGET_STATE]["state"]
    bars = [m["state"] for m in state.values() if m["model_name"] == "FloatProgressModel"]
    bars += [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]
    assert [(b["value"], b["max"]) for b in bars] == [(300, 300)]
    html = json.dumps([m["state"].get("value") for m in state.values()])
    assert "done in 30.0" in html.replace("\\u2007", " ")
