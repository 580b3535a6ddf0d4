"""Command line front end; the only module that reads options."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time

from lazarus import __version__, logs
from lazarus.errors import LazarusError, UsageError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

log = logs.getLogger("lazarus")
_T0 = time.monotonic()


def _setup_logging(verbose: int) -> None:
    """-v: every message to stderr. Otherwise warnings and errors, and logging is imported only when the
    first of them comes (lazarus/logs.py): importing it cost ~6-9 ms of every command."""
    if verbose or "logging" in sys.modules:
        _log_to_stderr(verbose)
    else:
        logs.on_first_use = lambda: _log_to_stderr(0)


def _log_to_stderr(verbose: int) -> None:
    import logging

    class PidFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.pid_ = os.getpid()
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(PidFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(pid_)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


COMMANDS = ("check", "dump", "restore", "lazy-pages", "service", "show")


def _formatter() -> type:
    """argparse's help formatter, sized as it sizes itself but without `shutil`, which it imports for
    get_terminal_size and which brings zlib, bz2 and lzma with it (~2 ms of every command's start-up)."""
    import argparse

    class Formatter(argparse.HelpFormatter):
        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: int | None = None) -> None:
            if width is None:
                width = _columns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)
    return Formatter


def _columns() -> int:
    try:
        if int(os.environ.get("COLUMNS", "0")) > 0:
            return int(os.environ["COLUMNS"])
    except ValueError:
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


def _command_of(argv: list[str] | None) -> str | None:
    """The command named on the line (the first word that is not one of the top-level flags), if it is one."""
    for word in sys.argv[1:] if argv is None else argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: with only the named command's subparser when one is named (building all six,
    with their help formatters, costs a few ms of every command), with all of them otherwise (`--help`,
    a misspelt command: the error lists them)."""
    import argparse
    command = _command_of(argv)
    fmt = _formatter()

    def wanted(name: str) -> bool:
        return command is None or command == name

    p = argparse.ArgumentParser(prog="lazarus", description="Checkpoint/restore of Linux processes, "
                                "with lazy restore through userfaultfd.", formatter_class=fmt)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what happens")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.add_argument("--version", action="version", version=f"lazarus {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if wanted("check"):
        sub.add_parser("check", help="probe the kernel for every feature lazarus uses", formatter_class=fmt)
    if wanted("dump"):
        _dump_parser(sub, fmt)
    if wanted("restore"):
        _restore_parser(sub, fmt)
    if wanted("lazy-pages"):
        _lazy_pages_parser(sub, fmt)
    if wanted("service"):
        _service_parser(sub, fmt)
    if wanted("show"):
        _show_parser(sub, fmt)
    return p


def _path(value: str) -> Any:
    from pathlib import Path
    return Path(value)


def _decimal(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(value)  # argparse words the error
    return int(value)


# The plain lines _plain_line reads, per command: (defaults, flag -> (attribute, value), option with a value ->
# (attribute, conversion), attributes required). What argparse would make of them (_dump_parser, _restore_parser);
# restore's values stay str: the restore command imports no pathlib (~4 ms of its start-up with what it pulls
# in: urllib.parse, ipaddress).
_PLAIN: dict[str, tuple[dict[str, Any], dict[str, tuple[str, Any]], dict[str, tuple[str, Any]], tuple[str, ...]]] = {
    "restore": (
        {"dir": None, "detach": False, "pidfile": None, "lazy": False, "no_background": False, "stats": None,
         "lazy_log": None, "lazy_pages_socket": None, "pidns": False},
        {"-d": ("detach", True), "--detach": ("detach", True), "--lazy": ("lazy", True),
         "--no-background": ("no_background", True), "--pidns": ("pidns", True)},
        {"-D": ("dir", str), "--images-dir": ("dir", str), "--pidfile": ("pidfile", str), "--stats": ("stats", str),
         "--lazy-log": ("lazy_log", str), "--lazy-pages-socket": ("lazy_pages_socket", str)},
        ("dir",)),
    "dump": (
        {"pid": None, "dir": None, "leave_running": False, "shell_job": False, "direct": False, "sync": True},
        {"--leave-running": ("leave_running", True), "--shell-job": ("shell_job", True),
         "--direct": ("direct", True), "--no-sync": ("sync", False)},
        {"-t": ("pid", _decimal), "--tree": ("pid", _decimal), "-D": ("dir", _path), "--images-dir": ("dir", _path)},
        ("pid", "dir")),
}


def _plain_line(argv: list[str]) -> Any:
    """The arguments of a plain, well-formed `restore` or `dump` line (the commands whose time is measured), read
    without argparse, which with gettext and locale and the parser's construction costs ~10 ms of a command
    (measured for the dump); the same namespace _parser() would make (tests/unit/test_cli_fastpath.py compares
    them). None for anything else (another command, help, an unknown or abbreviated option, `--opt=value`, a
    value that looks like an option or does not convert, a required option missing): argparse then parses it,
    and words its errors."""
    import types
    args = types.SimpleNamespace(verbose=0, debug=False, command=None)
    words = iter(argv)
    for word in words:
        if word in ("-v", "--verbose"):
            args.verbose += 1
        elif word == "--debug":
            args.debug = True
        elif word in _PLAIN:
            args.command = word
            break
        else:
            return None
    else:
        return None
    defaults, flags, values, required = _PLAIN[args.command]
    vars(args).update(defaults)
    for word in words:
        if word in flags:
            name, value = flags[word]
            setattr(args, name, value)
        elif word in values:
            name, convert = values[word]
            text = next(words, None)
            if text is None or text.startswith("-") or not text:
                return None
            try:
                setattr(args, name, convert(text))
            except ValueError:
                return None
        else:
            return None
    return args if all(getattr(args, name) is not None for name in required) else None


def _dump_parser(sub: Any, fmt: type) -> None:
    from pathlib import Path
    d = sub.add_parser("dump", help="checkpoint a running process into an image directory", formatter_class=fmt)
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
    d.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not fsync the image before killing the original (CRIU never does): faster, but a "
                        "write error reported later, or a crash before the kernel wrote it back, loses the image")


def _restore_parser(sub: Any, fmt: type) -> None:
    r = sub.add_parser("restore", help="restore a process from an image directory", formatter_class=fmt)
    r.add_argument("-D", "--images-dir", dest="dir", required=True, metavar="DIR")
    r.add_argument("-d", "--detach", action="store_true", help="return once the process runs")
    r.add_argument("--pidfile", metavar="FILE", help="write the restored pid here")
    r.add_argument("--lazy", action="store_true", help="serve anonymous memory on demand (userfaultfd)")
    r.add_argument("--no-background", action="store_true", help="with --lazy: serve faults only")
    r.add_argument("--stats", metavar="FILE", help="with --lazy: write transfer statistics (JSON)")
    r.add_argument("--lazy-log", metavar="FILE",
                   help="with --lazy -d: where the lazy-pages daemon reports (default DIR/lazy-pages.log)")
    r.add_argument("--lazy-pages-socket", metavar="SOCK",
                   help="with --lazy: hand the memory to a running `lazarus lazy-pages` instead of starting one")
    r.add_argument("--pidns", action="store_true",
                   help="restore into a new PID namespace (under a small init of ours) where the process keeps "
                        "its pid: one image can then be restored any number of times at once")


def _lazy_pages_parser(sub: Any, fmt: type) -> None:
    from pathlib import Path
    lp = sub.add_parser("lazy-pages", help="serve lazily restored processes' memory (several at once)",
                        formatter_class=fmt)
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


def _service_parser(sub: Any, fmt: type) -> None:
    from pathlib import Path
    sv = sub.add_parser("service", help="serve the API as HTTP/1.1 + JSON on a unix socket (docs/SERVICE.md)",
                        formatter_class=fmt)
    sv.add_argument("--socket", type=Path, metavar="PATH",
                    help="listen here (0600, in a directory only root can write); not with systemd socket activation")
    sv.add_argument("--state-dir", type=Path, metavar="DIR",
                    help="where restores are recorded (default: a new directory beside the socket, removed at exit)")
    sv.add_argument("--spare-workers", type=int, default=2, metavar="N",
                    help="worker processes kept waiting for requests (default 2)")


def _show_parser(sub: Any, fmt: type) -> None:
    from pathlib import Path
    s = sub.add_parser("show", help="summarize an image directory", formatter_class=fmt)
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")


def entry() -> None:
    """The command's entry point (console script and `python -m lazarus`): main(), then out without the
    interpreter's teardown, which spent ~30 ms freeing what a restore had loaded (measured: whole restore
    command 75-90 ms after "since start" with it, 35-55 ms without). Output is flushed first; files, threads
    and children are all closed or detached by the commands themselves before main() returns."""
    _gc_off()
    code = _main(None)  # the collector stays off to the end: the process exits without one more pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if "logging" in sys.modules:  # imported only if something was logged (lazarus/logs.py)
        sys.modules["logging"].shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """The command, called from Python (tests): as entry() but returning, with the collector on again."""
    _gc_off()
    try:
        return _main(argv)
    finally:
        gc.enable()


_fork_hook = False


def _gc_off() -> None:
    """Start-up makes ~100k objects (modules, classes, functions) and frees almost none: the cyclic collector's
    passes over them cost ~5-8% of the imports, and one more full pass (~5 ms) once it is turned back on. It
    is back on before a command that may run for long (_run; cmd_restore unless -d, once the process runs) and
    in every process we fork (a lazy daemon, its guard); a `restore -d` exits without it."""
    global _fork_hook
    gc.disable()
    if not _fork_hook:
        os.register_at_fork(after_in_child=gc.enable)
        _fork_hook = True


def _main(argv: list[str] | None) -> int:
    args = _plain_line(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = _parser(argv).parse_args(argv)
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
    if args.command != "restore":
        gc.enable()
    if args.command == "check":
        return cmd_check()
    if args.command == "dump":
        return cmd_dump(args)
    if args.command == "restore":
        return cmd_restore(args)
    if args.command == "show":
        return cmd_show(args)
    if args.command == "service":
        return cmd_service(args)
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

    from lazarus.api import check
    result = check()
    table = Table(title="lazarus check")
    table.add_column("feature")
    table.add_column("available")
    table.add_column("needed for")
    table.add_column("detail")
    for f in result.features:
        table.add_row(escape(f.name), "yes" if f.available else "NO", ", ".join(f.purposes), escape(f.detail))
    con = _console()
    con.print(table)
    if not result.ok:
        con.print(f"dump/restore cannot work here: missing {', '.join(result.missing)}")
        return 1
    con.print("dump and restore can work on this machine")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from lazarus.api import dump
    # This process exits next: the killed original goes on exiting without us (wait_gone), as after CRIU's.
    res = dump(args.pid, args.dir, leave_running=args.leave_running, shell_job=args.shell_job,
               direct=args.direct, sync=args.sync, wait_gone=False)
    fate = "left running" if res.left_running else "killed"
    tree = f" and its tree ({res.processes} processes)" if res.processes > 1 else ""
    print(f"dumped pid {res.pid}{tree} to {res.directory}: {res.pages} pages "
          f"({res.pages * 4096 / 2**20:.1f} MiB) in {res.seconds * 1000:.0f} ms; original{'s' if tree else ''} {fate}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.lazy and (args.no_background or args.stats or args.lazy_pages_socket):
        raise UsageError("--no-background, --stats and --lazy-pages-socket need --lazy")
    daemon = None
    if args.lazy and args.detach and not args.lazy_pages_socket:
        # Forked before this process imports the API and the restore (lazy/spawn.py): the daemon's start-up
        # runs beside those imports. api.restore takes it over, and ends it should the restore fail.
        from lazarus.lazy.spawn import daemon_log, fork_daemon
        daemon = fork_daemon(args.dir, args.lazy_log or daemon_log(args.dir), background=not args.no_background,
                             stats_path=args.stats)
    try:
        from lazarus import api
    except BaseException:
        if daemon is not None:
            daemon.end()
        raise
    served_here = args.lazy and not args.detach and not args.lazy_pages_socket
    bar, on_progress = _progress_bar() if served_here and sys.stderr.isatty() else (None, None)
    try:
        res = api.restore(args.dir, lazy=args.lazy, detach=args.detach, background=not args.no_background,
                          stats_path=args.stats, lazy_log=args.lazy_log, lazy_pages_socket=args.lazy_pages_socket,
                          on_progress=on_progress, pidns=args.pidns, daemon=daemon)
        if not args.detach:
            gc.enable()  # the process runs: what follows (serving its pages, waiting for it) may last
        try:
            _report_restore(args, res)
        except BaseException:
            res.close()  # served here: nobody will serve it, so the guard's rule applies (it is killed)
            raise
        if res.served_by == "here":
            stats = res.serve()
            log.info("lazy pages done: %s", stats)
    finally:
        if bar is not None:
            bar.stop()
    return 0 if args.detach else res.wait()


def _report_restore(args: argparse.Namespace, res: Any) -> None:
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{res.pid}\n")
    since_start = (time.monotonic() - _T0) * 1000
    inside = f" (pid {res.ns_pid} in its own PID namespace, whose init is pid {res.init.pid})" if res.init else ""
    tree = f" and its tree ({res.tasks} processes)" if res.tasks > 1 else ""
    print(f"restored pid {res.pid}{inside}{tree} in {res.seconds * 1000:.0f} ms ({since_start:.0f} ms since the command "
          f"started; {res.pages_written} pages written{', the rest served lazily' if args.lazy else ''})",
          file=sys.stdout if args.detach else sys.stderr)
    sys.stdout.flush()


def _progress_bar() -> tuple[Any, Any]:
    """A progress bar for the lazy transfer and its callback. It refreshes only when called: no thread of
    its own, since a lazy restore forks its guard after this (lazy/daemon.py)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    bar = Progress("lazy pages", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True,
                   auto_refresh=False)
    task = bar.add_task("pages", total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        bar.refresh()
    return bar, update


def cmd_adopt(args: argparse.Namespace) -> int:
    """lazy-pages --adopt PID -D DIR: take the uffd from the waiting process itself and serve it to the end."""
    from lazarus.api import require_lazy_features
    from lazarus.lazy.daemon import adopt_and_serve
    require_lazy_features()
    if args.socket:
        raise UsageError("--adopt takes no --socket")
    bar, on_progress = _progress_bar() if sys.stderr.isatty() else (None, None)

    def adopted(missing: int) -> None:
        print(f"lazy-pages: adopted pid {args.adopt}: {missing} pages still missing", flush=True)
    try:
        stats = adopt_and_serve(args.adopt, args.dir, background=not args.no_background, stats_path=args.stats,
                                on_progress=on_progress, on_adopted=adopted)
    finally:
        if bar is not None:
            bar.stop()
    states = [p["state"] for p in stats.get("processes", []) if p["pid"] == args.adopt]
    print(f"lazy-pages: pid {args.adopt} {states[0] if states else 'served'}: {stats.get('pages_fault', 0)} "
          f"pages by fault, {stats.get('pages_background', 0)} in background")
    return 0 if not stats.get("lost") else 1


def cmd_lazy_pages(args: argparse.Namespace) -> int:
    """lazarus lazy-pages: serve restores that hand their uffd over the socket, until none needs us."""
    from lazarus.api import require_lazy_features
    from lazarus.lazy.daemon import serve_socket
    require_lazy_features()
    path = args.socket or args.dir / "lazy-pages.sock"
    if not args.dir.is_dir():
        raise LazarusError(f"{args.dir}: no such directory", path=str(args.dir))
    bar, on_progress = _progress_bar() if sys.stderr.isatty() else (None, None)
    try:
        # 0600 in a directory only root can write; every peer is checked too (lazy/trust.py).
        stats = serve_socket(path, background=not args.no_background, linger=args.linger, stats_path=args.stats,
                             on_progress=on_progress,
                             on_listening=lambda p: print(f"lazy-pages: listening on {p}", flush=True))
    finally:
        if bar is not None:
            bar.stop()
    print(f"lazy-pages: served {len(stats.get('processes', []))} process(es), "
          f"{stats.get('pages_fault', 0)} pages by fault, {stats.get('pages_background', 0)} in background")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from lazarus.service import serve

    def ready(where: str, state_dir: Path) -> None:
        print(f"service: listening on {where} (state in {state_dir})", flush=True)
    serve(args.socket, state_dir=args.state_dir, spares=args.spare_workers, on_ready=ready)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from lazarus.api import show
    summary = show(args.dir)
    if args.json:
        import json
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table
    con = _console()
    con.print(f"image {summary['directory']}: {summary['format']} v{summary['version']}, kernel "
              f"{summary['kernel_release']}, {summary['total_bytes'] / 2**20:.1f} MiB in {len(summary['files'])} files")
    if "tree_drawing" in summary:
        con.print(f"process tree ({len(summary['tree'])} processes):", markup=False)
        for line in summary["tree_drawing"]:
            con.print("  " + line, markup=False, highlight=False)
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
        more = f"; {t['shared_pages']} more shared, saved by another process" if t.get("shared_pages") else ""
        if t.get("inherited_pages"):
            more += f"; {t['inherited_pages']} inherited from pid {t['inherited_from']} (copy-on-write, saved there)"
        con.print(f"  memory: {t['pages']} pages saved, {t['lazy_pages']} of them served lazily by --lazy{more}")
        vt = Table(show_edge=False)
        for col in ("start", "end", "prot", "kind", "pages", "lazy", "path"):
            vt.add_column(col)
        for v in t["vmas"]:
            pages = f"{v['pages']} shared with pid {v['stored_by']}" if "stored_by" in v else str(v["pages"])
            if v.get("inherited"):
                pages += f", {v['inherited']} inherited from pid {v['inherited_from']}"
            vt.add_row(v["start"], v["end"], v["prot"], v["kind"], pages, "lazy" if v["lazy"] else "", v["path"])
        con.print(vt)
        if "fd_table_of" in t:
            con.print(f"  fds: the fd table of pid {t['fd_table_of']} (clone with CLONE_FILES), listed there")
            continue
        ft = Table(show_edge=False)
        for col in ("fd", "type", "target", "flags", "pos", "cloexec"):
            ft.add_column(col)
        for f in t["fds"]:
            ft.add_row(str(f["fd"]), f["type"], f["target"], f["flags"], str(f["pos"]), "yes" if f["cloexec"] else "")
        con.print(ft)
    return 0
