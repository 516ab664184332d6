"""Loading the config file and environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quorum_quest._env import CLIENT_VARIABLES
from quorum_quest.config.loader import find_config_file, load_settings
from quorum_quest.errors import ConfigError
from quorum_quest.server.runtime import LeasePolicy
from quorum_quest.stores import registry
from quorum_quest.stores.memory import MemoryStore

SEED = Path(__file__).parent.parent / "fixtures" / "seed"


def load(text: str, tmp_path: Path, environ: dict[str, str] | None = None):
    file = tmp_path / "config.yaml"
    file.write_text(text)
    return load_settings(file, environ or {})


@pytest.mark.parametrize("name", ["config.yaml", "redis.yaml"])
def test_the_seed_readme_examples_load_as_written(name: str) -> None:
    settings = load_settings(SEED / name, {})
    store = settings.store_settings()
    assert settings.backend.type == "redis"
    assert (store.host, store.port, store.db, store.ttl, store.key_prefix) == (
        "localhost",
        6379,
        0,
        15,
        "lock",
    )


def test_seed_config_top_level_keys() -> None:
    settings = load_settings(SEED / "config.yaml", {})
    assert settings.serverAddress == "localhost:5050"
    assert settings.logger.level == "INFO"
    assert settings.observability.otelEndpoint == "localhost:4317"
    assert settings.observability.serviceName == "quorum-quest"


def test_no_file_means_memory_store_on_localhost_5050() -> None:
    settings = load_settings(None, {})
    assert settings.serverAddress == "localhost:5050"
    assert settings.backend.type == "memory"


def test_the_seed_readme_environment_overrides_win_over_the_file() -> None:
    settings = load_settings(
        SEED / "config.yaml",
        {
            "QUORUMQUEST_SERVERADDRESS": "0.0.0.0:5050",
            "QUORUMQUEST_BACKEND_TYPE": "redis",
            "QUORUMQUEST_STORE_HOST": "redis.example.com",
            "QUORUMQUEST_STORE_PORT": "6379",
            "QUORUMQUEST_STORE_TTL": "30",
            "QUORUMQUEST_STORE_KEY_PREFIX": "other",
            "QUORUMQUEST_LOGGER_LEVEL": "LOG_LEVELS_DEBUGLEVEL",
            "QUORUMQUEST_SERVER_MAXTTL": "60",
        },
    )
    store = settings.store_settings()
    assert settings.serverAddress == "0.0.0.0:5050"
    assert (store.host, store.port, store.ttl, store.key_prefix) == (
        "redis.example.com",
        6379,
        30,
        "other",
    )
    assert settings.logger.level == "DEBUG"
    assert LeasePolicy.from_settings(settings) == LeasePolicy(30_000, 60_000)


def test_environment_key_matching_ignores_case_and_underscores(tmp_path: Path) -> None:
    settings = load(
        "backend: {type: redis}\nstore: {key_prefix: a}\n",
        tmp_path,
        {"QUORUMQUEST_STORE_KEYPREFIX": "b", "QUORUMQUEST_STORE_MAX_CONNECTIONS": "7"},
    )
    assert settings.store == {"key_prefix": "b", "max_connections": "7"}
    assert settings.store_settings().max_connections == 7


def test_environment_can_switch_the_backend(tmp_path: Path) -> None:
    settings = load(
        "store: {ttl: 5}\n",
        tmp_path,
        {"QUORUMQUEST_BACKEND_TYPE": "redis", "QUORUMQUEST_STORE_PORT": "7000"},
    )
    assert settings.backend.type == "redis"
    assert settings.store_settings().port == 7000


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("LOG_LEVELS_DEBUGLEVEL", "DEBUG"),
        ("LOG_LEVELS_INFOLEVEL", "INFO"),
        ("LOG_LEVELS_WARNLEVEL", "WARNING"),
        ("LOG_LEVELS_ERRORLEVEL", "ERROR"),
        ("debug", "DEBUG"),
        ("warn", "WARNING"),
    ],
)
def test_log_levels_accept_the_original_names(tmp_path: Path, level: str, expected: str) -> None:
    assert load(f"logger: {{level: {level}}}\n", tmp_path).logger.level == expected


@pytest.mark.parametrize(
    ("text", "environ", "path", "reason"),
    [
        ("serverAdress: x\n", {}, "serverAdress", "unknown key"),
        ("backend: {type: redis}\nstore: {port: nine}\n", {}, "store.port", "valid integer"),
        ("backend: {type: redis}\nstore: {hots: x}\n", {}, "store.hots", "unknown key"),
        ("backend: {type: cassandra}\n", {}, "backend.type", "unknown backend 'cassandra'"),
        ("logger: {level: loud}\n", {}, "logger.level", "unknown level"),
        ("logger: {format: xml}\n", {}, "logger.format", "'text' or 'json'"),
        ("server: {maxTtl: 0}\n", {}, "server.maxTtl", "greater than 0"),
        ("store: {ttl: 7200}\n", {}, "store.ttl", "server.maxTtl"),
        ("backend: {type: redis}\nstore: {key_prefix: 'a{b'}\n", {}, "store.key_prefix", "'{'"),
        (
            "",
            {"QUORUMQUEST_STORE_PORT": "x", "QUORUMQUEST_BACKEND_TYPE": "redis"},
            "store.port",
            "integer",
        ),
        ("", {"QUORUMQUEST_NOPE": "x"}, "QUORUMQUEST_NOPE", "no known key"),
        ("server: {workers: 2}\n", {}, "server.workers", "memory store"),
        ("server: {workers: 0}\n", {}, "server.workers", "greater than 0"),
        (
            'serverAddress: "127.0.0.1:0"\nbackend: {type: redis}\nserver: {workers: 2}\n',
            {},
            "server.workers",
            "fixed port",
        ),
        (
            "backend: {type: redis}\nserver: {workers: 2}\nobservability: {prometheusPort: 9464}\n",
            {},
            "observability.prometheusPort",
            "server.workers",
        ),
        ('serverAddress: "localhost"\n', {}, "serverAddress", "no port"),
        ('serverAddress: "127.0.0.1:70000"\n', {}, "serverAddress", "65535"),
        ('serverAddress: "127.0.0.1:-1"\n', {}, "serverAddress", "not a port"),
        ('serverAddress: "127.0.0.1:"\n', {}, "serverAddress", "not a port"),
        ('serverAddress: "::1"\n', {}, "serverAddress", "brackets"),
        ('serverAddress: "[::1]"\n', {}, "serverAddress", "no port"),
        ("", {"QUORUMQUEST_SERVERADDRESS": "localhost"}, "serverAddress", "no port"),
        ("server: {maxTtl: .inf}\n", {}, "server.maxTtl", "finite"),
        ("server: {maxTtl: .nan}\n", {}, "server.maxTtl", "finite"),
        ("server: {stateLossGrace: .inf}\n", {}, "server.stateLossGrace", "finite"),
        ("", {"QUORUMQUEST_SERVER_MAXTTL": "1e400"}, "server.maxTtl", "finite"),
        ("", {"QUORUMQUEST_SERVER_SHUTDOWNGRACE": "nan"}, "server.shutdownGrace", "finite"),
        ("server: {maxTtl: 1e300}\n", {}, "server.maxTtl", "at most"),
        ("server: {healthInterval: 1e12}\n", {}, "server.healthInterval", "at most"),
        ("observability: {metricsInterval: .inf}\n", {}, "observability.metricsInterval", "finite"),
        ("backend: {type: redis}\nstore: {timeout: .inf}\n", {}, "store.timeout", "finite"),
        (
            "backend: {type: scylladb}\nstore: {clock_skew_margin: 1e300}\n",
            {},
            "store.clock_skew_margin",
            "at most",
        ),
        (
            "",
            {"QUORUMQUEST_BACKEND_TYPE": "scylladb", "QUORUMQUEST_STORE_ENDPOINTS": "[bad json"},
            "QUORUMQUEST_STORE_ENDPOINTS",
            "JSON",
        ),
        (
            "",
            {"QUORUMQUEST_BACKEND_TYPE": "redis", "QUORUMQUEST_STORE_SENTINELS": '{"a": 1'},
            "QUORUMQUEST_STORE_SENTINELS",
            "JSON",
        ),
        ("server: [1, 2]\n", {"QUORUMQUEST_SERVER_MAXTTL": "30"}, "server", "mapping"),
        ("server: 5\n", {"QUORUMQUEST_SERVER_MAXTTL": "30"}, "server", "mapping"),
        ("backend: redis\n", {"QUORUMQUEST_BACKEND_TYPE": "redis"}, "backend", "mapping"),
        ("store: [a]\n", {"QUORUMQUEST_STORE_TTL": "5"}, "store", "mapping"),
    ],
)
def test_bad_config_names_the_key_path(
    tmp_path: Path, text: str, environ: dict[str, str], path: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text, tmp_path, environ)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 3"):
        load("backend:\n  type: redis\n bad: [\n", tmp_path)


def test_a_directory_is_searched_in_order(tmp_path: Path) -> None:
    (tmp_path / "quorum-quest.yml").write_text("")
    assert find_config_file(tmp_path) == tmp_path / "quorum-quest.yml"
    (tmp_path / "config.yml").write_text("")
    assert find_config_file(tmp_path) == tmp_path / "config.yml"
    (tmp_path / "config.yaml").write_text("")
    assert find_config_file(tmp_path) == tmp_path / "config.yaml"


def test_a_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_config_file(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("alias", "canonical"), [("scylla", "scylladb"), ("dynamo", "dynamodb")])
def test_backend_aliases_resolve_to_the_canonical_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alias: str, canonical: str
) -> None:
    monkeypatch.setitem(registry._registered, canonical, MemoryStore)
    assert load(f"backend: {{type: {alias}}}\n", tmp_path).backend.type == canonical


def test_the_seed_scylladb_example_loads_as_written() -> None:
    settings = load_settings(SEED / "scylladb.yaml", {})
    store = settings.store_settings()
    assert settings.backend.type == "scylladb"
    assert (store.keyspace, store.table, store.ttl) == ("quorumquest", "services", 15)
    assert list(store.endpoints) == ["localhost:9042"]


def test_the_seed_dynamodb_example_loads_as_written() -> None:
    settings = load_settings(SEED / "dynamodb.yaml", {})
    store = settings.store_settings()
    assert settings.backend.type == "dynamodb"
    assert (store.region, store.table, store.ttl) == ("us-west-2", "quorumquest", 15)
    assert store.endpoint_url == "https://dynamodb.us-west-2.amazonaws.com"


def test_seed_environment_names_reach_backend_specific_keys() -> None:
    settings = load_settings(
        SEED / "dynamodb.yaml",
        {"QUORUMQUEST_STORE_ACCESSKEYID": "AKIA1", "QUORUMQUEST_STORE_SECRETACCESSKEY": "s"},
    )
    assert settings.store["accessKeyId"] == "AKIA1"
    assert settings.store_settings().accessKeyId == "AKIA1"


def test_workers_auto_means_one_per_core(tmp_path: Path) -> None:
    import os

    settings = load("backend: {type: redis}\nserver: {workers: auto}\n", tmp_path)
    assert settings.server.workers == (os.cpu_count() or 1)


def test_the_state_loss_grace_period_defaults_to_the_longest_lease(tmp_path: Path) -> None:
    assert load("server: {maxTtl: 20}\n", tmp_path).server.state_loss_grace == 20
    assert load("server: {stateLossGrace: auto}\n", tmp_path).server.state_loss_grace == 60
    settings = load("", tmp_path, {"QUORUMQUEST_SERVER_STATELOSSGRACE": "0"})
    assert settings.server.state_loss_grace == 0


def test_a_negative_grace_period_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.stateLossGrace"):
        load("server: {stateLossGrace: -1}\n", tmp_path)


def test_an_explicit_directory_without_a_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        find_config_file(tmp_path)


def test_without_a_path_a_missing_default_config_is_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_file(None) is None
    (tmp_path / "config").mkdir()
    assert find_config_file(None) is None
    (tmp_path / "config" / "config.yml").write_text("")
    assert find_config_file(None) == Path("config") / "config.yml"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'logger: {level: "\xff"}\n', "is not UTF-8 text (line 1"),
        (bytes(range(256)), "is not UTF-8 text"),
        (b"a: 1\n\x00\x01", "is not a text file"),
        (b"[" * 100_000, "nests too deeply"),
        (b"{" * 50_000, "nests too deeply"),
        (b"port: " + b"9" * 5000 + b"\n", "cannot be read"),
    ],
    ids=["non-utf8", "binary", "nul-bytes", "deep-list", "deep-map", "huge-int"],
)
def test_an_unreadable_file_is_a_config_error_naming_the_file(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    file = tmp_path / "config.yaml"
    file.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(file, {})
    assert str(file) in str(caught.value)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("localhost:5050", "localhost", 5050),
        (":5050", "", 5050),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::1]:5050", "::1", 5050),
        ("[::]:65535", "::", 65535),
        ("0.0.0.0:5050", "0.0.0.0", 5050),
    ],
)
def test_server_addresses_with_a_port_are_accepted(
    tmp_path: Path, address: str, host: str, port: int
) -> None:
    from quorum_quest.config.settings import split_address

    assert load(f'serverAddress: "{address}"\n', tmp_path).serverAddress == address
    assert split_address(address) == (host, port)


def test_environment_values_that_look_like_json_stay_text_for_text_keys(tmp_path: Path) -> None:
    settings = load(
        "backend: {type: redis}\n",
        tmp_path,
        {"QUORUMQUEST_SERVERADDRESS": "[::1]:5050", "QUORUMQUEST_STORE_PASSWORD": '{"x": 1}'},
    )
    assert settings.serverAddress == "[::1]:5050"
    assert settings.store_settings().password == '{"x": 1}'


def test_environment_lists_take_json_or_comma_separated_addresses(tmp_path: Path) -> None:
    environ = {"QUORUMQUEST_BACKEND_TYPE": "scylladb", "QUORUMQUEST_STORE_CREATE_SCHEMA": "false"}
    for value, expected in (
        ('["a:9042", "b:9042"]', ["a:9042", "b:9042"]),
        ("a:9042,b:9042", ["a:9042", "b:9042"]),
        ("[::1]:9042,[::2]:9042", ["[::1]:9042", "[::2]:9042"]),
    ):
        settings = load("", tmp_path, {**environ, "QUORUMQUEST_STORE_ENDPOINTS": value})
        assert list(settings.store_settings().endpoints) == expected


def test_a_config_with_several_mistakes_names_every_one_with_its_key_path(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        load("a: 1\nb: 2\nc: 3\nd: 4\ne: 5\n", tmp_path)
    assert caught.value.path == "a"
    assert str(caught.value).splitlines() == [f"{key}: unknown key" for key in "abcde"]
    assert caught.value.mistakes == tuple((key, "unknown key") for key in "abcde")


def test_a_typo_next_to_a_wrong_type_names_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load("serverAdress: x\nserver: {maxTtl: nine}\n", tmp_path)
    paths = [path for path, _ in caught.value.mistakes]
    assert sorted(paths) == ["server.maxTtl", "serverAdress"]
    assert ("serverAdress", "unknown key") in caught.value.mistakes


def test_store_keys_are_checked_even_when_another_section_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            "serverAdress: x\nbackend: {type: redis}\nstore: {hots: x, port: nine}\n"
            "observability: {metricsInterval: .inf}\n",
            tmp_path,
        )
    mistakes = dict(caught.value.mistakes)
    assert mistakes["serverAdress"] == "unknown key"
    assert mistakes["store.hots"] == "unknown key"
    assert "valid integer" in mistakes["store.port"]
    assert "finite" in mistakes["observability.metricsInterval"]


def test_checks_across_sections_are_named_with_the_other_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load("store: {ttl: 7200}\nserver: {workers: 2}\n", tmp_path)
    assert [path for path, _ in caught.value.mistakes] == ["server.workers", "store.ttl"]


def test_environment_mistakes_are_named_with_those_of_the_file(tmp_path: Path) -> None:
    environ = {"QUORUMQUEST_NOPE": "x", "QUORUMQUEST_SERVER_MAXTTL": "nine"}
    with pytest.raises(ConfigError) as caught:
        load("serverAdress: x\n", tmp_path, environ)
    paths = [path for path, _ in caught.value.mistakes]
    assert paths[0] == "QUORUMQUEST_NOPE"
    assert sorted(paths[1:]) == ["server.maxTtl", "serverAdress"]


def test_a_section_refused_for_a_variable_is_named_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load("server: [1, 2]\n", tmp_path, {"QUORUMQUEST_SERVER_MAXTTL": "30"})
    assert [path for path, _ in caught.value.mistakes] == ["server"]


CLIENT_ENVIRONMENT = {
    "QUORUMQUEST_ADDRESS": "localhost:5050",
    "QUORUMQUEST_TOKEN": "secret",
    "QUORUMQUEST_TOKEN_FILE": "/run/secrets/token",
    "QUORUMQUEST_TLS": "true",
    "QUORUMQUEST_TLS_CA_FILE": "/etc/ca.pem",
    "QUORUMQUEST_TLS_CERT_FILE": "/etc/client.pem",
    "QUORUMQUEST_TLS_KEY_FILE": "/etc/client.key",
    "QUORUMQUEST_TLS_SERVER_NAME": "quorum-quest.example.com",
}


def test_the_clients_variables_are_skipped_by_the_service(tmp_path: Path) -> None:
    assert set(CLIENT_ENVIRONMENT) == set(CLIENT_VARIABLES)
    settings = load('serverAddress: "127.0.0.1:5050"\n', tmp_path, CLIENT_ENVIRONMENT)
    assert settings.serverAddress == "127.0.0.1:5050"
    assert not settings.server.tls.enabled
    assert not settings.auth.tokensFile


def test_an_unknown_variable_is_still_refused_next_to_the_clients_variables(
    tmp_path: Path,
) -> None:
    environ = {**CLIENT_ENVIRONMENT, "QUORUMQUEST_TLS_CAFILE": "/etc/ca.pem"}
    with pytest.raises(ConfigError) as caught:
        load("", tmp_path, environ)
    assert caught.value.mistakes == (
        ("QUORUMQUEST_TLS_CAFILE", "environment variable names no known key"),
    )


@pytest.mark.parametrize(
    ("store", "path", "reason"),
    [
        ({"cluster": True, "sentinels": ["127.0.0.1:26379"]}, "store.cluster", "Sentinel"),
        ({"nodes": ["127.0.0.1:7000"]}, "store.nodes", "cluster: true"),
    ],
)
def test_redis_cluster_keys_that_contradict_each_other_are_named(
    tmp_path: Path, store: dict[str, object], path: str, reason: str
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump({"backend": {"type": "redis"}, "store": store}))
    with pytest.raises(ConfigError) as error:
        load_settings(file, {})
    assert error.value.path == path and reason in error.value.reason
