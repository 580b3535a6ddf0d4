"""service._wait_quiet: a new spare prepares only once no request has been in flight for QUIET seconds (no
worker holds its shared flock on the pool's memfd), or after QUIET_MAX."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from lazarus import service


def _pair() -> tuple[int, int]:
    """Two open file descriptions of one memfd, as the pool's workers have (flock locks belong to those)."""
    fd = os.memfd_create("test-requests", os.MFD_CLOEXEC)
    other = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    return fd, other


def test_returns_after_quiet_when_nothing_is_in_flight() -> None:
    fd, other = _pair()
    try:
        t0 = time.monotonic()
        service._wait_quiet(fd)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
        os.close(other)
    assert service.QUIET <= took < service.QUIET_MAX


def test_waits_while_a_request_is_in_flight_then_quiet() -> None:
    fd, other = _pair()
    fcntl.flock(other, fcntl.LOCK_SH)  # a worker took a request
    timer = threading.Timer(0.02, lambda: fcntl.flock(other, fcntl.LOCK_UN))  # and answers it 20 ms later
    try:
        t0 = time.monotonic()
        timer.start()
        service._wait_quiet(fd)
        took = time.monotonic() - t0
    finally:
        timer.join()
        os.close(fd)
        os.close(other)
    # never before the answer (it returns only having seen the lock free), then quiet from the last time it was
    # seen held (one poll before the answer at the latest)
    assert 0.02 <= took < service.QUIET_MAX + 0.02, took


def test_gives_up_after_quiet_max() -> None:
    fd, other = _pair()
    fcntl.flock(other, fcntl.LOCK_SH)  # never answered
    try:
        t0 = time.monotonic()
        service._wait_quiet(fd)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
        os.close(other)
    assert service.QUIET_MAX <= took < service.QUIET_MAX + 0.05, took
