"""DIR.tmp-PID-START-* left by a killed writer are removed by the next writer to DIR; others are kept."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lazarus.images import ImageWriter
from lazarus.images.writer import _start_time, remove_stale_tmp


def _dead_pid() -> tuple[int, int]:
    proc = subprocess.Popen(["true"])
    start = _start_time(proc.pid)
    proc.wait()
    assert start is not None
    return proc.pid, start


def test_next_writer_removes_only_dead_writers_tmp(tmp_path: Path) -> None:
    final = tmp_path / "img"
    pid, start = _dead_pid()
    dead = tmp_path / f"img.tmp-{pid}-{start}-abc"
    dead.mkdir()
    (dead / "pages-1.img").write_bytes(b"x" * 8192)
    reused = tmp_path / f"img.tmp-{os.getpid()}-{(_start_time(os.getpid()) or 0) + 1}-def"  # our pid, other start time
    reused.mkdir()
    live = tmp_path / f"img.tmp-{os.getpid()}-{_start_time(os.getpid())}-ghi"
    live.mkdir()
    other_name = tmp_path / "img.tmp-old"
    other_name.mkdir()
    other_dir = tmp_path / f"other.tmp-{pid}-{start}-jkl"
    other_dir.mkdir()

    w = ImageWriter(final)
    try:
        assert not dead.exists() and not reused.exists()
        assert live.is_dir() and other_name.is_dir() and other_dir.is_dir()
        assert w.tmp_dir.name.startswith(f"img.tmp-{os.getpid()}-{_start_time(os.getpid())}-")
        # a second writer to the same place leaves the first one's (live) directory alone
        assert remove_stale_tmp(final) == []
        assert w.tmp_dir.is_dir()
    finally:
        w.abort()
