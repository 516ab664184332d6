"""A backend whose driver is not installed names, in one line, the extra that installs
it; the service then exits with that line as a config error, no traceback.

(The service run without `quorum-quest[server]` is tested on the real wheel, in
tests/integration/test_sdk_wheel.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quorum_quest.stores import UnknownBackend, registry, store_class
from tests.backends import DIE_WITH_PARENT


@pytest.mark.parametrize(
    ("backend", "driver", "extra"),
    [
        ("redis", "redis", "redis"),
        ("scylladb", "acsylla", "scylladb"),
        ("dynamodb", "aioboto3", "dynamodb"),
        ("memory", "loguru", "server"),
    ],
)
def test_a_backend_without_its_driver_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, backend: str, driver: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # `import driver` now fails
    monkeypatch.delitem(sys.modules, f"quorum_quest.stores.{backend}", raising=False)
    monkeypatch.setattr(registry, "_registered", {})

    with pytest.raises(UnknownBackend) as caught:
        store_class(backend)

    message = str(caught.value)
    assert "\n" not in message
    assert f"'{driver}'" in message
    assert message.endswith(f"install quorum-quest[{extra}]")


def test_the_service_configured_for_redis_without_its_driver_exits_with_one_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("backend:\n  type: redis\nstore:\n  host: localhost\n")
    program = (
        "import sys; sys.modules['redis'] = None\n"
        "from quorum_quest.cli import main\n"
        f"sys.exit(main(['--config', {str(config)!r}]))\n"
    )
    result = subprocess.run(
        [*DIE_WITH_PARENT, sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("quorum-quest-service: config error: backend.type: ")
    assert lines[0].endswith("install quorum-quest[redis]")
