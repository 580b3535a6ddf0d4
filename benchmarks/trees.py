"""Process trees: dump and restore of a tree whose processes share copy-on-write pages, against CRIU in the
same run, and lazy restore until running as the tree grows.

Target: benchmarks/targets/forktree.c. Its root fills M MiB of anonymous memory, then forks N-1 children;
child k rewrites its own set of about --rewrite of the pages (a different set per child), so the rest stay
shared by the whole tree. On SIGUSR2 every process checks its own memory (shared and rewritten pages, its
parent) and the root logs PASS once all did.

Part 1, a tree of --procs processes x --sizes MiB (default 8 x 128 MiB, each child rewriting 1/8), for each
tool (ours, and CRIU when there is one):
  1. the tree's total Pss (sum of `Pss:` in /proc/PID/smaps_rollup over its processes) before the dump;
  2. dump (wall time of the whole command); every process of the tree ends and is reaped;
  3. eager restore `-d` (wall); total Pss again; SIGUSR2: the tree checks itself and must PASS;
  4. a new tree, dumped the same way, restored lazily (ours: `lazarus restore -d --lazy --stats F`; CRIU:
     `criu lazy-pages` then `criu restore --lazy-pages -d` once its socket exists): the time from the start of
     the restore until every process of the tree runs its program untraced, the time until every page is in
     (ours: the lazy-pages daemon's stats; CRIU: `criu lazy-pages` exits), total Pss then, and the check.
Part 2, lazy restore until running as the tree grows (--grow 1 2 4 8 16 processes of --grow-mib MiB each),
ours and CRIU: the wall time until every process of the tree runs.

`lazarus dump` takes process trees (lazarus/dump/tree.py, docs/TREES.md), so both tools are measured. Should
our dump refuse a tree (something its processes share that a restore cannot bring back yet; the dump names it
in one line), the tables say so with the reason and CRIU's figures stand alone. Medians of --runs runs; an
untimed warm-up round first unless --no-warmup.

Run as root: .venv/bin/python benchmarks/trees.py [--criu PATH] [--procs 8] [--sizes 128] [--runs 3]
(`../shared/peers/build-criu` builds CRIU 4.2 and prints its path.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
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
    lazarus,
    median,
    ms,
    reap,
    reap_lazarus_children,
    record_end,
    rollup_kib,
    run,
    run_info,
    run_until,
    running_untraced,
    say_start,
    set_child_subreaper,
    stop,
    timed_rounds,
    wait_for,
)

POLL_S = 0.00025
TOOLS = ("ours", "criu")
TREE_METRICS = ("pss_before_mib", "dump_s", "eager_restore_s", "pss_eager_mib", "lazy_running_s",
                "lazy_command_s", "lazy_complete_s", "pss_lazy_mib")


# ---------------------------------------------------------------------------------------------------------
# the tree


class Tree:
    """A forktree target: the root (a common.Target) and the pids of every process of the tree."""

    def __init__(self, binary: Path, work: Path, mib: int, procs: int, permille: int, tag: str) -> None:
        self.root = Target(binary, work / f"forktree-{tag}.log", str(mib), str(procs), str(permille))
        self.binary = binary
        lines = self.root.wait_ready(timeout=300)
        pids = next((ln.split()[2:] for ln in lines if ln.startswith("# pids ")), None)
        if pids is None or len(pids) != procs:
            raise BenchError(f"forktree {self.root.pid} logged pids {pids}, expected {procs}")
        self.pids = [int(p) for p in pids]

    def pss_mib(self) -> float:
        """The tree's total Pss (MiB): the sum of Pss: in /proc/PID/smaps_rollup of each of its processes."""
        return sum(rollup_kib(pid, "Pss") for pid in self.pids) / 1024

    def gone(self, timeout: float = 60) -> None:
        """After a dump that ended the tree: reap the root and the children re-parented to us (we are a
        subreaper), until no pid of the tree exists (so that a restore can have them again)."""
        self.root.original_gone(timeout)

        def all_gone() -> bool:
            for pid in self.pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            return not any(os.path.exists(f"/proc/{pid}") for pid in self.pids)
        wait_for(f"the pids of the tree of {self.root.pid} to be free", all_gone, timeout, 0.002)

    def running(self) -> bool:
        return all(running_untraced(pid, self.binary) for pid in self.pids)

    def check(self) -> str:
        return self.root.check(timeout=300)

    def kill(self) -> None:
        """Kill what is left of the tree, by pid: the processes it is made of now, i.e. our child the root and
        its descendants, and those of the tree's pids re-parented to us (we are a subreaper) with theirs. A pid
        is never killed for the program it runs: another process may have that pid and binary meanwhile."""
        doomed = self._ours()
        for pid in doomed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.root.kill()
        for pid in doomed:
            reap(pid, 2)

    def _ours(self) -> list[int]:
        me = os.getpid()
        todo = [p for p in {self.root.pid, *self.pids} if _ppid(p) == me]
        seen: list[int] = []
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.append(p)
            todo.extend(_children(p))
        return seen


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid` (/proc/PID/task/TID/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    return out


# ---------------------------------------------------------------------------------------------------------
# one tool: dump, eager restore, lazy restore


class Refused(Exception):
    """Our dump of the tree was refused (something shared it cannot restore yet): the one-line reason."""


def dump(tool: str, criu: str | None, tree: Tree, image: Path) -> float:
    if tool == "ours":
        d = lazarus("dump", "-t", str(tree.root.pid), "-D", str(image))
        if d.returncode:
            line = (d.stderr.strip() or d.stdout.strip() or f"exit {d.returncode}").splitlines()[-1]
            raise Refused(line.removeprefix("lazarus: error: "))
    else:
        assert criu is not None
        d = criu_dump(criu, tree.root, image)
    tree.gone()
    return d.wall


def eager_round(tool: str, criu: str | None, binary: Path, work: Path, mib: int, procs: int,
                permille: int, *, make: type[Tree] = Tree) -> dict[str, Any]:
    tree = make(binary, work, mib, procs, permille, f"{tool}-eager")
    image = work / f"image-{tool}-eager"
    try:
        out: dict[str, Any] = {"pss_before_mib": tree.pss_mib()}
        out["dump_s"] = dump(tool, criu, tree, image)
        if tool == "ours":
            r = lazarus("restore", "-D", str(image), "-d", "--pidfile", str(work / "restored.pid")).check()
        else:
            assert criu is not None
            r = run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log"]).check()
        tree.root.restored()
        wait_for("the restored tree to run", tree.running, 30, POLL_S)
        out["eager_restore_s"] = r.wall
        out["pss_eager_mib"] = tree.pss_mib()
        out["eager_result"] = tree.check()
        return out
    finally:
        tree.kill()
        shutil.rmtree(image, ignore_errors=True)


def lazy_round(tool: str, criu: str | None, binary: Path, work: Path, mib: int, procs: int,
               permille: int, *, pss: bool = True, make: type[Tree] = Tree) -> dict[str, Any]:
    tree = make(binary, work, mib, procs, permille, f"{tool}-lazy")
    image = work / f"image-{tool}-lazy"
    lp: subprocess.Popen[bytes] | None = None
    try:
        out: dict[str, Any] = {"pss_before_mib": tree.pss_mib()} if pss else {}
        dump(tool, criu, tree, image)
        complete_timeout = 120 + procs * mib / 50
        if tool == "ours":
            stats = work / "lazy-stats.json"
            stats.unlink(missing_ok=True)
            argv = [*LAZARUS, "restore", "-D", str(image), "-d", "--lazy", "--stats", str(stats), "--pidfile",
                    str(work / "restored.pid")]
            t0 = time.perf_counter()
            out["lazy_running_s"], out["lazy_command_s"], _ = run_until(argv, f"restore of the tree of {tree.root.pid}",
                                                                        tree.running, t0)
            tree.root.restored()
            wait_for("the lazy-pages daemon's stats", stats.exists, complete_timeout, 0.002)
            out["lazy_complete_s"] = time.perf_counter() - t0
            killed = reap_lazarus_children(tree.pids, 30)
            if killed:
                raise BenchError(f"lazy-pages daemon/guard {killed} did not end after writing its stats")
        else:
            assert criu is not None
            t0 = time.perf_counter()
            lp = criu_lazy_pages(criu, image)
            argv = [criu, "restore", "-D", str(image), "--lazy-pages", "-d", "-o", "restore.log"]
            out["lazy_running_s"], out["lazy_command_s"], _ = run_until(
                argv, f"criu restore of the tree of {tree.root.pid}", tree.running, t0)
            tree.root.restored()
            criu_lazy_pages_end(lp, complete_timeout)
            out["lazy_complete_s"] = time.perf_counter() - t0
        if pss:
            out["pss_lazy_mib"] = tree.pss_mib()
        out["lazy_result"] = tree.check()
        return out
    finally:
        stop(lp)
        tree.kill()
        shutil.rmtree(image, ignore_errors=True)


def tool_round(tool: str, criu: str | None, binary: Path, work: Path, mib: int, procs: int,
               permille: int) -> dict[str, Any]:
    try:
        res = eager_round(tool, criu, binary, work, mib, procs, permille)
        res.update({k: v for k, v in lazy_round(tool, criu, binary, work, mib, procs, permille).items()
                    if k != "pss_before_mib"})
        return res
    except Refused as e:
        return {"refused": str(e)}


# ---------------------------------------------------------------------------------------------------------
# report


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    refused = next((r["refused"] for r in rounds if "refused" in r), None)
    if refused is not None:
        return {"refused": refused}
    return {k: median(r.get(k) for r in rounds) for k in TREE_METRICS}


def describe_tool(tool: str, res: dict[str, Any]) -> str:
    if "refused" in res:
        return f"{tool}: dump refused ({res['refused']})"
    return (f"{tool}: Pss {fmt(res['pss_before_mib'], 0)} MiB, dump {fmt(res['dump_s'])} s, eager restore "
            f"{fmt(res['eager_restore_s'])} s (Pss {fmt(res['pss_eager_mib'], 0)} MiB, {res['eager_result']}), "
            f"lazy running {ms(res['lazy_running_s'], 0)} ms, complete {fmt(res['lazy_complete_s'])} s "
            f"(Pss {fmt(res['pss_lazy_mib'], 0)} MiB, {res['lazy_result']})")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def report(out: Out, info: dict[str, Any], markdown: bool) -> None:
    tables: list[tuple[list[str], list[list[str]]]] = []
    cols = ["tree", "tool", "dump (s)", "eager restore (s)", "lazy: running (ms)", "lazy: command (ms)",
            "lazy: every page in (s)", "Pss before (MiB)", "Pss eager", "ratio", "Pss lazy, complete", "ratio"]
    rows = []
    refusals: set[str] = set()
    for r in info["trees"]:
        label = f"{r['procs']} x {r['mib']} MiB, {r['permille'] / 10:g}% rewritten per child"
        for tool in r["tools"]:
            m = r["median"][tool]
            name = "lazarus" if tool == "ours" else f"CRIU {info['criu']['version']}"
            if "refused" in m:
                rows.append([label, name, "dump refused", *["-"] * 9])
                refusals.add(m["refused"])
                continue
            rows.append([label, name, fmt(m["dump_s"]), fmt(m["eager_restore_s"]), ms(m["lazy_running_s"], 0),
                         ms(m["lazy_command_s"], 0), fmt(m["lazy_complete_s"]), fmt(m["pss_before_mib"], 0),
                         fmt(m["pss_eager_mib"], 0), _ratio(m["pss_eager_mib"], m["pss_before_mib"]),
                         fmt(m["pss_lazy_mib"], 0), _ratio(m["pss_lazy_mib"], m["pss_before_mib"])])
    out.table("Process tree with shared copy-on-write pages: dump, eager and lazy restore", cols, rows,
              "median of the runs; seconds are wall times of whole commands (ours: `python -m lazarus`); lazy: "
              "running = from the start of the restore (for CRIU: of `criu lazy-pages`) until every process of "
              "the tree runs its program untraced; every page in = until our lazy-pages daemon writes its stats / "
              "`criu lazy-pages` exits; Pss = sum of Pss: in /proc/PID/smaps_rollup over the tree; ratio = "
              "to the Pss before the dump (issue 9 asks <= 1.15 after either restore)")
    tables.append((cols, rows))

    if info.get("grow"):
        cols2 = ["processes", "MiB each (shared COW)"]
        for tool in info["grow_tools"]:
            name = "lazarus" if tool == "ours" else f"CRIU {info['criu']['version']}"
            cols2 += [f"{name}: running (ms)", f"{name}: command (ms)"]
        if len(info["grow_tools"]) == 2:
            cols2.append("lazarus/CRIU running")
        rows2 = []
        for g in info["grow"]:
            row = [str(g["procs"]), str(g["mib"])]
            for tool in info["grow_tools"]:
                m = g["median"][tool]
                if "refused" in m:
                    refusals.add(m["refused"])
                row += (["dump refused", "-"] if "refused" in m
                        else [ms(m["lazy_running_s"], 0), ms(m["lazy_command_s"], 0)])
            if len(info["grow_tools"]) == 2:
                ours, theirs = g["median"]["ours"], g["median"]["criu"]
                row.append("-" if "refused" in ours or "refused" in theirs
                           else _ratio(ours["lazy_running_s"], theirs["lazy_running_s"]))
            rows2.append(row)
        out.table("Lazy restore until the whole tree runs, as the tree grows", cols2, rows2,
                  "median ms from the start of the restore until every process runs its program untraced; "
                  "command = until the restore command returned; each child rewrote the same share of the "
                  "pages as above")
        tables.append((cols2, rows2))
    for reason in sorted({re.sub(r"\b\d+\b", "N", r) for r in refusals}):
        out.say(f"our dump refused: {reason}")
    if markdown:
        out.markdown_tables(tables)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Process trees with shared COW pages: dump, eager and lazy restore, "
                                 "Pss, against CRIU in the same run.")
    add_run_arguments(ap, [128], sizes_help="memory of the tree's root, shared copy-on-write with the children "
                      "(MiB; one tree per size)", warmup_what="tree")
    ap.add_argument("--procs", type=int, default=8, help="processes in the tree of part 1 (root included)")
    ap.add_argument("--rewrite", type=float, default=0.125, metavar="FRACTION",
                    help="share of the pages each child rewrites (its own set)")
    ap.add_argument("--grow", type=int, nargs="*", default=[1, 2, 4, 8, 16], metavar="N",
                    help="tree sizes for part 2 (none: skip it)")
    ap.add_argument("--grow-mib", type=int, default=64, metavar="MIB", help="memory of the root in part 2")
    ap.add_argument("--no-ours", action="store_true", help="measure CRIU only")
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("trees: needs root")
        return 1
    if args.runs < 1 or any(s < 1 for s in args.sizes) or args.procs < 1 or any(n < 1 for n in args.grow) \
            or not 0 <= args.rewrite <= 1 or args.grow_mib < 1:
        ap.error("--runs, --sizes, --procs, --grow and --grow-mib must be positive, --rewrite within [0, 1]")
    permille = round(args.rewrite * 1000)
    set_child_subreaper()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    tools = [t for t in TOOLS if (t != "criu" or criu) and (t != "ours" or not args.no_ours)]
    if not tools:
        ap.error("nothing to measure (--no-ours and no criu)")
    work = Path(tempfile.mkdtemp(prefix="lazarus-trees-bench-", dir=args.workdir))
    # As an installed lazarus: compiled once, not at every command (see common.cache_bytecode).
    cache_bytecode(work / "pycache")
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "lazarus")], timeout=300).check()
    info = run_info(args, work, criu, procs=args.procs, rewrite=args.rewrite, grow=args.grow,
                    grow_mib=args.grow_mib)
    say_start(out, info, work)
    criu_path = criu[0] if criu else None
    try:
        binary = build(TARGETS / "forktree.c", work)
        t0 = time.monotonic()
        info["trees"] = []
        for mib in args.sizes:
            def one_round(mib: int = mib) -> dict[str, Any]:
                return {tool: tool_round(tool, criu_path, binary, work, mib, args.procs, permille)
                        for tool in tools}

            rounds = timed_rounds(out, f"tree {args.procs} x {mib} MiB", args.runs, not args.no_warmup, one_round,
                                  lambda res: "".join(f"; {describe_tool(t, res[t])}" for t in tools))
            info["trees"].append({"procs": args.procs, "mib": mib, "permille": permille, "tools": tools,
                                  "runs": rounds, "median": {t: summarize([r[t] for r in rounds]) for t in tools}})
        info["grow_tools"] = tools
        info["grow"] = []
        for n in args.grow:
            def grow_round(n: int = n) -> dict[str, Any]:
                res: dict[str, Any] = {}
                for tool in tools:
                    try:
                        res[tool] = lazy_round(tool, criu_path, binary, work, args.grow_mib, n, permille, pss=False)
                    except Refused as e:
                        res[tool] = {"refused": str(e)}
                return res

            def grow_line(res: dict[str, Any]) -> str:
                return "".join(f"; {t}: " + (f"refused ({res[t]['refused']})" if "refused" in res[t] else
                                             f"running {ms(res[t]['lazy_running_s'], 0)} ms, "
                                             f"{res[t]['lazy_result']}") for t in tools)

            rounds = timed_rounds(out, f"lazy, tree of {n}", args.runs, not args.no_warmup, grow_round, grow_line)
            med = {}
            for t in tools:
                refused = next((r[t]["refused"] for r in rounds if "refused" in r[t]), None)
                med[t] = {"refused": refused} if refused is not None else {
                    k: median(r[t].get(k) for r in rounds) for k in ("lazy_running_s", "lazy_command_s")}
            info["grow"].append({"procs": n, "mib": args.grow_mib, "runs": rounds, "median": med})
        info["seconds"] = round(time.monotonic() - t0, 1)
    except BenchError as e:
        out.say(f"trees: {e}")
        return 1
    finally:
        clean_up(work)
    record_end(info, None)
    report(out, info, args.markdown)
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
