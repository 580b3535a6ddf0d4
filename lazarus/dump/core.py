"""Per-task state other than memory and files: registers, signals, and the small things (rseq, creds...)."""

from __future__ import annotations

import os
from typing import Any

from lazarus.dump.timers import dump_timers
from lazarus.errors import KernelError
from lazarus.kernel import abi, ptrace
from lazarus.kernel.procfs import read_limits, read_stat, read_status
from lazarus.kernel.syscall import get_robust_list
from lazarus.remote import RemoteTask


def dump_registers(pid: int) -> dict[str, Any]:
    regs = ptrace.get_regs(pid)
    xstate = ptrace.get_regset_whole(pid, abi.NT_X86_XSTATE)
    return {"regs": bytes(regs).hex(), "xstate": xstate.hex()}


def dump_signals(task: RemoteTask) -> dict[str, Any]:
    """Handlers (by injected rt_sigaction), masks, queues, altstack, itimers and POSIX timers."""
    pid = task.pid
    scratch = task.alloc_scratch()
    actions: list[list[int]] = []
    for sig in range(1, abi.NSIG + 1):
        if sig in (abi.SIGKILL, abi.SIGSTOP):
            actions.append([0, 0, 0, 0])
            continue
        task.syscall(abi.SYS.rt_sigaction, sig, 0, scratch, 8)
        act = task.get_struct(abi.kernel_sigaction, scratch)
        actions.append([act.sa_handler, act.sa_flags, act.sa_restorer, act.sa_mask])
    task.syscall(abi.SYS.sigaltstack, 0, scratch)
    ss = task.get_struct(abi.stack_t, scratch)
    itimers = []
    for which in (abi.ITIMER_REAL, abi.ITIMER_VIRTUAL, abi.ITIMER_PROF):
        task.syscall(abi.SYS.getitimer, which, scratch)
        it = task.get_struct(abi.itimerval, scratch)
        itimers.append([it.it_interval.tv_sec, it.it_interval.tv_usec, it.it_value.tv_sec, it.it_value.tv_usec])
    return {
        "actions": actions,
        "blocked": task.saved_mask,
        "pending_thread": [s.hex() for s in ptrace.peek_siginfo(pid, shared=False)],
        "pending_shared": [s.hex() for s in ptrace.peek_siginfo(pid, shared=True)],
        "altstack": {"sp": ss.ss_sp, "flags": ss.ss_flags, "size": ss.ss_size},
        "itimers": itimers,
        "timers": dump_timers(task),
    }


def dump_misc(task: RemoteTask) -> dict[str, Any]:
    pid = task.pid
    scratch = task.alloc_scratch()
    task.syscall(abi.SYS.prctl, abi.PR_GET_TID_ADDRESS, scratch, 0, 0, 0)
    clear_child_tid = int.from_bytes(task.read(scratch, 8), "little")
    try:
        conf = ptrace.rseq_configuration(pid)
        rseq = ({"addr": conf.rseq_abi_pointer, "size": conf.rseq_abi_size, "sig": conf.signature}
                if conf.rseq_abi_pointer else None)
    except KernelError:
        rseq = None
    head, length = get_robust_list(pid)
    status = read_status(pid)
    stat = read_stat(pid)
    timerslack = task.syscall(abi.SYS.prctl, abi.PR_GET_TIMERSLACK, 0, 0, 0, 0)
    dumpable = task.syscall(abi.SYS.prctl, abi.PR_GET_DUMPABLE, 0, 0, 0, 0)
    with open(f"/proc/{pid}/personality") as f:
        personality = int(f.read().strip(), 16)
    with open(f"/proc/{pid}/comm") as f:
        comm = f.read().rstrip("\n")
    return {
        "clear_child_tid": clear_child_tid,
        "rseq": rseq,
        "robust_list": {"head": head, "len": length},
        "personality": personality,
        "umask": status.umask,
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "comm": comm,
        "rlimits": [list(lim) for lim in read_limits(pid)],
        "creds": {"uids": list(status.uids), "gids": list(status.gids), "groups": list(status.groups)},
        "no_new_privs": int(getattr(status, "no_new_privs", 0) or 0),
        "timerslack_ns": timerslack,
        "dumpable": dumpable,
        "sid": stat.session,
        "pgid": stat.pgrp,
    }
