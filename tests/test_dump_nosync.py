"""`lazarus dump --no-sync` (api `sync=False`): the image is left to the kernel's writeback, as CRIU leaves its
own, and restores like any other, eager and lazy (targets check their own state); the dump then makes no
fsync, fdatasync or sync_file_range at all, where the default makes them (counted in a dump run by a program
of its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

CASES = [c for c in H.CASES if c.id in ("memory-keep", "memfd-seals", "threads")]


@pytest.mark.parametrize("mode", ("eager", "lazy"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_no_sync_dump_restores(harness: H.Harness, case: H.Case, mode: str) -> None:
    H.dump_with_then_restore(harness, case, mode == "lazy", "--no-sync")


# argv: pid, image dir, "sync" or "nosync". Counts the calls that wait for (or start) the disk's writes.
_COUNT = r"""
import json, os, sys
from pathlib import Path
import lazarus
from lazarus.kernel import syscall

calls = {"fsync": 0, "fdatasync": 0, "sync_file_range": 0}
def counted(name, f):
    def g(*a):
        calls[name] += 1
        return f(*a)
    return g
os.fsync = counted("fsync", os.fsync)
os.fdatasync = counted("fdatasync", os.fdatasync)
syscall._sync_file_range = counted("sync_file_range", syscall._sync_file_range)
lazarus.dump(int(sys.argv[1]), Path(sys.argv[2]), leave_running=True, sync=sys.argv[3] == "sync")
print(json.dumps(calls))
"""


def test_no_sync_makes_no_fsync(harness: H.Harness) -> None:
    case = H.CASES_BY_ID["memory-keep"]
    target = harness.start_case(case)
    counts = {}
    for how in ("sync", "nosync"):
        image = harness.image_dir(how)
        p = subprocess.run([sys.executable, "-c", _COUNT, str(target.pid), str(image), how], cwd=H.REPO_ROOT,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        counts[how] = json.loads(p.stdout.strip().splitlines()[-1])
        assert (image / "inventory.json").exists()
    assert counts["sync"]["fsync"] > 0 and counts["sync"]["sync_file_range"] > 0, counts
    assert counts["nosync"] == {"fsync": 0, "fdatasync": 0, "sync_file_range": 0}, counts
    assert target.alive(), "the original did not survive the two --leave-running dumps"
    H.expect_pass(harness.run_case(case, target), target)
