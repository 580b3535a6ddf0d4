"""The copy-on-write figures of issue 9 for the tree it names: a parent with 256 MiB of private memory, a child
that rewrote one page in eight, and a grandchild forked by the child afterwards (benchmarks/targets/cowtree.c).

Prints, as root:
  - the tree's total Pss (sum of `Pss:` in /proc/PID/smaps_rollup) and total Rss (what the tree would take if
    no page were shared any more: a restore that copies each task's pages into it);
  - what lazarus/dump/sharing.py finds: pages shared per pair of tasks, and the time the detection took;
  - the pages a restore that follows docs/IMAGES.md ("Shared objects (format 3)") stores and places: each
    shared page once, in its owner, before that owner forks.

    python benchmarks/cow_tree.py [--mib 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    TARGETS,
    MiB,
    build,
    reap,
    rollup_kib,
    set_child_subreaper,
    wait_for,
)
from lazarus.dump import sharing  # noqa: E402
from lazarus.kernel import abi  # noqa: E402


def measure(mib: int) -> dict[str, object]:
    set_child_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(TARGETS / "cowtree.c", Path(tmp))
        log = Path(tmp) / "cowtree.log"
        proc = os.spawnv(os.P_NOWAIT, str(exe), [str(exe), str(log), str(mib)])
        pids: list[int] = []
        try:
            wait_for("cowtree READY", lambda: log.exists() and "READY" in log.read_text(), 120)
            lines = dict(line.split(" ", 1) for line in log.read_text().splitlines() if " " in line)
            pids = [int(x) for x in lines["tree"].split()]
            addr, size = (int(x, 0) for x in lines["region"].split())
            pss = {p: rollup_kib(p, "Pss") * 1024 for p in pids}
            rss = {p: rollup_kib(p, "Rss") * 1024 for p in pids}
            t0 = time.perf_counter()
            found = sharing.detect(pids)
            took = time.perf_counter() - t0
            names = dict(zip(pids, ("parent", "child", "grandchild"), strict=True))
            in_region = [r for r in found.pages if all(addr <= a < addr + size for _, a in r.at)]
            pairs = sharing.Sharing(pages=tuple(in_region)).pages_between()
            # Pages of the region each task maps, and how many distinct frames they are: what a restore that
            # keeps the sharing places (each shared run once, in its owner).
            npages = size // abi.PAGE_SIZE
            copies = npages * len(pids)
            shared_extra = sum(r.npages * (len(r.at) - 1) for r in in_region)
            return {
                "mib": mib,
                "tree_pss_mib": round(sum(pss.values()) / MiB, 1),
                "per_task_pss_mib": {names[p]: round(v / MiB, 1) for p, v in pss.items()},
                "tree_rss_mib (nothing shared)": round(sum(rss.values()) / MiB, 1),
                "pairs_shared_pages": {f"{names[a]}-{names[b]}": n for (a, b), n in sorted(pairs.items())},
                "region_pages_per_task": npages,
                "region_pages_placed_keeping_sharing": copies - shared_extra,
                "region_pages_placed_copying_each_task": copies,
                "cow_runs": len(in_region),
                "detect_s": round(took, 3),
            }
        finally:
            for p in reversed(pids or [proc]):
                os.kill(p, signal.SIGKILL)
            for p in pids or [proc]:
                reap(p, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = measure(args.mib)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
