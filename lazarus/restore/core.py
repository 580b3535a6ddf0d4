"""Restore per-task state: signals, misc state (rseq, robust list, creds...), and registers last."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

from lazarus.errors import KernelError, RestoreError
from lazarus.kernel import abi, ptrace
from lazarus.kernel.syscall import prlimit
from lazarus.remote import RemoteTask, restart_after_freeze
from lazarus.restore.timers import restore_timers

_NEG1 = (1 << 64) - 1
log = logging.getLogger(__name__)
RLIMIT_NOFILE = 7


def reset_inherited(task: RemoteTask) -> None:
    """Drop per-task state the task inherited from the restorer (KERNEL-NOTES pitfall 15).

    rseq first: the kernel writes into the rseq area on every return to user space, and the area is about
    to be unmapped.
    """
    conf = ptrace.rseq_configuration(task.pid)
    if conf.rseq_abi_pointer:
        task.syscall(abi.SYS.rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, abi.RSEQ_FLAG_UNREGISTER,
                     conf.signature)
    task.syscall(abi.SYS.set_robust_list, 0, 24)  # len must be sizeof(struct robust_list_head)
    task.syscall(abi.SYS.set_tid_address, 0)
    task.syscall(abi.SYS.prctl, abi.PR_SET_PDEATHSIG, 0, 0, 0, 0)
    ss = abi.stack_t(0, abi.SS_DISABLE, 0, 0)
    task.syscall(abi.SYS.sigaltstack, task.put_struct(ss), 0)


def restore_rlimits(pid: int, rlimits: list[list[int]]) -> None:
    for res, (cur, mx) in enumerate(rlimits):
        try:
            prlimit(pid, res, (cur, mx))
        except KernelError as e:
            have = prlimit(pid, res)
            if have == (cur, mx):
                continue
            # Raising a hard limit needs CAP_SYS_RESOURCE; keep the soft value when it fits.
            if mx > have[1] and cur <= have[1]:
                prlimit(pid, res, (cur, have[1]))
                log.warning("pid %d: resource limit %d restored with hard limit %d, not %d (raising it needs "
                            "CAP_SYS_RESOURCE)", pid, res, have[1], mx)
                continue
            raise RestoreError(f"cannot set resource limit {res} to ({cur}, {mx}): {e.strerror}",
                               stage="misc", pid=pid) from e


def restore_signals(task: RemoteTask, sig: dict[str, Any]) -> None:
    t = task
    for signo, (handler, flags, restorer, mask) in enumerate(sig["actions"], start=1):
        if signo in (abi.SIGKILL, abi.SIGSTOP):
            continue
        act = abi.kernel_sigaction(handler, flags, restorer, mask)
        t.syscall(abi.SYS.rt_sigaction, signo, t.put_struct(act), 0, 8)
    alt = sig["altstack"]
    if not alt["flags"] & abi.SS_DISABLE:
        ss = abi.stack_t(alt["sp"], alt["flags"] & ~1, 0, alt["size"])  # SS_ONSTACK is not settable
        t.syscall(abi.SYS.sigaltstack, t.put_struct(ss), 0)
    for which, (isec, iusec, vsec, vusec) in enumerate(sig["itimers"]):
        if isec or iusec or vsec or vusec:
            it = abi.itimerval(abi.timeval(isec, iusec), abi.timeval(vsec, vusec))
            t.syscall(abi.SYS.setitimer, which, t.put_struct(it), 0)
    # POSIX timers before the queued signals: restoring an overrun count delivers one signal of the timer.
    pending_thread, pending_shared = restore_timers(t, sig)
    for info_hex in pending_thread:
        info = bytes.fromhex(info_hex)
        signo = int.from_bytes(info[:4], "little")
        t.syscall(abi.SYS.rt_tgsigqueueinfo, t.pid, t.pid, signo, t.put(info))
    for info_hex in pending_shared:
        info = bytes.fromhex(info_hex)
        signo = int.from_bytes(info[:4], "little")
        t.syscall(abi.SYS.rt_sigqueueinfo, t.pid, signo, t.put(info))


def restore_misc(task: RemoteTask, misc: dict[str, Any]) -> None:
    t = task
    t.syscall(abi.SYS.set_tid_address, misc["clear_child_tid"])
    rl = misc["robust_list"]
    if rl["head"]:
        t.syscall(abi.SYS.set_robust_list, rl["head"], rl["len"])
    t.syscall(abi.SYS.personality, misc["personality"])
    t.syscall(abi.SYS.umask, misc["umask"])
    t.syscall(abi.SYS.chdir, t.cstring(misc["cwd"]), what=f"chdir {misc['cwd']}")
    t.syscall(abi.SYS.prctl, abi.PR_SET_NAME, t.cstring(misc["comm"][:15]), 0, 0, 0)
    rseq = misc.get("rseq")
    if rseq:
        t.syscall(abi.SYS.rseq, rseq["addr"], rseq["size"], 0, rseq["sig"], what="rseq register")
    if "timerslack_ns" in misc:
        t.syscall(abi.SYS.prctl, abi.PR_SET_TIMERSLACK, misc["timerslack_ns"], 0, 0, 0)
    # Session and process group: a leader becomes one again. Joining another process's group or session
    # is not possible (it may not exist here), so a member stays in the restorer's.
    if misc.get("sid") == t.pid:
        t.syscall(abi.SYS.setsid)
    elif misc.get("pgid") == t.pid:
        t.syscall(abi.SYS.setpgid, 0, 0)
    if misc.get("no_new_privs"):
        t.syscall(abi.SYS.prctl, abi.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def restore_creds(task: RemoteTask, creds: dict[str, Any]) -> None:
    """Credentials last among the injected calls: dropping root takes away what the others need."""
    t = task
    groups = creds["groups"]
    if groups:
        raw = b"".join(g.to_bytes(4, "little") for g in groups)
        t.syscall(abi.SYS.setgroups, len(groups), t.put(raw))
    else:
        t.syscall(abi.SYS.setgroups, 0, 0)
    r, e, s, _fs = creds["gids"]
    t.syscall(abi.SYS.setresgid, r, e, s)
    r, e, s, _fs = creds["uids"]
    t.syscall(abi.SYS.setresuid, r, e, s)


def restore_dumpable(task: RemoteTask, misc: dict[str, Any]) -> None:
    """After the credentials: changing uids resets the dumpable flag (to fs.suid_dumpable), which would lock
    the process out of its own /proc/self/{environ,auxv,mem}. Values 0 and 1 can be set by the task itself."""
    value = misc.get("dumpable")
    if value in (0, 1):
        task.syscall(abi.SYS.prctl, abi.PR_SET_DUMPABLE, value, 0, 0, 0)


def final_registers(core: dict[str, Any]) -> tuple[abi.user_regs_struct, bool]:
    """The registers to resume with, and whether the kernel must restart an interrupted syscall.

    A task dumped inside a syscall has rax = -ERESTART*, orig_rax = the syscall. For the first three codes
    the kernel itself restarts the call when we resume from a signal-context stop. -ERESTART_RESTARTBLOCK
    needs the restart block the new task does not have: we restart the original call instead, and for
    nanosleep/clock_nanosleep with a remaining-time pointer (which the kernel filled on interruption, as in
    glibc's sleep) we sleep only the remaining time.
    """
    regs = ptrace.regs_from_bytes(bytes.fromhex(core["regs"]))
    if restart_after_freeze(regs):
        return regs, False
    orig = regs.orig_rax
    ret = regs.rax - (1 << 64) if regs.rax >= (1 << 63) else regs.rax
    if orig >= (1 << 63) or -ret not in abi.RESTART_ERRNOS:
        return regs, False
    if -ret != abi.ERESTART_RESTARTBLOCK:
        return regs, True
    regs.rax = orig
    regs.rip -= 2
    if orig == abi.SYS.nanosleep and regs.rsi:
        regs.rdi = regs.rsi
    elif orig == abi.SYS.clock_nanosleep and regs.r10 and not regs.rsi & 1:  # not TIMER_ABSTIME
        regs.rdx = regs.r10
    regs.orig_rax = _NEG1
    return regs, False


def set_final_state(task: RemoteTask, core: dict[str, Any], blocked: int) -> None:
    """Registers, extended state and signal mask; then stop in signal context if a restart is due."""
    pid = task.pid
    regs, kernel_restart = final_registers(core)
    ptrace.set_regset(pid, abi.NT_X86_XSTATE, bytes.fromhex(core["xstate"]))
    ptrace.set_regs(pid, regs)
    ptrace.set_sigmask(pid, blocked)
    task.saved_regs = regs
    task.saved_mask = blocked
    if kernel_restart:
        task.stop_in_signal_context()


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
