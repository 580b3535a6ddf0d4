"""The library API: what `lazarus` the command, the restore service and other programs call.

    import lazarus
    dumped = lazarus.dump(pid, "/var/lib/ckpt/app", leave_running=True)
    r = lazarus.restore("/var/lib/ckpt/app", lazy=True, detach=True)   # returns once the process runs
    print(r.pid, r.status())                                             # progress and stats of its pages

Every function raises a LazarusError subclass (errors.py) with a one-line message on failure; a failed dump
leaves the process as it was, a failed restore kills what it created. The heavy modules are imported when a
function is called, not when this module is imported (the command's start-up time counts).

Where a lazy restore's pages are served from (lazy/daemon.py has the fork order):
    lazy=True                      from this process: the guard is forked now, and the caller runs
                                   Restoration.serve() once the restore returns (the CLI's `restore --lazy`)
    lazy=True, detach=True         from a private daemon, forked before anything else (its start-up runs beside
                                   the restore's); this process is free once the process runs
    lazy=True, lazy_pages_socket   from a running `lazarus lazy-pages` server
A lazy restore forks helpers; call it while the calling process has no thread (fork safety).
"""

from __future__ import annotations

import os

from lazarus.errors import FeatureMissing, LazarusError, UsageError
from lazarus.records import field, record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from lazarus.dump import DumpResult
    from lazarus.kernel.features import Feature
    from lazarus.lazy.daemon import ProgressCallback, Serving
    from lazarus.lazy.spawn import Daemon


def dump(pid: int, directory: str | Path, *, leave_running: bool = False, shell_job: bool = False,
         direct: bool = False, sync: bool = True, wait_gone: bool = True) -> DumpResult:
    """Checkpoint process `pid` into `directory` (which must not exist, or be empty).

    Parameters:
        leave_running: resume the process after the dump (else it is killed once the images are verified).
        shell_job: allow a process in a session another process leads, or with a controlling terminal.
        direct: write the page data with O_DIRECT (not through the page cache; a restore soon after then reads
            the image from the disk).
        sync: fsync the image before the process is killed or let go (default). False: the kernel writes it
            back later, as CRIU does; faster, but a later write error or a crash loses the image while the
            original is gone (docs/CONTRACTS.md, "Durability of a dump").
        wait_gone: (killed) return once the process has exited (default); False once it is sent SIGKILL, as
            CRIU does (it exits meanwhile: freeing its memory takes ~40 ms at 512 MiB). For a caller that exits
            next (the CLI); a restore of the image waits while it exits.
    Returns:
        DumpResult(pid, directory, pages, seconds, left_running).
    Raises:
        DumpError / Unsupported naming what could not be saved; the process then runs on as it was.
    """
    from pathlib import Path

    from lazarus.dump import dump as _dump
    return _dump(pid, Path(directory), leave_running=leave_running, shell_job=shell_job, direct=direct,
                 sync=sync, watchdog=_prepared.pop("watchdog", None), wait_gone=wait_gone)


@record
class Restoration:
    """A restored process. `pid` runs (it is the caller's child); for a lazy restore its memory arrives
    from the server given by `served_by`: "here" (call serve()), "daemon" (pid `daemon_pid`) or "server"
    (a `lazarus lazy-pages` socket). `seconds`: from the start of the restore until the process ran.
    A daemon is the caller's child too: a caller that lives on reaps it (os.waitpid(daemon_pid, 0)) once it has
    served (`status()` fails then), or it stays a zombie until the caller exits."""

    pid: int
    seconds: float
    pages_written: int
    lazy: bool
    served_by: str | None = None
    daemon_pid: int | None = None
    status_path: Path | None = None
    tasks: int = 1  # processes restored: a tree's whole count (zombies included); `pid` is its root
    init: Any = None  # pidns: the namespace's init (restore/pidns.py NsInit), our child; the process is its
    ns_pid: int = 0  # pidns: the process's pid inside its namespace (the image's pid)
    timings: dict[str, float] = field(default_factory=dict)  # phases, seconds since the call (restore())
    stops: int = 0  # times the new task(s) ran for injected calls (one call or one batch each)
    seeded: bool = False  # cloned from the seed prepare_restore() made (restore/seed.py)
    image_ahead: bool = False  # its image was the one preopen_image() had opened and checked (unchanged since)
    _serving: Serving | None = field(default=None, repr=False)

    def serve(self, status: socket.socket | None = None) -> dict[str, Any]:
        """A lazy restore served here: serve its pages until it has them all (or exited), then stop the
        server. Returns the transfer statistics. Nothing to do (empty stats) otherwise. `status`: a listening
        SOCK_SEQPACKET socket (trust.listen_private) on which to answer status requests meanwhile
        (lazy/daemon.py query_status)."""
        if self._serving is None:
            return {}
        try:
            if status is not None:
                self._serving.answer_status(status)
            return self._serving.run()
        finally:
            self.close()

    def hold_background(self, seconds: float, until_readable: int = -1,
                        on_release: Callable[[], None] | None = None) -> None:
        """A lazy restore served here, before serve(): its background copy waits up to `seconds`, or until
        `until_readable` is readable (a service's client connection, closed once the client has its answer);
        faults are served meanwhile (lazy/server.py). `on_release` is called when the hold ends. Nothing to do
        otherwise (on_release is called at once)."""
        if self._serving is None:
            if on_release is not None:
                on_release()
            return
        self._serving.server.hold_background(seconds, until_readable, on_release)

    def status(self) -> dict[str, Any]:
        """Progress (bytes done / total) and statistics of the lazy transfer, where they can be known:
        served here, or by a daemon with a status socket. Raises LazarusError when they cannot."""
        if self._serving is not None:
            return self._serving.status()
        if self.status_path is not None:
            from lazarus.lazy.daemon import query_status
            return query_status(self.status_path)
        if not self.lazy:
            return {"bytes_done": 0, "bytes_total": 0, "stats": {}}
        raise LazarusError(f"pid {self.pid}: its lazy server keeps its progress to itself", pid=self.pid)

    def wait(self) -> int:
        """Wait for the process to exit (it is our child): its exit code, or 128 + the signal that killed it.
        Under pidns the init's, which exits with the process's status."""
        if self.init is not None:
            return self.init.wait()
        from lazarus.kernel.ptrace import wait
        st = wait(self.pid, timeout=float("inf"))
        while st.stopped:
            st = wait(self.pid, timeout=float("inf"))
        return st.exit_code if st.exited else 128 + st.term_sig

    def close(self) -> None:
        """Stop serving (a lazy restore served here): a process still missing pages is killed."""
        serving, self._serving = self._serving, None
        if serving is not None:
            serving.close()


def require_lazy_features() -> None:
    """The userfaultfd features a lazy restore registers with; a scratch uffd tells (a full `check` would
    cost a traced child on every restore).

    Raises:
        FeatureMissing naming them.
    """
    from lazarus.kernel.uffd import feature_names, supported_features
    from lazarus.restore.uffd import LAZY_FEATURES
    try:
        missing = LAZY_FEATURES & ~supported_features()
    except LazarusError as e:
        raise FeatureMissing(f"userfaultfd unavailable: {e}") from e
    if missing:
        raise FeatureMissing("userfaultfd features missing for a lazy restore: " + ", ".join(feature_names(missing)))


def restore(directory: str | Path, *, lazy: bool = False, detach: bool = False, background: bool = True,
            stats_path: Path | None = None, lazy_log: Path | None = None, lazy_pages_socket: Path | None = None,
            on_progress: ProgressCallback | None = None, status: Any = None, pidns: bool = False,
            daemon: Daemon | None = None) -> Restoration:
    """Restore the process saved in `directory`; returns once it runs.

    Parameters:
        lazy: serve anonymous memory on demand (userfaultfd) instead of writing it all first.
        detach: (lazy) serve it from a private daemon rather than from this process.
        background: (lazy) also push the pages nobody asked for yet; else only faults are served.
        stats_path: (lazy) where the server writes its statistics (JSON) at the end.
        lazy_log: (lazy, detach) the daemon's report file (default DIR/lazy-pages.log when writable).
        lazy_pages_socket: (lazy) hand the memory to the `lazarus lazy-pages` listening there.
        on_progress: (lazy, served here) called with (bytes done, bytes total) at most every 0.1 s.
        status: (lazy, detach) a trust.PrivateSocket the daemon answers status requests on.
        pidns: restore into a new PID namespace under a small init of ours, where the process keeps its pid
            (any number of restores of one image at once); `pid` is then its pid out here, `ns_pid` inside.
        daemon: (lazy, detach) the private daemon to hand the process to, forked ahead by the caller with
            lazy.spawn.fork_daemon(directory, log, background=, stats_path=, status=) before its own imports, so
            that the daemon's start-up overlaps them (the CLI does). `background`, `stats_path` and `lazy_log`
            are then the daemon's and not used here; pass the `status` it was given, for status(). It is ended
            if the restore fails, as one forked here is, and at once for a restore that is not lazy and
            detached (UsageError).
    Raises:
        UsageError for options that need `lazy`; FeatureMissing; ImageError; RestoreError; Untrusted.
    """
    # A str, not a Path: the restore command imports no pathlib (cli._RESTORE_VALUES)
    directory = os.fspath(directory)
    if lazy and detach and lazy_pages_socket is None:
        return _restore_detached(directory, background=background, stats_path=stats_path, lazy_log=lazy_log,
                                 status=status, pidns=pidns, daemon=daemon)
    if daemon is not None:
        daemon.end()
        raise UsageError("a daemon forked ahead is for a lazy, detached restore without --lazy-pages-socket")
    import time
    t0 = time.monotonic()
    stamps: dict[str, float] = {}
    r = _restore_impl(directory, lazy=lazy, detach=detach, background=background, stats_path=stats_path,
                      lazy_log=lazy_log, lazy_pages_socket=lazy_pages_socket, on_progress=on_progress,
                      status=status, pidns=pidns, stamp=lambda name: stamps.setdefault(name, time.monotonic() - t0))
    # The restore's own phases are measured from its own start: put on this call's clock.
    start = r.timings.pop("start", t0) - t0
    r.timings = {**stamps, **{f"restore.{k}": start + v for k, v in r.timings.items()},
                 "returned": time.monotonic() - t0}
    return r


def _restore_impl(directory: str, *, lazy: bool, detach: bool, background: bool, stats_path: Path | None,
                  lazy_log: Path | None, lazy_pages_socket: Path | None, on_progress: ProgressCallback | None,
                  status: Any, pidns: bool, stamp: Any) -> Restoration:
    from lazarus.restore import restore as _restore
    if not lazy:
        if not background or stats_path or lazy_pages_socket or on_progress or status is not None:
            raise UsageError("--no-background, --stats and --lazy-pages-socket need --lazy")
        res = _restore(directory, pidns=pidns)
        return Restoration(res.pid, res.seconds, res.pages_written, tasks=res.tasks, lazy=False, init=res.init,
                           ns_pid=res.ns_pid, timings=res.timings, stops=res.stops,
                           seeded=res.seeded)
    require_lazy_features()
    stamp("features")
    # The image is checked whole before any helper of ours (server, guard) exists: a bad image is refused with
    # nothing created.
    image, ahead = _checked_image(directory)
    stamp("image")
    if lazy_pages_socket is not None:
        from lazarus.lazy.daemon import hand_over
        from lazarus.lazy.handoff import connect
        sock = connect(lazy_pages_socket)
        try:
            res = _restore(directory, lazy=True, on_lazy=hand_over(sock, directory), image=image, pidns=pidns)
        finally:
            sock.close()
        return Restoration(res.pid, res.seconds, res.pages_written, tasks=res.tasks, lazy=True, served_by="server", init=res.init,
                           ns_pid=res.ns_pid)
    # Served here: the guard forks now, while we have no threads.
    from lazarus.lazy.daemon import start_serving
    serving = start_serving(background=background, stats_path=stats_path, on_progress=on_progress,
                            guard=_prepared.pop("guard", None))
    stamp("serving")
    server = serving.server

    def add_process(pid: int, uffd: Any, source: Any) -> None:
        # What the source starts (a verify-ahead process for a large page file: a fork) waits for the loop
        # (serve()): the process runs first, and a restore's time to running stays flat in its size.
        server.add_process(pid, uffd, source, start_later=True)
    try:
        res = _restore(directory, lazy=True, on_lazy=add_process, image=image, pidns=pidns)
    except BaseException:
        serving.close()
        raise
    return Restoration(res.pid, res.seconds, res.pages_written, tasks=res.tasks, lazy=True, served_by="here",
                       _serving=serving, init=res.init, ns_pid=res.ns_pid, timings=res.timings, stops=res.stops,
                       seeded=res.seeded, image_ahead=ahead)


# What prepare_restore() made for the next restore here.
_prepared: dict[str, Any] = {}
# Images opened and checked ahead (preopen_image): directory -> (signature of its files then, Image).
_opened: dict[str, tuple[Any, Any]] = {}
_SETTLED_NS = 100_000_000  # a file changed less than this before is not trusted to stay as read (timestamps are coarse)
PREOPEN_KEEP = 4  # images kept opened ahead at most


def _signature(directory: str, *, to_keep: bool = False) -> Any:
    """What must not change for an image opened earlier to be used: the directory's and each file's inode, size,
    mtime and ctime. None when it cannot be read, or (`to_keep`: taken ahead of opening the image to keep it)
    when a change made now might not show in them."""
    try:
        st = os.stat(directory)
        sig = [(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)]
        for name in sorted(os.listdir(directory)):
            f = os.lstat(os.path.join(directory, name))
            sig.append((name, f.st_ino, f.st_size, f.st_mtime_ns, f.st_ctime_ns))
    except OSError:
        return None
    if to_keep:
        # Times come from a clock that ticks (a jiffy, or coarser): a file changed in the tick of its last
        # change may keep its times, unless the filesystem stamps a change made after this stat finely.
        import time
        if max(x[-1] for x in sig) > time.time_ns() - _SETTLED_NS:
            from lazarus.kernel.features import changes_always_seen
            if not changes_always_seen(directory):
                return None
    return tuple(sig)


def preopen_image(directory: str | Path) -> bool:
    """Open and check the image in `directory` now (all but its page data, as a lazy restore does before it
    creates anything), for a lazy restore of it later in this process, which uses it if no file of the image
    has changed since (inode, size, mtime and ctime of each, and of the directory). For a process that waits
    for restores (a service worker). Returns whether it is kept."""
    directory = os.fspath(directory)
    sig = _signature(directory, to_keep=True)
    if sig is None:
        return False
    from lazarus.restore import open_image
    try:
        img = open_image(directory, verify_pages=False)
    except LazarusError:
        return False  # refused again, with its message, when a restore asks for it
    old = _opened.pop(directory, None)
    if old is not None:
        old[1].close()
    _opened[directory] = (sig, img)
    while len(_opened) > PREOPEN_KEEP:  # the least recently opened go first
        _opened.pop(next(iter(_opened)))[1].close()
    return True


def _checked_image(directory: str) -> tuple[Any, bool]:
    """The image in `directory`, opened and checked (page data excepted), and whether it was opened ahead: the
    one preopen_image() kept if its files are as they were, else opened now."""
    entry = _opened.pop(str(directory), None)
    if entry is not None:
        sig, img = entry
        if sig == _signature(directory):
            return img, True
        img.close()
    from lazarus.restore import open_image
    return open_image(directory, verify_pages=False), False


def prepare_restore() -> None:
    """Do now, ahead of the next restore() in this process, what it would otherwise do on its way: fork the
    lazy server's guard, and make a seed task that the restored process is cloned from (restore/seed.py: not
    a clone of this whole process). For a process that waits for restores (a service worker); call it while
    the process has no thread, and release_prepared() when done (it kills what was not used)."""
    from lazarus.lazy.guard import Guard
    from lazarus.restore import TRAMPOLINE_SIZE, seed
    if "guard" not in _prepared:
        _prepared["guard"] = Guard.start()
    seed.prepare(TRAMPOLINE_SIZE)


def prepare_dump() -> None:
    """Fork now, ahead of the next dump() in this process, the watchdog it would fork on its way (a double fork:
    ~5-10 ms in a process of a service worker's size; dump/watchdog.py Watchdog.prepare). Call it while the
    process has no thread, and release_prepared() when done."""
    from lazarus.dump.watchdog import Watchdog
    if "watchdog" not in _prepared:
        _prepared["watchdog"] = Watchdog.prepare()


def release_prepared(wait: bool = True) -> None:
    """Stop what prepare_restore() and prepare_dump() made and restore() or dump() did not use, and the spent
    seeds. wait=False: without
    waiting for them to exit (for a process about to exit: they are then init's, or its subreaper's, to reap)."""
    from lazarus.restore import seed
    guard = _prepared.pop("guard", None)
    watchdog = _prepared.pop("watchdog", None)
    if watchdog is not None:
        watchdog.close()  # it watched nothing yet: it exits
    try:
        if guard is not None:
            guard.close(timeout=10.0 if wait else 0.0)
    finally:
        seed.discard(wait)


def _restore_detached(directory: str, *, background: bool, stats_path: Path | None, lazy_log: Path | None,
                      status: Any, pidns: bool, daemon: Daemon | None) -> Restoration:
    """restore(lazy=True, detach=True): served by a private daemon. The daemon is forked first, before this
    process imports the restore or reads the image, so that its own start-up (its imports, its guard's fork,
    reading and checking the image) runs beside this process's instead of after it, while the restore waits
    for its answer at the handoff. Anything that fails before the handoff (features missing, a bad image, the
    restore itself) ends the daemon before the error is raised: nothing of ours is left."""
    from lazarus.lazy.daemon import hand_over
    if daemon is None:
        from lazarus.lazy.spawn import daemon_log, fork_daemon
        daemon = fork_daemon(directory, lazy_log or daemon_log(directory), background=background,
                             stats_path=stats_path, status=status)
    try:
        require_lazy_features()
        from lazarus.restore import restore as _restore
        image, _ = _checked_image(directory)
        res = _restore(directory, lazy=True, image=image, pidns=pidns,
                       on_lazy=hand_over(daemon.sock, directory, image.inventory.get("self_check")))
    except BaseException:
        daemon.end()
        raise
    finally:
        daemon.sock.close()
        if status is not None:
            status.forget()  # the daemon answers there now, and removes it when done
    return Restoration(res.pid, res.seconds, res.pages_written, tasks=res.tasks, lazy=True, served_by="daemon",
                       daemon_pid=daemon.pid, status_path=status.path if status is not None else None,
                       init=res.init, ns_pid=res.ns_pid)


@record
class CheckResult:
    """`features`: every probed kernel feature; `ok`: dump and restore can work here; `missing`: names of the
    features dump or restore need and lack."""

    features: list[Feature]
    ok: bool
    missing: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "missing": self.missing,
                "features": [{"name": f.name, "available": f.available, "purposes": list(f.purposes),
                              "detail": f.detail} for f in self.features]}


def check() -> CheckResult:
    """Probe the kernel for every feature Lazarus uses (cached for the life of the process)."""
    from lazarus.kernel import features
    feats = features.report()
    code = features.check_exit_code(feats)
    missing = [f.name for f in feats if not f.available and f.required_for in ("dump", "restore")]
    return CheckResult(feats, code == 0, missing)


def show(directory: str | Path) -> dict[str, Any]:
    """The summary of an image directory that `lazarus show --json` prints (images/summary.py).

    Raises:
        ImageError for a missing, truncated or foreign image.
    """
    from lazarus.images import Image
    from lazarus.images.summary import summary
    img = Image.open(os.fspath(directory))
    try:
        return summary(img)
    finally:
        img.close()


__all__ = ["CheckResult", "Restoration", "UsageError", "check", "dump", "prepare_restore", "preopen_image",
           "prepare_dump", "release_prepared",
           "require_lazy_features", "restore", "show"]
