"""Creating a task with a chosen PID (clone3 set_tid) that runs no Python and no libc code.

A raw clone3 child of a Python process is a copy whose glibc state is stale (KERNEL-NOTES pitfall 11), so
the child must never return into the interpreter. The clone3 call therefore runs from a small machine-code
trampoline placed on a page of ours; in the child the trampoline arms PDEATHSIG and then loops in pause()
on that same page, so the child only ever executes instructions we wrote. That page is also where the
restorer later finds the `syscall` instruction it injects through.

    trampoline page (RWX, at an address free in both the restorer and the image's layout)
      +0    long clone3(struct clone_args *args, size_t size)    parent: returns the pid / -errno
      +N    child: prctl(PR_SET_PDEATHSIG, SIGKILL); for (;;) pause();
      +S    syscall ; used by RemoteTask for every injected call
"""

from __future__ import annotations

import ctypes as C
import signal

from lazarus.errors import KernelError
from lazarus.kernel import abi
from lazarus.kernel.syscall import libc

_mmap = libc.mmap
_mmap.restype = C.c_void_p
_mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_munmap = libc.munmap
_munmap.argtypes = [C.c_void_p, C.c_size_t]

# x86_64 machine code, assembled by hand; each line is one instruction.
_CODE = bytes.fromhex("".join([
    "b8b3010000",        # mov eax, 435 (clone3); rdi=args, rsi=size from the C calling convention
    "0f05",              # syscall
    "4885c0",            # test rax, rax
    "7401",              # jz child (skip the ret)
    "c3",                # ret                      (parent, or -errno)
    # child:
    "b89d000000",        # mov eax, 157 (prctl)
    "bf01000000",        # mov edi, 1 (PR_SET_PDEATHSIG)
    "be09000000",        # mov esi, 9 (SIGKILL)
    "0f05",              # syscall
    # loop:
    "b822000000",        # mov eax, 34 (pause)
    "0f05",              # syscall
    "ebf7",              # jmp loop
]))
SYSCALL_OFFSET = 0x80
_SYSCALL_INSN = bytes.fromhex("0f05cc")  # syscall; int3 (never reached: we stop at syscall exit)


class Trampoline:
    """An RWX page holding the clone3 trampoline, mapped at `addr` in this process."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.syscall_ip = addr + SYSCALL_OFFSET

    @classmethod
    def map_at(cls, candidates: list[int], size: int) -> Trampoline:
        """Map the trampoline at the first candidate address that is free here."""
        prot = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE
        for addr in candidates:
            got = _mmap(addr, size, prot, flags, -1, 0)
            if got is None or got == C.c_void_p(-1).value:
                continue
            if got != addr:
                _munmap(got, size)
                continue
            C.memmove(got, _CODE, len(_CODE))
            C.memmove(got + SYSCALL_OFFSET, _SYSCALL_INSN, len(_SYSCALL_INSN))
            return cls(addr, size)
        raise KernelError("no free address for the restore trampoline", 12)

    def clone_with_pid(self, pid: int) -> int:
        """clone3 a stopped-in-pause child whose PID is `pid`. Raises KernelError (EEXIST: pid in use)."""
        return self._clone3(0, [pid], f"clone3 with pid {pid}", pid)

    def clone_ns_init(self) -> int:
        """clone3 a stopped-in-pause child that is pid 1 of a new PID namespace, in a new mount namespace (a
        copy of ours). Returns its pid out here."""
        return self._clone3(abi.CLONE_NEWPID | abi.CLONE_NEWNS, [], "clone3 of a PID namespace's init", None)

    def _clone3(self, flags: int, tids_wanted: list[int], what: str, pid: int | None) -> int:
        tids = (C.c_int32 * max(1, len(tids_wanted)))(*tids_wanted)
        args = abi.clone_args()
        args.flags = flags
        args.exit_signal = signal.SIGCHLD
        if tids_wanted:
            args.set_tid = C.addressof(tids)
            args.set_tid_size = len(tids_wanted)
        fn = C.CFUNCTYPE(C.c_long, C.c_void_p, C.c_size_t)(self.addr)
        # Signals blocked here are inherited blocked by the child, so no Python handler can run there.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()))
        try:
            ret = fn(C.addressof(args), C.sizeof(args))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if ret < 0:
            raise KernelError(what, -ret, pid=pid)
        return ret

    def unmap(self) -> None:
        _munmap(self.addr, self.size)
