"""Batches of injected system calls (lazarus.remote.Batch): one stop of a task for many calls, run by BATCH_CODE
on the restore's trampoline page. Each test makes a blank task as a restore does (clone3 from the trampoline,
seized and stopped) and checks what the calls did from outside the task."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
from collections.abc import Iterator

import pytest

from lazarus.errors import KernelError
from lazarus.kernel import abi, ptrace
from lazarus.kernel.clone import BATCH_STOP_CODE, Trampoline
from lazarus.remote import Ref, RemoteTask

SIZE = 4 * abi.PAGE_SIZE
_NEG1 = (1 << 64) - 1


def _free_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    for _ in range(1000):
        pid = random.randrange(top // 2, top)
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid found")


@pytest.fixture
def blank() -> Iterator[RemoteTask]:
    """A new task running only the trampoline, stopped, with BATCH_CODE available (as restore_task makes it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (clone3 with set_tid)")
    tramp = Trampoline.map_at([0x2345_0000_0000 + i * (1 << 24) for i in range(64)], SIZE)
    child = 0
    try:
        for _ in range(10):
            with contextlib.suppress(KernelError):
                child = tramp.clone_with_pid(_free_pid())
                break
    finally:
        tramp.unmap()
    assert child
    remote = None
    try:
        ptrace.seize(child, abi.PTRACE_O_TRACESYSGOOD | abi.PTRACE_O_EXITKILL)
        ptrace.interrupt(child)
        assert ptrace.wait(child).event == abi.PTRACE_EVENT_STOP
        remote = RemoteTask(child, tramp.syscall_ip, batch_ip=tramp.batch_ip)
        remote.keep_state()
        remote.use_scratch(tramp.addr + abi.PAGE_SIZE, SIZE - abi.PAGE_SIZE)
        remote.syscall(abi.SYS.close_range, 0, 0xFFFFFFFF, 0)  # what it inherited from us
        yield remote
    finally:
        if remote is not None:
            remote.close()
        os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0x40000000)  # __WALL


def _fds(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def _open_dev_null(b, **kw) -> Ref:  # type: ignore[no-untyped-def]
    return b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring("/dev/null"), abi.O_RDONLY, 0, **kw)


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one-by-one"])
def test_results_refs_and_stores(blank: RemoteTask, batched: bool) -> None:
    if not batched:
        blank.batch_ip = 0  # the path a task without BATCH_CODE takes: the same results
    stops = blank.stops
    b = blank.batch()
    me = b.call(abi.SYS.getpid)
    slot = b.put(bytes(8))
    b.store(me, slot)
    fd = _open_dev_null(b)
    dup = b.call(abi.SYS.fcntl, fd, abi.F_DUPFD, 40)
    b.call(abi.SYS.fcntl, dup, abi.F_SETFD, abi.FD_CLOEXEC)
    flags = b.call(abi.SYS.fcntl, dup, abi.F_GETFD)
    b.call(abi.SYS.close, fd)
    got = b.run()
    assert got[me.index] == blank.pid
    assert int.from_bytes(blank.read(slot, 8), "little") == blank.pid
    assert got[dup.index] >= 40 and got[flags.index] == abi.FD_CLOEXEC
    assert _fds(blank.pid) == {got[dup.index]}
    assert os.readlink(f"/proc/{blank.pid}/fd/{got[dup.index]}") == "/dev/null"
    assert blank.stops - stops == (1 if batched else 6)


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one-by-one"])
def test_stops_at_a_checked_failure(blank: RemoteTask, batched: bool) -> None:
    if not batched:
        blank.traps_ignored = True
    b = blank.batch()
    b.call(abi.SYS.getpid)
    unchecked = b.call(abi.SYS.close, 999, check=False)
    b.call(abi.SYS.close, 998, what="close of fd 998")
    _open_dev_null(b)  # never made
    with pytest.raises(KernelError) as e:
        b.run()
    assert e.value.errno == errno.EBADF and "close of fd 998" in str(e.value)
    assert b.failed_at == 2 and b.results[unchecked.index] == -errno.EBADF and len(b.results) == 3
    assert _fds(blank.pid) == set()
    assert b.run() == []  # the failed batch is emptied


def test_failed_call_whose_result_is_used_stops(blank: RemoteTask) -> None:
    b = blank.batch()
    bad = b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring("/nonexistent/x"), abi.O_RDONLY, 0, check=False)
    b.call(abi.SYS.fcntl, bad, abi.F_DUPFD, 0)
    with pytest.raises(KernelError) as e:
        b.run()
    assert e.value.errno == errno.ENOENT and b.failed_at == 0


def test_sigtrap_disposition_and_mask_kept(blank: RemoteTask) -> None:
    """The batch ends in a trap the tracer suppresses: the task's own SIGTRAP handler stays, nothing is left
    pending, and the injection mask (everything blocked) is back afterwards."""
    handler = 0x1234_5000
    b = blank.batch()
    act = abi.kernel_sigaction(handler, abi.SA_RESTORER, handler, 0)
    b.call(abi.SYS.rt_sigaction, abi.SIGTRAP, b.put_struct(act), 0, 8)
    b.run()
    b.call(abi.SYS.getpid)
    b.call(abi.SYS.umask, 0o22)
    b.run()
    old = blank.put(bytes(32), 512)
    blank.syscall(abi.SYS.rt_sigaction, abi.SIGTRAP, 0, old, 8)
    assert abi.kernel_sigaction.from_buffer_copy(blank.read(old, 32)).sa_handler == handler
    with open(f"/proc/{blank.pid}/status") as f:
        status = dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)
    assert int(status["SigPnd"], 16) == 0 and int(status["ShdPnd"], 16) == 0
    assert int(status["SigCgt"], 16) >> (abi.SIGTRAP - 1) & 1
    blocked = ptrace.get_sigmask(blank.pid)
    assert blocked >> (abi.SIGTRAP - 1) & 1 and blocked >> (abi.SIGUSR1 - 1) & 1


def test_batch_ending_in_sigstop(blank: RemoteTask) -> None:
    """BATCH_STOP_CODE (the dump's: it ends in a SIGSTOP the task sends itself, never a trap) gives the same
    results in one stop, and leaves nothing pending, the mask all blocked and the task stopped for us (not in a
    group stop) between batches."""
    blank.write(blank.batch_ip, BATCH_STOP_CODE)
    blank.batch_stops = True
    before = blank.stops
    for _ in range(3):
        b = blank.batch()
        pid = b.call(abi.SYS.getpid)
        old_umask = b.call(abi.SYS.umask, 0o27)
        b.call(abi.SYS.umask, old_umask)
        b.call(abi.SYS.kill, pid, 0)
        out = b.run()
        assert out[0] == blank.pid and out[2] == 0o27 and out[3] == 0, out
    assert blank.stops == before + 3, "a batch took more than one stop"
    assert blank.syscall(abi.SYS.getpid) == blank.pid  # a plain injected call right after: no stop in its way
    with open(f"/proc/{blank.pid}/status") as f:
        status = dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)
    assert int(status["SigPnd"], 16) == 0 and int(status["ShdPnd"], 16) == 0, status
    assert status["State"].startswith("t"), status["State"]  # a ptrace stop, not a job-control stop (T)
    assert ptrace.get_sigmask(blank.pid) >> (abi.SIGUSR1 - 1) & 1


def test_more_calls_than_fit_are_refused(blank: RemoteTask) -> None:
    b = blank.batch()
    with pytest.raises(Exception, match="does not fit"):
        for _ in range(10_000):
            b.call(abi.SYS.getpid)
    assert not b.fits(10_000)
