"""The dump's watchdog: the original carries on as it was even when `lazarus dump` itself is killed.

A ptrace tracee whose tracer dies is resumed by the kernel with whatever registers and signal mask it has at
that moment. Half way through an injected system call those are ours (rip in the vdso, every signal blocked),
and the original crashes or runs deaf. Two things prevent it:

1. The dump stops the original with SIGSTOP before it changes anything, and keeps that group stop for the
   whole dump. When a tracer exits, the kernel puts a tracee whose group is stopped back into TASK_STOPPED
   (__ptrace_unlink re-arms JOBCTL_STOP_PENDING), so the original stays stopped, on our state, until someone
   continues it. The group stop does not hinder injection: a tracer may still run its stopped tracee.
   Measured on this kernel (6.18): with no stop, a tracer SIGKILLed at a syscall-exit stop leaves the tracee
   to die of SIGSEGV; with the group stop it stays in T with SigBlk all ones until SIGCONT.
   Weighed and not taken: the cgroup v2 freezer (mounted here at /sys/fs/cgroup/unified, hybrid) also keeps
   a task frozen across its tracer's death, but a frozen task never gets from one injected call to the next
   (each ptrace resume passes the freezer trap in get_signal first; measured: the dump times out), and it
   would move the process to another cgroup meanwhile. Parking code (rip always on a `syscall; pause` loop
   of ours) needs memory we can only make by an injection that is itself unprotected.
   The price of the stop is that it is a real job-control stop: the parent gets SIGCHLD with CLD_STOPPED and
   then CLD_CONTINUED (a shell sees its job stop and continue). The program itself does not see the SIGCONT
   (continue_quietly() takes it away at its delivery stop, or, if the program blocks SIGCONT, by an injected
   rt_sigtimedwait, with the SIGCONTs it had pending queued back: dump/sigcont.py; the dump leaves those
   injections to the watchdog, Watchdog.resume, since they run after the stop has ended).
2. A watchdog process, forked before the seize (double fork, own session: not our child, not in our
   process group, and small, so neither a kill of the dump's group nor the OOM killer's choice takes it), is
   told the original registers, mask and syscall address before any of them change, and every scratch
   mapping before it is made (at an address chosen first, MAP_FIXED_NOREPLACE). If the dump dies before
   releasing it, it seizes the original again, puts all of that back and continues it.

    lazarus dump                                    watchdog
    ------------                                    --------
    Watchdog.start() ------------ SEQPACKET ------> "ready"
    seize; "stopping" ---------------------------->   (from here on: repair() on EOF)
    SIGSTOP -> group stop (T); the task cannot run again until SIGCONT
    "saved" regs, mask, syscall ip  -------------->
    sigmask := all blocked; inject ...
    "scratch" addr, size; mmap FIXED there  ------>
    ... munmap; "scratch-gone" ------------------->
    regs, mask put back; "clean" ----------------->   (from here on: nothing to put back on EOF)
    the task writes its own pages (dump/selfwrite.py): a second injection session as above, and
    "fds" (scratch address of the pair's numbers, ---->   repair() then also closes in the task the socket
      the page file's dev and inode)                      pair (if made) and every fd of the page file
    ... close them in the task; "fds-gone" ------->
    pages, files, image written and verified
    SIGCONT, taken at its delivery stop; detach
      (or SIGKILL the original); "release" ------->   exits, touching nothing
    (killed anywhere above) --------- EOF -------->   repair(): wait for T and no tracer; seize (that reports
                                                      the group stop); munmap the scratch if it is there;
                                                      registers and mask from "saved"; continue_quietly();
                                                      one line on stderr saying what it did

Trees: each process of a dumped tree has a watchdog of its own (started when the freeze reaches it), so any
process the dump leaves half-way is repaired by its own. A process that was in a job-control stop before the
dump is left stopped by repair() ("was-stopped"), never continued.

Threads: every thread of the process is seized and stops in the same group stop (a tracer's death leaves each
one in it). Injection is into the leader, and briefly into each other thread for the two things only the thread
itself can answer (its sigaltstack and clear_child_tid), using the leader's scratch: those injections journal
the thread's registers and mask ("saved" and "clean" carrying a "tid"), and repair() puts them back into each
thread not clean, leaving it in the group stop, before the leader's SIGCONT ends it for all.

On a failure it survives, the dump puts the original back itself (continue_quietly() if the state is clean,
else detach and the same repair()) before it reports the error, then releases the watchdog; should that fail,
the watchdog, not released, repairs once the dump exits. repair() is idempotent: the watchdog may redo it.

The batch of injected calls (lazarus/remote.py Batch) lets the original run code of ours (BATCH_STOP_CODE) with
no syscall stops in between; it ends in a SIGSTOP the task sends itself, not in a trap: a dump killed while the
batch runs, or at its end, leaves the task in the group stop (a trap met untraced would kill it with SIGTRAP). A SIGSTOP left pending by that end is taken away by repair() before it injects anything.

If the dump and its watchdog are both killed before "clean", the original stays stopped on injected state:
never SIGCONT it by hand then. A SIGCONT someone else sends during the dump ends the protecting stop early.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time

from lazarus.dump import sigcont
from lazarus.errors import KernelError, LazarusError, NoSuchTask
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.syscall import keep_only_fd
from lazarus.logs import getLogger
from lazarus.records import field, record
from lazarus.remote import RemoteTask, find_syscall_insn, restart_after_freeze, scratch_present

log = getLogger(__name__)

_MAX_MSG = 4096
_READY_TIMEOUT = 5.0
_STOP_WAIT = 5.0  # how long repair() waits for the old tracer to be gone and the task to be in its stop


@record
class JournalState:
    """Everything the watchdog was told; enough to put the original back."""

    pid: int
    start: int
    stopping: bool = False
    regs: bytes | None = None
    mask: int | None = None
    syscall_ip: int = 0
    scratch: tuple[int, int] | None = None
    clean: bool = False
    released: bool = False
    # In a job-control stop before the dump (a stopped child of a tree): repaired, it is left stopped.
    was_stopped: bool = False
    # Other threads of the process we injected into: tid -> (registers, mask) until that thread is clean again.
    threads: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    # Descriptors the dump gave the task (dump/selfwrite.py): (address in scratch of the socket pair's two fd
    # numbers, -1 until made; st_dev and st_ino of the page file), until they are closed again.
    target_fds: tuple[int, int, int] | None = None
    # Blocked SIGCONTs pending before our SIGSTOP discarded them (dump/sigcont.py): queued back when let go.
    held: sigcont.Held = field(default_factory=dict)
    resume: bool = False  # asked to let the original go (Watchdog.resume), not repairing after a death

    def apply(self, msg: dict) -> None:
        kind = msg.get("t")
        if "tid" in msg:  # a non-leader thread: only "saved" and "clean" concern it (it never has scratch)
            tid = int(msg["tid"])
            if kind == "saved":
                self.threads[tid] = (bytes.fromhex(msg["regs"]), int(msg["mask"]))
            elif kind == "clean":
                self.threads.pop(tid, None)
            return
        if kind == "stopping":
            self.stopping = True
        elif kind == "was-stopped":
            self.was_stopped = True
        elif kind == "held-cont":
            self.held = sigcont.from_json(msg["held"])
        elif kind == "saved":
            self.clean = False  # a new injection session (the fd code's injector after the main one)
            self.regs = bytes.fromhex(msg["regs"])
            self.mask = int(msg["mask"])
            self.syscall_ip = int(msg["ip"])
        elif kind == "scratch":
            self.scratch = (int(msg["addr"]), int(msg["size"]))
        elif kind == "scratch-gone":
            self.scratch = None
        elif kind == "clean":
            self.clean = True
        elif kind == "fds":
            self.target_fds = (int(msg["at"]), int(msg["dev"]), int(msg["ino"]))
        elif kind == "fds-gone":
            self.target_fds = None
        elif kind == "release":
            self.released = True
        elif kind == "resume":
            self.resume = True


class Watchdog:
    """The dump's handle on its watchdog; also the RemoteTask journal. Sending never raises: a watchdog that is
    gone is noticed by `alive` (the dump checks it before it changes anything)."""

    def __init__(self, sock: socket.socket, pid: int, state: JournalState) -> None:
        self._sock = sock
        self.pid = pid
        self.state = state  # our own copy, for repairing in-process on a failure we survive
        self.alive = True

    @classmethod
    def start(cls, target_pid: int, prepared: Watchdog | None = None) -> Watchdog:
        """The watchdog for `target_pid`: `prepared` (Watchdog.prepare(), forked earlier) told its target, or one
        forked now (call before any thread exists), ready either way. Should this raise, `prepared` is still the
        caller's to close."""
        start = procfs.start_time(target_pid)
        if prepared is not None:
            if prepared.state.pid == 0 and prepared.check_alive():
                prepared.state = JournalState(target_pid, start)
                prepared._send({"t": "target", "pid": target_pid, "start": start})
                if prepared.alive:
                    return prepared
            prepared.close()  # gone meanwhile (killed?): fork one as usual
        return cls._fork(target_pid, start)

    @classmethod
    def prepare(cls) -> Watchdog:
        """Fork a watchdog with no target yet, ahead of a dump (a service worker, while idle and without a
        thread): start() then only tells it the target, instead of a double fork on the dump's way (~5-10 ms in
        a process of a worker's size). Until then it watches nothing; closing it (close()) ends it."""
        return cls._fork(0, 0)

    @classmethod
    def _fork(cls, target_pid: int, start: int) -> Watchdog:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()  # the grandchild's pid, from the intermediate child
        mid = os.fork()
        if mid == 0:  # pragma: no cover - runs in the intermediate child
            code = 70
            try:
                os.setsid()
                wd = os.fork()
                if wd == 0:
                    keep = theirs.fileno()
                    keep_only_fd(keep)
                    code = _watchdog_main(keep, target_pid, start)
                else:
                    os.write(w, str(wd).encode())
                    code = 0
            finally:
                os._exit(code)
        os.close(w)
        theirs.close()
        os.waitpid(mid, 0)
        with os.fdopen(r, "rb") as f:
            got = f.read()
        if not got:
            ours.close()
            raise LazarusError("cannot start the dump's watchdog")
        wd = cls(ours, int(got), JournalState(target_pid, start))
        ours.settimeout(_READY_TIMEOUT)
        try:
            ready = ours.recv(_MAX_MSG)
        except OSError:
            ready = b""
        if ready != b"ready":
            wd.alive = False
            ours.close()
            raise LazarusError(f"the dump's watchdog (pid {wd.pid}) did not start")
        ours.setblocking(True)
        return wd

    def _send(self, msg: dict) -> None:
        self.state.apply(msg)
        if not self.alive:
            return
        try:
            self._sock.send(json.dumps(msg, separators=(",", ":")).encode())
        except OSError:
            self.alive = False

    def check_alive(self) -> bool:
        """False once the watchdog is gone (its end of the socket closed)."""
        if self.alive:
            r, _, _ = select.select([self._sock], [], [], 0)
            if r:
                with contextlib.suppress(OSError):
                    if self._sock.recv(_MAX_MSG, socket.MSG_DONTWAIT) == b"":
                        self.alive = False
        return self.alive

    # -- the journal ---------------------------------------------------------------------------------------
    def stopping(self) -> None:
        self._send({"t": "stopping"})

    def was_stopped(self) -> None:
        """The task was stopped before the dump: repair() leaves it in its stop instead of continuing it."""
        self._send({"t": "was-stopped"})

    def held_cont(self, held: sigcont.Held) -> None:
        self._send({"t": "held-cont", "held": sigcont.to_json(held)})

    def saved(self, regs: abi.user_regs_struct, mask: int, syscall_ip: int) -> None:
        self._send({"t": "saved", "regs": bytes(regs).hex(), "mask": mask, "ip": syscall_ip})

    def scratch(self, addr: int, size: int) -> None:
        self._send({"t": "scratch", "addr": addr, "size": size})

    def scratch_gone(self) -> None:
        self._send({"t": "scratch-gone"})

    def clean(self) -> None:
        self._send({"t": "clean"})

    def target_fds(self, at: int, dev: int, ino: int) -> None:
        """The dump is about to give the task descriptors of its own (dump/selfwrite.py): a socket pair whose two
        numbers the task's scratch holds at `at` (-1 until made), and the page file (st_dev, st_ino)."""
        self._send({"t": "fds", "at": at, "dev": dev, "ino": ino})

    def target_fds_gone(self) -> None:
        self._send({"t": "fds-gone"})

    def for_thread(self, tid: int) -> ThreadJournal:
        """The journal of an injection into another thread of the process (its registers and mask)."""
        return ThreadJournal(self, tid)

    def resume(self, timeout: float = 10.0) -> str:
        """Have the watchdog let the original go (repair(): its state is clean, it is detached in our group stop),
        and wait until it did. For a task that blocks SIGCONT, whose letting go takes injected calls after our
        stop has ended (dump/sigcont.py put_back): should the dump die then, the task would run on injected
        registers; the watchdog outlives such a death. Returns what it did; raises if it gave no answer."""
        self._send({"t": "resume"})
        try:
            r, _, _ = select.select([self._sock], [], [], timeout)
            answer = self._sock.recv(_MAX_MSG) if r else b""
        except OSError:
            answer = b""
        self.close()
        if not answer.startswith(b"resumed:"):
            raise LazarusError(f"the dump's watchdog (pid {self.pid}) did not let pid {self.state.pid} go",
                               pid=self.state.pid)
        return answer[len(b"resumed:"):].decode(errors="replace")

    def release(self) -> None:
        """The original is as it was (or killed on purpose): the watchdog exits without touching it."""
        self._send({"t": "release"})
        self.close()

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.close()


class ThreadJournal:
    """A RemoteTask journal for a non-leader thread: the watchdog puts its registers and mask back too. The
    thread uses the leader's scratch (one address space), so it never journals a mapping of its own."""

    def __init__(self, wd: Watchdog, tid: int) -> None:
        self._wd = wd
        self.tid = tid

    def saved(self, regs: abi.user_regs_struct, mask: int, syscall_ip: int) -> None:
        self._wd._send({"t": "saved", "tid": self.tid, "regs": bytes(regs).hex(), "mask": mask, "ip": syscall_ip})

    def scratch(self, addr: int, size: int) -> None:  # pragma: no cover - threads use the leader's scratch
        raise LazarusError(f"thread {self.tid}: scratch memory of its own is not journalled")

    def scratch_gone(self) -> None:  # pragma: no cover
        pass

    def clean(self) -> None:
        self._wd._send({"t": "clean", "tid": self.tid})


def _wait_stopped(st: JournalState) -> str | None:
    """Wait until the task is in a group stop with no tracer. Returns None then, or why not."""
    deadline = time.monotonic() + _STOP_WAIT
    not_stopping_since: float | None = None
    while True:
        try:
            if procfs.start_time(st.pid) != st.start:
                return "gone"
            status = procfs.read_status(st.pid)
        except (LazarusError, OSError):
            return "gone"
        state = status.state[:1]
        if state in ("Z", "X"):
            return "gone"
        now = time.monotonic()
        if status.tracer_pid == 0:
            if state == "T":
                return None
            # Not stopped and not traced: fine if our SIGSTOP is still on its way, otherwise it never was sent
            # (or someone continued the task): give it a moment, then say so.
            pending = _stop_pending(st.pid)
            if pending:
                not_stopping_since = None
            elif not_stopping_since is None:
                not_stopping_since = now
            elif now - not_stopping_since > 0.05:
                return f"not stopped (state {status.state})"
        if now > deadline:
            return f"still {status.state} (tracer {status.tracer_pid})"
        time.sleep(0.001)


def _stop_pending(pid: int) -> bool:
    try:
        text = procfs.read_text(f"/proc/{pid}/status", pid)
    except (LazarusError, OSError):
        return False
    bit = 1 << (signal.SIGSTOP - 1)
    for line in text.splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def repair(st: JournalState) -> str:
    """Put the original back as the journal says and let it run. Returns what was done, for a log line.

    Its previous tracer must be gone or going (the dump detaches before calling this itself); the task is
    waited for in the group stop our SIGSTOP began, which outlives any tracer.
    """
    if st.released:
        return "nothing to do"
    if not st.stopping:
        return "untouched: it was never stopped, and runs on as it was"
    why = _wait_stopped(st)
    if why == "gone":
        return "gone"
    if why is not None:
        if why.startswith("not stopped") and (st.regs is None or st.clean):
            return f"nothing changed in it; {why}" + _requeue_held(st)
        return f"cannot repair: {why}"
    for _ in range(1000):
        try:
            ptrace.seize(st.pid, abi.PTRACE_O_TRACESYSGOOD)
            break
        except KernelError as e:  # EPERM: the old tracer is still on its way out
            if e.errno != errno.EPERM:
                raise
            time.sleep(0.005)
    else:
        return "cannot repair: it is traced by someone else"
    # Seizing a task in a group stop makes it report that stop (an event stop) by itself; a PTRACE_INTERRUPT
    # here would queue a second one, which the first injected call would then run into.
    _wait_event_stop(st.pid)
    remote = RemoteTask(st.pid, st.syscall_ip, adjust=None if st.regs is not None else restart_after_freeze)
    if st.regs is not None:
        remote.saved_regs = ptrace.regs_from_bytes(st.regs)
    if st.mask is not None:
        remote.saved_mask = st.mask
    undone = ""
    present = st.scratch is not None and scratch_present(st.pid, *st.scratch)
    if st.target_fds is not None:
        undone += _close_target_fds(remote, st.target_fds, present)
        st.target_fds = None
    if st.scratch is not None and present:
        remote.scratch, remote.scratch_size = st.scratch
        remote._own_scratch = True
        undone += f", unmapped scratch {st.scratch[0]:#x}"
    remote.close()  # munmap, registers, mask, and into an event stop for a clean syscall restart
    st.scratch = None
    undone += _repair_threads(st)
    if st.was_stopped:
        ptrace.detach(st.pid)  # back into the stop it was in before the dump
        return "registers and signal mask put back, left stopped as it was" + undone
    extra = _seize_held_threads(st)
    try:
        continue_quietly(st.pid, remote.saved_mask, syscall_ip=st.syscall_ip, held=st.held, threads=extra)
    finally:
        for tid in extra:
            with contextlib.suppress(LazarusError):
                ptrace.detach(tid)
    if st.clean:
        return "continued (its state was already put back)"
    what = "registers and signal mask put back" if st.regs is not None else "continued"
    return what + undone


def _close_target_fds(remote: RemoteTask, fds: tuple[int, int, int], scratch: bool) -> str:
    """Close in the task the descriptors the dump gave it (dump/selfwrite.py): the socket pair whose numbers
    scratch holds (if it was made: they were -1 before, and the task, stopped, made no socket since) and every
    descriptor of the page file. Returns what it closed, for the log line."""
    at, dev, ino = fds
    mine: list[int] = []
    if scratch:
        with contextlib.suppress(LazarusError, OSError):
            pair = remote.read(at, 8)
            for k in (int.from_bytes(pair[:4], "little", signed=True), int.from_bytes(pair[4:], "little", signed=True)):
                with contextlib.suppress(OSError):
                    if k >= 0 and os.readlink(f"/proc/{remote.pid}/fd/{k}").startswith("socket:"):
                        mine.append(k)
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{remote.pid}/fd"):
            with contextlib.suppress(OSError):
                fst = os.stat(f"/proc/{remote.pid}/fd/{name}")
                if (fst.st_dev, fst.st_ino) == (dev, ino):
                    mine.append(int(name))
    for k in sorted(set(mine)):
        remote.raw(abi.SYS.close, k)
    return f", closed fds {', '.join(map(str, sorted(set(mine))))} the dump gave it" if mine else ""


def _seize_held_threads(st: JournalState) -> list[int]:
    """The other threads with held SIGCONTs of their own (dump/sigcont.py), seized in our group stop for
    put_back(); those that cannot be are left out (their SIGCONT is then lost)."""
    out = []
    for tid in st.held:
        if tid in (0, st.pid):
            continue
        try:
            ptrace.seize(tid, abi.PTRACE_O_TRACESYSGOOD)
            _wait_event_stop(tid)
        except LazarusError:
            continue
        out.append(tid)
    return out


def _requeue_held(st: JournalState) -> str:
    """In a task our SIGSTOP never stopped (its delivery failed) but whose pending SIGCONTs it discarded: queue
    those back (dump/sigcont.py). A SIGCONT still pending (no SIGSTOP was sent) keeps its place: a standard
    signal is queued once."""
    if not st.held:
        return ""
    seized: list[int] = []
    try:
        for tid in [st.pid, *(t for t in st.held if t not in (0, st.pid))]:
            try:
                ptrace.seize(tid, abi.PTRACE_O_TRACESYSGOOD)
            except NoSuchTask:
                continue  # a thread that has exited
            except KernelError as e:
                # Still ours: a failed dump could not detach a thread it had let run (this runs in the dump then).
                if e.errno != errno.EPERM or procfs.read_status(st.pid, tid).tracer_pid != os.getpid():
                    raise
            seized.append(tid)
            ptrace.interrupt(tid)
            _wait_event_stop(tid)
        ip = st.syscall_ip or _vdso_syscall(st.pid)
        if ip:
            sigcont.put_back(st.pid, ip, st.held, [t for t in seized if t != st.pid])
    except LazarusError as e:
        return f"; its pending SIGCONT could not be queued back: {e}"
    finally:
        for tid in seized:
            with contextlib.suppress(LazarusError):
                ptrace.detach(tid)
    return "; its pending SIGCONT queued back"


def _repair_threads(st: JournalState) -> str:
    """Registers and mask back into every other thread caught in an injection; each is left in the group stop
    (detached) for the leader's SIGCONT to end."""
    done = []
    for tid, (regs, mask) in sorted(st.threads.items()):
        for _ in range(1000):
            try:
                ptrace.seize(tid, abi.PTRACE_O_TRACESYSGOOD)
                break
            except NoSuchTask:
                break
            except KernelError as e:
                if e.errno != errno.EPERM:
                    raise
                time.sleep(0.005)
        else:
            continue
        try:
            _wait_event_stop(tid)
            remote = RemoteTask(tid, st.syscall_ip)
            remote.saved_regs = ptrace.regs_from_bytes(regs)
            remote.saved_mask = mask
            remote.close()
            ptrace.detach(tid)
        except NoSuchTask:
            continue
        done.append(tid)
    st.threads.clear()
    return f", threads {', '.join(map(str, done))} put back" if done else ""


def continue_quietly(pid: int, mask: int, *, syscall_ip: int = 0, held: sigcont.Held | None = None,
                     threads: list[int] | None = None, watchdog: Watchdog | None = None) -> None:
    """End our group stop and detach, without the program receiving the SIGCONT that ends it.

    We are the tracer; the task is in an event stop with its own registers and mask back. While traced, the
    SIGCONT waits in the queue for us: we take it at its signal-delivery stop and detach suppressing it, so a
    SIGCONT handler does not run for our stop. A blocked SIGCONT cannot be taken that way: it stays pending, so
    it is taken away by an injected rt_sigtimedwait, and the SIGCONTs the program had pending before our
    SIGSTOP discarded them (`held`, dump/sigcont.py) are queued back (`threads`: its other threads, still
    seized, for those on their own queues). Should we die in between, the kernel delivers it: the state is
    back by then. `watchdog`: the dump's, alive; the calls that need injection after our stop has ended are left
    to it (Watchdog.resume), with `threads` let go first into our stop.
    """
    if mask & sigcont.CONT_BIT:
        if watchdog is not None and watchdog.alive:
            for tid in threads or []:
                with contextlib.suppress(NoSuchTask):  # exited, or let go already (a second try)
                    ptrace.detach(tid)  # else raise: a thread still ours could not be reached by the watchdog
            ptrace.detach(pid)  # its state is back: in our group stop, as after a death of the dump
            watchdog.resume()
            return
        ip = syscall_ip or _vdso_syscall(pid)
        if ip:
            sigcont.put_back(pid, ip, held or {}, threads or [])  # ends the group stop
        else:  # pragma: no cover - no vdso: ours stays pending
            os.kill(pid, signal.SIGCONT)
        ptrace.detach(pid)
        return
    os.kill(pid, signal.SIGCONT)
    deliver = 0
    for _ in range(64):
        ptrace.cont(pid, deliver)
        try:
            s = ptrace.wait(pid, timeout=2.0)
        except NoSuchTask:
            return
        except LazarusError:  # pragma: no cover - it runs on (its state is back): just let go of it
            with contextlib.suppress(LazarusError):
                ptrace.detach(pid)
            return
        if s.exited or s.signaled:
            return
        deliver = 0
        if s.stopped and not s.event and not s.syscall_stop:
            if s.stop_sig == signal.SIGCONT:
                ptrace.detach(pid, 0)
                return
            deliver = s.stop_sig  # another signal came first: deliver it as the kernel would
    ptrace.detach(pid)  # pragma: no cover - a signal storm: give up being quiet


def _vdso_syscall(pid: int) -> int:
    """A `syscall` instruction in the task's vdso, or 0."""
    with contextlib.suppress(LazarusError, OSError):
        for v in procfs.read_maps(pid):
            if v.path == "[vdso]":
                return find_syscall_insn(pid, v.start, v.end) or 0
    return 0


def _wait_event_stop(pid: int) -> None:
    """Wait for the event stop a seize (or an interrupt) brings, with no SIGSTOP left pending in the task.

    A SIGSTOP is ours (the dump's stop, or the end of a batch of injected calls, lazarus/kernel/clone.py
    BATCH_STOP_CODE, sent by the task to itself and left pending when the dump died and the group stop came
    first) or has no effect the SIGCONT that ends our stop would not undo (that SIGCONT discards pending stop
    signals): it is taken away here, before any injected call would run into its signal-delivery stop."""
    for _ in range(64):
        s = ptrace.wait(pid)
        if s.exited or s.signaled:
            raise NoSuchTask(f"pid {pid} {s}", pid=pid)
        if s.stopped and s.event == abi.PTRACE_EVENT_STOP:
            if not _stop_pending(pid):
                return
            ptrace.cont(pid)  # into get_signal: the SIGSTOP's signal-delivery stop comes next
            continue
        # A signal stop. Only possible before any injection (after it every signal is blocked but SIGSTOP):
        # deliver the signal as the kernel would (a SIGSTOP: see above), and stop again before the program runs on.
        ptrace.interrupt(pid)
        ptrace.cont(pid, 0 if s.syscall_stop or s.event or s.stop_sig == signal.SIGSTOP else s.stop_sig)
    raise LazarusError(f"pid {pid}: no event stop after 64 signal stops", pid=pid)


def _watchdog_main(sock_fd: int, pid: int, start: int) -> int:
    ptrace.set_test_kill(0)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    sock.send(b"ready")
    if pid == 0:  # prepared ahead (Watchdog.prepare): the first message names the target, or none ever comes
        try:
            first = json.loads(sock.recv(_MAX_MSG) or b"null")
            pid, start = int(first["pid"]), int(first["start"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
    st = JournalState(pid, start)
    while True:
        try:
            data = sock.recv(_MAX_MSG)
        except InterruptedError:  # pragma: no cover
            continue
        except OSError:
            data = b""
        if not data:
            break
        with contextlib.suppress(ValueError, KeyError, TypeError):
            st.apply(json.loads(data))
        if st.released:
            return 0
        if st.resume:
            break
    try:
        what = repair(st)
    except LazarusError as e:
        what = f"repair failed: {e}"
    if st.resume:
        with contextlib.suppress(OSError):
            sock.send(f"resumed:{what}".encode())
        return 0
    with contextlib.suppress(OSError):
        sys.stderr.write(f"lazarus: watchdog: the dump of pid {pid} died; pid {pid}: {what}\n")
        sys.stderr.flush()
    return 0


__all__ = ["JournalState", "ThreadJournal", "Watchdog", "continue_quietly", "repair"]
