"""Several worker processes serving one port, for `server.workers` > 1.

Each worker runs this module (`python -m quorum_quest.server.workers`), which makes it
follow its supervisor and then runs the service as `quorum_quest.cli` does, with
`QQ_WORKER_INDEX` set: it loads the same config, opens its own store connections and
binds the port with SO_REUSEPORT, so the kernel spreads connections over the workers.
The supervisor only forwards SIGTERM/SIGINT and watches: when a worker dies on its
own, it stops the others and exits 1, so that whatever runs the service restarts it
whole.

A worker never outlives its supervisor, however the supervisor ends (`kill -9`, OOM
killer): workers nobody watches would keep serving the port, and a restarted service
would serve it beside them. On Linux the kernel sends each worker SIGTERM when the
supervisor dies (`PR_SET_PDEATHSIG`); everywhere, each worker also checks every
`FOLLOW_INTERVAL_S` that its parent is still the supervisor. Either way the worker
stops as on SIGTERM (gracefully, within `server.shutdownGrace`), and exits at once if it
is still running `STOP_SLACK_S` after that, as the supervisor would have made it.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
import threading
import time

from loguru import logger

WORKER_ENV = "QQ_WORKER_INDEX"
# The supervisor's pid, and the seconds a worker gets to stop once it is gone.
SUPERVISOR_ENV = "QQ_SUPERVISOR_PID"
STOP_TIMEOUT_ENV = "QQ_WORKER_STOP_TIMEOUT"
# How often a worker checks that its supervisor is alive (where the kernel cannot tell it).
FOLLOW_INTERVAL_S = 0.5
# A stopping worker gets the shutdown grace plus this much before it is killed.
STOP_SLACK_S = 5.0
_PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker number, or None when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def supervise(argv: list[str], workers: int, grace: float) -> int:
    """Run `workers` copies of this command until a signal or a worker's death."""
    environment = {
        **os.environ,
        SUPERVISOR_ENV: str(os.getpid()),
        STOP_TIMEOUT_ENV: str(grace + STOP_SLACK_S),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "quorum_quest.server.workers", *argv],
            env={**environment, WORKER_ENV: str(index)},
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
    deadline = time.monotonic() + grace + STOP_SLACK_S
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


def follow_supervisor(supervisor: int, stop_timeout: float) -> threading.Thread:
    """In a worker: stop this process when `supervisor`, its parent, is gone.

    Asks the kernel for SIGTERM at the parent's death where it can (Linux), and starts a
    daemon thread that checks the parent, sends SIGTERM itself where the kernel does not,
    and ends the process `stop_timeout` seconds later if it is still running then.
    """
    signalled = _signal_at_parent_death(signal.SIGTERM)

    def follow() -> None:
        # Also catches a supervisor that died before the kernel was asked.
        while os.getppid() == supervisor:
            time.sleep(FOLLOW_INTERVAL_S)
        logger.warning("the supervisor (pid {}) is gone: this worker stops", supervisor)
        if not signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(stop_timeout)
        logger.error("still running {:g} s after the supervisor died: exiting", stop_timeout)
        os._exit(1)

    thread = threading.Thread(target=follow, name="follow-supervisor", daemon=True)
    thread.start()
    return thread


def _signal_at_parent_death(signum: int) -> bool:
    """Have the kernel send `signum` to this process when its parent dies; False where it
    cannot (not Linux). The signal is tied to the thread that started this process: the
    supervisor starts its workers from its main thread, which lives as long as it does."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


if __name__ == "__main__":
    # A worker started by `supervise`: follow the supervisor, then be the service.
    follow_supervisor(int(os.environ[SUPERVISOR_ENV]), float(os.environ[STOP_TIMEOUT_ENV]))
    runpy.run_module("quorum_quest.cli", run_name="__main__", alter_sys=True)
