"""Whole `dump` commands of Lazarus variants and CRIU, alternating on fresh memhogs (same window).

    .venv/bin/python benchmarks/dump_ab.py --criu PATH [--other /work/main] [--mib 512 2048] [--runs 3]
                                          [--skip sync no-sync other other-no-sync]

Each round starts one memhog per tool and times `lazarus dump -t PID -D DIR` of this checkout (with the fsync,
the default, and with `--no-sync`, CRIU's durability), of the other checkout if --other is given (its
.venv/bin/lazarus, both ways too), and `criu dump -t PID -D DIR`; every dump kills the original. Prints the medians of the wall
time and of the command's CPU time (user + system, from the kernel's accounting of the reaped child: on this
shared 2-vCPU VM the wall time waits for other sessions, the CPU time much less), CRIU/ours, and the load.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LAZARUS, TARGETS, Target, build, run  # noqa: E402


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criu", required=True)
    ap.add_argument("--other", default=None, help="another checkout to compare (its .venv/bin/lazarus)")
    ap.add_argument("--mib", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sync", "no-sync", "other", "other-no-sync"],
                    help="variants not to run")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dump-ab-", dir=a.dir))
    exe = build(TARGETS / "memhog.c", work)
    tools: dict[str, tuple[list[str], list[str]]] = {
        "sync": (list(LAZARUS), []), "no-sync": (list(LAZARUS), ["--no-sync"]), "criu": ([a.criu], [])}
    if a.other:
        tools["other"] = ([str(Path(a.other) / ".venv/bin/lazarus")], [])
        tools["other-no-sync"] = ([str(Path(a.other) / ".venv/bin/lazarus")], ["--no-sync"])
    for name in a.skip:
        tools.pop(name, None)
    print(f"load {_load()}", flush=True)
    try:
        for mib in a.mib:
            walls: dict[str, list[float]] = {k: [] for k in tools}
            cpus: dict[str, list[float]] = {k: [] for k in tools}
            for i in range(a.runs):
                names = list(tools)
                # A rotating order: this VM's cost of fresh memory drifts within a round.
                for name in names[i % len(names):] + names[:i % len(names)]:
                    argv, extra = tools[name]
                    t = Target(exe, work / f"memhog-{name}-{mib}-{i}.log", str(mib))
                    image = work / f"image-{name}-{mib}-{i}"
                    try:
                        t.wait_ready(timeout=300)
                        c0 = _children_cpu()
                        if name == "criu":
                            image.mkdir()
                            r = run([*argv, "dump", "-t", str(t.pid), "-D", str(image), "-o", "dump.log"]).check()
                        else:
                            r = run([*argv, "dump", "-t", str(t.pid), "-D", str(image), *extra]).check()
                        cpus[name].append(_children_cpu() - c0)
                        t.original_gone()
                        walls[name].append(r.wall)
                    finally:
                        t.kill()
                        shutil.rmtree(image, ignore_errors=True)
            med = {k: statistics.median(v) for k, v in walls.items()}
            cpu = {k: statistics.median(v) for k, v in cpus.items()}
            print(f"{mib:5d} MiB (load {_load()})", flush=True)
            for k in tools:
                ratio = "" if k == "criu" else f"  CRIU/{k} {med['criu'] / med[k]:.2f}x"
                print(f"  {k:8s} wall {med[k]:.3f} s  cpu {cpu[k]:.3f} s{ratio}  "
                      f"(walls {' '.join(f'{w:.3f}' for w in walls[k])})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
