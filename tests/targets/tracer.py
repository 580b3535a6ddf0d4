"""Helper (not a target): another tracer that holds a process with PTRACE_SEIZE until killed.

Exercises the dump's refusal of a process that is already traced. PTRACE_SEIZE does not stop
the tracee, so it keeps running; when this helper is killed the kernel detaches it.

Usage: python tracer.py PID READYFILE    (writes "SEIZED" to READYFILE once attached)
Test code only: ctypes is allowed here, never in lazarus/ outside lazarus/kernel/.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PTRACE_SEIZE = 0x4206


def _tell(path: str, text: str) -> None:
    # Whole or not at all: the test polls for the file and reads it as soon as it exists.
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    pid, ready = int(argv[1]), argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        err = ctypes.get_errno()
        _tell(ready, f"ERROR {err} {os.strerror(err)}\n")
        return 1
    _tell(ready, "SEIZED\n")
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
