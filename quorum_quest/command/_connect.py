"""The client a command uses: address, identity, TLS and token from flags or the
environment (the SDK reads `QUORUMQUEST_TLS*` and `QUORUMQUEST_TOKEN*` itself for
whatever the flags leave unset)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from quorum_quest.client import ClientTLS, QuorumQuestClient
from quorum_quest.command._exit import Exit, Failure

DEFAULT_ADDRESS = "localhost:5050"
# The lease a one-shot query's client is made with: it never acquires anything.
QUERY_TTL = 15.0


def default_client_id() -> str:
    """host:pid:random: whoever reads `quorum-quest leader` sees where the holder runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def client_tls(options: argparse.Namespace) -> ClientTLS | None:
    """TLS from the flags, each over its environment variable; None leaves it all to the
    environment (through the SDK)."""
    flags = {
        "ca_file": options.ca_file,
        "cert_file": options.cert_file,
        "key_file": options.key_file,
        "server_name": options.server_name,
    }
    if not options.tls and not any(flags.values()):
        return None
    base = ClientTLS.from_environment() or ClientTLS()
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v})


def token(options: argparse.Namespace) -> str | None:
    """The token of `--token-file`, or None to leave it to `QUORUMQUEST_TOKEN(_FILE)`."""
    if options.token_file is None:
        return None
    try:
        text = Path(options.token_file).read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        raise Failure(
            Exit.USAGE, f"--token-file: cannot read {options.token_file}: {exc.strerror}"
        ) from None
    if not text:
        raise Failure(Exit.USAGE, f"--token-file: {options.token_file} holds no token")
    return text


def make_client(
    options: argparse.Namespace,
    service: str,
    domain: str,
    *,
    ttl: float = QUERY_TTL,
    client_id: str | None = None,
) -> QuorumQuestClient:
    extra: dict[str, Any] = {}
    if options.timeout is not None:
        extra["rpc_timeout"] = options.timeout
    return QuorumQuestClient(
        service,
        domain,
        ttl,
        options.address,
        client_id=client_id or options.client_id or default_client_id(),
        tls=client_tls(options),
        token=token(options),
        **extra,
    )


async def call(client: QuorumQuestClient, method: str, request: Any) -> Any:
    """One raw RPC through `client`'s channel, credentials and error mapping, for the
    answers the SDK does not surface yet (GetStatus, GetLeader's remaining lease)."""
    return await client._call(method, request)
