"""populate_write (kernel/syscall.py): MADV_POPULATE_WRITE of our own memory, the dump's optional step before it
reads a piece of the task into the mapped page file (dump/memory.py _POPULATE)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from lazarus.kernel.syscall import buffer_address, populate_write

SIZE = 4 << 20


def _rss_kib(address: int) -> int:
    text = Path("/proc/self/smaps").read_text()
    block = text[text.index(f"{address:x}-"):]
    return next(int(ln.split()[1]) for ln in block.splitlines() if ln.startswith("Rss:"))


def test_populates_a_shared_file_mapping(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "pages", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        mm = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            base = buffer_address(mm)
            assert _rss_kib(base) == 0
            if not populate_write(base, SIZE // 2):
                pytest.skip("MADV_POPULATE_WRITE refused: a kernel before 5.14")
            # Exactly the range asked for is resident, writable, and still zeros (unwritten extents read as 0).
            assert _rss_kib(base) == SIZE // 2 // 1024
            assert mm[:16] == bytes(16) and mm[SIZE // 2 - 1] == 0
        finally:
            mm.close()
    finally:
        os.close(fd)


def test_reports_failure_instead_of_raising() -> None:
    mm = mmap.mmap(-1, SIZE)
    base = buffer_address(mm)
    mm.close()
    # An address range nothing maps any more (ENOMEM): False, and nothing raised.
    assert populate_write(base, SIZE) is False
