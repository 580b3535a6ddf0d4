"""Handing a restored process's userfaultfd to a lazy-pages server over an AF_UNIX socket.

    restore                                      lazy-pages server (its own process, with its guard)
    -------                                      ------------------
    check the socket's directory and file,
    connect / socketpair ----------------------> accept
    SO_PEERCRED of the server: root
    uffd taken from the task (pidfd_getfd)
    {"pid", "images"} + SCM_RIGHTS [uffd] -----> check the peer (root), the pid (the peer or its child, by
                                                 pidfd), open the image, build its page source, check the
                                                 uffd is that task's (one page through it), add_process()
                                                 (the guard now holds a copy of the uffd and the pidfd)
    <----------------------------------------- {"ok": true} | {"ok": false, "error": "..."}
    detach the task: it runs                     then (its loop) the verify-ahead fork of a large page file

A private daemon's request also carries "checked" (the self_check of the image the restore checked) and
"features" (the uffd's, from the restore's UFFDIO_API): taken from its parent only (a socketpair), they spare
it a second image check and the fdinfo read on the way to the answer.

The restore lets the task run only after the server has answered, so there is no moment when the task runs
and nobody holds its uffd. The server opens the image itself (metadata checks again, ~2 ms). Who may talk to
whom is trust.py's business (its docstring has the rules).
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import sys
import time

from lazarus.errors import LazarusError, ProtocolError
from lazarus.kernel.procfs import own_pid
from lazarus.kernel.uffd import Uffd
from lazarus.logs import getLogger

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import socket
    from pathlib import Path

    # trust.py is the server's side: a restore handing a process over (send_process) does not load it
    from typing import Any

    from lazarus.lazy.trust import Peer

log = getLogger(__name__)
MAX_MSG = 64 << 10
REPLY_TIMEOUT = 30.0


def send_process(sock: socket.socket, pid: int, images: Path, uffd_fd: int) -> None:
    """Hand `uffd_fd` of restored task `pid` (image directory `images`) to the server behind `sock`.

    Raises ProtocolError when the server refuses or does not answer.
    """
    send_only(sock, pid, images, uffd_fd)
    await_reply(sock, pid)


def send_only(sock: socket.socket, pid: int, images: Path, uffd_fd: int, checked: str | None = None,
              features: int | None = None) -> None:
    """The request of send_process() without waiting for its answer: a tree sends each process as soon as it is
    built, and the server checks it while the restore builds the next (await_reply() once per process, in
    order, before any of them runs). `checked`: the self_check of the inventory whose image the restore
    checked whole (validate_image), which spares the private daemon that check of the same image. `features`:
    the uffd's enabled features (the restore did its UFFDIO_API), which spares the private daemon reading them
    from fdinfo."""
    req: dict[str, Any] = {"pid": pid, "images": os.path.realpath(images)}
    if checked is not None:
        req["checked"] = checked
    if features is not None:
        req["features"] = features
    msg = json.dumps(req).encode()
    sock.settimeout(REPLY_TIMEOUT)
    try:
        # socket.send_fds without `socket` (the restore command's start-up: see daemon.fork_daemon)
        sock.sendmsg([msg], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, uffd_fd.to_bytes(4, sys.byteorder))])
    except OSError as e:
        raise ProtocolError(f"lazy-pages server: {e.strerror or e}") from e


def await_reply(sock: socket.socket, pid: int) -> None:
    """The server's answer to the request for `pid` (the oldest one unanswered); ProtocolError when it refused
    or does not answer."""
    sock.settimeout(REPLY_TIMEOUT)
    try:
        reply = sock.recv(MAX_MSG)
    except OSError as e:
        raise ProtocolError(f"lazy-pages server: {e.strerror or e}") from e
    if not reply:
        raise ProtocolError("lazy-pages server closed the connection without answering")
    try:
        ans = json.loads(reply)
    except ValueError as e:
        raise ProtocolError("lazy-pages server sent a malformed reply") from e
    if not ans.get("ok"):
        raise ProtocolError(f"lazy-pages server refused pid {pid}: {ans.get('error', 'no reason given')}")


def connect(path: Path) -> socket.socket:
    """A connection to the lazy-pages server at `path`, once it is root's (trust.connect_trusted).

    Raises:
        Untrusted, or LazarusError when nobody answers there.
    """
    from lazarus.lazy.trust import connect_trusted
    return connect_trusted(path)


class Listener:
    """Accepts handoffs for a LazyServer, inside its event loop.

    Parameters: server, the LazyServer; sock, a listening SOCK_SEQPACKET socket, or (with `connected`) one
    end of a socketpair whose peer is the restore (kept until the restore closes it: a tree hands over one
    process after another).
    The server keeps running while the listener waits for its first process; after that it exits once no
    process needs it.
    """

    def __init__(self, server: Any, sock: socket.socket, *, connected: bool = False,
                 linger: float = 0.0, images: dict[str, Any] | None = None, unchecked: bool = False) -> None:
        self.server = server
        self.linger = linger
        self._idle_since: float | None = None
        self.sock = sock
        self.received = 0
        self.open = True
        self.connected = connected
        # resolved image directory -> (its inventory's identity, Image opened and validated): the private daemon
        # of a restore starts with the restore's own (it forked after the restore checked it), instead of reading
        # it again. The identity makes a directory dumped again (a new inventory) be opened again, not served
        # from the old image.
        self._images: dict[str, tuple[tuple[int, int, int], Any]] = {
            path: (_inventory_id(path), img) for path, img in (images or {}).items()}
        # `unchecked`: those images were opened (files read, checksums matched) but not checked (validate_image):
        # the private daemon of a restore that checks them itself. Each is checked at its first handoff unless
        # the restore says it checked one with this very inventory (the self_check of its own copy; equal, both
        # copies are the same bytes, each file matching the checksum the inventory lists); it is the restore,
        # our parent, behind a socketpair (connected), that says so.
        self._unchecked: set[str] = set(self._images) if unchecked and connected else set()
        # The peer of a socketpair is fixed when the pair is made: our parent, the restore. It is checked once,
        # here, while the restore still imports and builds its process, rather than at the handoff, which the
        # restore waits for (~0.5 ms); a refusal is still the handoff's answer.
        self._pair_peer: Peer | LazarusError | None = None
        if connected:
            from lazarus.lazy.trust import check_peer
            try:
                self._pair_peer = check_peer(sock)
            except LazarusError as e:
                self._pair_peer = e
            server.add_watch(sock.fileno(), lambda: self._receive(sock))
        else:
            server.add_watch(sock.fileno(), self._accept)
        server.keep_alive = self._keep_alive

    def _keep_alive(self) -> bool:
        """Asked by the loop when no process is served: wait for the first one, then `linger` seconds more
        for further restores before exiting."""
        if not self.open:
            return False
        if self.received == 0 or self.connected:
            # A socketpair with the restore: it may hand over more processes (a tree) until it closes its end.
            return True
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since < self.linger

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.server.add_watch(conn.fileno(), lambda: self._receive(conn))

    def _receive(self, conn: socket.socket) -> None:
        try:
            import socket  # the server's side, which has it loaded already
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, 4)
        except OSError:
            msg, fds = b"", []
        if not msg:
            self._drop(conn)
            if conn is self.sock:
                self.close()
            return
        from lazarus.lazy.trust import check_peer
        reply: dict[str, Any] = {"ok": True}
        peer: Peer | None = None
        try:
            # Who is asking comes first: nothing of the request is acted on before.
            if conn is self.sock and self._pair_peer is not None:
                if isinstance(self._pair_peer, LazarusError):
                    raise self._pair_peer
                peer = self._pair_peer
            else:
                peer = check_peer(conn)
            if len(fds) != 1:
                raise ProtocolError(f"expected one userfaultfd, got {len(fds)} descriptors")
            req = json.loads(msg)
            checked = req.get("checked")
            # What the uffd's features are is taken from our parent, the restore behind a socketpair (connected),
            # which made it; any other peer's uffd is read (fdinfo) for them and for being a uffd at all.
            features = req.get("features") if self.connected else None
            self._add(peer, int(req["pid"]), str(req["images"]), fds.pop(),
                      checked if isinstance(checked, str) else None,
                      features if type(features) is int and features >= 0 else None)
            self.received += 1
            self._idle_since = None
        except (LazarusError, ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": str(e)}
            log.warning("lazy-pages: refused a process: %s", e)
        finally:
            for fd in fds:
                os.close(fd)
            if peer is not None and peer is not self._pair_peer:
                peer.close()
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode())
        # A connection stays open for the next process of the same restore (a tree hands them over one after
        # the other); it is dropped when the restore closes it (above).

    def _add(self, peer: Peer, pid: int, images: str, fd: int, checked: str | None = None,
             features: int | None = None) -> None:
        from lazarus.images import Image
        from lazarus.images.mm import lazy_object_ids, served_vmas
        from lazarus.images.validate import validate_image
        from lazarus.lazy.anchor import find_anchor
        from lazarus.lazy.trust import verify_named_task, verify_uffd_owner

        try:
            pidfd = verify_named_task(peer, pid)
        except BaseException:
            os.close(fd)
            raise
        try:
            uffd = Uffd.adopt(fd, features=features)
        except BaseException:
            os.close(fd)
            pidfd.close()
            raise
        try:
            ident = _inventory_id(str(images))
            cached = self._images.get(str(images))
            img = cached[1] if cached is not None and cached[0] == ident else None
            if img is not None and str(images) in self._unchecked:
                if checked is None or checked != img.inventory.get("self_check"):
                    validate_image(img)  # not the image the restore checked (or it did not say): here, then
                self._unchecked.discard(str(images))
            if img is None:
                img = Image.open(images)
                try:
                    validate_image(img)  # the same semantic check as the restore's, before serving anything
                except BaseException:
                    img.close()
                    raise
                self._images[str(images)] = (ident, img)
            # The image knows the task by its own pid, which differs from `pid` (ours) under restore --pidns;
            # `pid` is held by pidfd and stopped, so its number cannot have moved to another task.
            ipid = _own_pid(pid)
            task = img.task(ipid)
            mm = task["mm"]
            uffd.task_fd = find_anchor(pid, uffd.fd)  # the task has not run yet: its only copy is the anchor
            served = served_vmas(img, ipid, lazy_object_ids(mm, task["files"]))
            # one mapping of a page file for every restore of it this server serves (lazy/pagefiles.py)
            source = self.server.page_files.source(served, img.page_file(ipid),
                                                   name=f"{os.path.basename(images)}/pages-{ipid}.img")
            verify_uffd_owner(pidfd, uffd, source)
        except BaseException:
            uffd.close()
            pidfd.close()
            raise
        # start_later: the verify-ahead fork of a large page file waits for the loop, after the answer, so that
        # the process runs first (1 GiB then costs the restore what 64 MiB does)
        self.server.add_process(pid, uffd, source, pidfd=pidfd, start_later=True)
        log.info("lazy-pages: serving pid %d from %s", pid, images)

    def _drop(self, conn: socket.socket) -> None:
        self.server.remove_watch(conn.fileno())
        conn.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self._drop(self.sock)
            if self._pair_peer is not None and not isinstance(self._pair_peer, LazarusError):
                self._pair_peer.close()


_OUR_PIDNS: list[str] = []  # the link of our own /proc/self/ns/pid, read once


def _own_pid(pid: int) -> int:
    """procfs.own_pid(pid), without reading and parsing the task's status (~0.15 ms) when it is in our own PID
    namespace (its ns/pid link is ours: the plain restore), where its id there is `pid` itself."""
    try:
        if not _OUR_PIDNS:
            _OUR_PIDNS.append(os.readlink("/proc/self/ns/pid"))
        if os.readlink(f"/proc/{pid}/ns/pid") == _OUR_PIDNS[0]:
            return pid
    except OSError:
        pass  # own_pid reports it
    return own_pid(pid)


def _inventory_id(directory: str) -> tuple[int, int, int]:
    """(device, inode, mtime) of DIRECTORY/inventory.json, or zeros if it cannot be read (Image.open then
    reports it)."""
    try:
        st = os.stat(os.path.join(directory, "inventory.json"))
    except OSError:
        return (0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_mtime_ns)
