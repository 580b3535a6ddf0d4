"""Taking private copies, ahead of need, of the pages a forked process shares copy-on-write with its parent.

A process forked from a large Python program (the restore service's spare workers) pays one copy-on-write fault
for every shared page it then writes, and CPython writes to every object it touches (reference counts): the
first request a fresh worker handles took ~600 such faults (2-10 ms here), the second none. A spare worker
takes them all before its request comes: for every run of pages present in its private writable mappings,
madvise(MADV_POPULATE_WRITE) (Linux 5.14) breaks the sharing in one call. Pages not present are left alone
(populating them would allocate memory nobody uses).
"""

from __future__ import annotations

import os
import struct

from lazarus.kernel import abi
from lazarus.kernel.syscall import populate_write

_PRESENT = 1 << 63
_CHUNK = 4096  # pagemap entries read at a time


def _private_writable() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            perms = fields[1]
            name = fields[5] if len(fields) > 5 else ""
            if perms[1] == "w" and perms[3] == "p" and not name.startswith("[v"):  # not [vvar], [vdso], [vsyscall]
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


def _present_runs(pagemap: int, lo: int, hi: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    page = lo // abi.PAGE_SIZE
    end = hi // abi.PAGE_SIZE
    start: int | None = None
    while page < end:
        n = min(_CHUNK, end - page)
        data = os.pread(pagemap, 8 * n, 8 * page)
        for i, entry in enumerate(struct.unpack(f"<{len(data) // 8}Q", data)):
            if entry & _PRESENT:
                if start is None:
                    start = page + i
            elif start is not None:
                runs.append((start, page + i))
                start = None
        page += n
    if start is not None:
        runs.append((start, end))
    return runs


def unshare_present_pages() -> int:
    """Break copy-on-write sharing of every present page of this process's private writable mappings.
    Returns the bytes it covered; 0 where the kernel lacks MADV_POPULATE_WRITE (nothing is done then)."""
    done = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi in _private_writable():
            for a, b in _present_runs(fd, lo, hi):
                # A failure (no MADV_POPULATE_WRITE here, or a mapping that refuses it) leaves those pages to
                # fault as usual.
                if populate_write(a * abi.PAGE_SIZE, (b - a) * abi.PAGE_SIZE):
                    done += (b - a) * abi.PAGE_SIZE
    finally:
        os.close(fd)
    return done


__all__ = ["unshare_present_pages"]
