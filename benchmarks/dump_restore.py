"""Dump and eager-restore throughput, against the kernel's limits measured in the same run and CRIU.

For each size N (MiB) a target (benchmarks/targets/memhog.c) fills N MiB of anonymous memory. Each run:
  1. process_vm_readv of the target's region into a populated buffer (the kernel limit for a dump);
  2. `lazarus dump` (wall time, and the time the tool reports); the original is killed and reaped;
  3. `lazarus restore -d` (wall time until it returns with the process running, and the reported time);
  4. SIGUSR2: the restored target checks every word of its memory and must log PASS;
  5. UFFDIO_COPY of the same amount in 2 MiB ioctls, from the dump's page file, into a fresh registered
     anonymous region here (the kernel limit for an eager restore);
  6. writing and fsync'ing a file of the same size next to the images (what the image file costs at least).
One untimed round per size first (the first touch of memory on a fresh VM is slow). Medians of --runs runs.
A CRIU column is added when a `criu` of version >= 4 is on PATH. The CRIU reference figures are read from
../shared/guide/BENCHMARKS.md (relative to the repository root) and printed beside ours.

Run as root: .venv/bin/python benchmarks/dump_restore.py [--sizes 64 512 2048] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    LAZARUS,
    TARGETS,
    BenchError,
    MiB,
    Out,
    Target,
    add_run_arguments,
    build,
    clean_up,
    criu_binary,
    criu_dump,
    dump_reported_s,
    file_write_gbps,
    finish_run,
    fmt,
    gbps,
    lazarus,
    lazarus_dump,
    median,
    process_vm_readv_gbps,
    python_startup_s,
    read_reference,
    record_end,
    region_of,
    restore_reported,
    restore_since_start_s,
    run,
    run_info,
    say_start,
    set_child_subreaper,
    timed_rounds,
    uffdio_copy_gbps,
)

PROBES = 3
METRICS = ("dump_wall", "dump_tool", "restore_wall", "restore_tool", "restore_total", "pvm_gbps", "uffd_gbps",
           "write_gbps", "criu_dump", "criu_restore")


DUMP_ARGS: list[str] = []  # --direct adds "--direct", --no-sync "--no-sync"


def lazarus_round(binary: Path, work: Path, mib: int) -> dict[str, Any]:
    """One dump + eager restore + check of an N MiB target, with the kernel-limit probes around it."""
    target = Target(binary, work / f"memhog-{mib}.log", str(mib))
    image = work / f"image-{mib}"
    pidfile = work / "restored.pid"
    try:
        addr, length = region_of(target.wait_ready(timeout=300))
        out: dict[str, Any] = {"pid": target.pid}
        # Kernel-limit probes: the best of PROBES tries per run (this VM's memory is noisy), median over runs.
        out["pvm_gbps"] = max(process_vm_readv_gbps(target.pid, addr, length) for _ in range(PROBES))

        d = lazarus_dump(target, image, *DUMP_ARGS)
        out["dump_wall"], out["dump_tool"] = d.wall, dump_reported_s(d.stdout)

        pidfile.unlink(missing_ok=True)
        r = lazarus("restore", "-D", str(image), "-d", "--pidfile", str(pidfile)).check()
        target.restored()
        rep = restore_reported(r.stdout + r.stderr)
        restored_pid = int(pidfile.read_text())
        if restored_pid != target.pid or (rep and rep[0] != target.pid):
            raise BenchError(f"restored as pid {restored_pid}, expected {target.pid}")
        out["restore_wall"], out["restore_tool"] = r.wall, rep[1] if rep else None
        out["restore_total"] = restore_since_start_s(r.stdout + r.stderr)
        out["result"] = target.check()

        pages = image / f"pages-{target.pid}.img"
        out["uffd_gbps"] = max(uffdio_copy_gbps(pages, length) for _ in range(PROBES))
        shutil.rmtree(image, ignore_errors=True)
        out["write_gbps"] = file_write_gbps(work, length)
        return out
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def criu_round(criu: str, binary: Path, work: Path, mib: int) -> dict[str, Any]:
    """The same dump + eager restore + check with CRIU."""
    target = Target(binary, work / f"memhog-criu-{mib}.log", str(mib))
    image = work / f"criu-image-{mib}"
    try:
        target.wait_ready(timeout=300)
        d = criu_dump(criu, target, image)
        r = run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log"]).check()
        target.restored()
        return {"criu_dump": d.wall, "criu_restore": r.wall, "criu_result": target.check()}
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def bench_size(out: Out, binary: Path, work: Path, mib: int, runs: int, warmup: bool,
               criu: str | None) -> dict[str, Any]:
    def one_round() -> dict[str, Any]:
        res = lazarus_round(binary, work, mib)
        if criu:
            res.update(criu_round(criu, binary, work, mib))
        return res

    def describe(res: dict[str, Any]) -> str:
        return (f": dump {fmt(res['dump_wall'])} s "
                f"(tool {fmt(res['dump_tool'])}), restore {fmt(res['restore_wall'])} s "
                f"(tool {fmt(res['restore_tool'])}, since start {fmt(res['restore_total'])}), {res['result']}; "
                f"process_vm_readv "
                f"{fmt(res['pvm_gbps'], 2)} GB/s, UFFDIO_COPY 2M {fmt(res['uffd_gbps'], 2)} GB/s, "
                f"write+fsync {fmt(res['write_gbps'], 2)} GB/s"
                + (f"; CRIU dump {fmt(res['criu_dump'])} s, restore {fmt(res['criu_restore'])} s" if criu else ""))

    rounds = timed_rounds(out, f"{mib} MiB", runs, warmup, one_round, describe)
    med = {k: median(r.get(k) for r in rounds) for k in METRICS}
    nbytes = mib * MiB
    rates = {
        "dump_gbps_wall": gbps(nbytes, med["dump_wall"]), "dump_gbps_tool": gbps(nbytes, med["dump_tool"]),
        "restore_gbps_wall": gbps(nbytes, med["restore_wall"]),
        "restore_gbps_tool": gbps(nbytes, med["restore_tool"]),
        "restore_gbps_total": gbps(nbytes, med["restore_total"]),
    }
    ratios = {
        "dump_vs_pvm_wall": _ratio(rates["dump_gbps_wall"], med["pvm_gbps"]),
        "dump_vs_pvm_tool": _ratio(rates["dump_gbps_tool"], med["pvm_gbps"]),
        "dump_vs_write_tool": _ratio(rates["dump_gbps_tool"], med["write_gbps"]),
        "restore_vs_uffd_wall": _ratio(rates["restore_gbps_wall"], med["uffd_gbps"]),
        "restore_vs_uffd_tool": _ratio(rates["restore_gbps_tool"], med["uffd_gbps"]),
        "restore_vs_uffd_total": _ratio(rates["restore_gbps_total"], med["uffd_gbps"]),
    }
    return {"mib": mib, "runs": rounds, "median": med, "rates": rates, "ratios": ratios}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(out: Out, results: list[dict[str, Any]], ref: Any, criu: tuple[str, str] | None, startup: float,
           markdown: bool) -> None:
    # CRIU measured in this run when there is one (figures from another run or machine drift 2-5x); the
    # reference file's figures only otherwise, and labelled so.
    if criu:
        name = f"CRIU {criu[1]} here"
        ref_dump = ref_restore = {}
    else:
        ref_dump = ref.criu_row("dump") if ref else {}
        ref_restore = ref.criu_row("eager restore") if ref else {}
        name = f"{ref.criu_name} ref" if ref else "CRIU ref (missing)"
    cols = ["size", "dump wall", "dump tool", f"dump {name}", "CRIU/ours",
            "restore wall", "restore total", "restore tool", f"restore {name}", "CRIU/ours"]
    rows = []
    for r in results:
        m, mib = r["median"], r["mib"]
        if criu:
            rd, rr = m["criu_dump"], m["criu_restore"]
        else:
            rd, rr = ref_dump.get(mib), ref_restore.get(mib)
        row = [f"{mib} MiB", fmt(m["dump_wall"]), fmt(m["dump_tool"]), fmt(rd), _x(rd, m["dump_wall"]),
               fmt(m["restore_wall"]), fmt(m["restore_total"]), fmt(m["restore_tool"]), fmt(rr),
               _x(rr, m["restore_wall"])]
        rows.append(row)
    caption = (f"median seconds; wall = the whole `{' '.join(LAZARUS)}` command (python start-up alone: "
               f"{startup:.3f} s); tool = the time lazarus reports (restore: from creating the task until it runs); "
               f"total = from the start of the command, as lazarus reports it; CRIU/ours > 1: we are faster (wall)")
    if not criu:
        caption += "; no criu >= 4 on PATH: CRIU not measured here, reference figures only"
    out.table("Lazarus vs CRIU: dump and eager restore", cols, rows, caption)
    tables = [(cols, rows)]

    ref_pvm = ref.kernel_gbps("process_vm_readv") if ref else None
    ref_uffd = ref.kernel_gbps("UFFDIO_COPY, 2 MiB") if ref else None
    cols2 = ["size", "dump wall", "dump tool", "process_vm_readv", "ratio wall", "ratio tool", "write+fsync",
             "ratio tool", "restore wall", "restore total", "restore tool", "UFFDIO_COPY 2M", "ratio wall",
             "ratio total", "ratio tool"]
    rows2 = []
    for r in results:
        m, q, x = r["median"], r["rates"], r["ratios"]
        rows2.append([f"{r['mib']} MiB", fmt(q["dump_gbps_wall"], 2), fmt(q["dump_gbps_tool"], 2),
                      fmt(m["pvm_gbps"], 2), fmt(x["dump_vs_pvm_wall"], 2), fmt(x["dump_vs_pvm_tool"], 2),
                      fmt(m["write_gbps"], 2), fmt(x["dump_vs_write_tool"], 2),
                      fmt(q["restore_gbps_wall"], 2), fmt(q["restore_gbps_total"], 2), fmt(q["restore_gbps_tool"], 2),
                      fmt(m["uffd_gbps"], 2), fmt(x["restore_vs_uffd_wall"], 2), fmt(x["restore_vs_uffd_total"], 2),
                      fmt(x["restore_vs_uffd_tool"], 2)])
    out.table("Throughput (GB/s) against the kernel limits measured in this run", cols2, rows2,
              f"GB = 1e9 bytes of the target's N MiB; kernel probes: best of {PROBES} per run, median over runs; "
              f"write+fsync: one try per run, a file as large as the image next to it; "
              f"ratio = ours / limit; the reference machine's figures: process_vm_readv "
              f"{fmt(ref_pvm, 2)} GB/s, UFFDIO_COPY 2 MiB {fmt(ref_uffd, 2)} GB/s")
    tables.append((cols2, rows2))
    if markdown:
        out.markdown_tables(tables)


def _x(ref: float | None, ours: float | None) -> str:
    return "-" if ref is None or not ours else f"{ref / ours:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Dump and eager restore throughput against kernel limits and CRIU.")
    add_run_arguments(ap, [64, 512, 2048])
    ap.add_argument("--direct", action="store_true", help="dump with `lazarus dump --direct` (O_DIRECT page data; "
                    "the restore that follows then reads the image from the disk)")
    ap.add_argument("--no-sync", action="store_true", help="dump with `lazarus dump --no-sync` (no fsync before "
                    "the original is killed: CRIU's durability)")
    args = ap.parse_args(argv)
    if args.direct:
        DUMP_ARGS.append("--direct")
    if args.no_sync:
        DUMP_ARGS.append("--no-sync")
    out = Out()
    if os.geteuid() != 0:
        out.say("dump_restore: needs root")
        return 1
    if args.runs < 1 or any(s < 1 for s in args.sizes):
        ap.error("--runs and --sizes must be positive")
    set_child_subreaper()
    ref = read_reference()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    work = Path(tempfile.mkdtemp(prefix="lazarus-bench-", dir=args.workdir))
    info = run_info(args, work, criu)
    say_start(out, info, work)
    try:
        binary = build(TARGETS / "memhog.c", work)
        startup = python_startup_s()
        t0 = time.monotonic()
        results = [bench_size(out, binary, work, mib, args.runs, not args.no_warmup, criu[0] if criu else None)
                   for mib in args.sizes]
        info["seconds"] = round(time.monotonic() - t0, 1)
    except BenchError as e:
        out.say(f"dump_restore: {e}")
        return 1
    finally:
        clean_up(work)
    info["python_startup_s"] = startup
    info["results"] = results
    record_end(info, ref)
    report(out, results, ref, criu, startup, args.markdown)
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
