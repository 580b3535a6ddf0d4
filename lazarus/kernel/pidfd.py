"""pidfds: stable handles on processes (no pid-reuse races), taking fds out of them, signalling them, and a
poll-able "this process has exited" readiness (POLLIN once it exits, zombie or reaped)."""

from __future__ import annotations

import contextlib
import errno
import os
import select

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi
from lazarus.kernel.syscall import ioctl_raw, raw_syscall
from lazarus.records import record


def pidfd_open(pid: int, flags: int = 0) -> int:
    """pidfd_open(2): a close-on-exec pidfd for `pid`. Raises NoSuchTask if there is no such process."""
    ret, err = raw_syscall(abi.SYS.pidfd_open, pid, flags)
    if ret < 0:
        if err == errno.ESRCH:
            raise NoSuchTask(f"no such process {pid}", pid=pid)
        raise KernelError(f"pidfd_open({pid})", err, pid=pid)
    return ret


def pidfd_getfd(pidfd: int, targetfd: int, *, pid: int | None = None) -> int:
    """pidfd_getfd(2): duplicate fd `targetfd` of the process into our table (close-on-exec).

    Raises:
        NoSuchTask when the process is gone; KernelError (EBADF: no such fd there; EPERM: ptrace access).
    """
    ret, err = raw_syscall(abi.SYS.pidfd_getfd, pidfd, targetfd, 0)
    if ret < 0:
        if err == errno.ESRCH:
            raise NoSuchTask(f"no such process {pid if pid is not None else '?'}", pid=pid)
        raise KernelError(f"pidfd_getfd(fd {targetfd})", err, pid=pid)
    return ret


def pidfd_send_signal(pidfd: int, sig: int, *, pid: int | None = None) -> bool:
    """pidfd_send_signal(2). Returns False if the process has already exited (ESRCH), True if sent."""
    ret, err = raw_syscall(abi.SYS.pidfd_send_signal, pidfd, sig, 0, 0)
    if ret < 0:
        if err == errno.ESRCH:
            return False
        raise KernelError(f"pidfd_send_signal({sig})", err, pid=pid)
    return True


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind `pidfd` has exited (zombie or reaped): its pidfd polls readable."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


@record(frozen=True)
class PidInfo:
    """What a pidfd says about its process, in our pid namespace: pid, parent's pid, real and effective uid."""
    pid: int
    ppid: int
    ruid: int
    euid: int


_get_info_works: bool | None = None  # None: not tried yet


def pidfd_info(pidfd: int) -> PidInfo:
    """The pid, parent and uids of the live process behind `pidfd`.

    With PIDFD_GET_INFO (Linux 6.13+) the kernel reads them from that very task. Older kernels: the pidfd's
    fdinfo gives its pid, /proc/<pid>/status the rest, and the pidfd still being unexited afterwards proves
    that number was not reused in between (a pid number is freed only once its process has exited).

    Raises:
        NoSuchTask once the process has exited.
    """
    global _get_info_works
    if _get_info_works is not False:
        info = abi.pidfd_info(mask=abi.PIDFD_INFO_PID | abi.PIDFD_INFO_CREDS)
        ret, err = ioctl_raw(pidfd, abi.PIDFD_GET_INFO, info)
        if ret >= 0:
            _get_info_works = True
            return PidInfo(info.tgid, info.ppid, info.ruid, info.euid)
        if err == errno.ESRCH:
            raise NoSuchTask("the process behind a pidfd has exited")
        if err not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise KernelError("PIDFD_GET_INFO", err)
        _get_info_works = False
    return pidfd_info_procfs(pidfd)


def pidfd_info_procfs(pidfd: int) -> PidInfo:
    """pidfd_info() for kernels without PIDFD_GET_INFO (public for its test)."""
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        pid = int(fields["Pid"])
        if pid <= 0:
            raise NoSuchTask("the process behind a pidfd has exited")
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        uids = fields["Uid"].split()
        info = PidInfo(pid, int(fields["PPid"]), int(uids[0]), int(uids[1]))
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise NoSuchTask("the process behind a pidfd has exited") from e
    if pidfd_exited(pidfd):
        raise NoSuchTask(f"no such process {pid}", pid=pid)
    return info


class PidFd:
    """An owned pidfd. `fileno()` is readable (POLLIN) once the process has exited: register it in a selector.

    Attributes:
        pid: the pid it was opened for (informational; the fd is what identifies the process).
        fd: the pidfd (-1 once closed).
    """

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid

    @classmethod
    def open(cls, pid: int) -> PidFd:
        """Raises NoSuchTask if `pid` does not exist."""
        return cls(pidfd_open(pid), pid)

    def fileno(self) -> int:
        return self.fd

    def exited(self) -> bool:
        """True once the process has exited (non-blocking)."""
        return self.wait(0)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: forever) for the process to exit. Returns True if it has."""
        if self.fd < 0:
            return True
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                return bool(p.poll(ms))
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue

    def send_signal(self, sig: int) -> bool:
        """Returns False if the process already exited."""
        if self.fd < 0:
            return False
        return pidfd_send_signal(self.fd, sig, pid=self.pid)

    def kill(self) -> bool:
        return self.send_signal(abi.SIGKILL)

    def getfd(self, targetfd: int) -> int:
        return pidfd_getfd(self.fd, targetfd, pid=self.pid)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PidFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PidFd(pid={self.pid}, fd={self.fd})"


__all__ = ["PidFd", "PidInfo", "pidfd_exited", "pidfd_getfd", "pidfd_info", "pidfd_info_procfs", "pidfd_open",
           "pidfd_send_signal"]
