"""Multi-threaded processes beyond the plain eager/lazy runs of test_dump_restore.py (cases threads and
threads-churn): several threads faulting at once on one lazily restored process's userfaultfd, and a dump
repeated against a process whose threads come and go."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from lazarus.kernel.clone import Trampoline

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

NTHREADS = 6  # threads.c


def test_threads_fault_at_once_lazily(harness: H.Harness, tmp_path: Path) -> None:
    """Without background transfer every page comes by fault: the woken threads each read their own slice of a
    buffer (and run on their own stacks) at the same time, so one uffd carries faults of several threads; each
    must be woken with its own page (the target checks its data) and the server must say which threads faulted."""
    case = H.CASES_BY_ID["threads"]
    target = harness.start_case(case)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{target.pid}/task") if int(t) != target.pid)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    # every thread is in the image, and `show` lists them
    shown = harness.lazarus("show", "--json", str(image))
    assert shown.returncode == 0, shown.stderr
    (task,) = json.loads(shown.stdout)["tasks"]
    assert [t["tid"] for t in task["threads"]] == tids, (task["threads"], tids)
    assert sorted(t["comm"] for t in task["threads"]) == ["laz-busy", "laz-cond", "laz-join", "laz-poll",
                                                          "laz-read", "laz-sleep"]
    stats = tmp_path / "stats.json"
    r = harness.restore(image, "--stats", str(stats), "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0
    deadline = time.monotonic() + 20
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    s = json.loads(stats.read_text())
    (root,) = [p for p in s["processes"] if p["pid"] == target.pid]
    assert root["pages_background"] == 0 and root["pages_fault"] > 0, root
    # the main thread and the six others each touch memory only they use (their stacks, their slices)
    assert root["fault_threads"] >= NTHREADS, root


@pytest.mark.parametrize("round_", range(3))
def test_dump_while_threads_come_and_go(harness: H.Harness, round_: int) -> None:
    """Threads created and ended while the dump attaches: the dump catches the set as it is once stopped, and
    the restored process (its churning thread in any state, even in clone) goes on making threads and PASSes."""
    case = H.CASES_BY_ID["threads-churn"]
    target = harness.start_case(case)
    time.sleep(0.05 * round_)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, lazy=bool(round_ % 2), like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0


def test_restore_refuses_a_thread_id_in_use(harness: H.Harness) -> None:
    """A thread's id taken by another process: the restore fails with one line naming it, creating nothing."""
    case = H.CASES_BY_ID["threads"]
    target = harness.start_case(case)
    tid = max(int(t) for t in os.listdir(f"/proc/{target.pid}/task"))
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    tramp = Trampoline.map_at([0x7E0000000000 + i * (1 << 30) for i in range(16)], 4096)
    try:
        holder = tramp.clone_with_pid(tid)  # a child of ours that pauses, with that id
    finally:
        tramp.unmap()
    try:
        res = harness.lazarus("restore", "-D", str(image), "-d")
        H.assert_clean_error(res, rf"thread id {tid} is already in use")
        assert not os.path.exists(f"/proc/{target.pid}"), "the restore left a process behind"
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
