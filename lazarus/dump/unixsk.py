"""Unix socket pairs whose both ends the process holds: type, shutdown state, the options a program sets, and
the data queued in each direction, peeked without consuming it. Every other socket is refused.

    end A  --- A's receive queue (written by B) ---  end B
    peeked through a pidfd_getfd copy of A: MSG_PEEK from SO_PEEK_OFF 0 onwards, one datagram per message for
    SOCK_DGRAM/SOCK_SEQPACKET (a datagram longer than the buffer comes back in MSG_TRUNC pieces); SO_PEEK_OFF
    is put back as it was.
"""

from __future__ import annotations

import contextlib
import os
import socket

from lazarus.errors import KernelError, Unsupported
from lazarus.kernel import abi
from lazarus.kernel.pidfd import PidFd
from lazarus.kernel.procfs import FdInfo
from lazarus.kernel.sockdiag import UnixSock, unix_sockets

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

# Integer options saved and set again where they differ from a new socket's (SOL_SOCKET level).
INT_OPTIONS = {"sndbuf": abi.SO_SNDBUF, "rcvbuf": abi.SO_RCVBUF, "passcred": abi.SO_PASSCRED,
               "passsec": abi.SO_PASSSEC, "passpidfd": abi.SO_PASSPIDFD, "peek_off": abi.SO_PEEK_OFF,
               "rcvlowat": abi.SO_RCVLOWAT, "priority": abi.SO_PRIORITY, "mark": abi.SO_MARK}
TIME_OPTIONS = {"rcvtimeo": abi.SO_RCVTIMEO, "sndtimeo": abi.SO_SNDTIMEO}
_CHUNK = 1 << 16
_NOT_SUPPORTED = "sockets are not supported"


def read_options(s: socket.socket) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for name, opt in INT_OPTIONS.items():
        with contextlib.suppress(OSError):  # an option this kernel lacks (SO_PASSPIDFD before 6.5)
            opts[name] = s.getsockopt(abi.SOL_SOCKET, opt)
    for name, opt in TIME_OPTIONS.items():
        opts[name] = s.getsockopt(abi.SOL_SOCKET, opt, 16).hex()
    return opts


class UnixSockets:
    """Collects the socket fds of one process during dump_files; finish() pairs them and saves their queues."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.recs: list[dict[str, Any]] = []
        self._diag: dict[int, UnixSock] | None = None

    def add(self, fd: int, link: str, info: FdInfo, rec: dict[str, Any]) -> dict[str, Any]:
        where = f"fd {fd} ({link})"
        ino = int(link[len("socket:["):-1])
        if self._diag is None:
            try:
                self._diag = unix_sockets()
            except KernelError as e:
                raise Unsupported(f"{where}: {_NOT_SUPPORTED} here (unix sock_diag: {e.strerror})") from e
        sk = self._diag.get(ino)
        if sk is None:
            raise Unsupported(f"{where}: {_NOT_SUPPORTED} (only unix socket pairs are)")
        if sk.state == abi.TCP_LISTEN:
            raise Unsupported(f"{where}: {_NOT_SUPPORTED} (a listening unix socket)")
        if sk.name is not None:
            raise Unsupported(f"{where}: {_NOT_SUPPORTED} (a bound unix socket)")
        if sk.type not in (abi.SOCK_STREAM, abi.SOCK_DGRAM, abi.SOCK_SEQPACKET):
            raise Unsupported(f"{where}: {_NOT_SUPPORTED} (unix socket type {sk.type})")
        if not sk.peer:
            raise Unsupported(f"{where}: {_NOT_SUPPORTED} (an unconnected unix socket)")
        scm = info.get("scm_fds")
        if scm not in (None, "0"):
            raise Unsupported(f"{where}: {scm} file descriptors queued in SCM_RIGHTS messages")
        rec.update(type="unix", ino=ino, peer=sk.peer, sotype=sk.type, shutdown=sk.shutdown)
        self.recs.append(rec)
        return rec

    def finish(self, write_blob: Any) -> None:
        """Pair the ends (after dups are marked) and save each end's options and receive queue."""
        if not self.recs:
            return
        assert self._diag is not None
        firsts = {r["ino"]: r for r in self.recs if "dup_of" not in r}
        for r in firsts.values():
            where = f"fd {r['fd']} (socket:[{r['ino']}])"
            peer = self._diag.get(r["peer"])
            if r["peer"] not in firsts or peer is None or peer.peer != r["ino"]:
                raise Unsupported(f"{where}: {_NOT_SUPPORTED} (its peer is outside the process)")
        others = _others_holding(set(firsts), self.pid)
        if others:
            ino, other = next(iter(others.items()))
            raise Unsupported(f"fd {firsts[ino]['fd']} (socket:[{ino}]): {_NOT_SUPPORTED} "
                              f"(the socket is shared with pid {other})")
        with PidFd.open(self.pid) as pfd:
            for r in firsts.values():
                copy = pfd.getfd(r["fd"])
                with socket.socket(fileno=copy) as s:
                    r["opts"] = read_options(s)
                    self._queue(s, r, write_blob)

    def _queue(self, s: socket.socket, r: dict[str, Any], write_blob: Any) -> None:
        ino, where = r["ino"], f"fd {r['fd']} (socket:[{r['ino']}])"
        sk, peer = self._diag[ino], self._diag[r["peer"]]  # type: ignore[index]
        stream = sk.type == abi.SOCK_STREAM
        r["queue"], r["datagrams"] = None, None
        if not stream and sk.shutdown & abi.RCV_SHUTDOWN:
            # A shut-down datagram socket reads 0 at the end of its queue, as it does for an empty datagram:
            # the end cannot be told, so only an empty queue (nothing of the peer's in flight) is accepted.
            if peer.wqueue:
                raise Unsupported(f"{where}: queued datagrams on a socket shut down for reading")
            return
        msgs = _peek_all(s, stream, where)
        total = sum(len(m) for m in msgs)
        # What the kernel counts as queued: every byte for streams and seqpackets, the first datagram for dgrams.
        counted = (len(msgs[0]) if msgs else 0) if sk.type == abi.SOCK_DGRAM else total
        if counted != sk.rqueue:
            raise Unsupported(f"{where}: {sk.rqueue} bytes queued but {counted} could be peeked (out-of-band data?)")
        if not msgs:
            return
        for opt in ("passcred", "passsec", "passpidfd"):
            if r["opts"].get(opt):
                raise Unsupported(f"{where}: data queued for a socket with SO_{opt.upper()} (sender credentials)")
        r["queue"] = write_blob(f"unix-{ino}", b"".join(msgs))
        r["datagrams"] = None if stream else [len(m) for m in msgs]


def _peek_all(s: socket.socket, stream: bool, where: str) -> list[bytes]:
    """The receive queue as a list of messages (one per datagram; one for all of a stream's bytes)."""
    old = s.getsockopt(abi.SOL_SOCKET, abi.SO_PEEK_OFF)
    s.setsockopt(abi.SOL_SOCKET, abi.SO_PEEK_OFF, 0)
    msgs: list[bytes] = []
    part = bytearray()
    try:
        while True:
            try:
                data, anc, flags, _ = s.recvmsg(_CHUNK, socket.CMSG_SPACE(64 * 4),
                                                abi.MSG_PEEK | abi.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if anc:
                for level, typ, payload in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        for i in range(0, len(payload) - len(payload) % 4, 4):
                            with contextlib.suppress(OSError):
                                os.close(int.from_bytes(payload[i:i + 4], "little"))
                raise Unsupported(f"{where}: file descriptors or credentials queued with the data")
            if stream:
                if not data:
                    break  # shut down: the end of the queue
                part += data
                continue
            part += data
            if not flags & abi.MSG_TRUNC:
                msgs.append(bytes(part))
                part = bytearray()
    finally:
        s.setsockopt(abi.SOL_SOCKET, abi.SO_PEEK_OFF, old)
    if stream:
        return [bytes(part)] if part else []
    if part:
        raise Unsupported(f"{where}: a queued datagram could not be peeked whole")
    return msgs


def _others_holding(inos: set[int], pid: int) -> dict[int, int]:
    """Sockets of `inos` that another process holds too: inode -> that pid."""
    want = {f"socket:[{i}]": i for i in inos}
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (pid, os.getpid()):
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    ino = want.get(os.readlink(f"/proc/{entry}/fd/{fd}"))
                    if ino is not None:
                        out.setdefault(ino, int(entry))
    return out
