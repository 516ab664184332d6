"""The compose file's TLS variant hangs together (no Docker engine is needed to check that)."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml

from quorum_quest.config.loader import apply_environment, validate
from tests.unit.test_deployment import ROOT, ports


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_the_tls_variant_runs_only_with_its_profile(compose: dict) -> None:
    services = compose["services"]
    assert services["quorum-quest-tls"]["profiles"] == ["tls"]
    assert services["tls-certs"]["profiles"] == ["tls"]
    assert "profiles" not in services["quorum-quest"]  # the plaintext service is the default


def test_the_tls_config_loads_and_names_the_files_tls_certs_makes(compose: dict) -> None:
    service = compose["services"]["quorum-quest-tls"]
    (mount,) = service["configs"]
    raw = yaml.safe_load(compose["configs"][mount["source"]]["content"])
    apply_environment(raw, service.get("environment", {}))
    settings = validate(raw)
    assert settings.auth_on and settings.server.tls.mutual
    (volume,) = service["volumes"]
    source, target, mode = volume.split(":")
    assert mode == "ro"
    tls = settings.server.tls
    files = [tls.certFile, tls.keyFile, tls.clientCaFile, settings.auth.tokensFile]
    script = compose["services"]["tls-certs"]["command"][-1]
    (certs_volume,) = compose["services"]["tls-certs"]["volumes"]
    assert certs_volume.split(":")[0] == source  # the same host directory
    for file in files:
        path = PurePosixPath(file)
        assert path.parent == PurePosixPath(target), file
        assert path.name in script, file  # tls-certs writes it
    # The store it points at is the compose Redis; its port is mapped apart from 5050.
    assert settings.store_settings().host in compose["services"]
    assert 5051 in {int(str(p).split(":")[0]) for p in service["ports"]}
    assert int(settings.serverAddress.rsplit(":", 1)[1]) in ports(service)


def test_the_tls_variant_waits_for_its_certificates_and_checks_health_over_mtls(
    compose: dict,
) -> None:
    service = compose["services"]["quorum-quest-tls"]
    assert service["depends_on"]["tls-certs"]["condition"] == "service_completed_successfully"
    probe = service["healthcheck"]["test"][-1]
    assert "ssl_channel_credentials" in probe and "demo-client.crt" in probe
    compile(probe, "healthcheck", "exec")  # the one-liner is valid Python
