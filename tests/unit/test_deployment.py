"""compose.yaml and the Dockerfile hang together (no Docker engine is needed to check that)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from quorum_quest.config.loader import apply_environment, validate

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def ports(service: dict) -> set[int]:
    return {int(str(mapping).split(":")[-1]) for mapping in service.get("ports", [])}


def test_compose_has_the_service_its_backends_and_observability(compose: dict) -> None:
    expected = {"quorum-quest", "redis", "scylladb", "otel-collector", "jaeger"}
    assert expected <= set(compose["services"])


def test_the_mounted_service_config_loads_with_our_loader(compose: dict) -> None:
    service = compose["services"]["quorum-quest"]
    (mount,) = service["configs"]
    raw = yaml.safe_load(compose["configs"][mount["source"]]["content"])
    apply_environment(raw, service.get("environment", {}))
    settings = validate(raw)
    # What the config points at exists in the compose file, on the ports it listens on.
    store = settings.store_settings()
    assert store.host in compose["services"]
    assert store.port in ports(compose["services"][store.host])
    otel_host, otel_port = settings.observability.otelEndpoint.split(":")
    assert otel_host in compose["services"]
    assert int(otel_port) in ports(compose["services"][otel_host])
    served = int(settings.serverAddress.rsplit(":", 1)[1])
    assert {served, settings.observability.prometheusPort} <= ports(service)
    assert settings.observability.environment == "compose"  # the environment wins over the file


def test_the_service_reads_its_config_where_compose_mounts_it(compose: dict) -> None:
    service = compose["services"]["quorum-quest"]
    (mount,) = service["configs"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    default_command = re.search(r'^CMD \["-config=([^"]+)"\]', dockerfile, re.M)
    assert default_command and default_command.group(1) == mount["target"]
    assert service["command"] == [f"-config={mount['target']}"]
    assert 'ENTRYPOINT ["quorum-quest-service"]' in dockerfile
    assert re.search(r"^EXPOSE 5050$", dockerfile, re.M)


def test_the_collector_sends_traces_to_the_viewer(compose: dict) -> None:
    collector = yaml.safe_load(compose["configs"]["otel-collector"]["content"])
    exporters = collector["service"]["pipelines"]["traces"]["exporters"]
    endpoints = [collector["exporters"][name]["endpoint"] for name in exporters]
    assert any(endpoint.split(":")[0] == "jaeger" for endpoint in endpoints)
    assert "otlp" in collector["service"]["pipelines"]["metrics"]["receivers"]
