"""`lazarus service`: the library API (api.py) as HTTP/1.1 with JSON bodies on a unix socket.

    GET  /check                                   what `lazarus check` probes: {ok, missing, features}
    POST /dump     {pid, dir, leave_running, shell_job, sync}
                                                  {pid, dir, pages, seconds, left_running}
    POST /restore  {dir, lazy, detach, background}
                                                  answered once the process runs: {id, pid, seconds, ...}
    GET  /restores/ID                             {state, exit_code, transfer: {bytes_done, bytes_total, stats}}
    GET  /images?dir=DIR                          what `lazarus show --json DIR` prints

Process model, and why (docs/SERVICE.md says more):

    service (one thread)           imports done and the kernel probed once at start; forks spares, reaps
      |-- spare workers            forked ahead, each waiting (epoll) for one connection, its
      |                            copy-on-write faults taken already (kernel/prefault.py), the lazy server's
      |                            guard, a seed task and a dump's watchdog forked ahead (api.prepare_restore,
      |                            restore/seed.py, api.prepare_dump);
      |                            the service forks a new spare once one has answered its request (at once
      |                            when no spare is left), or when one dies idle
      |-- worker (one connection)  reads the request, checks the peer, does the work, answers, exits; after a
      |                            dump it opens and checks the image, answers, and waits for the next
      |                            connection, first in line (a restore of that image, most often), up to
      |                            WORKER_REQUESTS requests
            |-- restored process   the worker's child (cloned from the seed with CLONE_PARENT); the worker
            |                      serves its lazy pages (it is a process of its
            |                      own already: no daemon, no handoff), then with detach=false waits for it and
            |                      records its exit status, with detach=true exits (the process is re-parented
            |                      to init, or the nearest subreaper)
            |-- guard              forked by the worker while idle (it has no thread then), used by a lazy
                                   restore; what a request did not use is killed after its answer

A dump or restore ptraces and forks; in a worker, a crash, a leak, a stuck tracee or a signal stays there and
the service is as it was. A request wakes a process that is ready: neither a fork nor the service itself is on
its path. Everything a later request needs to know (a restore's pid, state, exit code, its lazy transfer's
progress) lives in the state directory, 0700, root's:

    ID.json            the restore's record, rewritten when its process exits (detach=false)
    ID.sock            while its pages are served: a status socket (lazy/daemon.py) answering progress and stats
    ID.stats.json      its lazy transfer's final statistics

(The latest dump answered is told to idle workers through the pool's memfd and eventfd, not a file: _announce.)

The HTTP layer is the standard library's http.server: requests are tiny and one per connection, parsing them
costs ~0.15 ms against a restore's milliseconds, and it adds no dependency to a root service (see
docs/SERVICE.md). Every peer is checked with SO_PEERCRED (lazy/trust.py: root only, still root now) before
its request is acted on. Errors are JSON {"error": "..."}: 400 malformed, 403 not root, 404 unknown path or
restore, 405 wrong method, 413 too large, 422 the dump or restore failed (the message names why).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import http.server
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import socketserver
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lazarus import __version__
from lazarus.errors import LazarusError, UsageError
from lazarus.logs import getLogger

log = getLogger("lazarus.service")

MAX_BODY = 1 << 20
REFILL_DELAY = 0.25  # seconds a spare's replacement waits at most for the request it replaces to be answered
_ANSWERED = 1 << 31  # on the pool's pipe: the worker whose pid this flags has answered its client
_IDLE_AGAIN = 1 << 30  # on the pool's pipe: the worker whose pid this flags has answered a dump and waits again
_DUMPING = 1 << 29  # on the pool's pipe: the worker whose pid this flags dumps (it may well wait again after)
REQUEST_TIMEOUT = 30.0
# A lazy restore's background copy, and the spare that replaces its worker, wait for the client to close its
# connection (it has read the answer), this long at most: on two CPUs either would take the CPU the client
# needs to read it (lazy/server.py hold_background). Faults are served meanwhile.
CLIENT_HOLD = 0.02
# A new spare prepares (forks its seed and watchdog, takes its copy-on-write faults: ~10-20 ms of CPU) once no
# request has been in flight for QUIET seconds, waiting QUIET_MAX at most: forked when a dump is answered, it
# would otherwise prepare while the restore that a client sends right after its dump runs (on two CPUs).
QUIET = 0.005
QUIET_MAX = 0.05
# After a dump whose worker stays for the next request (_Pool._stay), the idle workers leave new connections to it
# this long: it is back waiting within a millisecond or two of its answer.
STAY_LEAD = 0.02
# Requests a worker takes at most: it stays for another only after a dump, so what dumps leave in it (a few MiB of
# heap after one of 2 GiB) stays bounded, and so does any fault of ours they might leave behind.
WORKER_REQUESTS = 4
_ID = re.compile(r"[0-9a-f]{16}")
_ROUTES = {"/check": ("GET",), "/dump": ("POST",), "/restore": ("POST",), "/images": ("GET",)}


class HttpError(Exception):
    """A request answered with a 4xx: `status` and the one-line `message`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- request fields --------------------------------------------------------------------------------------------


def _fields(body: dict[str, Any], required: dict[str, type], optional: dict[str, tuple[type, Any]]) -> dict:
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise HttpError(400, f"unknown field {unknown[0]!r} (fields: {', '.join([*required, *optional])})")
    out: dict[str, Any] = {}
    for name, kind in required.items():
        if name not in body:
            raise HttpError(400, f"missing field {name!r}")
        out[name] = _typed(name, body[name], kind)
    for name, (kind, default) in optional.items():
        out[name] = _typed(name, body[name], kind) if name in body else default
    return out


def _typed(name: str, value: Any, kind: type) -> Any:
    # bool is an int in Python; JSON true is not a pid
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HttpError(400, f"field {name!r} must be {_KIND_NAMES[kind]}, not {json.dumps(value)[:40]}")
    return value


_KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string"}


def _image_dir(name: str, value: str) -> Path:
    if not value or not value.startswith("/") or "\0" in value:
        raise HttpError(400, f"field {name!r} must be an absolute path, not {value!r}")
    return Path(value)


# -- the state directory ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # writers in several workers at once
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def _record(state: Path, rid: str) -> dict[str, Any]:
    try:
        return json.loads((state / f"{rid}.json").read_text())
    except FileNotFoundError:
        raise HttpError(404, f"no restore {rid}") from None


def restore_state(state: Path, rid: str) -> dict[str, Any]:
    """What GET /restores/ID answers: the record, and for a lazy restore its transfer (live from the status
    socket while pages are served; the final statistics after)."""
    rec = _record(state, rid)
    if not rec.get("lazy"):
        return rec
    sock = state / f"{rid}.sock"
    transfer: dict[str, Any] | None = None
    if sock.exists():
        from lazarus.lazy.daemon import query_status
        with contextlib.suppress(LazarusError, OSError, ValueError):
            transfer = {"state": "serving", **query_status(sock)}
    if transfer is None:
        try:
            stats = json.loads((state / f"{rid}.stats.json").read_text())
        except (OSError, ValueError):
            stats = None
        if stats is not None:
            total = sum(p.get("pages_total", 0) for p in stats.get("processes", [])) * 4096
            transfer = {"state": "lost" if stats.get("lost") else "complete", "bytes_done": total,
                        "bytes_total": total, "stats": stats}
        else:
            # between the record and the status socket, or a server that died without a word
            transfer = {"state": "unknown", "bytes_done": None, "bytes_total": None, "stats": None}
    rec["transfer"] = transfer
    return rec


# -- the worker's side: one request ----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # a garbled request line still gets a status line and headers
    server_version = f"lazarus/{__version__}"

    def version_string(self) -> str:
        return self.server_version
    timeout = REQUEST_TIMEOUT
    server: _Server

    def setup(self) -> None:
        self.t_start = time.monotonic()
        super().setup()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any method: answered 405 (or 404) rather than http.server's 501
            return self._dispatch
        raise AttributeError(name)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    # -- answers ---------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s", format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line or headers), as JSON. Its 505 (unknown HTTP
        version) is the client's mistake too: 400."""
        error = message or explain or http.HTTPStatus(code).phrase
        self._reply(400 if code == 505 else code, {"error": error})

    def _reply(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None,
               tell_pool: bool = True) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            # Headers and body in one write: the client is woken once, with its whole answer.
            self._headers_buffer.append(b"\r\n")
            if self.command != "HEAD":
                self._headers_buffer.append(data)
            self.flush_headers()
            self.wfile.flush()
        except OSError as e:
            log.info("client went away before its answer: %s", e)
        self.server.replied()
        if tell_pool:
            self.server.answered()

    def _hang_up(self, reading: bool = False) -> None:
        """Let the client go (it has its answer) while this worker goes on (serving, waiting). `reading`: shut
        only our side, so that the connection turns readable when the client closes its own."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR if reading else socket.SHUT_RDWR)

    # -- dispatch --------------------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "send the body with a Content-Length, not chunked")
        if length is None:
            if self.command == "POST":
                raise HttpError(411, "POST needs a Content-Length and a JSON object body")
            return {}
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise HttpError(400, f"bad Content-Length {length!r}")
        if n > MAX_BODY:
            raise HttpError(413, f"body of {n} bytes is larger than {MAX_BODY}")
        try:
            raw = self.rfile.read(n)
        except OSError as e:
            raise HttpError(408, f"body not received: {e}") from None
        if len(raw) != n:
            raise HttpError(400, f"body truncated at {len(raw)} of {n} bytes")
        if self.command != "POST":
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise HttpError(400, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return body

    def _dispatch(self) -> None:
        try:
            body = self._body()
            self.t_read = time.monotonic()
            # Who is asking comes first: nothing of the request is acted on before.
            from lazarus.lazy.trust import check_peer
            try:
                check_peer(self.connection).close()
            except LazarusError as e:
                raise HttpError(403, str(e)) from None
            self.t_peer = time.monotonic()
            status, obj = self._route(body)
        except HttpError as e:
            self._reply(e.status, {"error": e.message}, e.headers)
            return
        except UsageError as e:
            self._reply(400, {"error": str(e)})
            return
        except LazarusError as e:
            self._reply(422, {"error": str(e), "kind": type(e).__name__})
            return
        except Exception as e:  # noqa: BLE001 - a bug of ours answers 500 and the worker exits
            log.exception("internal error")
            self._reply(500, {"error": f"internal error ({type(e).__name__}: {e})"})
            return
        if status:
            self._reply(status, obj)

    def _route(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        m = re.fullmatch(r"/restores/([^/]+)", path)
        allowed = ("GET",) if m else _ROUTES.get(path)
        if allowed is None:
            raise HttpError(404, f"no such path {path!r} (paths: /check, /dump, /restore, /restores/ID, /images)")
        if self.command not in allowed:
            raise HttpError(405, f"{path} takes {' or '.join(allowed)}, not {self.command}",
                            {"Allow": ", ".join(allowed)})
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if path != "/dump":
            self.server.close_listening()  # only a dump's worker may wait for another request (_Pool._stay)
        if m:
            if not _ID.fullmatch(m.group(1)):
                raise HttpError(404, f"no restore {m.group(1)[:40]!r}")
            return 200, restore_state(self.server.state_dir, m.group(1))
        if path == "/check":
            from lazarus.api import check
            return 200, check().as_dict()
        if path == "/images":
            dirs = query.get("dir")
            if not dirs or len(dirs) != 1:
                raise HttpError(400, "GET /images needs one query parameter dir=ABSOLUTE_PATH")
            from lazarus.api import show
            return 200, show(_image_dir("dir", dirs[0]))
        if path == "/dump":
            return self._dump(body)
        return self._restore(body)

    def _dump(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        f = _fields(body, {"pid": int, "dir": str}, {"leave_running": (bool, False), "shell_job": (bool, False),
                                                            "sync": (bool, True)})
        if f["pid"] <= 0:
            raise HttpError(400, f"field 'pid' must be positive, not {f['pid']}")
        from lazarus.api import dump
        self.server.dumping()
        res = dump(f["pid"], _image_dir("dir", f["dir"]), leave_running=f["leave_running"],
                   shell_job=f["shell_job"], sync=f["sync"])
        # Before the answer: this worker opens and checks the image and waits for the next request, first in
        # line (_Pool._stay); or, where it cannot, an idle worker does (_accept). Either way a restore of it asked
        # for next finds it done.
        self.server.dumped(res.directory)
        return 200, {"pid": res.pid, "dir": str(res.directory), "pages": res.pages,
                     "seconds": round(res.seconds, 6), "left_running": res.left_running}

    def _restore(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        f = _fields(body, {"dir": str}, {"lazy": (bool, False), "detach": (bool, False),
                                         "background": (bool, True), "pidns": (bool, False)})
        directory = _image_dir("dir", f["dir"])
        if not f["lazy"] and not f["background"]:
            raise HttpError(400, "field 'background' needs 'lazy': true")
        from lazarus import api
        state: Path = self.server.state_dir
        rid = secrets.token_hex(8)
        status = None
        if f["lazy"]:
            from lazarus.lazy.trust import listen_private
            status = listen_private(state / f"{rid}.sock")
        t_called = time.monotonic()
        try:
            # Served from this worker either way (no daemon, no handoff: the worker is already a process of its
            # own); `detach` only says whether it stays to see the process exit.
            r = api.restore(directory, lazy=f["lazy"], background=f["background"],
                            stats_path=state / f"{rid}.stats.json" if f["lazy"] else None, pidns=f["pidns"])
        except BaseException:
            if status is not None:
                status.close()
            raise
        t_done = time.monotonic()
        phases = {"request": self.t_read - self.t_start, "peer": self.t_peer - self.t_start,
                  "called": t_called - self.t_start, **{k: t_called - self.t_start + v for k, v in r.timings.items()},
                  "answer": t_done - self.t_start}
        rec = {"id": rid, "pid": r.pid, "ns_pid": r.ns_pid or None, "dir": str(directory), "lazy": r.lazy,
               "detach": f["detach"],
               "state": "detached" if f["detach"] else "running", "exit_code": None,
               "seconds": round(r.seconds, 6), "pages_written": r.pages_written,
               "service_seconds": round(t_done - self.t_start, 6),
               "stops": r.stops, "seeded": r.seeded, "image_ahead": r.image_ahead,
               "phases": {k: round(v, 6) for k, v in phases.items()}}
        try:
            _write_json(state / f"{rid}.json", rec)
        except BaseException:
            r.close()  # a lazy one cannot be served without its record: the guard's rule applies (killed)
            raise
        hold = status is not None and f["background"]
        self._reply(200, rec, tell_pool=not hold)
        self._hang_up(reading=hold)
        if f["detach"] and status is None:
            # Nothing left to do here: exit at once (what was prepared is killed on the way out, not waited
            # for), so that the process, should it exit soon, is re-parented rather than left our zombie.
            return 0, {}
        from lazarus.api import release_prepared
        with contextlib.suppress(Exception):
            release_prepared()
        # The client has its answer; a failure from here on has no one to go to but the log.
        try:
            if hold:
                r.hold_background(CLIENT_HOLD, self.connection.fileno(), self.server.answered)
            if status is not None:
                r.serve(status=status.sock)
        except Exception:  # noqa: BLE001 - the guard saw to the process if its pages were lost
            log.exception("restore %s (pid %d): serving its pages failed", rid, r.pid)
        finally:
            if status is not None:
                status.close()
        if f["detach"]:
            return 0, {}  # this worker exits: the process is re-parented (to init or the nearest subreaper)
        code = r.wait()
        rec.update(state="exited", exit_code=code)
        with contextlib.suppress(OSError):
            _write_json(state / f"{rid}.json", rec)
        return 0, {}


# -- the service's side ----------------------------------------------------------------------------------------


class _Server(socketserver.UnixStreamServer):
    """The handler's view of the service (state directory, listening socket); never binds or listens itself."""

    def __init__(self, sock: socket.socket, state_dir: Path) -> None:
        socketserver.BaseServer.__init__(self, "", _Handler)
        self.socket = sock
        self.state_dir = state_dir
        self.answered: Callable[[], None] = lambda: None  # a worker tells the pool (_Pool._answered)
        self.replied: Callable[[], None] = lambda: None  # its request is no longer in flight (_Pool._work)
        self.dumping: Callable[[], None] = lambda: None  # a dump begins (_Pool._dumping)
        self.dumped: Callable[[Path], None] = lambda directory: None  # after a dump (_Pool._dumped_into)
        # In a worker: let go of the listening socket (the service's own stays open: its warm-up requests)
        self.close_listening: Callable[[], None] = lambda: None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("worker failed")


class _Pool:
    """Workers forked ahead of need, each waiting (epoll, service._accept) for one connection: a request wakes a
    process that is ready (no fork, and no wakeup of the service, on its path). A worker that takes a connection says
    so (its pid on a pipe) and the service forks a spare to replace it; a worker that dies idle is replaced too.
    """

    def __init__(self, server: _Server, spares: int) -> None:
        self.server = server
        self.spares = max(1, spares)
        self.idle: set[int] = set()
        self.busy: set[int] = set()
        # Workers that took a connection and have not answered yet: while one remains idle for the next
        # request, the replacement is forked once they answer (or after REFILL_DELAY), not at once: forking
        # and preparing a spare (~10 ms of CPU) would take a CPU from the request being answered.
        self.answering: dict[int, float] = {}
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._r, False)
        self._wake_r, self.wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # signal.set_wakeup_fd
        # Requests in flight, as flock()s on one memfd: a worker holds a shared lock from its accept to its
        # answer; a new spare waits until an exclusive one is free (QUIET). Each worker opens the memfd again
        # (its own open file description: flock() locks belong to those).
        self._busy = os.memfd_create("lazarus-requests", os.MFD_CLOEXEC)
        # The latest dump answered, told to the idle workers (_announce): its directory, whether its worker
        # stays with its image opened, and which idle worker took on to open it otherwise (_claim); and an eventfd
        # written at each, which wakes every idle worker (each has it in its epoll, edge-triggered). Not a file in
        # the state directory: creating or renaming one on ext4 right after a large dump (its page data still
        # dirty) waited for the journal, 0.25-0.85 s on the dump's answer here.
        self._dumps = os.memfd_create("lazarus-dumps", os.MFD_CLOEXEC)
        self._dumped = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._requests = 0  # in a worker: requests taken
        self._again: Any = None  # in a worker that stays after its dump: its epoll on the listening socket

    def fill(self) -> None:
        now = time.monotonic()
        for pid, since in list(self.answering.items()):
            if now - since > REFILL_DELAY:
                del self.answering[pid]
        if self.idle and self.answering:
            return
        while len(self.idle) < self.spares:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - a worker; the tests talk to it over the socket
                self._work()
            self.idle.add(pid)

    def _work(self) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for fd in (self._r, self._wake_r, self.wakeup_w):
                os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            busy = os.open(f"/proc/self/fd/{self._busy}", os.O_RDWR | os.O_CLOEXEC)
            os.close(self._busy)
            dumps = os.open(f"/proc/self/fd/{self._dumps}", os.O_RDWR | os.O_CLOEXEC)
            os.close(self._dumps)
            self._dumps = dumps
            _wait_quiet(busy)
            # What a restore would fork on its way (the lazy server's guard, the seed its process is cloned
            # from), forked now, while the worker waits: a restore request then forks nothing of ours.
            from lazarus.api import prepare_dump, prepare_restore, release_prepared
            try:
                prepare_restore()
            except LazarusError as e:
                log.warning("worker %d: restores will fork on their way: %s", os.getpid(), e)
            try:
                prepare_dump()  # and a dump's watchdog
            except LazarusError as e:
                log.warning("worker %d: dumps will fork their watchdog on their way: %s", os.getpid(), e)
            # The copy-on-write faults a fresh fork takes on its first request (~600, 2-10 ms here), taken now;
            # after the forks above, which share every page again (the guard keeps them: each write of the
            # request would copy one).
            from lazarus.kernel.prefault import unshare_present_pages
            with contextlib.suppress(Exception):
                unshare_present_pages()
            # The images of the latest dump and of the lazy restores of late are opened and checked in _accept,
            # and so is that of each dump answered while this worker waits: a lazy restore of one of them
            # (unchanged since) skips that work.
            conn: socket.socket | None = _accept(self.server.socket, self.server.state_dir, busy, dumps,
                                                 self._dumped)
            self.server.replied = lambda: fcntl.flock(busy, fcntl.LOCK_UN)
            self.server.dumping = self._dumping
            self.server.dumped = self._dumped_into
            self.server.close_listening = self.server.socket.close  # closing twice is harmless
            try:
                while conn is not None:
                    fcntl.flock(busy, fcntl.LOCK_SH)  # in flight until replied (held against exclusive probes)
                    os.write(self._w, os.getpid().to_bytes(4, "little"))
                    self.server.answered = self._answered
                    self._requests += 1
                    code = 1
                    try:
                        self.server.finish_request(conn, "")
                        code = 0
                    except Exception:  # noqa: BLE001 - reported, and the worker ends
                        self.server.handle_error(conn, "")
                    finally:
                        self.server.shutdown_request(conn)
                    conn = self._next_request()
            finally:
                self.server.close_listening()
                with contextlib.suppress(Exception):
                    release_prepared(wait=False)
        finally:
            os._exit(code)

    def _dumped_into(self, directory: Path) -> None:
        """In a worker, a dump into `directory` done: stay with its image opened if it can (_stay), and tell the
        idle workers, before the answer."""
        stays = self._stay(directory)
        with contextlib.suppress(OSError):
            _announce(self._dumps, self._dumped, str(directory), os.getpid() if stays else None)

    def _stay(self, directory: Path) -> bool:
        """In a worker that has just dumped into `directory`, before its answer: whether it stays for one more
        request, first in line for it, with the image opened and checked (a restore of it is what a client asks
        for next, most often). The spare that would have replaced it is not forked, and the restore waits
        neither for another worker opening the image nor for one being forked and prepared (on two CPUs, the
        largest part of its wait). Not after WORKER_REQUESTS requests, nor with a thread left (a restore forks)."""
        import threading
        if self._requests >= WORKER_REQUESTS or threading.active_count() > 1 or self.server.socket.fileno() < 0:
            return False
        from lazarus.api import preopen_image
        ep = None
        try:
            if not preopen_image(directory):
                return False
            # What the dump made and kept is never collected: a full collection (~1 ms after a 4 GiB dump) does
            # not fall in the next request, and the objects' pages are not written again.
            gc.freeze()
            # Registered before the dump is announced: the idle workers, seeing it (_accept), step aside and
            # register again, behind this one, so a connection wakes this one first (the socket's exclusive
            # waiters are woken in the order they registered).
            ep = select.epoll(1)
            ep.register(self.server.socket.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        except Exception:  # noqa: BLE001 - the dump is done: its answer must not fail for this
            log.exception("worker %d: not staying after the dump", os.getpid())
            if ep is not None:
                ep.close()
            return False
        self._again = ep
        self.server.answered = self._idle_again
        return True

    def _dumping(self) -> None:
        """In a worker: it dumps. The pool keeps its replacement back even past REFILL_DELAY: the worker most
        often stays (_stay), and a spare forked meanwhile would be one too many."""
        with contextlib.suppress(OSError):
            os.write(self._w, (os.getpid() | _DUMPING).to_bytes(4, "little"))

    def _idle_again(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, (os.getpid() | _IDLE_AGAIN).to_bytes(4, "little"))

    def _next_request(self) -> socket.socket | None:
        """The next connection, for a worker that stays after its dump (_stay); else None."""
        ep, self._again = self._again, None
        if ep is None:
            return None
        try:
            while True:
                ep.poll()
                with contextlib.suppress(BlockingIOError):  # another worker woken with this one took it
                    return _accepted(self.server.socket)
        except OSError as e:  # EMFILE, ...: this worker ends (and the pool replaces it)
            log.warning("worker %d: no next request: %s", os.getpid(), e)
            return None
        finally:
            ep.close()

    def _answered(self) -> None:
        """In a worker: its client has the answer (the service may fork a spare now)."""
        if self._w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._w, (os.getpid() | _ANSWERED).to_bytes(4, "little"))
                os.close(self._w)
            self._w = -1

    def _taken(self) -> None:
        """Read which workers took a connection."""
        while True:
            try:
                data = os.read(self._r, 4096)
            except BlockingIOError:
                return
            if not data:
                return
            for i in range(0, len(data) - 3, 4):
                pid = int.from_bytes(data[i:i + 4], "little")
                if pid & _ANSWERED:
                    self.answering.pop(pid & ~_ANSWERED, None)
                    continue
                if pid & _DUMPING:
                    pid &= ~_DUMPING
                    if pid in self.answering:
                        self.answering[pid] = float("inf")  # never due (fill): it answers, or ends
                    continue
                if pid & _IDLE_AGAIN:
                    pid &= ~_IDLE_AGAIN
                    self.answering.pop(pid, None)
                    if pid in self.busy:  # not if it has ended and been reaped meanwhile
                        self.busy.discard(pid)
                        self.idle.add(pid)
                    continue
                self.idle.discard(pid)
                self.busy.add(pid)
                self.answering[pid] = time.monotonic()

    def timeout(self) -> float:
        """How long the service may sleep: until the first replacement held back for an answer is due."""
        due = [since for since in self.answering.values() if since != float("inf")]
        if not due:
            return 1.0
        return max(0.001, min(due) + REFILL_DELAY - time.monotonic())

    def wait(self, timeout: float) -> None:
        """Wait (up to `timeout`) for workers taking connections, reap those that ended, and fill up again."""
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._r, self._wake_r], [], [], timeout)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
        self._taken()
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.idle.discard(pid)
            self.busy.discard(pid)
            self.answering.pop(pid, None)
        self.fill()

    def close(self) -> None:
        """Stop the idle workers (those at work finish their request, and live on as their restore needs)."""
        self._taken()
        for pid in self.idle:
            _kill_idle(pid)
        self.idle.clear()
        for fd in (self._r, self._w, self._wake_r, self.wakeup_w, self._busy, self._dumps, self._dumped):
            os.close(fd)


def _wait_quiet(busy: int) -> None:
    """Return once no request has been in flight for QUIET seconds (no worker holds its lock on `busy`), or
    after QUIET_MAX."""
    start = quiet_since = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            fcntl.flock(busy, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(busy, fcntl.LOCK_UN)
        except BlockingIOError:
            quiet_since = now
        if now - quiet_since >= QUIET or now - start >= QUIET_MAX:
            return
        time.sleep(0.001)


def _kill_idle(pid: int) -> None:
    """SIGKILL an idle worker (it has nothing to tidy, and one just forked may still run our own SIGTERM
    handler, which only notes it), and what it forked ahead of a request: its guard and its seed, which it may
    be making still (a seed not yet traced waits forever, and the guard, whose socket the seed then holds, with
    it). The worker is stopped first, so that it forks nothing more while its children are pinned by pidfds."""
    from lazarus.kernel.pidfd import pidfd_open, pidfd_send_signal
    from lazarus.kernel.procfs import children
    pinned: list[int] = []
    try:
        os.kill(pid, signal.SIGSTOP)
        _, status = os.waitpid(pid, os.WUNTRACED)
    except (ProcessLookupError, ChildProcessError):
        return
    if not os.WIFSTOPPED(status):
        return  # it ended (and is reaped): its pid is no longer ours to signal
    with contextlib.suppress(LazarusError):
        for child in children(pid):
            with contextlib.suppress(LazarusError):
                pinned.append(pidfd_open(child))
    os.kill(pid, signal.SIGKILL)
    for fd in pinned:
        with contextlib.suppress(LazarusError):
            pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


PREOPEN_IMAGES = 2  # distinct image directories of the latest lazy restores that an idle worker opens ahead
_PREOPEN_RECORDS = 16  # records looked at for them


@contextlib.contextmanager
def _flocked(fd: int, how: int) -> Iterator[None]:
    fcntl.flock(fd, how)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _announce(dumps: int, dumped: int, directory: str, opened_by: int | None) -> None:
    """Tell the idle workers of a dump into `directory` just answered (`opened_by`: the pid of its worker, which
    stays with the image opened, or None): written into the pool's memfd `dumps`, and the eventfd `dumped`
    written, which wakes them all."""
    with _flocked(dumps, fcntl.LOCK_EX):
        seq = _read_dump(dumps).get("seq", 0) + 1
        _write_dump(dumps, {"seq": seq, "dir": directory, "opened_by": opened_by, "claimed_by": None})
    os.eventfd_write(dumped, 1)


def _read_dump(dumps: int) -> dict[str, Any]:
    try:
        rec = json.loads(os.pread(dumps, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) and isinstance(rec.get("seq", 0), int) else {}


def _write_dump(dumps: int, rec: dict[str, Any]) -> None:
    os.ftruncate(dumps, 0)
    os.pwrite(dumps, json.dumps(rec).encode(), 0)


def _latest_dump(dumps: int) -> dict[str, Any]:
    """The latest dump announced ({seq, dir, opened_by, claimed_by}), or {}."""
    with _flocked(dumps, fcntl.LOCK_SH):
        rec = _read_dump(dumps)
    d = rec.get("dir")
    return rec if isinstance(d, str) and d.startswith("/") else {}


def _claim(dumps: int, seq: int) -> bool:
    """Whether this worker is the one to open the image of the dump `seq` ahead (the first to ask)."""
    with _flocked(dumps, fcntl.LOCK_EX):
        rec = _read_dump(dumps)
        if rec.get("seq") != seq or rec.get("claimed_by") is not None:
            return False
        _write_dump(dumps, {**rec, "claimed_by": os.getpid()})
        return True


def _preopen_recent(state: Path, dumps: int) -> int:
    """Open ahead the image directory of the latest dump, and those of the latest lazy restores recorded in the
    state directory; returns the latest dump's number (for _accept)."""
    from lazarus.api import preopen_image
    latest = _latest_dump(dumps)
    dumped = latest.get("dir")
    with os.scandir(state) as it:
        recs = [(e.stat().st_mtime_ns, e.path) for e in it if e.name.endswith(".json")
                and _ID.fullmatch(e.name[:-5])]
    recs.sort(reverse=True)
    seen: list[str] = []
    for _mtime, path in recs[:_PREOPEN_RECORDS]:
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        d = rec.get("dir") if isinstance(rec, dict) and rec.get("lazy") else None
        if not isinstance(d, str) or not d.startswith("/") or d in seen or d == dumped:
            continue
        seen.append(d)
        if len(seen) >= PREOPEN_IMAGES:
            break
    for d in reversed(seen):  # the latest opened last: kept longest (api.PREOPEN_KEEP)
        preopen_image(d)
    if dumped is not None:
        preopen_image(dumped)
    return int(latest.get("seq", 0))


def _accept(sock: socket.socket, state: Path, busy: int, dumps: int, dumped: int) -> socket.socket:
    """accept() one connection on the service's socket; while none comes, see to the image of each dump the
    service answers (a restore of it asked for next then skips opening and checking it: ~1.5-2.5 ms of its
    path in a fresh worker): where the dump's own worker stayed with it opened (_Pool._stay), step aside for
    STAY_LEAD so that it takes the next connection; else open it ahead (one idle worker does). An idle worker
    is woken by one or the other: the pool's eventfd `dumped` (_announce), and the listening socket with
    EPOLLEXCLUSIVE (a connection wakes one waiting worker, or a few: the socket does not block, and those that
    find the connection taken wait again).
    While it opens one, the worker holds its lock on `busy` as a request does: a new spare does not prepare
    meanwhile (_wait_quiet), as it would not while the dump was answered nor while the restore that follows is."""
    seen = 0
    with contextlib.suppress(Exception):
        seen = _preopen_recent(state, dumps)
    ep = select.epoll(2)
    listening = select.EPOLLIN | select.EPOLLEXCLUSIVE
    aside_until = None  # while set, this worker leaves connections to a dump's worker that stays (_Pool._stay)
    try:
        ep.register(sock.fileno(), listening)
        # Edge-triggered: each write wakes every idle worker once, and none has to read it.
        ep.register(dumped, select.EPOLLIN | select.EPOLLET)
        while True:
            timeout = -1.0 if aside_until is None else max(0.0, aside_until - time.monotonic())
            ready = {fd for fd, _ in ep.poll(timeout)}
            if aside_until is not None and time.monotonic() >= aside_until:
                aside_until = None
                ep.register(sock.fileno(), listening)  # a connection waiting meanwhile wakes it at once
            if sock.fileno() in ready:
                # First: a connection that woke this worker came before the dump was told (or this worker
                # would not be registered); its wakeup went to none other.
                with contextlib.suppress(BlockingIOError):  # another worker woken with this one took it
                    return _accepted(sock)
            if dumped in ready:
                latest = _latest_dump(dumps)
                seq = int(latest.get("seq", 0))
                if latest and seq != seen:
                    seen = seq
                    if latest.get("opened_by") is not None:
                        # The dump's worker opened its image and waits for the next request, registered on the
                        # socket before this one. Were this one to stay there, a connection made while that
                        # worker is not yet back in epoll_wait (it is answering; a wakeup of the service may
                        # preempt it) would come here. Stepping aside for a moment, it does not.
                        if aside_until is None:
                            ep.unregister(sock.fileno())
                        aside_until = time.monotonic() + STAY_LEAD
                        continue
                    if not _claim(dumps, seq):
                        # Another idle worker opens it. Registered again, this one goes to the back of the
                        # socket's queue of exclusive waiters, which a connection wakes from the front, skipping
                        # a worker not waiting: a restore asked for meanwhile is taken here at once (its image
                        # checked on its way, as without any of this), and one asked for after goes to the
                        # worker that opened it.
                        if aside_until is None:
                            ep.unregister(sock.fileno())
                            ep.register(sock.fileno(), listening)
                        continue
                    from lazarus.api import preopen_image
                    with _flocked(busy, fcntl.LOCK_SH), contextlib.suppress(Exception):
                        preopen_image(latest["dir"])
                    continue  # a connection that came meanwhile is still there to take
    finally:
        ep.close()


def _accepted(sock: socket.socket) -> socket.socket:
    conn = sock.accept()[0]
    conn.setblocking(True)
    return conn


def systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID, LISTEN_FDS, fd 3), or None.

    Raises:
        UsageError when what systemd passed is not one listening AF_UNIX stream socket.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if n != 1:
        raise UsageError(f"socket activation passed {n} sockets; the service takes exactly one (ListenStream=)")
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise UsageError("socket activation passed fd 3, which is not a listening unix stream socket")
    os.set_inheritable(3, False)
    return sock


def warm_up() -> None:
    """Import what requests use and probe the kernel once, so that each worker starts with it done."""
    import lazarus.dump
    import lazarus.images.summary
    import lazarus.kernel.prefault
    import lazarus.lazy.daemon
    import lazarus.lazy.guard
    import lazarus.lazy.handoff
    import lazarus.lazy.server
    import lazarus.lazy.sources
    import lazarus.restore  # noqa: F401
    from lazarus.api import check
    from lazarus.kernel.uffd import supported_features
    check()
    with contextlib.suppress(LazarusError):
        supported_features()
    # The CPU's XSTATE layout every restore checks the image against: read (from its cache file) once here
    # rather than by each worker (~0.3 ms of its first restore).
    from lazarus.kernel.xstate import machine_xstate
    with contextlib.suppress(LazarusError):
        machine_xstate()
    # What a restore's first pass in a process would make (~1 ms in each worker otherwise): the __init__ of
    # every record class, and the codec of the bytes it decodes as ASCII.
    from lazarus.records import compile_pending
    compile_pending()
    import codecs
    codecs.lookup("ascii")
    # Objects made so far are never collected: a worker's garbage collections then do not touch (and copy)
    # the pages the service shares with it.
    gc.freeze()


_WARM_REQUESTS = (b"GET /check HTTP/1.1\r\nHost: warm-up\r\n\r\n",
                  b'POST /restore HTTP/1.1\r\nHost: warm-up\r\nContent-Length: 12\r\n\r\n{"dir": "."}')


def _warm_requests(server: _Server) -> None:
    """A GET /check and a refused POST /restore through the handler, in the service over a socket pair, before
    any worker is forked: what a request's first pass imports and builds (http.server's header parsing and the
    email package under it, the JSON codecs, the peer check) is then done in every worker (~1.5 ms of each
    request otherwise)."""
    for raw in _WARM_REQUESTS:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            peer.sendall(raw)
            peer.shutdown(socket.SHUT_WR)
            _Handler(ours, "", server)
            ours.close()
            while peer.recv(65536):
                pass
        except OSError as e:
            log.debug("warm-up request: %s", e)
        finally:
            ours.close()
            peer.close()
    gc.freeze()


def serve(socket_path: Path | None, *, state_dir: Path | None = None, spares: int = 2,
          on_ready: Callable[[str, Path], None] | None = None) -> None:
    """Run the service until SIGTERM or SIGINT: on the socket systemd passed, else at `socket_path` (0600, in
    a directory only root can write; trust.listen_private). `state_dir`: where restores are recorded (default:
    a new 0700 directory beside the socket, removed at exit). `spares`: workers kept waiting for a request."""
    from lazarus.lazy.trust import listen_private
    private = None
    sock = systemd_socket()
    if sock is None:
        if socket_path is None:
            raise UsageError("service needs --socket PATH (or systemd socket activation)")
        private = listen_private(socket_path, backlog=128, kind=socket.SOCK_STREAM)
        sock = private.sock
        where = str(socket_path)
    else:
        where = sock.getsockname() or "(systemd socket)"
    made_state = state_dir is None
    # Workers wait in epoll and accept without blocking (service._accept): one woken with others for a
    # connection another took must not then sit in accept(), deaf to the dumps it opens images for.
    sock.setblocking(False)
    try:
        if state_dir is None:
            base = Path(where).parent if where.startswith("/") else Path(tempfile.gettempdir())
            state_dir = Path(tempfile.mkdtemp(prefix="lazarus-service-", dir=base))
        else:
            from lazarus.lazy.trust import open_checked_dir
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(open_checked_dir(state_dir))  # status sockets are made there: root's, not writable by others
        warm_up()
        server = _Server(sock, state_dir)
        _warm_requests(server)
        pool = _Pool(server, spares)

        # SIGTERM and SIGINT only say "stop" (through the pool's wakeup pipe): whatever the loop was doing (a
        # fork, a reap) completes, so every worker is known when the idle ones are stopped.
        stop: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stop.append(signum))
        signal.set_wakeup_fd(pool.wakeup_w)
        try:
            pool.fill()
            if on_ready is not None:
                on_ready(where, state_dir)
            while not stop:
                pool.wait(pool.timeout())
        finally:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            pool.close()
    finally:
        if private is not None:
            private.close()
        else:
            sock.close()
        if made_state and state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["HttpError", "restore_state", "serve", "systemd_socket", "warm_up"]
