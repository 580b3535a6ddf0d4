"""Parsers of /proc/<pid>/... text into records, plus thin readers that map errors to Lazarus ones.

The `parse_*` functions are pure (text in, record out) so they can be tested on fixtures; the `read_*`
functions only read the file and call them. The dump reads these for every task, so the parsers avoid per-line
regexes and parse only the fields somebody uses.

Text is decoded with `surrogateescape` so that paths which are not valid UTF-8 survive a round trip through
`os.fsencode`.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi
from lazarus.records import field, record

PF_KTHREAD = abi.PF_KTHREAD

SPECIAL_MAPPINGS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"})
_DELETED = " (deleted)"

# ---------------------------------------------------------------------------------------------
# reading


def _proc(pid: int, tid: int | None, name: str) -> str:
    return f"/proc/{pid}/{name}" if tid is None else f"/proc/{pid}/task/{tid}/{name}"


def _translate(e: OSError, pid: int, path: str) -> Exception:
    # ENOENT on a file of a live process (a closed fd, the exe link of a kernel thread) is not "no such
    # process": only claim that when the /proc directory itself is gone.
    if isinstance(e, ProcessLookupError) or (
            isinstance(e, FileNotFoundError) and not os.path.exists(f"/proc/{pid}")):
        return NoSuchTask(f"no such process {pid}", pid=pid)
    return KernelError(f"read {path}", e.errno or errno.EIO, pid=pid, path=path)


def read_bytes(path: str, pid: int) -> bytes:
    """Whole content of a /proc file; NoSuchTask if the task is gone, KernelError otherwise."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except OSError as e:
        raise _translate(e, pid, path) from None


def read_text(path: str, pid: int) -> str:
    return read_bytes(path, pid).decode("utf-8", "surrogateescape")


def readlink(path: str, pid: int) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        raise _translate(e, pid, path) from None


def _listdir_ints(path: str, pid: int) -> list[int]:
    try:
        names = os.listdir(path)
    except OSError as e:
        raise _translate(e, pid, path) from None
    return sorted(int(n) for n in names if n.isdigit())


# ---------------------------------------------------------------------------------------------
# maps / smaps


@record(frozen=True, slots=True)
class Vma:
    """One line of /proc/pid/maps, optionally with VmFlags and Rss from smaps.

    `path` keeps the kernel's spelling ('' for anonymous, "[heap]", "[anon:NAME]", ...) minus a trailing
    " (deleted)", which sets `deleted`. Newlines in file names appear as the kernel's escape "\\012"; read
    /proc/pid/map_files/START-END for the exact name.
    """

    start: int
    end: int
    prot: int
    shared: bool
    pgoff: int
    dev: tuple[int, int]
    inode: int
    path: str
    deleted: bool = False
    vmflags: frozenset[str] = frozenset()
    rss: int | None = None  # bytes, only when parsed from smaps

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return (self.end - self.start) // abi.PAGE_SIZE

    @property
    def offset(self) -> int:
        """File offset in bytes (maps shows it in bytes already)."""
        return self.pgoff

    @property
    def is_special(self) -> bool:
        return self.path in SPECIAL_MAPPINGS

    @property
    def is_anon_private(self) -> bool:
        if self.shared or self.path in SPECIAL_MAPPINGS:
            return False
        if self.inode == 0:
            return True
        # A private mapping of /dev/zero is made anonymous by the kernel yet still names the file.
        return self.path == "/dev/zero" and not self.deleted

    @property
    def is_file_private(self) -> bool:
        return not self.shared and self.inode != 0 and not self.is_anon_private

    @property
    def is_shared_anon(self) -> bool:
        if not self.shared:
            return False
        return ((self.path == "/dev/zero" and self.deleted) or self.path.startswith("/SYSV")
                or self.path.startswith("[anon_shmem:"))

    @property
    def is_sysv_shm(self) -> bool:
        return self.shared and self.path.startswith("/SYSV")

    @property
    def is_memfd(self) -> bool:
        return self.path.startswith("/memfd:")

    @property
    def is_file(self) -> bool:
        """Backed by a named file (including deleted files and memfds), not anonymous memory."""
        return self.inode != 0 and not self.is_shared_anon and not self.is_anon_private

    @property
    def anon_name(self) -> str | None:
        """The PR_SET_VMA_ANON_NAME name of an anonymous mapping, if any."""
        for prefix in ("[anon:", "[anon_shmem:"):
            if self.path.startswith(prefix) and self.path.endswith("]"):
                return self.path[len(prefix):-1]
        return None


def _prot(perms: str) -> int:
    return ((abi.PROT_READ if perms[0] == "r" else 0) | (abi.PROT_WRITE if perms[1] == "w" else 0)
            | (abi.PROT_EXEC if perms[2] == "x" else 0))


_Header = tuple[int, int, int, bool, int, tuple[int, int], int, str, bool]


def _header(line: str) -> _Header:
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"bad maps line: {line!r}")
    addr, perms, pgoff, dev, inode = parts[:5]
    path = parts[5] if len(parts) == 6 else ""
    lo, _, hi = addr.partition("-")
    major, _, minor = dev.partition(":")
    deleted = path.endswith(_DELETED)
    if deleted:
        path = path[: -len(_DELETED)]
    return (int(lo, 16), int(hi, 16), _prot(perms), perms[3] == "s", int(pgoff, 16),
            (int(major, 16), int(minor, 16)), int(inode), path, deleted)


def parse_maps(text: str) -> list[Vma]:
    """Parse /proc/pid/maps."""
    return [Vma(*_header(line)) for line in text.split("\n") if line]


def _rss_of(block: str) -> int | None:
    i = block.find("\nRss:")
    if i < 0:
        return None
    j = block.find("kB", i)
    return int(block[i + 5: j]) * 1024


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/pid/smaps: the maps fields of each header line, plus VmFlags and Rss.

    VmFlags is the last line of every block, so splitting at it yields one chunk per VMA with C-speed string
    operations instead of a Python loop over the ~25 lines per VMA. File names cannot break this: the kernel
    escapes newlines in them.
    """
    parts = text.split("\nVmFlags: ")
    if len(parts) == 1:
        return _parse_smaps_lines(text)
    out: list[Vma] = []
    pending: tuple[_Header, int | None] | None = None
    for k, part in enumerate(parts):
        if k:
            nl = part.find("\n")
            flags_text, block = (part, "") if nl < 0 else (part[:nl], part[nl + 1:])
            if pending is not None:
                out.append(Vma(*pending[0], frozenset(flags_text.split()), pending[1]))
        else:
            block = part
        if not block.strip():
            pending = None
            continue
        nl = block.find("\n")
        pending = (_header(block if nl < 0 else block[:nl]), _rss_of(block))
    if pending is not None:  # a truncated last block without VmFlags
        out.append(Vma(*pending[0], frozenset(), pending[1]))
    return out


def _parse_smaps_lines(text: str) -> list[Vma]:
    # Kernels before 3.8 print no VmFlags; keep their blocks parseable for fixtures and old hosts.
    out: list[Vma] = []
    hdr: _Header | None = None
    rss: int | None = None
    for line in text.split("\n"):
        if line and line[0] in "0123456789abcdef":
            if hdr is not None:
                out.append(Vma(*hdr, frozenset(), rss))
            hdr, rss = _header(line), None
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
    if hdr is not None:
        out.append(Vma(*hdr, frozenset(), rss))
    return out


def read_maps(pid: int) -> list[Vma]:
    """VMAs of `pid` from /proc/pid/maps (cheap: no page table walk); vmflags empty, rss None."""
    return parse_maps(read_text(f"/proc/{pid}/maps", pid))


def read_smaps(pid: int) -> list[Vma]:
    """VMAs of `pid` from /proc/pid/smaps, with vmflags and rss. One read, so one consistent listing."""
    return parse_smaps(read_text(f"/proc/{pid}/smaps", pid))


def map_file_path(pid: int, vma: Vma) -> str:
    """Exact name of the file behind `vma` (no escaping, no " (deleted)"), via map_files."""
    link = readlink(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}", pid)
    return link[: -len(_DELETED)] if vma.deleted and link.endswith(_DELETED) else link


# ---------------------------------------------------------------------------------------------
# status


@record(frozen=True, slots=True)
class Status:
    """/proc/pid/status (the fields Lazarus uses). Signal sets and capabilities are bit masks."""

    name: str
    state: str
    tgid: int
    pid: int
    ppid: int
    tracer_pid: int
    uids: tuple[int, int, int, int]
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    umask: int | None
    threads: int
    nstgid: tuple[int, ...]
    nspid: tuple[int, ...]
    nspgid: tuple[int, ...]
    nssid: tuple[int, ...]
    sig_pnd: int
    shd_pnd: int
    sig_blk: int
    sig_ign: int
    sig_cgt: int
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int
    seccomp_filters: int
    kthread: bool | None  # None on kernels without the Kthread line
    vm_swap: int = 0  # bytes
    fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def _ints(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split())


def parse_status(text: str) -> Status:
    f: dict[str, str] = {}
    for line in text.split("\n"):
        k, sep, v = line.partition(":")
        if sep:
            f[k] = v.strip()

    def hx(k: str) -> int:
        return int(f.get(k, "0"), 16)

    def num(k: str, default: int = 0) -> int:
        v = f.get(k)
        return int(v) if v else default

    uids, gids = _ints(f["Uid"]), _ints(f["Gid"])
    kth = f.get("Kthread")
    swap = f.get("VmSwap")
    return Status(
        # Name escapes "\\" and "\n" like C strings; /proc/pid/comm has the raw bytes.
        name=f.get("Name", ""), state=f.get("State", "?")[:1],
        tgid=num("Tgid"), pid=num("Pid"), ppid=num("PPid"), tracer_pid=num("TracerPid"),
        uids=(uids[0], uids[1], uids[2], uids[3]), gids=(gids[0], gids[1], gids[2], gids[3]),
        groups=_ints(f.get("Groups", "")),
        umask=int(f["Umask"], 8) if "Umask" in f else None,
        threads=num("Threads", 1),
        nstgid=_ints(f.get("NStgid", "")), nspid=_ints(f.get("NSpid", "")),
        nspgid=_ints(f.get("NSpgid", "")), nssid=_ints(f.get("NSsid", "")),
        sig_pnd=hx("SigPnd"), shd_pnd=hx("ShdPnd"), sig_blk=hx("SigBlk"), sig_ign=hx("SigIgn"),
        sig_cgt=hx("SigCgt"),
        cap_inh=hx("CapInh"), cap_prm=hx("CapPrm"), cap_eff=hx("CapEff"), cap_bnd=hx("CapBnd"),
        cap_amb=hx("CapAmb"),
        no_new_privs=f.get("NoNewPrivs", "0") == "1",
        seccomp=num("Seccomp"), seccomp_filters=num("Seccomp_filters"),
        kthread=None if kth is None else kth == "1",
        vm_swap=int(swap.split()[0]) * 1024 if swap else 0,
        fields=f,
    )


def read_status(pid: int, tid: int | None = None) -> Status:
    return parse_status(read_text(_proc(pid, tid, "status"), pid))


# ---------------------------------------------------------------------------------------------
# stat


@record(frozen=True, slots=True)
class Stat:
    """/proc/pid/stat. Addresses read as 0 unless the reader may ptrace the task."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    tpgid: int
    flags: int
    utime: int
    stime: int
    num_threads: int
    starttime: int  # clock ticks after boot; (pid, starttime) identifies a process
    vsize: int
    rss: int  # pages
    start_code: int
    end_code: int
    start_stack: int
    exit_signal: int
    processor: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str) -> Stat:
    # comm may hold spaces and parentheses ("a) (b"), but nothing after it can: split at the last ')'.
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError(f"bad stat line: {text[:80]!r}")
    pid_s, _, comm = head.partition(" (")
    v = tail.split()
    # v[0] is field 3 (state); field n is v[n - 3].
    n = [0, 0, 0] + [0] + [int(x) for x in v[1:]]

    def g(i: int) -> int:
        return n[i] if i < len(n) else 0

    return Stat(
        pid=int(pid_s), comm=comm, state=v[0], ppid=g(4), pgrp=g(5), session=g(6), tty_nr=g(7),
        tpgid=g(8), flags=g(9), utime=g(14), stime=g(15), num_threads=g(20), starttime=g(22),
        vsize=g(23), rss=g(24), start_code=g(26), end_code=g(27), start_stack=g(28), exit_signal=g(38),
        processor=g(39), start_data=g(45), end_data=g(46), start_brk=g(47), arg_start=g(48),
        arg_end=g(49), env_start=g(50), env_end=g(51), exit_code=g(52),
    )


def read_stat(pid: int, tid: int | None = None) -> Stat:
    return parse_stat(read_text(_proc(pid, tid, "stat"), pid))


def is_kernel_thread(pid: int) -> bool:
    return read_stat(pid).is_kernel_thread


def start_time(pid: int) -> int:
    """Start time in clock ticks; with the pid, it tells a process from a later one reusing the pid."""
    return read_stat(pid).starttime


# ---------------------------------------------------------------------------------------------
# fd, fdinfo


@record(frozen=True, slots=True)
class FdInfo:
    """/proc/pid/fdinfo/N. `extra` keeps every other line in order (epoll's repeated "tfd:" lines...)."""

    pos: int
    flags: int
    mnt_id: int
    ino: int | None
    extra: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        for k, v in self.extra:
            if k == key:
                return v
        return None

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.extra if k == key]

    @property
    def uffd_features(self) -> int | None:
        """Features enabled on a userfaultfd (the "API: api:features:ioctls" line), else None."""
        api = self.get("API")
        if api is None:
            return None
        parts = api.split(":")
        if len(parts) < 2:
            return None
        # The kernel marks a completed handshake with an internal bit that is no feature.
        return int(parts[1], 16) & ~abi.UFFD_FEATURE_INITIALIZED


def parse_fdinfo(text: str) -> FdInfo:
    pos = flags = mnt_id = 0
    ino: int | None = None
    extra: list[tuple[str, str]] = []
    for line in text.split("\n"):
        k, sep, v = line.partition(":")
        if not sep:
            continue
        v = v.strip()
        if k == "pos":
            pos = int(v)
        elif k == "flags":
            flags = int(v, 8)
        elif k == "mnt_id":
            mnt_id = int(v)
        elif k == "ino":
            ino = int(v)
        else:
            extra.append((k, v))
    return FdInfo(pos, flags, mnt_id, ino, tuple(extra))


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    return parse_fdinfo(read_text(f"/proc/{pid}/fdinfo/{fd}", pid))


def list_fds(pid: int) -> dict[int, str]:
    """fd -> readlink target ("/path", "pipe:[123]", "anon_inode:[userfaultfd]", ...), sorted by fd.

    An fd closed between listing and readlink is left out.
    """
    base = f"/proc/{pid}/fd"
    out: dict[int, str] = {}
    for fd in _listdir_ints(base, pid):
        try:
            out[fd] = os.readlink(f"{base}/{fd}")
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise NoSuchTask(f"no such process {pid}", pid=pid) from None
        except OSError as e:
            raise _translate(e, pid, f"{base}/{fd}") from None
    return out


# ---------------------------------------------------------------------------------------------
# small files


def read_auxv(pid: int) -> bytes:
    return read_bytes(f"/proc/{pid}/auxv", pid)


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    """(a_type, a_val) pairs up to and excluding AT_NULL."""
    out = []
    for typ, val in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if typ == 0:
            break
        out.append((typ, val))
    return out


def parse_personality(text: str) -> int:
    return int(text.strip(), 16)


def read_personality(pid: int) -> int:
    return parse_personality(read_text(f"/proc/{pid}/personality", pid))


def read_comm(pid: int, tid: int | None = None) -> str:
    """The raw comm (no escaping, unlike status Name), without the trailing newline."""
    return read_text(_proc(pid, tid, "comm"), pid).removesuffix("\n")


def read_cwd(pid: int) -> str:
    return readlink(f"/proc/{pid}/cwd", pid)


def read_exe(pid: int) -> str:
    return readlink(f"/proc/{pid}/exe", pid)


def tasks(pid: int) -> list[int]:
    """Thread ids of process `pid`, sorted (the leader is among them)."""
    return _listdir_ints(f"/proc/{pid}/task", pid)


def children(pid: int) -> list[int]:
    """Child processes of every thread of `pid` (needs CONFIG_PROC_CHILDREN), sorted."""
    out: set[int] = set()
    for tid in tasks(pid):
        path = f"/proc/{pid}/task/{tid}/children"
        try:
            with open(path, "rb", buffering=0) as f:
                out.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            # A thread may exit between listing and reading; only a vanished process is an error.
            if not os.path.exists(f"/proc/{pid}"):
                raise NoSuchTask(f"no such process {pid}", pid=pid) from None
        except OSError as e:
            raise _translate(e, pid, path) from None
    return sorted(out)


def own_pid(pid: int) -> int:
    """The id task `pid` (an id in our PID namespace) has in its own, innermost one (NSpid's last field):
    what its getpid()/gettid() answer, and its id in an image restored with `restore --pidns`."""
    nspid = read_status(pid).nspid
    return nspid[-1] if nspid else pid


def iter_pids() -> Iterator[int]:
    """Every process id visible in /proc."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


__all__ = [
    "PF_KTHREAD", "SPECIAL_MAPPINGS", "Vma", "Status", "Stat", "FdInfo",
    "parse_maps", "parse_smaps", "parse_status", "parse_stat", "parse_fdinfo", "parse_auxv",
    "parse_personality", "read_maps", "read_smaps", "read_status", "read_stat", "read_fdinfo",
    "list_fds", "read_auxv", "read_personality", "read_comm", "read_cwd", "read_exe", "tasks",
    "children", "is_kernel_thread", "start_time", "map_file_path", "read_bytes", "read_text", "readlink",
    "iter_pids", "own_pid",
]


# ---------------------------------------------------------------------------------------------
# limits

RLIM_INFINITY = (1 << 64) - 1


def parse_limits(text: str) -> list[tuple[int, int]]:
    """/proc/pid/limits -> [(soft, hard)] in resource-number order (RLIMIT_CPU = 0 ... RLIMIT_RTTIME = 15).

    Read from procfs because prlimit64() on another process needs CAP_SYS_RESOURCE or matching uids, even
    to read."""
    out: list[tuple[int, int]] = []
    for line in text.splitlines()[1:]:
        # "Max open files            1024                 1048576              files"
        fields = line[26:].split()
        if len(fields) < 2:
            continue
        vals = [RLIM_INFINITY if f == "unlimited" else int(f) for f in fields[:2]]
        out.append((vals[0], vals[1]))
    return out


def read_limits(pid: int) -> list[tuple[int, int]]:
    return parse_limits(read_text(f"/proc/{pid}/limits", pid))


# ---------------------------------------------------------------------------------------------
# file locks (the "lock:" lines of /proc/pid/fdinfo/N, in /proc/locks' format) and mounts


@record(frozen=True, slots=True)
class FileLock:
    """One held lock: kind "POSIX", "FLOCK", "OFDLCK", "LEASE", "DELEG"...; access "READ"/"WRITE"/...;
    pid (-1 for OFD locks); start and end byte (end None for EOF)."""

    kind: str
    access: str
    pid: int
    ino: int
    start: int
    end: int | None


def parse_lock(text: str) -> FileLock:
    """One lock line: "1: POSIX  ADVISORY  WRITE 14252 fe:00:2146417 30 EOF" (fs/locks.c lock_get_status).
    Raises ValueError on a line of another shape (a lease's "BREAKING" state words...)."""
    f = text.split()
    if len(f) < 8 or not f[0].endswith(":"):
        raise ValueError(f"unexpected lock line {text!r}")
    kind, access = f[1], f[3]
    if f[2] not in ("ADVISORY", "MANDATORY"):
        raise ValueError(f"unexpected lock line {text!r}")
    ino = int(f[5].rsplit(":", 1)[1])
    return FileLock(kind, access, int(f[4]), ino, int(f[6]), None if f[7] == "EOF" else int(f[7]))


def fd_locks(info: FdInfo) -> list[str]:
    """The raw "lock:" lines of an fdinfo (the locks held through that open file)."""
    return info.get_all("lock")


def parse_mount_points(text: str) -> dict[int, str]:
    """/proc/pid/mountinfo -> {mount id: mount point} (octal escapes such as \\040 decoded)."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        f = line.split(" ", 5)
        if len(f) >= 5:
            out[int(f[0])] = unescape_mount(f[4])
    return out


def unescape_mount(s: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space, ...) decoded."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_fstype_of_device(text: str, dev: int) -> str | None:
    """/proc/pid/mountinfo -> the filesystem type of a mount of device `dev` (st_dev), or None when none is
    (btrfs subvolumes, overlayfs: their st_dev is not the one mountinfo shows)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split(" ", 3)
        if len(f) >= 3 and f[2] == want and right:
            return right.split(" ", 1)[0]
    return None


def fstype_of(path: str) -> str | None:
    """The filesystem type (as mountinfo names it: ext4, xfs, tmpfs, ...) holding `path`, or None."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return parse_fstype_of_device(f.read(), dev)
    except OSError:
        return None


def read_mount_points(pid: int) -> dict[int, str]:
    return parse_mount_points(read_text(f"/proc/{pid}/mountinfo", pid))


@record(frozen=True, slots=True)
class SysvShm:
    """One System V shared memory segment of our IPC namespace, as /proc/sysvipc/shm shows it."""
    key: int
    shmid: int
    mode: int  # permission bits, and SHM_DEST once removed
    size: int
    nattch: int
    uid: int
    gid: int


def read_sysv_shm() -> dict[int, SysvShm]:
    """Every System V shared memory segment of our IPC namespace, by shmid."""
    out: dict[int, SysvShm] = {}
    with open("/proc/sysvipc/shm") as f:
        next(f, None)
        for line in f:
            w = line.split()
            if len(w) >= 11:
                out[int(w[1])] = SysvShm(int(w[0]), int(w[1]), int(w[2], 8), int(w[3]), int(w[6]), int(w[7]),
                                         int(w[8]))
    return out
