"""Dump: for the root and each descendant (dump/tree.py): watchdog -> seize -> SIGSTOP; then per process: read
state -> pages; images (DIR.tmp, verified, renamed) -> kill or resume them all. The group stop and each
process's watchdog keep the originals safe should the dump itself die (watchdog.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from lazarus.dump import cow, sharefds, sigcont
from lazarus.dump.core import Reads, dump_registers, dump_thread, queue_misc, queue_signals, queue_xcomp_perm
from lazarus.dump.files import dump_cwd, dump_files
from lazarus.dump.membership import check_namespaces, check_session, dump_cgroups
from lazarus.dump.memory import MemoryDumper
from lazarus.dump.sched import sched_state
from lazarus.dump.shared import (
    refuse_shared,
    refuse_table_outside,
    shared_memory,
    sysv_attaches,
    table_holders,
)
from lazarus.dump.tree import (
    Frozen,
    check_tree,
    node_of,
    precheck_child,
    refuse_shared_mm,
    refuse_zombie_leader,
)
from lazarus.dump.watchdog import Watchdog, continue_quietly, repair
from lazarus.errors import DumpError, KernelError, LazarusError, NoSuchTask, Unsupported
from lazarus.images import ImageWriter
from lazarus.images.format import COW_FILE, SHMEM_VERSION
from lazarus.images.tree import Node
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.syscall import start_writeback
from lazarus.kernel.xstate import parse_xstate
from lazarus.logs import getLogger
from lazarus.records import record
from lazarus.remote import RemoteTask, find_syscall_insn, restart_after_freeze

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

log = getLogger(__name__)


@record
class DumpResult:
    pid: int
    directory: Path
    pages: int
    seconds: float
    left_running: bool
    processes: int = 1  # in the tree, zombies included


def precheck(pid: int) -> procfs.Status:
    """Refuse what cannot be dumped, before touching the process."""
    if pid <= 0:
        raise NoSuchTask(f"invalid pid {pid}", pid=pid)
    if pid == os.getpid():
        raise DumpError(f"pid {pid} is lazarus itself")
    if not os.path.exists(f"/proc/{pid}"):
        raise NoSuchTask(f"no such process {pid}", pid=pid)
    if procfs.is_kernel_thread(pid):
        raise Unsupported(f"pid {pid} is a kernel thread")
    status = procfs.read_status(pid)
    if status.tgid != pid:
        raise Unsupported(f"pid {pid} is a thread of process {status.tgid}; dump the process")
    if status.state.startswith("Z"):
        raise DumpError(f"pid {pid} is a zombie")
    if status.tracer_pid:
        raise DumpError(f"pid {pid} is already traced by pid {status.tracer_pid}")
    if status.state.startswith("T") or status.state.startswith("t"):
        raise Unsupported(f"pid {pid} is stopped ({status.state}); continue it before dumping")
    check_resources(pid, status)
    check_namespaces(pid)
    return status


def check_resources(pid: int, status: procfs.Status) -> None:
    if status.seccomp:
        raise Unsupported(f"pid {pid} runs under seccomp (mode {status.seccomp}), which is not supported")


_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def freeze(pid: int, watchdog: Watchdog, threads: list[int], *, stopped: bool = False,
           held: sigcont.Held | None = None) -> None:
    """Seize every thread and put the process in a group stop (SIGSTOP) that outlives us (see watchdog.py).

    `threads` receives the ids of the other threads as they are seized (the caller lets go of them on failure).
    Threads may start and end while we attach: those seen before the SIGSTOP are seized first; once every
    seized thread reports the group stop, the list is read again, and threads that appeared meanwhile (stopped
    by the group stop all the same, untraced) are seized and waited for, until a look finds none new. With the
    whole group stopped nobody can clone, so the last look is the final set.

    `stopped`: the process is in a job-control stop already; seizing makes each thread report it, and a
    SIGSTOP of ours would only wait in its queue and come out at the first injected call.

    `held` receives the blocked SIGCONTs pending before our SIGSTOP, which discards them (dump/sigcont.py).
    """
    try:
        ptrace.seize(pid, abi.PTRACE_O_TRACESYSGOOD)
    except KernelError as e:
        if e.errno == errno.EPERM:
            raise DumpError(f"cannot trace pid {pid}: {e.strerror} (already traced?)", pid=pid) from e
        raise
    _seize_new_threads(pid, threads)
    watchdog.stopping()
    if not stopped:
        got, trapped = sigcont.hold(pid, threads)
        if got:
            watchdog.held_cont(got)
            if held is not None:
                held.update(got)
        os.kill(pid, signal.SIGSTOP)
        for tid in trapped:  # in our event stop since hold(): on into the group stop
            ptrace.cont(tid)
    waiting = [pid, *threads]
    while waiting:
        for tid in _wait_group_stop(pid, waiting):
            threads.remove(tid)  # it exited before the stop: it is simply not part of the process any more
        waiting = _seize_new_threads(pid, threads)


def _seize_new_threads(pid: int, threads: list[int]) -> list[int]:
    """Seize the threads of `pid` not yet in `threads`; returns those newly seized."""
    new = []
    for tid in procfs.tasks(pid):
        if tid == pid or tid in threads:
            continue
        try:
            ptrace.seize(tid, abi.PTRACE_O_TRACESYSGOOD)
        except NoSuchTask:
            continue  # it exited meanwhile
        except KernelError as e:
            if e.errno == errno.EPERM and _exiting(pid, tid):
                continue  # the kernel refuses to attach to a thread that is exiting: it is no part of the image
            if e.errno == errno.EPERM:
                raise DumpError(f"cannot trace thread {tid} of pid {pid}: {e.strerror}", pid=pid) from e
            raise
        threads.append(tid)
        new.append(tid)
    return new


def _exiting(pid: int, tid: int) -> bool:
    try:
        return procfs.read_stat(pid, tid).state in ("Z", "X")
    except (LazarusError, OSError):
        return True


_STOP_TIMEOUT = 10.0


def _wait_group_stop(pid: int, tids: list[int]) -> list[int]:
    """Wait until every thread of `tids` reports the group stop; returns those that exited first (the leader
    exiting is an error). All at once: whichever thread dequeues our SIGSTOP reports it to us (a tracee's
    signal-delivery stop) before the group stop can begin, so waiting for one thread alone could wait forever."""
    waiting = set(tids)
    gone = []
    deadline = time.monotonic() + _STOP_TIMEOUT
    while waiting:
        progress = False
        for tid in sorted(waiting):
            st = ptrace.try_wait(tid)
            if st is None:
                continue
            progress = True
            if st.exited or st.signaled:
                if tid == pid:
                    raise NoSuchTask(f"pid {pid} exited during the dump ({st})", pid=pid)
                waiting.discard(tid)
                gone.append(tid)
            elif st.stopped and st.event == abi.PTRACE_EVENT_STOP:
                if st.stop_sig in _STOP_SIGNALS:
                    waiting.discard(tid)
                else:
                    ptrace.cont(tid)
            elif st.stopped:
                # A signal, our SIGSTOP among them: deliver it as the kernel would have (swallowing it would
                # change the process); the SIGSTOP then starts the group stop, reported as an event stop.
                ptrace.cont(tid, st.stop_sig)
        if not progress:
            if time.monotonic() > deadline:
                raise DumpError(f"pid {pid}: threads {sorted(waiting)} did not stop within {_STOP_TIMEOUT:.0f} s",
                                pid=pid)
            time.sleep(0.0005)
    return gone


def _vdso_range(vmas: list[procfs.Vma]) -> tuple[int, int] | None:
    for v in vmas:
        if v.path == "[vdso]":
            return v.start, v.end
    return None


def check_image_dir(directory: Path) -> None:
    """DIR must not exist, or be an empty directory (CRIU users create it first); the image replaces it."""
    if os.path.islink(directory) or (os.path.lexists(directory) and not os.path.isdir(directory)):
        raise DumpError(f"{directory}: already exists", path=str(directory))
    if os.path.isdir(directory):
        try:
            empty = not os.listdir(directory)
        except OSError as e:
            raise DumpError(f"{directory}: cannot read: {e.strerror}", path=str(directory)) from e
        if not empty:
            raise DumpError(f"{directory}: already exists and is not empty", path=str(directory))


def dump(pid: int, directory: Path, *, leave_running: bool = False, shell_job: bool = False,
         direct: bool = False, sync: bool = True, watchdog: Watchdog | None = None,
         wait_gone: bool = True) -> DumpResult:
    """Dump process `pid` and every descendant into `directory`. The originals are killed only once the image
    is complete and verified; on any failure each is resumed exactly as it was (stopped ones stay stopped).
    direct: write the page data with O_DIRECT (images/writer.py; faster for large processes here, but the
    image is then not in the page cache).
    sync: fsync the image before the originals are killed (or let go). False leaves the page data to the
    kernel's writeback, as CRIU does: faster, but a write error the disk reports later (or a crash before the
    writeback) loses the image after the original is gone (docs/CONTRACTS.md, "Durability of a dump").
    watchdog: one forked ahead (Watchdog.prepare()) for the root; the dump owns it from now on.
    wait_gone: wait until the killed originals have exited (default). False: return once they are sent SIGKILL,
    as CRIU does; they then exit while the caller goes on (their memory is freed in their own exit, ~40 ms
    at 512 MiB, ~160 ms at 2 GiB here). For a caller that exits at once (the CLI): exiting detaches them, and
    their parents reap them as ever; a restore of them waits while they exit (restore._wait_pid_free)."""
    t0 = time.monotonic()
    try:
        check_image_dir(directory)
        precheck(pid)
        root_wd = Watchdog.start(pid, watchdog)  # before any thread exists: it is forked (unless `watchdog` was)
    except BaseException:
        if watchdog is not None:
            watchdog.close()  # start() may have closed it already (found gone): closing again is harmless
        raise
    try:
        # Without sync the writeback is not started piece by piece either: nothing waits for it.
        writer = ImageWriter(directory, fsync=sync, writeback=start_writeback if sync else None, direct=direct)
    except BaseException:
        root_wd.release()
        raise
    frozen: dict[int, Frozen] = {}
    nodes: dict[int, Node] = {}
    masks: dict[int, int] = {}
    npages = 0
    try:
        try:
            _freeze_tree(pid, root_wd, frozen, nodes)
            root_stat = procfs.read_stat(pid)
            check_session(pid, root_stat, shell_job)
            for p in frozen:
                check_resources(p, procfs.read_status(p))
            check_tree(pid, nodes)
            refuse_table_outside(pid, set(nodes))
            found = refuse_shared(sorted(frozen))
            share = (sharefds.shared_pipes(found), set(frozen))
            memory = shared_memory(found)
            attaches = sysv_attaches(found)
            runs = cow.find(sorted(frozen), {p: n.ppid for p, n in nodes.items()})
            in_table = table_holders(found, {p: n.ppid for p, n in nodes.items()})  # CLONE_FILES
            inherited = cow.inherited_by_pid(runs)
            xstate = None
            tasks: dict[int, dict[str, Any]] = {}
            for p, fr in frozen.items():
                try:
                    task, n, masks[p] = _dump_task(p, fr, writer, shell_job, share, inherited.get(p, []),
                                                     memory, attaches, own_table=p not in in_table)
                except LazarusError as e:
                    if e.pid is None and len(frozen) > 1:
                        e.pid = p  # which process of the tree it is about: shown with the message
                    raise
                npages += n
                tasks[p] = task
                xstate = xstate if xstate is not None else task["core"]["xstate"]
            assert xstate is not None
            # Shared descriptions move out of the task files (stubs stay), which are written only then.
            shared = sharefds.store(found, tasks, writer.write_blob)
            if shared is not None:
                writer.write_json(sharefds.SHARED_JSON, shared)
            for p, task in tasks.items():
                writer.write_json(f"task-{p}.json", task)
            xcr0, xsize, _ = parse_xstate(bytes.fromhex(xstate))
            fields: dict[str, Any] = {
                "root_pid": pid, "tasks": sorted(frozen), "kernel_release": os.uname().release,
                "arch": os.uname().machine, "cpu": {"xcr0": xcr0, "xstate_size": xsize},
            }
            if memory:  # objects stored once: a reader of an older format would restore them empty
                writer.min_version = SHMEM_VERSION
            if runs:  # written before commit: an image with it is format COW_VERSION (images/format.py)
                writer.write_json(COW_FILE, cow.to_json(runs))
            if len(nodes) > 1:
                order = [pid, *sorted(p for p in nodes if p != pid)]
                fields["tree"] = [nodes[p].record() for p in order]
            writer.commit(fields)
        except FileNotFoundError as e:
            raise NoSuchTask(f"pid {pid} exited during the dump", pid=pid) from e
        except ProcessLookupError as e:
            raise NoSuchTask(f"pid {pid} exited during the dump", pid=pid) from e
    except BaseException as e:
        with contextlib.suppress(Exception):
            writer.abort()
        if not frozen:
            root_wd.release()  # nothing was seized
        for fr in frozen.values():
            _resume_after_failure(fr.pid, fr.watchdog, True, fr.threads, fr.was_stopped)
        if isinstance(e, NoSuchTask) or (isinstance(e, LazarusError) and not os.path.exists(f"/proc/{pid}")):
            gone = e.pid if isinstance(e, NoSuchTask) and e.pid else pid
            raise NoSuchTask(f"pid {gone} exited during the dump", pid=gone) from e
        raise

    if leave_running:
        for fr in frozen.values():
            try:
                if fr.was_stopped:
                    _let_go(fr.threads)
                    ptrace.detach(fr.pid)  # back into the job-control stop it was in
                else:
                    continue_quietly(fr.pid, masks[fr.pid], syscall_ip=fr.watchdog.state.syscall_ip, held=fr.held,
                                     threads=fr.threads, watchdog=fr.watchdog)
                    _let_go(fr.threads)
            except (LazarusError, OSError):
                # The image is complete: only letting the original go failed. Not an error of the dump.
                _resume_after_failure(fr.pid, fr.watchdog, True, fr.threads, fr.was_stopped)
    else:
        for fr in frozen.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(fr.pid, signal.SIGKILL)
        for fr in frozen.values() if wait_gone else ():
            # Traced threads must be reaped by us before the leader's exit is reported.
            for tid in [*fr.threads, fr.pid]:
                with contextlib.suppress(LazarusError):
                    while True:
                        st = ptrace.wait(tid, timeout=10)
                        if st.exited or st.signaled:
                            break
    for fr in frozen.values():
        fr.watchdog.release()
    return DumpResult(pid, directory, npages, time.monotonic() - t0, leave_running, len(nodes))


def _freeze_tree(root: int, root_wd: Watchdog, frozen: dict[int, Frozen], nodes: dict[int, Node]) -> None:
    """Freeze `root` and its descendants, each before its children are read (dump/tree.py). Fills `frozen`
    as it goes (the caller resumes those on failure) and `nodes` with every process, zombies included."""
    todo = [root]
    while todo:
        p = todo.pop(0)
        if p in nodes:
            continue
        if p == root:
            refuse_shared_mm(p, root=True)
            stat = procfs.read_stat(p)
            wd = root_wd
        else:
            try:
                stat = precheck_child(p)
            except NoSuchTask:
                continue  # exited and reaped meanwhile: no part of the tree
            if stat.state in ("Z", "X"):
                refuse_zombie_leader(p, nodes)
                nodes[p] = node_of(p, stat, "zombie")
                continue
            refuse_shared_mm(p, root=False)
            wd = Watchdog.start(p)
        was_stopped = p != root and stat.state == "T"
        fr = Frozen(p, wd, was_stopped)
        if was_stopped:
            wd.was_stopped()
        frozen[p] = fr
        try:
            freeze(p, wd, fr.threads, stopped=was_stopped, held=fr.held)
        except NoSuchTask:
            if p == root:
                raise
            del frozen[p]
            wd.release()
            with contextlib.suppress(LazarusError):
                st2 = procfs.read_stat(p)
                if st2.state in ("Z", "X"):
                    nodes[p] = node_of(p, st2, "zombie")
            continue
        stat = procfs.read_stat(p)  # frozen now: its ids cannot change any more
        nodes[p] = node_of(p, stat, "stopped" if was_stopped else "running")
        todo.extend(k for k in procfs.children(p) if k not in nodes)


def _dump_task(pid: int, fr: Frozen, writer: ImageWriter, shell_job: bool,
               share: tuple[set[tuple[int, int]], set[int]] | None = None,
               inherited: list[tuple[int, int]] | None = None,
               memory: dict[tuple[int, int], tuple[str, int]] | None = None,
               attaches: dict[int, int] | None = None, own_table: bool = True) -> tuple[dict[str, Any], int, int]:
    """Read one frozen process into task-PID.json and pages-PID.img; returns (task, pages, blocked mask).
    `inherited`: copy-on-write runs its parent gives it at restore (dump/cow.py), left out of its page file.
    `memory`: memory objects of the tree stored once (dump/shared.py shared_memory).
    `own_table` False: its fd table is another process's (CLONE_FILES), whose image holds it: no files here."""
    watchdog, threads = fr.watchdog, fr.threads
    remote: RemoteTask | None = None
    try:
        stat = procfs.read_stat(pid)
        vmas = procfs.read_smaps(pid)
        vdso = _vdso_range(vmas)
        exec_vmas = [(v.start, v.end) for v in vmas if v.prot & abi.PROT_EXEC and not v.shared]
        sys_ip = None
        for start, end in ([vdso] if vdso else []) + exec_vmas:
            sys_ip = find_syscall_insn(pid, start, end)
            if sys_ip:
                break
        if sys_ip is None:
            raise DumpError(f"pid {pid}: no syscall instruction found to inject through")
        core = dump_registers(pid)
        if not watchdog.check_alive():
            raise DumpError(f"pid {pid}: the dump's watchdog (pid {watchdog.pid}) is gone; nothing changed")
        # restart_after_freeze: for the original, should it resume
        remote = RemoteTask(pid, sys_ip, adjust=restart_after_freeze, journal=watchdog)
        may_batch = _may_batch(pid)
        if may_batch:
            # ~90 read-only calls in one stop instead of one each (the dump's fixed cost; docs/BENCHMARKS.md)
            remote.alloc_batch_scratch()
        reads = Reads(remote)
        xcomp = queue_xcomp_perm(reads)
        xcomp_guest = queue_xcomp_perm(reads, abi.ARCH_GET_XCOMP_GUEST_PERM)
        signals_done = queue_signals(reads)
        misc_done = queue_misc(reads, stat.flags)
        brk_call = reads.call(abi.SYS.brk, 0)
        reads.run()
        core["xcomp_perm"] = xcomp()
        core["xcomp_guest_perm"] = xcomp_guest()
        signals = signals_done()
        misc = misc_done()
        brk = reads.checked(brk_call, "brk")
        # The other threads, each through the leader's scratch (one address space) and journalled.
        thread_recs = [dump_thread(pid, tid, remote, watchdog.for_thread(tid)) for tid in sorted(threads)]
        remote.close()
        remote = None
        watchdog.clean()
        sigcont.into_image(fr.held, pid, signals, thread_recs)
    except BaseException:
        if remote is not None:
            with contextlib.suppress(Exception):
                remote.close()
                watchdog.clean()
        raise

    pages = writer.pages(pid)
    mem = MemoryDumper(pid, pages, writer.write_blob)
    mem.skip = inherited or []
    mem.shared = memory or {}
    mem.attaches = attaches or {}
    mem.inject = (sys_ip, watchdog, may_batch) if _SELF_WRITE else None
    if misc.get("rseq"):
        mem.volatile = [(misc["rseq"]["addr"], misc["rseq"]["size"])]
    try:
        vma_recs, objects = mem.dump(vmas)
    finally:
        mem.close()
    syscall_ip = sys_ip
    files = dump_files(pid, writer.write_blob, objects, lambda: RemoteTask(pid, syscall_ip, journal=watchdog),
                       shared=share) if own_table else []
    cwd_deleted = dump_cwd(pid)
    if cwd_deleted is not None:
        misc["cwd_deleted"] = cwd_deleted
    with open(f"/proc/{pid}/auxv", "rb") as f:
        auxv = f.read()
    exe = os.readlink(f"/proc/{pid}/exe")
    mm = {
        "start_code": stat.start_code, "end_code": stat.end_code, "start_data": stat.start_data,
        "end_data": stat.end_data, "start_brk": stat.start_brk, "brk": brk,
        "start_stack": stat.start_stack, "arg_start": stat.arg_start, "arg_end": stat.arg_end,
        "env_start": stat.env_start, "env_end": stat.env_end, "auxv": auxv.hex(), "exe": exe,
        "vmas": vma_recs, "objects": objects,
    }
    task: dict[str, Any] = {"pid": pid, "comm": misc["comm"], "core": core, "mm": mm,
                            "files": files, "signals": signals, "misc": misc,
                            "cgroups": dump_cgroups(pid), "shell_job": shell_job}
    task["sched"] = sched_state(pid, pid)
    for rec in thread_recs:
        rec["sched"] = sched_state(pid, rec["tid"])
    if thread_recs:
        task["threads"] = thread_recs
    return task, mem.total_pages, signals["blocked"]


_STOP = 1 << (abi.SIGSTOP - 1)
# Whether the task writes its own pages into the page file where it may (dump/selfwrite.py); off: the old copy.
_SELF_WRITE = True


def _may_batch(pid: int) -> bool:
    """Whether the dump may run its injected calls as one batch in task `pid`: the batch ends in a SIGSTOP the
    task sends itself and the tracer takes away (never a trap: see lazarus/kernel/clone.py BATCH_STOP_CODE), so
    a SIGSTOP someone else left pending would be taken for that end at the batch's first call."""
    st = procfs.read_status(pid)
    return not (st.sig_pnd | st.shd_pnd) & _STOP


def _let_go(threads: list[int]) -> None:
    """Detach the other threads (after the leader's SIGCONT they run on; before it they stay in the group
    stop). A thread that is not in a ptrace stop any more (it exited) is skipped."""
    for tid in threads:
        with contextlib.suppress(LazarusError, OSError):
            ptrace.detach(tid)


def _resume_after_failure(pid: int, watchdog: Watchdog, seized: bool, threads: list[int] | None = None,
                          was_stopped: bool = False) -> None:
    """After a failure we survived, let the original run on as it was before the error is reported: quietly if
    its state is back already, else by the watchdog's own repair run here. If that fails, the watchdog (not
    released) tries again once we have exited. A process that was stopped before the dump stays stopped."""
    st = watchdog.state
    threads = threads or []
    if seized and st.clean and st.mask is not None and not st.threads and st.target_fds is None:
        try:
            if was_stopped:
                _let_go(threads)
                ptrace.detach(pid)
            else:
                continue_quietly(pid, st.mask, syscall_ip=st.syscall_ip, held=st.held, threads=threads,
                                 watchdog=watchdog)
                _let_go(threads)
            watchdog.release()
            return
        except (LazarusError, OSError):
            pass
    if seized:
        _let_go(threads)  # into the group stop, with their state or the journal's for repair() to put back
        with contextlib.suppress(LazarusError, OSError):
            ptrace.detach(pid)  # into the group stop (T), if it began: repair() takes it from there
    try:
        what = repair(st)
    except (LazarusError, OSError) as e:
        what = f"cannot repair: {e}"
    log.debug("pid %d after the failed dump: %s", pid, what)
    if what.startswith("cannot"):
        log.warning("pid %d: %s; the dump's watchdog will try again once this process has exited", pid, what)
        return
    watchdog.release()
