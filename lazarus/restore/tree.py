"""Creating the processes of a tree: each child by a clone3 injected into its parent, zombies, sessions, groups.

    restorer                root (blank copy, trampoline)         child (blank copy of its parent)
    --------                -----------------------------         --------------------------------
    clone_with_pid(root) -> seized, in pause() on the trampoline
    setsid / setpgid(0,0) if it leads one
                            clone3(set_tid=[pid], SIGCHLD,
                                   CLONE_PTRACE)              ->  born traced, in an event stop before it
                                                                  runs an instruction; same trampoline page
                                                                  and registers as its parent's copy
                                                                  setsid / setpgid(0,0) if it leads one
                                                                  ... its own children, the same way
    zombie: made the same way, then exit_group(code) (or killed by its signal); we, its tracer, reap it,
            which hands it to its parent as an unreaped zombie; the parent's SIGCHLD is taken back
    then: members join groups led by other tasks; each process is rebuilt (restore_task's stages);
    stopped ones get SIGSTOP queued; all are let go together at the end

Every child is made while its parent is still a blank copy of the restorer, before the parent's own address
space is rebuilt, so each child starts from the same known state as the root. create_child() takes only the
parent and the pid, so that another way of choosing pids (a new pid namespace: several levels) changes it alone.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

from lazarus.errors import KernelError, LazarusError, RestoreError
from lazarus.images.tree import Node
from lazarus.kernel import abi, procfs, ptrace
from lazarus.remote import RemoteTask
from lazarus.restore.pidns import host_child

_ARGS_OFFSET = 2048  # in the scratch, clear of what other helpers put at 0 (as restore/threads.py)
_NEG1 = (1 << 64) - 1


class BackgroundChecks:
    """Checks of a tree's tasks that only read /proc, run one after the other on a thread of their own while the
    restorer builds the next task: a task's VmFlags check reads its smaps, for which the kernel walks every page
    of its memory (0.6-0.9 ms for a child keeping 64 MiB from its parent). The restorer collects them all
    (wait()) before it changes a task's mappings again, and so before any task runs; a check's error is raised
    there. The thread reads files only (never ptrace: a tracee answers the thread that seized it alone)."""

    def __init__(self) -> None:
        import queue
        import threading
        self._jobs: queue.SimpleQueue[tuple[int, Callable[..., object], tuple[object, ...]] | None] = \
            queue.SimpleQueue()
        self._errors: list[tuple[int, BaseException]] = []
        self._thread = threading.Thread(target=self._run, name="tree-checks", daemon=True)
        self._started = False

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._errors:
                continue  # the restore fails at wait(): the rest need not run
            pid, fn, args = job
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - raised by wait()
                self._errors.append((pid, e))

    def submit(self, pid: int, fn: Callable[..., object], *args: object) -> None:
        """Run fn(*args), a check of task `pid`, on the thread."""
        if not self._started:
            self._thread.start()
            self._started = True
        self._jobs.put((pid, fn, args))

    def wait(self) -> None:
        """Every check submitted, done; the first error raised, naming its task."""
        self.close()
        if not self._errors:
            return
        pid, e = self._errors[0]
        if isinstance(e, LazarusError):
            if e.pid is None:
                e.pid = pid
            raise e
        if isinstance(e, OSError):  # its /proc files gone: it died
            raise RestoreError(f"cannot read the mappings of task {pid}: {e.strerror or e}", stage="memory",
                               pid=pid) from e
        raise e

    def close(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join()
            self._started = False


def create_child(parent: RemoteTask, pid: int, flags: int = 0) -> int:
    """clone3 process `pid` (its pid in the parent's namespace) from `parent`; it is left traced by us and in an
    event stop. Returns its pid out here (another under restore --pidns). `flags`: more clone flags
    (CLONE_FS for a child that shares its parent's cwd, root and umask)."""
    tids = parent.put(pid.to_bytes(4, "little"), _ARGS_OFFSET)
    args = abi.clone_args()
    args.flags = abi.CLONE_PTRACE | flags
    args.exit_signal = signal.SIGCHLD
    args.set_tid = tids
    args.set_tid_size = 1
    ret = parent.raw(abi.SYS.clone3, parent.put_struct(args, _ARGS_OFFSET + 64), abi.sizeof(abi.clone_args))
    if ret == -errno.EEXIST:
        raise RestoreError(f"pid {pid} is already in use", stage="create", pid=pid)
    if ret < 0:
        raise KernelError(f"clone3 of child {pid} in task {parent.pid}", -ret, pid=parent.pid)
    if ret != pid:  # pragma: no cover - the kernel gives set_tid or fails
        raise RestoreError(f"child {pid} was created as {ret}", stage="create", pid=pid)
    child = pid if procfs.own_pid(parent.pid) == parent.pid else host_child(parent.pid, pid)
    st = ptrace.wait(child)
    if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
        raise RestoreError(f"new child {pid} {st}", stage="create", pid=pid)
    return child


def lead(task: RemoteTask, node: Node) -> None:
    """Make a new task the leader of its session or process group at once, so that the children it makes
    next inherit them."""
    if node.sid == node.pid:  # the image's pids are the task's own (also in a new PID namespace)
        task.syscall(abi.SYS.setsid, what="setsid")
    elif node.pgid == node.pid:
        task.syscall(abi.SYS.setpgid, 0, 0, what="setpgid(0, 0)")


def join_group(task: RemoteTask, node: Node, born_in: int | None = None) -> None:
    """A member of a group another task leads: join it (its leader exists by now, in the same session).
    `born_in`: the group it has had since its creation when known (born_groups), which spares asking the task."""
    if node.pgid == node.pid or node.sid == node.pid:
        return
    if born_in is None:
        born_in = task.syscall(abi.SYS.getpgid, 0)  # as the task numbers it
    if node.pgid != born_in:
        task.syscall(abi.SYS.setpgid, 0, node.pgid, what=f"setpgid(0, {node.pgid})")


def born_groups(nodes: dict[int, Node], order: list[int], root: int) -> dict[int, int]:
    """The process group each task of the tree is in once created and led (lead()), before any joins one:
    a leader its own, a child its parent's at the clone (the parent has led by then, and joins later). The
    root's, when it leads nothing, is the restorer's (or the namespace init's): unknown, as are its heirs'."""
    groups: dict[int, int] = {}
    for pid in order:
        node = nodes[pid]
        if node.sid == pid or node.pgid == pid:
            groups[pid] = pid
        elif pid != root and node.ppid in groups:
            groups[pid] = groups[node.ppid]
    return groups


def make_zombie(parent: RemoteTask, pid: int, status: int, comm: str = "") -> None:
    """Turn the new child `pid` into a zombie with wait status `status`, unreaped by `parent`.

    It exits (or is killed by the signal) while traced: we reap it as its tracer, and the kernel then hands
    it to its real parent as a zombie. The SIGCHLD that tells the parent, queued while we trace it, is taken
    back: the original parent had been told long before the dump.
    """
    sig = status & 0x7F
    child = RemoteTask(pid, parent.syscall_ip)
    child.keep_state()
    child.use_scratch(parent.scratch, parent.scratch_size)
    if comm:  # what ps shows of a zombie: its name
        child.syscall(abi.SYS.prctl, abi.PR_SET_NAME, child.cstring(comm[:15]), 0, 0, 0)
    if sig:
        act = abi.kernel_sigaction(0, 0, 0, 0)  # SIG_DFL: the signal must kill it
        child.syscall(abi.SYS.rt_sigaction, sig, child.put_struct(act), 0, 8)
        # Not dumpable: a signal whose default action dumps core must not write one (nor run a core helper).
        child.syscall(abi.SYS.prctl, abi.PR_SET_DUMPABLE, 0, 0, 0, 0)
        child.close()
        ptrace.set_sigmask(pid, 0)
        # Queued before it resumes: it is taken on the way back to user space, before any instruction.
        os.kill(pid, sig)
        ptrace.cont(pid)
    else:
        regs = ptrace.get_regs(pid)
        regs.rax, regs.rdi, regs.rip, regs.orig_rax = abi.SYS.exit_group, status >> 8 & 0xFF, parent.syscall_ip, _NEG1
        child.close()
        ptrace.set_regs(pid, regs)
        ptrace.cont(pid)
    for _ in range(100):
        st = ptrace.wait(pid)
        if st.exited or st.signaled:
            break
        ptrace.cont(pid, 0 if st.event or st.syscall_stop else st.stop_sig)
    else:  # pragma: no cover
        raise RestoreError(f"zombie {pid} did not exit", stage="create", pid=pid)
    got = (st.exit_code << 8) if st.exited else st.term_sig
    if got != status & ~0x80:
        raise RestoreError(f"zombie {pid} exited with status {got:#x}, not {status:#x}", stage="create", pid=pid)
    # Take back the SIGCHLD its exit queued in the parent (every signal is blocked while we inject).
    ts = parent.put(bytes(16), _ARGS_OFFSET)
    mask = parent.put((1 << (signal.SIGCHLD - 1)).to_bytes(8, "little"), _ARGS_OFFSET + 32)
    parent.raw(abi.SYS.rt_sigtimedwait, mask, 0, ts, 8)
