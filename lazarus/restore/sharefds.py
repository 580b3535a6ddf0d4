"""Open file descriptions, pipes and FIFOs shared by tasks of a tree: made once, given to every holder.

    restore_tree                       SharedFds(img, host)
      every task created               make_pipes(): each anonymous pipe by lazarus (new_pipe, queued bytes
                                       written once), each of its descriptions ours (reopened through /proc
                                       when there are several of one end), status flags set once
      task T's fd phase (build)        plan(T): the stubs of descriptions not made yet become full records T
                                       restores itself (a file or FIFO opened as T's credentials allow, at
                                       T's offset, flags, locks); the others are given at once (give_scm)
                                       settle(T): what T made is taken (pidfd_getfd) for the later holders,
                                       and T's further fds of it are given
      all released                     close(): our fds dropped (the tasks hold theirs)

A FIFO's queued bytes go with every one of its descriptions' records: the first to be opened writes them,
the later ones find them queued already (restore/files.py _fifo). Descriptions are given through SCM_RIGHTS
(restore/sharing.py give_scm), not pidfd_getfd from inside the task: in a --pidns restore lazarus has no pid
in the task's namespace.

An fd table shared by clone (CLONE_FILES) is one table: its top process restores it in its fd phase, the
members made from it with CLONE_FILES have none (FdTable below; restore/tree.py creates them).
"""

from __future__ import annotations

import contextlib
import os

from lazarus.errors import RestoreError
from lazarus.images.shared import SHARED_JSON, fd_table_tops
from lazarus.kernel import abi
from lazarus.records import field, record
from lazarus.remote import RemoteTask
from lazarus.restore.files import check_files
from lazarus.restore.sharing import give_scm, new_pipe, set_status, take

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_DESC_ONLY = ("id", "kind", "holders")


class SharedFds:
    def __init__(self, img: Any, host: dict[int, int]) -> None:
        self.img = img
        self.host = host  # image pid -> pid out here
        raw = img.json(SHARED_JSON) if SHARED_JSON in img.files else {"files": [], "pipes": []}
        self.descs: dict[str, dict[str, Any]] = {d["id"]: d for d in raw["files"]}
        self.pipes: list[dict[str, Any]] = raw["pipes"]
        self.fifo_of: dict[str, dict[str, Any]] = {}
        for p in self.pipes:
            if p["fifo"]:
                for did in (*p["readers"], *p["writers"]):
                    self.fifo_of[did] = p
        self.ours: dict[str, int] = {}  # description id -> our fd of it
        self._made: dict[int, list[tuple[str, int]]] = {}  # pid -> (id, fd) it restores itself

    @property
    def empty(self) -> bool:
        return not self.descs

    def make_pipes(self) -> None:
        for p in self.pipes:
            if p["fifo"]:
                continue
            ends = [self.descs[i] for i in dict.fromkeys((*p["readers"], *p["writers"]))]
            data = self.img.blob(p["data"]) if p.get("data") else b""
            packet = any(d["flags"] & abi.O_DIRECT for d in ends)
            r, w = new_pipe(data, p["pipe_size"], packet=packet)
            first = {abi.O_RDONLY: r, abi.O_WRONLY: w}
            try:
                for d in ends:
                    acc = d["flags"] & abi.O_ACCMODE
                    if acc in first and not d["flags"] & abi.O_LARGEFILE:
                        # pipe2()'s own end (without O_LARGEFILE); any other is a reopen, as the dumped one was.
                        ours = first.pop(acc)
                    else:
                        ours = os.open(f"/proc/self/fd/{r if acc == abi.O_RDONLY else w}",
                                       acc | os.O_CLOEXEC | os.O_NONBLOCK)
                    self.ours[d["id"]] = ours
                    set_status(ours, d["flags"])
            finally:
                for fd in first.values():
                    os.close(fd)  # an end no task holds: a pipe whose writers (or readers) are gone

    def plan(self, pid: int, fds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, int, bool]]]:
        """T's records to restore itself (its own, plus a full record for each shared description it is the
        first to need), and (ours, fd, cloexec) to give it before that."""
        own: list[dict[str, Any]] = []
        give: list[tuple[int, int, bool]] = []
        later: list[dict[str, Any]] = []
        making: set[str] = set()
        for rec in fds:
            if rec["type"] != "shared":
                own.append(rec)
                continue
            did = rec["shared"]
            if did in self.ours:
                give.append((self.ours[did], rec["fd"], rec["cloexec"]))
            elif did in making:
                later.append(rec)
            else:
                making.add(did)
                d = self.descs[did]
                full = {k: v for k, v in d.items() if k not in _DESC_ONLY}
                full.update(fd=rec["fd"], cloexec=rec["cloexec"])
                p = self.fifo_of.get(did)
                if p is not None:
                    full.update(pipe_size=p["pipe_size"], data=p.get("data"))
                own.append(full)
                self._made.setdefault(pid, []).append((did, rec["fd"]))
        self._later = later
        return own, give

    def give(self, task: RemoteTask, items: list[tuple[int, int, bool]]) -> None:
        if items:
            give_scm(task, items)

    def settle(self, pid: int, task: RemoteTask) -> None:
        """After T restored its records: take what it made, give it its further fds of those."""
        for did, fd in self._made.pop(pid, []):
            self.ours[did] = take(self.host[pid], fd)
        later, self._later = self._later, []
        self.give(task, [(self.ours[r["shared"]], r["fd"], r["cloexec"]) for r in later])

    def close(self) -> None:
        for fd in self.ours.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ours.clear()


@record
class FdTable:
    """One fd table several processes share (clone with CLONE_FILES): restored once, by `top` (whose task file
    holds it) in its fd phase; each other member is cloned from its parent with CLONE_FILES and has no fd
    phase. Temporary fds of every member go at or above `base` (above every fd of the table), and each
    member's userfaultfd anchor at a number no other member's anchor holds (`anchors`, filled as they come)."""
    top: int
    base: int
    anchors: list[int] = field(default_factory=list)


def fd_tables(shared: Any, parents: dict[int, int], tasks: dict[int, dict[str, Any]]) -> dict[int, FdTable]:
    """pid -> its FdTable, for every member of an fd table group of a checked shared.json (None: none)."""
    tables: dict[int, FdTable] = {}
    out: dict[int, FdTable] = {}
    for pid, top in fd_table_tops(shared, parents).items():
        if top not in tables:
            tables[top] = FdTable(top, max([f["fd"] for f in tasks[top]["files"]], default=2) + 1)
        out[pid] = tables[top]
    return out


def check_shared_files(img: Any) -> None:
    """Before any task exists: each shared file or FIFO is still there and the same (restore/files.py
    check_files, as for a task's own records)."""
    if SHARED_JSON not in img.files:
        return
    recs = [{**{k: v for k, v in d.items() if k not in _DESC_ONLY}, "fd": d["holders"][0][1], "cloexec": False}
            for d in img.json(SHARED_JSON)["files"] if d["kind"] != "pipe"]
    check_files(recs)


def check_made(shared: SharedFds) -> None:
    missing = sorted(set(shared.descs) - set(shared.ours))
    if missing:  # pragma: no cover - every holder is a live task of the tree (validated)
        raise RestoreError(f"shared description {missing[0]} was made by no task", stage="files")


__all__ = ["FdTable", "SharedFds", "check_made", "check_shared_files", "fd_tables"]
