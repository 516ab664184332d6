"""Health tells whether the store can grant a lock, not only whether it answers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quorum_quest._rpc import SERVICE_NAME, LeaderElectionStub, pb
from quorum_quest.server import running_server
from tests.backends.redis import RedisProcess
from tests.conftest import make_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def until_health(health: health_pb2_grpc.HealthStub, status: int) -> None:
    """Until health answers `status`; generous, since the probe runs every 0.2 s."""
    async with asyncio.timeout(60):
        while True:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            if answer.status == status:
                return
            await asyncio.sleep(0.1)


@pytest.mark.redis
async def test_health_is_not_serving_while_redis_refuses_every_write() -> None:
    """maxmemory reached under noeviction: Redis answers reads and refuses writes."""
    with RedisProcess() as redis_process:
        admin = aioredis.Redis.from_url(redis_process.url)
        settings = make_settings("redis", {"url": redis_process.url})
        try:
            async with running_server(settings) as server:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    stub = LeaderElectionStub(channel)
                    request = pb.TryAcquireLockRequest(service="svc", domain="d", client_id="a")
                    await until_health(health, SERVING)
                    await admin.config_set("maxmemory", 1)  # every write is over the limit
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.try_acquire_lock(request)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    await until_health(health, NOT_SERVING)
                    await admin.config_set("maxmemory", 0)
                    await until_health(health, SERVING)
                    assert (await stub.try_acquire_lock(request)).is_leader
        finally:
            await admin.aclose()
