"""The guard: never let a lazily restored process run on zeros instead of its data.

Once the last fd of a userfaultfd is closed the kernel serves later faults itself, with zero pages. If the lazy
server died (crash, SIGKILL, OOM) while a process still had pages to receive, that process would silently run
on zero-filled memory. The guard prevents it:

    server process                                  guard process (forked before any thread, or spawned)
    --------------                                  -------------
    add_process ---- SEQPACKET: "add" + [uffd, pidfd] ---->  holds a dup of the uffd: while it does, faults in
    fork event  ---- "add" (parent, no pid) + [uffd] ---->    the process just WAIT if the server is gone
    child pid   ---- "pid" + [pidfd] ---------------->
    complete    ---- "complete" ------------------------>  closes its dups: the kernel takes over
    source lost ---- "lost" (reason) ------------------>  SIGKILLs it, reports "pid N killed: its page source was
                                                          lost (reason)" on stderr and in the report file
    close()     ---- "done" ---------------------------->  exits (killing what is still incomplete)
    (dies)          EOF on the socket / server pidfd ---->  SIGKILLs every process not complete, reports, exits

A kill waits (bounded) for the process to be gone before the guard drops its dups, so that no fault of a dying
task is ever served with a zero page. Fds in flight on the socket are references too: once send returns, the
uffd is safe even if the server dies before the guard reads the message.

Fork children whose pid the server had not learnt yet are found, when they must be killed, as the children of
their parent that the guard does not know (see server.py for how the server learns a child's pid). The guard
kills only through pidfds: those the server sent (of processes it restored, or that a checked peer named:
trust.py), and those it opens on such a child and checks, through the pidfd, to be that parent's child.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time

from lazarus.errors import LazarusError, NoSuchTask
from lazarus.kernel.pidfd import pidfd_exited, pidfd_info, pidfd_open, pidfd_send_signal
from lazarus.kernel.syscall import keep_only_fd
from lazarus.logs import getLogger
from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

log = getLogger("lazarus.lazy")

_MAX_MSG = 65536
_KILL_WAIT = 5.0


class Guard:
    """The server's handle on a guard process. Methods never raise when the guard is gone (it then did, or
    will do, its job on its own); `alive` tells."""

    def __init__(self, sock: socket.socket, pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
        self._sock = sock
        self.pid = pid
        self._proc = proc
        self.alive = True

    @classmethod
    def start(cls, report_path: str | Path | None = None, *, spawn: bool = False) -> Guard:
        """Start the guard. Fork (default: ~1 ms) only from a process without threads; spawn=True runs
        `python -m lazarus.lazy.guard` instead (any time, ~50 ms)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server_pid = os.getpid()
        report = str(report_path) if report_path is not None else None
        if spawn:
            import subprocess  # here: a forked guard (every restore's) does not need it, ~2-3 ms to import
            args = [sys.executable, "-m", "lazarus.lazy.guard", "--fd", str(child_sock.fileno()),
                    "--server-pid", str(server_pid)]
            if report:
                args += ["--report", report]
            proc = subprocess.Popen(args, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            child_sock.close()
            return cls(parent_sock, proc.pid, proc)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the guard child; coverage is the tests' real kill
            code = 70
            try:
                keep = child_sock.fileno()
                keep_only_fd(keep)
                code = _guard_main(keep, server_pid, report)
            finally:
                os._exit(code)
        child_sock.close()
        return cls(parent_sock, pid)

    # -- messages ------------------------------------------------------------------------------------------

    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
        if not self.alive:
            return
        data = json.dumps(msg, separators=(",", ":")).encode()
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds, socket.MSG_NOSIGNAL)
            else:
                self._sock.send(data, socket.MSG_NOSIGNAL)
        except OSError as e:
            self.alive = False
            log.warning("the guard (pid %d) is gone (%s): served processes are no longer protected against "
                        "the loss of this server", self.pid, e.strerror)

    def add(self, key: int, uffd_fd: int, *, pid: int | None, pidfd: int | None = None,
            parent: int | None = None) -> None:
        """Hold a dup of `uffd_fd` for process `key` (pid None for a fork child not yet identified)."""
        fds = [uffd_fd] + ([pidfd] if pidfd is not None else [])
        self._send({"op": "add", "key": key, "pid": pid, "parent": parent, "pidfd": pidfd is not None}, fds)

    def set_pid(self, key: int, pid: int, pidfd: int | None) -> None:
        self._send({"op": "pid", "key": key, "pid": pid, "pidfd": pidfd is not None},
                   [pidfd] if pidfd is not None else None)

    def complete(self, key: int) -> None:
        """Process `key` has all its pages (or is gone): drop the dups."""
        self._send({"op": "complete", "key": key})

    def lost(self, key: int, reason: str) -> None:
        """Process `key` lost its page source: kill it and report."""
        self._send({"op": "lost", "key": key, "reason": reason})

    def close(self, timeout: float = 10.0) -> int | None:
        """Say "done" and wait for the guard to exit (it kills whatever is still incomplete). Returns its
        exit status (None if it had to be left running)."""
        self._send({"op": "done"})
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        status: int | None = None
        if self._proc is not None:
            import subprocess
            try:
                status = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                status = None
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    wpid, st = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if wpid:
                    status = os.waitstatus_to_exitcode(st)
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.close()
        return status


# ---------------------------------------------------------------------------------------------
# the guard process


@record
class _Entry:
    key: int
    uffd: int
    pidfd: int | None
    pid: int | None
    parent: int | None
    killed: bool = False


class _GuardState:
    def __init__(self, sock_fd: int, server_pid: int, report: str | None) -> None:
        self.sock = socket.socket(fileno=sock_fd)
        self.server_pid = server_pid
        self.report = report
        self.entries: dict[int, _Entry] = {}
        self.known_pids: set[int] = set()

    def log(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(2, f"lazarus: {line}\n".encode())
        if self.report:
            try:
                fd = os.open(self.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, f"{line}\n".encode())
                finally:
                    os.close(fd)
            except OSError:
                pass

    def drop(self, key: int) -> None:
        e = self.entries.pop(key, None)
        if e is None:
            return
        for fd in (e.uffd, e.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def handle(self, msg: dict, fds: list[int]) -> bool:
        """Apply one message; False when the server said "done"."""
        op = msg.get("op")
        key = msg.get("key", -1)
        if op == "add":
            uffd = fds[0] if fds else -1
            pidfd = fds[1] if msg.get("pidfd") and len(fds) > 1 else None
            pid = msg.get("pid")
            self.entries[key] = _Entry(key, uffd, pidfd, pid, msg.get("parent"))
            if pid is not None:
                self.known_pids.add(pid)
            return True
        if op == "pid":
            e = self.entries.get(key)
            pidfd = fds[0] if fds else None
            if e is None:
                if pidfd is not None:
                    os.close(pidfd)
                return True
            e.pid = msg.get("pid")
            if e.pid is not None:
                self.known_pids.add(e.pid)
            if pidfd is not None:
                if e.pidfd is not None:
                    os.close(e.pidfd)
                e.pidfd = pidfd
            return True
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if op == "complete":
            self.drop(key)
            return True
        if op == "lost":
            e = self.entries.get(key)
            if e is not None:
                self.kill([e], msg.get("reason") or "page source failed", report_all=True)
            return True
        return op != "done"

    @staticmethod
    def _signal(pidfd: int) -> bool:
        """SIGKILL through pidfd unless the process already exited. True if it was alive."""
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        if p.poll(0):
            return False
        try:
            return pidfd_send_signal(pidfd, signal.SIGKILL)
        except (LazarusError, OSError):
            return False

    @staticmethod
    def _child_pidfd(parent: _Entry, pid: int) -> int | None:
        """A pidfd of `pid` if it is a child of `parent` (checked through the pidfd, with the parent's own
        pidfd unexited afterwards so that its number was not reused), else None: never a stranger's."""
        if parent.pidfd is None or parent.pid is None:
            return None
        try:
            fd = pidfd_open(pid)
        except (NoSuchTask, LazarusError, OSError):
            return None
        try:
            ok = pidfd_info(fd).ppid == parent.pid and not pidfd_exited(parent.pidfd)
        except (LazarusError, OSError):
            ok = False
        if not ok:
            os.close(fd)
            return None
        return fd

    def _unknown_children(self, parent: _Entry | None) -> list[int]:
        if parent is None or parent.pid is None:
            return []
        out = []
        base = f"/proc/{parent.pid}/task"
        try:
            tids = os.listdir(base)
        except OSError:
            return []
        for tid in tids:
            try:
                with open(f"{base}/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                continue
        return [p for p in out if p not in self.known_pids]

    def kill(self, victims: list[_Entry], reason: str, *, report_all: bool = False) -> None:
        """SIGKILL the victims still alive, wait (bounded) until they are gone, drop their dups, and report
        each one killed (with report_all, every victim: the server may have killed it first)."""
        wait_fds: list[int] = []
        own_fds: list[int] = []
        # fork children the server had not identified yet are their parent's children the guard does not know:
        # list them before any kill (a dead parent's children are reparented and vanish from its list)
        orphans: list[tuple[int, int]] = []  # (pid, pidfd), each checked to be a child of a served process
        for e in victims:
            if e.pid is None and e.pidfd is None:
                parent = self.entries.get(e.parent) if e.parent is not None else None
                for c in self._unknown_children(parent):
                    if parent is not None and all(c != o for o, _ in orphans):
                        fd = self._child_pidfd(parent, c)
                        if fd is not None:
                            orphans.append((c, fd))
        killed: list[int] = []
        for e in victims:
            if e.pidfd is not None:
                if self._signal(e.pidfd) or report_all:
                    killed.append(e.pid if e.pid is not None else -1)
                wait_fds.append(e.pidfd)
            # A pid without a pidfd is one the server found already gone: never killed by number, which
            # could hit whoever has that number now.
            e.killed = True
        for cpid, fd in orphans:
            own_fds.append(fd)
            wait_fds.append(fd)
            if self._signal(fd):
                killed.append(cpid)
            self.known_pids.add(cpid)
        for pid in killed:
            self.log(f"pid {pid if pid >= 0 else '?'} killed: its page source was lost ({reason})")
        # wait until they are gone before letting go of the uffds (bounded)
        deadline = time.monotonic() + _KILL_WAIT
        pending = list(wait_fds)
        while pending and time.monotonic() < deadline:
            p = select.poll()
            for fd in pending:
                p.register(fd, select.POLLIN)
            ready = {fd for fd, _ in p.poll(100)}
            pending = [fd for fd in pending if fd not in ready]
        for fd in own_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for e in victims:
            self.drop(e.key)

    def kill_incomplete(self, reason: str) -> None:
        victims = list(self.entries.values())
        # children first is not needed: each kill is independent; parents are listed before their children
        if victims:
            self.kill(victims, reason)


def _guard_main(sock_fd: int, server_pid: int, report: str | None) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(1))
    with contextlib.suppress(OSError):
        os.setsid()
    st = _GuardState(sock_fd, server_pid, report)
    try:
        server_fd: int | None = pidfd_open(server_pid)
    except (LazarusError, OSError):
        server_fd = None
    poller = select.poll()
    poller.register(st.sock.fileno(), select.POLLIN)
    if server_fd is not None:
        poller.register(server_fd, select.POLLIN)
    st.sock.setblocking(False)
    while True:
        if terminated:
            st.kill_incomplete("the guard was terminated")
            return 0
        try:
            ready = poller.poll(1000)
        except InterruptedError:  # pragma: no cover
            continue
        server_gone = any(fd == server_fd for fd, _ in ready)
        # drain the socket first: a "done" may be queued right before the server exited
        eof = False
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(st.sock, _MAX_MSG, 16)
            except BlockingIOError:
                break
            except InterruptedError:  # pragma: no cover
                continue
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    eof = True
                    break
                raise
            if not data:
                eof = True
                for fd in fds:
                    os.close(fd)
                break
            try:
                msg = json.loads(data)
            except ValueError:
                for fd in fds:
                    os.close(fd)
                continue
            if not st.handle(msg, list(fds)):
                st.kill_incomplete("the lazy server stopped before the restore completed")
                return 0
        if eof or server_gone:
            st.kill_incomplete("the lazy server died")
            return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="lazarus-guard")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--report")
    a = ap.parse_args(argv)
    return _guard_main(a.fd, a.server_pid, a.report)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Guard"]
