"""Test target (exercises threads in CPython): a program with threads, dumped mid-work.

A concurrent.futures.ThreadPoolExecutor of four workers hashes chunks of a deterministic byte stream
(hashlib releases the GIL on large buffers, so the workers truly run at once), while a producer thread hands
numbers to a consumer thread through a queue.Queue (a condition variable: futex waits) and the main thread
waits on the futures. Progress lines go to the log, "READY" after about one second of work, then
"RESULT <hex>" and "PASS" (or "FAIL: ...") at the end. The result depends only on the work count, never on
timing or on which worker ran what, so the test compares it with that of an uninterrupted run.

Run it with a plain interpreter: `python3 -I pythreads.py LOGFILE [CHUNKS]`. No trigger: it finishes on its
own. Self-test: LAZ_SELFTEST_CORRUPT=state (or 1) damages the consumer's running total after READY, which the
final consistency check must catch.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_CHUNKS = 4000
CHUNK = 1 << 18


def work(i: int) -> bytes:
    data = hashlib.shake_256(i.to_bytes(8, "little")).digest(CHUNK)
    h = hashlib.sha256(data)
    for _ in range(8):
        h = hashlib.sha256(h.digest() + data[: 1 << 16])
    return h.digest()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return 2
    chunks = int(argv[2]) if len(argv) > 2 else DEFAULT_CHUNKS
    corrupt = os.environ.get("LAZ_SELFTEST_CORRUPT", "") in ("1", "state")
    log = open(argv[1], "a", buffering=1)  # noqa: SIM115 - held open for the whole run on purpose
    log.write("# corrupt-points: state\n")
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            log.write(line + "\n")

    q: queue.Queue[int | None] = queue.Queue(maxsize=8)
    consumed = {"total": 0, "count": 0}

    def producer() -> None:
        for n in range(chunks * 4):
            q.put(n * n % 1_000_003)
            if n % 8 == 0:
                time.sleep(0.001)
        q.put(None)

    def consumer() -> None:
        while (v := q.get()) is not None:
            consumed["total"] += v
            consumed["count"] += 1

    threads = [threading.Thread(target=producer, name="producer"), threading.Thread(target=consumer, name="consumer")]
    for t in threads:
        t.start()
    start = time.monotonic()
    ready = False
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="worker") as pool:
        futures = [pool.submit(work, i) for i in range(chunks)]
        for i, f in enumerate(futures):
            digest.update(f.result())
            if i % 200 == 0:
                say(f"# progress {i}")
            if not ready and (time.monotonic() - start >= 1.0 or i >= chunks // 8):
                ready = True
                say("READY")
                if corrupt:
                    say("# corrupting state")
                    consumed["total"] += 1
    for t in threads:
        t.join()
    expect_total = sum(n * n % 1_000_003 for n in range(chunks * 4))
    digest.update(consumed["total"].to_bytes(16, "little"))
    say(f"RESULT {digest.hexdigest()} chunks={chunks} consumed={consumed['count']}")
    problems = []
    if not ready:
        problems.append("finished before READY (too little work)")
    if consumed["total"] != expect_total or consumed["count"] != chunks * 4:
        problems.append(f"consumer total {consumed['total']} / {consumed['count']}, expected {expect_total}")
    say(f"FAIL: {'; '.join(problems)}" if problems else "PASS")
    log.close()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
