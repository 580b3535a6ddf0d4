"""Resources a dump must refuse: it exits non-zero with one line naming the resource, creates
no image directory, and leaves the process running and unchanged (it still PASSes its checks).
"""

from __future__ import annotations

import subprocess

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

# mode -> a regex the one-line error must match (the resource it names)
EXPECTED = {
    "tcp": r"socket|tcp|inet",
    "thread": r"thread",
    "child": r"child|children|process tree",
    "pty": r"pty|tty|terminal",
    "seccomp": r"seccomp",
    "uffd": r"userfault|uffd",
    "plain": r"pipe",  # its stdout is a pipe whose other end the harness holds
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_dump_refuses(harness: H.Harness, mode: str) -> None:
    case = H.Case(f"unsupported-{mode}", "unsupported", (mode,))
    stdout = subprocess.PIPE if mode == "plain" else None
    target = harness.start_target("unsupported", mode, stdout=stdout)
    harness.settle(case, target)
    before = H.snapshot(target.pid)
    children = H.children_of(target.pid)
    image = harness.image_dir()

    res = harness.dump(target, image)

    H.assert_clean_error(res, EXPECTED[mode])
    assert H.sibling_leftovers(image) == [], f"dump left {H.sibling_leftovers(image)} next to {image}"
    assert target.alive(), f"the process died: {target.describe()}"
    harness.settle(case, target)
    changed = H.diff_snapshots(before, H.snapshot(target.pid))
    assert not changed, f"the refused dump changed the process: {changed}"
    assert H.children_of(target.pid) == children, "the process's children changed"
    H.expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0
