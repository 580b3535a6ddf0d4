"""Lazy restore: time until the process runs, time until every page is in, and the fault round trip, against the
kernel's limits measured in the same run and CRIU.

For each size N (MiB) a target (benchmarks/targets/memhog.c) fills N MiB of anonymous memory. Each run:
  1. `lazarus dump`; the original is killed and reaped (and its pid is free again);
  2. `lazarus restore -d --lazy --stats FILE` with background transfer (the default). Three times until the
     process runs: (a) the "restored pid N in X ms" lazarus reports (restore_task: from creating the task until
     it is detached), (b) its "Y ms since the command started", and (c) the wall time measured here from
     spawning the command until the restored pid runs its own program, untraced and not stopped (polling
     /proc/PID/exe and /proc/PID/status every 0.25 ms);
  3. the lazy-pages daemon writes the stats when every page is in: time_to_complete_s (from the daemon's
     start, i.e. about the start of the restore), per-process seconds (from the handoff), background rate;
  4. SIGUSR2: the restored target checks every word of its memory and must log PASS;
  5. UFFDIO_COPY of the same amount in 2 MiB ioctls from the dump's page file (mmap'd, populated) into a fresh
     registered region here, 3 times just before the restore and 3 times after the check: the kernel limit the
     background transfer is compared with is the median of these 6 (the VM fills memory it has just freed
     much faster than memory it has handed back to its host, so the restore and the probes must get memory in
     the same state).
  `python -c pass` is timed in every run too: the interpreter start-up inside (b) and (c).

Fault round trip: benchmarks/targets/faulter.c holds --fault-mib MiB, and after SIGUSR2 reads one word of
each of --faults pages lying in distinct random 64 KiB windows (the server fills the aligned 16-page window
around a fault, so each of these reads is a fault of its own), timing each read with CLOCK_MONOTONIC. Each run:
  1. the raw kernel round trip of benchmarks/uffd_rates.py (poll + read + UFFDIO_COPY of one page, which
     wakes the faulter, across processes; its helper reads pages in order);
  2. faulter dumped, restored with `--lazy --no-background`, touches, logs median/p99, checks all its memory;
  3. the raw round trip again (the server is compared with the mean of the raw figures around it);
  4. faulter in "raw" mode served by the same minimal handler, copying per fault 1 page (what the lazy
     server does for these scattered touches), the aligned 16-page window in one UFFDIO_COPY, and the
     faulting page first, then the rest of the window without waking (same program and touches as the
     restored one: what a window would cost here; the server fills one only for faults near the last one).
All of this three times: serving side and faulter pinned to one CPU, pinned to two different CPUs, and
unpinned. On this VM a round trip costs ~15 us within one CPU and ~70 us across two (waking a halted vCPU),
so an unpinned pair lands on either at random and the ratio of two unpinned figures means little.

One untimed round per size (and for the faults) first: the first touch of memory on this VM is slow. The
lazarus commands keep their compiled bytecode in the temporary directory even when PYTHONDONTWRITEBYTECODE is
set (as an installed lazarus would have it; --no-bytecode-cache leaves the environment as it is).
Medians over --runs runs. A CRIU column is added when a `criu` of version >= 4 is on PATH; the CRIU reference
figures are read from ../shared/guide/BENCHMARKS.md (relative to the repository root) and shown beside ours.

Run as root: .venv/bin/python benchmarks/lazy_restore.py [--sizes 64 1024 4096] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import (
    LAZARUS,
    REPO,
    TARGETS,
    BenchError,
    MiB,
    Out,
    Target,
    add_run_arguments,
    build,
    cache_bytecode,
    clean_up,
    criu_binary,
    criu_dump,
    criu_lazy_pages,
    criu_lazy_pages_end,
    finish_run,
    fmt,
    gbps,
    interpreter_startup_s,
    lazarus_children,
    lazarus_dump,
    median,
    ms,
    python_startup_s,
    read_reference,
    reap_lazarus_children,
    record_end,
    region_of,
    restore_reported,
    restore_since_start_s,
    run,
    run_info,
    run_until,
    running_untraced,
    say_start,
    set_child_subreaper,
    stop,
    timed_rounds,
    uffdio_copy_gbps,
    wait_for,
)

PROBES = 3
POLL_S = 0.00025
WINDOW_PAGES = 16  # the lazy server's default fault_batch: pages filled around a fault
# How the minimal handler serves the raw faulter: (key, label, pages in the window, faulting page first)
RAW_MODES = (
    ("raw1", "1 page per fault (as the lazy server for scattered faults)", 1, False),
    ("raw16", f"the aligned {WINDOW_PAGES}-page window per fault, one UFFDIO_COPY",
     WINDOW_PAGES, False),
    ("rawfirst", f"the faulting page first (wakes), then the rest of the {WINDOW_PAGES}-page window with "
     "DONTWAKE", WINDOW_PAGES, True),
)
UFFDIO_COPY_MODE_DONTWAKE = 1
PAGE = mmap.PAGESIZE
SIZE_METRICS = ("tool_s", "since_start_s", "running_wall_s", "command_wall_s", "python_c_pass_s",
                "complete_s", "process_s", "background_gbps", "uffd_gbps", "uffd_best_gbps", "pages_fault",
                "pages_background", "criu_running_s", "criu_complete_s")
FAULT_METRICS = ("server_med_us", "server_p99_us", "server_max_us", "own_med_us", "own_p99_us",
                 "raw_med_us", "raw_p99_us", "ratio_med", "ratio_p99", "restore_tool_s", "faults",
                 *(f"{key}_{x}" for key, *_ in RAW_MODES for x in ("med_us", "p99_us", "ratio_med", "ratio_p99")))


# ---------------------------------------------------------------------------------------------------------
# a lazy restore, timed


def lazy_restore(image: Path, target: Target, work: Path, *extra: str, complete_timeout: float) -> dict[str, Any]:
    """`lazarus restore -D IMAGE -d --lazy --stats F [extra]` of `target` (its pid must be free); returns the
    three times until it runs, and what finish() needs to wait for the lazy-pages daemon's stats. With
    --no-background the daemon ends only when the target does: check the target before calling finish()."""
    stats_path = work / "lazy-stats.json"
    pidfile = work / "restored.pid"
    lazy_log = work / "lazy-pages.log"
    for f in (stats_path, pidfile, lazy_log):
        f.unlink(missing_ok=True)
    argv = [*LAZARUS, "restore", "-D", str(image), "-d", "--lazy", "--stats", str(stats_path), "--pidfile",
            str(pidfile), "--lazy-log", str(lazy_log), *extra]
    what = f"lazarus restore --lazy of {target.pid}"
    running, command_wall, output = run_until(argv, what, lambda: running_untraced(target.pid, target.binary),
                                              time.perf_counter(), timeout=120, poll=POLL_S)
    target.restored()
    rep = restore_reported(output)
    if rep is None or rep[0] != target.pid or int(pidfile.read_text()) != target.pid:
        raise BenchError(f"restore of {target.pid}: unexpected report {output.strip()!r}")
    return {"tool_s": rep[1], "since_start_s": restore_since_start_s(output), "running_wall_s": running,
            "command_wall_s": command_wall, "stats_path": stats_path, "lazy_log": lazy_log,
            "complete_timeout": complete_timeout}


def finish(res: dict[str, Any], target_pid: int) -> dict[str, Any]:
    """Wait (bounded) for the daemon's stats file, reap the daemon and its guard; returns the stats."""
    path: Path = res["stats_path"]
    try:
        wait_for("the lazy-pages daemon's stats", path.exists, res["complete_timeout"], 0.01)
    except BenchError as e:
        log = res["lazy_log"].read_text() if res["lazy_log"].exists() else ""
        raise BenchError(f"{e}; lazy-pages log: {log.strip()[-500:]}") from None
    stats: dict[str, Any] = json.loads(path.read_text())
    killed = reap_lazarus_children([target_pid], 30)
    if killed:
        raise BenchError(f"lazy-pages daemon/guard {killed} did not end after writing its stats (killed)")
    if stats.get("lost"):
        raise BenchError(f"lazy server lost processes: {stats['lost']}")
    return stats


def our_process(stats: dict[str, Any], pid: int) -> dict[str, Any]:
    for p in stats.get("processes", []):
        if p.get("pid") == pid:
            return p
    raise BenchError(f"lazy stats do not mention pid {pid}: {stats.get('processes')}")


# ---------------------------------------------------------------------------------------------------------
# 1 + 2: until the process runs, until every page is in


def size_round(binary: Path, work: Path, mib: int) -> dict[str, Any]:
    target = Target(binary, work / f"memhog-{mib}.log", str(mib))
    image = work / f"image-{mib}"
    try:
        _addr, length = region_of(target.wait_ready(timeout=300))
        out: dict[str, Any] = {"pid": target.pid, "loadavg": os.getloadavg()[0],
                               "python_c_pass_s": interpreter_startup_s(3)}
        lazarus_dump(target, image)
        pages = image / f"pages-{target.pid}.img"
        # The kernel limit, taken just before the restore and again after it: memory the VM has just freed is
        # fast to fill and memory it has handed back to the host is slow, so the restore and the probes all
        # get memory in the same state (the probes' memory has just been freed when the restore starts).
        tries = [uffdio_copy_gbps(pages, length) for _ in range(PROBES)]
        r = lazy_restore(image, target, work, complete_timeout=60 + mib / 50)
        stats = finish(r, target.pid)
        out.update({k: r[k] for k in ("tool_s", "since_start_s", "running_wall_s", "command_wall_s")})
        proc = our_process(stats, target.pid)
        if proc["state"] != "complete":
            raise BenchError(f"restored {target.pid}: lazy server says {proc['state']} {proc['reason']}")
        out["complete_s"] = stats["time_to_complete_s"]
        out["process_s"] = proc["seconds"]
        out["background_gbps"] = stats["background_rate_gbps"]
        out["pages_fault"] = stats["pages_fault"]
        out["pages_background"] = stats["pages_background"]
        out["result"] = target.check(timeout=120 + mib / 20)
        tries += [uffdio_copy_gbps(pages, length) for _ in range(PROBES)]
        out["uffd_tries_gbps"] = tries
        out["uffd_gbps"] = median(tries)
        out["uffd_best_gbps"] = max(tries)
        return out
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def criu_round(criu: str, binary: Path, work: Path, mib: int) -> dict[str, Any]:
    """CRIU's local lazy restore of the same target: `criu lazy-pages` in the background, `criu restore
    --lazy-pages -d`; until the process runs = the restore command; until every page is in = until
    lazy-pages exits (it does when everything is transferred). The clock starts with `criu lazy-pages`, as ours
    starts with the restore that forks our daemon, and includes waiting for its socket."""
    target = Target(binary, work / f"memhog-criu-{mib}.log", str(mib))
    image = work / f"criu-image-{mib}"
    lp: subprocess.Popen[bytes] | None = None
    try:
        target.wait_ready(timeout=300)
        criu_dump(criu, target, image)
        t0 = time.perf_counter()
        lp = criu_lazy_pages(criu, image)
        r = run([criu, "restore", "-D", str(image), "--lazy-pages", "-d", "-o", "restore.log"]).check()
        running = time.perf_counter() - t0
        target.restored()
        criu_lazy_pages_end(lp, 60 + mib / 50)
        complete = time.perf_counter() - t0
        return {"criu_running_s": running, "criu_restore_wall_s": r.wall, "criu_complete_s": complete,
                "criu_result": target.check(timeout=120 + mib / 20)}
    finally:
        stop(lp)
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def bench_size(out: Out, binary: Path, work: Path, mib: int, runs: int, warmup: bool,
               criu: str | None) -> dict[str, Any]:
    nbytes = mib * MiB

    def one_round() -> dict[str, Any]:
        res = size_round(binary, work, mib)
        if criu:
            res.update(criu_round(criu, binary, work, mib))
        return res

    def describe(res: dict[str, Any]) -> str:
        return (f" (load {res['loadavg']:.2f}): running after "
                f"(a) {ms(res['tool_s'])} (b) {ms(res['since_start_s'])} (c) {ms(res['running_wall_s'])} ms "
                f"[command {ms(res['command_wall_s'])} ms, python -c pass {ms(res['python_c_pass_s'])} ms]; "
                f"every page in after {fmt(res['complete_s'])} s = {fmt(gbps(nbytes, res['complete_s']), 2)} GB/s "
                f"(process {fmt(res['process_s'])} s, background {fmt(res['background_gbps'], 2)} GB/s, "
                f"{res['pages_fault']} pages by fault); UFFDIO_COPY 2M {fmt(res['uffd_gbps'], 2)} GB/s "
                f"(best {fmt(res['uffd_best_gbps'], 2)}); "
                f"{res['result']}"
                + (f"; CRIU running {fmt(res['criu_running_s'])} s, complete {fmt(res['criu_complete_s'])} s"
                   if criu else ""))

    rounds = timed_rounds(out, f"{mib} MiB", runs, warmup, one_round, describe)
    med = {k: median(r.get(k) for r in rounds) for k in SIZE_METRICS}
    ratios = [(gbps(nbytes, r["complete_s"]) or 0) / r["uffd_gbps"] for r in rounds]
    ratios_best = [(gbps(nbytes, r["complete_s"]) or 0) / r["uffd_best_gbps"] for r in rounds]
    ratios_p = [(gbps(nbytes, r["process_s"]) or 0) / r["uffd_gbps"] for r in rounds]
    ratios_b = [(r["background_gbps"] or 0) / r["uffd_gbps"] for r in rounds]
    derived = {"complete_gbps": gbps(nbytes, med["complete_s"]), "process_gbps": gbps(nbytes, med["process_s"]),
               "ratio_complete": median(ratios), "ratio_complete_best": median(ratios_best),
               "ratio_process": median(ratios_p),
               "ratio_background": median(ratios_b)}
    return {"mib": mib, "runs": rounds, "median": med, "derived": derived}


# ---------------------------------------------------------------------------------------------------------
# 3: fault round trip


def _lat(lines: list[str]) -> tuple[float, float, float]:
    """(median, p99, max) in us from faulter's "# LAT K median_ns p99_ns max_ns"."""
    for ln in lines:
        m = re.match(r"# LAT \d+ (\d+) (\d+) (\d+)", ln)
        if m:
            return int(m.group(1)) / 1000, int(m.group(2)) / 1000, int(m.group(3)) / 1000
    raise BenchError("faulter logged no LAT line")


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this process on `cpus` for a while (None: leave it as it is)."""
    old = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def set_affinity(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(pid, cpus)


def placements() -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """Where the serving side and the faulting process run: {name: (server CPUs, faulter CPUs)}. On this VM a
    round trip between two processes on one CPU costs ~15 us and between two CPUs ~70 us (waking a halted vCPU),
    so an unpinned pair gives either, at random: each placement is measured on its own."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[set[int] | None, set[int] | None]] = {"same CPU": ({cpus[0]}, {cpus[0]})}
    if len(cpus) > 1:
        out["two CPUs"] = ({cpus[0]}, {cpus[1]})
    out["unpinned"] = (None, None)
    return out


def raw_faulter(binary: Path, work: Path, mib: int, k: int, window_pages: int, first: bool,
                place: tuple[set[int] | None, set[int] | None]) -> tuple[float, float, float]:
    """faulter in raw mode, served by a minimal handler here: poll + read + UFFDIO_COPY (which wakes) of the
    aligned window of `window_pages` pages around each fault, from the faulter's memfd; with `first`, the
    faulting page alone first and then the rest of the window with UFFDIO_COPY_MODE_DONTWAKE. Returns its
    LAT (median, p99, max us)."""
    from lazarus.kernel.syscall import buffer_address
    from lazarus.kernel.uffd import PageFault, Uffd

    sock_path = work / "faulter.sock"
    sock_path.unlink(missing_ok=True)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(sock_path))
    lsock.listen(1)
    lsock.settimeout(60)
    src: mmap.mmap | None = None
    uffd = None
    with pinned(place[0]):
        target = Target(binary, work / f"faulter-raw{window_pages}{'f' if first else ''}.log", str(mib), str(k),
                        "raw", str(sock_path))
        try:
            set_affinity(target.pid, place[1])
            try:
                conn, _ = lsock.accept()
            except TimeoutError as e:
                raise BenchError(f"raw faulter: no connection: {target.lines()}") from e
            with conn:
                conn.settimeout(30)
                msg, fds, _, _ = socket.recv_fds(conn, 256, 2)
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                raise BenchError(f"raw faulter sent {len(fds)} descriptors")
            addr, length = (int(x) for x in msg.split())
            uffd = Uffd.adopt(fds[0], require_api=False)
            try:
                src = mmap.mmap(fds[1], length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fds[1])
            base = buffer_address(src)
            target.wait_ready(60)
            span = window_pages * PAGE
            poller = select.poll()
            poller.register(uffd.fd, select.POLLIN)
            os.kill(target.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 120
            assert target.proc is not None
            while target.proc.poll() is None:
                if time.monotonic() > deadline:
                    raise BenchError("raw faulter did not finish within 120 s")
                if not poller.poll(100):
                    continue
                for ev in uffd.read_events():
                    if not isinstance(ev, PageFault):
                        continue
                    lo = max(addr, ev.address & ~(span - 1))
                    hi = min(lo + span, addr + length)
                    if not first:
                        uffd.copy(lo, base + (lo - addr), hi - lo)
                        continue
                    a = ev.address & ~(PAGE - 1)
                    uffd.copy(a, base + (a - addr), PAGE)
                    if a > lo:
                        uffd.copy(lo, base + (lo - addr), a - lo, UFFDIO_COPY_MODE_DONTWAKE)
                    if a + PAGE < hi:
                        uffd.copy(a + PAGE, base + (a + PAGE - addr), hi - a - PAGE, UFFDIO_COPY_MODE_DONTWAKE)
            lines = target.lines()
            if "PASS" not in lines:
                raise BenchError(f"raw faulter: {lines[-1] if lines else 'no result'}")
            return _lat(lines)
        finally:
            if uffd is not None:
                uffd.close()
            target.kill()
            if src is not None:
                src.close()
            lsock.close()
            sock_path.unlink(missing_ok=True)


class RawReference:
    """The raw kernel round trip of benchmarks/uffd_rates.py (its helper and minimal handler, reused)."""

    def __init__(self, work: Path, k: int) -> None:
        import uffd_rates  # benchmarks/uffd_rates.py (loads the C helper of tests/test_uffd.py)

        self.mod = uffd_rates
        self.k = k
        self.dir = work / "uffd-rates"
        self.dir.mkdir(exist_ok=True)
        self.helper = uffd_rates.T.build_helper(self.dir / "bin")
        path = self.dir / "pages.img"
        uffd_rates.T.write_page_file(path, k, 0, 7)
        self.pf = uffd_rates.T.StandInPageFile(path)

    def measure(self, place: tuple[set[int] | None, set[int] | None]) -> tuple[float, float]:
        """(median, p99) us of K first touches, in order, each served by poll + read + UFFDIO_COPY; the
        handler (this process) and the helper placed as `place` says."""
        helper = self.mod.T.Helper
        go = helper.go
        helper_cpus = place[1]

        def placed_go(h: Any) -> None:  # the helper is placed just before it is let go
            set_affinity(h.pid, helper_cpus)
            go(h)

        helper.go = placed_go
        try:
            with pinned(place[0]):
                med, p99 = self.mod.raw_faults(self.helper, self.dir, self.pf, self.k)
        finally:
            helper.go = go
        return float(med), float(p99)


def fault_round(binary: Path, work: Path, mib: int, k: int, raw: RawReference,
                place: tuple[set[int] | None, set[int] | None]) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    r1 = raw.measure(place)
    target = Target(binary, work / "faulter.log", str(mib), str(k))
    image = work / "image-faulter"
    try:
        target.wait_ready(timeout=120)
        lazarus_dump(target, image)
        r = lazy_restore(image, target, work, "--no-background", complete_timeout=120)
        out["restore_tool_s"] = r["tool_s"]
        for daemon in lazarus_children([target.pid]):
            set_affinity(daemon, place[0])
        set_affinity(target.pid, place[1])
        out["result"] = target.check(timeout=120)
        stats = finish(r, target.pid)
        out["server_med_us"], out["server_p99_us"], out["server_max_us"] = _lat(target.lines())
        out["own_med_us"] = stats["fault_latency_us"]["median"]
        out["own_p99_us"] = stats["fault_latency_us"]["p99"]
        out["faults"] = stats["faults"]
        if stats["pages_background"]:
            raise BenchError(f"--no-background restore moved {stats['pages_background']} pages in background")
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)
    r2 = raw.measure(place)
    out["raw_med_us"] = (r1[0] + r2[0]) / 2
    out["raw_p99_us"] = (r1[1] + r2[1]) / 2
    out["ratio_med"] = out["server_med_us"] / out["raw_med_us"]
    out["ratio_p99"] = out["server_p99_us"] / out["raw_p99_us"]
    for key, _label, pages, first in RAW_MODES:
        med, p99, _ = raw_faulter(binary, work, mib, k, pages, first, place)
        out[f"{key}_med_us"], out[f"{key}_p99_us"] = med, p99
        out[f"{key}_ratio_med"] = out["server_med_us"] / med
        out[f"{key}_ratio_p99"] = out["server_p99_us"] / p99
    return out


def bench_faults(out: Out, binary: Path, work: Path, mib: int, k: int, runs: int, warmup: bool) -> dict[str, Any]:
    raw = RawReference(work, k)
    places = placements()
    if warmup:
        out.say(f"fault round trip ({k} faults, {mib} MiB faulter): warm-up round (untimed)")
        fault_round(binary, work, mib, k, raw, places["same CPU"])
    result: dict[str, Any] = {"mib": mib, "faults": k, "placements": {}}

    def describe(res: dict[str, Any]) -> str:
        return (f" (load {res['loadavg']:.2f}): restored faulter median "
                f"{res['server_med_us']:.1f} us p99 {res['server_p99_us']:.1f} us (server's own "
                f"{fmt(res['own_med_us'], 1)}/{fmt(res['own_p99_us'], 1)} us over {res['faults']} faults); "
                f"raw (uffd_rates) {res['raw_med_us']:.1f}/{res['raw_p99_us']:.1f} us: ratio "
                f"{res['ratio_med']:.2f}/{res['ratio_p99']:.2f}; raw faulter: "
                + ", ".join(f"{key} {res[key + '_med_us']:.1f}/{res[key + '_p99_us']:.1f} us"
                            for key, *_ in RAW_MODES)
                + f"; {res['result']}")

    for name, place in places.items():
        rounds = timed_rounds(out, f"faults, {name},", runs, False,
                              functools.partial(fault_round, binary, work, mib, k, raw, place), describe)
        result["placements"][name] = {
            "server_cpus": sorted(place[0]) if place[0] else None,
            "faulter_cpus": sorted(place[1]) if place[1] else None, "runs": rounds,
            "median": {m: median(r.get(m) for r in rounds) for m in FAULT_METRICS}}
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def report(out: Out, info: dict[str, Any], ref: Any, criu: tuple[str, str] | None, markdown: bool) -> None:
    results, faults = info["results"], info.get("faults")
    tables: list[tuple[list[str], list[list[str]]]] = []
    ref_run = ref.criu_row("lazy restore, until the process runs") if ref else {}
    ref_all = ref.criu_row("lazy restore, until every page is in") if ref else {}
    name = ref.criu_name if ref else "CRIU"

    if results:
        cols = ["size", "(a) tool", "(b) since start", "(c) wall to running", "command wall", "python -c pass",
                f"{name} ref", "<= 40 ms"]
        if criu:
            cols.insert(6, f"CRIU {criu[1]} here")
        rows = []
        for r in results:
            m = r["median"]
            meets = [x for x, v in (("a", m["tool_s"]), ("b", m["since_start_s"]), ("c", m["running_wall_s"]))
                     if v is not None and v <= 0.040]
            row = [f"{r['mib']} MiB", ms(m["tool_s"]), ms(m["since_start_s"]), ms(m["running_wall_s"]),
                   ms(m["command_wall_s"]), ms(m["python_c_pass_s"]), ms(ref_run.get(r["mib"])),
                   ", ".join(meets) or "none"]
            if criu:
                row.insert(6, ms(m["criu_running_s"]))
            rows.append(row)
        caption = ("median ms; (a) = \"restored pid N in X ms\" (from creating the task until it is detached); "
                   "(b) = \"Y ms since the command started\" (after the interpreter's start-up); (c) = measured "
                   "here from spawning `python -m lazarus restore` until the pid runs its program untraced; "
                   f"command wall = until the command returned; `python -m lazarus --version` alone: "
                   f"{ms(info['lazarus_version_s'])} ms")
        if ref_run:
            caption += f"; {name} reference sizes: " + ", ".join(f"{s} MiB {ms(v)} ms" for s, v in ref_run.items())
        out.table("Lazy restore: time until the process runs", cols, rows, caption)
        tables.append((cols, rows))

        ref_uffd = ref.kernel_gbps("UFFDIO_COPY, 2 MiB") if ref else None
        cols2 = ["size", "every page in (s)", "GB/s", "UFFDIO_COPY 2M here", "ratio", "best probe", "ratio to best",
                 "per process (s)", "GB/s",
                 "ratio", "background_rate_gbps", "ratio", f"{name} ref (s)", f"{name} ref GB/s",
                 "ref ratio"]
        if criu:
            cols2.insert(12, f"CRIU {criu[1]} here (s)")
        rows2 = []
        for r in results:
            m, d, mib = r["median"], r["derived"], r["mib"]
            rs = ref_all.get(mib)
            rg = gbps(mib * MiB, rs)
            row = [f"{mib} MiB", fmt(m["complete_s"]), fmt(d["complete_gbps"], 2), fmt(m["uffd_gbps"], 2),
                   fmt(d["ratio_complete"], 2), fmt(m["uffd_best_gbps"], 2), fmt(d["ratio_complete_best"], 2),
                   fmt(m["process_s"]), fmt(d["process_gbps"], 2),
                   fmt(d["ratio_process"], 2), fmt(m["background_gbps"], 2), fmt(d["ratio_background"], 2),
                   fmt(rs), fmt(rg, 2), fmt(rg / ref_uffd if rg and ref_uffd else None, 2)]
            if criu:
                row.insert(12, fmt(m["criu_complete_s"]))
            rows2.append(row)
        out.table("Lazy restore with background transfer: time until every page is in", cols2, rows2,
                  "median; every page in = stats time_to_complete_s (from the lazy-pages daemon's start, "
                  "about the start of the restore); per process = from the handoff of the uffd to the last page; "
                  "background_rate_gbps = the server's own rate over its background steps; GB = 1e9 bytes of "
                  f"the target's N MiB; UFFDIO_COPY 2M here = median of the 2x{PROBES} probe tries around the restore "
                  f"({PROBES} just before it, {PROBES} after the check); ratio = rate / that, median of the per-run ratios "
                  f"(target >= 0.9); best probe = the fastest of those tries, ratio to best = rate / that; ref ratio = {name}'s rate / the reference machine's "
                  f"UFFDIO_COPY 2 MiB ({fmt(ref_uffd, 2)} GB/s); reference sizes: "
                  + ", ".join(f"{s} MiB {fmt(v)} s" for s, v in ref_all.items()))
        tables.append((cols2, rows2))

    if faults:
        places = faults["placements"]
        cols3 = ["served by"] + [f"{name}: {x}" for name in places for x in ("median us", "p99 us", "ratio")]
        rows_spec: list[tuple[str, str, str | None]] = [
            ("lazy server (restored faulter, --no-background)", "server", None),
            ("raw handler of uffd_rates.py (1 page, pages in order)", "raw", "ratio"),
            *((f"raw handler, same faulter: {label}", key, f"{key}_ratio") for key, label, *_ in RAW_MODES),
            ("lazy server's own latency (read -> copied)", "own", None),
        ]
        rows3 = []
        for label, key, ratio in rows_spec:
            row = [label]
            for pl in places.values():
                m = pl["median"]
                row += [fmt(m[f"{key}_med_us"], 1), fmt(m[f"{key}_p99_us"], 1),
                        "" if ratio is None else f"{fmt(m[ratio + '_med'], 2)} / {fmt(m[ratio + '_p99'], 2)}"]
            rows3.append(row)
        out.table(f"Fault round trip: {faults['faults']} first touches of pages in distinct 64 KiB windows of "
                  f"{faults['mib']} MiB", cols3, rows3,
                  "median over runs; as seen by the faulting process (CLOCK_MONOTONIC around one read), "
                  "except the last row; ratio = lazy server / that row, median / p99 (per run; for uffd_rates.py "
                  "against the mean of its runs before and after the restore); target <= 1.2; same CPU = server "
                  "(or handler) and faulter both pinned to one CPU, two CPUs = pinned to different CPUs; the "
                  "server's own latency also counts the faults of the faulter's verification pass")
        tables.append((cols3, rows3))

    if markdown:
        out.markdown_tables(tables)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Lazy restore against kernel limits and CRIU.")
    add_run_arguments(ap, [64, 1024, 4096], sizes_nargs="*", sizes_help="target sizes (none: skip parts 1 and 2)",
                      warmup_what="part")
    ap.add_argument("--faults", type=int, default=2000, metavar="K", help="touches for the fault round trip "
                    "(0: skip it)")
    ap.add_argument("--fault-mib", type=int, default=256, metavar="MIB", help="memory of the fault target")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="leave PYTHONDONTWRITEBYTECODE as it is (by default the lazarus commands keep their "
                         "compiled bytecode in the temporary directory, as an installed lazarus would)")
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("lazy_restore: needs root")
        return 1
    if args.runs < 1 or any(s < 1 for s in args.sizes) or args.faults < 0:
        ap.error("--runs and --sizes must be positive")
    if args.faults and args.faults > args.fault_mib * 16:
        ap.error(f"--faults {args.faults} needs --fault-mib >= {(args.faults + 15) // 16}")
    set_child_subreaper()
    ref = read_reference()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    work = Path(tempfile.mkdtemp(prefix="lazarus-lazy-bench-", dir=args.workdir))
    dont_write = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    if not args.no_bytecode_cache:
        cache_bytecode(work / "pycache")
        run([sys.executable, "-m", "compileall", "-q", str(REPO / "lazarus")], timeout=300).check()
    info = run_info(args, work, criu, faults_k=args.faults, fault_mib=args.fault_mib)
    info["bytecode"] = ("compiled every time (PYTHONDONTWRITEBYTECODE)" if dont_write and args.no_bytecode_cache
                        else "cached (PYTHONPYCACHEPREFIX in the temporary directory)" if not args.no_bytecode_cache
                        else "as the environment says")
    say_start(out, info, work, f"; bytecode {info['bytecode']}")
    try:
        memhog = build(TARGETS / "memhog.c", work)
        faulter = build(TARGETS / "faulter.c", work)
        info["lazarus_version_s"] = python_startup_s()
        t0 = time.monotonic()
        info["results"] = [bench_size(out, memhog, work, mib, args.runs, not args.no_warmup,
                                      criu[0] if criu else None) for mib in args.sizes]
        if args.faults:
            info["faults"] = bench_faults(out, faulter, work, args.fault_mib, args.faults, args.runs,
                                          not args.no_warmup)
        info["seconds"] = round(time.monotonic() - t0, 1)
    except BenchError as e:
        out.say(f"lazy_restore: {e}")
        return 1
    finally:
        clean_up(work)
    record_end(info, ref)
    report(out, info, ref, criu, args.markdown)
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
