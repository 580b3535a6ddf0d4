"""restore --pidns: one image restored several times at once, each copy in its own PID namespace with the pid
and thread ids it had (tests/targets/pidns.c checks getpid(), gettid(), /proc/self and its pending signals
itself), under an init of ours (restore/pidns.py)."""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.root

MODES = ("eager", "lazy")
COPIES = 3


def nspid(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^NSpid:\s*(.*)$", text, re.M)
    assert m is not None, text
    return [int(x) for x in m.group(1).split()]


def ppid(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^PPid:\s*(\d+)$", text, re.M)
    assert m is not None, text
    return int(m.group(1))


def pidns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def inits() -> set[int]:
    """Every live init of a `restore --pidns` on the machine."""
    return {p for p in (int(n) for n in os.listdir("/proc") if n.isdigit())
            if H.comm(p) == "lazarus-init" and H.is_alive(p)}


def restore_copies(h: H.Harness, image: Path, target: H.Target, n: int, *extra: str,
                   lazy: bool = False) -> list[H.Restored]:
    copies = []
    for _ in range(n):
        r = h.restore(image, "--pidns", *extra, lazy=lazy, like=target)
        assert r.returncode == 0, f"restore --pidns failed: exit {r.returncode}\n{r.stderr}"
        assert r.pid is not None and r.target is not None, r.stderr
        copies.append(r)
    return copies


def check_copy(r: H.Restored, original: int) -> int:
    """The pidfile's pid is the process as seen from here, whose pid in its own namespace is the original's,
    a child of that namespace's init. Returns the init's pid."""
    assert r.pid is not None
    ids = nspid(r.pid)
    assert ids == [r.pid, original], f"pidfile pid {r.pid}: NSpid {ids}, expected [{r.pid}, {original}]"
    assert pidns_of(r.pid) != pidns_of(os.getpid())
    init = ppid(r.pid)
    assert nspid(init) == [init, 1], f"parent {init} of {r.pid} is not its namespace's pid 1: {nspid(init)}"
    assert H.comm(init) == "lazarus-init"
    assert pidns_of(init) == pidns_of(r.pid)
    assert os.getpgid(init) == init, "the init leads a process group of its own"
    status = Path(f"/proc/{init}/status").read_text()
    rss = re.search(r"^VmRSS:\s*(\d+) kB", status, re.M)
    assert rss is not None and int(rss.group(1)) <= 16, f"init {init} is not tiny: {rss and rss.group(0)}"
    assert os.listdir(f"/proc/{init}/fd") == [], "the init holds fds"
    return init


def run_one(h: H.Harness, case: H.Case, r: H.Restored, init: int) -> None:
    """Trigger the copy's checks, require PASS, and its exit status 0 as its init (its parent, orphaned to
    us, the subreaper, once `restore -d` exited) reaps and reports it."""
    assert r.target is not None
    r.target.mark()
    H.expect_pass(h.run_case(case, r.target), r.target, r)
    if isinstance(r.proc, subprocess.Popen):  # restore without -d: it reaps the init itself
        return
    assert H.reap(init, 15) == 0, f"init {init}: not exit status 0; {r.target.describe()}"
    assert not H.is_alive(r.target.pid)


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_restores_of_one_image(harness: H.Harness, mode: str) -> None:
    """Three --pidns restores of one image run at once, each with the original pid inside its own namespace;
    killing one (its namespace ends with it) leaves the others running, and each of those passes its checks."""
    case = H.CASES_BY_ID["pidns"]
    target = harness.start_case(case)
    original = target.pid
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    copies = restore_copies(harness, image, target, COPIES, lazy=mode == "lazy")
    ns_inits = [check_copy(r, original) for r in copies]
    assert len({r.pid for r in copies}) == COPIES and len(set(ns_inits)) == COPIES
    assert len({pidns_of(r.pid) for r in copies if r.pid}) == COPIES
    assert all(r.target is not None and r.target.alive() for r in copies)

    first = copies[0]
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while H.is_alive(ns_inits[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert H.reap(ns_inits[0], 10) == 128 + signal.SIGKILL, f"init {ns_inits[0]} outlived the process it runs"
    for r, init in zip(copies[1:], ns_inits[1:], strict=True):
        assert r.target is not None and r.target.alive(), f"pid {r.pid} died with another copy"
        assert H.is_alive(init)
    for r, init in zip(copies[1:], ns_inits[1:], strict=True):
        run_one(harness, case, r, init)


def test_concurrent_lazy_restores_through_one_server(harness: H.Harness, tmp_path: Path) -> None:
    """Three --pidns lazy restores of one image handed to one `lazarus lazy-pages` server: it finds each
    process's task in the image by its pid inside its namespace, and serves all three."""
    case = H.CASES_BY_ID["pidns"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    sock_dir = tmp_path / "srv"
    sock_dir.mkdir(mode=0o700)
    sock = sock_dir / "lazy.sock"
    server = subprocess.Popen([sys.executable, "-m", "lazarus", "lazy-pages", "-D", str(image), "--socket",
                               str(sock), "--linger", "1"], cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    harness.popens.append(server)
    harness.register(server.pid, "lazy-pages server")
    deadline = time.monotonic() + 20
    while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sock.exists(), "lazy-pages server did not listen"
    copies = restore_copies(harness, image, target, COPIES, "--lazy-pages-socket", str(sock), lazy=True)
    ns_inits = [check_copy(r, target.pid) for r in copies]
    for r, init in zip(copies, ns_inits, strict=True):
        run_one(harness, case, r, init)
    out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert f"served {COPIES} process(es)" in out, out


@pytest.mark.parametrize("mode", MODES)
def test_threaded_target(harness: H.Harness, mode: str) -> None:
    """threads.c (threads waiting in many ways, each checking its own tid) restored with --pidns."""
    case = H.CASES_BY_ID["threads"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (r,) = restore_copies(harness, image, target, 1, lazy=mode == "lazy")
    run_one(harness, case, r, check_copy(r, target.pid))


@pytest.mark.parametrize("mode", MODES)
def test_foreground_exit_status_and_forwarded_signal(harness: H.Harness, mode: str) -> None:
    """Without -d the restore waits for its namespace's init, which exits with the process's status: 0 once it
    passes; and SIGTERM sent to the init is forwarded to the process, which dies of it (128 + 15). Lazily, the
    restore serves the pages itself meanwhile."""
    case = H.CASES_BY_ID["pidns"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    lazy = mode == "lazy"
    r = harness.restore(image, "--pidns", like=target, detach=False, lazy=lazy)
    assert r.pid is not None and r.target is not None, r.stderr
    init = check_copy(r, target.pid)
    run_one(harness, case, r, init)
    assert isinstance(r.proc, subprocess.Popen)
    assert r.proc.wait(30) == 0, r.stderr

    r = harness.restore(image, "--pidns", like=target, detach=False, lazy=lazy)
    assert r.pid is not None and r.target is not None, r.stderr
    init = check_copy(r, target.pid)
    os.kill(init, signal.SIGTERM)
    assert isinstance(r.proc, subprocess.Popen)
    assert r.proc.wait(30) == 128 + signal.SIGTERM, r.stderr
    assert not H.is_alive(r.pid) and not H.is_alive(init)


def test_failed_restore_leaves_nothing(harness: H.Harness) -> None:
    """A restore that fails once the namespace and the task exist (a lock the process held is taken
    meanwhile) kills the task and the init: no namespace is left behind, and the error is one line."""
    import fcntl

    case = H.CASES_BY_ID["locks"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (task_file,) = [p for p in image.iterdir() if p.name.startswith("task-")]
    rec = next(f for f in json.loads(task_file.read_text())["files"] if f["fd"] == 10)
    before = inits()
    with open(rec["path"], "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        r = harness.restore(image, "--pidns", like=target)
        assert isinstance(r.proc, subprocess.CompletedProcess)
        H.assert_clean_error(r.proc, "fd 10", "flock", "held by another process")
    assert inits() <= before, f"inits left behind: {inits() - before}"
    left = [p for p in (int(n) for n in os.listdir("/proc") if n.isdigit())
            if H.is_alive(p) and p != target.pid and _inner(p) == target.pid]
    assert left == [], f"a task with the image's pid inside a namespace is left: {left}"
    assert H.reap_orphans(grace=1.0) == []


def _inner(pid: int) -> int | None:
    try:
        ids = nspid(pid)
    except (OSError, AssertionError):
        return None
    return ids[-1] if len(ids) > 1 else None


def host_pid_of(inner: int, like: int) -> int:
    """The pid out here of the process whose pid is `inner` in the PID namespace of process `like`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for p in (int(n) for n in os.listdir("/proc") if n.isdigit()):
            try:
                if nspid(p)[-1] == inner and len(nspid(p)) > 1 and pidns_of(p) == pidns_of(like):
                    return p
            except (OSError, AssertionError):
                continue
        time.sleep(0.02)
    raise AssertionError(f"no process with pid {inner} in the namespace of {like}")


def test_lazy_fork_child_inside_the_namespace(harness: H.Harness) -> None:
    """forkwait.c forks while its pages are still missing: the lazy server (which knows tasks by their pids out
    here) serves the child too, in the namespace, and both pass their checks."""
    target = harness.start_target("forkwait")
    assert H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (r,) = restore_copies(harness, image, target, 1, "--no-background", lazy=True)
    init = check_copy(r, target.pid)
    assert r.target is not None
    r.target.mark()
    r.target.signal(signal.SIGUSR2)
    inner = 0
    deadline = time.monotonic() + 20
    while not inner and time.monotonic() < deadline:
        found = [ln for ln in target.log.read_text().splitlines() if ln.startswith("# forked child ")]
        inner = int(found[-1].split()[-1]) if found else 0
        time.sleep(0.02)
    assert inner, r.target.describe()
    child = host_pid_of(inner, r.target.pid)
    harness.register(child, "fork child")
    assert ppid(child) == r.target.pid
    assert H.wait_in_syscall(child, H.SYS_RT_SIGSUSPEND, 10)
    os.kill(child, signal.SIGUSR2)
    H.expect_pass(r.target.wait_result(60), r.target, r)
    assert H.reap(init, 15) == 0


def test_adopt_inside_the_namespace(harness: H.Harness) -> None:
    """Every Lazarus process serving a --pidns lazy restore killed at once: the process waits in its fault;
    `lazy-pages --adopt PID` with its pid out here finds its task in the image by its pid inside, and serves it."""
    from test_lazy_anchor import kill_servers

    case = H.CASES_BY_ID["memory-close"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (r,) = restore_copies(harness, image, target, 1, "--no-background", lazy=True)
    init = check_copy(r, target.pid)
    assert r.pid is not None and r.target is not None
    kill_servers(harness, r.pid)
    harness.settle(case, r.target)
    r.target.mark()
    harness.trigger(case, r.target)
    time.sleep(1.0)
    assert H.is_alive(r.pid) and "userfault" in Path(f"/proc/{r.pid}/wchan").read_text()
    adopt = subprocess.run([sys.executable, "-m", "lazarus", "lazy-pages", "--adopt", str(r.pid), "-D", str(image)],
                           cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    H.expect_pass(r.target.wait_result(60), r.target, r)
    assert adopt.returncode == 0, adopt.stderr
    assert f"adopted pid {r.pid}" in adopt.stdout, adopt.stdout
    assert H.reap(init, 15) == 0


def test_restore_beside_the_running_original(harness: H.Harness) -> None:
    """dump --leave-running, then restore --pidns while the original still runs with that pid: no "pid in
    use" refusal, and the original and the copy each pass their checks."""
    case = H.CASES_BY_ID["pidns"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, res.stderr
    assert target.alive()
    plain = harness.restore(image, like=None)
    assert plain.returncode == 1 and f"pid {target.pid} is already in use" in plain.stderr, plain.stderr
    (r,) = restore_copies(harness, image, target, 1)
    init = check_copy(r, target.pid)
    run_one(harness, case, r, init)
    assert target.alive()
    target.mark()
    H.expect_pass(harness.run_case(case, target), target)
    assert target.wait_exit(15) == 0


def tree_in_namespace(root: int) -> dict[int, tuple[int, int, int, int]]:
    """pid out here -> (pid, ppid, pgid, sid) inside the namespace, for `root` and every descendant."""
    out = {}
    for pid in [root, *H.descendants(root)]:
        status = Path(f"/proc/{pid}/status").read_text()
        ids = [re.search(rf"^{k}:\s*(.*)$", status, re.M) for k in ("NSpid", "NSpgid", "NSsid")]
        assert all(ids), status
        inner = [int(m.group(1).split()[-1]) for m in ids if m]
        stat = Path(f"/proc/{pid}/stat").read_text()
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        parent_inner = 1 if parent == ppid(root) else nspid(parent)[-1]
        out[pid] = (inner[0], parent_inner, inner[1], inner[2])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_restores_of_a_tree(harness: H.Harness, mode: str) -> None:
    """Three --pidns restores of one image of a process tree (tests/targets/tree.c: sessions, groups, zombies,
    a stopped child, a subreaper) at once: each tree has the image's pids, parents, groups and sessions inside
    its own namespace under its own init, the pidfile holds the root's pid out here, and each passes its check."""
    from test_tree import started

    case = H.CASES_BY_ID["tree"]
    target, want = started(harness)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    # the image's view: pid -> (pid, ppid, pgid, sid), the root's parent being the namespace's init
    expected = sorted((pid, 1 if pid == target.pid else pp, pg, sid) for pid, (_, _, pp, pg, sid) in want.items())
    copies = restore_copies(harness, image, target, COPIES, lazy=mode == "lazy")
    ns_inits = [check_copy(r, target.pid) for r in copies]
    assert len(set(ns_inits)) == COPIES and len({pidns_of(r.pid) for r in copies if r.pid}) == COPIES
    for r in copies:
        assert r.pid is not None
        seen = tree_in_namespace(r.pid)
        assert sorted(seen.values()) == expected, f"copy {r.pid}: {sorted(seen.values())} != {expected}"
        assert {pidns_of(p) for p in seen} == {pidns_of(r.pid)}
        states = sorted(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] for p in seen)
        assert states == sorted(s for s, *_ in want.values()), f"copy {r.pid}: states {states}"
    for r, init in zip(copies, ns_inits, strict=True):
        run_one(harness, case, r, init)


@pytest.mark.parametrize("mode", MODES)
def test_tree_in_foreground(harness: H.Harness, mode: str) -> None:
    """restore --pidns of a tree without -d: it waits for the namespace's init (serving every process's pages
    itself when lazy) and exits with the root's status once the tree has passed its check."""
    from test_tree import started

    case = H.CASES_BY_ID["tree"]
    target, _ = started(harness)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    r = harness.restore(image, "--pidns", like=target, detach=False, lazy=mode == "lazy")
    assert r.pid is not None and r.target is not None, r.stderr
    init = check_copy(r, target.pid)
    assert len(H.descendants(r.pid)) == 9
    run_one(harness, case, r, init)
    assert isinstance(r.proc, subprocess.Popen)
    assert r.proc.wait(30) == 0, r.stderr
    assert not H.is_alive(init)


@pytest.mark.parametrize("mode", MODES)
def test_shared_fd_table_in_each_copy(harness: H.Harness, mode: str) -> None:
    """clone_files.c (a parent and its child sharing one fd table) restored twice with --pidns: each copy's pair
    shares its own table again (each checks it: one process's open and close seen by the other)."""
    case = H.CASES_BY_ID["clone-files"]
    target = harness.start_case(case)
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    copies = restore_copies(harness, image, target, 2, lazy=mode == "lazy")
    inits = [check_copy(r, target.pid) for r in copies]
    for r, init in zip(copies, inits, strict=True):
        run_one(harness, case, r, init)
