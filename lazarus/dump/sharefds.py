"""Open file descriptions, pipes and FIFOs shared by processes of a tree, stored once (docs/IMAGES.md, "Shared
objects (format 3)").

    dump_files(pid, shared_pipes=...)      each task's fds as today; a pipe/FIFO with an end in another task
         |                                 is neither refused nor peeked there
         v
    store(found, tasks, write_blob)        per shared description: the first holder's full record moves to
                                           shared.json "files"; every holder keeps a stub {fd, type "shared",
                                           shared: id, flags, cloexec, pos}; each shared pipe's queued bytes
                                           are read once (tee through a reader) into one blob;
                                           processes sharing cwd/root/umask (CLONE_FS) or one fd table
                                           (CLONE_FILES) listed as groups in "states": a table's fds are in
                                           its top process's files only, the others have none (dump/shared.py)

Why a stub keeps flags and pos: they belong to the description, but the restore reads every fd back and
compares (restore/files.py verify), so each holder proves it got the one description.
"""

from __future__ import annotations

import os

from lazarus.dump.files import peek_pipe, peek_pipe_fd
from lazarus.dump.shared import SHAREABLE
from lazarus.dump.sharing import Sharing
from lazarus.errors import Unsupported
from lazarus.kernel import abi
from lazarus.kernel.pidfd import pidfd_getfd, pidfd_open

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

SHARED_JSON = "shared.json"
# What stays with each fd; everything else of a record belongs to the description.
_PER_FD = ("fd", "cloexec", "dup_of", "same_inode")


def shared_pipes(found: Sharing) -> set[tuple[int, int]]:
    """(dev, ino) of every pipe and FIFO with ends in several tasks (dump_files leaves those to store())."""
    by_id = {d.id: d for d in found.descriptions}
    return {(by_id[p.readers[0] if p.readers else p.writers[0]].dev, p.ino) for p in found.pipes}


def _peek(pid: int, fd: int, readable: bool) -> tuple[bytes, int]:
    if not readable:
        return peek_pipe(f"/proc/{pid}/fd/{fd}")  # no reader in the tree: one of ours, opened and closed
    pidfd = pidfd_open(pid)
    try:
        dup = pidfd_getfd(pidfd, fd, pid=pid)
    finally:
        os.close(pidfd)
    try:
        return peek_pipe_fd(dup)
    finally:
        os.close(dup)


def store(found: Sharing, tasks: dict[int, dict[str, Any]], write_blob: Any) -> dict[str, Any] | None:
    """Move the shared descriptions out of the task records (`tasks`: pid -> task, changed in place) into
    the "shared" object (None when nothing is shared). The tasks must still be frozen."""
    descs = [d for d in found.descriptions if d.kind in SHAREABLE]
    states = [{"id": st.id, "kind": st.kind, "pids": list(st.pids)} for st in found.states
              if st.kind in ("fs", "files")]
    if not descs and not states:
        return None
    by_fd = {pid: {r["fd"]: r for r in t["files"]} for pid, t in tasks.items()}
    files: list[dict[str, Any]] = []
    stubbed: dict[tuple[int, int], str] = {}
    for d in descs:
        pid, fd = d.holders[0]
        first = by_fd[pid][fd]
        rec = {k: v for k, v in first.items() if k not in _PER_FD and k not in ("data", "pipe_size")}
        if rec.get("deleted") or rec.get("type") == "ghost":
            raise Unsupported(f"pid {pid} fd {fd} ({first.get('path')} (deleted)): an unlinked file or FIFO "
                              "open in several processes is not supported", pid=pid)
        files.append({"id": d.id, "kind": d.kind, "holders": [list(h) for h in d.holders], **rec})
        for p, f in d.holders:
            stubbed[(p, f)] = d.id
    for pid, t in tasks.items():
        out = []
        for r in t["files"]:
            sid = stubbed.get((pid, r["fd"]))
            if sid is None:
                if "same_inode" in r and (pid, r["same_inode"]) in stubbed:
                    raise Unsupported(f"pid {pid} fd {r['fd']}: opened again on the inode of fd {r['same_inode']}, "
                                      "which it shares with another process; not supported", pid=pid)
                out.append(r)
                continue
            out.append({"fd": r["fd"], "type": "shared", "shared": sid, "flags": r["flags"],
                        "cloexec": r["cloexec"], "pos": r["pos"]})
        t["files"] = out
    desc_by_id = {d.id: d for d in descs}
    pipes = []
    for p in found.pipes:
        ends = [desc_by_id[i] for i in (*p.readers, *p.writers)]
        reader = next((d for d in ends if d.flags & abi.O_ACCMODE != abi.O_WRONLY), ends[0])
        data, size = _peek(*reader.holders[0], readable=reader.flags & abi.O_ACCMODE != abi.O_WRONLY)
        if data and any(d.flags & abi.O_DIRECT for d in ends):
            pid, fd = reader.holders[0]
            raise Unsupported(f"pid {pid} fd {fd} (pipe:[{p.ino}]): a packet-mode (O_DIRECT) pipe with data "
                              "buffered is not supported", pid=pid)
        pipes.append({"id": p.id, "ino": p.ino, "fifo": p.fifo, "readers": list(p.readers),
                      "writers": list(p.writers), "pipe_size": size,
                      "data": write_blob(f"shared-{p.id}", data) if data else None})
    out: dict[str, Any] = {"files": files, "pipes": pipes}
    if states:
        out["states"] = states  # "fs" (CLONE_FS) and "files" (CLONE_FILES) groups
    return out


__all__ = ["SHARED_JSON", "shared_pipes", "store"]
