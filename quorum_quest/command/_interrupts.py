"""SIGINT, SIGTERM and SIGHUP while a command runs.

Each one cancels the command (which then releases what it holds) — unless a
`forward` target is set, as `lock` does while its command runs: then the signal goes
to that command instead, and quorum-quest waits for it to exit.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

# SIGHUP where the platform has it (not on Windows, where handlers are not installed).
SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Interrupts:
    def __init__(self) -> None:
        self.received: int | None = None  # the signal that cancelled the command
        self.forward: Callable[[int], None] | None = None
        self._task: asyncio.Task[object] | None = None

    def install(self) -> None:
        """Take over the signals for the running task (call it from that task)."""
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            try:
                loop.add_signal_handler(signum, self._handle, signum)
            except NotImplementedError:  # an event loop without signal handlers
                return

    def _handle(self, signum: int) -> None:
        if self.forward is not None:
            self.forward(signum)
        elif self.received is None and self._task is not None:
            self.received = signum
            self._task.cancel()
