"""Probe the running kernel once for everything Lazarus relies on; `lazarus check` renders `report()`.

Every probe exercises the real primitive on this process (or on a throw-away traced child) rather than trusting
version numbers, and never leaves anything behind: fds are closed, the child is killed and reaped, and the
clone3 probe is built to fail (it asks for a pid that is in use).
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import signal
import struct
import threading
from dataclasses import dataclass

from lazarus.errors import FeatureMissing
from lazarus.kernel import abi, procfs
from lazarus.kernel.syscall import ioctl_raw, libc, raw_syscall
from lazarus.kernel.xstate import parse_xstate, regset, stopped_child, write_cache

PURPOSES = ("dump", "restore", "lazy", "pre-copy", "info", "pidns")


@dataclass(frozen=True, slots=True)
class Feature:
    """One probed kernel feature.

    `required_for` is the main purpose (one of PURPOSES) that cannot work without it; `also_for` lists any
    other purposes that need it too ("ptrace" is required for "dump" and also for "restore"). `purposes` is
    both together; missing_for and check_exit_code look at all of them.
    """

    name: str
    available: bool
    detail: str
    required_for: str
    also_for: tuple[str, ...] = ()

    @property
    def purposes(self) -> tuple[str, ...]:
        return (self.required_for, *self.also_for)


@dataclass(frozen=True, slots=True)
class VdsoLayout:
    """Sizes in pages of the vdso mappings of this process (0 if absent) and whether they touch."""

    vvar_pages: int
    vvar_vclock_pages: int
    vdso_pages: int
    contiguous: bool
    order: tuple[str, ...]  # names by address, e.g. ("[vvar]", "[vvar_vclock]", "[vdso]")

    def as_dict(self) -> dict[str, object]:
        return {"vvar_pages": self.vvar_pages, "vvar_vclock_pages": self.vvar_vclock_pages,
                "vdso_pages": self.vdso_pages, "contiguous": self.contiguous, "order": list(self.order)}


def _strerror(err: int) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


def kernel_release() -> str:
    return os.uname().release


# Filesystems that stamp a change made after its file's times were read with a fine-grained time, so that the
# change always shows (multigrain timestamps, Linux 6.13: Documentation/filesystems/multigrain-ts.rst). Elsewhere
# a change within the same clock tick (a jiffy; seconds on some filesystems) as the last one may leave the
# times as they were.
_MULTIGRAIN_FS = frozenset({"ext4", "xfs", "btrfs", "tmpfs"})


def changes_always_seen(path: str) -> bool:
    """Whether any change to a file under `path` made after an os.stat() of it gives it a different ctime."""
    import re
    m = re.match(r"(\d+)\.(\d+)", kernel_release())
    if m is None or (int(m[1]), int(m[2])) < (6, 13):
        return False
    from lazarus.kernel.procfs import fstype_of
    return fstype_of(path) in _MULTIGRAIN_FS


# ---------------------------------------------------------------------------------------------
# userfaultfd


@dataclass(frozen=True, slots=True)
class _UffdProbe:
    syscall_err: int  # 0 if userfaultfd(2) worked without UFFD_USER_MODE_ONLY
    user_mode_only: bool  # worked only with UFFD_USER_MODE_ONLY
    dev_err: int  # 0 if /dev/userfaultfd + USERFAULTFD_IOC_NEW worked, -1 if the node is missing
    features: int  # every feature the kernel reports
    accepted: int  # features a handshake actually accepted
    ioctls: int


def _new_uffd(flags: int) -> tuple[int, int]:
    fd, err = raw_syscall(abi.SYS.userfaultfd, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    return fd, err


def _uffd_handshake(features: int) -> tuple[int, abi.uffdio_api]:
    """UFFDIO_API on a fresh uffd (the handshake works once per fd): errno, and what the kernel wrote back."""
    fd, err = _new_uffd(0)
    if fd < 0:
        fd, err = _new_uffd(abi.UFFD_USER_MODE_ONLY)
        if fd < 0:
            return err, abi.uffdio_api()
    try:
        api = abi.uffdio_api(abi.UFFD_API, features, 0)
        _, err = ioctl_raw(fd, abi.UFFDIO_API, api)
        return err, api
    finally:
        os.close(fd)


def _probe_uffd() -> _UffdProbe:
    fd, err = _new_uffd(0)
    user_only = False
    if fd < 0 and err == errno.EPERM:
        fd2, err2 = _new_uffd(abi.UFFD_USER_MODE_ONLY)
        if fd2 >= 0:
            os.close(fd2)
            user_only = True
    elif fd >= 0:
        os.close(fd)
        err = 0

    dev_err = -1
    if os.path.exists("/dev/userfaultfd"):
        try:
            dfd = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            dev_err = e.errno or errno.EIO
        else:
            try:
                nfd, dev_err = ioctl_raw(dfd, abi.USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
                if nfd >= 0:
                    os.close(nfd)
                    dev_err = 0
            finally:
                os.close(dfd)

    features = accepted = ioctls = 0
    if err == 0 or user_only:
        # Asking for no feature makes the kernel report all it supports.
        e, api = _uffd_handshake(0)
        if e == 0:
            features, ioctls = api.features, api.ioctls
            e, _ = _uffd_handshake(features)
            if e == 0:
                accepted = features
            else:  # find out bit by bit which ones a handshake takes
                for bit in abi.UFFD_FEATURES.values():
                    if features & bit and _uffd_handshake(bit)[0] == 0:
                        accepted |= bit
    return _UffdProbe(err, user_only, dev_err, features, accepted, ioctls)


_uffd_cache: _UffdProbe | None = None


def _uffd() -> _UffdProbe:
    global _uffd_cache
    if _uffd_cache is None:
        _uffd_cache = _probe_uffd()
    return _uffd_cache


def uffd_features() -> int:
    """Mask of userfaultfd features a UFFDIO_API handshake accepts here (0 if userfaultfd is unusable)."""
    return _uffd().accepted


# ---------------------------------------------------------------------------------------------
# ptrace'd child: EXITKILL, rseq configuration, XSTATE regset

_ptrace = libc["ptrace"]  # own function object: argtypes here must not clash with ptrace.py's
_ptrace.restype = C.c_long
_ptrace.argtypes = [C.c_long, C.c_int, C.c_void_p, C.c_void_p]


def _ptrace_call(req: int, pid: int, addr: int, data: object) -> int:
    C.set_errno(0)
    ret = _ptrace(req, pid, C.c_void_p(addr), data)
    return 0 if ret != -1 else (C.get_errno() or errno.EIO)


@dataclass(frozen=True, slots=True)
class _ChildProbe:
    error: str  # '' when the child was traced and stopped
    exitkill: int  # errno of PTRACE_SETOPTIONS(EXITKILL)
    rseq_err: int
    rseq: tuple[int, int, int, int] | None  # pointer, size, signature, flags
    xstate_err: int
    xstate: bytes


def _probe_child() -> _ChildProbe:
    with stopped_child() as pid:
        if pid is None:
            return _ChildProbe("PTRACE_TRACEME failed in the child", -1, -1, None, -1, b"")
        exitkill = _ptrace_call(abi.PTRACE_SETOPTIONS, pid, 0, C.c_void_p(abi.PTRACE_O_EXITKILL))

        conf = abi.ptrace_rseq_configuration()
        rseq_err = _ptrace_call(abi.PTRACE_GET_RSEQ_CONFIGURATION, pid, C.sizeof(conf), C.byref(conf))
        rseq = (None if rseq_err else
                (conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature, conf.flags))

        xerr, xstate = regset(pid)
        return _ChildProbe("", exitkill, rseq_err, rseq, xerr, xstate)


_child_cache: _ChildProbe | None = None
_child_lock = threading.Lock()


def _child() -> _ChildProbe:
    global _child_cache
    with _child_lock:
        if _child_cache is None:
            try:
                _child_cache = _probe_child()
            except OSError as e:
                _child_cache = _ChildProbe(f"fork/ptrace failed: {e}", -1, -1, None, -1, b"")
        return _child_cache


def cpu_xstate() -> tuple[int, int]:
    """(xcr0, xstate_size) of this machine, from the XSTATE regset of a traced child, probed afresh (once per
    process); dump and restore use kernel/xstate.py machine_xstate(), the same answer cached for the boot.

    xcr0 is XCR0 as Linux programs it (the user xfeatures; supervisor ones such as CET live in IA32_XSS and are
    not part of it) and xstate_size the NT_X86_XSTATE regset length; together they pin the layout registers
    are saved in. Raises FeatureMissing if unreadable.
    """
    c = _child()
    if c.error or c.xstate_err:
        raise FeatureMissing(f"cpu xstate unavailable: {c.error or _strerror(c.xstate_err)}")
    try:
        xcr0, size, _ = parse_xstate(c.xstate)
    except ValueError as e:
        raise FeatureMissing(f"cpu xstate unavailable: {e}") from None
    return xcr0, size


def xcomp_supported() -> int | None:
    """arch_prctl(ARCH_GET_XCOMP_SUPP): the XSTATE features this kernel can grant (dynamic ones such as AMX
    tile data need a process's request first), or None on a kernel without the call (before 5.16)."""
    value = C.c_uint64(0)
    ret, _ = raw_syscall(abi.SYS.arch_prctl, abi.ARCH_GET_XCOMP_SUPP, C.byref(value))
    return None if ret < 0 else value.value


def cpu_part_rows(xcr0: int, supp: int | None) -> list[Feature]:
    """The "AVX-512" and "AMX" info rows of `lazarus check` from XCR0 (as the xstate probe read it) and what
    ARCH_GET_XCOMP_SUPP reported. Neither is needed to dump or restore; tests use them to know which register
    parts this CPU must bring back. AMX also needs the kernel to grant the tile permission."""
    have512 = xcr0 & abi.XFEATURE_MASK_AVX512 == abi.XFEATURE_MASK_AVX512
    avx512 = Feature("AVX-512", have512,
                     "xcr0 bits 5-7 (opmask, ZMM_Hi256, Hi16_ZMM) set: zmm0-31 and k0-7 are saved" if have512
                     else f"xcr0 {xcr0:#x} lacks bits 5-7: no AVX-512 on this CPU", "info")
    tiles = abi.XFEATURE_MASK_XTILE
    if xcr0 & tiles != tiles:
        amx = Feature("AMX", False, f"xcr0 {xcr0:#x} lacks bits 17-18 (XTILECFG, XTILEDATA): no AMX on this CPU",
                      "info")
    elif supp is None:
        amx = Feature("AMX", False, "arch_prctl(ARCH_GET_XCOMP_SUPP) unavailable: the kernel cannot grant "
                      "tile permission", "info")
    elif supp & tiles != tiles:
        amx = Feature("AMX", False, f"the kernel does not offer tile permission (ARCH_GET_XCOMP_SUPP {supp:#x})",
                      "info")
    else:
        amx = Feature("AMX", True, f"xcr0 bits 17-18 set; the kernel grants tile permission "
                      f"(ARCH_GET_XCOMP_SUPP {supp:#x}): a process's permission and tiles are saved", "info")
    return [avx512, amx]


# ---------------------------------------------------------------------------------------------
# vdso


def parse_vdso_layout(vmas: list[procfs.Vma]) -> VdsoLayout:
    names = ("[vvar]", "[vvar_vclock]", "[vdso]")
    found = sorted((v for v in vmas if v.path in names), key=lambda v: v.start)
    pages = {v.path: v.npages for v in found}
    contiguous = bool(found) and all(a.end == b.start for a, b in zip(found, found[1:], strict=False))
    return VdsoLayout(pages.get("[vvar]", 0), pages.get("[vvar_vclock]", 0), pages.get("[vdso]", 0),
                      contiguous, tuple(v.path for v in found))


def vdso_layout() -> VdsoLayout:
    return parse_vdso_layout(procfs.read_maps(os.getpid()))


# ---------------------------------------------------------------------------------------------
# individual probes


def _probe_pidfd() -> list[Feature]:
    pidfd, err = raw_syscall(abi.SYS.pidfd_open, os.getpid(), 0)
    if pidfd < 0:
        return [Feature("pidfd_open", False, f"pidfd_open: {_strerror(err)}", "dump",
                        also_for=("restore",)),
                Feature("pidfd_getfd", False, "needs pidfd_open", "dump", also_for=("lazy",))]
    try:
        # Take a duplicate of our own pidfd through pidfd_getfd: the same path used on other tasks.
        fd, gerr = raw_syscall(abi.SYS.pidfd_getfd, pidfd, pidfd, 0)
        if fd >= 0:
            os.close(fd)
    finally:
        os.close(pidfd)
    return [Feature("pidfd_open", True, "works", "dump", also_for=("restore",)),
            Feature("pidfd_getfd", fd >= 0, "works" if fd >= 0 else f"pidfd_getfd: {_strerror(gerr)}",
                    "dump", also_for=("lazy",))]


def _probe_peer_identity() -> list[Feature]:
    """What the lazy-pages socket checks its peers with (lazy/trust.py); each has a fallback, hence "info"."""
    import socket  # only this probe needs it

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fd = a.getsockopt(socket.SOL_SOCKET, abi.SO_PEERPIDFD)
        os.close(fd)
        peer = Feature("SO_PEERPIDFD", True, "works (Linux 6.5+): peers identified by pidfd", "info")
    except OSError as e:
        peer = Feature("SO_PEERPIDFD", False, f"{e.strerror}: peers identified by pid number", "info")
    finally:
        a.close()
        b.close()
    pidfd, err = raw_syscall(abi.SYS.pidfd_open, os.getpid(), 0)
    if pidfd < 0:
        return [peer, Feature("PIDFD_GET_INFO", False, f"pidfd_open: {_strerror(err)}", "info")]
    try:
        ret, gerr = ioctl_raw(pidfd, abi.PIDFD_GET_INFO, abi.pidfd_info(mask=abi.PIDFD_INFO_PID))
    finally:
        os.close(pidfd)
    info = (Feature("PIDFD_GET_INFO", True, "works (Linux 6.13+)", "info") if ret >= 0 else
            Feature("PIDFD_GET_INFO", False, f"{_strerror(gerr)}: parents and uids read from /proc", "info"))
    return [peer, info]


def _try_set_tid(tids: list[int], flags: int) -> tuple[int, int]:
    """clone3 asking for `tids` (innermost level first) that must fail: (the child's pid if the kernel ignored
    set_tid and made one, reaped already, else 0; errno)."""
    arr = (C.c_int32 * len(tids))(*tids)
    args = abi.clone_args()
    args.flags = flags
    args.exit_signal = signal.SIGCHLD
    args.set_tid = C.addressof(arr)
    args.set_tid_size = len(tids)
    ret, err = raw_syscall(abi.SYS.clone3, C.byref(args), C.sizeof(args))
    if ret == 0:  # pragma: no cover - only if the kernel ignored set_tid; leave at once
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
        return ret, 0
    return 0, err


def _probe_clone3_set_tid() -> Feature:
    # Ask for our own pid: a kernel that honours set_tid must refuse with EEXIST, so no child appears.
    child, err = _try_set_tid([os.getpid()], 0)
    if child:
        return Feature("clone3 set_tid", False, f"set_tid ignored: a child got pid {child}", "restore")
    if err == errno.EEXIST:
        return Feature("clone3 set_tid", True, "pid in use -> EEXIST, as expected", "restore")
    hint = " (needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN)" if err == errno.EPERM else ""
    return Feature("clone3 set_tid", False, f"clone3: {_strerror(err)}{hint}", "restore")


def _probe_pidns_set_tid() -> Feature:
    """restore --pidns: clone3(CLONE_NEWPID) with a pid per level. Asking for pid 1 in the new namespace and our
    own pid out here must fail with EEXIST at the outer level, so no namespace and no child appear."""
    child, err = _try_set_tid([1, os.getpid()], abi.CLONE_NEWPID)
    if child:
        return Feature("clone3 NEWPID set_tid levels", False, f"set_tid ignored: a child got pid {child}", "pidns")
    if err == errno.EEXIST:
        return Feature("clone3 NEWPID set_tid levels", True, "a pid per namespace level; in use -> EEXIST",
                       "pidns")
    return Feature("clone3 NEWPID set_tid levels", False, f"clone3(CLONE_NEWPID): {_strerror(err)}", "pidns")


def _probe_pagemap_scan() -> Feature:
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return Feature("PAGEMAP_SCAN", False, f"/proc/self/pagemap: {e.strerror}", "dump")
    try:
        vec = (abi.page_region * 4)()
        page = C.create_string_buffer(abi.PAGE_SIZE * 2)
        start = (C.addressof(page) + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)
        arg = abi.pm_scan_arg(size=C.sizeof(abi.pm_scan_arg), start=start, end=start + abi.PAGE_SIZE,
                              vec=C.addressof(vec), vec_len=len(vec), category_anyof_mask=abi.PAGE_IS_PRESENT,
                              return_mask=abi.PAGE_IS_PRESENT)
        n, err = ioctl_raw(fd, abi.PAGEMAP_SCAN, arg)
    finally:
        os.close(fd)
    if n < 0:
        return Feature("PAGEMAP_SCAN", False, f"ioctl: {_strerror(err)}", "dump")
    return Feature("PAGEMAP_SCAN", True, "ioctl on /proc/PID/pagemap works", "dump")


def _probe_soft_dirty() -> Feature:
    import mmap  # only this probe needs it

    name, purpose = "soft-dirty", "info"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write(str(abi.CLEAR_REFS_SOFT_DIRTY))
    except OSError as e:
        return Feature(name, False, f"clear_refs: {e.strerror}", purpose)
    m = mmap.mmap(-1, abi.PAGE_SIZE)
    try:
        m[0] = 1  # a write after the clear is what must set the bit
        addr = C.addressof(C.c_char.from_buffer(m))
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(addr // abi.PAGE_SIZE * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
    finally:
        m.close()
    if entry >> abi.PM_SOFT_DIRTY_BIT & 1:
        return Feature(name, True, "pagemap bit 55 set after a write", purpose)
    return Feature(name, False, "pagemap bit 55 never set (CONFIG_MEM_SOFT_DIRTY off); "
                   "dirty tracking uses uffd WP_ASYNC instead", purpose)


def _cgroup_mounts() -> tuple[list[str], list[str]]:
    """(cgroup2 mount points, cgroup v1 freezer mount points) from /proc/self/mountinfo."""
    v2: list[str] = []
    v1_freezer: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            mnt, fstype, opts = fields[4], rfields[0], rfields[2].split(",")
            if fstype == "cgroup2":
                v2.append(mnt)
            elif fstype == "cgroup" and "freezer" in opts:
                v1_freezer.append(mnt)
    return v2, v1_freezer


def _probe_freezer() -> Feature:
    name, purpose = "cgroup freezer", "info"
    try:
        v2, v1 = _cgroup_mounts()
    except OSError as e:
        return Feature(name, False, f"mountinfo: {e.strerror}", purpose)
    found = []
    for mnt in v2:
        # The root cgroup has no cgroup.freeze; any child cgroup shows whether the kernel has it.
        try:
            has = any(os.path.exists(os.path.join(mnt, d, "cgroup.freeze"))
                      for d in os.listdir(mnt) if os.path.isdir(os.path.join(mnt, d)))
        except OSError:
            has = False
        if has or os.path.exists(os.path.join(mnt, "cgroup.freeze")):
            found.append(f"v2 cgroup.freeze at {mnt}")
        elif os.path.exists(os.path.join(mnt, "cgroup.procs")):
            found.append(f"v2 at {mnt} (no child cgroup to confirm cgroup.freeze)")
    found += [f"v1 freezer at {m}" for m in v1]
    if not found:
        return Feature(name, False, "no cgroup2 mount and no v1 freezer; ptrace stops are used", purpose)
    return Feature(name, True, "; ".join(found), purpose)


def _probe_ptrace() -> list[Feature]:
    c = _child()
    if c.error:
        return [Feature("ptrace", False, c.error, "dump", also_for=("restore",)),
                Feature("PTRACE_GET_RSEQ_CONFIGURATION", False, c.error, "dump")]
    out = [Feature("ptrace", c.exitkill == 0,
                   "traced child stopped; PTRACE_O_EXITKILL accepted" if c.exitkill == 0
                   else f"PTRACE_O_EXITKILL: {_strerror(c.exitkill)}", "dump", also_for=("restore",))]
    if c.rseq is not None:
        ptr, size, sig, _ = c.rseq
        detail = (f"child's rseq: size {size}, signature {sig:#x}" if ptr
                  else "works (child has no rseq registered)")
        out.append(Feature("PTRACE_GET_RSEQ_CONFIGURATION", True, detail, "dump"))
    else:
        out.append(Feature("PTRACE_GET_RSEQ_CONFIGURATION", False, _strerror(c.rseq_err), "dump"))
    return out


def _probe_cpu_xstate() -> Feature:
    try:
        xcr0, size = cpu_xstate()
    except FeatureMissing as e:
        return Feature("cpu xstate", False, str(e), "dump", also_for=("restore",))
    write_cache(xcr0, size)  # what dump and restore read in place of a probe of their own (kernel/xstate.py)
    return Feature("cpu xstate", True, f"xcr0 {xcr0:#x}, XSTATE regset {size} bytes", "dump",
                   also_for=("restore",))


def _probe_cpu_parts() -> list[Feature]:
    try:
        xcr0, _ = cpu_xstate()
    except FeatureMissing as e:
        return [Feature("AVX-512", False, str(e), "info"), Feature("AMX", False, str(e), "info")]
    return cpu_part_rows(xcr0, xcomp_supported())


def _probe_process_vm() -> list[Feature]:
    src = C.create_string_buffer(b"lazarus!", 8)
    dst = C.create_string_buffer(8)
    local = abi.iovec(C.cast(dst, C.c_void_p), 8)
    remote = abi.iovec(C.cast(src, C.c_void_p), 8)
    n, err = raw_syscall(abi.SYS.process_vm_readv, os.getpid(), C.byref(local), 1, C.byref(remote), 1, 0)
    ok = n == 8 and dst.raw == b"lazarus!"
    read = Feature("process_vm_readv", ok, "works" if ok else f"process_vm_readv: {_strerror(err)}", "dump")
    src2 = C.create_string_buffer(b"restored", 8)
    target = C.create_string_buffer(8)
    local = abi.iovec(C.cast(src2, C.c_void_p), 8)
    remote = abi.iovec(C.cast(target, C.c_void_p), 8)
    n, err = raw_syscall(abi.SYS.process_vm_writev, os.getpid(), C.byref(local), 1, C.byref(remote), 1, 0)
    ok = n == 8 and target.raw == b"restored"
    write = Feature("process_vm_writev", ok, "works" if ok else f"process_vm_writev: {_strerror(err)}",
                    "restore")
    return [read, write]


def _cap_eff() -> int:
    return procfs.read_status(os.getpid()).cap_eff


def _probe_prctl_mm_map() -> Feature:
    size = C.c_uint32(0)
    ret, err = raw_syscall(abi.SYS.prctl, abi.PR_SET_MM, abi.PR_SET_MM_MAP_SIZE, C.byref(size), 0, 0)
    if ret < 0:
        return Feature("PR_SET_MM_MAP", False, f"prctl: {_strerror(err)}", "restore")
    if size.value != C.sizeof(abi.prctl_mm_map):
        return Feature("PR_SET_MM_MAP", False,
                       f"kernel's prctl_mm_map is {size.value} bytes, Lazarus knows {C.sizeof(abi.prctl_mm_map)}",
                       "restore")
    caps = _cap_eff()
    if not caps & (1 << abi.CAP_CHECKPOINT_RESTORE | 1 << abi.CAP_SYS_RESOURCE):
        return Feature("PR_SET_MM_MAP", False, "needs CAP_CHECKPOINT_RESTORE or CAP_SYS_RESOURCE", "restore")
    return Feature("PR_SET_MM_MAP", True, f"struct size {size.value}", "restore")


def _probe_proc() -> list[Feature]:
    me = os.getpid()
    children_ok = os.path.exists(f"/proc/{me}/task/{me}/children")
    try:
        os.listdir(f"/proc/{me}/map_files")
        map_files = (True, "readable")
    except OSError as e:
        map_files = (False, f"/proc/PID/map_files: {e.strerror}")
    return [
        Feature("/proc/PID/task/TID/children", children_ok,
                "present" if children_ok else "missing (CONFIG_PROC_CHILDREN off)", "dump"),
        Feature("/proc/PID/map_files", map_files[0], map_files[1], "dump"),
    ]


def _probe_capabilities() -> Feature:
    caps = _cap_eff()
    names = {"CAP_SYS_PTRACE": abi.CAP_SYS_PTRACE, "CAP_SYS_ADMIN": abi.CAP_SYS_ADMIN,
             "CAP_CHECKPOINT_RESTORE": abi.CAP_CHECKPOINT_RESTORE, "CAP_SYS_RESOURCE": abi.CAP_SYS_RESOURCE}
    have = [n for n, b in names.items() if caps >> b & 1]
    lack = [n for n, b in names.items() if not caps >> b & 1]
    detail = f"euid {os.geteuid()}; has {', '.join(have) or 'none'}"
    if lack:
        detail += f"; lacks {', '.join(lack)}"
    return Feature("capabilities", True, detail, "info")


def _uffd_features_rows() -> list[Feature]:
    u = _uffd()
    if u.syscall_err and not u.user_mode_only:
        hint = ""
        if u.syscall_err == errno.EPERM:
            try:
                with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
                    hint = f" (vm.unprivileged_userfaultfd={f.read().strip()})"
            except OSError:
                pass
        rows = [Feature("userfaultfd", False, f"userfaultfd(2): {_strerror(u.syscall_err)}{hint}",
                        "lazy", also_for=("pre-copy",))]
    elif u.user_mode_only:
        rows = [Feature("userfaultfd", False,
                        "only UFFD_USER_MODE_ONLY: faults from read(2) etc. inside the kernel would fail",
                        "lazy", also_for=("pre-copy",))]
    else:
        rows = [Feature("userfaultfd", True, f"userfaultfd(2) works, ioctls {u.ioctls:#x}",
                        "lazy", also_for=("pre-copy",))]
    if u.dev_err == 0:
        rows.append(Feature("/dev/userfaultfd", True, "USERFAULTFD_IOC_NEW works", "info"))
    elif u.dev_err < 0:
        rows.append(Feature("/dev/userfaultfd", False, "no such device node", "info"))
    else:
        rows.append(Feature("/dev/userfaultfd", False, _strerror(u.dev_err), "info"))

    names = [n for n, b in abi.UFFD_FEATURES.items() if u.accepted & b]
    rows.append(Feature("uffd features", bool(u.accepted),
                        f"{len(names)}/{len(abi.UFFD_FEATURES)}: {' '.join(names)}" if names else "none",
                        "info"))
    needed = {"EVENT_FORK": "lazy", "EVENT_REMAP": "lazy", "EVENT_REMOVE": "lazy",
              "EVENT_UNMAP": "lazy", "MISSING_SHMEM": "lazy", "WP_ASYNC": "pre-copy",
              "WP_UNPOPULATED": "pre-copy"}
    for feat, purpose in needed.items():
        bit = abi.UFFD_FEATURES[feat]
        ok = bool(u.accepted & bit)
        detail = "accepted by UFFDIO_API" if ok else (
            "reported but refused by UFFDIO_API" if u.features & bit else "not supported")
        rows.append(Feature(f"uffd {feat}", ok, detail, purpose))
    return rows


def _probe_vdso() -> Feature:
    try:
        v = vdso_layout()
    except Exception as e:  # noqa: BLE001 - any failure to read our own maps is a probe result
        return Feature("vdso", False, f"maps: {e}", "restore")
    if not v.vdso_pages:
        return Feature("vdso", False, "no [vdso] mapping", "restore")
    detail = (f"[vvar] {v.vvar_pages} + [vvar_vclock] {v.vvar_vclock_pages} + [vdso] {v.vdso_pages} pages, "
              f"{'back to back' if v.contiguous else 'NOT contiguous'}")
    return Feature("vdso", True, detail, "restore")


def probe() -> list[Feature]:
    """Run every probe now (uncached). Takes a few milliseconds and forks one short-lived traced child."""
    rows: list[Feature] = [Feature("kernel", True, f"Linux {kernel_release()} {os.uname().machine}", "info")]
    if os.uname().machine != "x86_64":
        rows.append(Feature("architecture", False, "only x86_64 is supported", "dump", also_for=("restore",)))
    rows.append(_probe_capabilities())
    rows += _probe_ptrace()
    rows.append(_probe_cpu_xstate())
    rows += _probe_cpu_parts()
    rows += _probe_pidfd()
    rows += _probe_peer_identity()
    rows.append(_probe_clone3_set_tid())
    rows.append(_probe_pidns_set_tid())
    rows.append(_probe_prctl_mm_map())
    rows.append(_probe_pagemap_scan())
    rows += _probe_process_vm()
    rows += _probe_proc()
    rows.append(_probe_vdso())
    rows += _uffd_features_rows()
    rows.append(_probe_soft_dirty())
    rows.append(_probe_freezer())
    return rows


_report: tuple[Feature, ...] | None = None
_report_lock = threading.Lock()


def report(refresh: bool = False) -> list[Feature]:
    """Every feature, probed on first use and cached for the life of the process."""
    global _report, _uffd_cache, _child_cache
    with _report_lock:
        if refresh:
            _uffd_cache = _child_cache = None
        if _report is None or refresh:
            _report = tuple(probe())
        return list(_report)


def get(name: str, features: list[Feature] | None = None) -> Feature | None:
    for f in features if features is not None else report():
        if f.name == name:
            return f
    return None


def missing_for(purpose: str, features: list[Feature] | None = None) -> list[Feature]:
    """Features `purpose` ("dump", "restore", "lazy", "pre-copy") needs but this kernel lacks."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    return [f for f in (features if features is not None else report())
            if purpose in f.purposes and not f.available]


def require(purpose: str) -> None:
    """Raise FeatureMissing naming the first missing feature if `purpose` cannot work here."""
    missing = missing_for(purpose)
    if missing:
        f = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FeatureMissing(f"{f.name} unavailable: {f.detail}; needed for {purpose}{more}")


def check_exit_code(features: list[Feature] | None = None) -> int:
    """0 if dump and restore can work on this machine, else 1. Lazy, pre-copy and info rows never fail it."""
    feats = features if features is not None else report()
    return 1 if missing_for("dump", feats) or missing_for("restore", feats) else 0


__all__ = ["Feature", "VdsoLayout", "PURPOSES", "probe", "report", "get", "missing_for", "require",
           "check_exit_code", "cpu_xstate", "parse_xstate", "cpu_part_rows", "xcomp_supported", "uffd_features", "vdso_layout",
           "parse_vdso_layout", "kernel_release"]
