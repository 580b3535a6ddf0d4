"""Lazarus demo: checkpoint a running counter, restore it, and watch it carry on.

Run as root from the repository root: `make demo` (or `.venv/bin/python demo/demo.py`).

Steps: build demo/counter.c into a temporary directory; start it (it fills 16 MiB with a pattern and logs a
tick per second); `lazarus dump` it (the original is killed once the image is complete); `lazarus show` the
image; `lazarus restore -d` it (same pid, the counter continues, SIGUSR2 makes it verify its memory: PASS);
then, when this build offers `restore --lazy`, dump it again and restore it lazily (memory served on demand
through userfaultfd). Finally the counter is killed and everything is removed.

The demo makes itself a child subreaper, so a restored process (whose parent, `lazarus restore`, exits) is
re-parented to the demo, which reaps it.
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "demo" / "counter.c"
LAZARUS = [sys.executable, "-m", "lazarus"]
PR_SET_CHILD_SUBREAPER = 36  # include/uapi/linux/prctl.h
MIB = 16


class DemoError(Exception):
    pass


class Out:
    """rich output on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.console = None
        if sys.stdout.isatty():
            from rich.console import Console
            self.console = Console(highlight=False)

    def step(self, title: str) -> None:
        if self.console:
            self.console.rule(f"[bold]{title}")
        else:
            print(f"\n== {title}", flush=True)

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def command(self, argv: list[str]) -> None:
        shown = " ".join(["lazarus", *argv])
        if self.console:
            self.console.print(f"[bold cyan]$ {shown}[/]")
        else:
            print(f"$ {shown}", flush=True)

    def block(self, text: str, style: str = "dim") -> None:
        text = text.rstrip("\n")
        if not text:
            return
        if self.console:
            from rich.text import Text
            self.console.print(Text(text, style=style), soft_wrap=True)  # lines as the command printed them
        else:
            for line in text.splitlines():
                print(f"  {line}", flush=True)

    def good(self, text: str) -> None:
        if self.console:
            self.console.print(f"[bold green]✔ {text}[/]")
        else:
            print(f"ok: {text}", flush=True)

    def bad(self, text: str) -> None:
        if self.console:
            self.console.print(f"[bold red]✘ {text}[/]")
        else:
            print(f"FAILED: {text}", flush=True)


def set_child_subreaper() -> None:
    from lazarus.kernel import abi
    from lazarus.kernel.syscall import syscall
    syscall(abi.SYS.prctl, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, what="prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pid: int, timeout: float) -> int | None:
    """Wait for our child `pid` to exit; returns its wait status, or None on timeout / not our child."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Demo:
    def __init__(self, out: Out, workdir: Path, mib: int) -> None:
        self.out = out
        self.work = workdir
        self.mib = mib
        self.binary = workdir / "counter"
        self.log = workdir / "counter.log"
        self.pid = 0          # the counter's pid (kept across restores)
        self.alive = False    # whether a counter we started or restored may be running
        self.shown_lines = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- helpers -------------------------------------------------------------------------------------------

    def lazarus(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        self.out.command(list(args))
        env = dict(os.environ, COLUMNS=str(shutil.get_terminal_size((100, 24)).columns))
        try:
            res = subprocess.run([*LAZARUS, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                 env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise DemoError(f"lazarus {args[0]} did not finish within {timeout:.0f} s") from e
        self.out.block(res.stdout, "")
        self.out.block(res.stderr, "yellow" if res.returncode == 0 else "red")
        return res

    def log_lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def show_new_log(self) -> None:
        lines = self.log_lines()
        new, self.shown_lines = lines[self.shown_lines:], len(lines)
        self.out.say(f"{self.log.name}:")
        self.out.block("\n".join(new), "green")

    def ticks(self) -> list[int]:
        return [int(m.group(1)) for line in self.log_lines() if (m := re.fullmatch(r"tick (\d+)", line))]

    def is_ours(self) -> bool:
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{self.pid}/exe") == str(self.binary)
        return False

    # -- steps ---------------------------------------------------------------------------------------------

    def build(self) -> None:
        self.out.step("1. build the demo program")
        cmd = ["gcc", "-O2", "-Wall", "-o", str(self.binary), str(SOURCE)]
        self.out.say(f"$ gcc -O2 -Wall -o {self.binary} demo/counter.c")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode:
            raise DemoError(f"gcc failed:\n{res.stderr}")

    def start(self) -> None:
        self.out.step("2. start it")
        proc = subprocess.Popen([str(self.binary), str(self.log), str(self.mib)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                start_new_session=True, cwd=self.work)
        # Keep the Popen object: dropped while running, subprocess would reap the pid behind our back.
        self.proc = proc
        self.pid, self.alive = proc.pid, True
        self.out.say(f"counter started as pid {self.pid}: {self.mib} MiB of memory filled with a pattern, "
                     "one tick per second")
        wait_for("the counter's third tick", lambda: len(self.ticks()) >= 3, 30)
        self.show_new_log()

    def dump(self, name: str) -> Path:
        image = self.work / name
        before = self.ticks()[-1]
        res = self.lazarus("dump", "-t", str(self.pid), "-D", str(image))
        if res.returncode:
            raise DemoError("dump failed")
        # The dump kills the original once the image is complete: reap it so that its pid is free again.
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None
        else:
            reap(self.pid, 10)
        self.alive = False
        if os.path.exists(f"/proc/{self.pid}"):
            raise DemoError(f"pid {self.pid} still exists after the dump")
        self.out.good(f"checkpointed at tick {before}; the original process is gone (no /proc/{self.pid})")
        return image

    def show(self, image: Path) -> None:
        res = self.lazarus("show", str(image))
        if res.returncode:
            raise DemoError("show failed")

    def restore(self, image: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        pidfile = self.work / "restored.pid"
        pidfile.unlink(missing_ok=True)
        last = self.ticks()[-1]
        res = self.lazarus("restore", "-D", str(image), "-d", "--pidfile", str(pidfile), *extra)
        if res.returncode:
            return res
        self.alive = True
        restored = int(pidfile.read_text())
        if restored != self.pid:
            raise DemoError(f"restored as pid {restored}, expected {self.pid}")
        self.out.good(f"running again as pid {restored} (the same pid)")
        self.out.say("letting it count...")
        wait_for("a tick after the restore", lambda: len([t for t in self.ticks() if t > last]) >= 2, 15)
        self.show_new_log()
        after = [t for t in self.ticks() if t > last]
        if after[0] != last + 1:
            raise DemoError(f"counter jumped from {last} to {after[0]}")
        self.out.good(f"the counter continues where it was: tick {last} -> {after[0]}, {after[1]}")
        self.verify()
        return res

    def verify(self) -> None:
        if not self.is_ours():
            raise DemoError(f"pid {self.pid} is not the demo counter")
        self.out.say(f"$ kill -USR2 {self.pid}    # ask the counter to verify its {self.mib} MiB")
        n = len(self.log_lines())
        os.kill(self.pid, signal.SIGUSR2)
        wait_for("the memory check", lambda: any(ln.startswith(("PASS", "FAIL")) for ln in self.log_lines()[n:]),
                 15)
        self.show_new_log()
        result = next(ln for ln in self.log_lines()[n:] if ln.startswith(("PASS", "FAIL")))
        if not result.startswith("PASS"):
            raise DemoError(result)
        self.out.good("memory verified after restore")

    def lazy(self) -> None:
        help_text = subprocess.run([*LAZARUS, "restore", "--help"], capture_output=True, text=True, timeout=60,
                                   cwd=REPO).stdout
        if "--lazy" not in help_text:
            self.out.say("(this build has no `restore --lazy`: lazy restore skipped)")
            return
        self.out.step("6. checkpoint again, restore lazily (memory served on demand through userfaultfd)")
        image = self.dump("image-2")
        res = self.restore(image, "--lazy")
        if res.returncode:
            self.out.bad("lazy restore failed (above); restoring the same image eagerly instead")
            res = self.restore(image)
            if res.returncode:
                raise DemoError("restore failed")

    def stop(self) -> None:
        if self.proc is not None:  # the original, never dumped
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None
        elif self.alive and self.is_ours():
            os.kill(self.pid, signal.SIGKILL)
            if reap(self.pid, 10) is None:
                # not our child (no subreaper) or stuck: wait for the pid to disappear
                with contextlib.suppress(DemoError):
                    wait_for(f"pid {self.pid} to exit", lambda: not os.path.exists(f"/proc/{self.pid}"), 10)
        self.alive = False

    def run(self) -> None:
        self.build()
        self.start()
        self.out.step("3. checkpoint it")
        image = self.dump("image-1")
        self.out.step("4. look inside the image")
        self.show(image)
        self.out.step("5. restore it")
        if self.restore(image).returncode:
            raise DemoError("restore failed")
        self.lazy()
        self.out.step("done")
        self.stop()
        self.out.good(f"counter (pid {self.pid}) stopped; temporary files removed")


def reap_leftovers(timeout: float) -> None:
    """Reap children re-parented to us (for instance a lazy-pages server once its process is gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mib", type=int, default=MIB, help=f"memory the counter fills (default {MIB})")
    args = ap.parse_args(argv)
    out = Out()
    if os.geteuid() != 0:
        out.bad("the demo needs root (ptrace of any process, clone3 with a chosen pid, userfaultfd)")
        return 1
    if shutil.which("gcc") is None:
        out.bad("gcc not found (make demo installs it on Debian)")
        return 1
    set_child_subreaper()
    work = Path(tempfile.mkdtemp(prefix="lazarus-demo-"))
    demo = Demo(out, work, args.mib)
    try:
        demo.run()
        return 0
    except DemoError as e:
        out.bad(str(e))
        if demo.log.exists():
            out.say("counter log:")
            out.block(demo.log.read_text())
        return 1
    except KeyboardInterrupt:
        out.bad("interrupted")
        return 130
    finally:
        demo.stop()
        reap_leftovers(3)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
