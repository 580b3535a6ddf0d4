"""Where a lazy restore's pages are served from, and the order in which its helper processes are made.

A lazy restore needs a LazyServer (server.py) and the server's guard (guard.py); the guard is forked, and a
fork is safe only while the forking process has no thread. The server starts its copy thread at its first
background step, i.e. inside run(). So every fork happens before the first run() of the process that forks:

    served here (restore --lazy)                 served by a private daemon (restore --lazy -d)
    ----------------------------                 ----------------------------------------------
    start_serving(): Guard.start() forks         spawn.fork_daemon(): socketpair(SEQPACKET), fork (no thread
                     the guard, LazyServer         yet), first thing (the CLI, before its heavy imports; else
    restore(on_lazy=server.add_process)            api.py), so that the daemon's start-up runs beside the
    Serving.run(): the copy thread starts          restore's imports and image checks
                                                 daemon (run_daemon): setsid, stdio to /dev/null, opens the
                                                   image, stderr to its log (only then), start_serving()
                                                   (forks its guard), Listener, serve until the process is
                                                   complete (or the restore closes its end), exit
                                                 restore(on_lazy=hand_over(...)): the uffd goes over the
                                                 socketpair (handoff.py); the daemon checks the task and
                                                 answers before the task runs; the restore returns then.
                                                 A restore that fails closes its end and reaps the daemon.

    served by a running server (lazy-pages)      serve_socket(): listen (trust.py), start_serving(), serve
                                                 every restore handed over until none needs it (linger)

A status socket (optional, `status`) lets whoever started a restore ask a serving process for its progress
while it runs: each connection gets one JSON message (progress and stats) and is closed; peers are checked
as for a handoff (root only, trust.py). This module never imports restore/ (DESIGN.md: lazy is handed uffds).
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import sys
from collections.abc import Callable

from lazarus.errors import LazarusError
from lazarus.lazy.spawn import Daemon, fork_daemon
from lazarus.logs import getLogger
from lazarus.records import field, record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import socket
    from pathlib import Path
    from typing import Any

log = getLogger("lazarus.lazy")

ProgressCallback = Callable[[int, int], None]


@record
class Serving:
    """A LazyServer with its guard (which kills the served processes should the server die).

    `progress` holds the latest (bytes done, bytes total) the server reported; `on_progress`, if given, is
    called with each report too (a progress bar).
    """

    server: Any
    guard: Any
    progress: tuple[int, int] = (0, 0)
    on_progress: ProgressCallback | None = None
    _status: list[Any] = field(default_factory=list)

    def _report(self, done: int, total: int) -> None:
        self.progress = (done, total)
        if self.on_progress is not None:
            self.on_progress(done, total)

    def status(self) -> dict[str, Any]:
        """Progress and statistics now (JSON-ready)."""
        done, total = self.progress
        stats = self.server.stats()
        if not total:  # the loop has not reported yet (it reports from run(), at most every 0.1 s)
            from lazarus.kernel.abi import PAGE_SIZE
            procs = stats.get("processes", [])
            total = sum(p["pages_total"] for p in procs) * PAGE_SIZE
            done = sum(p["pages_fault"] + p["pages_background"] for p in procs) * PAGE_SIZE
        return {"bytes_done": done, "bytes_total": total, "stats": stats}

    def answer_status(self, listening: socket.socket) -> None:
        """Serve status requests on `listening` (a SOCK_SEQPACKET listening socket, trust.listen_private)
        from the server's loop."""
        self._status.append(listening)
        self.server.add_watch(listening.fileno(), lambda: self._answer(listening))

    def _answer(self, listening: socket.socket) -> None:
        from lazarus.lazy.trust import check_peer
        try:
            conn, _ = listening.accept()
        except OSError:
            return
        with conn:
            try:
                check_peer(conn).close()
                reply = self.status()
            except LazarusError as e:
                reply = {"error": str(e)}
            with contextlib.suppress(OSError):
                conn.send(json.dumps(reply).encode(), _socket.MSG_NOSIGNAL)

    def run(self) -> dict[str, Any]:
        """Serve until no process needs the server; the stats."""
        return self.server.run()

    def close(self) -> None:
        try:
            self.server.close()
        finally:
            self.guard.close()


def start_serving(*, background: bool = True, stats_path: Path | None = None,
                  on_progress: ProgressCallback | None = None, guard: Any = None) -> Serving:
    """Fork the guard and make its server. Call it while this process has no thread (see the module docstring).
    `guard`: one started ahead (Guard.start(), by this process) to use instead."""
    from lazarus.lazy.guard import Guard
    from lazarus.lazy.server import LazyServer
    guard = guard if guard is not None else Guard.start()
    serving = Serving(server=None, guard=guard, on_progress=on_progress)
    try:
        serving.server = LazyServer(background=background, stats_path=stats_path, progress=serving._report,
                                    guard=guard)
    except BaseException:
        guard.close()
        raise
    return serving


def query_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the serving process whose status socket is `path` for its status.

    Raises:
        Untrusted (the socket is not root's), LazarusError when nobody answers there.
    """
    from lazarus.lazy.trust import connect_trusted
    s = connect_trusted(path)
    with s:
        s.settimeout(timeout)
        try:
            data = s.recv(1 << 20)
        except OSError as e:
            raise LazarusError(f"{path}: no status: {e.strerror or e}") from None
    if not data:
        raise LazarusError(f"{path}: no status: the server closed the connection")
    return json.loads(data)


def run_daemon(sock: Any, images: str, log_path: str, *, background: bool, stats_path: Path | None, status: Any,
               close_fds: tuple[int, ...], image: Any) -> int:
    """The body of the daemon spawn.fork_daemon forks (see there for the arguments); its exit code."""
    import socket
    theirs = socket.socket(fileno=sock.detach())  # what the server's side expects
    try:
        # Its own session: the caller's terminal or process group going away does not involve it.
        os.setsid()
        # Detach from the caller's pipes (a caller reading our output to EOF must not wait for the daemon); what
        # the daemon and its guard report (a process killed for a lost page source) goes to the log.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        unchecked = image is None
        if image is None:
            image = _open_image(images)
        # The log only for an image that can be served: a restore refused for a bad image leaves no file in its
        # directory (the handoff, if one comes, reports the image's error to the restore itself).
        if image is not None:
            os.dup2(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), 2)
        serving = start_serving(background=background, stats_path=stats_path)
        print(f"lazarus: lazy-pages daemon {os.getpid()} (guard {serving.guard.pid}) serves the lazy restore "
              f"from {images}. Should both die before the process has all its pages, it waits for them: "
              f"resume it with `lazarus lazy-pages --adopt PID -D {images}`", file=sys.stderr, flush=True)
        try:
            from lazarus.lazy.handoff import Listener
            seeded = {os.path.realpath(images): image} if image is not None else None
            Listener(serving.server, theirs, connected=True, images=seeded, unchecked=unchecked)
            if status is not None:
                serving.answer_status(status.sock)
            serving.run()
        finally:
            try:
                serving.close()
            finally:
                if status is not None:
                    status.close()
    except BaseException as e:  # noqa: BLE001 - a daemon reports and exits
        print(f"lazarus: lazy-pages: error: {e}", file=sys.stderr)
        return 1
    return 0


def _open_image(images: str) -> Any:
    """The image a daemon forked before the restore opened it will serve, opened (its files read, each matching
    the checksum its inventory lists) now, while the restore process has its own start-up to do, rather than at
    the handoff, which the restore waits for. Not checked (validate_image): the restore checks its own copy
    before it creates anything and says so at the handoff with that copy's inventory self_check, which the
    Listener compares with this one's (the same bytes), checking this copy only if they differ (Listener
    `unchecked`). A tree of 16 processes was checked twice at once on two CPUs before: 40-50 ms of this
    process's CPU beside the restore's own. None if it cannot be read: the restore finds that too and ends
    us, or the handoff reports it. The handoff's other imports are made now for the same reason."""
    from lazarus.images import Image
    from lazarus.images import mm as _mm  # noqa: F401 - used at the handoff
    from lazarus.images import validate as _validate  # noqa: F401 - used at the handoff should it check
    from lazarus.lazy import trust as _trust  # noqa: F401 - used at the handoff
    try:
        return Image.open(images)
    except Exception:  # noqa: BLE001 - reported by the restore or the handoff, which read it too
        return None


class Hand:
    """The restore's on_lazy callback that hands a task's uffd to the server behind a socket. Called, it waits
    for the server's answer; a tree restore instead send()s each process once it is built and settle()s before
    letting any run, so that the server checks one while the next is built."""

    wants_source = False  # the server builds its own page source from the image

    def __init__(self, sock: socket.socket, images: str | Path, checked: str | None = None) -> None:
        self.sock, self.images, self.checked = sock, images, checked
        self.pending: list[int] = []

    def __call__(self, pid: int, uffd: Any, _source: Any = None) -> None:
        self.send(pid, uffd)
        self.settle()

    def send(self, pid: int, uffd: Any) -> None:
        from lazarus.lazy.handoff import send_only
        try:
            send_only(self.sock, pid, self.images, uffd.fd, self.checked, uffd.features)
            self.pending.append(pid)
        finally:
            uffd.close()  # the server holds its own copy now

    def settle(self) -> None:
        """Every answer not read yet; ProtocolError at the first refusal."""
        from lazarus.lazy.handoff import await_reply
        while self.pending:
            await_reply(self.sock, self.pending.pop(0))


def hand_over(sock: socket.socket, images: str | Path, checked: str | None = None) -> Hand:
    """The restore's on_lazy callback that hands the task's uffd to the server behind `sock`. `checked`: the
    inventory self_check of the image the restore checked (handoff.send_only)."""
    return Hand(sock, images, checked)


def serve_socket(path: Path, *, background: bool = True, linger: float = 5.0, stats_path: Path | None = None,
                 on_progress: ProgressCallback | None = None,
                 on_listening: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """`lazarus lazy-pages`: listen on `path` (0600 in a root-only directory: trust.py) and serve every restore
    handed over there, until none needs us for `linger` seconds. Returns the stats."""
    from lazarus.lazy.handoff import Listener
    from lazarus.lazy.trust import listen_private
    listening = listen_private(path)
    try:
        if on_listening is not None:
            on_listening(path)
        serving = start_serving(background=background, stats_path=stats_path, on_progress=on_progress)
        try:
            Listener(serving.server, listening.sock, linger=linger)
            return serving.run()
        finally:
            serving.close()
    finally:
        listening.close()


def adopt_and_serve(pid: int, images: Path, *, background: bool = True, stats_path: Path | None = None,
                    on_progress: ProgressCallback | None = None,
                    on_adopted: Callable[[int], None] | None = None) -> dict[str, Any]:
    """`lazarus lazy-pages --adopt PID`: take the uffd from the waiting process itself (adopt.py) and serve it
    to the end. `on_adopted(missing pages)` is called once it is taken. Returns the stats."""
    from lazarus.lazy.adopt import adopt
    serving = start_serving(background=background, stats_path=stats_path, on_progress=on_progress)
    try:
        missing = adopt(serving.server, pid, images)
        if on_adopted is not None:
            on_adopted(missing)
        return serving.run()
    finally:
        serving.close()


__all__ = ["Daemon", "Hand", "Serving", "adopt_and_serve", "fork_daemon", "hand_over", "query_status", "run_daemon",
           "serve_socket", "start_serving"]
