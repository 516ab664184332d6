"""The committed generated code is exactly what `scripts/generate_api.py` makes from protos/."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "generate_api", ROOT / "scripts" / "generate_api.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    found += [
        f for f in comparison.common_files if not filecmp.cmp(left / f, right / f, shallow=False)
    ]
    for sub in comparison.common_dirs:
        found += [f"{sub}/{name}" for name in _differences(left / sub, right / sub)]
    return sorted(set(found))


def test_generated_code_matches_a_fresh_run(tmp_path: Path) -> None:
    fresh = tmp_path / "api"
    _generator().generate(fresh)
    assert _differences(ROOT / "quorum_quest" / "api", fresh) == [], (
        "run `uv run python scripts/generate_api.py` and commit the result"
    )
