"""Open a restored task's existing files as its own credentials would, after checking each is the kind of file
its record says.

The task is built as root and its credentials are set last (restore_creds), so an open injected before that
could reach any file on the machine: a hostile image that names a root-only file and uid 65534 would get that
file open in an unprivileged process. So every file that exists outside the restore (fds of kind file, dev and
FIFO, and mapped files) is opened by the task under the filesystem identity of the restored credentials:
setgroups, setfsgid and setfsuid are injected before the open and undone after it. While fsuid is not 0 the
kernel clears CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the task's effective set, so the
ordinary permission checks apply, on every directory of the path too; setfsuid(0) raises them again.

"Could open themselves": the restored process may switch its effective uid to its real or saved uid, and its
effective gid to its real or saved gid, so each distinct uid of (effective, real, saved) is tried in turn, with
the real and saved gids added to the supplementary groups. A process whose uids include 0 can become root again,
and is given root's access. A file the original opened before dropping its privileges (a daemon's log, opened as
root) is therefore refused with its fd, path and uid: nothing in an image can prove that the original held it,
since whoever wrote the image could have written that too (README, "Trust model").

Each open is made in two steps: O_PATH|O_NOFOLLOW first (no permission on the file itself, no side effect: a
FIFO does not block, a device is not opened), its inode checked for kind and identity from outside, then the
same inode reopened through /proc/self/fd with the record's flags (its access mode only), which checks the file's
permissions against the fs identity in force. The fd the task ends up with is checked again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from lazarus.errors import RestoreError
from lazarus.images.format import STATELESS_DEVICES
from lazarus.kernel import abi
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1
DEVICES = {path: dev for dev, path in STATELESS_DEVICES.items()}
_ACCESS = {abi.O_RDONLY: "reading", abi.O_WRONLY: "writing", abi.O_RDWR: "reading and writing"}
Check = Callable[[os.stat_result], "str | None"]


def describe(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):#o}"


def kind_problem(rec: dict[str, Any], st: os.stat_result) -> str | None:
    """Why the inode `st` is not the file the fd record describes (None if it is): a FIFO must be a FIFO, a
    device the very character device its path names, a file a regular file or directory (a directory when
    opened with O_DIRECTORY); with the inode and filesystem it had when they were recorded."""
    kind, mode = rec["type"], st.st_mode
    if kind == "fifo" and not stat.S_ISFIFO(mode):
        return f"is {describe(mode)}, not a FIFO"
    if kind == "dev":
        want = DEVICES.get(rec["path"])
        if want is None or not stat.S_ISCHR(mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != want:
            return f"is {describe(mode)}, not the character device {want[0] if want else '?'}:" \
                   f"{want[1] if want else '?'} the process had open"
    if kind == "file":
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"is {describe(mode)}, not a regular file or directory"
        if rec["flags"] & abi.O_DIRECTORY and not stat.S_ISDIR(mode):
            return f"is {describe(mode)}, not a directory"
    if ("ino" in rec and st.st_ino != rec["ino"]) or ("dev" in rec and st.st_dev != rec["dev"]):
        return (f"is another file now (inode {st.st_dev}:{st.st_ino}, the process had "
                f"{rec.get('dev', st.st_dev)}:{rec.get('ino', st.st_ino)} open)")
    return None


def denied_message(where: str, path: str, uids: list[int], flags: int, err: int) -> str:
    acc = _ACCESS.get(flags & abi.O_ACCMODE, "access")
    return (f"{where}: uid {'/'.join(map(str, uids))} may not open {path} for {acc} ({os.strerror(err)}); "
            "a file the process opened before dropping privileges is not reopened")


def mapped_access(v: dict[str, Any]) -> int:
    """The access a file mapping's fd needs: read-write for a shared mapping that is or may become writable."""
    if v["shared"] and ("mw" in v["vmflags"] or v["prot"] & abi.PROT_WRITE):
        return abi.O_RDWR
    return abi.O_RDONLY


def precheck(task: dict[str, Any]) -> None:
    """Before any task exists: the files the task will open (fds of kind file, dev and FIFO, and mapped files),
    tried by a throwaway child that has taken the restored credentials, as the task will be (Access.open, which
    stays the check that counts: a file can change in between). RestoreError naming fd or mapping, path and
    uid for the first the credentials could not open. Only permissions are asked here (O_PATH, then access(2)
    with the effective ids): nothing is opened for reading or writing, so no FIFO or device notices."""
    creds = task["misc"]["creds"]
    if 0 in creds["uids"][:3]:
        return
    wanted: list[tuple[str, str, int]] = []
    for f in task["files"]:
        if f["type"] in ("file", "dev", "fifo") and not ({"dup_of", "same_inode"} & f.keys()) and not (
                f.get("proc_self") or f.get("handle") or f.get("deleted")):
            wanted.append((f"fd {f['fd']}", f["path"], f["flags"]))
    for v in task["mm"]["vmas"]:
        if v["kind"] == "file":
            wanted.append((f"mapping {v['start']:#x}", v["path"], mapped_access(v)))
    if not wanted:
        return
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the checking child reports through the pipe
        code = 0
        try:
            os.close(r)
            os.write(w, _check_as(creds, wanted).encode())
        except BaseException:  # noqa: BLE001 - the parent then says it could not check
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    answer = b""
    try:
        while chunk := os.read(r, 4096):
            answer += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    if status != 0:
        raise RestoreError("could not check the task's files under its credentials", stage="validate")
    if answer:
        raise RestoreError(answer.decode(errors="replace"), stage="validate")


def _check_as(creds: dict[str, Any], wanted: list[tuple[str, str, int]]) -> str:
    """In the child: become the restored credentials, then each file: "" if all may be opened, else why not."""
    ruid, euid, suid, _ = creds["uids"]
    rgid, egid, sgid, _ = creds["gids"]
    uids = list(dict.fromkeys((euid, ruid, suid)))
    os.setgroups(sorted(set(creds["groups"]) | {rgid, sgid}))
    os.setresgid(rgid, egid, sgid)
    os.setresuid(ruid, euid, suid)
    for where, path, flags in wanted:
        mode = {abi.O_RDONLY: os.R_OK, abi.O_WRONLY: os.W_OK}.get(flags & abi.O_ACCMODE, os.R_OK | os.W_OK)
        err = 0
        for uid in uids:
            os.seteuid(uid)
            try:
                pfd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError as e:
                err = e.errno or errno.EACCES
                continue
            except OSError:
                err = 0  # gone, or not what it should be: the root checks and the task's open say which
                break
            try:
                if flags & abi.O_PATH or os.access(f"/proc/self/fd/{pfd}", mode, effective_ids=True):
                    err = 0
                    break
                err = errno.EACCES
            finally:
                os.close(pfd)
        if err:
            return denied_message(where, path, uids, flags, err)
    return ""


class Access:
    """The filesystem identity of the restored credentials, put on and taken off the task around each open."""

    def __init__(self, task: RemoteTask, pid: int, creds: dict[str, Any]) -> None:
        self.task = task
        self.pid = pid
        ruid, euid, suid, _ = creds["uids"]
        rgid, egid, sgid, _ = creds["gids"]
        self.uids = list(dict.fromkeys((euid, ruid, suid)))
        self.gid = egid
        self.groups = sorted(set(creds["groups"]) | {rgid, sgid})
        # A process with uid 0 among its uids can make itself root again (setresuid): root's access.
        self.root = 0 in self.uids

    def _become(self, uid: int) -> None:
        t = self.task
        raw = b"".join(g.to_bytes(4, "little") for g in self.groups)
        t.syscall(abi.SYS.setgroups, len(self.groups), t.put(raw) if raw else 0, what="setgroups")
        t.syscall(abi.SYS.setfsgid, self.gid)
        t.syscall(abi.SYS.setfsuid, uid)
        # setfsuid returns the previous fsuid whatever happens; an invalid id (-1) only reads it back.
        if t.raw(abi.SYS.setfsgid, _NEG1) != self.gid or t.raw(abi.SYS.setfsuid, _NEG1) != uid:
            raise RestoreError(f"could not take fsuid {uid} fsgid {self.gid} in the new task", stage="files",
                               pid=self.pid)

    def _back(self) -> None:
        t = self.task
        t.syscall(abi.SYS.setfsuid, 0)
        t.syscall(abi.SYS.setfsgid, 0)
        t.syscall(abi.SYS.setgroups, 0, 0, what="setgroups")
        if t.raw(abi.SYS.setfsuid, _NEG1) != 0:
            raise RestoreError("could not take back fsuid 0 in the new task", stage="files", pid=self.pid)

    def open(self, path: str, flags: int, check: Check, where: str, *, ours: bool = False) -> int:
        """The task's new fd of `path`, opened with `flags` (never with more access than they hold) as the
        restored credentials could; RestoreError if it is the wrong kind of file or they may not open it.
        ours: `path` is a /proc link to a file lazarus holds (a file found by handle): followed."""
        denied = 0
        for uid in ([0] if self.root else self.uids):
            if not self.root:
                self._become(uid)
            try:
                fd = self._open_checked(path, flags, check, where, ours)
            finally:
                if not self.root:
                    self._back()
            if fd >= 0:
                return fd
            denied = -fd
        raise RestoreError(denied_message(where, path, self.uids, flags, denied), stage="files", pid=self.pid,
                           path=path)

    def open_many(self, wanted: list[tuple[str, int, Check, str]]) -> list[int]:
        """open() of each (path, flags, check, where), in that order. With root's access, the same two steps
        are made for all of them at once: every O_PATH open in one batch, the checks, every reopen in another."""
        if not self.root or len(wanted) < 2:
            return [self.open(path, flags, check, where) for path, flags, check, where in wanted]
        t = self.task
        b = t.batch()
        for path, _, _, _ in wanted:
            b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring(path), abi.O_PATH | abi.O_CLOEXEC | abi.O_NOFOLLOW,
                   0, check=False)
        pfds = b.run()
        fds: list[int] = []
        try:
            stats = []
            for (path, flags, check, where), pfd in zip(wanted, pfds, strict=True):
                if pfd < 0:
                    raise self._open_error(where, path, flags, -pfd)
                st = os.stat(f"/proc/{self.pid}/fd/{pfd}")
                bad = check(st)
                if bad:
                    raise self._error(where, path, bad)
                stats.append(st)
            for (path, flags, _, _), pfd in zip(wanted, pfds, strict=True):
                # A magic link cannot be opened with O_NOFOLLOW: open the name again, and compare below.
                name = path if flags & abi.O_NOFOLLOW else f"/proc/self/fd/{pfd}"
                b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring(name), flags, 0, check=False)
            for pfd in pfds:  # in the same batch, after every reopen
                b.call(abi.SYS.close, pfd, check=False)
            fds = b.run()[:len(wanted)]
            pfds = []
            for (path, flags, _, where), fd, st in zip(wanted, fds, stats, strict=True):
                if fd < 0:
                    raise self._open_error(where, path, flags, -fd)
                got = os.stat(f"/proc/{self.pid}/fd/{fd}")
                if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                    raise self._error(where, path, "was replaced while it was opened")
            return fds
        except BaseException:
            for fd in fds:
                if fd >= 0:
                    b.call(abi.SYS.close, fd, check=False)
            raise
        finally:
            for pfd in pfds:
                if pfd >= 0:
                    b.call(abi.SYS.close, pfd, check=False)
            b.run()  # nothing queued once every pfd is closed

    def _error(self, where: str, path: str, what: str) -> RestoreError:
        return RestoreError(f"{where}: {path} {what}", stage="files", pid=self.pid, path=path)

    def _open_error(self, where: str, path: str, flags: int, err: int) -> RestoreError:
        """Why the task could not open `path` (errno `err`): for EACCES/EPERM, which credentials were denied."""
        if err in (errno.EACCES, errno.EPERM):
            return RestoreError(denied_message(where, path, self.uids, flags, err), stage="files", pid=self.pid,
                                path=path)
        return RestoreError(f"{where}: cannot open {path}: {os.strerror(err)}", stage="files", pid=self.pid,
                            path=path)

    def _open_checked(self, path: str, flags: int, check: Check, where: str, ours: bool) -> int:
        """The new fd, or -errno when permission was denied; RestoreError on anything else."""
        t = self.task
        pflags = abi.O_PATH | abi.O_CLOEXEC | (0 if ours else abi.O_NOFOLLOW)
        pfd = t.raw(abi.SYS.openat, abi.AT_FDCWD & _NEG1, t.cstring(path), pflags, 0)
        if pfd in (-errno.EACCES, -errno.EPERM):
            return pfd
        if pfd < 0:
            raise self._open_error(where, path, flags, -pfd)
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{pfd}")
            bad = check(st)
            if bad:
                raise self._error(where, path, bad)
            if flags & abi.O_NOFOLLOW:
                # A magic link cannot be opened with O_NOFOLLOW: open the name again, and compare below.
                fd = t.raw(abi.SYS.openat, abi.AT_FDCWD & _NEG1, t.cstring(path), flags, 0)
            else:
                fd = t.raw(abi.SYS.openat, abi.AT_FDCWD & _NEG1, t.cstring(f"/proc/self/fd/{pfd}"),
                           flags & ~abi.O_NOFOLLOW, 0)
        finally:
            t.raw(abi.SYS.close, pfd)
        if fd in (-errno.EACCES, -errno.EPERM):
            return fd
        if fd < 0:
            raise self._open_error(where, path, flags, -fd)
        got = os.stat(f"/proc/{self.pid}/fd/{fd}")
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
            t.raw(abi.SYS.close, fd)
            raise self._error(where, path, "was replaced while it was opened")
        return fd
