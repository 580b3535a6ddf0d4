"""Memory of the lazy-pages daemon while it serves restores of growing size: its RSS must stay flat.

For each size N (MiB) a target (benchmarks/targets/memhog.c) fills N MiB, is dumped, and restored with
`lazarus restore -d --lazy --stats FILE` (background transfer on, the default). From the moment the daemon
exists until it writes its stats (every page in), this samples /proc/DAEMON/status every ~2 ms: VmRSS,
RssAnon, RssFile, RssShmem, and the same of the daemon's verify-ahead process (a fork of the daemon that
hashes the page file, lazy/sources.py). Then the target checks every word of its memory (PASS).

The figures printed per size (medians over --runs): peak VmRSS / RssAnon / RssFile of the daemon, peak RssFile
of its verifier, and the transfer (time_to_complete_s and background GB/s from the daemon's stats), so that the
cost of keeping RSS flat (pages of the page file dropped from the daemon's mapping once copied) shows against
the transfer rate. RssAnon is the daemon's own heap (Python objects); RssFile is the page file mapped by it.

Run as root: .venv/bin/python benchmarks/lazy_rss.py [--sizes 256 1024 2048] [--runs 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    LAZARUS,
    REPO,
    TARGETS,
    BenchError,
    Out,
    Target,
    build,
    cache_bytecode,
    children,
    clean_up,
    lazarus_children,
    lazarus_dump,
    median,
    reap_lazarus_children,
    region_of,
    set_child_subreaper,
    status_kib,
)

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
KiB = 1024


def verifier_of(daemon: int) -> int | None:
    """The daemon's verify-ahead child: a fork of the daemon that holds no fd at all (its guard holds some)."""
    for c in children(daemon):
        with contextlib.suppress(OSError):
            if not os.listdir(f"/proc/{c}/fd"):
                return c
    return None


def rss_round(binary: Path, work: Path, mib: int) -> dict[str, Any]:
    target = Target(binary, work / f"memhog-{mib}.log", str(mib))
    image = work / f"image-{mib}"
    stats_path = work / "stats.json"
    stats_path.unlink(missing_ok=True)
    try:
        region_of(target.wait_ready(timeout=300))
        lazarus_dump(target, image)
        argv = [*LAZARUS, "restore", "-D", str(image), "-d", "--lazy", "--stats", str(stats_path),
                "--lazy-log", str(work / "lazy.log")]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=REPO)
        peak = {f: 0 for f in FIELDS}
        vpeak = {f: 0 for f in FIELDS}
        samples = 0
        daemon = verifier = None
        deadline = time.monotonic() + 120 + mib / 20
        while not stats_path.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"{mib} MiB: no stats from the lazy-pages daemon within the time allowed")
            if daemon is None:
                daemon = next(iter(lazarus_children([proc.pid])), None)
            else:
                st = status_kib(daemon, FIELDS)
                if st is None:
                    break
                samples += 1
                for f in FIELDS:
                    peak[f] = max(peak[f], st.get(f, 0))
                if verifier is None:
                    verifier = verifier_of(daemon)
                if verifier is not None:
                    vst = status_kib(verifier, FIELDS)
                    for f in FIELDS:
                        vpeak[f] = max(vpeak[f], (vst or {}).get(f, 0))
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode:
            raise BenchError(f"restore: exit {proc.returncode}: {(stderr or stdout).decode().strip()[-300:]}")
        target.restored()
        stats = json.loads(stats_path.read_text())
        reap_lazarus_children([target.pid], 30)
        result = target.check(timeout=120 + mib / 20)
        if result != "PASS":
            raise BenchError(f"{mib} MiB: restored target: {result}")
        return {"mib": mib, "samples": samples, **{f"peak_{f}_kib": v for f, v in peak.items()},
                **{f"verifier_peak_{f}_kib": v for f, v in vpeak.items()},
                "complete_s": stats["time_to_complete_s"], "background_gbps": stats["background_rate_gbps"],
                "pages_background": stats["pages_background"], "pages_fault": stats["pages_fault"]}
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RSS of the lazy-pages daemon against the size it serves.")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], metavar="MIB")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results there")
    ap.add_argument("--workdir", type=Path, help="where the images go (default: a temporary directory)")
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("lazy_rss: needs root")
        return 1
    set_child_subreaper()
    work = Path(tempfile.mkdtemp(prefix="lazarus-rss-bench-", dir=args.workdir))
    results = []
    try:
        cache_bytecode(work / "pycache")
        memhog = build(TARGETS / "memhog.c", work)
        rss_round(memhog, work, min(args.sizes))  # warm-up (the first touch of memory on this VM is slow)
        for mib in args.sizes:
            rounds = [rss_round(memhog, work, mib) for _ in range(args.runs)]
            med = {k: median(r[k] for r in rounds) for k in rounds[0] if k != "mib"}
            results.append({"mib": mib, "runs": rounds, "median": med})
            out.say(f"{mib:5d} MiB: daemon peak VmRSS {med['peak_VmRSS_kib'] / KiB:7.1f} MiB, RssAnon "
                    f"{med['peak_RssAnon_kib'] / KiB:6.1f} MiB, RssFile {med['peak_RssFile_kib'] / KiB:7.1f} MiB, "
                    f"RssShmem {med['peak_RssShmem_kib'] / KiB:5.1f} MiB; verifier RssFile "
                    f"{med['verifier_peak_RssFile_kib'] / KiB:7.1f} MiB; every page in after "
                    f"{med['complete_s']:.3f} s, background {med['background_gbps'] or 0:.2f} GB/s "
                    f"({int(med['samples'])} samples)")
    except BenchError as e:
        out.say(f"lazy_rss: {e}")
        return 1
    finally:
        clean_up(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
