"""Open file descriptions, pipes and FIFOs shared by the processes of a tree (issue 9): what the tree-share
case of tests/test_dump_restore.py (eager and lazy, the target checks itself) does not show: the image holds
each shared thing once, and a hostile shared.json or stub is refused in one line before any task exists."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

CASE = H.CASES_BY_ID["tree-share"]


def reseal(image: Path, name: str, change: Callable[[dict], None] | None) -> None:
    """Edit one json file of the image (None: remove shared.json altogether) and recompute the checksums that
    cover it, as a hostile writer can."""
    from lazarus.images.format import hex64, inventory_bytes, inventory_self_check, json_bytes, xxh3

    inv_path = image / "inventory.json"
    inv = json.loads(inv_path.read_text())
    if change is None:
        (image / name).unlink()
        del inv["files"][name]
    else:
        obj = json.loads((image / name).read_text())
        change(obj)
        data = json_bytes(obj)
        (image / name).write_bytes(data)
        inv["files"][name].update(size=len(data), xxh3=hex64(xxh3(data)))
    inv["self_check"] = inventory_self_check(inv)
    inv_path.write_bytes(inventory_bytes(inv))


@pytest.fixture
def dumped(harness: H.Harness) -> tuple[H.Target, Path, dict]:
    target = harness.start_target(CASE.target)
    harness.settle(CASE, target)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    return target, image, json.loads((image / "shared.json").read_text())


def test_shared_things_are_stored_once(dumped: tuple[H.Target, Path, dict]) -> None:
    target, image, shared = dumped
    inv = json.loads((image / "inventory.json").read_text())
    # 3 for shared descriptions; 4 only when copy-on-write runs were kept too (cow.json)
    assert inv["version"] == (4 if "cow.json" in inv["files"] else 3)
    pids = inv["tasks"]
    assert len(pids) == 3
    by_id = {d["id"]: d for d in shared["files"]}
    # fd 40: one description (offset 10), held by the three processes, described once.
    (f40,) = [d for d in shared["files"] if [target.pid, 40] in d["holders"]]
    assert f40["kind"] == "file" and f40["pos"] == 10 and sorted(p for p, fd in f40["holders"] if fd == 40) == pids
    for pid in pids:
        task = json.loads((image / f"task-{pid}.json").read_text())
        recs = {r["fd"]: r for r in task["files"]}
        assert recs[40] == {"fd": 40, "type": "shared", "shared": f40["id"], "flags": f40["flags"],
                            "cloexec": False, "pos": 10}
        assert all(r["type"] == "shared" for fd, r in recs.items() if fd in (0, 1, 2, 40, 41))
    # Two pipes with their bytes in flight, and the FIFO (P's inherited description and D's own): one blob each.
    anon = [p for p in shared["pipes"] if not p["fifo"]]
    fifos = [p for p in shared["pipes"] if p["fifo"]]
    assert len(anon) == 2 and len(fifos) == 1, shared["pipes"]
    blobs = sorted(blob(image, p["data"]) for p in shared["pipes"])
    assert blobs == sorted([b"down-pipe-data-in-flight", b"up-pipe-data-in-flight",
                            b"fifo-data-from-pfifo-data-from-d"]), blobs
    assert len(fifos[0]["readers"]) == 1 and len(fifos[0]["writers"]) == 2  # O_RDWR (both) and D's O_WRONLY
    assert all(by_id[i]["kind"] == "fifo" for i in fifos[0]["writers"])
    assert not [n for n in inv["files"] if n.startswith("blob-pipe") or n.startswith("blob-fifo")], inv["files"]


def blob(image: Path, name: str) -> bytes:
    return (image / f"blob-{name}.img").read_bytes()


def _first_stub(task: dict) -> dict:
    return next(r for r in task["files"] if r["type"] == "shared")


HOSTILE: dict[str, tuple[str, Callable[[dict], None] | None, str]] = {
    "unknown-id": ("task", lambda t: _first_stub(t).update(shared="file-99"),
                   r"fd \d+ names shared object 'file-99', which shared\.json does not have"),
    "no-shared-json": ("shared.json", None, r"fd \d+ names shared object 'file-\d+', and the image has no shared\.json"),
    "holder-without-stub": ("shared.json", lambda s: s["files"][0]["holders"].append([s["files"][0]["holders"][0][0], 777]),
                            r"shared\.json: files\[0\]\.holders: pid \d+ fd 777 is not a shared fd"),
    "offset-disagrees": ("task", lambda t: next(r for r in t["files"] if r["fd"] == 40).update(pos=3),
                         r"shared\.json: files\[\d+\]\.holders: pid \d+ fd 40 has flags \S+ offset 3, the "
                         r"description \S+ offset 10"),
    "reader-is-a-writer": ("shared.json", lambda s: next(p for p in s["pipes"] if not p["fifo"]).update(
        readers=next(p for p in s["pipes"] if not p["fifo"])["writers"]),
        r"shared\.json: pipes\[\d+\]\.readers: 'file-\d+' is not a reader of this pipe"),
    "claimed-twice": ("shared.json", lambda s: s["files"][1]["holders"].append(s["files"][0]["holders"][0]),
                      r"shared\.json: files\[1\]\.holders: pid \d+ fd \d+ is claimed by"),
    "blob-missing": ("shared.json", lambda s: next(p for p in s["pipes"] if p["data"]).update(data="nothing-here"),
                     r"shared\.json: pipes\[\d+\]\.data: names blob 'nothing-here'"),
    "fs-group-of-siblings": ("shared.json", lambda s: s.update(states=[{
        "id": "fs-1", "kind": "fs", "pids": sorted({h[0] for h in s["files"][0]["holders"]})[1:]}]),
        r"shared\.json: states\[0\]\.pids: must be one process and descendants of it made with CLONE_FS"),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE))
def test_hostile_shared_objects_refused_before_anything_exists(harness: H.Harness, dumped: tuple[H.Target, Path,
                                                                                                dict], edit: str) -> None:
    target, image, _ = dumped
    where, change, why = HOSTILE[edit]
    bad = H.copy_image(image, image.parent / f"{image.name}-{edit}")
    if where == "task":
        assert change is not None
        H.reseal_task(bad, change, pid=target.pid)
    else:
        reseal(bad, where, change)
    pids = json.loads((bad / "inventory.json").read_text())["tasks"]
    r = harness.restore(bad, like=target)
    assert r.returncode == 1
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, why)
    assert not [p for p in pids if H.is_alive(p)], "a task was created before the image was refused"
