"""A client generated from the frozen contract alone (plain grpcio-tools stubs) works unchanged."""

from __future__ import annotations

import importlib
import shutil
import sys
import uuid
from pathlib import Path

import grpc
import grpc_tools
import pytest
from grpc_tools import protoc

FROZEN = Path(__file__).parent.parent / "fixtures" / "frozen_contract"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory):
    """The `*_pb2` and `*_pb2_grpc` modules an existing client would have been built from."""
    out = tmp_path_factory.mktemp("frozen_stubs")
    package = out / "frozen_v1"
    package.mkdir()
    shutil.copy(FROZEN / "quorum_quest_api.proto", package)
    include = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{out}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(package / "quorum_quest_api.proto"),
        ]
    )
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module("frozen_v1.quorum_quest_api_pb2"),
            importlib.import_module("frozen_v1.quorum_quest_api_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


async def test_frozen_client_acquires_keeps_alive_and_releases(frozen, address: str) -> None:
    pb2, pb2_grpc = frozen
    domain = f"frozen-{uuid.uuid4().hex[:8]}"
    options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb2_grpc.LeaderElectionServiceStub(channel)
        lock = {"service": "legacy", "domain": domain}
        acquired = await stub.TryAcquireLock(
            pb2.TryAcquireLockRequest(client_id="old-go", ttl=10, **lock)
        )
        assert acquired.is_leader
        again = await stub.TryAcquireLock(
            pb2.TryAcquireLockRequest(client_id="old-go", ttl=10, **lock)
        )
        assert again.is_leader  # the holder's re-acquire refreshes
        other = await stub.TryAcquireLock(
            pb2.TryAcquireLockRequest(client_id="other", ttl=10, **lock)
        )
        assert not other.is_leader
        alive = await stub.KeepAlive(pb2.KeepAliveRequest(client_id="old-go", ttl=10, **lock))
        assert alive.lease_length.seconds == 10
        refused = await stub.KeepAlive(pb2.KeepAliveRequest(client_id="other", ttl=10, **lock))
        assert refused.lease_length.seconds == -1
        await stub.ReleaseLock(pb2.ReleaseLockRequest(client_id="old-go", **lock))
        after = await stub.TryAcquireLock(
            pb2.TryAcquireLockRequest(client_id="other", ttl=10, **lock)
        )
        assert after.is_leader


async def test_frozen_client_sees_real_errors_not_false_leadership(frozen, address: str) -> None:
    pb2, pb2_grpc = frozen
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb2_grpc.LeaderElectionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.TryAcquireLock(
                pb2.TryAcquireLockRequest(service="", domain="d", client_id="c")
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
