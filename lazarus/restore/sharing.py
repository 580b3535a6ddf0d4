"""Restore primitives for objects shared between tasks: one open file description, pipe or memory object made
once and put into several tasks.

    lazarus (holds one fd of each shared object)            stopped task (RemoteTask)
    ------------------------------------------              ---------------------------
    new_pipe(data) -> r, w   new_memfd / new_shmem            pidfd_open(lazarus)        once per task
    take(pid, fd) -> ours    (a file the first task opened)   pidfd_getfd(pidfd, ours) -> tmp
    fcntl(ours, F_SETFL)     (status flags: per description) dup3(tmp, fd) ; close(tmp)  or mmap(..., tmp, off)

The task pulls each fd out of lazarus with an injected pidfd_getfd (FdCourier): three injected calls per fd,
no socket and nothing any other process could connect to. The task must be allowed to ptrace lazarus, which it
is while it still runs as root (restore drops credentials late). SCM_RIGHTS through an injected socketpair
(give_scm) takes one recvmsg for any number of fds but two more calls per task and one dup3 + close per fd
again. tests/test_sharing.py measures both: on a loaded 2-vCPU VM, per fd, pidfd_getfd 140 / 70 / 140 us and
SCM_RIGHTS 330 / 200 / 130 us for 1 / 16 / 64 fds into one task (noisy, +-3x between runs). A task holds a few
shared fds, not dozens, so the simpler way is the default; give_scm stays for a task that takes many.

Everything that belongs to the open file description (offset, status flags, pipe contents, memory contents)
is set once, through lazarus's own fd, never per task.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterable

from lazarus.errors import KernelError, LazarusError, RestoreError
from lazarus.kernel import abi
from lazarus.kernel.pidfd import PidFd
from lazarus.records import record
from lazarus.remote import RemoteTask
from lazarus.restore import private

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1


class FdCourier:
    """Puts fds of this process into one stopped task at chosen numbers. Close it (or use `with`) before the
    task runs: it holds a pidfd of lazarus inside the task."""

    def __init__(self, task: RemoteTask) -> None:
        self.task = task
        self._pidfd = -1

    def __enter__(self) -> FdCourier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def borrow(self, ours: int) -> int:
        """A copy of our fd `ours` in the task, at whatever number is free (close-on-exec); the caller closes it."""
        t = self.task
        if self._pidfd < 0:
            self._pidfd = t.syscall(abi.SYS.pidfd_open, os.getpid(), 0, what="pidfd_open(lazarus)")
        return t.syscall(abi.SYS.pidfd_getfd, self._pidfd, ours, 0, what=f"pidfd_getfd of lazarus fd {ours}")

    def give(self, ours: int, at: int, *, cloexec: bool = False) -> None:
        """Make fd `at` of the task the same open file description as our `ours` (replacing whatever `at` was)."""
        t = self.task
        tmp = self.borrow(ours)
        if tmp == at:  # pidfd_getfd took the lowest free number, and that was the one wanted
            t.syscall(abi.SYS.fcntl, at, abi.F_SETFD, abi.FD_CLOEXEC if cloexec else 0)
            return
        try:
            t.syscall(abi.SYS.dup3, tmp, at, abi.O_CLOEXEC if cloexec else 0, what=f"dup3 to fd {at}")
        finally:
            t.raw(abi.SYS.close, tmp)

    def close(self) -> None:
        if self._pidfd >= 0:
            fd, self._pidfd = self._pidfd, -1
            with contextlib.suppress(LazarusError):
                self.task.raw(abi.SYS.close, fd)


_MSGHDR = struct.Struct("<QI4xQQQQi4x")  # struct msghdr (x86-64)
_CMSGHDR = struct.Struct("<QiI")         # cmsg_len, cmsg_level, cmsg_type (then the int fds)
_MAX_SCM = 253                           # SCM_MAX_FD


def give_scm(task: RemoteTask, fds: Iterable[tuple[int, int, bool]]) -> None:
    """The same as FdCourier.give for each (ours, at, cloexec), through SCM_RIGHTS: an injected socketpair,
    one sendmsg of ours, one injected recvmsg per 253 fds, then dup3 + close of each. Needs scratch memory in
    the task (task.alloc_scratch or use_scratch) of at least one page."""
    import socket  # here, not at import: a restore command without shared fds never loads it (start-up cost)
    items = list(fds)
    if not items:
        return
    scratch = task.scratch or task.alloc_scratch(abi.PAGE_SIZE)
    task.syscall(abi.SYS.socketpair, socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0, scratch,
                 what="socketpair")
    sv0, sv1 = struct.unpack("<ii", task.read(scratch, 8))
    targets = {at for _, at, _ in items}
    if sv0 in targets or sv1 in targets:
        # The pair took numbers some fds are to be put at: closing it afterwards would close those.
        high = max(targets) + 1
        moved = [task.syscall(abi.SYS.fcntl, sv, fcntl.F_DUPFD_CLOEXEC, high, what="fcntl(F_DUPFD_CLOEXEC)")
                 for sv in (sv0, sv1)]
        task.raw(abi.SYS.close, sv0)
        task.raw(abi.SYS.close, sv1)
        sv0, sv1 = moved
    try:
        with PidFd.open(task.pid) as pfd:
            end = socket.socket(fileno=pfd.getfd(sv0))
        with end:
            for i in range(0, len(items), _MAX_SCM):
                batch = items[i:i + _MAX_SCM]
                socket.send_fds(end, [b"\0"], [ours for ours, _, _ in batch])
                got = _recv_fds(task, sv1, len(batch))
                for j, ((_, at, _), tmp) in enumerate(zip(batch, got, strict=True)):
                    if tmp != at and tmp in targets:  # another fd's place: out of the way first
                        got[j] = task.syscall(abi.SYS.fcntl, tmp, fcntl.F_DUPFD_CLOEXEC, max(targets) + 1)
                        task.raw(abi.SYS.close, tmp)
                for (_, at, cloexec), tmp in zip(batch, got, strict=True):
                    if tmp != at:
                        task.syscall(abi.SYS.dup3, tmp, at, abi.O_CLOEXEC if cloexec else 0, what=f"dup3 to fd {at}")
                        task.raw(abi.SYS.close, tmp)
                    else:
                        task.syscall(abi.SYS.fcntl, at, abi.F_SETFD, abi.FD_CLOEXEC if cloexec else 0)
    finally:
        task.raw(abi.SYS.close, sv0)
        task.raw(abi.SYS.close, sv1)


def _recv_fds(task: RemoteTask, sock: int, n: int) -> list[int]:
    import socket  # as in give_scm
    scratch = task.scratch
    ctrl_len = (_CMSGHDR.size + 4 * n + 7) & ~7
    if 256 + ctrl_len > task.scratch_size:
        raise LazarusError(f"task {task.pid}: scratch area too small to receive {n} fds")
    iov, buf, ctrl = scratch + 64, scratch + 128, scratch + 256
    task.write(iov, struct.pack("<QQ", buf, 1))
    task.write(ctrl, bytes(ctrl_len))
    task.write(scratch, _MSGHDR.pack(0, 0, iov, 1, ctrl, ctrl_len, 0))
    task.syscall(abi.SYS.recvmsg, sock, scratch, socket.MSG_CMSG_CLOEXEC, what="recvmsg")
    raw = task.read(ctrl, ctrl_len)
    length, level, kind = _CMSGHDR.unpack_from(raw)
    if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS or length != _CMSGHDR.size + 4 * n:
        raise LazarusError(f"task {task.pid}: {n} fds sent, the injected recvmsg got another message")
    return list(struct.unpack_from(f"<{n}i", raw, _CMSGHDR.size))


# -- objects made once ------------------------------------------------------------------------------------------
def take(pid: int, fd: int) -> int:
    """Our own copy of fd `fd` of task `pid` (the same open file description), e.g. of a file the first task
    holding it opened under its own credentials."""
    with PidFd.open(pid) as pfd:
        return pfd.getfd(fd)


def new_pipe(data: bytes = b"", capacity: int | None = None, *, packet: bool = False) -> tuple[int, int]:
    """A pipe (read end, write end: our fds, close-on-exec) holding `data`, made once for every task holding
    an end. Raises RestoreError if the data does not fit."""
    r, w = os.pipe2(os.O_CLOEXEC | (os.O_DIRECT if packet else 0))
    try:
        if capacity:
            fcntl.fcntl(w, abi.F_SETPIPE_SZ, capacity)
        if data:
            os.set_blocking(w, False)
            off = 0
            try:
                while off < len(data):
                    off += os.write(w, data[off:])
            except BlockingIOError:
                raise RestoreError(f"pipe of {fcntl.fcntl(w, abi.F_GETPIPE_SZ)} bytes cannot hold the {len(data)} "
                                   "bytes it had queued", stage="files") from None
            os.set_blocking(w, True)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w


def set_status(ours: int, flags: int) -> None:
    """Set the status flags of an open file description once, through our fd (every task holding it sees it)."""
    fcntl.fcntl(ours, fcntl.F_SETFL, flags & abi.SETFL_MASK)


def new_memfd(name: str, size: int, flags: int = 0) -> int:
    """A memfd (ours, close-on-exec) named and sized as the dumped one; the tasks see "/memfd:NAME"."""
    fd = os.memfd_create(name, flags | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def new_shmem(creator: RemoteTask, size: int) -> int:
    """Shared anonymous memory of `size` bytes (ours: an fd of its shmem file, as map_files gives it). Made by
    an injected mmap(MAP_SHARED|MAP_ANONYMOUS) in `creator`, so that every task maps it as "/dev/zero
    (deleted)" exactly as before; the creator's mapping is removed again."""
    t = creator
    length = max(size, abi.PAGE_SIZE)
    addr = t.syscall(abi.SYS.mmap, 0, length, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_SHARED | abi.MAP_ANONYMOUS,
                     _NEG1, 0, what="mmap of shared anonymous memory")
    try:
        path = f"/proc/{t.pid}/map_files/{addr:x}-{addr + length:x}"
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(f"open {path}", e.errno or errno.EIO, pid=t.pid, path=path) from e
    finally:
        t.syscall(abi.SYS.munmap, addr, length)


def fill(ours: int, runs: Iterable[tuple[int, bytes | memoryview]]) -> int:
    """Write each (offset, data) run into a memory object once (holes stay holes); returns bytes written."""
    total = 0
    for off, data in runs:
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = os.pwrite(ours, view[done:], off + done)
            if n <= 0:
                raise KernelError(f"write of shared memory at offset {off + done}", errno.EIO)
            done += n
        total += done
    return total


@record(frozen=True, slots=True)
class Placement:
    """Where one task maps a memory object: [start, end) at `offset` in it."""
    start: int
    end: int
    offset: int
    prot: int = abi.PROT_READ | abi.PROT_WRITE
    shared: bool = True


def map_object(courier: FdCourier, ours: int, places: Iterable[Placement]) -> None:
    """mmap our memory object (shmem, memfd) into the courier's task at each placement (MAP_FIXED)."""
    t = courier.task
    tmp = courier.borrow(ours)
    try:
        for p in places:
            flags = abi.MAP_FIXED | (abi.MAP_SHARED if p.shared else abi.MAP_PRIVATE)
            got = t.syscall(abi.SYS.mmap, p.start, p.end - p.start, p.prot, flags, tmp, p.offset,
                            what=f"mmap of a shared object at {p.start:#x}")
            if got != p.start:
                raise RestoreError(f"shared object mapped at {got:#x}, wanted {p.start:#x}", stage="memory",
                                   pid=t.pid)
    finally:
        t.raw(abi.SYS.close, tmp)


class SharedMemory:
    """Memory objects of a tree stored once (mm.objects[] records with "shared", images/shared.py): the first
    task built that holds one makes it (restore/memory.py create_objects, with the content from the record
    that stores it) and lends it here; every later holder gets that very object by pidfd_getfd (FdCourier),
    whether it was inherited across a fork or mapped after one, and maps it at its own places."""

    def __init__(self, img: Any) -> None:
        self.img = img
        self.fds: dict[str, int] = {}  # shared id -> our fd of the object
        # Shared id -> (private directory, name) of a recreated deleted file kept named until every task is built:
        # a later holder opens its fds of it ("object_file") by that name, which O_NOFOLLOW allows.
        self.names: dict[str, tuple[str, str]] = {}
        self._reopened: set[str] | None = None

    def reopened(self) -> set[str]:
        """Shared ids of deleted files some task has an "object_file" fd of (its own, or a description in
        shared.json, which names its first holder's object)."""
        if self._reopened is None:
            out: set[object] = set()
            sid_of = {pid: {o["id"]: o.get("shared") for o in self.img.task(pid)["mm"]["objects"]}
                      for pid in self.img.tasks}
            for pid in self.img.tasks:
                out.update(sid_of[pid].get(f.get("object")) for f in self.img.task(pid)["files"]
                           if f.get("type") == "object_file")
            shared = self.img.json("shared.json") if "shared.json" in self.img.files else {"files": []}
            for d in shared["files"]:
                if d.get("type") == "object_file":
                    out.add(sid_of.get(d["holders"][0][0], {}).get(d.get("object")))
            self._reopened = {sid for sid in out if isinstance(sid, str)}
        return self._reopened

    def stored(self, obj: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The record that holds the content of `obj` (itself or the "content" task's) and its page file."""
        pid = obj.get("content")
        if pid is None:
            return obj, None
        rec = next(o for o in self.img.task(pid)["mm"]["objects"] if o.get("shared") == obj["shared"])
        return rec, self.img.page_file(pid) if rec["pages"] else None

    def lend(self, sid: str, pid: int, fd: int) -> None:
        """Keep our own copy of fd `fd` of task `pid`, the object `sid` it just made."""
        self.fds[sid] = take(pid, fd)

    def made(self, sid: str) -> bool:
        return sid in self.fds

    def give(self, task: RemoteTask, sids: list[str], above: int) -> list[int]:
        """The objects `sids` (all made) as new fds of the task, at the lowest free numbers >= above; returns
        them. Through one SCM_RIGHTS message (give_scm): inside a --pidns restore the task cannot see lazarus's
        pid, so it could not pidfd_getfd from it."""
        try:
            used = {int(n) for n in os.listdir(f"/proc/{task.pid}/fd")}
        except OSError as e:
            raise KernelError(f"list /proc/{task.pid}/fd", e.errno or errno.EIO, pid=task.pid) from e
        at: list[int] = []
        n = above
        while len(at) < len(sids):
            if n not in used:
                at.append(n)
            n += 1
        give_scm(task, [(self.fds[sid], fd, False) for sid, fd in zip(sids, at, strict=True)])
        return at

    def close(self) -> None:
        for fd in self.fds.values():
            if fd >= 0:  # -1: a System V segment, attached by its id
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds.clear()
        for top, _ in self.names.values():
            private.remove(top)
        self.names.clear()


def drop_pages(task: RemoteTask, ranges: Iterable[tuple[int, int]]) -> int:
    """MADV_DONTNEED each [start, end) of the task's private memory: in a task just forked from its restored
    parent, the pages it inherited but does not share with it (the parent's own, or shared with a sibling), so
    that they read as the task had them, or fault into its lazy ranges. Returns the bytes dropped."""
    total = 0
    for start, end in ranges:
        task.syscall(abi.SYS.madvise, start, end - start, abi.MADV_DONTNEED,
                     what=f"madvise(MADV_DONTNEED) {start:#x}-{end:#x}")
        total += end - start
    return total


__all__ = ["FdCourier", "SharedMemory", "drop_pages", "Placement", "fill", "give_scm", "map_object", "new_memfd", "new_pipe", "new_shmem",
           "set_status", "take"]
