"""Forking a restore's private lazy-pages daemon, from a module that imports next to nothing.

The daemon (daemon.py, run_daemon) is forked by the restore command as early as it can be, before the command
imports the restore, the API or the daemon's own modules: the daemon's start-up then runs beside the command's
for longer, and the command shares fewer pages with it, which both would copy on their first write after the
fork (Python writes to every object it touches: reference counts). Measured in `restore --lazy -d` here: the
fork moved from ~20 ms after the command's start to ~15.

This module imports only what the interpreter has loaded at start-up (os, _socket) and records; the daemon's
child imports daemon.py, which the parent never does on this path.
"""

from __future__ import annotations

import _socket
import contextlib
import os

from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import socket
    from pathlib import Path
    from typing import Any


@record
class Daemon:
    """A private lazy-pages daemon forked for one restore; `sock` carries the handoff (handoff.send_process)."""

    pid: int
    sock: socket.socket

    def end(self, timeout: float = 5.0) -> None:
        """The restore failed: close our end (the daemon then has nothing to serve and exits, closing its guard)
        and reap it; killed if it has not exited within `timeout` seconds. Harmless once it is reaped."""
        import time
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.002)


def daemon_log(directory: str) -> str:
    """Where a private daemon reports by default: DIR/lazy-pages.log, or nowhere if DIR is not writable."""
    return os.path.join(directory, "lazy-pages.log") if os.access(directory, os.W_OK) else os.devnull


def fork_daemon(images: str, log_path: str, *, background: bool = True, stats_path: Path | None = None,
                status: Any = None, close_fds: tuple[int, ...] = (), image: Any = None) -> Daemon:
    """Fork a lazy-pages daemon that serves the one process a restore will hand it over the returned socket,
    then exits. Call it while this process has no thread. `status`: a trust.PrivateSocket to answer status
    requests on (closed, and its file removed, when the daemon is done). `close_fds`: fds the daemon closes at
    once, what its parent's callers wait on (a connection); their objects stay referenced by the frames the
    daemon never returns to, so no finaliser closes those numbers again. `image`: the Image of `images` the
    restore opened and validated (restore.open_image), which the daemon serves from without reading it again;
    without it (the daemon forked before the restore read the image, so that both start at once) the daemon
    opens and checks it itself before it waits for the handoff.
    """
    # _socket's pair, not socket's: `socket` (the enum conversion of its constants, selectors) costs the restore
    # command ~2 ms of start-up, and the restore only sends one message and reads the answer (handoff.py).
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon child; the tests observe it from outside
        code = 1
        try:
            ours.close()
            from lazarus.lazy.daemon import run_daemon
            code = run_daemon(theirs, images, log_path, background=background, stats_path=stats_path,
                              status=status, close_fds=close_fds, image=image)
        except BaseException as e:  # noqa: BLE001 - run_daemon reports its own; this is its import failing
            with contextlib.suppress(Exception):
                os.write(2, f"lazarus: lazy-pages daemon: error: {e}\n".encode())
        finally:
            os._exit(code)
    theirs.close()
    return Daemon(pid, ours)


__all__ = ["Daemon", "daemon_log", "fork_daemon"]
