"""File descriptors: what each one is, and whether a dump can capture it faithfully.

Besides what each fd refers to, every fd keeps its exact status flags (fdinfo `flags:`), its signal owner and
signal (F_GETOWN_EX/F_GETSIG, read on a copy of the fd taken with pidfd_getfd: same open file description, so
the same answers an injected fcntl would give), and the locks held through it (fdinfo `lock:` lines).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat as statmod
import struct
from collections.abc import Callable

from lazarus.dump.anonfd import check_epolls, describe_anon
from lazarus.dump.unixsk import UnixSockets
from lazarus.errors import KernelError, LazarusError, Unsupported
from lazarus.images.format import STATELESS_DEVICES
from lazarus.kernel import abi
from lazarus.kernel.handles import name_to_handle
from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open
from lazarus.kernel.procfs import FdInfo, fd_locks, parse_lock, read_fdinfo, read_mount_points, read_stat
from lazarus.kernel.syscall import same_fd_table, same_file_description, tee
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

# (major, minor) of character devices whose open file carries no state worth saving.
_PIPE = re.compile(r"pipe:\[(\d+)\]")
_PROC_PID = re.compile(r"/proc/(\d+)(?:/|$)")
_DELETED = " (deleted)"
_LOCK_KINDS = {"FLOCK": "flock", "POSIX": "posix", "OFDLCK": "ofd"}
# A directory with more entries than this is not searched for another link of an unlinked open file.
_LINK_SCAN_LIMIT = 100_000
_SPLICE_F_NONBLOCK = 2  # include/linux/splice.h


def _others_holding(ino: int, pid: int, want: str | None = None) -> list[int]:
    """Other processes that hold pipe `ino` (or the FIFO whose link is `want`) open (a pipe shared with them
    cannot be captured)."""
    want = want or f"pipe:[{ino}]"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == want:
                        out.append(int(entry))
                        break
    return out


def _one_table(pid: int, other: int) -> bool:
    try:
        return same_fd_table(pid, other)
    except LazarusError:
        return False  # gone, or not ours to compare: another holder as far as we can tell


def _refuse_outside(pid: int, fd: int, link: str, ino: int, tree: set[int], *, fifo: bool = False) -> None:
    """A pipe shared inside the tree must not also have an end in a process outside it."""
    others = [p for p in _others_holding(ino, pid, link if fifo else None) if p not in tree]
    if others:
        raise Unsupported(f"fd {fd} ({link}): the pipe is shared with pid {others[0]}, outside the dumped tree")


def peek_pipe(path: str) -> tuple[bytes, int]:
    """The bytes buffered in the pipe/FIFO behind `path`, read without consuming them (tee), and the pipe's
    capacity. Opens a reader of its own: prefer peek_pipe_fd on a readable fd the process already has."""
    src = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return peek_pipe_fd(src)
    finally:
        os.close(src)


def peek_pipe_fd(src: int) -> tuple[bytes, int]:
    """Like peek_pipe, from a readable pipe fd (a copy of the process's own: tee moves no data and, unlike a
    new reader's open and close, wakes nobody and sends no SIGIO)."""
    r, w = os.pipe()
    try:
        size = fcntl.fcntl(src, abi.F_GETPIPE_SZ)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, abi.F_SETPIPE_SZ, size)
        n = tee(src, w, size, _SPLICE_F_NONBLOCK)
        os.close(w)
        w = -1
        data = bytearray()
        while len(data) < n:
            chunk = os.read(r, n - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data), size
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _peek_group(pidfd: int, pid: int, recs: list[dict[str, Any]]) -> tuple[bytes, int]:
    """Buffered bytes and capacity of the pipe/FIFO that `recs` (fds of the process) refer to, through a copy
    of one of its readable fds, or a reader of our own if it holds none."""
    reader = next((r for r in recs if r["flags"] & abi.O_ACCMODE != abi.O_WRONLY), None)
    if reader is None:
        return peek_pipe(f"/proc/{pid}/fd/{recs[0]['fd']}")
    dup = pidfd_getfd(pidfd, reader["fd"], pid=pid)
    try:
        return peek_pipe_fd(dup)
    finally:
        os.close(dup)


def _mark_dups(pid: int, fds: list[dict[str, Any]]) -> None:
    """Record fds that share an open file description (dup'ed), so a restore dups them again."""
    seen: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for rec in fds:
        key = (rec["type"], rec.get("pipe") or rec.get("ino") or rec.get("path") or rec.get("object"))
        for first in seen.get(key, []):
            if same_file_description(pid, first["fd"], rec["fd"]):
                rec["dup_of"] = first["fd"]
                # What belongs to the open file description is restored once, through the first fd.
                for k in ("locks", "owner", "sig"):
                    rec.pop(k, None)
                break
        else:
            seen.setdefault(key, []).append(rec)


def sparse_content(path: str, size: int) -> tuple[list[list[int]], bytes]:
    """The data extents of a file ([offset, length] runs, found with SEEK_DATA/SEEK_HOLE) and their bytes,
    so that holes stay holes. Read through a new open of `path` (a /proc/PID/fd/N link): the process's own
    file position is never moved."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents: list[list[int]] = []
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, abi.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to the end
                    break
                if e.errno != errno.EINVAL:
                    raise
                start = off  # the filesystem cannot tell holes: all of it is data
                end = size
            else:
                end = min(os.lseek(fd, start, abi.SEEK_HOLE), size)
            if start >= size:
                break
            extents.append([start, end - start])
            off = end
        parts = []
        for start, length in extents:
            buf = os.pread(fd, length, start)
            if len(buf) != length:
                raise KernelError(f"short read of {path}", errno.EIO, path=path)
            parts.append(buf)
        return extents, b"".join(parts)
    finally:
        os.close(fd)


def _other_link(pid: int, fd: int, path: str, st: os.stat_result) -> dict[str, Any]:
    """How to reach an unlinked open file that still has a link elsewhere: another name of it in the same
    directory, else a file handle (open_by_handle_at at restore). Unsupported when neither exists."""
    where = f"fd {fd} ({path}{_DELETED})"
    d = os.path.dirname(path) or "/"
    with contextlib.suppress(OSError), os.scandir(d) as it:
        for i, entry in enumerate(it):
            if i >= _LINK_SCAN_LIMIT:
                break
            with contextlib.suppress(OSError):
                est = entry.stat(follow_symlinks=False)
                if (est.st_dev, est.st_ino) == (st.st_dev, st.st_ino):
                    return {"path": os.path.join(d, entry.name)}
    try:
        htype, handle, mnt_id = name_to_handle(f"/proc/{pid}/fd/{fd}")
        mount = read_mount_points(os.getpid()).get(mnt_id)
    except KernelError as e:
        raise Unsupported(f"{where}: unlinked, but with {st.st_nlink} other link(s) that cannot be found "
                          f"({e.strerror})") from e
    if mount is None:
        raise Unsupported(f"{where}: unlinked, and its mount {mnt_id} is not visible to lazarus")
    return {"path": path, "handle": {"type": htype, "bytes": handle.hex(), "mount": mount}}


class _Injector:
    """A RemoteTask made on first use (only socket fds need one) and closed at the end."""

    def __init__(self, make: Callable[[], RemoteTask] | None) -> None:
        self._make = make
        self.task: RemoteTask | None = None

    def get(self) -> RemoteTask | None:
        if self.task is None and self._make is not None:
            self.task = self._make()
            self.task.alloc_scratch()
        return self.task

    def close(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None


def _read_owner(pidfd: int, pid: int, fd: int, link: str, inject: _Injector) -> tuple[int, int, int] | None:
    """(F_GETOWN_EX type, pid, F_GETSIG) of an fd, or None for an fd that can have no owner (O_PATH).

    Through a copy taken with pidfd_getfd, except for sockets: installing a socket in another process updates
    its cgroup class and priority ids (the kernel's __receive_sock), so a socket's are read by fcntl calls
    injected into the process itself."""
    if link.startswith("socket:"):
        t = inject.get()
        if t is not None:
            ret = t.raw(abi.SYS.fcntl, fd, abi.F_GETOWN_EX, t.scratch)
            if ret < 0:
                return None
            typ, owner = struct.unpack("ii", t.read(t.scratch, 8))
            return typ, owner, t.syscall(abi.SYS.fcntl, fd, abi.F_GETSIG)
    dup = pidfd_getfd(pidfd, fd, pid=pid)
    try:
        typ, owner = struct.unpack("ii", fcntl.fcntl(dup, abi.F_GETOWN_EX, bytes(8)))
        return typ, owner, fcntl.fcntl(dup, abi.F_GETSIG)
    except OSError:  # O_PATH fds answer only F_GETFL/F_GETFD: they can have no owner
        return None
    finally:
        os.close(dup)


def _owner(pidfd: int, pid: int, fd: int, pgid: int, link: str, inject: _Injector) -> dict[str, Any]:
    """The fd's signal owner and signal (F_GETOWN_EX, F_GETSIG) as record fields; refuses an owner that the
    restore cannot give back: another process, or a process group other than the task's own one."""
    where = f"fd {fd} ({link})"
    try:
        got = _read_owner(pidfd, pid, fd, link, inject)
    except KernelError as e:
        raise Unsupported(f"{where}: cannot read its signal owner: {e.strerror}") from e
    if got is None:
        return {}
    typ, owner, sig = got
    out: dict[str, Any] = {}
    if sig:
        out["sig"] = sig
    if owner == 0:
        return out
    if typ == abi.F_OWNER_PGRP:
        if owner != pgid or pgid != pid:
            raise Unsupported(f"{where}: its signals go to process group {owner}, which the restore does not "
                              "recreate (only the process's own group, when it leads it)")
    elif owner != pid:
        raise Unsupported(f"{where}: its signals go to pid {owner}, another process")
    out["owner"] = [typ, owner]
    return out


def _locks(info: FdInfo, pid: int, where: str) -> list[list[Any]]:
    """The locks held through this open file, as [kind, "read"|"write", start, end or None]."""
    out: list[list[Any]] = []
    for line in fd_locks(info):
        words = line.split()
        if len(words) < 2 or words[1] not in _LOCK_KINDS:
            # Leases, delegations and whatever comes next: no way to take them back at restore.
            what = words[1].lower() if len(words) > 1 else "lock"
            raise Unsupported(f"{where}: holds a {what} ({' '.join(words)}), which is not supported")
        try:
            lk = parse_lock(line)
        except ValueError:
            raise Unsupported(f"{where}: holds a lock lazarus cannot read ({' '.join(words)})") from None
        kind = _LOCK_KINDS[lk.kind]
        if lk.access not in ("READ", "WRITE"):
            raise Unsupported(f"{where}: holds a {lk.access} {kind} lock, which is not supported")
        if kind == "posix" and lk.pid != pid:
            raise Unsupported(f"{where}: holds a POSIX lock of pid {lk.pid}")
        out.append([kind, lk.access.lower(), lk.start, lk.end])
    return out


def _on_procfs(st: os.stat_result) -> bool:
    try:
        return os.stat("/proc").st_dev == st.st_dev
    except OSError:
        return False


def _proc_owner(link: str, st: os.stat_result) -> int | None:
    """The pid whose /proc directory `link` is in, or None if it is not a per-process /proc file."""
    m = _PROC_PID.match(link)
    if m is None or not _on_procfs(st):
        return None
    return int(m.group(1))


def _mapped_deleted(objects: list[dict[str, Any]], st: os.stat_result, path: str) -> dict[str, Any] | None:
    """The memory object of a deleted regular file the task also maps (dump/memory.py), or None."""
    if not statmod.S_ISREG(st.st_mode):
        return None
    return next((o for o in objects if o["kind"] == "deleted" and o["inode"] == st.st_ino and o["path"] == path),
                None)


def dump_files(pid: int, write_blob: Any, objects: list[dict[str, Any]],
               inject: Callable[[], RemoteTask] | None = None, *,
               shared: tuple[set[tuple[int, int]], set[int]] | None = None) -> list[dict[str, Any]]:
    """Describe every fd of `pid`; raises Unsupported (naming the fd) for anything not capturable.
    `inject` makes a RemoteTask on the (frozen) process, for what must be asked from inside it. `shared`:
    the (dev, ino) of pipes and FIFOs with ends in other processes of the dumped tree, and the tree's pids:
    their data is saved once for the tree (dump/sharefds.py), not here."""
    shared_keys, tree = shared if shared is not None else (set(), set())
    fds: list[dict[str, Any]] = []
    pipes: dict[int, list[dict[str, Any]]] = {}
    objects_by_inode = {o["inode"]: o for o in objects}
    # (st_dev, st_ino) -> the first fd of an inode recreated at restore (unlinked file, FIFO): the others
    # are opened on that same new inode.
    first_of: dict[tuple[int, int], dict[str, Any]] = {}
    fifos: dict[tuple[int, int], list[dict[str, Any]]] = {}
    fd_dir = f"/proc/{pid}/fd"
    pgid = read_stat(pid).pgrp
    sockets = UnixSockets(pid)
    pidfd = pidfd_open(pid)
    injector = _Injector(inject)
    try:
        for name in sorted(os.listdir(fd_dir), key=int):
            fd = int(name)
            link = os.readlink(f"{fd_dir}/{name}")
            info = read_fdinfo(pid, fd)
            flags = info.flags
            rec: dict[str, Any] = {"fd": fd, "flags": flags & ~abi.O_CLOEXEC,
                                   "cloexec": bool(flags & abi.O_CLOEXEC), "pos": info.pos}
            where = f"fd {fd} ({link})"
            rec.update(_owner(pidfd, pid, fd, pgid, link, injector))
            locks = _locks(info, pid, where)
            if locks:
                rec["locks"] = locks
            if link.startswith("socket:"):
                fds.append(sockets.add(fd, link, info, rec))  # unix socket pairs (dump/unixsk.py); others refused
                continue
            if link.startswith("anon_inode:"):
                fds.append(describe_anon(pid, fd, link, info, rec))  # eventfd, epoll, ... (dump/anonfd.py)
                continue
            m = _PIPE.fullmatch(link)
            if m:
                ino = int(m.group(1))
                rec.update(type="pipe", pipe=ino)
                if (os.stat(f"{fd_dir}/{name}").st_dev, ino) in shared_keys:
                    _refuse_outside(pid, fd, link, ino, tree)
                else:
                    pipes.setdefault(ino, []).append(rec)
                fds.append(rec)
                continue
            st = os.stat(f"{fd_dir}/{name}")
            deleted = link.endswith(_DELETED)
            path = link[: -len(_DELETED)] if deleted else link
            key = (st.st_dev, st.st_ino)
            if link.startswith("/memfd:"):
                obj = objects_by_inode.get(st.st_ino)
                if obj is None:
                    raise Unsupported(f"{where}: a memfd that is not mapped is not supported")
                rec.update(type="memfd", object=obj["id"])
            elif statmod.S_ISCHR(st.st_mode):
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if dev in (STATELESS_DEVICES):
                    rec.update(type="dev", path=STATELESS_DEVICES[dev])
                elif os.major(st.st_rdev) in (4, 5, 136) or link.startswith("/dev/pts") or link.startswith("/dev/tty"):
                    raise Unsupported(f"{where}: terminals are not supported")
                else:
                    raise Unsupported(f"{where}: character device {dev[0]}:{dev[1]} is not supported")
            elif statmod.S_ISFIFO(st.st_mode):
                rec.update(type="fifo", path=path, ino=st.st_ino, dev=st.st_dev)
                first = first_of.get(key)
                if first is not None:
                    rec["same_inode"] = first["fd"]
                else:
                    first_of[key] = rec
                    if deleted and st.st_nlink == 0:
                        rec.update(deleted=True, mode=statmod.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
                    elif deleted:
                        rec.update(_other_link(pid, fd, path, st))
                if key in shared_keys:
                    _refuse_outside(pid, fd, link, st.st_ino, tree, fifo=True)
                else:
                    fifos.setdefault(key, []).append(rec)
            elif statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode):
                proc_pid = _proc_owner(link, st)
                if proc_pid is not None and proc_pid != pid:
                    raise Unsupported(f"{where}: a /proc file of another process (pid {proc_pid})")
                if proc_pid == pid:
                    # Reopened once the restored task exists, as that task's own file.
                    rec.update(type="file", path=link, proc_self=True)
                elif deleted and st.st_nlink == 0 and _mapped_deleted(objects, st, path) is not None:
                    # Also mapped: the memory object recreated for the mappings is this very inode, and the fd is
                    # opened again on it (restore/memory.py _reopen), so writes through either reach both.
                    obj = _mapped_deleted(objects, st, path)
                    assert obj is not None
                    rec.update(type="object_file", object=obj["id"], path=path)
                elif deleted and st.st_nlink == 0:
                    rec.update(type="ghost", path=path, ino=st.st_ino, dev=st.st_dev,
                               mode=statmod.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
                    first = first_of.get(key)
                    if first is not None:
                        rec["same_inode"] = first["fd"]
                    elif statmod.S_ISDIR(st.st_mode):
                        first_of[key] = rec
                        rec["dir"] = True
                    else:
                        first_of[key] = rec
                        extents, data = sparse_content(f"{fd_dir}/{name}", st.st_size)
                        rec.update(size=st.st_size, extents=extents,
                                   data=write_blob(f"ghost-{fd}", data) if data else None)
                elif deleted:
                    rec.update(type="file", ino=st.st_ino, dev=st.st_dev, **_other_link(pid, fd, path, st))
                elif _on_procfs(st):
                    # /proc inodes are made on lookup (/proc/sys...): their numbers say nothing of identity.
                    rec.update(type="file", path=link)
                else:
                    rec.update(type="file", path=link, ino=st.st_ino, dev=st.st_dev)
            else:
                raise Unsupported(f"{where}: this kind of file is not supported")
            fds.append(rec)
        for recs in fifos.values():
            data, size = _peek_group(pidfd, pid, recs)
            recs[0]["data"] = write_blob(f"fifo-{recs[0]['fd']}", data) if data else None
            recs[0]["pipe_size"] = size
    finally:
        os.close(pidfd)
        injector.close()

    _mark_dups(pid, fds)
    sockets.finish(write_blob)
    check_epolls(pid, fds)
    for ino, ends in pipes.items():
        modes = {e["flags"] & abi.O_ACCMODE for e in ends}
        if abi.O_RDONLY not in modes or abi.O_WRONLY not in modes:
            raise Unsupported(f"fd {ends[0]['fd']} (pipe:[{ino}]): a pipe to another process is not supported")
        # A process sharing this fd table (CLONE_FILES) holds these very fds: not another holder.
        others = [p for p in _others_holding(ino, pid) if not _one_table(pid, p)]
        if others:
            raise Unsupported(f"fd {ends[0]['fd']} (pipe:[{ino}]): the pipe is shared with pid {others[0]}")
        reader = next(e for e in ends if e["flags"] & abi.O_ACCMODE == abi.O_RDONLY)
        data, size = peek_pipe(f"{fd_dir}/{reader['fd']}")  # a reader is open: our open/close wakes nobody
        if data and any(e["flags"] & abi.O_DIRECT for e in ends):
            # tee() gives the bytes but not where one packet ends and the next begins.
            raise Unsupported(f"fd {reader['fd']} (pipe:[{ino}]): a packet-mode (O_DIRECT) pipe with data "
                              "buffered is not supported")
        blob = write_blob(f"pipe-{ino}", data) if data else None
        for e in ends:
            e["pipe_size"] = size
            e["data"] = blob
    return fds


def dump_cwd(pid: int) -> dict[str, Any] | None:
    """A deleted working directory (recreated empty at restore, then removed again), or None."""
    link = os.readlink(f"/proc/{pid}/cwd")
    if not link.endswith(_DELETED):
        return None
    st = os.stat(f"/proc/{pid}/cwd")
    if st.st_nlink != 0 and os.path.isdir(link):
        return None  # a directory whose name really ends in " (deleted)"
    return {"path": link[: -len(_DELETED)], "mode": statmod.S_IMODE(st.st_mode), "uid": st.st_uid,
            "gid": st.st_gid}
