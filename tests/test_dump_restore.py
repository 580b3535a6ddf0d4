"""Dump and restore every target, eagerly and lazily, and require each to PASS its own checks.

Also: restore without -d (the command waits and exits with the restored process's status),
`dump --leave-running` (the original and then the copy both PASS), and restoring one image
twice in sequence.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

MODES = ("eager", "lazy")
# Targets whose checks leave the outside world as they found it, so that one image can be run
# more than once. Not memory: its checks write through its shared file mapping (and put the bytes
# back), which changes the file's mtime, and restore rightly refuses a mapped file changed since.
RERUNNABLE = ("regs", "signals", "sigcont", "sigcont-none", "sigcont-thread", "fds", "misc", "sleeper-pause", "files2", "locks", "prctl", "threads")


def dump_ok(h: H.Harness, target: H.Target, *extra: str) -> Path:
    image = h.image_dir()
    res = h.dump(target, image, *extra)
    assert res.returncode == 0, f"dump failed: exit {res.returncode}\n{res.stderr}\n{target.describe()}"
    assert image.is_dir(), f"dump exited 0 but made no {image}"
    return image


def restore_ok(
    h: H.Harness, image: Path, like: H.Target, lazy: bool = False, detach: bool = True
) -> H.Restored:
    r = h.restore(image, lazy=lazy, like=like, detach=detach)
    if detach:
        assert r.returncode == 0, f"restore failed: exit {r.returncode}\n{r.stderr}"
    assert r.pid is not None, f"no pid in the pidfile: exit {r.returncode}\n{r.stderr}"
    assert r.pid == like.pid, f"restored as pid {r.pid}, the original was {like.pid}"
    assert r.target is not None
    return r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", H.CASES, ids=lambda c: c.id)
def test_dump_restore(harness: H.Harness, case: H.Case, mode: str) -> None:
    target = harness.start_case(case)
    image = dump_ok(harness, target)
    assert not target.alive(), f"the original pid {target.pid} still runs after the dump"
    r = restore_ok(harness, image, target, lazy=mode == "lazy")
    result = harness.run_case(case, r.target)
    H.expect_pass(result, r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


@pytest.mark.parametrize("case_id", ["memory-keep", "regs", "sleeper-read", "sleeper-nanosleep"])
def test_restore_in_foreground(harness: H.Harness, case_id: str) -> None:
    """Without -d the restore command stays and exits with the restored process's status."""
    case = H.CASES_BY_ID[case_id]
    target = harness.start_case(case)
    image = dump_ok(harness, target)
    r = restore_ok(harness, image, target, detach=False)
    result = harness.run_case(case, r.target)
    H.expect_pass(result, r.target, r)
    assert isinstance(r.proc, subprocess.Popen)
    try:
        status = r.proc.wait(30)
    except subprocess.TimeoutExpired as e:  # cleanup kills it
        raise AssertionError(f"restore command did not exit: {e}\n{r.stderr}") from e
    assert status == 0, f"restore exited {status}, expected the target's 0\n{r.stderr}"


def test_restore_in_foreground_reports_failure(harness: H.Harness) -> None:
    """The restore command's status is the restored process's: 1 when its checks FAIL."""
    case = H.CASES_BY_ID["sleeper-read"]
    target = harness.start_case(case)
    image = dump_ok(harness, target)
    r = restore_ok(harness, image, target, detach=False)
    harness.settle(case, r.target)
    # Give it something else than what it checks for: the wrong line on its pipe. (Not an rlimit changed
    # from outside: misc.c runs under ids of its own, and this root has no CAP_SYS_RESOURCE for prlimit.)
    with open(f"/proc/{r.pid}/fd/{H.SLEEPER_WAKEUP_FD}", "wb", buffering=0) as f:
        f.write(H.WAKEUP.replace(b"wakeup", b"wakeuq"))
    assert r.target.wait_result(30).startswith("FAIL"), r.target.describe()
    assert isinstance(r.proc, subprocess.Popen)
    assert r.proc.wait(30) == 1, r.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_id", RERUNNABLE)
def test_leave_running_then_restore(harness: H.Harness, case_id: str, mode: str) -> None:
    case = H.CASES_BY_ID[case_id]
    target = harness.start_case(case)
    before = H.snapshot(target.pid)
    image = dump_ok(harness, target, "--leave-running")
    assert target.alive(), "--leave-running: the original was not left running"
    harness.settle(case, target)
    changed = H.diff_snapshots(before, H.snapshot(target.pid))
    assert not changed, f"--leave-running changed the original: {changed}"
    H.expect_pass(harness.run_case(case, target), target)
    assert target.wait_exit(15) == 0, target.describe()

    r = restore_ok(harness, image, target, lazy=mode == "lazy")
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_id", RERUNNABLE)
def test_restore_same_image_twice(harness: H.Harness, case_id: str, mode: str) -> None:
    case = H.CASES_BY_ID[case_id]
    target = harness.start_case(case)
    image = dump_ok(harness, target)
    for attempt in (1, 2):
        r = restore_ok(harness, image, target, lazy=mode == "lazy")
        H.expect_pass(harness.run_case(case, r.target), f"restore #{attempt}", r.target, r)
        assert r.target.wait_exit(15) == 0, f"restore #{attempt}: {r.target.describe()}"


@pytest.mark.parametrize("mode", MODES)
def test_non_root_process(harness: H.Harness, mode: str) -> None:
    """A process of an unprivileged user comes back with its uids, gids and (empty) groups, and passes its
    own checks (misc.c compares its credentials, umask, cwd... with what they were)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # The user needs a directory it can use and the target binary where it can execute it.
    work = Path(tempfile.mkdtemp(prefix="lazarus-nobody-"))
    try:
        os.chmod(work, 0o777)
        exe = work / "misc"
        shutil.copy(harness.bins["misc"], exe)
        os.chmod(exe, 0o755)
        log = work / "misc.log"
        popen = subprocess.Popen(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(exe), str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, cwd=work)
        harness.popens.append(popen)
        harness.register(popen.pid, "target misc as nobody")
        target = H.Target("misc", popen.pid, log, exe, popen, 0, ())
        assert H.wait_for_line(log, "READY", 20, proc=popen), target.describe()
        H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
        image = dump_ok(harness, target)
        r = restore_ok(harness, image, target, lazy=mode == "lazy")
        status = Path(f"/proc/{r.pid}/status").read_text()
        assert "Uid:\t65534\t65534\t65534\t65534" in status and "Gid:\t65534\t65534\t65534\t65534" in status
        r.target.signal()
        H.expect_pass(r.target.wait_result(30), r.target, r)
        assert r.target.wait_exit(15) == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restore_in_foreground_exits_128_plus_signal(harness: H.Harness, sig: signal.Signals) -> None:
    """Without -d, a restored process killed by signal N makes the restore command exit 128+N."""
    case = H.CASES_BY_ID["misc"]
    target = harness.start_case(case)
    image = dump_ok(harness, target)
    r = restore_ok(harness, image, target, detach=False)
    harness.settle(case, r.target)
    os.kill(r.pid, sig)
    assert isinstance(r.proc, subprocess.Popen)
    try:
        status = r.proc.wait(30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"restore command did not exit: {e}\n{r.stderr}") from e
    assert status == 128 + sig, f"restore exited {status}, expected {128 + sig}\n{r.stderr}"


def test_dump_failing_after_the_images_were_written(harness: H.Harness) -> None:
    """The dump writes everything into DIR.tmp-*, then finds DIR created meanwhile and cannot publish: it
    fails with one line, removes what it wrote, and the original continues exactly as it was."""
    case = H.CASES_BY_ID["memory-keep"]
    target = harness.start_case(case)
    before = H.snapshot(target.pid)
    image = harness.image_dir()
    stop = threading.Event()
    made: list[float] = []

    def create_destination_once_the_dump_writes() -> None:
        while not stop.is_set():
            if any(p.name.startswith(image.name + ".tmp") for p in image.parent.iterdir()):
                image.mkdir()
                made.append(time.monotonic())
                return
            time.sleep(0.0005)

    racer = threading.Thread(target=create_destination_once_the_dump_writes, daemon=True)
    racer.start()
    try:
        res = harness.dump(target, image)
    finally:
        stop.set()
        racer.join(5)
    assert made, "the dump's temporary directory was never seen"
    H.assert_clean_error(res, re.escape(str(image)), "exists")
    assert H.sibling_leftovers(image) == [image.name], H.sibling_leftovers(image)
    assert list(image.iterdir()) == [], "the dump wrote into the directory someone else made"
    assert target.alive(), target.describe()
    harness.settle(case, target)
    changed = H.diff_snapshots(before, H.snapshot(target.pid))
    assert not changed, f"the failed dump changed the original: {changed}"
    H.expect_pass(harness.run_case(case, target), target)
    assert target.wait_exit(15) == 0
