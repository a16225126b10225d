"""The README's Python examples run as written and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = [
    (m.group(1), m.group(2), m.start(), m.end())
    for m in re.finditer(r"```(\w*)\n(.*?)```", TEXT, re.S)
]
EXAMPLES = [body for lang, body, _, _ in BLOCKS if lang == "python"]

# A number followed by a unit of time: the one thing allowed to differ from run to run.
_TIMING = re.compile(r"\d+(?:\.\d+)?(?= ?(?:s|ms|µs)\b)")


def _shown_output(index: int) -> str | None:
    """The ```text block that the README presents as the output of python block `index`."""
    pythons = [i for i, block in enumerate(BLOCKS) if block[0] == "python"]
    at = pythons[index]
    if at + 1 >= len(BLOCKS):
        return None
    lang, body, start, _ = BLOCKS[at + 1]
    between = TEXT[BLOCKS[at][3] : start]
    if lang != "text" or "output" not in between.lower():
        return None
    return body


def _pattern(shown: str) -> re.Pattern[str]:
    """A regex matching `shown` exactly (trailing newlines aside), except for timings."""
    shown = shown.rstrip("\n")
    parts = []
    last = 0
    for match in _TIMING.finditer(shown):
        parts.append(re.escape(shown[last : match.start()]))
        parts.append(r"\d+(?:\.\d+)?")
        last = match.end()
    parts.append(re.escape(shown[last:]))
    return re.compile("".join(parts) + r"\n*\Z")


class TestReadme:
    """Every ```python block of the README is a complete program; its shown output is true."""

    def test_there_are_examples(self) -> None:
        """The README has Python examples, and shows the output of at least three."""
        assert len(EXAMPLES) >= 3
        assert sum(_shown_output(i) is not None for i in range(len(EXAMPLES))) >= 3

    def test_timings_are_the_only_wildcards(self) -> None:
        """The comparison ignores timings only: counts and names must match."""
        pattern = _pattern("3 completed in 0.602 s\nstep 20: 227.6 µs each\n")
        assert pattern.match("3 completed in 1.5 s\nstep 20: 3 µs each\n")
        assert not pattern.match("4 completed in 0.602 s\nstep 20: 227.6 µs each\n")
        assert not pattern.match("3 completed in 0.602 s\nstep 21: 227.6 µs each\n")

    @pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=lambda i: f"example{i}")
    def test_example_runs_and_prints_what_is_shown(self, index: int, tmp_path: Path) -> None:
        """The example exits 0 in an empty directory; its stdout matches the README's."""
        script = tmp_path / "example.py"
        script.write_text(EXAMPLES[index], encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        shown = _shown_output(index)
        if shown is not None:
            assert _pattern(shown).match(proc.stdout), (
                f"README shows:\n{shown}\nthe example printed:\n{proc.stdout}"
            )
