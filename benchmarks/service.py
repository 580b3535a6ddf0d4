"""The restore service (`lazarus service`) against CRIU's whole commands, measured in the same run.

For each size N (MiB), a target (benchmarks/targets/memhog.c) fills N MiB of anonymous memory. Each round:
  1. POST /dump through the service (the request's wall time, connect to answer), then POST /restore eager,
     detached (until the answer: the process runs); SIGUSR2, the target checks every word: PASS;
  2. POST /dump, then POST /restore lazy, detached (pages served by the worker that restored it; its answer
     says its own clock, accept to answer, and the stops of the injection);
  3. POST /dump, then POST /restore lazy, not detached (pages served by the worker itself, the process its
     child);
  4. CRIU: `criu dump`, `criu restore -d`; and `criu dump`, `criu lazy-pages` + `criu restore --lazy-pages
     -d` (the restore command's wall time: the figure the issue compares with), each target checked the same.
The service is started once, before the rounds (that is its point); its fixed cost per request is shown as
the round trip of GET /check (accept, fork a worker, peer check, answer). Medians of --runs rounds, after an
untimed round.

Run as root: .venv/bin/python benchmarks/service.py [--sizes 64] [--runs 3] [--criu PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import signal
import socket
import statistics
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
    clean_up,
    criu_binary,
    criu_dump,
    criu_lazy_pages,
    criu_lazy_pages_end,
    finish_run,
    fmt,
    median,
    ms,
    record_end,
    run,
    run_info,
    say_start,
    set_child_subreaper,
    stop,
    timed_rounds,
    wait_pid_gone,
)

METRICS = ("svc_dump", "svc_restore", "svc_lazy_detached", "svc_lazy_attached", "svc_lazy_tool", "svc_lazy_worker",
           "criu_dump", "criu_restore", "criu_lazy_restore", "criu_lazy_running")


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=600)
        self.path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


class Service:
    def __init__(self, work: Path) -> None:
        d = work / "svc"
        d.mkdir(mode=0o700)
        self.socket = d / "api.sock"
        self.proc = subprocess.Popen([*LAZARUS, "service", "--socket", str(self.socket)], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listening on" not in line:
            self.close()
            raise BenchError(f"lazarus service did not start: {line}")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], float]:
        """(answer, wall seconds from connect to the whole answer read)."""
        t0 = time.perf_counter()
        c = _Conn(self.socket)
        try:
            c.request(method, path, body=json.dumps(body).encode() if body is not None else None)
            resp = c.getresponse()
            data = resp.read()
        finally:
            c.close()
        wall = time.perf_counter() - t0
        ans = json.loads(data)
        if resp.status != 200:
            raise BenchError(f"{method} {path}: {resp.status} {ans.get('error')}")
        return ans, wall

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


DUMP_FIELDS: dict[str, object] = {}  # --no-sync: {"sync": False}


def _dump(svc: Service, target: Target, image: Path) -> float:
    ans, wall = svc.request("POST", "/dump", {"pid": target.pid, "dir": str(image), **DUMP_FIELDS})
    target.original_gone()
    wait_pid_gone(target.pid, 30)
    return wall


def _restore(svc: Service, target: Target, image: Path, **opts: bool) -> tuple[dict[str, Any], float]:
    ans, wall = svc.request("POST", "/restore", {"dir": str(image), **opts})
    if ans["pid"] != target.pid:
        raise BenchError(f"restored as pid {ans['pid']}, expected {target.pid}")
    target.restored()
    return ans, wall


def service_round(svc: Service, binary: Path, work: Path, mib: int) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    for key, opts in (("svc_restore", {"detach": True}), ("svc_lazy_detached", {"lazy": True, "detach": True}),
                      ("svc_lazy_attached", {"lazy": True, "detach": False})):
        target = Target(binary, work / f"memhog-{key}-{mib}.log", str(mib))
        image = work / f"image-{key}-{mib}"
        try:
            target.wait_ready(timeout=300)
            dump_wall = _dump(svc, target, image)
            if key == "svc_restore":
                out["svc_dump"] = dump_wall
            ans, out[key] = _restore(svc, target, image, **opts)
            if key == "svc_lazy_detached":
                out["svc_lazy_tool"] = ans["seconds"]
                # the worker's own clock, accept to answer (the rest of the wall time is the socket and client)
                out["svc_lazy_worker"] = ans.get("service_seconds")
                out["svc_lazy_stops"] = ans.get("stops")
            target.check(timeout=120 + mib / 20)
        finally:
            target.kill()
            shutil.rmtree(image, ignore_errors=True)
    return out


def criu_round(criu: str, binary: Path, work: Path, mib: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    target = Target(binary, work / f"memhog-criu-{mib}.log", str(mib))
    image = work / f"criu-image-{mib}"
    try:
        target.wait_ready(timeout=300)
        out["criu_dump"] = criu_dump(criu, target, image).wall
        out["criu_restore"] = run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log"]).check().wall
        target.restored()
        target.check(timeout=120 + mib / 20)
    finally:
        target.kill()
        shutil.rmtree(image, ignore_errors=True)
    target = Target(binary, work / f"memhog-criu-lazy-{mib}.log", str(mib))
    lp: subprocess.Popen[bytes] | None = None
    try:
        target.wait_ready(timeout=300)
        criu_dump(criu, target, image)
        t0 = time.perf_counter()
        lp = criu_lazy_pages(criu, image)
        r = run([criu, "restore", "-D", str(image), "--lazy-pages", "-d", "-o", "restore.log"]).check()
        out["criu_lazy_running"] = time.perf_counter() - t0
        out["criu_lazy_restore"] = r.wall
        target.restored()
        target.check(timeout=120 + mib / 20)
        criu_lazy_pages_end(lp, 60 + mib / 50)
    finally:
        stop(lp)
        target.kill()
        shutil.rmtree(image, ignore_errors=True)
    return out


def check_round_trip(svc: Service, n: int = 20) -> float:
    """Median of `n` GET /check, 0.1 s apart (a spare worker is ready again by then, as between restores)."""
    times = []
    for _ in range(n):
        time.sleep(0.1)
        times.append(svc.request("GET", "/check")[1])
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The restore service against CRIU's whole commands, same run.")
    add_run_arguments(ap, [64])
    ap.add_argument("--no-sync", action="store_true", help="dump with sync false (no fsync before the original "
                    "is killed: CRIU's durability)")
    args = ap.parse_args(argv)
    if args.no_sync:
        DUMP_FIELDS["sync"] = False
    out = Out()
    if os.geteuid() != 0:
        out.say("service: needs root")
        return 1
    set_child_subreaper()
    criu = None if args.no_criu else criu_binary(4, args.criu)
    work = Path(tempfile.mkdtemp(prefix="lazarus-bench-svc-", dir=args.workdir))
    os.chmod(work, 0o700)
    info = run_info(args, work, criu)
    say_start(out, info, work)
    results = []
    svc: Service | None = None
    try:
        binary = build(TARGETS / "memhog.c", work)
        svc = Service(work)
        info["check_round_trip_s"] = check_round_trip(svc)
        out.say(f"GET /check round trip (accept, fork, peer check, answer): {ms(info['check_round_trip_s'])} ms")
        for mib in args.sizes:
            def one_round(mib: int = mib) -> dict[str, Any]:
                assert svc is not None
                res = service_round(svc, binary, work, mib)
                if criu:
                    res.update(criu_round(criu[0], binary, work, mib))
                return res

            def describe(res: dict[str, Any]) -> str:
                return " (load {:.2f}): ".format(res["loadavg"]) + ", ".join(
                    f"{k} {ms(res.get(k))} ms" for k in METRICS if res.get(k) is not None)
            rounds = timed_rounds(out, f"{mib} MiB", args.runs, not args.no_warmup, one_round, describe)
            results.append({"mib": mib, "rounds": rounds,
                            "median": {k: median(r.get(k) for r in rounds) for k in METRICS}})
    except BenchError as e:
        out.say(f"service: {e}")
        return 1
    finally:
        if svc is not None:
            svc.close()
        clean_up(work)
    info["results"] = results
    record_end(info, None)
    cols = ["MiB", "service dump", "CRIU dump", "service restore", "CRIU restore -d", "service lazy -d",
            "(worker's clock)", "service lazy attached", "CRIU restore --lazy-pages -d", "lazy -d / CRIU"]
    rows = []
    for r in results:
        m = r["median"]
        ratio = (m["svc_lazy_detached"] / m["criu_lazy_restore"]) if m["svc_lazy_detached"] and m["criu_lazy_restore"] \
            else None
        rows.append([str(r["mib"]), ms(m["svc_dump"]), ms(m["criu_dump"]), ms(m["svc_restore"]),
                     ms(m["criu_restore"]), ms(m["svc_lazy_detached"]), ms(m["svc_lazy_worker"]),
                     ms(m["svc_lazy_attached"]),
                     ms(m["criu_lazy_restore"]), fmt(ratio, 2)])
    out.table("through the service (ms, until the answer: the process runs) against CRIU's whole commands",
              cols, rows)
    if args.markdown:
        out.markdown_tables([(cols, rows)])
    finish_run(out, info, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
