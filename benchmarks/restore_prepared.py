"""What a service worker's preparation saves a lazy restore: restores from workers that called
lazarus.prepare_restore() while idle (guard and seed forked ahead, restore/seed.py) against workers that did not,
alternately, in one run.

A target (benchmarks/targets/memhog.c) fills --sizes MiB and is dumped once (lazarus.dump). Then, 2 x --runs
times, a worker is forked from this warm process as the service forks its spares (imports made, gc frozen, its
copy-on-write faults taken: kernel/prefault.py), waits 50 ms (prepared or not), and restores the image lazily
(lazarus.restore(lazy=True), served by the worker); the clock runs from the call until it returns (the process
runs). The worker then kills the process (its pages are not the point here) and reports the restore's phases
(Restoration.timings) and stops. One restore in each way first, untimed, which must PASS its memory check.

Run as root: .venv/bin/python benchmarks/restore_prepared.py [--sizes 64] [--runs 15]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TARGETS, BenchError, Out, Target, add_run_arguments, build, clean_up, set_child_subreaper

WAYS = ("worker", "prepared")
PHASES = ("wall", "create+clear", "serving setup", "restore.running")


def one(image: Path, way: str, check: bool) -> dict[str, Any]:
    """Fork a worker, restore in it; its report (or raises)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker
        os.close(r)
        code = 1
        try:
            from lazarus import api
            from lazarus.kernel.prefault import unshare_present_pages
            unshare_present_pages()
            if way == "prepared":
                api.prepare_restore()
            time.sleep(0.05)
            t0 = time.perf_counter()
            res = api.restore(image, lazy=True)
            wall = time.perf_counter() - t0
            t = res.timings
            out = {"wall": wall, "stops": res.stops, "seeded": res.seeded, "pid": res.pid,
                   "create+clear": t["restore.cleared"] - t["restore.trampoline"],
                   "serving setup": t["serving"] - t["image"], "restore.running": t["restore.running"]}
            if check:
                os.write(w, json.dumps(out).encode() + b"\n")
                res.serve()  # every page in; the parent checks the process meanwhile
            else:
                os.kill(res.pid, signal.SIGKILL)
                res.close()
                os.waitpid(res.pid, 0)
                os.write(w, json.dumps(out).encode() + b"\n")
            api.release_prepared()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline()
        if check and line:
            return {**json.loads(line), "_worker": pid}
    os.waitpid(pid, 0)
    if not line:
        raise BenchError(f"worker {pid} ({way}) failed")
    return json.loads(line)


def _reap_adopted(pid: int, timeout: float = 30) -> None:
    """The restored process, re-parented to us (a subreaper) when its worker exited: reap it, so that its pid
    is free for the next restore."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Restores from prepared workers against unprepared ones, one run.")
    add_run_arguments(ap, [64])
    ap.set_defaults(runs=15)
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("restore_prepared: needs root")
        return 1
    set_child_subreaper()
    from lazarus import api
    from lazarus.service import warm_up
    warm_up()
    work = Path(tempfile.mkdtemp(prefix="lazarus-bench-prep-", dir=args.workdir))
    os.chmod(work, 0o700)
    results: dict[str, Any] = {"loadavg_start": os.getloadavg()[0], "sizes": {}}
    try:
        binary = build(TARGETS / "memhog.c", work)
        for mib in args.sizes:
            target = Target(binary, work / f"memhog-{mib}.log", str(mib))
            image = work / f"image-{mib}"
            target.wait_ready(timeout=300)
            api.dump(target.pid, image)
            target.original_gone()
            rows: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
            for way in WAYS:  # untimed, checked: the restored process must PASS
                rep = one(image, way, check=True)
                target.restored()
                target.check(timeout=120)
                os.waitpid(rep["_worker"], 0)
                _reap_adopted(target.pid)
                if not rep["seeded"] == (way == "prepared"):
                    raise BenchError(f"{way}: seeded={rep['seeded']}")
            for i in range(2 * args.runs):
                way = WAYS[i % 2]
                rows[way].append(one(image, way, check=False))
                time.sleep(0.05)
            load = os.getloadavg()[0]
            table = []
            for k in PHASES:
                vals = {w: [r[k] for r in rows[w]] for w in WAYS}
                table.append([k] + [f"{statistics.median(vals[w]) * 1e3:.2f} ({min(vals[w]) * 1e3:.2f})"
                                    for w in WAYS])
            table.append(["stops"] + [str(rows[w][0]["stops"]) for w in WAYS])
            out.table(f"{mib} MiB, lazy, {args.runs} restores each way, load {load:.2f}: ms, median (min)",
                      ["", "unprepared worker", "prepared worker"], table)
            results["sizes"][str(mib)] = {"loadavg": load, "rows": rows}
            target.kill()
    except BenchError as e:
        out.say(f"restore_prepared: {e}")
        return 1
    finally:
        clean_up(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
