"""Whole `dump` commands of two Lazarus checkouts and CRIU, alternating on fresh memhogs (same window).

    .venv/bin/python benchmarks/dump_ab.py --criu PATH [--other /work/main] [--mib 512 2048] [--runs 3]

Each round starts one memhog per tool and times `lazarus dump -t PID -D DIR` of this checkout, of the other
checkout (its .venv/bin/lazarus), and `criu dump -t PID -D DIR`; every dump kills the original. Prints the medians
and CRIU/ours.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LAZARUS, TARGETS, Target, build, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criu", required=True)
    ap.add_argument("--other", default="/work/main")
    ap.add_argument("--mib", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dump-ab-", dir=a.dir))
    exe = build(TARGETS / "memhog.c", work)
    tools = {"this": list(LAZARUS), "other": [str(Path(a.other) / ".venv/bin/lazarus")], "criu": [a.criu]}
    try:
        for mib in a.mib:
            walls: dict[str, list[float]] = {k: [] for k in tools}
            for i in range(a.runs):
                names = list(tools)
                # A rotating order: this VM's cost of fresh memory drifts within a round.
                for name in names[i % 3:] + names[:i % 3]:
                    argv = tools[name]
                    t = Target(exe, work / f"memhog-{name}-{mib}-{i}.log", str(mib))
                    image = work / f"image-{name}-{mib}-{i}"
                    try:
                        t.wait_ready(timeout=300)
                        if name == "criu":
                            image.mkdir()
                            r = run([*argv, "dump", "-t", str(t.pid), "-D", str(image), "-o", "dump.log"]).check()
                        else:
                            r = run([*argv, "dump", "-t", str(t.pid), "-D", str(image)]).check()
                        t.original_gone()
                        walls[name].append(r.wall)
                    finally:
                        t.kill()
                        shutil.rmtree(image, ignore_errors=True)
            med = {k: statistics.median(v) for k, v in walls.items()}
            print(f"{mib:5d} MiB  this {med['this']:.3f} s  other {med['other']:.3f} s  criu {med['criu']:.3f} s  "
                  f"CRIU/this {med['criu'] / med['this']:.2f}x  CRIU/other {med['criu'] / med['other']:.2f}x  "
                  f"(this {' '.join(f'{w:.3f}' for w in walls['this'])}; other "
                  f"{' '.join(f'{w:.3f}' for w in walls['other'])}; criu {' '.join(f'{w:.3f}' for w in walls['criu'])})",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
