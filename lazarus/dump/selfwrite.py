"""The dumped task writes its own pages into the page file: one copy (its memory -> the page cache).

    dump (tracer)                                     the stopped task (injected calls, remote.Batch: one stop each)
    -------------                                     ----------------------------------------------------------
    journal "fds": where scratch holds the pair's
      numbers (-1, -1 until made), the page file's inode
                                                      socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC) -> sv
    pidfd_getfd(sv[0]); sendmsg(page file, SCM_RIGHTS)
                                                      recvmsg(sv[1], MSG_CMSG_CLOEXEC) -> k; close(sv[0], sv[1])
                                                      pwritev(k, iov[<= IOV_MAX], n, off), 256 KiB each: two
                                                        16 MiB pieces per stop; close(k) in the last stop
    a helper thread hashes each piece written, through
      a read-only mapping of the page cache, while the
      task writes the next (dump/memory.py)
    journal "fds-gone"; registers, mask, scratch back; "clean"

Why: our own copy (process_vm_readv into a buffer, then pwrite into the page cache) copies every byte twice in
our process; CRIU's parasite copies once (vmsplice + splice). Here the task's pwritev copies once, on the other
CPU, while we only read back and hash (docs/BENCHMARKS.md, "Dump: the task writes its own pages").

When not (the caller's old copy then, refusal() says why): a soft RLIMIT_FSIZE below the page file's final size
(a write past it fails with EFBIG AND queues SIGXFSZ to the task: changed state); a task in a memory cgroup with
a limit (memory.max / memory.high, or v1 memory.limit_in_bytes, on its cgroup or an ancestor: the page cache it
writes is charged to it, and reclaim or the OOM killer would act on the task because of our dump); seccomp
(refused by the dump anyway). Any injected call that fails (EMFILE for the pair, a truncated SCM_RIGHTS
message, a pwritev error) falls back to the old copy for what is not written yet; a short write is continued.

Side effects that remain: the task's /proc/PID/io counters (wchar, syscw, write_bytes) grow by the image size,
its CPU time by the copy, and its memory cgroup is charged for the page cache (without a limit).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable

from lazarus.errors import LazarusError
from lazarus.kernel import abi, procfs
from lazarus.kernel.pidfd import PidFd
from lazarus.remote import RemoteTask

PIECE = 16 << 20  # bytes hashed at a time (a multiple of the 64 KiB chunk), while the task writes the next piece
# Bytes per pwritev: the page cache takes folios as large as one write (up to 2 MiB); large ones need free memory in
# large blocks, which direct compaction makes in the task's own time when memory is fragmented (measured: the
# same 2 GiB dump 1.1 s or 5-7 s, whether or not the memory freed just before was in small folios).
CALL = 256 << 10
PER_STOP = 2  # pieces per stop of the task: ~10-60 ms each, so a watchdog or a kill is never kept waiting long
MIN = 4 << 20  # less than this is copied the old way (the pair and the fd cost three stops)
_SCRATCH = 256 << 10  # a stop's call table and iovecs: PER_STOP pieces of up to 4096 runs (16 bytes each)
_NAP = 0.0005  # poll the end of a batch closely: each one is followed by handing its piece to the hasher
_MSGHDR = struct.Struct("<QI4xQQQQi4x")  # struct msghdr (x86-64)
_CMSGHDR = struct.Struct("<QiI")  # cmsg_len, cmsg_level, cmsg_type (then the int fd)
_PAIR = struct.Struct("<ii")

Call = tuple[int, int, list[tuple[int, int]]]  # (piece index, byte offset in the page file, iovecs)


def refusal(pid: int, end: int) -> str | None:
    """Why task `pid` may not write the page file itself up to byte `end` (None: it may)."""
    status = procfs.read_status(pid)
    if status.seccomp:
        return f"seccomp mode {status.seccomp}"
    soft = procfs.read_limits(pid)[abi.RLIMIT_FSIZE][0]
    if soft < end:
        return f"RLIMIT_FSIZE {soft} is below the page file's {end} bytes"
    return memory_limit(pid)


def memory_limit(pid: int, root: str = "/sys/fs/cgroup") -> str | None:
    """The first memory limit on the task's memory cgroup or an ancestor, as "path/file value", or None."""
    try:
        lines = procfs.read_text(f"/proc/{pid}/cgroup", pid).splitlines()
    except (OSError, LazarusError):
        return None
    v2 = root if os.path.exists(f"{root}/cgroup.controllers") else f"{root}/unified"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = v2, ("memory.max", "memory.high")
        elif "memory" in controllers.split(","):
            base, files = f"{root}/memory", ("memory.limit_in_bytes", "memory.soft_limit_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            d = "/".join([base, *parts[:depth]])
            for name in files:
                try:
                    with open(f"{d}/{name}") as f:
                        value = f.read().strip()
                except OSError:
                    continue
                if value != "max" and not (value.isdigit() and int(value) >= 1 << 62):
                    return f"memory cgroup limit {d}/{name} {value}"
    return None


class SelfWriter:
    """The task's own descriptor of the page file, and the injected pwritev calls that fill it (module
    docstring). open() -> write() ... -> close(); close() also when open() or write() failed or raised."""

    def __init__(self, remote: RemoteTask, fd: int, batch: bool) -> None:
        self.remote = remote
        self.fd = fd
        self.batch = batch
        self.tfd = -1
        self._pair = (-1, -1)
        self._pair_at = 0
        self.failure = ""  # why the task stopped writing (a failed injected call), for the log

    def _batch(self):  # type: ignore[no-untyped-def]
        """A Batch whose first bytes of scratch repeat the pair's numbers, where the journal says they are."""
        b = self.remote.batch()
        b.put(_PAIR.pack(*self._pair))
        return b

    def open(self) -> bool:
        """Give the task the page file; False if an injected call failed (nothing of ours is left in it)."""
        r = self.remote
        if self.batch:
            r.alloc_batch_scratch(_SCRATCH)
        else:
            r.alloc_scratch(_SCRATCH)
        b = self._batch()
        self._pair_at = r.scratch
        r.write(self._pair_at, _PAIR.pack(-1, -1))  # before the journal names the place
        fst = os.fstat(self.fd)
        journal = r.journal
        if journal is not None and hasattr(journal, "target_fds"):
            journal.target_fds(self._pair_at, fst.st_dev, fst.st_ino)
        b.call(abi.SYS.socketpair, socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, self._pair_at,
               check=False)
        if b.run(one_stop=True)[0] < 0:
            self.failure = "socketpair failed"
            return False
        self._pair = _PAIR.unpack(r.read(self._pair_at, 8))
        sv0, sv1 = self._pair
        sent = True
        try:
            with PidFd.open(r.pid) as pfd:
                end = socket.socket(fileno=pfd.getfd(sv0))
            with end:
                socket.send_fds(end, [b"\0"], [self.fd])
        except OSError:
            sent = False
        # The pair is closed in the same stop whatever came (MSG_DONTWAIT: nothing sent, nothing waited for).
        b = self._batch()
        byte = b.put(bytes(8))
        iov = b.put(struct.pack("<QQ", byte, 1))
        ctrl_len = (_CMSGHDR.size + 4 + 7) & ~7
        ctrl = b.put(bytes(ctrl_len))
        msg = b.put(_MSGHDR.pack(0, 0, iov, 1, ctrl, ctrl_len, 0))
        b.call(abi.SYS.recvmsg, sv1, msg, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT, check=False)
        b.call(abi.SYS.close, sv0, check=False)
        b.call(abi.SYS.close, sv1, check=False)
        got = b.run(one_stop=True)[0]
        raw = r.read(ctrl, ctrl_len)
        self._pair = (-1, -1)
        r.write(self._pair_at, _PAIR.pack(-1, -1))
        length, level, kind = _CMSGHDR.unpack_from(raw)
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and length == _CMSGHDR.size + 4:
            self.tfd = struct.unpack_from("<i", raw, _CMSGHDR.size)[0]  # closed by close() even if got < 0
        if got < 0 or not sent or self.tfd < 0:
            self.failure = "the page file could not be given to the task"
            return False
        return True

    def write(self, calls: list[Call], done: Callable[[int], None], stop: Callable[[], bool]) -> list[Call]:
        """Make the task pwritev each call's iovecs at its offset, PER_STOP pieces per stop; done(piece) once a
        piece's calls are all written. Returns the calls (or their unwritten rests) left to the caller: none,
        unless an injected pwritev failed or stop() said so."""
        self.remote.batch_nap = _NAP  # from here on, each stop takes milliseconds
        todo = list(calls)
        left = {}
        for piece, _, _ in todo:
            left[piece] = left.get(piece, 0) + 1
        while todo and not stop():
            b = self._batch()
            taken: list[Call] = []
            pieces: set[int] = set()
            while todo and (len(pieces) < PER_STOP or todo[0][0] in pieces):
                piece, pos, iovs = todo[0]
                size = 16 * len(iovs)
                if taken and not b.fits(1, size):
                    break
                at = b.put(b"".join(struct.pack("<QQ", a, n) for a, n in iovs))
                b.call(abi.SYS.pwritev, self.tfd, at, len(iovs), pos, 0, check=False)
                taken.append(todo.pop(0))
                pieces.add(piece)
            last = not todo and self.tfd >= 0
            if last:
                # The task's descriptor closed in the same stop as its last writes (a short write left after
                # them goes the old way: the caller copies what is returned).
                b.call(abi.SYS.close, self.tfd, check=False)
            results = b.run(one_stop=True)
            if last:
                self.tfd = -1
                results = results[:-1]
            # Every call of the stop ran (none is checked): the short ones' rests go first into the next stop.
            again: list[Call] = []
            lost: list[Call] = []
            for call, got in zip(taken, results, strict=True):
                piece, pos, iovs = call
                want = sum(n for _, n in iovs)
                if got == want:
                    left[piece] -= 1
                    if not left[piece]:
                        done(piece)
                elif got > 0:
                    (again if self.tfd >= 0 else lost).append((piece, pos + got, _skip(iovs, got)))
                else:
                    lost.append(call)
                    self.failure = f"pwritev in the task failed: {os.strerror(-got) if got < 0 else 'wrote nothing'}"
            if lost:
                self.failure = self.failure or "a short write in the last stop"
                return [*lost, *again, *todo]
            todo[0:0] = again
        return todo

    def close(self) -> None:
        """Close the task's descriptor, put its registers, mask and scratch back, and tell the journal."""
        r = self.remote
        if self.tfd >= 0:
            b = self._batch()
            b.call(abi.SYS.close, self.tfd, check=False)
            b.run(one_stop=True)
            self.tfd = -1
        journal = r.journal
        if journal is not None and hasattr(journal, "target_fds_gone"):
            journal.target_fds_gone()
        r.close()
        if journal is not None and hasattr(journal, "clean"):
            journal.clean()


def _skip(iovs: list[tuple[int, int]], nbytes: int) -> list[tuple[int, int]]:
    """The iovecs past their first `nbytes`."""
    out = []
    for a, n in iovs:
        if nbytes >= n:
            nbytes -= n
            continue
        out.append((a + nbytes, n - nbytes))
        nbytes = 0
    return out


def calls_for(piece: int, pos: int, runs: list[tuple[int, int]]) -> list[Call]:
    """The pwritev calls of one piece: its runs of task memory, at most CALL bytes and IOV_MAX runs each, from
    byte `pos` of the file on."""
    out: list[Call] = []
    part: list[tuple[int, int]] = []
    size = 0
    for a, n in runs:
        while n:
            k = min(n, CALL - size)
            part.append((a, k))
            size += k
            a, n = a + k, n - k
            if size == CALL or len(part) == abi.IOV_MAX:
                out.append((piece, pos, part))
                pos += size
                part, size = [], 0
    if part:
        out.append((piece, pos, part))
    return out


def close_quietly(w: SelfWriter) -> None:
    """close() on a failure path: whatever it cannot do, the dump's repair (dump/watchdog.py) does."""
    with contextlib.suppress(Exception):
        w.close()
