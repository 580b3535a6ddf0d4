"""Nobody but root steers a lazy-pages server, and a restore hands memory only to root's server (issue 8,
items 2 and 3; the rules are in lazarus/lazy/trust.py).

Server side: a hostile peer (another uid, a root peer naming a stranger's pid, a uffd that is not the named
task's) is refused, receives nothing of the image, and the pid it named is not killed, even when the server
dies afterwards (its guard kills what it serves). Restore side: a fake listener (socket owned by another uid,
a server not running as root, a directory others can write) gets a one-line error and exit 1 before the
restored task exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root
NOBODY = 65534

# A peer of the lazy-pages socket. argv: socket, image dir, named ("self" | "child" | pid), when to drop to
# uid 65534 ("before" connect | "after" connect | "never"), address and page count of a range to register
# on its own uffd (where the image's first lazy pages live). Prints a JSON result: what connect/recv gave,
# whether the range could be mapped, and how many of its pages became present (mincore: no fault taken).
PEER = r"""
import ctypes, json, os, socket, sys, time
from lazarus.kernel.uffd import Uffd
path, images, named, drop, addr, npages = sys.argv[1:7]
addr, npages = int(addr), int(npages)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
length = npages * 4096
MAP_FIXED_NOREPLACE = 0x100000
got = libc.mmap(addr, length, 3, 0x02 | 0x20 | MAP_FIXED_NOREPLACE, -1, 0)
mapped = got == addr
uffd = Uffd.create(0)
if mapped:
    uffd.register(addr, length)
child = None
if named.startswith("child:"):
    # A child of ours holding the image's pid (a copy of us: it has the range mapped, but not our uffd).
    from lazarus.kernel.clone import Trampoline
    tramp = Trampoline.map_at([0x2100_0000_0000 + i * (1 << 24) for i in range(64)], 4 * 4096)
    child = tramp.clone_with_pid(int(named.split(":")[1]))
    tramp.unmap()
    pid = child
elif named == "self":
    pid = os.getpid()
else:
    pid = int(named)

def drop_to_nobody():
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)

out = {"mapped": mapped}
if drop == "before":
    drop_to_nobody()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(path)
except OSError as e:
    out["connect_errno"] = e.errno
else:
    if drop == "after":
        drop_to_nobody()
    socket.send_fds(s, [json.dumps({"pid": pid, "images": images}).encode()], [uffd.fd])
    s.settimeout(30)
    try:
        reply = s.recv(65536)
        out["reply"] = json.loads(reply) if reply else None
    except OSError as e:
        out["recv_errno"] = e.errno
time.sleep(1.5)  # a server that (wrongly) accepted pushes the pages in the background meanwhile
present = 0
if mapped:
    vec = ctypes.create_string_buffer(npages)
    if libc.mincore(addr, length, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    present = sum(b & 1 for b in vec.raw)
out["present"] = present
if child:
    os.kill(child, 9)
    os.waitpid(child, 0)
print(json.dumps(out), flush=True)
"""


def _dumped(h: H.Harness, name: str = "memory", *args: str) -> tuple[H.Target, Path]:
    target = h.start_target(name, *(args or ("close",)))
    H.wait_in_syscall(target.pid, H.SYS_RT_SIGSUSPEND, 10)
    image = h.image_dir(f"img-{name}")
    res = h.dump(target, image)
    assert res.returncode == 0, res.stderr
    os.chmod(image, 0o700)  # a root-only image: nothing of it may reach anyone else
    return target, image


def _first_lazy_run(image: Path) -> tuple[int, int]:
    from lazarus.images import Image
    from lazarus.images.mm import lazy_object_ids, lazy_vmas
    img = Image.open(image)
    try:
        task = img.task(img.tasks[0])
        vmas = lazy_vmas(task["mm"], lazy_object_ids(task["mm"], task["files"]))
        runs = sorted((int(a), int(n)) for v in vmas for a, n, _ in v["pages"])
    finally:
        img.close()
    assert runs, "the image has no lazily served pages"
    return runs[0]


def _start_server(h: H.Harness, sockdir: Path, *extra: str, umask: int = 0o022) -> subprocess.Popen:
    def pre() -> None:
        os.umask(umask)
    server = subprocess.Popen(
        [sys.executable, "-m", "lazarus", "lazy-pages", "-D", str(sockdir), *extra],
        cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=pre)
    h.popens.append(server)
    h.register(server.pid, "lazy-pages")
    sock = sockdir / "lazy-pages.sock"
    deadline = time.monotonic() + 15
    while not sock.exists() and time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.02)
    assert sock.exists(), f"lazy-pages did not create its socket (exit status {server.poll()})"
    return server


def _hold_pid(h: H.Harness, pid: int) -> int:
    """A process nobody may kill, with the image's pid (so that a server that trusted the peer would serve it
    and, once the server dies, have it killed): a child of ours that only waits in pause()."""
    from lazarus.kernel.clone import Trampoline
    tramp = Trampoline.map_at([0x2200_0000_0000 + i * (1 << 24) for i in range(64)], 4 * 4096)
    try:
        child = tramp.clone_with_pid(pid)
    finally:
        tramp.unmap()
    h.register(child, "victim")
    return child


def test_socket_is_0600_whatever_the_umask(harness: H.Harness, tmp_path: Path) -> None:
    sockdir = tmp_path / "lp"
    sockdir.mkdir(mode=0o755)
    server = _start_server(harness, sockdir, umask=0)
    st = os.lstat(sockdir / "lazy-pages.sock")
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, f"socket mode {stat.S_IMODE(st.st_mode):o}"
    assert st.st_uid == 0
    server.kill()
    server.wait(10)


@pytest.mark.parametrize("problem", ["world-writable", "group-writable", "not-root-owned"])
def test_socket_directory_others_can_write_refused(harness: H.Harness, tmp_path: Path, problem: str) -> None:
    sockdir = tmp_path / "lp"
    sockdir.mkdir()
    if problem == "world-writable":
        os.chmod(sockdir, 0o1777)
    elif problem == "group-writable":
        os.chmod(sockdir, 0o775)
    else:
        os.chown(sockdir, NOBODY, NOBODY)
    res = harness.lazarus("lazy-pages", "-D", str(sockdir), "--linger", "0", timeout=30)
    H.assert_clean_error(res, str(sockdir), "directory owned by root")
    assert res.returncode == 1
    assert not (sockdir / "lazy-pages.sock").exists()
    # --socket elsewhere, in such a directory, too
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    res = harness.lazarus("lazy-pages", "-D", str(safe), "--socket", str(sockdir / "s.sock"), "--linger", "0",
                          timeout=30)
    H.assert_clean_error(res, "directory owned by root")
    assert not (sockdir / "s.sock").exists()


def test_socket_path_not_a_socket_is_left_alone(harness: H.Harness, tmp_path: Path) -> None:
    sockdir = tmp_path / "lp"
    sockdir.mkdir(mode=0o755)
    victim = sockdir / "precious"
    victim.write_text("keep me\n")
    res = harness.lazarus("lazy-pages", "-D", str(sockdir), "--socket", str(victim), "--linger", "0", timeout=30)
    H.assert_clean_error(res, "not a socket")
    assert victim.read_text() == "keep me\n"


# (named pid, when the peer drops to uid 65534, what the refusal must say)
HOSTILE = {
    "other-uid": ("victim", "before", None),
    "drops-uid-after-connect": ("victim", "after", r"uid 65534"),
    "names-a-stranger": ("victim", "never", r"neither itself nor its descendant"),
    "uffd-not-the-tasks": ("child", "never", r"not that process's"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_peer_refused(harness: H.Harness, request: pytest.FixtureRequest, case: str) -> None:
    named, drop, why = HOSTILE[case]
    target, image = _dumped(harness)
    addr, npages = _first_lazy_run(image)
    # Outside pytest's root-only tmp directory: the socket's own mode must be what keeps others out. With a
    # permissive umask, as a user's shell may have: the socket must not depend on it.
    sockdir = Path(tempfile.mkdtemp(prefix="lazarus-trust-"))
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    os.chmod(sockdir, 0o755)
    server = _start_server(harness, sockdir, umask=0)
    # The original's pid is free since the dump: the victim takes it, as a stranger to the peer.
    victim = _hold_pid(harness, target.pid) if named == "victim" else None
    who = str(target.pid) if named == "victim" else f"child:{target.pid}"
    peer = subprocess.run(
        [sys.executable, "-c", PEER, str(sockdir / "lazy-pages.sock"), str(image), who, drop, str(addr),
         str(npages)],
        cwd=H.REPO_ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert peer.returncode == 0, peer.stderr
    out = json.loads(peer.stdout.strip().splitlines()[-1])
    # Refused: at connect (the socket is 0600), or by the server's answer.
    reply = out.get("reply")
    assert "connect_errno" in out or (reply is not None and reply.get("ok") is False), out
    if reply is not None and why is not None:
        assert re.search(why, reply.get("error", "")), reply
    # Nothing of the image reached the peer. A root peer sending a uffd that is not the named task's may get
    # the one page the check copies through it (trust.py): root may read the image anyway.
    allowed = 1 if case == "uffd-not-the-tasks" else 0
    assert out["present"] <= allowed, f"{out['present']} pages of the root-only image reached the peer: {out}"
    # The server dies now: its guard kills whatever it served. The pid the peer named must not be among them.
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    time.sleep(1.0)
    if victim is not None:
        try:
            assert H.is_alive(victim), "the pid a refused peer named was killed"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)


def test_check_peer_refuses_other_uid_on_socketpair() -> None:
    """SO_PEERCRED itself: a socketpair made by a uid-65534 process, passed to us, is refused by check_peer
    (the socket file's mode is not what stops this one)."""
    from lazarus.errors import Untrusted
    from lazarus.lazy.trust import check_peer
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ours.close()
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socket.send_fds(theirs, [b"x"], [b.fileno()])
            theirs.recv(1)
        finally:
            os._exit(0)
    theirs.close()
    try:
        _msg, fds, _f, _a = socket.recv_fds(ours, 16, 1)
        conn = socket.socket(fileno=fds[0])
        with pytest.raises(Untrusted, match=r"uid 65534"):
            check_peer(conn)
        conn.close()
    finally:
        ours.close()
        os.waitpid(pid, 0)


def test_pidfd_info_fallback_matches_ioctl() -> None:
    """The /proc fallback (kernels before PIDFD_GET_INFO) says what the ioctl says, and refuses an exited
    process."""
    from lazarus.errors import NoSuchTask
    from lazarus.kernel.pidfd import pidfd_info, pidfd_info_procfs, pidfd_open
    fd = pidfd_open(os.getpid())
    try:
        assert pidfd_info_procfs(fd) == pidfd_info(fd)
        assert pidfd_info(fd).ppid == os.getppid()
    finally:
        os.close(fd)
    child = os.fork()
    if child == 0:  # pragma: no cover
        os._exit(0)
    fd = pidfd_open(child)
    try:
        os.waitpid(child, 0)
        for f in (pidfd_info, pidfd_info_procfs):
            with pytest.raises(NoSuchTask):
                f(fd)
    finally:
        os.close(fd)


# A fake lazy-pages server. argv: directory, mode ("chown": the socket file given to uid 65534; "setuid": it
# listens as uid 65534; "dir": a directory others can write), marker file. Answers {"ok": true} to whatever
# it receives and writes the marker when it received an fd.
FAKE = r"""
import json, os, socket, sys, time
d, mode, marker = sys.argv[1:4]
path = os.path.join(d, "fake.sock")
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(path)
os.chmod(path, 0o666)
if mode == "chown":
    os.chown(path, 65534, 65534)
if mode == "setuid":
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
s.listen(4)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    msg, fds, _f, _a = socket.recv_fds(c, 65536, 4)
    if fds:
        open(marker, "w").write(msg.decode())
    c.send(json.dumps({"ok": True}).encode())
    held = (c, fds)  # keep the uffd: a listener that writes what it likes into the process
"""


@pytest.mark.parametrize("mode,pattern", [("chown", r"owned by uid 65534"), ("setuid", r"runs as uid 65534"),
                                          ("dir", r"group or others")])
def test_restore_refuses_fake_listener(harness: H.Harness, tmp_path: Path, mode: str, pattern: str) -> None:
    target, image = _dumped(harness)
    fakedir = tmp_path / "fake"
    fakedir.mkdir(mode=0o755)
    if mode == "dir":
        os.chmod(fakedir, 0o777)
    marker = tmp_path / "fake-got-fd"
    fake = subprocess.Popen([sys.executable, "-c", FAKE, str(fakedir), mode, str(marker)], cwd=H.REPO_ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    harness.popens.append(fake)
    harness.register(fake.pid, "fake listener")
    assert fake.stdout is not None
    assert fake.stdout.readline().strip() == "READY", fake.stderr.read() if fake.stderr else ""
    r = harness.restore(image, "--lazy-pages-socket", str(fakedir / "fake.sock"), lazy=True)
    H.assert_clean_error(r.proc, pattern)
    assert r.returncode == 1
    assert not marker.exists(), "the fake listener received the process's userfaultfd"
    # Refused before the restored task existed: its pid is still free, nothing left behind.
    assert not H.is_alive(target.pid), f"pid {target.pid} exists after a refused restore"
    fake.kill()
    fake.wait(10)


def test_guard_opens_pidfds_only_on_checked_children() -> None:
    """The guard finds a served process's unknown fork children by number; it takes a pidfd (to kill through)
    only on a pid whose parent, read through that pidfd, is the served process, itself held by pidfd."""
    from lazarus.kernel.pidfd import pidfd_info, pidfd_open
    from lazarus.lazy.guard import _Entry, _GuardState
    me = pidfd_open(os.getpid())
    child = os.fork()
    if child == 0:  # pragma: no cover
        time.sleep(30)
        os._exit(0)
    try:
        served = _Entry(key=1, uffd=-1, pidfd=me, pid=os.getpid(), parent=None)
        fd = _GuardState._child_pidfd(served, child)
        assert fd is not None and pidfd_info(fd).pid == child
        os.close(fd)
        assert _GuardState._child_pidfd(served, os.getppid()) is None, "a stranger (our parent) was accepted"
        unheld = _Entry(key=2, uffd=-1, pidfd=None, pid=os.getpid(), parent=None)
        assert _GuardState._child_pidfd(unheld, child) is None, "a child of a process not held by pidfd"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(me)
