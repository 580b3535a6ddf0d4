"""Page frame numbers from /proc/PID/pagemap (root only: others read PFN 0).

PAGEMAP_SCAN reports categories, never frames, so telling whether two processes map one physical page (a
copy-on-write page that neither wrote since fork) takes the plain pagemap read: one u64 per virtual page.
"""

from __future__ import annotations

import array
import errno
import os

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi

_ENTRY = 8


def read_entries(pid: int, start: int, end: int, *, fd: int | None = None) -> array.array:
    """The pagemap entries (u64 each) of the pages of [start, end) of `pid`, in address order.

    `fd`: an open /proc/PID/pagemap to read from (else one is opened and closed here).
    Raises NoSuchTask if the process is gone, KernelError otherwise."""
    path = f"/proc/{pid}/pagemap"
    own = fd is None
    try:
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        n = (end - start) // abi.PAGE_SIZE
        out = array.array("Q")
        off = start // abi.PAGE_SIZE * _ENTRY
        want = n * _ENTRY
        while len(out) < n:
            data = os.pread(fd, want - len(out) * _ENTRY, off + len(out) * _ENTRY)
            if not data:
                break
            out.frombytes(data[: len(data) - len(data) % _ENTRY])
        return out
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchTask(f"no such process {pid}", pid=pid) from None
    except OSError as e:
        raise KernelError(f"read {path}", e.errno or errno.EIO, pid=pid, path=path) from None
    finally:
        if own and fd is not None:
            os.close(fd)


def frame(entry: int) -> int | None:
    """The PFN of a page present in RAM, or None (absent, swapped, or not readable without root)."""
    if not entry & abi.PM_PRESENT:
        return None
    pfn = entry & abi.PM_PFN_MASK
    return pfn or None


__all__ = ["frame", "read_entries"]


_zero_pfn: int | None = None


def zero_pfn() -> int | None:
    """The frame of the kernel's shared zero page (every process maps it where it read memory never written),
    found by reading a fresh private page of our own; None if it cannot be seen (not root)."""
    global _zero_pfn
    if _zero_pfn is None:
        import ctypes as C
        import mmap

        m = mmap.mmap(-1, abi.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            buf = (C.c_char * abi.PAGE_SIZE).from_buffer(m)
            addr = C.addressof(buf)
            _ = m[0]  # a read fault of a never-written page maps the zero page
            entry = read_entries(os.getpid(), addr, addr + abi.PAGE_SIZE)[0]
            del buf
        finally:
            m.close()
        _zero_pfn = frame(entry) or 0
    return _zero_pfn or None


__all__ += ["zero_pfn"]
