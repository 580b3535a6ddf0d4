"""process_vm_readv / process_vm_writev for large scatter lists.

An iovec list here is a sequence of (address, length) pairs. The kernel takes at most IOV_MAX (1024) elements
per side and call and may stop early at a remote range it cannot access; these wrappers cut any number of
elements into batches, continue after partial transfers, and report exactly where a transfer stopped.

The iovec arrays are built as flat arrays of u64 (base, len, base, len, ...), the layout of struct iovec,
which is much cheaper than ctypes arrays of structs for 10^5 elements.
"""

from __future__ import annotations

import array
import errno
from collections.abc import Sequence

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi
from lazarus.kernel.syscall import buffer_address, raw_syscall

Iov = tuple[int, int]
IOV_MAX = abi.IOV_MAX


class PartialTransfer(KernelError):
    """A transfer stopped before the end: `done` bytes moved, the remote side failed at `remote_address`."""

    def __init__(self, what: str, err: int, done: int, remote_address: int, *, pid: int | None = None) -> None:
        super().__init__(f"{what}: stopped at remote {remote_address:#x} after {done} bytes", err, pid=pid)
        self.done = done
        self.remote_address = remote_address


def _batches(local: Sequence[Iov], remote: Sequence[Iov]):
    """Yield (local_u64_array, nlocal, remote_u64_array, nremote, nbytes) batches covering both lists.

    Each batch has at most IOV_MAX elements per side and the same byte count on both sides; elements are
    split where the two sides' boundaries differ.
    """
    li = ri = 0
    loff = roff = 0
    nl, nr = len(local), len(remote)
    while li < nl and ri < nr:
        la: array.array = array.array("Q")
        ra: array.array = array.array("Q")
        total = 0
        lcount = rcount = 0
        last_lend = last_rend = -1
        while li < nl and ri < nr:
            lbase, llen = local[li]
            rbase, rlen = remote[ri]
            lrem, rrem = llen - loff, rlen - roff
            if lrem <= 0:
                li, loff = li + 1, 0
                continue
            if rrem <= 0:
                ri, roff = ri + 1, 0
                continue
            n = lrem if lrem < rrem else rrem
            la_addr, ra_addr = lbase + loff, rbase + roff
            # extend the previous element when contiguous on that side, else start a new one
            lnew, rnew = la_addr != last_lend, ra_addr != last_rend
            if (lnew and lcount == IOV_MAX) or (rnew and rcount == IOV_MAX):
                break
            if lnew:
                la.append(la_addr)
                la.append(n)
                lcount += 1
            else:
                la[-1] += n
            if rnew:
                ra.append(ra_addr)
                ra.append(n)
                rcount += 1
            else:
                ra[-1] += n
            last_lend, last_rend = la_addr + n, ra_addr + n
            total += n
            loff += n
            roff += n
            if loff == llen:
                li, loff = li + 1, 0
            if roff == rlen:
                ri, roff = ri + 1, 0
        if total == 0:
            break
        yield la, lcount, ra, rcount, total


def _transfer(nr: int, what: str, pid: int, local: Sequence[Iov], remote: Sequence[Iov], strict: bool) -> int:
    ltotal = sum(n for _, n in local)
    rtotal = sum(n for _, n in remote)
    if ltotal != rtotal:
        raise ValueError(f"{what}: local iovecs hold {ltotal} bytes, remote {rtotal}")
    done = 0
    for la, lcount, ra, rcount, nbytes in _batches(local, remote):
        got = 0
        while got < nbytes:
            if got:
                # continue after a partial transfer: re-cut this batch past `got` bytes
                lsub = _skip(la, got)
                rsub = _skip(ra, got)
                lptr, lc = lsub.buffer_info()[0], len(lsub) // 2
                rptr, rc = rsub.buffer_info()[0], len(rsub) // 2
                keep = (lsub, rsub)  # noqa: F841 - keep the arrays alive during the call
            else:
                lptr, lc, rptr, rc = la.buffer_info()[0], lcount, ra.buffer_info()[0], rcount
            ret, err = raw_syscall(nr, pid, lptr, lc, rptr, rc, 0)
            if ret < 0:
                if err == errno.ESRCH:
                    raise NoSuchTask(f"no such process {pid}", pid=pid)
                if err in (errno.EFAULT, errno.ENOMEM, errno.EIO) and not strict:
                    return done + got
                raise PartialTransfer(what, err, done + got, _remote_at(ra, got), pid=pid)
            if ret == 0:
                if not strict:
                    return done + got
                raise PartialTransfer(what, errno.EFAULT, done + got, _remote_at(ra, got), pid=pid)
            got += ret
        done += got
    return done


def _skip(a: array.array, nbytes: int) -> array.array:
    """The iovec array `a` with its first `nbytes` bytes dropped."""
    out = array.array("Q")
    i = 0
    while i < len(a):
        base, n = a[i], a[i + 1]
        if nbytes >= n:
            nbytes -= n
        else:
            out.append(base + nbytes)
            out.append(n - nbytes)
            out.extend(a[i + 2:])
            break
        i += 2
    return out


def _remote_at(ra: array.array, nbytes: int) -> int:
    i = 0
    while i < len(ra):
        if nbytes < ra[i + 1]:
            return ra[i] + nbytes
        nbytes -= ra[i + 1]
        i += 2
    return ra[-2] + ra[-1] if ra else 0


def readv(pid: int, local: Sequence[Iov], remote: Sequence[Iov], *, strict: bool = True) -> int:
    """Read the remote ranges of `pid` into the local ranges (same total length), in order.

    Returns:
        bytes read (the total, unless strict=False and a remote range was unreadable: then the bytes before it).
    Raises:
        NoSuchTask; PartialTransfer (a KernelError carrying .done and .remote_address) when strict and a remote
        range is unreadable; ValueError if the totals differ.
    """
    return _transfer(abi.SYS.process_vm_readv, "process_vm_readv", pid, local, remote, strict)


def writev(pid: int, local: Sequence[Iov], remote: Sequence[Iov], *, strict: bool = True) -> int:
    """Write the local ranges into the remote ranges of `pid`. Read-only remote mappings fail with EFAULT
    (use /proc/pid/mem there). Same returns/raises as readv()."""
    return _transfer(abi.SYS.process_vm_writev, "process_vm_writev", pid, local, remote, strict)


def read_into(pid: int, remote: Sequence[Iov], buf: bytearray | memoryview | object, offset: int = 0) -> int:
    """Read the remote ranges back to back into the writable buffer `buf` (bytearray, mmap...) at `offset`."""
    base = buffer_address(buf) + offset
    total = sum(n for _, n in remote)
    if offset + total > len(buf):  # type: ignore[arg-type]
        raise ValueError(f"process_vm_readv: {total} bytes do not fit at offset {offset} of a {len(buf)}-byte buffer")  # type: ignore[arg-type]
    return readv(pid, [(base, total)], remote)


def read(pid: int, address: int, length: int) -> bytes:
    """Read `length` bytes at `address` of `pid`."""
    buf = bytearray(length)
    if length:
        read_into(pid, [(address, length)], buf)
    return bytes(buf)


def write(pid: int, address: int, data: bytes | bytearray) -> int:
    """Write `data` at `address` of `pid` (a private copy of data is made for bytes)."""
    if not data:
        return 0
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return writev(pid, [(buffer_address(buf), len(buf))], [(address, len(buf))])


__all__ = ["IOV_MAX", "Iov", "PartialTransfer", "madvise", "process_madvise", "read", "read_into", "readv", "write",
           "writev"]


def process_madvise(pidfd: int, ranges: Sequence[Iov], advice: int, *, pid: int | None = None) -> list[Iov]:
    """Apply `advice` to each (address, length) range of the process behind `pidfd`, one range a call so that
    one failure does not hide the others. Returns the ranges the kernel refused (a range unmapped or remapped
    since is refused with ENOMEM/EINVAL; that is not an error of the caller's)."""
    refused = []
    for addr, length in ranges:
        iov = array.array("Q", (addr, length))
        ret, err = raw_syscall(abi.SYS.process_madvise, pidfd, iov.buffer_info()[0], 1, advice, 0)
        if ret < 0:
            if err == errno.ESRCH:
                raise NoSuchTask(f"no such process {pid}", pid=pid)
            refused.append((addr, length))
    return refused


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on a range of this process (e.g. MADV_DONTNEED on a file mapping: its pages leave our page
    tables and stay in the page cache)."""
    ret, err = raw_syscall(abi.SYS.madvise, address, length, advice)
    if ret < 0:
        raise KernelError(f"madvise {address:#x}+{length:#x} advice {advice}", err)
