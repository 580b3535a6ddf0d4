"""A lazily restored process never reads zeros in place of its data, even when every Lazarus process serving
it is killed at once: it holds one fd of its own userfaultfd (the anchor, lazy/anchor.py), so its faults wait,
and `lazarus lazy-pages --adopt` serves it to the end. Once complete, the anchor is gone from the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

from lazarus.lazy.anchor import ANCHOR_FD_CAP, anchor_fd_number

pytestmark = pytest.mark.root


def dumped(h: H.Harness, case_id: str) -> tuple[H.Case, H.Target, Path]:
    case = H.CASES_BY_ID[case_id]
    target = h.start_case(case)
    image = h.image_dir(f"img-{case_id}")
    res = h.dump(target, image)
    assert res.returncode == 0, res.stderr
    return case, target, image


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit for pid {pid}")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def lazarus_servers(restored: int) -> list[int]:
    """The Lazarus processes serving a `restore --lazy -d`: the daemon (orphaned into this subreaper test
    process) and its children (guard, verifier)."""
    roots = [p for p in H.children_of(os.getpid()) if p != restored and H.is_alive(p)
             and b"lazarus" in cmdline(p) and b"restore" in cmdline(p)]
    out: list[int] = []
    stack = list(roots)
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(c for c in H.children_of(p) if H.is_alive(c) and c != restored)
    return out


def result_after_ready(target: H.Target) -> str:
    text = target.log_text()[target.since:] if target.since else target.log_text()
    return "\n".join(line for line in text.splitlines() if line.startswith(("PASS", "FAIL")))


def test_anchor_fd_number() -> None:
    assert anchor_fd_number(1024, [0, 1, 2]) == 1023
    assert anchor_fd_number(1024, [1023, 1022]) == 1021
    assert anchor_fd_number(1 << 20, []) == ANCHOR_FD_CAP - 1


def test_anchor_held_while_lazy(harness: H.Harness) -> None:
    """While pages are missing the process holds exactly one uffd, at the highest fd its limit allows."""
    case, target, image = dumped(harness, "memory-close")
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    want = min(soft_nofile(r.pid), ANCHOR_FD_CAP) - 1
    assert H.uffd_fds(r.pid) == [want], f"pid {r.pid}: userfaultfds {H.uffd_fds(r.pid)}, expected [{want}]"
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


@pytest.mark.parametrize("case_id", ["sleeper-read", "sleeper-poll", "sleeper-sigwait", "sleeper-nanosleep",
                                     "memory-keep"])
def test_anchor_removed_when_complete(harness: H.Harness, case_id: str) -> None:
    """Once all pages are in, the server takes the anchor out of the process, which notices nothing: a call
    it sleeps in goes on (restarted exactly), and its own checks pass."""
    case, target, image = dumped(harness, case_id)
    r = harness.restore(image, lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    assert H.wait_lazy_complete(r.pid, 30), f"pid {r.pid} still holds a userfaultfd: {H.uffd_fds(r.pid)}"
    log = image / "lazy-pages.log"
    text = log.read_text() if log.exists() else ""
    assert "stays in it" not in text, text  # the server's warning when it could not remove the anchor
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_every_server_killed_at_once(harness: H.Harness) -> None:
    """Server, guard (and verifier) SIGKILLed together: the process waits in its fault, never reads zeros;
    `lazarus lazy-pages --adopt` then serves it and it passes its checks."""
    case, target, image = dumped(harness, "memory-close")
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    kill_servers(harness, r.pid)

    harness.settle(case, r.target)
    harness.trigger(case, r.target)
    # For a few seconds: alive, blocked (its fault waits), and no result -- neither FAIL nor a crash on zeros.
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert H.is_alive(r.pid), f"pid {r.pid} died: {r.target.describe()}"
        assert not result_after_ready(r.target), r.target.describe()
        time.sleep(0.1)
    assert H.proc_state(r.pid) in ("S", "D"), f"pid {r.pid} state {H.proc_state(r.pid)}"
    wchan = Path(f"/proc/{r.pid}/wchan").read_text()
    assert "userfault" in wchan, f"pid {r.pid} waits in {wchan!r}"

    adopt = subprocess.run([sys.executable, "-m", "lazarus", "lazy-pages", "--adopt", str(r.pid), "-D", str(image)],
                           cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    H.expect_pass(r.target.wait_result(60), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()
    assert adopt.returncode == 0, adopt.stderr
    assert f"adopted pid {r.pid}" in adopt.stdout, adopt.stdout


def test_adopt_refuses_a_process_not_waiting(harness: H.Harness) -> None:
    """--adopt of a process holding no userfaultfd (complete): one line, non-zero exit."""
    case, target, image = dumped(harness, "sleeper-read")
    r = harness.restore(image, lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    assert H.wait_lazy_complete(r.pid, 30)
    res = harness.lazarus("lazy-pages", "--adopt", str(r.pid), "-D", str(image))
    H.assert_clean_error(res, "holds no userfaultfd")
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_adopt_refuses_a_process_still_served(harness: H.Harness) -> None:
    """--adopt while the daemon still serves the process: refused (two readers of one uffd would each miss
    the other's events); the process is unaffected and passes."""
    case, target, image = dumped(harness, "memory-close")
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    res = harness.lazarus("lazy-pages", "--adopt", str(r.pid), "-D", str(image))
    H.assert_clean_error(res, "still served")
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def kill_servers(harness: H.Harness, restored: int) -> None:
    deadline = time.monotonic() + 10
    servers = lazarus_servers(restored)
    while len(servers) < 2 and time.monotonic() < deadline:  # the daemon and its guard
        time.sleep(0.02)
        servers = lazarus_servers(restored)
    assert len(servers) >= 2, f"lazy-pages daemon and guard not found: {servers}"
    for pid in servers:
        harness.register(pid, "lazarus server")
    # All at once: stopped first, so that none can act on another's death (the guard would kill the process
    # when it sees the server go, which is its job but not this test's case), then killed.
    for pid in servers:
        os.kill(pid, signal.SIGSTOP)
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(H.is_alive(p) for p in servers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(H.is_alive(p) for p in servers), "the lazarus processes did not die"


def adopt(pid: int, image: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lazarus", "lazy-pages", "--adopt", str(pid), "-D", str(image)],
                            cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_fork_child_waits_too(harness: H.Harness) -> None:
    """A child forked while pages are missing gets an anchor of its own uffd (not its parent's): with every
    Lazarus process killed it waits too, and both are adopted and pass."""
    target = harness.start_target("forkwait")
    H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
    image = harness.image_dir("img-forkwait")
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    parent = r.pid
    r.target.signal(signal.SIGUSR2)
    child = 0
    deadline = time.monotonic() + 20
    while not child and time.monotonic() < deadline:
        found = [ln for ln in target.log.read_text().splitlines() if ln.startswith("# forked child ")]
        child = int(found[-1].split()[-1]) if found else 0
        time.sleep(0.02)
    assert child, r.target.describe()
    harness.register(child, "fork child")
    anchor = min(soft_nofile(parent), ANCHOR_FD_CAP) - 1
    deadline = time.monotonic() + 15
    own = False
    while time.monotonic() < deadline and not own:
        try:
            own = os.stat(f"/proc/{child}/fd/{anchor}").st_ino != os.stat(f"/proc/{parent}/fd/{anchor}").st_ino
        except OSError:
            own = False
        time.sleep(0.02)
    assert own, f"fork child {child} never got its own anchor: {H.uffd_fds(child)}"

    kill_servers(harness, parent)
    os.kill(child, signal.SIGUSR2)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert H.is_alive(child), f"fork child {child} died: {r.target.describe()}"
        assert not result_after_ready(r.target), r.target.describe()
        time.sleep(0.1)
    assert "userfault" in Path(f"/proc/{child}/wchan").read_text()

    procs = [adopt(child, image), adopt(parent, image)]
    try:
        H.expect_pass(r.target.wait_result(60), r.target, r)
        assert r.target.wait_exit(15) == 0, r.target.describe()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_anchor_removed_by_in_process_server(harness: H.Harness) -> None:
    """Without -d the restore command serves its own child: the anchor goes all the same, and the command
    still exits with the process's status (the removal never collects the child's exit)."""
    case, target, image = dumped(harness, "sleeper-read")
    r = harness.restore(image, lazy=True, like=target, detach=False)
    assert r.pid is not None, r.stderr
    assert H.wait_lazy_complete(r.pid, 30), f"pid {r.pid} still holds a userfaultfd: {H.uffd_fds(r.pid)}"
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert isinstance(r.proc, subprocess.Popen)
    assert r.proc.wait(30) == 0, r.stderr


def run_forkwait(target: H.Target) -> str:
    """Trigger forkwait, then its child; returns the result line."""
    target.signal(signal.SIGUSR2)
    child = 0
    deadline = time.monotonic() + 20
    while not child and time.monotonic() < deadline:
        found = [ln for ln in target.log.read_text().splitlines() if ln.startswith("# forked child ")]
        child = int(found[-1].split()[-1]) if found else 0
        time.sleep(0.02)
    assert child, target.describe()
    H.wait_in_syscall(child, H.SYS_RT_SIGSUSPEND, 10)
    os.kill(child, signal.SIGUSR2)
    return target.wait_result(60)


@pytest.mark.parametrize("mode", ["original", "corrupt", "eager"])
def test_forkwait_target_checks_itself(harness: H.Harness, mode: str) -> None:
    """The forkwait target passes as it is and after an eager restore, and fails when its data is damaged."""
    env = {"LAZ_SELFTEST_CORRUPT": "data"} if mode == "corrupt" else None
    target = harness.start_target("forkwait", env=env)
    H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
    if mode == "eager":
        image = harness.image_dir("img-forkwait")
        res = harness.dump(target, image)
        assert res.returncode == 0, res.stderr
        r = harness.restore(image, like=target)
        assert r.returncode == 0 and r.target is not None, r.stderr
        target = r.target
    result = run_forkwait(target)
    if mode == "corrupt":
        assert result.startswith("FAIL"), target.describe()
        assert target.wait_exit(15) == 1, target.describe()
    else:
        H.expect_pass(result, target)
        assert target.wait_exit(15) == 0, target.describe()


def _child_holding_uffd(at: int, replace: bool) -> tuple[int, int, int]:
    """Fork a child that makes a userfaultfd at fd `at` (and, with `replace`, then dup2s /dev/null over it),
    says so, and sleeps in read(2) until told; it exits 0 if it then read b"go". Returns (pid, write end of
    its pipe, our copy of the uffd)."""
    from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open
    from lazarus.kernel.uffd import Uffd

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            u = Uffd.create(0)
            os.dup2(u.fd, at)
            os.write(ready_w, b"u")
            if replace:
                os.read(go_r, 1)
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, at)
                os.write(ready_w, b"r")
            code = 0 if os.read(go_r, 16) == b"go" else 1
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"u"
    pidfd = pidfd_open(pid)
    ours = pidfd_getfd(pidfd, at)
    os.close(pidfd)
    if replace:
        os.write(go_w, b"x")
        assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    return pid, go_w, ours


@pytest.mark.parametrize("replace", [False, True], ids=["ours", "replaced"])
def test_remove_anchor_closes_only_its_own_file(replace: bool) -> None:
    """remove_anchor closes the fd only while it is still the same open file as the server's copy (a process
    may have closed it or dup2'ed something of its own over that number); the process notices nothing: its
    read(2), interrupted by the injection, goes on and gets its data."""
    from lazarus.lazy.anchor import remove_anchor

    at = 900
    pid, go_w, ours = _child_holding_uffd(at, replace)
    try:
        H.wait_in_syscall(pid, H.SYS_READ, 10)
        res = remove_anchor(pid, at, ours)
        link = os.readlink(f"/proc/{pid}/fd/{at}") if os.path.lexists(f"/proc/{pid}/fd/{at}") else None
        if replace:
            assert res == "not ours", res
            assert link == "/dev/null", link
        else:
            assert res == "closed", res
            assert link is None, link
        os.write(go_w, b"go")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(go_w)
        os.close(ours)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_anchors_of_one_fd_table(harness: H.Harness) -> None:
    """clone_files.c restored lazily: P and C share one fd table (CLONE_FILES), and each has its own anchor in
    it, at a number of its own (the highest free, then the next). With every Lazarus process killed, neither can
    be adopted (nothing seen from outside tells whose uffd is whose): refused by name rather than guessed."""
    case, target, image = dumped(harness, "clone-files")
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    p = r.pid
    c = next(int(ln.split()[-1]) for ln in target.log.read_text().splitlines() if ln.startswith("# child: "))
    want = min(soft_nofile(p), ANCHOR_FD_CAP) - 1
    assert sorted(H.uffd_fds(p)) == [want - 1, want] == sorted(H.uffd_fds(c)), f"table: uffds {H.uffd_fds(p)}"
    kill_servers(harness, p)
    for pid, other in ((c, p), (p, c)):
        proc = adopt(pid, image)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert re.search(rf"pid {pid} shares its fd table with pid {other} \(CLONE_FILES\)", err), err
