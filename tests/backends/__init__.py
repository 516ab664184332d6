"""Real backend servers for the tests, one plugin module per backend.

Each module here is loaded as a pytest plugin by `tests/conftest.py` and declares
`VARIANTS`: the `pytest.param`s it adds to the store contract suite. A variant
`name` needs a fixture `<name with '-' as '_'>_store_config` returning a fresh,
isolated `store:` section; the backend type is the part of the name before '-'
(`dynamodb-moto` runs the `dynamodb` store). In CI a backend that cannot be
started fails the run; it is never skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

# Prefix of a command that dies with the test process (see _die_with_parent.py).
DIE_WITH_PARENT = (sys.executable, str(Path(__file__).with_name("_die_with_parent.py")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def plugin_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_")
    ]
