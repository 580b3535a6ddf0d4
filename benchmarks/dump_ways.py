"""Ways to move a process's pages into a page file, measured side by side (issue 10, branches vmsplice, dumpfast).

    .venv/bin/python benchmarks/dump_ways.py [--mib 512 2048] [--runs 3] [--dir /var/tmp] [--ways ...] [--no-sync]

One memhog per size holds MIB MiB of filled memory; each way writes all of it to a fresh file in DIR, computes the
xxh3 sums of every 64 KiB chunk from the bytes written, and fsyncs (the fsync is timed apart too). Printed:
median wall seconds, CPU seconds of this process (all threads; the kernel's copies in our syscalls count), and the
fsync's share. With --no-sync no way starts writeback or fsyncs (CRIU's durability: the kernel writes the page
cache back later), and the api ways dump with sync=False. Ways:

    map        today's default: fallocate, two threads process_vm_readv 8 MiB pieces into a MAP_SHARED mapping
    map_pop    the same, each piece MADV_POPULATE_WRITE'd first (one call per piece, not one fault per folio)
    map_trunc  the same as map with ftruncate instead of fallocate (holes, not unwritten extents)
    pwrite     fallocate, two threads process_vm_readv into their own 8 MiB buffers, hash, pwrite (buffered)
    pwrite_trunc  the same without fallocate (the file grows by the writes)
    pwrite_small  fallocate, two threads, each process_vm_readv into its own --small-kib buffer (kept in the CPU's
               cache), hash, pwrite: the second copy reads from the cache, not from memory
    vmsplice_trunc  vmsplice (below) without fallocate
    api        the real dump in this process (lazarus.dump, leave_running), as the service runs it
    api_pop    the same with MADV_POPULATE_WRITE of each piece (dump/memory.py _POPULATE on)
    api_self / api_old  the same with the task writing its own pages (dump/selfwrite.py) or not
    target     the bare one-copy way: the task pwritev's 32 MiB pieces into the file we gave it, we hash meanwhile
    api_map / api_pwrite  the same, the page file filled through its shared mapping / by pwrite from each
               thread's buffer (dump/memory.py _MAPPED)
    criu       `criu dump --leave-running` (whole command)
    vmsplice   the target (ptrace-stopped) vmsplices 1 MiB at a time into a pipe it made, of which we hold the read
               end (pidfd_getfd); we splice the pipe into the file (one copy), then hash from a read-only mapping
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TARGETS, Target, build, region_of  # noqa: E402

import lazarus  # noqa: E402
from lazarus.kernel import abi, ptrace, vm  # noqa: E402
from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open  # noqa: E402
from lazarus.kernel.syscall import buffer_address, populate_write, start_writeback  # noqa: E402
from lazarus.remote import RemoteTask, find_syscall_insn  # noqa: E402

PIECE = 8 << 20
PIPE = 1 << 20
SMALL = 256 << 10
SYNC = True
LAST_SPLICE = (0.0, 0.0)
CHUNK = 64 << 10
SYS_VMSPLICE = 278


def _sums(view: memoryview) -> list[int]:
    d = xxhash.xxh3_64_intdigest
    return [d(view[o:o + CHUNK]) for o in range(0, len(view), CHUNK)]


def _threads(n: int, work) -> None:  # type: ignore[no-untyped-def]
    lock = threading.Lock()
    pieces = iter(range(0, n, PIECE))

    def run() -> None:
        while True:
            with lock:
                off = next(pieces, None)
            if off is None:
                return
            work(off, min(PIECE, n - off))

    ts = [threading.Thread(target=run) for _ in range(1)]
    for t in ts:
        t.start()
    run()
    for t in ts:
        t.join()


def way_map(pid: int, addr: int, n: int, path: Path, *, populate: bool = False, falloc: bool = True) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if falloc:
        os.posix_fallocate(fd, 0, n)
    else:
        os.ftruncate(fd, n)
    mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mm.madvise(mmap.MADV_HUGEPAGE)
    base = buffer_address(mm)
    view = memoryview(mm)

    def work(off: int, k: int) -> None:
        if populate and not populate_write(base + off, k):
            raise OSError("madvise(MADV_POPULATE_WRITE) failed")
        vm.readv(pid, [(base + off, k)], [(addr + off, k)])
        _sums(view[off:off + k])
        if SYNC:
            start_writeback(fd, off, k)

    _threads(n, work)
    view.release()
    mm.close()
    return _finish(fd)


def _finish(fd: int) -> float:
    """fsync (if SYNC) and close; returns the fsync's seconds."""
    t = time.perf_counter()
    if SYNC:
        os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def way_pwrite(pid: int, addr: int, n: int, path: Path, *, falloc: bool = True, step: int = PIECE) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if falloc:
        os.posix_fallocate(fd, 0, n)
    local = threading.local()

    def work(off: int, k: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, step)
            buf.write(bytes(step))  # touched once: the buffer stays resident (and cached when small)
        base = buffer_address(buf)
        whole = memoryview(buf)
        for o in range(off, off + k, step):
            m = min(step, off + k - o)
            vm.readv(pid, [(base, m)], [(addr + o, m)])
            mv = whole[:m]
            _sums(mv)
            os.pwrite(fd, mv, o)
            mv.release()
        whole.release()
        if SYNC:
            start_writeback(fd, off, k)

    _threads(n, work)
    return _finish(fd)


def way_vmsplice(pid: int, addr: int, n: int, path: Path, *, falloc: bool = True) -> tuple[float, float, int]:
    """Returns (fsync seconds, injection seconds, injections)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if falloc:
        os.posix_fallocate(fd, 0, n)
    ptrace.seize(pid)
    ptrace.interrupt(pid)
    ptrace.wait(pid)
    inj = spl = 0.0
    calls = 0
    try:
        vmas = Path(f"/proc/{pid}/maps").read_text().splitlines()
        sys_ip = None
        for line in vmas:
            rng, perms = line.split()[:2]
            if "x" in perms:
                s, e = (int(x, 16) for x in rng.split("-"))
                sys_ip = find_syscall_insn(pid, s, e)
                if sys_ip:
                    break
        assert sys_ip
        with RemoteTask(pid, sys_ip) as r:
            scratch = r.alloc_scratch()
            r.syscall(abi.SYS.pipe2, scratch, os.O_CLOEXEC)
            wr = int.from_bytes(r.read(scratch, 8), "little")
            tr, tw = wr & 0xFFFFFFFF, wr >> 32
            pidfd = pidfd_open(pid)
            rfd = pidfd_getfd(pidfd, tr, pid=pid)
            os.close(pidfd)
            # Sized from our side: with CAP_SYS_RESOURCE past fs.pipe-max-size (fewer round trips).
            try:
                psize = fcntl.fcntl(rfd, abi.F_SETPIPE_SZ, PIPE)
            except PermissionError:
                psize = fcntl.fcntl(rfd, abi.F_SETPIPE_SZ, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
            iov = scratch + 64
            off = 0
            while off < n:
                k = min(psize, n - off)
                r.write(iov, (addr + off).to_bytes(8, "little") + k.to_bytes(8, "little"))
                t = time.perf_counter()
                got = r.syscall(SYS_VMSPLICE, tw, iov, 1, 0)
                inj += time.perf_counter() - t
                calls += 1
                done = 0
                t = time.perf_counter()
                while done < got:
                    done += os.splice(rfd, fd, got - done, offset_dst=off + done, flags=os.SPLICE_F_MOVE)
                spl += time.perf_counter() - t
                if SYNC:
                    start_writeback(fd, off, got)
                off += got
            r.syscall(abi.SYS.close, tw)
            r.syscall(abi.SYS.close, tr)
            os.close(rfd)
    finally:
        ptrace.detach(pid)
    t = time.perf_counter()
    mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    mm.madvise(mmap.MADV_HUGEPAGE)
    v = memoryview(mm)
    _sums(v)
    global LAST_SPLICE
    LAST_SPLICE = (spl, time.perf_counter() - t)
    v.release()
    mm.close()
    return _finish(fd), inj, calls


SYS_PWRITEV = 296
TARGET_PIECE = 32 << 20
TARGET_BATCH = 2
LAST_TARGET = (0.0, 0.0, 0)


def way_target(pid: int, addr: int, n: int, path: Path, *, falloc: bool = True) -> float:
    """The target writes its own memory into the page file (one copy): our fd given to it by SCM_RIGHTS, then
    injected pwritev calls of TARGET_PIECE each, TARGET_BATCH per batch (one stop each); meanwhile a thread of
    ours hashes what is already written, read back from the page cache into a small buffer."""
    import socket
    import struct
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if falloc:
        os.posix_fallocate(fd, 0, n)
    ptrace.seize(pid)
    ptrace.interrupt(pid)
    ptrace.wait(pid)
    written = [0]
    cond = threading.Condition()
    hashed: list[int] = []
    stop = [False]

    def hasher() -> None:
        buf = mmap.mmap(-1, SMALL)
        view = memoryview(buf)
        done = 0
        while done < n:
            with cond:
                while written[0] <= done and not stop[0]:
                    cond.wait()
                if stop[0] and written[0] <= done:
                    break
                upto = written[0]
            while done < upto:
                k = min(SMALL, upto - done)
                got = os.preadv(fd, [view[:k]], done)
                assert got == k
                hashed.extend(_sums(view[:k]))
                done += k
        view.release()
        buf.close()

    ht = threading.Thread(target=hasher)
    ht.start()
    inj = 0.0
    stops = 0
    try:
        vmas = Path(f"/proc/{pid}/maps").read_text().splitlines()
        sys_ip = None
        for line in vmas:
            rng, perms = line.split()[:2]
            if "x" in perms:
                s, e = (int(x, 16) for x in rng.split("-"))
                sys_ip = find_syscall_insn(pid, s, e)
                if sys_ip:
                    break
        assert sys_ip
        with RemoteTask(pid, sys_ip) as r:
            assert r.alloc_batch_scratch(16 * abi.PAGE_SIZE)
            scratch = r.scratch
            r.syscall(abi.SYS.socketpair, socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, scratch)
            sv0, sv1 = struct.unpack("<ii", r.read(scratch, 8))
            pidfd = pidfd_open(pid)
            end = socket.socket(fileno=pidfd_getfd(pidfd, sv0, pid=pid))
            os.close(pidfd)
            socket.send_fds(end, [b"\0"], [fd])
            end.close()
            from lazarus.restore.sharing import _recv_fds
            tfd = _recv_fds(r, sv1, 1)[0]
            r.raw(abi.SYS.close, sv0)
            r.raw(abi.SYS.close, sv1)
            off = 0
            while off < n:
                b = r.batch()
                calls = []
                for _ in range(TARGET_BATCH):
                    if off >= n:
                        break
                    k = min(TARGET_PIECE, n - off)
                    iov = b.put(struct.pack("<QQ", addr + off, k))
                    b.call(SYS_PWRITEV, tfd, iov, 1, off, 0, check=True)
                    calls.append((off, k))
                    off += k
                t = time.perf_counter()
                res = b.run(one_stop=True)
                inj += time.perf_counter() - t
                stops += 1
                for (o, k), got in zip(calls, res, strict=True):
                    assert got == k, (o, k, got)
                with cond:
                    written[0] = off
                    cond.notify()
            r.raw(abi.SYS.close, tfd)
    finally:
        tj = time.perf_counter()
        with cond:
            stop[0] = True
            cond.notify()
        ht.join()
        tj = time.perf_counter() - tj
        ptrace.detach(pid)
    assert len(hashed) == -(-n // CHUNK)
    global LAST_TARGET
    LAST_TARGET = (inj, tj, stops)
    if SYNC:
        start_writeback(fd, 0, n)
    return _finish(fd)


def _task_cpu(pid: int) -> float:
    """utime + stime of the memhog (what it spent writing its own pages, in the selfwrite ways)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--pipe-mib", type=int, default=1)
    ap.add_argument("--criu", default=None)
    ap.add_argument("--small-kib", type=int, default=256)
    ap.add_argument("--no-sync", dest="sync", action="store_false")
    ap.add_argument("--ways", nargs="+", default=["map", "map_pop", "map_trunc", "pwrite", "vmsplice"])
    a = ap.parse_args()
    memory = importlib.import_module("lazarus.dump.memory")
    global PIPE, SMALL, SYNC
    PIPE = a.pipe_mib << 20
    SMALL = a.small_kib << 10
    SYNC = a.sync
    print(f"sync {SYNC}; load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dump-ways-", dir=a.dir))
    exe = build(TARGETS / "memhog.c", work)
    for mib in a.mib:
        proc = Target(exe, work / f"memhog-{mib}.log", str(mib))
        try:
            addr, n = region_of(proc.wait_ready(timeout=300))
            res: dict[str, list[tuple[float, float, float, str]]] = {w: [] for w in a.ways}
            for i in range(a.runs):
                # A rotating order: this VM's cost of fresh memory drifts within a round.
                for w in a.ways[i % len(a.ways):] + a.ways[:i % len(a.ways)]:
                    path = work / f"dump-ways-{os.getpid()}-{w}-{i}"
                    c0 = time.process_time()
                    tc0 = _task_cpu(proc.pid)
                    t0 = time.perf_counter()
                    extra = ""
                    if w == "map":
                        fs = way_map(proc.pid, addr, n, path)
                    elif w == "map_pop":
                        fs = way_map(proc.pid, addr, n, path, populate=True)
                    elif w == "map_trunc":
                        fs = way_map(proc.pid, addr, n, path, falloc=False)
                    elif w == "pwrite":
                        fs = way_pwrite(proc.pid, addr, n, path)
                    elif w == "pwrite_trunc":
                        fs = way_pwrite(proc.pid, addr, n, path, falloc=False)
                    elif w == "pwrite_small":
                        fs = way_pwrite(proc.pid, addr, n, path, step=SMALL)
                    elif w in ("api_self", "api_old"):
                        # The real dump with the task writing its own pages (dump/selfwrite.py) or not.
                        pkg = sys.modules["lazarus.dump"]
                        saved_sw = pkg._SELF_WRITE
                        pkg._SELF_WRITE = w == "api_self"
                        lazarus.dump(proc.pid, path, leave_running=True, sync=SYNC)
                        pkg._SELF_WRITE = saved_sw
                        fs = 0.0
                    elif w in ("api", "api_pop", "api_map", "api_pwrite"):
                        # The real dump in-process (leave_running), as shipped, with the populate step, or with
                        # the page file filled through its mapping / by pwrite.
                        saved = memory._POPULATE, memory._MAPPED
                        memory._POPULATE = saved[0] or w == "api_pop"
                        memory._MAPPED = {"api_map": True, "api_pwrite": False}.get(w, saved[1])
                        lazarus.dump(proc.pid, path, leave_running=True, sync=SYNC)
                        memory._POPULATE, memory._MAPPED = saved
                        fs = 0.0
                    elif w == "criu":
                        path.mkdir()
                        subprocess.run([a.criu, "dump", "-t", str(proc.pid), "-D", str(path), "-o", "dump.log",
                                        "--leave-running"], check=True, capture_output=True)
                        fs = 0.0
                    elif w == "target":
                        fs = way_target(proc.pid, addr, n, path)
                        extra = f"{LAST_TARGET[2]} batches, in them {LAST_TARGET[0]:.3f} s"
                    else:
                        fs, inj, calls = way_vmsplice(proc.pid, addr, n, path, falloc=w != "vmsplice_trunc")
                        extra = (f"{calls} injections {inj * 1e6 / calls:.0f} us each, splice {LAST_SPLICE[0]:.3f} s, "
                                 f"hash {LAST_SPLICE[1]:.3f} s")
                    wall = time.perf_counter() - t0
                    cpu = time.process_time() - c0
                    extra = f"task cpu {_task_cpu(proc.pid) - tc0:.3f} s " + extra
                    res[w].append((wall, cpu, fs, extra))
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            print(f"load after {mib} MiB: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
            for w, rs in res.items():
                print(f"{mib:5d} MiB {w:10s} wall {statistics.median(r[0] for r in rs):.3f} s  "
                      f"cpu {statistics.median(r[1] for r in rs):.3f} s  fsync {statistics.median(r[2] for r in rs):.3f} s"
                      f"  {rs[-1][3]}  (walls {' '.join(f'{r[0]:.3f}' for r in rs)})", flush=True)
        finally:
            proc.kill()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
