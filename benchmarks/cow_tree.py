"""The copy-on-write figures of issue 9: a parent with 256 MiB of private memory, a child that rewrote one page
in eight, and a grandchild forked by the child afterwards that wrote nothing (benchmarks/targets/cowtree.c, one
source with tests/targets/cow_tree.c). Run as root:

    .venv/bin/python benchmarks/cow_tree.py [--criu PATH] [--sizes 256] [--runs 3] [--json FILE]

For each tool (ours, and CRIU when there is one; `../shared/peers/build-criu` prints its path), in one run:
  1. the tree's total Pss (sum of `Pss:` in /proc/PID/smaps_rollup) before the dump;
  2. dump, eager restore (`-d`), total Pss, and every process checks its memory (PASS);
  3. a new tree, dumped, restored lazily: total Pss once every page is in (ours: the lazy-pages daemon wrote
     its stats; CRIU: `criu lazy-pages` exited), and the check.
Also what lazarus/dump/sharing.py finds on the tree (pages shared per pair of tasks) and how long it took.
The requirement: Pss after either restore within 1.15x of the original's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trees  # noqa: E402
from common import (  # noqa: E402
    REPO,
    TARGETS,
    BenchError,
    Out,
    Target,
    add_run_arguments,
    build,
    cache_bytecode,
    criu_binary,
    finish_run,
    median,
    reap_lazarus_children,
    reap_leftovers,
    record_end,
    run,
    run_info,
    say_start,
    set_child_subreaper,
    timed_rounds,
)

TOOLS = ("ours", "criu")
KEYS = ("pss_before_mib", "dump_s", "eager_restore_s", "pss_eager_mib", "lazy_running_s", "lazy_complete_s",
        "pss_lazy_mib")


class CowTree(trees.Tree):
    """cowtree LOG MIB still: its three pids from the "# tree" line (the procs and permille are fixed)."""

    def __init__(self, binary: Path, work: Path, mib: int, procs: int, permille: int, tag: str) -> None:
        self.root = Target(binary, work / f"cowtree-{tag}.log", str(mib), "still")
        self.binary = binary
        lines = self.root.wait_ready(timeout=300)
        pids = next((ln.split()[2:] for ln in lines if ln.startswith("# tree ")), None)
        if pids is None or len(pids) != 3:
            raise BenchError(f"cowtree {self.root.pid} logged pids {pids}, expected 3")
        self.pids = [int(p) for p in pids]


def detection(binary: Path, work: Path, mib: int) -> dict[str, Any]:
    """What dump/sharing.py finds on a fresh tree: pages shared per pair, and the time it took."""
    from lazarus.dump import sharing

    tree = CowTree(binary, work, mib, 3, 0, "detect")
    try:
        t0 = time.perf_counter()
        found = sharing.detect(tree.pids)
        took = time.perf_counter() - t0
        names = dict(zip(tree.pids, ("parent", "child", "grandchild"), strict=True))
        pairs = found.pages_between()
        return {"pairs_shared_pages": {f"{names[a]}-{names[b]}": n for (a, b), n in sorted(pairs.items())},
                "detect_s": round(took, 3), "pss_mib": round(tree.pss_mib(), 1)}
    finally:
        tree.kill()


def one_round(tool: str, criu: str | None, binary: Path, work: Path, mib: int) -> dict[str, Any]:
    res = trees.eager_round(tool, criu, binary, work, mib, 3, 0, make=CowTree)
    res.update({k: v for k, v in trees.lazy_round(tool, criu, binary, work, mib, 3, 0, make=CowTree).items()
                if k != "pss_before_mib"})
    return res


def describe(tool: str, r: dict[str, Any]) -> str:
    return (f"{tool}: Pss {r['pss_before_mib']:.1f} -> eager {r['pss_eager_mib']:.1f} "
            f"({r['pss_eager_mib'] / r['pss_before_mib']:.2f}x, {r['eager_result']}), lazy {r['pss_lazy_mib']:.1f} "
            f"({r['pss_lazy_mib'] / r['pss_before_mib']:.2f}x, {r['lazy_result']}) MiB")


def report(out: Out, info: dict[str, Any]) -> None:
    out.say("| tool | MiB | Pss before | dump s | eager s | Pss eager | lazy running ms | lazy all in s | "
            "Pss lazy | eager/lazy ratio |")
    out.say("|---|---|---|---|---|---|---|---|---|---|")
    for t in info["trees"]:
        for tool in t["tools"]:
            m = t["median"][tool]
            name = "lazarus" if tool == "ours" else f"CRIU {info['criu']['version']}"
            out.say(f"| {name} | {t['mib']} | {m['pss_before_mib']:.1f} | {m['dump_s']:.3f} | "
                    f"{m['eager_restore_s']:.3f} | {m['pss_eager_mib']:.1f} | {m['lazy_running_s'] * 1000:.0f} | "
                    f"{m['lazy_complete_s']:.2f} | {m['pss_lazy_mib']:.1f} | "
                    f"{m['pss_eager_mib'] / m['pss_before_mib']:.2f}x / {m['pss_lazy_mib'] / m['pss_before_mib']:.2f}x |")
        out.say(f"detection (dump/sharing.py) at {t['mib']} MiB: {t['detection']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, [256], sizes_help="memory of the parent (MiB)", warmup_what="tree")
    ap.add_argument("--no-ours", action="store_true", help="measure CRIU only")
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("cow_tree: needs root")
        return 1
    set_child_subreaper()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    tools = [t for t in TOOLS if (t != "criu" or criu) and (t != "ours" or not args.no_ours)]
    work = Path(tempfile.mkdtemp(prefix="lazarus-cow-bench-", dir=args.workdir))
    cache_bytecode(work / "pycache")
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "lazarus")], timeout=300).check()
    info = run_info(args, work, criu)
    say_start(out, info, work)
    criu_path = criu[0] if criu else None
    try:
        binary = build(TARGETS / "cowtree.c", work)
        info["trees"] = []
        for mib in args.sizes:
            def rnd(mib: int = mib) -> dict[str, Any]:
                return {tool: one_round(tool, criu_path, binary, work, mib) for tool in tools}

            rounds = timed_rounds(out, f"cow tree {mib} MiB", args.runs, not args.no_warmup, rnd,
                                  lambda res: "".join(f"; {describe(t, res[t])}" for t in tools))
            info["trees"].append({"mib": mib, "tools": tools, "runs": rounds,
                                  "median": {t: {k: median(r[t][k] for r in rounds) for k in KEYS} for t in tools},
                                  "detection": detection(binary, work, mib)})
    except BenchError as e:
        out.say(f"cow_tree: {e}")
        return 1
    finally:
        with contextlib.suppress(BenchError):
            reap_lazarus_children([], 5)
        reap_leftovers(3)
        shutil.rmtree(work, ignore_errors=True)
    record_end(info, None)
    report(out, info)
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
