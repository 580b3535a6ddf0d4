"""Anonymous-inode fds: eventfd, signalfd, timerfd, epoll and inotify, read from fdinfo (and, where fdinfo
falls short, from a copy of the fd taken with pidfd_getfd). Every other anonymous inode is refused.

What each record holds (docs/IMAGES.md, files[]):
    eventfd   count, semaphore            signalfd  sigmask
    timerfd   clockid, settime_flags, value_ns (time left), interval_ns, ticks (expirations not yet read),
              abs_ns (the absolute expiry on clockid, for TFD_TIMER_ABSTIME timers)
    epoll     targets [{tfd, events, data}]: checked with check_epolls() once every fd is known
    inotify   watches [{wd, path, mask, ino, dev}]
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import termios
import time

from lazarus.errors import KernelError, Unsupported
from lazarus.kernel import abi
from lazarus.kernel.anonfd import epoll_target_is, open_by_handle, timerfd_gettime
from lazarus.kernel.pidfd import PidFd
from lazarus.kernel.procfs import FdInfo

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

KINDS = {"anon_inode:[eventfd]": "eventfd", "anon_inode:[signalfd]": "signalfd",
         "anon_inode:[timerfd]": "timerfd", "anon_inode:[eventpoll]": "epoll", "anon_inode:inotify": "inotify"}
_TFD = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)")
_WATCH = re.compile(r"inotify wd:(\d+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) ignored_mask:([0-9a-f]+)"
                    r" fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]*)")


def _lines(info: FdInfo, key: str) -> list[str]:
    return [f"{key}:{v}" for v in info.get_all(key)]


def describe_anon(pid: int, fd: int, link: str, info: FdInfo, rec: dict[str, Any]) -> dict[str, Any]:
    """Fill `rec` for an anonymous-inode fd; raises Unsupported (naming the fd) for kinds not captured."""
    where = f"fd {fd} ({link})"
    if link == "anon_inode:[userfaultfd]":
        raise Unsupported(f"{where}: the process uses userfaultfd itself")
    kind = KINDS.get(link)
    if kind is None:
        raise Unsupported(f"{where}: {link[len('anon_inode:'):]} descriptors are not supported")
    rec["type"] = kind
    if kind == "eventfd":
        rec.update(count=int(info.get("eventfd-count") or "0", 16),
                   semaphore=info.get("eventfd-semaphore") == "1")
    elif kind == "signalfd":
        rec["sigmask"] = int(info.get("sigmask") or "0", 16)
    elif kind == "timerfd":
        _timerfd(pid, fd, where, rec)
    elif kind == "epoll":
        targets = []
        for line in _lines(info, "tfd"):
            m = _TFD.match(line)
            if m is None:
                raise Unsupported(f"{where}: unreadable registration {line!r}")
            targets.append({"tfd": int(m.group(1)), "events": int(m.group(2), 16), "data": int(m.group(3), 16)})
        rec["targets"] = targets
    else:
        _inotify(pid, fd, where, info, rec)
    return rec


def _copy(pid: int, fd: int) -> int:
    with PidFd.open(pid) as p:
        return p.getfd(fd)


def _timerfd(pid: int, fd: int, where: str, rec: dict[str, Any]) -> None:
    from lazarus.kernel.procfs import read_fdinfo
    copy = _copy(pid, fd)
    try:
        # gettime first: it forwards an interval timer that expired unread (fdinfo would show 0 time left),
        # moving the overruns into the tick count that fdinfo then shows.
        value, interval = timerfd_gettime(copy)
        info = read_fdinfo(pid, fd)
        clockid = int(info.get("clockid") or "0")
        now = time.clock_gettime_ns(clockid)
    finally:
        os.close(copy)
    flags = int(info.get("settime flags") or "0", 8)
    rec.update(clockid=clockid, settime_flags=flags, value_ns=value, interval_ns=interval,
               ticks=int(info.get("ticks") or "0"))
    # An absolute timer keeps its deadline on its clock; a relative one gets its time left at restore.
    rec["abs_ns"] = now + value if flags & abi.TFD_TIMER_ABSTIME and value else None


def _mount_points(sdev: int) -> list[str]:
    """Where the filesystem with kernel device number `sdev` (MAJOR << 20 | MINOR) is mounted here."""
    want = f"{sdev >> 20}:{sdev & 0xFFFFF}"
    with open("/proc/self/mountinfo") as f:
        return [parts[4].replace("\\040", " ") for parts in (line.split() for line in f)
                if len(parts) > 4 and parts[2] == want]


def _inotify(pid: int, fd: int, where: str, info: FdInfo, rec: dict[str, Any]) -> None:
    copy = _copy(pid, fd)
    try:
        queued = bytearray(4)
        fcntl.ioctl(copy, termios.FIONREAD, queued)
    finally:
        os.close(copy)
    n = int.from_bytes(queued, "little")
    if n:
        # Events cannot be read without consuming them; a dump moments later, once read, succeeds.
        raise Unsupported(f"{where}: {n} bytes of inotify events are queued unread")
    watches = []
    for line in _lines(info, "inotify wd"):
        m = _WATCH.match(line)
        if m is None:
            raise Unsupported(f"{where}: unreadable watch {line!r}")
        wd, ino, sdev, mask = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16)
        if int(m.group(5), 16):
            raise Unsupported(f"{where}: watch {wd} has an ignored mask")
        path = _path_of(sdev, int(m.group(7), 16), bytes.fromhex(m.group(8)), ino, f"{where}: watch {wd}")
        watches.append({"wd": wd, "path": path, "mask": mask, "ino": ino,
                        "dev": os.makedev(sdev >> 20, sdev & 0xFFFFF)})
    rec["watches"] = sorted(watches, key=lambda w: w["wd"])


def _path_of(sdev: int, htype: int, handle: bytes, ino: int, what: str) -> str:
    """The path of a watched inode, from its file handle, tried through each mount of its filesystem (a bind
    mount of a subdirectory may not reach it); refused when none leads back to that very inode."""
    mounts = _mount_points(sdev)
    if not mounts:
        raise Unsupported(f"{what}: its filesystem (device {sdev >> 20}:{sdev & 0xFFFFF}) is not mounted here")
    why = "no mount reaches it"
    for mount in mounts:
        try:
            mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)  # not O_PATH: open_by_handle_at refuses those
        except OSError:
            continue
        try:
            f = open_by_handle(mfd, htype, handle)
        except KernelError as e:
            why = e.strerror or str(e)
            continue
        finally:
            os.close(mfd)
        try:
            path = os.readlink(f"/proc/self/fd/{f}")
        finally:
            os.close(f)
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if st.st_ino == ino and (os.major(st.st_dev), os.minor(st.st_dev)) == (sdev >> 20, sdev & 0xFFFFF):
                return path
    raise Unsupported(f"{what}: the watched inode {ino} has no path here ({why})")


def check_epolls(pid: int, fds: list[dict[str, Any]]) -> None:
    """Every fd an epoll has registered must still be open in the process as that very file: a registration
    whose fd was closed (the file kept open elsewhere) cannot be made again."""
    open_fds = {r["fd"] for r in fds}
    for rec in fds:
        if rec["type"] != "epoll" or "dup_of" in rec:
            continue
        seen: set[int] = set()
        for t in rec["targets"]:
            tfd = t["tfd"]
            where = f"fd {rec['fd']} (epoll)"
            if tfd in seen:
                raise Unsupported(f"{where}: fd {tfd} is registered twice (once for a file since closed)")
            seen.add(tfd)
            if tfd not in open_fds:
                raise Unsupported(f"{where}: registered fd {tfd} is closed in the process")
            if not epoll_target_is(pid, tfd, rec["fd"], tfd):
                raise Unsupported(f"{where}: registered fd {tfd} was closed and its number reused for another file")
