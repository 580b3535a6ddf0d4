"""RemoteTask: run system calls inside a ptrace-stopped task, without a parasite.

    tracer                                   stopped task
    ------                                   ------------
    set regs: rip = a `syscall` insn,  --->  executes `syscall`
      rax = nr, args, orig_rax = -1          (syscall-enter stop)
    PTRACE_SYSCALL x2                  <---  (syscall-exit stop) rax = result
    read rax; next call ...

The `syscall` instruction is found in the task's vdso (or in a page we placed there). The task never runs a
user instruction beyond it, so its own code is never executed while we inject. All signals but SIGKILL and
SIGSTOP are blocked for the duration (KERNEL-NOTES pitfall 6) and the mask is put back at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable

from lazarus.errors import KernelError, LazarusError, NoSuchTask
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.clone import BATCH_STOP_CODE, BATCH_STOP_OFFSET, BATCH_TRAP_OFFSET
from lazarus.logs import getLogger
from lazarus.records import field, record

log = getLogger(__name__)

_ALL_SIGNALS = (1 << 64) - 1 & ~((1 << (abi.SIGKILL - 1)) | (1 << (abi.SIGSTOP - 1)))
# While a batch runs, SIGTRAP is left unblocked: the kernel forces the batch's closing int3 trap through a
# blocked or ignored SIGTRAP by resetting that signal's handler to SIG_DFL, which would change the task.
_BATCH_SIGNALS = _ALL_SIGNALS & ~(1 << (abi.SIGTRAP - 1))
_NEG1 = (1 << 64) - 1
_USER_TOP = 1 << 47
_LOW_LIMIT = 1 << 32  # keep scratch away from the program's brk heap and low fixed mappings


def is_error(ret: int) -> bool:
    """Whether a system call's raw return is a failure (-errno, -4095..-1) rather than a value: the one rule of
    every injected call (RemoteTask.syscall, Batch, dump/core.py Reads); an address is never that high."""
    return -4096 < ret < 0


def call_error(ret: int, nr: int, what: str, pid: int) -> KernelError:
    """The KernelError of failed call `nr` (named `what`, else by its number's name) in task `pid`."""
    name = what or next((k for k, v in vars(abi.SYS).items() if v == nr), str(nr))
    return KernelError(f"{name} in task {pid}", -ret, pid=pid)


def restart_after_freeze(regs: abi.user_regs_struct) -> bool:
    """Make a call that our freeze cut short with a plain -EINTR run again; returns whether it did.

    rt_sigtimedwait answers any wakeup, our PTRACE_INTERRUPT included, with -EINTR rather than a restart
    code, so a process caught in sigtimedwait would see a failure it never had. Nothing else can have
    interrupted it here: a signal handler would have moved rip into the handler.
    """
    if regs.orig_rax == abi.SYS.rt_sigtimedwait and regs.rax == (-errno.EINTR) & _NEG1:
        regs.rax = regs.orig_rax
        regs.rip -= 2
        regs.orig_rax = _NEG1
        return True
    return False


def find_syscall_insn(pid: int, start: int, end: int) -> int | None:
    """Address of a `syscall` instruction (0f 05) in [start, end) of the task, or None."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        try:
            data = os.pread(mem.fileno(), end - start, start)
        except OSError:
            return None
    off = data.find(b"\x0f\x05")
    return None if off < 0 else start + off


def free_gap(pid: int, size: int) -> int:
    """A free, page-aligned address range of `size` bytes (plus a guard page either side) in the task, taken
    top-down from below its highest user mapping, as the kernel itself would place an mmap."""
    vmas = sorted((v.start, v.end, v.path) for v in procfs.read_maps(pid) if v.end <= _USER_TOP)
    for (_, prev_end, _), (start, _, path) in zip(reversed(vmas[:-1]), reversed(vmas[1:]), strict=True):
        if path == "[stack]":  # the stack grows down into the gap below it
            continue
        addr = start - size - abi.PAGE_SIZE
        if addr - abi.PAGE_SIZE >= prev_end and addr >= _LOW_LIMIT:
            return addr
    raise LazarusError(f"task {pid}: no free address range of {size} bytes for scratch memory", pid=pid)


def scratch_present(pid: int, addr: int, size: int) -> bool:
    """Whether [addr, addr+size) lies inside one anonymous mapping of the task: our scratch, made in a gap that was
    free, possibly merged by the kernel with an anonymous neighbour of the same protection (munmap of exactly our
    range then leaves the neighbour as it was)."""
    return any(v.start <= addr and addr + size <= v.end and not v.path for v in procfs.read_maps(pid))


TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Protocol

    class Journal(Protocol):
        """What a RemoteTask tells a watchdog before it changes the task (see lazarus/dump/watchdog.py)."""

        def saved(self, regs: abi.user_regs_struct, mask: int, syscall_ip: int) -> None: ...
        def scratch(self, addr: int, size: int) -> None: ...
        def scratch_gone(self) -> None: ...


class RemoteTask:
    """A stopped, traced task into which system calls are injected.

    Parameters: pid of a task in a ptrace stop we own; syscall_ip, the address of a `syscall` instruction
    in its address space. Use as a context manager: on exit the registers and the signal mask are put back
    as they were (unless `keep_state()` was called, as a restore does).
    """

    def __init__(self, pid: int, syscall_ip: int, *,
                 adjust: Callable[[abi.user_regs_struct], object] | None = None,
                 journal: Journal | None = None, batch_ip: int = 0) -> None:
        self.pid = pid
        self.syscall_ip = syscall_ip
        # Where BATCH_CODE lies in the task (restore: the trampoline page), or 0: batches then run call by call.
        self.batch_ip = batch_ip
        # The code at batch_ip is BATCH_STOP_CODE (ends in a SIGSTOP to itself) rather than BATCH_CODE (int3).
        self.batch_stops = False
        # Set once the task's own SIGTRAP disposition is SIG_IGN: the batch's trap would reset it to SIG_DFL.
        self.traps_ignored = False
        self.stops = 0  # times the task was let run for us (one per call; one per batch)
        # The longest sleep while waiting for a batch's end (ptrace.wait's nap), or 0 for its default.
        self.batch_nap = 0.0
        self.saved_regs = ptrace.get_regs(pid)
        if adjust is not None:
            adjust(self.saved_regs)
        self.saved_mask = ptrace.get_sigmask(pid)
        self._restore_on_exit = True
        self.scratch = 0
        self.scratch_size = 0
        self._own_scratch = False
        self._mapping: tuple[int, int] | None = None  # (address, size) of our scratch mapping, if more than scratch
        # Someone who can put things back should we die half way (the dump's watchdog): told the original
        # registers, mask and syscall address before anything changes, and every scratch mapping before it exists.
        self.journal = journal
        self._mem = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        if journal is not None:
            journal.saved(self.saved_regs, self.saved_mask, syscall_ip)
        ptrace.set_sigmask(pid, _ALL_SIGNALS)
        self.calls = 0

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> RemoteTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_state(self) -> None:
        """Do not put the original registers and mask back on close (the caller sets final ones)."""
        self._restore_on_exit = False

    def close(self) -> None:
        try:
            if self._restore_on_exit:
                with contextlib.suppress(NoSuchTask):
                    base, total = self._mapping or (self.scratch, self.scratch_size)
                    if self.scratch and self._own_scratch and scratch_present(self.pid, base, total):
                        self.syscall(abi.SYS.munmap, base, total)
                        self.scratch = 0
                        self._mapping = None
                        if self.journal is not None:
                            self.journal.scratch_gone()
                    ptrace.set_regs(self.pid, self.saved_regs)
                    ptrace.set_sigmask(self.pid, self.saved_mask)
                    self.stop_in_signal_context()
        finally:
            if self._mem >= 0:
                os.close(self._mem)
                self._mem = -1

    def stop_in_signal_context(self) -> None:
        """Move the task from a syscall stop to a PTRACE_EVENT_STOP.

        The kernel restarts an interrupted system call (rax = -ERESTART*, orig_rax = nr) only on the way out
        of signal handling. From a syscall-exit stop it would hand -512 to the program; from an event stop
        (taken inside get_signal) a later detach runs the kernel's own restart logic, as if never stopped.
        """
        ptrace.interrupt(self.pid)
        ptrace.cont(self.pid)
        while True:
            st = ptrace.wait(self.pid)
            if st.exited or st.signaled:
                raise NoSuchTask(f"task {self.pid} {st}", pid=self.pid)
            if st.stopped and st.event == abi.PTRACE_EVENT_STOP:
                return
            # Anything else (a signal stop): pass it on later by leaving it queued; keep waiting.
            ptrace.cont(self.pid, 0 if st.syscall_stop else st.stop_sig)

    # -- syscalls -----------------------------------------------------------------------------------
    def raw(self, nr: int, *args: int) -> int:
        """Run syscall `nr` in the task; returns the kernel's return value (negative errno on failure)."""
        regs = abi.user_regs_struct.from_buffer_copy(self.saved_regs)
        regs.rax = nr
        regs.orig_rax = _NEG1
        regs.rip = self.syscall_ip
        vals = [a & _NEG1 for a in args] + [0] * (6 - len(args))
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = vals
        pid = self.pid
        ptrace.set_regs(pid, regs)
        for stage in ("enter", "exit"):
            ptrace.syscall_step(pid)
            st = ptrace.wait(pid)
            for _ in range(8):
                if st.syscall_stop or st.event != abi.PTRACE_EVENT_STOP:
                    break
                # A trap a SIGCONT left (ptrace_trap_notify: one queued by an injected call of this process,
                # dump/sigcont.py), taken on the way to the syscall instruction: go on to it.
                ptrace.syscall_step(pid)
                st = ptrace.wait(pid)
            if not st.syscall_stop:
                if st.exited or st.signaled:
                    raise NoSuchTask(f"task {pid} {st} during injected syscall {nr}", pid=pid)
                raise LazarusError(f"task {pid} {st} instead of syscall-{stage} stop for syscall {nr}",
                                   pid=pid)
        self.calls += 1
        self.stops += 1
        out = ptrace.get_regs(pid)
        ret = out.rax
        return ret - (1 << 64) if ret >= (1 << 63) else ret

    def syscall(self, nr: int, *args: int, what: str = "") -> int:
        """Like raw(), raising KernelError on a negative return."""
        ret = self.raw(nr, *args)
        if is_error(ret):
            raise call_error(ret, nr, what, self.pid)
        return ret

    def batch(self) -> Batch:
        """A Batch of calls for this task: queued, then run by one injection (see Batch)."""
        return Batch(self)

    def run_batch_code(self, table: int, count: int, results: int) -> int:
        """Let the task run BATCH_CODE (or BATCH_STOP_CODE) over `count` entries at `table`; returns how many it ran."""
        pid = self.pid
        regs = abi.user_regs_struct.from_buffer_copy(self.saved_regs)
        regs.rip = self.batch_ip
        regs.orig_rax = _NEG1
        regs.r12, regs.r13, regs.r14 = table, count, results
        ptrace.set_regs(pid, regs)
        # BATCH_STOP_CODE ends in a SIGSTOP, which no mask blocks; BATCH_CODE in a trap, whose SIGTRAP must not be
        # blocked (see _BATCH_SIGNALS).
        end_sig, end_at = ((abi.SIGSTOP, BATCH_STOP_OFFSET) if self.batch_stops else (abi.SIGTRAP, BATCH_TRAP_OFFSET))
        if not self.batch_stops:
            ptrace.set_sigmask(pid, _BATCH_SIGNALS)
        ptrace.cont(pid)
        st = ptrace.wait(pid, nap=self.batch_nap) if self.batch_nap else ptrace.wait(pid)
        for _ in range(8):  # a trap a SIGCONT queued by one of the calls left (see raw()): the batch goes on
            if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
                break
            ptrace.cont(pid)
            st = ptrace.wait(pid, nap=self.batch_nap) if self.batch_nap else ptrace.wait(pid)
        # The end's signal-delivery stop (not an event stop); resuming from it with no signal takes the signal away.
        if not (st.stopped and st.stop_sig == end_sig and not st.event and not st.syscall_stop):
            if st.exited or st.signaled:
                raise NoSuchTask(f"task {pid} {st} during a batch of injected syscalls", pid=pid)
            raise LazarusError(f"task {pid} {st} instead of the batch's end", pid=pid)
        out = ptrace.get_regs(pid)
        if not self.batch_stops:
            ptrace.set_sigmask(pid, _ALL_SIGNALS)
        if out.rip != self.batch_ip + end_at:
            raise LazarusError(f"task {pid} stopped at {out.rip:#x}, not at the batch's end", pid=pid)
        self.stops += 1
        ran = count - out.r13
        self.calls += ran
        return ran

    # -- memory ---------------------------------------------------------------------------------------
    def alloc_batch_scratch(self, size: int = 4 * abi.PAGE_SIZE) -> bool:
        """Map scratch (as alloc_scratch) behind one page holding BATCH_STOP_CODE, so that a Batch runs in one stop
        in a task that has no code of ours (the dump's): its end is a SIGSTOP, never a trap, so that the task
        survives our death at any instant (lazarus/dump/watchdog.py). Returns whether it did: False where the task may not have a
        writable and executable mapping (PR_SET_MDWE, a security module: EACCES/EPERM), or already has scratch;
        plain scratch is made instead and batches run call by call.

        The one mapping is read, write and exec (one mmap, no mprotect splitting it), and goes with close()."""
        if self.scratch:
            return bool(self.batch_ip)
        page = abi.PAGE_SIZE
        try:
            base = self.alloc_scratch(size + page, prot=abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC)
        except KernelError as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                raise
            self.alloc_scratch(size)
            return False
        self.write(base, BATCH_STOP_CODE)
        self._mapping = (base, size + page)
        self.batch_ip = base
        self.batch_stops = True
        self.scratch, self.scratch_size = base + page, size
        return True

    def alloc_scratch(self, size: int = 4 * abi.PAGE_SIZE, *, prot: int = abi.PROT_READ | abi.PROT_WRITE) -> int:
        """Map a private scratch area in the task for passing structures and strings."""
        if self.scratch:
            return self.scratch
        if self.journal is None:
            self.scratch = self.syscall(abi.SYS.mmap, 0, size, prot, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, _NEG1, 0)
            self.scratch_size, self._own_scratch = size, True
            return self.scratch
        # At an address chosen and journalled before the call, so that whoever puts the task back after our death
        # or failure knows what to unmap even if we never learnt whether the mmap was made.
        addr = free_gap(self.pid, size)
        self.journal.scratch(addr, size)
        self.scratch, self.scratch_size, self._own_scratch = addr, size, True
        ret = self.raw(abi.SYS.mmap, addr, size, prot,
                       abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE, _NEG1, 0)
        if ret != addr:
            self.scratch, self._own_scratch = 0, False
            self.journal.scratch_gone()
            raise KernelError(f"mmap of scratch memory in task {self.pid} at {addr:#x}",
                              -ret if -4096 < ret < 0 else errno.EFAULT, pid=self.pid)
        return addr

    def use_scratch(self, addr: int, size: int) -> None:
        """Use an existing writable area of the task as scratch (restore: the injection page)."""
        self.scratch, self.scratch_size = addr, size
        self._own_scratch = False

    def write(self, addr: int, data: bytes) -> None:
        try:
            n = os.pwrite(self._mem, data, addr)
        except OSError as e:
            raise KernelError(f"write task {self.pid} memory at {addr:#x}", e.errno or errno.EIO,
                              pid=self.pid) from e
        if n != len(data):
            raise KernelError(f"short write to task {self.pid} memory at {addr:#x}", errno.EIO, pid=self.pid)

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self._mem, size, addr)
        except OSError as e:
            raise KernelError(f"read task {self.pid} memory at {addr:#x}", e.errno or errno.EIO,
                              pid=self.pid) from e
        if len(data) != size:
            raise KernelError(f"short read of task {self.pid} memory at {addr:#x}", errno.EIO, pid=self.pid)
        return data

    def put(self, data: bytes, offset: int = 0) -> int:
        """Copy `data` into scratch at `offset`; returns its address in the task."""
        if offset + len(data) > self.scratch_size:
            raise LazarusError(f"scratch area too small for {len(data)} bytes")
        addr = self.scratch + offset
        self.write(addr, data)
        return addr

    def put_struct(self, obj: object, offset: int = 0) -> int:
        return self.put(bytes(obj), offset)  # type: ignore[call-overload]

    def get_struct(self, cls: type, addr: int):  # type: ignore[no-untyped-def]
        return cls.from_buffer_copy(self.read(addr, abi.sizeof(cls)))

    def cstring(self, s: str | bytes, offset: int = 0) -> int:
        b = s.encode() if isinstance(s, str) else s
        return self.put(b + b"\0", offset)


@record(frozen=True)
class Ref:
    """The result of an earlier call of the same Batch, passed as an argument of a later one."""

    index: int


@record
class _Entry:
    nr: int
    args: list[int | Ref]
    check: bool
    what: str
    into: list[int] = field(default_factory=list)  # task addresses the result is stored at (on success)


_ENTRY_SIZE = 72  # BATCH_CODE's entry: nr, six arguments, flags, store address


class Batch:
    """System calls run in the task one after the other by a single injection of BATCH_CODE (one stop instead of
    one per call: a restore makes well over a hundred calls, and each stop costs a round trip through the
    scheduler). Arguments that point to data use put()/cstring()/put_struct(), which place it in the batch's
    part of scratch; a later call takes an earlier one's result with Ref(i). run() returns every result and
    raises KernelError at the first checked call that failed (the calls after it are not made).

    Where the task has no BATCH_CODE (the dump's injection uses the vdso's `syscall`) or its SIGTRAP is ignored,
    the same calls run one by one, with the same results.
    """

    def __init__(self, task: RemoteTask) -> None:
        self.task = task
        self.entries: list[_Entry] = []
        self.used = 0  # bytes of data placed in scratch
        self.failed_at = -1  # after run() raised: the index of the call that failed
        self.entries_failed_what = ""  # and its `what`
        self.results: list[int] = []  # of the last run(), also when it raised: the calls made
        self._done: list[Callable[[list[int]], object]] = []
        # What put() placed, written to the task with the call table in one write at run() (a restore puts a
        # few hundred small structures: one write each was a system call and a page walk each).
        self._data = bytearray()

    def call(self, nr: int, *args: int | Ref, what: str = "", check: bool = True) -> Ref:
        """Queue syscall `nr`; check=False: a failure is returned in the results, not raised."""
        for a in args:
            if isinstance(a, Ref) and not 0 <= a.index < len(self.entries):
                raise LazarusError(f"batch call {len(self.entries)} refers to a later call {a.index}")
        self.entries.append(_Entry(nr, list(args) + [0] * (6 - len(args)), check, what))
        self._room(0)
        return Ref(len(self.entries) - 1)

    def on_done(self, check: Callable[[list[int]], object]) -> None:
        """Call check(results) once the calls queued so far have run without a checked failure (it may raise)."""
        self._done.append(check)

    def store(self, ref: Ref, addr: int) -> None:
        """Also write the (successful) result of `ref` as 8 bytes at `addr` of the task (a structure's field;
        the 8 bytes must be free to write)."""
        self.entries[ref.index].into.append(addr)

    def put(self, data: bytes) -> int:
        """Place `data` in the batch's scratch (8-byte aligned; written to the task when the batch runs);
        returns its address in the task."""
        self._room(len(data) + 8)
        addr = self.task.scratch + self.used
        size = (len(data) + 7) & ~7
        self._data += data
        self._data += bytes(size - len(data))
        self.used += size
        return addr

    def put_struct(self, obj: object) -> int:
        return self.put(bytes(obj))  # type: ignore[call-overload]

    def cstring(self, s: str | bytes) -> int:
        b = s.encode() if isinstance(s, str) else s
        return self.put(b + b"\0")

    def _room(self, more: int) -> None:
        if not self.task.scratch:
            self.task.alloc_scratch()
        if self.used + more + len(self.entries) * (_ENTRY_SIZE + 8) > self.task.scratch_size:
            raise LazarusError(f"batch of {len(self.entries)} calls does not fit in {self.task.scratch_size} bytes "
                               "of scratch: run it in parts")

    def fits(self, calls: int, data: int = 0) -> bool:
        """Whether `calls` more calls and `data` more bytes still fit."""
        return (self.used + data + 8 * calls + (len(self.entries) + calls) * (_ENTRY_SIZE + 8)
                <= self.task.scratch_size)

    def run(self, *, one_stop: bool = False) -> list[int]:
        """Make the calls; returns their results (negative errno on failure); KernelError at a checked failure.
        one_stop: a single call too goes through BATCH_CODE (one stop of the task, where a call by itself takes
        two: its entry and its exit; worth it where the task waits for a CPU between stops)."""
        t = self.task
        if not self.entries:
            return self._finish([])
        if not t.batch_ip or t.traps_ignored or (len(self.entries) == 1 and not one_stop):
            return self._one_by_one()
        n = len(self.entries)
        table = t.scratch + self.used
        results_at = table + n * _ENTRY_SIZE
        used = {a.index for e in self.entries for a in e.args if isinstance(a, Ref)}
        words: list[int] = []
        for i, e in enumerate(self.entries):
            if len(e.into) > 1:
                return self._one_by_one()
            flags = 1 if e.check or e.into or i in used else 0
            for k, a in enumerate(e.args):
                if isinstance(a, Ref):
                    flags |= 1 << (k + 1)
            words += [e.nr, *[results_at + 8 * a.index if isinstance(a, Ref) else a & _NEG1 for a in e.args],
                      flags, e.into[0] if e.into else 0]
        # The data and the table after it, in one write.
        t.write(t.scratch, bytes(self._data) + struct.pack(f"<{len(words)}Q", *words))
        self._data.clear()
        ran = t.run_batch_code(table, n, results_at)
        out = list(struct.unpack(f"<{ran}q", t.read(results_at, 8 * ran))) if ran else []
        self.results = out
        if ran < n or (out and self._failed(n - 1, out[-1])):
            i = ran - 1
            self._raise(i, out[i])
        return self._finish(out)

    def _finish(self, out: list[int]) -> list[int]:
        self.entries.clear()
        self.used = 0
        self._data.clear()
        done, self._done = self._done, []
        for check in done:
            check(out)
        return out

    def _failed(self, i: int, ret: int) -> bool:
        e = self.entries[i]
        return is_error(ret) and (e.check or bool(e.into) or any(
            isinstance(a, Ref) and a.index == i for later in self.entries[i + 1:] for a in later.args))

    def _raise(self, i: int, ret: int) -> None:
        e = self.entries[i]
        self.failed_at = i
        self.entries_failed_what = e.what
        self.entries.clear()
        self.used = 0
        self._data.clear()
        self._done = []
        raise call_error(ret, e.nr, e.what, self.task.pid)

    def _one_by_one(self) -> list[int]:
        t = self.task
        if self._data:
            t.write(t.scratch, bytes(self._data))
            self._data.clear()
        out: list[int] = []
        self.results = out
        for i, e in enumerate(self.entries):
            ret = t.raw(e.nr, *[out[a.index] if isinstance(a, Ref) else a for a in e.args])
            out.append(ret)
            if self._failed(i, ret):
                self._raise(i, ret)
            for addr in e.into:
                t.write(addr, (ret & _NEG1).to_bytes(8, "little"))
        return self._finish(out)
