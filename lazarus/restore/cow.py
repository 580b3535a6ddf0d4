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

import bisect

from lazarus.kernel import abi
from lazarus.records import field, record
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

Range = tuple[int, int]


@record
class CowPlan:
    """What one task of the tree does with the runs of cow.json."""
    pid: int
    inherited: list[Range] = field(default_factory=list)  # runs it holds, owned by an ancestor: kept
    owned: list[Range] = field(default_factory=list)  # runs it owns: written before it forks
    same_exe: bool = False  # its executable is its parent's: the link it inherits is already right

    def __bool__(self) -> bool:
        return bool(self.inherited or self.owned)

    def kept_vmas(self, vmas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Its image vmas that hold inherited runs: kept as they come from the parent."""
        starts = [s for s, _ in self.inherited]
        out = []
        for v in vmas:
            i = bisect.bisect_left(starts, v["end"])  # the ranges starting before its end
            if i and self.inherited[i - 1][1] > v["start"]:  # merged and sorted: the last one decides
                out.append(v)
        return out

    def drop_others(self, task: RemoteTask, kept: list[dict[str, Any]]) -> None:
        """MADV_DONTNEED every page of the kept vmas that is not in one of its inherited runs: what its parent
        has there is not its data (its own pages are written or served after this)."""
        from lazarus.dump.sharing import (
            subtract,  # here: importing lazarus.dump loads the whole dump (~15 ms)
        )
        drop = subtract([(v["start"], v["end"]) for v in kept], self.inherited)
        if not drop:
            return
        # Thousands of holes where a child rewrote scattered pages: a scratch area of their own lets each
        # injection run thousands of calls instead of the trampoline scratch's few dozen.
        old = (task.scratch, task.scratch_size)
        big = 0
        if len(drop) > 64:
            size = min(len(drop) * 64 + abi.PAGE_SIZE, 1 << 20) + abi.PAGE_SIZE - 1 & ~(abi.PAGE_SIZE - 1)
            big = task.syscall(abi.SYS.mmap, 0, size, abi.PROT_READ | abi.PROT_WRITE,
                               abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, (1 << 64) - 1, 0, what="mmap of scratch")
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


def plans(cow: dict[str, Any], parents: dict[int, int], exes: dict[int, str]) -> dict[int, CowPlan]:
    """Each task's CowPlan from cow.json (checked by images/validate.py check_cow)."""
    out: dict[int, CowPlan] = {}
    for key, rec in cow.items():
        pid = int(key)
        plan = out[pid] = CowPlan(pid, _ranges(rec["inherited"]), _ranges(rec["owned"]))
        plan.same_exe = bool(plan.inherited) and exes.get(pid) == exes.get(parents.get(pid, 0))
    return out


def _ranges(runs: list[list[int]]) -> list[Range]:
    return [(s, s + n * abi.PAGE_SIZE) for s, n in runs]
