"""A reload that swaps the store while clients race for the lock.

The service starts on the embedded store; the fault saves a config naming a Redis
whose state marker is valid (as one that other instances use would be), so the new
store itself sees no reason for a grace period. Waiters on the old store must not be
granted there after the swap, and the new store must not grant the lock while a lease
of the old one may still be believed in. The checker must find 0 overlaps.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.backends.redis import redis_prefix_in_use
from tests.faults.faults import Fault
from tests.faults.history import FaultWindow, check
from tests.faults.scenario import GRANTS_BUDGET_S, Backend, Run, Timing, soak_rounds

pytestmark = [pytest.mark.faults, pytest.mark.redis]

ROUNDS = soak_rounds()
APPLIED = "config reloaded and applied"
RELOAD_BUDGET_S = 30.0
MIN_GRANTS_PER_ROUND = 4


class StoreSwap(Fault):
    """Save the only instance's config with another store (memory -> Redis, and back in
    `restore` for the next round) and wait until the reload is applied."""

    name = "store-swap"
    state_loss = True  # the new store hands over: no grant for the longest old lease

    def __init__(self, redis_store: dict[str, Any]) -> None:
        super().__init__(instances=1)
        self.redis_store = redis_store

    def inject(self, run: Run) -> FaultWindow:
        return run.timed(
            "reload: memory store -> redis store",
            lambda: self._reload(run, "redis", self.redis_store),
            blocking=True,
        )

    def restore(self, run: Run) -> None:
        self._reload(run, "memory", {})

    @staticmethod
    def _reload(run: Run, backend: str, store: dict[str, Any]) -> None:
        instance = run.instances[0]
        config = yaml.safe_load(instance.config_file.read_text())
        config["backend"] = {"type": backend}
        config["store"] = {**store, "ttl": 1}
        applied = instance.log.read_text(errors="replace").count(APPLIED)
        temporary = instance.config_file.with_name(f".{uuid.uuid4().hex}.yaml")
        temporary.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(temporary, instance.config_file)
        deadline = time.monotonic() + RELOAD_BUDGET_S
        while instance.log.read_text(errors="replace").count(APPLIED) <= applied:
            if time.monotonic() > deadline:
                raise AssertionError(f"the reload was not applied; log: {instance.log}")
            time.sleep(0.05)


@pytest.mark.timeout(60 * ROUNDS + GRANTS_BUDGET_S + 120)
def test_a_store_swapping_reload_makes_no_second_leader(
    redis_url: str, fault_summary: Callable[[str], None], tmp_path: Path
) -> None:
    prefix = asyncio.run(redis_prefix_in_use(redis_url))
    fault = StoreSwap({"url": redis_url, "key_prefix": prefix, "timeout": 1.0})
    timing = Timing()
    min_grants = MIN_GRANTS_PER_ROUND * ROUNDS
    with Run(Backend("memory"), fault, timing, tmp_path) as run:
        history = run.play(ROUNDS, min_grants)
    report = check(history)
    bound = timing.bound(fault)
    fault_summary(report.summary("memory->redis", fault.name, bound))
    logs = f"logs: {tmp_path}"
    assert not (unsafe := report.safety_problems()), "\n".join([*unsafe, logs])
    slow = report.liveness_problems(bound, min_grants=min_grants)
    assert not slow, "\n".join([*slow, logs])
