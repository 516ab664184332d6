"""Hot reload of a real file: edited in place, replaced atomically, swapped like a ConfigMap."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from loguru import logger

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.config.loader import load_settings
from quorum_quest.server import LockServer, running_server
from tests.backends import free_port

BASE = """\
serverAddress: "127.0.0.1:0"
server: {{healthInterval: 0.2, shutdownGrace: 1, stateLossGrace: 0}}
logger: {{level: {level}}}
{extra}
"""


def config_text(level: str = "INFO", extra: str = "") -> str:
    return BASE.format(level=level, extra=extra)


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def write_atomically(file: Path, text: str) -> None:
    temporary = file.with_name(f".{file.name}.{uuid.uuid4().hex}")
    temporary.write_text(text)
    os.replace(temporary, file)


async def acquire_default_ttl(server: LockServer) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = await LeaderElectionStub(channel).try_acquire_lock(
            pb.TryAcquireLockRequest(service="s", domain=uuid.uuid4().hex, client_id="c")
        )
    return answer.lease_length.total_seconds()


async def test_in_place_write_applies_the_new_default_ttl(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        assert await acquire_default_ttl(server) == 15
        await asyncio.sleep(0.3)  # let the watch start
        file.write_text(config_text(extra="store: {ttl: 7}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 7000)
        assert await acquire_default_ttl(server) == 7
        assert server.runtime.reloads["applied"] == 1
        assert server.runtime.last_reload == "applied"


async def test_atomic_rename_over_the_file_is_seen(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(
        config_text(extra="server: {maxTtl: 3600, healthInterval: 0.2, stateLossGrace: 0}")
    )
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        write_atomically(
            file, config_text(extra="server: {maxTtl: 60, healthInterval: 0.2, stateLossGrace: 0}")
        )
        await wait_until(lambda: server.runtime.current.policy.max_ttl_ms == 60_000)


async def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes mounts config.yaml -> ..data/config.yaml and swaps ..data atomically."""
    first, second = tmp_path / "..2026_11_26_a", tmp_path / "..2026_11_26_b"
    first.mkdir()
    (first / "config.yaml").write_text(config_text(extra="store: {ttl: 15}"))
    (tmp_path / "..data").symlink_to(first.name)
    file = tmp_path / "config.yaml"
    file.symlink_to("..data/config.yaml")
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        second.mkdir()
        (second / "config.yaml").write_text(config_text(extra="store: {ttl: 9}"))
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 9000)


async def test_invalid_file_keeps_the_running_config_until_a_valid_save(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        file.write_text(config_text(extra="store: {ttl: fifteen}"))
        await wait_until(lambda: server.runtime.reloads["rejected"] == 1)
        assert "store.ttl" in server.runtime.last_reload
        assert server.runtime.current.policy.default_ttl_ms == 15_000
        assert await acquire_default_ttl(server) == 15
        file.write_text(config_text(extra="store: {ttl: 5, bogus: 1}"))
        await wait_until(lambda: server.runtime.reloads["rejected"] == 2)
        assert "store.bogus: unknown key" in server.runtime.last_reload
        file.write_text(config_text(extra="store: {ttl: 5}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 5000)


async def test_environment_overrides_keep_winning_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUORUMQUEST_STORE_TTL", "20")
    file = tmp_path / "config.yaml"
    file.write_text(
        config_text(
            extra="store: {ttl: 15}\nserver: {maxTtl: 3600, healthInterval: 0.2, stateLossGrace: 0}"
        )
    )
    async with running_server(load_settings(file), file) as server:
        assert server.runtime.current.policy.default_ttl_ms == 20_000
        await asyncio.sleep(0.3)
        file.write_text(
            config_text(
                extra="store: {ttl: 3}\n"
                "server: {maxTtl: 100, healthInterval: 0.2, stateLossGrace: 0}"
            )
        )
        await wait_until(lambda: server.runtime.current.policy.max_ttl_ms == 100_000)
        assert server.runtime.current.policy.default_ttl_ms == 20_000


async def test_logger_level_and_format_are_reapplied(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text("INFO"))
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        file.write_text(config_text("ERROR"))
        await wait_until(lambda: server.runtime.current.settings.logger.level == "ERROR")
        logger.info("hidden-line")
        file.write_text(config_text("DEBUG"))
        await wait_until(lambda: server.runtime.current.settings.logger.level == "DEBUG")
        logger.debug("shown-line")
        file.write_text(config_text("DEBUG").replace("logger: {", "logger: {format: json, "))
        await wait_until(lambda: server.runtime.current.settings.logger.format == "json")
        logger.info("json-line")
        file.write_text(config_text("INFO"))
        await wait_until(lambda: server.runtime.current.settings.logger.format == "text")
    err = capfd.readouterr().err
    assert "shown-line" in err
    assert "hidden-line" not in err
    json_lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line["message"] == "json-line" for line in json_lines)


async def test_changed_server_address_is_logged_as_needing_a_restart(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text())
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        port = server.port
        file.write_text(config_text().replace("127.0.0.1:0", f"127.0.0.1:{free_port()}"))
        await wait_until(lambda: server.runtime.reloads["applied"] == 1)
        assert server.port == port
    assert "needs a restart" in capfd.readouterr().err


async def test_observability_settings_are_reapplied(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text())
    async with running_server(load_settings(file, {}), file) as server:
        before = server.runtime.current.telemetry
        assert not before.tracing
        await asyncio.sleep(0.3)
        file.write_text(
            config_text(
                extra="observability: "
                f'{{otelEndpoint: "127.0.0.1:{free_port()}", traceSampleRatio: 0.5}}'
            )
        )
        await wait_until(lambda: server.runtime.current.telemetry is not before)
        after = server.runtime.current.telemetry
        assert after.tracing and after.settings.traceSampleRatio == 0.5


@pytest.mark.redis
async def test_store_swap_moves_holders_to_the_new_store(tmp_path: Path, redis_url: str) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text())
    async with running_server(load_settings(file, {}), file) as server:
        old_store = server.runtime.current.store
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = LeaderElectionStub(channel)
            lock = {"service": "s", "domain": uuid.uuid4().hex, "client_id": "holder"}
            assert (await stub.try_acquire_lock(pb.TryAcquireLockRequest(**lock))).is_leader
            await asyncio.sleep(0.3)
            prefix = f"swap-{uuid.uuid4().hex[:8]}"
            file.write_text(
                config_text(
                    extra="backend: {type: redis}\n"
                    f"store: {{url: '{redis_url}', key_prefix: {prefix}}}"
                )
            )
            await wait_until(lambda: server.runtime.current.store.backend == "redis")
            # The lease lived in the old store: the holder learns at its next keep-alive...
            answer = await stub.keep_alive(pb.KeepAliveRequest(**lock))
            assert answer.lease_length.total_seconds() == -1
            # ...and acquires again in the new one.
            assert (await stub.try_acquire_lock(pb.TryAcquireLockRequest(**lock))).is_leader
        assert server.runtime.current.store is not old_store


async def test_store_that_cannot_connect_is_rejected_and_the_old_one_stays(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text())
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        file.write_text(
            config_text(
                extra=f"backend: {{type: redis}}\nstore: {{port: {free_port()}, timeout: 0.3}}"
            )
        )
        await wait_until(lambda: server.runtime.reloads["rejected"] == 1)
        assert "redis store unavailable" in server.runtime.last_reload
        assert server.runtime.current.store.backend == "memory"
        assert await acquire_default_ttl(server) == 15


BAD_CONTENTS = {
    "non-utf8": (b'logger: {level: "\xff\xfe"}\n', "not UTF-8"),
    "binary": (bytes(range(256)) * 16, "not UTF-8"),
    "nul-bytes": (b"\x00\x01\x02\x03" * 64, "not a text file"),
    "deep": (b"[" * 50_000, "nests too deeply"),
    "inf": (config_text(extra="server: {maxTtl: .inf}").encode(), "server.maxTtl"),
    "nan": (config_text(extra="store: {ttl: 5}\nserver: {maxTtl: .nan}").encode(), "server.maxTtl"),
    "huge": (config_text(extra="observability: {metricsInterval: 1e300}").encode(), "at most"),
}


async def test_the_watcher_reports_every_unreadable_file_and_applies_the_next_valid_save(
    tmp_path: Path,
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        for rejected, (content, reason) in enumerate(BAD_CONTENTS.values(), start=1):
            file.write_bytes(content)
            await wait_until(lambda n=rejected: server.runtime.reloads["rejected"] == n, 30)
            assert server.runtime.last_reload.startswith("rejected: ")
            assert reason in server.runtime.last_reload
            assert "\n" not in server.runtime.last_reload
            assert server.runtime.current.policy.default_ttl_ms == 15_000
        file.write_text(config_text(extra="store: {ttl: 5}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 5000, 30)
        assert server.runtime.last_reload == "applied"


async def test_the_watcher_survives_a_failure_while_applying_a_reload(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        apply = server.apply
        calls = 0

        async def fails_once(new):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom while applying")
            return await apply(new)

        server.apply = fails_once  # type: ignore[method-assign]
        await asyncio.sleep(0.3)
        file.write_text(config_text(extra="store: {ttl: 9}"))
        await wait_until(lambda: server.runtime.reloads["rejected"] == 1, 30)
        assert "boom while applying" in server.runtime.last_reload
        assert server.runtime.current.policy.default_ttl_ms == 15_000
        file.write_text(config_text(extra="store: {ttl: 5}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 5000, 30)


async def test_the_watcher_survives_an_unexpected_failure_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quorum_quest.config import watch

    calls = 0

    def fails_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom while loading")
        return load_settings(*args, **kwargs)

    monkeypatch.setattr(watch, "load_settings", fails_once)
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        await asyncio.sleep(0.3)
        file.write_text(config_text(extra="store: {ttl: 9}"))
        await wait_until(lambda: server.runtime.reloads["rejected"] == 1, 30)
        assert "boom while loading" in server.runtime.last_reload
        file.write_text(config_text(extra="store: {ttl: 5}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 5000, 30)


async def test_the_watch_starts_again_when_watching_the_directory_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quorum_quest.server import app

    real = app.watch_settings
    starts = 0

    def fails_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal starts
        starts += 1
        if starts == 1:
            raise OSError("inotify watch limit reached")
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "watch_settings", fails_first)
    file = tmp_path / "config.yaml"
    file.write_text(config_text(extra="store: {ttl: 15}"))
    async with running_server(load_settings(file, {}), file) as server:
        await wait_until(lambda: starts == 2, 30)
        await asyncio.sleep(0.3)
        file.write_text(config_text(extra="store: {ttl: 5}"))
        await wait_until(lambda: server.runtime.current.policy.default_ttl_ms == 5000, 30)
