"""Re-open a task's file descriptors inside it, at their numbers, with flags, positions and contents.

Every fd the task had is opened by the task itself (injected calls), with the access the original had and no
more. Files the restore has to recreate (unlinked files, deleted FIFOs and directories) are made by lazarus
mode 0600 with O_EXCL in a place it chooses, given their real mode once complete, opened by the task, and
removed again. Then, for every fd: the exact status flags (F_SETFL), signal owner and signal; at the very
end the locks, and a read-back of every fd's flags from fdinfo (a difference refuses the restore).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable

from lazarus.errors import ImageError, KernelError, RestoreError
from lazarus.kernel import abi
from lazarus.kernel.procfs import read_fdinfo
from lazarus.remote import Batch, Ref, RemoteTask
from lazarus.restore import private
from lazarus.restore.access import Access, kind_problem

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1
_O_NOCTTY = 0o400
# Never create or truncate on reopen. O_ASYNC only takes effect through F_SETFL (open(2) sets the bit
# without arming the signal, and a later F_SETFL then sees no change): it is set afterwards.
_OPEN_MASK = ~(abi.O_CLOEXEC | abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | _O_NOCTTY | abi.O_ASYNC)
_LOCK_TYPES = {"read": abi.F_RDLCK, "write": abi.F_WRLCK}
# restore/anonfd.KINDS, and the kinds its check_anon checks (its SCHEMAS): tests/unit/test_anonfd_parse.py keeps
# them equal. anonfd.py, unixsk.py, kernel/handles.py and termios are imported where a task has such a file, not
# by every restore (~1.5 ms of the command's start-up).
_ANON_KINDS = frozenset(("eventfd", "signalfd", "timerfd", "epoll", "inotify"))
_CHECKED_KINDS = _ANON_KINDS | {"unix"}


def _by_handle(rec: dict[str, Any]) -> int:
    """An O_PATH fd (in lazarus) of the inode an fd record names by file handle; RestoreError if it is gone."""
    h = rec["handle"]
    where = f"fd {rec['fd']} ({rec['path']} (deleted))"
    try:
        mfd = os.open(h["mount"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"{where}: its mount {h['mount']} is gone: {e.strerror}", stage="validate",
                           path=rec["path"]) from e
    try:
        if os.fstat(mfd).st_dev != rec["dev"]:
            raise RestoreError(f"{where}: {h['mount']} is another filesystem now", stage="validate",
                               path=rec["path"])
        from lazarus.kernel.handles import open_by_handle
        try:
            fd = open_by_handle(mfd, h["type"], bytes.fromhex(h["bytes"]), abi.O_PATH | abi.O_CLOEXEC)
        except KernelError as e:
            raise RestoreError(f"{where}: the file no longer exists ({e.strerror})", stage="validate",
                               path=rec["path"]) from e
    finally:
        os.close(mfd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]):
        os.close(fd)
        raise RestoreError(f"{where}: its handle leads to another file", stage="validate", path=rec["path"])
    return fd


def check_files(fds: list[dict[str, Any]]) -> None:
    """Refuse before anything is created if a file the task had open is gone, is another file now, or is not
    the kind of file its record says (lstat: a symlink is never followed to something else). The task's own
    opens check the inode again (restore/access.py). /proc files of the task itself are reopened once the task
    exists, so they are not looked for here."""
    for f in fds:
        if f["type"] in _CHECKED_KINDS:
            from lazarus.restore import anonfd
            anonfd.check_anon(f)
        if "dup_of" in f or "same_inode" in f or f.get("proc_self"):
            continue
        if f.get("handle"):
            h = _by_handle(f)
            try:
                bad = kind_problem(f, os.fstat(h))
            finally:
                os.close(h)
            if bad:
                raise RestoreError(f"fd {f['fd']}: {f['path']} (found by handle) {bad}", stage="validate",
                                   path=f["path"])
            continue
        if f["type"] in ("file", "dev") or (f["type"] == "fifo" and not f.get("deleted")):
            path = f["path"]
            try:
                st = os.lstat(path)
            except OSError:
                raise RestoreError(f"fd {f['fd']}: {path} no longer exists", stage="validate", path=path) from None
            bad = kind_problem(f, st)
            if bad:
                raise RestoreError(f"fd {f['fd']}: {path} {bad}", stage="validate", path=path)


def _create_exclusive(path: str, dev: int | None) -> tuple[str, str, int]:
    """A new, empty file (root's, 0600, O_EXCL) standing for an unlinked one, named like it inside a private
    directory of ours (restore/private.py), never at the path the image names. Returns the directory, the
    file's path and an O_WRONLY fd."""
    top = private.make(path, dev)
    where = private.name_in(top, path, "file")
    try:
        return top, where, os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   0o600)
    except OSError as e:
        private.remove(top)
        raise RestoreError(f"cannot recreate the unlinked file {path}: {e.strerror}", stage="files",
                           path=path) from e


def make_dir_like(path: str, dev: int | None = None) -> tuple[str, list[str]]:
    """Create an empty directory (mode 0700, ours) standing for a deleted one, named like it inside a private
    directory of ours. Returns it and what to rmdir, in order, once the task holds it; its owner and mode are
    given afterwards (give_back)."""
    top = private.make(path, dev)
    where = private.name_in(top, path, "dir")
    os.mkdir(where, 0o700)
    return where, [where, top]


def remove_dirs(dirs: list[str]) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError as e:
            raise RestoreError(f"cannot remove {d}, made for the restore: {e.strerror}", stage="files",
                               path=d) from e


def give_back(proc_path: str, rec: dict[str, Any]) -> None:
    """Owner and mode of a recreated file, set once the task holds it and no name leads to it any more
    (through the task's /proc link), so that nobody else can open it meanwhile."""
    if "uid" in rec:
        os.chown(proc_path, rec["uid"], rec["gid"])
    os.chmod(proc_path, rec.get("mode", 0o600))


class FdRestorer:
    def __init__(self, task: RemoteTask, image: Any, pid: int, object_fds: dict[int, int],
                 high_base: int, access: Access) -> None:
        self.high_base = high_base
        self.access = access  # opens existing files as the restored credentials could
        self.task = task
        self.image = image
        self.pid = pid
        self.object_fds = object_fds
        self.ghosts: list[str] = []  # files we created, removed again (and on failure)
        # directories we created (private ones, restore/private.py), removed once the task holds what it needs
        self.dirs: list[str] = []
        self.held: list[int] = []  # our fds (file handles) the task opens through /proc
        self.reopened: dict[int, int] = {}  # fd number -> task fd opened on a deleted file's object (MemoryState)

    def _place(self, tmp: int, rec: dict[str, Any], *, seek: bool = False) -> None:
        """Move `tmp` to the record's fd number with its close-on-exec flag; seek: first set its offset."""
        b = self.task.batch()
        fd = rec["fd"]
        pos = b.call(abi.SYS.lseek, tmp, rec["pos"], abi.SEEK_SET) if seek and rec["pos"] else None
        if tmp != fd:
            b.call(abi.SYS.dup2, tmp, fd)
            b.call(abi.SYS.close, tmp)
        if rec["cloexec"]:
            b.call(abi.SYS.fcntl, fd, abi.F_SETFD, abi.FD_CLOEXEC)
        got = b.run()
        if pos is not None and got[pos.index] != rec["pos"]:
            raise RestoreError(f"fd {rec['fd']}: offset {got[pos.index]} after restore, the process had "
                               f"{rec['pos']}", stage="files", pid=self.pid)

    def _open(self, path: str, flags: int) -> int:
        return self.task.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, self.task.cstring(path),
                                 flags & _OPEN_MASK, 0, what=f"open {path}")

    def _open_at(self, rec: dict[str, Any], path: str) -> None:
        """Open a file we recreated (ours, in a private directory): as root, with the record's access."""
        self._place(self._open(path, rec["flags"]), rec, seek=True)

    def _open_existing(self, rec: dict[str, Any], check: dict[str, Any] | None = None) -> None:
        """Open a file that exists outside the restore: as the restored credentials could, after checking it is
        the kind of file (and the inode) that `check` (default: the record itself) says."""
        want = check or rec
        tmp = self.access.open(self._path_of(rec), rec["flags"] & _OPEN_MASK, lambda st: kind_problem(want, st),
                               f"fd {rec['fd']}", ours=bool(rec.get("handle")))
        self._place(tmp, rec, seek=True)

    def _open_existing_many(self, recs: list[dict[str, Any]]) -> None:
        """_open_existing of each record (none found by handle), with fewer stops of the task: every file is
        opened first, then all are moved to their numbers (a temporary fd that is another record's number is
        moved out of the way first), seeked and flagged in one batch."""
        if not recs:
            return
        wanted = [(str(rec["path"]), rec["flags"] & _OPEN_MASK, _kind_check(rec), f"fd {rec['fd']}") for rec in recs]
        cur: list[int | Ref] = list(self.access.open_many(wanted))
        b = self.task.batch()
        seeks: list[tuple[dict[str, Any], Ref]] = []
        for i, rec in enumerate(recs):
            fd = rec["fd"]
            for j in range(i + 1, len(recs)):
                if cur[j] == fd:
                    cur[j] = b.call(abi.SYS.fcntl, cur[j], abi.F_DUPFD, self.high_base)
            if rec["pos"]:
                seeks.append((rec, b.call(abi.SYS.lseek, cur[i], rec["pos"], abi.SEEK_SET)))
            if cur[i] != fd:
                b.call(abi.SYS.dup2, cur[i], fd)
                b.call(abi.SYS.close, cur[i])
            if rec["cloexec"]:
                b.call(abi.SYS.fcntl, fd, abi.F_SETFD, abi.FD_CLOEXEC)
        got = b.run()
        for rec, ref in seeks:
            if got[ref.index] != rec["pos"]:
                raise RestoreError(f"fd {rec['fd']}: offset {got[ref.index]} after restore, the process had "
                                   f"{rec['pos']}", stage="files", pid=self.pid)

    def _path_of(self, rec: dict[str, Any]) -> str:
        """Where the task opens an existing file: its path, or our handle-opened fd of it through /proc."""
        if rec.get("handle"):
            h = _by_handle(rec)
            self.held.append(h)
            return f"/proc/{os.getpid()}/fd/{h}"
        return str(rec["path"])

    def restore(self, fds: list[dict[str, Any]]) -> None:
        t = self.task
        pipes: dict[int, list[dict[str, Any]]] = {}
        sockets: list[dict[str, Any]] = []
        dups = [rec for rec in fds if "dup_of" in rec]
        same: dict[int, list[dict[str, Any]]] = {}
        for rec in fds:
            if "same_inode" in rec and "dup_of" not in rec:
                same.setdefault(rec["same_inode"], []).append(rec)
        # Existing files and devices first, all together: opened in two batches (restore/access.py), then
        # placed in one.
        plain = [rec for rec in fds if rec["type"] in ("file", "dev") and not rec.get("handle")
                 and "dup_of" not in rec and "same_inode" not in rec]
        self._open_existing_many(plain)
        for rec in fds:
            kind = rec["type"]
            if "dup_of" in rec or "same_inode" in rec or any(rec is p for p in plain):
                continue
            if kind in ("file", "dev"):
                self._open_existing(rec)
            elif kind == "ghost":
                self._ghost([rec, *same.get(rec["fd"], [])])
            elif kind == "fifo":
                self._fifo([rec, *same.get(rec["fd"], [])])
            elif kind == "memfd":
                tmp = t.syscall(abi.SYS.dup, self.object_fds[rec["object"]])
                if rec["pos"]:
                    t.syscall(abi.SYS.lseek, tmp, rec["pos"], 0)
                self._place(tmp, rec)
            elif kind == "object_file":
                # Opened on the deleted file's object by the memory phase (restore/memory.py _reopen).
                tmp = self.reopened.pop(rec["fd"], None)
                if tmp is None:
                    raise RestoreError(f"fd {rec['fd']} ({rec.get('path')} (deleted)): its mapped object was not "
                                       f"opened for it", stage="files", pid=self.pid)
                self._place(tmp, rec, seek=True)
            elif kind == "pipe":
                pipes.setdefault(rec["pipe"], []).append(rec)
            elif kind in _ANON_KINDS:  # restore/anonfd.py; epoll registrations come last, below
                from lazarus.restore import anonfd
                self._place(anonfd.create(t, rec, self.pid), rec)
            elif kind == "unix":
                sockets.append(rec)
            else:
                raise RestoreError(f"fd {rec['fd']}: unknown type {kind!r}", stage="files")
        for ends in pipes.values():
            self._pipe(ends)
        if sockets:
            from lazarus.restore import unixsk
            for pair in unixsk.pairs(sockets):
                unixsk.restore_pair(t, self.image, self.pid, pair, self.high_base)
        b = t.batch()
        for rec in dups:
            if not b.fits(2):
                b.run()
            b.call(abi.SYS.dup2, rec["dup_of"], rec["fd"])
            if rec["cloexec"]:
                b.call(abi.SYS.fcntl, rec["fd"], abi.F_SETFD, abi.FD_CLOEXEC)
        epolls = [r for r in fds if r["type"] == "epoll" and "dup_of" not in r]
        if epolls:
            b.run()
            # After every fd and dup exists: the registrations name them.
            from lazarus.restore import anonfd
            anonfd.register_epolls(t, epolls)
        # Without epolls the dups and the status calls below are one injection (run in the order queued).
        for rec in fds:
            if "dup_of" not in rec:
                if not b.fits(3, 64):
                    b.run()
                self._status(b, rec)
        b.run()
        self._release()

    # -- per open file description: status flags, owner, signal ------------------------------------------------
    def _status(self, b: Batch, rec: dict[str, Any]) -> None:
        fd = rec["fd"]
        if not rec["flags"] & abi.O_PATH:
            # Exactly the saved settable flags: this also clears what a shared end or open(2) added.
            b.call(abi.SYS.fcntl, fd, abi.F_SETFL, rec["flags"] & abi.SETFL_MASK, what=f"fcntl(fd {fd}, F_SETFL)")
        owner = rec.get("owner")
        if owner:
            addr = b.put_struct(abi.f_owner_ex(owner[0], owner[1]))
            b.call(abi.SYS.fcntl, fd, abi.F_SETOWN_EX, addr, what=f"fcntl(fd {fd}, F_SETOWN_EX)")
        if rec.get("sig"):
            b.call(abi.SYS.fcntl, fd, abi.F_SETSIG, rec["sig"], what=f"fcntl(fd {fd}, F_SETSIG)")

    def finish(self, fds: list[dict[str, Any]]) -> None:
        """Locks, then the check that every fd came back with its flags. Call once no fd of the task will be
        closed any more: closing any fd of a file drops the process's POSIX locks on it."""
        for rec in fds:
            for kind, access, start, end in rec.get("locks", ()):
                self._lock(rec["fd"], kind, access, start, end)
        self.verify(fds)

    def _lock(self, fd: int, kind: str, access: str, start: int, end: int | None) -> None:
        t = self.task
        what = f"fd {fd}: {kind} {access} lock"
        if kind == "flock":
            op = (abi.LOCK_SH if access == "read" else abi.LOCK_EX) | abi.LOCK_NB
            ret = t.raw(abi.SYS.flock, fd, op)
        else:
            fl = abi.flock(_LOCK_TYPES[access], abi.SEEK_SET, start, 0 if end is None else end - start + 1, 0)
            cmd = abi.F_OFD_SETLK if kind == "ofd" else abi.F_SETLK
            ret = t.raw(abi.SYS.fcntl, fd, cmd, t.put_struct(fl, 0))
            what += f" on bytes {start}-{'EOF' if end is None else end}"
        if ret in (-errno.EAGAIN, -errno.EACCES):
            raise RestoreError(f"{what}: held by another process now", stage="files", pid=self.pid)
        if ret < 0:
            raise RestoreError(f"{what}: {os.strerror(-ret)}", stage="files", pid=self.pid)

    def verify(self, fds: list[dict[str, Any]]) -> None:
        """Read every fd's flags and offset back from fdinfo: status flags the kernel would not set as saved
        (O_SYNC on a pipe end, ...) refuse the restore rather than come back different."""
        for rec in fds:
            fd = rec["fd"]
            want = rec["flags"] | (abi.O_CLOEXEC if rec["cloexec"] else 0)
            info = read_fdinfo(self.pid, fd)
            if info.flags != want:
                raise RestoreError(f"fd {fd}: flags {info.flags:#o} after restore, the process had {want:#o}",
                                   stage="files", pid=self.pid)
            if info.pos != rec["pos"]:  # e.g. two open file descriptions restored as one
                raise RestoreError(f"fd {fd}: offset {info.pos} after restore, the process had {rec['pos']}",
                                   stage="files", pid=self.pid)

    # -- recreated files -------------------------------------------------------------------------------------------
    def _ghost(self, recs: list[dict[str, Any]]) -> None:
        """An unlinked-but-open file (or directory): recreate it with its content and holes, have the task open it
        (every fd that had this inode open), remove it again."""
        first = recs[0]
        if first.get("dir"):
            where, made = make_dir_like(first["path"], first.get("dev"))
            self.dirs.extend(made)
            for rec in recs:
                self._open_at(rec, where)
            remove_dirs(made)
            self.dirs.clear()
            give_back(f"/proc/{self.pid}/fd/{first['fd']}", first)
            return
        top, path, fd = _create_exclusive(first["path"], first.get("dev"))
        self.dirs.append(top)
        self.ghosts.append(path)
        try:
            self._fill(fd, first)
        finally:
            os.close(fd)
        for rec in recs:
            self._open_at(rec, path)
        os.unlink(path)
        self.ghosts.remove(path)
        remove_dirs([top])
        self.dirs.remove(top)
        # Only now, with no name left that leads to it: its owner and its mode (setuid bits included).
        give_back(f"/proc/{self.pid}/fd/{first['fd']}", first)

    def _fill(self, fd: int, rec: dict[str, Any]) -> None:
        data = self.image.blob(rec["data"]) if rec.get("data") else b""
        extents = rec.get("extents")
        if extents is None:  # images written before sparse files were kept
            extents = [[0, len(data)]] if data else []
        if sum(length for _, length in extents) != len(data):
            raise RestoreError(f"fd {rec['fd']}: the saved content does not match its extents", stage="files")
        os.ftruncate(fd, rec.get("size", len(data)))
        off = 0
        for start, length in extents:
            view = memoryview(data)[off:off + length]
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:], start + done)
            off += length

    def _fifo(self, recs: list[dict[str, Any]]) -> None:
        """FIFOs on one inode: opened by the task (a deleted one recreated in a private directory first), with
        the buffered bytes written once."""
        first = recs[0]
        if first.get("deleted"):
            top = private.make(first["path"], first.get("dev"))
            self.dirs.append(top)
            path = private.name_in(top, first["path"], "fifo")
            os.mkfifo(path, 0o600)
            self.ghosts.append(path)
            opath = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        else:
            # The image names the path: it must be a FIFO (and the one the process had), never followed through a
            # symlink, before it is opened for writing.
            opath = _by_handle(first) if first.get("handle") else os.open(
                first["path"], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(opath)
            bad = kind_problem(first, st) if not first.get("deleted") else (
                None if stat.S_ISFIFO(st.st_mode) else "is not a FIFO")
            if bad:
                raise RestoreError(f"fd {first['fd']}: {first['path']} {bad}", stage="files", pid=self.pid,
                                   path=first["path"])
            # Holding the FIFO open read-write here means the task's open never blocks for a peer.
            keep = os.open(f"/proc/self/fd/{opath}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(opath)
        try:
            for rec in recs:
                if first.get("deleted"):
                    self._open_at(rec, path)
                else:
                    self._open_existing({**rec, "path": first["path"], "handle": first.get("handle"),
                                         "ino": first.get("ino"), "dev": first.get("dev")}, first)
            # Only once the task could open it: its capacity and bytes are changed from here, as root.
            if first.get("pipe_size"):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(keep, abi.F_SETPIPE_SZ, first["pipe_size"])
            data = self.image.blob(first["data"]) if first.get("data") else b""
            import termios
            queued = struct.unpack("i", fcntl.ioctl(keep, termios.FIONREAD, bytes(4)))[0]
            if queued:
                # Another process kept this FIFO open since the dump: its buffer, the process's too, is still
                # there. Writing the saved bytes again would double them; other bytes mean it changed.
                if queued != len(data):
                    raise RestoreError(f"fd {first['fd']}: the FIFO {first['path']} holds {queued} bytes now, "
                                       f"the process had {len(data)} buffered", stage="files", pid=self.pid)
                data = b""
            off = 0
            while off < len(data):
                off += os.write(keep, data[off:])
            if first.get("deleted"):
                os.unlink(path)
                self.ghosts.remove(path)
                remove_dirs(self.dirs)
                self.dirs.clear()
                give_back(f"/proc/{self.pid}/fd/{first['fd']}", first)
        finally:
            os.close(keep)
        self._release()

    def _pipe(self, ends: list[dict[str, Any]]) -> None:
        """A pipe: pipe2() gives one open file description per end; further fds that had their own description
        of an end get a new one by reopening it through /proc (which, unlike pipe2, sets O_LARGEFILE: the ends
        saved without it are the pipe2 ones)."""
        t = self.task
        slot = t.scratch + t.scratch_size - 16
        packet = any(e["flags"] & abi.O_DIRECT for e in ends)
        t.syscall(abi.SYS.pipe2, slot, abi.O_DIRECT if packet else 0)
        raw = t.read(slot, 8)
        r, w = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
        size = ends[0].get("pipe_size")
        if size:
            t.raw(abi.SYS.fcntl, w, abi.F_SETPIPE_SZ, size)
        data = self.image.blob(ends[0]["data"]) if ends[0].get("data") else b""
        if data:
            wfd = os.open(f"/proc/{self.pid}/fd/{w}", os.O_WRONLY | os.O_NONBLOCK)
            try:
                off = 0
                while off < len(data):
                    off += os.write(wfd, data[off:])
            finally:
                os.close(wfd)
        # Move both ends above every target number first, so placing one never clobbers the other.
        hi = {abi.O_RDONLY: t.syscall(abi.SYS.fcntl, r, abi.F_DUPFD, self.high_base),
              abi.O_WRONLY: t.syscall(abi.SYS.fcntl, w, abi.F_DUPFD, self.high_base)}
        t.syscall(abi.SYS.close, r)
        t.syscall(abi.SYS.close, w)
        used: set[int] = set()
        for acc in (abi.O_RDONLY, abi.O_WRONLY):
            mine = [e for e in ends if e["flags"] & abi.O_ACCMODE == acc]
            # Only a description without O_LARGEFILE can be the pipe2() end; the others are reopened below.
            primary = next((e for e in mine if not e["flags"] & abi.O_LARGEFILE), None)
            if primary is not None:
                self._place(t.syscall(abi.SYS.dup, hi[acc]), primary)
                used.add(primary["fd"])
        for rec in ends:
            if rec["fd"] in used:
                continue
            acc = rec["flags"] & abi.O_ACCMODE
            self._place(self._open(f"/proc/self/fd/{hi[abi.O_RDONLY if acc == abi.O_RDONLY else abi.O_WRONLY]}",
                                   rec["flags"]), rec)
        t.syscall(abi.SYS.close, hi[abi.O_RDONLY])
        t.syscall(abi.SYS.close, hi[abi.O_WRONLY])

    def _release(self) -> None:
        """Drop what only served to let the task open its files: our handle fds, the directories we made."""
        for h in self.held:
            with contextlib.suppress(OSError):
                os.close(h)
        self.held.clear()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.dirs.clear()

    def cleanup(self) -> None:
        for p in self.ghosts:
            with contextlib.suppress(OSError):
                os.unlink(p)
        self.ghosts.clear()
        for d in self.dirs:
            import shutil  # here: only after a failure with directories made
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        self._release()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fd_field_problem(f: dict[str, Any], fds_by_num: dict[int, dict[str, Any]]) -> str | None:
    """What is wrong with the optional fields of one fd record (None if nothing): checked before anything is
    created, so that a damaged image is refused in one line rather than failing half-way."""
    owner = f.get("owner")
    if owner is not None and not (isinstance(owner, list) and len(owner) == 2 and all(map(_is_int, owner))
                                  and owner[0] in (abi.F_OWNER_TID, abi.F_OWNER_PID, abi.F_OWNER_PGRP)):
        return "owner"
    if "sig" in f and not (_is_int(f["sig"]) and 0 <= f["sig"] <= 64):
        return "sig"
    for lk in f.get("locks", []) if isinstance(f.get("locks", []), list) else [None]:
        if not (isinstance(lk, list) and len(lk) == 4 and lk[0] in ("flock", "posix", "ofd")
                and lk[1] in _LOCK_TYPES and _is_int(lk[2]) and lk[2] >= 0
                and (lk[3] is None or (_is_int(lk[3]) and lk[3] >= lk[2]))):
            return "locks"
    for key in ("ino", "dev", "mode", "uid", "gid", "size", "same_inode", "pipe_size"):
        if key in f and not (_is_int(f[key]) and f[key] >= 0):
            return key
    if "same_inode" in f:
        first = fds_by_num.get(f["same_inode"])
        if first is None or first is f or first["type"] != f["type"] or f["type"] not in ("ghost", "fifo"):
            return "same_inode"
    for key in ("proc_self", "dir", "deleted"):
        if key in f and not isinstance(f[key], bool):
            return key
    if f["type"] in ("file", "dev", "ghost", "fifo") and not isinstance(f.get("path"), str):
        return "path"
    ext = f.get("extents")
    if ext is not None and not (isinstance(ext, list) and all(
            isinstance(e, list) and len(e) == 2 and _is_int(e[0]) and _is_int(e[1]) and e[0] >= 0 and e[1] > 0
            for e in ext) and all(e[0] + e[1] <= f.get("size", e[0] + e[1]) for e in ext)):
        return "extents"
    h = f.get("handle")
    if h is not None:
        try:
            ok = _is_int(h["type"]) and isinstance(h["mount"], str) and bool(bytes.fromhex(h["bytes"]))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or "ino" not in f or "dev" not in f:
            return "handle"
    return None


def check_fd_fields(fname: str, fds: list[dict[str, Any]], misc: dict[str, Any]) -> None:
    """ImageError naming the field for optional fd (and deleted-cwd) fields of the wrong shape."""
    by_num = {f["fd"]: f for f in fds}
    for i, f in enumerate(fds):
        bad = _fd_field_problem(f, by_num)
        if bad is not None:
            raise ImageError(f"{fname}: field 'files[{i}].{bad}' is not valid")
    gone = misc.get("cwd_deleted")
    if gone is not None and not (isinstance(gone, dict) and isinstance(gone.get("path"), str)
                                 and all(_is_int(gone.get(k)) for k in ("mode", "uid", "gid"))):
        raise ImageError(f"{fname}: field 'misc.cwd_deleted' is not valid")


def _kind_check(rec: dict[str, Any]) -> Callable[[os.stat_result], str | None]:
    return lambda st: kind_problem(rec, st)
