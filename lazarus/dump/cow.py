"""Copy-on-write pages a dumped tree keeps shared (issue 9): which runs the image stores once, in their owner.

    frozen tree --pagemap PFNs--> sharing.find_pages --keepable--> runs a restore can rebuild by fork
                                                                   (cow.json; holders' page files leave them out)

A run comes back shared only when forking can give it back: the restore writes it into the owner (the holders'
nearest common ancestor) before the owner forks, and every holder inherits it through its parent. So a run is
kept when
  - the owner still has the page itself (owner_has; a parent that wrote its own copy since would have to place
    the shared content, fork, then put its own: not done, those pages are stored per task as before),
  - every holder maps it at the same address and every holder but the owner has its parent among the holders
    (the page passes down the tree without a gap),
  - and each holder other than the owner maps it inside a private vma identical (start, end, file, offset) to
    one of its parent's, so that the child can keep that inherited vma as it is.
Other shared frames are stored once per task (private copies after a restore): the same as before this module.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from lazarus.dump import sharing
from lazarus.dump.sharing import SharedPages
from lazarus.kernel import abi, pfn, procfs
from lazarus.kernel.procfs import Vma

Range = tuple[int, int]


class _Layout:
    """One task's vmas, found by address with bisect (a tree's runs number in the tens of thousands)."""

    def __init__(self, vmas: Sequence[Vma]) -> None:
        self.vmas = sorted(vmas, key=lambda v: v.start)
        self.starts = [v.start for v in self.vmas]

    def index(self, addr: int) -> int:
        """The index of the vma holding `addr`, or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i if i >= 0 and addr < self.vmas[i].end else -1


def _same_vma(a: Vma, b: Vma) -> bool:
    return (a.start, a.end, a.path, a.pgoff, a.inode, a.shared) == (b.start, b.end, b.path, b.pgoff, b.inode,
                                                                      b.shared)


def keepable(runs: Iterable[SharedPages], parents: dict[int, int],
             vmas: dict[int, Sequence[Vma]]) -> list[SharedPages]:
    """The runs a restore can give back by fork (module docstring), renumbered "cow-1", "cow-2", ..."""
    layouts = {p: _Layout(v) for p, v in vmas.items()}
    empty = _Layout(())
    # (pid, index of its vma): whether that private vma is exactly its parent's, asked once per vma
    as_parents: dict[tuple[int, int], bool] = {}
    out: list[SharedPages] = []
    for r in runs:
        if not r.owner_has or len({a for _, a in r.at}) != 1:
            continue
        holders = set(r.pids)
        start = r.at[0][1]
        end = start + r.npages * abi.PAGE_SIZE
        ok = True
        for p in holders - {r.owner}:
            q = parents.get(p)
            mine = layouts.get(p, empty)
            i = mine.index(start)
            if q not in holders or i < 0 or end > mine.vmas[i].end:
                ok = False
                break
            same = as_parents.get((p, i))
            if same is None:
                theirs = layouts.get(q, empty) if q is not None else empty
                j = theirs.index(start)
                same = as_parents[(p, i)] = (not mine.vmas[i].shared and j >= 0
                                             and _same_vma(mine.vmas[i], theirs.vmas[j]))
            if not same:
                ok = False
                break
        if ok:
            out.append(SharedPages(f"cow-{len(out) + 1}", r.owner, True, r.npages, r.at))
    return out


def find(pids: Sequence[int], parents: dict[int, int]) -> list[SharedPages]:
    """The copy-on-write runs of the frozen tasks `pids` that the image keeps shared."""
    if len(pids) < 2:
        return []
    snaps = [sharing.TaskSnap(p, parents.get(p, 0), (), tuple(procfs.read_maps(p))) for p in sorted(pids)]
    runs = sharing.find_pages((pf for s in snaps for pf in sharing.frames(s)), parents, pfn.zero_pfn())
    return keepable(runs, parents, {s.pid: s.vmas for s in snaps})


def inherited_by_pid(runs: Iterable[SharedPages]) -> dict[int, list[Range]]:
    """inherited() of every task at once, in one pass over the runs (sorted and merged)."""
    out: dict[int, list[Range]] = {}
    for r in runs:
        size = r.npages * abi.PAGE_SIZE
        for p, a in r.at:
            if p != r.owner:
                out.setdefault(p, []).append((a, a + size))
    return {p: sharing.merge(v) for p, v in out.items()}


def to_json(runs: Iterable[SharedPages]) -> dict[str, dict[str, list[list[int]]]]:
    """cow.json: for each task with a part in a kept run, the page ranges it owns (writes before it forks) and
    those it inherits (keeps from the fork), each as sorted, merged [start, npages] (docs/IMAGES.md)."""
    owned: dict[int, list[Range]] = {}
    kept: dict[int, list[Range]] = {}
    for r in runs:
        size = r.npages * abi.PAGE_SIZE
        for pid, addr in r.at:
            (owned if pid == r.owner else kept).setdefault(pid, []).append((addr, addr + size))
    out: dict[str, dict[str, list[list[int]]]] = {}
    for pid in sorted(set(owned) | set(kept)):
        out[str(pid)] = {k: [[s, (e - s) // abi.PAGE_SIZE] for s, e in sharing.merge(src.get(pid, []))]
                         for k, src in (("owned", owned), ("inherited", kept))}
    return out
