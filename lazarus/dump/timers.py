"""POSIX timers (timer_create): what /proc/PID/timers lists, plus each timer's setting and overrun count.

/proc/PID/timers gives id, signal number and sigev_value, notify kind (with the thread for SIGEV_THREAD_ID)
and the clock; an injected timer_gettime() gives interval and time left, timer_getoverrun() the overrun count
of the last delivered signal. A restore recreates each timer with its id (restore/timers.py).
"""

from __future__ import annotations

from lazarus.errors import DumpError, Unsupported
from lazarus.kernel import abi
from lazarus.records import fields, record
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NOTIFY_KINDS = {"signal": abi.SIGEV_SIGNAL, "none": abi.SIGEV_NONE, "thread": abi.SIGEV_THREAD}
_HRTIMER_CLOCKS = {abi.CLOCK_REALTIME: "CLOCK_REALTIME", abi.CLOCK_MONOTONIC: "CLOCK_MONOTONIC",
                   abi.CLOCK_BOOTTIME: "CLOCK_BOOTTIME", abi.CLOCK_TAI: "CLOCK_TAI"}


@record
class ProcTimer:
    id: int
    signo: int
    sigev_value: int  # sival_ptr; sival_int is its low 32 bits
    notify: int  # SIGEV_* as given to timer_create
    notify_pid: int  # the process, or the thread for SIGEV_THREAD_ID
    clock: int


def parse_timers(text: str, pid: int) -> list[ProcTimer]:
    """Parse /proc/PID/timers: blocks of 'ID:', 'signal: SIGNO/VALUE', 'notify: KIND/pid.N|tid.N', 'ClockID:'."""
    out: list[ProcTimer] = []
    cur: dict[str, str] = {}

    def flush() -> None:
        if not cur:
            return
        try:
            signo, value = cur["signal"].split("/")
            kind, target = cur["notify"].split("/")
            scope, npid = target.split(".")
            notify = _NOTIFY_KINDS[kind] | (abi.SIGEV_THREAD_ID if scope == "tid" else 0)
            out.append(ProcTimer(int(cur["ID"]), int(signo), int(value, 16), notify, int(npid),
                                 int(cur["ClockID"])))
        except (KeyError, ValueError) as e:
            raise DumpError(f"pid {pid}: cannot parse /proc/{pid}/timers entry {cur!r}", pid=pid) from e
        cur.clear()

    for line in text.splitlines():
        if not line.strip():
            continue
        key, _, val = line.partition(":")
        if key == "ID":
            flush()
        cur[key.strip()] = val.strip()
    flush()
    return out


def clock_name(clock: int, pid: int) -> str | None:
    """A printable name for a clock a timer of `pid` can be restored on, or None if it cannot be."""
    if clock in _HRTIMER_CLOCKS:
        return _HRTIMER_CLOCKS[clock]
    if clock >= 0:
        return None
    owner = ~(clock >> 3)
    which = clock & abi.CPUCLOCK_CLOCK_MASK
    if which == abi.CLOCKFD or owner not in (0, pid):
        return None  # a dynamic (fd) clock, or another process's CPU clock
    scope = "THREAD" if clock & abi.CPUCLOCK_PERTHREAD_MASK else "PROCESS"
    return f"CLOCK_{scope}_CPUTIME" + ("" if which == abi.CPUCLOCK_SCHED else f"(which={which})")


def is_cpu_clock(clock: int) -> bool:
    return clock < 0


def dump_timers(task: RemoteTask) -> list[dict[str, Any]]:
    """Every POSIX timer of the task, or Unsupported naming the first that cannot be restored."""
    pid = task.pid
    with open(f"/proc/{pid}/timers") as f:
        timers = parse_timers(f.read(), pid)
    if not timers:
        return []
    scratch = task.alloc_scratch()
    out = []
    for t in sorted(timers, key=lambda t: t.id):
        name = clock_name(t.clock, pid)
        if name is None:
            raise Unsupported(f"pid {pid}: POSIX timer {t.id} runs on clock {t.clock}, which cannot be restored "
                              "(alarm, fd or another process's clock)", pid=pid)
        if t.notify & ~abi.SIGEV_THREAD_ID not in (abi.SIGEV_SIGNAL, abi.SIGEV_NONE):
            raise Unsupported(f"pid {pid}: POSIX timer {t.id} has notify kind {t.notify}", pid=pid)
        if t.notify & abi.SIGEV_THREAD_ID and t.notify_pid != pid:
            raise Unsupported(f"pid {pid}: POSIX timer {t.id} signals thread {t.notify_pid}", pid=pid)
        task.syscall(abi.SYS.timer_gettime, t.id, scratch, what=f"timer_gettime({t.id})")
        spec = task.get_struct(abi.itimerspec, scratch)
        overrun = task.syscall(abi.SYS.timer_getoverrun, t.id, what=f"timer_getoverrun({t.id})")
        if overrun and is_cpu_clock(t.clock):
            # Restoring an overrun count takes a delivery whose expiry lies overrun intervals in the past
            # (restore/timers.py); a new process's CPU clock has no such past.
            raise Unsupported(f"pid {pid}: POSIX timer {t.id} on {name} has overrun count {overrun}, which "
                              "cannot be restored on a CPU-time clock", pid=pid)
        rec = {f.name: getattr(t, f.name) for f in fields(t)}
        rec.update({
            "clock_name": name,
            "interval": [spec.it_interval.tv_sec, spec.it_interval.tv_nsec],
            "value": [spec.it_value.tv_sec, spec.it_value.tv_nsec],
            "overrun": overrun,
        })
        out.append(rec)
    return out
