"""Failover time: how long a lock stays unheld after its leader goes away.

uv run python -m benchmarks.run --mode failover [--ttl 3] [--rounds 5] [--waiters 3]
    [--settle 3] [--redis-url redis://127.0.0.1:6379/0] [--results-dir DIR]

(the same as `python -m benchmarks.failover` with those options); this module is also
the leader process: `python -m benchmarks.failover leader <address> <domain> <ttl>`.

Each round has its own lock on the service (Redis store, its own process). A leader
process takes the lock with the SDK's `leadership()` and prints `leading <token>`;
then `--waiters` waiting clients (tasks in the harness, one `QuorumQuestClient` each,
also in `leadership()`) start polling. After `--settle` seconds (so the waiters' backoff
has reached its steady state) plus a random part of one renewal interval, the leader
goes away:

- `kill`: the harness asks the service how much of the lease is left (GetLeader), then
  sends SIGKILL; the clock starts at the kill. The lock is free when the lease expires.
- `graceful`: the harness writes `exit` to the leader's stdin; the leader leaves its
  `async with` block, which releases the lock, and prints `released <t_exit> <t_done>`.
  The clock starts when the block is left (`t_exit`).
- `graceful-across`: the same, with two service instances on the one Redis, as behind
  a load balancer: the leader calls the first, the waiters the second, so the release
  reaches the waiters only through the store's release notifications.

The clock stops when a waiter's `leadership()` body starts, i.e. a waiter holds the
lock. Times are `time.monotonic()` (CLOCK_MONOTONIC on Linux, shared by all processes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

from benchmarks.core import (
    add_redis_url,
    command_line,
    environment,
    mode_parser,
    positive,
    publish,
    quiet_logging,
    redis_for,
)
from benchmarks.targets import REPO_ROOT, delete_keys, service_target
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.client import QuorumQuestClient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "failover"
CASES = ("kill", "graceful", "graceful-across")
SERVICE = "qq-bench-failover"
RPC_TIMEOUT_S = 2.0
# The leader process imports the SDK, connects and acquires: slow on a loaded machine.
LEADER_START_TIMEOUT_S = 60.0
GRACEFUL_TARGET_MS = 100.0  # the target for a hand-over after a release
EXPECTED = {
    "kill": "≤ ttl + renewal interval = {:.0f} ms",
    "graceful": "< {:.0f} ms (target)",
    "graceful-across": "< {:.0f} ms (target)",
}
CASE_NAMES = {
    "kill": "leader killed (SIGKILL)",
    "graceful": "graceful exit (release)",
    "graceful-across": "graceful exit, leader and waiters on two instances",
}


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    ttl: float  # the leader's and the waiters' lease, seconds
    rounds: int  # per case
    waiters: int
    settle: float  # seconds the waiters poll before the leader goes away

    @property
    def keep_alive_interval(self) -> float:
        return self.ttl / 3  # the SDK's default

    @property
    def round_timeout(self) -> float:
        return self.settle + 3 * self.ttl + LEADER_START_TIMEOUT_S


# -- the leader process ---------------------------------------------------------------


async def lead(address: str, domain: str, ttl: float) -> None:
    """Lead until a line (or EOF) arrives on stdin, then leave the block, which releases."""
    async with QuorumQuestClient(SERVICE, domain, ttl, address, client_id="leader") as client:
        async with client.leadership(timeout=LEADER_START_TIMEOUT_S) as lease:
            print(f"leading {lease.fencing_token}", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            exiting = time.monotonic()
        released = time.monotonic()
    print(f"released {exiting!r} {released!r}", flush=True)


# -- one round ---------------------------------------------------------------------------


async def start_leader(address: str, domain: str, ttl: float) -> asyncio.subprocess.Process:
    """The leader process, once it holds the lock."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.failover", "leader", address, domain, str(ttl)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), LEADER_START_TIMEOUT_S)
    if not line.startswith(b"leading "):
        process.kill()
        await process.wait()
        raise RuntimeError(f"the leader process did not lead (exit code {process.returncode})")
    return process


class TimedClient(QuorumQuestClient):
    """The SDK's client, noting when its granted acquire call was sent and answered."""

    granted_call: tuple[float, float] = (0.0, 0.0)

    async def _try_acquire(self, wait: float) -> bool:
        sent = time.monotonic()
        granted = await super()._try_acquire(wait)
        if granted:
            self.granted_call = (sent, time.monotonic())
        return granted


@dataclass(frozen=True, slots=True)
class Won:
    held_at: float  # the waiter's leadership() body started
    waiter: int
    token: int
    granted_call: tuple[float, float]


async def wait_and_lead(
    address: str, domain: str, index: int, settings: FailoverSettings, won: asyncio.Future[Won]
) -> None:
    """One waiting client: when it leads, it reports the moment and holds until cancelled."""
    client = TimedClient(SERVICE, domain, settings.ttl, address, client_id=f"waiter-{index}")
    async with client, client.leadership(timeout=settings.round_timeout) as lease:
        if not won.done():
            won.set_result(Won(time.monotonic(), index, lease.fencing_token, client.granted_call))
        await asyncio.sleep(settings.round_timeout)


async def lease_left(address: str, domain: str) -> float | None:
    """Seconds left of the current holder's lease, as the service sees it."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = pb.GetLeaderRequest(service=SERVICE, domain=domain)
        reply = await LeaderElectionStub(channel).get_leader(request, timeout=RPC_TIMEOUT_S)
    return reply.remaining.total_seconds() if reply.has_leader and reply.remaining else None


async def leave(
    leader: asyncio.subprocess.Process, case: str, address: str, domain: str
) -> tuple[float, float, dict[str, float]]:
    """Make the leader go away: when the clock starts, when the lock is free, and details.

    After a kill the lock is free when the lease left (asked just before) runs out.
    """
    if case == "kill":
        left = await lease_left(address, domain) or 0.0
        started = time.monotonic()
        leader.kill()
        return started, started + left, {"lease_left_ms": left * 1000}
    assert leader.stdin is not None and leader.stdout is not None
    leader.stdin.write(b"exit\n")
    await leader.stdin.drain()
    line = await asyncio.wait_for(leader.stdout.readline(), LEADER_START_TIMEOUT_S)
    if not line.startswith(b"released "):
        raise RuntimeError(f"the leader did not release (it printed {line!r})")
    exiting, released = (float(word) for word in line.split()[1:3])
    return exiting, released, {"release_call_ms": (released - exiting) * 1000}


async def one_round(
    addresses: tuple[str, str], case: str, index: int, settings: FailoverSettings
) -> dict[str, Any]:
    """One leader going away; the unheld time, and where it went.

    The leader calls `addresses[0]`, the waiters `addresses[1]` (the same address but
    for `graceful-across`).

    `poll_wait_ms`: from the lock being free to the winning acquire being sent (the
    waiters' polling; 0 when it was already waiting at the service); `acquire_call_ms`:
    from that send, or from the lock being free if later, to its answer.
    """
    domain = f"{case}-{index}-{uuid.uuid4().hex[:8]}"
    address, waiters_address = addresses
    leader = await start_leader(address, domain, settings.ttl)
    won: asyncio.Future[Won] = asyncio.get_running_loop().create_future()
    waiters = [
        asyncio.create_task(wait_and_lead(waiters_address, domain, i, settings, won))
        for i in range(settings.waiters)
    ]
    try:
        async with asyncio.timeout(settings.round_timeout):
            # A random part of a renewal interval more, so that a kill lands at any
            # point of the leader's renewal cycle, not always at the same one.
            await asyncio.sleep(settings.settle + random.uniform(0, settings.keep_alive_interval))
            started, free_at, details = await leave(leader, case, address, domain)
            winner = await won
    finally:
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        if leader.returncode is None:
            leader.kill()
        await leader.wait()
    sent, answered = winner.granted_call
    return {
        "case": case,
        "round": index,
        "unheld_ms": (winner.held_at - started) * 1000,
        **details,
        # A waiter whose acquire was already waiting at the service (wait_ms) did not
        # poll: 0, and its call counts from the lock being free.
        "poll_wait_ms": max(0.0, sent - free_at) * 1000,
        "acquire_call_ms": (answered - max(sent, free_at)) * 1000,
        "waiter": winner.waiter,
        "token": winner.token,
    }


# -- the mode ----------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for case in CASES:
        times = [r["unheld_ms"] for r in rounds if r["case"] == case]
        if times:
            summary.append(
                {
                    "case": case,
                    "rounds": len(times),
                    "median_ms": statistics.median(times),
                    "min_ms": min(times),
                    "max_ms": max(times),
                }
            )
    return summary


async def run_failover(settings: FailoverSettings, redis_url: str) -> list[dict[str, Any]]:
    """Every round of every case against the service on the Redis store: one instance,
    and a second one on the same store for `graceful-across`."""
    key_prefix = f"qq-bench-{uuid.uuid4().hex[:8]}-failover"
    store = {"url": redis_url, "key_prefix": key_prefix}
    rounds = []
    try:
        async with (
            service_target("failover", "redis", store, RPC_TIMEOUT_S) as first,
            service_target("failover-2", "redis", store, RPC_TIMEOUT_S) as second,
        ):
            for case in CASES:
                across = case == "graceful-across"
                addresses = (first.address, second.address if across else first.address)
                for index in range(settings.rounds):
                    result = await one_round(addresses, case, index, settings)
                    print(
                        f"failover {case:>8} round {index}: unheld {result['unheld_ms']:.0f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                    rounds.append(result)
    finally:
        await delete_keys(redis_url, key_prefix)
    return rounds


def expected_ms(settings: FailoverSettings) -> dict[str, float]:
    """The bound each case is expected to stay under."""
    return {
        "kill": (settings.ttl + settings.keep_alive_interval) * 1000,
        "graceful": GRACEFUL_TARGET_MS,
        "graceful-across": GRACEFUL_TARGET_MS,
    }


def failover_table(rounds: list[dict[str, Any]], settings: FailoverSettings) -> str:
    """The summary per case, then every round."""
    bounds = expected_ms(settings)
    lines = [
        "| case | rounds | median ms | min ms | max ms | expected |",
        "|---|---|---|---|---|---|",
    ]
    for s in summarize(rounds):
        expected = EXPECTED[s["case"]].format(bounds[s["case"]])
        lines.append(
            f"| {CASE_NAMES[s['case']]} | {s['rounds']} | {s['median_ms']:.0f} | "
            f"{s['min_ms']:.0f} | {s['max_ms']:.0f} | {expected} |"
        )
    lines += [
        "\nRounds: the lock is free after the lease left at a kill (asked from the service "
        "just before it) or after the leader's release call; then a waiter's next poll "
        "(free → poll) and that acquire call.\n",
        "| case | round | unheld ms | lease left ms | release call ms | free → poll ms | "
        "acquire call ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        cells = [
            r.get(key)
            for key in (
                "unheld_ms",
                "lease_left_ms",
                "release_call_ms",
                "poll_wait_ms",
                "acquire_call_ms",
            )
        ]
        shown = [
            "-" if value is None else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
            for value in cells
        ]
        lines.append(f"| {r['case']} | {r['round']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def failover_chart(
    rounds: Sequence[dict[str, Any]], expected_ms: dict[str, float]
) -> Callable[[Figure], None]:
    """Per case, each round's unheld time, its median, and the expected bound."""

    def draw(figure: Figure) -> None:
        cases = list(dict.fromkeys(r["case"] for r in rounds))
        for ax, case in zip(figure.subplots(1, len(cases), squeeze=False)[0], cases, strict=True):
            times = [r["unheld_ms"] for r in rounds if r["case"] == case]
            ax.plot(range(1, len(times) + 1), times, "o", label="round")
            ax.axhline(statistics.median(times), color="C1", label="median")
            if case in expected_ms:
                ax.axhline(expected_ms[case], color="C3", linestyle="--", label="expected bound")
            ax.set_ylim(bottom=0)
            ax.set_xticks(range(1, len(times) + 1))
            ax.set_xlabel("round")
            ax.set_ylabel("lock unheld, ms")
            ax.set_title(case)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")

    return draw


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n")[0])
    parser.add_argument(
        "--ttl", type=positive, default=3.0, help="lease of leader and waiters; default 3"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case; default 5")
    parser.add_argument("--waiters", type=int, default=3, help="waiting clients per round")
    parser.add_argument(
        "--settle", type=float, default=None, help="seconds the waiters poll first; default ttl"
    )
    add_redis_url(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.waiters < 1:
        parser.error("--rounds and --waiters must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["leader"]:
        if len(argv) != 4:
            print("usage: python -m benchmarks.failover leader <address> <domain> <ttl>")
            return 2
        _, address, domain, ttl = argv
        asyncio.run(lead(address, domain, float(ttl)))
        return 0
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    settings = FailoverSettings(
        ttl=args.ttl,
        rounds=args.rounds,
        waiters=args.waiters,
        settle=args.ttl if args.settle is None else args.settle,
    )
    with redis_for(args.redis_url) as redis_url:
        assert redis_url is not None
        rounds = asyncio.run(run_failover(settings, redis_url))
        env = environment(redis_url, ["redis"])
    interval = settings.keep_alive_interval
    text = (
        f"Failover on the redis service: a leader process in the SDK's leadership() with "
        f"ttl {settings.ttl:g} s (renewal every {interval:g} s), {settings.waiters} waiting "
        f"SDK clients that poll for {settings.settle:g} s (plus up to one renewal interval) "
        "before the leader goes away; "
        f"{env['cpus']} CPUs shared by all processes.\n\n" + failover_table(rounds, settings)
    )
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {
            "mode": MODE,
            "ttl": settings.ttl,
            "keep_alive_interval": interval,
            "rounds": settings.rounds,
            "waiters": settings.waiters,
            "settle": settings.settle,
        },
        "environment": env,
        "failover": {"summary": summarize(rounds), "rounds": rounds},
    }
    chart = failover_chart(rounds, expected_ms(settings))
    publish(args.results_dir, MODE, "Failover", started, document, text, chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
