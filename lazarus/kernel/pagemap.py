"""PAGEMAP_SCAN over /proc/<pid>/pagemap: which pages of a range exist, in one ioctl per few thousand runs.

    vma:      [--------------------------------------------------------------)
    ptes:      P P P . . . . S S . . . . . . . . . . P P F F . . . . . . .
    regions:  [P P P)       [S S)                   [P P)[F F)
                                                    ^ runs differ in categories
    present_pages(anon_only=True) -> [P P P) [S S) [P P)     (F = file page: unmodified, not saved)

The kernel fills a caller-provided vector of `page_region` (start, end, categories) with runs of pages whose
categories match the masks, merging neighbours with equal returned categories. It walks the whole range unless
the vector fills up (or max_pages is reached); then `scan` carries on from where it stopped (`walk_end`, or the end
of the last region) and joins the run that straddles the two calls.

Guard regions (MADV_GUARD_INSTALL, Linux 6.13+) are page-table markers, not pages: PAGEMAP_SCAN reports them as
PAGE_IS_GUARD (6.14+) and also as PAGE_IS_SWAPPED (they are swap-format entries), so present_pages() leaves them
out explicitly, and guard_pages() lists them for the dump to reinstall. Reading one faults (EFAULT).
"""

from __future__ import annotations

import ctypes as C
import errno
import os

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi
from lazarus.kernel.syscall import error, ioctl_raw

PM_SCAN_CATEGORIES = (abi.PAGE_IS_WPALLOWED | abi.PAGE_IS_WRITTEN | abi.PAGE_IS_FILE | abi.PAGE_IS_PRESENT
                      | abi.PAGE_IS_SWAPPED | abi.PAGE_IS_PFNZERO | abi.PAGE_IS_HUGE
                      | abi.PAGE_IS_SOFT_DIRTY)
DEFAULT_VEC_LEN = 4096
_guard_known: bool | None = None


def guard_supported() -> bool:
    """Whether this kernel's PAGEMAP_SCAN knows PAGE_IS_GUARD (older ones refuse the bit with EINVAL)."""
    global _guard_known
    if _guard_known is None:
        with Pagemap(os.getpid(), 1) as pm:
            start = C.addressof(pm._vec) & ~(abi.PAGE_SIZE - 1)
            try:
                pm.scan_once(start, start + abi.PAGE_SIZE, return_mask=abi.PAGE_IS_GUARD)
                _guard_known = True
            except KernelError as e:
                if e.errno != errno.EINVAL:
                    raise
                _guard_known = False
    return _guard_known

Region = tuple[int, int, int]  # start, end, categories & return_mask


def _left_out(anon_only: bool, skip_zero: bool) -> int:
    """The categories a scan for present pages leaves out (each in both category_mask and category_inverted:
    a page is kept only without them): page-cache pages with `anon_only`, the zero page with `skip_zero`, and
    guard regions where the kernel knows them."""
    bits = (abi.PAGE_IS_FILE if anon_only else 0) | (abi.PAGE_IS_PFNZERO if skip_zero else 0)
    return bits | (abi.PAGE_IS_GUARD if guard_supported() else 0)


class Pagemap:
    """An open /proc/PID/pagemap and a reusable result vector. Use as a context manager.

    Parameters: pid; vec_len, the number of regions one ioctl may return (24 bytes each).
    Raises NoSuchTask if the process is gone, KernelError if the file cannot be opened.
    """

    __slots__ = ("pid", "fd", "_owned", "_vec", "_vec_len", "_arg")

    def __init__(self, pid: int, vec_len: int = DEFAULT_VEC_LEN, *, fd: int | None = None) -> None:
        self.pid = pid
        self._owned = fd is None
        if fd is None:
            path = f"/proc/{pid}/pagemap"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise NoSuchTask(f"no such process {pid}", pid=pid) from None
            except OSError as e:
                raise KernelError(f"open {path}", e.errno or errno.EIO, pid=pid, path=path) from None
        self.fd = fd
        self._vec_len = vec_len
        # Flat u64 triples: slicing a ctypes u64 array yields a list in one C loop, far cheaper than
        # touching vec_len Structure objects.
        self._vec = (C.c_uint64 * (3 * vec_len))()
        self._arg = abi.pm_scan_arg()

    @classmethod
    def from_fd(cls, fd: int, pid: int = 0, vec_len: int = DEFAULT_VEC_LEN) -> Pagemap:
        """Wrap an already open pagemap fd; the caller keeps ownership of it."""
        return cls(pid, vec_len, fd=fd)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Pagemap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan_once(self, start: int, end: int, category_mask: int = 0, *, category_anyof_mask: int = 0,
                  category_inverted: int = 0, return_mask: int = PM_SCAN_CATEGORIES, flags: int = 0,
                  max_pages: int = 0) -> tuple[list[Region], int]:
        """One PAGEMAP_SCAN ioctl: (regions, walk_end). walk_end < end means the vector or max_pages ran out."""
        a = self._arg
        a.size = C.sizeof(abi.pm_scan_arg)
        a.flags = flags
        a.start = start
        a.end = end
        a.walk_end = 0
        a.vec = C.addressof(self._vec)
        a.vec_len = self._vec_len
        a.max_pages = max_pages
        a.category_inverted = category_inverted
        a.category_mask = category_mask
        a.category_anyof_mask = category_anyof_mask
        a.return_mask = return_mask
        n, err = ioctl_raw(self.fd, abi.PAGEMAP_SCAN, a)
        if n < 0:
            raise error(f"PAGEMAP_SCAN {start:#x}-{end:#x}", err, pid=self.pid or None)
        flat = self._vec[: 3 * n]
        return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * n, 3)], a.walk_end

    def scan(self, start: int, end: int, category_mask: int = 0, *, category_anyof_mask: int = 0,
             category_inverted: int = 0, return_mask: int = PM_SCAN_CATEGORIES, flags: int = 0,
             max_pages: int = 0) -> list[Region]:
        """Regions of [start, end) whose categories match, as (start, end, categories & return_mask).

        A page matches when, after flipping the `category_inverted` bits, it has every bit of `category_mask`
        and (if `category_anyof_mask` is set) at least one of `category_anyof_mask`. `flags` may hold
        PM_SCAN_WP_MATCHING (write-protect what matched: the pre-copy dirty-tracking reset) and
        PM_SCAN_CHECK_WPASYNC. `max_pages` (0 = no limit) bounds the total across calls.

        start must be page aligned; end is rounded up to a page. Unmapped holes are skipped.
        Raises NoSuchTask if the process died, KernelError otherwise.
        """
        end = (end + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)
        out: list[Region] = []
        left = max_pages
        pos = start
        while pos < end:
            regions, walk_end = self.scan_once(
                pos, end, category_mask, category_anyof_mask=category_anyof_mask,
                category_inverted=category_inverted, return_mask=return_mask, flags=flags, max_pages=left)
            full = len(regions) == self._vec_len
            if out and regions:
                # Neither overlap nor a split run may survive the seam between two calls.
                last_end = out[-1][1]
                while regions and regions[0][0] < last_end:
                    s, e, c = regions[0]
                    regions = regions[1:] if e <= last_end else [(last_end, e, c), *regions[1:]]
                if regions and regions[0][0] == last_end and regions[0][2] == out[-1][2]:
                    out[-1] = (out[-1][0], regions[0][1], out[-1][2])
                    regions = regions[1:]
            out.extend(regions)
            if max_pages:
                left -= sum((e - s) // abi.PAGE_SIZE for s, e, _ in regions)
                if left <= 0:
                    break
            # The kernel walks on by itself until `end` unless our vector filled up, and its walk_end is
            # stale after a walk that completed in a later internal round (6.18 reports the start of that
            # round), so only a full vector means "call again".
            if not full:
                break
            nxt = max(walk_end, out[-1][1] if out else pos)
            if nxt <= pos:  # no progress; never expected, but never loop forever
                break
            pos = nxt
        return out

    def present_pages(self, start: int, end: int, anon_only: bool = False,
                      skip_zero: bool = True) -> list[tuple[int, int]]:
        """Merged [start, end) runs of pages that are present in RAM or swapped out.

        anon_only: leave out page-cache pages (PAGE_IS_FILE). In a private file mapping this keeps exactly
        the pages the process wrote to (COW copies), the only ones a dump must save.
        skip_zero: leave out pages mapped to the shared zero page; they read as zeros, as an absent page does.
        """
        left_out = _left_out(anon_only, skip_zero)
        regions = self.scan(start, end, left_out, category_inverted=left_out,
                            category_anyof_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED,
                            return_mask=abi.PAGE_IS_PRESENT)
        return merge_runs(regions)

    def present_and_huge(self, start: int, end: int, anon_only: bool = False
                         ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """present_pages(start, end, anon_only) and, from the same single scan, the [start, end) runs of pages
        mapped by transparent huge pages (present, PAGE_IS_HUGE; the huge zero page among them, as a scan for
        PAGE_IS_HUGE | PAGE_IS_PRESENT alone finds it).

        The zero page filter of present_pages moves from the kernel's category masks to here: pages mapped to
        the zero page come back tagged PAGE_IS_PFNZERO and are left out of the first list.
        """
        left_out = _left_out(anon_only, skip_zero=False)
        want = abi.PAGE_IS_PRESENT | abi.PAGE_IS_HUGE | abi.PAGE_IS_PFNZERO
        regions = self.scan(start, end, left_out, category_inverted=left_out,
                            category_anyof_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED, return_mask=want)
        present = merge_runs([r for r in regions if not r[2] & abi.PAGE_IS_PFNZERO])
        huge_bits = abi.PAGE_IS_PRESENT | abi.PAGE_IS_HUGE
        huge = merge_runs([r for r in regions if r[2] & huge_bits == huge_bits])
        return present, huge

    def guard_pages(self, start: int, end: int) -> list[tuple[int, int]]:
        """Merged [start, end) runs of guard-region markers ([] on kernels that cannot report them)."""
        if not guard_supported():
            return []
        return merge_runs(self.scan(start, end, abi.PAGE_IS_GUARD, return_mask=abi.PAGE_IS_GUARD))


def merge_runs(regions: list[Region]) -> list[tuple[int, int]]:
    """Join touching regions into [start, end) runs, whatever their categories."""
    out: list[tuple[int, int]] = []
    for s, e, _ in regions:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def scan(target: int | Pagemap, start: int, end: int, category_mask: int = 0, *,
         category_anyof_mask: int = 0, category_inverted: int = 0, return_mask: int = PM_SCAN_CATEGORIES,
         flags: int = 0, max_pages: int = 0) -> list[Region]:
    """PAGEMAP_SCAN of [start, end) in process `target` (a pid, or an open Pagemap). See Pagemap.scan."""
    if isinstance(target, Pagemap):
        return target.scan(start, end, category_mask, category_anyof_mask=category_anyof_mask,
                           category_inverted=category_inverted, return_mask=return_mask, flags=flags,
                           max_pages=max_pages)
    with Pagemap(target) as pm:
        return pm.scan(start, end, category_mask, category_anyof_mask=category_anyof_mask,
                       category_inverted=category_inverted, return_mask=return_mask, flags=flags,
                       max_pages=max_pages)


def present_pages(target: int | Pagemap, vma_start: int, vma_end: int, anon_only: bool = False,
                  skip_zero: bool = True) -> list[tuple[int, int]]:
    """Merged [start, end) runs of present or swapped pages of a VMA. See Pagemap.present_pages."""
    if isinstance(target, Pagemap):
        return target.present_pages(vma_start, vma_end, anon_only, skip_zero)
    with Pagemap(target) as pm:
        return pm.present_pages(vma_start, vma_end, anon_only, skip_zero)


def guard_pages(target: int | Pagemap, vma_start: int, vma_end: int) -> list[tuple[int, int]]:
    """Merged [start, end) runs of guard-region markers in a VMA. See Pagemap.guard_pages."""
    if isinstance(target, Pagemap):
        return target.guard_pages(vma_start, vma_end)
    with Pagemap(target) as pm:
        return pm.guard_pages(vma_start, vma_end)


__all__ = ["Pagemap", "Region", "scan", "present_pages", "guard_pages", "guard_supported", "merge_runs",
           "PM_SCAN_CATEGORIES", "DEFAULT_VEC_LEN"]
