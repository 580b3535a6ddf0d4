"""[start, end) address ranges: merged, cut to a window, subtracted. Pure arithmetic shared by the dump (what a
task's page file stores: its present pages minus what it inherits) and the restore (the holes a child drops
in the vmas it keeps from its parent), kept here so that neither imports the other."""

from __future__ import annotations

import bisect

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Iterable

Range = tuple[int, int]  # [start, end)


def merge(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def window(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    """The ranges of sorted, disjoint `ranges` that overlap [lo, hi), found by bisection (a task's thousands of
    inherited runs, cut down to one vma)."""
    first = bisect.bisect_right(ranges, lo, key=lambda r: r[1])
    last = bisect.bisect_left(ranges, hi, lo=first, key=lambda r: r[0])
    return ranges[first:last]


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> list[Range]:
    """`ranges` minus `holes` (both [start, end) lists), sorted and merged: e.g. a task's present pages minus
    the ones it inherits, which is what its own page file stores and its lazy ranges serve."""
    hs = merge(holes)
    out: list[Range] = []
    j = 0  # both sorted: the holes ending before a range are behind every later range too (linear in all)
    for s, e in merge(ranges):
        pos = s
        while j < len(hs) and hs[j][1] <= pos:
            j += 1
        k = j
        while k < len(hs) and hs[k][0] < e:
            hs_, he = hs[k]
            if hs_ > pos:
                out.append((pos, hs_))
            pos = max(pos, he)
            if pos >= e:
                break
            k += 1
        if pos < e:
            out.append((pos, e))
    return out


__all__ = ["Range", "merge", "subtract", "window"]
