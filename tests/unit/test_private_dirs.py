"""Where a restore recreates files (restore/private.py): a private 0700 directory of root's beside the old path
only when that directory is root's and nobody else may rename in it, else in /run/lazarus/recreate; the old
basename inside it; and directories left by a killed restorer removed by the next one."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lazarus.restore import private

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes directories of root's in /run")


def _is_private(d: str) -> None:
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, d
    assert os.path.basename(d).startswith(f"{private.PREFIX}{os.getpid()}-")


def test_beside_the_old_path_in_a_root_directory(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    d = private.make(str(tmp_path / "gone"), os.stat(tmp_path).st_dev)
    try:
        assert os.path.dirname(d) == str(tmp_path)
        _is_private(d)
        assert private.name_in(d, str(tmp_path / "gone"), "file") == f"{d}/gone"
        assert private.name_in(d, "/", "file") == f"{d}/file"
    finally:
        private.remove(d)
        private.done()


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "other-filesystem", "symlink", "missing"])
def test_runtime_directory_otherwise(tmp_path: Path, how: str) -> None:
    parent = tmp_path / "p"
    parent.mkdir(mode=0o755)
    dev = os.stat(parent).st_dev
    if how == "other-owner":
        os.chown(parent, 65534, 65534)
    elif how == "group-writable":
        os.chmod(parent, 0o775)
    elif how == "other-filesystem":
        dev += 1
    elif how == "symlink":
        real = tmp_path / "real"
        parent.rename(real)
        parent.symlink_to(real)
    else:
        shutil.rmtree(parent)
    d = private.make(str(parent / "gone"), dev)
    try:
        assert os.path.dirname(d) == private.RECREATE
        _is_private(d)
        assert not (parent / "gone").exists() and not (tmp_path / "real" / "gone").exists()
    finally:
        private.remove(d)


def test_sticky_world_writable_parent_is_fine(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o1777)
    d = private.make(str(tmp_path / "gone"), None)
    try:
        assert os.path.dirname(d) == str(tmp_path)
    finally:
        private.remove(d)
        private.done()


def test_next_restore_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    """A restorer killed after making its directories (here: a child that makes two and is killed): the next
    restore's sweep removes both, and the ledger; a live restorer's directories are left alone."""
    os.chmod(tmp_path, 0o755)
    code = ("import os, sys, signal; from lazarus.restore import private; "
            f"a = private.make({str(tmp_path / 'x')!r}, None); b = private.make('/nonexistent/y', None); "
            "open(os.path.join(a, 'x'), 'w').close(); print(os.getpid(), a, b, flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid, *left = out.stdout.split()
    assert out.returncode == -9 and len(left) == 2, out
    assert [n for n in os.listdir(private.LEDGERS) if n.startswith(f"{pid}-")], "no ledger for the parent dir"
    assert all(os.path.isdir(d) for d in left)
    mine = private.make(str(tmp_path / "z"), None)
    try:
        private.sweep_stale()
        assert not any(os.path.exists(d) for d in left), left
        assert os.path.isdir(mine)
        assert not [n for n in os.listdir(private.LEDGERS) if n.startswith(f"{pid}-")], "its ledger is left"
    finally:
        private.remove(mine)
        private.done()
