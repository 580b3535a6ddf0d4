"""Give a restored task its transparent huge pages back: MADV_COLLAPSE on each 2 MiB range it held in huge
pages at dump, once the range is filled (UFFDIO_COPY installs 4 KiB pages only).

A collapse the kernel declines (no free huge page just now, THP disabled since) leaves the memory correct in
4 KiB pages: it is logged, not fatal. khugepaged may still collapse it later.
"""

from __future__ import annotations

from lazarus.errors import KernelError
from lazarus.images.mm import huge_ranges
from lazarus.kernel import abi
from lazarus.logs import getLogger
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

log = getLogger(__name__)


def collapse_in_task(task: RemoteTask, vmas: list[dict[str, Any]]) -> int:
    """Injected madvise(MADV_COLLAPSE) over each recorded range. Returns the bytes the kernel collapsed."""
    done = 0
    for addr, length in huge_ranges(vmas):
        try:
            task.syscall(abi.SYS.madvise, addr, length, abi.MADV_COLLAPSE, what="madvise(MADV_COLLAPSE)")
            done += length
        except KernelError as e:
            log.warning("pid %d: %#x-%#x stays in 4 KiB pages: MADV_COLLAPSE: %s", task.pid, addr,
                        addr + length, e.strerror)
    return done
