"""The SDK and its public API pass `mypy --strict` (the files and settings are in
pyproject.toml, `[tool.mypy]`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.backends import DIE_WITH_PARENT

ROOT = Path(__file__).parents[2]


def test_sdk_passes_mypy_strict() -> None:
    result = subprocess.run(
        [*DIE_WITH_PARENT, sys.executable, "-m", "mypy", "--strict"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
