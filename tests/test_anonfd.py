"""Anonymous-inode fds and unix socket pairs (tests/targets/anonfd.c): what the dump must refuse, naming it,
leaving the process running and unchanged; and a dump with --leave-running, after which both the original (its
socket queues were only peeked) and the restored copy PASS. The eager and lazy round trips of the target run
in test_dump_restore.py (case "anonfd")."""

from __future__ import annotations

import os
import re
import time

import pytest

from lazarus.kernel.pidfd import PidFd

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

REFUSED = {
    "epoll-closed": r"fd {ep} \(epoll\): registered fd {tfd} is closed in the process",
    "sock-closed": r"fd \d+ \(socket:\[\d+\]\): sockets are not supported \(an unconnected unix socket\)",
    "sock-shared": r"fd \d+ \(socket:\[\d+\]\): sockets are not supported \(the socket is shared with pid {me}\)",
    "sock-outside": r"fd {a} \(socket:\[\d+\]\): sockets are not supported \(its peer is outside the process\)",
    "sock-scm": r"fd \d+ \(socket:\[\d+\]\): 1 file descriptors queued in SCM_RIGHTS messages",
    "sock-listen": r"fd \d+ \(socket:\[\d+\]\): sockets are not supported \(a listening unix socket\)",
    "inotify-queued": r"fd \d+ \(anon_inode:inotify\): \d+ bytes of inotify events are queued unread",
}


@pytest.mark.parametrize("mode", sorted(REFUSED))
def test_dump_refuses(harness: H.Harness, mode: str) -> None:
    case = H.Case(f"anonfd-{mode}", "anonfd", (mode,))
    pattern = REFUSED[mode]
    copy = -1
    if mode == "sock-outside":
        target = harness.start_target("anonfd", mode, wait_ready=False)
        deadline = time.monotonic() + 10
        while (m := re.search(r"# socket (\d+) (\d+)", target.log_text())) is None:
            assert time.monotonic() < deadline and target.alive(), target.describe()
            time.sleep(0.01)
        a, b = int(m.group(1)), int(m.group(2))
        with PidFd.open(target.pid) as p:
            copy = p.getfd(b)
        (target.log.parent / (target.log.name + ".d") / "taken").touch()
        assert H.wait_for_line(target.log, "READY", 10, proc=target.popen), target.describe()
        pattern = pattern.format(a=a)
    else:
        target = harness.start_target("anonfd", mode)
    harness.settle(case, target)
    m = re.search(r"# epoll (\d+) target (\d+)", target.log_text())
    if m:
        pattern = pattern.format(ep=m.group(1), tfd=m.group(2))
    if mode == "sock-shared":
        m = re.search(r"# socket (\d+)", target.log_text())
        assert m, target.describe()
        with PidFd.open(target.pid) as p:
            copy = p.getfd(int(m.group(1)))
        pattern = pattern.format(me=os.getpid())
    H.refused_unchanged(harness, case, target, pattern, after_dump=(lambda: os.close(copy)) if copy >= 0 else None)


def test_leave_running_then_restore(harness: H.Harness) -> None:
    """Peeking the socket queues consumed nothing (and put SO_PEEK_OFF back): the original PASSes after the dump,
    and the image restored afterwards PASSes too."""
    case = H.CASES_BY_ID["anonfd"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    H.expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0
    r = harness.restore(image, like=target)
    assert r.returncode == 0 and r.target is not None, f"restore failed: {r.stderr}"
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
