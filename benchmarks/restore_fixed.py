"""The restore's fixed cost: time until a restored process runs, in-process (the library call with warm imports, as
a restore service makes it) and as a whole command, next to CRIU's whole command measured in the same run.

For each size N (MiB) a target (benchmarks/targets/memhog.c) fills N MiB of anonymous memory, is dumped with
`lazarus dump` (the original is killed and reaped, its pid free again) and restored one way; SIGUSR2 then makes
it check every word of its memory, and it must log PASS. The ways, each timed until the process runs:
  - in-process eager: lazarus.restore.restore(DIR) called here (imports warm: they were made before the clock
    starts), from the call until it returns (the task is detached and runs then); the image is opened and its
    page checksums verified inside the clock;
  - in-process lazy: a LazyServer and its guard made before the clock (a service keeps them), then
    open_image(DIR) and restore(DIR, lazy=True, on_lazy=server.add_process) inside it; after the clock the
    server serves the rest (background transfer) until every page is in;
  - whole commands: `lazarus restore -D DIR -d` and `lazarus restore -D DIR --lazy -d`, the command as
    `make install` installs it (.venv/bin/lazarus beside this interpreter, lazarus/launcher.py; `python -m
    lazarus` where it is missing: the run's JSON says which), from spawning the command until it exits (it
    exits once the process runs); compiled bytecode is kept in the temporary directory (as an installed
    lazarus has it);
  - CRIU, whole commands: `criu restore -d`; lazily `criu lazy-pages` in the background (waiting for its
    socket) then `criu restore --lazy-pages -d`, the clock starting with `criu lazy-pages`.
In-process rounds also report restore_task's own phases (Restored.timings: create, map, pages, threads, running,
from restore_task's start) and how many times the new task was let run for an injection (one per injected call,
one per batch of calls) against the number of calls.

One untimed round per size first (the first touch of memory on this VM is slow). Medians over --runs rounds.
`python -c pass` is timed too: the interpreter start-up inside every whole-command figure.

Run as root: .venv/bin/python benchmarks/restore_fixed.py [--eager 64] [--lazy 64 1024] [--runs 3] [--criu PATH]
"""

from __future__ import annotations

import argparse
import importlib
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
    interpreter_startup_s,
    lazarus,
    lazarus_dump,
    median,
    ms,
    reap_lazarus_children,
    record_end,
    run,
    run_info,
    say_start,
    set_child_subreaper,
    stop,
    timed_rounds,
)

WAYS = ("inproc", "command", "criu")
# The plain CLI as installed; `python -m lazarus` without an install beside this interpreter.
COMMAND = LAZARUS
PHASES = ("create", "map", "pages", "threads", "running")


def dumped(binary: Path, work: Path, mib: int, tag: str) -> tuple[Target, Path]:
    """A target of `mib` MiB, dumped by lazarus (the original gone, its pid free)."""
    target = Target(binary, work / f"memhog-{tag}-{mib}.log", str(mib))
    image = work / f"image-{tag}-{mib}"
    shutil.rmtree(image, ignore_errors=True)
    try:
        target.wait_ready(timeout=300)
        lazarus_dump(target, image)
    except BaseException:
        target.kill()
        raise
    return target, image


def inproc_round(binary: Path, work: Path, mib: int, lazy: bool) -> dict[str, Any]:
    from lazarus.restore import open_image, restore
    target, image = dumped(binary, work, mib, "inproc")
    try:
        server = guard = None
        if lazy:
            from lazarus.lazy.guard import Guard
            from lazarus.lazy.server import LazyServer
            guard = Guard.start()
            server = LazyServer(background=True, guard=guard)
        try:
            t0 = time.perf_counter()
            if server is not None:
                res = restore(image, lazy=True, on_lazy=server.add_process,
                              image=open_image(image, verify_pages=False))
            else:
                res = restore(image)
            running = time.perf_counter() - t0
            target.restored()
            if server is not None:
                server.run()
        finally:
            if server is not None:
                server.close()
            if guard is not None:
                guard.close()
        out: dict[str, Any] = {"running_s": running, "stops": res.stops, "calls": res.calls,
                               **{f"phase_{k}_s": v for k, v in res.timings.items()}}
        out["result"] = target.check(timeout=120 + mib / 20)
        return out
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def command_round(binary: Path, work: Path, mib: int, lazy: bool) -> dict[str, Any]:
    target, image = dumped(binary, work, mib, "cmd")
    try:
        argv = ["restore", "-D", str(image), "-d", *(["--lazy", "--lazy-log", str(work / "lazy.log")] if lazy else [])]
        r = run([*COMMAND, *argv], 600).check()
        target.restored()
        out: dict[str, Any] = {"command_s": r.wall}
        out["result"] = target.check(timeout=120 + mib / 20)
        if lazy:
            killed = reap_lazarus_children([target.pid], 60)
            if killed:
                raise BenchError(f"lazy-pages daemon/guard {killed} did not end (killed)")
        return out
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def criu_round(criu: str, binary: Path, work: Path, mib: int, lazy: bool) -> dict[str, Any]:
    target = Target(binary, work / f"memhog-criu-{mib}.log", str(mib))
    image = work / f"criu-image-{mib}"
    shutil.rmtree(image, ignore_errors=True)
    lp: subprocess.Popen[bytes] | None = None
    try:
        target.wait_ready(timeout=300)
        criu_dump(criu, target, image)
        t0 = time.perf_counter()
        if lazy:
            lp = criu_lazy_pages(criu, image)
        run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log",
             *(["--lazy-pages"] if lazy else [])]).check()
        running = time.perf_counter() - t0
        target.restored()
        if lp is not None:
            criu_lazy_pages_end(lp, 60 + mib / 50)
        return {"criu_s": running, "criu_result": target.check(timeout=120 + mib / 20)}
    finally:
        stop(lp)
        target.kill()
        shutil.rmtree(image, ignore_errors=True)


def bench(out: Out, binary: Path, work: Path, mib: int, lazy: bool, runs: int, warmup: bool,
          criu: str | None) -> dict[str, Any]:
    kind = "lazy" if lazy else "eager"

    def one_round() -> dict[str, Any]:
        res = {"loadavg": os.getloadavg()[0]}
        res.update(inproc_round(binary, work, mib, lazy))
        res.update(command_round(binary, work, mib, lazy))
        if criu:
            res.update(criu_round(criu, binary, work, mib, lazy))
        return res

    def describe(r: dict[str, Any]) -> str:
        phases = " ".join(f"{k} {ms(r.get(f'phase_{k}_s'))}" for k in PHASES)
        return (f" (load {r['loadavg']:.2f}): in-process {ms(r['running_s'])} ms [{phases}; {r['stops']} stops for "
                f"{r['calls']} calls], command {ms(r['command_s'])} ms"
                + (f", CRIU command {ms(r['criu_s'])} ms" if criu else "") + f"; {r['result']}")

    rounds = timed_rounds(out, f"{kind} {mib} MiB", runs, warmup, one_round, describe)
    keys = ["running_s", "command_s", "stops", "calls", *(f"phase_{k}_s" for k in PHASES),
            *(["criu_s"] if criu else [])]
    return {"mib": mib, "kind": kind, "runs": rounds, "median": {k: median(r.get(k) for r in rounds) for k in keys}}


def report(out: Out, results: list[dict[str, Any]], criu: tuple[str, str] | None, startup: float,
           markdown: bool) -> None:
    name = f"CRIU {criu[1]}" if criu else "CRIU (not measured)"
    cols = ["restore", "in-process (ms)", f"{name} command (ms)", "CRIU / in-process", "our command (ms)",
            "our command / CRIU", "stops / calls"]
    rows = []
    for res in results:
        m = res["median"]
        c = m.get("criu_s")
        rows.append([f"{res['kind']} {res['mib']} MiB", ms(m["running_s"]), ms(c),
                     "-" if not c else f"{c / m['running_s']:.2f}x", ms(m["command_s"]),
                     "-" if not c else f"{m['command_s'] / c:.2f}x", f"{m['stops']:.0f} / {m['calls']:.0f}"])
    caption = (f"medians; until the process runs; `python -c pass` here: {fmt(startup * 1000, 1)} ms "
               "(inside every command figure)")
    out.table("restore's fixed cost", cols, rows, caption)
    if markdown:
        out.markdown_tables([(cols, rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time until a restored process runs: in-process, whole command, CRIU.")
    ap.add_argument("--eager", type=int, nargs="*", default=[64], metavar="MIB", help="sizes restored eagerly")
    ap.add_argument("--lazy", type=int, nargs="*", default=[64, 1024], metavar="MIB", help="sizes restored lazily")
    add_run_arguments(ap, None)
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.say("restore_fixed: needs root")
        return 1
    if args.runs < 1 or any(s < 1 for s in args.eager + args.lazy):
        ap.error("--runs and sizes must be positive")
    args.sizes = sorted(set(args.eager + args.lazy))
    set_child_subreaper()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    work = Path(tempfile.mkdtemp(prefix="lazarus-bench-", dir=args.workdir))
    cache_bytecode(work / "pycache")
    info = run_info(args, work, criu, eager=args.eager, lazy=args.lazy)
    say_start(out, info, work)
    # The imports an in-process restore uses, made before any clock starts (a service has them).
    for module in ("lazarus.restore", "lazarus.lazy.guard", "lazarus.lazy.server"):
        importlib.import_module(module)
    try:
        binary = build(TARGETS / "memhog.c", work)
        startup = interpreter_startup_s()
        lazarus("--version").check()  # compiles the bytecode the commands then find
        t0 = time.monotonic()
        results = [bench(out, binary, work, mib, lazy, args.runs, not args.no_warmup, criu[0] if criu else None)
                   for lazy, sizes in ((False, args.eager), (True, args.lazy)) for mib in sizes]
        info["seconds"] = round(time.monotonic() - t0, 1)
    except BenchError as e:
        out.say(f"restore_fixed: {e}")
        return 1
    finally:
        clean_up(work)
    info["python_c_pass_s"] = startup
    info["lazarus_command"] = " ".join(COMMAND)
    info["results"] = results
    record_end(info, None)
    report(out, results, criu, startup, args.markdown)
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
