"""Regenerate `quorum_quest/api/` from `protos/` with the betterproto2 compiler.

    uv run python scripts/generate_api.py [OUTPUT_DIR]

The generated package is committed; `tests/unit/test_generated_api.py` runs this
script into a temporary directory and fails when the two differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUTPUT = ROOT / "quorum_quest" / "api"
PLUGIN_OPTIONS = "google_protobuf_descriptors"


def generate(output: Path) -> None:
    """Write the generated package to `output`, replacing what was there."""
    scripts = Path(sysconfig.get_path("scripts"))
    plugin = scripts / "protoc-gen-python_betterproto2"
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={PROTOS}",
                f"--plugin=protoc-gen-python_betterproto2={plugin}",
                f"--python_betterproto2_out={scratch}",
                f"--python_betterproto2_opt={PLUGIN_OPTIONS}",
                *sources,
            ],
            check=True,
            cwd=PROTOS,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(scratch, output)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)
