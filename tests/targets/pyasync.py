"""Test target: a CPython asyncio program in the middle of its work (exercises an event loop's fds).

Its event loop holds what every asyncio program holds: an epoll fd (selectors.EpollSelector), the self-pipe
socket pair (written by call_soon_threadsafe), timers scheduled with call_later (asyncio.sleep), and here also
an eventfd watched with add_reader. Right after READY the loop is blocked for 2.5 s with a byte queued in its
self-pipe and the eventfd counter non-zero, so the dump finds them so. Work: a chain of call_later callbacks
(each schedules the next), worker tasks passing numbers through an asyncio.Queue with sleeps between them, and
a producer that adds to the eventfd counter while a reader callback drains it.

It writes progress lines to the log, "READY" after about one second, then "RESULT <hex> ..." and "PASS" (or
"FAIL: ...") and exits 0 (1). The result depends only on the work, never on timing or interleaving, so the
test compares the RESULT line of a dumped-and-restored run with that of an uninterrupted one. No trigger.

Run it with a plain interpreter: `python3 -I pyasync.py LOGFILE [STEPS]`.
Self-test: LAZ_SELFTEST_CORRUPT=state (or 1) damages a running total after READY, which the final
consistency check must catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time

DEFAULT_STEPS = 1500


class Work:
    def __init__(self, steps: int, log) -> None:  # noqa: ANN001 - a text file
        self.steps = steps
        self.log = log
        self.chain = hashlib.sha256()
        self.chain_steps = 0
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.written = 0
        self.read_total = 0
        self.worker_sums: dict[int, int] = {}
        self.woken: list[int] = []
        self.start = time.monotonic()
        self.ready = False
        self.corrupt = os.environ.get("LAZ_SELFTEST_CORRUPT", "") in ("1", "state")
        self.done = asyncio.get_running_loop().create_future()

    def chain_step(self, i: int) -> None:
        """One link of a call_later chain: strictly ordered, whatever the timing."""
        loop = asyncio.get_running_loop()
        self.chain.update(f"{i}:{(i * i) % 1009}".encode())
        self.chain_steps += 1
        if i % 100 == 0:
            self.log.write(f"# progress chain {i}\n")
        if not self.ready and time.monotonic() - self.start >= 1.0:
            self.ready = True
            # Then block the loop for a while, as a slow callback would, with a wake-up byte queued in the
            # self-pipe and the eventfd counter non-zero: the dump, which follows READY, finds them so.
            loop.call_soon_threadsafe(self.woken.append, i)  # when it runs depends on timing: only counted
            os.write(self.efd, (1000).to_bytes(8, sys.byteorder))
            self.written += 1000
            self.log.write("READY\n")
            if self.corrupt:
                self.log.write("# corrupting state\n")
                self.written += 1
            time.sleep(2.5)  # long enough for a dump started at READY on a loaded machine
        # Wake the loop through its self-pipe now and then, as a thread handing work to it would.
        if i % 7 == 0:
            loop.call_soon_threadsafe(self.chain.update, b"t")
        if i + 1 < self.steps:
            loop.call_later(0.002, self.chain_step, i + 1)
        else:
            self.done.set_result(None)

    def on_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already drained
            self.read_total += int.from_bytes(os.read(self.efd, 8), sys.byteorder)

    async def producer(self) -> None:
        for k in range(1, self.steps // 3 + 1):
            os.write(self.efd, k.to_bytes(8, sys.byteorder))
            self.written += k
            await asyncio.sleep(0.005)

    async def worker(self, n: int, queue: asyncio.Queue[int | None]) -> None:
        total = 0
        while (item := await queue.get()) is not None:
            total = (total * 31 + item * (n + 1)) % (1 << 61)
            await asyncio.sleep(0.001 * (n + 1))
        self.worker_sums[n] = total


async def run(steps: int, log) -> int:  # noqa: ANN001
    w = Work(steps, log)
    loop = asyncio.get_running_loop()
    loop.add_reader(w.efd, w.on_eventfd)
    queues: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in range(3)]
    workers = [asyncio.create_task(w.worker(n, q)) for n, q in enumerate(queues)]
    producer = asyncio.create_task(w.producer())
    loop.call_soon(w.chain_step, 0)
    for i in range(steps // 2):
        queues[i % 3].put_nowait(i * 7 + 1)
        await asyncio.sleep(0.003)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*workers, producer)
    await w.done
    await asyncio.sleep(0.05)
    w.on_eventfd()
    loop.remove_reader(w.efd)
    digest = hashlib.sha256(w.chain.digest())
    for n in sorted(w.worker_sums):
        digest.update(f"{n}={w.worker_sums[n]}".encode())
    log.write(f"RESULT {digest.hexdigest()} chain={w.chain_steps} eventfd={w.read_total} woken={len(w.woken)}\n")
    problems = []
    if not w.ready:
        problems.append("finished before READY")
    if w.read_total != w.written:
        problems.append(f"eventfd: read {w.read_total}, written {w.written}")
    if w.chain_steps != steps:
        problems.append(f"chain ran {w.chain_steps} steps of {steps}")
    log.write(f"FAIL: {'; '.join(problems)}\n" if problems else "PASS\n")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return 2
    steps = int(argv[2]) if len(argv) > 2 else DEFAULT_STEPS
    with open(argv[1], "a", buffering=1) as log:
        log.write("# corrupt-points: state\n")
        return asyncio.run(run(steps, log))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
