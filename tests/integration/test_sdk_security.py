"""The SDK on a secured service: TLS, mTLS and tokens from arguments or the environment,
and refusals for who the caller is raised plainly instead of retried as outages.

Certificates are made at test time (`tests.pki`); servers run in-process.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from quorum_quest.client import ClientTLS, QuorumQuestClient
from quorum_quest.client.connection import _is_loopback, bearer_metadata, token_from_environment
from quorum_quest.errors import (
    InvalidArgument,
    LeadershipLost,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
)
from quorum_quest.server import LockServer
from quorum_quest.server.access import HOLDER_SEPARATOR
from quorum_quest.stores import LockKey
from tests.integration.test_security import (
    BUDGET_S,
    rule,
    serving,
    tls_config,
    write_tokens,
)
from tests.pki import Authority, Issued

CLIENT_VARIABLES = (
    "QUORUMQUEST_TLS",
    "QUORUMQUEST_TLS_CA_FILE",
    "QUORUMQUEST_TLS_CERT_FILE",
    "QUORUMQUEST_TLS_KEY_FILE",
    "QUORUMQUEST_TLS_SERVER_NAME",
    "QUORUMQUEST_TOKEN",
    "QUORUMQUEST_TOKEN_FILE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def client_of(server: LockServer, service: str = "billing", **options: Any) -> QuorumQuestClient:
    return QuorumQuestClient(
        service, uuid.uuid4().hex, 30, f"127.0.0.1:{server.port}", client_id="w1", **options
    )


async def holder_of(server: LockServer, client: QuorumQuestClient) -> str | None:
    held = await server.runtime.current.store.get_leader(LockKey(client.service, client.domain))
    return held.client_id if held is not None else None


# -- connecting -------------------------------------------------------------------------


async def test_the_sdk_leads_over_tls_with_a_token_given_as_arguments(
    ca: Authority, server_cert: Issued, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"billing-app": "token-of-billing"})
    auth = {"tokensFile": str(tokens), "rules": [rule("billing-*", "billing/*")]}
    async with serving(server={"tls": tls_config(server_cert)}, auth=auth) as server:
        tls = ClientTLS(ca_file=ca.cert_file)
        async with client_of(server, tls=tls, token="token-of-billing") as client:
            async with client.leadership(timeout=BUDGET_S) as lease:
                assert lease.fencing_token > 0
                assert await holder_of(server, client) == f"billing-app{HOLDER_SEPARATOR}w1"
                assert await client.get_leader() == ("w1", lease.fencing_token)
            assert await holder_of(server, client) is None


async def test_the_sdk_takes_mtls_and_a_token_file_from_the_environment(
    ca: Authority, server_cert: Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = ca.issue("billing-7")
    tls = tls_config(server_cert, ca)
    async with serving(server={"tls": tls}, auth={"rules": [rule("billing-*")]}) as server:
        monkeypatch.setenv("QUORUMQUEST_TLS_CA_FILE", str(ca.cert_file))
        monkeypatch.setenv("QUORUMQUEST_TLS_CERT_FILE", str(billing.cert_file))
        monkeypatch.setenv("QUORUMQUEST_TLS_KEY_FILE", str(billing.key_file))
        async with client_of(server) as client:
            assert await client.try_acquire_lock()
            assert await holder_of(server, client) == f"billing-7{HOLDER_SEPARATOR}w1"
            assert await client.release_lock()
        # Without the client certificate, the handshake fails: an outage to the client.
        monkeypatch.delenv("QUORUMQUEST_TLS_CERT_FILE")
        monkeypatch.delenv("QUORUMQUEST_TLS_KEY_FILE")
        tokens = write_tokens(tmp_path / "tokens.yaml", {"ops": "token-of-ops"})
        (tmp_path / "token").write_text("token-of-ops\n")
        monkeypatch.setenv("QUORUMQUEST_TOKEN_FILE", str(tmp_path / "token"))
        assert token_from_environment() == "token-of-ops"
    # The same token, from its file, on a TLS port without mTLS.
    auth = {"tokensFile": str(tokens), "rules": [rule("ops")]}
    async with serving(server={"tls": tls_config(server_cert)}, auth=auth) as server:
        async with client_of(server) as client:
            assert await client.try_acquire_lock()
            assert await holder_of(server, client) == f"ops{HOLDER_SEPARATOR}w1"


async def test_arguments_win_over_the_environment(
    ca: Authority, server_cert: Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUORUMQUEST_TLS_CA_FILE", str(tmp_path / "absent.pem"))
    monkeypatch.setenv("QUORUMQUEST_TOKEN", "token-from-env")
    async with serving() as server:  # plaintext, auth off
        async with client_of(server, tls=False, token="") as client:
            assert client.tls is None and client._metadata is None
            assert await client.try_acquire_lock()


# -- refusals ---------------------------------------------------------------------------


async def test_leadership_raises_unauthenticated_at_once_rather_than_waiting_it_out(
    tmp_path: Path,
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"billing-app": "token-of-billing"})
    auth = {"tokensFile": str(tokens), "rules": [rule("billing-*", "billing/*")]}
    async with serving(auth=auth) as server:
        for token in ("a-guess", ""):
            async with client_of(server, token=token) as client:
                with pytest.raises(Unauthenticated) as refused:
                    async with client.leadership(timeout=BUDGET_S):
                        raise AssertionError("led without credentials")
                assert "UNAUTHENTICATED" in str(refused.value)
                assert "a-guess" not in str(refused.value)


async def test_leadership_raises_permission_denied_naming_the_lock(
    tmp_path: Path,
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"billing-app": "token-of-billing"})
    auth = {"tokensFile": str(tokens), "rules": [rule("billing-*", "billing/*")]}
    async with serving(auth=auth) as server:
        async with client_of(server, "payroll", token="token-of-billing") as client:
            with pytest.raises(PermissionDenied) as denied:
                async with client.leadership(timeout=BUDGET_S):
                    raise AssertionError("led a lock no rule allows")
            assert f"payroll/{client.domain}" in str(denied.value)
            with pytest.raises(PermissionDenied):
                await client.try_acquire_lock()
            with pytest.raises(PermissionDenied):
                await client.get_leader()


async def test_a_renewal_refused_for_revoked_credentials_ends_the_lease_as_leadership_lost(
    tmp_path: Path,
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"billing-app": "token-of-billing"})
    auth = {"tokensFile": str(tokens), "rules": [rule("billing-*", "billing/*")]}
    async with serving(auth=auth) as server:
        client = QuorumQuestClient(
            "billing", uuid.uuid4().hex, 3, f"127.0.0.1:{server.port}", token="token-of-billing"
        )
        async with client:
            with pytest.raises(LeadershipLost) as lost:
                async with client.leadership(timeout=BUDGET_S):
                    write_tokens(tokens, {"someone-else": "token-of-someone"})
                    await asyncio.sleep(BUDGET_S)  # cancelled by the loss
            assert "UNAUTHENTICATED" in str(lost.value)
            assert not client.is_leader


async def test_a_lease_quota_is_waited_out_by_leadership(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"billing-app": "token-of-billing"})
    auth = {
        "tokensFile": str(tokens),
        "rules": [rule("billing-*", "billing/*")],
        "quotas": {"maxLeasesPerIdentity": 1},
    }
    async with serving(auth=auth) as server:
        async with (
            client_of(server, token="token-of-billing") as first,
            client_of(server, token="token-of-billing") as second,
        ):
            assert await first.try_acquire_lock()
            with pytest.raises(QuotaExceeded):
                await second.try_acquire_lock()
            waiting = asyncio.ensure_future(second.wait_for_leadership(timeout=BUDGET_S))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # waiting, not failed
            assert await first.release_lock()
            lease = await waiting
            assert lease.is_valid


# -- settings ---------------------------------------------------------------------------


def test_tls_settings_from_the_environment() -> None:
    assert ClientTLS.from_environment({}) is None
    assert ClientTLS.from_environment({"QUORUMQUEST_TLS": "false"}) is None
    assert ClientTLS.from_environment({"QUORUMQUEST_TLS": "true"}) == ClientTLS()
    assert ClientTLS.from_environment(
        {"QUORUMQUEST_TLS_CA_FILE": "/ca.pem", "QUORUMQUEST_TLS_SERVER_NAME": "locks.internal"}
    ) == ClientTLS(ca_file="/ca.pem", server_name="locks.internal")
    with pytest.raises(InvalidArgument, match="QUORUMQUEST_TLS"):
        ClientTLS.from_environment({"QUORUMQUEST_TLS": "maybe"})


def test_unusable_tls_files_are_named_when_the_client_is_made(
    ca: Authority, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument) as missing:
        QuorumQuestClient("s", "d", 10, "127.0.0.1:1", tls=ClientTLS(ca_file=tmp_path / "no.pem"))
    assert missing.value.field == "tls.ca_file" and "no.pem" in str(missing.value)
    with pytest.raises(InvalidArgument) as half:
        QuorumQuestClient("s", "d", 10, "127.0.0.1:1", tls=ClientTLS(cert_file=ca.cert_file))
    assert "cert_file and key_file" in str(half.value)


def test_a_token_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as spaced:
        bearer_metadata("secret value")
    assert "secret" not in str(spaced.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidArgument, match="holds no token"):
        token_from_environment({"QUORUMQUEST_TOKEN_FILE": str(tmp_path / "empty")})
    assert bearer_metadata("t0k") == (("authorization", "Bearer t0k"),)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("localhost:5050", True),
        ("127.0.0.1:5050", True),
        ("[::1]:5050", True),
        ("unix:/run/qq.sock", True),
        ("dns:///localhost:5050", True),
        ("locks.example.com:5050", False),
        ("10.0.0.7:5050", False),
    ],
)
def test_which_addresses_are_loopback(address: str, loopback: bool) -> None:
    assert _is_loopback(address) is loopback


async def test_a_token_sent_in_plaintext_off_this_host_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="quorum_quest.client"):
        client = QuorumQuestClient("s", "d", 10, "locks.example.com:5050", token="t0k")
        client.stub  # noqa: B018 (opens the channel)
        client.stub  # noqa: B018
        await client.close()
    warnings = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(warnings) == 1 and "t0k" not in warnings[0]
