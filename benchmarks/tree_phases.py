"""Where a lazy tree restore spends its time, in-process: each process's phases, stops and calls, the wait for
the lazy daemon's answers, the restorer's CPU time and the daemon's, for trees of 1..16 processes (forktree,
64 MiB root shared copy-on-write, each child rewriting 1/8), `lazarus.api.restore(lazy=True, detach=True)`
as `lazarus restore --lazy -d` calls it.

Run as root from a checkout, with that checkout's Python (so that one checkout's code is measured against
another's in the same run: `cd /work/main && /work/main/.venv/bin/python /path/to/benchmarks/tree_phases.py`):
    .venv/bin/python benchmarks/tree_phases.py [--procs 1 16] [--mib 64] [--runs 3] [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TARGETS, build, lazarus, reap, reap_lazarus_children, set_child_subreaper
from trees import Tree


def cpu_of(pid: int) -> float:
    """utime + stime of `pid` so far (s)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_restore(image: Path, tree: Tree, profile: str | None) -> dict[str, Any]:
    import importlib

    import lazarus.api as api
    import lazarus.lazy.daemon as daemon
    import lazarus.lazy.spawn as spawn
    rst = importlib.import_module("lazarus.restore")

    builds: list[Any] = []
    settle_s = [0.0]
    daemon_pid = [0]
    orig_release, orig_settle, orig_fork = rst.TaskBuild.release, daemon.Hand.settle, spawn.fork_daemon

    def release(self: Any) -> None:
        builds.append(self)
        orig_release(self)

    def settle(self: Any) -> None:
        t = time.monotonic()
        try:
            orig_settle(self)
        finally:
            settle_s[0] += time.monotonic() - t

    def fork(*a: Any, **k: Any) -> Any:
        d = orig_fork(*a, **k)
        daemon_pid[0] = d.pid
        return d

    rst.TaskBuild.release, daemon.Hand.settle, spawn.fork_daemon = release, settle, fork
    orig_checked = api._checked_image
    image_s = [0.0]

    def checked(d: Any) -> Any:
        t = time.monotonic()
        try:
            return orig_checked(d)
        finally:
            image_s[0] += time.monotonic() - t
    api._checked_image = checked
    spent: dict[str, list[float]] = {}

    def timed(owner: Any, name: str) -> Any:
        orig = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.monotonic()
            try:
                return orig(*a, **k)
            finally:
                spent.setdefault(name, []).append(time.monotonic() - t)
        setattr(owner, name, wrapper)
        return orig
    wrapped = [(owner, name, timed(owner, name)) for owner, name in (
        (rst.TaskBuild, "build_memory"), (rst.TaskBuild, "build_rest"), (rst.TaskBuild, "hand_over"),
        (rst, "create_child"), (rst, "join_group"), (rst.TaskBuild, "release"))]
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    try:
        r0 = os.times()
        t0 = time.monotonic()
        if prof:
            prof.enable()
        api.restore(image, lazy=True, detach=True)
        if prof:
            prof.disable()
        wall = time.monotonic() - t0
        r1 = os.times()
        dcpu = cpu_of(daemon_pid[0])
    finally:
        rst.TaskBuild.release, daemon.Hand.settle, spawn.fork_daemon = orig_release, orig_settle, orig_fork
        api._checked_image = orig_checked
        for owner, name, orig in wrapped:
            setattr(owner, name, orig)
    if prof:
        prof.dump_stats(profile)
    tree.root.restored()
    children = [b for b in builds if b.pid != tree.pids[0]]
    out = {"wall": wall, "cpu": (r1.user - r0.user) + (r1.system - r0.system), "daemon_cpu": dcpu,
           "settle": settle_s[0], "image": image_s[0], "stops": [b.stops for b in builds], "calls": [b.calls for b in builds]}
    # per child: time from its creation to its registers (its own build), and phase deltas
    phases: dict[str, list[float]] = {}
    for b in children:
        t = b.timings
        keys = [k for k in ("create", "cleared", "xstate", "map", "pages", "fds", "misc", "threads", "uffd", "creds",
                            "regs") if k in t]
        prev = None
        for k in keys:
            if prev is not None:
                phases.setdefault(k, []).append(t[k] - t[prev])
            prev = k
    out["child_phases_ms"] = {k: 1000 * sum(v) / len(v) for k, v in phases.items()} if phases else {}
    # each call's time, the root's first: (root's, children's mean)
    out["calls_ms"] = {k: (1000 * v[0], 1000 * sum(v[1:]) / max(len(v) - 1, 1), len(v)) for k, v in spent.items()}
    root = next((b for b in builds if b.pid == tree.pids[0]), None)
    out["root_timings"] = dict(root.timings) if root else {}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", default=None, help="cProfile the last run of the largest tree into FILE")
    args = ap.parse_args()
    set_child_subreaper()
    import lazarus as pkg
    print(f"# code {Path(pkg.__file__).parent}, load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tree-phases-") as tmp:
        work = Path(tmp)
        binary = build(TARGETS / "forktree.c", work)
        summary = []
        for n in args.procs:
            walls: list[float] = []
            tree = Tree(binary, work, args.mib, n, 125, f"p{n}")
            image = work / f"image-{n}"
            try:
                lazarus("dump", "-t", str(tree.root.pid), "-D", str(image)).check()
                tree.gone()
                for i in range(args.runs + 1):  # the first untimed
                    prof = args.profile if args.profile and n == max(args.procs) and i == args.runs else None
                    res = one_restore(image, tree, prof)
                    _kill(tree)
                    reap_lazarus_children(tree.pids, 30)
                    if i == 0:
                        continue
                    walls.append(res["wall"])
                    ph = " ".join(f"{k} {v:.2f}" for k, v in res["child_phases_ms"].items())
                    print(f"procs {n:2d} run {i}: wall {1000 * res['wall']:.1f} ms, restorer cpu "
                          f"{1000 * res['cpu']:.0f} ms, daemon cpu {1000 * res['daemon_cpu']:.0f} ms, settle "
                          f"{1000 * res['settle']:.1f} ms, image {1000 * res['image']:.1f} ms, stops {sum(res['stops'])} calls {sum(res['calls'])}; "
                          f"per child ms: {ph}; load {os.getloadavg()[0]:.2f}", flush=True)
                    print("   calls (first, mean of the others, n): " + "; ".join(
                        f"{k} {a:.1f} {b:.2f} x{c}" for k, (a, b, c) in res["calls_ms"].items()), flush=True)
                    rt = res["root_timings"]
                    print("   root: " + " ".join(f"{k} {1000 * v:.1f}" for k, v in rt.items() if k != "start"),
                          flush=True)
            finally:
                _kill(tree)
            walls.sort()
            summary.append(f"{n}: {1000 * walls[len(walls) // 2]:.1f} / {1000 * walls[0]:.1f}")
        print(f"# median / min wall (ms) by processes: {'; '.join(summary)}; load {os.getloadavg()}", flush=True)


def _kill(tree: Tree) -> None:
    for pid in tree.pids:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == str(tree.binary):
                os.kill(pid, signal.SIGKILL)
    for pid in tree.pids:
        reap(pid, 2)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in tree.pids) and time.monotonic() < deadline:
        for pid in tree.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main())
