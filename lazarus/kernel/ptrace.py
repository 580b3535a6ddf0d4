"""ptrace: seize, interrupt, registers and regsets, signal mask and queues, syscall stepping, detach."""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
import os
import signal
import time

from lazarus.errors import KernelError, LazarusError, NoSuchTask
from lazarus.kernel import abi
from lazarus.kernel.syscall import libc
from lazarus.records import record

_ptrace = libc.ptrace
_ptrace.restype = C.c_long
_ptrace.argtypes = [C.c_long, C.c_int, C.c_void_p, C.c_void_p]

# Test hook: with LAZARUS_TEST_KILL_AT_PTRACE=K in the environment, this process SIGKILLs itself just before its
# K-th ptrace call, as an OOM kill would at that moment (tests/test_dump_killed.py walks K over a whole dump).
# Only tests set it; the dump's watchdog turns it off in itself (set_test_kill(0)).
_test_kill_at = 0
_test_fail_at = 0
_calls = 0
with contextlib.suppress(ValueError):
    _test_kill_at = int(os.environ.get("LAZARUS_TEST_KILL_AT_PTRACE", "0"))


def set_test_kill(k: int) -> None:
    """Die (SIGKILL) just before the k-th ptrace call from now on (0: never). Tests only."""
    global _test_kill_at, _test_fail_at, _calls
    _test_kill_at, _test_fail_at, _calls = k, 0, 0


def set_test_fail(k: int) -> None:
    """Make the k-th ptrace call from now on fail with EIO without being made (0: never). Tests only."""
    global _test_kill_at, _test_fail_at, _calls
    _test_kill_at, _test_fail_at, _calls = 0, k, 0


def call_count() -> int:
    """ptrace calls made by this process since start (or since set_test_kill)."""
    return _calls


def ptrace(req: int, pid: int, addr: int | object = 0, data: int | object = 0, *, what: str = "") -> int:
    global _calls
    _calls += 1
    if _calls == _test_kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if _calls == _test_fail_at:
        raise KernelError(f"{what or f'ptrace({req:#x})'} (failed by the test hook)", errno.EIO, pid=pid)
    C.set_errno(0)
    a = addr if not isinstance(addr, int) else C.c_void_p(addr)
    d = data if not isinstance(data, int) else C.c_void_p(data)
    ret = _ptrace(req, pid, a, d)
    if ret == -1:
        err = C.get_errno()
        if err:
            if err == errno.ESRCH:
                raise NoSuchTask(f"{what or 'ptrace'}: no such process or not stopped: {pid}", pid=pid)
            raise KernelError(what or f"ptrace({req:#x})", err, pid=pid)
    return ret


@record(frozen=True, slots=True)
class WaitStatus:
    """A decoded waitpid status."""

    pid: int
    raw: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.raw)

    @property
    def signaled(self) -> bool:
        return os.WIFSIGNALED(self.raw)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.raw)

    @property
    def exit_code(self) -> int:
        return os.WEXITSTATUS(self.raw)

    @property
    def term_sig(self) -> int:
        return os.WTERMSIG(self.raw)

    @property
    def stop_sig(self) -> int:
        return os.WSTOPSIG(self.raw)

    @property
    def event(self) -> int:
        return (self.raw >> 16) & 0xFF

    @property
    def syscall_stop(self) -> bool:
        return self.stopped and self.stop_sig == (abi.SIGTRAP | 0x80)

    def __str__(self) -> str:
        if self.exited:
            return f"exited with status {self.exit_code}"
        if self.signaled:
            return f"killed by signal {self.term_sig}"
        if self.stopped:
            return f"stopped by signal {self.stop_sig} (event {self.event})"
        return f"status {self.raw:#x}"


def wait(pid: int, timeout: float = 10.0, nap: float = 0.005) -> WaitStatus:
    """waitpid(pid, __WALL) bounded by `timeout` seconds; `nap`: the longest sleep between two polls (a caller
    whose task works for milliseconds, and who hands on its results at once, polls closer, and never spins: the
    task needs the CPU more than we do)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG | 0x40000000)  # __WALL
        except ChildProcessError as e:
            raise NoSuchTask(f"waitpid: no such child {pid}", pid=pid) from e
        if wpid:
            return WaitStatus(wpid, status)
        now = time.monotonic()
        if now > deadline:
            raise LazarusError(f"timed out waiting for task {pid} to stop", pid=pid)
        # Injected syscalls stop again within tens of microseconds: spin for the first 2 ms rather
        # than sleep (a sleep costs far more than the stop itself), then back off. The spin yields the CPU
        # each time: on a busy machine the task we wait for may need this very CPU to get there.
        if now - start > (0.002 if nap >= 0.005 else 0.0):
            time.sleep(min(nap, (now - start) / 10))
        else:
            os.sched_yield()


def try_wait(pid: int) -> WaitStatus | None:
    """waitpid(pid, WNOHANG | __WALL): its status change if one is waiting, else None."""
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG | 0x40000000)  # __WALL
    except ChildProcessError as e:
        raise NoSuchTask(f"waitpid: no such child {pid}", pid=pid) from e
    return WaitStatus(wpid, status) if wpid else None


def seize(pid: int, options: int = abi.PTRACE_O_TRACESYSGOOD) -> None:
    ptrace(abi.PTRACE_SEIZE, pid, 0, options, what=f"seize pid {pid}")


def interrupt(pid: int) -> None:
    ptrace(abi.PTRACE_INTERRUPT, pid, what="PTRACE_INTERRUPT")


def set_options(pid: int, options: int) -> None:
    ptrace(abi.PTRACE_SETOPTIONS, pid, 0, options, what="PTRACE_SETOPTIONS")


def detach(pid: int, sig: int = 0) -> None:
    ptrace(abi.PTRACE_DETACH, pid, 0, sig, what="PTRACE_DETACH")


def cont(pid: int, sig: int = 0) -> None:
    ptrace(abi.PTRACE_CONT, pid, 0, sig, what="PTRACE_CONT")


def syscall_step(pid: int, sig: int = 0) -> None:
    ptrace(abi.PTRACE_SYSCALL, pid, 0, sig, what="PTRACE_SYSCALL")


def get_regs(pid: int) -> abi.user_regs_struct:
    regs = abi.user_regs_struct()
    ptrace(abi.PTRACE_GETREGS, pid, 0, C.byref(regs), what="PTRACE_GETREGS")
    return regs


def set_regs(pid: int, regs: abi.user_regs_struct) -> None:
    ptrace(abi.PTRACE_SETREGS, pid, 0, C.byref(regs), what="PTRACE_SETREGS")


def get_regset(pid: int, note: int, size: int = 4096) -> bytes:
    buf = C.create_string_buffer(size)
    iov = abi.iovec(C.cast(buf, C.c_void_p), size)
    ptrace(abi.PTRACE_GETREGSET, pid, note, C.byref(iov), what=f"PTRACE_GETREGSET {note:#x}")
    return buf.raw[: iov.iov_len]


def get_regset_whole(pid: int, note: int) -> bytes:
    """The whole regset, at the length the kernel reports for this CPU.

    The kernel trims iov_len to min(buffer, regset size) and never says it truncated, so the buffer grows until
    the answer is shorter than it: the XSTATE regset is 2432 bytes on one CPU and 11008 with AMX, and a later
    CPU may have more.
    """
    size = 16384
    while True:
        data = get_regset(pid, note, size)
        if len(data) < size:
            return data
        size *= 4


def set_regset(pid: int, note: int, data: bytes) -> None:
    buf = C.create_string_buffer(data, len(data))
    iov = abi.iovec(C.cast(buf, C.c_void_p), len(data))
    ptrace(abi.PTRACE_SETREGSET, pid, note, C.byref(iov), what=f"PTRACE_SETREGSET {note:#x}")


def regs_to_bytes(regs: abi.user_regs_struct) -> bytes:
    return bytes(regs)


def regs_from_bytes(data: bytes) -> abi.user_regs_struct:
    if len(data) != abi.USER_REGS_SIZE:
        raise ValueError(f"register block is {len(data)} bytes, expected {abi.USER_REGS_SIZE}")
    return abi.user_regs_struct.from_buffer_copy(data)


def get_sigmask(pid: int) -> int:
    mask = C.c_uint64()
    ptrace(abi.PTRACE_GETSIGMASK, pid, 8, C.byref(mask), what="PTRACE_GETSIGMASK")
    return mask.value


def set_sigmask(pid: int, mask: int) -> None:
    m = C.c_uint64(mask)
    ptrace(abi.PTRACE_SETSIGMASK, pid, 8, C.byref(m), what="PTRACE_SETSIGMASK")


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Every queued siginfo of the thread (shared=False) or process (shared=True) queue."""
    out: list[bytes] = []
    batch = 32
    buf = C.create_string_buffer(abi.SIGINFO_SIZE * batch)
    while True:
        args = abi.peeksiginfo_args(len(out), abi.PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        n = ptrace(abi.PTRACE_PEEKSIGINFO, pid, C.byref(args), buf, what="PTRACE_PEEKSIGINFO")
        for i in range(n):
            out.append(buf.raw[i * abi.SIGINFO_SIZE:(i + 1) * abi.SIGINFO_SIZE])
        if n < batch:
            return out


def rseq_configuration(pid: int) -> abi.ptrace_rseq_configuration:
    conf = abi.ptrace_rseq_configuration()
    ptrace(abi.PTRACE_GET_RSEQ_CONFIGURATION, pid, C.sizeof(conf), C.byref(conf),
           what="PTRACE_GET_RSEQ_CONFIGURATION")
    return conf


def get_siginfo(pid: int) -> bytes:
    buf = C.create_string_buffer(abi.SIGINFO_SIZE)
    ptrace(abi.PTRACE_GETSIGINFO, pid, 0, buf, what="PTRACE_GETSIGINFO")
    return buf.raw


def peek_word(pid: int, addr: int) -> int:
    C.set_errno(0)
    ret = _ptrace(abi.PTRACE_PEEKDATA, pid, C.c_void_p(addr), None)
    err = C.get_errno()
    if err:
        raise KernelError(f"PTRACE_PEEKDATA {addr:#x}", err, pid=pid)
    return ret & 0xFFFFFFFFFFFFFFFF


def traceme() -> None:
    ptrace(abi.PTRACE_TRACEME, 0, what="PTRACE_TRACEME")

