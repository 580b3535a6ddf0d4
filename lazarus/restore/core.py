"""Restore per-task state: signals, misc state (rseq, robust list, creds...), and registers last."""

from __future__ import annotations

import contextlib
import os
import signal

from lazarus.errors import ImageError, KernelError, LazarusError, RestoreError
from lazarus.images.format import Schema, check_schema
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.syscall import prlimit
from lazarus.kernel.xstate import machine_xstate as cpu_xstate
from lazarus.kernel.xstate import parse_xstate
from lazarus.logs import getLogger
from lazarus.remote import Batch, Ref, RemoteTask, restart_after_freeze
from lazarus.restore.timers import restore_timers

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1
log = getLogger(__name__)
RLIMIT_NOFILE = 7


def reset_inherited(task: RemoteTask, batch: Batch | None = None) -> None:
    """Drop per-task state the task inherited from the restorer (KERNEL-NOTES pitfall 15).

    rseq first: the kernel writes into the rseq area on every return to user space, and the area is about
    to be unmapped. batch: queue the calls there (its caller runs it), else run them now.
    """
    conf = ptrace.rseq_configuration(task.pid)
    b = batch if batch is not None else task.batch()
    if conf.rseq_abi_pointer:
        b.call(abi.SYS.rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, abi.RSEQ_FLAG_UNREGISTER, conf.signature)
    b.call(abi.SYS.set_robust_list, 0, 24)  # len must be sizeof(struct robust_list_head)
    b.call(abi.SYS.set_tid_address, 0)
    b.call(abi.SYS.prctl, abi.PR_SET_PDEATHSIG, 0, 0, 0, 0)
    b.call(abi.SYS.sigaltstack, b.put_struct(abi.stack_t(0, abi.SS_DISABLE, 0, 0)), 0)
    if batch is None:
        b.run()


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


def signals_in_one_batch(sig: dict[str, Any]) -> bool:
    """Whether restore_signals() has nothing to do after its batch (no SIGTRAP ignored, no POSIX timer, no
    queued signal): its calls may then share a batch with later ones (queue_signal_actions)."""
    return (sig["actions"][abi.SIGTRAP - 1][0] != abi.SIG_IGN and not sig.get("timers")
            and not sig.get("pending_thread") and not sig.get("pending_shared"))


def restore_signals(task: RemoteTask, sig: dict[str, Any], batch: Batch | None = None, *,
                    defaults_known: bool = False) -> None:
    """batch: calls queued by the caller, run first in the same injection as the signal actions.
    defaults_known: every action of the task is the kernel's default (all 0: a task cloned from a seed,
    restore/seed.py), so only the others are set."""
    t = task
    b = batch if batch is not None else t.batch()
    trap_ignored = queue_signal_actions(b, sig, defaults_known=defaults_known)
    b.run()
    _after_signal_actions(t, sig, trap_ignored)


def queue_signal_actions(b: Batch, sig: dict[str, Any], *, defaults_known: bool = False) -> bool:
    """Queue the signal actions, alternate stack and interval timers in `b`; True if SIGTRAP is to be ignored,
    which restore_signals() sets after the batch."""
    trap_ignored = False
    for signo, (handler, flags, restorer, mask) in enumerate(sig["actions"], start=1):
        if signo in (abi.SIGKILL, abi.SIGSTOP):
            continue
        if defaults_known and not (handler or flags or restorer or mask):
            continue
        act = abi.kernel_sigaction(handler, flags, restorer, mask)
        if signo == abi.SIGTRAP and handler == abi.SIG_IGN:
            trap_ignored = True  # set alone, after the batch: the batch's own trap would undo it
            continue
        b.call(abi.SYS.rt_sigaction, signo, b.put_struct(act), 0, 8)
    alt = sig["altstack"]
    if not alt["flags"] & abi.SS_DISABLE:
        ss = abi.stack_t(alt["sp"], alt["flags"] & ~1, 0, alt["size"])  # SS_ONSTACK is not settable
        b.call(abi.SYS.sigaltstack, b.put_struct(ss), 0)
    for which, (isec, iusec, vsec, vusec) in enumerate(sig["itimers"]):
        if isec or iusec or vsec or vusec:
            it = abi.itimerval(abi.timeval(isec, iusec), abi.timeval(vsec, vusec))
            b.call(abi.SYS.setitimer, which, b.put_struct(it), 0)
    return trap_ignored


def _after_signal_actions(t: RemoteTask, sig: dict[str, Any], trap_ignored: bool) -> None:
    if trap_ignored:
        handler, flags, restorer, mask = sig["actions"][abi.SIGTRAP - 1]
        t.syscall(abi.SYS.rt_sigaction, abi.SIGTRAP, t.put_struct(abi.kernel_sigaction(handler, flags, restorer,
                                                                                        mask)), 0, 8)
        t.traps_ignored = True
    # POSIX timers before the queued signals: restoring an overrun count delivers one signal of the timer.
    pending_thread, pending_shared = restore_timers(t, sig)
    if any(tm.get("signo") == abi.SIGTRAP for tm in sig.get("timers", [])) or any(
            int.from_bytes(bytes.fromhex(h)[:4], "little") == abi.SIGTRAP for h in pending_thread + pending_shared):
        # A SIGTRAP that is or may become pending would be taken during a batch (which unblocks SIGTRAP).
        t.traps_ignored = True
    # Ids as the task sees them: under restore --pidns its pid out here is another.
    me = procfs.own_pid(t.pid) if pending_thread or pending_shared else 0
    for info_hex in pending_thread:
        info = bytes.fromhex(info_hex)
        signo = int.from_bytes(info[:4], "little")
        t.syscall(abi.SYS.rt_tgsigqueueinfo, me, me, signo, t.put(info))
    for info_hex in pending_shared:
        info = bytes.fromhex(info_hex)
        signo = int.from_bytes(info[:4], "little")
        t.syscall(abi.SYS.rt_sigqueueinfo, me, signo, t.put(info))


def restore_misc(task: RemoteTask, misc: dict[str, Any], batch: Batch | None = None) -> None:
    """batch: queue the calls there (its caller runs it), else run them now."""
    t = task
    b = batch if batch is not None else t.batch()
    b.call(abi.SYS.set_tid_address, misc["clear_child_tid"])
    rl = misc["robust_list"]
    if rl["head"]:
        b.call(abi.SYS.set_robust_list, rl["head"], rl["len"])
    b.call(abi.SYS.personality, misc["personality"])
    b.call(abi.SYS.umask, misc["umask"])
    b.call(abi.SYS.chdir, b.cstring(misc["cwd"]), what=f"chdir {misc['cwd']}")
    b.call(abi.SYS.prctl, abi.PR_SET_NAME, b.cstring(misc["comm"][:15]), 0, 0, 0)
    rseq = misc.get("rseq")
    if rseq:
        b.call(abi.SYS.rseq, rseq["addr"], rseq["size"], 0, rseq["sig"], what="rseq register")
    if "timerslack_ns" in misc:
        b.call(abi.SYS.prctl, abi.PR_SET_TIMERSLACK, misc["timerslack_ns"], 0, 0, 0)
    # Session and process group: a leader becomes one again. Joining another process's group or session
    # is not possible (it may not exist here), so a member stays in the restorer's.
    me = procfs.own_pid(t.pid)  # as the task sees itself: not t.pid under restore --pidns
    if misc.get("sid") == me:
        b.call(abi.SYS.setsid)
    elif misc.get("pgid") == me:
        b.call(abi.SYS.setpgid, 0, 0)
    if misc.get("no_new_privs"):
        b.call(abi.SYS.prctl, abi.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    restore_prctl(t, misc.get("prctl") or {}, b)  # its reads join this batch
    if batch is None:
        b.run()


def _spec_ctrl(value: int) -> int:
    """The PR_SET_SPECULATION_CTRL argument that gives back what PR_GET_SPECULATION_CTRL returned."""
    for bit in (abi.PR_SPEC_FORCE_DISABLE, abi.PR_SPEC_DISABLE_NOEXEC, abi.PR_SPEC_DISABLE, abi.PR_SPEC_ENABLE):
        if value & bit:
            return bit
    return 0


_OPT_INT = (int, type(None))
PRCTL_SCHEMA: Schema = {"child_subreaper": _OPT_INT, "pdeathsig": _OPT_INT, "keepcaps": _OPT_INT,
                        "thp_disable": _OPT_INT, "mce_kill": _OPT_INT, "tsc": _OPT_INT, "speculation": list,
                        "mdwe": _OPT_INT, "memory_merge": _OPT_INT, "cpuid": _OPT_INT, "futex_hash_slots": _OPT_INT}
CAPS_SCHEMA: Schema = {"inh": int, "prm": int, "eff": int, "bnd": int, "amb": int}


def check_proc_state(misc: dict[str, Any], fname: str) -> None:
    """misc.prctl and misc.caps, when the image has them (older images do not)."""
    if misc.get("prctl") is not None:
        check_schema(misc["prctl"], PRCTL_SCHEMA, fname, "misc.prctl.")
        if not all(v is None or type(v) is int for v in misc["prctl"]["speculation"]):
            raise ImageError(f"{fname}: field 'misc.prctl.speculation' must hold integers or null")
    if misc.get("caps") is not None:
        check_schema(misc["caps"], CAPS_SCHEMA, fname, "misc.caps.")
        if not all(0 <= v < 1 << 64 for v in misc["caps"].values()):
            raise ImageError(f"{fname}: field 'misc.caps' must hold 64-bit sets")


def restore_prctl(task: RemoteTask, pr: dict[str, Any], batch: Batch | None = None) -> None:
    """prctl state set before the credentials (see restore_after_creds for the rest). Each value is compared
    with what the new task has (it inherited the restorer's), and set only where it differs: all the values
    are read by one batch (`batch`, run by the caller, when given), the changes made by another once it ran."""
    t = task
    reads = batch if batch is not None else t.batch()
    now: dict[Any, Any] = {}  # key -> Ref of a call returning the value, or (Ref, address it writes to)

    def get(key: Any, option: int, arg: int = 0) -> None:
        now[key] = reads.call(abi.SYS.prctl, option, arg, 0, 0, 0, check=False)

    def get_into(key: Any, option: int) -> None:
        addr = reads.put(bytes(8))
        now[key] = (reads.call(abi.SYS.prctl, option, addr, 0, 0, 0, what=f"prctl {option}"), addr)

    if pr.get("child_subreaper") is not None:
        get_into("child_subreaper", abi.PR_GET_CHILD_SUBREAPER)
    if pr.get("thp_disable") is not None:
        get("thp_disable", abi.PR_GET_THP_DISABLE)
    if pr.get("mce_kill") is not None:
        get("mce_kill", abi.PR_MCE_KILL_GET)
    if pr.get("tsc") is not None:
        get_into("tsc", abi.PR_GET_TSC)
    for which, value in enumerate(pr.get("speculation") or []):
        if value is not None and value & abi.PR_SPEC_PRCTL:
            get(("speculation", which), abi.PR_GET_SPECULATION_CTRL, which)
    if pr.get("memory_merge") is not None:
        get("memory_merge", abi.PR_GET_MEMORY_MERGE)
    if pr.get("futex_hash_slots") is not None:
        get("futex_hash_slots", abi.PR_FUTEX_HASH, abi.PR_FUTEX_HASH_GET_SLOTS)
    if pr.get("cpuid") is not None:
        now["cpuid"] = reads.call(abi.SYS.arch_prctl, abi.ARCH_GET_CPUID, 0, check=False)
    if pr.get("mdwe"):
        get("mdwe", abi.PR_GET_MDWE)
    reads.on_done(lambda results: _apply_prctl(t, pr, now, results))
    if batch is None:
        reads.run()


def _apply_prctl(t: RemoteTask, pr: dict[str, Any], now: dict[Any, Any], results: list[int]) -> None:
    """restore_prctl's second half: the values read (`now`: Refs into `results`, or with the address the call
    wrote to), compared and set."""
    have: dict[Any, int] = {}
    for key, ref in now.items():
        if isinstance(ref, tuple):
            have[key] = int.from_bytes(t.read(ref[1], 4), "little", signed=True)
        else:
            have[key] = results[ref.index]
    b = t.batch()

    def set_(name: str, *args: int) -> None:
        b.call(abi.SYS.prctl, *args, *([0] * (5 - len(args))), what=f"prctl {name}")

    if "child_subreaper" in have and pr["child_subreaper"] != have["child_subreaper"]:
        set_("PR_SET_CHILD_SUBREAPER", abi.PR_SET_CHILD_SUBREAPER, pr["child_subreaper"])
    thp = pr.get("thp_disable")
    if "thp_disable" in have and thp != have["thp_disable"]:
        # Bit 1 is PR_THP_DISABLE_EXCEPT_ADVISED (Linux 6.18), passed back as the flags argument.
        set_("PR_SET_THP_DISABLE", abi.PR_SET_THP_DISABLE, 1 if thp else 0, thp & ~1)
    mce = pr.get("mce_kill")
    if "mce_kill" in have and mce != have["mce_kill"]:
        if mce == abi.PR_MCE_KILL_DEFAULT:
            set_("PR_MCE_KILL", abi.PR_MCE_KILL, abi.PR_MCE_KILL_CLEAR)
        else:
            set_("PR_MCE_KILL", abi.PR_MCE_KILL, abi.PR_MCE_KILL_SET, mce)
    if "tsc" in have and pr["tsc"] != have["tsc"]:
        set_("PR_SET_TSC", abi.PR_SET_TSC, pr["tsc"])
    for which, value in enumerate(pr.get("speculation") or []):
        if ("speculation", which) in have and value != have[("speculation", which)]:
            set_(f"PR_SET_SPECULATION_CTRL({which})", abi.PR_SET_SPECULATION_CTRL, which, _spec_ctrl(value))
    if "memory_merge" in have and pr["memory_merge"] != have["memory_merge"]:
        set_("PR_SET_MEMORY_MERGE", abi.PR_SET_MEMORY_MERGE, pr["memory_merge"])
    slots = pr.get("futex_hash_slots")
    if "futex_hash_slots" in have and slots != have["futex_hash_slots"]:
        set_("PR_FUTEX_HASH_SET_SLOTS", abi.PR_FUTEX_HASH, abi.PR_FUTEX_HASH_SET_SLOTS, slots)
    cpuid = pr.get("cpuid")
    if "cpuid" in have and cpuid != have["cpuid"]:
        # 0: the CPUID instruction faults (SIGSEGV); only the program's own code runs it, never our injection.
        b.call(abi.SYS.arch_prctl, abi.ARCH_SET_CPUID, cpuid, what="arch_prctl(ARCH_SET_CPUID)")
    # Last: memory-deny-write-execute is irreversible and refuses later executable mappings.
    if "mdwe" in have and pr["mdwe"] != have["mdwe"]:
        set_("PR_SET_MDWE", abi.PR_SET_MDWE, pr["mdwe"])
    b.run()


def restore_caps_before_creds(task: RemoteTask, misc: dict[str, Any], batch: Batch | None = None) -> None:
    """Drop from the bounding set what the process did not have (this needs CAP_SETPCAP, which goes with
    root), and keep the permitted set across the change of uids, for restore_after_creds to set."""
    caps = misc.get("caps")
    if not caps:
        return
    have = procfs.read_status(task.pid)
    extra = caps["bnd"] & ~have.cap_bnd
    if extra:
        raise RestoreError(f"capability bounding set {caps['bnd']:#x} has capabilities the restorer lacks "
                           f"({extra:#x})", stage="caps", pid=task.pid)
    drop = have.cap_bnd & ~caps["bnd"]
    b = batch if batch is not None else task.batch()
    for cap in range(64):
        if drop >> cap & 1:
            b.call(abi.SYS.prctl, abi.PR_CAPBSET_DROP, cap, 0, 0, 0, what=f"PR_CAPBSET_DROP({cap})")
    b.call(abi.SYS.prctl, abi.PR_SET_KEEPCAPS, 1, 0, 0, 0)
    if batch is None:
        b.run()


def restore_after_creds(task: RemoteTask, misc: dict[str, Any], batch: Batch | None = None, *,
                        is_root: bool = True) -> None:
    """State that a change of credentials would reset: capabilities, keep-caps and the parent-death signal.
    batch: queue the calls there (its caller runs it, through run_creds_batch)."""
    t = task
    caps = misc.get("caps")
    b = batch if batch is not None else t.batch()
    if caps:
        hdr = b.put_struct(abi.user_cap_header(abi.LINUX_CAPABILITY_VERSION_3, 0))
        data = (abi.user_cap_data * 2)(
            abi.user_cap_data(caps["eff"] & 0xFFFFFFFF, caps["prm"] & 0xFFFFFFFF, caps["inh"] & 0xFFFFFFFF),
            abi.user_cap_data(caps["eff"] >> 32, caps["prm"] >> 32, caps["inh"] >> 32))
        b.call(abi.SYS.capset, hdr, b.put_struct(data), what="capset")
        for cap in range(64):
            if caps["amb"] >> cap & 1:
                b.call(abi.SYS.prctl, abi.PR_CAP_AMBIENT, abi.PR_CAP_AMBIENT_RAISE, cap, 0, 0,
                       what=f"PR_CAP_AMBIENT_RAISE({cap})")
    pr = misc.get("prctl") or {}
    keep = pr.get("keepcaps")
    if keep is not None or caps:
        b.call(abi.SYS.prctl, abi.PR_SET_KEEPCAPS, keep or 0, 0, 0, 0)
    if pr.get("pdeathsig"):
        # A tree's root has the restorer for its parent now: the signal comes when the restorer exits (see
        # README). A child of the tree has its own parent back: nothing to say.
        if is_root:
            log.warning("pid %d: parent-death signal %d restored: it comes when this restorer exits", t.pid,
                        pr["pdeathsig"])
        b.call(abi.SYS.prctl, abi.PR_SET_PDEATHSIG, pr["pdeathsig"], 0, 0, 0)
    if batch is None:
        run_creds_batch(b, misc)


def run_creds_batch(b: Batch, misc: dict[str, Any]) -> None:
    """Run a batch holding restore_after_creds's calls: a refused capset is named with the sets it asked for."""
    try:
        b.run()
    except KernelError as e:
        raise creds_error(b, misc, e) from e


def creds_error(b: Batch, misc: dict[str, Any], e: KernelError) -> BaseException:
    """What a batch holding restore_after_creds's calls raises when it failed with `e`."""
    caps = misc.get("caps")
    if caps and b.entries_failed_what == "capset":
        return RestoreError(f"cannot set capabilities (permitted {caps['prm']:#x}, effective {caps['eff']:#x}, "
                            f"inheritable {caps['inh']:#x}): {e.strerror}", stage="caps", pid=b.task.pid)
    return e


def restore_creds(task: RemoteTask, creds: dict[str, Any], batch: Batch | None = None) -> None:
    """Credentials last among the injected calls: dropping root takes away what the others need. batch: queue
    the calls there (its caller runs it)."""
    b = batch if batch is not None else task.batch()
    groups = creds["groups"]
    if groups:
        raw = b"".join(g.to_bytes(4, "little") for g in groups)
        b.call(abi.SYS.setgroups, len(groups), b.put(raw))
    else:
        b.call(abi.SYS.setgroups, 0, 0)
    r, e, s, _fs = creds["gids"]
    b.call(abi.SYS.setresgid, r, e, s)
    r, e, s, _fs = creds["uids"]
    b.call(abi.SYS.setresuid, r, e, s)
    if batch is None:
        b.run()


def restore_dumpable(task: RemoteTask, misc: dict[str, Any], batch: Batch | None = None) -> None:
    """After the credentials: changing uids resets the dumpable flag (to fs.suid_dumpable), which would lock
    the process out of its own /proc/self/{environ,auxv,mem}. Values 0 and 1 can be set by the task itself."""
    value = misc.get("dumpable")
    if value in (0, 1):
        if batch is not None:
            batch.call(abi.SYS.prctl, abi.PR_SET_DUMPABLE, value, 0, 0, 0)
        else:
            task.syscall(abi.SYS.prctl, abi.PR_SET_DUMPABLE, value, 0, 0, 0)


def restore_all_creds(task: RemoteTask, misc: dict[str, Any], *, is_root: bool = True) -> None:
    """restore_caps_before_creds, restore_creds, restore_after_creds and restore_dumpable, in that order, by one
    batch. is_root: the task is the restore's root (its parent is the restorer)."""
    b = task.batch()
    queue_all_creds(task, misc, b, is_root=is_root)
    run_creds_batch(b, misc)


def queue_all_creds(task: RemoteTask, misc: dict[str, Any], b: Batch, *, is_root: bool = True) -> None:
    """restore_all_creds's calls queued in `b`, to run last in it (run_creds_batch)."""
    restore_caps_before_creds(task, misc, b)
    restore_creds(task, misc["creds"], b)
    restore_after_creds(task, misc, b, is_root=is_root)
    restore_dumpable(task, misc, b)


# Machine code run once in a restored task whose image holds AMX tile data. The kernel gives a task an XSTATE
# buffer large enough for the tiles only at its first tile instruction after permission was granted
# (Documentation/arch/x86/xstate.rst, "The first use ... is trapped"); until then PTRACE_SETREGSET refuses an
# XSTATE with XTILEDATA in use (EINVAL, seen on 6.18). tilerelease puts the tiles back in their initial state;
# the saved XSTATE is set over it at the end. The closing `syscall` makes RemoteTask.raw stop the task there.
_TILE_FIRST_USE = bytes.fromhex(
    "c4e2784905" "37000000"  # ldtilecfg 0x37(%rip)       the configuration at +64
    "c4e27b49c0"              # tilezero %tmm0             touches tile data: the kernel sizes the buffer
    "c4e27849c0"              # tilerelease
    "0f05"                    # syscall
).ljust(64, b"\xcc")          # int3 padding
# Palette 1, tmm0 one row of 64 bytes, every other tile unused; reserved bytes zero (or ldtilecfg faults).
_TILE_FIRST_USE_CFG = bytes([1, 0]) + bytes(14) + (64).to_bytes(2, "little") + bytes(30) + bytes([1]) + bytes(15)


_XCOMP_SCRATCH_OFFSET = 256  # past the code and its configuration


def xcomp_perm_of(core: dict[str, Any]) -> int | None:
    """core.xcomp_perm: the permission mask for dynamically enabled XSTATE features the process held (what
    ARCH_GET_XCOMP_PERM answered at dump), or None where the dumping kernel had no such call (or an image
    from before it was saved). Raises ImageError if it is neither."""
    value = core.get("xcomp_perm")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ImageError(f"core.xcomp_perm: expected an unsigned 64-bit integer or null, got {value!r}")
    return value


def xcomp_request(want: int, have: int) -> int | None:
    """The argument for ARCH_REQ_XCOMP_PERM that grows permission `have` to `want`, or None if nothing is
    missing. The kernel takes the number of the highest XSTATE component a facility needs and grants the
    facility's whole set (AMX: 18, XTILEDATA, which brings XTILECFG with it)."""
    missing = want & ~have
    return missing.bit_length() - 1 if missing else None


def _xcomp_get(task: RemoteTask, option: int, name: str, known: dict[int, int] | None = None) -> int:
    if known and option in known:
        return known.pop(option)  # read ahead (queue_xcomp_reads); a later read asks the task again
    addr = task.alloc_scratch() + _XCOMP_SCRATCH_OFFSET
    ret = task.raw(abi.SYS.arch_prctl, option, addr)
    if ret < 0:
        raise RestoreError(f"arch_prctl({name}) in the new task: {os.strerror(-ret)}", stage="xstate",
                           pid=task.pid)
    return int.from_bytes(task.read(addr, 8), "little")


def queue_xcomp_reads(b: Batch, core: dict[str, Any]) -> list[tuple[int, Ref, int]]:
    """Queue in `b` the permission reads prepare_xstate and restore_guest_perm will need; after b has run,
    xcomp_known() gives their values to pass them."""
    options = []
    if core.get("xcomp_perm") is not None:
        options.append(abi.ARCH_GET_XCOMP_PERM)
    if core.get("xcomp_guest_perm") is not None:
        options.append(abi.ARCH_GET_XCOMP_GUEST_PERM)
    out = []
    for option in options:
        addr = b.put(bytes(8))
        out.append((option, b.call(abi.SYS.arch_prctl, option, addr, check=False), addr))
    return out


def xcomp_known(b: Batch, queued: list[tuple[int, Ref, int]]) -> dict[int, int]:
    """The values read by queue_xcomp_reads's calls (those that succeeded), by option, once `b` has run."""
    return {option: int.from_bytes(b.task.read(addr, 8), "little") for option, ref, addr in queued
            if b.results[ref.index] == 0}


def prepare_xstate(task: RemoteTask, core: dict[str, Any], known: dict[int, int] | None = None) -> None:
    """Before the saved XSTATE can be set (set_final_state): check it is shaped for this CPU, give the task the
    permission for dynamically enabled features (AMX) the process had, and, where the saved state holds tile
    data, make the kernel size the task's buffer for it. Early in the restore, so that a CPU or kernel that
    cannot grant the permission fails the restore before anything runs, and before the process's sigaltstack
    is installed (the kernel checks altstack sizes against the permitted features, as it did for the original).
    known: values already read (xcomp_known).
    """
    pid = task.pid
    xstate = bytes.fromhex(core["xstate"])
    _, size = cpu_xstate()
    if len(xstate) != size:
        raise ImageError(f"core.xstate of task {pid} is {len(xstate)} bytes; this CPU's XSTATE regset is {size}")
    try:
        _, _, bv = parse_xstate(xstate)
    except ValueError as e:
        raise ImageError(f"core.xstate of task {pid}: {e}") from None
    want = xcomp_perm_of(core)
    tiles = bv & abi.XFEATURE_MASK_USER_DYNAMIC
    if want is None or tiles & ~want:
        if tiles:
            raise ImageError(f"task {pid}: core.xstate holds AMX tile data (xstate_bv {bv:#x}) but core.xcomp_perm "
                             f"({'missing' if want is None else hex(want)}) does not permit it")
        return
    have = _xcomp_get(task, abi.ARCH_GET_XCOMP_PERM, "ARCH_GET_XCOMP_PERM", known)
    nr = xcomp_request(want, have)
    if nr is not None:
        supp = _xcomp_get(task, abi.ARCH_GET_XCOMP_SUPP, "ARCH_GET_XCOMP_SUPP")
        lacking = want & ~supp
        if lacking:
            what = " (AMX tiles)" if not lacking & ~abi.XFEATURE_MASK_XTILE else ""
            raise RestoreError(f"the process had permission for XSTATE features {lacking:#x}{what}; this CPU and "
                               f"kernel offer only {supp:#x}", stage="xstate", pid=pid)
        ret = task.raw(abi.SYS.arch_prctl, abi.ARCH_REQ_XCOMP_PERM, nr)
        if ret < 0:
            raise RestoreError(f"arch_prctl(ARCH_REQ_XCOMP_PERM, {nr}) refused: {os.strerror(-ret)}",
                               stage="xstate", pid=pid)
        have = _xcomp_get(task, abi.ARCH_GET_XCOMP_PERM, "ARCH_GET_XCOMP_PERM")
    if have != want:
        raise RestoreError(f"XSTATE feature permission is {have:#x} in the new task, the process had {want:#x}",
                           stage="xstate", pid=pid)
    if tiles:
        _first_tile_use(task)


def restore_guest_perm(task: RemoteTask, core: dict[str, Any], known: dict[int, int] | None = None) -> None:
    """The permission for XSTATE features the process's KVM guests may use (ARCH_REQ_XCOMP_GUEST_PERM): asked
    for again in the new task, and required to come out equal, or the restore fails naming it."""
    want = core.get("xcomp_guest_perm")
    if want is None:
        return
    if type(want) is not int or not 0 <= want < 1 << 64:
        raise ImageError(f"core.xcomp_guest_perm: expected an unsigned 64-bit integer or null, got {want!r}")
    have = _xcomp_get(task, abi.ARCH_GET_XCOMP_GUEST_PERM, "ARCH_GET_XCOMP_GUEST_PERM", known)
    nr = xcomp_request(want, have)
    if nr is not None:
        ret = task.raw(abi.SYS.arch_prctl, abi.ARCH_REQ_XCOMP_GUEST_PERM, nr)
        if ret < 0:
            raise RestoreError(f"arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, {nr}) refused: {os.strerror(-ret)}",
                               stage="xstate", pid=task.pid)
        have = _xcomp_get(task, abi.ARCH_GET_XCOMP_GUEST_PERM, "ARCH_GET_XCOMP_GUEST_PERM")
    if have != want:
        raise RestoreError(f"guest XSTATE feature permission is {have:#x} in the new task, the process had "
                           f"{want:#x}", stage="xstate", pid=task.pid)


def _first_tile_use(task: RemoteTask) -> None:
    code = task.put(_TILE_FIRST_USE + _TILE_FIRST_USE_CFG, 0)  # scratch is in the RWX injection mapping
    syscall_ip = task.syscall_ip
    task.syscall_ip = code  # raw() starts the task there; the code ends in its `syscall`
    try:
        task.raw(abi.SYS.getpid)
    except LazarusError as e:
        raise RestoreError(f"first AMX tile instruction in the new task failed: {e}", stage="xstate",
                           pid=task.pid) from e
    finally:
        task.syscall_ip = syscall_ip


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


def seize_new(pid: int, what: str, /, **err: Any) -> None:
    """Seize a task we just created (dying with us: EXITKILL) and hold it in a ptrace stop; RestoreError naming
    `what` if it is not there to be held (it died, or stopped otherwise)."""
    ptrace.seize(pid, abi.PTRACE_O_TRACESYSGOOD | abi.PTRACE_O_EXITKILL)
    ptrace.interrupt(pid)
    st = ptrace.wait(pid)
    if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
        raise RestoreError(f"{what} {pid} {st}", **err)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
