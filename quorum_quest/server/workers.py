"""Several worker processes serving one port, for `server.workers` > 1.

Each worker is this same command run again with `QQ_WORKER_INDEX` set: it loads
the same config, opens its own store connections and binds the port with
SO_REUSEPORT, so the kernel spreads connections over the workers. The
supervisor only forwards SIGTERM/SIGINT and watches: when a worker dies on its
own, it stops the others and exits 1, so that whatever runs the service restarts
it whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from loguru import logger

WORKER_ENV = "QQ_WORKER_INDEX"


def worker_index() -> int | None:
    """This process's worker number, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def supervise(argv: list[str], workers: int, grace: float) -> int:
    """Run `workers` copies of this command until a signal or a worker's death."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "quorum_quest.cli", *argv],
            env={**os.environ, WORKER_ENV: str(index)},
        )
        for index in range(workers)
    ]
    logger.info("started {} workers: pids {}", workers, [child.pid for child in children])
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    failed = [child for child in children if child.poll() is not None]
    if not stopping:
        for child in failed:
            logger.error(
                "worker pid {} exited with {}; stopping the others", child.pid, child.returncode
            )
        forward(signal.SIGTERM, None)
    deadline = time.monotonic() + grace + 5
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    # A worker still starting when the signal came dies of it before it could
    # install its handler: it had nothing to finish, so it stopped as asked.
    if stopping and all(child.returncode in (0, -stopping[0]) for child in children):
        return 0
    return 1
