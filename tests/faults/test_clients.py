"""The client processes' recording and spec, without a service."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from quorum_quest._rpc import pb
from tests.faults.clients import ClientSpec, Plan, ProcessSpec, Recorded
from tests.faults.history import RELEASE, Call, Recorder, read_events

pytestmark = pytest.mark.faults


async def _never_answered(request: Any, *, timeout: float | None = None) -> Any:
    await asyncio.sleep(3600)


async def test_a_release_abandoned_by_a_cancelled_caller_is_recorded(tmp_path: Path) -> None:
    """It may have been served: it must end the belief in the history (at its send time)."""
    recorder = Recorder(tmp_path / "calls.jsonl")
    release = Recorded(_never_answered, RELEASE, "a", "127.0.0.1:1", recorder)
    request = pb.ReleaseLockRequest(service="s", domain="d", client_id="a", fencing_token=7)
    task = asyncio.create_task(release(request))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorder.close()
    [call] = read_events(tmp_path / "calls.jsonl")
    assert isinstance(call, Call)
    assert (call.op, call.ok, call.code, call.token) == (RELEASE, False, "CANCELLED", 7)


def test_a_process_spec_survives_its_json() -> None:
    spec = ProcessSpec(
        out="out.jsonl",
        ready="ready",
        go="go",
        seed=7,
        plan=Plan("s", "d", 1.5, hold=(0.1, 1.5), poll=(0.05, 0.1)),
        clients=(ClientSpec("p0-raw0", "raw", ("127.0.0.1:1", "127.0.0.1:2")),),
    )
    assert ProcessSpec.loads(spec.dumps()) == spec
    assert spec.clients[0].target == "ipv4:127.0.0.1:1,127.0.0.1:2"
