"""The lazy page server: one event loop serving the userfaultfds of lazily restored processes.

    loop:
      epoll(uffds + pidfds; timeout 0 while there is background work)
      for each ready uffd, read batch after batch until none is pending (bounded):
        FORK/REMAP/REMOVE/UNMAP of the batch applied first, in order   (a process waits in fork/mremap/madvise/
        then the batch's faults served: UFFDIO_COPY of the faulting      munmap until its event is read: read
          page, then -- if the fault is near the last one -- the         them promptly)
          pending pages of its aligned window of `fault_batch` pages;
          UFFDIO_ZEROPAGE where the image holds nothing
        (reading again right after serving finds a sequential faulter's next fault already queued: no epoll)
      pidfd readable: that process exited
      only if nothing was ready: one background step (>= `chunk_size` bytes, continuing after the last fault;
        with two CPUs, a second chunk at once on the CopyHelper thread, both collected before anything else)
      a process with nothing pending any more: close its uffd (the kernel takes over), report it complete;
        the last process served by a page source done: close the source (its verifier stops, its shared
        mapping of the page file is released: pagefiles.py)

Per fault, before the copy that wakes the thread, only: the window lookup and the source's address (its chunk
checked ahead by the verifier process, not hashed here). Every copy is reported to the source (served()), which
drops the pages from its mapping every few MiB: the server's RSS does not grow with what it serves.

Outcomes of a fill (kernel/uffd.Outcome) and what is done about them:
    PARTIAL  keep the bytes done, copy the rest again: the kernel reports a prefix with EAGAIN whether it
             stopped at a present page or at a layout change (mmap_changing), so the next copy tells which
    EXISTS   the page is there (a race with the process, or a fork child sharing it): treat it as done
    RETRY    the layout is changing: an event is queued; read events, then retry (faults are deferred)
    NOENT    no registered vma across the range: split it; a single page without a vma is dropped
    GONE     the process exited (or exec'd): drop it
    EFAULT / EIO from the page file, a checksum mismatch (PageSourceLost): kill the process and report it,
             never let it run on zeros (see guard.py for when the server itself dies)

Fork children. The FORK event puts a new uffd in OUR fd table; the child's pending set is a copy of the parent's
at that moment (the kernel blocks copies into the parent between duplicating its page tables and our reading the
event: mmap_changing, so both agree on what is present). The child's pid is not in the event. The parent is
still inside fork() when the event is read and links the child into /proc/PARENT/task/*/children right after,
so the server learns it by looking there for a child it has not attributed yet (FIFO per parent, bounded
wait); with UFFD_FEATURE_THREAD_ID a fault in the child gives its tid directly, which settles any ambiguity (two
threads of one parent forking at once). Until then the child is served anonymously, keyed by its uffd.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from time import monotonic_ns, perf_counter_ns

from lazarus.errors import KernelError, LazarusError, NoSuchTask, PageSourceLost
from lazarus.kernel import abi, procfs
from lazarus.kernel.pidfd import PidFd, pidfd_info
from lazarus.kernel.uffd import (
    CopyHelper,
    Fork,
    Outcome,
    PageFault,
    Remap,
    Remove,
    TaskDone,
    Uffd,
    Unmap,
)
from lazarus.kernel.vm import process_madvise
from lazarus.lazy.anchor import (
    NOT_STOPPED,
    detach_when_stopped,
    install_anchor,
    remove_anchor,
    unregister_all,
)
from lazarus.lazy.guard import Guard
from lazarus.lazy.pagefiles import MappedPageFiles
from lazarus.lazy.ranges import PAGE_SIZE, PendingPages, Run
from lazarus.logs import getLogger
from lazarus.records import field, record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from pathlib import Path

    from lazarus.lazy.sources import PageSource

log = getLogger("lazarus.lazy")

_MASK = PAGE_SIZE - 1
FORK_RESOLVE_TIMEOUT = 2.0
RECENT_FAULT_NS = 50_000_000  # background transfer follows the last fault for 50 ms
ANCHOR_LATER_TIMEOUT = 30.0  # how long a complete process may stay traced by its restore before we try anyway


def _traced(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1]) != 0
    except (OSError, ValueError):
        pass
    return False

ProgressCallback = Callable[[int, int], None]
_NONE: tuple[str, None] = ("", None)


@record
class _Proc:
    key: int                      # the uffd fd number: stable while served
    uffd: Uffd
    source: PageSource
    pending: PendingPages
    pid: int | None
    pidfd: PidFd | None = None
    parent_pid: int | None = None
    total_pages: int = 0
    cursor: int = 0
    started: float = 0.0
    ended: float | None = None
    state: str = "serving"       # serving | complete | exited | gone | lost
    reason: str = ""
    faults: int = 0
    fault_tids: set[int] = field(default_factory=set)  # the threads that faulted (with UFFD_FEATURE_THREAD_ID)
    pages_fault: int = 0
    pages_background: int = 0
    zero_pages: int = 0
    dropped_pages: int = 0        # removed/unmapped before being filled
    copies_cut: int = 0           # copies the kernel stopped after a prefix (PARTIAL): the rest copied again
    deferred: list[tuple[PageFault, int]] = field(default_factory=list)
    fork_time: float | None = None
    last_fault_ns: int = 0
    last_fault: int = -1  # page address of the last fault served
    seen_children: set[int] = field(default_factory=set)
    unresolved: deque = field(default_factory=deque)   # fork children (_Proc) still without a pid
    task_fd: int | None = None   # the anchor's fd number in the task (anchor.py), inherited by fork children
    anchor: int = -1              # our fd of the open file the task holds there: what kcmp compares with
    anchor_result: str = ""
    anchor_since: float = 0.0  # when its anchor removal was put off (see LazyServer._anchor_later)

    @property
    def label(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else f"uffd {self.key} (fork child of pid {self.parent_pid})"


def _still_child_of(pidfd: PidFd, parent: _Proc) -> bool:
    """False only when sure that `pidfd` is not a child of `parent`: its parent, read through the pidfd, is
    another process while `parent` (held by its own pidfd) still runs. Without that certainty: True."""
    if parent.pidfd is None or parent.pid is None:
        return True
    try:
        ppid = pidfd_info(pidfd.fd).ppid
    except NoSuchTask:
        return False
    except (LazarusError, OSError):
        return True
    return ppid == parent.pid or parent.pidfd.exited()


class LazyServer:
    """Serve the page faults of lazily restored processes from their page sources, and push the rest in the
    background. One thread, one loop; never touches the served memory itself (KERNEL-NOTES pitfall 1).

    Parameters:
        background: also transfer pages nobody asked for yet (otherwise only faults are served, and a process
            completes only when it has touched every page).
        stats_path: write the stats JSON there when run() returns.
        progress: called as progress(bytes_done, bytes_total) at most every 0.1 s and at the end.
        guard: a Guard (guard.py) to hand every served uffd to; strongly advised outside tests.
        fault_batch: pages filled per fault near the previous one: the aligned window of this many pages
            around it (power of two; 1 = just the page). A scattered fault gets its page alone.
        chunk_size: bytes per background step (per thread with two CPUs).
    """

    def __init__(self, background: bool = True, stats_path: str | Path | None = None,
                 progress: ProgressCallback | None = None, *, guard: Guard | None = None, fault_batch: int = 16,
                 chunk_size: int = 2 << 20) -> None:
        if fault_batch < 1 or fault_batch & (fault_batch - 1):
            raise ValueError("fault_batch must be a power of two")
        self.background = background
        self.stats_path = os.fspath(stats_path) if stats_path else None
        self.progress = progress
        self.guard = guard
        self.fault_batch = fault_batch
        self._span = fault_batch * PAGE_SIZE  # a fault this near the last one gets the window around it
        self._span2 = 2 * self._span
        self.chunk_size = max(PAGE_SIZE, chunk_size & ~_MASK)
        self._ep = select.epoll()
        self._fds: dict[int, tuple[str, _Proc]] = {}   # fd -> ("uffd" | "pidfd", process)
        self._ext: dict[int, Callable[[], None]] = {}  # fd -> callback (sockets of lazy/handoff.py)
        # While it returns True the loop runs even with no process to serve (a server awaiting restores).
        self.keep_alive: Callable[[], bool] | None = None
        self._procs: dict[int, _Proc] = {}
        self._done: list[_Proc] = []
        # Sources are closed when the last process they serve is done (a fork child shares its parent's): a
        # long-lived server does not keep a verifier process or a page file mapped for restores long over.
        self._source_users: dict[int, int] = {}
        self.page_files = MappedPageFiles()  # for callers building sources: one mapping per page file
        self._latencies: list[int] = []
        self._bg_bytes = 0
        self._bg_ns = 0
        self._helper_bytes = 0  # of _bg_bytes, filled by the helper thread's copies
        self._collapsed_bytes = 0  # given back as huge pages once their process was complete
        self._t0: float | None = None
        self._t_end: float | None = None
        self._rr: deque[int] = deque()
        self._last_progress = 0.0
        self._total_bytes = 0
        self._done_bytes = 0
        self._our_ns = os.stat("/proc/self/ns/pid").st_ino
        self._skipped = False
        self._waiting_parents: dict[int, _Proc] = {}
        self._ndeferred = 0
        self._last_faulted: _Proc | None = None
        # hold_background(): until then (monotonic seconds) no background step; 0 when not held
        self._bg_hold = 0.0
        self._bg_hold_fd = -1
        self._on_release: Callable[[], None] | None = None
        # A second thread copying alongside the loop's own background copies (two CPUs fill twice as fast).
        # Started at the first background step, not here: a restore served from this process, and the guard
        # and verifier processes forked before that, then see no thread of ours.
        self._helper: CopyHelper | None = None
        self._use_helper = background and CopyHelper.worthwhile()
        # Fork children to give their own anchor (anchor.install_anchor) once their pid is known; the one being
        # given it now (its completion meanwhile waits until that is over), and those that completed then.
        self._anchor_todo: deque[int] = deque()
        self._anchoring: int | None = None
        self._complete_later: set[int] = set()
        self._seized: list[int] = []  # tasks that did not stop for an anchor operation: detached once they do
        # Complete processes whose restore still traces them (a tree is let go all at once, after every
        # handoff): their anchor is removed from the loop once they are free, never waited for in it.
        self._anchor_later: list[_Proc] = []
        self._start_later: list[PageSource] = []  # sources whose start() waits for the loop (add_process)

    # -- setup ---------------------------------------------------------------------------------------------

    def add_process(self, pid: int | None, uffd: Uffd, source: PageSource, *, pidfd: PidFd | None = None,
                    start_later: bool = False) -> None:
        """Serve `uffd` of process `pid` from `source`; both are owned by the server from now on (closed by it:
        the uffd when the process is complete, the source at close()). One source may serve several processes.
        `pidfd`, owned from now on too, is the process's when the caller checked it (lazy/trust.py); without
        it one is opened on `pid`, which must then be a child of ours (a number nobody else can reuse).
        `start_later`: the source's start (the fork of a verify-ahead process for a large page file, ~2-5 ms)
        waits for the loop (run()), so that a restore lets its process run first; what is faulted before is
        checked inline.

        Raises:
            NoSuchTask if pid is given and already gone.
        """
        if pidfd is None and pid is not None:
            pidfd = PidFd.open(pid)
        if hasattr(source, "start"):
            if start_later:
                self._start_later.append(source)
            else:
                source.start(self.background)
        p = _Proc(key=uffd.fd, uffd=uffd, source=source, pending=source.pending(), pid=pid, pidfd=pidfd)
        if uffd.task_fd is not None:
            # the process holds its own copy at that fd (anchor.py): taken out of it once it is complete
            p.task_fd, p.anchor = uffd.task_fd, os.dup(uffd.fd)
        if pid is not None:
            with contextlib.suppress(LazarusError, OSError):
                p.seen_children = set(_children(pid))
        self._register(p)
        if self.guard is not None:
            self.guard.add(p.key, uffd.fd, pid=pid, pidfd=pidfd.fd if pidfd else None)

    def _start_sources(self) -> None:
        while self._start_later:
            source = self._start_later.pop(0)
            if id(source) in self._source_users:  # not closed meanwhile
                source.start(self.background)

    def _register(self, p: _Proc) -> None:
        self._source_users[id(p.source)] = self._source_users.get(id(p.source), 0) + 1
        p.total_pages = p.pending.pages
        p.started = time.monotonic()
        self._total_bytes += p.total_pages * PAGE_SIZE
        self._procs[p.key] = p
        self._rr.append(p.key)
        self._watch(p.uffd.fd, "uffd", p)
        if p.pidfd is not None:
            self._watch(p.pidfd.fd, "pidfd", p)
        log.debug("%s: serving %d pages", p.label, p.total_pages)

    def add_watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` from the loop whenever `fd` is readable (a listening socket, a connection)."""
        self._ext[fd] = callback
        self._ep.register(fd, select.EPOLLIN)

    def hold_background(self, seconds: float, until_readable: int = -1,
                        on_release: Callable[[], None] | None = None) -> None:
        """Hold the background copy for up to `seconds`, or until `until_readable` is readable (the connection
        of the client that asked for this restore, which it closes once it has read the answer); faults are
        served as ever meanwhile. On two CPUs the copy would otherwise take one the moment the answer is sent,
        beside the restored process, and the client waits for a CPU to read it (measured through the service at
        2 GiB: 1-5 ms between the worker's answer and the client's). `on_release` is called when the hold ends
        (from the loop)."""
        self._bg_hold = time.monotonic() + seconds
        self._on_release = on_release
        if until_readable >= 0:
            self._bg_hold_fd = until_readable
            self.add_watch(until_readable, self._release_background)

    def _release_background(self) -> None:
        self._bg_hold = 0.0
        if self._bg_hold_fd >= 0:
            self.remove_watch(self._bg_hold_fd)
            self._bg_hold_fd = -1
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()

    def _held(self) -> float:
        """Seconds the background copy is still held (0: not held; the hold is released once it expires)."""
        left = self._bg_hold - time.monotonic()
        if left > 0:
            return left
        self._release_background()
        return 0.0

    def remove_watch(self, fd: int) -> None:
        if self._ext.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def _watch(self, fd: int, kind: str, p: _Proc) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._fds[fd] = (kind, p)

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> dict:
        """Serve until no process is left (each one complete, exited, or killed for a lost page source).

        Returns:
            the stats (see stats()).
        Raises:
            TimeoutError after `timeout` seconds with processes still served (they stay served; close()).
        """
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        deadline = None if timeout is None else now + timeout
        for p in list(self._procs.values()):
            if not p.pending:
                self._finish(p, "complete")
        procs = self._procs
        while procs or (self.keep_alive is not None and self.keep_alive()):
            if self._start_later:
                self._start_sources()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"lazy server: {len(procs)} process(es) still served after {timeout}s")
            if self._ndeferred:
                wait: float = 0.001
            elif self.background and self._bg_possible():
                wait = self._held() if self._bg_hold else 0
            elif self._waiting_parents:
                wait = 0.005
            else:
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready = self._ep.poll(wait)
            if ready:
                exited: list[_Proc] = []
                for fd, _mask in ready:
                    ext = self._ext.get(fd)
                    if ext is not None:
                        ext()
                        continue
                    kind, p = self._fds.get(fd, _NONE)
                    if p is None or p.key not in procs:
                        continue
                    if kind == "uffd":
                        self._drain(p)
                    else:
                        exited.append(p)
                if self._ndeferred:
                    self._retry_deferred()
                for p in exited:
                    if p.key in procs:
                        self._finish(p, "exited")
            elif self._ndeferred:
                self._retry_deferred()
            elif self.background and not (self._bg_hold and self._held()):
                self._background_step()
            else:
                self._check_idle()
            if self._waiting_parents:
                self._resolve_forks()
            if self._anchor_todo:
                self._anchor_children()
            if self._seized:
                self._seized = [pid for pid in self._seized if not detach_when_stopped(pid)]
            if self._anchor_later:
                self._anchor_later = [p for p in self._anchor_later if not self._remove_anchor_later(p)]
            if self.progress is not None:
                self._report_progress()
        self._t_end = time.monotonic()
        # for the record: children that completed before their parent came out of fork() (bounded)
        give_up = time.monotonic() + 0.2
        while self._waiting_parents and time.monotonic() < give_up:
            self._resolve_forks()
            if self._waiting_parents:
                time.sleep(0.002)
        self._report_progress(final=True)
        stats = self.stats()
        if self.stats_path is not None:
            self.write_stats(self.stats_path)
        return stats

    def _drain(self, p: _Proc) -> None:
        """Read and handle p's messages until none is pending (bounded, for fairness between processes).

        Each read batch is handled in order: FORK/REMAP/REMOVE/UNMAP first, then that batch's faults. Reading
        again right after serving pays off: a process that faults page after page has its next fault queued
        by the time the bookkeeping of the last one is done, which saves a trip through epoll.
        """
        procs = self._procs
        read = p.uffd.read_events
        serve = self._serve_fault
        for _ in range(64):
            events = read()
            if not events:
                return
            t = perf_counter_ns()
            if len(events) == 1 and type(events[0]) is PageFault:  # the usual batch: one fault
                serve(p, events[0], t)
                if p.key not in procs:
                    return
                continue
            faults = None
            for ev in events:
                if type(ev) is PageFault:
                    if faults is None:
                        faults = [ev]
                    else:
                        faults.append(ev)
                elif isinstance(ev, Remove | Unmap):
                    p.dropped_pages += p.pending.remove(ev.start, ev.end)
                elif isinstance(ev, Remap):
                    moved = p.pending.remap(ev.from_, ev.to, ev.len)
                    log.debug("%s: mremap %#x -> %#x (%d bytes): %d pending pages moved",
                              p.label, ev.from_, ev.to, ev.len, moved)
                elif isinstance(ev, Fork):
                    self._on_fork(p, ev)
                elif isinstance(ev, TaskDone):
                    self._finish(p, "gone")
                    return
            if faults is not None:
                for ev in faults:
                    serve(p, ev, t)
            if p.key not in procs:
                return

    def _retry_deferred(self) -> None:
        for p in list(self._procs.values()):
            if p.deferred:
                items, p.deferred = p.deferred, []
                self._ndeferred -= len(items)
                for ev, t in items:
                    self._serve_fault(p, ev, t)

    def _bg_possible(self) -> bool:
        return any(p.pending for p in self._procs.values())

    # -- faults --------------------------------------------------------------------------------------------

    def _serve_fault(self, p: _Proc, ev: PageFault, t_read: int) -> None:
        if p.key not in self._procs:
            return
        addr = ev.address & ~_MASK
        tid = ev.tid
        if tid and p.pid is None:
            self._pid_from_tid(p, tid)
        # The window around a fault pays off when faults come near each other (a sequential reader); for a
        # scattered one it only delays the thread, which on a shared CPU runs once we block again: then the
        # page alone (the background transfer brings the rest).
        last = p.last_fault
        p.last_fault = addr
        d = addr - last
        near = last < 0 or -self._span <= d <= self._span2
        w = p.pending.window(addr, self.fault_batch if near else 1)
        if w is not None and w[1] == 1:
            # Fast path, the scattered fault: one page, one copy (which wakes the thread), then the books. Every
            # step before the copy is on the faulting thread's critical path: keep them few.
            fidx = w[2]
            try:
                n, out = p.uffd.copy(addr, p.source.address(fidx, 1), PAGE_SIZE)
            except PageSourceLost as e:
                self._lose(p, str(e))
                return
            except KernelError as e:
                self._lose(p, self._copy_failure(p, e))
                return
            if out is Outcome.DONE:
                self._latencies.append(perf_counter_ns() - t_read)
                p.pending.take(addr, PAGE_SIZE)
                p.source.served(fidx, 1)
                self._done_bytes += PAGE_SIZE
                p.pages_fault += 1
            else:
                if not self._fault_filled(p, self._fill(p, addr, 1, fidx, first=(n, out)), ev, t_read, addr):
                    return
                self._latencies.append(perf_counter_ns() - t_read)
            self._fault_served(p, addr, tid)
            return
        if w is None:
            n, out = p.uffd.zeropage(addr, PAGE_SIZE)
            if out is Outcome.DONE:
                p.zero_pages += 1
            elif out is Outcome.RETRY:
                self._defer(p, ev, t_read)
                return
            elif out is Outcome.GONE:
                self._finish(p, "gone")
                return
            else:  # EXISTS: already there; NOENT: unmapped meanwhile. Either way let the thread retry.
                p.uffd.wake(addr, PAGE_SIZE)
        else:
            start, npages, fidx = w
            # The faulting page alone first: its copy wakes the thread, which then runs while we fill the rest
            # of the window (a 64 KiB copy before the wake-up costs the thread 20-30 us more, and far more when
            # the VM must first get the memory back from its host).
            k = (addr - start) // PAGE_SIZE
            first = (addr, 1, fidx + k) if npages > 1 and 0 <= k < npages else (start, npages, fidx)
            if not self._fault_filled(p, self._fill(p, *first), ev, t_read, addr):
                return
            if first[1] != npages:
                self._latencies.append(time.perf_counter_ns() - t_read)
                t_read = 0  # recorded: the thread is running
                # What is left of the window; a RETRY here just leaves those pages pending.
                if k and p.key in self._procs:
                    self._fill(p, start, k, fidx)
                if npages - k - 1 and p.key in self._procs:
                    self._fill(p, addr + PAGE_SIZE, npages - k - 1, fidx + k + 1)
        if t_read:
            self._latencies.append(time.perf_counter_ns() - t_read)
        self._fault_served(p, addr, ev.tid)

    def _defer(self, p: _Proc, ev: PageFault, t_read: int) -> None:
        """The fault could not be served now (UFFDIO_COPY said EAGAIN: the mm is changing): serve it later."""
        p.deferred.append((ev, t_read))
        self._ndeferred += 1

    def _fault_filled(self, p: _Proc, res: Outcome, ev: PageFault, t_read: int, addr: int) -> bool:
        """After filling the faulting page: whether it is in and its thread runs. A RETRY defers the fault; a
        process gone or lost is already handled (False either way)."""
        if res is Outcome.RETRY:
            self._defer(p, ev, t_read)
            return False
        if res is not Outcome.DONE:
            return False
        if self._skipped:  # the faulting page may have been found present: make sure the thread runs
            p.uffd.wake(addr, PAGE_SIZE)
        return True

    def _fault_served(self, p: _Proc, addr: int, tid: int) -> None:
        """The books after a fault is served: counts, where the next background steps start, completion."""
        p.faults += 1
        if tid:
            p.fault_tids.add(tid)
        p.cursor = addr
        p.last_fault_ns = monotonic_ns()
        self._last_faulted = p
        if not p.pending and p.key in self._procs:
            self._finish(p, "complete")

    def _fill(self, p: _Proc, start: int, npages: int, fidx: int, *, background: bool = False,
              first: tuple[int, Outcome] | None = None) -> Outcome:
        """Copy pending run [start, +npages) from file page fidx (or account for the copy of it already made,
        whose result is `first`). Returns DONE (whatever could be filled was), RETRY (nothing more done: read
        events first), GONE or the process was lost (p no longer served)."""
        self._skipped = False
        # fast path: one copy does it all (the usual case, kept short: it is on every fault's critical path)
        length = npages * PAGE_SIZE
        if first is None:
            first = self._copy_run(p, start, npages, fidx)
            if first is None:
                return Outcome.GONE
        n, out = first
        if out is Outcome.DONE:
            p.pending.take(start, length)
            p.source.served(fidx, npages)
            self._done_bytes += length
            if background:
                p.pages_background += npages
            else:
                p.pages_fault += npages
            return out
        return self._fill_slow(p, start, npages, fidx, n, out, background)

    def _copy_run(self, p: _Proc, start: int, npages: int, fidx: int) -> tuple[int, Outcome] | None:
        """One UFFDIO_COPY of the run from p's source: (bytes, outcome), or None when that lost p (reported)."""
        try:
            return p.uffd.copy(start, p.source.address(fidx, npages), npages * PAGE_SIZE)
        except PageSourceLost as e:
            self._lose(p, str(e))
        except KernelError as e:
            self._lose(p, self._copy_failure(p, e))
        return None

    def _fill_slow(self, p: _Proc, start: int, npages: int, fidx: int, n: int, out: Outcome,
                   background: bool) -> Outcome:
        """The rest of _fill after a first copy that did not do everything (n bytes, outcome out)."""
        stack = [(start, npages, fidx)]
        first: tuple[int, Outcome] | None = (n, out)
        while stack:
            start, npages, fidx = stack.pop()
            while npages > 0:
                if first is None:
                    first = self._copy_run(p, start, npages, fidx)
                    if first is None:
                        return Outcome.GONE
                (n, out), first = first, None
                if n:
                    p.pending.take(start, n)
                    pages = n // PAGE_SIZE
                    p.source.served(fidx, pages)
                    self._done_bytes += n
                    if background:
                        p.pages_background += pages
                    else:
                        p.pages_fault += pages
                if out is Outcome.DONE:
                    break
                if out is Outcome.PARTIAL:
                    p.copies_cut += 1
                    # A prefix is in; why the copy stopped is unknown (a present page or a layout change alike):
                    # the rest is copied again, never taken as present on this alone (a page taken so would be
                    # left missing, and read as zeros once the process is complete and unregistered).
                    start += n
                    npages -= n // PAGE_SIZE
                    fidx += n // PAGE_SIZE
                    continue
                if out is Outcome.EXISTS:
                    # skip the page found present (the process or a sibling has it)
                    p.pending.take(start, PAGE_SIZE)
                    self._skipped = True
                    start += PAGE_SIZE
                    npages -= 1
                    fidx += 1
                    continue
                if out is Outcome.RETRY:
                    return Outcome.RETRY
                if out is Outcome.GONE:
                    self._finish(p, "gone")
                    return Outcome.GONE
                # NOENT: the range is not one registered vma (any more)
                if npages == 1:
                    p.dropped_pages += p.pending.take(start, PAGE_SIZE)
                    log.debug("%s: page %#x has no registered vma: dropped", p.label, start)
                    break
                half = npages // 2
                stack.append((start + half * PAGE_SIZE, npages - half, fidx + half))
                npages = half
        return Outcome.DONE

    # -- background ----------------------------------------------------------------------------------------

    def _background_step(self) -> None:
        """Fill at least chunk_size bytes (or 1 ms worth of small runs) of one process: the one that faulted
        last if that was recent (its cursor sits right after the fault: read-ahead), else round robin."""
        p = self._last_faulted
        if p is None or not p.pending or p.key not in self._procs \
                or time.monotonic_ns() - p.last_fault_ns > RECENT_FAULT_NS:
            p = None
            for _ in range(len(self._rr)):
                q = self._procs.get(self._rr[0])
                if q is None:
                    self._rr.popleft()
                    continue
                self._rr.rotate(-1)
                if q.pending:
                    p = q
                    break
            if p is None:
                return
        t0 = time.perf_counter_ns()
        budget = self.chunk_size
        prefetch = getattr(p.source, "prefetch", None)
        while budget > 0 and p.key in self._procs:
            c = p.pending.next_chunk(p.cursor, budget)
            if c is None:
                break
            start, npages, fidx = c
            if prefetch is not None:
                # let the source get the following chunk ready (verify it) while this one is copied
                nxt = p.pending.next_chunk(start + npages * PAGE_SIZE, self.chunk_size)
                if nxt is not None and nxt[0] != start:
                    prefetch(nxt[2], nxt[1])
            before = self._done_bytes
            end = start + npages * PAGE_SIZE
            if self._use_helper and self._helper is None:
                self._helper = CopyHelper()
            second = self._second_chunk(p, c) if self._helper is not None else None
            if second is None:
                res = self._fill(p, start, npages, fidx, background=True)
            else:
                res = self._fill_two(p, c, second)
                if second[0] > start:  # (not when it wrapped around to lower pages)
                    end = second[0] + second[1] * PAGE_SIZE
                budget -= second[1] * PAGE_SIZE
            budget -= max(npages * PAGE_SIZE, 1)
            self._bg_bytes += self._done_bytes - before
            if res is not Outcome.DONE:
                break
            p.cursor = end
            if time.perf_counter_ns() - t0 > 1_000_000:
                break
        self._bg_ns += time.perf_counter_ns() - t0
        if p.key in self._procs and not p.pending:
            self._finish(p, "complete")

    def _second_chunk(self, p: _Proc, first: Run) -> Run | None:
        """The chunk to copy on the helper thread alongside `first`: the pending pages after it, never
        overlapping it (next_chunk wraps around to the lowest pending page)."""
        start, npages, _ = first
        c = p.pending.next_chunk(start + npages * PAGE_SIZE, self.chunk_size)
        if c is None or c[0] == start:
            return None
        if c[0] < start:
            limit = (start - c[0]) // PAGE_SIZE
            if limit < c[1]:
                c = (c[0], limit, c[2])
        return c

    def _fill_two(self, p: _Proc, first: Run, second: Run) -> Outcome:
        """Copy two pending chunks at once, `second` on the helper thread. Both copies are collected before
        either result is acted on: acting may close p's uffd, which the helper must not be using then."""
        helper = self._helper
        assert helper is not None
        try:
            src2 = p.source.address(second[2], second[1])
        except PageSourceLost as e:
            self._lose(p, str(e))
            return Outcome.GONE
        helper.start(p.uffd, second[0], src2, second[1] * PAGE_SIZE)
        r1: tuple[int, Outcome] | KernelError | PageSourceLost
        r2: tuple[int, Outcome] | KernelError
        try:
            # the first chunk is checked (source.address) while the helper already copies the second
            r1 = p.uffd.copy(first[0], p.source.address(first[2], first[1]), first[1] * PAGE_SIZE)
        except (KernelError, PageSourceLost) as e:
            r1 = e
        finally:
            try:
                r2 = helper.result()
            except KernelError as e:
                r2 = e
        res = Outcome.DONE
        if not isinstance(r2, KernelError):
            self._helper_bytes += r2[0]
        if isinstance(r1, PageSourceLost):
            self._lose(p, str(r1))
            return Outcome.GONE
        for (start, npages, fidx), r in ((first, r1), (second, r2)):
            if isinstance(r, KernelError):
                self._lose(p, self._copy_failure(p, r))
                return Outcome.GONE
            if p.key not in self._procs:
                return Outcome.GONE
            out = self._fill(p, start, npages, fidx, background=True, first=r)
            if out is Outcome.GONE:
                return out
            if out is not Outcome.DONE:
                res = out
        return res

    def _check_idle(self) -> None:
        """Without background transfer, a process whose pid is unknown can exit unnoticed: probe such ones by
        filling one page they need anyway (ESRCH then tells they are gone)."""
        for p in list(self._procs.values()):
            resolving = p.fork_time is not None and time.monotonic() - p.fork_time < FORK_RESOLVE_TIMEOUT
            if p.pidfd is None and p.pending and not (p.pid is None and resolving):
                c = p.pending.next_chunk(p.cursor, PAGE_SIZE)
                if c is not None:
                    self._fill(p, *c, background=True)

    # -- fork ----------------------------------------------------------------------------------------------

    def _on_fork(self, parent: _Proc, ev: Fork) -> None:
        try:
            uffd = Uffd.adopt(ev.ufd)
        except LazarusError as e:  # a child that died at once can leave an unusable fd (pitfall 14)
            log.debug("%s: fork child's uffd %d unusable: %s", parent.label, ev.ufd, e)
            with contextlib.suppress(OSError):
                os.close(ev.ufd)
            return
        child = _Proc(key=uffd.fd, uffd=uffd, source=parent.source, pending=parent.pending.copy(), pid=None,
                      parent_pid=parent.pid, cursor=parent.cursor, fork_time=time.monotonic())
        if parent.pid is not None and child.pending:
            # A MADV_WIPEONFORK range is empty in the child by definition, yet its uffd registration is
            # inherited: never fill it with the parent's pages. A DONTFORK range is absent in the child.
            # The parent waits in fork() until this event is read, so its mappings are the child's.
            with contextlib.suppress(LazarusError, OSError):
                for v in procfs.read_smaps(parent.pid):
                    if "wf" in v.vmflags or "dc" in v.vmflags:
                        child.pending.remove(v.start, v.end)
        self._register(child)
        if self.guard is not None:
            self.guard.add(child.key, uffd.fd, pid=None, parent=parent.key)
        if parent.anchor >= 0:
            # the child inherited the parent's anchor (its parent's uffd, at the same number)
            child.task_fd, child.anchor = parent.task_fd, os.dup(parent.anchor)
        if parent.pid is not None:
            if parent.unresolved:
                # a single-threaded parent is out of its previous fork: that child is linked by now
                self._resolve_parent(parent)
            parent.unresolved.append(child)
            self._waiting_parents[parent.key] = parent
            self._resolve_parent(parent)
        log.debug("%s: fork: child served on uffd %d with %d pending pages", parent.label, child.key,
                  child.pending.pages)
        if not child.pending and parent.key not in self._procs:
            self._finish(child, "complete")  # forked while its complete parent's anchor was being removed

    def _resolve_forks(self) -> None:
        for p in list(self._waiting_parents.values()):
            self._resolve_parent(p)
            if not p.unresolved:
                del self._waiting_parents[p.key]

    def _resolve_parent(self, parent: _Proc) -> None:
        if parent.pid is None:
            return
        try:
            kids = _children(parent.pid)
        except (LazarusError, OSError):
            kids = []
        known = self._known_pids()
        new = sorted(k for k in kids if k not in parent.seen_children and k not in known)
        while parent.unresolved and new:
            child = parent.unresolved.popleft()
            if child.pid is not None:
                continue
            pid = new.pop(0)
            parent.seen_children.add(pid)
            self._set_pid(child, pid, parent=parent)
        now = time.monotonic()
        while parent.unresolved and now - (parent.unresolved[0].fork_time or now) > FORK_RESOLVE_TIMEOUT:
            child = parent.unresolved.popleft()
            log.debug("%s: pid of fork child on uffd %d not found", parent.label, child.key)

    def _known_pids(self) -> set[int]:
        return {p.pid for p in (*self._procs.values(), *self._done) if p.pid is not None}

    def _set_pid(self, child: _Proc, pid: int, *, parent: _Proc | None = None) -> None:
        if child.key not in self._procs or child.state != "serving":
            child.pid = pid  # finished already (e.g. all its pages went in the background): for the record
            return
        try:
            pidfd = PidFd.open(pid)
        except NoSuchTask:
            pidfd = None
        if pidfd is not None and parent is not None and not _still_child_of(pidfd, parent):
            # The number came from the parent's list of children, and the parent still runs: a process behind
            # it that is not the parent's child means that child has exited and its number was reused.
            pidfd.close()
            pidfd = None
        child.pid = pid
        child.pidfd = pidfd
        if pidfd is not None:
            self._watch(pidfd.fd, "pidfd", child)
        if self.guard is not None:
            self.guard.set_pid(child.key, pid, pidfd.fd if pidfd else None)
        log.debug("uffd %d: fork child is pid %d", child.key, pid)
        if pidfd is None:
            self._finish(child, "exited")
        elif child.anchor >= 0:
            self._anchor_todo.append(child.key)

    def _anchor_children(self) -> None:
        """Give each fork child whose pid is now known an anchor of its own uffd in place of the one it
        inherited (its parent's), so that it too waits rather than reads zeros should every Lazarus process
        die. Done from the loop, never while serving a fault: the child may be waiting for one."""
        while self._anchor_todo:
            p = self._procs.get(self._anchor_todo.popleft())
            if p is None or p.pid is None or p.task_fd is None or p.anchor < 0:
                continue
            if p.parent_pid is not None and _shares_fds(p.parent_pid, p.pid):
                # clone(CLONE_FILES) without CLONE_VM: one fd table, so one anchor (the parent's) for both
                log.debug("%s: shares its parent's fd table: keeps its parent's anchor", p.label)
                continue
            self._anchoring = p.key

            def idle(p: _Proc = p) -> None:
                # the child stops for us only once the fault or event it waits for is served
                if p.key in self._procs:
                    self._drain(p)
                if self._ndeferred:
                    self._retry_deferred()
            try:
                res = install_anchor(p.pid, p.task_fd, p.anchor, p.uffd.fd, idle=idle)
            finally:
                self._anchoring = None
            if res.startswith(NOT_STOPPED):
                self._seized.append(p.pid)
            if p.key not in self._procs:
                continue
            if res == "installed":
                os.close(p.anchor)
                p.anchor = os.dup(p.uffd.fd)
                log.debug("%s: has its own anchor at fd %d", p.label, p.task_fd)
            elif res != "exited":
                log.warning("%s: fork child keeps its parent's userfaultfd anchor: %s (it is protected by the "
                            "guard only)", p.label, res)
            if p.key in self._complete_later:
                self._complete_later.discard(p.key)
                self._finish(p, "complete")

    def _pid_from_tid(self, p: _Proc, tid: int) -> None:
        """THREAD_ID: the faulting thread's id, in the child's pid namespace; usable when that is ours."""
        try:
            if p.parent_pid is None or os.stat(f"/proc/{p.parent_pid}/ns/pid").st_ino != self._our_ns:
                return
            with open(f"/proc/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        except (OSError, StopIteration, ValueError):
            return
        for q in self._waiting_parents.values():
            if p in q.unresolved:
                q.unresolved.remove(p)
                q.seen_children.add(tgid)
        self._set_pid(p, tgid)

    # -- endings -------------------------------------------------------------------------------------------

    def _finish(self, p: _Proc, state: str, reason: str = "") -> None:
        if p.key not in self._procs:
            return
        if state == "complete" and p.key == self._anchoring:
            self._complete_later.add(p.key)  # once its anchor is in place: then removed with the rest
            return
        del self._procs[p.key]
        p.state, p.reason, p.ended = state, reason, time.monotonic()
        self._ndeferred -= len(p.deferred)
        p.deferred = []
        self._unwatch(p.uffd.fd)
        if p.pidfd is not None:
            self._unwatch(p.pidfd.fd)
        if state == "complete":
            try:
                self._release(p)
            except (LazarusError, OSError) as e:  # never the end of serving the others
                log.warning("%s: complete, but releasing its userfaultfd failed: %s", p.label, e)
        if self.guard is not None and state != "lost":
            self.guard.complete(p.key)
        p.uffd.close()
        if p.anchor >= 0 and p not in self._anchor_later:
            with contextlib.suppress(OSError):
                os.close(p.anchor)
            p.anchor = -1
        if state == "complete" and p.pidfd is not None:
            self._collapse(p)
        if p.pidfd is not None:
            p.pidfd.close()
        self._done.append(p)
        users = self._source_users.pop(id(p.source), 1) - 1
        if users > 0:
            self._source_users[id(p.source)] = users
        else:
            self._close_source(p.source)
        if state == "complete":
            log.debug("%s: complete: %d pages (%d by fault, %d in background) in %.3fs", p.label,
                      p.total_pages, p.pages_fault, p.pages_background, p.ended - p.started)
        else:
            log.debug("%s: %s %s", p.label, state, reason)

    def _release(self, p: _Proc) -> None:
        """p has all its pages: make its uffd inert (unregister every range of it, so that no fault or event can
        wait on it whoever holds it), then take the anchor out of the task (anchor.py)."""
        if p.pid is None or p.pidfd is None or p.pidfd.exited():
            return
        unregister_all(p.uffd, p.pid)
        if p.task_fd is None or p.anchor < 0:
            return
        if _traced(p.pid):
            p.anchor_since = time.monotonic()
            self._anchor_later.append(p)
            return
        self._remove_anchor(p)

    def _remove_anchor_later(self, p: _Proc, *, wait: bool = False) -> bool:
        """Remove the anchor of a complete process once its restore has let it go; True when done with it."""
        if not wait and _traced(p.pid) and time.monotonic() - p.anchor_since < ANCHOR_LATER_TIMEOUT:
            return False
        try:
            self._remove_anchor(p, drain=False)  # its uffd is closed by now
        except (LazarusError, OSError) as e:
            log.warning("%s: complete, but removing its userfaultfd anchor failed: %s", p.label, e)
        with contextlib.suppress(OSError):
            os.close(p.anchor)
        p.anchor = -1
        return True

    def _remove_anchor(self, p: _Proc, *, drain: bool = True) -> None:
        assert p.pid is not None and p.task_fd is not None
        t0 = time.perf_counter()
        p.anchor_result = remove_anchor(p.pid, p.task_fd, p.anchor,
                                        idle=(lambda: self._drain_complete(p)) if drain else None)
        if p.anchor_result.startswith(NOT_STOPPED):
            self._seized.append(p.pid)
        if p.anchor_result in ("closed", "exited", "not ours"):
            log.debug("%s: ranges unregistered; anchor fd %d: %s (%.2f ms)", p.label, p.task_fd,
                      p.anchor_result, (time.perf_counter() - t0) * 1000)
        else:
            log.warning("%s: complete, but its userfaultfd anchor (fd %d) stays in it: %s (harmless: nothing is "
                        "registered on it any more)", p.label, p.task_fd, p.anchor_result)

    def _drain_complete(self, p: _Proc) -> None:
        """Read what a complete process's uffd still delivers while its anchor is being removed: a fork (the
        child is served like any other) or a fault queued before its ranges were unregistered."""
        for ev in p.uffd.read_events():
            if isinstance(ev, Fork):
                self._on_fork(p, ev)
            elif isinstance(ev, PageFault):
                with contextlib.suppress(LazarusError):
                    p.uffd.wake(ev.address & ~_MASK, PAGE_SIZE)

    def _collapse(self, p: _Proc) -> None:
        """Give a complete process its huge pages back (UFFDIO_COPY installed 4 KiB ones); a range the kernel
        declines stays correct in small pages."""
        huge = getattr(p.source, "huge", ())
        if not huge or p.pidfd is None:
            return
        with contextlib.suppress(LazarusError, OSError):
            refused = process_madvise(p.pidfd.fd, huge, abi.MADV_COLLAPSE, pid=p.pid)
            self._collapsed_bytes += sum(n for _, n in huge) - sum(n for _, n in refused)
            if refused:
                log.debug("%s: %d of %d huge ranges stay in 4 KiB pages", p.label, len(refused), len(huge))

    @staticmethod
    def _close_source(src: PageSource) -> None:
        try:
            src.close()
        except Exception as e:  # noqa: BLE001 - never the end of serving the others
            log.debug("%s: closing the page source failed: %s", src.name, e)

    @staticmethod
    def _copy_failure(p: _Proc, e: KernelError) -> str:
        """Why a UFFDIO_COPY from p's source failed. An unreadable source (EFAULT, EIO) is asked first: a page
        file cut short under a chunk verified before shows only as EFAULT here, and the cause must not depend on
        whether its size was looked at since (images/reader.py checks it at most every 2 ms)."""
        why = getattr(p.source, "why_unreadable", None)
        if e.errno in (errno.EFAULT, errno.EIO) and why is not None:
            with contextlib.suppress(Exception):
                cause = why()
                if cause:
                    return cause
        return f"{p.source.name}: UFFDIO_COPY failed: {e}"

    def _lose(self, p: _Proc, reason: str) -> None:
        """The page source failed for p: kill it (and wait, bounded, for it to be gone) before its uffd is
        closed, so that it never runs on zeros; report it."""
        log.error("pid %s killed: its page source was lost (%s)", p.pid if p.pid is not None else "?", reason)
        if self.guard is not None:
            self.guard.lost(p.key, reason)
        if p.pidfd is not None:
            with contextlib.suppress(LazarusError, OSError):
                p.pidfd.send_signal(signal.SIGKILL)
            p.pidfd.wait(5.0)
        # Without a pidfd the process had already exited when its pid was learnt: nothing to kill, and a
        # kill by number could hit whoever has that number now.
        self._finish(p, "lost", reason)

    def close(self) -> None:
        """Stop serving. Processes still incomplete are killed (they cannot go on without their pages); the
        guard, if any, is told we are done."""
        if self._bg_hold:
            self._release_background()
        for p in list(self._procs.values()):
            if p.pending:
                self._lose(p, "the lazy server stopped before the restore completed")
            else:
                self._finish(p, "complete")
        for p in self._anchor_later:
            self._remove_anchor_later(p, wait=True)
        self._anchor_later = []
        deadline = time.monotonic() + 1.0
        while self._seized and time.monotonic() < deadline:
            self._seized = [pid for pid in self._seized if not detach_when_stopped(pid)]
            time.sleep(0.01)
        self._ep.close()
        if self._helper is not None:
            self._helper.close()
            self._helper = None
        for src in {id(p.source): p.source for p in self._done}.values():
            self._close_source(src)  # (closed already when their last process was done: closing is idempotent)
        if self.guard is not None:
            self.guard.close()

    def __enter__(self) -> LazyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reporting -----------------------------------------------------------------------------------------

    @property
    def processes(self) -> list[dict]:
        """Every process served so far (current and finished), as dicts."""
        out = []
        for p in self._done + list(self._procs.values()):
            out.append({
                "key": p.key, "pid": p.pid, "parent_pid": p.parent_pid, "state": p.state, "reason": p.reason,
                "pages_total": p.total_pages, "pages_fault": p.pages_fault,
                "pages_background": p.pages_background, "zero_pages": p.zero_pages,
                "dropped_pages": p.dropped_pages, "copies_cut": p.copies_cut, "faults": p.faults,
                "fault_threads": len(p.fault_tids),
                "seconds": None if p.ended is None else round(p.ended - p.started, 6),
            })
        return out

    def stats(self) -> dict:
        lat = sorted(self._latencies)

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(q * (len(lat) - 1) + 0.5))] / 1000, 2)

        procs = self.processes
        end = self._t_end if self._t_end is not None else time.monotonic()
        return {
            "processes": procs,
            "faults": sum(p["faults"] for p in procs),
            "pages_fault": sum(p["pages_fault"] for p in procs),
            "pages_background": sum(p["pages_background"] for p in procs),
            "zero_pages": sum(p["zero_pages"] for p in procs),
            "copies_cut": sum(p["copies_cut"] for p in procs),
            "fault_latency_us": {"median": pct(0.5), "p99": pct(0.99), "max": pct(1.0),
                                 "mean": round(sum(lat) / len(lat) / 1000, 2) if lat else None},
            "time_to_complete_s": None if self._t0 is None else round(end - self._t0, 6),
            "background_bytes": self._bg_bytes,
            "background_seconds": round(self._bg_ns / 1e9, 6),
            "background_rate_gbps": round(self._bg_bytes / self._bg_ns, 3) if self._bg_ns else None,
            "background_helper_bytes": self._helper_bytes,
            "huge_collapsed_bytes": self._collapsed_bytes,
            "lost": [{"pid": p["pid"], "reason": p["reason"]} for p in procs if p["state"] == "lost"],
        }

    @property
    def fault_latencies_ns(self) -> list[int]:
        return list(self._latencies)

    def write_stats(self, path: str | Path) -> None:
        """Write stats() as JSON (atomically: temp file + rename)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.stats(), indent=2) + "\n")
        os.replace(tmp, path)

    def _report_progress(self, final: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if final or now - self._last_progress >= 0.1:
            self._last_progress = now
            try:
                self.progress(self._done_bytes, self._total_bytes)
            except Exception:  # a display problem must never stop the server
                log.debug("progress callback failed", exc_info=True)


def _shares_fds(a: int, b: int) -> bool:
    from lazarus.kernel.syscall import same_fd_table
    try:
        return same_fd_table(a, b)
    except (LazarusError, OSError):
        return False


def _children(pid: int) -> list[int]:
    """Children of every thread of pid (from /proc/PID/task/TID/children)."""
    out: list[int] = []
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError:
        raise NoSuchTask(f"no such process {pid}", pid=pid) from None
    for tid in tids:
        try:
            with open(f"{base}/{tid}/children", "rb") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


__all__ = ["LazyServer", "ProgressCallback"]
