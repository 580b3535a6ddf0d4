"""File descriptors beyond the self-checking targets' own checks (files2.c, locks.c): what the image holds,
what a restore refuses when the files changed, and fd state a dump refuses (files_refuse.c)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

REFUSALS = {
    "owner": r"fd 10 .*signals go to pid \d+, another process",
    "pgrp": r"fd 10 .*process group \d+",
    "lease": r"fd 10 .*lease",
    "procother": r"fd 10 \(/proc/\d+/status\).*another process",
}
assert set(REFUSALS) == set(H.FILES_REFUSE_MODES)


def _task(image: Path) -> dict[str, Any]:
    (name,) = [p for p in image.iterdir() if p.name.startswith("task-")]
    return json.loads(name.read_text())


def _fd(task: dict[str, Any], fd: int) -> dict[str, Any]:
    return next(f for f in task["files"] if f["fd"] == fd)


def _dump_files2(harness: H.Harness) -> tuple[H.Target, Path]:
    target = harness.start_case(H.CASES_BY_ID["files2"])
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    return target, image


def test_sparse_unlinked_file_is_small_in_the_image(harness: H.Harness) -> None:
    """The 64 MiB unlinked file with three 4 KiB extents costs 12 KiB of image, not 64 MiB."""
    _, image = _dump_files2(harness)
    rec = _fd(_task(image), 50)
    assert rec["type"] == "ghost" and rec["size"] == 64 << 20
    assert rec["extents"] == [[0, 4096], [32 << 20, 4096], [(64 << 20) - 4096, 4096]]
    assert (image / f"blob-{rec['data']}.img").stat().st_size == 3 * 4096
    total = sum(p.stat().st_size for p in image.iterdir())
    assert total < 4 << 20, f"image is {total} bytes"


def test_hard_links_and_other_links_in_the_image(harness: H.Harness) -> None:
    """Two fds of one unlinked inode: one copy of the data, the second fd names the first. Unlinked files with
    another link: no copy at all, reopened through that link (beside it) or a file handle (elsewhere)."""
    _, image = _dump_files2(harness)
    task = _task(image)
    assert _fd(task, 41).get("same_inode") == 40 and "data" not in _fd(task, 41)
    same_dir = _fd(task, 43)
    assert same_dir["type"] == "file" and same_dir["path"].endswith("/same-link") and "handle" not in same_dir
    other = _fd(task, 42)
    assert other["type"] == "file" and other["handle"]["bytes"]
    assert not any(p.name.startswith(("blob-ghost-42", "blob-ghost-43")) for p in image.iterdir())


def test_restore_refuses_a_replaced_open_file(harness: H.Harness) -> None:
    """A file the process had open, now another inode at the same path: refused before anything exists."""
    target, image = _dump_files2(harness)
    path = Path(_fd(_task(image), 10)["path"])
    fresh = path.with_name("append.new")
    fresh.write_text("")
    os.rename(fresh, path)
    r = harness.restore(image, like=target)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, re.escape(str(path)), "another file")
    assert r.proc.returncode == 1 and not H.is_alive(target.pid)


def test_restore_refuses_when_the_other_link_is_gone(harness: H.Harness) -> None:
    """An unlinked file kept through its other link: once that link is gone too, the file is gone."""
    target, image = _dump_files2(harness)
    rec = _fd(_task(image), 42)
    link = Path(rec["path"]).parent / "sub" / "other-link"
    link.unlink()
    r = harness.restore(image, like=target)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, "fd 42", "no longer exists")
    assert r.proc.returncode == 1 and not H.is_alive(target.pid)


@pytest.mark.parametrize("mode", sorted(REFUSALS))
def test_dump_refuses_fd_state(harness: H.Harness, mode: str) -> None:
    case = H.Case(f"files-refuse-{mode}", "files_refuse", (mode,))
    target = harness.start_target("files_refuse", mode)
    H.refused_unchanged(harness, case, target, REFUSALS[mode])


_edit_task = H.reseal_task


@pytest.mark.parametrize(("fd", "key", "value"), [
    (20, "owner", [7, 1]),
    (20, "sig", "SIGIO"),
    (50, "extents", [[0, -4096]]),
    (41, "same_inode", 999),
    (42, "handle", {"type": 1, "bytes": "zz", "mount": "/"}),
    (12, "locks", [["lease", "read", 0, None]]),
    (None, "cwd_deleted", {"path": 3}),
])
def test_restore_refuses_damaged_fd_fields(harness: H.Harness, fd: int | None, key: str, value: Any) -> None:
    """Optional fd fields of the wrong shape: one line naming the field, before any process exists."""
    target, image = _dump_files2(harness)

    def damage(task: dict[str, Any]) -> None:
        if fd is None:
            task["misc"][key] = value
        else:
            _fd(task, fd)[key] = value

    _edit_task(image, damage)
    r = harness.restore(image, like=target)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, re.escape(key))
    assert r.proc.returncode == 1 and not H.is_alive(target.pid)


def test_restore_refuses_a_lock_taken_meanwhile(harness: H.Harness) -> None:
    """A lock the process held, now held by someone else: the restore is refused naming it (it never waits),
    and works once the lock is free again."""
    import fcntl

    case = H.CASES_BY_ID["locks"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    rec = _fd(_task(image), 10)
    assert rec["locks"] == [["flock", "write", 0, None]]
    with open(rec["path"], "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        r = harness.restore(image, like=target)
        assert isinstance(r.proc, subprocess.CompletedProcess)
        H.assert_clean_error(r.proc, "fd 10", "flock", "held by another process")
    assert not H.is_alive(target.pid)
    r = harness.restore(image, like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


@pytest.mark.parametrize("consume", [0, 1])
def test_fifo_kept_open_by_another_process(harness: H.Harness, consume: int) -> None:
    """fds.c's FIFO holds 3000 bytes; we hold it open across the dump, so its buffer outlives the original.
    The restore must not write those bytes a second time; if some were read meanwhile, it refuses."""
    case = H.CASES_BY_ID["fds"]
    target = harness.start_case(case)
    fifo = os.open(f"{target.log}.d/fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        image = harness.image_dir()
        res = harness.dump(target, image)
        assert res.returncode == 0, res.stderr
        assert _fd(_task(image), 40)["path"] == f"{target.log}.d/fifo"
        assert len(os.read(fifo, consume)) == consume
        r = harness.restore(image, like=target)
        if consume:
            assert isinstance(r.proc, subprocess.CompletedProcess)
            H.assert_clean_error(r.proc, "fd 40", "2999 bytes now")
            return
        assert r.returncode == 0 and r.target is not None, r.stderr
        H.expect_pass(harness.run_case(case, r.target), r.target, r)
        assert r.target.wait_exit(15) == 0, r.target.describe()
    finally:
        os.close(fifo)
