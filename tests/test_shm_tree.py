"""Memory objects shared by the processes of a tree (tests/targets/shm_tree.c): shared anonymous memory, memfds
and deleted /dev/shm files, some inherited across fork, some mapped after it from an fd passed over a socket.
The dump stores each one once (image format 5); the restore makes each once and every holder maps that very
object (the kernel's device and inode of each mapping agree across the processes, and with the deleted
file's fd all three inherited, stored once as a description of type object_file, and with a description of
it one child opened on its own); the target's own checks
(harness CASES "shm-tree", eager and lazy in test_dump_restore.py) prove each sees the others' writes.
A System V segment removed with IPC_RMID comes back too (harness CASES "shm-tree-sysv"); one left in the IPC
namespace is refused, by name.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

try:
    import harness as H
    import realprogs as R
except ImportError:  # pragma: no cover
    from tests import harness as H
    from tests import realprogs as R

pytestmark = pytest.mark.root

CASE = H.CASES_BY_ID["shm-tree"]
KEEP = H.Case("shm-tree-sysvkeep", "shm_tree", ("sysvkeep",))


def _objects(image: Path) -> dict[int, list[dict]]:
    inv = json.loads((image / "inventory.json").read_text())
    return {pid: json.loads((image / f"task-{pid}.json").read_text())["mm"] for pid in inv["tasks"]}


def _identity(pid: int, vma: dict) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/map_files/{vma['start']:x}-{vma['end']:x}")
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_each_shared_object_stored_once_and_made_once(harness: H.Harness, mode: str) -> None:
    target = harness.start_case(CASE)
    tree = [target.pid, *R.descendants(target.pid)]
    assert len(tree) == 3, tree
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    assert json.loads((image / "inventory.json").read_text())["version"] == 5
    mms = _objects(image)
    stores: dict[str, list[int]] = defaultdict(list)
    refs: dict[str, list[int]] = defaultdict(list)
    for pid, mm in mms.items():
        for o in mm["objects"]:
            assert "shared" in o, f"pid {pid}: object {o['kind']} {o.get('name') or o.get('path')} not shared"
            (refs if "content" in o else stores)[o["shared"]].append(pid)
            if "content" in o:
                assert o["pages"] == [] and o["content"] != pid
    # sem, anon, memfd, file (all three), late memfd (P and C), late deleted file (P and D): stored once each.
    assert sorted(len(v) for v in stores.values()) == [1] * 6, stores
    assert sorted(len(v) for v in refs.values()) == [1, 1, 2, 2, 2, 2], refs
    # The deleted file's fd 60, one description inherited by all three: stored once, naming P's object.
    descs = [d for d in json.loads((image / "shared.json").read_text())["files"] if d["type"] == "object_file"]
    # Fd 61, held by the children alone (made by one the object is given to; its O_NOFOLLOW needs the name).
    assert sorted((len(d["holders"]), d["holders"][0][1]) for d in descs) == [(2, 61), (3, 60)], descs
    assert sorted(h[0] for h in descs[0]["holders"]) == sorted(tree) or \
        sorted(h[0] for h in descs[1]["holders"]) == sorted(tree), descs
    # D's own read-only description of it (fd 62): a record of D's, opened again on the object D is given.
    own = {pid: [f["fd"] for f in json.loads((image / f"task-{pid}.json").read_text())["files"]
                 if f["type"] == "object_file"] for pid in tree}
    assert sorted(own.values()) == [[], [], [62]], own

    if mode == "eager":
        _show_names_the_store(harness, image, mms)

    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    # Before the target runs its checks: one object per id, in the kernel's eyes, whoever maps it.
    seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for pid, mm in mms.items():
        ids = {o["id"]: o["shared"] for o in mm["objects"]}
        for v in mm["vmas"]:
            if "object" in v:
                seen[ids[v["object"]]].add(_identity(pid, v))
    assert len(seen) == 6 and all(len(s) == 1 for s in seen.values()), dict(seen)
    assert len({next(iter(s)) for s in seen.values()}) == 6, "two shared ids came back as one object"
    # Each process's fd 60 is the very file its FILE mapping maps (one inode for fd and mapping).
    root_objects = {o["id"]: o for o in mms[target.pid]["objects"]}
    file_id = root_objects[next(d for d in descs if d["holders"][0][0] == target.pid)["object"]]["shared"]
    for pid in tree:
        st = os.stat(f"/proc/{pid}/fd/60")
        assert {(st.st_dev, st.st_ino)} == seen[file_id], f"pid {pid}: fd 60 is not the mapped deleted file"
    d_pid = next(pid for pid, fds in own.items() if fds)
    for fd in (61, 62):
        st = os.stat(f"/proc/{d_pid}/fd/{fd}")
        assert {(st.st_dev, st.st_ino)} == seen[file_id], f"pid {d_pid}: fd {fd} is not the mapped deleted file"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def _show_names_the_store(harness: H.Harness, image: Path, mms: dict[int, dict]) -> None:
    """`show` counts an object's pages at every holder, naming the process whose file stores them, and sums a
    task's own pages apart from those."""
    shown = harness.lazarus("show", "--json", str(image))
    assert shown.returncode == 0, shown.stderr
    tasks = {t["pid"]: t for t in json.loads(shown.stdout)["tasks"]}
    pages_of = {o["shared"]: sum(n for _, n, _ in o["pages"]) for mm in mms.values() for o in mm["objects"]
                if "content" not in o}
    checked = 0
    for pid, mm in mms.items():
        objects = {o["id"]: o for o in mm["objects"]}
        rows = tasks[pid]["vmas"]
        assert len(rows) == len(mm["vmas"])
        for v, row in zip(mm["vmas"], rows, strict=True):
            obj = objects.get(v.get("object", -1))
            if obj is None or "content" not in obj:
                assert "stored_by" not in row, row
                continue
            assert row["stored_by"] == obj["content"] and row["pages"] == pages_of[obj["shared"]], (pid, row)
            checked += row["pages"] > 0
        assert tasks[pid].get("shared_pages", 0) == sum(r["pages"] for r in rows if "stored_by" in r)
        assert tasks[pid]["pages"] == sum(r["pages"] for r in rows if "stored_by" not in r)
    assert checked, "no holder of an object stored elsewhere shows pages"
    text = harness.lazarus("show", str(image))
    assert text.returncode == 0, text.stderr
    assert "shared with pid" in text.stdout and "saved by another process" in text.stdout, text.stdout


def test_system_v_segment_left_in_the_namespace_refused(harness: H.Harness) -> None:
    """A System V segment every process of the tree attached, not removed (it outlives the processes, and a
    restore would meet it, or its key, again): refused in one line naming it, nothing written, and the tree
    runs on and passes its own checks (nothing lost; it removes the segment at the end)."""
    target = harness.start_case(KEEP)
    image = harness.image_dir()
    shmid = None
    try:
        shmid = next(int(ln.split()[2]) for ln in target.log_text().splitlines() if ln.startswith("# sysv "))
        res = harness.dump(target, image)
        H.assert_clean_error(res, rf"System V segment {shmid} \(key 0x0\) is still in the IPC namespace")
        assert not image.exists()
        H.expect_pass(harness.run_case(KEEP, target), target)
    finally:
        if shmid is not None:  # removed by the target if it passed; else gone with its last detach
            subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, timeout=10)


def test_two_pidns_restores_each_with_its_own_objects(harness: H.Harness) -> None:
    """Two lazy --pidns restores of one image at once: inside a new PID namespace a task cannot see lazarus's
    pid, so the objects reach later holders through SCM_RIGHTS; each copy's processes share their objects, and
    no object is shared between the copies."""
    from test_pidns import check_copy, nspid, restore_copies, run_one

    target = harness.start_case(CASE)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    mms = _objects(image)
    copies = restore_copies(harness, image, target, 2, lazy=True)
    inits = [check_copy(r, target.pid) for r in copies]
    per_copy = []
    for r in copies:
        assert r.pid is not None
        tree = [r.pid, *R.descendants(r.pid)]
        assert len(tree) == 3, tree
        host = {nspid(p)[-1]: p for p in tree}  # the image's pid (inside the namespace) -> ours
        assert sorted(host) == sorted(mms), host
        seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for pid, mm in mms.items():
            ids = {o["id"]: o["shared"] for o in mm["objects"]}
            for v in mm["vmas"]:
                if "object" in v:
                    seen[ids[v["object"]]].add(_identity(host[pid], v))
        assert all(len(s) == 1 for s in seen.values()), dict(seen)
        per_copy.append(set().union(*seen.values()))
    assert not per_copy[0] & per_copy[1], "the two copies share a memory object"
    for r, init in zip(copies, inits, strict=True):
        run_one(harness, CASE, r, init)


@pytest.mark.parametrize(("change", "why"), [
    (lambda o, root: o.update(content=o["content"] + 100000), r"pid \d+ does not store mem-\d+"),
    (lambda o, root: o.update(size=o["size"] + 4096), r"mem-\d+ has another kind, size or name in pid \d+"),
])
def test_damaged_shared_object_refused_before_anything_runs(harness: H.Harness, change: Any, why: str) -> None:
    """A hostile image (checksums recomputed) whose referring record no longer matches the stored object: one
    line naming the task file and object, nothing restored."""
    target = harness.start_case(CASE)
    child = R.descendants(target.pid)[0]
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0

    def damage(task: dict) -> None:
        change(next(o for o in task["mm"]["objects"] if "content" in o), target.pid)

    H.reseal_task(image, damage, child)
    r = harness.restore(image)
    H.assert_clean_error(r.proc, rf"task-{child}\.json: mm\.objects\[\d+\].*" + why)
    assert not H.is_alive(target.pid)
