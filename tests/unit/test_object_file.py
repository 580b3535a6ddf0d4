"""An fd to a deleted file the task also maps ("object_file"): which records a task opens on the object itself
(restore/memory.py reopen_records), which tasks need the recreated file to keep its name
(restore/sharing.py SharedMemory.reopened), and the dump's match of an fd to its object (dump/files.py)."""

from __future__ import annotations

import os
from typing import Any

from lazarus.dump.files import _mapped_deleted
from lazarus.restore.memory import reopen_records
from lazarus.restore.sharing import SharedMemory


def _fd(fd: int, **kw: Any) -> dict[str, Any]:
    return {"fd": fd, "type": "object_file", "object": 2, "path": "/dev/shm/pym-1", "flags": 0o2, "pos": 0,
            "cloexec": True, **kw}


def test_own_records_and_first_held_descriptions() -> None:
    fds = [_fd(3), _fd(4, dup_of=3), {"fd": 5, "type": "shared", "shared": "file-1"}, _fd(6, object=5),
           {"fd": 7, "type": "memfd", "object": 2}]
    shared = {"files": [{"id": "file-1", "type": "object_file", "object": 9, "holders": [[10, 5], [11, 5]]},
                        {"id": "file-2", "type": "file", "path": "/x", "holders": [[10, 8], [11, 8]]}]}
    got = reopen_records(fds, shared, 10)
    # dup_of shares fd 3's description: nothing opened for it; the description is made by its first holder.
    assert {k: [r["fd"] for r in v] for k, v in got.items()} == {2: [3], 5: [6], 9: [5]}
    assert reopen_records(fds, shared, 11).keys() == {2, 5}
    assert reopen_records(fds, None, 10).keys() == {2, 5}


class _Img:
    def __init__(self, tasks: dict[int, dict[str, Any]], shared: dict[str, Any] | None) -> None:
        self._tasks, self._shared = tasks, shared
        self.tasks = list(tasks)
        self.files = {"shared.json": {}} if shared else {}

    def task(self, pid: int) -> dict[str, Any]:
        return self._tasks[pid]

    def json(self, name: str) -> Any:
        assert name == "shared.json" and self._shared is not None
        return self._shared


def _task(objects: list[tuple[int, str]], files: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mm": {"objects": [{"id": i, "kind": "deleted", "shared": s} for i, s in objects]}, "files": files}


def test_names_kept_only_for_files_someone_reopens() -> None:
    tasks = {10: _task([(0, "mem-1"), (1, "mem-2"), (2, "mem-3")], []),
             11: _task([(4, "mem-1"), (5, "mem-2")], [_fd(9, object=5)]),
             12: _task([(1, "mem-1")], [{"fd": 3, "type": "shared", "shared": "file-1"}])}
    shared = {"files": [{"id": "file-1", "type": "object_file", "object": 0, "holders": [[10, 3], [12, 3]]}]}
    assert SharedMemory(_Img(tasks, shared)).reopened() == {"mem-1", "mem-2"}  # type: ignore[arg-type]
    assert SharedMemory(_Img(tasks, None)).reopened() == {"mem-2"}  # type: ignore[arg-type]


def test_dump_matches_fd_to_its_deleted_object_by_inode_and_path(tmp_path: Any) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x")
    st = os.stat(f)
    objects = [{"id": 0, "kind": "memfd", "inode": st.st_ino, "path": str(f)},
               {"id": 1, "kind": "deleted", "inode": st.st_ino, "path": str(f) + "x"},
               {"id": 2, "kind": "deleted", "inode": st.st_ino, "path": str(f)}]
    assert _mapped_deleted(objects, st, str(f))["id"] == 2  # type: ignore[index]
    assert _mapped_deleted(objects[:2], st, str(f)) is None
    assert _mapped_deleted(objects, os.stat(tmp_path), str(f)) is None  # not a regular file
