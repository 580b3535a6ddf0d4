"""userfaultfd inside the restored task: created and registered there by injection, taken out with pidfd_getfd.

The uffd must belong to the restored task's mm (the kernel ties it to the creator's address space), so it is
made by an injected userfaultfd() call. Its registered ranges are the task's anonymous private memory. An
eager restore fills them with large UFFDIO_COPYs (which skip the zeroing a first touch costs) and closes it;
a lazy restore hands the uffd to the lazy-pages server.
"""

from __future__ import annotations

import os

from lazarus.errors import PageSourceLost, RestoreError
from lazarus.images.mm import is_lazy
from lazarus.kernel import abi
from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open
from lazarus.kernel.syscall import prlimit
from lazarus.kernel.uffd import CopyHelper, Outcome, Uffd
from lazarus.remote import Ref, RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from lazarus.remote import Batch

LAZY_FEATURES = (abi.UFFD_FEATURE_EVENT_FORK | abi.UFFD_FEATURE_EVENT_REMAP | abi.UFFD_FEATURE_EVENT_REMOVE
                 | abi.UFFD_FEATURE_EVENT_UNMAP | abi.UFFD_FEATURE_MISSING_SHMEM
                 | abi.UFFD_FEATURE_THREAD_ID)  # which thread faulted: per-thread statistics, fork children's pids


def uffd_in_task(task: RemoteTask, ranges: list[tuple[int, int]], features: int, *,
                 taken: Iterable[int] = (), batch: Batch | None = None,
                 then: Callable[[Batch], None] | None = None, then_room: tuple[int, int] = (16, 512)) -> Uffd:
    """Create a uffd inside `task`, register `ranges` ([start, end)) for missing faults, and take it out.

    A uffd with fork events is a lazy restore's, handed to a lazy-pages server: the task keeps a copy of it
    (close-on-exec) at the highest fd its RLIMIT_NOFILE allows (the anchor, lazy/anchor.py: should every
    Lazarus process serving it die, its faults wait rather than read zeros), recorded as the returned Uffd's
    task_fd. Its fds must be in place already (F_DUPFD_CLOEXEC never takes one, as dup3 would). `taken`:
    anchor numbers of other processes sharing its fd table (CLONE_FILES), left to them. `batch`: calls queued
    by the caller, run first in the same injection; `then(batch)` queues calls run after the uffd's in it
    (the credentials, which the uffd must precede): one stop for all three. `then_room`: (calls, bytes of
    data) `then` queues at most; where they do not fit after the uffd's, the batch runs first (then must not
    run it itself).

    Raises: KernelError (the failing call's `what` in batch.entries_failed_what), RestoreError."""
    # In one batch as far as scratch allows: the uffd, its handshake, the ranges, and for a lazy restore the
    # anchor's copy and the close of the original (usually the number wanted is free).
    anchor = bool(features & abi.UFFD_FEATURE_EVENT_FORK)
    want = -1
    if anchor:
        from lazarus.lazy.anchor import anchor_fd_number  # lazy restores only (it brings socket)
        want = anchor_fd_number(prlimit(task.pid, RLIMIT_NOFILE)[0], taken)
    b = batch if batch is not None else task.batch()
    made = b.call(abi.SYS.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK, what="userfaultfd")
    b.call(abi.SYS.ioctl, made, abi.UFFDIO_API, b.put_struct(abi.uffdio_api(abi.UFFD_API, features, 0)),
           what="UFFDIO_API")
    fd: int | Ref = made
    kept = None
    try:
        for start, end in ranges:
            if not b.fits(1, 64):
                fd = b.run()[made.index] if isinstance(fd, Ref) else fd
            reg = abi.uffdio_register(abi.uffdio_range(start, end - start), abi.UFFDIO_REGISTER_MODE_MISSING, 0)
            b.call(abi.SYS.ioctl, fd, abi.UFFDIO_REGISTER, b.put_struct(reg),
                   what=f"UFFDIO_REGISTER {start:#x}-{end:#x}")
        dup = None
        if anchor:
            if not b.fits(2):
                fd = b.run()[made.index] if isinstance(fd, Ref) else fd
            dup = b.call(abi.SYS.fcntl, fd, _F_DUPFD_CLOEXEC, want, check=False)
            b.call(abi.SYS.close, fd, check=False)
        def resolved(got: list[int]) -> int:
            """The task's uffd once these results made it: the copy (if made) where the original is closed."""
            return got[dup.index] if dup is not None else got[made.index] if isinstance(fd, Ref) else fd

        if then is not None and not b.fits(*then_room):
            fd, dup = resolved(b.run()), None  # the uffd's calls by themselves: the later ones do not fit after them
        if then is not None:
            then(b)
        fd = resolved(b.run())
    except BaseException:
        if isinstance(fd, Ref) and len(b.results) > made.index and b.results[made.index] >= 0:
            fd = b.results[made.index]  # made, then a later call failed
        if isinstance(fd, Ref):
            raise
        task.raw(abi.SYS.close, fd)
        raise
    try:
        if anchor and fd < 0:
            raise RestoreError(f"pid {task.pid}: no fd at or below {want} for the userfaultfd anchor: "
                               f"{os.strerror(-fd)}", stage="memory")
        pidfd = pidfd_open(task.pid)
        try:
            ours = pidfd_getfd(pidfd, fd, pid=task.pid)
        finally:
            os.close(pidfd)
        if anchor:
            copy, fd = fd, -1
            if copy == want:
                kept = want
            else:  # taken: look below it, from the copy made
                try:
                    kept = _dup_at_or_below(task, copy, want)
                finally:
                    task.syscall(abi.SYS.close, copy)
    finally:
        if fd >= 0:
            task.syscall(abi.SYS.close, fd)
    uffd = Uffd.adopt(ours)
    uffd.task_fd = kept
    return uffd


RLIMIT_NOFILE = 7  # <asm-generic/resource.h>
_F_DUPFD_CLOEXEC = 1030  # <linux/fcntl.h>: F_LINUX_SPECIFIC_BASE + 6


def _dup_at_or_below(task: RemoteTask, fd: int, want: int) -> int:
    """A close-on-exec copy of `fd` at number `want`, or the next free one below it: F_DUPFD_CLOEXEC never
    replaces an open fd (dup3 would, silently), and gives the lowest free number >= its argument."""
    for n in range(want, max(want - 64, 2), -1):
        got = task.raw(abi.SYS.fcntl, fd, _F_DUPFD_CLOEXEC, n)
        if got == n:
            return n
        if got >= 0:  # n was taken, a higher one was free: not where the anchor must be
            task.raw(abi.SYS.close, got)
    raise RestoreError(f"pid {task.pid}: no free fd at or below {want} for the userfaultfd anchor", stage="memory")


def lazy_ranges(vmas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[start, end) of each vma to register, adjacent ones merged (one UFFDIO_REGISTER each)."""
    out: list[tuple[int, int]] = []
    for v in sorted(vmas, key=lambda v: v["start"]):
        if out and out[-1][1] == v["start"]:
            out[-1] = (out[-1][0], v["end"])
        else:
            out.append((v["start"], v["end"]))
    return out


STEP = 8 << 20  # bytes per ioctl: large enough for full speed, small enough to stay interruptible


def copy_all(uffd: Uffd, vmas: list[dict[str, Any]], page_file: Any) -> int:
    """Fill every saved page of the uffd-registered vmas with UFFDIO_COPY; returns pages copied.

    With two CPUs, two copies run at once (CopyHelper): the fill is bound by the kernel allocating and
    copying into fresh pages, which it does for two ranges in parallel."""
    steps: list[tuple[int, int, int]] = []
    pages = 0
    for v in vmas:
        if not is_lazy(v):
            continue
        for vaddr, n, idx in v["pages"]:
            src = page_file.address(idx)
            total = n * abi.PAGE_SIZE
            steps.extend((vaddr + off, src + off, min(STEP, total - off)) for off in range(0, total, STEP))
            pages += n
    if len(steps) < 2 or not CopyHelper.worthwhile():
        for step in steps:
            _finish_step(uffd, *step, uffd.copy(*step))
        return pages
    with CopyHelper() as helper:
        for i in range(0, len(steps), 2):
            pair = steps[i:i + 2]
            if len(pair) == 2:
                helper.start(uffd, *pair[1])
            try:
                _finish_step(uffd, *pair[0], uffd.copy(*pair[0]))
            finally:
                second = helper.result() if helper.busy else None
            if second is not None:
                _finish_step(uffd, *pair[1], second)
    return pages


def _finish_step(uffd: Uffd, dst: int, src: int, length: int, first: tuple[int, Outcome]) -> None:
    """Complete the copy of [dst, +length) whose first ioctl gave `first` (bytes, outcome)."""
    off = 0
    got, outcome = first
    while True:
        if outcome is Outcome.DONE or outcome is Outcome.PARTIAL:
            off += got if got else abi.PAGE_SIZE
        elif outcome is Outcome.EXISTS:
            off += abi.PAGE_SIZE
        elif outcome is Outcome.GONE:
            raise RestoreError("the task vanished while its memory was copied", stage="memory")
        elif outcome is not Outcome.RETRY:
            raise PageSourceLost(f"UFFDIO_COPY at {dst + off:#x}: {outcome.name}")
        if off >= length:
            return
        got, outcome = uffd.copy(dst + off, src + off, length - off)
