"""restore --pidns: the image's root in a new PID namespace, under a tiny init of ours, with its own pids.

    restorer (pid namespace P)                      new PID + mount namespace N (a copy of our mounts)
    --------------------------                      --------------------------------------------------
    trampoline mapped (kernel/clone.py)
    clone3(NEWPID|NEWNS) ------------------------>  init: pid 1 in N, a copy of us; traced (EXITKILL)
    inject into init: mount --make-rslave /,          /proc is now N's own procfs: /proc/self is the
      mount proc on /proc                             task's pid in N, as getpid() says
    inject into init: clone3(CLONE_PTRACE,   ----->  root: the image's pid in N (out here: any), init's
      set_tid=[image pid])                            child, a copy of init and so of us, traced by us
    ... the whole restore of the root (restore/__init__.py), as for any restore ...
    detach the root: it runs
    inject into init: reset inherited state, close    init: nothing left but the trampoline page, its
      fds, unmap all, chdir /, program + registers    program on it (kernel/nsinit.py)
    detach the init ------------------------------>  init blocks every signal, loops in rt_sigtimedwait

set_tid with one entry sets the pid of the innermost level only (clone3(2)): the level the task and its
namespace see; out here the kernel picks one. Threads (and, with process trees, children) are made by
injected clone3 in their restored parent, which is inside N already: their one set_tid entry is their id in
N too.

The root is the init's child from the start (a task made by us after setns() would be ours, and fall to our
own reaper, not the init, when we exit). The init reaps it and every orphan of the namespace, forwards
SIGHUP, SIGINT and SIGTERM sent to the init to it, and exits with its status (128 + N if signal N killed it):
`restore` without -d waits for the init and reports that. The init's exit ends the namespace (the kernel kills
what is left in it). Should the restore fail, or the restorer die, before the init runs, the init is killed
(by us, or by PTRACE_O_EXITKILL), and the namespace with it.
"""

from __future__ import annotations

import contextlib
import os
import signal

from lazarus.errors import KernelError, LazarusError, RestoreError
from lazarus.kernel import abi, nsinit, procfs, ptrace
from lazarus.kernel.clone import Trampoline
from lazarus.kernel.procfs import own_pid
from lazarus.logs import getLogger
from lazarus.remote import RemoteTask
from lazarus.restore import cgroups
from lazarus.restore import core as rcore
from lazarus.restore.memory import clear_address_space, close_inherited_fds

log = getLogger(__name__)
_NEG1 = (1 << 64) - 1
_ALL = (1 << 64) - 1


class NsInit:
    """pid 1 of one `--pidns` restore's namespace, traced and stopped until run()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid  # as seen from here
        self.running = False
        self.remote: RemoteTask | None = None

    @classmethod
    def start(cls, tramp: Trampoline, tramp_size: int, join: list[str]) -> NsInit:
        """Make the init from the trampoline mapped in this process and give its namespace its own /proc.
        `join`: the cgroups the root joins (cgroups.plan), which the init joins too, so that the restored
        process's accounting and a cgroup kill cover its namespace whole. Raises RestoreError."""
        try:
            pid = tramp.clone_ns_init()
        except KernelError as e:
            raise RestoreError(f"cannot make a new PID namespace: {e}", stage="pidns") from e
        init = cls(pid)
        try:
            rcore.seize_new(pid, "new init", stage="pidns")
            cgroups.join(pid, join)
            r = init.remote = RemoteTask(pid, tramp.syscall_ip)
            r.keep_state()
            r.use_scratch(tramp.addr + abi.PAGE_SIZE, tramp_size - abi.PAGE_SIZE)
            # Slave, not private: mounts made out here later still show inside; nothing mounted inside leaks out.
            r.syscall(abi.SYS.mount, 0, r.cstring("/"), 0, abi.MS_REC | abi.MS_SLAVE, 0,
                      what="mount --make-rslave / in the new mount namespace")
            r.syscall(abi.SYS.mount, r.cstring("proc", 0), r.cstring("/proc", 64), r.cstring("proc", 128),
                      abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC, 0, what="mount of the namespace's /proc")
        except BaseException as e:
            init.kill()
            if isinstance(e, LazarusError) and not isinstance(e, RestoreError):
                raise RestoreError(f"init of the new PID namespace: {e}", stage="pidns") from e
            raise
        return init

    def clone_root(self, pid: int) -> int:
        """The root task, `pid` inside: made by the init, stopped and traced by us (CLONE_PTRACE), in the state
        a trampoline clone has (a copy of us). Returns its pid out here. Raises RestoreError."""
        r = self.remote
        assert r is not None
        tids = r.put(pid.to_bytes(4, "little"), 2048)
        args = abi.clone_args()
        args.flags = abi.CLONE_PTRACE
        args.exit_signal = signal.SIGCHLD
        args.set_tid = tids
        args.set_tid_size = 1
        ret = r.raw(abi.SYS.clone3, r.put_struct(args, 2048 + 64), abi.sizeof(abi.clone_args))
        if ret < 0:
            raise RestoreError(f"clone3 of pid {pid} in the new PID namespace: {os.strerror(-ret)}", stage="create",
                               pid=pid)
        if ret != pid:  # pragma: no cover - the kernel gives set_tid or fails
            raise RestoreError(f"pid {pid} was created as {ret} in the new PID namespace", stage="create", pid=pid)
        child = host_child(self.pid, pid)
        st = ptrace.wait(child)
        if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
            raise RestoreError(f"new task {child} {st}", stage="create", pid=pid)
        return child

    def finish(self, root_pid: int) -> None:
        """Strip the init down to the trampoline page and set its program and registers (`root_pid`: the
        root's pid inside). It stays stopped until run(). Done once the root runs: the few ms it takes are not
        on the way to that, and until then the init is a stopped copy of us sharing our pages."""
        r = self.remote
        assert r is not None
        base = r.scratch - abi.PAGE_SIZE
        try:
            rcore.reset_inherited(r)
            close_inherited_fds(r)
            clear_address_space(r, (base, base + abi.PAGE_SIZE + r.scratch_size))
            r.syscall(abi.SYS.chdir, r.cstring("/"))
            r.syscall(abi.SYS.prctl, abi.PR_SET_NAME, r.cstring("lazarus-init"), 0, 0, 0)
            # A group of its own (the root, cloned already, stays in ours): a terminal's ^C reaches the root
            # as without --pidns, and not a second time through the init's forwarding.
            r.syscall(abi.SYS.setpgid, 0, 0)
            r.write(base + nsinit.CODE_OFFSET, nsinit.CODE)
            r.write(base + nsinit.DATA_OFFSET, nsinit.SIGSET.to_bytes(8, "little") + bytes(8))
            # Last: the scratch pages (the code page, which holds the syscall we inject through, stays).
            r.syscall(abi.SYS.munmap, r.scratch, r.scratch_size)
            regs = abi.user_regs_struct.from_buffer_copy(r.saved_regs)
            regs.rip = base + nsinit.CODE_OFFSET
            regs.rdi = root_pid
            regs.rsi = base + nsinit.DATA_OFFSET
            regs.rsp = base + nsinit.DATA_OFFSET  # never used: the init pushes nothing
            regs.rax = 0
            regs.orig_rax = _NEG1
            ptrace.set_regs(self.pid, regs)
            ptrace.set_sigmask(self.pid, _ALL)
        finally:
            r.close()
            self.remote = None

    def run(self) -> None:
        """Let the init go, once the root runs."""
        ptrace.detach(self.pid)
        self.running = True

    def wait(self) -> int:
        """Wait for the init to exit (the root's status: see the module docstring); its exit code."""
        while True:
            st = ptrace.wait(self.pid, timeout=float("inf"))
            if st.exited:
                return st.exit_code
            if st.signaled:
                return 128 + st.term_sig

    def kill(self) -> None:
        """Kill the init and reap it; the kernel then kills whatever else is in the namespace."""
        if self.remote is not None:
            with contextlib.suppress(LazarusError, OSError):
                self.remote.close()
            self.remote = None
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(LazarusError, OSError):
            for _ in range(100):
                st = ptrace.wait(self.pid, timeout=5)
                if st.exited or st.signaled:
                    break


def host_tid(pid: int, tid: int) -> int:
    """The id out here of thread `tid` (as its own namespace numbers it) of process `pid` (a pid out here)."""
    if own_pid(pid) == pid:
        return tid
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(LazarusError, OSError):
            if own_pid(int(name)) == tid:
                return int(name)
    raise RestoreError(f"thread {tid} of pid {pid} not found in /proc/{pid}/task", stage="threads", pid=pid)


def host_child(parent: int, pid: int) -> int:
    """The pid out here of the child of `parent` (a pid out here) whose pid in its own namespace is `pid`: what a
    clone3 injected in a restored parent returns is the latter (under --pidns they differ)."""
    for kid in procfs.children(parent):
        with contextlib.suppress(LazarusError, OSError):
            if own_pid(kid) == pid:
                return kid
    raise RestoreError(f"child {pid} of pid {parent} not found", stage="create", pid=parent)

