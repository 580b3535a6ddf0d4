"""Blocked SIGCONTs a dumped process has pending, kept through the stop signals of the dump.

Generating a stop signal discards every pending SIGCONT of the process, on its queue and on each thread's
(kernel/signal.c prepare_signal), blocked or not, and the dump generates them: the SIGSTOP that begins its
protecting group stop (dump/__init__.py freeze), and the one each batch of injected calls ends in
(lazarus/kernel/clone.py BATCH_STOP_CODE). Unhandled, a SIGCONT the program blocks and has pending would be
missing from the image and from an original that runs on, and the SIGCONT that ends our group stop would be
left pending in its place (naming the dump's pid).

So: before our SIGSTOP, the threads that have a SIGCONT pending (/proc: SigPnd, ShdPnd) are brought to an event
stop (PTRACE_INTERRUPT) and their SIGCONTs' siginfo read (PTRACE_PEEKSIGINFO): "held", keyed by tid, 0 for the
process queue. The image gets the held ones in place of whatever SIGCONT the queues hold when they are read, and
the watchdog is told them. When the original is let go with SIGCONT blocked, the SIGCONT that ends our stop is
taken away again by an injected rt_sigtimedwait, and the held ones are queued back by the task itself
(rt_sigqueueinfo, rt_tgsigqueueinfo: only a task may queue a siginfo with a user's si_code to itself).
A restore queues the image's pending signals once and generates no stop signal after them (its batches end
in a trap; a task stopped at the dump has no SIGCONT pending: the stop signal discarded it).
"""

from __future__ import annotations

import contextlib
import os
import signal

from lazarus.errors import LazarusError, NoSuchTask
from lazarus.kernel import abi, procfs, ptrace
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

Held = dict[int, list[str]]  # tid -> SIGCONT siginfos (hex) on its queue; 0 -> the process queue

CONT_BIT = 1 << (abi.SIGCONT - 1)
_SHARED = 0


def _signo(info: bytes) -> int:
    return int.from_bytes(info[:4], "little")


def _conts(infos: list[bytes]) -> list[str]:
    return [s.hex() for s in infos if _signo(s) == abi.SIGCONT]


def hold(pid: int, threads: list[int]) -> tuple[Held, list[int]]:
    """Read the pending SIGCONTs of process `pid`, seized with its `threads`, all running. Returns them and the
    tids left in an event stop of ours for it: the caller sends its SIGSTOP, then continues those (they take
    the group stop within the same signal handling: the program runs no instruction in between)."""
    want = []
    with contextlib.suppress(LazarusError, OSError):
        st = procfs.read_status(pid)
        if (st.sig_pnd | st.shd_pnd) & CONT_BIT:
            want.append(pid)
    for tid in threads:
        with contextlib.suppress(LazarusError, OSError):
            if procfs.read_status(pid, tid).sig_pnd & CONT_BIT:
                want.append(tid)
    if not want:
        return {}, []
    trapped = []
    for tid in want:
        try:
            ptrace.interrupt(tid)
        except NoSuchTask:
            continue
        if _wait_trap(pid, tid):
            trapped.append(tid)
    held: Held = {}
    for tid in trapped:
        mine = _conts(ptrace.peek_siginfo(tid, shared=False))
        if mine:
            held[tid] = mine
    if pid in trapped:
        shared = _conts(ptrace.peek_siginfo(pid, shared=True))
        if shared:
            held[_SHARED] = shared
    return held, trapped


def _wait_trap(pid: int, tid: int) -> bool:
    """Wait for the event stop PTRACE_INTERRUPT asked of `tid`; False if the thread exited first."""
    for _ in range(64):
        s = ptrace.wait(tid)
        if s.exited or s.signaled:
            if tid == pid:
                raise NoSuchTask(f"pid {pid} exited during the dump ({s})", pid=pid)
            return False
        if s.stopped and s.event == abi.PTRACE_EVENT_STOP:
            return True
        ptrace.cont(tid, 0 if s.syscall_stop or s.event else s.stop_sig)  # a signal: delivered as it would be
    raise LazarusError(f"pid {pid}: thread {tid} gave no event stop after 64 signal stops", pid=pid)


def into_image(held: Held, pid: int, signals: dict[str, Any], thread_recs: list[dict[str, Any]]) -> None:
    """Put the held SIGCONTs into the image's queues (task `signals`, the other threads' records), in place of
    any SIGCONT read there (one sent during the dump, after our stop signal, is newer than a held one and would
    not have been queued next to it: a standard signal is queued once)."""
    if not held:
        return

    def merged(queue: list[str], mine: list[str]) -> list[str]:
        return [h for h in queue if _signo(bytes.fromhex(h)) != abi.SIGCONT] + mine

    if _SHARED in held:
        signals["pending_shared"] = merged(signals["pending_shared"], held[_SHARED])
    if pid in held:
        signals["pending_thread"] = merged(signals["pending_thread"], held[pid])
    for rec in thread_recs:
        if rec["tid"] in held:
            rec["pending_thread"] = merged(rec["pending_thread"], held[rec["tid"]])


def to_json(held: Held) -> dict[str, list[str]]:
    return {str(k): v for k, v in held.items()}


def from_json(data: dict[str, list[str]]) -> Held:
    return {int(k): [str(h) for h in v] for k, v in data.items()}


def put_back(pid: int, syscall_ip: int, held: Held, threads: list[int]) -> None:
    """End our group stop in a task that blocks SIGCONT, leaving exactly the `held` SIGCONTs pending.

    `pid` is in an event stop with its own registers and mask back; `threads` are its other threads, still
    seized (those with held SIGCONTs of their own queue them). The first SIGCONT queued back ends the stop; with
    none held, ours does, and an injected rt_sigtimedwait takes it away. What the calls read lies below each
    thread's stack pointer (past the red zone, as a signal frame would), so no mapping is made or removed: once
    the stop is over a tracer's death would let the task run, and then the fewer calls left the better."""
    me = procfs.own_pid(pid)  # ids as the task sees them (pid namespaces)
    # A SIGCONT leaves a trap in every seized thread (ptrace_trap_notify), which an injected call meets on its
    # way to the syscall instruction and passes (remote.py RemoteTask.raw).
    order = [(tid, False, info) for tid in threads if held.get(tid) for info in held[tid]]
    order += [(pid, False, info) for info in held.get(pid, [])] + [(pid, True, info) for info in held.get(_SHARED, [])]
    tids = list(dict.fromkeys(tid for tid, _, _ in order)) or [pid]
    # Should a call fail half way, each thread gets its own registers and mask back before the error goes on
    # (its caller may try again: a SIGCONT queued twice is queued once, as any standard signal).
    saved = {tid: (ptrace.get_regs(tid), ptrace.get_sigmask(tid)) for tid in tids}
    try:
        if not order:
            os.kill(pid, signal.SIGCONT)
            with RemoteTask(pid, syscall_ip) as t:
                at = _below_stack(t, 32)
                t.write(at, CONT_BIT.to_bytes(8, "little") + bytes(16))  # sigset {SIGCONT}, timespec 0
                t.raw(abi.SYS.rt_sigtimedwait, at, 0, at + 8, 8)  # -EAGAIN: someone took it already
            return
        for tid in tids:
            with RemoteTask(tid, syscall_ip) as t:
                at = _below_stack(t, abi.SIGINFO_SIZE)
                for who, shared, info in order:
                    if who != tid:
                        continue
                    t.write(at, bytes.fromhex(info))
                    if shared:
                        t.syscall(abi.SYS.rt_sigqueueinfo, me, signal.SIGCONT, at)
                    else:
                        t.syscall(abi.SYS.rt_tgsigqueueinfo, me, _own_tid(pid, tid), signal.SIGCONT, at)
    except BaseException:
        for tid, (regs, mask) in saved.items():
            with contextlib.suppress(LazarusError):
                ptrace.set_regs(tid, regs)
                ptrace.set_sigmask(tid, mask)
        raise


def _below_stack(t: RemoteTask, size: int) -> int:
    """An address for `size` bytes below the thread's stack pointer and its red zone, inside its stack mapping."""
    sp = t.saved_regs.rsp
    addr = (sp - 128 - size) & ~63
    for v in procfs.read_maps(t.pid):
        if v.start <= addr < v.end and sp <= v.end:
            return addr
    raise LazarusError(f"pid {t.pid}: no room below its stack pointer {sp:#x} to queue a SIGCONT back", pid=t.pid)


def _own_tid(pid: int, tid: int) -> int:
    nspid = procfs.read_status(pid, tid).nspid
    return nspid[-1] if nspid else tid


__all__ = ["CONT_BIT", "Held", "from_json", "hold", "into_image", "put_back", "to_json"]
