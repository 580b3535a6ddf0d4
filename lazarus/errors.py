"""The exception hierarchy. Every error a user can cause ends up as one of these, one line each."""

from __future__ import annotations

import errno as _errno
import os


class LazarusError(Exception):
    """Base of every error Lazarus reports; `str()` is the one-line message shown to users."""

    def __init__(self, message: str, *, pid: int | None = None, path: str | None = None) -> None:
        self.pid = pid
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        msg = str(self.args[0]) if self.args else ""
        where = []
        if self.pid is not None and f"{self.pid}" not in msg:
            where.append(f"pid {self.pid}")
        if self.path is not None and self.path not in msg:
            where.append(self.path)
        return f"{msg} ({', '.join(where)})" if where else msg


class KernelError(LazarusError, OSError):
    """A system call failed. Carries errno like an OSError."""

    def __init__(self, what: str, err: int, *, pid: int | None = None, path: str | None = None) -> None:
        LazarusError.__init__(self, f"{what}: {os.strerror(err)} [{_errno.errorcode.get(err, err)}]",
                              pid=pid, path=path)
        self.errno = err
        self.strerror = os.strerror(err)

    def __reduce__(self):  # pragma: no cover - pickling support for multiprocessing
        return (KernelError, (self.args[0], self.errno))


class NoSuchTask(LazarusError):
    """The pid does not exist (or vanished while we worked on it)."""


class FeatureMissing(LazarusError):
    """A kernel feature Lazarus needs is not available on this machine."""


class ImageError(LazarusError):
    """An image directory is missing, truncated, corrupted or of another format/machine."""


class ProtocolError(LazarusError):
    """A peer spoke the page-server protocol wrongly."""


class DumpError(LazarusError):
    """A dump could not be made; the original process was left as it was."""

    def __init__(self, message: str, *, stage: str | None = None, pid: int | None = None,
                 path: str | None = None) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}" if stage else message, pid=pid, path=path)


class Unsupported(DumpError):
    """The process holds a resource a dump cannot faithfully capture."""


class RestoreError(LazarusError):
    """A restore failed; every task it created was killed."""

    def __init__(self, message: str, *, stage: str | None = None, pid: int | None = None,
                 path: str | None = None) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}" if stage else message, pid=pid, path=path)


class PageSourceLost(LazarusError):
    """A lazily restored process lost its page source; it was killed rather than run on zeros."""


class Untrusted(LazarusError):
    """A peer on a lazy-pages socket, or the server or socket a restore would hand memory to, is not trusted."""


class UsageError(LazarusError):
    """Options or request fields that do not go together (the CLI exits 2; the service answers 400)."""
