"""How the SDK reaches the service: plaintext or TLS (optionally with a client
certificate, for mTLS), and a bearer token.

Each setting comes from the client's arguments, or, where an argument is left at
None, from the environment, so a program deployed next to a secured service needs no
code change:

| variable                      | meaning                                                |
|-------------------------------|--------------------------------------------------------|
| `QUORUMQUEST_TLS`             | `true`: TLS, verified against the system's roots       |
| `QUORUMQUEST_TLS_CA_FILE`     | TLS, verified against this CA bundle (PEM)             |
| `QUORUMQUEST_TLS_CERT_FILE`   | client certificate chain (PEM), for mTLS               |
| `QUORUMQUEST_TLS_KEY_FILE`    | its private key (PEM)                                  |
| `QUORUMQUEST_TLS_SERVER_NAME` | the name to verify the server's certificate against    |
| `QUORUMQUEST_TOKEN`           | bearer token sent with every call                      |
| `QUORUMQUEST_TOKEN_FILE`      | a file holding it (read once, surrounding blanks cut)  |

Any of the `QUORUMQUEST_TLS_*_FILE` variables turns TLS on. Files are read when the
client is made, so a missing or unreadable one is an `InvalidArgument` naming the
setting there and then, not a failed call later; a client made after a rotation reads
the new files. The service's own configuration ignores these variables.

Mistakes are reported with the setting's name and the file's path, never its content:
a token or a key never appears in a message or a log line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from quorum_quest.errors import InvalidArgument

logger = logging.getLogger("quorum_quest.client")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True)
class ClientTLS:
    """TLS to the service. With no `ca_file` the server is verified against the system's
    roots; `cert_file` and `key_file` (both or neither) present a client certificate
    for mTLS; `server_name` overrides the name the server's certificate must carry
    (by default the host of the address)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ClientTLS | None:
        """The TLS the `QUORUMQUEST_TLS*` variables ask for, or None for plaintext."""
        env = os.environ if environ is None else environ
        files = {
            "ca_file": env.get("QUORUMQUEST_TLS_CA_FILE") or None,
            "cert_file": env.get("QUORUMQUEST_TLS_CERT_FILE") or None,
            "key_file": env.get("QUORUMQUEST_TLS_KEY_FILE") or None,
        }
        switch = env.get("QUORUMQUEST_TLS", "").strip().lower()
        if switch not in TRUE | FALSE:
            raise InvalidArgument("QUORUMQUEST_TLS", f"must be true or false, not {switch!r}")
        if switch in FALSE and not any(files.values()):
            return None
        return cls(**files, server_name=env.get("QUORUMQUEST_TLS_SERVER_NAME") or None)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files, read now."""
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument("tls", "cert_file and key_file go together: set both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls.ca_file", self.ca_file),
            private_key=_read("tls.key_file", self.key_file),
            certificate_chain=_read("tls.cert_file", self.cert_file),
        )


def token_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token `QUORUMQUEST_TOKEN` or `QUORUMQUEST_TOKEN_FILE` gives, or None."""
    env = os.environ if environ is None else environ
    if token := env.get("QUORUMQUEST_TOKEN", "").strip():
        return token
    path = env.get("QUORUMQUEST_TOKEN_FILE")
    if not path:
        return None
    content = _read("QUORUMQUEST_TOKEN_FILE", path)
    assert content is not None
    token = content.decode("utf-8", "replace").strip()
    if not token:
        raise InvalidArgument("QUORUMQUEST_TOKEN_FILE", f"{path} holds no token")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token`, or None for none."""
    if token is None or token == "":
        return None
    if any(ch.isspace() for ch in token) or not token.isprintable():
        raise InvalidArgument("token", "must be printable and hold no whitespace")
    return (("authorization", f"Bearer {token}"),)


def open_channel(
    address: str,
    tls: ClientTLS | None,
    token: str | None,
    options: tuple[tuple[str, int | str], ...],
    interceptors: list[grpc.aio.ClientInterceptor] | None,
) -> grpc.aio.Channel:
    """A channel to `address`: TLS when `tls` is given, plaintext otherwise.

    The token travels as call metadata (see `bearer_metadata`), not as grpc call
    credentials: those are refused on a plaintext channel, and a service behind a
    TLS-terminating proxy is reached in plaintext with a token all the same. A token
    sent in plaintext to a host other than this one is logged once as a warning.
    """
    if tls is None:
        if token and not _is_loopback(address):
            logger.warning(
                "sending a bearer token to %s without TLS: anyone on the path can read it",
                address,
            )
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if tls.server_name:
        options = (*options, ("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=options, interceptors=interceptors
    )


def _read(setting: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(setting, f"cannot read {path}: {exc.strerror or exc}") from None


def _is_loopback(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    target = address.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or "]" in target else target
    host = host.strip("[]").lstrip("/")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
