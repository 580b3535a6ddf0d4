"""Which anonymous memory a task held in transparent huge pages, so that a restore can give it huge pages again.

UFFDIO_COPY installs 4 KiB pages only (KERNEL-NOTES); a restore collapses each recorded 2 MiB range once it is
filled (MADV_COLLAPSE, by injection or process_madvise), and the task gets back the TLB reach it had.
"""

from __future__ import annotations

from lazarus.kernel import abi

HUGE = abi.HPAGE_PMD_SIZE


def huge_runs(regions: list[tuple[int, int]]) -> list[list[int]]:
    """[[start, npages], ...]: the whole 2 MiB aligned stretches of [start, end) runs of huge-page-mapped memory
    (Pagemap.present_and_huge), touching ones joined. MemoryDumper records these from the scan that finds the
    present pages, so no second PAGEMAP_SCAN pass is needed."""
    runs: list[list[int]] = []
    for start, end in regions:
        lo = -(-start // HUGE) * HUGE
        hi = end // HUGE * HUGE
        if lo < hi:
            if runs and runs[-1][0] + runs[-1][1] * abi.PAGE_SIZE == lo:
                runs[-1][1] += (hi - lo) // abi.PAGE_SIZE
            else:
                runs.append([lo, (hi - lo) // abi.PAGE_SIZE])
    return runs
