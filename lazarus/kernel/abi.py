"""Kernel ABI for x86_64: syscall numbers, constants and structs, with the header each comes from.

Only the kernel layer imports ctypes; everything above it uses the names defined here.
"""

from __future__ import annotations

import ctypes as C

# ---------------------------------------------------------------------------------------------
# ioctl number helpers (include/uapi/asm-generic/ioctl.h)
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:  # noqa: N802 - kernel name
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


# An ioctl number from the size of its argument, a struct named here (STRUCT_SIZES: the ctypes class itself is
# made only when something uses it, see _struct).
def _IOR(typ: int, nr: int, struct: str) -> int:  # noqa: N802
    return _IOC(_IOC_READ, typ, nr, STRUCT_SIZES[struct])


def _IOW(typ: int, nr: int, struct: str) -> int:  # noqa: N802
    return _IOC(_IOC_WRITE, typ, nr, STRUCT_SIZES[struct])


def _IOWR(typ: int, nr: int, struct: str) -> int:  # noqa: N802
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, STRUCT_SIZES[struct])


PAGE_SIZE = 4096


def sizeof(struct: type) -> int:
    """ctypes.sizeof for layers that must not import ctypes."""
    return C.sizeof(struct)


# The structs are ctypes classes made on first use: making the ~40 of them at import cost ~1 ms of every
# command's start-up, and a restore uses a handful. `def _NAME(): return FIELDS` under @_struct (or @_union)
# defines abi.NAME, which module __getattr__ makes once, when it is first asked for; inside a fields
# function, another struct is named with _t("NAME"). Their sizes, which the ioctl numbers below need at
# import, are written in STRUCT_SIZES (tests/unit/test_abi.py checks them against the classes).
_MAKERS: dict[str, tuple[object, type]] = {}


def _struct(fields):  # noqa: ANN001, ANN202 - a decorator of the fields functions below
    _MAKERS[fields.__name__[1:]] = (fields, C.Structure)
    return fields


def _union(fields):  # noqa: ANN001, ANN202
    _MAKERS[fields.__name__[1:]] = (fields, C.Union)
    return fields


def __getattr__(name: str) -> type:
    made = globals().get(name)  # _t() of a struct made already: the same class (ctypes compares classes)
    if made is not None:
        return made
    maker = _MAKERS.get(name)
    if maker is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fields, base = maker
    cls = type(name, (base,), {"_fields_": fields(), "__module__": __name__, "__doc__": fields.__doc__})
    globals()[name] = cls
    return cls


_t = __getattr__


# Sizes the kernel expects, by struct name; checked by tests/unit/test_abi.py.
STRUCT_SIZES: dict[str, int] = {
    "user_regs_struct": 216, "iovec": 16, "peeksiginfo_args": 16, "ptrace_rseq_configuration": 24,
    "kernel_sigaction": 32, "stack_t": 24, "itimerval": 32, "rlimit64": 16, "prctl_mm_map": 104,
    "clone_args": 88, "page_region": 24, "pm_scan_arg": 96, "uffdio_api": 24, "uffdio_range": 16,
    "uffdio_register": 32, "uffdio_copy": 40, "uffdio_zeropage": 32, "uffdio_writeprotect": 24,
    "uffdio_continue": 32, "uffdio_poison": 32, "uffdio_move": 40, "uffd_msg": 32,
    "pidfd_info": 64, "flock": 32, "f_owner_ex": 8, "timespec": 16, "itimerspec": 32, "sigevent": 64,
    "user_cap_header": 8, "user_cap_data": 12,
}

# ---------------------------------------------------------------------------------------------
# syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
class SYS:
    shmget = 29  # System V shared memory (restore/memory.py)
    shmat = 30
    shmctl = 31
    shmdt = 67
    read = 0
    write = 1
    open = 2
    close = 3
    poll = 7
    lseek = 8
    mmap = 9
    mprotect = 10
    munmap = 11
    brk = 12
    rt_sigaction = 13
    rt_sigprocmask = 14
    ioctl = 16
    pread64 = 17
    pwrite64 = 18
    mremap = 25
    madvise = 28
    dup = 32
    dup2 = 33
    pause = 34
    nanosleep = 35
    getitimer = 36
    setitimer = 38
    getpid = 39
    recvmsg = 47  # <asm/unistd_64.h>
    socketpair = 53
    exit = 60
    wait4 = 61
    kill = 62
    fcntl = 72
    ftruncate = 77
    getcwd = 79
    chdir = 80
    fchdir = 81
    umask = 95
    setpgid = 109
    getpgid = 121
    setsid = 112
    setgroups = 116
    setresuid = 117
    setresgid = 119
    rt_sigtimedwait = 128
    rt_sigqueueinfo = 129
    sigaltstack = 131
    personality = 135
    prctl = 157
    arch_prctl = 158
    mount = 165
    gettid = 186
    tkill = 200
    set_tid_address = 218
    clock_nanosleep = 230
    exit_group = 231
    openat = 257
    ppoll = 271
    set_robust_list = 273
    get_robust_list = 274
    tee = 276
    dup3 = 292
    pipe2 = 293
    rt_tgsigqueueinfo = 297
    prlimit64 = 302
    setns = 308
    process_vm_readv = 310
    process_vm_writev = 311
    memfd_create = 319
    userfaultfd = 323
    mlock2 = 325
    rseq = 334
    pidfd_open = 434
    process_madvise = 440
    clone3 = 435
    close_range = 436
    pidfd_getfd = 438
    mseal = 462


# Syscall restart return values (include/linux/errno.h, kernel-internal)
ERESTARTSYS = 512
# System V shared memory (linux/ipc.h, linux/shm.h)
IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_RMID = 0
IPC_SET = 1
SHM_RDONLY = 0o10000
SHM_EXEC = 0o100000
SHM_DEST = 0o1000  # in a segment's mode: removed (IPC_RMID), alive while attached
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_ERRNOS = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)

# ---------------------------------------------------------------------------------------------
# mmap (include/uapi/asm-generic/mman-common.h, mman.h)
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x0100
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_WIPEONFORK = 18
MADV_POPULATE_WRITE = 23  # uapi/asm-generic/mman-common.h, Linux 5.14
MADV_COLLAPSE = 25  # uapi/asm-generic/mman-common.h, Linux 6.1
HPAGE_PMD_SIZE = 2 << 20  # x86-64: one PMD maps 2 MiB
MADV_RANDOM, MADV_SEQUENTIAL = 1, 2
MADV_UNMERGEABLE = 13
MADV_GUARD_INSTALL, MADV_GUARD_REMOVE = 102, 103  # Linux 6.13+
MLOCK_ONFAULT = 1  # mlock2 (include/uapi/asm-generic/mman-common.h)
# memfd seals (include/uapi/linux/fcntl.h) and memfd_create flags (include/uapi/linux/memfd.h)
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 1, 2, 4, 8, 0x10, 0x20
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_HUGETLB, MFD_NOEXEC_SEAL, MFD_EXEC = 1, 2, 4, 8, 0x10

# fcntl / open (include/uapi/asm-generic/fcntl.h)
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_ACCMODE = 3
O_CREAT = 0o100
O_NONBLOCK = 0o4000
O_APPEND = 0o2000
O_LARGEFILE = 0o100000
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
FD_CLOEXEC = 1
AT_FDCWD = -100

# prctl (include/uapi/linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_SET_TIMERSLACK = 29
PR_GET_TIMERSLACK = 30
PR_SET_MM = 35
PR_SET_MM_MAP = 14
PR_SET_MM_MAP_SIZE = 15
PR_GET_TID_ADDRESS = 40
PR_GET_NO_NEW_PRIVS = 39
PR_SET_NO_NEW_PRIVS = 38

# arch_prctl (arch/x86/include/uapi/asm/prctl.h)
ARCH_MAP_VDSO_64 = 0x2003
ARCH_GET_FS = 0x1003  # the thread pointer (fs_base): kernel/clone.py keeps its page in a lean clone
# Dynamically enabled XSTATE features (Documentation/arch/x86/xstate.rst): per-process permission, by the
# number of the highest XSTATE component the facility needs.
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025
# XSTATE component numbers (arch/x86/include/asm/fpu/types.h, enum xfeature)
XFEATURE_OPMASK = 5
XFEATURE_ZMM_HI256 = 6
XFEATURE_HI16_ZMM = 7
XFEATURE_XTILECFG = 17
XFEATURE_XTILEDATA = 18
XFEATURE_MASK_AVX512 = 1 << XFEATURE_OPMASK | 1 << XFEATURE_ZMM_HI256 | 1 << XFEATURE_HI16_ZMM
XFEATURE_MASK_XTILE = 1 << XFEATURE_XTILECFG | 1 << XFEATURE_XTILEDATA
# arch/x86/include/asm/fpu/xstate.h XFEATURE_MASK_USER_DYNAMIC: the user features whose buffer the kernel
# allocates at first use, and only with permission.
XFEATURE_MASK_USER_DYNAMIC = 1 << XFEATURE_XTILEDATA

# rseq (include/uapi/linux/rseq.h)
RSEQ_FLAG_UNREGISTER = 1

# ---------------------------------------------------------------------------------------------
# ptrace (include/uapi/linux/ptrace.h)
PTRACE_TRACEME = 0
PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACEFORK = 2
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

# elf note types (include/uapi/linux/elf.h)
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

# ---------------------------------------------------------------------------------------------
# signals (arch/x86/include/uapi/asm/signal.h)
NSIG = 64
SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE = 1, 2, 3, 4, 5, 6, 7, 8
SIGKILL, SIGUSR1, SIGSEGV, SIGUSR2, SIGPIPE, SIGALRM, SIGTERM = 9, 10, 11, 12, 13, 14, 15
SIGCHLD, SIGCONT, SIGSTOP = 17, 18, 19
SA_RESTORER = 0x04000000
SS_DISABLE = 2
SIG_DFL, SIG_IGN = 0, 1
ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# structs


@_struct
def _user_regs_struct() -> list[tuple]:  # arch/x86/include/asm/user_64.h
    return [(n, C.c_uint64) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
        "ds", "es", "fs", "gs")]


USER_REGS_SIZE = 216
FPREGS_SIZE = 512


@_struct
def _iovec() -> list[tuple]:  # include/uapi/linux/uio.h
    return [("iov_base", C.c_void_p), ("iov_len", C.c_size_t)]


@_struct
def _peeksiginfo_args() -> list[tuple]:  # include/uapi/linux/ptrace.h
    return [("off", C.c_uint64), ("flags", C.c_uint32), ("nr", C.c_int32)]


SIGINFO_SIZE = 128


@_struct
def _ptrace_rseq_configuration() -> list[tuple]:  # include/uapi/linux/ptrace.h
    return [("rseq_abi_pointer", C.c_uint64), ("rseq_abi_size", C.c_uint32),
            ("signature", C.c_uint32), ("flags", C.c_uint32), ("pad", C.c_uint32)]


@_struct
def _kernel_sigaction() -> list[tuple]:  # arch/x86/include/asm/signal.h (struct sigaction, kernel view)
    return [("sa_handler", C.c_uint64), ("sa_flags", C.c_uint64), ("sa_restorer", C.c_uint64),
            ("sa_mask", C.c_uint64)]


@_struct
def _stack_t() -> list[tuple]:  # include/uapi/asm-generic/signal.h
    return [("ss_sp", C.c_uint64), ("ss_flags", C.c_int32), ("_pad", C.c_int32),
            ("ss_size", C.c_uint64)]


@_struct
def _timeval() -> list[tuple]:  # include/uapi/linux/time_types.h (__kernel_old_timeval)
    return [("tv_sec", C.c_int64), ("tv_usec", C.c_int64)]


@_struct
def _itimerval() -> list[tuple]:  # include/uapi/linux/time.h
    return [("it_interval", _t("timeval")), ("it_value", _t("timeval"))]


@_struct
def _rlimit64() -> list[tuple]:  # include/uapi/linux/resource.h
    return [("rlim_cur", C.c_uint64), ("rlim_max", C.c_uint64)]


@_struct
def _prctl_mm_map() -> list[tuple]:  # include/uapi/linux/prctl.h
    return [(n, C.c_uint64) for n in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", C.c_uint32), ("exe_fd", C.c_uint32)]


# clone flags (include/uapi/linux/sched.h): what a thread shares with its process, as pthread_create asks
CLONE_VM = 0x100
CLONE_FS = 0x200
CLONE_FILES = 0x400
CLONE_SIGHAND = 0x800
CLONE_PTRACE = 0x2000
CLONE_PARENT = 0x8000  # <linux/sched.h>: the new task is its creator's sibling (restore/seed.py)
CLONE_THREAD = 0x10000
CLONE_SYSVSEM = 0x40000
CLONE_SETTLS = 0x80000
# restore --pidns: the init is made in new PID and mount namespaces
CLONE_NEWNS = 0x20000
CLONE_NEWPID = 0x20000000
# mount(2) flags (include/uapi/linux/mount.h): restore --pidns mounts the namespace's own /proc
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_SLAVE = 1 << 19


@_struct
def _clone_args() -> list[tuple]:  # include/uapi/linux/sched.h
    return [(n, C.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


# ---------------------------------------------------------------------------------------------
# PAGEMAP_SCAN (include/uapi/linux/fs.h)
@_struct
def _page_region() -> list[tuple]:
    return [("start", C.c_uint64), ("end", C.c_uint64), ("categories", C.c_uint64)]


@_struct
def _pm_scan_arg() -> list[tuple]:
    return [(n, C.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8  # Linux 6.14+; older kernels refuse the bit (EINVAL)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGEMAP_SCAN = _IOWR(ord("f"), 16, "pm_scan_arg")

# ---------------------------------------------------------------------------------------------
# userfaultfd (include/uapi/linux/userfaultfd.h)
UFFD_API = 0xAA
UFFDIO = 0xAA
UFFD_USER_MODE_ONLY = 1
USERFAULTFD_IOC = 0xAA


@_struct
def _uffdio_api() -> list[tuple]:
    return [("api", C.c_uint64), ("features", C.c_uint64), ("ioctls", C.c_uint64)]


@_struct
def _uffdio_range() -> list[tuple]:
    return [("start", C.c_uint64), ("len", C.c_uint64)]


@_struct
def _uffdio_register() -> list[tuple]:
    return [("range", _t("uffdio_range")), ("mode", C.c_uint64), ("ioctls", C.c_uint64)]


@_struct
def _uffdio_copy() -> list[tuple]:
    return [("dst", C.c_uint64), ("src", C.c_uint64), ("len", C.c_uint64), ("mode", C.c_uint64),
            ("copy", C.c_int64)]


@_struct
def _uffdio_zeropage() -> list[tuple]:
    return [("range", _t("uffdio_range")), ("mode", C.c_uint64), ("zeropage", C.c_int64)]


@_struct
def _uffdio_writeprotect() -> list[tuple]:
    return [("range", _t("uffdio_range")), ("mode", C.c_uint64)]


@_struct
def _uffdio_continue() -> list[tuple]:
    return [("range", _t("uffdio_range")), ("mode", C.c_uint64), ("mapped", C.c_int64)]


@_struct
def _uffdio_poison() -> list[tuple]:
    return [("range", _t("uffdio_range")), ("mode", C.c_uint64), ("updated", C.c_int64)]


@_struct
def _uffdio_move() -> list[tuple]:
    return [("dst", C.c_uint64), ("src", C.c_uint64), ("len", C.c_uint64), ("mode", C.c_uint64),
            ("move", C.c_int64)]


@_struct
def __uffd_pagefault() -> list[tuple]:
    return [("flags", C.c_uint64), ("address", C.c_uint64), ("ptid", C.c_uint32), ("_pad", C.c_uint32)]


@_struct
def __uffd_fork() -> list[tuple]:
    return [("ufd", C.c_uint32)]


@_struct
def __uffd_remap() -> list[tuple]:
    return [("from_", C.c_uint64), ("to", C.c_uint64), ("len", C.c_uint64)]


@_struct
def __uffd_remove() -> list[tuple]:
    return [("start", C.c_uint64), ("end", C.c_uint64)]


@_struct
def __uffd_reserved() -> list[tuple]:
    return [("reserved1", C.c_uint64), ("reserved2", C.c_uint64), ("reserved3", C.c_uint64)]


@_union
def __uffd_arg() -> list[tuple]:
    return [("pagefault", _t("_uffd_pagefault")), ("fork", _t("_uffd_fork")), ("remap", _t("_uffd_remap")),
            ("remove", _t("_uffd_remove")), ("reserved", _t("_uffd_reserved"))]


@_struct
def _uffd_msg() -> list[tuple]:
    return [("event", C.c_uint8), ("reserved1", C.c_uint8), ("reserved2", C.c_uint16),
            ("reserved3", C.c_uint32), ("arg", _t("_uffd_arg"))]


UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURES = {
    "PAGEFAULT_FLAG_WP": 1 << 0,
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4,
    "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6,
    "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9,
    "MINOR_SHMEM": 1 << 10,
    "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12,
    "WP_UNPOPULATED": 1 << 13,
    "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}
UFFD_FEATURE_EVENT_FORK = UFFD_FEATURES["EVENT_FORK"]
UFFD_FEATURE_EVENT_REMAP = UFFD_FEATURES["EVENT_REMAP"]
UFFD_FEATURE_EVENT_REMOVE = UFFD_FEATURES["EVENT_REMOVE"]
UFFD_FEATURE_EVENT_UNMAP = UFFD_FEATURES["EVENT_UNMAP"]
UFFD_FEATURE_MISSING_SHMEM = UFFD_FEATURES["MISSING_SHMEM"]
UFFD_FEATURE_WP_ASYNC = UFFD_FEATURES["WP_ASYNC"]

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_REGISTER_MODE_MINOR = 4
UFFDIO_COPY_MODE_DONTWAKE = 1
UFFDIO_COPY_MODE_WP = 2
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1

UFFDIO_API = _IOWR(UFFDIO, 0x3F, "uffdio_api")
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, "uffdio_register")
UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, "uffdio_range")
UFFDIO_WAKE = _IOR(UFFDIO, 0x02, "uffdio_range")
UFFDIO_COPY = _IOWR(UFFDIO, 0x03, "uffdio_copy")
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, 0x04, "uffdio_zeropage")
UFFDIO_MOVE = _IOWR(UFFDIO, 0x05, "uffdio_move")
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, "uffdio_writeprotect")
UFFDIO_CONTINUE = _IOWR(UFFDIO, 0x07, "uffdio_continue")
UFFDIO_POISON = _IOWR(UFFDIO, 0x08, "uffdio_poison")
USERFAULTFD_IOC_NEW = _IOC(_IOC_NONE, USERFAULTFD_IOC, 0x00, 0)


# ---------------------------------------------------------------------------------------------
# [anonfd helper] additions: eventfd, signalfd, timerfd, epoll, inotify and unix socket pairs
SYS.sendto = 44  # type: ignore[attr-defined]  # syscall_64.tbl
SYS.shutdown = 48  # type: ignore[attr-defined]
SYS.socketpair = 53  # type: ignore[attr-defined]
SYS.setsockopt = 54  # type: ignore[attr-defined]
SYS.epoll_ctl = 233  # type: ignore[attr-defined]
SYS.inotify_add_watch = 254  # type: ignore[attr-defined]
SYS.inotify_rm_watch = 255  # type: ignore[attr-defined]
SYS.timerfd_create = 283  # type: ignore[attr-defined]
SYS.timerfd_settime = 286  # type: ignore[attr-defined]
SYS.timerfd_gettime = 287  # type: ignore[attr-defined]
SYS.signalfd4 = 289  # type: ignore[attr-defined]
SYS.eventfd2 = 290  # type: ignore[attr-defined]
SYS.epoll_create1 = 291  # type: ignore[attr-defined]
SYS.inotify_init1 = 294  # type: ignore[attr-defined]
SYS.open_by_handle_at = 304  # type: ignore[attr-defined]
SYS.kcmp = 312  # type: ignore[attr-defined]
EFD_SEMAPHORE = 1  # include/uapi/linux/eventfd.h
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2  # include/uapi/linux/timerfd.h
TFD_IOC_SET_TICKS = _IOC(_IOC_WRITE, ord("T"), 0, 8)  # include/uapi/linux/timerfd.h: _IOW('T', 0, __u64)
EPOLL_CTL_ADD = 1  # include/uapi/linux/eventpoll.h
IN_ATTRIB = 0x4  # include/uapi/linux/inotify.h
KCMP_EPOLL_TFD = 7  # include/uapi/linux/kcmp.h
AF_UNIX = 1  # include/linux/socket.h
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5  # include/linux/net.h
SOL_SOCKET = 1  # include/uapi/asm-generic/socket.h
SO_SNDBUF, SO_RCVBUF = 7, 8
SO_PRIORITY = 12
SO_PASSCRED = 16
SO_RCVLOWAT = 18
SO_RCVTIMEO, SO_SNDTIMEO = 20, 21  # struct timeval (16 bytes on x86_64)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_PASSSEC = 34
SO_MARK = 36
SO_PEEK_OFF = 42
SO_PASSPIDFD = 76
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2  # include/net/sock.h: sk_shutdown bits as sock_diag reports them
TCP_LISTEN = 10  # include/net/tcp_states.h: the state of a listening unix socket too
MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT, MSG_NOSIGNAL = 0x2, 0x20, 0x40, 0x4000  # include/linux/socket.h
NETLINK_SOCK_DIAG = 4  # include/uapi/linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # include/uapi/linux/sock_diag.h
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300  # include/uapi/linux/netlink.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x1, 0x4, 0x10  # include/uapi/linux/unix_diag.h
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6
# [end anonfd helper additions]

# ---------------------------------------------------------------------------------------------
# [lazy helper: uffd/pidfd/vm] additions
SYS.pidfd_send_signal = 424  # type: ignore[attr-defined]  # syscall_64.tbl
PIDFD_NONBLOCK = O_NONBLOCK  # include/uapi/linux/pidfd.h
IOV_MAX = 1024  # include/uapi/linux/uio.h (UIO_MAXIOV)
UFFD_FEATURE_THREAD_ID = UFFD_FEATURES["THREAD_ID"]
UFFD_FEATURE_INITIALIZED = 1 << 31  # fs/userfaultfd.c, kernel-internal: shown on the fdinfo API: line
# [end lazy helper additions]

# ---------------------------------------------------------------------------------------------
# [procfs/pagemap/features helper] additions
SYS.ptrace = 101  # type: ignore[attr-defined]  # syscall_64.tbl
PF_KTHREAD = 0x00200000  # include/linux/sched.h: stat field 9 of kernel threads
PM_SOFT_DIRTY_BIT = 55  # Documentation/admin-guide/mm/pagemap.rst: /proc/pid/pagemap entry bit
CLEAR_REFS_SOFT_DIRTY = 4  # fs/proc/task_mmu.c: value written to /proc/pid/clear_refs
CAP_SYS_PTRACE = 19  # include/uapi/linux/capability.h
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_CHECKPOINT_RESTORE = 40
# arch/x86/include/asm/user.h: the XSTATE regset's sw_usable_bytes start with XCR0 as the OS enabled it
# (the kernel's xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD]); the rest of those 48 bytes are zero.
USER_XSTATE_XCR0_OFFSET = 464
XSAVE_HEADER_OFFSET = 512  # u64 XSTATE_BV, then u64 XCOMP_BV (0 in the standard, uncompacted regset format)
# [end procfs/pagemap/features helper additions]

# ---------------------------------------------------------------------------------------------
# [peers helper: who is on the other end of a socket] additions
SO_PEERCRED = 17  # include/uapi/asm-generic/socket.h: struct ucred {pid, uid, gid} of the connecting process
SO_PEERPIDFD = 77  # include/uapi/asm-generic/socket.h (Linux 6.5+): a pidfd of that process
UCRED_FORMAT = "3i"  # include/linux/socket.h: struct ucred {__u32 pid; __u32 uid; __u32 gid;}
PIDFS_IOCTL_MAGIC = 0xFF  # include/uapi/linux/pidfd.h
PIDFD_INFO_PID = 1 << 0  # always returned
PIDFD_INFO_CREDS = 1 << 1  # always returned


@_struct
def _pidfd_info() -> list[tuple]:
    """include/uapi/linux/pidfd.h, PIDFD_INFO_SIZE_VER0 (64 bytes; later kernels append fields)."""
    return [("mask", C.c_uint64), ("cgroupid", C.c_uint64)] + [(n, C.c_uint32) for n in (
        "pid", "tgid", "ppid", "ruid", "rgid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid", "spare0")]


PIDFD_GET_INFO = _IOWR(PIDFS_IOCTL_MAGIC, 11, "pidfd_info")  # Linux 6.13+
# [end peers helper additions]
# [files helper] additions: status flags, owners, locks, file handles
SYS.flock = 73  # type: ignore[attr-defined]  # syscall_64.tbl
SYS.mkdir = 83  # type: ignore[attr-defined]
SYS.rmdir = 84  # type: ignore[attr-defined]
SYS.name_to_handle_at = 303  # type: ignore[attr-defined]
SYS.open_by_handle_at = 304  # type: ignore[attr-defined]
# include/uapi/asm-generic/fcntl.h (x86-64 values)
O_EXCL = 0o200
O_TRUNC = 0o1000
O_DSYNC = 0o10000
O_ASYNC = 0o20000  # FASYNC
O_DIRECT = 0o40000
O_DIRECTORY = 0o200000
O_NOATIME = 0o1000000
O_SYNC = 0o4010000  # __O_SYNC | O_DSYNC
# fs/fcntl.c SETFL_MASK: the status flags F_SETFL can change; the others only open(2) sets.
SETFL_MASK = O_APPEND | O_NONBLOCK | O_DIRECT | O_NOATIME | O_ASYNC
F_GETLK, F_SETLK = 5, 6
F_SETOWN, F_GETOWN, F_SETSIG, F_GETSIG = 8, 9, 10, 11
F_SETOWN_EX, F_GETOWN_EX = 15, 16
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
F_OFD_GETLK, F_OFD_SETLK = 36, 37
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
SEEK_SET, SEEK_DATA, SEEK_HOLE = 0, 3, 4
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4  # include/uapi/asm-generic/fcntl.h (flock(2))
AT_EMPTY_PATH = 0x1000  # include/uapi/linux/fcntl.h
AT_SYMLINK_FOLLOW = 0x400
MAX_HANDLE_SZ = 128  # include/linux/exportfs.h


@_struct
def _flock() -> list[tuple]:  # include/uapi/asm-generic/fcntl.h struct flock (x86-64)
    return [("l_type", C.c_int16), ("l_whence", C.c_int16), ("l_start", C.c_int64), ("l_len", C.c_int64),
            ("l_pid", C.c_int32)]


@_struct
def _f_owner_ex() -> list[tuple]:  # include/uapi/asm-generic/fcntl.h
    return [("type", C.c_int32), ("pid", C.c_int32)]


@_struct
def _file_handle() -> list[tuple]:  # include/linux/fs.h (with the largest f_handle[] the kernel hands out)
    return [("handle_bytes", C.c_uint32), ("handle_type", C.c_int32), ("f_handle", C.c_ubyte * MAX_HANDLE_SZ)]


# [end files helper additions]
# [proc helper: POSIX timers and prctl state] additions
SYS.timer_create = 222  # type: ignore[attr-defined]  # syscall_64.tbl
SYS.timer_settime = 223  # type: ignore[attr-defined]
SYS.timer_gettime = 224  # type: ignore[attr-defined]
SYS.timer_getoverrun = 225  # type: ignore[attr-defined]
SYS.timer_delete = 226  # type: ignore[attr-defined]
SYS.clock_gettime = 228  # type: ignore[attr-defined]
# include/uapi/linux/time.h: clocks a POSIX timer can run on (the *_ALARM ones need an RTC wake alarm)
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID = 0, 1, 2, 3
CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM, CLOCK_TAI = 7, 8, 9, 11
TIMER_ABSTIME = 1
# include/linux/posix-timers_types.h: a CPU-time clockid is ~pid << 3 | per-thread bit | which clock
CPUCLOCK_PERTHREAD_MASK, CPUCLOCK_CLOCK_MASK, CPUCLOCK_SCHED, CLOCKFD = 4, 3, 2, 3
# include/uapi/asm-generic/siginfo.h
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
SI_TIMER = -2
# prctl (include/uapi/linux/prctl.h)
PR_GET_PDEATHSIG = 2
PR_GET_KEEPCAPS, PR_SET_KEEPCAPS = 7, 8
PR_GET_TSC, PR_SET_TSC = 25, 26
PR_GET_SECUREBITS = 27
PR_MCE_KILL, PR_MCE_KILL_GET = 33, 34
PR_MCE_KILL_CLEAR, PR_MCE_KILL_SET, PR_MCE_KILL_DEFAULT = 0, 1, 2
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_GET_SPECULATION_CTRL, PR_SET_SPECULATION_CTRL = 52, 53
PR_SPEC_STORE_BYPASS, PR_SPEC_INDIRECT_BRANCH, PR_SPEC_L1D_FLUSH = 0, 1, 2
PR_SPEC_PRCTL, PR_SPEC_ENABLE, PR_SPEC_DISABLE, PR_SPEC_FORCE_DISABLE, PR_SPEC_DISABLE_NOEXEC = 1, 2, 4, 8, 16
PR_SET_MDWE, PR_GET_MDWE = 65, 66
PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68
PR_TIMER_CREATE_RESTORE_IDS = 77  # Linux 6.17: timer_create() then takes the wanted id from *timerid
PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON = 0, 1
ARCH_SHSTK_STATUS = 0x5005  # arch/x86/include/uapi/asm/prctl.h
# include/linux/sched.h: the task flags PR_SET_IO_FLUSHER sets (stat field 9); reading them back with
# PR_GET_IO_FLUSHER needs CAP_SYS_RESOURCE
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000


@_struct
def _timespec() -> list[tuple]:  # include/uapi/linux/time_types.h (__kernel_timespec)
    return [("tv_sec", C.c_int64), ("tv_nsec", C.c_int64)]


@_struct
def _itimerspec() -> list[tuple]:  # include/uapi/linux/time_types.h (__kernel_itimerspec)
    return [("it_interval", _t("timespec")), ("it_value", _t("timespec"))]


@_struct
def _sigevent() -> list[tuple]:  # include/uapi/asm-generic/siginfo.h (sigevent_t, 64 bytes)
    return [("sigev_value", C.c_uint64), ("sigev_signo", C.c_int32), ("sigev_notify", C.c_int32),
            ("sigev_notify_thread_id", C.c_int32), ("_pad", C.c_int32 * 11)]


# [end proc helper additions]
# [proc helper: capabilities] include/uapi/linux/capability.h, include/uapi/linux/prctl.h
SYS.capget, SYS.capset = 125, 126  # type: ignore[attr-defined]
LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2


@_struct
def _user_cap_header() -> list[tuple]:  # struct __user_cap_header_struct
    return [("version", C.c_uint32), ("pid", C.c_int32)]


@_struct
def _user_cap_data() -> list[tuple]:  # struct __user_cap_data_struct (two of them for version 3)
    return [("effective", C.c_uint32), ("permitted", C.c_uint32), ("inheritable", C.c_uint32)]


# [proc helper: more per-process switches] arch/x86/include/uapi/asm/prctl.h, include/uapi/linux/prctl.h
ARCH_GET_CPUID, ARCH_SET_CPUID = 0x1011, 0x1012
ARCH_GET_UNTAG_MASK = 0x4001
PR_SCHED_CORE, PR_SCHED_CORE_GET = 62, 0
PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, PR_FUTEX_HASH_GET_SLOTS = 78, 1, 2

# Opening a task's files as its restored credentials would (restore/access.py). syscall_64.tbl, fcntl.h.
SYS.setfsuid = 122  # type: ignore[attr-defined]
SYS.setfsgid = 123  # type: ignore[attr-defined]
O_NOFOLLOW = 0o400000

# --- objects shared between tasks (lazarus/kernel/kcmp.py, lazarus/kernel/pfn.py) ---
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND, KCMP_IO, KCMP_SYSVSEM = range(7)  # include/uapi/linux/kcmp.h
# /proc/PID/pagemap entries (Documentation/admin-guide/mm/pagemap.rst): one u64 per page.
PM_PFN_MASK = (1 << 55) - 1
PM_MMAP_EXCLUSIVE = 1 << 56
PM_FILE_SHARED = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# ---------------------------------------------------------------------------------------------
# [onecopy] the target writes its own pages into the page file (lazarus/dump/selfwrite.py)
SYS.pwritev = 296  # type: ignore[attr-defined]  # syscall_64.tbl
RLIMIT_FSIZE = 1  # include/uapi/asm-generic/resource.h
