"""Command line front end; the only module that reads options."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from lazarus import __version__
from lazarus.errors import LazarusError

log = logging.getLogger("lazarus")
_T0 = time.monotonic()


class _PidFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.pid_ = os.getpid()
        return True


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_PidFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(pid_)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazarus", description="Checkpoint/restore of Linux processes, "
                                "with lazy restore through userfaultfd.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what happens")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.add_argument("--version", action="version", version=f"lazarus {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("check", help="probe the kernel for every feature lazarus uses")

    d = sub.add_parser("dump", help="checkpoint a running process into an image directory")
    d.add_argument("-t", "--tree", dest="pid", type=int, required=True, metavar="PID", help="process to dump")
    d.add_argument("-D", "--images-dir", dest="dir", type=Path, required=True, metavar="DIR",
                   help="image directory to create (must not exist)")
    d.add_argument("--leave-running", action="store_true", help="resume the process after the dump")
    d.add_argument("--shell-job", action="store_true",
                   help="allow a process in a session another process leads, or with a controlling terminal: "
                        "it is restored into the session and terminal of `lazarus restore`")
    d.add_argument("--direct", action="store_true",
                   help="write the page data with O_DIRECT, straight to the disk: faster for large processes where "
                        "fresh page cache is slow, but a restore soon after reads the image from the disk")

    r = sub.add_parser("restore", help="restore a process from an image directory")
    r.add_argument("-D", "--images-dir", dest="dir", type=Path, required=True, metavar="DIR")
    r.add_argument("-d", "--detach", action="store_true", help="return once the process runs")
    r.add_argument("--pidfile", type=Path, metavar="FILE", help="write the restored pid here")
    r.add_argument("--lazy", action="store_true", help="serve anonymous memory on demand (userfaultfd)")
    r.add_argument("--no-background", action="store_true", help="with --lazy: serve faults only")
    r.add_argument("--stats", type=Path, metavar="FILE", help="with --lazy: write transfer statistics (JSON)")
    r.add_argument("--lazy-log", type=Path, metavar="FILE",
                   help="with --lazy -d: where the lazy-pages daemon reports (default DIR/lazy-pages.log)")
    r.add_argument("--lazy-pages-socket", type=Path, metavar="SOCK",
                   help="with --lazy: hand the memory to a running `lazarus lazy-pages` instead of starting one")

    lp = sub.add_parser("lazy-pages", help="serve lazily restored processes' memory (several at once)")
    lp.add_argument("-D", "--images-dir", dest="dir", type=Path, required=True, metavar="DIR",
                    help="directory for the socket (DIR/lazy-pages.sock unless --socket); root's, not writable by "
                    "group or others")
    lp.add_argument("--socket", type=Path, metavar="SOCK", help="listen here instead")
    lp.add_argument("--no-background", action="store_true", help="serve faults only")
    lp.add_argument("--linger", type=float, default=5.0, metavar="SECONDS",
                    help="once every served process is complete, wait this long for more restores (default 5)")
    lp.add_argument("--stats", type=Path, metavar="FILE", help="write transfer statistics (JSON) at the end")
    lp.add_argument("--adopt", type=int, metavar="PID",
                    help="serve process PID, restored lazily from the image DIR, whose lazy-pages servers all "
                         "died (it waits for its pages); no socket")

    s = sub.add_parser("show", help="summarize an image directory")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def entry() -> None:
    """The command's entry point (console script and `python -m lazarus`): main(), then out without the
    interpreter's teardown, which spent ~30 ms freeing what a restore had loaded (measured: whole restore
    command 75-90 ms after "since start" with it, 35-55 ms without). Output is flushed first; files, threads
    and children are all closed or detached by the commands themselves before main() returns."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return _run(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("lazarus: interrupted", file=sys.stderr)
        return 130
    except LazarusError as e:
        if args.debug:
            raise
        print(f"lazarus: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lazarus: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug of ours still gets one line; --debug shows where
        if args.debug:
            raise
        print(f"lazarus: error: internal error ({type(e).__name__}: {e}); run with --debug for details",
              file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        return cmd_check()
    if args.command == "dump":
        return cmd_dump(args)
    if args.command == "restore":
        return cmd_restore(args)
    if args.command == "show":
        return cmd_show(args)
    if args.command == "lazy-pages" and args.adopt is not None:
        return cmd_adopt(args)
    if args.command == "lazy-pages":
        return cmd_lazy_pages(args)
    raise AssertionError(args.command)


def _console() -> Any:
    from rich.console import Console
    # Piped output keeps whole lines: addresses and paths are what a reader greps for.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def cmd_check() -> int:
    from rich.markup import escape
    from rich.table import Table

    from lazarus.kernel import features
    feats = features.report()
    table = Table(title="lazarus check")
    table.add_column("feature")
    table.add_column("available")
    table.add_column("needed for")
    table.add_column("detail")
    for f in feats:
        table.add_row(escape(f.name), "yes" if f.available else "NO", ", ".join(f.purposes), escape(f.detail))
    con = _console()
    con.print(table)
    code = features.check_exit_code(feats)
    if code:
        missing = [f.name for f in feats if not f.available and f.required_for in ("dump", "restore")]
        con.print(f"dump/restore cannot work here: missing {', '.join(missing)}")
    else:
        con.print("dump and restore can work on this machine")
    return code


def cmd_dump(args: argparse.Namespace) -> int:
    from lazarus.dump import dump
    res = dump(args.pid, args.dir, leave_running=args.leave_running, shell_job=args.shell_job,
               direct=args.direct)
    fate = "left running" if res.left_running else "killed"
    print(f"dumped pid {res.pid} to {res.directory}: {res.pages} pages "
          f"({res.pages * 4096 / 2**20:.1f} MiB) in {res.seconds * 1000:.0f} ms; original {fate}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from lazarus.kernel.ptrace import wait
    from lazarus.restore import restore
    if not args.lazy and (args.no_background or args.stats or args.lazy_pages_socket):
        raise UsageError("--no-background, --stats and --lazy-pages-socket need --lazy")
    if not args.lazy:
        res = restore(args.dir)
        _report_restore(args, res)
        return 0 if args.detach else _wait_exit(res.pid, wait)
    _require_lazy_features()
    # The image is checked whole before any helper of ours (server, guard, daemon) exists: a bad image is
    # refused with nothing created.
    from lazarus.restore import open_image
    args.image = open_image(args.dir, verify_pages=False)
    if args.lazy_pages_socket:
        return _restore_to_server(args, wait)
    if args.detach:
        return _restore_with_daemon(args)
    # Serve from this process: the guard forks now, while we have no threads.
    server, guard, bar = _new_server(args, progress=sys.stderr.isatty())
    try:
        res = restore(args.dir, lazy=True, on_lazy=server.add_process, image=args.image)
        _report_restore(args, res)
        stats = server.run()
        log.info("lazy pages done: %s", stats)
    finally:
        _close_server(server, guard, bar)
    return _wait_exit(res.pid, wait)


class UsageError(LazarusError):
    pass


def _require_lazy_features() -> None:
    """The userfaultfd features a lazy restore registers with; a scratch uffd tells (a full `check` would
    cost a traced child on every restore)."""
    from lazarus.errors import FeatureMissing
    from lazarus.kernel.uffd import feature_names, supported_features
    from lazarus.restore.uffd import LAZY_FEATURES
    try:
        missing = LAZY_FEATURES & ~supported_features()
    except LazarusError as e:
        raise FeatureMissing(f"userfaultfd unavailable: {e}") from e
    if missing:
        raise FeatureMissing("userfaultfd features missing for a lazy restore: " + ", ".join(feature_names(missing)))


def _report_restore(args: argparse.Namespace, res: Any) -> None:
    if args.pidfile:
        args.pidfile.write_text(f"{res.pid}\n")
    since_start = (time.monotonic() - _T0) * 1000
    print(f"restored pid {res.pid} in {res.seconds * 1000:.0f} ms ({since_start:.0f} ms since the command "
          f"started; {res.pages_written} pages written{', the rest served lazily' if args.lazy else ''})",
          file=sys.stdout if args.detach else sys.stderr)
    sys.stdout.flush()


def _wait_exit(pid: int, wait: Any) -> int:
    st = wait(pid, timeout=float("inf"))
    while st.stopped:
        st = wait(pid, timeout=float("inf"))
    return st.exit_code if st.exited else 128 + st.term_sig


def _new_server(args: argparse.Namespace, *, progress: bool) -> tuple[Any, Any, Any]:
    """A LazyServer with its guard (which kills the served processes if the server dies)."""
    from lazarus.lazy.guard import Guard
    from lazarus.lazy.server import LazyServer
    guard = Guard.start()
    bar = cb = None
    if progress:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
        bar = Progress("lazy pages", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
        task = bar.add_task("pages", total=None)
        bar.start()

        def cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
    server = LazyServer(background=not args.no_background, stats_path=args.stats, progress=cb, guard=guard)
    return server, guard, bar


def _close_server(server: Any, guard: Any, bar: Any) -> None:
    try:
        server.close()
    finally:
        if bar is not None:
            bar.stop()
        guard.close()


def _restore_handing_over(args: argparse.Namespace, sock: Any) -> Any:
    """Restore lazily, handing the uffd over `sock` to a lazy-pages server before the task runs."""
    from lazarus.lazy.handoff import send_process
    from lazarus.restore import restore

    def hand(pid: int, uffd: Any, _source: Any) -> None:
        try:
            send_process(sock, pid, args.dir, uffd.fd)
        finally:
            uffd.close()  # the server holds its own copy now
    try:
        res = restore(args.dir, lazy=True, on_lazy=hand, image=args.image)
    finally:
        sock.close()
    _report_restore(args, res)
    return res


def _restore_to_server(args: argparse.Namespace, wait: Any) -> int:
    """restore --lazy --lazy-pages-socket: hand the uffd to a running `lazarus lazy-pages`."""
    from lazarus.lazy.handoff import connect
    res = _restore_handing_over(args, connect(args.lazy_pages_socket))
    return 0 if args.detach else _wait_exit(res.pid, wait)


def _restore_with_daemon(args: argparse.Namespace) -> int:
    """restore --lazy -d: a private lazy-pages daemon, forked before the restore (while we have no threads),
    receives the uffd over a socketpair before the task runs; we return once it runs."""
    import socket

    from lazarus.lazy.handoff import Listener
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon = os.fork()
    if daemon == 0:
        ours.close()
        # Its own session: the caller's terminal or process group going away does not involve it.
        os.setsid()
        code = 0
        try:
            # Detach from the caller's pipes (a caller reading our output to EOF must not wait for the
            # daemon); what the daemon and its guard report (a process killed for a lost page source)
            # goes to the log file.
            devnull = os.open(os.devnull, os.O_RDWR)
            logfd = os.open(_daemon_log(args), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(logfd, 2)
            server, guard, bar = _new_server(args, progress=False)
            print(f"lazarus: lazy-pages daemon {os.getpid()} (guard {guard.pid}) serves the lazy restore from "
                  f"{args.dir}. Should both die before the process has all its pages, it waits for them: "
                  f"resume it with `lazarus lazy-pages --adopt PID -D {args.dir}`", file=sys.stderr, flush=True)
            try:
                Listener(server, theirs, connected=True, once=True)
                server.run()
            finally:
                _close_server(server, guard, bar)
        except BaseException as e:  # noqa: BLE001 - a daemon reports and exits
            print(f"lazarus: lazy-pages: error: {e}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    _restore_handing_over(args, ours)
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    """lazy-pages --adopt PID -D DIR: take the uffd from the waiting process itself and serve it to the end."""
    from lazarus.lazy.adopt import adopt
    _require_lazy_features()
    if args.socket:
        raise UsageError("--adopt takes no --socket")
    server, guard, bar = _new_server(args, progress=sys.stderr.isatty())
    try:
        missing = adopt(server, args.adopt, args.dir)
        print(f"lazy-pages: adopted pid {args.adopt}: {missing} pages still missing", flush=True)
        stats = server.run()
    finally:
        _close_server(server, guard, bar)
    states = [p["state"] for p in stats.get("processes", []) if p["pid"] == args.adopt]
    print(f"lazy-pages: pid {args.adopt} {states[0] if states else 'served'}: {stats.get('pages_fault', 0)} "
          f"pages by fault, {stats.get('pages_background', 0)} in background")
    return 0 if not stats.get("lost") else 1


def _daemon_log(args: argparse.Namespace) -> Path:
    if args.lazy_log:
        return args.lazy_log
    return args.dir / "lazy-pages.log" if os.access(args.dir, os.W_OK) else Path(os.devnull)


def cmd_lazy_pages(args: argparse.Namespace) -> int:
    """lazarus lazy-pages: serve restores that hand their uffd over the socket, until none needs us."""
    from lazarus.lazy.handoff import Listener
    from lazarus.lazy.trust import listen_private
    _require_lazy_features()
    path = args.socket or args.dir / "lazy-pages.sock"
    if not args.dir.is_dir():
        raise LazarusError(f"{args.dir}: no such directory", path=str(args.dir))
    # 0600 in a directory only root can write; every peer is checked too (lazy/trust.py).
    listening = listen_private(path)
    print(f"lazy-pages: listening on {path}", flush=True)
    try:
        server, guard, bar = _new_server(args, progress=sys.stderr.isatty())
        try:
            Listener(server, listening.sock, linger=args.linger)
            stats = server.run()
        finally:
            _close_server(server, guard, bar)
    finally:
        listening.close()
    print(f"lazy-pages: served {len(stats.get('processes', []))} process(es), "
          f"{stats.get('pages_fault', 0)} pages by fault, {stats.get('pages_background', 0)} in background")
    return 0



def _fd_target(f: dict[str, Any]) -> str:
    """What `show` prints as an fd's target."""
    if f.get("path"):
        return str(f["path"])
    if "dup_of" in f:
        return f"dup of fd {f['dup_of']}"
    kind = f["type"]
    if kind == "pipe":
        return f"pipe:[{f.get('pipe')}]"
    if kind == "unix":
        return f"unix socket, peer socket:[{f.get('peer')}]"
    if kind == "epoll":
        return "epoll: fds " + ",".join(str(x["tfd"]) for x in f.get("targets", [])) if f.get("targets") else "epoll"
    if kind == "inotify":
        return "inotify: " + ", ".join(f"{w['wd']}={w['path']}" for w in f.get("watches", []))
    return kind

def _summary(img: Any) -> dict[str, Any]:
    inv = img.inventory
    out: dict[str, Any] = {"directory": str(img.path), "format": inv.get("format"), "version": inv.get("version"),
                           "kernel_release": inv.get("kernel_release"), "cpu": inv.get("cpu"),
                           "created": inv.get("created"), "tasks": []}
    from lazarus.images.mm import is_lazy, lazy_object_ids
    from lazarus.kernel import abi
    from lazarus.restore.threads import check_threads
    for pid in img.tasks:
        t = img.task(pid)
        check_threads(t, f"task-{pid}.json")
        lazy_ids = lazy_object_ids(t["mm"], t["files"])
        objects = {o["id"]: o for o in t["mm"]["objects"]}
        regs = abi.user_regs_struct.from_buffer_copy(bytes.fromhex(t["core"]["regs"]))
        vmas = []
        for v in t["mm"]["vmas"]:
            prot = "".join(c if v["prot"] & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
            obj = objects.get(v.get("object", -1))
            npages = sum(n for _, n, _ in (obj["pages"] if obj else v["pages"]))
            vmas.append({"start": f"{v['start']:#x}", "end": f"{v['end']:#x}",
                         "prot": prot + ("s" if v["shared"] else "p"), "kind": v["kind"], "path": v["path"],
                         "pages": npages, "lazy": is_lazy(v) or (obj is not None and obj["id"] in lazy_ids),
                         "vmflags": " ".join(v["vmflags"])})
        fds = [{"fd": f["fd"], "type": f["type"], "target": _fd_target(f),
                "flags": f"{f['flags']:o}", "pos": f["pos"], "cloexec": f["cloexec"]} for f in t["files"]]
        files = {n: m["size"] for n, m in inv["files"].items()}
        out["tasks"].append({
            "pid": pid, "comm": t["comm"], "exe": t["mm"]["exe"],
            "registers": {"rip": f"{regs.rip:#x}", "rsp": f"{regs.rsp:#x}", "rax": f"{regs.rax:#x}",
                          "orig_rax": f"{regs.orig_rax:#x}", "fs_base": f"{regs.fs_base:#x}",
                          "xstate_bytes": len(t["core"]["xstate"]) // 2},
            "threads": [{"tid": th["tid"], "comm": th["comm"],
                         "rip": f"{abi.user_regs_struct.from_buffer_copy(bytes.fromhex(th['core']['regs'])).rip:#x}"}
                        for th in t.get("threads", [])],
            "vmas": vmas, "fds": fds,
            "pages": sum(v["pages"] for v in vmas), "lazy_pages": sum(v["pages"] for v in vmas if v["lazy"]),
            "signals": {"blocked": f"{t['signals']['blocked']:#x}",
                        "pending": len(t["signals"]["pending_thread"]) + len(t["signals"]["pending_shared"]),
                        "handlers": sum(1 for a in t["signals"]["actions"] if a[0] > 1)},
        })
        files["inventory.json"] = (Path(img.path) / "inventory.json").stat().st_size
        out["files"] = files
        out["total_bytes"] = sum(files.values())
    return out


def cmd_show(args: argparse.Namespace) -> int:
    from lazarus.images import Image
    img = Image.open(args.dir)
    summary = _summary(img)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table
    con = _console()
    con.print(f"image {summary['directory']}: {summary['format']} v{summary['version']}, kernel "
              f"{summary['kernel_release']}, {summary['total_bytes'] / 2**20:.1f} MiB in {len(summary['files'])} files")
    for t in summary["tasks"]:
        r = t["registers"]
        con.print(f"pid {t['pid']} ({t['comm']}) {t['exe']}")
        con.print(f"  registers: rip {r['rip']} rsp {r['rsp']} rax {r['rax']} orig_rax {r['orig_rax']} "
                  f"fs_base {r['fs_base']}, xstate {r['xstate_bytes']} bytes")
        s = t["signals"]
        con.print(f"  signals: {s['handlers']} handlers, blocked {s['blocked']}, {s['pending']} pending")
        if t["threads"]:
            con.print(f"  threads: {len(t['threads'])} more: "
                      + ", ".join(f"{th['tid']} ({th['comm']}) rip {th['rip']}" for th in t["threads"]))
        con.print(f"  memory: {t['pages']} pages saved, {t['lazy_pages']} of them served lazily by --lazy")
        vt = Table(show_edge=False)
        for col in ("start", "end", "prot", "kind", "pages", "lazy", "path"):
            vt.add_column(col)
        for v in t["vmas"]:
            vt.add_row(v["start"], v["end"], v["prot"], v["kind"], str(v["pages"]), "lazy" if v["lazy"] else "",
                       v["path"])
        con.print(vt)
        ft = Table(show_edge=False)
        for col in ("fd", "type", "target", "flags", "pos", "cloexec"):
            ft.add_column(col)
        for f in t["fds"]:
            ft.add_row(str(f["fd"]), f["type"], f["target"], f["flags"], str(f["pos"]), "yes" if f["cloexec"] else "")
        con.print(ft)
    return 0
