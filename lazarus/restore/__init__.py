"""Restore: validate images -> create the task with its PID -> rebuild its address space by injected syscalls
-> pages (eager copy | lazy uffd) -> fds, signals, misc, creds -> registers -> detach, run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazarus.errors import ImageError, KernelError, LazarusError, RestoreError
from lazarus.images import Image
from lazarus.images.format import PAGES_PER_CHUNK, task_name
from lazarus.images.mm import is_lazy, lazy_object_ids, lazy_vmas
from lazarus.images.validate import validate_image
from lazarus.kernel import abi, procfs, ptrace
from lazarus.kernel.clone import Trampoline
from lazarus.kernel.features import cpu_xstate
from lazarus.lazy.sources import ImagePageSource
from lazarus.remote import Batch, RemoteTask
from lazarus.restore import cgroups, private
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
    trampoline_candidates,
)
from lazarus.restore.pidns import NsInit
from lazarus.restore.sched import apply_sched
from lazarus.restore.thp import collapse_in_task
from lazarus.restore.threads import check_threads, create_thread, restore_thread_creds, restore_thread_state
from lazarus.restore.timers import check_timers
from lazarus.restore.uffd import LAZY_FEATURES, copy_all, lazy_ranges, uffd_in_task

log = logging.getLogger(__name__)
# Called with (pid, uffd, page source) once a lazily restored task is ready to run, before it runs.
LazyHandoff = Callable[[int, Any, Any], None]
TRAMPOLINE_SIZE = 4 * abi.PAGE_SIZE
_NEG1 = (1 << 64) - 1


@dataclass
class Restored:
    pid: int
    seconds: float  # from the start of the restore until the task runs
    pages_written: int
    lazy: Any = None  # handed to the lazy-pages server: uffd and what it must serve
    timings: dict[str, float] = field(default_factory=dict)
    stops: int = 0  # times the new task was let run for one of our injections (a call or a batch of calls)
    calls: int = 0  # system calls injected
    init: Any = None  # restore --pidns: the namespace's init (restore/pidns.py NsInit), running
    ns_pid: int = 0  # restore --pidns: its pid inside its namespace (the image's pid)


def open_image(directory: Path, *, verify_pages: bool) -> Image:
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
    deadline = time.monotonic() + 2.0
    while not pidns and os.path.exists(f"/proc/{pid}"):
        # A just-killed original may still be a zombie for a moment, until its parent reaps it.
        if not _is_zombie(pid) or time.monotonic() > deadline:
            raise RestoreError(f"pid {pid} is already in use", stage="validate", pid=pid)
        time.sleep(0.01)
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
        if os.path.exists(f"/proc/{rec['tid']}"):
            raise RestoreError(f"thread id {rec['tid']} is already in use", stage="validate", pid=pid)
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


def _is_zombie(pid: int) -> bool:
    try:
        return procfs.read_stat(pid).state in ("Z", "X")
    except LazarusError:
        return False


def restore_task(img: Image, pid: int, *, lazy: bool = False, on_lazy: LazyHandoff | None = None,
                 pidns: bool = False) -> Restored:
    """Create task `pid` from the image and leave it running (detached). Kills it on any failure.
    `pidns`: in a new PID namespace under an init of ours (restore/pidns.py), with `pid` as its pid there."""
    t0 = time.monotonic()
    task = img.task(pid)
    validate(img, pid, task, pidns=pidns)
    join_cgroups = cgroups.plan(task.get("cgroups"), pid)
    mm = task["mm"]
    tramp = Trampoline.map_at(trampoline_candidates(mm["vmas"], TRAMPOLINE_SIZE), TRAMPOLINE_SIZE)
    child = 0
    ns: NsInit | None = None
    fdr: FdRestorer | None = None
    timings: dict[str, float] = {}
    threads: list[RemoteTask] = []
    thread_recs = task.get("threads", [])
    try:
        try:
            if pidns:
                # Made by the init of a new PID namespace, so that it is the init's child (restore/pidns.py).
                ns = NsInit.start(tramp, TRAMPOLINE_SIZE, join_cgroups)
                child = ns.clone_root(pid)
            else:
                child = tramp.clone_with_pid(pid)
        except KernelError as e:
            if e.errno == errno.EEXIST:
                raise RestoreError(f"pid {pid} is already in use", stage="create", pid=pid) from e
            raise
        finally:
            tramp.unmap()
        if ns is None:
            ptrace.seize(child, abi.PTRACE_O_TRACESYSGOOD | abi.PTRACE_O_EXITKILL)
            ptrace.interrupt(child)
            st = ptrace.wait(child)
            if not (st.stopped and st.event == abi.PTRACE_EVENT_STOP):
                raise RestoreError(f"new task {child} {st}", stage="create", pid=pid)
        cgroups.join(child, join_cgroups)
        remote = RemoteTask(child, tramp.syscall_ip, batch_ip=tramp.batch_ip)
        remote.keep_state()
        remote.use_scratch(tramp.addr + abi.PAGE_SIZE, TRAMPOLINE_SIZE - abi.PAGE_SIZE)
        timings["create"] = time.monotonic() - t0

        # One batch: what the task inherited from the restorer (per-task state, fds, mappings) dropped, the vdso
        # moved.
        setup = remote.batch()
        rcore.reset_inherited(remote, setup)
        close_inherited_fds(remote, setup)
        specials = clear_address_space(remote, (tramp.addr, tramp.addr + TRAMPOLINE_SIZE), setup)
        gaps = trampoline_candidates(mm["vmas"] + [{"start": tramp.addr, "end": tramp.addr + TRAMPOLINE_SIZE}],
                                     1 << 20)
        move_vdso(remote, specials, mm["vmas"], gaps[0], setup)
        # Before any mapping of the image exists: the kernel refuses a new exe_fd (EBUSY) while the old
        # executable is still mapped, and the image may map that very file (a Python restored by a Python).
        set_mm(remote, mm, setup)
        xcomp = rcore.queue_xcomp_reads(setup, task["core"])
        setup.run()
        known = rcore.xcomp_known(setup, xcomp)
        rcore.prepare_xstate(remote, task["core"], known)
        rcore.restore_guest_perm(remote, task["core"], known)
        rcore.restore_rlimits(child, task["misc"]["rlimits"])
        fds = task["files"]
        high_base = max([f["fd"] for f in fds], default=2) + 1
        # Existing files (mapped, and the fds below) are opened as the restored credentials could open them.
        access = Access(remote, child, task["misc"]["creds"])
        space = SpaceBuilder(remote, img, child, access)
        space.verify = lazy
        page_file = img.page_file(pid) if img.has_pages(pid) else None
        lazy_ids = lazy_object_ids(mm, fds) if lazy else set()
        space.create_objects(mm["objects"], high_base, page_file, lazy_ids)
        space.map_vmas(mm["vmas"])
        timings["map"] = time.monotonic() - t0
        written = 0
        handover = None
        served = lazy_vmas(mm, lazy_ids) if page_file is not None else []
        ranges = lazy_ranges(served if lazy else [v for v in mm["vmas"] if is_lazy(v)])
        if page_file is not None:
            # Private file pages go through /proc/pid/mem; anonymous memory through a uffd made inside
            # the task: filled now by large UFFDIO_COPYs (eager) or served on demand (lazy).
            written = space.write_pages(mm["vmas"], page_file, skip_lazy=True)
            if ranges and not lazy:
                uffd = uffd_in_task(remote, ranges, 0)
                try:
                    written += copy_all(uffd, mm["vmas"], page_file)
                finally:
                    uffd.close()
                # After the uffd is gone: collapse needs every pte of a 2 MiB range present, which it now is.
                collapse_in_task(remote, mm["vmas"])
        space.finish_vmas(mm["vmas"], page_file)
        space.check_vmflags(mm["vmas"])
        timings["pages"] = time.monotonic() - t0

        space.close_cached()
        fdr = FdRestorer(remote, img, child, space.state.object_fds, high_base, access)
        fdr.restore(fds)
        closes = remote.batch()
        for ofd in space.state.object_fds.values():
            closes.call(abi.SYS.close, ofd)
        closes.run()
        fdr.finish(fds)
        rcore.restore_signals(remote, task["signals"])
        if lazy and ranges:
            # The kernel writes the rseq area when it is registered: that page must be in before the
            # range is handed to userfaultfd, or the injected call would wait on a fault nobody serves.
            for rseq in [task["misc"].get("rseq")] + [rec.get("rseq") for rec in thread_recs]:
                if rseq:
                    written += space.write_range(mm["vmas"], page_file, rseq["addr"],
                                                 rseq["addr"] + rseq["size"])
        restore_misc_and_cwd(remote, task["misc"])
        # The other threads, once everything they share with the leader is back (they inherit its no_new_privs,
        # personality and timer slack at the clone) and while the leader may still choose their ids.
        for rec in thread_recs:
            thread = create_thread(remote, rec)
            threads.append(thread)
            restore_thread_state(thread, child, rec, task["core"])
        timings["threads"] = time.monotonic() - t0
        if lazy and ranges:
            handover = uffd_in_task(remote, ranges, LAZY_FEATURES)
        for thread in threads:
            restore_thread_creds(thread, task["misc"])
        rcore.restore_all_creds(remote, task["misc"])
        for thread, rec in zip(threads, thread_recs, strict=True):
            rcore.set_final_state(thread, rec["core"], rec["blocked"])
            thread.close()
        # Last injected call: remove the trampoline. We stop at its syscall exit (pitfall 16).
        remote.syscall(abi.SYS.munmap, tramp.addr, TRAMPOLINE_SIZE)
        rcore.set_final_state(remote, task["core"], task["signals"]["blocked"])
        remote.close()
        stops = remote.stops + sum(t.stops for t in threads)
        calls = remote.calls + sum(t.calls for t in threads)
        source = None
        if handover is not None:
            source = ImagePageSource(served, page_file, name=f"pages-{pid}.img")
            if on_lazy is not None:
                # The server (and its guard) must hold the uffd before the task runs: a task whose uffd is
                # closed would fault in zeros instead of its data.
                on_lazy(child, handover, source)
        # Scheduling state from outside, last: a SCHED_IDLE or low-affinity task must not slow our own calls.
        apply_sched(child, task.get("sched"))
        for thread, rec in zip(threads, thread_recs, strict=True):
            apply_sched(thread.pid, rec.get("sched"))
        for thread in threads:
            ptrace.detach(thread.pid)
        ptrace.detach(child)
        if ns is not None:
            # Stripping the init (a few ms of injected calls) waits until the root runs: until then it is a
            # stopped copy of us, sharing our pages.
            ns.finish(pid)
            ns.run()
        timings["running"] = time.monotonic() - t0
        if page_file is not None and not lazy:
            page_file.close()
        return Restored(child, time.monotonic() - t0, written, timings=timings,
                        lazy=(handover, source) if handover is not None else None, stops=stops, calls=calls,
                        init=ns, ns_pid=pid)
    except BaseException as e:
        if child:
            rcore.kill_quietly(child)
            for thread in threads:  # traced by us: reaped by us, before the leader's exit is reported
                thread.close()
                with contextlib.suppress(LazarusError, OSError):
                    for _ in range(100):
                        if ptrace.wait(thread.pid, timeout=5).stopped is False:
                            break
            with contextlib.suppress(LazarusError, OSError):
                for _ in range(100):
                    s = ptrace.wait(child, timeout=5)
                    if s.exited or s.signaled:
                        break
        if ns is not None:
            ns.kill()  # and with it whatever else is in its namespace
        if fdr is not None:
            fdr.cleanup()
        if isinstance(e, RestoreError):
            raise
        if isinstance(e, LazarusError):
            raise RestoreError(str(e), stage="restore", pid=pid) from e
        if isinstance(e, OSError):
            raise RestoreError(f"{e.strerror or e}", stage="restore", pid=pid) from e
        raise


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


def set_mm(remote: RemoteTask, mm: dict[str, Any], batch: Batch | None = None) -> None:
    """PR_SET_MM_MAP: code/data/brk/stack/args/env boundaries, auxv and the executable link. batch: queued there
    (checked when it runs), else made now."""
    auxv = bytes.fromhex(mm["auxv"])
    b = batch if batch is not None else remote.batch()
    auxv_addr = b.put(auxv)
    m = abi.prctl_mm_map(
        mm["start_code"], mm["end_code"], mm["start_data"], mm["end_data"], mm["start_brk"], mm["brk"],
        mm["start_stack"], mm["arg_start"], mm["arg_end"], mm["env_start"], mm["env_end"], auxv_addr,
        len(auxv), 0)
    addr = b.put(bytes(m) + bytes(8))  # room for the 8-byte store of exe_fd, a 4-byte field
    exe_fd = b.call(abi.SYS.openat, abi.AT_FDCWD & _NEG1, b.cstring(mm["exe"]), abi.O_RDONLY | abi.O_CLOEXEC, 0,
                    what=f"open {mm['exe']}")
    b.store(exe_fd, addr + abi.prctl_mm_map.exe_fd.offset)
    prctl = b.call(abi.SYS.prctl, abi.PR_SET_MM, abi.PR_SET_MM_MAP, addr, abi.sizeof(abi.prctl_mm_map), 0,
                   check=False)
    b.call(abi.SYS.close, exe_fd)

    def check(results: list[int]) -> None:
        if results[prctl.index] < 0:
            raise KernelError(f"prctl(PR_SET_MM_MAP) in task {remote.pid}", -results[prctl.index], pid=remote.pid)
    b.on_done(check)
    if batch is None:
        b.run()


def restore(directory: Path, *, lazy: bool = False, on_lazy: LazyHandoff | None = None,
            image: Image | None = None, pidns: bool = False) -> Restored:
    """Restore the process in `directory`. `image`: the same image already opened with open_image() (a caller
    that must know the image is sound before it starts helpers of its own, as a lazy restore's server).
    `pidns`: into a new PID namespace (restore/pidns.py); the root is then the child of the result's `init`,
    whose exit status (`init.wait()`) is the root's."""
    img = image if image is not None else open_image(directory, verify_pages=not lazy)
    private.sweep_stale()  # what restores killed half-way left (restore/private.py)
    try:
        if len(img.tasks) != 1:
            raise RestoreError(f"image holds {len(img.tasks)} tasks; only single processes are supported")
        return restore_task(img, img.tasks[0], lazy=lazy, on_lazy=on_lazy, pidns=pidns)
    finally:
        private.done()
        if not lazy:
            img.close()
