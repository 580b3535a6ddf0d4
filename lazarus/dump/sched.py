"""Scheduling state of each thread: policy and priority, nice value, CPU affinity and timer slack.

All of it is read from outside (as root) with the standard library and /proc/TID/timerslack_ns, and set back the
same way at restore (restore/sched.py): no injection needed. SCHED_DEADLINE is refused (its runtime, deadline
and period are not readable through os, and admission control may refuse it elsewhere).
"""

from __future__ import annotations

import os

from lazarus.errors import Unsupported

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

SCHED_RESET_ON_FORK = 0x40000000
# SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE (include/uapi/linux/sched.h)
RESTORABLE_POLICIES = (0, 1, 2, 3, 5)


def sched_state(pid: int, tid: int) -> dict[str, Any]:
    where = f"pid {pid}" if tid == pid else f"pid {pid} thread {tid}"
    policy = os.sched_getscheduler(tid)
    if policy & ~SCHED_RESET_ON_FORK not in RESTORABLE_POLICIES:
        raise Unsupported(f"{where}: scheduling policy {policy & ~SCHED_RESET_ON_FORK} (SCHED_DEADLINE?) is not "
                          "supported")
    try:
        with open(f"/proc/{tid}/timerslack_ns") as f:
            slack = int(f.read())
    except OSError:
        slack = 0
    return {"policy": policy, "priority": os.sched_getparam(tid).sched_priority,
            "nice": os.getpriority(os.PRIO_PROCESS, tid), "affinity": sorted(os.sched_getaffinity(tid)),
            "slack_ns": slack}
