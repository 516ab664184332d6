"""Auth without a network: rules, lease ownership, tokens, quotas, certificates, config keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from quorum_quest.config.loader import load_settings, validate
from quorum_quest.config.settings import ANONYMOUS, AuthRule, AuthSettings, TlsSettings
from quorum_quest.errors import ConfigError, PermissionDenied, QuotaExceeded, Unauthenticated
from quorum_quest.server.access import (
    HOLDER_SEPARATOR,
    LOCK,
    OPEN,
    READ,
    Access,
    Caller,
    Rules,
    client_id_of,
)
from quorum_quest.server.identity import TokenBook, Tokens, bearer_token
from quorum_quest.server.quotas import CallRate, LeaseLedger, Quotas
from quorum_quest.server.tls import ServerCertificates, load_certificates
from quorum_quest.stores import LockKey
from tests.pki import Authority

BILLING = LockKey("billing", "eu")
PAYROLL = LockKey("payroll", "eu")


def rules(*entries: dict[str, Any]) -> Rules:
    return Rules([AuthRule.model_validate(entry) for entry in entries])


@pytest.fixture
def log_lines() -> Any:
    lines: list[str] = []
    sink = logger.add(
        lambda line: lines.append(str(line)), level="DEBUG", format="{level} {message}"
    )
    yield lines
    logger.remove(sink)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- rules ------------------------------------------------------------------------------


def test_the_first_rule_matching_identity_and_lock_decides() -> None:
    decide = rules(
        {"identity": "billing-*", "locks": "billing/*", "allow": ["lock", "read"]},
        {"identity": "billing-*", "locks": "*", "allow": ["read"]},
    )
    assert decide.allows("billing-1", BILLING, LOCK)
    assert not decide.allows("billing-1", PAYROLL, LOCK)  # the second rule: read only
    assert decide.allows("billing-1", PAYROLL, READ)
    assert not decide.allows("payroll-1", BILLING, READ)  # no rule matches: denied


def test_a_matching_rule_without_the_permission_denies_even_if_a_later_one_allows() -> None:
    decide = rules(
        {"identity": "ops", "locks": "*", "allow": ["read"]},
        {"identity": "ops", "locks": "*", "allow": ["admin"]},
    )
    assert not decide.allows("ops", None, "admin")


def test_lock_globs_match_service_and_domain_apart() -> None:
    decide = rules({"identity": "*", "locks": "billing/eu-*", "allow": ["lock"]})
    assert decide.allows("x", LockKey("billing", "eu-1"), LOCK)
    # The service "billing/eu-1" is not the service "billing", whatever the joined name.
    assert not decide.allows("x", LockKey("billing/eu-1", "z"), LOCK)
    assert not decide.allows("x", LockKey("billing", "us-1"), LOCK)


def test_admin_names_no_lock_so_only_an_every_lock_rule_matches_it() -> None:
    decide = rules(
        {"identity": "ops", "locks": "ops/*", "allow": ["admin"]},
        {"identity": "root", "allow": ["admin"]},
    )
    assert not decide.allows("ops", None, "admin")
    assert decide.allows("root", None, "admin")


def test_a_star_identity_never_matches_anonymous() -> None:
    decide = rules(
        {"identity": "*", "locks": "*", "allow": ["lock"]},
    )
    assert decide.allows("alice", BILLING, LOCK)
    assert not decide.allows(ANONYMOUS, BILLING, LOCK)
    legacy = rules({"identity": "anonymous", "locks": "legacy/*", "allow": ["lock"]})
    assert legacy.allows(ANONYMOUS, LockKey("legacy", "x"), LOCK)
    assert not legacy.allows("alice", LockKey("legacy", "x"), LOCK)


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"identity": "a", "locks": "billing", "allow": ["lock"]}, "auth.rules.0.locks"),
        ({"identity": "a", "allow": []}, "auth.rules.0.allow"),
        ({"identity": "a", "allow": ["write"]}, "auth.rules.0.allow.0"),
        ({"identity": " ", "allow": ["lock"]}, "auth.rules.0.identity"),
        ({"locks": "*", "allow": ["lock"]}, "auth.rules.0.identity"),
    ],
)
def test_a_bad_rule_names_its_key(rule: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate({"auth": {"rules": [rule]}})
    assert error.value.path == key


# -- callers and lease ownership ---------------------------------------------------------


def access(**auth: Any) -> Access:
    return Access(AuthSettings.model_validate(auth), None, mutual_tls=False, quotas=Quotas())


def test_an_identified_callers_holder_carries_its_identity_and_answers_strip_it() -> None:
    caller = Caller("alice", access(rules=[{"identity": "*", "allow": ["lock"]}]))
    holder = caller.holder("worker-1")
    assert holder == f"alice{HOLDER_SEPARATOR}worker-1"
    assert client_id_of(holder) == "worker-1"
    assert Caller("bob", caller._access).holder("worker-1") != holder


def test_anonymous_and_open_callers_keep_the_bare_client_id() -> None:
    on = access(rules=[{"identity": "anonymous", "allow": ["lock"]}])
    assert Caller(ANONYMOUS, on).holder("worker-1") == "worker-1"
    assert OPEN.holder("worker-1") == "worker-1"
    assert client_id_of("worker-1") == "worker-1"


def test_denials_are_unauthenticated_for_anonymous_and_permission_denied_otherwise() -> None:
    on = access(rules=[{"identity": "alice", "locks": "billing/*", "allow": ["lock"]}])
    Caller("alice", on).allow(BILLING, LOCK, "acquire")
    with pytest.raises(PermissionDenied, match="alice may not acquire payroll/eu"):
        Caller("alice", on).allow(PAYROLL, LOCK, "acquire")
    with pytest.raises(Unauthenticated, match="no credentials"):
        Caller(ANONYMOUS, on).allow(BILLING, LOCK, "acquire")
    OPEN.allow(PAYROLL, LOCK, "acquire")  # auth off: anything goes


class Context:
    """What `Access.caller` reads of a grpc call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), names: dict | None = None):
        self._metadata = metadata
        self._names = names or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._names


def tokens_file(tmp_path: Path, text: str, name: str = "tokens.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_callers_are_told_apart_by_token_certificate_or_nothing(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, "alice: secret-a\n")
    tokens = Tokens(str(path))
    on = Access(AuthSettings(tokensFile=str(path)), tokens, mutual_tls=True, quotas=Quotas())
    bearer = Context((("authorization", "Bearer secret-a"),))
    assert on.caller(bearer).identity == "alice"
    assert on.caller(Context(names={"x509_common_name": [b"svc-1"]})).identity == "svc-1"
    san_only = {"x509_subject_alternative_name": [b"spiffe://example/ns/a", b"b.example"]}
    assert on.caller(Context(names=san_only)).identity == "spiffe://example/ns/a"
    assert on.caller(Context()).identity == ANONYMOUS
    with pytest.raises(Unauthenticated, match="not known"):
        on.caller(Context((("authorization", "Bearer guessed"),)))
    with pytest.raises(Unauthenticated, match="Bearer <token>"):
        on.caller(Context((("authorization", "Basic YWxpY2U6eA=="),)))
    with pytest.raises(Unauthenticated, match="reserved|anonymous"):
        on.caller(Context(names={"x509_common_name": [b"anonymous"]}))


def test_a_token_where_the_service_takes_none_is_unauthenticated() -> None:
    on = access(rules=[{"identity": "anonymous", "allow": ["lock"]}])
    with pytest.raises(Unauthenticated, match="takes no bearer tokens"):
        on.caller(Context((("authorization", "Bearer x"),)))


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token(Context((("authorization", "bearer abc"),))) == "abc"
    assert bearer_token(Context((("user-agent", "x"),))) is None


# -- tokens -----------------------------------------------------------------------------


def test_tokens_are_plain_or_sha256_and_only_digests_are_kept(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"token-b").hexdigest()
    book = TokenBook.load(str(tokens_file(tmp_path, f"alice: token-a\nbob: sha256:{digest}\n")))
    assert book.identity("token-a") == "alice"
    assert book.identity("token-b") == "bob"
    assert book.identity(f"sha256:{digest}") is None  # the digest is not the token
    assert book.identity("token-c") is None
    assert all(isinstance(key, bytes) for key in book._identities)  # no plain token kept


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice: same-token\nbob: same-token\n", "same token"),
        ("alice: sha256:abc\n", "64 hex digits"),
        ("anonymous: t0ken-value\n", "anonymous"),
        ('"a\\tb": t0ken-value\n', "control character"),
        ("alice: ''\n", "non-empty"),
        ("alice: 12345\n", "non-empty text"),
        ("[alice, bob]\n", "mapping"),
        ("alice: 'has space'\n", "spaces"),
    ],
)
def test_a_bad_tokens_file_is_a_config_error_naming_the_key(
    tmp_path: Path, text: str, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason) as error:
        TokenBook.load(str(tokens_file(tmp_path, text)))
    assert error.value.path == "auth.tokensFile"


def test_a_broken_tokens_file_error_never_quotes_it(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, "alice: super-secret-token\nbob: [unclosed super-secret-2\n")
    with pytest.raises(ConfigError) as error:
        TokenBook.load(str(path))
    assert "super-secret" not in str(error.value)
    assert "at line" in str(error.value)


def test_plain_tokens_are_counted_in_a_warning_never_shown(
    tmp_path: Path, log_lines: list[str]
) -> None:
    TokenBook.load(str(tokens_file(tmp_path, "alice: token-aaaa\nbob: token-bbbb\n")))
    warnings = [line for line in log_lines if line.startswith("WARNING")]
    assert warnings and "2 tokens in plain text" in warnings[0]
    assert not any("token-aaaa" in line for line in log_lines)


def test_a_changed_tokens_file_is_taken_once_settled_and_a_broken_one_refused(
    tmp_path: Path, log_lines: list[str]
) -> None:
    path = tokens_file(tmp_path, "alice: token-one\n")
    tokens = Tokens(str(path))
    assert not tokens.poll()  # nothing changed
    path.write_text("alice: token-two\n")
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    assert not tokens.poll()  # changed: wait one poll for it to settle
    assert tokens.poll()
    assert tokens.book.identity("token-two") == "alice"
    assert tokens.book.identity("token-one") is None
    path.write_text("alice: [broken\n")
    os.utime(path, ns=(2, 2))
    assert not tokens.poll()
    assert not tokens.poll()  # refused: the old tokens stay
    assert not tokens.poll()  # and it is reported once
    assert tokens.book.identity("token-two") == "alice"
    assert sum("tokens file change rejected" in line for line in log_lines) == 1


# -- quotas -----------------------------------------------------------------------------


def test_the_lease_quota_counts_live_leases_and_places_taken_by_running_acquires() -> None:
    clock = Clock()
    ledger = LeaseLedger(clock)
    one, two, three = (LockKey("s", str(n)) for n in range(3))
    assert ledger.reserve("alice", one, 2)
    ledger.granted("alice", one, 1000)
    assert ledger.reserve("alice", two, 2)  # running: it holds a place
    with pytest.raises(QuotaExceeded, match=r"holds 2 leases.*\(2\)"):
        ledger.reserve("alice", three, 2)
    assert not ledger.reserve("alice", one, 2)  # held already: a refresh is never refused
    assert ledger.reserve("bob", three, 2)  # another identity has its own count
    ledger.ended("alice", two)
    assert ledger.reserve("alice", three, 2)
    ledger.granted("alice", three, 1000)
    clock.now += 2  # both leases ended on their own
    assert ledger.held("alice") == 0
    assert ledger.reserve("alice", two, 2)


def test_the_call_rate_is_a_token_bucket_holding_one_seconds_worth() -> None:
    clock = Clock()
    rate = CallRate(clock)
    for _ in range(5):
        rate.take("alice", 5)
    with pytest.raises(QuotaExceeded, match=r"5 calls/s"):
        rate.take("alice", 5)
    rate.take("bob", 5)  # another identity has its own bucket
    clock.now += 0.2  # one call's worth
    rate.take("alice", 5)
    with pytest.raises(QuotaExceeded):
        rate.take("alice", 5)
    slow = CallRate(clock)
    slow.take("carol", 0.5)  # below 1/s the bucket still holds one call
    with pytest.raises(QuotaExceeded):
        slow.take("carol", 0.5)
    clock.now += 2
    slow.take("carol", 0.5)


# -- certificates -----------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def tls(server: Any, **more: str) -> TlsSettings:
    return TlsSettings(certFile=str(server.cert_file), keyFile=str(server.key_file), **more)


def test_a_good_pair_loads(ca: Authority) -> None:
    material = load_certificates(
        tls(ca.issue("server", server=True), clientCaFile=str(ca.cert_file))
    )
    assert material.subject == "CN=server"
    assert material.client_ca == ca.cert_pem


def test_a_key_that_is_not_the_certificates_names_the_key_file(ca: Authority) -> None:
    one, other = ca.issue("one", server=True), ca.issue("other", server=True)
    with pytest.raises(ConfigError, match="is not the key of the certificate") as error:
        load_certificates(TlsSettings(certFile=str(one.cert_file), keyFile=str(other.key_file)))
    assert error.value.path == "server.tls.keyFile"
    assert "PRIVATE KEY" not in str(error.value)


def test_an_expired_certificate_names_the_cert_file(ca: Authority) -> None:
    with pytest.raises(ConfigError, match="expired on") as error:
        load_certificates(tls(ca.issue("old", server=True, expired=True)))
    assert error.value.path == "server.tls.certFile"


@pytest.mark.parametrize("which", ["certFile", "keyFile", "clientCaFile"])
def test_a_missing_file_names_its_key(ca: Authority, tmp_path: Path, which: str) -> None:
    server = ca.issue("server", server=True)
    paths = {"certFile": str(server.cert_file), "keyFile": str(server.key_file)}
    paths["clientCaFile"] = str(ca.cert_file)
    paths[which] = str(tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match="cannot read") as error:
        load_certificates(TlsSettings(**paths))
    assert error.value.path == f"server.tls.{which}"


def test_files_that_are_not_pem_name_their_key(ca: Authority, tmp_path: Path) -> None:
    server = ca.issue("server", server=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as error:
        load_certificates(TlsSettings(certFile=str(junk), keyFile=str(server.key_file)))
    assert error.value.path == "server.tls.certFile"
    with pytest.raises(ConfigError) as error:
        load_certificates(TlsSettings(certFile=str(server.cert_file), keyFile=str(junk)))
    assert error.value.path == "server.tls.keyFile"


def test_an_encrypted_key_is_refused_without_asking_for_a_password(
    ca: Authority, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    server = ca.issue("server", server=True)
    key = serialization.load_pem_private_key(server.key_pem, password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted") as error:
        load_certificates(TlsSettings(certFile=str(server.cert_file), keyFile=str(encrypted)))
    assert error.value.path == "server.tls.keyFile"


def test_a_rotated_pair_is_taken_once_settled_and_a_broken_one_refused(
    ca: Authority, log_lines: list[str]
) -> None:
    first = ca.issue("first", server=True, file_stem="server")
    certificates = ServerCertificates(tls(first))
    handed_at_start = certificates._fetch()
    assert handed_at_start is None  # grpc starts with the initial configuration
    second = ca.issue("second", server=True, file_stem="server")  # same files
    os.utime(second.cert_file, ns=(1, 1))
    assert not certificates.poll()  # changed: wait one poll for it to settle
    assert certificates.poll()
    assert certificates.material.subject == "CN=second"
    assert certificates._fetch() is not None  # the next handshake takes it
    assert certificates._fetch() is None  # and the one after has nothing new
    # A new certificate whose key has not been written yet: refused, the old one stays.
    third = ca.issue("third", server=True, file_stem="third")
    second.cert_file.write_bytes(third.cert_pem)
    os.utime(second.cert_file, ns=(2, 2))
    assert not certificates.poll()
    assert not certificates.poll()
    assert not certificates.poll()
    assert certificates.material.subject == "CN=second"
    assert certificates._fetch() is None
    errors = [line for line in log_lines if line.startswith("ERROR")]
    assert len(errors) == 1 and "still serving the previous one (CN=second)" in errors[0]
    second.key_file.write_bytes(third.key_pem)  # the pair is whole again
    assert not certificates.poll()
    assert certificates.poll()
    assert certificates.material.subject == "CN=third"


# -- configuration ----------------------------------------------------------------------


def test_nested_keys_take_environment_overrides(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "QUORUMQUEST_SERVER_TLS_CERTFILE": "/tls/server.crt",
            "QUORUMQUEST_SERVER_TLS_KEY_FILE": "/tls/server.key",
            "QUORUMQUEST_SERVER_TLS_CLIENTCAFILE": "/tls/ca.crt",
            "QUORUMQUEST_SERVER_REFLECTION": "false",
            "QUORUMQUEST_AUTH_TOKENSFILE": "/tls/tokens.yaml",
            "QUORUMQUEST_AUTH_RULES": '[{"identity": "a-*", "locks": "a/*", "allow": ["lock"]}]',
            "QUORUMQUEST_AUTH_QUOTAS_MAXLEASESPERIDENTITY": "7",
            "QUORUMQUEST_AUTH_QUOTAS_CALLS_PER_SECOND_PER_IDENTITY": "2.5",
            "QUORUMQUEST_OBSERVABILITY_PROMETHEUSADDRESS": "10.0.0.1",
        },
    )
    assert settings.server.tls == TlsSettings(
        certFile="/tls/server.crt", keyFile="/tls/server.key", clientCaFile="/tls/ca.crt"
    )
    assert settings.server.reflection is False
    assert settings.auth.tokensFile == "/tls/tokens.yaml"
    assert settings.auth.rules == [AuthRule(identity="a-*", locks="a/*", allow=["lock"])]
    assert settings.auth.quotas.maxLeasesPerIdentity == 7
    assert settings.auth.quotas.callsPerSecondPerIdentity == 2.5
    assert settings.observability.prometheusAddress == "10.0.0.1"
    assert settings.auth_on


def test_an_unknown_nested_key_from_the_environment_names_it() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, {"QUORUMQUEST_SERVER_TLS_CERTFILES": "x"})
    assert error.value.path == "server.tls.certfiles"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"tls": {"certFile": "a.crt"}}}, "server.tls.keyFile"),
        ({"server": {"tls": {"keyFile": "a.key"}}}, "server.tls.certFile"),
        ({"server": {"tls": {"clientCaFile": "ca.crt"}}}, "server.tls.clientCaFile"),
        ({"auth": {"quotas": {"maxLeasesPerIdentity": 3}}}, "auth.quotas.maxLeasesPerIdentity"),
        ({"observability": {"prometheusAddress": "host:9464"}}, "observability.prometheusAddress"),
        ({"server": {"tls": {"certfile": "a"}}}, "server.tls.certfile"),
    ],
)
def test_security_keys_that_do_not_fit_together_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(raw)
    assert error.value.path == key


def test_auth_is_on_with_a_tokens_file_a_client_ca_or_any_rule() -> None:
    assert not validate({}).auth_on
    assert validate({"auth": {"tokensFile": "t.yaml"}}).auth_on
    assert validate({"auth": {"rules": [{"identity": "a", "allow": ["read"]}]}}).auth_on
    mtls = {"certFile": "s.crt", "keyFile": "s.key", "clientCaFile": "ca.crt"}
    assert validate({"server": {"tls": mtls}}).auth_on


@pytest.mark.parametrize(
    ("server_address", "prometheus_address", "host"),
    [
        ("127.0.0.1:5050", "", "127.0.0.1"),
        ("localhost:5050", "", "localhost"),
        (":5050", "", "0.0.0.0"),
        ("[::1]:5050", "", "::1"),
        ("127.0.0.1:5050", "0.0.0.0", "0.0.0.0"),
        ("127.0.0.1:5050", "[::]", "::"),
    ],
)
def test_prometheus_binds_the_services_host_unless_told(
    server_address: str, prometheus_address: str, host: str
) -> None:
    settings = validate(
        {
            "serverAddress": server_address,
            "observability": {"prometheusAddress": prometheus_address},
        }
    )
    assert settings.observability.prometheus_host(settings.serverAddress) == host
