"""This CPU's XSTATE layout (XCR0 and the NT_X86_XSTATE regset size), which every image is checked against.

The layout is read from the regset of a throw-away traced child (a fork, a stop, PTRACE_GETREGSET: 2-4 ms of
every command that needs it). It cannot change before the next boot (XCR0 is programmed once, by the kernel at
boot), so the answer is kept in CACHE, keyed by the boot's id: later commands of the same boot read one small
file instead. The cache is used only if it is ours, in a directory only we can write, and for this boot; any
doubt (missing, foreign, malformed, another boot) means probing again. `lazarus check` always probes afresh
(kernel/features.py) and rewrites the cache.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import os
import signal
import stat
import struct
from collections.abc import Iterator

from lazarus.errors import FeatureMissing
from lazarus.kernel import abi
from lazarus.kernel.syscall import libc

CACHE = "/run/lazarus/cpu-xstate"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"

_ptrace = libc["ptrace"]  # own function object: argtypes here must not clash with ptrace.py's
_ptrace.restype = C.c_long
_ptrace.argtypes = [C.c_long, C.c_int, C.c_void_p, C.c_void_p]

_memo: tuple[int, int] | None = None


def ptrace_call(req: int, pid: int, addr: int, data: object) -> int:
    """ptrace(2) returning 0 or the errno (what the probes need; kernel/ptrace.py raises instead)."""
    C.set_errno(0)
    ret = _ptrace(req, pid, C.c_void_p(addr), data)
    return 0 if ret != -1 else (C.get_errno() or errno.EIO)


def regset(pid: int) -> tuple[int, bytes]:
    """(errno, the whole NT_X86_XSTATE regset) of a stopped tracee. The kernel trims iov_len to the regset's
    length without saying it truncated, so the buffer grows until the answer is shorter than it."""
    size = 16384
    while True:
        buf = C.create_string_buffer(size)
        iov = abi.iovec(C.cast(buf, C.c_void_p), size)
        err = ptrace_call(abi.PTRACE_GETREGSET, pid, abi.NT_X86_XSTATE, C.byref(iov))
        if err:
            return err, b""
        if iov.iov_len < size:
            return 0, buf.raw[: iov.iov_len]
        size *= 4


def parse_xstate(data: bytes) -> tuple[int, int, int]:
    """(xcr0, xstate_size, xstate_bv) from an NT_X86_XSTATE regset.

    The regset is an XSAVE image in the standard (uncompacted) format, so its length is the user xstate size
    and component offsets follow from XCR0. The kernel stores XCR0 in the first word of the FXSAVE area's
    sw_usable bytes (offset 464; the words after it are zero). xstate_bv, the first word of the XSAVE header,
    lists the components this task had in use. Raises ValueError on a regset that is not shaped like that.
    """
    if len(data) < abi.XSAVE_HEADER_OFFSET + 64:
        raise ValueError(f"xstate regset too short: {len(data)} bytes")
    (xcr0,) = struct.unpack_from("<Q", data, abi.USER_XSTATE_XCR0_OFFSET)
    bv, comp = struct.unpack_from("<QQ", data, abi.XSAVE_HEADER_OFFSET)
    if xcr0 & 3 != 3:  # x87 and SSE are architecturally always on
        raise ValueError(f"xstate regset: implausible xcr0 {xcr0:#x} at offset {abi.USER_XSTATE_XCR0_OFFSET}")
    if comp:
        raise ValueError(f"xstate regset in compacted format (xcomp_bv {comp:#x})")
    if bv & ~xcr0:
        raise ValueError(f"xstate regset: xstate_bv {bv:#x} not within xcr0 {xcr0:#x}")
    return xcr0, len(data), bv


@contextlib.contextmanager
def stopped_child() -> Iterator[int | None]:
    """A forked child that asked to be traced by us and stopped itself: its pid, or None if PTRACE_TRACEME
    failed in it. Killed and reaped on leaving."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only stops itself and dies
        try:
            if ptrace_call(abi.PTRACE_TRACEME, 0, 0, None) == 0:
                os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(1)
    try:
        _, status = os.waitpid(pid, 0)
        yield pid if os.WIFSTOPPED(status) else None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def probe() -> tuple[int, int]:
    """(xcr0, xstate_size) from the regset of a child that stops itself under our trace, then is killed.
    Raises FeatureMissing if it cannot be read."""
    with stopped_child() as pid:
        if pid is None:
            raise FeatureMissing("cpu xstate unavailable: PTRACE_TRACEME failed in the child")
        err, data = regset(pid)
    if err:
        raise FeatureMissing(f"cpu xstate unavailable: {os.strerror(err)}")
    try:
        xcr0, size, _ = parse_xstate(data)
    except ValueError as e:
        raise FeatureMissing(f"cpu xstate unavailable: {e}") from None
    return xcr0, size


def machine_xstate() -> tuple[int, int]:
    """(xcr0, xstate_size) of this machine: remembered by this process, else from the boot's cache, else
    probed (and cached). Raises FeatureMissing if it cannot be read."""
    global _memo
    if _memo is None:
        cached = read_cache(CACHE)
        if cached is None:
            cached = probe()
            write_cache(*cached, CACHE)
        _memo = cached
    return _memo


def _boot_id() -> str:
    with open(_BOOT_ID) as f:
        return f.read().strip()


def _ours_and_closed(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read_cache(path: str = CACHE) -> tuple[int, int] | None:
    """The cached layout if the cache is ours, unwritable by others, well-formed and of this boot; else None."""
    try:
        if not _ours_and_closed(os.lstat(os.path.dirname(path))):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _ours_and_closed(st):
                return None
            text = os.read(fd, 256).decode("ascii")
        finally:
            os.close(fd)
        boot, xcr0, size = text.split()
        if boot != _boot_id():
            return None
        value = int(xcr0, 16), int(size)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if value[0] & 3 == 3 and abi.XSAVE_HEADER_OFFSET + 64 <= value[1] <= 1 << 20 else None


def write_cache(xcr0: int, size: int, path: str = CACHE) -> None:
    """Remember the layout for this boot; silently not when the directory cannot be made ours (read-only /run,
    an unprivileged user)."""
    directory = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        if not _ours_and_closed(os.lstat(directory)):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{_boot_id()} {xcr0:#x} {size}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


__all__ = ["CACHE", "machine_xstate", "parse_xstate", "probe", "read_cache", "regset", "write_cache"]
