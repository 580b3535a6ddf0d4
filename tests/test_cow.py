"""Copy-on-write pages kept shared by a tree restore (issue 9): the tree's total Pss after an eager restore,
and after a lazy restore once every page is in, stays within 1.15x of the original's; each process of the tree
checks its own memory (tests/targets/cow_tree.c). A tree whose sharing cannot be rebuilt by fork restores with
private copies.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

CASE = H.CASES_BY_ID["cow-tree"]
MIB = int(os.environ.get("LAZARUS_COW_MIB", "32"))  # the tree is 256: LAZARUS_COW_MIB=256
PAGE = 4096


def rollup(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in smaps_rollup of {pid}")


def tree_pids(target: H.Target) -> list[int]:
    line = next(x for x in target.log_text().splitlines() if x.startswith("# tree "))
    return [int(x) for x in line.split()[2:]]


def started(harness: H.Harness, *args: str) -> tuple[H.Target, list[int], dict[int, int], int]:
    target = harness.start_target("cow_tree", str(MIB), *args)
    harness.settle(CASE, target)
    pids = tree_pids(target)
    rss = {p: rollup(p, "Anonymous") for p in pids}
    return target, pids, rss, sum(rollup(p, "Pss") for p in pids)


def all_in(pids: list[int], rss: dict[int, int], timeout: float = 60.0) -> None:
    """Wait until each restored process has as much memory present as its original had (a lazy restore's
    transfer is complete), so that the Pss measured next is not low because pages are missing."""
    deadline = time.monotonic() + timeout
    while True:
        now = {p: rollup(p, "Anonymous") for p in pids}
        if all(now[p] >= rss[p] - 64 * PAGE for p in pids):
            return
        assert time.monotonic() < deadline, f"anonymous pages still missing after {timeout} s: {now}, originals {rss}"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_cow_tree_pss_kept(harness: H.Harness, mode: str) -> None:
    target, pids, rss, before = started(harness)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    inv = json.loads((image / "inventory.json").read_text())
    assert inv["version"] == 4 and "cow.json" in inv["files"], inv
    parent, child, grandchild = pids
    region = MIB << 20
    # Each shared page is stored once: the child's file holds its one page in eight, the grandchild's its one
    # in 64 (plus a few pages of stack, data, heap each).
    sizes = {p: (image / f"pages-{p}.img").stat().st_size if (image / f"pages-{p}.img").exists() else 0
             for p in pids}
    assert sizes[parent] >= region, sizes
    assert sizes[child] < region // 8 + (1 << 20), sizes
    assert sizes[grandchild] < region // 64 + (1 << 20), sizes
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    assert tree_pids(target) == pids
    all_in(pids, rss)
    after = sum(rollup(p, "Pss") for p in pids)
    print(f"cow tree {MIB} MiB, {mode}: Pss {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after")
    assert after <= 1.15 * before, f"tree Pss {after / 2**20:.1f} MiB after the restore, {before / 2**20:.1f} before"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_cow_tree_unshareable_restores_with_private_copies(harness: H.Harness) -> None:
    """The child's mapping is no longer its parent's (split by mprotect): the pages they share are stored in
    each and come back as private copies; the grandchild still shares the child's (identical vmas)."""
    target, pids, rss, before = started(harness, "split")
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    parent, child, grandchild = pids
    cow = json.loads((image / "cow.json").read_text())
    lo, size = [int(x, 0) for x in next(x for x in target.log_text().splitlines()
                                        if x.startswith("# region ")).split()[2:]]

    def in_region(pid: int, what: str) -> int:
        return sum(n for s, n in cow.get(str(pid), {}).get(what, []) if lo <= s < lo + size)
    # Only the child's one page in eight is kept shared (with the grandchild); nothing of the parent's.
    assert in_region(parent, "owned") == 0 and in_region(child, "inherited") == 0, cow.get(str(child))
    assert in_region(child, "owned") == in_region(grandchild, "inherited") == size // PAGE // 8
    assert (image / f"pages-{child}.img").stat().st_size >= MIB << 20
    r = harness.restore(image, like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_cow_tree_under_pidns_twice(harness: H.Harness) -> None:
    """Two lazy --pidns restores of one copy-on-write tree at once: each keeps the sharing inside its own
    namespace (children forked there from their restored parents) and passes its checks."""
    from test_pidns import check_copy, restore_copies, run_one

    target, pids, rss, before = started(harness)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    copies = restore_copies(harness, image, target, 2, lazy=True)
    inits = [check_copy(r, target.pid) for r in copies]
    for r in copies:
        assert r.target is not None and r.pid is not None
        tree = [r.pid, *H.descendants(r.pid)]
        assert len(tree) == 3, tree
        all_in(tree, dict(zip(tree, rss.values(), strict=True)))
        after = sum(rollup(p, "Pss") for p in tree)
        assert after <= 1.15 * before, f"copy {r.pid}: tree Pss {after / 2**20:.1f} MiB, {before / 2**20:.1f} before"
    for r, init in zip(copies, inits, strict=True):
        run_one(harness, CASE, r, init)


def _layout(pid: int) -> list[str]:
    """/proc/PID/maps without inode numbers (the executable's and libraries' are the same files again)."""
    return [" ".join(x.split()[:3] + x.split()[5:]) for x in Path(f"/proc/{pid}/maps").read_text().splitlines()]


@pytest.mark.parametrize(("way", "mode"), [("process_madvise", "lazy"), ("one_by_one", "lazy"),
                                           ("process_madvise", "eager")])
def test_cow_tree_holes_dropped(harness: H.Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                way: str, mode: str) -> None:
    """The child's thousands of holes (its parent's pages where it has its own: one in eight) are dropped with a
    few process_madvise calls, or, where the kernel refuses that (forced here: its stand-in answers False), one
    madvise each: either way every process checks its memory, the tree's Pss stays one copy, and no process is
    left with a mapping the original did not have (the holes' table is unmapped). Eagerly, the child's own
    pages are then written into the holes by process_vm_writev (restore/cow.py write_kept)."""
    asked = tmp_path / "asked"
    if way == "one_by_one":
        (tmp_path / "sitecustomize.py").write_text(
            "from lazarus.restore import cow\n"
            "def refused(*args, **kw):\n"
            f"    open({str(asked)!r}, 'a').write('x')\n"
            "    return False\n"
            "cow._drop_vector = refused\n")
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    target, pids, rss, before = started(harness)
    layouts = {p: _layout(p) for p in pids}
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    cow = json.loads((image / "cow.json").read_text())
    assert len(cow[str(pids[1])]["inherited"]) > 1000, "the child should have thousands of holes"
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    assert asked.exists() == (way == "one_by_one")  # the stand-in was in effect
    assert {p: _layout(p) for p in pids} == layouts
    all_in(pids, rss)
    after = sum(rollup(p, "Pss") for p in pids)
    assert after <= 1.15 * before, f"tree Pss {after / 2**20:.1f} MiB after the restore, {before / 2**20:.1f} before"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_show_counts_inherited_pages(harness: H.Harness) -> None:
    """`show` counts the copy-on-write pages a child keeps from its parent (cow.json "inherited", stored in no
    file of the child's) apart from its own, naming the parent: per vma and per task, in JSON and in text."""
    target, pids, _, _ = started(harness)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    cow = json.loads((image / "cow.json").read_text())
    parent_of = {n["pid"]: n["ppid"] for n in json.loads((image / "inventory.json").read_text())["tree"]}
    shown = harness.lazarus("show", "--json", str(image))
    assert shown.returncode == 0, shown.stderr
    tasks = {t["pid"]: t for t in json.loads(shown.stdout)["tasks"]}
    parent, child, grandchild = pids
    checked = []
    for pid in pids:
        want = sum(n for _, n in (cow.get(str(pid)) or {}).get("inherited", []))
        t = tasks[pid]
        assert t.get("inherited_pages", 0) == want, (pid, t.get("inherited_pages"), want)
        assert sum(v.get("inherited", 0) for v in t["vmas"]) == want, pid
        if want:
            assert t["inherited_from"] == parent_of[pid], (pid, t["inherited_from"])
            assert all(v["inherited_from"] == parent_of[pid] for v in t["vmas"] if v.get("inherited")), pid
            checked.append(pid)
    # cow_tree.c: the child rewrote one page in eight of its parent's region, the grandchild one in 64 of those
    assert child in checked and tasks[child]["inherited_pages"] >= (MIB << 20) // PAGE // 2, tasks[child]
    assert grandchild in checked and parent not in checked, checked
    text = harness.lazarus("show", str(image))
    assert text.returncode == 0, text.stderr
    assert f"inherited from pid {parent}" in text.stdout and f"inherited from pid {child}" in text.stdout, text.stdout
