"""Helpers shared by the benchmarks: targets, running lazarus, reaping, kernel-limit probes, reference figures.

Every benchmark runs as root from any directory; paths are relative to the repository root. The benchmark
process makes itself a child subreaper so that a restored process (whose parent, `lazarus restore`, exits
after `-d`) is re-parented to it and can be reaped with its exit status.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS = REPO / "benchmarks" / "targets"
REFERENCE = REPO.parent / "shared" / "guide" / "BENCHMARKS.md"   # ../shared/guide/BENCHMARKS.md
# The `lazarus` command as `make install` installs it (lazarus/launcher.py: no site, the code cache), which is
# what a user runs; `python -m lazarus` where it is missing (a run's JSON says which: lazarus_command).
_SCRIPT = Path(sys.executable).with_name("lazarus")
LAZARUS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "lazarus"]
MiB = 1 << 20
PR_SET_CHILD_SUBREAPER = 36  # include/uapi/linux/prctl.h


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# process plumbing


def set_child_subreaper() -> None:
    from lazarus.kernel import abi
    from lazarus.kernel.syscall import syscall
    syscall(abi.SYS.prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, what="prctl(PR_SET_CHILD_SUBREAPER)")


def build(source: Path, outdir: Path, *extra: str) -> Path:
    """gcc -O2 SOURCE into OUTDIR; returns the binary."""
    out = outdir / source.stem
    res = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(source), *extra],
                         capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise BenchError(f"gcc {source.name} failed:\n{res.stderr}")
    return out


def reap(pid: int, timeout: float) -> int | None:
    """Wait for our child `pid`; returns its wait status, or None (timeout, or not our child)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def reap_leftovers(timeout: float) -> None:
    """Reap whatever children were re-parented to us (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Target:
    """A target program started by us: `binary LOGFILE args...`, stdio on /dev/null, its own session.

    Follows the test-target protocol: it logs READY when set up, and PASS/FAIL after SIGUSR2.
    """

    def __init__(self, binary: Path, log: Path, *args: str) -> None:
        self.binary = binary
        self.log = log
        log.unlink(missing_ok=True)
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [str(binary), str(log), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd=log.parent)
        self.pid = self.proc.pid
        self.alive = True

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_ready(self, timeout: float = 120) -> list[str]:
        def ready() -> bool:
            lines = self.lines()
            if any(ln.startswith("FAIL") for ln in lines):
                raise BenchError(f"target {self.pid}: {lines[-1]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"target {self.pid} exited during setup ({self.proc.returncode})")
            return "READY" in lines
        wait_for(f"target {self.pid} to be ready", ready, timeout)
        return self.lines()

    def original_gone(self, timeout: float = 30) -> None:
        """After a dump killed the original: reap it so that its pid is free again."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as e:
                raise BenchError(f"target {self.pid} still runs after its dump") from e
            self.proc = None
        self.alive = False

    def restored(self) -> None:
        """The pid runs again (a restored process, re-parented to us)."""
        self.alive = True

    def is_ours(self) -> bool:
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{self.pid}/exe") == str(self.binary)
        return False

    def check(self, timeout: float = 120) -> str:
        """SIGUSR2, then wait for the result line and the exit; returns "PASS" or raises BenchError."""
        n = len(self.lines())
        os.kill(self.pid, signal.SIGUSR2)
        result = wait_for(f"PASS/FAIL from {self.pid}", lambda: next(
            (ln for ln in self.lines()[n:] if ln.startswith(("PASS", "FAIL"))), None), timeout, 0.02)
        status = reap(self.pid, 30)
        self.alive = False
        if not result.startswith("PASS"):
            raise BenchError(f"restored target {self.pid}: {result}")
        if status is not None and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise BenchError(f"restored target {self.pid} logged PASS but ended with status {status:#x}")
        return result

    def kill(self) -> None:
        """Kill the target if it (still) runs; only ever our own binary at our pid."""
        if self.proc is not None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None
        elif self.alive and self.is_ours():
            os.kill(self.pid, signal.SIGKILL)
            reap(self.pid, 10)
        self.alive = False


def region_of(lines: Iterable[str]) -> tuple[int, int]:
    """(address, length) from the target's "# region ADDR LEN ..." line."""
    for ln in lines:
        m = re.match(r"# region (0x[0-9a-f]+) (\d+)", ln)
        if m:
            return int(m.group(1), 16), int(m.group(2))
    raise BenchError("target did not log its region")


# ---------------------------------------------------------------------------------------------------------
# running lazarus


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall: float

    def check(self) -> Run:
        if self.returncode:
            msg = (self.stderr.strip() or self.stdout.strip()).splitlines()
            raise BenchError(f"{' '.join(self.argv)}: exit {self.returncode}: {msg[-1] if msg else ''}")
        return self


def run(argv: Sequence[str], timeout: float = 600) -> Run:
    """Run a command, timing its wall clock (stdin /dev/null, output captured)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from e
    return Run(list(argv), res.returncode, res.stdout, res.stderr, time.perf_counter() - t0)


def lazarus_dump(target: Target, image: Path, *extra: str) -> Run:
    """`lazarus dump` of `target` into `image`; the original is reaped and its pid is free again."""
    d = lazarus("dump", "-t", str(target.pid), "-D", str(image), *extra).check()
    target.original_gone()
    wait_pid_gone(target.pid, 30)
    return d


def run_until(argv: Sequence[str], what: str, running: Callable[[], bool], t0: float, timeout: float = 300,
              poll: float = 0.00025) -> tuple[float, float, str]:
    """Start a command (a restore) and poll `running` while it works: returns (seconds from t0 until running()
    held, seconds from t0 until the command returned, its stdout and stderr together). Raises BenchError when
    the command fails, or nothing runs or it does not return within `timeout`."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    ran: float | None = None
    try:
        deadline = time.monotonic() + timeout
        while ran is None and proc.poll() in (None, 0):
            if running():
                ran = time.perf_counter() - t0
            elif time.monotonic() > deadline:
                raise BenchError(f"{what}: not running after {timeout:.0f} s")
            else:
                time.sleep(poll)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{what}: the command did not return within {timeout:.0f} s") from e
    finally:
        stop(proc)
    returned = time.perf_counter() - t0
    if proc.returncode:
        lines = output.strip().splitlines()
        raise BenchError(f"{what}: exit {proc.returncode}: {lines[-1] if lines else ''}")
    if ran is None:  # it returned 0 before we saw it run: it must be running now
        wait_for(f"{what}: the restored program to run", running, 30, poll)
        ran = time.perf_counter() - t0
    return ran, returned, output


def cache_bytecode(directory: Path) -> None:
    """Let the Python commands we start keep compiled bytecode in `directory` (PYTHONPYCACHEPREFIX), even if
    PYTHONDONTWRITEBYTECODE is set here: otherwise every `python -m lazarus` compiles its modules from source
    again (tens of ms), which an installed lazarus never does. Nothing is written into the repository."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(directory)


def lazarus(*args: str, timeout: float = 600) -> Run:
    return run([*LAZARUS, *args], timeout)


def reported_ms(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def dump_reported_s(out: str) -> float | None:
    """Seconds from `dumped pid P to DIR: ... in X ms; ...`."""
    ms = reported_ms(out, r"dumped pid \d+ .* in (\d+(?:\.\d+)?) ms")
    return None if ms is None else ms / 1000


def restore_reported(out: str) -> tuple[int, float] | None:
    """(pid, seconds) from `restored pid N in X ms ...`."""
    m = re.search(r"restored pid (\d+) in (\d+(?:\.\d+)?) ms", out)
    return (int(m.group(1)), float(m.group(2)) / 1000) if m else None


def restore_since_start_s(out: str) -> float | None:
    """Seconds from `restored pid N in X ms (Y ms since the command started; ...)`: Y, when printed."""
    ms = reported_ms(out, r"\((\d+(?:\.\d+)?) ms since the command started")
    return None if ms is None else ms / 1000


def python_startup_s(repeat: int = 5) -> float:
    """Median wall time of `python -m lazarus --version`: the interpreter's share of every wall figure."""
    return statistics.median(lazarus("--version", timeout=60).wall for _ in range(repeat))


def interpreter_startup_s(repeat: int = 5) -> float:
    """Median wall time of `python -c pass` (this interpreter, site and all, nothing of lazarus imported)."""
    return statistics.median(run([sys.executable, "-c", "pass"], timeout=60).wall for _ in range(repeat))


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value}; {} if the process is not there."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def status_kib(pid: int, fields: Iterable[str]) -> dict[str, int] | None:
    """Fields of /proc/PID/status given in kB (VmRSS, RssAnon, ...), in KiB; None once the process is gone."""
    st = proc_status(pid)
    if not st:
        return None
    return {f: int(st[f].split()[0]) for f in fields if f in st}


def rollup_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/smaps_rollup (Pss, Rss, ...) in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    except (OSError, StopIteration) as e:
        raise BenchError(f"no {field} in /proc/{pid}/smaps_rollup: {e!r}") from e


def running_untraced(pid: int, exe: Path) -> bool:
    """`pid` runs `exe` (so it is the restored program, not the restorer's fresh clone), no tracer is
    attached and it is not in a stop: a restore has handed it over."""
    try:
        if os.readlink(f"/proc/{pid}/exe") != str(exe):
            return False
    except OSError:
        return False
    st = proc_status(pid)
    return st.get("TracerPid") == "0" and st.get("State", "t")[:1] not in ("t", "T", "Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait until no process has pid `pid` (a killed task's memory can take a while to be freed)."""
    wait_for(f"pid {pid} to be free", lambda: not os.path.exists(f"/proc/{pid}"), timeout, 0.002)


def children(pid: int | None = None) -> list[int]:
    """The children of `pid` (default: ourselves; as a subreaper, also orphans re-parented to us), from
    /proc/PID/task/*/children."""
    out: list[int] = []
    base = f"/proc/{os.getpid() if pid is None else pid}/task"
    with contextlib.suppress(OSError):
        for tid in os.listdir(base):
            with contextlib.suppress(OSError), open(f"{base}/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def is_lazarus_command(pid: int) -> bool:
    """`pid` runs `python -m lazarus ...` or the installed `lazarus` command (a restore command, or a lazy-pages
    daemon or guard it forked)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (b"lazarus" in cmd and b"-m" in cmd) or any(c.endswith(b"/bin/lazarus") for c in cmd[:3])


def lazarus_children(exclude: Iterable[int] = ()) -> list[int]:
    """Our children that run lazarus (a lazy-pages daemon and its guard), but those in `exclude`."""
    skip = set(exclude)
    return [p for p in children() if p not in skip and is_lazarus_command(p)]


def stop(proc: subprocess.Popen[Any] | None) -> None:
    """Kill a command we started if it still runs, and reap it (bounded)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def reap_lazarus_children(exclude: Iterable[int], timeout: float) -> list[int]:
    """Reap the children left by `lazarus restore -d --lazy` (its lazy-pages daemon and that daemon's guard,
    re-parented to us) once they end, waiting at most `timeout` s. Those still running then are killed (only
    processes of `python -m lazarus` that are our children). Returns the pids that had to be killed."""
    skip = set(exclude)
    deadline = time.monotonic() + timeout
    killed: list[int] = []
    while True:
        left = [p for p in children() if p not in skip]
        for p in left:
            reap(p, 0)
        left = [p for p in children() if p not in skip]
        if not left:
            return killed
        if time.monotonic() > deadline:
            for p in left:
                if is_lazarus_command(p):
                    os.kill(p, signal.SIGKILL)
                    reap(p, 10)
                    killed.append(p)
            return killed
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------
# kernel limits measured in the same run


def _populated_buffer(length: int) -> mmap.mmap:
    buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    for off in range(0, length, mmap.PAGESIZE):  # make sure every page is there (MAP_POPULATE is a hint)
        buf[off] = 1
    return buf


def process_vm_readv_gbps(pid: int, address: int, length: int, chunk: int = 64 * MiB) -> float:
    """Rate (GB/s) of reading [address, address+length) of `pid` with process_vm_readv into a reused, already
    populated buffer of `chunk` bytes (lazarus.kernel.vm.read_into, one iovec per call)."""
    from lazarus.kernel import vm
    chunk = min(chunk, length)
    buf = _populated_buffer(chunk)
    try:
        vm.read_into(pid, [(address, chunk)], buf)  # warm the path once
        t0 = time.perf_counter()
        for off in range(0, length, chunk):
            n = min(chunk, length - off)
            vm.read_into(pid, [(address + off, n)], buf)
        return length / (time.perf_counter() - t0) / 1e9
    finally:
        buf.close()


def file_write_gbps(directory: Path, length: int, chunk: int = 16 * MiB) -> float:
    """Rate (GB/s) of writing `length` bytes to a new file in `directory` (write(2) of `chunk`-byte buffers)
    and fsync'ing it: what putting an image of that size on that filesystem costs at least."""
    buf = bytes(range(256)) * (chunk // 256)
    path = directory / f".write-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < length:
            done += os.write(fd, buf[: min(chunk, length - done)])
        os.fsync(fd)
        return length / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def uffdio_copy_gbps(source: Path, length: int, step: int = 2 * MiB) -> float:
    """Rate (GB/s) of filling a fresh, registered anonymous region of `length` bytes here with UFFDIO_COPY ioctls of
    `step` bytes, from `source` mmap'd MAP_PRIVATE and populated first (as a restore reads a page file that
    its checksum pass has already brought in)."""
    from lazarus.kernel.syscall import buffer_address
    from lazarus.kernel.uffd import Outcome, Uffd
    size = os.path.getsize(source)
    if size < step:
        raise BenchError(f"{source}: {size} bytes, too small for a UFFDIO_COPY probe")
    length = min(length, size) // step * step
    fd = os.open(source, os.O_RDONLY)
    try:
        # Writable only so that ctypes can take its address; never written, so no page is copied. (No
        # MAP_POPULATE: on a private writable mapping it would make a private copy of every page.)
        src = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    dst = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        s = 0
        for off in range(0, length, mmap.PAGESIZE):  # fault the whole source in (reads only)
            s += src[off]
        src_addr, dst_addr = buffer_address(src), buffer_address(dst)
        with Uffd.create() as uffd:
            uffd.register(dst_addr, length)
            t0 = time.perf_counter()
            for off in range(0, length, step):
                got, outcome = uffd.copy(dst_addr + off, src_addr + off, step)
                if outcome is not Outcome.DONE:
                    raise BenchError(f"UFFDIO_COPY probe at +{off:#x}: {outcome.name}")
            elapsed = time.perf_counter() - t0
        return length / elapsed / 1e9
    finally:
        dst.close()
        src.close()


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------------------------
# CRIU


def criu_binary(minimum: int = 4, given: str | None = None) -> tuple[str, str] | None:
    """(path, version) of the `criu` given (--criu PATH), else of one on PATH, whose major version is >= minimum;
    None if there is none. `../shared/peers/build-criu` builds CRIU 4.2 and prints its path."""
    path = given or shutil.which("criu")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m or int(m.group(1)) < minimum:
        return None
    return path, ".".join(g for g in m.groups() if g is not None)


def criu_dump(criu: str, target: Target, image: Path) -> Run:
    """`criu dump` of `target` into a new directory `image`; the original is reaped and its pid is free again."""
    image.mkdir()
    d = run([criu, "dump", "-t", str(target.pid), "-D", str(image), "-o", "dump.log"]).check()
    target.original_gone()
    wait_pid_gone(target.pid, 30)
    return d


def criu_lazy_pages(criu: str, image: Path) -> subprocess.Popen[bytes]:
    """Start `criu lazy-pages` for `image` and wait for its socket: `criu restore --lazy-pages` connects to it
    at once and fails (exit 1) if it is not there yet."""
    lp = subprocess.Popen([criu, "lazy-pages", "-D", str(image), "-o", "lazy-pages.log"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = image / "lazy-pages.socket"
    try:
        wait_for(f"criu lazy-pages to make {sock.name}", lambda: sock.exists() or lp.poll() is not None, 30, 0.0005)
        if not sock.exists():
            raise BenchError(f"criu lazy-pages made no {sock.name} (exit {lp.poll()})")
    except BaseException:
        stop(lp)
        raise
    return lp


def criu_lazy_pages_end(lp: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for `criu lazy-pages` to exit (it does once every page is transferred)."""
    try:
        lp.wait(timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError("criu lazy-pages did not end") from e


# ---------------------------------------------------------------------------------------------------------
# reference figures (../shared/guide/BENCHMARKS.md)


@dataclass
class Reference:
    """Tables of the reference file: CRIU rows {label: {MiB: seconds}} and kernel limits {operation: text}."""

    path: Path
    criu_title: str = ""
    criu: dict[str, dict[int, float]] = field(default_factory=dict)
    kernel: dict[str, str] = field(default_factory=dict)

    @property
    def criu_name(self) -> str:
        """"CRIU 4.2" from a title like "CRIU 4.2 (built from source; ...)"."""
        return self.criu_title.split("(")[0].strip() or "CRIU"

    def criu_row(self, prefix: str) -> dict[int, float]:
        for label, row in self.criu.items():
            if label.lower().startswith(prefix.lower()):
                return row
        return {}

    def kernel_gbps(self, prefix: str) -> float | None:
        for label, text in self.kernel.items():
            if label.replace("`", "").lower().startswith(prefix.lower()):
                m = re.search(r"(\d+(?:\.\d+)?)\s*GB/s", text)
                if m:
                    return float(m.group(1))
        return None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_reference(path: Path = REFERENCE) -> Reference | None:
    """Parse the reference figures; None if the file is not there."""
    try:
        text = path.read_text()
    except OSError:
        return None
    ref = Reference(path)
    section = ""
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if section.lower().startswith("criu"):
            ref.criu_title = section
            sizes = [re.match(r"(\d+)\s*MiB", h) for h in header]
            row: dict[int, float] = {}
            for m, c in zip(sizes, cells, strict=False):
                if m:
                    with contextlib.suppress(ValueError):
                        row[int(m.group(1))] = float(c)
            ref.criu[cells[0]] = row
        elif section.lower().startswith("kernel"):
            ref.kernel[cells[0]] = cells[1] if len(cells) > 1 else ""
    return ref


# ---------------------------------------------------------------------------------------------------------
# machine, output


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    thp = ""
    with contextlib.suppress(OSError), open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    return {"kernel": platform.release(), "arch": platform.machine(), "cpu": model, "cpus": os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "thp": thp, "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def source_version() -> str:
    """The commit being measured (`git describe`-like: short hash, "+dirty" with uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (from /proc/self/mounts, longest matching mount point)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


def add_run_arguments(ap: Any, sizes: list[int] | None, *, sizes_nargs: str = "+", sizes_help: str | None = None,
                      warmup_what: str = "size") -> None:
    """The options every benchmark takes: --sizes (unless `sizes` is None), --runs, --json, --workdir, --no-warmup,
    --no-criu, --criu, --markdown."""
    if sizes is not None:
        ap.add_argument("--sizes", type=int, nargs=sizes_nargs, default=sizes, metavar="MIB", help=sizes_help)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    ap.add_argument("--workdir", type=Path, metavar="DIR",
                    help="where images are written (a temporary directory is made inside; default: system temp)")
    ap.add_argument("--no-warmup", action="store_true", help=f"skip the untimed round before each {warmup_what}")
    ap.add_argument("--no-criu", action="store_true", help="do not run criu even if it is installed")
    ap.add_argument("--criu", metavar="PATH", help="the criu binary to measure against (default: criu on PATH; "
                    "../shared/peers/build-criu builds CRIU 4.2 and prints its path)")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown")


def run_info(args: Any, work: Path, criu: tuple[str, str] | None, **extra: Any) -> dict[str, Any]:
    """What a run records about itself: command, date, commit, machine, where the images are, its options."""
    return {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "date": now_iso(),
            "source": source_version(), "machine": machine(), "images_on": filesystem_of(work),
            "sizes": args.sizes, "runs": args.runs, **extra, "warmup": not args.no_warmup,
            "criu": {"path": criu[0], "version": criu[1]} if criu else None,
            "no_criu": bool(getattr(args, "no_criu", False))}


def say_start(out: Out, info: dict[str, Any], work: Path, more: str = "") -> None:
    """The run's first line (date, commit, kernel, CPUs, where the images are, load), and whether CRIU runs."""
    m = info["machine"]
    out.say(f"{info['date']}: lazarus {info['source']}, kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu']}), "
            f"images on {info['images_on']} ({work}), load {' '.join(f'{x:.2f}' for x in m['loadavg'])}{more}")
    if info.get("no_criu"):
        out.say("--no-criu: CRIU is not measured in this run")
    elif not info["criu"]:
        out.say("no criu >= 4 (--criu PATH, or on PATH): CRIU is not measured in this run")


def timed_rounds(out: Out, label: str, runs: int, warmup: bool, one_round: Callable[[], dict[str, Any]],
                 describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """An untimed warm-up round if asked, then `runs` rounds, each reported on a line: "LABEL run i/N" and
    describe(its result)."""
    if warmup:
        out.say(f"{label}: warm-up round (untimed)")
        one_round()
    rounds: list[dict[str, Any]] = []
    for i in range(runs):
        res = one_round()
        rounds.append(res)
        out.say(f"{label} run {i + 1}/{runs}{describe(res)}")
    return rounds


def finish_run(out: Out, info: dict[str, Any], json_path: Path | None) -> None:
    """After the report: say the load recorded by record_end, and write the JSON if asked."""
    out.say(f"load average after: {' '.join(f'{x:.2f}' for x in info['loadavg_after'])}")
    if json_path:
        json_path.write_text(json.dumps(info, indent=2, default=str) + "\n")
        out.say(f"results written to {json_path}")


def record_end(info: dict[str, Any], ref: Reference | None) -> None:
    """The load after the measurements and the reference figures they were set against, into `info`."""
    info["loadavg_after"] = os.getloadavg()
    info["reference"] = {"file": "../shared/guide/BENCHMARKS.md", "title": ref.criu_title,
                         "criu": {k: {str(s): v for s, v in row.items()} for k, row in ref.criu.items()},
                         "kernel": ref.kernel} if ref else None


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ms(seconds: float | None, digits: int = 1) -> str:
    """Seconds shown as milliseconds ("-" for none)."""
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"


def clean_up(work: Path) -> None:
    """At the end of a run, whatever happened: end the lazy-pages daemons and guards left as our children, reap
    what was re-parented to us, remove the temporary directory."""
    with contextlib.suppress(BenchError):
        reap_lazarus_children([], 5)
    reap_leftovers(3)
    shutil.rmtree(work, ignore_errors=True)


class Out:
    """rich when stdout is a terminal, plain lines otherwise; tables are rich tables either way."""

    def __init__(self) -> None:
        from rich.console import Console
        self.tty = sys.stdout.isatty()
        # Not a terminal (a log, a pipe): wide enough that the tables never wrap.
        self.console = Console(highlight=False, width=None if self.tty else 220)

    def say(self, text: str) -> None:
        if self.tty:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> None:
        from rich.table import Table
        t = Table(title=title, caption=caption or None, title_justify="left", caption_justify="left")
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)

    def markdown_tables(self, tables: Iterable[tuple[Sequence[str], Sequence[Sequence[str]]]]) -> None:
        """Print tables (columns, rows) as markdown, each after an empty line."""
        for columns, rows in tables:
            self.say("")
            self.say(self.markdown(columns, rows))

    @staticmethod
    def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
