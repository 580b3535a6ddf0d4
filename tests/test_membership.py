"""Namespaces and cgroups: a task in a namespace of its own is refused at dump, naming the namespace; a task in
cgroups other than the restorer's comes back in them (v1 and v2 hierarchies, whichever this machine mounts),
and a restore whose cgroup is gone is refused before anything is created."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

from lazarus.kernel import cgroups

pytestmark = pytest.mark.root
MODES = ("eager", "lazy")


def _hierarchies() -> list[str]:
    """One writable v1 hierarchy (pids, else any) and the v2 one, where mounted: their root directories."""
    mounts = cgroups.read_mounts()
    out = []
    v1 = [p for (hid, ctl), p in mounts.items() if hid == -1 and ctl and not ctl.startswith("name=")]
    v1.sort(key=lambda p: not p.endswith("/pids"))
    if v1:
        out.append(v1[0])
    if (0, "") in mounts:
        out.append(mounts[(0, "")])
    return out


@pytest.fixture
def test_cgroups() -> Iterator[list[Path]]:
    """A fresh cgroup below each hierarchy this process is in; removed afterwards (after its members)."""
    ours = cgroups.memberships(os.getpid())
    mounts = cgroups.read_mounts()
    made: list[Path] = []
    name = f"lazarus-test-{secrets.token_hex(4)}"
    for root in _hierarchies():
        key = next((k for k, p in mounts.items() if p == root), None)
        mine = next((m for m in ours if key and (m.hierarchy == 0) == (key[0] == 0)
                     and (key[0] == 0 or m.controllers == key[1])), None)
        if mine is None:
            continue
        base = Path(root) / mine.path.lstrip("/")
        d = base / name
        try:
            d.mkdir()
        except OSError:
            continue
        made.append(d)
    if not made:
        pytest.fail("no cgroup hierarchy here lets root create a cgroup")
    yield made
    for d in made:
        for _ in range(100):
            with contextlib.suppress(OSError):
                d.rmdir()
                break
            time.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
def test_cgroups_come_back(harness: H.Harness, test_cgroups: list[Path], mode: str) -> None:
    target = harness.start_target("cgroup", *map(str, test_cgroups))
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    case = H.Case("cgroup", "cgroup")
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(10) == 0


def test_restore_refuses_missing_cgroup(harness: H.Harness, test_cgroups: list[Path]) -> None:
    target = harness.start_target("cgroup", str(test_cgroups[0]))
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    assert target.wait_exit(10) is not None
    test_cgroups[0].rmdir()
    res = harness.restore(image, like=target)
    H.assert_clean_error(res.proc, str(test_cgroups[0]))
    assert not H.is_alive(target.pid), "a refused restore left a process"


def test_dump_refuses_other_namespace(harness: H.Harness) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed")
    log = harness.path("ns.log")
    popen = subprocess.Popen(["unshare", "--uts", "--", str(harness.bins["misc"]), str(log)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    harness.popens.append(popen)
    harness.register(popen.pid, "target misc in its own uts namespace")
    assert H.wait_for_line(log, "READY", 15, proc=popen)
    image = harness.image_dir()
    res = harness.dump(popen.pid, image)
    H.assert_clean_error(res, r"uts namespace", str(popen.pid))
    assert not image.exists()
    assert H.is_alive(popen.pid), "the refused dump killed the process"


def _start_plain(harness: H.Harness, name: str, preexec=None, new_session: bool = False) -> H.Target:
    log = harness.path(f"{name}-plain.log")
    popen = subprocess.Popen([str(harness.bins[name]), str(log)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec,
                             start_new_session=new_session, close_fds=True)
    harness.popens.append(popen)
    harness.register(popen.pid, f"target {name}")
    assert H.wait_for_line(log, "READY", 15, proc=popen)
    return H.Target(name, popen.pid, log, harness.bins[name], popen)


def test_foreign_session_needs_shell_job(harness: H.Harness) -> None:
    """A process in pytest's session (led by another process) is refused, naming the session and --shell-job;
    with --shell-job it is dumped and comes back in the session of `lazarus restore`, checking itself."""
    target = _start_plain(harness, "signals", preexec=lambda: os.setpgid(0, 0))
    pid = target.pid
    assert os.getsid(pid) != pid
    image = harness.image_dir()
    res = harness.dump(target, image)
    H.assert_clean_error(res, rf"session {os.getsid(pid)}", "--shell-job")
    assert not image.exists() and H.is_alive(pid)
    res = harness.dump(target, image, "--shell-job")
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, like=target)
    assert r.returncode == 0, r.stderr
    assert os.getsid(r.pid) == os.getsid(0), "not restored into the session of lazarus restore"
    assert os.getpgid(r.pid) == r.pid, "a group leader must lead its group again"
    H.expect_pass(harness.run_case(H.CASES_BY_ID["signals"], r.target), r.target, r)


def test_controlling_terminal_refused(harness: H.Harness) -> None:
    import fcntl
    import termios

    master, slave = os.openpty()
    try:
        def take_tty() -> None:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        target = _start_plain(harness, "signals", preexec=take_tty)
    finally:
        os.close(slave)
    try:
        image = harness.image_dir()
        res = harness.dump(target, image)
        H.assert_clean_error(res, "controlling terminal", "--shell-job")
        assert not image.exists() and target.alive()
    finally:
        os.close(master)


def test_cgroup_target_checks_itself(harness: H.Harness, test_cgroups: list[Path]) -> None:
    """Without a dump the target passes; moved out of its cgroup (its corruption point) it fails."""
    case = H.Case("cgroup", "cgroup")
    t = harness.start_target("cgroup", *map(str, test_cgroups))
    H.expect_pass(harness.run_case(case, t), t)
    assert t.wait_exit(10) == 0
    t = harness.start_target("cgroup", *map(str, test_cgroups), env={"LAZ_SELFTEST_CORRUPT": "cgroups"})
    result = harness.run_case(case, t)
    assert result.startswith("FAIL: cgroups differ"), result
    assert t.wait_exit(10) == 1
