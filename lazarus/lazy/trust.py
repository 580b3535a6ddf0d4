"""Who may steer a lazy-pages server, and to whom a restore hands a process's memory.

A lazy-pages server runs as root: it reads any image and copies its memory into the userfaultfd it is sent,
and its guard kills the processes it serves. So only root may hand it processes, and a restore hands memory
only to a server run by root:

    socket     0600, owned by root, in a directory owned by root that neither group nor others can write.
               The server binds it, and a restore connects to it, through an O_PATH fd of that directory
               taken when the directory was checked: a path swapped afterwards is never used.
    peer       (server side) SO_PEERCRED says uid 0 (its credentials at connect time), and its process (the
               pidfd SO_PEERPIDFD gives; before Linux 6.5 pidfd_open of that pid) still runs with real and
               effective uid 0 when its request is read.
    named pid  the peer itself or a descendant of it (a restored tree): a pidfd is opened on the number, the
               task behind that pidfd names its parent (PIDFD_GET_INFO reads it from the task itself), and so
               on up to the peer, each through a pidfd; the peer's pidfd and all those are unexited afterwards,
               so no number was reused in between. (The init of a `restore --pidns` is such a link: the restored
               task is its child.)
               From then on only that pidfd is used: it is watched, and the guard kills through it.
    uffd       must belong to the named task: one page it must be served and does not have yet (its
               pagemap shows no page there) is copied through the uffd, with its true contents from the
               image, and the task's pagemap must show that page present right after. A uffd fills only the address space it was made
               in, so the page appearing in the named task is the proof. (The task is stopped by its peer
               meanwhile; a wrong uffd costs its root sender one correct page of the image, nothing more.)
    server     (restore side) before the restored task exists: the directory and the socket file are
               checked as above, and SO_PEERCRED of the listening server must say uid 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from lazarus.errors import KernelError, LazarusError, NoSuchTask, Untrusted
from lazarus.kernel import abi
from lazarus.kernel.pidfd import PidFd, pidfd_exited, pidfd_info, pidfd_open
from lazarus.kernel.uffd import Outcome, Uffd
from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

PAGE_SIZE = abi.PAGE_SIZE
SOCKET_MODE = 0o600
_DIR_RULE = "the lazy-pages socket must be in a directory owned by root that neither group nor others can write"
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62


# -- the socket file -------------------------------------------------------------------------------------------


def _split(path: str | Path) -> tuple[str, str]:
    """(directory, name) of `path`, as Path's parent and name (os.path: the daemon imports no pathlib)."""
    head, name = os.path.split(os.fspath(path).rstrip("/") or "/")
    return head or ".", name


def open_checked_dir(directory: str | Path) -> int:
    """An O_PATH fd of `directory` once it is owned by root and not writable by group or others.

    Raises:
        Untrusted naming the directory and what is wrong with it.
    """
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise Untrusted(f"{directory}: {e.strerror}", path=str(directory)) from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != 0:
        problem = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o022:
        problem = f"mode {stat.S_IMODE(st.st_mode):o} lets group or others write it"
    if problem:
        os.close(fd)
        raise Untrusted(f"{directory}: {problem}: {_DIR_RULE}", path=str(directory))
    return fd


def _via(dirfd: int, name: str) -> str:
    """The socket's address through the checked directory's fd (never through the path again)."""
    addr = f"/proc/self/fd/{dirfd}/{name}"
    if len(addr.encode()) > 107:
        raise LazarusError(f"socket name too long: {name}")
    return addr


class PrivateSocket:
    """The lazy-pages server's listening socket (see the module docstring). close() removes the file."""

    def __init__(self, sock: socket.socket, dirfd: int, name: str, path: Path) -> None:
        self.sock = sock
        self.path = path
        self._dirfd = dirfd
        self._name = name
        self._ino = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino

    def forget(self) -> None:
        """Close this process's copy, leaving the file to the process it was handed to (a forked daemon)."""
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1
            self.sock.close()

    def close(self) -> None:
        if self._dirfd < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self._name, dir_fd=self._dirfd, follow_symlinks=False).st_ino == self._ino:
                os.unlink(self._name, dir_fd=self._dirfd)
        os.close(self._dirfd)
        self._dirfd = -1
        self.sock.close()


def listen_private(path: str | Path, backlog: int = 16, kind: int = socket.SOCK_SEQPACKET) -> PrivateSocket:
    """Listen on `path`: mode 0600 whatever the umask, in a directory only root can write. `kind`: the socket
    type (SOCK_STREAM for the restore service's HTTP).

    A stale socket there (nobody listening) is replaced; anything else at `path` is refused.
    Raises:
        Untrusted for the directory; LazarusError for what is in the way.
    """
    parent, name = _split(path)
    dirfd = open_checked_dir(parent)
    try:
        _clear_stale(dirfd, name, path, kind)
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            # An unbound socket's inode mode is what bind() gives the file (less the umask): 0600 from the start,
            # with no moment at which someone else could connect.
            os.fchmod(sock.fileno(), SOCKET_MODE)
            sock.bind(_via(dirfd, name))
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != SOCKET_MODE:
                raise LazarusError(f"{path}: socket created with mode {stat.S_IMODE(st.st_mode):o}, owner "
                                   f"{st.st_uid}, not 600 and root")
            sock.listen(backlog)
            return PrivateSocket(sock, dirfd, name, path)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        os.close(dirfd)
        raise


def _clear_stale(dirfd: int, name: str, path: Path, kind: int = socket.SOCK_SEQPACKET) -> None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LazarusError(f"{path}: exists and is not a socket; not replacing it", path=str(path))
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(_via(dirfd, name))
    except ConnectionRefusedError:
        os.unlink(name, dir_fd=dirfd)  # a socket nobody listens on: left by a server that died
        return
    except OSError as e:
        raise LazarusError(f"{path}: cannot tell whether a server listens there: {e.strerror}") from None
    finally:
        probe.close()
    raise LazarusError(f"{path}: a server already listens there", path=str(path))


def connect_trusted(path: str | Path) -> socket.socket:
    """Connect to the lazy-pages server at `path` after checking that only root could be listening there.

    Raises:
        Untrusted (directory, socket file or server not root's); LazarusError if nobody answers.
    """
    parent, name = _split(path)
    dirfd = open_checked_dir(parent)
    try:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError as e:
            raise LazarusError(f"cannot reach the lazy-pages server at {path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise Untrusted(f"{path} is not a socket")
        if st.st_uid != 0:
            raise Untrusted(f"{path} is owned by uid {st.st_uid}, not root: not handing a process to it")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(_via(dirfd, name))
            pid, uid, _gid = peer_ucred(s)
            if uid != 0:
                raise Untrusted(f"the lazy-pages server at {path} (pid {pid}) runs as uid {uid}, not root: "
                                "not handing a process to it")
        except OSError as e:
            s.close()
            raise LazarusError(f"cannot reach the lazy-pages server at {path}: {e.strerror}") from None
        except BaseException:
            s.close()
            raise
        return s
    finally:
        os.close(dirfd)


# -- the peer --------------------------------------------------------------------------------------------------


def peer_ucred(sock: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: (pid, uid, gid) of the peer when it connected (or listened, or made the socketpair)."""
    size = struct.calcsize(abi.UCRED_FORMAT)
    pid, uid, gid = struct.unpack(abi.UCRED_FORMAT, sock.getsockopt(socket.SOL_SOCKET, abi.SO_PEERCRED, size))
    return pid, uid, gid


@record
class Peer:
    """A checked peer: root, alive when checked. Owns `pidfd` (close())."""
    pid: int
    pidfd: int

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


def _peer_pidfd(sock: socket.socket, pid: int) -> int:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, abi.SO_PEERPIDFD)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise Untrusted(f"peer pid {pid} has exited") from None
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise Untrusted(f"peer pid {pid}: SO_PEERPIDFD: {e.strerror}") from None
    # Before Linux 6.5 there is only the number: should the peer exit and its pid be reused before this
    # pidfd_open, the check below runs on the new process (still required to be root).
    try:
        return pidfd_open(pid)
    except NoSuchTask:
        raise Untrusted(f"peer pid {pid} has exited") from None


def check_peer(sock: socket.socket) -> Peer:
    """The peer of a connected socket, once it is root (see the module docstring).

    Raises:
        Untrusted naming the peer's pid and uid.
    """
    pid, uid, _gid = peer_ucred(sock)
    if uid != 0:
        raise Untrusted(f"peer pid {pid} connected as uid {uid}: only root may hand processes to this server")
    pidfd = _peer_pidfd(sock, pid)
    try:
        try:
            info = pidfd_info(pidfd)
        except NoSuchTask:
            raise Untrusted(f"peer pid {pid} has exited") from None
        if info.pid != pid:
            raise Untrusted(f"peer pid {pid}: its pidfd is pid {info.pid}")
        if info.ruid != 0 or info.euid != 0:
            raise Untrusted(f"peer pid {pid} now runs as uid {info.ruid} (effective {info.euid}): only root may "
                            "hand processes to this server")
    except BaseException:
        os.close(pidfd)
        raise
    return Peer(pid, pidfd)


_MAX_DEPTH = 64  # how far below the peer a named process may be (a restored tree)


def verify_named_task(peer: Peer, pid: int) -> PidFd:
    """A pidfd of `pid` once it is the peer itself or a descendant of it (see the module docstring).

    Raises:
        Untrusted naming both pids.
    """
    if pid <= 0:
        raise Untrusted(f"peer pid {peer.pid} named pid {pid}")
    try:
        fd = pidfd_open(pid)
    except NoSuchTask:
        raise Untrusted(f"peer pid {peer.pid} named pid {pid}: no such process") from None
    chain: list[int] = []  # pidfds of the processes between `pid` and the peer
    try:
        try:
            ppid = pidfd_info(fd).ppid
            while pid != peer.pid and ppid != peer.pid:
                if len(chain) >= _MAX_DEPTH or ppid <= 1:
                    raise Untrusted(f"peer pid {peer.pid} named pid {pid}, which is neither itself nor its "
                                    f"descendant (its parent is pid {pidfd_info(fd).ppid})")
                chain.append(pidfd_open(ppid))
                ppid = pidfd_info(chain[-1]).ppid
        except NoSuchTask:
            raise Untrusted(f"peer pid {peer.pid} named pid {pid}: it or a parent of it has exited") from None
        # All still unexited now: no number can have been handed to another process since its pidfd was opened
        # and its parent read, so `fd` is the peer itself or its descendant.
        if pidfd_exited(peer.pidfd) or pidfd_exited(fd) or any(pidfd_exited(a) for a in chain):
            raise Untrusted(f"peer pid {peer.pid} or the pid {pid} it named exited during the check")
    except BaseException:
        os.close(fd)
        raise
    finally:
        for a in chain:
            os.close(a)
    return PidFd(fd, pid)


def _entries(pagemap_fd: int, addr: int, npages: int) -> list[int]:
    data = os.pread(pagemap_fd, 8 * npages, (addr // PAGE_SIZE) * 8)
    return list(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))


def _page_present(pagemap_fd: int, addr: int) -> bool:
    entries = _entries(pagemap_fd, addr, 1)
    if not entries:
        raise Untrusted(f"cannot read the pagemap entry of {addr:#x}")
    return bool(entries[0] & (_PM_PRESENT | _PM_SWAPPED))


def _first_absent(pagemap_fd: int, pending: Any, limit: int = 1024) -> tuple[int, int] | None:
    """(address, file page index) of the first page to serve that the task does not have yet, looking at no
    more than `limit` pages (a page may be both: the restore writes the rseq area before registering)."""
    seen = 0
    for start, npages, fidx in pending.runs():
        n = min(npages, limit - seen)
        for i, entry in enumerate(_entries(pagemap_fd, start, n)):
            if not entry & (_PM_PRESENT | _PM_SWAPPED):
                return start + i * PAGE_SIZE, fidx + i
        seen += n
        if seen >= limit:
            break
    return None


def verify_uffd_owner(task: PidFd, uffd: Uffd, source: Any) -> None:
    """Check that `uffd` serves the address space of `task` (see the module docstring), by filling through it
    one page that `source` must serve and `task` does not have yet. A source with nothing to serve never
    writes through the uffd, and needs no check.

    Raises:
        Untrusted when the page does not appear in `task`; PageSourceLost if the image page is unreadable.
    """
    pending = source.pending()
    if not pending:
        return
    try:
        pm = os.open(f"/proc/{task.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise Untrusted(f"pid {task.pid}: cannot read its pagemap: {e.strerror}") from None
    try:
        if task.exited():  # the pagemap opened by number is that task's only if it still runs now
            raise Untrusted(f"pid {task.pid} exited during the check")
        found = _first_absent(pm, pending)
        if found is None:
            raise Untrusted(f"pid {task.pid} already has every page it was to be served first: not a fresh "
                            "lazy restore")
        addr, fidx = found
        try:
            _done, outcome = uffd.copy(addr, source.address(fidx, 1), PAGE_SIZE)
        except KernelError as e:
            raise Untrusted(f"the userfaultfd sent for pid {task.pid} cannot fill {addr:#x}: {e}") from None
        if outcome is not Outcome.DONE or not _page_present(pm, addr):
            raise Untrusted(f"the userfaultfd sent for pid {task.pid} is not that process's (a page copied "
                            f"through it at {addr:#x} did not appear in pid {task.pid})")
    finally:
        os.close(pm)


__all__ = ["Peer", "PrivateSocket", "check_peer", "connect_trusted", "listen_private", "open_checked_dir",
           "peer_ucred", "verify_named_task", "verify_uffd_owner"]
