"""`lazarus dump` returns once the original is sent SIGKILL, as CRIU's does (dump(wait_gone=False)): the original
may still be in its exit, freeing its memory, when a restore of it starts. The restore waits for such a pid
(restore._wait_pid_free) and refuses only one that is really in use."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from lazarus.errors import RestoreError
from lazarus.kernel import procfs
from lazarus.restore import _wait_pid_free

_BIG = ("import sys\n"
        "b = bytearray(3 << 29)\n"  # 1.5 GiB, every page touched: its exit takes a while to free them
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n")


def _start_big() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _BIG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_killed_process_still_exiting_is_waited_for() -> None:
    proc = _start_big()
    try:
        proc.send_signal(signal.SIGKILL)
        state = procfs.read_stat(proc.pid).state  # right after the kill: still in its exit, not a zombie yet
        reaper = threading.Thread(target=proc.wait)  # its parent reaps it once it is a zombie, as a shell would
        reaper.start()
        t0 = time.monotonic()
        _wait_pid_free(proc.pid)
        waited = time.monotonic() - t0
        reaper.join(10)
    finally:
        proc.kill()
        proc.wait(10)
    assert state != "Z", "the process was a zombie at once: this run did not exercise the wait for its exit"
    assert waited < 5


def test_a_live_process_is_refused_at_once() -> None:
    proc = _start_big()
    try:
        t0 = time.monotonic()
        with pytest.raises(RestoreError, match=f"pid {proc.pid} is already in use"):
            _wait_pid_free(proc.pid)
        assert time.monotonic() - t0 < 1
    finally:
        proc.kill()
        proc.wait(10)
