"""The other threads of a restored process, made once everything process-wide is back.

    leader (RemoteTask)                          new thread
    -------------------                          ----------
    clone3(THREAD|VM|SIGHAND|FILES|FS|SYSVSEM|SETTLS|PTRACE, set_tid=[tid], tls=fs_base)
                                         --->    born traced (CLONE_PTRACE from our seized leader) and in a
                                                 trap stop before it runs a single instruction; every signal
                                                 blocked (the leader's mask while we inject)
                                                 injected through the same `syscall` on the trampoline:
                                                 XSTATE permission use, set_tid_address, set_robust_list,
                                                 sigaltstack, rseq, PR_SET_NAME, its queued signals;
                                                 later its credentials (per thread in Linux), and last its
                                                 registers, XSTATE and mask (restore/core.py set_final_state)
    ... leader's credentials, registers; detach all

CLONE_PTRACE, rather than a stub that stops itself, leaves no moment at which the new thread runs code of ours
or its own before its registers are set.
"""

from __future__ import annotations

import errno

from lazarus.errors import ImageError, KernelError, RestoreError
from lazarus.images.format import Schema, check_schema
from lazarus.kernel import abi, ptrace
from lazarus.remote import RemoteTask
from lazarus.restore import core as rcore
from lazarus.restore.pidns import host_tid

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

THREAD_FLAGS = (abi.CLONE_VM | abi.CLONE_FS | abi.CLONE_FILES | abi.CLONE_SIGHAND | abi.CLONE_THREAD
                | abi.CLONE_SYSVSEM | abi.CLONE_SETTLS | abi.CLONE_PTRACE)
THREAD_SCHEMA: Schema = {
    "tid": int, "core": {"regs": str, "xstate": str}, "blocked": int, "pending_thread": list,
    "altstack": {"sp": int, "flags": int, "size": int}, "clear_child_tid": int,
    "robust_list": {"head": int, "len": int}, "comm": str,
}
_ARGS_OFFSET = 2048  # in the scratch: clone_args and the set_tid array, clear of what other helpers put at 0


def check_threads(task: dict[str, Any], fname: str) -> list[dict[str, Any]]:
    """task.threads (absent: a single-threaded process), checked before anything is created."""
    threads = task.get("threads", [])
    if not isinstance(threads, list):
        raise ImageError(f"{fname}: field 'threads' must be an array")
    seen = {task["pid"]}
    for i, rec in enumerate(threads):
        check_schema(rec, THREAD_SCHEMA, fname, f"threads[{i}].")
        tid = rec["tid"]
        if tid <= 0 or tid in seen:
            raise ImageError(f"{fname}: field 'threads[{i}].tid' is {tid}: not a new positive thread id")
        seen.add(tid)
        try:
            if len(bytes.fromhex(rec["core"]["regs"])) != abi.USER_REGS_SIZE:
                raise ValueError
            bytes.fromhex(rec["core"]["xstate"])
            for info in rec["pending_thread"]:
                if len(bytes.fromhex(info)) != abi.SIGINFO_SIZE:
                    raise ValueError
        except (ValueError, TypeError):
            raise ImageError(f"{fname}: thread {tid}: registers, XSTATE or a queued signal is malformed") from None
        rseq = rec.get("rseq")
        if rseq is not None:
            check_schema(rseq, {"addr": int, "size": int, "sig": int}, fname, f"threads[{i}].rseq.")
    return threads


def create_thread(leader: RemoteTask, rec: dict[str, Any]) -> RemoteTask:
    """clone3 thread `rec["tid"]` from the leader; returns it, traced and stopped, ready for injection."""
    tid = rec["tid"]
    regs = ptrace.regs_from_bytes(bytes.fromhex(rec["core"]["regs"]))
    tids = leader.put(tid.to_bytes(4, "little"), _ARGS_OFFSET)
    args = abi.clone_args()
    args.flags = THREAD_FLAGS
    args.tls = regs.fs_base
    args.set_tid = tids
    args.set_tid_size = 1
    ret = leader.raw(abi.SYS.clone3, leader.put_struct(args, _ARGS_OFFSET + 64), abi.sizeof(abi.clone_args))
    if ret == -errno.EEXIST:
        raise RestoreError(f"thread id {tid} is already in use", stage="threads", pid=leader.pid)
    if ret < 0:
        raise KernelError(f"clone3 of thread {tid} in task {leader.pid}", -ret, pid=leader.pid)
    if ret != tid:  # pragma: no cover - the kernel gives set_tid or fails
        raise RestoreError(f"thread {tid} was created as {ret}", stage="threads", pid=leader.pid)
    # `ret` is the id in the leader's PID namespace; ptrace and /proc want ours (they differ under --pidns).
    tid = host_tid(leader.pid, ret)
    st = ptrace.wait(tid)
    if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
        raise RestoreError(f"new thread {tid} {st}", stage="threads", pid=leader.pid)
    thread = RemoteTask(tid, leader.syscall_ip)
    thread.keep_state()
    thread.use_scratch(leader.scratch, leader.scratch_size)
    return thread


def restore_thread_state(t: RemoteTask, tgid: int, rec: dict[str, Any], leader_core: dict[str, Any]) -> None:
    """Its per-thread state but credentials and registers (see restore_thread_creds, set_final_state)."""
    # XSTATE permission is the process's (granted in the leader); tile data needs a first use in this thread.
    rcore.prepare_xstate(t, {**leader_core, **rec["core"]})
    t.syscall(abi.SYS.set_tid_address, rec["clear_child_tid"])
    rl = rec["robust_list"]
    if rl["head"]:
        t.syscall(abi.SYS.set_robust_list, rl["head"], rl["len"])
    alt = rec["altstack"]
    if not alt["flags"] & abi.SS_DISABLE:
        ss = abi.stack_t(alt["sp"], alt["flags"] & ~1, 0, alt["size"])  # SS_ONSTACK is not settable
        t.syscall(abi.SYS.sigaltstack, t.put_struct(ss), 0)
    rseq = rec.get("rseq")
    if rseq:
        t.syscall(abi.SYS.rseq, rseq["addr"], rseq["size"], 0, rseq["sig"], what="rseq register")
    t.syscall(abi.SYS.prctl, abi.PR_SET_NAME, t.cstring(rec["comm"][:15]), 0, 0, 0)
    for info_hex in rec["pending_thread"]:
        info = bytes.fromhex(info_hex)
        signo = int.from_bytes(info[:4], "little")
        # The ids as the thread itself sees them (its PID namespace may be a new one: restore --pidns).
        t.syscall(abi.SYS.rt_tgsigqueueinfo, t.syscall(abi.SYS.getpid), t.syscall(abi.SYS.gettid), signo,
                  t.put(info))


def restore_thread_creds(t: RemoteTask, misc: dict[str, Any]) -> None:
    """Credentials and capabilities belong to each thread in Linux (glibc's setuid broadcasts to all threads):
    the same as the leader's, which the dump required. Not the parent-death signal: that is the leader's."""
    rcore.restore_caps_before_creds(t, misc)
    rcore.restore_creds(t, misc["creds"])
    keep = (misc.get("prctl") or {}).get("keepcaps")
    rcore.restore_after_creds(t, {"caps": misc.get("caps"), "prctl": {"keepcaps": keep}})
