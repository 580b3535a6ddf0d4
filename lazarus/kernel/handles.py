"""File handles (name_to_handle_at/open_by_handle_at): reach an inode without a path.

A file the process holds open whose name was unlinked, but which has another link somewhere, is reopened
through its handle: no directory search, and a stale handle (ESTALE) tells that the inode is gone.
open_by_handle_at needs CAP_DAC_READ_SEARCH (root).
"""

from __future__ import annotations

import ctypes as C

from lazarus.errors import KernelError
from lazarus.kernel import abi
from lazarus.kernel.syscall import raw_syscall


def name_to_handle(path: str) -> tuple[int, bytes, int]:
    """(handle_type, handle bytes, mount id) of the inode `path` leads to (symlinks followed, so a
    /proc/PID/fd/N magic link names the open file itself). KernelError (EOPNOTSUPP: the filesystem has no
    handles)."""
    fh = abi.file_handle()
    fh.handle_bytes = abi.MAX_HANDLE_SZ
    mnt = C.c_int(0)
    ret, err = raw_syscall(abi.SYS.name_to_handle_at, abi.AT_FDCWD, C.c_char_p(path.encode()), C.byref(fh),
                           C.byref(mnt), abi.AT_SYMLINK_FOLLOW)
    if ret < 0:
        raise KernelError(f"name_to_handle_at {path}", err, path=path)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]), mnt.value


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """An fd of the inode a handle names, on the filesystem `mount_fd` is on. KernelError (ESTALE: gone)."""
    if len(handle) > abi.MAX_HANDLE_SZ:
        raise KernelError("open_by_handle_at: handle too long", 22)
    fh = abi.file_handle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    C.memmove(fh.f_handle, handle, len(handle))
    ret, err = raw_syscall(abi.SYS.open_by_handle_at, mount_fd, C.byref(fh), flags)
    if ret < 0:
        raise KernelError("open_by_handle_at", err)
    return ret
