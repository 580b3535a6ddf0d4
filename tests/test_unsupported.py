"""What the README ("Today's limits") says a dump refuses: it exits 1 with one line naming the resource,
creates no image directory, and leaves the process running and unchanged (it still PASSes its checks).

Kernel threads and traced processes are in test_bad_input.py; a thread rather than a process is here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

# case -> (unsupported.c mode, what the harness holds of its stdout, a regex the one-line error must match:
# the resource, and the pid or the fd it is found at)
PID = "{pid}"
EXPECTED = {
    "tcp": ("tcp", None, r"fd \d+ .*(socket|tcp|inet)"),
    # threads are dumped; one with credentials of its own is not
    "thread": ("thread", None, PID + r".*thread \d+ .*credentials"),
    # (a child sharing its parent's stdio and log is dumped with it now: tests/test_sharefds.py)
    "pty": ("pty", None, r"fd \d+ .*(pty|tty|terminal)"),
    "seccomp": ("seccomp", None, PID + r".*seccomp"),
    # its registered mapping (VmFlags um) or its fd, whichever the dump meets first
    "uffd": ("uffd", None, r"(fd \d+ |mapping 0x[0-9a-f]+-0x[0-9a-f]+ ).*(userfault|uffd)"),
    "chardev": ("chardev", None, r"fd \d+ \(/dev/kmsg\).*character device"),
    "pipe-to-other": ("plain", "pipe", r"fd 1 .*pipe"),  # its stdout is a pipe whose other end the harness holds
    "socket-to-other": ("plain", "socket", r"fd 1 .*socket"),  # ... a unix socket whose other end it holds
}


def wait_state(pid: int, state: str, timeout: float = 10.0) -> None:
    """Wait until /proc says pid is in state (one letter: Z, T, ...)."""
    deadline = time.monotonic() + timeout
    while H.proc_state(pid) != state and time.monotonic() < deadline:
        time.sleep(0.01)
    assert H.proc_state(pid) == state, f"pid {pid} is in state {H.proc_state(pid)}, not {state}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dump_refuses(harness: H.Harness, name: str) -> None:
    mode, stdout, pattern = EXPECTED[name]
    case = H.Case(f"unsupported-{mode}", "unsupported", (mode,))
    held = None
    if stdout == "socket":
        held, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            target = harness.start_target("unsupported", mode, stdout=theirs.fileno())
        finally:
            theirs.close()
    else:
        target = harness.start_target("unsupported", mode, stdout=subprocess.PIPE if stdout == "pipe" else None)
    try:
        H.refused_unchanged(harness, case, target, pattern.replace(PID, rf"\b{target.pid}\b"))
    finally:
        if held is not None:
            held.close()


def test_dump_refuses_a_thread_of_a_process(harness: H.Harness) -> None:
    """A thread's id rather than its process's: refused, naming the process to dump instead."""
    case = H.Case("unsupported-thread", "unsupported", ("thread",))
    target = harness.start_target("unsupported", "thread")
    harness.settle(case, target)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{target.pid}/task") if int(t) != target.pid)
    assert tids, "the target has no second thread"
    before = H.snapshot(target.pid)
    res = harness.dump(tids[0], harness.image_dir())
    H.assert_clean_error(res, rf"\b{tids[0]}\b.*thread.*\b{target.pid}\b")
    assert not H.diff_snapshots(before, H.snapshot(target.pid))
    H.expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0


def test_dump_refuses_a_zombie(harness: H.Harness) -> None:
    proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL)  # not reaped: it stays a zombie
    harness.popens.append(proc)
    wait_state(proc.pid, "Z")
    started = H.start_time(proc.pid)
    image = harness.image_dir()
    H.assert_clean_error(harness.dump(proc.pid, image), rf"pid {proc.pid}\b.*zombie")
    assert H.sibling_leftovers(image) == []
    assert H.proc_state(proc.pid) == "Z" and H.start_time(proc.pid) == started, "the zombie was reaped or changed"
    assert proc.wait(5) == 0


def test_dump_refuses_a_stopped_process(harness: H.Harness) -> None:
    """Stopped by SIGSTOP: refused (continue it first), and left stopped, as it was."""
    case = H.CASES_BY_ID["misc"]
    target = harness.start_case(case)
    os.kill(target.pid, signal.SIGSTOP)
    wait_state(target.pid, "T")
    before = H.snapshot(target.pid)
    image = harness.image_dir()
    H.assert_clean_error(harness.dump(target, image), rf"pid {target.pid}\b.*stopped", "continue")
    assert H.sibling_leftovers(image) == []
    time.sleep(0.2)
    assert H.proc_state(target.pid) == "T", "the refused dump continued the stopped process"
    assert not H.diff_snapshots(before, H.snapshot(target.pid))
    os.kill(target.pid, signal.SIGCONT)
    H.expect_pass(harness.run_case(case, target), target)
    assert target.wait_exit(10) == 0
