"""Hot reload never costs a lease it need not, and never makes two leaders.

Each test runs `quorum-quest-service` as a process, as users run it, edits its config
file on disk and talks to it over the wire.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from quorum_quest._rpc import LeaderElectionStub, pb
from tests.backends import free_port
from tests.backends.redis import redis_prefix_in_use

# Generous: the suite must pass on a loaded 2-core machine.
START_BUDGET_S = 30.0
RELOAD_BUDGET_S = 30.0
APPLIED = "config reloaded and applied"
REJECTED = "config reload rejected"


class Service:
    """A `quorum-quest-service` process with a config file it watches."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.file = workdir / "config.yaml"
        self.log = workdir / "service.log"
        self.write(config)
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, config: dict[str, Any]) -> None:
        """Save `config` in place (truncate, then write), as many editors do."""
        self.file.write_text(yaml.safe_dump({**config, "serverAddress": self.address}))

    def lines(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    async def wait_for_line(self, text: str, count: int = 1) -> None:
        """Wait until the log holds `text` `count` times."""
        async with asyncio.timeout(RELOAD_BUDGET_S):
            while self.lines(text) < count:
                assert self.process is not None and self.process.poll() is None, self.tail()
                await asyncio.sleep(0.05)

    async def reload(self, config: dict[str, Any] | str) -> None:
        """Save a new config and wait until the service applied it."""
        applied = self.lines(APPLIED)
        if isinstance(config, str):
            self.file.write_text(config)
        else:
            self.write(config)
        await self.wait_for_line(APPLIED, applied + 1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "quorum_quest.cli", f"-config={self.file}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        await self.wait_for_line("serving on")
        await self.wait_for_line("watching")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@asynccontextmanager
async def service(
    tmp_path: Path, config: dict[str, Any]
) -> AsyncIterator[tuple[Service, LeaderElectionStub]]:
    running = Service(tmp_path, config)
    try:
        await running.start()
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield running, LeaderElectionStub(channel)
    finally:
        running.stop()


def config(**sections: Any) -> dict[str, Any]:
    """A config with quick health probes and short shutdowns, and `sections` on top."""
    base: dict[str, Any] = {
        "server": {"healthInterval": 0.2, "shutdownGrace": 2},
        "logger": {"level": "INFO"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base[name] = {**base.get(name, {}), **values}
        else:
            base[name] = values
    return base


def lock(client_id: str, domain: str, **fields: Any) -> dict[str, Any]:
    return {"service": "reload", "domain": domain, "client_id": client_id, **fields}


async def until_granted(
    stub: LeaderElectionStub, request: pb.TryAcquireLockRequest
) -> pb.TryAcquireLockResponse:
    """Ask until granted: a new store may start in its state-loss grace period."""
    async with asyncio.timeout(START_BUDGET_S + 60):
        while not (answer := await stub.try_acquire_lock(request)).is_leader:
            await asyncio.sleep(0.1)
    return answer


def refused_in_grace(answer: pb.TryAcquireLockResponse) -> bool:
    return not answer.is_leader and answer.leader_id == "" and answer.lease_length.seconds > 0


# -- a store swap -----------------------------------------------------------------------


@pytest.mark.redis
async def test_a_waiter_on_a_swapped_out_store_is_answered_and_never_granted(
    tmp_path: Path, redis_url: str
) -> None:
    """A TryAcquire waiting (wait_ms) on the old store when a reload swaps the store
    must not be granted there later, while the new store serves the same lock.

    The swap must come while the holder's lease on the old store lives (else a grant
    by the old store before the swap is right): on a machine too loaded for that, the
    scenario runs again with a longer lease."""
    prefix = await redis_prefix_in_use(redis_url)
    for attempt, ttl_s in enumerate((3, 6, 12, 24)):
        workdir = tmp_path / str(attempt)
        workdir.mkdir()
        if await waiter_across_a_swap(workdir, redis_url, prefix, ttl_s):
            return
    pytest.fail("no reload was applied within the holder's lease, even of 24 s")


async def waiter_across_a_swap(workdir: Path, redis_url: str, prefix: str, ttl_s: int) -> bool:
    """One run of the scenario above; False when it proves nothing: the swap came after
    the holder's lease may have ended, or the waiter reached only the new store."""
    domain = uuid.uuid4().hex
    async with service(workdir, config(server={"stateLossGrace": 0})) as (running, stub):
        holder_sent = time.monotonic()
        holder = lock("holder", domain, ttl_ms=ttl_s * 1000)
        assert (await stub.try_acquire_lock(pb.TryAcquireLockRequest(**holder))).is_leader
        waiter = asyncio.ensure_future(
            stub.try_acquire_lock(
                pb.TryAcquireLockRequest(
                    **lock("waiter", domain, ttl_ms=3000, wait_ms=4 * ttl_s * 1000)
                ),
                timeout=8 * ttl_s,
            )
        )
        await asyncio.sleep(0.5)  # the waiter's call reaches the old store
        await running.reload(
            config(
                backend={"type": "redis"},
                store={"url": redis_url, "key_prefix": prefix},
                server={"stateLossGrace": 0},
            )
        )
        swapped_by = time.monotonic()
        try:
            answer = await waiter
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "reload" in (exc.details() or "")
            return True
        if swapped_by >= holder_sent + ttl_s:
            return False  # the old store may have granted it before the swap, rightly
        if answer.is_leader and not answer.waited:
            return False  # it reached the service after the swap: the new store granted it
        assert not answer.is_leader, "granted by a store the reload had swapped out"
        return True


@pytest.mark.redis
async def test_a_store_swap_grants_nothing_while_a_lease_of_the_old_store_may_live(
    tmp_path: Path, redis_url: str
) -> None:
    """memory -> a Redis that needs no grace period of its own: the new store must still
    refuse grants for as long as a lease granted by the old store can last."""
    domain = uuid.uuid4().hex
    prefix = await redis_prefix_in_use(redis_url)
    # Grace off at first, so the holder gets the lock at once on the fresh memory store.
    async with service(tmp_path, config(server={"stateLossGrace": 0})) as (running, stub):
        holder = lock("holder", domain, ttl=30)
        assert (await stub.try_acquire_lock(pb.TryAcquireLockRequest(**holder))).is_leader
        await running.reload(
            config(
                backend={"type": "redis"},
                store={"url": redis_url, "key_prefix": prefix},
                server={"stateLossGrace": "auto"},
            )
        )
        rival = await stub.try_acquire_lock(pb.TryAcquireLockRequest(**lock("rival", domain)))
        assert refused_in_grace(rival), rival
        other = lock("other", uuid.uuid4().hex)
        assert refused_in_grace(await stub.try_acquire_lock(pb.TryAcquireLockRequest(**other)))
        status = await stub.get_status(pb.GetStatusRequest())
        assert status.backend == "redis"
        assert status.grace_remaining.total_seconds() > 0


# -- reloads that must keep every lease -----------------------------------------------------


async def test_a_reload_of_the_default_ttl_keeps_every_lease(tmp_path: Path) -> None:
    domain = uuid.uuid4().hex
    start = config(store={"ttl": 2}, server={"stateLossGrace": "auto", "maxTtl": 2})
    async with service(tmp_path, start) as (running, stub):
        holder = lock("holder", domain, ttl=2)
        granted = await until_granted(stub, pb.TryAcquireLockRequest(**holder))
        await running.reload(
            config(store={"ttl": 1}, server={"stateLossGrace": "auto", "maxTtl": 2})
        )
        renewed = await stub.keep_alive(pb.KeepAliveRequest(**holder))
        assert renewed.lease_length.total_seconds() == 2, "the reload dropped the lease"
        assert renewed.fencing_token == granted.fencing_token
        rival = await stub.try_acquire_lock(pb.TryAcquireLockRequest(**lock("rival", domain)))
        assert not rival.is_leader and rival.leader_id == "holder"
        fresh = lock("fresh", uuid.uuid4().hex)
        answer = await stub.try_acquire_lock(pb.TryAcquireLockRequest(**fresh))
        assert answer.is_leader and answer.lease_length.total_seconds() == 1


async def test_an_empty_config_file_is_rejected_and_every_lease_stays(tmp_path: Path) -> None:
    """Editors and config managers truncate before they write: an empty file is not a
    configuration of all defaults."""
    domain = uuid.uuid4().hex
    start = config(server={"stateLossGrace": 0, "maxTtl": 120})
    async with service(tmp_path, start) as (running, stub):
        holder = lock("holder", domain, ttl=100)
        assert (await stub.try_acquire_lock(pb.TryAcquireLockRequest(**holder))).is_leader
        for empty in ("", "\n", "# nothing yet\n"):
            rejected = running.lines(REJECTED)
            running.file.write_text(empty)
            await running.wait_for_line(REJECTED, rejected + 1)
            status = await stub.get_status(pb.GetStatusRequest())
            assert status.last_reload.startswith("rejected"), status.last_reload
            assert "empty" in status.last_reload
            renewed = await stub.keep_alive(pb.KeepAliveRequest(**holder))
            assert renewed.lease_length.total_seconds() == 100, "the empty file was applied"
        assert running.lines(APPLIED) == 0
        await running.reload(config(server={"stateLossGrace": 0, "maxTtl": 110}))
        assert (await stub.get_status(pb.GetStatusRequest())).last_reload == "applied"


async def test_lowering_max_ttl_clamps_renewals_instead_of_refusing_them(tmp_path: Path) -> None:
    domain = uuid.uuid4().hex
    start = config(store={"ttl": 5}, server={"stateLossGrace": 0, "maxTtl": 60})
    async with service(tmp_path, start) as (running, stub):
        holder = lock("holder", domain, ttl=60)
        granted = await stub.try_acquire_lock(pb.TryAcquireLockRequest(**holder))
        assert granted.is_leader
        await running.reload(config(store={"ttl": 5}, server={"stateLossGrace": 0, "maxTtl": 10}))
        renewed = await stub.keep_alive(pb.KeepAliveRequest(**holder))
        assert renewed.lease_length.total_seconds() == 10
        assert renewed.fencing_token == granted.fencing_token
        many = await stub.keep_alive_many(
            pb.KeepAliveManyRequest(
                client_id="holder", locks=[pb.LockRef(service="reload", domain=domain)], ttl=60
            )
        )
        assert many.lease_length.total_seconds() == 10
        assert list(many.fencing_tokens) == [granted.fencing_token]
        # A new grant above the maximum is still an error naming the field.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.try_acquire_lock(
                pb.TryAcquireLockRequest(**lock("new", uuid.uuid4().hex, ttl=60))
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ttl" in (refused.value.details() or "")


async def test_lowering_max_ttl_keeps_the_grace_period_as_long_as_an_old_lease(
    tmp_path: Path,
) -> None:
    """With `stateLossGrace: auto` the grace period covers the longest lease that may
    still be believed in: one granted under the old, larger maxTtl."""
    from quorum_quest.config.loader import load_settings
    from quorum_quest.server import running_server

    file = tmp_path / "config.yaml"
    file.write_text(
        yaml.safe_dump(config(serverAddress="127.0.0.1:0", store={"ttl": 5}, server={"maxTtl": 60}))
    )
    async with running_server(load_settings(file, {}), file) as server:
        assert server.runtime.current.store.grace_ms == 60_000
        await asyncio.sleep(0.5)  # let the watch start
        file.write_text(
            yaml.safe_dump(
                config(serverAddress="127.0.0.1:0", store={"ttl": 5}, server={"maxTtl": 10})
            )
        )
        async with asyncio.timeout(RELOAD_BUDGET_S):
            while server.runtime.current.policy.max_ttl_ms != 10_000:
                await asyncio.sleep(0.05)
        assert server.runtime.current.store.grace_ms == 60_000
