"""`quorum-quest elect`: campaign for a lock and hold it until interrupted, as
`etcdctl elect` does. The value is the client id others see as the leader."""

from __future__ import annotations

import argparse
import json

import anyio

from quorum_quest.command._campaign import leading
from quorum_quest.command._connect import make_client
from quorum_quest.command._exit import Exit, Failure
from quorum_quest.command._interrupts import Interrupts


async def run(options: argparse.Namespace, interrupts: Interrupts) -> int:
    if options.value and options.client_id and options.value != options.client_id:
        raise Failure(Exit.USAGE, "--value and --client-id name the same thing; give one")
    client = make_client(
        options, options.service, options.domain, ttl=options.ttl, client_id=options.value
    )
    async with client, leading(client, None) as lease:
        if options.json:
            line = json.dumps(
                {
                    "service": lease.service,
                    "domain": lease.domain,
                    "client_id": lease.client_id,
                    "fencing_token": lease.fencing_token,
                    "ttl_s": lease.ttl,
                }
            )
        else:
            line = f"{lease.client_id} {lease.fencing_token}"
        print(line, flush=True)
        await anyio.sleep_forever()  # until interrupted (released on the way out) or lost
    return Exit.OK
