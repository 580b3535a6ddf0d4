"""Per-task state other than memory and files: registers, signals, and the small things (rseq, creds...)."""

from __future__ import annotations

import errno
import os
from typing import Any

from lazarus.dump.timers import dump_timers
from lazarus.errors import KernelError, Unsupported
from lazarus.kernel import abi, ptrace
from lazarus.kernel.procfs import Status, read_limits, read_stat, read_status
from lazarus.kernel.syscall import get_robust_list
from lazarus.remote import RemoteTask, restart_after_freeze


def dump_registers(pid: int) -> dict[str, Any]:
    regs = ptrace.get_regs(pid)
    xstate = ptrace.get_regset_whole(pid, abi.NT_X86_XSTATE)
    return {"regs": bytes(regs).hex(), "xstate": xstate.hex()}


def dump_xcomp_perm(task: RemoteTask, option: int = abi.ARCH_GET_XCOMP_PERM) -> int | None:
    """The process's permission mask for dynamically enabled XSTATE features (AMX tile data), by injected
    arch_prctl(ARCH_GET_XCOMP_PERM, or ARCH_GET_XCOMP_GUEST_PERM for the features its KVM guests may use);
    None on a kernel without the call (before 5.16), which has no such features. A restore must grant the same
    permission before it sets the XSTATE (restore/core.py)."""
    scratch = task.alloc_scratch()
    ret = task.raw(abi.SYS.arch_prctl, option, scratch)
    if ret == -errno.EINVAL:
        return None
    if ret < 0:
        raise KernelError(f"arch_prctl({option:#x}) in task {task.pid}", -ret, pid=task.pid)
    return int.from_bytes(task.read(scratch, 8), "little")


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


def rseq_record(tid: int) -> dict[str, int] | None:
    """The rseq area a thread registered ({addr, size, sig}), or None (none registered, or unreadable)."""
    try:
        conf = ptrace.rseq_configuration(tid)
    except KernelError:
        return None
    return ({"addr": conf.rseq_abi_pointer, "size": conf.rseq_abi_size, "sig": conf.signature}
            if conf.rseq_abi_pointer else None)


def dump_misc(task: RemoteTask) -> dict[str, Any]:
    pid = task.pid
    scratch = task.alloc_scratch()
    task.syscall(abi.SYS.prctl, abi.PR_GET_TID_ADDRESS, scratch, 0, 0, 0)
    clear_child_tid = int.from_bytes(task.read(scratch, 8), "little")
    rseq = rseq_record(pid)
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
        "prctl": dump_prctl(task, stat.flags),
        "caps": dump_caps(pid, status),
    }


def dump_caps(pid: int, status: Status) -> dict[str, int]:
    """The capability sets; refused when they hold a capability lazarus itself lacks, which a restore by the
    same user could not give back (it can only lower its own sets)."""
    own = read_status(os.getpid())
    for name, have, mine in (("bounding", status.cap_bnd, own.cap_bnd), ("permitted", status.cap_prm, own.cap_prm),
                             ("inheritable", status.cap_inh, own.cap_inh | own.cap_prm)):
        extra = have & ~mine
        if extra:
            raise Unsupported(f"pid {pid}: its {name} capability set {have:#x} has capabilities lazarus lacks "
                              f"({extra:#x}); a restore could not give them back", pid=pid)
    return {"inh": status.cap_inh, "prm": status.cap_prm, "eff": status.cap_eff, "bnd": status.cap_bnd,
            "amb": status.cap_amb}


# Bits of PR_GET_SECUREBITS a restore gives back: SECBIT_KEEP_CAPS, which is PR_SET_KEEPCAPS.
_SECBIT_KEEP_CAPS = 1 << 4


def dump_prctl(task: RemoteTask, task_flags: int) -> dict[str, Any]:
    """The prctl() state a process can set on itself (and that no other field holds), read by injected
    prctl calls. A value the kernel does not support here is None. Refuses what a restore cannot set."""
    pid = task.pid
    scratch = task.alloc_scratch()

    def get(option: int, arg: int = 0) -> int | None:
        ret = task.raw(abi.SYS.prctl, option, arg, 0, 0, 0)
        return None if ret < 0 else ret

    def get_into(option: int) -> int | None:
        task.write(scratch, bytes(8))
        if task.raw(abi.SYS.prctl, option, scratch, 0, 0, 0) < 0:
            return None
        return int.from_bytes(task.read(scratch, 4), "little", signed=True)

    if task_flags & abi.PF_MEMALLOC_NOIO and task_flags & abi.PF_LOCAL_THROTTLE:
        raise Unsupported(f"pid {pid}: PR_SET_IO_FLUSHER is set; restoring it needs CAP_SYS_RESOURCE", pid=pid)
    securebits = get(abi.PR_GET_SECUREBITS) or 0
    if securebits & ~_SECBIT_KEEP_CAPS:
        raise Unsupported(f"pid {pid}: securebits {securebits:#x} are set, which are not restored", pid=pid)
    task.write(scratch, bytes(8))
    if task.raw(abi.SYS.arch_prctl, abi.ARCH_SHSTK_STATUS, scratch) == 0 and task.read(scratch, 8) != bytes(8):
        raise Unsupported(f"pid {pid}: it uses a user shadow stack (CET), which is not supported", pid=pid)
    task.write(scratch, bytes(8))
    if task.raw(abi.SYS.arch_prctl, abi.ARCH_GET_UNTAG_MASK, scratch) == 0 and task.read(scratch, 8) != b"\xff" * 8:
        raise Unsupported(f"pid {pid}: it uses linear address masking (LAM), which is not supported", pid=pid)
    task.write(scratch, bytes(8))
    if (task.raw(abi.SYS.prctl, abi.PR_SCHED_CORE, abi.PR_SCHED_CORE_GET, 0, 0, scratch) == 0
            and task.read(scratch, 8) != bytes(8)):
        raise Unsupported(f"pid {pid}: it has a core-scheduling cookie (PR_SCHED_CORE), which is not restored",
                          pid=pid)
    cpuid = task.raw(abi.SYS.arch_prctl, abi.ARCH_GET_CPUID, 0)
    return {
        "cpuid": None if cpuid < 0 else cpuid,
        "futex_hash_slots": get(abi.PR_FUTEX_HASH, abi.PR_FUTEX_HASH_GET_SLOTS),
        "child_subreaper": get_into(abi.PR_GET_CHILD_SUBREAPER),
        "pdeathsig": get_into(abi.PR_GET_PDEATHSIG),
        "keepcaps": get(abi.PR_GET_KEEPCAPS),
        "thp_disable": get(abi.PR_GET_THP_DISABLE),
        "mce_kill": get(abi.PR_MCE_KILL_GET),
        "tsc": get_into(abi.PR_GET_TSC),
        "speculation": [get(abi.PR_GET_SPECULATION_CTRL, which) for which in
                        (abi.PR_SPEC_STORE_BYPASS, abi.PR_SPEC_INDIRECT_BRANCH, abi.PR_SPEC_L1D_FLUSH)],
        "mdwe": get(abi.PR_GET_MDWE),
        "memory_merge": get(abi.PR_GET_MEMORY_MERGE),
    }


def dump_thread(pid: int, tid: int, leader: RemoteTask, journal: Any) -> dict[str, Any]:
    """The per-thread state of thread `tid` (not the leader) of process `pid`: read by ptrace and /proc, and
    by two injected calls (its sigaltstack and clear_child_tid have no other reader) through the leader's
    scratch, with its registers and mask journalled for the watchdog. Refuses what a restore would not give
    back: credentials, capabilities, no_new_privs or seccomp that differ from the leader's (they are restored
    process-wide)."""
    status = read_status(pid, tid)
    lead = read_status(pid)
    for what, mine, theirs in (("credentials", (status.uids, status.gids, status.groups),
                                (lead.uids, lead.gids, lead.groups)),
                               ("capabilities", (status.cap_inh, status.cap_prm, status.cap_eff, status.cap_bnd,
                                                 status.cap_amb),
                                (lead.cap_inh, lead.cap_prm, lead.cap_eff, lead.cap_bnd, lead.cap_amb)),
                               ("no_new_privs", status.no_new_privs, lead.no_new_privs)):
        if mine != theirs:
            raise Unsupported(f"pid {pid}: thread {tid} has {what} other than the main thread's, which is not "
                              f"supported", pid=pid)
    if status.seccomp:
        raise Unsupported(f"pid {pid}: thread {tid} runs under seccomp (mode {status.seccomp}), which is not "
                          f"supported", pid=pid)
    core = dump_registers(tid)
    scratch = leader.alloc_scratch()
    task = RemoteTask(tid, leader.syscall_ip, adjust=restart_after_freeze, journal=journal)
    try:
        task.use_scratch(scratch, leader.scratch_size)
        task.syscall(abi.SYS.sigaltstack, 0, scratch)
        ss = task.get_struct(abi.stack_t, scratch)
        task.syscall(abi.SYS.prctl, abi.PR_GET_TID_ADDRESS, scratch, 0, 0, 0)
        clear_child_tid = int.from_bytes(task.read(scratch, 8), "little")
    finally:
        task.close()
    journal.clean()
    rseq = rseq_record(tid)
    head, length = get_robust_list(tid)
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        comm = f.read().rstrip("\n")
    return {
        "tid": tid,
        "core": core,
        "blocked": task.saved_mask,
        "pending_thread": [s.hex() for s in ptrace.peek_siginfo(tid, shared=False)],
        "altstack": {"sp": ss.ss_sp, "flags": ss.ss_flags, "size": ss.ss_size},
        "rseq": rseq,
        "clear_child_tid": clear_child_tid,
        "robust_list": {"head": head, "len": length},
        "comm": comm,
    }
