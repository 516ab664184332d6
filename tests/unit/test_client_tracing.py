"""The SDK traces its calls only for an application that configured OpenTelemetry, and
only with the `otel` extra installed; it never needs OpenTelemetry itself."""

from __future__ import annotations

import logging
import sys

import opentelemetry.trace
import pytest
from opentelemetry.sdk.trace import TracerProvider

from quorum_quest.client import tracing


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the application had set a tracer provider (without setting the global one,
    which can be set once per process)."""
    provider = TracerProvider()
    monkeypatch.setattr(opentelemetry.trace, "get_tracer_provider", lambda: provider)


def test_no_interceptor_when_the_application_never_imported_opentelemetry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert tracing.client_interceptors() is None


def test_no_interceptor_while_the_tracer_provider_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        opentelemetry.trace, "get_tracer_provider", opentelemetry.trace.NoOpTracerProvider
    )
    assert tracing.client_interceptors() is None


@pytest.mark.usefixtures("configured")
def test_interceptors_when_the_application_configured_a_tracer_provider() -> None:
    assert tracing.client_interceptors()


@pytest.mark.usefixtures("configured")
def test_without_the_otel_extra_calls_go_untraced_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.grpc", None)
    monkeypatch.setattr(tracing, "_missing_reported", False)

    with caplog.at_level(logging.WARNING, logger="quorum_quest.client"):
        assert tracing.client_interceptors() is None
        assert tracing.client_interceptors() is None

    warnings = [r.getMessage() for r in caplog.records if r.name == "quorum_quest.client"]
    assert len(warnings) == 1
    assert "install quorum-quest[otel]" in warnings[0]
