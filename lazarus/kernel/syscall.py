"""The one checked way to call into libc and raw syscalls; errno is translated here, nowhere else."""

from __future__ import annotations

import ctypes as C
import errno
import gc
import os

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel.abi import MADV_POPULATE_WRITE, MAP_FIXED, MAP_PRIVATE, PROT_READ, PROT_WRITE, SYS

libc = C.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = C.c_long
_ioctl = libc.ioctl
_ioctl.restype = C.c_int
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]


def _arg(a: object) -> object:
    if isinstance(a, int):
        return C.c_long(a) if a < (1 << 63) else C.c_ulong(a)
    return a


def raw_syscall(nr: int, *args: object) -> tuple[int, int]:
    """Run syscall `nr`; returns (result, errno) without raising. For expected failures."""
    C.set_errno(0)
    ret = _syscall(C.c_long(nr), *(_arg(a) for a in args))
    return ret, (C.get_errno() if ret == -1 else 0)


def syscall(nr: int, *args: object, what: str = "", pid: int | None = None, path: str | None = None) -> int:
    """Run syscall `nr`, raising KernelError (NoSuchTask for ESRCH with a pid) on failure."""
    ret, err = raw_syscall(nr, *args)
    if ret == -1:
        raise error(what or f"syscall {nr}", err, pid=pid, path=path)
    return ret


def error(what: str, err: int, *, pid: int | None = None, path: str | None = None) -> KernelError:
    if err == errno.ESRCH and pid is not None:
        return NoSuchTask(f"no such process {pid}", pid=pid)  # type: ignore[return-value]
    return KernelError(what, err, pid=pid, path=path)


def ioctl(fd: int, request: int, arg: object, *, what: str = "") -> int:
    """ioctl(fd, request, &arg); raises KernelError."""
    C.set_errno(0)
    ptr = C.byref(arg) if isinstance(arg, C.Structure | C.Union | C.Array) else arg
    ret = _ioctl(fd, request, ptr)
    if ret == -1:
        raise KernelError(what or f"ioctl {request:#x}", C.get_errno())
    return ret


def ioctl_raw(fd: int, request: int, arg: object) -> tuple[int, int]:
    """ioctl returning (result, errno) without raising; for expected outcomes such as EAGAIN."""
    C.set_errno(0)
    ptr = C.byref(arg) if isinstance(arg, C.Structure | C.Union | C.Array) else arg
    ret = _ioctl(fd, request, ptr)
    return ret, (C.get_errno() if ret == -1 else 0)


def addressof(obj: object) -> int:
    return C.addressof(obj)  # type: ignore[arg-type]


def buffer_address(buf: object) -> int:
    """Address of a writable buffer (bytearray, mmap) without copying it."""
    return C.addressof(C.c_char.from_buffer(buf))  # type: ignore[arg-type]


def map_file_at(addr: int, length: int, fd: int) -> None:
    """Map `length` bytes of file `fd` from its start over [addr, addr+length), which the caller owns (a part of
    a larger mapping of its own): MAP_PRIVATE | MAP_FIXED, read and write (never written: see images.PageFile).
    Raises KernelError."""
    got = syscall(SYS.mmap, addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0,
                  what="mmap of a page file part")
    if got != addr:
        raise KernelError(f"mmap of a page file part at {addr:#x} landed at {got:#x}", errno.EFAULT)


def os_error(e: OSError, what: str, *, pid: int | None = None, path: str | None = None) -> KernelError:
    return error(what, e.errno or errno.EIO, pid=pid, path=path)


__all__ = ["raw_syscall", "syscall", "ioctl", "ioctl_raw", "error", "os_error", "libc", "os"]


def get_robust_list(pid: int) -> tuple[int, int]:
    """The robust futex list head and length registered by task `pid`."""
    from lazarus.kernel import abi
    head, length = C.c_uint64(), C.c_size_t()
    syscall(abi.SYS.get_robust_list, pid, C.byref(head), C.byref(length), what="get_robust_list", pid=pid)
    return head.value, length.value


def prlimit(pid: int, resource: int, new: tuple[int, int] | None = None) -> tuple[int, int]:
    """prlimit64(pid, resource, new, &old) -> old (cur, max)."""
    from lazarus.kernel import abi
    old = abi.rlimit64()
    newp = C.byref(abi.rlimit64(*new)) if new is not None else None
    syscall(abi.SYS.prlimit64, pid, resource, newp, C.byref(old), what=f"prlimit64 resource {resource}", pid=pid)
    return old.rlim_cur, old.rlim_max


def tee(fd_in: int, fd_out: int, length: int, flags: int = 0) -> int:
    """tee(2): duplicate up to `length` bytes of pipe fd_in into pipe fd_out without consuming them."""
    from lazarus.kernel import abi
    ret, err = raw_syscall(abi.SYS.tee, fd_in, fd_out, length, flags)
    if ret == -1:
        if err == errno.EAGAIN:
            return 0
        raise KernelError("tee", err)
    return ret


def _kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0, *, closed_ok: bool = False) -> bool | None:
    """kcmp(2) equality (SYS_kcmp, include/uapi/linux/kcmp.h): whether the two objects are one. With
    `closed_ok`, None when either fd is not open (EBADF); any other failure raises (NoSuchTask when a process
    is gone)."""
    ret, err = raw_syscall(312, pid1, pid2, kind, idx1, idx2)  # SYS_kcmp
    if ret == -1:
        if closed_ok and err == errno.EBADF:
            return None
        raise error("kcmp", err, pid=pid2)
    return ret == 0


def same_file_description(pid: int, fd1: int, fd2: int) -> bool:
    """kcmp(KCMP_FILE): whether two fds of `pid` share one open file description (dup'ed)."""
    return bool(_kcmp(pid, pid, 0, fd1, fd2))  # KCMP_FILE


def same_fd_table(pid1: int, pid2: int) -> bool:
    """kcmp(KCMP_FILES): whether two processes share one fd table (clone with CLONE_FILES)."""
    return bool(_kcmp(pid1, pid2, 2))  # KCMP_FILES


def same_file_across(pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """kcmp(KCMP_FILE) across two processes: whether fd1 of pid1 and fd2 of pid2 are one open file
    description. None when either fd is not open (EBADF); raises NoSuchTask when a process is gone."""
    return _kcmp(pid1, pid2, 0, fd1, fd2, closed_ok=True)  # KCMP_FILE


def same_fs(pid1: int, pid2: int) -> bool:
    """kcmp(KCMP_FS): whether two processes share one fs_struct (cwd, root, umask: clone with CLONE_FS)."""
    return bool(_kcmp(pid1, pid2, 3))  # KCMP_FS


_sync_file_range = libc.sync_file_range
_sync_file_range.argtypes = [C.c_int, C.c_int64, C.c_int64, C.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a file range to disk without waiting.

    Advisory: a failure only means the final fsync does the work."""
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


_madvise = libc.madvise
_madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
_madvise.restype = C.c_int


def populate_write(address: int, length: int) -> bool:
    """madvise(MADV_POPULATE_WRITE) of our own [address, address+length): fault it in writable in one call,
    outside the GIL. Returns whether it did (False: a kernel before 5.14, or any failure; the caller's own
    accesses then fault as usual and report a real error themselves)."""
    return _madvise(address, length, MADV_POPULATE_WRITE) == 0


def keep_only_fd(keep: int) -> None:
    """In a helper process just forked (a guard, a watchdog): close every fd above stdio but `keep`. The garbage
    collector goes off first: a copied object's finaliser must never close an fd the helper now uses."""
    gc.disable()
    os.closerange(3, keep)
    os.closerange(keep + 1, max(65536, os.sysconf("SC_OPEN_MAX")))

