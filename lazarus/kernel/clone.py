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
_madvise = libc.madvise
_madvise.argtypes = [C.c_void_p, C.c_size_t, C.c_int]

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
BATCH_OFFSET = 0x100  # BATCH_CODE: several injected calls for one stop

# Runs a table of system calls, then traps (lazarus.remote.Batch drives it). At entry r12 = the table, r13 = its
# number of entries, r14 = where results go (8 bytes each). An entry is 9 words: nr, the six arguments, flags,
# and an address where the result is also stored on success (0: none; a structure's field). Flags: bit 0 =
# stop at this call if it fails (-4095..-1); bit k (1-6) = argument k holds the address of its value (another
# call's result). It ends in int3: the task stops with SIGTRAP (a signal-delivery stop the tracer suppresses),
# r13 = the entries not run. Only rax, rcx and r11 are changed by the kernel; r12-r14 survive syscalls.
_BATCH_LOOP = bytes.fromhex("".join([
    "4d85ed",              # loop:  test r13,r13
    "0f8496000000",        #        jz done
    "498b4c2438",          #        mov rcx,[r12+56]       flags
    "498b7c2408",          #        mov rdi,[r12+8]
    "0fbae101",            #        bt ecx,1
    "7303",                #        jnc (skip the load)
    "488b3f",              #        mov rdi,[rdi]
    "498b742410",          #        mov rsi,[r12+16]
    "0fbae102",            #        bt ecx,2
    "7303",                #        jnc (skip the load)
    "488b36",              #        mov rsi,[rsi]
    "498b542418",          #        mov rdx,[r12+24]
    "0fbae103",            #        bt ecx,3
    "7303",                #        jnc (skip the load)
    "488b12",              #        mov rdx,[rdx]
    "4d8b542420",          #        mov r10,[r12+32]
    "0fbae104",            #        bt ecx,4
    "7303",                #        jnc (skip the load)
    "4d8b12",              #        mov r10,[r10]
    "4d8b442428",          #        mov r8,[r12+40]
    "0fbae105",            #        bt ecx,5
    "7303",                #        jnc (skip the load)
    "4d8b00",              #        mov r8,[r8]
    "4d8b4c2430",          #        mov r9,[r12+48]
    "0fbae106",            #        bt ecx,6
    "7303",                #        jnc (skip the load)
    "4d8b09",              #        mov r9,[r9]
    "498b0424",            #        mov rax,[r12]
    "0f05",                #        syscall
    "498906",              #        mov [r14],rax
    "4d8b5c2438",          #        mov r11,[r12+56]
    "498b4c2440",          #        mov rcx,[r12+64]       store address
    "4983c448",            #        add r12,72
    "4983c608",            #        add r14,8
    "49ffcd",              #        dec r13
    "41f6c301",            #        test r11b,1
    "7408",                #        jz (no check)
    "483d01f0ffff",        #        cmp rax,-4095
    "7311",                #        jae done (a failure: stop)
    "4885c9",              #        test rcx,rcx
    "0f8469ffffff",        #        jz loop
    "488901",              #        mov [rcx],rax
    "e961ffffff",          #        jmp loop
]))
BATCH_CODE = _BATCH_LOOP + bytes.fromhex("cc")  # done: int3
BATCH_TRAP_OFFSET = len(BATCH_CODE)  # rip after the int3, relative to the code

# The same loop for a task that must survive its tracer's death at any instant (the dump's original). An int3
# met untraced (the tracer died while the batch ran) is a SIGTRAP the kernel delivers: the original dies of it
# (tests/test_dump_killed.py test_dump_killed_while_its_batch_runs). This end sends the task SIGSTOP instead: traced,
# a signal-delivery stop the tracer suppresses; untraced, a group stop, which is where a dead dump must leave
# the task anyway (its watchdog takes it from there). tgkill with the ids as the task sees them (pid namespaces).
BATCH_STOP_CODE = _BATCH_LOOP + bytes.fromhex("".join([
    "b827000000",          # done:  mov eax, 39 (getpid)
    "0f05",                #        syscall
    "89c7",                #        mov edi, eax
    "b8ba000000",          #        mov eax, 186 (gettid)
    "0f05",                #        syscall
    "89c6",                #        mov esi, eax
    "ba13000000",          #        mov edx, 19 (SIGSTOP)
    "b8ea000000",          #        mov eax, 234 (tgkill)
    "0f05",                #        syscall
]))
BATCH_STOP_OFFSET = len(BATCH_STOP_CODE)  # rip after the tgkill syscall, relative to the code
# Only reached untraced (traced, the tracer takes the task away at the SIGSTOP): wait for the stop that a dead
# tracer's group stop brings at the next return to user mode, without running anything of the program.
BATCH_STOP_CODE += bytes.fromhex("".join([
    "b822000000",          # park:  mov eax, 34 (pause)
    "0f05",                #        syscall
    "ebf7",                #        jmp park
]))


class Trampoline:
    """An RWX page holding the clone3 trampoline, mapped at `addr` in this process."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.syscall_ip = addr + SYSCALL_OFFSET
        self.batch_ip = addr + BATCH_OFFSET

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
            C.memmove(got + BATCH_OFFSET, BATCH_CODE, len(BATCH_CODE))
            return cls(addr, size)
        raise KernelError("no free address for the restore trampoline", 12)

    def clone_with_pid(self, pid: int) -> int:
        """clone3 a stopped-in-pause child whose PID is `pid`. Raises KernelError (EEXIST: pid in use).

        The child gets no copy of this process's memory but the trampoline and the thread's TLS (see
        _not_inherited): it only ever runs the trampoline, and the restore unmaps all it inherited."""
        ranges = _not_inherited((self.addr, self.addr + self.size))
        try:
            return self._clone3(0, [pid], f"clone3 with pid {pid}", pid)
        finally:
            for lo, hi in ranges:
                _madvise(lo, hi - lo, abi.MADV_DOFORK)

    def clone_any(self) -> int:
        """clone3 a stopped-in-pause child with whatever PID the kernel gives (restore/seed.py)."""
        return self._clone3(0, [], "clone3 of a seed task", None)

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


def _not_inherited(trampoline: tuple[int, int]) -> list[tuple[int, int]]:
    """Mark this process's mappings MADV_DONTFORK for the next clone, and return them (for MADV_DOFORK after).

    A clone of a Python process copies the page tables of its ~20 MB of present pages, and the new task must
    then unmap them all again: ~5 ms of a restore command under load, for memory the task never reads. It runs
    only the trampoline's code, which uses no stack, with every signal blocked, so it needs just the trampoline
    page, the vdso and vvar (moved to the image's place later), and the mapping holding the thread's rseq area
    (glibc's, at __rseq_offset from the thread pointer; the thread pointer's own mapping too): the kernel writes
    that area every time the task returns to user space, until the restore unregisters it. Everything else is
    left out of the copy. A mapping that was DONTFORK already (nothing of ours makes one) would be DOFORK after."""
    fs_base = C.c_uint64()
    libc.syscall(abi.SYS.arch_prctl, abi.ARCH_GET_FS, C.byref(fs_base))
    keep = [trampoline, (fs_base.value, fs_base.value + 1)]
    try:  # glibc 2.35+: where it registered the thread's rseq area, relative to the thread pointer
        offset, size = C.c_ssize_t.in_dll(libc, "__rseq_offset").value, C.c_uint.in_dll(libc, "__rseq_size").value
        keep.append((fs_base.value + offset, fs_base.value + offset + max(size, 1)))
    except ValueError:
        pass  # no such symbol: glibc registers no rseq area
    ranges = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
            if len(fields) > 5 and fields[5].startswith(b"[v"):  # [vdso], [vvar], [vvar_vclock], [vsyscall]
                continue
            if any(lo < k_hi and k_lo < hi for k_lo, k_hi in keep):
                continue
            if _madvise(lo, hi - lo, abi.MADV_DONTFORK) == 0:  # EINVAL for VM_IO/PFNMAP: copied as before
                ranges.append((lo, hi))
    return ranges
