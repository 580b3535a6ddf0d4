"""Which anonymous memory a task held in transparent huge pages, so that a restore can give it huge pages again.

UFFDIO_COPY installs 4 KiB pages only (KERNEL-NOTES); a restore collapses each recorded 2 MiB range once it is
filled (MADV_COLLAPSE, by injection or process_madvise), and the task gets back the TLB reach it had.
"""

from __future__ import annotations

from typing import Any

from lazarus.kernel import abi
from lazarus.kernel.pagemap import Pagemap

HUGE = abi.HPAGE_PMD_SIZE


def mark_huge(pid: int, vma_recs: list[dict[str, Any]]) -> int:
    """Add "huge": [[start, npages], ...] (2 MiB aligned runs) to each anonymous private vma that has huge pages.
    Returns the number of 2 MiB pages found."""
    total = 0
    with Pagemap(pid) as pm:
        for v in vma_recs:
            if v["kind"] != "anon" or v["shared"] or v["end"] - v["start"] < HUGE:
                continue
            runs = []
            want = abi.PAGE_IS_HUGE | abi.PAGE_IS_PRESENT
            for start, end, _cat in pm.scan(v["start"], v["end"], want, return_mask=want):
                lo = -(-start // HUGE) * HUGE
                hi = end // HUGE * HUGE
                if lo < hi:
                    if runs and runs[-1][0] + runs[-1][1] * abi.PAGE_SIZE == lo:
                        runs[-1][1] += (hi - lo) // abi.PAGE_SIZE
                    else:
                        runs.append([lo, (hi - lo) // abi.PAGE_SIZE])
                    total += (hi - lo) // HUGE
            if runs:
                v["huge"] = runs
    return total

