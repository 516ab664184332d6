"""`quorum-quest watch`: one line per leadership change of a lock, or of every lock of
a service, from the SDK's watch (`QuorumQuestClient.watch()`), which resumes after a
broken stream without missing a change and flags a gap where it may have."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from quorum_quest.client import LeaderChange
from quorum_quest.command._connect import make_client
from quorum_quest.command._exit import Exit, say
from quorum_quest.command._interrupts import Interrupts

# How long a watch may go without its first answer before it says so on stderr.
FIRST_ANSWER_S = 5.0


def line(change: LeaderChange, as_json: bool) -> str:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    remaining = round(change.remaining.total_seconds(), 3)
    if as_json:
        return json.dumps(
            {
                "time": now,
                "service": change.service,
                "domain": change.domain,
                "kind": change.kind,
                "client_id": change.client_id,
                "fencing_token": change.fencing_token,
                "remaining_s": remaining,
                "gap": change.gap,
            }
        )
    text = f"{now} {change.service}/{change.domain} {change.kind}"
    if change.client_id:
        text += f" {change.client_id} fencing_token={change.fencing_token}"
        text += f" remaining={remaining:.1f}s"
    return text + (" gap (changes before this one may have been missed)" if change.gap else "")


async def run(options: argparse.Namespace, interrupts: Interrupts) -> int:
    """Print changes until interrupted. The watch waits for an unreachable service rather
    than failing, so a silent start is pointed out once on stderr."""
    silence = options.timeout or FIRST_ANSWER_S
    notice = asyncio.get_running_loop().call_later(
        silence, say, f"no answer from {options.address} after {silence:g} s; still trying"
    )
    try:
        async with make_client(options, options.service, options.domain or "") as client:
            watch = client.watch
            changes = watch() if options.domain else watch(service=options.service)
            async for change in changes:
                notice.cancel()
                print(line(change, options.json), flush=True)
    finally:
        notice.cancel()
    return Exit.OK
