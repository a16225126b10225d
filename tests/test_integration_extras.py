"""The framework integrations, imported without their framework, name the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

_BLOCK = """
import sys
sys.modules[{framework!r}] = None  # as if it were not installed
try:
    import loopbridge.integrations.{module}
except Exception as exc:
    print(type(exc).__name__, exc, sep=": ")
else:
    print("imported")
"""


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("lightning", "lightning", "loopbridge[lightning]"),
        ("transformers", "transformers", "loopbridge[transformers]"),
    ],
)
def test_a_missing_framework_names_the_extra(module: str, framework: str, extra: str) -> None:
    code = _BLOCK.format(framework=framework, module=module)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.startswith("MissingExtraError: "), out
    assert f"pip install '{extra}'" in out
