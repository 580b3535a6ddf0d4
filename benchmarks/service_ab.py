"""Restores through two restore services (this checkout's and another's), alternating, in one run.

    .venv/bin/python benchmarks/service_ab.py --other /work/main [--sizes 64 1024] [--runs 5] [--modes lazy eager]

Both services (`python -m lazarus service`, each from its checkout's .venv) run side by side. First GET /check
on each, alternately (15 each, 0.1 s apart: the request path alone). Then, for each size and mode, rounds that
alternate which service goes first: a memhog (benchmarks/targets/memhog.c) fills the memory, is dumped through
that service (`sync`: false) and restored through it (`detach`: true; `lazy` for the lazy mode); the client's
clock runs from connect to the whole answer read. The restored process is killed (its pages are not the point).
Prints the medians (and minimums) of the client's clock, of the worker's (`service_seconds`), of the restore's
own (`seconds`), the stops, and the median of each phase of the answer (ms from the worker's accept), with the
load. One untimed round first. For A/B comparisons on a busy machine: both sides see the same load.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service  # noqa: E402  (benchmarks/service.py)
from common import REPO, TARGETS, BenchError, Target, build, set_child_subreaper, wait_pid_gone  # noqa: E402


class Service(service.Service):
    """service.py's, started from another checkout's venv (request and close are service.py's)."""

    def __init__(self, repo: Path, work: Path, name: str) -> None:
        d = work / name
        d.mkdir(mode=0o700)
        self.name = name
        self.socket = str(d / "api.sock")
        self.proc = subprocess.Popen([str(repo / ".venv" / "bin" / "python"), "-m", "lazarus", "service",
                                      "--socket", self.socket], cwd=repo, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listening on" not in line:
            self.close()
            raise BenchError(f"{name}: service did not start: {line}")


def one_restore(svc: Service, binary: Path, work: Path, mib: int, lazy: bool) -> tuple[float, dict[str, Any]]:
    target = Target(binary, work / f"memhog-{svc.name}-{mib}.log", str(mib))
    image = work / f"image-{svc.name}-{mib}"
    try:
        target.wait_ready(timeout=300)
        svc.request("POST", "/dump", {"pid": target.pid, "dir": str(image), "sync": False})
        target.original_gone()
        wait_pid_gone(target.pid, 30)
        time.sleep(0.3)  # the dump's worker gone, a spare ready again
        ans, wall = svc.request("POST", "/restore", {"dir": str(image), "detach": True, "lazy": lazy})
        target.restored()
        return wall, ans
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)
        time.sleep(0.3)


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=Path, required=True, help="the other checkout (with its .venv)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 1024], metavar="MIB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["lazy"], choices=["lazy", "eager"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("service_ab: needs root")
        return 1
    set_child_subreaper()
    work = Path(tempfile.mkdtemp(prefix="lazarus-bench-svcab-"))
    os.chmod(work, 0o700)
    services: list[Service] = []
    try:
        binary = build(TARGETS / "memhog.c", work)
        services = [Service(REPO, work, "this"), Service(args.other.resolve(), work, "other")]
        print(f"this: {REPO}, other: {args.other}; load {os.getloadavg()[0]:.2f}")
        checks: dict[str, list[float]] = {s.name: [] for s in services}
        for _ in range(15):
            for s in services:
                time.sleep(0.1)
                checks[s.name].append(s.request("GET", "/check")[1])
        for name, ts in checks.items():
            print(f"GET /check {name}: median {ms(statistics.median(ts))} (min {ms(min(ts))}) ms")
        for mib in args.sizes:
            for mode in args.modes:
                rows: dict[str, list[tuple[float, dict[str, Any]]]] = {s.name: [] for s in services}
                loads = []
                for i in range(args.runs + 1):
                    for s in (services if i % 2 == 0 else services[::-1]):
                        res = one_restore(s, binary, work, mib, mode == "lazy")
                        if i:
                            rows[s.name].append(res)
                    loads.append(os.getloadavg()[0])
                for name, rs in rows.items():
                    walls = [w for w, _ in rs]
                    ans = [a for _, a in rs]
                    print(f"{mode} {mib} MiB {name} (load {min(loads):.2f}-{max(loads):.2f}): connect to answer "
                          f"{ms(statistics.median(walls))} (min {ms(min(walls))}), worker "
                          f"{ms(statistics.median(a['service_seconds'] for a in ans))}, restore "
                          f"{ms(statistics.median(a['seconds'] for a in ans))} ms, stops {ans[0].get('stops')}")
                    phases: dict[str, list[float]] = {}
                    for a in ans:
                        for k, v in a.get("phases", {}).items():
                            phases.setdefault(k, []).append(v)
                    print("    " + ", ".join(f"{k} {ms(statistics.median(v))}" for k, v in phases.items()))
    except BenchError as e:
        print(f"service_ab: {e}")
        return 1
    finally:
        for s in services:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
