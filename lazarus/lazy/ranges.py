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

Storage: the runs in address order, cut into blocks of at most 2 * BLOCK runs; each block is three parallel
sorted lists (run starts, ends, file indexes), and a list of each block's first start finds the block with
bisect. Trimming the head or tail of a run is done in place; a cut in the middle of a run (a scattered fault
takes one page out of a long run) or a run taken whole shifts one block, never the whole set: with one flat
list, 10^5 scattered faults had made each take() cost ~30 us in moving list elements. A block that grows past
2 * BLOCK runs is split in two, an empty one is dropped. This keeps a 4 GiB image with a few long runs and one
with 10^5 scattered runs, or 10^5 scattered faults, equally cheap.
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

    __slots__ = ("_bs", "_be", "_bf", "_mins", "_pages")
    BLOCK = 256  # runs per block, half the most a block holds before it is split

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
        for i in range(1, len(items)):
            if items[i][0] < items[i - 1][1]:
                raise ValueError(f"overlapping runs at {items[i][0]:#x}")
        self._build(items)

    def _build(self, items: list[tuple[int, int, int]]) -> None:
        """Blocks of BLOCK runs from sorted, non-overlapping (start, end, file index) items."""
        n = self.BLOCK
        self._bs: list[list[int]] = []
        self._be: list[list[int]] = []
        self._bf: list[list[int]] = []
        for k in range(0, len(items), n):
            part = items[k:k + n]
            self._bs.append([s for s, _, _ in part])
            self._be.append([e for _, e, _ in part])
            self._bf.append([f for _, _, f in part])
        self._mins: list[int] = [b[0] for b in self._bs]
        self._pages = sum(e - s for s, e, _ in items) // PAGE_SIZE

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
        return self._find(addr)[1] >= 0

    def runs(self) -> Iterator[Run]:
        """The runs in address order."""
        for bs, be, bf in zip(self._bs, self._be, self._bf, strict=True):
            for s, e, f in zip(bs, be, bf, strict=True):
                yield s, (e - s) // PAGE_SIZE, f

    def nruns(self) -> int:
        return sum(len(b) for b in self._bs)

    def __repr__(self) -> str:
        return f"PendingPages({self._pages} pages in {self.nruns()} runs)"

    def _find(self, addr: int) -> tuple[int, int]:
        """(block, index) of the run containing addr, or (block, -1)."""
        b = bisect_right(self._mins, addr) - 1
        if b < 0:
            return 0, -1
        i = bisect_right(self._bs[b], addr) - 1
        if i >= 0 and addr < self._be[b][i]:
            return b, i
        return b, -1

    def lookup(self, addr: int) -> int | None:
        """File page index of the pending page holding `addr`, or None if that page is not pending."""
        b, i = self._find(addr)
        if i < 0:
            return None
        return self._bf[b][i] + (addr - self._bs[b][i]) // PAGE_SIZE

    def window(self, addr: int, max_pages: int) -> Run | None:
        """The pending pages contiguous with (and including) the page of `addr`, within the `max_pages`-aligned
        window holding it (max_pages a power of two), as one run; None if addr's page is not pending."""
        b, i = self._find(addr)
        if i < 0:
            return None
        span = max_pages * PAGE_SIZE
        lo = addr & ~(span - 1)
        hi = lo + span
        s, e = self._bs[b][i], self._be[b][i]
        if s > lo:
            lo = s
        if e < hi:
            hi = e
        return lo, (hi - lo) // PAGE_SIZE, self._bf[b][i] + (lo - s) // PAGE_SIZE

    def next_chunk(self, near: int, max_len: int) -> Run | None:
        """Up to `max_len` bytes (rounded down to pages, at least one page) of pending pages starting at the
        first pending page at or after `near`, wrapping around to the lowest one. None when nothing is
        pending. Never spans two runs (runs may belong to different vmas)."""
        if not self._pages:
            return None
        near &= ~_MASK
        b = bisect_right(self._mins, near) - 1
        if b < 0:
            b, i = 0, 0
        else:
            bs = self._bs[b]
            i = bisect_right(bs, near) - 1
            if self._be[b][i] <= near:
                i += 1
            if i >= len(bs):
                b, i = b + 1, 0
        if b >= len(self._bs):
            b, i, near = 0, 0, 0
        s, e = self._bs[b][i], self._be[b][i]
        start = near if s < near else s
        maxp = max(1, max_len // PAGE_SIZE)
        npages = min(maxp, (e - start) // PAGE_SIZE)
        return start, npages, self._bf[b][i] + (start - s) // PAGE_SIZE

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
        b = bisect_right(self._mins, start) - 1
        if b < 0:
            b = 0
        first_block = b
        nblocks = len(self._bs)
        dropped = 0
        i = bisect_right(self._bs[b], start) - 1
        if i < 0:
            i = 0
        done = False
        while b < nblocks and not done:
            s_, e_, f_ = self._bs[b], self._be[b], self._bf[b]
            while i < len(s_):
                s, e = s_[i], e_[i]
                if s >= end:
                    done = True
                    break
                if e <= start:
                    i += 1
                    continue
                if start <= s:
                    if end >= e:  # whole run
                        dropped += e - s
                        del s_[i], e_[i], f_[i]
                        continue
                    # head
                    dropped += end - s
                    f_[i] += (end - s) // PAGE_SIZE
                    s_[i] = end
                    done = True
                    break
                if end >= e:  # tail
                    dropped += e - start
                    e_[i] = start
                    i += 1
                    continue
                # middle: split
                dropped += end - start
                e_[i] = start
                s_.insert(i + 1, end)
                e_.insert(i + 1, e)
                f_.insert(i + 1, f_[i] + (end - s) // PAGE_SIZE)
                done = True
                break
            if not done:
                b, i = b + 1, 0
        if dropped:
            self._pages -= dropped // PAGE_SIZE
            self._fix(first_block, min(b, nblocks - 1))
        return dropped // PAGE_SIZE

    def _fix(self, lo: int, hi: int) -> None:
        """Blocks lo..hi were changed: drop the empty ones, split the large ones, refresh their first starts."""
        top = 2 * self.BLOCK
        for b in range(hi, lo - 1, -1):
            bs = self._bs[b]
            if not bs:
                del self._bs[b], self._be[b], self._bf[b], self._mins[b]
                continue
            if len(bs) > top:
                half = len(bs) // 2
                self._bs.insert(b + 1, bs[half:])
                self._be.insert(b + 1, self._be[b][half:])
                self._bf.insert(b + 1, self._bf[b][half:])
                self._mins.insert(b + 1, bs[half])
                del bs[half:], self._be[b][half:], self._bf[b][half:]
            self._mins[b] = bs[0]

    def _insert(self, start: int, end: int, fidx: int) -> None:
        """Insert one run that overlaps none."""
        if not self._bs:
            self._bs.append([start])
            self._be.append([end])
            self._bf.append([fidx])
            self._mins.append(start)
            return
        b = bisect_right(self._mins, start) - 1
        if b < 0:
            b = 0
        j = bisect_right(self._bs[b], start)
        self._bs[b].insert(j, start)
        self._be[b].insert(j, end)
        self._bf[b].insert(j, fidx)
        self._fix(b, b)

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
        for s, n, f in self._runs_from(from_):
            if s >= end:
                break
            e = s + n * PAGE_SIZE
            if e > from_:
                cs, ce = max(s, from_), min(e, end)
                moved.append((cs - from_ + to, ce - from_ + to, f + (cs - s) // PAGE_SIZE))
        self.remove(from_, end)
        self.remove(to, to + length)
        if not moved:
            return 0
        if len(moved) <= 8:
            for s, e, f in moved:
                self._insert(s, e, f)
        else:
            pages = self._pages
            items = sorted([(s, s + n * PAGE_SIZE, f) for s, n, f in self.runs()] + moved)
            self._build(items)
            self._pages = pages
        npages = sum(e - s for s, e, _ in moved) // PAGE_SIZE
        self._pages += npages
        return npages

    def _runs_from(self, addr: int) -> Iterator[Run]:
        """The runs from the one containing or preceding addr on, in address order."""
        b = bisect_right(self._mins, addr) - 1
        if b < 0:
            b = 0
        if b >= len(self._bs):
            return
        i = max(0, bisect_right(self._bs[b], addr) - 1)
        while b < len(self._bs):
            bs, be, bf = self._bs[b], self._be[b], self._bf[b]
            while i < len(bs):
                yield bs[i], (be[i] - bs[i]) // PAGE_SIZE, bf[i]
                i += 1
            b, i = b + 1, 0

    def add(self, start: int, npages: int, file_index: int) -> None:
        """Add one run (it must not overlap a pending page)."""
        _check_aligned(start)
        if npages <= 0:
            return
        end = start + npages * PAGE_SIZE
        for s, n, _ in self._runs_from(start):
            if s >= end:
                break
            if s + n * PAGE_SIZE > start:
                raise ValueError(f"run {start:#x}+{npages} pages overlaps a pending run")
        self._insert(start, end, file_index)
        self._pages += npages

    def copy(self) -> PendingPages:
        """An independent copy (a fork child starts with its parent's pending set)."""
        new = type(self).__new__(type(self))
        new._bs = [b[:] for b in self._bs]
        new._be = [b[:] for b in self._be]
        new._bf = [b[:] for b in self._bf]
        new._mins = self._mins[:]
        new._pages = self._pages
        return new

    def clear(self) -> None:
        self._build([])


__all__ = ["PAGE_SIZE", "PendingPages", "Run"]
