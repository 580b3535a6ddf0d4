"""`lazarus lazy-pages --adopt PID`: serve again a lazily restored process whose servers all died.

Such a process still holds its anchor (anchor.py), so its faults wait instead of reading zeros. Adopting it:

    pidfd_getfd(anchor)            the uffd, from the task itself (its highest userfaultfd fd)
    image task PID                 what the restore served lazily (the same validation as a restore)
    PAGEMAP_SCAN of those vmas     pages present now arrived before the servers died (or were written by the
                                   process): they need nothing; the others are pending
    LazyServer.add_process         served and completed as usual (anchor removed at completion)

What it cannot know: memory the process discarded (MADV_DONTNEED, munmap + mmap again) or moved (mremap)
before its servers died without the page having arrived. The dead server knew (it read the events); adopting
assumes none, and is refused when a registered range of the process lies outside what the image served.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lazarus.errors import LazarusError, NoSuchTask
from lazarus.kernel import procfs
from lazarus.kernel.pagemap import Pagemap
from lazarus.kernel.pidfd import PidFd
from lazarus.kernel.uffd import Uffd
from lazarus.lazy.anchor import uffd_fds

log = logging.getLogger("lazarus.lazy")


class AdoptError(LazarusError):
    pass


def adopt(server: Any, pid: int, images: Path) -> int:
    """Take over serving process `pid` restored lazily from `images`; returns the number of pages still
    missing (0: it only needed its anchor removed).

    Raises AdoptError (one line naming the pid) when the process is gone, holds no userfaultfd, is not in
    the image, or its layout no longer matches the image.
    """
    from lazarus.images import Image
    from lazarus.images.mm import lazy_object_ids, lazy_vmas
    from lazarus.images.validate import validate_image
    from lazarus.lazy.sources import ImagePageSource

    try:
        pidfd = PidFd.open(pid)
    except NoSuchTask:
        raise AdoptError(f"pid {pid}: no such process", pid=pid) from None
    uffd: Uffd | None = None
    try:
        fds = uffd_fds(pid)
        if not fds:
            raise AdoptError(f"pid {pid} holds no userfaultfd: it is not waiting for lazy pages (complete, or "
                             f"not restored lazily)", pid=pid)
        task_fd = fds[0]
        uffd = Uffd.adopt(pidfd.getfd(task_fd))
        img = Image.open(images)
        validate_image(img)
        if pid not in img.tasks:
            raise AdoptError(f"pid {pid} is not in the image {images} (a fork child cannot be adopted)", pid=pid)
        task = img.task(pid)
        mm = task["mm"]
        served = lazy_vmas(mm, lazy_object_ids(mm, task["files"]))
        source = ImagePageSource(served, img.page_file(pid), name=f"{images.name}/pages-{pid}.img")
        _check_layout(pid, served)
        pending = source.pending()
        present = 0
        with Pagemap(pid) as pm:
            for v in served:
                for start, end in pm.present_pages(v["start"], v["end"], skip_zero=False):
                    present += pending.remove(start, end)
        missing = pending.pages
        log.info("pid %d adopted from fd %d: %d pages present, %d still missing", pid, task_fd, present, missing)
        server.add_process(pid, uffd, source, task_fd=task_fd, pending=pending)
        uffd = None
        return missing
    finally:
        if uffd is not None:
            uffd.close()
        pidfd.close()


def _check_layout(pid: int, served: list[dict[str, Any]]) -> None:
    """Every range registered for missing faults must lie inside a vma the image served lazily."""
    spans = sorted((v["start"], v["end"]) for v in served)
    for v in procfs.read_smaps(pid):
        if "um" not in v.vmflags:
            continue
        if not any(s <= v.start and v.end <= e for s, e in _merge(spans)):
            raise AdoptError(f"pid {pid}: registered range {v.start:#x}-{v.end:#x} is not memory the image "
                             f"served lazily (moved since the restore?): refusing to guess its pages", pid=pid)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


__all__ = ["AdoptError", "adopt"]
