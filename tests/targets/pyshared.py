"""Test target (a process tree from CPython): forked multiprocessing.Process workers filling a
multiprocessing.Array and counting in a multiprocessing.Value, dumped mid-work.

Value and Array live in multiprocessing.heap's arena: a /dev/shm/pym-* file, unlinked at once, held open by an
fd and mapped MAP_SHARED, both inherited by the forked workers (and the Value's lock is a semaphore, another
deleted /dev/shm file every process maps). The main process starts WORKERS workers (start method "fork"); worker
w computes slots w, w + WORKERS, ... of the Array from a deterministic byte stream, stores each into its slot
and counts it in the Value under the Value's lock. The main process logs "READY" once about a quarter of the
slots are done, joins the workers, and logs "RESULT <hex> ..." (a digest of the whole Array and the count) and
"PASS" (or "FAIL: ..."). The result depends only on the slot count, never on timing.

Its own checks: a sample of the slots (one in 50, slot 1 among them) holds its own value (computed again), the count is the number of slots, every
worker exited 0, and the arena's fd still reaches the very memory of the mapping (a write through the fd is
seen in the Array, and back). Run it with a plain interpreter: `python3 -I pyshared.py LOGFILE [SLOTS]`. No
trigger: it finishes on its own. Self-test: LAZ_SELFTEST_CORRUPT=state (or 1) damages one slot after READY;
the checks must catch it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.heap
import os
import sys
import time

DEFAULT_SLOTS = 1200
WORKERS = 3
ROUNDS = 6000


def value_of(i: int) -> int:
    """Slot i's value: a chain of hashes (a few ms of work) reduced to a signed 64-bit integer."""
    h = hashlib.sha256(i.to_bytes(8, "little"))
    for _ in range(ROUNDS):
        h = hashlib.sha256(h.digest())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def worker(w: int, slots: int, arr: object, done: object) -> None:
    for i in range(w, slots, WORKERS):
        v = value_of(i)
        arr[i] = v  # type: ignore[index]
        with done.get_lock():  # type: ignore[attr-defined]
            done.value += 1  # type: ignore[attr-defined]


def arena_check(arr: object) -> str | None:
    """Through the arena's own fd: a write by pwrite is seen in the mapping, a write in the mapping by pread."""
    arena = arr.get_obj()._wrapper._state[0][0]  # type: ignore[attr-defined]
    off = arr.get_obj()._wrapper._state[0][1]  # type: ignore[attr-defined]
    fd = arena.fd
    link = os.readlink(f"/proc/self/fd/{fd}")
    if not link.endswith(" (deleted)"):
        return f"arena fd {fd} is {link!r}, not a deleted file"
    if os.fstat(fd).st_size != arena.size:
        return f"arena fd {fd} has size {os.fstat(fd).st_size}, the arena {arena.size}"
    first = arr[0]  # type: ignore[index]
    os.pwrite(fd, (12345).to_bytes(8, "little", signed=True), off)
    seen = arr[0]  # type: ignore[index]
    arr[0] = first  # type: ignore[index]
    back = int.from_bytes(os.pread(fd, 8, off), "little", signed=True)
    if seen != 12345 or back != first:
        return f"arena fd {fd} and its mapping are not one file (saw {seen}, read back {back})"
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return 2
    slots = int(argv[2]) if len(argv) > 2 else DEFAULT_SLOTS
    corrupt = os.environ.get("LAZ_SELFTEST_CORRUPT", "")
    log = open(argv[1], "a", buffering=1)  # noqa: SIM115 - held open for the whole run on purpose
    log.write("# corrupt-points: state\n")
    ctx = multiprocessing.get_context("fork")
    arr = ctx.Array("q", slots)
    done = ctx.Value("q", 0)
    procs = [ctx.Process(target=worker, args=(w, slots, arr, done)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    log.write(f"# workers: {' '.join(str(p.pid) for p in procs)}\n")
    problems: list[str] = []
    while done.value < slots // 4:
        time.sleep(0.01)
    log.write("READY\n")
    for p in procs:
        p.join()
        if p.exitcode != 0:
            problems.append(f"worker {p.pid} exited {p.exitcode}")
    if corrupt in ("1", "state"):
        log.write("# corrupting state\n")
        arr[1] ^= 1
    why = arena_check(arr)
    if why:
        problems.append(why)
    values = list(arr)
    for i in range(1, slots, max(1, slots // 50)):  # a sample: the RESULT compared by the test covers all
        v = values[i]
        if v != value_of(i):
            problems.append(f"slot {i} holds {v}, expected {value_of(i)}")
            break
    if done.value != slots:
        problems.append(f"count {done.value}, expected {slots}")
    digest = hashlib.sha256(b"".join(v.to_bytes(8, "little", signed=True) for v in values))
    digest.update(done.value.to_bytes(8, "little"))
    log.write(f"RESULT {digest.hexdigest()} slots={slots} count={done.value}\n")
    log.write(f"FAIL: {'; '.join(problems[:5])}\n" if problems else "PASS\n")
    log.close()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
