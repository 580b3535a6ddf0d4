"""AF_UNIX sockets as the sock_diag netlink interface (NETLINK_SOCK_DIAG, UNIX_DIAG) describes them: type,
state, peer inode, bound name, queue lengths and shutdown bits. Plain `socket` and `struct`, no ctypes.

    request:  nlmsghdr | unix_diag_req {family, protocol, pad, states, ino, show, cookie[2]}
    replies:  nlmsghdr | unix_diag_msg {family, type, state, pad, ino, cookie[2]} | rtattr...  (one per socket)
"""

from __future__ import annotations

import errno
import socket
import struct

from lazarus.errors import KernelError
from lazarus.kernel import abi
from lazarus.records import record

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBHIIIII")  # include/uapi/linux/unix_diag.h: struct unix_diag_req
_MSG = struct.Struct("=BBBBIII")  # struct unix_diag_msg
_RTA = struct.Struct("=HH")


@record(frozen=True, slots=True)
class UnixSock:
    ino: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int  # TCP_ESTABLISHED (1), TCP_CLOSE (7), TCP_LISTEN (10)...
    peer: int  # the peer's inode, 0 when none
    name: bytes | None  # the bound address (b"\0..." for an abstract one), None when unbound
    rqueue: int  # stream: bytes queued to read; datagram: length of the first datagram
    wqueue: int  # bytes this socket has sent that are not yet read (its write memory)
    shutdown: int  # RCV_SHUTDOWN | SEND_SHUTDOWN bits


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse(payload: bytes) -> UnixSock:
    """One unix_diag_msg with its attributes."""
    _fam, typ, state, _pad, ino, _c0, _c1 = _MSG.unpack_from(payload)
    peer, name, rq, wq, shut = 0, None, 0, 0, 0
    off = _MSG.size
    while off + _RTA.size <= len(payload):
        alen, atype = _RTA.unpack_from(payload, off)
        if alen < _RTA.size:
            break
        data = payload[off + _RTA.size: off + alen]
        if atype == abi.UNIX_DIAG_PEER:
            peer = struct.unpack_from("=I", data)[0]
        elif atype == abi.UNIX_DIAG_NAME:
            name = data
        elif atype == abi.UNIX_DIAG_RQLEN:
            rq, wq = struct.unpack_from("=II", data)
        elif atype == abi.UNIX_DIAG_SHUTDOWN:
            shut = data[0]
        off += _align(alen)
    return UnixSock(ino, typ, state, peer, name, rq, wq, shut)


def unix_sockets() -> dict[int, UnixSock]:
    """Every AF_UNIX socket of this network namespace, by inode."""
    show = abi.UDIAG_SHOW_NAME | abi.UDIAG_SHOW_PEER | abi.UDIAG_SHOW_RQLEN
    req = _REQ.pack(abi.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), abi.SOCK_DIAG_BY_FAMILY,
                         abi.NLM_F_REQUEST | abi.NLM_F_DUMP, 1, 0)
    out: dict[int, UnixSock] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, abi.NETLINK_SOCK_DIAG) as s:
            s.sendall(hdr + req)
            while True:
                data = s.recv(1 << 16)
                off = 0
                while off + _NLMSGHDR.size <= len(data):
                    mlen, mtype, _fl, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                    if mlen < _NLMSGHDR.size:
                        return out
                    if mtype == abi.NLMSG_DONE:
                        return out
                    if mtype == abi.NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                        raise KernelError("sock_diag (unix)", err or errno.EIO)
                    if mtype == abi.SOCK_DIAG_BY_FAMILY:
                        sk = parse(data[off + _NLMSGHDR.size: off + mlen])
                        out[sk.ino] = sk
                    off += _align(mlen)
    except OSError as e:
        raise KernelError("sock_diag (unix)", e.errno or errno.EIO) from e
