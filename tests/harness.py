"""Test harness for the self-verifying targets in tests/targets/ and the `lazarus` CLI.

It knows nothing of what a target checks (the target does that itself, see
tests/targets/common.h): it builds the targets, starts them, waits for READY, drives
`lazarus dump`/`restore`, sends each target's trigger and waits for PASS or FAIL.

Everything it starts is registered and killed by pid (identified by pid *and* start time, so a
reused pid is never hit) at cleanup, including restored processes read from --pidfile and
orphans reparented to pytest, which conftest.py makes a child subreaper for this purpose.

Only test code may use ctypes outside lazarus/kernel/; here it is used for prctl() alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS_SRC = Path(__file__).resolve().parent / "targets"

# C targets and the extra gcc flags each needs.
C_TARGETS: dict[str, tuple[str, ...]] = {
    "memory": (),
    "regs": (),
    "signals": (),
    "fds": (),
    "anonfd": (),
    "sleeper": (),
    "misc": (),
    "unsupported": ("-pthread",),
    "lazy_events": (),
    "lazy_churn": (),
    "forkwait": (),
    "cgroup": (),
    "thp": (),
    "guestperm": (),
    "madvise": (),
    "guard": (),
    "deleted_map": (),
    "memfd_seals": (),
    "files2": (),
    "locks": (),
    "files_refuse": (),
    "sched": ("-pthread",),
    "pidns": ("-pthread",),
    "survivor": (),
    "ptimers": (),
    "prctl": (),
    "refused_proc": (),
    "sigcont": ("-pthread",),
    "threads": ("-pthread",),
    "tree": ("-pthread",),
    "share_tree": (),
    "tree_share": (),
    "share_take": (),
    "cow_fork": (),
    "cow_tree": (),
    "shm_tree": ("-pthread",),
    "clone_files": (),
}
CFLAGS = ("-O1", "-g", "-Wall")

# x86_64 system call numbers a target may be found sleeping in (asm/unistd_64.h).
SYS_READ = 0
SYS_POLL = 7
SYS_PAUSE = 34
SYS_NANOSLEEP = 35
SYS_RT_SIGTIMEDWAIT = 128
SYS_RT_SIGSUSPEND = 130
SYS_FUTEX = 202
SYS_CLOCK_NANOSLEEP = 230
# A timed sleep (poll, nanosleep, futex) interrupted by a ptrace stop -- the lazy server removing its anchor
# (README, lazy restore) -- goes on in restart_syscall with the time left: still the same call.
SYS_RESTART_SYSCALL = 219

PR_SET_CHILD_SUBREAPER = 36
WAKEUP = b"lazarus-wakeup\n"  # what the sleeper's read/poll modes expect on fd 21
SLEEPER_WAKEUP_FD = 21

DEFAULT_READY_TIMEOUT = 15.0
DEFAULT_RESULT_TIMEOUT = 60.0


# ----------------------------------------------------------------------------------------------
# Process bookkeeping


def set_child_subreaper() -> None:
    """Make this process adopt orphaned descendants (restored processes, daemons) so they can be reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def proc_state(pid: int) -> str | None:
    """One-letter state from /proc/PID/stat (Z for a zombie), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def is_alive(pid: int) -> bool:
    """True if the pid exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def children_of(ppid: int) -> set[int]:
    """Pids whose parent is ppid (any state, zombies included)."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == ppid:
            out.add(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), parents first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = sorted(children_of(todo.pop(0)))
        out.extend(kids)
        todo.extend(kids)
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def in_syscall(pid: int) -> int | None:
    """The syscall number the task is blocked in, or None when running/stopped/gone."""
    if proc_state(pid) not in ("S", "D"):
        return None
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() and int(first) >= 0 else None


def uffd_fds(pid: int) -> list[int]:
    """The fds of pid that are userfaultfds (a lazily restored process holds one until complete)."""
    out = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                    out.append(int(name))
    return sorted(out)


def wait_lazy_complete(pid: int, timeout: float = 30.0) -> bool:
    """Wait until a lazily restored process holds no userfaultfd any more (all its pages are in)."""
    deadline = time.monotonic() + timeout
    while uffd_fds(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not uffd_fds(pid)


def wait_in_syscall(pid: int, nr: int, timeout: float = 10.0, *, restarted: bool = False) -> bool:
    """Wait until the task sleeps in syscall `nr` (or, with `restarted`, in restart_syscall: the same call
    resumed after a stop). Returns False on timeout or if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = in_syscall(pid)
        if now == nr or (restarted and now == SYS_RESTART_SYSCALL):
            return True
        if not is_alive(pid):
            return False
        time.sleep(0.01)
    return False


def reap(pid: int, timeout: float) -> int | None:
    """Wait for a child (or adopted orphan) to exit and reap it. Returns the exit code (-signal),
    or None on timeout. A pid that is not our child is only waited for until it disappears (reaped by
    its parent). A zombie that is not ours yet is waited for: its parent may be about to exit (a
    detached service worker), and the zombie then passes to us, the subreaper, with its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if proc_state(pid) is None:
                return None
        else:
            if got == pid:
                return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


@dataclass
class Proc:
    """A process identified by pid and start time."""

    pid: int
    started: int | None
    what: str

    def same(self) -> bool:
        return self.started is not None and start_time(self.pid) == self.started

    def kill(self) -> None:
        if self.same():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    """A running (original or restored) target process."""

    name: str
    pid: int
    log: Path
    exe: Path
    popen: subprocess.Popen | None = None
    since: int = 0  # log offset from which wait_result() looks for a result
    args: tuple[str, ...] = ()

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_alive(self.pid)

    def signal(self, sig: int = signal.SIGUSR2) -> None:
        os.kill(self.pid, sig)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Look for results only after what the log holds now; returns that offset."""
        self.since = self.log.stat().st_size if self.log.exists() else 0
        return self.since

    def wait_result(self, timeout: float = DEFAULT_RESULT_TIMEOUT) -> str:
        return wait_for_result(self.log, timeout, since=self.since, target=self)

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Exit code (negative signal number if killed), None if still running after timeout."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return reap(self.pid, timeout)

    def describe(self) -> str:
        return f"{self.name}{list(self.args)} pid {self.pid}; log {self.log}:\n{self.log_text()}"


def wait_for_result(log: Path, timeout: float, since: int = 0, target: Target | None = None) -> str:
    """The first result line ("PASS" or "FAIL: ...") written to log after byte offset `since`.

    Returns a "TIMEOUT: ..." or "EXITED: ..." line instead when none comes in time or the target
    (if given) died without writing one.
    """
    deadline = time.monotonic() + timeout
    gone_at: float | None = None
    while True:
        try:
            data = log.read_bytes()[since:]
        except FileNotFoundError:
            data = b""
        for line in data.decode(errors="replace").splitlines():
            if line == "PASS" or line.startswith("FAIL"):
                return line
        now = time.monotonic()
        if target is not None and not target.alive():
            gone_at = gone_at or now
            if now - gone_at > 0.5:  # let a last write land
                return f"EXITED: pid {target.pid} ended without a result"
        if now >= deadline:
            return f"TIMEOUT: no result within {timeout:.0f} s"
        time.sleep(0.02)


def wait_for_line(
    log: Path, line: str, timeout: float, since: int = 0, proc: subprocess.Popen | None = None
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if line in log.read_bytes()[since:].decode(errors="replace").splitlines():
                return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def logged_due(log: Path) -> float | None:
    """The CLOCK_MONOTONIC time a target said its sleep is due ('# due: T'), if it said one."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("# due:"):
            return float(line.split(":", 1)[1])
    return None


def corrupt_points(log: Path) -> list[str]:
    """The names a target declared in its '# corrupt-points:' line."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("# corrupt-points:"):
            return line.split(":", 1)[1].split()
    return []


@dataclass(frozen=True)
class Case:
    """How to drive one target run: its arguments, trigger and where it sleeps while waiting.

    trigger: "usr2" (send SIGUSR2), "pipe" (write WAKEUP into /proc/PID/fd/21) or "none".
    syscall: the system call the target waits in; the harness waits for it before a dump and
    before the trigger (so that pause() cannot miss a signal). None: the target runs.
    """

    id: str
    target: str
    args: tuple[str, ...] = ()
    trigger: str = "usr2"
    syscall: int | None = SYS_RT_SIGSUSPEND
    selftest_args: tuple[str, ...] | None = None  # args for the corruption self-test, if different
    timeout: float = DEFAULT_RESULT_TIMEOUT


# Every target run the dump/restore tests go through (the unsupported targets are separate).
CASES: tuple[Case, ...] = (
    Case("memory-keep", "memory", ("keep",)),
    Case("memory-close", "memory", ("close",)),
    Case("regs", "regs", syscall=None),
    Case("signals", "signals"),
    Case("sigcont", "sigcont"),  # blocked SIGCONTs pending (process and thread queue) kept through the dump
    Case("sigcont-none", "sigcont", ("none",)),  # ... and none pending: none after it (not the dump's own)
    Case("sigcont-thread", "sigcont", ("thread",)),  # ... and one on a second thread's own queue
    Case("fds", "fds"),
    Case("anonfd", "anonfd", ("all",)),
    Case("misc", "misc"),
    Case("sleeper-nanosleep", "sleeper", ("nanosleep", "5"), "none", SYS_NANOSLEEP, ("nanosleep", "1")),
    Case("sleeper-sleep", "sleeper", ("sleep", "5"), "none", SYS_CLOCK_NANOSLEEP, ("sleep", "1")),
    Case("sleeper-read", "sleeper", ("read",), "pipe", SYS_READ),
    Case("sleeper-poll", "sleeper", ("poll",), "pipe", SYS_POLL),
    Case("sleeper-sigwait", "sleeper", ("sigwait",), "usr2", SYS_RT_SIGTIMEDWAIT),
    Case("sleeper-futex", "sleeper", ("futex",), "usr2", SYS_FUTEX),
    Case("sleeper-pause", "sleeper", ("pause",), "usr2", SYS_PAUSE),
    Case("lazy-events", "lazy_events", ("all",), timeout=90),
    Case("madvise", "madvise"),
    Case("guard", "guard"),
    Case("deleted-map", "deleted_map"),
    Case("deleted-map-withfd", "deleted_map", ("withfd",)),  # ... also open at fd 30: the mapped inode itself
    Case("memfd-seals", "memfd_seals"),
    Case("files2", "files2"),
    Case("locks", "locks"),
    Case("survivor", "survivor", syscall=SYS_NANOSLEEP),
    Case("ptimers", "ptimers"),
    Case("prctl", "prctl"),
    Case("sched", "sched"),
    Case("pidns", "pidns"),
    Case("threads", "threads"),
    Case("threads-churn", "threads", ("churn",)),
    Case("tree", "tree"),  # the root reports PASS only once every process of its tree passed (tree.c)
    Case("tree-share", "tree_share"),  # descriptions, pipes and a FIFO shared by the tree's processes
    Case("cow-tree", "cow_tree"),  # copy-on-write pages kept shared; each process checks its memory (cow_tree.c)
    Case("shm-tree", "shm_tree"),  # shared memory objects made once for the tree; each sees the others' writes
    Case("shm-tree-sysv", "shm_tree", ("sysv",)),  # ... and a removed System V segment all three attached
    Case("sysvshm", "unsupported", ("sysvshm",)),  # a removed System V segment (unsupported.c, once refused)
    Case("clone-files", "clone_files"),  # one fd table for a parent and its child (clone(CLONE_FILES))
    Case("clone-files-private", "clone_files", ("private",)),  # the same, no copy-on-write page left shared
)
CASES_BY_ID = {c.id: c for c in CASES}

UNSUPPORTED_MODES = ("tcp", "thread", "child", "pty", "seccomp", "uffd", "chardev", "plain")
FILES_REFUSE_MODES = ("owner", "pgrp", "lease", "procother")  # tests/targets/files_refuse.c
REFUSED_PROC_MODES = ("securebits", "cpu_overrun")  # tests/targets/refused_proc.c


PYTHONS = ("system", "lazarus")
PY_TARGETS = ("pyscript", "pyasync", "pythreads", "pypool", "pyshared")  # tests/targets/NAME.py, run by target_python()


def target_python(kind: str = "system") -> Path:
    """A plain interpreter (never a venv) for tests/targets/pyscript.py.

    "system": LAZ_TEST_PYTHON if set, else python3 from the default search path (os.defpath),
    else the interpreter this venv was made from. "lazarus": the interpreter lazarus itself runs
    on (this venv's base), so that the restorer and the restored process share one executable."""
    base = Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))
    if kind == "lazarus":
        return base
    override = os.environ.get("LAZ_TEST_PYTHON")
    if override:
        return Path(os.path.realpath(override))
    found = shutil.which("python3", path=os.defpath)
    return Path(os.path.realpath(found)) if found else base


def result_line(log: Path) -> str | None:
    """The "RESULT ..." line a Python target (PY_TARGETS) logs once it has finished its work, or None."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return line
    return None


class PythonReferences(dict[tuple[str, str], str]):
    """(Python target, interpreter) -> the RESULT line of one uninterrupted run, computed on first use."""

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.harness = harness

    def __missing__(self, key: tuple[str, str]) -> str:
        name, python = key
        target = self.harness.start_target(name, python=python)
        expect_pass(target.wait_result(120), target)
        assert target.wait_exit(10) == 0
        line = result_line(target.log)
        assert line is not None, target.describe()
        self[key] = line
        return line


def restore_to_reference(harness: Harness, image: Path, target: Target, mode: str, reference: str) -> None:
    """Restore a dumped Python target (mode "eager" or "lazy"): it must finish, in the original's pid and log,
    with exactly the RESULT line of an uninterrupted run."""
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore of {target.exe} failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    expect_pass(r.target.wait_result(120), r.target, r)
    assert r.target.wait_exit(15) == 0
    assert result_line(target.log) == reference, f"different result after restore:\n{target.log_text()}"


def build_targets(out_dir: Path) -> dict[str, Path]:
    """Compile every C target into out_dir; returns name -> binary. Raises on a compiler error."""
    cc = os.environ.get("CC", "gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    bins: dict[str, Path] = {}
    for name, extra in C_TARGETS.items():
        exe = out_dir / name
        cmd = [cc, *CFLAGS, *extra, "-o", str(exe), str(TARGETS_SRC / f"{name}.c")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{' '.join(cmd)}\n{res.stderr}")
        bins[name] = exe
    return bins


# ----------------------------------------------------------------------------------------------
# The per-test harness


@dataclass
class Restored:
    """The outcome of a restore: the command (finished, or running without -d) and the new process."""

    proc: subprocess.CompletedProcess | subprocess.Popen
    pid: int | None
    target: Target | None
    stdout_path: Path | None = None
    stderr_path: Path | None = None

    @property
    def returncode(self) -> int | None:
        return (
            self.proc.returncode if isinstance(self.proc, subprocess.CompletedProcess) else self.proc.poll()
        )

    @property
    def stderr(self) -> str:
        if isinstance(self.proc, subprocess.CompletedProcess):
            return self.proc.stderr or ""
        return (
            self.stderr_path.read_text(errors="replace")
            if self.stderr_path and self.stderr_path.exists()
            else ""
        )


# Targets that drop root after starting: a restore opens their files (executable, log) only as their own
# credentials could (README, "Trust model"), so the directories leading to them must be searchable by others.
DROPS_PRIVILEGES = {"misc"}


def searchable_by_all(d: Path) -> None:
    """o+x on `d` and each directory above it up to /tmp (pytest makes its temporary directories 0700)."""
    d = d.resolve()
    while d != d.parent and d != Path("/tmp"):
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod((mode & 0o7777) | 0o001)
        d = d.parent


@dataclass
class Harness:
    """Starts targets and lazarus commands for one test and cleans up after it."""

    bins: dict[str, Path]
    work: Path
    procs: list[Proc] = field(default_factory=list)
    popens: list[subprocess.Popen] = field(default_factory=list)
    _counter: int = 0
    # Where files that a restore opens as another uid than root go (conftest.py open_root), or None: in `work`.
    open_work: Path | None = None

    # -- paths -------------------------------------------------------------------------------

    def path(self, stem: str) -> Path:
        """A fresh, not yet existing path in the work dir."""
        self._counter += 1
        return self.work / f"{stem}-{self._counter}"

    def image_dir(self, stem: str = "img") -> Path:
        return self.path(stem)

    # -- targets -----------------------------------------------------------------------------

    def register(self, pid: int, what: str) -> None:
        self.procs.append(Proc(pid, start_time(pid), what))

    def start_target(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        wait_ready: bool = True,
        python: str = "system",
    ) -> Target:
        """Start a target with stdio on /dev/null in a new session and wait for READY.

        name is a C target or "pyscript" (run by target_python(python)). stdout=subprocess.PIPE
        gives the harness the other end of the target's stdout (the "pipe to another process"
        unsupported case)."""
        log = self.path(f"{name}.log")
        if name in DROPS_PRIVILEGES:
            if self.open_work is not None:
                log = self.open_work / log.name
            searchable_by_all(log.parent)
            searchable_by_all(self.bins[name].parent)
        if name in PY_TARGETS:
            exe = target_python(python)
            argv = [str(exe), "-I", str(TARGETS_SRC / f"{name}.py"), str(log), *args]
        else:
            exe = self.bins[name]
            argv = [str(exe), str(log), *args]
        full_env = {k: v for k, v in os.environ.items() if k != "LAZ_SELFTEST_CORRUPT"}
        full_env.update(env or {})
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=full_env,
            cwd=self.work,
        )
        self.popens.append(popen)
        self.register(popen.pid, f"target {name}")
        target = Target(name, popen.pid, log, exe, popen, 0, tuple(args))
        if wait_ready and not wait_for_line(log, "READY", ready_timeout, proc=popen):
            raise AssertionError(f"target did not get READY within {ready_timeout} s: {target.describe()}")
        for line in target.log_text().splitlines():  # a target's own children (unsupported child)
            if line.startswith("# child: "):
                self.register(int(line.split()[-1]), f"child of {name}")
        return target

    def start_case(self, case: Case, env: dict[str, str] | None = None, selftest: bool = False) -> Target:
        args = case.selftest_args if selftest and case.selftest_args is not None else case.args
        target = self.start_target(case.target, *args, env=env)
        self.settle(case, target)
        return target

    def settle(self, case: Case, target: Target, timeout: float = 10.0) -> None:
        """Wait until the target sleeps where the case says it waits (no-op for running targets)."""
        if case.syscall is not None and not wait_in_syscall(target.pid, case.syscall, timeout, restarted=True):
            raise AssertionError(
                f"{case.id}: pid {target.pid} not sleeping in syscall {case.syscall} "
                f"(now: {in_syscall(target.pid)}, state {proc_state(target.pid)}): {target.describe()}"
            )

    def trigger(self, case: Case, target: Target) -> None:
        """Send the case's trigger to the target (after the log mark: results come after it)."""
        if case.trigger == "usr2":
            target.signal(signal.SIGUSR2)
        elif case.trigger == "pipe":
            with open(f"/proc/{target.pid}/fd/{SLEEPER_WAKEUP_FD}", "wb", buffering=0) as f:
                f.write(WAKEUP)
        elif case.trigger != "none":
            raise ValueError(f"unknown trigger {case.trigger}")

    def run_case(self, case: Case, target: Target) -> str:
        """Settle, trigger and wait for the result of a target (original or restored).
        Targets without a trigger finish on their own and are not waited for in their syscall."""
        if case.trigger != "none":
            self.settle(case, target)
            if case.target == "fds":
                # A lazily restored process holds one fd of its own userfaultfd until all its pages are in
                # (README, lazy restore): the target's fd census must see exactly the original's fds.
                assert wait_lazy_complete(target.pid), f"pid {target.pid} still holds a userfaultfd"
            self.trigger(case, target)
        else:
            # A timed sleep (sleeper nanosleep/sleep) checks it did not end before its due time; that proves
            # something of a restored one (no Popen) only if dump and restore ended before that time.
            due = logged_due(target.log) if target.popen is None else None
            if due is not None:
                late = time.monotonic() - due
                assert late < 0, (f"{case.id}: dump and restore ended {late:.2f} s after the sleep's due time, so "
                                  f"an early end would go unseen (machine overloaded?): {target.describe()}")
        return target.wait_result(case.timeout)

    # -- lazarus -----------------------------------------------------------------------------

    def lazarus(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `python -m lazarus ARGS` from the repository root and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "lazarus", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def dump(
        self,
        target: Target | int,
        image_dir: Path,
        *extra: str,
        timeout: float = 120.0,
        reap_original: bool = True,
    ) -> subprocess.CompletedProcess:
        """`lazarus dump -t PID -D DIR EXTRA`. After a successful dump that did not
        --leave-running, the original is waited for (and reaped) so its pid is free again."""
        pid = target if isinstance(target, int) else target.pid
        tree = descendants(pid)
        res = self.lazarus("dump", "-t", str(pid), "-D", str(image_dir), *extra, timeout=timeout)
        if (
            reap_original
            and isinstance(target, Target)
            and res.returncode == 0
            and "--leave-running" not in extra
        ):
            target.wait_exit(10.0)
            for kid in tree:  # orphans adopted by us (a subreaper) once the tree was killed: their pids free up
                reap(kid, 5.0)
        return res

    def restore(
        self,
        image_dir: Path,
        *extra: str,
        detach: bool = True,
        lazy: bool = False,
        like: Target | None = None,
        timeout: float = 120.0,
    ) -> Restored:
        """`lazarus restore -D DIR [-d] --pidfile F [--lazy] EXTRA`.

        detach=True runs the command to completion; detach=False leaves it running (it exits
        with the restored process) and waits for the pidfile. The restored pid is registered for
        cleanup; with `like` (the original Target) a Target for the restored process is made."""
        pidfile = self.path("restore.pid")
        # Whatever the log gets from now on comes from the restored process.
        since = like.log.stat().st_size if like is not None and like.log.exists() else 0
        args = ["restore", "-D", str(image_dir), "--pidfile", str(pidfile)]
        if detach:
            args.append("-d")
        if lazy:
            args.append("--lazy")
        args.extend(extra)
        if detach:
            cp = self.lazarus(*args, timeout=timeout)
            pid = read_pidfile(pidfile) if cp.returncode == 0 else None
            result = Restored(cp, pid, None)
        else:
            out, err = self.path("restore.stdout"), self.path("restore.stderr")
            with open(out, "wb") as fo, open(err, "wb") as fe:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "lazarus", *args],
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                )
            self.popens.append(popen)
            self.register(popen.pid, "lazarus restore")
            pid = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and popen.poll() is None:
                pid = read_pidfile(pidfile)
                if pid is not None:
                    break
                time.sleep(0.02)
            if pid is None:
                pid = read_pidfile(pidfile)
            result = Restored(popen, pid, None, out, err)
        if result.pid is not None:
            self.register(result.pid, "restored process")
            if like is not None:
                restored = Target(like.name, result.pid, like.log, like.exe, None, since, like.args)
                wait_restored(restored, timeout=30.0)
                result.target = restored
        return result

    # -- cleanup -----------------------------------------------------------------------------

    def cleanup(self, grace: float = 5.0) -> list[str]:
        """Kill by pid everything this harness started or adopted; returns descriptions of
        processes that were left behind by someone else (orphans adopted by pytest)."""
        ours = [proc for proc in self.procs if proc.same()]
        for proc in ours:
            # A process tree: its descendants first (a stopped one would never exit by itself).
            for pid in descendants(proc.pid):
                Proc(pid, start_time(pid), "descendant").kill()
            proc.kill()
        for popen in self.popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5.0)
            for stream in (popen.stdin, popen.stdout, popen.stderr):
                if stream is not None:
                    stream.close()
        known = {p.pid for p in self.popens}
        for proc in ours:
            if proc.pid not in known:
                reap(proc.pid, 2.0)
        self.procs.clear()
        self.popens.clear()
        return reap_orphans(known, grace)


def reap_orphans(known: Iterable[int] = (), grace: float = 5.0) -> list[str]:
    """Wait up to `grace` for adopted children of this (subreaper) process to exit, then kill
    and reap the rest. Returns a description of each one that had to be killed."""
    known = set(known)
    deadline = time.monotonic() + grace
    leftovers: list[str] = []
    while True:
        orphans = {pid for pid in children_of(os.getpid()) if pid not in known}
        live = [pid for pid in orphans if is_alive(pid)]
        for pid in orphans - set(live):
            reap(pid, 0.5)
        if not live:
            return leftovers
        if time.monotonic() >= deadline:
            for pid in live:
                leftovers.append(f"pid {pid} ({comm(pid)})")
                Proc(pid, start_time(pid), "orphan").kill()
                reap(pid, 2.0)
            return leftovers
        time.sleep(0.05)


def read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def wait_restored(target: Target, timeout: float = 30.0) -> None:
    """Wait until the restored pid runs the target's executable untraced. A process that already
    ended (a quick target) is accepted: its log tells how it went."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not is_alive(target.pid):
            return
        try:
            exe = os.readlink(f"/proc/{target.pid}/exe")
            status = Path(f"/proc/{target.pid}/status").read_text()
        except OSError as e:
            last = str(e)
        else:
            tracer = re.search(r"^TracerPid:\s*(\d+)", status, re.M)
            state = re.search(r"^State:\s*(\S)", status, re.M)
            if (
                os.path.realpath(exe) == os.path.realpath(target.exe)
                and tracer is not None
                and tracer.group(1) == "0"
                and state is not None
                and state.group(1) not in ("t", "T", "Z", "X")
            ):
                return
            last = f"exe {exe}, tracer {tracer and tracer.group(1)}, state {state and state.group(1)}"
        time.sleep(0.02)
    raise AssertionError(f"restored pid {target.pid} not running {target.exe} within {timeout} s ({last})")


# ----------------------------------------------------------------------------------------------
# Checks shared by the tests


def assert_clean_error(res: subprocess.CompletedProcess, *patterns: str, status: int = 1) -> str:
    """A failed lazarus command: exit status 1 (what the README promises; 2 is argparse's usage error),
    stderr exactly one line starting "lazarus: error:", no traceback anywhere, and each regex pattern found
    in that line."""
    out = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == status, f"expected exit status {status}: {out}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, f"traceback: {out}"
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"stderr must be one line: {out}"
    assert lines[0].startswith("lazarus: error:"), f"stderr must start 'lazarus: error:': {out}"
    for pattern in patterns:
        assert re.search(pattern, lines[0], re.I), f"error should match /{pattern}/: {out}"
    return lines[0]


def snapshot(pid: int) -> dict[str, object]:
    """What a refused dump must leave unchanged: signal state, threads, seccomp, tracer,
    mappings, fds (number -> target) and cwd."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {}
    for key in (
        "SigPnd",
        "ShdPnd",
        "SigBlk",
        "SigIgn",
        "SigCgt",
        "Threads",
        "Seccomp",
        "NoNewPrivs",
        "TracerPid",
    ):
        m = re.search(rf"^{key}:\s*(.*)$", status, re.M)
        fields[key] = m.group(1).strip() if m else None
    fds = {}
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return {
        "status": fields,
        "maps": Path(f"/proc/{pid}/maps").read_text(),
        "fds": fds,
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "start": start_time(pid),
    }


def diff_snapshots(before: dict[str, object], after: dict[str, object]) -> list[str]:
    out = []
    for key in before:
        if before[key] != after[key]:
            out.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    return out


def refused_unchanged(
    harness: Harness,
    case: Case,
    target: Target,
    pattern: str,
    *,
    ignore_status: tuple[str, ...] = (),
    after_dump: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess:
    """Dump target: refused with one clean line matching pattern, nothing left next to the image, the process
    alive and exactly as it was (snapshot() but the status fields in ignore_status, its children); then it
    PASSes its own checks and exits 0. after_dump runs right after the dump, whatever its outcome (to let go
    of what made the dump refuse). Returns the dump's result."""
    harness.settle(case, target)
    before = snapshot(target.pid)
    children = children_of(target.pid)
    image = harness.image_dir()
    try:
        res = harness.dump(target, image)
    finally:
        if after_dump is not None:
            after_dump()

    assert_clean_error(res, pattern)
    assert sibling_leftovers(image) == [], f"dump left {sibling_leftovers(image)} next to {image}"
    assert target.alive(), f"the process died: {target.describe()}"
    harness.settle(case, target)
    after = snapshot(target.pid)
    for snap in (before, after):
        snap["status"] = {k: v for k, v in snap["status"].items() if k not in ignore_status}
    changed = diff_snapshots(before, after)
    assert not changed, f"the refused dump changed the process: {changed}"
    assert children_of(target.pid) == children, "the process's children changed"
    expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0
    return res


def find_kernel_thread() -> int | None:
    """A kernel thread's pid (PF_KTHREAD set in /proc/PID/stat flags), preferring kthreadd."""
    pf_kthread = 0x00200000
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[6]) & pf_kthread:
            return pid
    return None


def unused_pid() -> int:
    """A pid no process has now (from the top of the pid space, which the tests do not reach)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free pid")


def image_files(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.iterdir() if p.is_file())


def reseal_task(image: Path, change: Callable[[dict], None], pid: int | None = None) -> None:
    """Edit the image's (only, or pid's) task file and recompute every checksum that covers it (its size and
    xxh3 in the inventory, the inventory's self-check), so that only the change itself is wrong: what a hostile
    writer who recomputes checksums can do."""
    import json

    from lazarus.images.format import hex64, inventory_bytes, inventory_self_check, json_bytes, xxh3

    (task_path,) = image.glob("task-*.json" if pid is None else f"task-{pid}.json")
    task = json.loads(task_path.read_text())
    change(task)
    data = json_bytes(task)
    task_path.write_bytes(data)
    inv_path = image / "inventory.json"
    inv = json.loads(inv_path.read_text())
    inv["files"][task_path.name].update(size=len(data), xxh3=hex64(xxh3(data)))
    inv["self_check"] = inventory_self_check(inv)
    inv_path.write_bytes(inventory_bytes(inv))


def copy_image(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    """XOR one byte (the middle one by default) of a file with 0x01."""
    data = bytearray(path.read_bytes())
    if not data:
        raise ValueError(f"{path} is empty")
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def sibling_leftovers(image_dir: Path) -> list[str]:
    """Anything named like image_dir (DIR, DIR.tmp-*) next to it."""
    return sorted(p.name for p in image_dir.parent.iterdir() if p.name.startswith(image_dir.name))


def expect_pass(result: str, *context: str | Target | subprocess.CompletedProcess | Restored) -> None:
    """Assert a result line is PASS, with everything useful in the message otherwise."""
    if result == "PASS":
        return
    parts = [result]
    for c in context:
        if isinstance(c, Target):
            parts.append(c.describe())
        elif isinstance(c, subprocess.CompletedProcess):
            parts.append(f"{' '.join(map(str, c.args))}: exit {c.returncode}\n{c.stdout}{c.stderr}")
        elif isinstance(c, Restored):
            parts.append(f"restore: exit {c.returncode}\n{c.stderr}")
        else:
            parts.append(str(c))
    raise AssertionError("\n".join(parts))


def argv_str(args: Sequence[object]) -> str:
    return " ".join(str(a) for a in args)


def dump_with_then_restore(harness: Harness, case: Case, lazy: bool, *dump_args: str) -> None:
    """Dump `case` with `dump_args` (the original ends), restore it, and have it pass its own check and exit 0:
    the shape of every test of a dump option (--direct, --no-sync)."""
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image, *dump_args)
    assert res.returncode == 0, res.stderr
    assert not target.alive(), f"the original pid {target.pid} still runs after the dump"
    inv = json.loads((image / "inventory.json").read_text())
    assert inv["files"][f"pages-{target.pid}.img"]["size"] > 0
    r = harness.restore(image, lazy=lazy, like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def fork_dump(body: Callable[[int], int]) -> tuple[int, list[int]]:
    """Run body(w) in a forked child whose dump reports its watchdog's pid on the pipe `w` first (Watchdog.start
    wrapped); the child exits with body's return value, or 1 if it raised (the error printed). Returns the
    child's wait status and the integers written to `w` (the watchdog's pid, then whatever body wrote)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            from lazarus.dump.watchdog import Watchdog

            start = Watchdog.start

            def tell_pid(target_pid: int, prepared: Watchdog | None = None) -> Watchdog:
                wd = start(target_pid, prepared)
                os.write(w, f"{wd.pid}\n".encode())
                return wd

            Watchdog.start = tell_pid  # type: ignore[method-assign]
            code = body(w)
        except BaseException as e:  # noqa: BLE001 - report anything, the parent asserts
            print(f"dump failed: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = [int(x) for x in f.read().split()]
    _, status = os.waitpid(child, 0)
    return status, got
