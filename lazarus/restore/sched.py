"""Give each restored thread its scheduling state back (dump/sched.py), from outside, before it runs."""

from __future__ import annotations

import os

from lazarus.errors import RestoreError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def apply_sched(tid: int, rec: dict[str, Any] | None) -> None:
    if not rec:
        return
    try:
        os.sched_setaffinity(tid, rec["affinity"])
    except OSError as e:
        raise RestoreError(f"CPU affinity {rec['affinity']} cannot be set here: {e.strerror}", stage="sched",
                           pid=tid) from e
    try:
        os.setpriority(os.PRIO_PROCESS, tid, rec["nice"])
        os.sched_setscheduler(tid, rec["policy"], os.sched_param(rec["priority"]))
        if rec["slack_ns"]:
            with open(f"/proc/{tid}/timerslack_ns", "w") as f:
                f.write(str(rec["slack_ns"]))
    except OSError as e:
        raise RestoreError(f"scheduling state (policy {rec['policy']}, priority {rec['priority']}, nice "
                           f"{rec['nice']}): {e.strerror}", stage="sched", pid=tid) from e
