"""Per-task state other than memory and files: registers, signals, and the small things (rseq, creds...)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from lazarus.dump.timers import dump_timers
from lazarus.errors import KernelError, Unsupported
from lazarus.kernel import abi, ptrace
from lazarus.kernel.procfs import Status, read_limits, read_stat, read_status
from lazarus.kernel.syscall import get_robust_list
from lazarus.remote import RemoteTask, call_error, is_error, restart_after_freeze

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def dump_registers(pid: int) -> dict[str, Any]:
    regs = ptrace.get_regs(pid)
    xstate = ptrace.get_regset_whole(pid, abi.NT_X86_XSTATE)
    return {"regs": bytes(regs).hex(), "xstate": xstate.hex()}


class Reads:
    """Read-only system calls queued for one injection (remote.Batch: one stop where the task has BATCH_CODE,
    else call by call), each with its output buffer in scratch; after run(), every result and every buffer is
    at hand (the buffers read back in one go).

        r = Reads(task); i = r.call(nr, args..., r.out(size)); ...; r.run(); r.ret(i), r.data(addr, size)
    """

    def __init__(self, task: RemoteTask) -> None:
        self.task = task
        self.batch = task.batch()
        self._results: list[int] = []
        self._mem = b""

    def out(self, size: int) -> int:
        """A zeroed buffer of `size` bytes in scratch for a call to write into; returns its address."""
        return self.batch.put(bytes(size))

    def call(self, nr: int, *args: int) -> int:
        """Queue a call (a failure is a result, not an error); returns its index."""
        return self.batch.call(nr, *args, check=False).index

    def run(self) -> None:
        used = self.batch.used
        self._results = self.batch.run()
        self._mem = self.task.read(self.task.scratch, used) if used else b""

    def ret(self, i: int) -> int:
        return self._results[i]

    def checked(self, i: int, what: str) -> int:
        """The result of call `i`, or KernelError as an unbatched RemoteTask.syscall would raise."""
        ret = self._results[i]
        if is_error(ret):
            raise call_error(ret, -1, what, self.task.pid)
        return ret

    def data(self, addr: int, size: int) -> bytes:
        off = addr - self.task.scratch
        return self._mem[off:off + size]

    def struct(self, cls: type, addr: int):  # type: ignore[no-untyped-def]
        return cls.from_buffer_copy(self.data(addr, abi.sizeof(cls)))


def queue_xcomp_perm(r: Reads, option: int = abi.ARCH_GET_XCOMP_PERM) -> Callable[[], int | None]:
    """The process's permission mask for dynamically enabled XSTATE features (AMX tile data), by injected
    arch_prctl(ARCH_GET_XCOMP_PERM, or ARCH_GET_XCOMP_GUEST_PERM for the features its KVM guests may use);
    None on a kernel without the call (before 5.16), which has no such features. A restore must grant the same
    permission before it sets the XSTATE (restore/core.py). Queued in `r`; the returned function answers
    after r.run()."""
    buf = r.out(8)
    i = r.call(abi.SYS.arch_prctl, option, buf)

    def done() -> int | None:
        ret = r.ret(i)
        if ret == -errno.EINVAL:
            return None
        if ret < 0:
            raise KernelError(f"arch_prctl({option:#x}) in task {r.task.pid}", -ret, pid=r.task.pid)
        return int.from_bytes(r.data(buf, 8), "little")
    return done


def queue_signals(r: Reads) -> Callable[[], dict[str, Any]]:
    """Handlers (by injected rt_sigaction), masks, queues, altstack, itimers and POSIX timers. Queued in `r`;
    the returned function answers after r.run() (the timers, read by calls of their own, then)."""
    task = r.task
    pid = task.pid
    size = abi.sizeof(abi.kernel_sigaction)
    acts = r.out(size * abi.NSIG)
    calls: dict[int, int] = {}
    for sig in range(1, abi.NSIG + 1):
        if sig not in (abi.SIGKILL, abi.SIGSTOP):
            calls[sig] = r.call(abi.SYS.rt_sigaction, sig, 0, acts + size * (sig - 1), 8)
    ss_buf = r.out(abi.sizeof(abi.stack_t))
    ss_call = r.call(abi.SYS.sigaltstack, 0, ss_buf)
    it_size = abi.sizeof(abi.itimerval)
    it_buf = r.out(3 * it_size)
    it_calls = [r.call(abi.SYS.getitimer, which, it_buf + k * it_size)
                for k, which in enumerate((abi.ITIMER_REAL, abi.ITIMER_VIRTUAL, abi.ITIMER_PROF))]

    def done() -> dict[str, Any]:
        actions: list[list[int]] = []
        for sig in range(1, abi.NSIG + 1):
            if sig not in calls:
                actions.append([0, 0, 0, 0])
                continue
            r.checked(calls[sig], "rt_sigaction")
            act = r.struct(abi.kernel_sigaction, acts + size * (sig - 1))
            actions.append([act.sa_handler, act.sa_flags, act.sa_restorer, act.sa_mask])
        r.checked(ss_call, "sigaltstack")
        ss = r.struct(abi.stack_t, ss_buf)
        itimers = []
        for k, i in enumerate(it_calls):
            r.checked(i, "getitimer")
            it = r.struct(abi.itimerval, it_buf + k * it_size)
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
    return done


def rseq_record(tid: int) -> dict[str, int] | None:
    """The rseq area a thread registered ({addr, size, sig}), or None (none registered, or unreadable)."""
    try:
        conf = ptrace.rseq_configuration(tid)
    except KernelError:
        return None
    return ({"addr": conf.rseq_abi_pointer, "size": conf.rseq_abi_size, "sig": conf.signature}
            if conf.rseq_abi_pointer else None)


def queue_misc(r: Reads, task_flags: int) -> Callable[[], dict[str, Any]]:
    """clear_child_tid, rseq, robust list, creds, prctl state and the rest (queued in `r`; the returned function
    answers after r.run()). `task_flags`: the task's PF_* flags (/proc/PID/stat)."""
    pid = r.task.pid
    tid_buf = r.out(8)
    tid_call = r.call(abi.SYS.prctl, abi.PR_GET_TID_ADDRESS, tid_buf, 0, 0, 0)
    slack_call = r.call(abi.SYS.prctl, abi.PR_GET_TIMERSLACK, 0, 0, 0, 0)
    dumpable_call = r.call(abi.SYS.prctl, abi.PR_GET_DUMPABLE, 0, 0, 0, 0)
    prctl = queue_prctl(r, task_flags)

    def done() -> dict[str, Any]:
        r.checked(tid_call, "prctl(PR_GET_TID_ADDRESS)")
        clear_child_tid = int.from_bytes(r.data(tid_buf, 8), "little")
        rseq = rseq_record(pid)
        head, length = get_robust_list(pid)
        status = read_status(pid)
        stat = read_stat(pid)
        timerslack = r.checked(slack_call, "prctl(PR_GET_TIMERSLACK)")
        dumpable = r.checked(dumpable_call, "prctl(PR_GET_DUMPABLE)")
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
            "prctl": prctl(),
            "caps": dump_caps(pid, status),
        }
    return done


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


def queue_prctl(r: Reads, task_flags: int) -> Callable[[], dict[str, Any]]:
    """The prctl() state a process can set on itself (and that no other field holds), read by injected
    prctl calls (queued in `r`). A value the kernel does not support here is None. Refuses what a restore cannot
    set."""
    pid = r.task.pid
    if task_flags & abi.PF_MEMALLOC_NOIO and task_flags & abi.PF_LOCAL_THROTTLE:
        raise Unsupported(f"pid {pid}: PR_SET_IO_FLUSHER is set; restoring it needs CAP_SYS_RESOURCE", pid=pid)

    def get(option: int, arg: int = 0) -> Callable[[], int | None]:
        i = r.call(abi.SYS.prctl, option, arg, 0, 0, 0)
        return lambda: None if r.ret(i) < 0 else r.ret(i)

    def get_into(option: int) -> Callable[[], int | None]:
        buf = r.out(8)
        i = r.call(abi.SYS.prctl, option, buf, 0, 0, 0)
        return lambda: None if r.ret(i) < 0 else int.from_bytes(r.data(buf, 4), "little", signed=True)

    def zero_into(nr: int, *args: int) -> Callable[[], bytes | None]:
        """A call whose last argument is an 8-byte buffer; its content if the call succeeded."""
        buf = r.out(8)
        i = r.call(nr, *args, buf)
        return lambda: None if r.ret(i) != 0 else r.data(buf, 8)

    securebits = get(abi.PR_GET_SECUREBITS)
    shstk = zero_into(abi.SYS.arch_prctl, abi.ARCH_SHSTK_STATUS)
    untag = zero_into(abi.SYS.arch_prctl, abi.ARCH_GET_UNTAG_MASK)
    core_sched = zero_into(abi.SYS.prctl, abi.PR_SCHED_CORE, abi.PR_SCHED_CORE_GET, 0, 0)
    cpuid_call = r.call(abi.SYS.arch_prctl, abi.ARCH_GET_CPUID, 0)
    values = {
        "futex_hash_slots": get(abi.PR_FUTEX_HASH, abi.PR_FUTEX_HASH_GET_SLOTS),
        "child_subreaper": get_into(abi.PR_GET_CHILD_SUBREAPER),
        "pdeathsig": get_into(abi.PR_GET_PDEATHSIG),
        "keepcaps": get(abi.PR_GET_KEEPCAPS),
        "thp_disable": get(abi.PR_GET_THP_DISABLE),
        "mce_kill": get(abi.PR_MCE_KILL_GET),
        "tsc": get_into(abi.PR_GET_TSC),
    }
    speculation = [get(abi.PR_GET_SPECULATION_CTRL, which) for which in
                   (abi.PR_SPEC_STORE_BYPASS, abi.PR_SPEC_INDIRECT_BRANCH, abi.PR_SPEC_L1D_FLUSH)]
    later = {"mdwe": get(abi.PR_GET_MDWE), "memory_merge": get(abi.PR_GET_MEMORY_MERGE)}

    def done() -> dict[str, Any]:
        bits = securebits() or 0
        if bits & ~_SECBIT_KEEP_CAPS:
            raise Unsupported(f"pid {pid}: securebits {bits:#x} are set, which are not restored", pid=pid)
        got = shstk()
        if got is not None and got != bytes(8):
            raise Unsupported(f"pid {pid}: it uses a user shadow stack (CET), which is not supported", pid=pid)
        got = untag()
        if got is not None and got != b"\xff" * 8:
            raise Unsupported(f"pid {pid}: it uses linear address masking (LAM), which is not supported", pid=pid)
        got = core_sched()
        if got is not None and got != bytes(8):
            raise Unsupported(f"pid {pid}: it has a core-scheduling cookie (PR_SCHED_CORE), which is not "
                              f"restored", pid=pid)
        cpuid = r.ret(cpuid_call)
        return {
            "cpuid": None if cpuid < 0 else cpuid,
            **{k: f() for k, f in values.items()},
            "speculation": [f() for f in speculation],
            **{k: f() for k, f in later.items()},
        }
    return done


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
