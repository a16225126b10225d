"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


class TestReadme:
    """Every ```python block of the README is a complete program."""

    def test_there_are_examples(self) -> None:
        """The README has Python examples to check."""
        assert len(EXAMPLES) >= 2

    @pytest.mark.parametrize("source", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
    def test_example_runs(self, source: str, tmp_path: Path) -> None:
        """The example exits 0 in an empty directory."""
        script = tmp_path / "example.py"
        script.write_text(source, encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
