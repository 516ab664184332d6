"""The settings model: every key of the config file, validated once, then immutable.

Key names follow the config file (camelCase where the file uses it). The `store:`
section is kept as a plain mapping here and validated by the configured backend's
own model (`Settings.store_settings()`), so this module knows no concrete store.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quorum_quest.stores import StoreSettings, UnknownBackend, store_class
from quorum_quest.stores.registry import canonical_name

_LOG_LEVELS = {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}
_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "PANIC": "CRITICAL"}


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[ipv6]:port` or `:port` (all interfaces) as (host, port).

    A port is required: gRPC would otherwise pick one (443 for a bare host, the number
    modulo 65536 for one too large) and serve where nobody looks. Port 0 = any free port.
    """
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket:
            raise ValueError(f"{address!r} has no closing ']'")
        if not rest:
            raise ValueError(f"{address!r} has no port: write [host]:port, as [::1]:5050")
        if not rest.startswith(":"):
            raise ValueError(f"{address!r} is not [host]:port")
        port = rest[1:]
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            raise ValueError(f"{address!r} has no port: write host:port (':5050' = all interfaces)")
        if ":" in host:
            raise ValueError(f"{address!r}: an IPv6 address is written in brackets, as [::1]:5050")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{port!r} in {address!r} is not a port (0 to 65535)")
    if int(port) > 65535:
        raise ValueError(f"port {int(port)} in {address!r} is above 65535")
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSettings(_Section):
    type: str = "memory"

    @field_validator("type")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        name = canonical_name(value)
        try:
            store_class(name)
        except UnknownBackend as exc:
            raise ValueError(str(exc)) from None
        return name


class LoggerSettings(_Section):
    level: str = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level")
    @classmethod
    def _loguru_level(cls, value: str) -> str:
        """Accept loguru names and the original `LOG_LEVELS_<NAME>LEVEL` spelling."""
        level = value.strip().upper()
        if level.startswith("LOG_LEVELS_") and level.endswith("LEVEL"):
            level = level[len("LOG_LEVELS_") : -len("LEVEL")]
        level = _LEVEL_ALIASES.get(level, level)
        if level not in _LOG_LEVELS:
            raise ValueError(
                f"unknown level {value!r}; use one of {', '.join(sorted(_LOG_LEVELS))}"
            )
        return level


class ObservabilitySettings(_Section):
    serviceName: str = "quorum-quest"
    serviceVersion: str = "0.1.0"
    environment: str = "development"
    otelEndpoint: str = Field(default="", description="OTLP/gRPC host:port; empty = no export")
    otelInsecure: bool = Field(default=True, description="plaintext OTLP (a local collector)")
    traceSampleRatio: float = Field(default=0.05, ge=0, le=1, description="new traces kept")
    metricsInterval: float = Field(default=10, gt=0, description="seconds between OTLP pushes")
    prometheusPort: int = Field(default=0, ge=0, lt=65536, description="scrape port; 0 = off")
    prometheusAddress: str = Field(
        default="",
        description="host or IP the scrape endpoint binds; empty = the host of serverAddress",
    )

    @field_validator("prometheusAddress")
    @classmethod
    def _host_only(cls, value: str) -> str:
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if any(char.isspace() for char in host) or "/" in host:
            raise ValueError(f"{value!r} is not a host name or IP address")
        if ":" in host and host.count(":") == 1:
            raise ValueError(
                f"{value!r}: give the host only; the port is observability.prometheusPort"
            )
        return host

    def prometheus_host(self, server_address: str) -> str:
        """Where the scrape endpoint listens: `prometheusAddress`, else the host the
        service listens on (all interfaces, 0.0.0.0, for `:port`)."""
        if self.prometheusAddress:
            return self.prometheusAddress
        return split_address(server_address)[0] or "0.0.0.0"


class TlsSettings(_Section):
    """TLS on the gRPC port: on when `certFile` is set; mTLS when `clientCaFile` is too."""

    certFile: str = Field(default="", description="PEM certificate chain the port presents")
    keyFile: str = Field(default="", description="PEM private key of certFile (unencrypted)")
    clientCaFile: str = Field(
        default="", description="PEM CA certificates; set: every client must present one it signed"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.certFile)

    @property
    def mutual(self) -> bool:
        return bool(self.clientCaFile)


class ServerSettings(_Section):
    maxTtl: float = Field(default=60, gt=0, description="largest lease a caller may ask for, s")
    stateLossGrace: float | None = Field(
        default=None,
        ge=0,
        description="seconds new grants are refused after lock state was lost; "
        "'auto' (the default) = maxTtl, 0 = off",
    )
    shutdownGrace: float = Field(default=10, ge=0, description="seconds in-flight calls get")
    healthInterval: float = Field(default=2, gt=0, description="seconds between store probes")
    watchInterval: float = Field(
        default=1,
        gt=0,
        description="seconds between reads of watched locks on a store that does not tell "
        "changes (ScyllaDB, DynamoDB): the bound on how late WatchLeaders reports a change",
    )
    workers: int = Field(default=1, gt=0, description="processes serving one port; 'auto' = cores")
    uvloop: bool = Field(default=True, description="run on uvloop where it is installed")
    reflection: bool = Field(default=True, description="serve gRPC server reflection")
    tls: TlsSettings = TlsSettings()

    @field_validator("stateLossGrace", mode="before")
    @classmethod
    def _auto_grace(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        return value

    @property
    def state_loss_grace(self) -> float:
        """The grace period in seconds: `stateLossGrace`, or `maxTtl` when it is 'auto'."""
        return self.maxTtl if self.stateLossGrace is None else self.stateLossGrace

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return os.cpu_count() or 1
        return value


# What an `auth.rules` entry may allow: `lock` = acquire, keep-alive and release (of the
# caller's own leases); `read` = GetLeader and WatchLeaders; `admin` = GetStatus.
Permission = Literal["lock", "read", "admin"]
PERMISSIONS: tuple[str, ...] = ("lock", "read", "admin")
# The identity of a caller that sent no credentials.
ANONYMOUS = "anonymous"


class AuthRule(_Section):
    """One rule: `identity` (a glob; `anonymous` only matches itself) may do `allow` to the
    locks whose `service/domain` match `locks` (`<service glob>/<domain glob>`, or `*`)."""

    identity: str
    locks: str = "*"
    allow: list[Permission]

    @field_validator("identity")
    @classmethod
    def _some_identity(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('must name an identity or a glob of identities ("*")')
        return value

    @field_validator("locks")
    @classmethod
    def _service_and_domain(cls, value: str) -> str:
        if value != "*" and "/" not in value:
            raise ValueError(
                f"{value!r} is not <service glob>/<domain glob> (as billing/*),"
                " nor * for every lock"
            )
        return value

    @field_validator("allow")
    @classmethod
    def _something_allowed(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"must allow at least one of {', '.join(PERMISSIONS)}")
        return value


class QuotaSettings(_Section):
    maxLeasesPerIdentity: int = Field(
        default=0, ge=0, description="live leases one identity may hold here; 0 = unlimited"
    )
    callsPerSecondPerIdentity: float = Field(
        default=0, ge=0, description="calls one identity may make per second here; 0 = unlimited"
    )

    @property
    def any(self) -> bool:
        return bool(self.maxLeasesPerIdentity or self.callsPerSecondPerIdentity)


class AuthSettings(_Section):
    tokensFile: str = Field(default="", description="YAML map identity -> token or sha256:<hex>")
    rules: list[AuthRule] = Field(default_factory=list)
    quotas: QuotaSettings = QuotaSettings()


class Settings(_Section):
    serverAddress: str = "localhost:5050"
    backend: BackendSettings = BackendSettings()
    store: dict[str, Any] = Field(default_factory=dict)
    logger: LoggerSettings = LoggerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()

    @field_validator("serverAddress")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        split_address(value)
        return value

    @property
    def auth_on(self) -> bool:
        """Whether calls are authenticated and authorized: a tokens file, a client CA or
        any rule turns it on; without all three, every caller may do everything."""
        return bool(self.auth.tokensFile or self.auth.rules or self.server.tls.clientCaFile)

    def store_settings(self) -> StoreSettings:
        """The `store:` section validated by the configured backend's model."""
        return store_class(self.backend.type).settings_model.model_validate(self.store)
