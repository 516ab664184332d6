"""Many leases held by one client: renewal lag and spurious expirations.

uv run python -m benchmarks.run --mode many-leases [--leases 1000,10000,50000] [--ttl 15]
    [--duration 45] [--find-max [--factor 2] [--max-leases 400000]]
    [--redis-url redis://127.0.0.1:6379/0 | --redis-cluster] [--results-dir DIR]

(the same as `python -m benchmarks.many_leases` with those options).

The service runs as its own process on the Redis store, started as the other targets
start it (`benchmarks.targets.service_target`); Redis is a throw-away redis-server
(`tests.backends.redis.RedisProcess`) unless --redis-url names one on 127.0.0.1. With
--redis-cluster the store runs in cluster mode (`cluster: true`) on a throw-away Redis
Cluster of 3 primaries + 3 replicas on 127.0.0.1 (`tests.backends.redis_cluster`, as the
`redis-cluster` target of `benchmarks.run`); its `redis` CPU is the sum over the
primaries, the replicas' is reported apart (`redis_replicas`). For
each lease count N, one SDK client (`QuorumQuestClient`, default timing: renewal every
ttl/3, safety margin min(ttl/10, 1 s)) enters `client.leaderships()` with N locks of
its own, so all N are kept alive by the SDK's one keep-alive loop with batched
`KeepAliveMany` calls. Once all are held, the run is measured for --duration seconds,
then the block exits and releases them.

Measured, for the renewals planned inside the window:

- renewal lag: from the planned renewal time (send time of the lease's last successful
  renewal + the renewal interval) to the answer. The loop sends renewals due within
  0.5 s of each other together, so a lag can be slightly negative.
- spurious expirations: leases the service refused (not holder) while the client still
  believed them valid. Nobody else asks for these locks, so every refusal is spurious.
- expired in client: leases the SDK gave up because no renewal was answered in time.
- failed calls: KeepAliveMany calls without a usable answer (retried within the lease).

A count is *sustained* when the window had no spurious expiration, no lease expired in
the client and every lease was still held at the end. --find-max multiplies the count by
--factor after each sustained step until one is not (or --max-leases is reached) and
reports the largest sustained count.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from benchmarks.core import (
    add_redis_url,
    command_line,
    counts,
    environment,
    mode_parser,
    publish,
    quiet_logging,
    redis_for,
)
from benchmarks.proc import children, command, cpu_seconds
from benchmarks.targets import cluster_pids, cluster_store, delete_keys, service_target
from quorum_quest import Callbacks, Lease, QuorumQuestClient
from quorum_quest.client.lease import EXPIRED, RELEASED
from quorum_quest.errors import ServiceUnavailable
from tests.backends.redis_cluster import RedisCluster

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "many-leases"
CLUSTER_NOTE = (
    " in cluster mode on a Redis Cluster of 3 primaries + 3 replicas (CPU redis: the sum "
    "over the primaries; the replicas' in the JSON, redis_replicas)"
)
RPC_TIMEOUT_S = 5.0  # the benchmark's own calls; the SDK's renewals use its defaults


@dataclass
class Step:
    """What one lease count did, measured through the SDK's batched renewals."""

    leases: int
    window_start: float = math.inf  # time.monotonic() once every lease is held
    lags: list[float] = field(default_factory=list)  # seconds, answer - planned
    calls: int = 0
    renewals: int = 0
    failed_calls: int = 0
    spurious: int = 0  # refused by the service while the client believed it valid
    expired_in_client: int = 0  # ended by the SDK: no renewal answered in time
    acquire_s: float = 0.0
    release_s: float = 0.0
    held_at_end: int = 0
    # CPU seconds used in the window: this process (the SDK client), the service, Redis
    cpu_s: dict[str, float] = field(default_factory=dict)

    def lost(self, lease: Lease) -> None:
        """on_leader_lost: count the losses that are not releases at the end."""
        if lease.end_reason == RELEASED:
            return
        if lease.end_reason == EXPIRED:
            self.expired_in_client += 1
        else:
            self.spurious += 1

    @property
    def sustained(self) -> bool:
        return not self.spurious and not self.expired_in_client and self.held_at_end == self.leases


class TimedClient(QuorumQuestClient):
    """The SDK client with each batched renewal timed: the keeper's one call per batch."""

    def __init__(self, *args: Any, step: Step, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step = step

    async def _renew_many(
        self, leases: Sequence[Lease], timeout: float
    ) -> list[tuple[float, int] | None]:
        # A lease's deadline is (send time of its last successful renewal) + ttl - margin.
        planned = [
            lease._deadline - lease.ttl + self.safety_margin + self.keep_alive_interval
            for lease in leases
        ]
        try:
            answers = await super()._renew_many(leases, timeout)
        except ServiceUnavailable:
            self.step.failed_calls += 1
            raise
        answered = time.monotonic()
        step = self.step
        step.calls += 1
        for due in planned:
            if due >= step.window_start:
                step.lags.append(answered - due)
                step.renewals += 1
        return answers


async def run_step(
    address: str, count: int, ttl: float, duration: float, primaries: frozenset[int]
) -> Step:
    step = Step(count)
    service = f"qq-many-{uuid.uuid4().hex[:8]}"
    client = TimedClient(service, "unused", ttl, address, step=step)
    callbacks = Callbacks(on_leader_lost=step.lost)
    async with client:
        started = time.monotonic()
        async with client.leaderships(
            [f"shard-{n}" for n in range(count)], callbacks=callbacks
        ) as leases:
            step.acquire_s = time.monotonic() - started
            if len(leases) != count:
                print(f"only {len(leases)} of {count} leases were granted", file=sys.stderr)
            step.window_start = time.monotonic()
            cpu_before = cpu_by_role(primaries)
            await asyncio.sleep(duration)
            cpu_after = cpu_by_role(primaries)
            step.held_at_end = len(leases)
            step.window_start = math.inf  # renewals after the window are not counted
            step.cpu_s = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
            releasing = time.monotonic()
        step.release_s = time.monotonic() - releasing
    return step


def cpu_by_role(primaries: frozenset[int] = frozenset()) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and of its children, by role.

    The service and redis-server are this process's children; Linux only (`/proc`). With
    the pids of a cluster's `primaries`, the other redis-servers are `redis_replicas`.
    """
    used = {"client": time.process_time()}
    for pid in children(os.getpid()):
        line = command(pid)
        role = "redis" if b"redis-server" in line else "service" if b"quorum" in line else None
        if role == "redis" and primaries and pid not in primaries:
            role = "redis_replicas"
        if role:
            used[role] = used.get(role, 0.0) + cpu_seconds([pid])
    return used


def counts_after(first: list[int], factor: float, limit: int) -> list[int]:
    return first + [
        math.ceil(first[-1] * factor**k) for k in range(1, 64) if first[-1] * factor**k <= limit
    ]


async def run_all(
    args: argparse.Namespace, redis_url: str | None, cluster: RedisCluster | None = None
) -> list[Step]:
    """Every lease count, on the Redis at `redis_url` or on `cluster` (thrown away after)."""
    key_prefix = f"qq-bench-many-{uuid.uuid4().hex[:8]}"
    steps: list[Step] = []
    primaries: frozenset[int] = frozenset()
    if cluster is not None:
        store = cluster_store(cluster, key_prefix)
        primaries = frozenset(cluster_pids(cluster)[0])
    else:
        store = {"url": redis_url, "key_prefix": key_prefix}
    try:
        async with service_target("many-leases", "redis", store, RPC_TIMEOUT_S) as target:
            address = target.address
            plan = (
                counts_after(args.leases, args.factor, args.max_leases)
                if args.find_max
                else args.leases
            )
            for count in plan:
                step = await run_step(address, count, args.ttl, args.duration, primaries)
                steps.append(step)
                print(progress_line(step), file=sys.stderr, flush=True)
                if args.find_max and not step.sustained:
                    break
    finally:
        if redis_url is not None:
            await delete_keys(redis_url, key_prefix)
    return steps


# -- output ----------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile of `values` (sorted in place)."""
    if not values:
        return None
    values.sort()
    return values[max(0, math.ceil(share * len(values)) - 1)]


def summary(step: Step, duration: float, interval: float) -> dict[str, Any]:
    lags = step.lags
    p50, p99 = percentile(lags, 0.50), percentile(lags, 0.99)
    return {
        "leases": step.leases,
        "sustained": step.sustained,
        "held_at_end": step.held_at_end,
        "spurious_expirations": step.spurious,
        "expired_in_client": step.expired_in_client,
        "failed_calls": step.failed_calls,
        "renewals": step.renewals,
        "renewals_per_s": step.renewals / duration,
        # 1.0 when every lease was renewed every interval; below, renewals ran late
        "renewals_of_planned": step.renewals / duration / (step.leases / interval),
        "calls": step.calls,
        "locks_per_call": step.renewals / step.calls if step.calls else 0.0,
        "lag_ms": {
            "min": min(lags) * 1000 if lags else None,
            "p50": p50 * 1000 if p50 is not None else None,
            "p99": p99 * 1000 if p99 is not None else None,
            "max": max(lags) * 1000 if lags else None,
        },
        "acquire_s": step.acquire_s,
        "release_s": step.release_s,
        "cpu_s": step.cpu_s,
        "cpu_share": {name: used / duration for name, used in step.cpu_s.items()},
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def progress_line(step: Step) -> str:
    lags = sorted(step.lags)
    p99 = percentile(lags, 0.99)
    return (
        f"{step.leases:>7} leases: {step.renewals} renewals, p99 lag "
        f"{ms(p99 * 1000 if p99 is not None else None)} ms, {step.spurious} spurious, "
        f"{step.expired_in_client} expired in client, held {step.held_at_end} at the end"
    )


COLUMNS = (
    "leases",
    "renewals/s",
    "of planned",
    "locks/call",
    "lag p50 / p99 / max ms",
    "spurious expirations",
    "expired in client",
    "failed calls",
    "held at end",
    "acquire s",
    "CPU client / service / redis",
)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lag = row["lag_ms"]
        cells = (
            str(row["leases"]),
            f"{row['renewals_per_s']:.0f}",
            f"{row['renewals_of_planned']:.2f}",
            f"{row['locks_per_call']:.0f}",
            f"{ms(lag['p50'])} / {ms(lag['p99'])} / {ms(lag['max'])}",
            str(row["spurious_expirations"]),
            str(row["expired_in_client"]),
            str(row["failed_calls"]),
            str(row["held_at_end"]),
            f"{row['acquire_s']:.1f}",
            " / ".join(
                f"{row['cpu_share'].get(name, 0.0):.0%}" for name in ("client", "service", "redis")
            ),
        )
        lines.append("| " + " | ".join(cells) + " |")
    sustained = [row["leases"] for row in rows if row["sustained"]]
    lines.append(
        "\nOf planned: renewals/s ÷ (leases ÷ renewal interval); below 1 the renewals ran "
        "late (still inside the lease when nothing expired). CPU: share of one core used in "
        "the measured window, by process."
    )
    lines.append(
        "\nLargest count sustained (no spurious expiration, none expired in the client, "
        f"all held at the end): {max(sustained) if sustained else 'none'}"
    )
    return "\n".join(lines)


def lag_chart(steps: list[Step]) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        axes = figure.subplots()
        for step in steps:
            lags = sorted(lag * 1000 for lag in step.lags)
            if lags:
                shares = [(index + 1) / len(lags) for index in range(len(lags))]
                axes.plot(lags, shares, label=f"{step.leases} leases")
        axes.set_xlabel("renewal lag, ms (answer - planned renewal time)")
        axes.set_ylabel("share of renewals")
        axes.set_title("KeepAliveMany through the SDK, Redis store: lag distribution")
        axes.grid(True, alpha=0.3)
        axes.legend()

    return draw


# -- command line ----------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n")[0])
    parser.add_argument("--leases", type=counts, default=[50_000], help="lease counts to run")
    parser.add_argument("--ttl", type=float, default=15.0, help="lease length, seconds")
    parser.add_argument(
        "--duration", type=float, default=45.0, help="measured seconds per count, all held"
    )
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="from the first count, multiply by --factor until a count is not sustained",
    )
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--max-leases", type=int, default=400_000)
    add_redis_url(parser)
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="the store in cluster mode on a throw-away Redis Cluster (3 primaries + 3 "
        "replicas on 127.0.0.1)",
    )
    args = parser.parse_args(argv)
    if args.redis_cluster and args.redis_url:
        parser.error("--redis-cluster starts a cluster of its own: no --redis-url with it")
    if args.ttl <= 0 or args.duration <= 0 or args.factor <= 1:
        parser.error("--ttl and --duration must be positive, --factor above 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    if args.redis_cluster:
        # Started in this thread: its nodes die with the thread that started them.
        with RedisCluster() as cluster:
            steps = asyncio.run(run_all(args, None, cluster))
    else:
        with redis_for(args.redis_url) as redis_url:
            steps = asyncio.run(run_all(args, redis_url))
    # The SDK's default renewal interval, which the client uses.
    rows = [summary(step, args.duration, args.ttl / 3) for step in steps]
    text = "\n".join(
        [
            f"ttl {args.ttl:g} s (renewal every {args.ttl / 3:g} s), {args.duration:g} s "
            f"measured per count; one SDK client, the service in its own process on the "
            f"Redis store{CLUSTER_NOTE if args.redis_cluster else ''}, {os.cpu_count()} CPUs "
            "shared by the client, the service and redis-server.\n",
            table(rows),
        ]
    )
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {
            "ttl": args.ttl,
            "duration": args.duration,
            "find_max": args.find_max,
            "redis_cluster": args.redis_cluster,
        },
        "environment": environment(None),
        "results": rows,
    }
    publish(args.results_dir, MODE, "Many leases", started, document, text, lag_chart(steps))
    # --find-max ends on a count that is not sustained by design.
    ok = any if args.find_max else all
    return 0 if ok(row["sustained"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
