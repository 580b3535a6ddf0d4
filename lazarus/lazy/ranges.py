"""Pending pages of one lazily restored address space: pure range arithmetic, no I/O.

A page is *pending* while its contents are in the image and have not reached the process yet. Each pending page
knows where its data is in the image (its file page index). Runs of pages contiguous both in memory and in the
file are stored as one run::

    address space  |--run A--|      |-------run B--------|   |C|
    image file     [A0 A1 A2]       [B0 B1 B2 B3 B4 B5 B6]   [C0]
                      ^ file_index of the run's first page; page k of a run is at file_index + k

    take(a, n)       the server filled [a, a+n): no longer pending (UFFDIO_COPY done, EEXIST, ...)
    remove(s, e)     MADV_DONTNEED/REMOVE or munmap: the process dropped [s, e); later faults there get zeros
    remap(f, t, n)   mremap moved [f, f+n) to [t, t+n): the pending pages AND their image locations move with it,
                     so the UNMAP of the old range that the kernel sends next finds nothing to drop there
    lookup(a)        file index of page a, or None (not pending: zero page, or already there)
    window(a, n)     the pending pages around a fault, inside an n-page aligned window
    next_chunk(a, n) the next pending bytes at or after a (wrapping), for background transfer

Storage: three parallel sorted lists (run starts, ends, file indexes) searched with bisect. A run that becomes
empty stays in place as a tombstone (end == start) so that taking runs one by one in address order does not
shift the lists each time; tombstones are compacted away once they outnumber the live runs. Trimming the head
or tail of a run is done in place; only a cut in the middle of a run inserts an element. This keeps a 4 GiB
image with a few long runs and one with 10^5 scattered runs equally cheap.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

PAGE_SIZE = 4096
_MASK = PAGE_SIZE - 1

Run = tuple[int, int, int]  # (start address, number of pages, file page index of the first page)


def _check_aligned(*vals: int) -> None:
    for v in vals:
        if v & _MASK:
            raise ValueError(f"{v:#x} is not page aligned")


class PendingPages:
    """The set of pending pages of one address space (see the module docstring)."""

    __slots__ = ("_s", "_e", "_f", "_dead", "_pages")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        """Build from (start, npages, file_index) runs, in any order; they must not overlap.

        Raises:
            ValueError on an unaligned start, a negative count, or overlapping runs.
        """
        items = []
        for start, npages, fidx in runs:
            _check_aligned(start)
            if npages < 0 or fidx < 0:
                raise ValueError(f"bad run {start:#x} {npages} {fidx}")
            if npages:
                items.append((start, start + npages * PAGE_SIZE, fidx))
        items.sort()
        self._s: list[int] = [s for s, _, _ in items]
        self._e: list[int] = [e for _, e, _ in items]
        self._f: list[int] = [f for _, _, f in items]
        self._dead = 0
        self._pages = sum(e - s for s, e, _ in items) // PAGE_SIZE
        for i in range(1, len(items)):
            if self._s[i] < self._e[i - 1]:
                raise ValueError(f"overlapping runs at {self._s[i]:#x}")

    # -- queries -------------------------------------------------------------------------------------------

    @property
    def pages(self) -> int:
        """Number of pending pages."""
        return self._pages

    @property
    def nbytes(self) -> int:
        return self._pages * PAGE_SIZE

    def __len__(self) -> int:
        return self._pages

    def __bool__(self) -> bool:
        return self._pages > 0

    def __contains__(self, addr: int) -> bool:
        return self._find(addr) >= 0

    def runs(self) -> Iterator[Run]:
        """The live runs in address order (tombstones skipped)."""
        for s, e, f in zip(self._s, self._e, self._f, strict=True):
            if e > s:
                yield s, (e - s) // PAGE_SIZE, f

    def nruns(self) -> int:
        return len(self._s) - self._dead

    def __repr__(self) -> str:
        return f"PendingPages({self._pages} pages in {self.nruns()} runs)"

    def _find(self, addr: int) -> int:
        """Index of the live run containing addr, or -1."""
        i = bisect_right(self._s, addr) - 1
        if i >= 0 and addr < self._e[i]:
            return i
        return -1

    def lookup(self, addr: int) -> int | None:
        """File page index of the pending page holding `addr`, or None if that page is not pending."""
        i = self._find(addr)
        if i < 0:
            return None
        return self._f[i] + (addr - self._s[i]) // PAGE_SIZE

    def window(self, addr: int, max_pages: int) -> Run | None:
        """The pending pages contiguous with (and including) the page of `addr`, within the `max_pages`-aligned
        window holding it (max_pages a power of two), as one run; None if addr's page is not pending."""
        i = self._find(addr)
        if i < 0:
            return None
        span = max_pages * PAGE_SIZE
        lo = addr & ~(span - 1)
        hi = lo + span
        s, e = self._s[i], self._e[i]
        if s > lo:
            lo = s
        if e < hi:
            hi = e
        return lo, (hi - lo) // PAGE_SIZE, self._f[i] + (lo - s) // PAGE_SIZE

    def next_chunk(self, near: int, max_len: int) -> Run | None:
        """Up to `max_len` bytes (rounded down to pages, at least one page) of pending pages starting at the
        first pending page at or after `near`, wrapping around to the lowest one. None when nothing is
        pending. Never spans two runs (runs may belong to different vmas)."""
        if not self._pages:
            return None
        near &= ~_MASK
        n = len(self._s)
        i = bisect_right(self._s, near) - 1
        if i < 0:
            i = 0
        elif self._e[i] <= near:
            i += 1
        for _ in range(2):
            while i < n:
                s, e = self._s[i], self._e[i]
                if e > s:
                    start = near if s < near < e else s
                    maxp = max(1, max_len // PAGE_SIZE)
                    npages = min(maxp, (e - start) // PAGE_SIZE)
                    return start, npages, self._f[i] + (start - s) // PAGE_SIZE
                i += 1
            i, near = 0, 0
        raise AssertionError("pending page count out of sync")  # pragma: no cover

    # -- updates -------------------------------------------------------------------------------------------

    def take(self, start: int, length: int) -> int:
        """The server filled [start, start+length) (or found it present): drop it. Returns pages dropped."""
        return self.remove(start, start + length)

    def remove(self, start: int, end: int) -> int:
        """Drop every pending page in [start, end) (MADV_DONTNEED/REMOVE, munmap). Returns pages dropped.

        Unaligned bounds are widened to whole pages.
        """
        if end <= start or not self._pages:
            return 0
        start &= ~_MASK
        end = (end + _MASK) & ~_MASK
        s_, e_, f_ = self._s, self._e, self._f
        i = bisect_right(s_, start) - 1
        if i < 0:
            i = 0
        dropped = 0
        n = len(s_)
        while i < n:
            s, e = s_[i], e_[i]
            if s >= end:
                break
            if e <= start or e == s:
                i += 1
                continue
            if start <= s:
                if end >= e:  # whole run: tombstone
                    dropped += e - s
                    e_[i] = s
                    self._dead += 1
                else:  # head
                    dropped += end - s
                    f_[i] += (end - s) // PAGE_SIZE
                    s_[i] = end
                    break
            else:
                if end >= e:  # tail
                    dropped += e - start
                    e_[i] = start
                else:  # middle: split
                    dropped += end - start
                    e_[i] = start
                    s_.insert(i + 1, end)
                    e_.insert(i + 1, e)
                    f_.insert(i + 1, f_[i] + (end - s) // PAGE_SIZE)
                    break
            i += 1
        dropped //= PAGE_SIZE
        self._pages -= dropped
        if self._dead > 64 and self._dead > len(s_) - self._dead:
            self._compact()
        return dropped

    def remap(self, from_: int, to: int, length: int) -> int:
        """mremap moved [from_, from_+length) to [to, to+length): move the pending pages there with their file
        indexes (pages pending at the destination before are dropped: that range was unmapped). Returns the
        number of pages moved."""
        _check_aligned(from_, to)
        length = (length + _MASK) & ~_MASK
        if length <= 0 or from_ == to:
            return 0
        end = from_ + length
        moved: list[tuple[int, int, int]] = []
        i = bisect_right(self._s, from_) - 1
        if i < 0:
            i = 0
        while i < len(self._s) and self._s[i] < end:
            s, e, f = self._s[i], self._e[i], self._f[i]
            if e > s and e > from_:
                cs, ce = max(s, from_), min(e, end)
                moved.append((cs - from_ + to, ce - from_ + to, f + (cs - s) // PAGE_SIZE))
            i += 1
        self.remove(from_, end)
        self.remove(to, to + length)
        if not moved:
            return 0
        self._compact()
        if len(moved) <= 8:
            for s, e, f in moved:
                j = bisect_right(self._s, s)
                self._s.insert(j, s)
                self._e.insert(j, e)
                self._f.insert(j, f)
        else:
            items = list(zip(self._s, self._e, self._f, strict=True)) + moved
            items.sort()
            self._s = [s for s, _, _ in items]
            self._e = [e for _, e, _ in items]
            self._f = [f for _, _, f in items]
        npages = sum(e - s for s, e, _ in moved) // PAGE_SIZE
        self._pages += npages
        return npages

    def add(self, start: int, npages: int, file_index: int) -> None:
        """Add one run (it must not overlap a pending page)."""
        _check_aligned(start)
        if npages <= 0:
            return
        end = start + npages * PAGE_SIZE
        if self._dead:
            self._compact()
        j = bisect_right(self._s, start)
        if (j > 0 and self._e[j - 1] > start) or (j < len(self._s) and self._s[j] < end):
            raise ValueError(f"run {start:#x}+{npages} pages overlaps a pending run")
        self._s.insert(j, start)
        self._e.insert(j, end)
        self._f.insert(j, file_index)
        self._pages += npages

    def copy(self) -> PendingPages:
        """An independent copy (a fork child starts with its parent's pending set)."""
        new = PendingPages.__new__(PendingPages)
        new._s, new._e, new._f = self._s[:], self._e[:], self._f[:]
        new._dead, new._pages = self._dead, self._pages
        return new

    def clear(self) -> None:
        self._s, self._e, self._f = [], [], []
        self._dead = self._pages = 0

    def _compact(self) -> None:
        if not self._dead:
            return
        keep = [i for i in range(len(self._s)) if self._e[i] > self._s[i]]
        self._s = [self._s[i] for i in keep]
        self._e = [self._e[i] for i in keep]
        self._f = [self._f[i] for i in keep]
        self._dead = 0


__all__ = ["PAGE_SIZE", "PendingPages", "Run"]
