"""Copy-on-write runs kept shared across a tree restore (dump/cow.py finds them; docs/TREES.md tells the order).

    parent: maps its vmas, writes its pages (lazy: only the runs it owns) ----> forks each child
    child:  keeps the inherited vmas holding its runs (identical to its parent's at the dump), unmaps the rest,
            drops (MADV_DONTNEED) every inherited page of those vmas that is not in one of its runs, maps its own
            vmas, writes its own pages (lazy: only the runs it owns), then forks its own children

A page of a run is never written into a holder other than its owner: each has it as the very page its owner
has, from the fork. A lazy restore serves only the pages a task does not inherit (its page file holds no
other), so an inherited page never faults and is never copied.
"""

from __future__ import annotations

import array
import bisect
import operator

from lazarus.errors import KernelError
from lazarus.images.ranges import Range, merge, window
from lazarus.kernel import abi, vm
from lazarus.records import field, record
from lazarus.remote import Batch, Ref, RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1


@record
class CowPlan:
    """What one task of the tree does with the runs of cow.json."""
    pid: int
    inherited: list[Range] = field(default_factory=list)  # runs it holds, owned by an ancestor: kept
    owned: list[Range] = field(default_factory=list)  # runs it owns: written before it forks
    same_exe: bool = False  # its executable is its parent's: the link it inherits is already right
    parent_vmas: list[dict[str, Any]] = field(default_factory=list)  # its parent's image vmas (restore_tree)

    def __bool__(self) -> bool:
        return bool(self.inherited or self.owned)

    def kept_vmas(self, vmas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Its image vmas that hold inherited runs, and its file mappings that are its parent's (same_files):
        kept as they come from the parent."""
        starts = list(map(operator.itemgetter(0), self.inherited))
        same = {v["start"] for v in self.same_files(vmas)}
        out = []
        for v in vmas:
            i = bisect.bisect_left(starts, v["end"])  # the ranges starting before its end
            if (i and self.inherited[i - 1][1] > v["start"]) or v["start"] in same:  # merged and sorted: the
                out.append(v)  # last range starting before its end decides
        return out

    def same_files(self, vmas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Its private file mappings that are exactly its parent's (an executable's or a library's): kept from
        the fork too (kept_vmas), rather than unmapped, the file opened again (2 of a child's stops: the opens
        and their checks) and mapped anew. Whatever the fork left in them that is not its own (its parent's
        written pages) is dropped as a hole, and its own pages are written after, as in any kept vma. Only
        beside runs it inherits, with its parent's executable (set_mm leaves the link alone then: a new one is
        refused while the old file is mapped); not where the fork does not hand the mapping over as it is:
        locked, sealed, not copied or wiped on fork, guard regions (their markers), userfaultfd."""
        if not (self.inherited and self.same_exe and self.parent_vmas):
            return []
        theirs = {v["start"]: v for v in self.parent_vmas}
        out = []
        for v in vmas:
            p = theirs.get(v["start"])
            if (p is None or v["kind"] != "file" or v["shared"] or v.get("guards") or p.get("guards")
                    or not _FORK_KEEPS.isdisjoint(v["vmflags"]) or len(v) != len(p)):
                continue
            if all(v[k] == p.get(k) for k in v if k != "pages"):
                out.append(v)
        return out

    def holes(self, kept: list[dict[str, Any]]) -> list[Range]:
        """Every range of the kept vmas that is not in one of its inherited runs: what its parent has there is
        not its data (its own pages are written or served after drop()). The gaps between consecutive runs,
        taken by C-level maps over the runs inside each (merged) kept range: a child that rewrote one page in
        eight has thousands (ranges.subtract, a step per run, gives the same list)."""
        out: list[Range] = []
        inherited = self.inherited
        for lo, hi in merge((v["start"], v["end"]) for v in kept):
            runs = window(inherited, lo, hi)
            if not runs:
                out.append((lo, hi))
                continue
            starts, ends = zip(*runs, strict=True)
            # a gap from each run's end (or the range's start) to the next run's start (or the range's end);
            # empty where runs touch, or where the first or last run reaches past the range (none here)
            out += [g for g in zip((lo, *ends), (*starts, hi), strict=True) if g[0] < g[1]]
        return out

    def table_area(self, setup: Batch, holes: list[Range], gap: int) -> Ref | None:
        """Queue in `setup` (the batch that clears the new task's address space) the mmap of an area at `gap`
        (1 MiB free in the image's layout, guarded on both sides) for the table drop() hands process_madvise,
        so that the drop costs the task one stop in all. None where a table is not worth it or too large."""
        if not _FEW < len(holes) <= _AREA // 16:
            return None
        return setup.call(abi.SYS.mmap, gap, _AREA, abi.PROT_READ | abi.PROT_WRITE,
                          abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE, _NEG1, 0, check=False)

    def drop(self, task: RemoteTask, holes: list[Range], area: int = 0) -> None:
        """MADV_DONTNEED the holes (before any page of its own is written). `area`: the address table_area()
        mapped (0: none, or its mmap failed); drop() unmaps it."""
        if not holes:
            return
        if len(holes) > _FEW and _drop_vector(task, holes, area):
            return
        if area:
            task.syscall(abi.SYS.munmap, area, _AREA, what="munmap of the holes' table")
        _drop_one_by_one(task, holes)


# VmFlags of a mapping a fork does not hand its child exactly as it is (kept_files): locked, lock-on-fault, sealed,
# not copied, wiped, guard regions, userfaultfd-registered.
_FORK_KEEPS = frozenset({"lo", "lf", "sl", "dc", "wf", "gu", "um", "uw"})

# Up to this many holes, a batch of madvise calls in the trampoline's scratch costs no more than the table.
_FEW = 16
_UIO_MAXIOV = 1024  # iovecs per process_madvise call
_AREA = 1 << 20  # the table's area mapped with the address space's clearing: 65536 holes


def _drop_vector(task: RemoteTask, drop: list[Range], area: int = 0) -> bool:
    """Drop the holes with one process_madvise per 1024 of them, on the task itself (a child that rewrote one
    page in eight has thousands of one-page holes: one madvise each was most of its restore). Its iovec table
    goes in `area` (mapped already, _AREA bytes) or else in an area mapped for it; either is unmapped here.
    Returns False where the kernel does not take MADV_DONTNEED there (before 6.13 process_madvise took only a
    few advices); then nothing or part is dropped, and dropping again is harmless: nothing of the task's own is
    written yet."""
    starts, ends = zip(*drop, strict=True)
    lengths = list(map(operator.sub, ends, starts))
    table = array.array("Q", bytes(16 * len(drop)))
    table[0::2] = array.array("Q", starts)
    table[1::2] = array.array("Q", lengths)
    data = table.tobytes()
    if area and len(data) <= _AREA:
        size = _AREA
    else:
        if area:
            task.syscall(abi.SYS.munmap, area, _AREA, what="munmap of the holes' table")
        size = len(data) + abi.PAGE_SIZE - 1 & ~(abi.PAGE_SIZE - 1)
        area = task.syscall(abi.SYS.mmap, 0, size, abi.PROT_READ | abi.PROT_WRITE,
                            abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, _NEG1, 0, what="mmap of the holes' table")
    unmapped = False
    try:
        task.write(area, data)
        b = task.batch()
        pidfd = b.call(abi.SYS.pidfd_open, b.call(abi.SYS.getpid), 0, check=False)
        want = []
        for i in range(0, len(drop), _UIO_MAXIOV):
            part = drop[i:i + _UIO_MAXIOV]
            b.call(abi.SYS.process_madvise, pidfd, area + 16 * i, len(part), abi.MADV_DONTNEED, 0, check=False)
            want.append(sum(lengths[i:i + _UIO_MAXIOV]))
        b.call(abi.SYS.close, pidfd, check=False)
        unmap = b.call(abi.SYS.munmap, area, size, check=False)
        try:
            got = b.run()
        except KernelError:  # pidfd_open refused: the one-by-one way needs no pidfd
            return False
        unmapped = got[unmap.index] == 0
        return got[2:2 + len(want)] == want
    finally:
        if not unmapped:
            task.syscall(abi.SYS.munmap, area, size, what="munmap of the holes' table")


def _drop_one_by_one(task: RemoteTask, drop: list[Range]) -> None:
    """One madvise per hole, in batches."""
    # Thousands of holes where a child rewrote scattered pages: a scratch area of their own lets each
    # injection run thousands of calls instead of the trampoline scratch's few dozen.
    old = (task.scratch, task.scratch_size)
    big = size = 0
    if len(drop) > 64:
        size = min(len(drop) * 64 + abi.PAGE_SIZE, 1 << 20) + abi.PAGE_SIZE - 1 & ~(abi.PAGE_SIZE - 1)
        big = task.syscall(abi.SYS.mmap, 0, size, abi.PROT_READ | abi.PROT_WRITE,
                           abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, _NEG1, 0, what="mmap of scratch")
        task.use_scratch(big, size)
    try:
        b = task.batch()
        for start, end in drop:
            if not b.fits(1):
                b.run()
            b.call(abi.SYS.madvise, start, end - start, abi.MADV_DONTNEED,
                   what=f"madvise(MADV_DONTNEED) {start:#x}-{end:#x}")
        b.run()
    finally:
        if big:
            task.use_scratch(*old)
            task.syscall(abi.SYS.munmap, big, size)


def write_kept(pid: int, kept: list[dict[str, Any]], page_file: Any) -> tuple[int, list[dict[str, Any]]]:
    """Eager restore of a child: write its own pages inside the writable vmas it keeps from its parent (one
    per hole, thousands where it rewrote scattered pages) with a few process_vm_writev calls of up to 1024
    ranges each, instead of one UFFDIO_COPY per page. Before its uffd is registered over them (a write into
    a registered missing page would wait for a fault nobody serves). Returns the pages written and the kept
    vmas left for the uffd (read-only ones: process_vm_writev honours the protection)."""
    local: list[tuple[int, int]] = []
    remote: list[tuple[int, int]] = []
    rest = []
    pages = 0
    for v in kept:
        if not v["prot"] & abi.PROT_WRITE:
            rest.append(v)
            continue
        for vaddr, n, idx in v["pages"]:
            local.append((page_file.address(idx), n * abi.PAGE_SIZE))
            remote.append((vaddr, n * abi.PAGE_SIZE))
            pages += n
    if remote:
        vm.writev(pid, local, remote)
    return pages, rest


def plans(cow: dict[str, Any], parents: dict[int, int], exes: dict[int, str]) -> dict[int, CowPlan]:
    """Each task's CowPlan from cow.json (checked by images/validate.py check_cow)."""
    out: dict[int, CowPlan] = {}
    for key, rec in cow.items():
        pid = int(key)
        plan = out[pid] = CowPlan(pid, _ranges(rec["inherited"]), _ranges(rec["owned"]))
        plan.same_exe = bool(plan.inherited) and exes.get(pid) == exes.get(parents.get(pid, 0))
    return out


def _ranges(runs: list[list[int]]) -> list[Range]:
    """[start, npages] runs as [start, end) (C-level maps: thousands a child)."""
    if not runs:
        return []
    starts, counts = zip(*runs, strict=True)
    return list(zip(starts, map(operator.add, starts, map(abi.PAGE_SIZE.__mul__, counts)), strict=True))


def write_owned(remote: RemoteTask, space: Any, vmas: list[dict[str, Any]], page_file: Any) -> int:
    """A lazy restore's write of the runs a task owns (`vmas` cut down to them, images/mm.py only()), before
    it forks the children sharing them: anonymous ones by UFFDIO_COPY through a uffd made for the purpose and
    closed after, the others through /proc/pid/mem. Every chunk is verified before it is copied, as
    write_pages() does. Returns the pages written.

    A write through /proc/pid/mem faults a zeroed page in, then copies into it; UFFDIO_COPY allocates the page
    and copies once, and copy_all() runs two copies at once: the 64 MiB root of issue 9's tree in 21-32 ms
    against 34-41. Runs of a few pages (a parent sharing all but a child's scattered rewrites) are copied one
    ioctl each from here: a second copier handed them one by one cost more than it saved (the handoffs), and
    one handed half of them at once did not measurably help (kernel-bound at ~2.8 GB/s either way)."""
    from lazarus.images.mm import is_lazy
    from lazarus.restore.uffd import _finish_step, copy_all, lazy_ranges, uffd_in_task
    by_uffd = [v for v in vmas if is_lazy(v)]
    written = space.write_pages([v for v in vmas if not is_lazy(v)], page_file, skip_lazy=False)
    if not by_uffd:
        return written
    runs = [(vaddr, n, idx) for v in by_uffd for vaddr, n, idx in v["pages"]]
    if space.verify:
        for _, n, idx in runs:
            page_file.verify_range(idx, n)
    pages = sum(n for _, n, _ in runs)
    uffd = uffd_in_task(remote, lazy_ranges(by_uffd), 0)
    try:
        if pages >= _HELPED_RUN_PAGES * len(runs):
            return written + copy_all(uffd, by_uffd, page_file)
        for vaddr, n, idx in runs:
            src = page_file.address(idx)
            _finish_step(uffd, vaddr, src, n * abi.PAGE_SIZE, uffd.copy(vaddr, src, n * abi.PAGE_SIZE))
    finally:
        uffd.close()
    return written + pages


_HELPED_RUN_PAGES = 256  # runs of 1 MiB on average and more are copied two at a time (restore/uffd.py copy_all)
