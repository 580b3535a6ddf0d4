"""kcmp(2) between two processes: are two fds one open file description, do two processes share an fd table,
fs state, address space or signal handlers. The kernel answers with an order (of its pointers, obfuscated), not
only equality; equality is all the callers use."""

from __future__ import annotations

import errno

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi
from lazarus.kernel.syscall import raw_syscall

KINDS = {"vm": abi.KCMP_VM, "files": abi.KCMP_FILES, "fs": abi.KCMP_FS, "sighand": abi.KCMP_SIGHAND,
         "io": abi.KCMP_IO, "sysvsem": abi.KCMP_SYSVSEM}


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int | None:
    """kcmp(pid1, pid2, kind, idx1, idx2): 0 equal, 1 less, 2 greater, 3 different but unordered.

    None when an fd is not open (EBADF). Raises NoSuchTask when a process is gone, KernelError otherwise
    (EPERM: no ptrace access to one of them)."""
    ret, err = raw_syscall(abi.SYS.kcmp, pid1, pid2, kind, idx1, idx2)
    if ret == -1:
        if err == errno.EBADF:
            return None
        if err == errno.ESRCH:
            raise NoSuchTask(f"no such process {pid1} or {pid2}", pid=pid2)
        raise KernelError(f"kcmp of pids {pid1} and {pid2}", err, pid=pid2)
    return ret


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether fd1 of pid1 and fd2 of pid2 are one open file description (False if either is closed)."""
    return kcmp(pid1, pid2, abi.KCMP_FILE, fd1, fd2) == 0


def same_resource(pid1: int, pid2: int, kind: str) -> bool:
    """Whether two processes share one `kind` ("files", "fs", "vm", "sighand", "io", "sysvsem")."""
    return kcmp(pid1, pid2, KINDS[kind]) == 0


__all__ = ["KINDS", "kcmp", "same_file", "same_resource"]
