"""Helpers for the tests that dump real programs (not our self-checking targets) mid-work: xz from Debian, a
shell pipeline, a Python program with a process pool. Such a program knows nothing of READY or PASS; what
proves a restore right is its output, byte for byte that of an uninterrupted run with the same input.

Each program runs with stdin on /dev/null (or a file), its stdout redirected by the harness to a regular
file, stderr to a file of its own, in a new session, with no other fd inherited (close_fds): so nothing but
the program itself is in the image.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H


def need_program(name: str) -> Path:
    """The path of a program the tests run; a missing one fails (it is a test dependency, not a kernel feature)."""
    found = shutil.which(name, path=os.defpath)
    if found is None:
        pytest.fail(f"{name} not found on {os.defpath}: `make test-deps` installs it (Makefile, TEST_DEB_PACKAGES)")
    return Path(found)


def write_text_input(path: Path, size: int, seed: int = 20261202) -> Path:
    """A deterministic, compressible text of at least `size` bytes (lines of words drawn from a fixed vocabulary):
    the same bytes on every machine and Python 3.11+, so that the compressors' outputs are comparable."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    chunks: list[bytes] = []
    total = 0
    while total < size:
        chunk = " ".join(rng.choices(words, k=10000)).encode() + b"\n"
        chunks.append(chunk)
        total += len(chunk)
    path.write_bytes(b"".join(chunks))
    return path


def start_program(
    harness: H.Harness, name: str, argv: list[str], stdout: Path, *, cwd: Path | None = None
) -> H.Target:
    """Start argv with stdout to a new regular file `stdout`, stderr to `stdout`.stderr, stdin /dev/null, in a
    new session. The Target's log is the output file (harness.restore(like=...) needs one); its exe is what
    /proc/PID/exe of the program (not of a shell wrapper) will show."""
    exe = Path(os.path.realpath(shutil.which(argv[0], path=os.defpath) or argv[0]))
    with open(stdout, "wb") as out, open(f"{stdout}.stderr", "wb") as err:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
            cwd=cwd or harness.work,
        )
    harness.popens.append(popen)
    harness.register(popen.pid, f"program {name}")
    return H.Target(name, popen.pid, stdout, exe, popen, 0, tuple(argv[1:]))


def threads_of(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def wait_until(check: object, timeout: float, what: str, target: H.Target) -> None:
    """Poll `check()` until true; fail naming `what` if the target ends or the time runs out first."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if not target.alive():
            raise AssertionError(f"{target.name} pid {target.pid} ended before {what}: {stderr_of(target)}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"{target.name} pid {target.pid}: no {what} within {timeout} s")
        time.sleep(0.005)


def stderr_of(target: H.Target) -> str:
    try:
        return Path(f"{target.log}.stderr").read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_pids_free(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait until no process holds any of `pids`, reaping those that are zombies of ours (the children of a
    dumped tree are re-parented to pytest, a subreaper, when their parent dies), so a restore can take the pids
    again. Returns the pids still held at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        held = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(0.01)


def first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte where a and b differ (the shorter one's length if one is a prefix)."""
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, grandchildren, ...), found through /proc/PID/task/*/children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for tid in threads_of(p):
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out
