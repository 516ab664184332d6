"""Run a command that dies with the test process: `python _die_with_parent.py -m MODULE
ARGS...` runs MODULE as `python -m` would, `python _die_with_parent.py PROGRAM ARGS...`
executes PROGRAM; either way only after asking the kernel for SIGKILL when the parent
dies (PR_SET_PDEATHSIG, Linux), so that no server or client outlives a killed test run.

It is set here, after the child started, and not in a `preexec_fn`: a `preexec_fn`
makes subprocess fork with every at-fork handler of the test process run first, and
grpc's (the test process holds channels) can block that fork for good.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys


def main(argv: list[str]) -> None:
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before the kernel was asked
    if argv[0] == "-m":
        # As `python -m` does: the working directory first on the path, not this folder
        # (whose redis.py, for one, would shadow the redis package).
        sys.path[0] = os.getcwd()
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
