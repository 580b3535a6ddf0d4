"""Fresh page cache filled by one writer or by two (into one file, or two): why the dump splits its page file.

    .venv/bin/python benchmarks/writers.py [--mib 2048] [--runs 5] [--gap 3] [--dir /var/tmp]

Alternates, round after round, `writers DIR MIB 1 1` (one thread, one file: the dump before the split), `... 2 1`
(two threads into halves of one file) and `... 2 2` (two threads, a file each: the split), GAP seconds apart (long
enough for this VM to hand the memory freed by the last round back to its host, as between two dumps). Prints
the medians of the write time and each way's speed-up over one writer.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TARGETS, build  # noqa: E402

WAYS = {"1 writer, 1 file": ("1", "1"), "2 writers, 1 file": ("2", "1"), "2 writers, 2 files": ("2", "2")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gap", type=float, default=3.0)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="writers-", dir=a.dir))
    try:
        exe = build(TARGETS / "writers.c", work, "-pthread")
        took: dict[str, list[float]] = {k: [] for k in WAYS}
        for i in range(a.runs):
            names = list(WAYS)
            for name in names[i % len(names):] + names[:i % len(names)]:
                time.sleep(a.gap)
                out = subprocess.run([str(exe), str(work), str(a.mib), *WAYS[name]], capture_output=True, text=True,
                                     timeout=600, check=True).stdout
                took[name].append(float(out))
        one = statistics.median(took["1 writer, 1 file"])
        print(f"{a.mib} MiB of fresh page cache, {a.runs} rounds, {a.gap} s apart")
        for name, v in took.items():
            med = statistics.median(v)
            print(f"  {name:20s} {med:.3f} s  {a.mib / 1024 / med:.2f} GiB/s  x{one / med:.2f}  "
                  f"({' '.join(f'{t:.3f}' for t in v)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
