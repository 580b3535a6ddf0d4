"""images/shared.py check_shared_memory: memory objects shared by the tasks of a tree, stored once (format 5)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lazarus.errors import ImageError
from lazarus.images.shared import check_shared_memory


def _obj(oid: int, sid: str, content: int | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"id": oid, "kind": "shmem", "name": "", "size": 8192, "inode": 7, "shared": sid,
                         "pages": [[0, 2, 0]] if content is None else []}
    if content is not None:
        o["content"] = content
    return o


def _tasks() -> dict[int, dict[str, Any]]:
    return {10: {"mm": {"objects": [_obj(0, "mem-1")]}},
            11: {"mm": {"objects": [_obj(0, "mem-1", 10)]}},
            12: {"mm": {"objects": [_obj(3, "mem-1", 10)]}}}


def test_valid() -> None:
    check_shared_memory(_tasks(), 5)


@pytest.mark.parametrize(("damage", "why"), [
    (lambda t: t[11]["mm"]["objects"][0].update(content=12), r"pid 12 does not store mem-1"),
    (lambda t: t[11]["mm"]["objects"][0].update(content=11), r"must name another task's pid"),
    (lambda t: t[11]["mm"]["objects"][0].update(pages=[[0, 1, 0]]), r"with no runs of its own"),
    (lambda t: t[11]["mm"]["objects"][0].pop("content"), r"mem-1 stored by pid 10 already"),
    (lambda t: t[12]["mm"]["objects"][0].update(size=4096), r"another kind, size or name in pid 10"),
    (lambda t: t[12]["mm"]["objects"][0].update(shared=3), r"must be a memory object id"),
    (lambda t: t[10]["mm"]["objects"][0].update(kind="file"), r"cannot be shared between tasks"),
])
def test_damaged(damage: Any, why: str) -> None:
    tasks = copy.deepcopy(_tasks())
    damage(tasks)
    with pytest.raises(ImageError, match=why):
        check_shared_memory(tasks, 5)


def test_older_version_refused() -> None:
    with pytest.raises(ImageError, match=r"in a version 4 image \(shared memory objects came with version 5\)"):
        check_shared_memory(_tasks(), 4)


def test_dump_stores_each_object_in_its_lowest_holder() -> None:
    from lazarus.dump import sharing as S
    from lazarus.dump.shared import shared_memory, sysv_attaches

    def maps(*pids: int) -> tuple[S.Mapping, ...]:
        return tuple(S.Mapping(p, 0x1000, 0x3000, 0, True) for p in pids)

    memfd = S.MemoryObject("mem-1", "memfd", 1, 300, maps(7, 5), ((9, 4),))
    sysv = S.MemoryObject("mem-2", "sysv", 1, 32768, maps(6, 7, 7), ())
    found = S.Sharing(memory=(memfd, sysv))
    assert shared_memory(found) == {(1, 300): ("mem-1", 5), (1, 32768): ("mem-2", 6)}
    assert sysv_attaches(found) == {32768: 3}
