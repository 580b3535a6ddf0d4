"""Parsing what the kernel shows of anonymous-inode fds (fdinfo, as read on Linux 6.18) and of unix sockets
(sock_diag replies): pure functions, no root."""

from __future__ import annotations

import re
import struct

import pytest

from lazarus.dump.anonfd import _WATCH, describe_anon
from lazarus.errors import Unsupported
from lazarus.kernel import abi
from lazarus.kernel.procfs import parse_fdinfo
from lazarus.kernel.sockdiag import parse

BASE = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\n"


def rec() -> dict:
    return {"fd": 9, "flags": 0o4002, "cloexec": False, "pos": 0}


def test_eventfd() -> None:
    info = parse_fdinfo(BASE + "eventfd-count:      123456789a\neventfd-id: 1\neventfd-semaphore: 1\n")
    r = describe_anon(0, 9, "anon_inode:[eventfd]", info, rec())
    assert (r["type"], r["count"], r["semaphore"]) == ("eventfd", 0x123456789A, True)


def test_signalfd() -> None:
    r = describe_anon(0, 9, "anon_inode:[signalfd]", parse_fdinfo(BASE + "sigmask:\t0000000800000200\n"), rec())
    assert r["sigmask"] == (1 << 9) | (1 << 35)  # SIGUSR1 (10) and SIGRTMIN+3 (37), bit = signo - 1


def test_epoll_registrations() -> None:
    text = BASE + ("tfd:        8 events: 4000001c data:                7  pos:0 ino:6782 sdev:9\n"
                   "tfd:        3 events: 80000019 data: fedcba9876543210  pos:0 ino:40e sdev:10\n")
    r = describe_anon(0, 9, "anon_inode:[eventpoll]", parse_fdinfo(text), rec())
    assert r["targets"] == [{"tfd": 8, "events": 0x4000001C, "data": 7},
                            {"tfd": 3, "events": 0x80000019, "data": 0xFEDCBA9876543210}]


def test_inotify_watch_line() -> None:
    line = ("inotify wd:3 ino:3f7ea sdev:fe00000 mask:80000fff ignored_mask:0 fhandle-bytes:8 fhandle-type:1 "
            "f_handle:eaf7030000000000")
    m = _WATCH.match(line)
    assert m is not None
    assert (int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16) >> 20, int(m.group(4), 16)) == \
        (3, 0x3F7EA, 0xFE, 0x80000FFF)
    assert bytes.fromhex(m.group(8)) == bytes.fromhex("eaf7030000000000")


@pytest.mark.parametrize(("link", "words"), [("anon_inode:[userfaultfd]", "userfaultfd"),
                                             ("anon_inode:[pidfd]", "[pidfd] descriptors are not supported"),
                                             ("anon_inode:[io_uring]", "[io_uring] descriptors")])
def test_other_anon_refused(link: str, words: str) -> None:
    with pytest.raises(Unsupported, match=rf"^fd 9 \({re.escape(link)}\): .*{re.escape(words)}"):
        describe_anon(0, 9, link, parse_fdinfo(BASE), rec())


def _rta(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def test_sock_diag_message() -> None:
    msg = struct.pack("=BBBBIII", abi.AF_UNIX, abi.SOCK_SEQPACKET, 1, 0, 4242, 1, 2)
    msg += _rta(abi.UNIX_DIAG_PEER, struct.pack("=I", 4243))
    msg += _rta(abi.UNIX_DIAG_RQLEN, struct.pack("=II", 70108, 1536))
    msg += _rta(abi.UNIX_DIAG_SHUTDOWN, b"\x02")
    sk = parse(msg)
    assert (sk.ino, sk.type, sk.state, sk.peer, sk.name) == (4242, abi.SOCK_SEQPACKET, 1, 4243, None)
    assert (sk.rqueue, sk.wqueue, sk.shutdown) == (70108, 1536, abi.SEND_SHUTDOWN)
    named = parse(struct.pack("=BBBBIII", abi.AF_UNIX, abi.SOCK_STREAM, 10, 0, 7, 0, 0)
                  + _rta(abi.UNIX_DIAG_NAME, b"/run/x.sock"))
    assert (named.state, named.name, named.peer) == (abi.TCP_LISTEN, b"/run/x.sock", 0)


@pytest.mark.parametrize(("rec", "field"), [
    ({"fd": 4, "type": "epoll", "targets": [{"tfd": 1, "events": 1}]}, "files[fd 4].targets[0].data"),
    ({"fd": 5, "type": "unix", "ino": 1}, "files[fd 5].peer"),
    ({"fd": 6, "type": "eventfd", "count": "1", "semaphore": False}, "files[fd 6].count"),
])
def test_damaged_records_named(rec: dict, field: str) -> None:
    from lazarus.errors import ImageError
    from lazarus.restore.anonfd import check_anon
    with pytest.raises(ImageError, match=re.escape(f"'{field}'")):
        check_anon(rec)


def test_the_restores_copy_of_the_anonymous_kinds_is_anonfds() -> None:
    """restore/files.py imports restore/anonfd.py only for a task with such files: its own lists must be the
    kinds anonfd creates and those whose records it checks."""
    from lazarus.restore import anonfd, files
    assert set(anonfd.KINDS) == files._ANON_KINDS
    assert set(anonfd.SCHEMAS) == files._CHECKED_KINDS
