"""Processes sharing one fd table (clone with CLONE_FILES), and the shapes of sharing a dump refuses by name.

tests/targets/clone_files.c checks itself after a restore (one table for P and C: C's open seen by P at the
number the table gives, P's close seen by C, one offset with G's inherited description); here: the image holds
the table once (in P's task file, the group in shared.json), the kernel says P and C share one table again
after an eager and a lazy restore (where each has an anchor of its own in that table), and the refusals:
siblings sharing a table without their parent, a vfork child before its exec, clone(CLONE_VM | CLONE_SIGHAND).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

CASE = H.CASES_BY_ID["clone-files"]


def _tree(log: Path) -> tuple[int, int, int]:
    m = re.search(r"^# tree P (\d+) C (\d+) G (\d+)$", log.read_text(), re.M)
    assert m, log.read_text()
    p, c, g = map(int, m.groups())
    return p, c, g


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("case_id", ["clone-files", "clone-files-private"])
def test_one_fd_table_stored_once_and_restored_shared(harness: H.Harness, mode: str, case_id: str) -> None:
    """Both orders of a tree restore (docs/TREES.md): with copy-on-write pages kept (each parent built up to
    its memory before it clones its children), and without ("private": every child made from its blank parent
    first, the top's fd phase then closing what the whole table inherited from the restorer)."""
    from lazarus.kernel import kcmp

    case = H.CASES_BY_ID[case_id]
    target = harness.start_case(case)
    p, c, g = _tree(target.log)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    assert (image / "cow.json").exists() == (case_id == "clone-files"), "copy-on-write runs kept, or none"
    states = json.loads((image / "shared.json").read_text())["states"]
    assert [s for s in states if s["kind"] == "files"] == [{"id": "files-1", "kind": "files", "pids": [p, c]}], states
    files = {pid: json.loads((image / f"task-{pid}.json").read_text())["files"] for pid in (p, c, g)}
    assert files[c] == [], "the table is stored once, in P's task file"
    assert {20, 21, 22, 23, 24, 25} <= {f["fd"] for f in files[p]}, files[p]
    assert 20 in {f["fd"] for f in files[g]} and 22 not in {f["fd"] for f in files[g]}, files[g]
    # fd 20 is one description for the table and G: held by P (for the table) and G, never by C.
    holders = [d["holders"] for d in json.loads((image / "shared.json").read_text())["files"]
               if [p, 20] in d["holders"]]
    assert holders == [[[p, 20], [g, 20]]], holders
    shown = harness.lazarus("show", str(image))
    assert shown.returncode == 0, shown.stderr
    assert f"  fds: the fd table of pid {p} (clone with CLONE_FILES), listed there" in shown.stdout.splitlines()

    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    assert kcmp.same_resource(p, c, "files"), f"pids {p} and {c} do not share one fd table after the restore"
    assert not kcmp.same_resource(p, g, "files") and not kcmp.same_resource(c, g, "files")
    # Nothing of the restore's own left in the table (objects, temporaries): its fds are P's, plus the lazy
    # anchors (one per process, at numbers of their own) until every page is in.
    now = {}
    for fd in os.listdir(f"/proc/{p}/fd"):
        # A lazy anchor is closed once the last page is in: it may go between the listing and the readlink.
        with contextlib.suppress(FileNotFoundError):
            now[int(fd)] = os.readlink(f"/proc/{p}/fd/{fd}")
    extra = {fd: link for fd, link in now.items() if fd not in {f["fd"] for f in files[p]}}
    assert all(link == "anon_inode:[userfaultfd]" for link in extra.values()) and len(extra) <= (mode == "lazy") * 2, \
        f"fds in the table after the restore that P did not have: {extra}"
    H.expect_pass(harness.run_case(case, r.target), r.target, r)


def _refused(harness: H.Harness, shape: str, why: str) -> None:
    """Refused at once with one line, nothing written, and every process as it was (state, no tracer)."""
    target = harness.start_target("clone_files", shape)
    kids = [int(line.split()[-1]) for line in target.log_text().splitlines() if line.startswith("# child: ")]
    assert kids, target.describe()
    deadline = time.monotonic() + 10
    while "R" in (before := {pid: H.proc_state(pid) for pid in [target.pid, *kids]}).values():
        assert time.monotonic() < deadline, f"{shape}: still running after READY: {before}"
        time.sleep(0.02)  # a child may not have reached its wait yet
    image = harness.image_dir()
    res = harness.dump(target, image)
    H.assert_clean_error(res, why)
    assert not image.exists()
    after = {pid: H.proc_state(pid) for pid in before}
    assert after == before, f"{shape}: processes were {before}, now {after}"
    for pid in before:
        tracer = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("TracerPid:"))
        assert tracer == 0, f"pid {pid} still traced by {tracer}"
    assert "# vfork child" not in target.log_text(), "the vfork child went on during the dump"


def test_siblings_sharing_a_table_without_their_parent_are_refused(harness: H.Harness) -> None:
    _refused(harness, "siblings", r"pids \d+, \d+ share one fd table \(CLONE_FILES\) without one of them being the "
                                  r"parent of the others")


def test_vfork_child_before_exec_is_refused_at_once(harness: H.Harness) -> None:
    """The parent waits in vfork() (it would never stop for the dump): refused before anything is seized."""
    _refused(harness, "vfork", r"pid \d+ is in vfork\(\), waiting for its child \d+, which shares its address space")


def test_clone_vm_child_without_threads_is_refused(harness: H.Harness) -> None:
    _refused(harness, "clonevm", r"pid \d+ and its child \d+ share one address space \(clone with CLONE_VM\)")


def test_image_naming_fds_for_a_table_member_is_refused(harness: H.Harness) -> None:
    """An image whose CLONE_FILES member lists fds of its own (the table is its parent's) is refused before
    anything is made."""
    target = harness.start_case(CASE)
    _, c, _ = _tree(target.log)
    image = harness.image_dir()
    assert harness.dump(target, image, "--leave-running").returncode == 0

    def own_fds(task: dict) -> None:
        task["files"] = [{"fd": 40, "type": "file", "path": "/dev/null", "flags": os.O_RDONLY, "cloexec": False,
                          "pos": 0}]
    H.reseal_task(image, own_fds, pid=c)
    r = harness.restore(image, like=target)
    assert r.returncode != 0
    H.assert_clean_error(r.proc, rf"pid {c} shares the fd table of pid \d+, and its task file lists fds")


def test_root_sharing_its_table_with_its_parent_is_refused(harness: H.Harness) -> None:
    """C alone (with G): its table is also P's, outside the dumped tree; a restore would give C a table of its
    own. Refused naming both, and the tree runs on to pass its checks."""
    target = harness.start_case(CASE)
    p, c, _ = _tree(target.log)
    image = harness.image_dir()
    res = harness.dump(c, image, "--shell-job")  # C is in P's session: a shell job, as far as the dump is told
    H.assert_clean_error(res, rf"pid {c} shares its fd table \(CLONE_FILES\) with pid {p}, outside the dumped tree")
    assert not image.exists()
    H.expect_pass(harness.run_case(CASE, target), target)
