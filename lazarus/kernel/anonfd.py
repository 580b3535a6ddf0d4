"""Reading anonymous-inode fds taken out of a process: timerfd settings, inotify file handles, epoll targets."""

from __future__ import annotations

import ctypes as C
import errno
import os

from lazarus.errors import KernelError
from lazarus.kernel import abi
from lazarus.kernel.syscall import raw_syscall


class _timespec(C.Structure):
    _fields_ = [("tv_sec", C.c_int64), ("tv_nsec", C.c_int64)]


class _itimerspec(C.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


class _kcmp_epoll_slot(C.Structure):  # include/uapi/linux/kcmp.h
    _fields_ = [("efd", C.c_uint32), ("tfd", C.c_uint32), ("toff", C.c_uint32)]


def _ns(ts: _timespec) -> int:
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def timerfd_gettime(fd: int) -> tuple[int, int]:
    """timerfd_gettime(2) on our copy of a timerfd: (time left, interval) in ns.

    Unlike the fdinfo lines, this forwards an expired interval timer (the overruns go to its tick count, as a
    read would find them), so the time left is that of the next expiry rather than 0.
    """
    cur = _itimerspec()
    ret, err = raw_syscall(abi.SYS.timerfd_gettime, fd, C.byref(cur))
    if ret < 0:
        raise KernelError("timerfd_gettime", err)
    return _ns(cur.it_value), _ns(cur.it_interval)


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = abi.O_PATH) -> int:
    """open_by_handle_at(2) (needs CAP_DAC_READ_SEARCH): an fd on the file a file handle names."""
    buf = C.create_string_buffer(8 + len(handle))
    C.memmove(buf, len(handle).to_bytes(4, "little") + handle_type.to_bytes(4, "little", signed=True), 8)
    C.memmove(C.addressof(buf) + 8, handle, len(handle))
    ret, err = raw_syscall(abi.SYS.open_by_handle_at, mount_fd, buf, flags)
    if ret < 0:
        raise KernelError("open_by_handle_at", err)
    return ret


def epoll_target_is(pid: int, fd: int, epfd: int, tfd: int) -> bool:
    """kcmp(KCMP_EPOLL_TFD): whether fd `fd` of `pid` is the very file epoll `epfd` of `pid` has registered
    under fd number `tfd`. False when they differ or there is no such registration."""
    slot = _kcmp_epoll_slot(epfd, tfd, 0)
    ret, err = raw_syscall(abi.SYS.kcmp, pid, pid, abi.KCMP_EPOLL_TFD, fd, C.addressof(slot))
    if ret < 0:
        if err in (errno.EBADF, errno.ENOENT, errno.EINVAL):
            return False
        raise KernelError(f"kcmp(KCMP_EPOLL_TFD) on fd {epfd} of pid {pid}", err, pid=pid)
    return ret == 0


def read_all_ready(fd: int) -> int:
    """Read and discard what is queued on `fd` now (inotify events) without blocking; returns bytes read."""
    import select
    total = 0
    p = select.poll()
    p.register(fd, select.POLLIN)
    while p.poll(0):
        try:
            total += len(os.read(fd, 1 << 16))
        except BlockingIOError:
            break
    return total
