"""Anonymous-inode fds made again inside the task by injected calls: eventfd, signalfd, timerfd, inotify, and
epoll, whose registrations are added once every other fd (its targets, dups included) is in place.

Decisions (docs/IMAGES.md has the fields):
- timerfd: a relative timer gets the time it had left at the dump (the time the process was not running does not
  count, as for its sleeps); a TFD_TIMER_ABSTIME timer keeps its absolute deadline on its clock. Expirations
  not yet read come back with TFD_IOC_SET_TICKS, plus any of an absolute deadline passed meanwhile.
- inotify: the kernel hands out watch descriptors in increasing order (idr_alloc_cyclic), so watches are added
  in wd order and each gap is used up by a watch on a scratch file, removed at once. The IN_IGNORED events
  those removals queue are drained before the task runs (the dump refused a queue that was not empty).
  The next new watch may get a lower number than it would have in the original, if the original had removed
  its highest watches.
- epoll: registrations are made again with EPOLL_CTL_ADD, which queues what is ready now: a level-triggered
  watcher sees what it would have; an edge-triggered one may see once more an edge it had already taken.
"""

from __future__ import annotations

import contextlib
import os
import struct

from lazarus.errors import RestoreError
from lazarus.images.format import Schema, check_schema
from lazarus.kernel import abi
from lazarus.kernel.anonfd import read_all_ready
from lazarus.kernel.pidfd import PidFd
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

KINDS = ("eventfd", "signalfd", "timerfd", "epoll", "inotify")
_NS = 1_000_000_000


# The fields each kind carries (written by lazarus/dump/anonfd.py and dump/unixsk.py), checked before anything
# is created so that a damaged image fails with one line naming the field.
_NONE = type(None)
SCHEMAS: dict[str, Schema] = {
    "eventfd": {"count": int, "semaphore": bool},
    "signalfd": {"sigmask": int},
    "timerfd": {"clockid": int, "settime_flags": int, "value_ns": int, "interval_ns": int, "ticks": int,
                "abs_ns": (int, _NONE)},
    "epoll": {"targets": list},
    "inotify": {"watches": list},
    "unix": {"ino": int, "peer": int, "sotype": int, "shutdown": int, "opts": dict, "queue": (str, _NONE),
             "datagrams": (list, _NONE)},
}
_ITEMS: dict[str, tuple[str, Schema]] = {
    "epoll": ("targets", {"tfd": int, "events": int, "data": int}),
    "inotify": ("watches", {"wd": int, "path": str, "mask": int, "ino": int, "dev": int}),
}


def check_anon(rec: dict[str, Any]) -> None:
    """Refuse before anything is created a record with missing fields, or an inotify watch whose file is gone
    or is another file now."""
    schema = SCHEMAS.get(rec["type"])
    if schema is None or "dup_of" in rec:
        return
    where = f"files[fd {rec['fd']}]."
    check_schema(rec, schema, "task json", where)
    if rec["type"] in _ITEMS:
        key, item = _ITEMS[rec["type"]]
        for i, x in enumerate(rec[key]):
            check_schema(x, item, "task json", f"{where}{key}[{i}].")
    for w in rec.get("watches", ()) if rec["type"] == "inotify" else ():
        try:
            st = os.stat(w["path"])
        except OSError as e:
            raise RestoreError(f"fd {rec['fd']}: inotify watch {w['wd']} on {w['path']}: {e.strerror}",
                               stage="validate", path=w["path"]) from e
        if (st.st_ino, st.st_dev) != (w["ino"], w["dev"]):
            raise RestoreError(f"fd {rec['fd']}: inotify watch {w['wd']}: {w['path']} is another file now",
                               stage="validate", path=w["path"])


def create(t: RemoteTask, rec: dict[str, Any], pid: int) -> int:
    """Make the fd of `rec` in the task (at the lowest free number); returns that number."""
    kind = rec["type"]
    nonblock = rec["flags"] & abi.O_NONBLOCK
    where = f"fd {rec['fd']} ({kind})"
    if kind == "eventfd":
        fd = t.syscall(abi.SYS.eventfd2, 0, nonblock | (abi.EFD_SEMAPHORE if rec["semaphore"] else 0),
                       what=f"{where}: eventfd2")
        if rec["count"]:
            addr = t.put(rec["count"].to_bytes(8, "little"), 0)
            t.syscall(abi.SYS.write, fd, addr, 8, what=f"{where}: write of its count")
        return fd
    if kind == "signalfd":
        addr = t.put(rec["sigmask"].to_bytes(8, "little"), 0)
        return t.syscall(abi.SYS.signalfd4, -1, addr, 8, nonblock, what=f"{where}: signalfd4")
    if kind == "timerfd":
        return _timerfd(t, rec, nonblock, where)
    if kind == "epoll":
        return t.syscall(abi.SYS.epoll_create1, 0, what=f"{where}: epoll_create1")
    if kind == "inotify":
        return _inotify(t, rec, nonblock, where, pid)
    raise RestoreError(f"fd {rec['fd']}: unknown type {kind!r}", stage="files")


def _timerfd(t: RemoteTask, rec: dict[str, Any], nonblock: int, where: str) -> int:
    # Non-blocking while it is set up, so that the expirations it may already have can be read (below).
    fd = t.syscall(abi.SYS.timerfd_create, rec["clockid"], abi.O_NONBLOCK, what=f"{where}: timerfd_create")
    flags, interval = rec["settime_flags"], rec["interval_ns"]
    value = rec["abs_ns"] if rec.get("abs_ns") is not None else rec["value_ns"]
    if not flags & abi.TFD_TIMER_ABSTIME or rec.get("abs_ns") is None:
        flags &= ~(abi.TFD_TIMER_ABSTIME | abi.TFD_TIMER_CANCEL_ON_SET)
    if value or interval:
        spec = struct.pack("<4q", interval // _NS, interval % _NS, value // _NS, value % _NS)
        t.syscall(abi.SYS.timerfd_settime, fd, flags, t.put(spec, 0), 0, what=f"{where}: timerfd_settime")
    if rec["ticks"]:
        # A deadline that passed while the process was not running has expired already: add those expirations
        # to the unread ones of the dump rather than overwrite them.
        addr = t.put(bytes(8), 0)
        new = int.from_bytes(t.read(addr, 8), "little") if t.raw(abi.SYS.read, fd, addr, 8) == 8 else 0
        t.put((rec["ticks"] + new).to_bytes(8, "little"), 0)
        t.syscall(abi.SYS.ioctl, fd, abi.TFD_IOC_SET_TICKS, addr, what=f"{where}: TFD_IOC_SET_TICKS")
    if not nonblock:
        t.syscall(abi.SYS.fcntl, fd, abi.F_SETFL, 0, what=f"{where}: fcntl(F_SETFL)")
    return fd


def _inotify(t: RemoteTask, rec: dict[str, Any], nonblock: int, where: str, pid: int) -> int:
    fd = t.syscall(abi.SYS.inotify_init1, nonblock, what=f"{where}: inotify_init1")
    if not rec["watches"]:
        return fd
    import tempfile  # only for inotify fds

    scratch_dir = tempfile.mkdtemp(prefix=".lazarus-inotify-")
    filler = os.path.join(scratch_dir, "gap")
    try:
        with open(filler, "w"):
            pass
        next_wd = 1
        for w in rec["watches"]:
            while next_wd < w["wd"]:
                gap = t.syscall(abi.SYS.inotify_add_watch, fd, t.cstring(filler), abi.IN_ATTRIB,
                                what=f"{where}: inotify_add_watch (filling wd {next_wd})")
                t.syscall(abi.SYS.inotify_rm_watch, fd, gap, what=f"{where}: inotify_rm_watch")
                next_wd = gap + 1
            got = t.syscall(abi.SYS.inotify_add_watch, fd, t.cstring(w["path"]), w["mask"],
                            what=f"{where}: inotify_add_watch {w['path']}")
            if got != w["wd"]:
                raise RestoreError(f"{where}: watch on {w['path']} got wd {got}, expected {w['wd']}",
                                   stage="files", path=w["path"])
            next_wd = got + 1
        with PidFd.open(pid) as p:
            copy = p.getfd(fd)
        try:
            read_all_ready(copy)  # the IN_IGNORED events of the gap watches
        finally:
            os.close(copy)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(filler)
        with contextlib.suppress(OSError):
            os.rmdir(scratch_dir)
    return fd


def register_epolls(t: RemoteTask, recs: list[dict[str, Any]]) -> None:
    """EPOLL_CTL_ADD every registration of every epoll, once all fds exist at their numbers."""
    for rec in recs:
        for tg in rec["targets"]:
            ev = struct.pack("<IQ", tg["events"], tg["data"])  # struct epoll_event is packed on x86_64
            t.syscall(abi.SYS.epoll_ctl, rec["fd"], abi.EPOLL_CTL_ADD, tg["tfd"], t.put(ev, 0),
                      what=f"fd {rec['fd']} (epoll): EPOLL_CTL_ADD of fd {tg['tfd']}")
