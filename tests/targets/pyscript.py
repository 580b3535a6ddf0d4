"""Test target: a plain CPython interpreter in the middle of a deterministic computation.

Exercises a whole interpreter (libpython, its heap, obmalloc arenas, the vdso it calls all the
time) with state held in Python objects: a generator suspended mid-iteration (an incremental
prime sieve keeping its own dict), dicts, a list, and a 4096-bit integer. It writes progress
lines to the log (an open, line-buffered file object), "READY" after about one second of
work, and when done "RESULT <hex>" then "PASS" (or "FAIL: ...") and exits 0 (1).

The result depends only on the iteration count, never on timing, so the test compares the
RESULT line of a dumped-and-restored run with that of an uninterrupted one. No trigger: the
script finishes on its own (about 4-6 s with the default count).

Run it with a plain interpreter (not a venv): `python3 -I pyscript.py LOGFILE [ITERATIONS]`.
Self-test: LAZ_SELFTEST_CORRUPT=state (or 1) damages the running totals after READY, which
the final consistency check must catch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

DEFAULT_ITERATIONS = 420_000
MODULUS = 1 << 4096


def primes() -> Iterator[int]:
    """Incremental sieve of Eratosthenes: yields primes forever, keeping composites in a dict."""
    composites: dict[int, list[int]] = {}
    n = 2
    while True:
        factors = composites.pop(n, None)
        if factors is None:
            composites[n * n] = [n]
            yield n
        else:
            for p in factors:
                composites.setdefault(n + p, []).append(p)
        n += 1


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return 2
    iterations = int(argv[2]) if len(argv) > 2 else DEFAULT_ITERATIONS
    corrupt = os.environ.get("LAZ_SELFTEST_CORRUPT", "") in ("1", "state")
    log = open(argv[1], "a", buffering=1)  # noqa: SIM115 - held open for the whole run on purpose
    log.write("# corrupt-points: state\n")

    start = time.monotonic()
    ready = False
    big = 1
    by_residue: dict[int, int] = {}
    window: list[int] = []
    total = 0
    count = 0
    gen = primes()
    for i in range(iterations):
        p = next(gen)
        big = (big * 1_000_003 + p * (i + 1)) % MODULUS
        by_residue[p % 997] = by_residue.get(p % 997, 0) + p
        window.append(p ^ i)
        if len(window) > 5000:
            del window[:2500]
        total += p
        count += 1
        if i % 25_000 == 0:
            log.write(f"# progress {i} {p}\n")
        # READY after about a second of work, or at a quarter of the run on a machine fast enough to finish a
        # short (self-test) run within a second: either way with most of the computation still ahead.
        if not ready and i % 256 == 0 and (time.monotonic() - start >= 1.0 or i >= iterations // 4):
            ready = True
            log.write("READY\n")
            if corrupt:
                log.write("# corrupting state\n")
                total += 1

    digest = big
    for residue, value in by_residue.items():
        digest = (digest * 257 + residue * value) % MODULUS
    for value in window:
        digest = (digest * 263 + value) % MODULUS
    log.write(f"RESULT {digest % (1 << 256):064x} primes={count} last={p}\n")

    problems = []
    if not ready:
        problems.append("finished before READY (too few iterations)")
    if sum(by_residue.values()) != total:
        problems.append(f"running total {total} disagrees with the residue table")
    if count != iterations:
        problems.append(f"counted {count} primes, expected {iterations}")
    log.write(f"FAIL: {'; '.join(problems)}\n" if problems else "PASS\n")
    log.close()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
