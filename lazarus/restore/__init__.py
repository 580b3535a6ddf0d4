"""Restore: validate images -> create the task with its PID -> rebuild its address space by injected syscalls
-> pages (eager copy | lazy uffd) -> fds, signals, misc, creds -> registers -> detach, run.
A process tree: every task created first (restore/tree.py), then each rebuilt, then all let go together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable

from lazarus.errors import ImageError, KernelError, LazarusError, RestoreError
from lazarus.images import Image
from lazarus.images.format import COW_FILE, PAGES_PER_CHUNK, task_name
from lazarus.images.mm import is_lazy, lazy_object_ids, lazy_vmas, only, without
from lazarus.images.shared import SHARED_JSON, fs_parents
from lazarus.images.validate import validate_image
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.clone import Trampoline
from lazarus.kernel.xstate import machine_xstate as cpu_xstate
from lazarus.lazy.sources import ImagePageSource
from lazarus.logs import getLogger
from lazarus.records import field, record
from lazarus.remote import Batch, RemoteTask
from lazarus.restore import cgroups, private, seed
from lazarus.restore import core as rcore
from lazarus.restore.access import Access, precheck
from lazarus.restore.files import (
    FdRestorer,
    check_fd_fields,
    check_files,
    give_back,
    make_dir_like,
    remove_dirs,
)
from lazarus.restore.memory import (
    SpaceBuilder,
    clear_address_space,
    close_inherited_fds,
    move_vdso,
    reopen_records,
    trampoline_candidates,
)
from lazarus.restore.sched import apply_sched
from lazarus.restore.threads import check_threads, create_thread, restore_thread_creds, restore_thread_state
from lazarus.restore.timers import check_timers
from lazarus.restore.uffd import LAZY_FEATURES, copy_all, lazy_ranges, uffd_in_task

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from lazarus.restore.cow import CowPlan
    from lazarus.restore.pidns import NsInit
    from lazarus.restore.sharefds import FdTable, SharedFds
    from lazarus.restore.sharing import SharedMemory
    from lazarus.restore.tree import BackgroundChecks

    # Called with (pid, uffd, page source) once a lazily restored task is ready to run, before it runs.
    LazyHandoff = Callable[[int, Any, Any], None]

log = getLogger(__name__)
TRAMPOLINE_SIZE = 4 * abi.PAGE_SIZE
_NEG1 = (1 << 64) - 1


@record
class Restored:
    pid: int
    seconds: float  # from the start of the restore until the task runs
    pages_written: int
    lazy: Any = None  # handed to the lazy-pages server: uffd and what it must serve
    tasks: int = 1  # processes restored (a tree's root reports the whole tree, zombies included)
    timings: dict[str, float] = field(default_factory=dict)
    stops: int = 0  # times the new task was let run for one of our injections (a call or a batch of calls)
    calls: int = 0  # system calls injected
    init: Any = None  # restore --pidns: the namespace's init (restore/pidns.py NsInit), running
    ns_pid: int = 0  # restore --pidns: its pid inside its namespace (the image's pid)
    seeded: bool = False  # cloned from a seed made ahead (restore/seed.py), not from this process


def open_image(directory: str | Path, *, verify_pages: bool) -> Image:
    img = Image.open(directory)
    validate_image(img)
    for pid in img.tasks:
        task = img.task(pid)
        check_fd_fields(task_name(pid), task["files"], task["misc"])
        check_timers(task["signals"].get("timers", []), task_name(pid))
        rcore.check_proc_state(task["misc"], task_name(pid))
        check_threads(task, task_name(pid))
    xcr0, xsize = cpu_xstate()
    img.check_machine(os.uname().release, xcr0, xsize)
    for pid in img.tasks:
        if verify_pages:
            verify_pages_two_cpus(img, pid)
    return img


# Below this the fork costs more than the second CPU saves: at 64 MiB (load ~3 from other work), 15-27 ms for one
# CPU on a populated mapping against 27-34 ms for two.
PARALLEL_VERIFY_MIN = 128 << 20


def verify_pages_two_cpus(img: Image, pid: int) -> None:
    """Check every page chunk before anything is created, the upper half in a forked process on the other
    CPU (xxh3 holds the GIL, so a thread would not help). Raises ImageError naming the first bad chunk."""
    pf = img.page_file(pid)
    n = pf.nchunks
    if pf.size < PARALLEL_VERIFY_MIN:
        pf.populate()  # every page is read here and copied after: mapped in one call, not fault by fault
        img.verify_pages(pid)
        return
    half = n // 2
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the checking child; a failure is reported through the pipe
        code = 0
        try:
            os.close(r)
            pf.populate(half * PAGES_PER_CHUNK)
            bad = next((c for c in range(half, n) if not pf.chunk_matches(c)), -1)
            os.write(w, str(bad).encode())
        except BaseException:  # noqa: BLE001 - the parent then checks this half itself
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    pf.populate()  # the child's half too: the copy reads it from this mapping afterwards
    try:
        for chunk in range(half):
            pf.verify_chunk(chunk)
    finally:
        answer = b""
        while chunk_bytes := os.read(r, 64):
            answer += chunk_bytes
        os.close(r)
        _, status = os.waitpid(child, 0)
    if status != 0 or not answer:
        img.verify_pages(pid)  # the child could not tell: check its half here
        return
    bad = int(answer)
    if bad >= 0:
        pf.verify_chunk(bad)  # raises the ImageError naming the chunk
        raise ImageError(f"pages-{pid}.img: chunk {bad} does not match its checksum", path=str(img.path))


def validate(img: Image, pid: int, task: dict[str, Any], *, pidns: bool = False) -> None:
    """Everything checkable before creating anything. With `pidns` the pid and thread ids are those of a new
    PID namespace, free by construction: a pid in use out here is no conflict."""
    if not pidns:
        _wait_pid_free(pid)
    for v in task["mm"]["vmas"]:
        if v["kind"] != "file":
            continue
        path, want = v["path"], v["file"]
        try:
            st = os.stat(path)
        except OSError as e:
            raise RestoreError(f"mapped file {path} is gone: {e.strerror}", stage="validate", path=path) from e
        if ((st.st_ino, st.st_size, st.st_mtime_ns) != (want["ino"], want["size"], want["mtime_ns"])
                or st.st_ctime_ns != want.get("ctime_ns", st.st_ctime_ns)):
            raise RestoreError(f"mapped file {path} changed since the dump (inode, size, mtime or ctime differ)",
                               stage="validate", path=path)
    for rec in task.get("threads", []) if not pidns else []:
        _wait_pid_free(rec["tid"], label="thread id")
    for f in task["files"] if pidns else []:
        if f.get("handle"):
            # It is reopened through /proc/<restorer>/fd, which the namespace's own /proc does not show.
            raise RestoreError(f"fd {f['fd']} ({f.get('path')}): an unlinked file reopened through another link "
                               f"cannot be restored with --pidns yet", stage="validate", pid=pid)
    exe = task["mm"]["exe"]
    if not os.path.exists(exe):
        raise RestoreError(f"executable {exe} is gone", stage="validate", path=exe)
    cwd = task["misc"]["cwd"]
    if not task["misc"].get("cwd_deleted") and not os.path.isdir(cwd):
        raise RestoreError(f"working directory {cwd} is gone", stage="validate", path=cwd)
    check_files(task["files"])
    precheck(task)  # the files it will open, tried under its credentials (restore/access.py)


def _wait_pid_free(pid: int, what: str = "", label: str = "pid") -> None:
    deadline = time.monotonic() + 5.0
    while os.path.exists(f"/proc/{pid}"):
        # A just-killed original may still be exiting (`lazarus dump` returns once it is sent SIGKILL: freeing a
        # large memory takes a while), or a zombie until its parent reaps it.
        if not _is_going(pid) or time.monotonic() > deadline:
            raise RestoreError(f"{label} {pid}{f' ({what})' if what else ''} is already in use", stage="validate",
                               pid=pid)
        time.sleep(0.005)


_PF_EXITING = 0x4
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _is_going(pid: int) -> bool:
    """A zombie, a task in its exit, or one with SIGKILL pending (killed, not in its exit yet)."""
    try:
        st = procfs.read_stat(pid)
        if st.state in ("Z", "X") or st.flags & _PF_EXITING:
            return True
        return bool(procfs.read_status(pid).shd_pnd & _SIGKILL_BIT)
    except LazarusError:
        return True  # gone meanwhile: the loop sees it


def restore_task(img: Image, pid: int, *, lazy: bool = False, on_lazy: LazyHandoff | None = None,
                 pidns: bool = False) -> Restored:
    """Create task `pid` from the image and leave it running (detached). Kills it on any failure.
    `pidns`: in a new PID namespace under an init of ours (restore/pidns.py), with `pid` as its pid there."""
    t0 = time.monotonic()
    task = img.task(pid)
    validate(img, pid, task, pidns=pidns)
    t_valid = time.monotonic() - t0
    join_cgroups = cgroups.plan(task.get("cgroups"), pid)
    # A seed made ahead (restore/seed.py) spares the clone of this whole process and its teardown.
    warm = None if pidns else seed.take(task["mm"]["vmas"], TRAMPOLINE_SIZE)
    tramp = None if warm is not None else \
        Trampoline.map_at(trampoline_candidates(task["mm"]["vmas"], TRAMPOLINE_SIZE), TRAMPOLINE_SIZE)
    build = TaskBuild(img, pid, task, lazy=lazy, on_lazy=on_lazy, t0=t0)
    build.timings["validate"] = t_valid
    build.timings["trampoline"] = time.monotonic() - t0
    ns: NsInit | None = None
    try:
        if warm is not None:
            build.attach(warm.clone(pid), warm.where)
            build.seeded = True
        else:
            assert tramp is not None
            child, ns = create_root(tramp, pid, pidns=pidns, join_cgroups=join_cgroups)
            build.attach(child, (tramp.addr, tramp.syscall_ip, tramp.batch_ip))
        build.build(join_cgroups)
        build.hand_over()
        build.timings["handed"] = time.monotonic() - t0
        build.release()
        if ns is not None:
            # Stripping the init (a few ms of injected calls) waits until the root runs: until then it is a
            # stopped copy of us, sharing our pages.
            ns.finish(pid)
            ns.run()
        return build.result(ns)
    except BaseException as e:
        build.kill()
        build.reap()
        if ns is not None:
            ns.kill()  # and with it whatever else is in its namespace
        err = as_restore_error(e, pid)
        if err is e:
            raise
        raise err from e


def create_root(tramp: Trampoline, pid: int, *, pidns: bool = False,
                join_cgroups: Any = None) -> tuple[int, NsInit | None]:
    """The first task, cloned from the restorer by the trampoline with pid `pid`, seized and in an event stop;
    with `pidns` by the init of a new PID namespace (restore/pidns.py), so that it is the init's child, and
    with that init. The trampoline is unmapped here (the task keeps its copy)."""
    ns: NsInit | None = None
    try:
        if pidns:
            from lazarus.restore.pidns import NsInit
            ns = NsInit.start(tramp, TRAMPOLINE_SIZE, join_cgroups)
            return ns.clone_root(pid), ns
        child = tramp.clone_with_pid(pid)
    except KernelError as e:
        if ns is not None:
            ns.kill()
        if e.errno == errno.EEXIST:
            raise RestoreError(f"pid {pid} is already in use", stage="create", pid=pid) from e
        raise
    except BaseException:
        if ns is not None:
            ns.kill()
        raise
    finally:
        tramp.unmap()
    try:
        rcore.seize_new(child, "new task", stage="create", pid=pid)
    except BaseException:
        rcore.kill_quietly(child)
        with contextlib.suppress(OSError):
            os.waitpid(child, 0)  # our own child: reaped here
        raise
    return child, None


def as_restore_error(e: BaseException, pid: int) -> BaseException:
    if isinstance(e, RestoreError):
        return e
    if isinstance(e, LazarusError):
        return RestoreError(str(e), stage="restore", pid=pid)
    if isinstance(e, OSError):
        return RestoreError(f"{e.strerror or e}", stage="restore", pid=pid)
    return e


class TaskBuild:
    """One process being restored, in stages: attach() to a new blank task (a copy of the restorer or of its
    parent, with the trampoline page), build() everything up to its final registers, hand_over() its uffd to
    the lazy-pages server, release() to let it run; kill() and reap() on failure. A tree restore runs each
    stage for all its processes before the next (restore_tree, docs/TREES.md)."""

    def __init__(self, img: Image, pid: int, task: dict[str, Any], *, lazy: bool, on_lazy: LazyHandoff | None,
                 t0: float, stopped: bool = False, leader_done: bool = False) -> None:
        self.img, self.pid, self.task = img, pid, task
        self.lazy, self.on_lazy, self.t0 = lazy, on_lazy, t0
        self.stopped = stopped  # left in a job-control stop when released
        self.leader_done = leader_done  # session and group leadership already set (restore/tree.py)
        self.is_root = pid == img.root_pid
        self.child = 0
        self.remote: RemoteTask | None = None
        self.tramp_addr = 0
        self.fdr: FdRestorer | None = None
        self.timings: dict[str, float] = {}
        self.threads: list[RemoteTask] = []
        self.thread_recs = task.get("threads", [])
        self.written = 0
        self.handover: Any = None
        self.handover_sent = False
        self.source: Any = None
        self.page_file: Any = None
        self.stops = self.calls = 0
        self.shared: SharedFds | None = None  # descriptions shared with other tasks of the tree
        self.table: FdTable | None = None  # an fd table it shares with other processes (CLONE_FILES)
        self.cow: CowPlan | None = None  # copy-on-write runs it keeps from its parent or gives its children
        self.shmem: SharedMemory | None = None  # memory objects made once for the tree (restore/sharing.py)
        self.checks: BackgroundChecks | None = None  # a tree's checks that only read /proc (restore/tree.py)
        self.space: SpaceBuilder | None = None
        self._served: list[Any] = []
        self._ranges: list[Any] = []
        self._high_base = 0
        self._access: Access | None = None
        self.seeded = False

    def attach(self, child: int, tramp: tuple[int, int, int]) -> None:
        """Take the new task `child` (seized, in an event stop) with the trampoline at `tramp`: its address,
        syscall and batch entry points."""
        self.child = child
        addr, ip, batch_ip = tramp
        self.tramp_addr = addr
        remote = RemoteTask(child, ip, batch_ip=batch_ip)
        remote.keep_state()
        remote.use_scratch(addr + abi.PAGE_SIZE, TRAMPOLINE_SIZE - abi.PAGE_SIZE)
        self.remote = remote
        self.timings["create"] = time.monotonic() - self.t0

    def build(self, join_cgroups: Any) -> None:
        self.build_memory(join_cgroups)
        self.build_rest()

    def build_memory(self, join_cgroups: Any) -> None:
        """Its address space and pages (those a lazy restore serves left out): all a child forked from it
        inherits (restore/cow.py)."""
        img, pid, task, lazy, t0 = self.img, self.pid, self.task, self.lazy, self.t0
        remote, child, timings = self.remote, self.child, self.timings
        assert remote is not None
        mm = task["mm"]
        tramp_addr = self.tramp_addr
        cgroups.join(child, join_cgroups)
        # One batch: what the task inherited from the restorer (per-task state, fds, mappings) dropped, the vdso
        # moved.
        setup = remote.batch()
        rcore.reset_inherited(remote, setup)
        if not self.in_table:
            close_inherited_fds(remote, setup)  # not in a table made from its parent's: the parent's fds
        kept = self.cow.kept_vmas(mm["vmas"]) if self.cow else []
        specials = clear_address_space(remote, (tramp_addr, tramp_addr + TRAMPOLINE_SIZE), setup,
                                       also=[(v["start"], v["end"]) for v in kept])
        gaps = trampoline_candidates(mm["vmas"] + [{"start": tramp_addr, "end": tramp_addr + TRAMPOLINE_SIZE}],
                                     1 << 20)
        move_vdso(remote, specials, mm["vmas"], gaps[0], setup)
        # Before any mapping of the image exists: the kernel refuses a new exe_fd (EBUSY) while the old
        # executable is still mapped, and the image may map that very file (a Python restored by a Python).
        set_mm(remote, mm, setup, exe=not (self.cow and self.cow.same_exe))
        xcomp = rcore.queue_xcomp_reads(setup, task["core"])
        holes = self.cow.holes(kept) if self.cow and kept else []
        table = self.cow.table_area(setup, holes, gaps[0]) if self.cow and holes else None  # gaps[0]: vdso moved
        setup.run()
        timings["cleared"] = time.monotonic() - t0
        known = rcore.xcomp_known(setup, xcomp)
        rcore.prepare_xstate(remote, task["core"], known)
        rcore.restore_guest_perm(remote, task["core"], known)
        rcore.restore_rlimits(child, task["misc"]["rlimits"])
        fds = task["files"]
        high_base = self.table.base if self.table else max([f["fd"] for f in fds], default=2) + 1
        # Existing files (mapped, and the fds below) are opened as the restored credentials could open them.
        timings["xstate"] = time.monotonic() - t0
        access = Access(remote, child, task["misc"]["creds"])
        space = SpaceBuilder(remote, img, child, access)
        space.verify = lazy
        page_file = img.page_file(pid) if img.has_pages(pid) else None
        self.page_file = page_file
        lazy_ids = lazy_object_ids(mm, fds) if lazy else set()
        space.reopen = reopen_records(fds, img.json(SHARED_JSON) if SHARED_JSON in img.files else None, pid)
        space.create_objects(mm["objects"], high_base, page_file, lazy_ids, self.shmem)
        if kept:
            assert self.cow is not None
            area = setup.results[table.index] if table is not None else 0
            self.cow.drop(remote, holes, area if area > 0 else 0)  # before any page of its own is written
            space.kept = {v["start"] for v in kept}
        space.map_vmas(mm["vmas"])
        timings["map"] = time.monotonic() - t0
        written = 0
        served = lazy_vmas(mm, lazy_ids) if page_file is not None else []
        ranges = lazy_ranges(served if lazy else [v for v in mm["vmas"] if is_lazy(v)])
        if page_file is not None:
            # Private file pages go through /proc/pid/mem; anonymous memory through a uffd made inside
            # the task: filled now by large UFFDIO_COPYs (eager) or served on demand (lazy).
            written = space.write_pages(mm["vmas"], page_file, skip_lazy=True)
            if ranges and not lazy:
                by_uffd = mm["vmas"]
                if kept:  # a child: its own pages there are one per hole (restore/cow.py write_kept)
                    from lazarus.restore import cow
                    n, left = cow.write_kept(child, kept, page_file)
                    written += n
                    done = {id(v) for v in kept} - {id(v) for v in left}
                    by_uffd = [v for v in mm["vmas"] if id(v) not in done]
                uffd = uffd_in_task(remote, ranges, 0)
                try:
                    written += copy_all(uffd, by_uffd, page_file)
                finally:
                    uffd.close()
                # After the uffd is gone: collapse needs every pte of a 2 MiB range present, which it now is.
                # Not over pages kept shared with the parent: a collapse would copy them.
                from lazarus.restore.thp import collapse_in_task
                collapse_in_task(remote, [v for v in mm["vmas"] if v not in kept])
            elif lazy and self.cow:
                # The runs its children are to share: in before they are forked (userfaultfd cannot map one
                # page into two processes); the lazy server finds them present.
                from lazarus.restore import cow
                written += cow.write_owned(remote, space, only(mm["vmas"], self.cow.owned), page_file)
                served = without(served, self.cow.owned)
        space.finish_vmas(mm["vmas"], page_file)
        if self.checks is not None:  # a tree's: on another thread while the next task is built (tree.py)
            self.checks.submit(pid, space.check_vmflags, mm["vmas"])
        else:
            space.check_vmflags(mm["vmas"])
        timings["pages"] = time.monotonic() - t0
        self.space, self.page_file, self.written = space, page_file, written
        self._served, self._ranges, self._high_base = served, ranges, high_base
        self._access = access

    def build_rest(self) -> None:
        """Everything after the memory: fds, signals, threads, credentials, registers."""
        img, pid, task, lazy, t0 = self.img, self.pid, self.task, self.lazy, self.t0
        remote, child, timings, thread_recs = self.remote, self.child, self.timings, self.thread_recs
        assert remote is not None and self.space is not None
        mm, space, page_file, written = task["mm"], self.space, self.page_file, self.written
        served, ranges, high_base, tramp_addr = self._served, self._ranges, self._high_base, self.tramp_addr
        handover = None
        access, fds = self._access, task["files"]
        space.close_cached()
        self.fdr = fdr = FdRestorer(remote, img, child, space.state.object_fds, high_base, access)
        in_table = self.in_table  # its fds are the table's top's, restored there (no fd phase of its own)
        own, checked = self._shared_fds_first(fds) if not in_table else ([], [])
        fdr.restore(own)
        closes = remote.batch()
        for ofd in [*space.state.object_fds.values(), *space.state.reopened.values()]:
            if not closes.fits(1):
                closes.run()
            closes.call(abi.SYS.close, ofd)
        closes.run()
        if self.shared is not None and not in_table:
            self.shared.settle(pid, remote)
        fdr.finish(checked)
        timings["fds"] = time.monotonic() - t0
        if lazy and ranges:
            # The kernel writes the rseq area when it is registered: that page must be in before the
            # range is handed to userfaultfd, or the injected call would wait on a fault nobody serves.
            for rseq in [task["misc"].get("rseq")] + [rec.get("rseq") for rec in thread_recs]:
                if rseq:
                    written += space.write_range(mm["vmas"], page_file, rseq["addr"],
                                                 rseq["addr"] + rseq["size"])
        misc = task["misc"]
        if self.leader_done:
            misc = {**misc, "sid": None, "pgid": None}
        fresh = self.seeded  # cloned from a seed: its signal actions are all default (restore/seed.py)
        # A process of one thread whose signal state needs nothing after its batch (the common case): misc state,
        # signal actions, the uffd and the credentials all in one injection (two stops fewer).
        joined: Batch | None = None
        if misc.get("cwd_deleted"):
            rcore.restore_signals(remote, task["signals"], defaults_known=fresh)
            restore_misc_and_cwd(remote, misc)
        elif not thread_recs and rcore.signals_in_one_batch(task["signals"]):
            joined = remote.batch()
            rcore.restore_misc(remote, misc, joined)
            rcore.queue_signal_actions(joined, task["signals"], defaults_known=fresh)
        else:
            # One injection for both (the signal actions are set after the rest, as they do not depend on it).
            both = remote.batch()
            rcore.restore_misc(remote, misc, both)
            rcore.restore_signals(remote, task["signals"], both, defaults_known=fresh)
        timings["misc"] = time.monotonic() - t0
        # The other threads, once everything they share with the leader is back (they inherit its no_new_privs,
        # personality and timer slack at the clone) and while the leader may still choose their ids.
        for rec in thread_recs:
            thread = create_thread(remote, rec)
            self.threads.append(thread)
            restore_thread_state(thread, child, rec, task["core"])
        timings["threads"] = time.monotonic() - t0
        def creds(b: Batch) -> None:
            rcore.queue_all_creds(remote, task["misc"], b, is_root=self.is_root)
        creds_room = (16, 512 + 4 * len(task["misc"]["creds"]["groups"]))  # calls and bytes creds() queues at most

        if lazy and ranges:
            # In a shared fd table each member's anchor takes a number of its own.
            try:
                handover = uffd_in_task(remote, ranges, LAZY_FEATURES,
                                        taken=self.table.anchors if self.table else (), batch=joined,
                                        then=creds if joined is not None else None,
                                        then_room=creds_room)
            except KernelError as e:
                err = rcore.creds_error(joined, task["misc"], e) if joined is not None else e
                if err is e:
                    raise
                raise err from e
            if self.table is not None and handover.task_fd is not None:
                self.table.anchors.append(handover.task_fd)
            timings["uffd"] = time.monotonic() - t0
        elif joined is not None:
            if not joined.fits(*creds_room):
                joined.run()
            creds(joined)
            rcore.run_creds_batch(joined, task["misc"])
        if joined is None:
            for thread in self.threads:
                restore_thread_creds(thread, task["misc"])
            rcore.restore_all_creds(remote, task["misc"], is_root=self.is_root)
        timings["creds"] = time.monotonic() - t0
        for thread, rec in zip(self.threads, thread_recs, strict=True):
            rcore.set_final_state(thread, rec["core"], rec["blocked"])
            thread.close()
        # Last injected call: remove the trampoline. We stop at its syscall exit (pitfall 16).
        remote.syscall(abi.SYS.munmap, tramp_addr, TRAMPOLINE_SIZE)
        rcore.set_final_state(remote, task["core"], task["signals"]["blocked"])
        remote.close()
        timings["regs"] = time.monotonic() - t0
        self.stops = remote.stops + sum(t.stops for t in self.threads)
        self.calls = remote.calls + sum(t.calls for t in self.threads)
        self.written = written
        if handover is not None:
            self.handover = handover
            if getattr(self.on_lazy, "wants_source", True):  # a server of another process builds its own
                self.source = ImagePageSource(served, page_file, name=f"pages-{pid}.img")

    @property
    def in_table(self) -> bool:
        """It shares the fd table of an ancestor of the tree, which restores it (CLONE_FILES)."""
        return self.table is not None and self.table.top != self.pid

    def _shared_fds_first(self, fds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Descriptions shared with tasks built before this one are given now (restore/sharefds.py); returns
        the records this task restores itself, and every record to read back at the end."""
        assert self.fdr is not None and self.space is not None
        self.fdr.reopened = self.space.state.reopened  # fds opened on deleted files' objects (restore/memory.py)
        if self.shared is None:
            return fds, fds
        assert self.remote is not None
        own, give = self.shared.plan(self.pid, fds)
        self.shared.give(self.remote, give)
        mine = {r["fd"] for r in own}
        return own, own + [r for r in fds if r["fd"] not in mine]

    def hand_over(self, *, early: bool = False) -> None:
        """Give the uffd to the lazy-pages server. The server (and its guard) must hold it before the task
        runs: a task whose uffd is closed would fault in zeros instead of its data. `early`: only send it where
        the callback can (a server behind a socket), its answer read by settle_handover() before any runs."""
        if self.handover is not None and self.on_lazy is not None:
            send = getattr(self.on_lazy, "send", None) if early else None
            if send is not None:
                send(self.child, self.handover)
            else:
                self.on_lazy(self.child, self.handover, self.source)
            self.handover_sent = True

    def release(self) -> None:
        """Let it run (or, for a task stopped at the dump, go into its job-control stop)."""
        child, task = self.child, self.task
        # Scheduling state from outside, last: a SCHED_IDLE or low-affinity task must not slow our own calls.
        apply_sched(child, task.get("sched"))
        for thread, rec in zip(self.threads, self.thread_recs, strict=True):
            apply_sched(thread.pid, rec.get("sched"))
        if self.stopped:
            # Queued while we hold it: taken before its first instruction, it starts the group stop.
            os.kill(child, signal.SIGSTOP)
        for thread in self.threads:
            ptrace.detach(thread.pid)
        ptrace.detach(child)
        self.timings["running"] = time.monotonic() - self.t0
        if self.page_file is not None and not self.lazy:
            self.page_file.close()

    def result(self, ns: NsInit | None = None) -> Restored:
        return Restored(self.child, time.monotonic() - self.t0, self.written, timings={"start": self.t0, **self.timings},
                        lazy=(self.handover, self.source) if self.handover is not None else None,
                        stops=self.stops, calls=self.calls, init=ns, ns_pid=self.pid if ns is not None else 0,
                        seeded=self.seeded)

    def kill(self) -> None:
        if self.child:
            rcore.kill_quietly(self.child)

    def reap(self) -> None:
        """After kill(): wait for its threads and itself (traced by us: reaped by us), clean up files."""
        if self.child:
            for thread in self.threads:  # before the leader's exit is reported
                thread.close()
                with contextlib.suppress(LazarusError, OSError):
                    for _ in range(100):
                        if ptrace.wait(thread.pid, timeout=5).stopped is False:
                            break
            with contextlib.suppress(LazarusError, OSError):
                for _ in range(100):
                    s = ptrace.wait(self.child, timeout=5)
                    if s.exited or s.signaled:
                        break
        if self.fdr is not None:
            self.fdr.cleanup()


def restore_misc_and_cwd(remote: RemoteTask, misc: dict[str, Any]) -> None:
    """restore_misc, with a deleted working directory made again (empty, its mode and owner), entered, and
    removed, so that the task's cwd is a deleted directory again."""
    gone = misc.get("cwd_deleted")
    if not gone:
        rcore.restore_misc(remote, misc)
        return
    where, made = make_dir_like(gone["path"])
    try:
        rcore.restore_misc(remote, {**misc, "cwd": where})
    except BaseException:
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    remove_dirs(made)
    give_back(f"/proc/{remote.pid}/cwd", gone)


def set_mm(remote: RemoteTask, mm: dict[str, Any], batch: Batch | None = None, *, exe: bool = True) -> None:
    """PR_SET_MM_MAP: code/data/brk/stack/args/env boundaries, auxv and the executable link. batch: queued there
    (checked when it runs), else made now. exe=False: the executable link is left as it is (a child forked
    from its restored parent has it already, and may keep a mapping of it, which makes a new one EBUSY)."""
    auxv = bytes.fromhex(mm["auxv"])
    b = batch if batch is not None else remote.batch()
    auxv_addr = b.put(auxv)
    m = abi.prctl_mm_map(
        mm["start_code"], mm["end_code"], mm["start_data"], mm["end_data"], mm["start_brk"], mm["brk"],
        mm["start_stack"], mm["arg_start"], mm["arg_end"], mm["env_start"], mm["env_end"], auxv_addr,
        len(auxv), 0)
    if not exe:
        m.exe_fd = 0xFFFF_FFFF  # (u32)-1: the kernel leaves the link alone
    addr = b.put(bytes(m) + bytes(8))  # room for the 8-byte store of exe_fd, a 4-byte field
    if exe:
        exe_fd = b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring(mm["exe"]), abi.O_RDONLY | abi.O_CLOEXEC,
                        0, what=f"open {mm['exe']}")
        b.store(exe_fd, addr + abi.prctl_mm_map.exe_fd.offset)
    prctl = b.call(abi.SYS.prctl, abi.PR_SET_MM, abi.PR_SET_MM_MAP, addr, abi.sizeof(abi.prctl_mm_map), 0,
                   check=False)
    if exe:
        b.call(abi.SYS.close, exe_fd)

    def check(results: list[int]) -> None:
        if results[prctl.index] < 0:
            raise KernelError(f"prctl(PR_SET_MM_MAP) in task {remote.pid}", -results[prctl.index], pid=remote.pid)
    b.on_done(check)
    if batch is None:
        b.run()


def restore(directory: str | Path, *, lazy: bool = False, on_lazy: LazyHandoff | None = None,
            image: Image | None = None, pidns: bool = False) -> Restored:
    """Restore the process (or process tree) in `directory`. `image`: the same image already opened with
    open_image() (a caller that must know the image is sound before it starts helpers of its own, as a lazy
    restore's server). Returns the root's Restored. `pidns`: into a new PID namespace (restore/pidns.py); the
    root is then the child of the result's `init`, whose exit status (`init.wait()`) is the root's."""
    img = image if image is not None else open_image(directory, verify_pages=not lazy)
    private.sweep_stale()  # what restores killed half-way left (restore/private.py)
    try:
        if len(img.tree.nodes) > 1:
            return restore_tree(img, lazy=lazy, on_lazy=on_lazy, pidns=pidns)
        if len(img.tasks) != 1:
            raise RestoreError(f"image holds {len(img.tasks)} tasks but no tree (format version "
                               f"{img.inventory.get('version')})")
        return restore_task(img, img.tasks[0], lazy=lazy, on_lazy=on_lazy, pidns=pidns)
    finally:
        private.done()
        if not lazy:
            img.close()


def cow_plans(img: Image, tasks: dict[int, dict[str, Any]]) -> dict[int, CowPlan]:
    """Each task's part in the image's copy-on-write runs (cow.json, format 4); empty without any."""
    if COW_FILE not in img.files:
        return {}
    from lazarus.restore import cow
    parents = {p: n.ppid for p, n in img.tree.nodes.items()}
    return cow.plans(img.json(COW_FILE), parents, {p: t["mm"]["exe"] for p, t in tasks.items()})


def restore_tree(img: Image, *, lazy: bool = False, on_lazy: LazyHandoff | None = None,
                 pidns: bool = False) -> Restored:
    """Restore every process of the image's tree (restore/tree.py: order of creation, sessions, groups,
    zombies); none runs before all are ready, and on any failure every task made is killed. `pidns`: the whole
    tree in one new PID namespace, its root the child of our init there (its children take their pids in it)."""
    # Only a tree needs these (a single process's restore does not load them: start-up cost).
    from lazarus.restore.sharefds import SharedFds, check_made, check_shared_files, fd_tables
    from lazarus.restore.sharing import SharedMemory
    from lazarus.restore.tree import (
        BackgroundChecks,
        born_groups,
        create_child,
        join_group,
        lead,
        make_zombie,
    )
    t0 = time.monotonic()
    tree = img.tree
    live = tree.live()
    tasks = {pid: img.task(pid) for pid in live}
    for pid in live:
        validate(img, pid, tasks[pid], pidns=pidns)
    check_shared_files(img)
    for node in tree.nodes.values():
        if node.zombie and not pidns:
            _wait_pid_free(node.pid, "a zombie of the image")
    joins = {pid: cgroups.plan(tasks[pid].get("cgroups"), pid) for pid in live}
    # One trampoline address for all: each child is a copy of its parent and keeps its trampoline page,
    # which must therefore be free in every process's layout.
    every_vma = [v for pid in live for v in tasks[pid]["mm"]["vmas"]]
    tramp = Trampoline.map_at(trampoline_candidates(every_vma, TRAMPOLINE_SIZE), TRAMPOLINE_SIZE)
    where = (tramp.addr, tramp.syscall_ip, tramp.batch_ip)
    # With copy-on-write runs each process is built up to its memory before it forks its children, which keep
    # the pages they share with it (restore/cow.py); otherwise every child is made from its blank parent first.
    cow_of = cow_plans(img, tasks)
    ns: NsInit | None = None
    host: dict[int, int] = {}  # image pid -> pid out here (they differ under pidns)
    builds: dict[int, TaskBuild] = {}
    zombies: list[int] = []
    created: list[int] = []  # children cloned, whether or not they have a TaskBuild yet
    failed_pid = tree.root
    shared: SharedFds | None = None
    shmem = SharedMemory(img)
    shared_json = img.json(SHARED_JSON) if SHARED_JSON in img.files else None
    parents = {p: n.ppid for p, n in tree.nodes.items()}
    with_fs = fs_parents(shared_json, parents)
    with_files = fs_parents(shared_json, parents, "files")  # made with CLONE_FILES: one fd table (sharefds.py)
    tables = fd_tables(shared_json, parents, tasks)
    checks = BackgroundChecks() if cow_of else None  # every memory first, then the rest: time to overlap
    try:
        for pid in tree.order:
            failed_pid = pid
            node = tree[pid]
            if pid == tree.root:
                build = TaskBuild(img, pid, tasks[pid], lazy=lazy, on_lazy=on_lazy, t0=t0, leader_done=True)
                builds[pid] = build
                build.shmem = shmem
                child, ns = create_root(tramp, pid, pidns=pidns, join_cgroups=joins[pid])
                host[pid] = child
                build.attach(child, where)
            else:
                parent = builds[node.ppid].remote
                assert parent is not None
                flags = (abi.CLONE_FS if pid in with_fs else 0) | (abi.CLONE_FILES if pid in with_files else 0)
                child = host[pid] = create_child(parent, pid, flags)
                created.append(child)
                if node.zombie:
                    zombies.append(child)
                    make_zombie(parent, child, node.exit or 0, node.comm)
                    continue
                # A stopped task is filled at once even in a lazy restore: it runs no code until continued,
                # and the server could not take the anchor out of a task in a job-control stop.
                eager_here = lazy and node.stopped
                if eager_here and img.has_pages(pid):
                    img.verify_pages(pid)  # no fork here: a lazy restore may already have server threads
                build = TaskBuild(img, pid, tasks[pid], lazy=lazy and not eager_here, on_lazy=on_lazy, t0=t0,
                                  stopped=node.stopped, leader_done=True)
                builds[pid] = build
                build.shmem = shmem
                build.attach(child, where)
            build.table = tables.get(pid)
            assert build.remote is not None
            lead(build.remote, node)
            if cow_of:
                build.cow = cow_of.get(pid)
                if build.cow is not None and pid != tree.root:
                    build.cow.parent_vmas = tasks[node.ppid]["mm"]["vmas"]
                build.checks = checks
                build.build_memory(joins[pid])
        if checks is not None:
            checks.wait()  # before anything else changes a task's mappings (its uffd, say)
        root_group = tree[tree.root].pgid
        born = born_groups(tree.nodes, tree.order, tree.root)
        for pid in live:
            failed_pid = pid
            remote = builds[pid].remote
            assert remote is not None
            if tree[pid].pgid == root_group and root_group != tree.root:
                continue  # the root's group, led outside the image (--shell-job): all share the restorer's
            join_group(remote, tree[pid], born.get(pid))
        shared = SharedFds(img, host)
        if not shared.empty:
            shared.make_pipes()
            for pid in live:
                builds[pid].shared = shared
        for pid in live:
            failed_pid = pid
            if cow_of:
                builds[pid].build_rest()
            else:
                builds[pid].build(joins[pid])
            # A server behind a socket gets each process as soon as it is complete, and checks it while the next
            # is built (its answers are read below, before any task runs).
            builds[pid].hand_over(early=True)
        check_made(shared)
        shmem.close()
        # Every task is complete but for running. Hand over the uffds not sent yet one after the other, then let
        # all go at once: the server may finish a small process meanwhile and wants it untraced to remove its
        # anchor.
        for pid in live:
            failed_pid = pid
            if not builds[pid].handover_sent:
                builds[pid].hand_over()
        settle = getattr(on_lazy, "settle", None)
        if settle is not None:
            failed_pid = tree.root
            settle()
        for pid in live:
            failed_pid = pid
            builds[pid].release()
        shared.close()
        if ns is not None:
            ns.finish(tree.root)  # once every task runs (restore_task says why)
            ns.run()
        root = builds[tree.root].result(ns)
        root.tasks = len(tree.nodes)
        root.pages_written = sum(b.written for b in builds.values())
        return root
    except BaseException as e:
        if checks is not None:
            checks.close()
        shmem.close()
        if shared is not None:
            shared.close()
        for build in builds.values():
            build.kill()
        built = {b.child for b in builds.values()}
        for pid in created:
            if pid not in built and pid not in zombies:
                rcore.kill_quietly(pid)
                with contextlib.suppress(LazarusError, OSError):
                    ptrace.wait(pid, timeout=5)
        for build in reversed(builds.values()):
            build.reap()
        if ns is not None:
            ns.kill()
        err = as_restore_error(e, failed_pid)
        if err is e:
            raise
        raise err from e
