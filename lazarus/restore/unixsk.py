"""Unix socket pairs made again inside the task (socketpair), with their options, queued data (datagram
boundaries kept) and shutdown state. Data and options are put in through pidfd_getfd copies of the new ends.

Order per pair: socketpair -> data (each end's queue written from the other end, its send buffer raised
meanwhile) -> buffer sizes -> shutdown -> the remaining options (SO_PEEK_OFF last) -> both ends moved to their
numbers with their file flags.
"""

from __future__ import annotations

import contextlib

from lazarus.errors import RestoreError
from lazarus.kernel import abi
from lazarus.kernel.pidfd import PidFd
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import socket
    from typing import Any

# The options read at dump (lazarus/dump/unixsk.py), by name.
_INT = {"passcred": abi.SO_PASSCRED, "passsec": abi.SO_PASSSEC, "passpidfd": abi.SO_PASSPIDFD,
        "rcvlowat": abi.SO_RCVLOWAT, "priority": abi.SO_PRIORITY, "mark": abi.SO_MARK}
_TIME = {"rcvtimeo": abi.SO_RCVTIMEO, "sndtimeo": abi.SO_SNDTIMEO}


def pairs(recs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The socket records (dups left out) two by two, each pair as (end, its peer)."""
    by_ino = {r["ino"]: r for r in recs}
    out = []
    for r in recs:
        peer = by_ino.get(r["peer"])
        if peer is None or peer.get("peer") != r["ino"]:
            raise RestoreError(f"fd {r['fd']}: socket peer {r['peer']} is not in the image", stage="files")
        if r["ino"] < peer["ino"]:
            out.append((r, peer))
    return out


def restore_pair(t: RemoteTask, image: Any, pid: int, ends: tuple[dict[str, Any], dict[str, Any]],
                 high_base: int) -> None:
    a, b = ends
    where = f"fds {a['fd']} and {b['fd']} (unix socket pair)"
    slot = t.scratch + t.scratch_size - 16
    t.syscall(abi.SYS.socketpair, abi.AF_UNIX, a["sotype"], 0, slot, what=f"{where}: socketpair")
    raw = t.read(slot, 8)
    fa, fb = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
    import socket  # only for images with socket pairs

    with PidFd.open(pid) as p:
        sa = socket.socket(fileno=p.getfd(fa))
        sb = socket.socket(fileno=p.getfd(fb))
    try:
        _write_queue(image, sb, a, where)  # a's receive queue came from b
        _write_queue(image, sa, b, where)
        for s, r in ((sa, a), (sb, b)):
            _buffers(s, r["opts"])
            if r["shutdown"]:
                s.shutdown(r["shutdown"] - 1)  # RCV_SHUTDOWN 1 -> SHUT_RD 0, SEND 2 -> SHUT_WR 1, both -> 2
            _options(s, r["opts"])
    except OSError as e:
        raise RestoreError(f"{where}: {e.strerror or e}", stage="files") from e
    finally:
        sa.close()
        sb.close()
    # Both ends above every target number first, so placing one never clobbers the other.
    hi = [t.syscall(abi.SYS.fcntl, fa, abi.F_DUPFD, high_base), t.syscall(abi.SYS.fcntl, fb, abi.F_DUPFD, high_base)]
    t.syscall(abi.SYS.close, fa)
    t.syscall(abi.SYS.close, fb)
    for src, r in zip(hi, (a, b), strict=True):
        t.syscall(abi.SYS.dup2, src, r["fd"])
        fl = r["flags"] & (abi.O_NONBLOCK | abi.O_APPEND)
        if fl:
            t.syscall(abi.SYS.fcntl, r["fd"], abi.F_SETFL, fl)
        if r["cloexec"]:
            t.syscall(abi.SYS.fcntl, r["fd"], abi.F_SETFD, abi.FD_CLOEXEC)
        t.syscall(abi.SYS.close, src)


def _buffers(s: socket.socket, opts: dict[str, Any]) -> None:
    # getsockopt reports the doubled value the kernel keeps; the FORCE forms bypass the sysctl caps.
    for name, opt, force in (("sndbuf", abi.SO_SNDBUF, abi.SO_SNDBUFFORCE),
                             ("rcvbuf", abi.SO_RCVBUF, abi.SO_RCVBUFFORCE)):
        want = opts.get(name)
        if want is not None and s.getsockopt(abi.SOL_SOCKET, opt) != want:
            s.setsockopt(abi.SOL_SOCKET, force, want // 2)


def _write_queue(image: Any, sender: socket.socket, r: dict[str, Any], where: str) -> None:
    if not r.get("queue"):
        return
    data = image.blob(r["queue"])
    flags = abi.MSG_DONTWAIT | abi.MSG_NOSIGNAL
    # Room for all of it at once (the program may have lowered its send buffer below what is queued); the
    # recorded size is set afterwards, leaving the socket as full as it was.
    room = 2 * len(data) + (64 << 10) + 1024 * len(r.get("datagrams") or ())
    if sender.getsockopt(abi.SOL_SOCKET, abi.SO_SNDBUF) < room:
        sender.setsockopt(abi.SOL_SOCKET, abi.SO_SNDBUFFORCE, min(room, 1 << 30) // 2)
    try:
        if r.get("datagrams") is None:
            view = memoryview(data)
            while view:
                view = view[sender.send(view, flags):]
            return
        off = 0
        for n in r["datagrams"]:
            sender.send(data[off:off + n], flags)
            off += n
    except BlockingIOError as e:
        raise RestoreError(f"{where}: the data queued for fd {r['fd']} does not fit in the new socket",
                           stage="files") from e


def _options(s: socket.socket, opts: dict[str, Any]) -> None:
    for name, opt in _INT.items():
        want = opts.get(name)
        if want is None:
            continue
        with contextlib.suppress(OSError):
            if s.getsockopt(abi.SOL_SOCKET, opt) == want:
                continue
        s.setsockopt(abi.SOL_SOCKET, opt, want)
    for name, opt in _TIME.items():
        want = bytes.fromhex(opts.get(name) or "")
        if want and s.getsockopt(abi.SOL_SOCKET, opt, 16) != want:
            s.setsockopt(abi.SOL_SOCKET, opt, want)
    peek = opts.get("peek_off")
    if peek is not None and peek != s.getsockopt(abi.SOL_SOCKET, abi.SO_PEEK_OFF):
        s.setsockopt(abi.SOL_SOCKET, abi.SO_PEEK_OFF, peek)
