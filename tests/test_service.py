"""`lazarus service`: real HTTP requests over its unix socket (http.client over AF_UNIX, curl when present).

Every endpoint; bad requests (malformed JSON, missing or unknown fields, unknown path, wrong method, a
garbled request line, a peer that is no longer root) each answered with a 4xx JSON error while the service
keeps serving; a self-checking target dumped and then restored through the service, eager and lazy,
detached and not; failed dumps and restores that leave the service as it was; concurrent requests; systemd
socket activation.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


@dataclass
class Service:
    popen: subprocess.Popen
    socket: Path
    state: Path

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        assert resp.getheader("Content-Type") == "application/json", (resp.status, payload)
        return resp.status, json.loads(payload), resp

    def alive_and_serving(self) -> None:
        assert self.popen.poll() is None, "the service died"
        status, body, _ = self.request("GET", "/check")
        assert status == 200 and body["ok"] is True, body

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "svc"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


def wait_ready(popen: subprocess.Popen, timeout: float = 30.0) -> str:
    """The service's first line ("listening on ...", printed once it accepts), or an error with its output."""
    import select
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    line = popen.stdout.readline().decode() if ready else ""
    if "listening on" not in line:
        popen.kill()
        raise AssertionError(f"service not ready after {timeout} s: {line}{popen.stdout.read().decode()}")
    return line


@pytest.fixture
def service(harness: H.Harness, tmp_path: Path) -> Iterator[Service]:
    d = private_dir(tmp_path)
    sock, state = d / "api.sock", d / "state"
    popen = subprocess.Popen([sys.executable, "-m", "lazarus", "service", "--socket", str(sock),
                              "--state-dir", str(state)], cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    harness.popens.append(popen)
    harness.register(popen.pid, "lazarus service")
    svc = Service(popen, sock, state)
    try:
        wait_ready(popen)
        yield svc
    finally:
        svc.stop()


def test_socket_is_private(service: Service) -> None:
    st = service.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(service.state.stat().st_mode) == 0o700


def test_check_endpoint(service: Service) -> None:
    status, body, resp = service.request("GET", "/check")
    assert status == 200
    assert body["ok"] is True and body["missing"] == []
    names = {f["name"] for f in body["features"]}
    assert {"kernel", "userfaultfd", "ptrace"} <= names, names
    assert resp.getheader("Connection") == "close"


@pytest.mark.parametrize("method,path,body,raw,code,words", [
    ("GET", "/nope", None, None, 404, "no such path '/nope'"),
    ("DELETE", "/check", None, None, 405, "/check takes GET, not DELETE"),
    ("GET", "/dump", None, None, 405, "/dump takes POST, not GET"),
    ("PATCH", "/restores/0123456789abcdef", None, None, 405, "takes GET"),
    ("POST", "/dump", None, b"{bad json", 400, "body is not JSON"),
    ("POST", "/dump", None, b"[1, 2]", 400, "body must be a JSON object"),
    ("POST", "/dump", {"dir": "/tmp/x"}, None, 400, "missing field 'pid'"),
    ("POST", "/dump", {"pid": "12", "dir": "/tmp/x"}, None, 400, "field 'pid' must be an integer"),
    ("POST", "/dump", {"pid": True, "dir": "/tmp/x"}, None, 400, "field 'pid' must be an integer"),
    ("POST", "/dump", {"pid": 1, "dir": "relative/dir"}, None, 400, "must be an absolute path"),
    ("POST", "/dump", {"pid": 1, "dir": "/tmp/x", "sync": "no"}, None, 400, "field 'sync' must be true or false"),
    ("POST", "/restore", {"dir": "/tmp/x", "lazzy": True}, None, 400, "unknown field 'lazzy'"),
    ("POST", "/restore", {"dir": "/tmp/x", "lazy": "yes"}, None, 400, "field 'lazy' must be true or false"),
    ("POST", "/restore", {}, None, 400, "missing field 'dir'"),
    ("GET", "/restores/0123456789abcdef", None, None, 404, "no restore 0123456789abcdef"),
    ("GET", "/restores/../../etc", None, None, 404, "no such path"),
    ("GET", "/images", None, None, 400, "needs one query parameter dir"),
    ("GET", "/images?dir=img", None, None, 400, "must be an absolute path"),
])
def test_bad_requests_get_4xx_and_service_goes_on(service: Service, method: str, path: str, body: Any,
                                                  raw: bytes | None, code: int, words: str) -> None:
    status, answer, resp = service.request(method, path, body=body, raw=raw)
    assert status == code, answer
    assert words in answer["error"], answer
    if code == 405:
        assert resp.getheader("Allow"), "a 405 names the methods allowed"
    service.alive_and_serving()


def test_garbled_request_line_and_oversized_body(service: Service) -> None:
    for raw in (b"GARBAGE\r\n\r\n", b"GET /check HTTP/7.0\r\n\r\n",
                b"POST /dump HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                b"POST /dump HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(service.socket))
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        code = int(head.split()[1])
        assert 400 <= code < 500, data
        assert json.loads(payload)["error"], data
    service.alive_and_serving()


# A root client that drops to another uid after connecting: SO_PEERCRED still says root (credentials at
# connect time), so the service must look at what the peer is now (lazy/trust.py check_peer).
_SETUID_CLIENT = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
s.sendall(b"GET /check HTTP/1.1\r\nHost: localhost\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""

_NOBODY_CLIENT = r"""
import os, socket, sys
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", e.errno)
else:
    print("connected")
"""


def test_non_root_peer_refused(service: Service) -> None:
    out = subprocess.run([sys.executable, "-c", _SETUID_CLIENT, str(service.socket)], capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, payload = out.stdout.partition(b"\r\n\r\n")
    assert head.split()[1] == b"403", out.stdout
    assert "uid 65534" in json.loads(payload)["error"], payload
    # One that is not root from the start does not even reach it (0600 socket).
    out = subprocess.run([sys.executable, "-c", _NOBODY_CLIENT, str(service.socket)], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.startswith("refused"), (out.stdout, out.stderr)
    service.alive_and_serving()


def test_curl(service: Service) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-sS", "--unix-socket", str(service.socket), "-w", "\n%{http_code}",
                          "http://localhost/check"], capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", out
    assert json.loads(body)["ok"] is True
    out = subprocess.run([curl, "-sS", "--unix-socket", str(service.socket), "-w", "\n%{http_code}",
                          "-X", "POST", "-d", '{"pid": 1}', "http://localhost/dump"],
                         capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "400" and "missing field 'dir'" in json.loads(body)["error"], out


SPARES = 2  # the service's default --spare-workers


def _service_children(service: Service) -> list[int]:
    return sorted(H.children_of(service.popen.pid))


def _no_workers_left(service: Service, timeout: float = 10.0) -> None:
    """Only the spare workers (waiting for requests) are left: each request's worker ended. The count must hold
    for a while: a spare's replacement is forked once its request is answered, so just after an answer the
    count may dip (the worker gone, its replacement not yet forked) before it is back."""
    deadline = time.monotonic() + timeout
    steady = 0
    while steady < 10 and time.monotonic() < deadline:
        steady = steady + 1 if len(_service_children(service)) == SPARES else 0
        time.sleep(0.05)
    assert steady >= 10, f"service children {_service_children(service)}"


def test_failed_dump_and_restore_leave_the_service_as_it_was(service: Service, harness: H.Harness,
                                                             tmp_path: Path) -> None:
    before = {p.name for p in service.state.iterdir()}
    free_pid = 4194000
    while H.is_alive(free_pid):
        free_pid -= 1
    status, body, _ = service.request("POST", "/dump", {"pid": free_pid, "dir": str(tmp_path / "d1")})
    assert status == 422 and str(free_pid) in body["error"], body
    assert not (tmp_path / "d1").exists()
    status, body, _ = service.request("POST", "/restore", {"dir": str(tmp_path / "missing")})
    assert status == 422 and "missing" in body["error"], body
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "inventory.json").write_text("{not an image")
    for lazy in (False, True):
        status, body, _ = service.request("POST", "/restore", {"dir": str(bogus), "lazy": lazy})
        assert status == 422 and "inventory.json" in body["error"], body
        assert body["kind"] == "ImageError", body
    status, body, _ = service.request("GET", f"/images?dir={bogus}")
    assert status == 422 and "inventory.json" in body["error"], body
    # workers that crash (killed mid-request, or waiting) cost their client an answer, nothing else
    _no_workers_left(service)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(service.socket))
        s.sendall(b"POST /dump HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")  # the worker waits for the rest
        deadline = time.monotonic() + 10
        while len(_service_children(service)) <= SPARES and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in _service_children(service):
            os.kill(pid, signal.SIGKILL)
        assert s.recv(100) == b""
    _no_workers_left(service)
    assert {p.name for p in service.state.iterdir()} == before, "a failed request left state behind"
    service.alive_and_serving()


def _wait_state(service: Service, rid: str, want: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body, _ = service.request("GET", f"/restores/{rid}")
        assert status == 200, body
        if body["state"] == want:
            return body
        time.sleep(0.05)
    raise AssertionError(f"restore {rid} not {want} after {timeout} s: {body}")


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_dump_then_restore_through_the_service(service: Service, harness: H.Harness, mode: str,
                                               detach: bool) -> None:
    case = H.CASES_BY_ID["memory-keep"]
    target = harness.start_case(case)
    image = harness.image_dir()
    # The detached restores start from a dump without fsync (`sync`: false), the others from a synced one.
    status, dumped, _ = service.request("POST", "/dump", {"pid": target.pid, "dir": str(image),
                                                          **({"sync": False} if detach else {})})
    assert status == 200, dumped
    assert dumped["pid"] == target.pid and dumped["pages"] > 0 and dumped["left_running"] is False
    assert target.wait_exit(10) is not None, "the original still runs after the dump"

    status, shown, _ = service.request("GET", f"/images?dir={image}")
    assert status == 200, shown
    expected = json.loads(harness.lazarus("show", "--json", str(image)).stdout)
    assert shown == expected

    since = target.log.stat().st_size
    status, r, _ = service.request("POST", "/restore", {"dir": str(image), "lazy": mode == "lazy",
                                                        "detach": detach})
    assert status == 200, r
    harness.register(r["pid"], "restored process")  # first: killed at the end even if an assert below fails
    assert r["pid"] == target.pid and r["lazy"] == (mode == "lazy") and r["detach"] == detach
    # cloned from the worker's seed (restore/seed.py), with the request's phases in order
    assert r["seeded"] is True and r["stops"] > 0, r
    assert 0 < r["phases"]["restore.create"] < r["phases"]["restore.running"] <= r["phases"]["answer"], r
    restored = H.Target(target.name, r["pid"], target.log, target.exe, None, since, target.args)
    H.wait_restored(restored)
    status, st, _ = service.request("GET", f"/restores/{r['id']}")
    assert status == 200 and st["pid"] == r["pid"], st
    if mode == "lazy":
        t = st["transfer"]
        assert t["state"] in ("serving", "complete"), t
        assert t["bytes_total"] > 0, t
        assert t["stats"]["processes"][0]["pid"] == r["pid"], t
    H.expect_pass(harness.run_case(case, restored), restored)
    if detach:
        assert st["state"] == "detached", st
        # It may exit while its worker is still on its way out: a zombie of the worker's for a moment, then ours
        # (pytest is a subreaper); wait_exit waits through that (test_reap_waits_for_a_zombie_passed_to_us).
        assert restored.wait_exit(15) == 0, restored.describe()
    else:
        final = _wait_state(service, r["id"], "exited")
        assert final["exit_code"] == 0, final
    if mode == "lazy":
        # once complete, the final statistics stay: every page arrived, nothing lost
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            t = service.request("GET", f"/restores/{r['id']}")[1]["transfer"]
            if t["state"] != "serving":
                break
            time.sleep(0.05)
        assert t["state"] == "complete", t
        assert t["bytes_done"] == t["bytes_total"] > 0 and t["stats"]["lost"] == [], t
    _no_workers_left(service)


def test_concurrent_requests(service: Service, harness: H.Harness) -> None:
    case = H.CASES_BY_ID["memory-keep"]
    targets = [harness.start_case(case) for _ in range(2)]
    images = [harness.image_dir() for _ in targets]

    def dump(i: int) -> tuple[int, dict[str, Any], Any]:
        return service.request("POST", "/dump", {"pid": targets[i].pid, "dir": str(images[i])})

    def check(_: int) -> tuple[int, dict[str, Any], Any]:
        return service.request("GET", "/check")

    with ThreadPoolExecutor(8) as pool:
        dumps = [pool.submit(dump, i) for i in range(2)]
        checks = [pool.submit(check, i) for i in range(12)]
        for f in dumps + checks:
            status, body, _ = f.result(120)
            assert status == 200, body
    for t in targets:
        assert t.wait_exit(10) is not None
    sinces = [t.log.stat().st_size for t in targets]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(service.request, "POST", "/restore", {"dir": str(img), "lazy": True, "detach": True})
                for img in images]
        results = [f.result(120) for f in futs]
    restored = []
    for (status, r, _), t, since in zip(results, targets, sinces, strict=True):
        assert status == 200, r
        harness.register(r["pid"], "restored process")
        rt = H.Target(t.name, r["pid"], t.log, t.exe, None, since, t.args)
        H.wait_restored(rt)
        restored.append(rt)
    assert len({r["id"] for _, r, _ in results}) == 2
    for rt in restored:
        H.expect_pass(harness.run_case(case, rt), rt)
        assert rt.wait_exit(15) == 0, rt.describe()
    service.alive_and_serving()


def test_systemd_socket_activation(harness: H.Harness, tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    path = d / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    os.chmod(path, 0o600)
    listening.listen(16)
    # what systemd does: the socket at fd 3, LISTEN_PID naming the service's own pid, LISTEN_FDS=1
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.environ['LISTEN_FDS'] = '1'; "
                "os.execv(sys.executable, [sys.executable, '-m', 'lazarus', 'service', '--state-dir', sys.argv[2]])")
    popen = subprocess.Popen([sys.executable, "-c", launcher, str(listening.fileno()), str(d / "state")],
                             cwd=H.REPO_ROOT, pass_fds=[listening.fileno()], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    listening.close()
    harness.popens.append(popen)
    svc = Service(popen, path, d / "state")
    try:
        line = wait_ready(popen)
        assert str(path) in line, line
        svc.alive_and_serving()
    finally:
        svc.stop()
    assert popen.returncode == 0, popen.stdout.read().decode() if popen.stdout else ""


@pytest.mark.parametrize("problem", ["world-writable directory", "no socket"])
def test_service_refuses_to_start_with_one_line(harness: H.Harness, tmp_path: Path, problem: str) -> None:
    if problem == "world-writable directory":
        d = tmp_path / "open"
        d.mkdir()
        os.chmod(d, 0o777)
        args = ["--socket", str(d / "api.sock")]
        words = "group or others"
    else:
        args = []
        words = "needs --socket PATH"
    res = harness.lazarus("service", *args, timeout=60)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazarus: error:") and words in lines[0], res.stderr


_EXITS_THEN_ORPHANED = """
import os, sys, time
kid = os.fork()
if kid == 0:
    os._exit(7)
print(kid, flush=True)
time.sleep(1.0)  # not reaping it: the child stays our zombie until we exit (a detached service worker's case)
"""


def test_reap_waits_for_a_zombie_passed_to_us() -> None:
    """A detached restore's process is a child of the service worker that answered; it can exit (a zombie of
    the worker's) before the worker has. The harness must wait until the zombie passes to pytest (a child
    subreaper) and give its exit code, not take the zombie for a process gone."""
    parent = subprocess.Popen([sys.executable, "-c", _EXITS_THEN_ORPHANED], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        kid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while H.proc_state(kid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert H.proc_state(kid) == "Z" and parent.poll() is None, "the child is not its living parent's zombie"
        assert H.reap(kid, 15) == 7
    finally:
        parent.kill()
        parent.wait(10)


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_seeded_restore_brings_back_every_signal_action(service: Service, harness: H.Harness, mode: str) -> None:
    """The process is cloned from the worker's seed, whose signal actions were all reset to the kernel's default
    (the worker's Python ignores SIGXFSZ, handles SIGINT...): the restore then sets only the image's others
    (restore/seed.py). The target compares every action with what it had before the dump (signals.c)."""
    case = H.CASES_BY_ID["signals"]
    target = harness.start_case(case)
    image = harness.image_dir()
    status, dumped, _ = service.request("POST", "/dump", {"pid": target.pid, "dir": str(image)})
    assert status == 200, dumped
    assert target.wait_exit(10) is not None, "the original still runs after the dump"
    r, restored = _restore_through(service, harness, target, image, lazy=mode == "lazy", detach=True)
    assert r["seeded"] is True, r
    H.wait_restored(restored)
    H.expect_pass(harness.run_case(case, restored), restored)
    assert restored.wait_exit(15) == 0, restored.describe()
    _no_workers_left(service)


def _skip_without_multigrain(harness: H.Harness) -> None:
    from lazarus.kernel.features import changes_always_seen
    if not changes_always_seen(str(harness.image_dir().parent)):
        pytest.skip("the images' filesystem has no multigrain timestamps here: a fresh image is not opened ahead")


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid in /proc/{pid}/status")


def _restore_through(service: Service, harness: H.Harness, target: H.Target, image: Path,
                     **fields: Any) -> tuple[dict[str, Any], H.Target]:
    """POST /restore of `image` (the dump of `target`) with `fields`: the answer, and the restored process,
    registered with the harness before anything is asserted on the answer (killed at the end even if an assert
    fails)."""
    since = target.log.stat().st_size
    status, r, _ = service.request("POST", "/restore", {"dir": str(image), **fields})
    assert status == 200, r
    harness.register(r["pid"], "restored process")
    return r, H.Target(target.name, r["pid"], target.log, target.exe, None, since, target.args)


def test_the_dumps_worker_stays_and_serves_the_restore_that_follows(service: Service, harness: H.Harness) -> None:
    """After a dump, its worker opens and checks the image, answers, and waits for the next connection ahead of
    the idle workers: no spare is forked to replace it, and a lazy restore of the image asked for next is its
    (the restored process is its child, `image_ahead`) and brings the process back. An image changed after its
    dump is checked again, and refused when bad."""
    _skip_without_multigrain(harness)
    from lazarus.service import STAY_LEAD
    case = H.CASES_BY_ID["memory-keep"]
    target = harness.start_case(case)
    image = harness.image_dir()
    _no_workers_left(service)
    workers = _service_children(service)
    status, dumped, _ = service.request("POST", "/dump", {"pid": target.pid, "dir": str(image), "sync": False})
    assert status == 200, dumped
    assert target.wait_exit(10) is not None, "the original still runs after the dump"
    # Longer than the idle workers step aside, and than a replacement would take to be forked (REFILL_DELAY):
    # the dump's worker is still first in line, and the service's workers are the same (had the dump's worker
    # ended, the service would have forked another).
    time.sleep(max(0.5, 10 * STAY_LEAD))
    assert _service_children(service) == workers, "a worker was replaced after the dump"
    r, restored = _restore_through(service, harness, target, image, lazy=True, detach=False)
    assert r["image_ahead"] is True, r
    assert _ppid(r["pid"]) in workers, "restored by a worker forked after the dump"
    H.wait_restored(restored)
    H.expect_pass(harness.run_case(case, restored), restored)
    final = _wait_state(service, r["id"], "exited")
    assert final["exit_code"] == 0, final

    other = harness.start_case(case)
    image2 = harness.image_dir("img2")
    status, dumped, _ = service.request("POST", "/dump", {"pid": other.pid, "dir": str(image2), "sync": False})
    assert status == 200, dumped
    with open(image2 / "inventory.json", "ab") as f:  # right after the answer: its worker opened it already
        f.write(b"x")
    assert other.wait_exit(10) is not None
    status, body, _ = service.request("POST", "/restore", {"dir": str(image2), "lazy": True, "detach": True})
    assert status == 422 and "inventory.json" in body["error"], body
    _no_workers_left(service)
    service.alive_and_serving()


def test_after_its_last_request_a_dumps_image_is_opened_by_an_idle_worker(service: Service,
                                                                         harness: H.Harness) -> None:
    """A worker takes WORKER_REQUESTS requests at most: dumped into one after the other, the first dumps' images
    are opened by the worker that made them (it stays for the next); the last one's worker ends, and one of the
    idle workers opens that image (told through the pool's memfd and eventfd) and is the next to take a
    connection: a lazy restore of it skips that work (`image_ahead`) and brings the process back all the same."""
    _skip_without_multigrain(harness)
    from lazarus.service import WORKER_REQUESTS
    case = H.CASES_BY_ID["memory-keep"]
    _no_workers_left(service)
    workers = _service_children(service)
    targets = [harness.start_case(case) for _ in range(WORKER_REQUESTS)]
    for i, target in enumerate(targets):
        image = harness.image_dir(f"img{i}")
        status, dumped, _ = service.request("POST", "/dump", {"pid": target.pid, "dir": str(image),
                                                              "sync": False})
        assert status == 200, dumped
        assert target.wait_exit(10) is not None, "the original still runs after the dump"
        if i < WORKER_REQUESTS - 1:
            assert _service_children(service) == workers, f"a worker ended after dump {i + 1}"
    # One worker made them all (first in line after each), and ends with the last; the service reaps it on its
    # next wakeup (1 s at most).
    deadline = time.monotonic() + 10
    while set(workers) <= set(_service_children(service)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(set(workers) - set(_service_children(service))) == 1, "no worker ended after WORKER_REQUESTS"
    # One idle worker opens its image (a restore asked for while it does is taken by another, which checks the
    # image itself); the others let it take the next connection. 0.5 s is ample for this small image.
    time.sleep(0.5)
    r, restored = _restore_through(service, harness, targets[-1], image, lazy=True, detach=True)
    assert r["image_ahead"] is True, r
    H.wait_restored(restored)
    H.expect_pass(harness.run_case(case, restored), restored)
    assert restored.wait_exit(15) == 0, restored.describe()
    _no_workers_left(service)
    service.alive_and_serving()
