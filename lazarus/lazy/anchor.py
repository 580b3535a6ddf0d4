"""The anchor: a lazily restored task holds one fd of its own userfaultfd until all its pages are in.

Why. A userfaultfd whose last fd closes drops its registration, and every page still missing then reads as
zeros. The lazy server and its guard hold copies, and the guard kills the task if the server dies; but if every
Lazarus process dies at once (each SIGKILLed, an OOM kill of the group), the kernel closes their fds in
do_exit's exit_files, before any kill-on-exit mechanism acts (pdeathsig, PTRACE_O_EXITKILL and a pid
namespace's init all act later, in exit_notify): a window in which the task runs on zeros. With one fd of the
uffd in the task's own table, the uffd outlives every Lazarus process: the task's faults simply wait (for
`lazarus lazy-pages --adopt`, or for its own death: its mm goes in exit_mm, before exit_files closes the fd).

    restore:  userfaultfd() in the task -> dup3 to ANCHOR (the highest fd its RLIMIT_NOFILE allows, capped;
              O_CLOEXEC) -> the low fd closed: the task's lowest-free fd allocation is unchanged
    complete: the server UFFDIO_UNREGISTERs every range of that uffd (from its own copy: the ioctl acts on the
              uffd's mm), so whoever still holds it holds nothing live; then removes the anchor from the
              task: seize, interrupt, injected close(ANCHOR) -- only if that fd number is still the same open
              file as the server's copy (kcmp) -- registers and mask put back exactly, detach
    fork:     the child inherits the anchor (its parent's uffd); it is removed when the child completes

Unregistering first makes the anchor harmless even where it cannot be removed (a task traced by a debugger):
no fault or event can wait on that uffd any more.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
from collections.abc import Callable, Iterable

from lazarus.errors import KernelError, LazarusError, NoSuchTask
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.pidfd import PidFd
from lazarus.kernel.syscall import same_file_across
from lazarus.kernel.uffd import Uffd
from lazarus.logs import getLogger
from lazarus.remote import RemoteTask, find_syscall_insn, restart_after_freeze

log = getLogger("lazarus.lazy")

# The anchor sits below the soft RLIMIT_NOFILE, but never above this: the kernel's fd table grows to the
# highest fd in use and never shrinks (1M fds would cost the task 8 MiB of kernel memory for good).
ANCHOR_FD_CAP = 1 << 16
STOP_TIMEOUT = 10.0
# Set once the task is stopped, before the first injected call: should the server die in the middle of an
# injection, the task is killed (and the guard, which still holds it as not complete, reports it) rather than
# left running on injected registers. Not at the seize: a task that never stops for us (timeout) must not die
# with the server.
_INJECT_OPTIONS = abi.PTRACE_O_TRACESYSGOOD | abi.PTRACE_O_EXITKILL
_WALL = 0x40000000
UFFD_LINK = "anon_inode:[userfaultfd]"
NOT_STOPPED = "not stopped"  # result prefix: the task stays seized; see detach_when_stopped()


def anchor_fd_number(soft_nofile: int, used: Iterable[int]) -> int:
    """The fd number for the anchor: the highest below min(soft limit, ANCHOR_FD_CAP) not in `used`."""
    taken = set(used)
    fd = min(soft_nofile, ANCHOR_FD_CAP) - 1
    while fd in taken:
        fd -= 1
    if fd < 3:
        raise LazarusError(f"no fd number free for the userfaultfd anchor under RLIMIT_NOFILE {soft_nofile}")
    return fd


def unregister_all(uffd: Uffd, pid: int) -> int:
    """UFFDIO_UNREGISTER every range of `pid` registered with `uffd`; returns how many. Ranges of another
    uffd (the task's own) are refused by the kernel (EINVAL) and left alone. Repeated while it finds some: a
    range the task moved (mremap) between the listing and the ioctl shows up in the next listing."""
    total = 0
    for _ in range(5):
        try:
            vmas = procfs.read_smaps(pid)
        except (LazarusError, OSError):
            return total
        done = 0
        for v in vmas:
            if "um" not in v.vmflags:
                continue
            try:
                uffd.unregister(v.start, v.end - v.start)
                done += 1
            except KernelError:
                continue
        total += done
        if not done:
            break
    return total


def remove_anchor(pid: int, task_fd: int, ours: int, *, idle: Callable[[], None] | None = None,
                  timeout: float = STOP_TIMEOUT) -> str:
    """Close fd `task_fd` of process `pid` if it is still the same open file as our fd `ours`.

    `idle` is called while waiting for the task to stop (the server reads its uffd events there: a task
    inside munmap or fork waits for them, killably, and would not stop until they are read).
    Returns what happened: "closed", "exited", "not ours" (closed or replaced by the task itself), or a
    reason it could not be done (the anchor then stays, harmless once unregister_all has run).
    """
    try:
        same = same_file_across(os.getpid(), ours, pid, task_fd)
    except NoSuchTask:
        return "exited"
    except KernelError as e:
        return f"kcmp failed: {e}"
    if not same:
        return "not ours"

    def close_it(remote: RemoteTask) -> str:
        # Checked again now that it is stopped: it ran between the first check and the stop.
        if same_file_across(os.getpid(), ours, pid, task_fd) is not True:
            return "not ours"
        remote.syscall(abi.SYS.close, task_fd, what=f"close(anchor fd {task_fd})")
        return "closed"

    return _inject(pid, idle, timeout, close_it, seize_hint="; traced by another process?")


def install_anchor(pid: int, task_fd: int, expected: int, uffd_fd: int, *,
                   idle: Callable[[], None] | None = None, timeout: float = STOP_TIMEOUT) -> str:
    """Give fork child `pid` its own anchor: replace its fd `task_fd` -- inherited from its parent, still the
    same open file as our fd `expected` (kcmp) -- by a copy of our fd `uffd_fd` (the child's own uffd).

    Nothing can push an fd into another process, so the child receives it itself, by injection: a socketpair
    made in it, one end taken out with pidfd_getfd, our copy sent through it with SCM_RIGHTS, recvmsg injected,
    dup3 over the inherited anchor (atomic: the number never stops holding a uffd), everything else closed.
    Returns "installed", "exited", "not ours", or why it could not be done (the child then keeps its parent's
    anchor: it is protected by the guard only).
    """
    try:
        if same_file_across(os.getpid(), expected, pid, task_fd) is not True:
            return "not ours"
    except NoSuchTask:
        return "exited"
    except KernelError as e:
        return f"cannot trace it ({e.strerror})"
    return _inject(pid, idle, timeout, lambda remote: _receive_and_place(remote, task_fd, expected, uffd_fd))


def _inject(pid: int, idle: Callable[[], None] | None, timeout: float, act: Callable[[RemoteTask], str], *,
            seize_hint: str = "") -> str:
    """Seize and stop running process `pid`, run `act` with a RemoteTask on it, put its registers and mask back
    exactly (syscall restart included) and let it go. Returns act's answer, "exited", or why it could not be
    done."""
    try:
        _seize(pid, idle)
    except NoSuchTask:
        return "exited"
    except KernelError as e:
        return f"cannot trace it ({e.strerror}{seize_hint})"
    stopped = False
    try:
        _stop(pid, idle, timeout)
        stopped = True
        ptrace.set_options(pid, _INJECT_OPTIONS)
        sys_ip = _syscall_ip(pid)
        if sys_ip is None:
            return "no syscall instruction found to inject through"
        remote = RemoteTask(pid, sys_ip)
        try:
            # A call our interrupt cut short with a plain -EINTR (sigtimedwait) must run again, as at a dump.
            restart_after_freeze(remote.saved_regs)
            return act(remote)
        finally:
            remote.close()  # registers and signal mask exactly as they were, syscall restart included
    except NoSuchTask:
        stopped = False
        return "exited"
    except NotStopped as e:
        return f"{NOT_STOPPED}: {e}"
    except (LazarusError, OSError) as e:
        return str(e)
    finally:
        if stopped:
            with contextlib.suppress(LazarusError, OSError):
                ptrace.detach(pid)


_MSGHDR = struct.Struct("<QI4xQQQQi4x")  # struct msghdr (x86-64): name, namelen, iov, iovlen, control, len, flags
_CMSG = struct.Struct("<QiiI")           # struct cmsghdr + one int of SCM_RIGHTS data
_CMSG_SPACE = 24


def _receive_and_place(remote: RemoteTask, task_fd: int, expected: int, uffd_fd: int) -> str:
    import socket  # here, not at import: a lazy restore imports this module for anchor_fd_number (start-up cost)
    pid = remote.pid
    scratch = remote.alloc_scratch(abi.PAGE_SIZE)
    remote.syscall(abi.SYS.socketpair, socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, scratch,
                   what="socketpair")
    sv0, sv1 = struct.unpack("<ii", remote.read(scratch, 8))
    newfd = -1
    try:
        with PidFd.open(pid) as pfd:
            end = socket.socket(fileno=pfd.getfd(sv0))
        with end:
            socket.send_fds(end, [b"\0"], [uffd_fd])
        iov, buf, ctrl = scratch + 64, scratch + 128, scratch + 256
        remote.write(iov, struct.pack("<QQ", buf, 1))
        remote.write(ctrl, bytes(_CMSG_SPACE))
        remote.write(scratch, _MSGHDR.pack(0, 0, iov, 1, ctrl, _CMSG_SPACE, 0))
        remote.syscall(abi.SYS.recvmsg, sv1, scratch, socket.MSG_CMSG_CLOEXEC, what="recvmsg")
        _len, level, kind, fd = _CMSG.unpack(remote.read(ctrl, _CMSG.size))
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            raise LazarusError(f"pid {pid}: no fd received through the injected socket", pid=pid)
        newfd = fd
        # Checked again, now that it is stopped: the task ran since the first check.
        if same_file_across(os.getpid(), expected, pid, task_fd) is not True:
            return "not ours"
        remote.syscall(abi.SYS.dup3, newfd, task_fd, os.O_CLOEXEC, what=f"dup3 to anchor fd {task_fd}")
        return "installed"
    finally:
        for fd in (newfd, sv0, sv1):
            if fd >= 0:
                with contextlib.suppress(LazarusError):
                    remote.raw(abi.SYS.close, fd)


TRACER_WAIT = 2.0


def _seize(pid: int, idle: Callable[[], None] | None) -> None:
    """PTRACE_SEIZE, waiting (bounded, serving meanwhile) while another tracer holds the task: the restore
    that made it detaches it only once the server has answered, and a small process can be complete by then."""
    deadline = time.monotonic() + TRACER_WAIT
    while True:
        try:
            ptrace.seize(pid, abi.PTRACE_O_TRACESYSGOOD)
            return
        except KernelError as e:
            if e.errno != errno.EPERM or time.monotonic() > deadline:
                raise
        if idle is not None:
            idle()
        time.sleep(0.001)


class NotStopped(LazarusError):
    """The task did not stop in time: it stays seized with an interrupt pending; detach_when_stopped() must
    be called until it returns True (else it sits in a ptrace stop once it gets there)."""


def detach_when_stopped(pid: int) -> bool:
    """For a task left seized by NotStopped: detach it once it has stopped. True when that is done (or it is
    gone); False while it still has not stopped."""
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG | _WALL)
    except ChildProcessError:
        return True
    if not wpid:
        return False
    st = ptrace.WaitStatus(wpid, status)
    if st.exited or st.signaled:
        return True
    if st.stopped and st.event != abi.PTRACE_EVENT_STOP:
        with contextlib.suppress(LazarusError, OSError):
            ptrace.cont(pid, st.stop_sig)  # a signal stop first: deliver it, the interrupt stop follows
        return False
    with contextlib.suppress(LazarusError, OSError):
        ptrace.detach(pid)
    return True


def _stop(pid: int, idle: Callable[[], None] | None, timeout: float) -> None:
    """PTRACE_INTERRUPT and wait for the interrupt stop, delivering any signal stop that comes first (as the
    dump's freeze does)."""
    try:
        own_child = procfs.read_status(pid).ppid == os.getpid()
    except (LazarusError, OSError):
        own_child = False
    ptrace.interrupt(pid)
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Peek first: the exit of our own child must stay for us to collect as its parent (a restore serving
            # its child in-process waits for its exit status); that of another's child is collected here, which
            # hands it back to its parent.
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT | _WALL)
            if info is not None and info.si_code in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED):
                if not own_child:
                    os.waitpid(pid, os.WNOHANG | _WALL)
                raise NoSuchTask(f"pid {pid} exited", pid=pid)
            wpid, status = os.waitpid(pid, os.WNOHANG | _WALL) if info is not None else (0, 0)
        except ChildProcessError as e:
            raise NoSuchTask(f"pid {pid} is gone", pid=pid) from e
        if wpid:
            st = ptrace.WaitStatus(wpid, status)
            if st.exited or st.signaled:
                raise NoSuchTask(f"pid {pid} {st}", pid=pid)
            if st.stopped and st.event == abi.PTRACE_EVENT_STOP:
                return
            if st.stopped:
                ptrace.cont(pid, st.stop_sig)
            continue
        if idle is not None:
            idle()
        if time.monotonic() > deadline:
            raise NotStopped(f"pid {pid} did not stop within {timeout:.0f} s", pid=pid)
        time.sleep(0.0005)


def _syscall_ip(pid: int) -> int | None:
    vmas = procfs.read_maps(pid)
    ranges = [(v.start, v.end) for v in vmas if v.path == "[vdso]"]
    ranges += [(v.start, v.end) for v in vmas if v.prot & abi.PROT_EXEC and not v.shared and v.path != "[vdso]"]
    for start, end in ranges:
        ip = find_syscall_insn(pid, start, end)
        if ip:
            return ip
    return None


def find_anchor(pid: int, ours: int) -> int | None:
    """The fd of `pid` that is the same open file as our uffd fd `ours` (the highest, if several), or None."""
    with contextlib.suppress(LazarusError, OSError):
        for fd in uffd_fds(pid):
            if same_file_across(os.getpid(), ours, pid, fd):
                return fd
    return None


def uffd_fds(pid: int) -> list[int]:
    """The fds of `pid` that are userfaultfds, highest first (the anchor is the highest)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        raise NoSuchTask(f"no such process {pid}", pid=pid) from None
    except OSError as e:
        raise KernelError(f"list {base}", e.errno or errno.EIO, pid=pid, path=base) from None
    out = []
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == UFFD_LINK:
                out.append(int(name))
        except OSError:
            continue
    return sorted(out, reverse=True)


__all__ = ["ANCHOR_FD_CAP", "NOT_STOPPED", "NotStopped", "anchor_fd_number", "detach_when_stopped", "find_anchor", "install_anchor", "remove_anchor", "uffd_fds", "unregister_all"]
