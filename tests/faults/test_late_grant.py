"""The SDK never acts on a grant whose answer came after its lease ended."""

from __future__ import annotations

import uuid

from quorum_quest import QuorumQuestClient
from quorum_quest.server import running_server
from tests.conftest import make_settings
from tests.faults.proxy import Proxy

TTL_S = 1.0
# Each chunk is held this long each way: the answer comes 2 × DELAY_S after the send.
DELAY_S = 0.8


async def test_a_grant_answered_after_its_lease_ended_is_given_back() -> None:
    domain = f"late-{uuid.uuid4().hex[:8]}"
    async with running_server(make_settings("memory", {})) as server:
        with Proxy(server.port) as proxy:
            proxy.pass_through(delay=DELAY_S)
            slow = QuorumQuestClient(
                "svc", domain, TTL_S, f"127.0.0.1:{proxy.port}", rpc_timeout=10
            )
            async with slow:
                assert not await slow.try_acquire_lock()
                assert slow.lease is None
        # Given back (or expired by now): another client gets it.
        async with QuorumQuestClient("svc", domain, 30, f"127.0.0.1:{server.port}") as other:
            assert await other.try_acquire_lock()
