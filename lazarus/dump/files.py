"""File descriptors: what each one is, and whether a dump can capture it faithfully."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat as statmod
from typing import Any

from lazarus.dump.anonfd import check_epolls, describe_anon
from lazarus.dump.unixsk import UnixSockets
from lazarus.errors import Unsupported
from lazarus.kernel import abi
from lazarus.kernel.procfs import read_fdinfo
from lazarus.kernel.syscall import same_file_description, tee

# (major, minor) of character devices whose open file carries no state worth saving.
STATELESS_DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
                     (1, 8): "/dev/random", (1, 9): "/dev/urandom"}
_PIPE = re.compile(r"pipe:\[(\d+)\]")


def _others_holding(ino: int, pid: int) -> list[int]:
    """Other processes that hold pipe `ino` open (a pipe shared with them cannot be captured)."""
    want = f"pipe:[{ino}]"
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


def peek_pipe(path: str) -> tuple[bytes, int]:
    """The bytes buffered in the pipe/FIFO behind `path`, read without consuming them (tee), and the pipe's
    capacity."""
    src = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    r, w = os.pipe()
    try:
        size = fcntl.fcntl(src, abi.F_GETPIPE_SZ)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, abi.F_SETPIPE_SZ, size)
        n = tee(src, w, size)
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
        os.close(src)
        os.close(r)
        if w >= 0:
            os.close(w)


def _mark_dups(pid: int, fds: list[dict[str, Any]]) -> None:
    """Record fds that share an open file description (dup'ed), so a restore dups them again."""
    seen: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for rec in fds:
        key = (rec["type"], rec.get("pipe") or rec.get("ino") or rec.get("path") or rec.get("object"))
        for first in seen.get(key, []):
            if same_file_description(pid, first["fd"], rec["fd"]):
                rec["dup_of"] = first["fd"]
                break
        else:
            seen.setdefault(key, []).append(rec)


def dump_files(pid: int, write_blob: Any, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Describe every fd of `pid`; raises Unsupported (naming the fd) for anything not capturable."""
    fds: list[dict[str, Any]] = []
    pipes: dict[int, list[dict[str, Any]]] = {}
    objects_by_inode = {o["inode"]: o for o in objects}
    fd_dir = f"/proc/{pid}/fd"
    sockets = UnixSockets(pid)
    for name in sorted(os.listdir(fd_dir), key=int):
        fd = int(name)
        link = os.readlink(f"{fd_dir}/{name}")
        info = read_fdinfo(pid, fd)
        flags = info.flags
        rec: dict[str, Any] = {"fd": fd, "flags": flags & ~abi.O_CLOEXEC,
                               "cloexec": bool(flags & abi.O_CLOEXEC), "pos": info.pos}
        where = f"fd {fd} ({link})"
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
            pipes.setdefault(ino, []).append(rec)
            fds.append(rec)
            continue
        st = os.stat(f"{fd_dir}/{name}")
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
            rec.update(type="fifo", path=link, data=write_blob(f"fifo-{fd}", peek_pipe(f"{fd_dir}/{name}")[0])
                       if flags & abi.O_ACCMODE != abi.O_WRONLY else None)
        elif statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode):
            if link.endswith(" (deleted)") and st.st_nlink == 0:
                with open(f"{fd_dir}/{name}", "rb") as f:
                    content = f.read()
                rec.update(type="ghost", path=link[: -len(" (deleted)")], mode=statmod.S_IMODE(st.st_mode),
                           data=write_blob(f"ghost-{fd}", content))
            else:
                rec.update(type="file", path=link, ino=st.st_ino, dev=st.st_dev)
        else:
            raise Unsupported(f"{where}: this kind of file is not supported")
        fds.append(rec)

    _mark_dups(pid, fds)
    sockets.finish(write_blob)
    check_epolls(pid, fds)
    for ino, ends in pipes.items():
        modes = {e["flags"] & abi.O_ACCMODE for e in ends}
        if abi.O_RDONLY not in modes or abi.O_WRONLY not in modes:
            raise Unsupported(f"fd {ends[0]['fd']} (pipe:[{ino}]): a pipe to another process is not supported")
        others = _others_holding(ino, pid)
        if others:
            raise Unsupported(f"fd {ends[0]['fd']} (pipe:[{ino}]): the pipe is shared with pid {others[0]}")
        reader = next(e for e in ends if e["flags"] & abi.O_ACCMODE == abi.O_RDONLY)
        data, size = peek_pipe(f"{fd_dir}/{reader['fd']}")
        blob = write_blob(f"pipe-{ino}", data) if data else None
        for e in ends:
            e["pipe_size"] = size
            e["data"] = blob
    return fds
