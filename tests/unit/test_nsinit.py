"""The --pidns init's machine code (lazarus/kernel/nsinit.py), run for real in a forked child standing in for
pid 1: it must reap its children, exit with the root's status, and forward SIGTERM to the root. No namespace
is needed for that, nor root."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time

import pytest

from lazarus.kernel import nsinit

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 machine code")


def test_code_fits_its_page_slots() -> None:
    assert nsinit.CODE_OFFSET >= 0x80 + 3  # after the trampoline's clone3 code and its syscall instruction
    assert nsinit.CODE_OFFSET + len(nsinit.CODE) <= nsinit.DATA_OFFSET
    assert nsinit.DATA_OFFSET + 16 <= mmap.PAGESIZE
    assert nsinit.SIGSET == (1 << 0) | (1 << 1) | (1 << 14) | (1 << 16)  # HUP INT TERM CHLD


def run_init(root: str, other_child: bool = False) -> tuple[int, int]:
    """Fork a stand-in init that forks the root (and with `other_child` another child that exits at once,
    an orphan to reap) and then runs the init code. Returns (init pid, root pid)."""
    r, w = os.pipe()
    init = os.fork()
    if init == 0:  # pragma: no cover - the child: never returns
        try:
            os.close(r)
            if other_child and os.fork() == 0:
                os.close(w)
                os._exit(3)
            root_pid = os.fork()
            if root_pid == 0:
                os.close(w)  # the test reads the pipe to its end
                if root == "exit7":
                    time.sleep(0.2)
                    os._exit(7)
                time.sleep(30)  # "sleep": until a signal ends it
                os._exit(0)
            os.write(w, str(root_pid).encode())
            os.close(w)
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()))
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page[nsinit.CODE_OFFSET:nsinit.CODE_OFFSET + len(nsinit.CODE)] = nsinit.CODE
            page[nsinit.DATA_OFFSET:nsinit.DATA_OFFSET + 8] = nsinit.SIGSET.to_bytes(8, "little")
            base = ctypes.addressof(ctypes.c_char.from_buffer(page))
            fn = ctypes.CFUNCTYPE(None, ctypes.c_long, ctypes.c_long)(base + nsinit.CODE_OFFSET)
            fn(root_pid, base + nsinit.DATA_OFFSET)
        finally:
            os._exit(99)
    os.close(w)
    data = b""
    while chunk := os.read(r, 32):
        data += chunk
    os.close(r)
    return init, int(data)


def wait_code(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"stand-in init {pid} did not exit")


def test_exits_with_the_roots_exit_code_after_reaping_others() -> None:
    init, _root = run_init("exit7", other_child=True)
    assert wait_code(init) == 7


def test_forwards_sigterm_and_exits_128_plus_signal() -> None:
    init, root = run_init("sleep")
    time.sleep(0.3)
    os.kill(init, signal.SIGUSR1)  # not forwarded, not acted on: it stays pending in the init
    time.sleep(0.1)
    assert os.waitpid(init, os.WNOHANG) == (0, 0)
    assert os.path.exists(f"/proc/{root}")
    os.kill(init, signal.SIGTERM)
    assert wait_code(init) == 128 + signal.SIGTERM
