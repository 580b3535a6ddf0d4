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

import contextlib
import os
from pathlib import Path
from typing import Any

from lazarus.errors import LazarusError, NoSuchTask
from lazarus.kernel import procfs
from lazarus.kernel.pagemap import Pagemap
from lazarus.kernel.pidfd import PidFd
from lazarus.kernel.syscall import same_fd_table, same_file_across
from lazarus.kernel.uffd import Uffd
from lazarus.lazy.anchor import uffd_fds
from lazarus.logs import getLogger

log = getLogger("lazarus.lazy")


class AdoptError(LazarusError):
    pass


def adopt(server: Any, pid: int, images: Path) -> int:
    """Take over serving process `pid` restored lazily from `images`; returns the number of pages still
    missing (0: it only needed its anchor removed).

    A fork child made during the lazy phase (its own anchor installed by the server) is served from its
    nearest ancestor in the image.
    Raises AdoptError (one line naming the pid) when the process is gone, holds no userfaultfd, is not in
    the image (nor a descendant of a process in it), or its layout no longer matches the image.
    """
    from lazarus.images import Image
    from lazarus.images.mm import lazy_object_ids, served_vmas
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
        holders = _other_holders(pid, task_fd)
        sharers = [q for q in _relatives(pid) if _one_table(pid, q)]
        if sharers:
            # Every uffd of the table is in every member's fds, and nothing seen from outside tells whose mm
            # each one serves: adopting the wrong one would fill another process with this one's pages.
            raise AdoptError(f"pid {pid} shares its fd table with pid {sharers[0]} (CLONE_FILES): which userfaultfd "
                             "in it is its own cannot be told; not supported", pid=pid)
        if holders:
            # two servers reading one uffd would each miss the other's events (a discarded page refilled)
            raise AdoptError(f"pid {pid} is still served: pid {', '.join(map(str, holders))} holds its "
                             f"userfaultfd", pid=pid)
        uffd = Uffd.adopt(pidfd.getfd(task_fd))
        img = Image.open(images)
        validate_image(img)
        chain = _image_ancestry(pid, img.tasks)
        if not chain:
            raise AdoptError(f"pid {pid} is neither in the image {images} nor a fork child of a process in it",
                             pid=pid)
        origin = chain[-1]
        for a in chain[1:]:
            # A child that never got its own anchor holds an ancestor's uffd: serving that would fill the
            # ancestor's memory, not the child's.
            if any(same_file_across(a, fd, pid, task_fd) for fd in uffd_fds(a)):
                raise AdoptError(f"pid {pid} holds the userfaultfd of its ancestor {a}, not its own: it cannot be "
                                 f"adopted", pid=pid)
        ipid = procfs.own_pid(origin)  # its pid in the image (its own namespace's, under restore --pidns)
        task = img.task(ipid)
        mm = task["mm"]
        served = served_vmas(img, ipid, lazy_object_ids(mm, task["files"]))
        source = ImagePageSource(served, img.page_file(ipid), name=f"{images.name}/pages-{ipid}.img")
        _check_layout(pid, served)
        present = 0
        with Pagemap(pid) as pm:
            for v in served:
                for start, end in pm.present_pages(v["start"], v["end"], skip_zero=False):
                    present += source.drop(start, end)
        missing = source.pending().pages
        log.info("pid %d adopted from fd %d: %d pages present, %d still missing", pid, task_fd, present, missing)
        uffd.task_fd = task_fd  # its anchor: taken out of it once complete
        server.add_process(pid, uffd, source)
        uffd = None
        return missing
    finally:
        if uffd is not None:
            uffd.close()
        pidfd.close()


def _relatives(pid: int) -> list[int]:
    """Its parent and children: a process shares an fd table (clone) with one of them, if with any."""
    try:
        return [procfs.read_status(pid).ppid, *procfs.children(pid)]
    except (LazarusError, OSError):
        return []


def _one_table(pid: int, other: int) -> bool:
    try:
        return same_fd_table(pid, other)
    except (LazarusError, OSError):
        return False


def _other_holders(pid: int, task_fd: int) -> list[int]:
    """Processes other than pid and its descendants holding the open file of pid's fd task_fd (a server or
    guard still alive)."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (pid, me):
            continue
        q = int(name)
        try:
            if any(same_file_across(q, fd, pid, task_fd) for fd in uffd_fds(q)):
                out.append(q)
        except (LazarusError, OSError):
            continue
    return [q for q in out if pid not in _ancestors(q)]


def _ancestors(pid: int) -> list[int]:
    out: list[int] = []
    while pid > 1 and pid not in out:
        try:
            pid = procfs.read_status(pid).ppid
        except (LazarusError, OSError):
            break
        out.append(pid)
    return out


def _image_ancestry(pid: int, tasks: list[int]) -> list[int]:
    """[pid, its parent, ...] up to the first one the image holds (pid itself if it is in the image), or []:
    a fork child made during the lazy phase has its parent's memory as of the fork, and what it still misses is
    that data."""
    chain: list[int] = []
    while pid > 1 and pid not in chain:
        chain.append(pid)
        with contextlib.suppress(LazarusError, OSError):
            if procfs.own_pid(pid) in tasks:
                return chain
        try:
            pid = procfs.read_status(pid).ppid
        except (LazarusError, OSError):
            return []
    return []


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
