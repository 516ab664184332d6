"""`quorum-quest leader` and `quorum-quest status`: one call each, printed for people
or, with `--json`, as one JSON object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from quorum_quest._rpc import wire
from quorum_quest.command._connect import call, make_client
from quorum_quest.command._exit import Exit
from quorum_quest.command._interrupts import Interrupts


def _seconds(duration: Any) -> float:
    """A `google.protobuf.Duration` in seconds (an unset one is 0)."""
    return round(float(duration.seconds + duration.nanos / 1e9), 3)


def _span(seconds: float) -> str:
    """12.3 s, 4m05s, 3h02m01s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


async def leader(options: argparse.Namespace, interrupts: Interrupts) -> int:
    async with make_client(options, options.service, options.domain) as client:
        answer = await call(
            client,
            "get_leader",
            wire.GetLeaderRequest(service=options.service, domain=options.domain),
        )
    grace = _seconds(answer.grace_remaining)
    if options.json:
        print(
            json.dumps(
                {
                    "service": options.service,
                    "domain": options.domain,
                    "has_leader": answer.has_leader,
                    "client_id": answer.client_id if answer.has_leader else "",
                    "fencing_token": answer.fencing_token if answer.has_leader else 0,
                    "remaining_s": _seconds(answer.remaining) if answer.has_leader else 0.0,
                    "grace_remaining_s": grace,
                }
            )
        )
    elif answer.has_leader:
        print(
            f"{answer.client_id} fencing_token={answer.fencing_token} "
            f"remaining={_seconds(answer.remaining):.1f}s"
        )
    elif grace > 0:
        print(f"no leader (no lock is granted for {grace:.1f} s more: state-loss grace period)")
    else:
        print("no leader")
    return Exit.OK if answer.has_leader else Exit.NO_LEADER


async def status(options: argparse.Namespace, interrupts: Interrupts) -> int:
    async with make_client(options, "", "") as client:
        answer = await call(client, "get_status", wire.GetStatusRequest())
    fields = {
        "address": options.address,
        "version": answer.version,
        "backend": answer.backend,
        "uptime_s": _seconds(answer.uptime),
        "held_leases": answer.held_leases,
        "store_reachable": answer.store_reachable,
        "last_reload": answer.last_reload,
        "grace_remaining_s": _seconds(answer.grace_remaining),
    }
    if options.json:
        print(json.dumps(fields))
        return Exit.OK
    rows = [
        ("address", options.address),
        ("version", answer.version),
        ("backend", answer.backend),
        ("uptime", _span(fields["uptime_s"])),
        ("held leases", str(answer.held_leases)),
        ("store reachable", "yes" if answer.store_reachable else "no"),
        ("last reload", answer.last_reload or "never"),
        ("grace remaining", _span(fields["grace_remaining_s"])),
    ]
    for name, value in rows:
        print(f"{name + ':':<17}{value}")
    return Exit.OK
