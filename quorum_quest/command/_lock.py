"""`quorum-quest lock`: run a command while holding a lock.

What it guarantees:
- the command starts only on a valid lease, with `QQ_FENCING_TOKEN`, `QQ_LEASE_TTL`,
  `QQ_SERVICE`, `QQ_DOMAIN` and `QQ_CLIENT_ID` in its environment;
- the lease is kept alive while the command runs (the SDK's `leadership()`);
- the moment the lease can no longer be guaranteed (the SDK gives up a safety margin
  before the service would), the command gets SIGTERM, and SIGKILL after
  `--kill-grace` seconds, and quorum-quest exits 121. Unless `--foreground`, the
  command runs in a process group of its own and the signals go to the whole group,
  so what it started stops too;
- SIGINT, SIGTERM and SIGHUP sent to quorum-quest go to the command;
- when the command exits the lock is released, and its status is quorum-quest's.

Only a resource that checks the fencing token is safe from a command that acts after
the lease ended (paused, or within the grace): see docs/client.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import anyio

from quorum_quest.client import Lease
from quorum_quest.command._campaign import leading
from quorum_quest.command._connect import make_client
from quorum_quest.command._exit import Exit, Failure, say
from quorum_quest.command._interrupts import Interrupts


async def run(options: argparse.Namespace, interrupts: Interrupts) -> int:
    client = make_client(options, options.service, options.domain, ttl=options.ttl)
    async with client, leading(client, options.wait) as lease:
        return await _supervise(options, lease, interrupts)


def _environment(lease: Lease) -> dict[str, str]:
    return {
        **os.environ,
        "QQ_FENCING_TOKEN": str(lease.fencing_token),
        "QQ_LEASE_TTL": f"{lease.ttl:g}",
        "QQ_SERVICE": lease.service,
        "QQ_DOMAIN": lease.domain,
        "QQ_CLIENT_ID": lease.client_id,
    }


async def _supervise(options: argparse.Namespace, lease: Lease, interrupts: Interrupts) -> int:
    """Run the command until it exits (its status) or the lease is lost (cancelled:
    the command is stopped first)."""
    program = options.command[0]
    own_group = not options.foreground
    # Shielded: a loss striking mid-spawn must not leave a command running unseen.
    with anyio.CancelScope(shield=True):
        try:
            child = await asyncio.create_subprocess_exec(
                *options.command,
                env=_environment(lease),
                process_group=0 if own_group else None,
            )
        except FileNotFoundError:
            raise Failure(Exit.NOT_FOUND, f"{program}: command not found") from None
        except OSError as exc:
            raise Failure(Exit.CANNOT_EXECUTE, f"{program}: {exc.strerror or exc}") from None

    def send(signum: int) -> None:
        try:
            if own_group:
                os.killpg(child.pid, signum)
            elif child.returncode is None:
                child.send_signal(signum)
        except ProcessLookupError:
            pass  # gone already

    interrupts.forward = send
    try:
        status = await child.wait()
    finally:
        if child.returncode is None:  # cancelled: the lease is lost
            with anyio.CancelScope(shield=True):
                grace = options.kill_grace
                say(
                    f"lost {lease.service}/{lease.domain}: stopping the command "
                    f"(SIGTERM now, SIGKILL after {grace:g} s)"
                )
                send(signal.SIGTERM)
                with anyio.move_on_after(grace):
                    await child.wait()
                if child.returncode is None:
                    send(signal.SIGKILL)
                    await child.wait()
        interrupts.forward = None
    return 128 - status if status < 0 else status
