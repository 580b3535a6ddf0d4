"""userfaultfd: one `Uffd` object owns one fd; kernel messages are decoded here and nowhere else.

Expected outcomes of UFFDIO_COPY / UFFDIO_ZEROPAGE (a page already there, the layout changing under us, the
process gone) are *return values* (`Outcome`), never exceptions: a lazy server meets them all the time.
Exceptions are kept for what is really wrong (EINVAL from a bad range, EFAULT from an unreadable source, ...).

    create()/adopt()           the fd: made here, or taken from another process (pidfd_getfd, SCM_RIGHTS,
          |                    or the ufd of a FORK event), always O_NONBLOCK|O_CLOEXEC afterwards
    api(features)              handshake (once per uffd; the process that made it usually did it already)
    register(start, len)       -> ioctls the range supports
    read_events()              -> [PageFault | Fork | Remap | Remove | Unmap | TaskDone]
    copy()/zeropage()          -> (bytes done, Outcome)
    wake()/unregister()/close()
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct

from lazarus.errors import FeatureMissing, KernelError
from lazarus.kernel import abi
from lazarus.kernel.syscall import ioctl, ioctl_raw, raw_syscall
from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import ClassVar

PAGE_SIZE = abi.PAGE_SIZE
_MSG_SIZE = 32
_INTERNAL_FEATURES = abi.UFFD_FEATURE_INITIALIZED


# ---------------------------------------------------------------------------------------------
# typed events (plain slotted records: creating a frozen one costs 3x more, and one is made per fault)


@record(slots=True)
class PageFault:
    """A thread touched a missing page. `address` is page aligned unless EXACT_ADDRESS was enabled; `tid` is
    the faulting thread's id with THREAD_ID enabled, else 0."""

    address: int
    flags: int
    tid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE)


@record(slots=True)
class Fork:
    """The process forked; `ufd` is a NEW fd in the reader's fd table serving the child (adopt it)."""

    ufd: int


@record(slots=True)
class Remap:
    """mremap moved [from_, from_+len) to [to, to+len). An Unmap of the old range follows: see ranges.py."""

    from_: int
    to: int
    len: int


@record(slots=True)
class Remove:
    """madvise(MADV_DONTNEED/MADV_REMOVE) dropped [start, end): those pages read as zeros from now on."""

    start: int
    end: int


@record(slots=True)
class Unmap:
    """munmap (or the unmapped side of mremap / MAP_FIXED) removed [start, end)."""

    start: int
    end: int


@record(slots=True)
class TaskDone:
    """Not a kernel message: reading failed with EBADF/ESRCH, i.e. the task behind this uffd is gone
    (KERNEL-NOTES pitfall 14). Treat as "that process is done", never as a crash."""

    errno: int


UffdEvent = PageFault | Fork | Remap | Remove | Unmap | TaskDone

# struct uffd_msg (include/uapi/linux/userfaultfd.h): u8 event, u8, u16, u32 reserved, then the 24-byte arg
# union at offset 8 (abi.uffd_msg mirrors it; tests check this decoder against it).
_PF = struct.Struct("<8xQQI4x")       # pagefault: flags, address, ptid
_FORK = struct.Struct("<8xI20x")      # fork: ufd
_REMAP = struct.Struct("<8xQQQ")      # remap: from, to, len
_RANGE = struct.Struct("<8xQQ8x")     # remove/unmap: start, end

# The fill ioctls are the hot path of the lazy server (one per fault): their argument structs are packed with
# struct into a per-Uffd bytearray and passed to fcntl.ioctl, which copies the result back even on failure
# (needed for the partial count of EAGAIN). Measured: ~1 us per call cheaper than a ctypes call with
# use_errno, and several times cheaper than setting ctypes Structure fields.
# Layouts: abi.uffdio_copy / abi.uffdio_zeropage (tests/test_uffd.py checks sizes and result offsets).
_COPY_ARG = struct.Struct("<QQQQq")    # dst, src, len, mode, copy (result)
_ZERO_ARG = struct.Struct("<QQQq")     # range.start, range.len, mode, zeropage (result)
_RESULT = struct.Struct("<q")
_ioctl = fcntl.ioctl
_UFFDIO_COPY = abi.UFFDIO_COPY
_UFFDIO_ZEROPAGE = abi.UFFDIO_ZEROPAGE


def decode_events(buf: bytes | bytearray | memoryview) -> list[UffdEvent]:
    """Decode a buffer of uffd_msg records (the one place kernel messages become typed events).

    Raises:
        KernelError(EPROTO) on an event code this module does not know.
    """
    out: list[UffdEvent] = []
    for off in range(0, len(buf) - len(buf) % _MSG_SIZE, _MSG_SIZE):
        event = buf[off]
        if event == abi.UFFD_EVENT_PAGEFAULT:
            flags, address, tid = _PF.unpack_from(buf, off)
            out.append(PageFault(address, flags, tid))
        elif event == abi.UFFD_EVENT_REMOVE:
            out.append(Remove(*_RANGE.unpack_from(buf, off)))
        elif event == abi.UFFD_EVENT_UNMAP:
            out.append(Unmap(*_RANGE.unpack_from(buf, off)))
        elif event == abi.UFFD_EVENT_REMAP:
            out.append(Remap(*_REMAP.unpack_from(buf, off)))
        elif event == abi.UFFD_EVENT_FORK:
            out.append(Fork(_FORK.unpack_from(buf, off)[0]))
        else:
            raise KernelError(f"userfaultfd: unknown event {event:#x}", errno.EPROTO)
    return out


# ---------------------------------------------------------------------------------------------
# outcomes of UFFDIO_COPY / UFFDIO_ZEROPAGE


class Outcome(enum.Enum):
    DONE = "done"          # the whole range was filled
    PARTIAL = "partial"    # EAGAIN with bytes > 0: a prefix was filled, and the kernel does not say why it
                           # stopped (a page already present, or the layout changing: it returns EAGAIN with
                           # the count either way). Never skip the next page on this alone: copy the rest again,
                           # which tells EXISTS from RETRY
    EXISTS = "exists"      # EEXIST: the first page is already present (nothing done)
    RETRY = "retry"        # EAGAIN with nothing done: the layout is changing (an event is pending); read
                           # events first, then retry
    NOENT = "noent"        # ENOENT: no registered vma there (any more): read events first; if it persists,
                           # the range (or a vma boundary inside it) is not ours
    GONE = "gone"          # ESRCH: the process (its mm) is gone


def _outcome(what: str, start: int, length: int, err: int, done: int) -> tuple[int, Outcome]:
    """Map a failed fill ioctl (errno `err`, `done` bytes reported) to its outcome, or raise."""
    if err == errno.EAGAIN:
        return (done, Outcome.PARTIAL) if done > 0 else (0, Outcome.RETRY)
    if err == errno.EEXIST:
        return 0, Outcome.EXISTS
    if err == errno.ENOENT:
        return 0, Outcome.NOENT
    if err == errno.ESRCH:
        return 0, Outcome.GONE
    if err == errno.EINTR:  # only with a fatal signal pending on us; nothing or a prefix was done
        return (done, Outcome.PARTIAL) if done > 0 else (0, Outcome.RETRY)
    raise KernelError(f"{what} {start:#x}+{length:#x}", err)


def _copy(fd: int, arg: bytearray, dst: int, src: int, length: int, mode: int) -> tuple[int, Outcome]:
    _COPY_ARG.pack_into(arg, 0, dst, src, length, mode, 0)
    try:
        _ioctl(fd, _UFFDIO_COPY, arg, True)
    except OSError as e:
        done = _RESULT.unpack_from(arg, 32)[0]
        return _outcome("UFFDIO_COPY", dst, length, e.errno or errno.EIO, done if done > 0 else 0)
    return length, Outcome.DONE


class CopyHelper:
    """A second thread issuing UFFDIO_COPYs, so that two fills run at once on two CPUs.

    The kernel fills two ranges of one address space concurrently (UFFDIO_COPY takes the mm's lock shared),
    and fcntl.ioctl releases the GIL: measured here, 2 MiB copies into fresh memory ran at 2.5-4 GB/s from
    one thread and 4.6-6.6 GB/s from two. The caller starts one copy here, does another itself, then collects
    this one. The helper never touches the served memory (KERNEL-NOTES pitfall 1): it only makes the ioctl.

        helper.start(uffd, dst, src, length)   # returns at once
        uffd.copy(...)                          # the caller's own share
        n, outcome = helper.result()            # waits; raises what Uffd.copy would raise
    """

    def __init__(self) -> None:
        # Only the lazy server's background transfer makes a helper: a restore never does (start-up cost).
        import queue
        import threading

        self._jobs: queue.SimpleQueue[tuple[int, int, int, int, int] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[int, Outcome] | BaseException] = queue.SimpleQueue()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="uffd-copy", daemon=True)
        self._thread.start()

    @staticmethod
    def worthwhile() -> bool:
        """Whether this process may run on two CPUs or more (otherwise a second copier only adds switches)."""
        try:
            return len(os.sched_getaffinity(0)) >= 2
        except OSError:
            return False

    def _run(self) -> None:
        arg = bytearray(_COPY_ARG.size)
        jobs, results = self._jobs, self._results
        while (job := jobs.get()) is not None:
            fd, dst, src, length, mode = job
            try:
                results.put(_copy(fd, arg, dst, src, length, mode))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                results.put(e)

    def start(self, uffd: Uffd, dst: int, src: int, length: int, mode: int = 0) -> None:
        """Begin UFFDIO_COPY of `length` bytes from our `src` to `dst` (one copy at a time)."""
        if self._busy:
            raise RuntimeError("CopyHelper: the previous copy was not collected")
        self._busy = True
        self._jobs.put((uffd.fd, dst, src, length, mode))

    @property
    def busy(self) -> bool:
        return self._busy

    def result(self) -> tuple[int, Outcome]:
        """Wait for the copy begun by start(): (bytes filled, Outcome) as Uffd.copy returns them.
        Raises:
            KernelError as Uffd.copy would.
        """
        if not self._busy:
            raise RuntimeError("CopyHelper: no copy was started")
        got = self._results.get()
        self._busy = False
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        """Collect a copy still running, then stop the thread (idempotent)."""
        if self._busy:
            with contextlib.suppress(Exception):
                self.result()
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def __enter__(self) -> CopyHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# fdinfo


@record(frozen=True, slots=True)
class UffdInfo:
    """The userfaultfd lines of /proc/PID/fdinfo/FD. `features` are the ENABLED ones (pitfall 2)."""

    pending: int
    total: int
    api: int
    features: int
    ioctls: int
    initialized: bool


def parse_uffd_fdinfo(text: str) -> UffdInfo | None:
    """Parse fdinfo text; None if it is not a userfaultfd (no "API:" line)."""
    vals: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            vals[k.strip()] = v.strip()
    api_line = vals.get("API")
    if api_line is None:
        return None
    parts = api_line.split(":")
    if len(parts) != 3:
        raise KernelError(f"userfaultfd fdinfo: malformed API line {api_line!r}", errno.EPROTO)
    raw = int(parts[1], 16)
    return UffdInfo(pending=int(vals.get("pending", "0")), total=int(vals.get("total", "0")),
                    api=int(parts[0], 16), features=raw & ~_INTERNAL_FEATURES, ioctls=int(parts[2], 16),
                    initialized=bool(raw & abi.UFFD_FEATURE_INITIALIZED))


def fdinfo(pid: int, fd: int) -> UffdInfo:
    """Read /proc/PID/fdinfo/FD of a userfaultfd. Raises KernelError (ENOTTY if fd is not a uffd)."""
    path = f"/proc/{pid}/fdinfo/{fd}"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise KernelError(f"read {path}", e.errno or errno.EIO, path=path) from None
    info = parse_uffd_fdinfo(text)
    if info is None:
        raise KernelError(f"fd {fd} of pid {pid} is not a userfaultfd", errno.ENOTTY, path=path)
    return info


def fdinfo_features(pid: int, fd: int) -> int:
    """Features enabled on userfaultfd `fd` of `pid` (from the fdinfo API: line, internal bits removed)."""
    return fdinfo(pid, fd).features


def feature_names(mask: int) -> list[str]:
    return [name for name, bit in abi.UFFD_FEATURES.items() if mask & bit] + (
        [f"{mask & ~sum(abi.UFFD_FEATURES.values()):#x}"] if mask & ~sum(abi.UFFD_FEATURES.values()) else [])


def features_mask(names: list[str] | tuple[str, ...]) -> int:
    mask = 0
    for n in names:
        mask |= abi.UFFD_FEATURES[n.upper().removeprefix("UFFD_FEATURE_")]
    return mask


_supported_cache: int | None = None


def supported_features() -> int:
    """Every feature bit this kernel supports (probed once on a scratch uffd: UFFDIO_API reports all supported
    features, not the enabled ones, and cannot be repeated on the same fd).

    Raises:
        FeatureMissing when userfaultfd cannot be created at all.
    """
    global _supported_cache
    if _supported_cache is None:
        fd = _new_fd(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            arg = abi.uffdio_api(api=abi.UFFD_API, features=0, ioctls=0)
            ioctl(fd, abi.UFFDIO_API, arg, what="UFFDIO_API")
            _supported_cache = int(arg.features)
        finally:
            os.close(fd)
    return _supported_cache


def _new_fd(flags: int) -> int:
    ret, err = raw_syscall(abi.SYS.userfaultfd, flags)
    if ret >= 0:
        return ret
    if err not in (errno.EPERM, errno.ENOSYS, errno.EACCES):
        raise KernelError("userfaultfd", err)
    # vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or the syscall disabled: try the device.
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise FeatureMissing(f"userfaultfd unavailable: syscall: {os.strerror(err)}; "
                             f"/dev/userfaultfd: {e.strerror}") from None
    try:
        ret, err2 = ioctl_raw(dev, abi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)
    if ret < 0:
        raise FeatureMissing(f"userfaultfd unavailable: /dev/userfaultfd: {os.strerror(err2)}")
    return ret


# ---------------------------------------------------------------------------------------------
# the fd


class Uffd:
    """One userfaultfd. Not thread-safe (its ioctl argument buffer is shared); owned by whoever made or adopted
    it (close() it once). A second thread copies into the same uffd through a CopyHelper, which has its own.

    Attributes:
        fd: the file descriptor (-1 once closed).
        features: the features enabled on it (read back from fdinfo, never from UFFDIO_API's answer).
    """

    READ_BATCH: ClassVar[int] = 64

    def __init__(self, fd: int, features: int = 0, *, initialized: bool = False) -> None:
        self.fd = fd
        self.features = features
        self.initialized = initialized
        # For a uffd taken out of a lazily restored task: the fd number at which that task keeps its own copy
        # (the anchor, see lazy/anchor.py), or None.
        self.task_fd: int | None = None
        self._arg = bytearray(_COPY_ARG.size)
        self._range = abi.uffdio_range()

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def create(cls, features: int = 0, user_mode_only: bool = False) -> Uffd:
        """A new userfaultfd in this process (userfaultfd(2), else /dev/userfaultfd), API handshake done.

        Parameters:
            features: UFFD_FEATURE_* bits to enable (see abi.UFFD_FEATURES / features_mask()).
            user_mode_only: UFFD_USER_MODE_ONLY: kernel-mode accesses (read(2) into the range, ...) are not
                reported. Leave False to serve what a restored process does in syscalls too.
        Raises:
            FeatureMissing naming the features this kernel lacks (or userfaultfd itself).
        """
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
        self = cls(_new_fd(flags))
        try:
            self.api(features)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def adopt(cls, fd: int, *, require_api: bool = True, features: int | None = None) -> Uffd:
        """Own a uffd fd obtained from elsewhere (pidfd_getfd, SCM_RIGHTS, a Fork event).

        The fd is made O_NONBLOCK (poll on a blocking uffd reports POLLERR) and close-on-exec. Its enabled
        features are read from /proc/self/fdinfo, unless `features` gives them: the caller was told them by
        whoever made the uffd and did its UFFDIO_API (a restore handing it to its private daemon), and that
        read (~0.4 ms) is on the way to the restored process's start.
        Raises:
            KernelError (ENOTTY) if fd is not a userfaultfd; KernelError(EINVAL) if require_api and no
            UFFDIO_API was done on it.
        """
        if features is None:
            info = fdinfo(os.getpid(), fd)
            if require_api and not info.initialized:
                raise KernelError(f"userfaultfd fd {fd}: no UFFDIO_API handshake was done on it", errno.EINVAL)
            features, initialized = info.features, info.initialized
        else:
            initialized = True
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not fl & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            os.set_inheritable(fd, False)
        except OSError as e:
            raise KernelError(f"fcntl userfaultfd fd {fd}", e.errno or errno.EIO) from None
        return cls(fd, features, initialized=initialized)

    def api(self, features: int) -> int:
        """UFFDIO_API handshake enabling exactly `features`. Returns the enabled features (from fdinfo).

        Raises:
            FeatureMissing naming every requested feature the kernel lacks, or EVENT_FORK without
            CAP_SYS_PTRACE; KernelError(EINVAL) if a handshake was already done on this fd.
        """
        missing = features & ~supported_features()
        if missing:
            raise FeatureMissing("userfaultfd features missing: " + ", ".join(feature_names(missing)))
        arg = abi.uffdio_api(api=abi.UFFD_API, features=features, ioctls=0)
        ret, err = ioctl_raw(self.fd, abi.UFFDIO_API, arg)
        if ret < 0:
            if err == errno.EPERM and features & abi.UFFD_FEATURE_EVENT_FORK:
                raise FeatureMissing("userfaultfd feature EVENT_FORK needs CAP_SYS_PTRACE")
            raise KernelError("UFFDIO_API", err)
        info = fdinfo(os.getpid(), self.fd)
        if info.features & features != features:
            raise FeatureMissing("userfaultfd features not enabled after UFFDIO_API: "
                                 + ", ".join(feature_names(features & ~info.features)))
        self.features = info.features
        self.initialized = True
        return self.features

    # -- plumbing ------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the fd (idempotent). When the last fd of this uffd goes, the kernel unregisters every range
        and later faults there are served normally (zeros for anonymous memory)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Uffd(fd={self.fd}, features={'|'.join(feature_names(self.features)) or 0})"

    # -- ranges --------------------------------------------------------------------------------------------

    def register(self, start: int, length: int, mode: int = abi.UFFDIO_REGISTER_MODE_MISSING) -> int:
        """UFFDIO_REGISTER [start, start+length). Returns the bitmask of ioctls allowed on the range
        (bit n = ioctl number n, e.g. 1 << 0x03 for UFFDIO_COPY)."""
        arg = abi.uffdio_register(range=abi.uffdio_range(start, length), mode=mode, ioctls=0)
        ioctl(self.fd, abi.UFFDIO_REGISTER, arg, what=f"UFFDIO_REGISTER {start:#x}+{length:#x}")
        return int(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        arg = abi.uffdio_range(start, length)
        ioctl(self.fd, abi.UFFDIO_UNREGISTER, arg, what=f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    def wake(self, start: int, length: int = PAGE_SIZE) -> None:
        """Wake threads waiting on faults in the range (after EEXIST, or after *_DONTWAKE fills)."""
        r = self._range
        r.start, r.len = start, length
        ret, err = ioctl_raw(self.fd, abi.UFFDIO_WAKE, r)
        if ret < 0 and err not in (errno.ESRCH, errno.ENOENT):
            raise KernelError(f"UFFDIO_WAKE {start:#x}+{length:#x}", err)

    # -- filling -------------------------------------------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, Outcome]:
        """UFFDIO_COPY `length` bytes from our address `src` to `dst` in the served process (waking waiters
        unless mode has DONTWAKE).

        Returns:
            (bytes filled, Outcome). Bytes are > 0 only with DONE or PARTIAL.
        Raises:
            KernelError for the unexpected: EFAULT (src unreadable: a page source failure), EINVAL, ENOMEM...
        """
        return _copy(self.fd, self._arg, dst, src, length, mode)

    def zeropage(self, start: int, length: int, mode: int = 0) -> tuple[int, Outcome]:
        """UFFDIO_ZEROPAGE: map the zero page over [start, start+length). Same returns as copy()."""
        arg = self._arg
        _ZERO_ARG.pack_into(arg, 0, start, length, mode, 0)
        try:
            _ioctl(self.fd, _UFFDIO_ZEROPAGE, arg, True)
        except OSError as e:
            done = _RESULT.unpack_from(arg, 24)[0]
            return _outcome("UFFDIO_ZEROPAGE", start, length, e.errno or errno.EIO, done if done > 0 else 0)
        return length, Outcome.DONE

    # -- events --------------------------------------------------------------------------------------------

    def read_events(self, max_events: int | None = None) -> list[UffdEvent]:
        """Read the pending messages without blocking (one read(2) of up to max_events messages).

        Returns:
            typed events, in the kernel's order (pending faults come before other events in one read);
            [] when nothing is pending; [TaskDone(errno)] when the task behind the uffd is gone.
        """
        n = max_events or self.READ_BATCH
        try:
            buf = os.read(self.fd, n * _MSG_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as e:
            if e.errno in (errno.EBADF, errno.ESRCH):
                return [TaskDone(e.errno)]
            raise KernelError("read userfaultfd", e.errno or errno.EIO) from None
        return decode_events(buf)


__all__ = [
    "CopyHelper", "Fork", "Outcome", "PageFault", "Remap", "Remove", "TaskDone", "Uffd", "UffdEvent", "UffdInfo", "Unmap",
    "decode_events", "fdinfo", "fdinfo_features", "feature_names", "features_mask", "parse_uffd_fdinfo",
    "supported_features",
]
