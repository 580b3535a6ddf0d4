"""userfaultfd inside the restored task: created and registered there by injection, taken out with pidfd_getfd.

The uffd must belong to the restored task's mm (the kernel ties it to the creator's address space), so it is
made by an injected userfaultfd() call. Its registered ranges are the task's anonymous private memory. An
eager restore fills them with large UFFDIO_COPYs (which skip the zeroing a first touch costs) and closes it;
a lazy restore hands the uffd to the lazy-pages server.
"""

from __future__ import annotations

import os
from typing import Any

from lazarus.errors import PageSourceLost, RestoreError
from lazarus.images.mm import is_lazy
from lazarus.kernel import abi
from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open
from lazarus.kernel.uffd import Outcome, Uffd
from lazarus.remote import RemoteTask

LAZY_FEATURES = (abi.UFFD_FEATURE_EVENT_FORK | abi.UFFD_FEATURE_EVENT_REMAP | abi.UFFD_FEATURE_EVENT_REMOVE
                 | abi.UFFD_FEATURE_EVENT_UNMAP | abi.UFFD_FEATURE_MISSING_SHMEM)


def uffd_in_task(task: RemoteTask, ranges: list[tuple[int, int]], features: int) -> Uffd:
    """Create a uffd inside `task`, register `ranges` ([start, end)) for missing faults, and take it out."""
    fd = task.syscall(abi.SYS.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK, what="userfaultfd")
    try:
        api = abi.uffdio_api(abi.UFFD_API, features, 0)
        task.syscall(abi.SYS.ioctl, fd, abi.UFFDIO_API, task.put_struct(api), what="UFFDIO_API")
        for start, end in ranges:
            reg = abi.uffdio_register(abi.uffdio_range(start, end - start), abi.UFFDIO_REGISTER_MODE_MISSING, 0)
            task.syscall(abi.SYS.ioctl, fd, abi.UFFDIO_REGISTER, task.put_struct(reg),
                         what=f"UFFDIO_REGISTER {start:#x}-{end:#x}")
        pidfd = pidfd_open(task.pid)
        try:
            ours = pidfd_getfd(pidfd, fd, pid=task.pid)
        finally:
            os.close(pidfd)
    finally:
        task.syscall(abi.SYS.close, fd)
    return Uffd.adopt(ours)


def lazy_ranges(vmas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[start, end) of each vma to register, adjacent ones merged (one UFFDIO_REGISTER each)."""
    out: list[tuple[int, int]] = []
    for v in sorted(vmas, key=lambda v: v["start"]):
        if out and out[-1][1] == v["start"]:
            out[-1] = (out[-1][0], v["end"])
        else:
            out.append((v["start"], v["end"]))
    return out


def copy_all(uffd: Uffd, vmas: list[dict[str, Any]], page_file: Any) -> int:
    """Fill every saved page of the uffd-registered vmas with UFFDIO_COPY; returns pages copied."""
    done = 0
    step = 8 << 20  # bytes per ioctl: large enough for full speed, small enough to stay interruptible
    for v in vmas:
        if not is_lazy(v):
            continue
        for vaddr, n, idx in v["pages"]:
            src = page_file.address(idx)
            off, total = 0, n * abi.PAGE_SIZE
            while off < total:
                length = min(step, total - off)
                got, outcome = uffd.copy(vaddr + off, src + off, length)
                if outcome is Outcome.DONE or outcome is Outcome.PARTIAL:
                    off += got if got else abi.PAGE_SIZE
                elif outcome is Outcome.EXISTS:
                    off += abi.PAGE_SIZE
                elif outcome is Outcome.RETRY:
                    continue
                elif outcome is Outcome.GONE:
                    raise RestoreError("the task vanished while its memory was copied", stage="memory")
                else:
                    raise PageSourceLost(f"UFFDIO_COPY at {vaddr + off:#x}: {outcome.name}")
            done += n
    return done
