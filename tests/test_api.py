"""The library API (lazarus/api.py) called from a program of its own: lazy restores served here (serve() with
a status socket) and by a private daemon (its status socket answered while it serves), an eager restore waited
for, and one-line errors. Each runs in a fresh interpreter: a lazy restore forks helpers, which must happen
in a process without threads (pytest's is not one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

# argv: image dir, mode, status socket path. Prints one JSON line once the process runs, a second at the end.
_PROGRAM = r"""
import json, os, sys
from pathlib import Path
import lazarus
from lazarus.lazy.trust import listen_private

image, mode, sock = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if mode == "eager":
    r = lazarus.restore(image)
    print(json.dumps({"pid": r.pid, "lazy": r.lazy, "served_by": r.served_by}), flush=True)
    print(json.dumps({"exit": r.wait()}), flush=True)
elif mode == "here":
    r = lazarus.restore(image, lazy=True)
    print(json.dumps({"pid": r.pid, "lazy": r.lazy, "served_by": r.served_by, "status": r.status()}), flush=True)
    status = listen_private(sock)
    stats = r.serve(status=status.sock)
    status.close()
    print(json.dumps({"stats": stats, "exit": r.wait()}), flush=True)
elif mode == "ahead":
    # The daemon forked before the restore, as the CLI does (lazy/spawn.py), then handed to it.
    from lazarus.lazy.spawn import daemon_log, fork_daemon
    status = listen_private(sock)
    d = fork_daemon(str(image), daemon_log(str(image)), background=False, status=status)
    r = lazarus.restore(image, lazy=True, detach=True, daemon=d, status=status)
    print(json.dumps({"pid": r.pid, "lazy": r.lazy, "served_by": r.served_by, "daemon": r.daemon_pid,
                      "ahead": d.pid, "status": r.status()}), flush=True)
else:
    r = lazarus.restore(image, lazy=True, detach=True, status=listen_private(sock), background=False)
    print(json.dumps({"pid": r.pid, "lazy": r.lazy, "served_by": r.served_by, "daemon": r.daemon_pid,
                      "status": r.status()}), flush=True)
"""


def _dumped(harness: H.Harness) -> tuple[H.Case, H.Target, Path]:
    case = H.CASES_BY_ID["memory-keep"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    return case, target, image


def _private(tmp_path: Path) -> Path:
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d / "status.sock"


@pytest.mark.parametrize("mode", ["eager", "here", "daemon", "ahead"])
def test_restore_through_the_library(harness: H.Harness, tmp_path: Path, mode: str) -> None:
    case, target, image = _dumped(harness)
    since = target.log.stat().st_size
    sock = _private(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _PROGRAM, str(image), mode, str(sock)], cwd=H.REPO_ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    harness.popens.append(proc)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline() or "{}")
    assert first.get("pid") == target.pid, (first, proc.stderr.read() if proc.poll() is not None else "")
    harness.register(first["pid"], "restored process")
    assert first["lazy"] == (mode != "eager")
    assert first["served_by"] == {"eager": None, "here": "here", "daemon": "daemon", "ahead": "daemon"}[mode]
    if mode == "ahead":
        assert first["daemon"] == first["ahead"], first  # the daemon forked ahead served it, no second one
    if mode != "eager":
        st = first["status"]
        assert st["bytes_total"] > 0 and st["stats"]["processes"][0]["pid"] == target.pid, st
    restored = H.Target(target.name, first["pid"], target.log, target.exe, None, since, target.args)
    H.wait_restored(restored)
    if mode in ("daemon", "ahead"):
        assert proc.wait(30) == 0, proc.stderr.read()
        harness.register(first["daemon"], "lazy-pages daemon")
    H.expect_pass(harness.run_case(case, restored), restored)
    if mode in ("daemon", "ahead"):
        assert restored.wait_exit(15) == 0, restored.describe()
        return
    last = json.loads(proc.stdout.readline() or "{}")
    assert last.get("exit") == 0, (last, proc.stderr.read())
    if mode == "here":
        assert last["stats"]["lost"] == [] and last["stats"]["processes"][0]["state"] in ("complete", "exited")
    assert proc.wait(30) == 0, proc.stderr.read()
    assert not sock.exists(), "the status socket outlived its server"


def test_library_errors_are_lazarus_errors(tmp_path: Path) -> None:
    code = ("import lazarus, sys\n"
            "from lazarus.errors import LazarusError, UsageError\n"
            "for call in (lambda: lazarus.restore(sys.argv[1]), lambda: lazarus.show(sys.argv[1]),\n"
            "             lambda: lazarus.restore(sys.argv[1], background=False)):\n"
            "    try:\n"
            "        call()\n"
            "    except UsageError as e:\n"
            "        print('usage', e)\n"
            "    except LazarusError as e:\n"
            "        print('error', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=60, cwd=H.REPO_ROOT)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, (out.stdout, out.stderr)
    assert lines[0].startswith("error ") and "missing" in lines[0]
    assert lines[1].startswith("error ") and "missing" in lines[1]
    assert lines[2].startswith("usage ") and "need --lazy" in lines[2]


def test_a_daemon_forked_ahead_is_ended_when_the_restore_cannot_use_it(tmp_path: Path) -> None:
    """restore(daemon=) for a restore that is not lazy and detached: a UsageError, and the daemon is reaped (it
    is the caller's child: waitpid then finds no such child), not left waiting for a handoff."""
    code = ("import lazarus, os, sys\n"
            "from lazarus.errors import UsageError\n"
            "from lazarus.lazy.spawn import fork_daemon\n"
            "d = fork_daemon(sys.argv[1], os.devnull)\n"
            "try:\n"
            "    lazarus.restore(sys.argv[1], daemon=d)\n"
            "except UsageError as e:\n"
            "    print('usage', e)\n"
            "try:\n"
            "    print('still a child', os.waitpid(d.pid, os.WNOHANG))\n"
            "except ChildProcessError:\n"
            "    print('reaped')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         cwd=H.REPO_ROOT)
    assert out.stdout.splitlines() == [
        "usage a daemon forked ahead is for a lazy, detached restore without --lazy-pages-socket", "reaped"], \
        (out.stdout, out.stderr)


def test_preopened_image_is_used_only_while_its_files_are_unchanged(harness: H.Harness) -> None:
    """preopen_image (a service worker's, while idle): the image kept is the one a lazy restore then uses, unless
    a file of it changed since; a file corrupted after the preopen is refused as without it."""
    import time

    from lazarus import api
    from lazarus.errors import ImageError
    _, target, image = _dumped(harness)
    assert target.wait_exit(10) is not None
    time.sleep(0.2)  # timestamps settled (a file changed within 0.1 s is not trusted to stay as read)
    try:
        assert api.preopen_image(image)
        kept = api._opened[str(image)][1]
        assert api._checked_image(image) == (kept, True)
        assert api.preopen_image(image)
        kept = api._opened[str(image)][1]
        os.utime(image / "inventory.json")
        fresh, ahead = api._checked_image(image)
        assert not ahead
        assert fresh is not kept and fresh.tasks == kept.tasks
        fresh.close()
        time.sleep(0.2)
        assert api.preopen_image(image)
        with open(image / "inventory.json", "ab") as f:
            f.write(b" ")
        with pytest.raises(ImageError, match="inventory.json"):
            api._checked_image(image)
    finally:
        api._opened.clear()


def test_an_image_just_written_is_opened_ahead_and_a_change_right_after_is_seen(harness: H.Harness) -> None:
    """On a filesystem with multigrain timestamps (Linux 6.13: ext4, xfs, btrfs, tmpfs), a change made after
    preopen_image's stat always shows in the file's ctime: an image is opened ahead as soon as it is written (a
    service worker does so after each dump), and a byte appended within the same clock tick is still seen."""
    from lazarus import api
    from lazarus.errors import ImageError
    from lazarus.kernel.features import changes_always_seen
    _, target, image = _dumped(harness)
    if not changes_always_seen(str(image)):
        pytest.skip(f"{image}: not a filesystem with multigrain timestamps on this kernel")
    try:
        assert api.preopen_image(image), "a freshly written image was not opened ahead"
        with open(image / "inventory.json", "ab") as f:  # at once: within the tick of the preopen's stat
            f.write(b" ")
        with pytest.raises(ImageError, match="inventory.json"):
            api._checked_image(str(image))
        assert str(image) not in api._opened
    finally:
        api._opened.clear()
        target.wait_exit(10)


def test_images_opened_ahead_are_bounded(harness: H.Harness) -> None:
    """At most api.PREOPEN_KEEP images stay opened ahead; the oldest is closed first."""
    from lazarus import api
    from lazarus.kernel.features import changes_always_seen
    _, target, image = _dumped(harness)
    target.wait_exit(10)
    if not changes_always_seen(str(image)):
        pytest.skip(f"{image}: not a filesystem with multigrain timestamps on this kernel")
    copies = []
    for i in range(api.PREOPEN_KEEP + 2):
        d = harness.image_dir(f"copy{i}")
        subprocess.run(["cp", "-a", str(image), str(d)], check=True, timeout=60)
        copies.append(str(d))
    try:
        for d in copies:
            assert api.preopen_image(d)
        assert list(api._opened) == copies[-api.PREOPEN_KEEP:]
    finally:
        api._opened.clear()
