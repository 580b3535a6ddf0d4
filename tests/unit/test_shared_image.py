"""images/shared.py: the checks of shared.json against the task files, pure (no process, no image on disk)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lazarus.errors import ImageError
from lazarus.images.shared import check_shared, fd_table_tops, fs_parents

O_RDONLY, O_WRONLY, O_RDWR, O_APPEND = 0, 1, 2, 0o2000


def stub(fd: int, sid: str, flags: int, pos: int = 0) -> dict[str, Any]:
    return {"fd": fd, "type": "shared", "shared": sid, "flags": flags, "cloexec": False, "pos": pos}


def sample() -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """P (10) and its child C (11): one log at fd 1 (offset 96), a pipe P -> C (fd 5 write end in P, fd 4 read
    end in C), fs state shared."""
    shared = {
        "files": [
            {"id": "file-1", "kind": "file", "holders": [[10, 1], [11, 1]], "type": "file", "flags": O_APPEND | O_WRONLY,
             "pos": 96, "path": "/tmp/log"},
            {"id": "file-2", "kind": "pipe", "holders": [[11, 4]], "type": "pipe", "flags": O_RDONLY, "pos": 0,
             "pipe": 77},
            {"id": "file-3", "kind": "pipe", "holders": [[10, 5]], "type": "pipe", "flags": O_WRONLY, "pos": 0,
             "pipe": 77},
        ],
        "pipes": [{"id": "pipe-1", "ino": 77, "fifo": False, "readers": ["file-2"], "writers": ["file-3"],
                   "pipe_size": 65536, "data": "shared-pipe-1"}],
        "states": [{"id": "fs-1", "kind": "fs", "pids": [10, 11]}],
    }
    tasks = {10: {"files": [stub(1, "file-1", O_APPEND | O_WRONLY, 96), stub(5, "file-3", O_WRONLY)]},
             11: {"files": [stub(1, "file-1", O_APPEND | O_WRONLY, 96), stub(4, "file-2", O_RDONLY)]}}
    return shared, tasks


PARENTS = {10: 1, 11: 10, 12: 10}


def check(shared: Any, tasks: dict[int, dict[str, Any]]) -> None:
    check_shared(shared, tasks, lambda name: name == "shared-pipe-1", PARENTS)


def test_sound_image_passes_and_names_the_clone_fs_child() -> None:
    shared, tasks = sample()
    check(shared, tasks)
    assert fs_parents(shared, PARENTS) == {11}
    assert fs_parents(None, PARENTS) == set()


def test_fd_table_group_names_its_clone_files_child_and_its_top() -> None:
    """A 'files' group (CLONE_FILES) of P and its child F: F has no fds of its own (P's table is F's); F is made
    with CLONE_FILES, not CLONE_FS, and P's task file holds the table."""
    shared, tasks = sample()
    shared["states"].append({"id": "files-1", "kind": "files", "pids": [10, 12]})
    tasks[12] = {"files": []}
    check(shared, tasks)
    assert fs_parents(shared, PARENTS) == {11}
    assert fs_parents(shared, PARENTS, "files") == {12}
    assert fd_table_tops(shared, PARENTS) == {10: 10, 12: 10}


def _edit(path: str, value: Any) -> Any:
    def go(shared: dict[str, Any], tasks: dict[int, dict[str, Any]]) -> None:
        where: Any = {"shared": shared, "tasks": tasks}
        *head, last = path.split(".")
        for key in head:
            where = where[int(key) if key.lstrip("-").isdigit() else key]
        where[int(last) if last.isdigit() else last] = value
    return go


BAD = {
    "unknown id": (_edit("tasks.11.files.1.shared", "file-9"), r"task-11\.json: fd 4 names shared object 'file-9'"),
    "holder without stub": (_edit("shared.files.0.holders", [[10, 1], [11, 1], [11, 7]]),
                            r"files\[0\]\.holders: pid 11 fd 7 is not a shared fd"),
    "stub left out": (_edit("shared.files.0.holders", [[10, 1]]), r"task-11\.json: fd 1 .*holders leave it out"),
    "offset differs": (_edit("tasks.11.files.0.pos", 3), r"pid 11 fd 1 has flags .* offset 3"),
    "reader is a writer": (_edit("shared.pipes.0.readers", ["file-3"]), r"'file-3' is not a reader"),
    "end of no pipe": (_edit("shared.pipes", []), r"'file-2' is a pipe end of no pipe"),
    "missing blob": (_edit("shared.pipes.0.data", "other"), r"pipes\[0\]\.data: names blob 'other'"),
    "pipe size": (_edit("shared.pipes.0.pipe_size", 1 << 30), r"pipes\[0\]\.pipe_size"),
    "relative path": (_edit("shared.files.0.path", "log"), r"files\[0\]\.path: must be an absolute path"),
    "per-fd field": (_edit("shared.files.0.dup_of", 1), r"files\[0\]: holds a per-fd"),
    "fs siblings": (_edit("shared.states.0.pids", [11, 12]), r"states\[0\]\.pids: must be one process and desc"),
    "fs stranger": (_edit("shared.states.0.pids", [10, 13]), r"states\[0\]\.pids: must list two or more live"),
    "vm state": (_edit("shared.states.0.kind", "vm"), r"states\[0\]: only 'fs' \(CLONE_FS\) and 'files'"),
    "files group with own fds": (_edit("shared.states.0.kind", "files"),
                                 r"states\[0\]\.pids: pid 11 shares the fd table of pid 10, and its task file "
                                 "lists fds of its own"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_in_one_line(case: str) -> None:
    shared, tasks = sample()
    change, why = BAD[case]
    change(shared, tasks)
    with pytest.raises(ImageError, match=why):
        check(shared, tasks)


def test_no_shared_json_but_stubs_refused() -> None:
    _, tasks = sample()
    with pytest.raises(ImageError, match=r"fd 1 names shared object 'file-1', and the image has no shared\.json"):
        check(None, tasks)
    check(None, {10: {"files": []}})


def test_one_process_image_refused() -> None:
    shared, tasks = sample()
    with pytest.raises(ImageError, match="image of one process"):
        check(copy.deepcopy(shared), {10: tasks[10]})
