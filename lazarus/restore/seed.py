"""A warm seed: a blank task made ahead of a restore, from which the restore clones its process.

A restore's first task is a clone of the restorer, which must then unmap all it inherited. From a Python
process that is a copy of its whole address space (page tables of thousands of present pages) and their
teardown: 5-6 ms of a lazy restore through the service (busy 2-vCPU VM), more than anything else before the
pages. A process that is going to restore (a service worker, waiting for its request) makes a seed ahead:
a clone of itself with everything but the trampoline page and the vdso unmapped and every fd closed, traced
by us and stopped. The restore then injects clone3(set_tid=pid, CLONE_PARENT) into the seed: the new task is
a copy of that near-empty seed, and still the restorer's child (CLONE_PARENT), traced by it (CLONE_PTRACE).

The seed's trampoline is at a fixed address (SEED_ADDR, in the middle of the user address space, where
almost no process maps anything); an image that has something there, or within a guard gap of it, is
restored the usual way. The seed dies with the restorer (PDEATHSIG, and PTRACE_O_EXITKILL).
"""

from __future__ import annotations

import contextlib
import errno
import os

from lazarus.errors import KernelError, RestoreError
from lazarus.kernel import abi, ptrace
from lazarus.kernel.clone import BATCH_OFFSET, SYSCALL_OFFSET, Trampoline
from lazarus.remote import RemoteTask
from lazarus.restore import core as rcore
from lazarus.restore.memory import clear_address_space, close_inherited_fds, free_gaps

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

SEED_ADDR = 0x3000_0000_0000
_GUARD = 1 << 20

_ready: Seed | None = None
_spent: list[Seed] = []


class Seed:
    """A blank traced task with the trampoline at SEED_ADDR (size `size`), in an event stop."""

    def __init__(self, pid: int, size: int) -> None:
        self.pid = pid
        self.size = size
        self.addr = SEED_ADDR
        self.remote = RemoteTask(pid, SEED_ADDR + SYSCALL_OFFSET, batch_ip=SEED_ADDR + BATCH_OFFSET)
        self.remote.keep_state()
        self.remote.use_scratch(SEED_ADDR + abi.PAGE_SIZE, size - abi.PAGE_SIZE)
        self.where = (SEED_ADDR, SEED_ADDR + SYSCALL_OFFSET, SEED_ADDR + BATCH_OFFSET)  # as TaskBuild.attach takes

    @classmethod
    def make(cls, size: int) -> Seed:
        """Clone this process into a seed and empty it. Call it while this process has no thread."""
        tramp = Trampoline.map_at([SEED_ADDR], size)
        try:
            child = tramp.clone_any()
        finally:
            tramp.unmap()
        try:
            rcore.seize_new(child, "seed task", stage="create")
            seed = cls(child, size)
            b = seed.remote.batch()
            # rseq first (its area is about to go: pitfall 15); but the seed keeps dying with us.
            rcore.reset_inherited(seed.remote, b)
            b.call(abi.SYS.prctl, abi.PR_SET_PDEATHSIG, abi.SIGKILL, 0, 0, 0)
            close_inherited_fds(seed.remote, b)
            clear_address_space(seed.remote, (SEED_ADDR, SEED_ADDR + size), b)
            b.run()
            # Every signal action back to the kernel's default (the worker's Python set some): a task cloned
            # from the seed then starts with them all default, and its restore sets only the others.
            zero = b.put_struct(abi.kernel_sigaction(abi.SIG_DFL, 0, 0, 0))
            for signo in range(1, abi.NSIG + 1):
                if signo not in (abi.SIGKILL, abi.SIGSTOP):
                    b.call(abi.SYS.rt_sigaction, signo, zero, 0, 8)
            b.run()
        except BaseException:
            rcore.kill_quietly(child)
            with contextlib.suppress(OSError):
                os.waitpid(child, 0)
            raise
        return seed

    def fits(self, vmas: list[dict[str, Any]]) -> bool:
        return fits(vmas, self.addr, self.size)

    def clone(self, pid: int) -> int:
        """The new task `pid`, our child (CLONE_PARENT), traced (CLONE_PTRACE) and in an event stop, with the
        trampoline at `addr`. The seed is spent: discard() kills it (off the restore's path)."""
        _spent.append(self)
        b = self.remote.batch()
        args = abi.clone_args()
        args.flags = abi.CLONE_PTRACE | abi.CLONE_PARENT
        args.exit_signal = 0  # clone3 wants 0 with CLONE_PARENT: the child takes the seed's (SIGCHLD)
        args.set_tid = b.put(pid.to_bytes(4, "little"))
        args.set_tid_size = 1
        b.call(abi.SYS.clone3, b.put_struct(args), abi.sizeof(abi.clone_args), check=False)
        ret = b.run(one_stop=True)[0]  # the new task never runs BATCH_CODE: it starts in an event stop
        if ret == -errno.EEXIST:
            raise RestoreError(f"pid {pid} is already in use", stage="create", pid=pid)
        if ret < 0:
            raise KernelError(f"clone3 of {pid} in seed task {self.pid}", -ret, pid=self.pid)
        if ret != pid:  # pragma: no cover - the kernel gives set_tid or fails
            rcore.kill_quietly(ret)
            raise RestoreError(f"task {pid} was created as {ret}", stage="create", pid=pid)
        st = ptrace.wait(pid)
        if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
            rcore.kill_quietly(pid)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)  # our child (CLONE_PARENT)
            raise RestoreError(f"new task {pid} {st}", stage="create", pid=pid)
        return pid

    def close(self, wait: bool = True) -> None:
        """Kill it; wait=False: do not reap it (a caller about to exit leaves that to init or its subreaper)."""
        rcore.kill_quietly(self.pid)
        if wait:
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)


def fits(vmas: list[dict[str, Any]], addr: int, size: int) -> bool:
    """A trampoline at `addr` (with a guard gap each side) lies in a gap of the image's layout `vmas`."""
    lo, hi = addr - _GUARD, addr + size + _GUARD
    return any(start <= lo and hi <= end for start, end in free_gaps(vmas))


def prepare(size: int) -> None:
    """Make a seed for this process's next restore (restore_task takes it). No-op when one is ready."""
    global _ready
    if _ready is None:
        _ready = Seed.make(size)


def take(vmas: list[dict[str, Any]], size: int) -> Seed | None:
    """The ready seed if the image's layout leaves its trampoline (of `size` bytes) free."""
    global _ready
    seed = _ready
    if seed is None or seed.size != size or not seed.fits(vmas):
        return None
    _ready = None
    return seed


def discard(wait: bool = True) -> None:
    """Kill the ready seed and those spent, if any (wait: and reap them)."""
    global _ready
    seeds = [*_spent, *([_ready] if _ready is not None else [])]
    _ready = None
    _spent.clear()
    for s in seeds:
        s.close(wait)
