"""End-to-end tests of the lazy server (lazarus.lazy) against real processes and a real kernel.

The faulting processes are the C helper of tests/test_uffd.py (it sends us its uffd, then reads / forks /
mremaps / madvises / munmaps memory it never touched and checks every byte). Tests that kill the server run
it as a subprocess: this file doubles as that server (`python tests/test_lazy_server.py serve ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (see conftest.py)
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H
from lazarus.errors import NoSuchTask
from lazarus.kernel import pagemap
from lazarus.kernel.pidfd import PidFd
from lazarus.lazy.guard import Guard
from lazarus.lazy.server import LazyServer
from lazarus.lazy.sources import AheadVerifier, ImagePageSource


def _load_uffd_tests():
    name = "lazarus_tests_uffd_helpers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "test_uffd.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load_uffd_tests()
P = T.P
needs_root = T.needs_root
pytestmark = needs_root


# test_uffd.py's fixtures: the C helper (built once per module), its processes, stand-in page files
helper_bin, helpers, page_file = T.helper_bin, T.helpers, T.page_file


def serve(server: LazyServer, helpers_: list, *, go: bool = True, timeout: float = 60) -> dict:
    """Signal the helpers, run the server until every process is done, require PASS from each."""
    if go:
        for h in helpers_:
            h.go()
    try:
        stats = server.run(timeout=timeout)
    finally:
        server.close()
    return stats


def expect_pass(h, timeout: float = 30) -> None:
    rc = h.wait(timeout)
    assert rc == 0 and h.result() == "PASS", h.text()


def add(server, h, pf, **kw):
    source = ImagePageSource(h.vmas(), pf, name=pf.name, **kw)
    server.add_process(h.pid, h.take_uffd(), source)
    return source


def image_pages(npages, hole_every):
    return sum(1 for p in range(npages) if not T.is_hole(p, hole_every))


# ---------------------------------------------------------------------------------------------
# serving


def test_faults_only(helpers, page_file):
    n, holes = 256, 7
    h = helpers(npages=n, hole_every=holes, scenario="rread")
    pf = page_file(n, holes)
    server = LazyServer(background=False, fault_batch=16)
    add(server, h, pf)
    t0 = time.monotonic()
    stats = serve(server, [h])
    run_us = (time.monotonic() - t0) * 1e6
    expect_pass(h)
    (proc,) = stats["processes"]
    assert proc["pid"] == h.pid
    assert stats["pages_background"] == 0
    assert stats["pages_fault"] == image_pages(n, holes)
    assert stats["zero_pages"] > 0
    assert proc["state"] in ("complete", "exited")
    # latencies were measured (each fault took some time, none longer than the whole run measured here)
    lat = stats["fault_latency_us"]
    assert all(lat[k] is not None for k in ("median", "p99", "max", "mean")), lat
    assert 0 < lat["median"] <= lat["p99"] <= lat["max"] <= run_us, (lat, run_us)
    assert 0 < lat["mean"] <= lat["max"], lat


@pytest.mark.parametrize("scenario", ["read", "rread"])
def test_fault_window_follows_the_access_pattern(helpers, page_file, scenario):
    """Faults near the last one get the 16-page window around them (a sequential reader faults once per
    window); scattered faults get their page alone (filling a window would only delay the thread)."""
    n = 512
    h = helpers(npages=n, hole_every=0, scenario=scenario)
    pf = page_file(n, 0)
    server = LazyServer(background=False, fault_batch=16)
    add(server, h, pf)
    stats = serve(server, [h])
    expect_pass(h)
    (proc,) = stats["processes"]
    assert proc["pages_fault"] == n
    if scenario == "read":
        assert proc["faults"] <= n // 16 + 1
    else:
        assert proc["faults"] > n // 2


def test_background_completes_and_closes_uffd(helpers, page_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ImagePageSource, "VERIFY_AHEAD_MIN", 0)  # exercise the verify-ahead process here
    n, holes = 4096, 13
    h = helpers(npages=n, hole_every=holes, scenario="idle")
    pf = page_file(n, holes)
    seen = []
    stats_path = tmp_path / "stats.json"
    server = LazyServer(background=True, stats_path=stats_path, progress=lambda d, t: seen.append((d, t)))
    source = add(server, h, pf)
    key = server.processes[0]["key"]
    stats = serve(server, [h], go=False)  # the process touches nothing until everything is in
    (proc,) = stats["processes"]
    assert proc["state"] == "complete"
    assert proc["pages_background"] == image_pages(n, holes) and proc["pages_fault"] == 0
    # our uffd is closed: the kernel serves the process (holes read as zeros, data is all there)
    assert not _is_uffd(key)
    h.go()
    expect_pass(h)
    assert seen and seen[-1] == (image_pages(n, holes) * P, image_pages(n, holes) * P)
    on_disk = json.loads(stats_path.read_text())
    assert on_disk["pages_background"] == image_pages(n, holes)
    assert on_disk["background_rate_gbps"] > 0
    # with two CPUs a helper thread copies every other chunk (it has no work when the run fits in one); the
    # CPUs this test may run on decide it, not the server's own test
    if len(os.sched_getaffinity(0)) >= 2:
        assert 0 < on_disk["background_helper_bytes"] < image_pages(n, holes) * P
    else:
        assert on_disk["background_helper_bytes"] == 0
    # every chunk was checked before use: by the verify-ahead process or, where it had not got there yet,
    # inline; the stand-in page file counts both (the ahead checks through shared memory: they run in a fork)
    chunks = (image_pages(n, holes) * P + 65535) // 65536
    assert pf.nchunks == chunks
    assert pf.ahead_checked_chunks() > 0, "no chunk was checked by a verify-ahead process"
    assert pf.unchecked_chunks() == [], "chunks copied in without a checksum check"
    assert pf.verified == source.checked_inline
    assert source.checked_ahead <= pf.ahead_checked_chunks()
    assert source.checked_ahead + source.checked_inline == chunks


def test_a_source_started_later_starts_with_the_loop(helpers, page_file, monkeypatch):
    """add_process(start_later=True) (a restore's: its process runs first): the verify-ahead process is forked
    when the server's loop starts, not before; every chunk is still checked before use."""
    monkeypatch.setattr(ImagePageSource, "VERIFY_AHEAD_MIN", 0)
    n = 1024
    h = helpers(npages=n, hole_every=0, scenario="rread")
    pf = page_file(n, 0)
    server = LazyServer(background=True)
    source = ImagePageSource(h.vmas(), pf, name=pf.name)
    server.add_process(h.pid, h.take_uffd(), source, start_later=True)
    assert not source.verified_ahead, "the verify-ahead process was forked before the loop"
    serve(server, [h])
    assert source.verified_ahead
    assert pf.unchecked_chunks() == [], "chunks copied in without a checksum check"


def test_faults_only_never_wait_for_a_hash(helpers, page_file, monkeypatch):
    """Without background transfer faults come anywhere: the verify-ahead process checks the whole page file,
    unpaced, so that a fault finds its chunk checked instead of hashing 64 KiB before its copy."""
    monkeypatch.setattr(ImagePageSource, "VERIFY_AHEAD_MIN", 0)
    monkeypatch.setattr(AheadVerifier, "LEAD", 16)  # a paced verifier would stop 16 of the 256 chunks ahead
    n = 4096
    h = helpers(npages=n, hole_every=0, scenario="rread")
    pf = page_file(n, 0)
    server = LazyServer(background=False)
    source = add(server, h, pf)
    assert source.verified_ahead
    deadline = time.monotonic() + 30
    while pf.ahead_checked_chunks() < pf.nchunks and time.monotonic() < deadline:
        time.sleep(0.01)
    # every chunk, not only LEAD chunks ahead of what the server used (it has used none yet)
    assert pf.ahead_checked_chunks() == pf.nchunks
    stats = serve(server, [h])
    expect_pass(h)
    assert stats["pages_background"] == 0 and stats["pages_fault"] == n
    assert source.checked_inline == 0 and pf.verified == 0, "a fault hashed its chunk inline"
    assert source.checked_ahead == pf.nchunks
    assert pf.unchecked_chunks() == []


def _is_uffd(fd: int) -> bool:
    try:
        return "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("background", [False, True])
def test_faults_and_background_together(helpers, page_file, background):
    n = 2048
    h = helpers(npages=n, hole_every=0, scenario="rread")
    pf = page_file(n, 0)
    server = LazyServer(background=background, chunk_size=256 << 10)
    add(server, h, pf)
    stats = serve(server, [h])
    expect_pass(h)
    assert stats["pages_fault"] + stats["pages_background"] == n
    if not background:
        # With the background transfer on, it may finish before the process reads anything (a race the
        # process's own PASS covers either way); without it, every page came by fault.
        assert stats["pages_fault"] == n


def _served_held(h, pf, *, hung_up: bool, go: bool) -> tuple[dict, list[float], float]:
    """Serve h with its background copy held (60 s) until a pipe turns readable; written at once if
    `hung_up` (the client closed its connection). Returns (stats, release times, start)."""
    server = LazyServer(background=True, chunk_size=256 << 10)
    add(server, h, pf)
    r, w = os.pipe()
    released: list[float] = []
    try:
        server.hold_background(60, r, lambda: released.append(time.monotonic()))
        if hung_up:
            os.write(w, b"x")
        t0 = time.monotonic()
        stats = serve(server, [h], go=go, timeout=30)
    finally:
        os.close(r)
        os.close(w)
    return stats, released, t0


def test_background_held_until_the_client_hangs_up(helpers, page_file):
    """hold_background (a service's client still reading its answer): while held, only faults are served (every
    page of a process reading them all comes by fault, PASS); the hold ends when the watched fd turns readable
    (the client closed its connection), and on_release is called once."""
    n = 1024
    pf = page_file(n, 0)
    h = helpers(npages=n, hole_every=0, scenario="rread")
    stats, released, _ = _served_held(h, pf, hung_up=False, go=True)
    expect_pass(h)
    assert stats["pages_background"] == 0 and stats["pages_fault"] == n, stats
    assert len(released) == 1  # by close(): the fd never turned readable

    h2 = helpers(npages=n, hole_every=0, scenario="idle")
    stats, released, t0 = _served_held(h2, pf, hung_up=True, go=False)  # it touches nothing until go()
    h2.go()
    expect_pass(h2)
    assert stats["pages_background"] == n, stats  # released at once: the background copy brought them all
    assert len(released) == 1 and released[0] - t0 < 5


def test_background_hold_expires(helpers, page_file):
    n = 512
    h = helpers(npages=n, hole_every=0, scenario="idle")
    pf = page_file(n, 0)
    server = LazyServer(background=True, chunk_size=256 << 10)
    add(server, h, pf)
    released = []
    t0 = time.monotonic()
    server.hold_background(0.3, on_release=lambda: released.append(time.monotonic()))
    stats = serve(server, [h], go=False, timeout=30)  # it touches nothing until go(): all by background
    h.go()
    expect_pass(h)
    assert stats["pages_background"] == n, stats
    assert len(released) == 1 and released[0] - t0 >= 0.3


@pytest.mark.parametrize("background", [False, True])
def test_fork_child_gets_data_as_of_fork(helpers, page_file, background):
    n, holes = 256, 9
    h = helpers(npages=n, hole_every=holes, scenario="fork")
    pf = page_file(n, holes)
    server = LazyServer(background=background, chunk_size=64 << 10)
    add(server, h, pf)
    stats = serve(server, [h])
    expect_pass(h)
    (child_line,) = h.info("CHILD")
    child_pid = int(child_line.split()[2])
    procs = {p["key"]: p for p in stats["processes"]}
    children = [p for p in procs.values() if p["parent_pid"] == h.pid]
    if background and not children:
        # the background finished before the fork: the parent's uffd was closed, the child inherited
        # everything by copy-on-write and was never served
        assert procs[next(iter(procs))]["state"] == "complete"
        return
    assert len(children) == 1
    assert children[0]["pid"] == child_pid  # the server identified the child
    assert children[0]["pages_fault"] + children[0]["pages_background"] > 0


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("scenario", ["mremap", "dontneed", "munmap", "mprotect"])
def test_layout_changes(helpers, page_file, scenario, background):
    n, holes = 256, 11
    h = helpers(npages=n, hole_every=holes, scenario=scenario)
    pf = page_file(n, holes)
    server = LazyServer(background=background, chunk_size=64 << 10)
    add(server, h, pf)
    stats = serve(server, [h])
    expect_pass(h)
    (proc,) = stats["processes"]
    q = n // 4
    if scenario in ("dontneed", "munmap") and not background:
        # the quarter dropped before being touched was never copied (no data into the hole)
        assert proc["dropped_pages"] == image_pages(2 * q, holes) - image_pages(q, holes)
        assert proc["pages_fault"] == image_pages(n, holes) - proc["dropped_pages"]


def test_two_processes_one_server(helpers, page_file):
    h1 = helpers(npages=512, hole_every=3, seed=11, scenario="rread")
    h2 = helpers(npages=300, hole_every=0, seed=12, scenario="read")
    pf1, pf2 = page_file(512, 3, 11), page_file(300, 0, 12)
    server = LazyServer(background=True, chunk_size=128 << 10)
    add(server, h1, pf1)
    add(server, h2, pf2)
    stats = serve(server, [h1, h2])
    expect_pass(h1)
    expect_pass(h2)
    assert {p["pid"] for p in stats["processes"]} == {h1.pid, h2.pid}


# ---------------------------------------------------------------------------------------------
# losing the page source


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        pfd = PidFd.open(pid)
    except NoSuchTask:
        return True
    with pfd:
        return pfd.wait(timeout)


def _wait_present(pid: int, addr: int, npages: int, at_least: int, timeout: float = 10.0) -> int:
    """Wait until at least `at_least` of the npages at addr are present in pid (filled by the server); returns
    how many are."""
    deadline = time.monotonic() + timeout
    while True:
        present = sum((e - s) // P for s, e in pagemap.present_pages(pid, addr, addr + npages * P))
        if present >= at_least or time.monotonic() >= deadline:
            return present
        time.sleep(0.005)


def test_server_sigkill_guard_kills_process(helpers, page_file, tmp_path):
    n = 512
    h = helpers(npages=n, hole_every=0, scenario="read", delay_us=3000)  # ~1.5 s of slow reading
    pf = page_file(n, 0)
    report = tmp_path / "report.txt"
    errf = tmp_path / "server.err"
    fd = h.uffd_fd
    with open(errf, "wb") as err:
        srv = subprocess.Popen(
            [sys.executable, __file__, "serve", "--uffd-fd", str(fd), "--pid", str(h.pid), "--page-file",
             str(pf.path), "--addr", str(h.addr), "--npages", str(n), "--hole-every", "0", "--report", str(report),
             "--no-background"],
            pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    guard_pid = None
    try:
        os.close(fd)  # only the server (and its guard) hold the uffd now
        h.uffd_fd = -1
        line = srv.stdout.readline()
        assert line.startswith("GUARD "), line + errf.read_text()
        guard_pid = int(line.split()[1])
        assert srv.stdout.readline().strip() == "SERVING"
        h.go()
        # mid-transfer: the helper has faulted part of its memory in (its pages are present), not all of it
        present = _wait_present(h.pid, h.addr, n, at_least=16)
        assert 16 <= present < n, (present, h.text())
        assert h.proc.poll() is None, h.text()
        srv.kill()
        srv.wait(10)
        rc = h.wait(15)
        assert rc == -signal.SIGKILL, (rc, h.text())
        assert "FAIL" not in h.text()  # it never saw a wrong (zero) page
        assert _wait_gone(guard_pid, 10)
        text = report.read_text()
        assert f"pid {h.pid} killed: its page source was lost (the lazy server died)" in text
        assert f"pid {h.pid} killed" in errf.read_text()
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(10)
        if guard_pid is not None and not _wait_gone(guard_pid, 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(guard_pid, signal.SIGKILL)
        if guard_pid is not None:
            # the server's guard was orphaned to pytest (a child subreaper): reap it here, or it stays a
            # zombie child of pytest that later tests would see
            H.reap(guard_pid, 10)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_page_file_lost_mid_transfer(helpers, page_file, tmp_path, damage):
    n = 512
    h = helpers(npages=n, hole_every=0, scenario="read")
    # truncate: no checksum check (nor the size check that comes with it), so the kernel's copy itself fails
    # (EFAULT) on the missing file pages; the reason is still the truncation, not the EFAULT (as when a chunk
    # verified before the file was cut short is copied: tests/test_lazy.py test_page_file_unreadable_mid_transfer)
    pf = page_file(n, 0, verify=(damage == "corrupt"))
    with open(pf.path, "r+b") as f:
        if damage == "corrupt":
            f.seek(300 * P + 100)
            f.write(b"\xff" * 8)  # visible through the MAP_PRIVATE mapping: those pages were never copied
        else:
            f.truncate(256 * P)
    report = tmp_path / "report.txt"
    guard = Guard.start(report)
    server = LazyServer(background=False, guard=guard, fault_batch=1)
    add(server, h, pf)
    try:
        h.go()
        stats = server.run(timeout=30)
    finally:
        server.close()
    rc = h.wait(15)
    assert rc == -signal.SIGKILL, (rc, h.text())
    assert "FAIL" not in h.text()
    (lost,) = stats["lost"]
    assert lost["pid"] == h.pid
    want = "checksum" if damage == "corrupt" else f"truncated to {256 * P} bytes while in use"
    assert want in lost["reason"], lost["reason"]
    assert stats["pages_fault"] >= 256  # it was mid-transfer
    assert f"pid {h.pid} killed: its page source was lost" in report.read_text()


@pytest.mark.parametrize("bad_page", [300, 316])
def test_corrupt_chunk_met_by_background(helpers, page_file, tmp_path, bad_page):
    """Background steps copy 64 KiB chunks in pairs (the second on the helper thread with two CPUs): a bad
    chunk in either place kills the process and nothing after it is copied."""
    n = 512
    h = helpers(npages=n, hole_every=0, scenario="idle")
    pf = page_file(n, 0)
    with open(pf.path, "r+b") as f:
        f.seek(bad_page * P + 100)
        f.write(b"\xff" * 8)
    report = tmp_path / "report.txt"
    guard = Guard.start(report)
    server = LazyServer(background=True, guard=guard, chunk_size=64 << 10)
    add(server, h, pf)
    try:
        stats = server.run(timeout=30)
    finally:
        server.close()
    rc = h.wait(15)
    assert rc == -signal.SIGKILL, (rc, h.text())
    (lost,) = stats["lost"]
    assert lost["pid"] == h.pid and "checksum" in lost["reason"]
    # everything before the pair holding the bad chunk went in, nothing from the bad chunk on
    assert bad_page // 32 * 32 <= stats["pages_background"] <= bad_page // 16 * 16
    assert f"pid {h.pid} killed: its page source was lost" in report.read_text()


def test_guard_lets_completed_processes_live(helpers, page_file, tmp_path):
    """A clean finish: the guard drops its dups and kills nobody."""
    h = helpers(npages=128, hole_every=0, scenario="idle")
    pf = page_file(128, 0)
    report = tmp_path / "report.txt"
    guard = Guard.start(report)
    server = LazyServer(background=True, guard=guard)
    add(server, h, pf)
    stats = serve(server, [h], go=False)
    assert stats["processes"][0]["state"] == "complete"
    assert not report.exists()
    h.go()
    expect_pass(h)


def test_spawned_guard_kills_what_is_incomplete_at_done(helpers, tmp_path):
    """The spawned guard (python -m lazarus.lazy.guard) holds a uffd dup; "done" with the process still
    incomplete makes it kill that process and report it."""
    h = helpers(npages=16, scenario="idle")
    report = tmp_path / "report.txt"
    guard = Guard.start(report, spawn=True)
    u = h.take_uffd()
    with PidFd.open(h.pid) as pfd:
        guard.add(u.fd, u.fd, pid=h.pid, pidfd=pfd.fd)
        u.close()  # only the guard holds it now: the helper's memory is still not served
        assert guard.close(timeout=20) == 0
        assert pfd.wait(10)
    assert h.wait(10) == -signal.SIGKILL
    assert f"pid {h.pid} killed: its page source was lost (the lazy server stopped before the restore " \
           "completed)" in report.read_text()


def test_guard_kills_unidentified_fork_children(tmp_path):
    """A fork child whose pid the server never learnt is found as an unknown child of its parent."""
    from lazarus.kernel.uffd import Uffd

    report = tmp_path / "report.txt"
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        guard = Guard.start(report, spawn=True)
        pu, cu = Uffd.create(0), Uffd.create(0)  # stand-ins: the guard only holds and closes them
        with PidFd.open(parent.pid) as pfd:
            guard.add(1, pu.fd, pid=parent.pid, pidfd=pfd.fd)
            guard.add(2, cu.fd, pid=None, parent=1)
        pu.close()
        cu.close()
        assert guard.close(timeout=20) == 0
        assert parent.wait(10) == -signal.SIGKILL
        assert _wait_gone(child_pid, 10)
        text = report.read_text()
        assert f"pid {parent.pid} killed" in text and f"pid {child_pid} killed" in text
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child_pid is not None and not _wait_gone(child_pid, 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)  # our grandchild (sleep), if the guard missed it
        if child_pid is not None:
            H.reap(child_pid, 10)  # orphaned to pytest (a child subreaper) when sh died: reap it


# ---------------------------------------------------------------------------------------------
# server subprocess mode (used by test_server_sigkill_guard_kills_process)


def serve_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uffd-fd", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--page-file", required=True)
    ap.add_argument("--addr", type=int, required=True)
    ap.add_argument("--npages", type=int, required=True)
    ap.add_argument("--hole-every", type=int, default=0)
    ap.add_argument("--report")
    ap.add_argument("--no-background", action="store_true")
    a = ap.parse_args(argv)
    from lazarus.kernel.uffd import Uffd

    guard = Guard.start(a.report)
    print(f"GUARD {guard.pid}", flush=True)
    pf = T.StandInPageFile(Path(a.page_file))
    server = LazyServer(background=not a.no_background, guard=guard)
    server.add_process(a.pid, Uffd.adopt(a.uffd_fd),
                       ImagePageSource(T.image_vmas(a.addr, a.npages, a.hole_every), pf))
    print("SERVING", flush=True)
    server.run(timeout=120)
    server.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        raise SystemExit(serve_main(sys.argv[2:]))
