#!/usr/bin/env python3
"""Speed of the lazy server's page bookkeeping and of PAGEMAP_SCAN (figures only; the tests check results).

    python benchmarks/structures.py [--rounds 3]

1. PendingPages: draining 4 GiB in a few runs, and 10^5 scattered runs, by 2 MiB background chunks with a
   16-page fault window taken every fourth step (the lazy server's pattern). Its operations are O(log n)
   amortised: seconds here would mean a regression.
2. PAGEMAP_SCAN of a 4 GiB sparse mapping (one page every 2 MiB) in a child process: the dump's scan of a
   large, mostly empty heap (needs root to read another process's pagemap).

Prints the median over --rounds runs of each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lazarus.kernel import pagemap  # noqa: E402
from lazarus.lazy.ranges import PAGE_SIZE, PendingPages  # noqa: E402

P = PAGE_SIZE


def drain(kind: str) -> tuple[float, int]:
    """Seconds to drain the pending set, and the number of chunks taken."""
    if kind == "few-large":
        runs = [(0x7F0000000000 + i * (1 << 31), (1 << 30) // P, i * ((1 << 30) // P)) for i in range(4)]
    else:
        runs = [(0x10000000 + i * 64 * P, 1 + (i % 7), i * 8) for i in range(100_000)]
    pp = PendingPages(runs)
    rng = random.Random(2)
    addrs = [s for s, _, _ in runs]
    t0 = time.perf_counter()
    cursor = ops = 0
    while pp:
        if ops % 4 == 0:
            w = pp.window(rng.choice(addrs) + rng.randrange(0, 8) * P, 16)
            if w:
                pp.take(w[0], w[1] * P)
        c = pp.next_chunk(cursor, 2 << 20)
        if c is None:
            break
        pp.take(c[0], c[1] * P)
        cursor = c[0] + c[1] * P
        ops += 1
    return time.perf_counter() - t0, ops


SPARSE_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    big = mmap.mmap(-1, 4 << 30, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # MAP_NORESERVE
    big.madvise(mmap.MADV_NOHUGEPAGE)
    for off in range(0, 4 << 30, 2 << 20):
        big[off] = 7
    print(ctypes.addressof(ctypes.c_char.from_buffer(big)), flush=True)
    sys.stdin.read()
""")


def sparse_scan(rounds: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", SPARSE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        base = int(proc.stdout.readline())  # type: ignore[union-attr]
        pagemap.present_pages(proc.pid, base, base + (4 << 30))  # warm up
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            runs = pagemap.present_pages(proc.pid, base, base + (4 << 30))
            times.append(time.perf_counter() - t)
        assert len(runs) == 2048, len(runs)
        return times
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    out: dict[str, object] = {}
    for kind in ("few-large", "scattered"):
        results = [drain(kind) for _ in range(a.rounds)]
        med = statistics.median(t for t, _ in results)
        out[f"pending_pages_drain_{kind}_s"] = round(med, 4)
        print(f"PendingPages drain, {kind}: {med:.3f} s for {results[0][1]} chunks (median of {a.rounds})")
    if os.geteuid() == 0:
        med = statistics.median(sparse_scan(a.rounds))
        out["pagemap_scan_4gib_sparse_ms"] = round(med * 1e3, 3)
        print(f"PAGEMAP_SCAN 4 GiB, 2048 runs: {med * 1e3:.2f} ms (median of {a.rounds})")
    else:
        print("PAGEMAP_SCAN: skipped (needs root)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
