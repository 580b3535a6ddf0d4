"""Lazy restore beyond the per-target matrix of test_dump_restore.py: non-cooperative events on memory not
yet filled, one lazy-pages server for two images, and what happens when the page source is lost.

The event target (lazy_events.c) verifies itself; a restore with --no-background guarantees that the events
hit pages that are still missing, and one with the background transfer running tests the races.
"""

from __future__ import annotations

import contextlib
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
EVENTS = ("fork", "mremap", "madvise", "munmap", "all")


def dumped(h: H.Harness, name: str, *args: str) -> tuple[H.Target, Path]:
    target = h.start_target(name, *args)
    H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
    image = h.image_dir(f"img-{name}-{'-'.join(args)}")
    res = h.dump(target, image)
    assert res.returncode == 0, res.stderr
    return target, image


def restored_passing(h: H.Harness, image: Path, target: H.Target, stats: Path,
                     *extra: str) -> tuple[H.Restored, dict]:
    """Restore lazily with --stats, trigger the target, expect its PASS and exit 0; then the server's final
    statistics (written when it ended), in which no process may have been lost."""
    r = h.restore(image, "--stats", str(stats), *extra, lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    r.target.signal(signal.SIGUSR2)
    H.expect_pass(r.target.wait_result(60), r.target, r)
    assert r.target.wait_exit(15) == 0
    deadline = time.monotonic() + 20
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    s = json.loads(stats.read_text())
    assert s["lost"] == [], s["lost"]
    return r, s


def test_copies_cut_short_by_events_lose_no_page(harness: H.Harness, tmp_path: Path) -> None:
    """A UFFDIO_COPY that drops its locks mid-way and then meets a pending event stops with EAGAIN and the bytes
    done, exactly as one that met a page already present: the rest must be copied again, not taken as present.
    lazy_churn.c raises thousands of events while the background transfer copies its 128 MiB region, then checks
    the region whole. Run until the server saw such cut copies (each run restores the same image again)."""
    target, image = dumped(harness, "lazy_churn")
    cut = 0
    for attempt in range(3):
        _, s = restored_passing(harness, image, target, tmp_path / f"stats-{attempt}.json")
        cut += s["copies_cut"]
        if cut:
            break
    assert cut > 0, "no copy was cut short in 3 runs: the test did not meet the case it is for"


@pytest.mark.parametrize("background", [True, False], ids=["background", "no-background"])
@pytest.mark.parametrize("mode", EVENTS)
def test_events_on_missing_memory(harness: H.Harness, mode: str, background: bool, tmp_path: Path) -> None:
    target, image = dumped(harness, "lazy_events", mode)
    r, s = restored_passing(harness, image, target, tmp_path / "stats.json",
                            *([] if background else ["--no-background"]))
    assert r.pid == target.pid
    if not background:
        # Without background transfer every page came by fault (or was dropped by an event): the target
        # really ran on memory that was not there yet.
        assert s["pages_background"] == 0, s
        assert s["pages_fault"] > 0, s
        if mode in ("fork", "all"):
            # The parent still depended on the server when it forked: the child got its own uffd.
            assert len(s["processes"]) >= 2, "the fork child's uffd was not served"
            child = [p for p in s["processes"] if p["parent_pid"] == target.pid]
            assert child and child[0]["pages_total"] > 0, s["processes"]
        # The madvise and munmap events met pages still missing (lazy_events.c touches nothing before them):
        # the server dropped exactly those ranges (2 MiB DONTNEED + 1 MiB of shared memory REMOVEd, 2 MiB
        # unmapped) instead of copying them.
        (root,) = [p for p in s["processes"] if p["pid"] == target.pid]
        dropped = {"madvise": 512 + 256, "munmap": 512, "all": 512 + 256 + 512}.get(mode, 0)
        assert root["dropped_pages"] == dropped, root


def test_one_server_two_images(harness: H.Harness, tmp_path: Path) -> None:
    """`lazarus lazy-pages` serves two processes restored from two images at once."""
    t1, img1 = dumped(harness, "lazy_events", "all")
    t2, img2 = dumped(harness, "memory", "close")
    sockdir = tmp_path / "lp"
    sockdir.mkdir()
    stats = tmp_path / "lp-stats.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "lazarus", "lazy-pages", "-D", str(sockdir), "--no-background", "--linger", "1",
         "--stats", str(stats)],
        cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    harness.register(server.pid, "lazy-pages")
    try:
        sock = sockdir / "lazy-pages.sock"
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists(), "lazy-pages did not create its socket"
        r1 = harness.restore(img1, "--lazy-pages-socket", str(sock), lazy=True, like=t1)
        r2 = harness.restore(img2, "--lazy-pages-socket", str(sock), lazy=True, like=t2)
        assert r1.returncode == 0, r1.stderr
        assert r2.returncode == 0, r2.stderr
        for r in (r1, r2):
            r.target.signal(signal.SIGUSR2)
        for r in (r1, r2):
            H.expect_pass(r.target.wait_result(60), r.target, r)
            assert r.target.wait_exit(15) == 0
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        s = json.loads(stats.read_text())
        pids = {p["pid"] for p in s["processes"]}
        assert {t1.pid, t2.pid} <= pids, s["processes"]
        assert s["lost"] == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _serve_and_lose(harness: H.Harness, tmp_path: Path, lose) -> tuple[H.Target, str]:  # type: ignore[no-untyped-def]
    """Restore the memory target lazily from a lazy-pages server that serves faults only, let the
    `lose` action break its page source, then touch the memory. Returns the target and the server's stderr."""
    target, image = dumped(harness, "lazy_events", "all")
    sockdir = tmp_path / "lp"
    sockdir.mkdir()
    err_path = tmp_path / "lp.err"
    with open(err_path, "w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "lazarus", "lazy-pages", "-D", str(sockdir), "--no-background"],
            cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    harness.register(server.pid, "lazy-pages")
    sock = sockdir / "lazy-pages.sock"
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    r = harness.restore(image, "--lazy-pages-socket", str(sock), lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    lose(server, image, target)
    r.target.signal(signal.SIGUSR2)
    # The process must not report PASS or FAIL on zero-filled memory: it is killed before it could.
    deadline = time.monotonic() + 20
    while H.is_alive(target.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not H.is_alive(target.pid), "the process still runs after its page source was lost"
    text = target.log_text()
    assert "PASS" not in text.split("READY", 1)[-1] and "FAIL" not in text.split("READY", 1)[-1], text
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(15)
    # The guard kills the process first and reports after: the line may come a moment after the process is gone.
    deadline = time.monotonic() + 10
    while f"pid {target.pid} killed" not in err_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return target, err_path.read_text()


def test_server_killed_mid_transfer(harness: H.Harness, tmp_path: Path) -> None:
    def kill_server(server: subprocess.Popen, _image: Path, _t: H.Target) -> None:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)

    target, err = _serve_and_lose(harness, tmp_path, kill_server)
    assert f"pid {target.pid} killed: its page source was lost (the lazy server died)" in err, err


def test_page_file_unreadable_mid_transfer(harness: H.Harness, tmp_path: Path) -> None:
    def truncate_pages(_server: subprocess.Popen, image: Path, t: H.Target) -> None:
        os.truncate(image / f"pages-{t.pid}.img", 0)

    target, err = _serve_and_lose(harness, tmp_path, truncate_pages)
    # the cause, not only the kill: every guard message says "lost"
    assert re.search(rf"pid {target.pid} killed: its page source was lost \(.*pages-{target.pid}\.img: "
                     r"truncated to 0 bytes while in use", err), err


def test_page_file_corrupted_mid_transfer(harness: H.Harness, tmp_path: Path) -> None:
    def corrupt_pages(_server: subprocess.Popen, image: Path, t: H.Target) -> None:
        path = image / f"pages-{t.pid}.img"
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            for off in range(0, size, 64 << 10):
                f.seek(off + 100)
                b = f.read(1)
                f.seek(off + 100)
                f.write(bytes([b[0] ^ 0xFF]))

    target, err = _serve_and_lose(harness, tmp_path, corrupt_pages)
    assert re.search(rf"pid {target.pid} killed: its page source was lost \(.*pages-{target.pid}\.img: "
                     r"checksum mismatch in chunk \d+", err), err


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def test_lazy_log_gets_the_daemons_report(harness: H.Harness, tmp_path: Path) -> None:
    """`restore --lazy -d --lazy-log FILE`: what the private daemon reports (here: the process it had to kill
    when the daemon itself was killed) goes to FILE, not to DIR/lazy-pages.log."""
    target, image = dumped(harness, "lazy_events", "all")
    log = tmp_path / "my-lazy.log"
    known = H.children_of(os.getpid())
    r = harness.restore(image, "--no-background", "--lazy-log", str(log), lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    # the daemon: orphaned to pytest (the restore command exited), running `lazarus restore`
    daemons = [p for p in H.children_of(os.getpid()) - known
               if p != r.pid and H.is_alive(p) and b"restore" in _cmdline(p) and b"lazarus" in _cmdline(p)]
    assert len(daemons) == 1, [(p, _cmdline(p)) for p in H.children_of(os.getpid()) - known]
    harness.register(daemons[0], "lazy-pages daemon")
    os.kill(daemons[0], signal.SIGKILL)
    assert H.reap(daemons[0], 10) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while H.is_alive(target.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not H.is_alive(target.pid), "the process outlived its page source"
    deadline = time.monotonic() + 10
    while f"pid {target.pid} killed" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.exists(), f"--lazy-log {log} was not written (DIR has: {sorted(x.name for x in image.iterdir())})"
    assert f"pid {target.pid} killed: its page source was lost" in log.read_text()
    assert not (image / "lazy-pages.log").exists(), "the report went to DIR/lazy-pages.log despite --lazy-log"


def test_lazy_pages_socket_and_linger(harness: H.Harness, tmp_path: Path) -> None:
    """`lazy-pages --socket SOCK --linger S`: it listens at SOCK (not in DIR); with every process served, it
    still takes a restore within S seconds, and then exits on its own, removing SOCK."""
    linger = 4.0
    t1, img1 = dumped(harness, "memory", "close")
    t2, img2 = dumped(harness, "sleeper", "pause")
    sockdir = tmp_path / "lp"
    sockdir.mkdir()
    sock = tmp_path / "elsewhere.sock"
    stats_path = tmp_path / "stats.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "lazarus", "lazy-pages", "-D", str(sockdir), "--socket", str(sock),
         "--linger", str(linger), "--stats", str(stats_path)],
        cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    harness.register(server.pid, "lazy-pages")
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists(), "lazy-pages did not listen at --socket"
        assert not (sockdir / "lazy-pages.sock").exists(), "--socket given, yet it listens in DIR too"
        r1 = harness.restore(img1, "--lazy-pages-socket", str(sock), lazy=True, like=t1)
        assert r1.returncode == 0, r1.stderr
        r1.target.signal(signal.SIGUSR2)
        H.expect_pass(r1.target.wait_result(60), r1.target, r1)
        assert r1.target.wait_exit(15) == 0
        time.sleep(linger / 4)
        assert server.poll() is None, "lazy-pages exited before its --linger time"
        handed = time.monotonic()  # the second process is handed over (and completes) after this
        r2 = harness.restore(img2, "--lazy-pages-socket", str(sock), lazy=True, like=t2)
        assert r2.returncode == 0, r2.stderr
        H.expect_pass(harness.run_case(H.CASES_BY_ID["sleeper-pause"], r2.target), r2.target, r2)
        assert r2.target.wait_exit(15) == 0
        out, err = server.communicate(timeout=linger + 30)
        ended = time.monotonic()
        assert server.returncode == 0, err
        # The two handed over, plus the memory target's own fork child when it forked (its shared-memory check)
        # before all its pages were in: that child inherits the uffd registration and is served too.
        procs = json.loads(stats_path.read_text())["processes"]
        handed_over = sorted(p["pid"] for p in procs if p["parent_pid"] is None)
        assert handed_over == sorted([r1.target.pid, r2.target.pid]), procs
        assert all(p["parent_pid"] == r1.target.pid for p in procs if p["parent_pid"] is not None), procs
        assert f"served {len(procs)} process(es)" in out, out
        # it lingered (for more restores) after the last one completed, then went on its own
        assert ended - handed >= linger, f"exited {ended - handed:.1f} s after the hand-over, linger {linger}"
        assert not sock.exists(), "lazy-pages left its socket behind"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


_IMPORT_SPY = """
import atexit, os, sys
out = sys.argv.pop(1)
sys.path[:0] = PATHS
AVOIDED = ("dataclasses", "inspect", "typing", "ast", "dis", "tokenize")
def note():
    with open(out, "a") as f:
        f.write(f"{os.getpid()} {' '.join(m for m in AVOIDED if m in sys.modules) or '-'}\\n")
real_exit = os._exit
def _exit(code):
    note()
    real_exit(code)
os._exit = _exit
atexit.register(note)
import runpy
runpy.run_module("lazarus", run_name="__main__", alter_sys=True)
"""


# The modules a plain `restore --lazy -d` of one process no longer loads (tests/unit/test_startup_imports.py has
# the list's reasons); its daemon may.
_OFF_THE_COMMAND_PATH = ("socket", "selectors", "threading", "logging", "argparse", "lazarus.dump",
                         "lazarus.restore.tree", "lazarus.restore.sharefds", "lazarus.restore.cow",
                         "lazarus.restore.thp", "lazarus.lazy.server", "lazarus.lazy.guard")


def _restore_lazy_under_spy(harness: H.Harness, monkeypatch: pytest.MonkeyPatch, spy: Path,
                            seen: Path) -> list[int]:
    """Dump lazy_events, then `restore --lazy -d` it with every lazarus command started as `python -S spy seen
    ...` (the import spy); the restored process must check itself PASS and exit 0. Returns the commands' pids."""
    commands: list[int] = []

    def lazarus(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        p = subprocess.Popen([sys.executable, "-S", str(spy), str(seen), *args], cwd=H.REPO_ROOT, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        commands.append(p.pid)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    target, image = dumped(harness, "lazy_events", "all")
    monkeypatch.setattr(harness, "lazarus", lazarus)
    r = harness.restore(image, lazy=True, like=target)
    assert r.returncode == 0, r.stderr
    r.target.signal(signal.SIGUSR2)
    H.expect_pass(r.target.wait_result(60), r.target, r)
    assert r.target.wait_exit(15) == 0
    return commands


def test_restore_command_keeps_its_import_set(harness: H.Harness, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up cost, on a real `restore --lazy -d` (python -S, as the launcher starts it): at its exit, once
    the process ran, the command had loaded none of the modules taken off its path, and its process was served
    and checked itself PASS."""
    spy, seen = tmp_path / "spy.py", tmp_path / "seen"
    spy.write_text(f"PATHS = {[str(H.REPO_ROOT), *sys.path]!r}\n"
                   + _IMPORT_SPY.replace('AVOIDED = ("dataclasses", "inspect", "typing", "ast", "dis", "tokenize")',
                                         f"AVOIDED = {_OFF_THE_COMMAND_PATH!r}"))
    commands = _restore_lazy_under_spy(harness, monkeypatch, spy, seen)
    lines = dict(line.split(" ", 1) for line in seen.read_text().splitlines())
    assert lines.get(str(commands[0]), "").strip() == "-", lines  # the command: none of them


def test_restore_command_and_its_daemon_never_import_dataclasses_or_typing(
        harness: H.Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up cost: `restore --lazy -d` run for real, as the installed command starts it (python -S), neither
    the command nor its lazy-pages daemon (nor its guard) imports dataclasses, inspect or typing, before or
    while it serves (lazarus/records.py)."""
    spy, seen = tmp_path / "spy.py", tmp_path / "seen"
    spy.write_text(f"PATHS = {[str(H.REPO_ROOT), *sys.path]!r}\n" + _IMPORT_SPY)
    commands = _restore_lazy_under_spy(harness, monkeypatch, spy, seen)
    deadline = time.monotonic() + 20  # the daemon ends once its process has ended
    while time.monotonic() < deadline and len(seen.read_text().splitlines()) < 2:
        time.sleep(0.05)
    lines = dict(line.split(" ", 1) for line in seen.read_text().splitlines())
    assert str(commands[0]) in lines and len(lines) >= 2, lines  # the command and at least its daemon
    assert all(v.strip() == "-" for v in lines.values()), lines
