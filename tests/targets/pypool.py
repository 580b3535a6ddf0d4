"""Test target (a process tree from CPython): a multiprocessing.Pool of forked workers fed by the threads of a
concurrent.futures.ThreadPoolExecutor, dumped mid-work.

The main process forks a Pool of three workers (start method "fork", made before any thread exists), then
three executor threads each send jobs of chunks to the pool (pool.map: pipes to the workers, a semaphore
shared between the processes, the pool's own handler threads) while the main thread takes the jobs' results
in order. Each chunk is hashed in a worker from a deterministic byte stream. Progress lines go to the log,
"READY" after about one second of work, then "RESULT <hex> ..." and "PASS" (or "FAIL: ...") at the end.
The result depends only on the job count, never on timing or on which worker ran what, so the test compares
it with that of an uninterrupted run.

Its own checks: every chunk came back once and in order, and was computed by one of the workers the pool
forked at the start, whose parent is this process (so a restored tree must give the workers back their
pids and parent). Run it with a plain interpreter: `python3 -I pypool.py LOGFILE [JOBS]`. No trigger: it
finishes on its own. Self-test: LAZ_SELFTEST_CORRUPT=state (or 1) damages one result after READY,
=parent makes the main process believe another pid is the workers' parent; the checks must catch both.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_JOBS = 480
CHUNKS_PER_JOB = 6
CHUNK = 1 << 17
WORKERS = 3
THREADS = 3


def work(i: int) -> tuple[int, bytes, int, int]:
    """In a pool worker: (chunk number, its digest, this worker's pid, its parent's pid)."""
    data = hashlib.shake_256(i.to_bytes(8, "little")).digest(CHUNK)
    h = hashlib.sha256(data)
    for _ in range(24):
        h = hashlib.sha256(h.digest() + data[: 1 << 15])
    return i, h.digest(), os.getpid(), os.getppid()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return 2
    jobs = int(argv[2]) if len(argv) > 2 else DEFAULT_JOBS
    corrupt = os.environ.get("LAZ_SELFTEST_CORRUPT", "")
    log = open(argv[1], "a", buffering=1)  # noqa: SIM115 - held open for the whole run on purpose
    log.write("# corrupt-points: state parent\n")
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            log.write(line + "\n")

    me = os.getpid()
    ctx = multiprocessing.get_context("fork")
    problems: list[str] = []
    with ctx.Pool(WORKERS) as pool:
        workers = {p.pid for p in multiprocessing.active_children()}
        say(f"# workers: {' '.join(map(str, sorted(workers)))}")
        if len(workers) != WORKERS:
            problems.append(f"pool started {len(workers)} workers, expected {WORKERS}")

        def job(j: int) -> list[tuple[int, bytes, int, int]]:
            return pool.map(work, range(j * CHUNKS_PER_JOB, (j + 1) * CHUNKS_PER_JOB), chunksize=2)

        start = time.monotonic()
        ready = False
        digest = hashlib.sha256()
        expect_next = 0
        with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="feeder") as feeders:
            futures = [feeders.submit(job, j) for j in range(jobs)]
            for j, f in enumerate(futures):
                for i, d, pid, ppid in f.result():
                    if i != expect_next:
                        problems.append(f"chunk {i} came where chunk {expect_next} was due")
                    expect_next = i + 1
                    if pid not in workers:
                        problems.append(f"chunk {i} computed by pid {pid}, not one of the pool's workers")
                    if ppid != me:
                        problems.append(f"chunk {i}: worker {pid} has parent {ppid}, not {me}")
                    digest.update(d)
                if j % 20 == 0:
                    say(f"# progress {j}")
                if not ready and (time.monotonic() - start >= 1.0 or j >= jobs // 8):
                    ready = True
                    say("READY")
                    if corrupt in ("1", "state"):
                        say("# corrupting state")
                        expect_next += 1  # as if a chunk had been lost: the next one comes out of order
                    elif corrupt == "parent":
                        say("# corrupting parent")
                        me = -1
    result = digest.hexdigest()
    say(f"RESULT {result} jobs={jobs} chunks={expect_next}")
    if not ready:
        problems.append("finished before READY (too little work)")
    if expect_next != jobs * CHUNKS_PER_JOB:
        problems.append(f"{expect_next} chunks, expected {jobs * CHUNKS_PER_JOB}")
    # Each problem once (a wrong parent shows on every chunk).
    unique = list(dict.fromkeys(problems))
    say(f"FAIL: {'; '.join(unique[:5])}" if unique else "PASS")
    log.close()
    return 1 if unique else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
