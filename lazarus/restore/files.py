"""Re-open a task's file descriptors inside it, at their numbers, with flags, positions and contents."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

from lazarus.errors import RestoreError
from lazarus.kernel import abi
from lazarus.remote import RemoteTask
from lazarus.restore import anonfd, unixsk

_NEG1 = (1 << 64) - 1
_OPEN_MASK = ~(abi.O_CLOEXEC | 0o100 | 0o200 | 0o1000)  # never O_CREAT, O_EXCL, O_TRUNC on reopen


def check_files(fds: list[dict[str, Any]]) -> None:
    """Refuse before anything is created if a file the task had open is gone."""
    for f in fds:
        if f["type"] in ("file", "dev", "fifo") and not os.path.exists(f["path"]):
            raise RestoreError(f"fd {f['fd']}: {f['path']} no longer exists", stage="validate", path=f["path"])
        anonfd.check_anon(f)


class FdRestorer:
    def __init__(self, task: RemoteTask, image: Any, pid: int, object_fds: dict[int, int],
                 high_base: int) -> None:
        self.high_base = high_base
        self.task = task
        self.image = image
        self.pid = pid
        self.object_fds = object_fds
        self.ghosts: list[str] = []

    def _place(self, tmp: int, rec: dict[str, Any]) -> None:
        t = self.task
        fd = rec["fd"]
        if tmp != fd:
            t.syscall(abi.SYS.dup2, tmp, fd)
            t.syscall(abi.SYS.close, tmp)
        if rec["cloexec"]:
            t.syscall(abi.SYS.fcntl, fd, abi.F_SETFD, abi.FD_CLOEXEC)

    def _open(self, path: str, flags: int) -> int:
        return self.task.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, self.task.cstring(path),
                                 flags & _OPEN_MASK, 0, what=f"open {path}")

    def restore(self, fds: list[dict[str, Any]]) -> None:
        t = self.task
        pipes: dict[int, list[dict[str, Any]]] = {}
        sockets: list[dict[str, Any]] = []
        dups = [rec for rec in fds if "dup_of" in rec]
        for rec in fds:
            kind = rec["type"]
            if "dup_of" in rec:
                continue
            if kind in ("file", "dev"):
                tmp = self._open(rec["path"], rec["flags"])
                if rec["pos"]:
                    t.syscall(abi.SYS.lseek, tmp, rec["pos"], 0)
                self._place(tmp, rec)
            elif kind == "ghost":
                self._ghost(rec)
            elif kind == "fifo":
                self._fifo(rec)
            elif kind == "memfd":
                tmp = t.syscall(abi.SYS.dup, self.object_fds[rec["object"]])
                if rec["pos"]:
                    t.syscall(abi.SYS.lseek, tmp, rec["pos"], 0)
                self._place(tmp, rec)
            elif kind == "pipe":
                pipes.setdefault(rec["pipe"], []).append(rec)
            elif kind in anonfd.KINDS:  # restore/anonfd.py; epoll registrations come last, below
                self._place(anonfd.create(t, rec, self.pid), rec)
            elif kind == "unix":
                sockets.append(rec)
            else:
                raise RestoreError(f"fd {rec['fd']}: unknown type {kind!r}", stage="files")
        for ends in pipes.values():
            self._pipe(ends)
        for pair in unixsk.pairs(sockets):
            unixsk.restore_pair(t, self.image, self.pid, pair, self.high_base)
        for rec in dups:
            t.syscall(abi.SYS.dup2, rec["dup_of"], rec["fd"])
            if rec["cloexec"]:
                t.syscall(abi.SYS.fcntl, rec["fd"], abi.F_SETFD, abi.FD_CLOEXEC)
        # After every fd and dup exists: the registrations name them.
        anonfd.register_epolls(t, [r for r in fds if r["type"] == "epoll" and "dup_of" not in r])

    def _ghost(self, rec: dict[str, Any]) -> None:
        """An unlinked-but-open file: recreate it with its content, open it, unlink it again."""
        path = rec["path"]
        if os.path.lexists(path) or not os.path.isdir(os.path.dirname(path) or "/"):
            d = os.path.dirname(path) if os.path.isdir(os.path.dirname(path) or "/") else "/tmp"
            path = os.path.join(d, f".lazarus-ghost-{secrets.token_hex(6)}")
        data = self.image.blob(rec["data"])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, rec.get("mode", 0o600))
        self.ghosts.append(path)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        tmp = self._open(path, rec["flags"])
        os.unlink(path)
        self.ghosts.remove(path)
        if rec["pos"]:
            self.task.syscall(abi.SYS.lseek, tmp, rec["pos"], 0)
        self._place(tmp, rec)

    def _fifo(self, rec: dict[str, Any]) -> None:
        # Holding the FIFO open read-write here means the task's open never blocks for a peer.
        keep = os.open(rec["path"], os.O_RDWR | os.O_NONBLOCK)
        try:
            tmp = self._open(rec["path"], rec["flags"])
            data = self.image.blob(rec["data"]) if rec.get("data") else b""
            if data:
                os.write(keep, data)
            self._place(tmp, rec)
        finally:
            os.close(keep)

    def _pipe(self, ends: list[dict[str, Any]]) -> None:
        t = self.task
        slot = t.scratch + t.scratch_size - 16
        t.syscall(abi.SYS.pipe2, slot, 0)
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
        hi_r = t.syscall(abi.SYS.fcntl, r, abi.F_DUPFD, self.high_base)
        hi_w = t.syscall(abi.SYS.fcntl, w, abi.F_DUPFD, self.high_base)
        t.syscall(abi.SYS.close, r)
        t.syscall(abi.SYS.close, w)
        for rec in ends:
            src = hi_r if rec["flags"] & abi.O_ACCMODE == abi.O_RDONLY else hi_w
            t.syscall(abi.SYS.dup2, src, rec["fd"])
            fl = rec["flags"] & (abi.O_NONBLOCK | abi.O_APPEND)
            if fl:
                t.syscall(abi.SYS.fcntl, rec["fd"], abi.F_SETFL, fl)
            if rec["cloexec"]:
                t.syscall(abi.SYS.fcntl, rec["fd"], abi.F_SETFD, abi.FD_CLOEXEC)
        t.syscall(abi.SYS.close, hi_r)
        t.syscall(abi.SYS.close, hi_w)

    def cleanup(self) -> None:
        for p in self.ghosts:
            with contextlib.suppress(OSError):
                os.unlink(p)
