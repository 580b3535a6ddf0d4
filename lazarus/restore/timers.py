"""Recreate POSIX timers with their ids, sigevents, settings, overrun counts and pending signals.

Ids: with PR_TIMER_CREATE_RESTORE_IDS on (Linux 6.17), timer_create() takes the id to use from *timerid.

Time left is restored relative to the restore, as for itimers and interrupted sleeps: the time the process
spent as an image does not count.

Overrun count (what timer_getoverrun() returns) is set by the kernel only when the timer's signal is delivered:
it is the number of expiries missed before that delivery, and timer_settime() resets it to 0. To give a
periodic timer its count N back, the timer is armed at an absolute expiry E lying N+1 intervals before the
wanted next expiry X, so it fires at once; its signal is then taken by an injected rt_sigtimedwait(), so
that no handler runs. The kernel's delivery moves the expiry forward past now, counting N missed intervals,
and leaves the timer armed at X:

    E          E+iv   ...  E+N*iv      now    X = E+(N+1)*iv
    |-----------|----- ... ---|---------^------|---> time
    fires at once; delivery forwards to X, overrun = N

A signal of the timer pending at the dump is made pending the same way, by the timer itself firing (its
signal carries the timer's queue entry, and its next delivery forwards and counts as the original's would),
never by queueing a copy of the siginfo: a copy would not update the overrun count when it is delivered.
A pending SI_TIMER signal of a timer that no longer exists is dropped: the kernel would discard it at delivery.
"""

from __future__ import annotations

import time

from lazarus.errors import ImageError, KernelError, RestoreError
from lazarus.images.format import Schema, check_schema
from lazarus.kernel import abi, procfs
from lazarus.logs import getLogger
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

log = getLogger(__name__)

NSEC = 1_000_000_000
# First budget for the injected calls between reading a timer's clock and delivering its signal.
_LEAD_NS = 2_000_000
_PENDING_WAIT = 2.0


def _ns(pair: list[int]) -> int:
    return pair[0] * NSEC + pair[1]


def _spec(interval_ns: int, value_ns: int) -> abi.itimerspec:
    return abi.itimerspec(abi.timespec(*divmod(interval_ns, NSEC)), abi.timespec(*divmod(value_ns, NSEC)))


def siginfo_timer(info: bytes) -> tuple[int, int] | None:
    """(signo, timer id) of an SI_TIMER siginfo, else None. x86-64 layout: si_signo, si_errno, si_code,
    then the union at offset 16 whose _timer member starts with the timer id."""
    code = int.from_bytes(info[8:12], "little", signed=True)
    if code != abi.SI_TIMER:
        return None
    return int.from_bytes(info[0:4], "little"), int.from_bytes(info[16:20], "little", signed=True)


def split_pending(timers: list[dict[str, Any]], pending: list[str], *, thread: bool) -> tuple[list[str], set[int]]:
    """Pending siginfos that are not timer signals, and the ids of timers whose own signal was pending.

    A timer's signal goes to the thread queue for SIGEV_THREAD_ID, else to the process queue."""
    by_id = {t["id"]: t for t in timers}
    rest: list[str] = []
    ids: set[int] = set()
    for info_hex in pending:
        key = siginfo_timer(bytes.fromhex(info_hex))
        if key is None:
            rest.append(info_hex)
            continue
        signo, tid = key
        t = by_id.get(tid)
        if (t is not None and t["signo"] == signo and t["notify"] & ~abi.SIGEV_THREAD_ID == abi.SIGEV_SIGNAL
                and bool(t["notify"] & abi.SIGEV_THREAD_ID) == thread):
            ids.add(tid)
        else:
            log.info("dropping pending signal %d of deleted POSIX timer %d (the kernel would discard it)",
                     signo, tid)
    return rest, ids


def create_timers(task: RemoteTask, timers: list[dict[str, Any]]) -> None:
    """timer_create() each timer with its own id, in increasing order: the kernel then leaves its id counter
    after the last one, so that the process's next timer_create() returns the id after its newest timer, as
    it would have in the original (unless the original had deleted its newest timers)."""
    t = task
    ret = t.raw(abi.SYS.prctl, abi.PR_TIMER_CREATE_RESTORE_IDS, abi.PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0)
    if ret < 0:
        raise RestoreError(f"pid {t.pid}: restoring POSIX timer ids needs prctl(PR_TIMER_CREATE_RESTORE_IDS) "
                           "(Linux 6.17 or later)", stage="timers", pid=t.pid)
    try:
        for tm in sorted(timers, key=lambda tm: tm["id"]):
            sev = abi.sigevent(tm["sigev_value"] & ((1 << 64) - 1), tm["signo"], tm["notify"],
                               t.pid if tm["notify"] & abi.SIGEV_THREAD_ID else 0)
            sev_addr = t.put_struct(sev, 0)
            id_addr = t.put(tm["id"].to_bytes(4, "little"), 64)
            t.syscall(abi.SYS.timer_create, tm["clock"], sev_addr, id_addr,
                      what=f"timer_create(id {tm['id']}, clock {tm['clock_name']})")
            got = int.from_bytes(t.read(id_addr, 4), "little", signed=True)
            if got != tm["id"]:
                raise RestoreError(f"pid {t.pid}: POSIX timer {tm['id']} was created as timer {got}",
                                   stage="timers", pid=t.pid)
    finally:
        t.raw(abi.SYS.prctl, abi.PR_TIMER_CREATE_RESTORE_IDS, abi.PR_TIMER_CREATE_RESTORE_IDS_OFF, 0, 0, 0)


def _now(task: RemoteTask, clock: int) -> int:
    addr = task.put(bytes(16), 0)
    task.syscall(abi.SYS.clock_gettime, clock, addr, what=f"clock_gettime({clock})")
    ts = task.get_struct(abi.timespec, addr)
    return ts.tv_sec * NSEC + ts.tv_nsec


def _settime(task: RemoteTask, tm: dict[str, Any], flags: int, interval_ns: int, value_ns: int) -> None:
    task.syscall(abi.SYS.timer_settime, tm["id"], flags, task.put_struct(_spec(interval_ns, value_ns), 0), 0,
                 what=f"timer_settime({tm['id']})")


def _pending_mask(pid: int) -> int:
    st = procfs.read_status(pid)
    return st.sig_pnd | st.shd_pnd


def _wait_pending(task: RemoteTask, tm: dict[str, Any], until_ns: float) -> None:
    bit = 1 << (tm["signo"] - 1)
    deadline = time.monotonic() + _PENDING_WAIT + until_ns / NSEC
    while not _pending_mask(task.pid) & bit:
        if time.monotonic() > deadline:
            raise RestoreError(f"pid {task.pid}: POSIX timer {tm['id']} did not fire during the restore",
                               stage="timers", pid=task.pid)
        time.sleep(0.0005)


def _take_signal(task: RemoteTask, signo: int) -> tuple[int, bytes]:
    """Dequeue one pending `signo` with an injected rt_sigtimedwait() (zero timeout): (signal or -errno,
    siginfo). No handler runs; for a timer's own signal the kernel's delivery bookkeeping does."""
    info = task.put(bytes(abi.SIGINFO_SIZE), 256)
    timeout = task.put(bytes(16), 512)
    sigset = task.put((1 << (signo - 1)).to_bytes(8, "little"), 768)
    ret = task.raw(abi.SYS.rt_sigtimedwait, sigset, info, timeout, 8)
    return ret, task.read(info, abi.SIGINFO_SIZE)


def _deliver_one(task: RemoteTask, tm: dict[str, Any]) -> None:
    """Take the timer's pending signal: the kernel's delivery rearms the timer and counts its overrun."""
    signo = tm["signo"]
    got_sig, info = _take_signal(task, signo)
    got = siginfo_timer(info)
    if got_sig != signo or got != (signo, tm["id"]):
        raise RestoreError(f"pid {task.pid}: another signal ({got}) came while restoring POSIX timer {tm['id']}'s "
                           "overrun count", stage="timers", pid=task.pid)


def _restore_overrun(task: RemoteTask, tm: dict[str, Any], pending: bool) -> None:
    """Deliver one signal of the timer, fired at an expiry `want`+1 intervals before the next one (see top).

    The kernel counts the intervals between that expiry and the delivery, so the delivery must come within
    one interval before the next expiry X: X is put `lead` after now (or the time left after now, keeping
    the timer's phase, when that is longer), and `lead`, the budget for the injected calls up to the
    delivery, grows on each retry up to one interval.
    """
    iv, left, want = _ns(tm["interval"]), _ns(tm["value"]), tm["overrun"]
    if not iv:
        raise RestoreError(f"pid {task.pid}: POSIX timer {tm['id']} has overrun {want} but no interval",
                           stage="timers", pid=task.pid)
    bit = 1 << (tm["signo"] - 1)
    got = None
    for attempt in range(5):
        if attempt:
            _settime(task, tm, 0, 0, 0)  # disarmed, so that it cannot fire again while its signal is taken
            for _ in range(64):  # the last attempt's own signal, if it fired again (at most one: disarmed)
                if not _pending_mask(task.pid) & bit:
                    break
                _take_signal(task, tm["signo"])
        if _pending_mask(task.pid) & bit:
            raise RestoreError(f"pid {task.pid}: signal {tm['signo']} is already pending while restoring POSIX "
                               f"timer {tm['id']}'s overrun count", stage="timers", pid=task.pid)
        lead = min(iv, _LEAD_NS << (2 * attempt))
        now = _now(task, tm["clock"])
        # A timer whose signal was pending must fire again soon, so that it is pending once more.
        nxt = now + (left if left >= lead and not pending else lead)
        first = nxt - (want + 1) * iv
        if first <= 0:
            raise RestoreError(f"pid {task.pid}: POSIX timer {tm['id']}: overrun {want} x interval {iv} ns "
                               f"reaches before the start of clock {tm['clock_name']}", stage="timers", pid=task.pid)
        _settime(task, tm, abi.TIMER_ABSTIME, iv, first)
        _wait_pending(task, tm, 0)
        _deliver_one(task, tm)
        got = task.syscall(abi.SYS.timer_getoverrun, tm["id"])
        if got == want:
            if pending:
                _wait_pending(task, tm, lead)
            return
        log.debug("pid %d: timer %d overrun came out %d, not %d; again with more lead", task.pid, tm["id"], got,
                  want)
    raise RestoreError(f"pid {task.pid}: could not give POSIX timer {tm['id']} its overrun count {want} "
                       f"(got {got}; interval {iv} ns)", stage="timers", pid=task.pid)


def _restore_pending(task: RemoteTask, tm: dict[str, Any]) -> None:
    """Make the timer fire now so that its own signal is pending; a periodic one keeps its next expiry."""
    iv, left = _ns(tm["interval"]), _ns(tm["value"])
    if iv:
        first = max(_now(task, tm["clock"]) + left - iv, 1)
        _settime(task, tm, abi.TIMER_ABSTIME, iv, first)
    else:
        _settime(task, tm, abi.TIMER_ABSTIME, 0, 1)
    _wait_pending(task, tm, 0)


TIMER_SCHEMA: Schema = {"id": int, "signo": int, "sigev_value": int, "notify": int, "notify_pid": int, "clock": int,
                        "clock_name": str, "interval": list, "value": list, "overrun": int}


def check_timers(timers: object, fname: str) -> list[dict[str, Any]]:
    """The image's timer records, checked before anything is created (images older than timers have none)."""
    if not isinstance(timers, list):
        raise ImageError(f"{fname}: field 'signals.timers' must be an array")
    for i, tm in enumerate(timers):
        check_schema(tm, TIMER_SCHEMA, fname, f"signals.timers[{i}].")
        if not 0 <= tm["signo"] <= abi.NSIG:
            raise ImageError(f"{fname}: field 'signals.timers[{i}].signo' must be a signal number")
        for key in ("interval", "value"):
            pair = tm[key]
            if len(pair) != 2 or not all(type(x) is int and x >= 0 for x in pair) or pair[1] >= NSEC:
                raise ImageError(f"{fname}: field 'signals.timers[{i}].{key}' must be [seconds, nanoseconds]")
    return timers  # type: ignore[return-value]


def restore_timers(task: RemoteTask, sig: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Create and arm the timers; returns the pending signals still to queue (thread, shared)."""
    timers = sig.get("timers", [])
    thread, ids_t = split_pending(timers, sig["pending_thread"], thread=True)
    shared, ids_s = split_pending(timers, sig["pending_shared"], thread=False)
    if not timers:
        return thread, shared
    pending_ids = ids_t | ids_s
    create_timers(task, timers)
    try:
        # Overrun counts first: each needs its signal to be the only one pending.
        for tm in timers:
            if tm["overrun"]:
                _restore_overrun(task, tm, tm["id"] in pending_ids)
        for tm in timers:
            if tm["overrun"]:
                continue
            if tm["id"] in pending_ids:
                _restore_pending(task, tm)
            elif _ns(tm["value"]):
                _settime(task, tm, 0, _ns(tm["interval"]), _ns(tm["value"]))
    except KernelError as e:
        raise RestoreError(f"pid {task.pid}: {e}", stage="timers", pid=task.pid) from e
    return thread, shared
