"""Objects two processes of a dumped tree share: found once (dump/sharing.py), and refused where a restore
cannot give them back shared yet, with both pids named.

Given back shared (stored once by dump/sharefds.py): an open file description of a file, device, pipe or
FIFO held by several processes (inherited across fork: stdin/stdout/stderr, a log), every description of a
pipe or FIFO with ends in several processes, fs state shared by clone(CLONE_FS) down one line of descent.
Given back shared too (stored once by dump/memory.py, made once by restore/sharing.py SharedMemory): shared
anonymous memory, a memfd, a deleted file or a removed System V segment mapped (or, a memfd, held) by several
processes. An fd table shared by clone (CLONE_FILES) down one line of descent is stored once, in the top
process's image (the others' fds are its fds: they are not counted as holders of anything). Refused here: an fd
table shared otherwise (siblings without their parent), fs state shared otherwise, and sockets, anonymous-inode
files (eventfd, epoll...), memfds and unlinked files open (as fds, not mappings) in two processes.

What is not refused: the same named file opened separately by two processes (each gets its own open again),
MAP_SHARED mappings of a named regular file (mapped again from the file, they share its page cache), and
copy-on-write private memory (each process's pages are saved; the sharing itself is not kept).
"""

from __future__ import annotations

import contextlib
import os
import stat

from lazarus.dump.sharing import Sharing, detect, refusals
from lazarus.errors import LazarusError, NoSuchTask, Unsupported
from lazarus.kernel import procfs
from lazarus.kernel.kcmp import same_resource
from lazarus.kernel.syscall import same_fd_table, same_file_across
from lazarus.records import record

_LATER = "objects shared between processes are not supported yet"
# Open file descriptions a restore makes once and gives to every holder (dump/sharefds.py, restore/sharefds.py).
SHAREABLE = ("file", "pipe", "fifo")


@record(frozen=True)
class _Fd:
    pid: int
    fd: int
    target: str
    mode: int


def _fds(pid: int) -> dict[tuple[int, int], list[_Fd]]:
    """(dev, ino) -> the fds of `pid` open on it."""
    out: dict[tuple[int, int], list[_Fd]] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise NoSuchTask(f"pid {pid} exited during the dump", pid=pid) from None
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(f"/proc/{pid}/fd/{name}")
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            out.setdefault((st.st_dev, st.st_ino), []).append(_Fd(pid, int(name), target, st.st_mode))
    return out


def _named(target: str, mode: int) -> bool:
    """A file another open by name reaches again: a regular file, directory or device that still has that
    name (not a pipe, socket, anonymous inode, memfd or deleted file)."""
    if target.endswith(" (deleted)") or target.startswith(("/memfd:", "/dev/zero", "/SYSV")):
        return False
    return target.startswith("/") and (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISCHR(mode)
                                       or stat.S_ISBLK(mode))


def check_fs_group(pids: tuple[int, ...], parents: dict[int, int]) -> None:
    """Processes sharing cwd, root and umask (CLONE_FS) come back shared only as a parent and descendants made
    from it with CLONE_FS, one by one: every member but one must have its parent in the group."""
    tops = [p for p in pids if parents[p] not in pids]
    if len(tops) != 1:
        raise Unsupported(f"pids {', '.join(map(str, pids))} share cwd, root and umask (CLONE_FS) without one "
                          f"of them being the parent of the others; {_LATER}", pid=tops[-1])


def fd_tables(pids: list[int]) -> list[tuple[int, ...]]:
    """Groups of processes sharing one fd table (clone with CLONE_FILES), as kcmp KCMP_FILES tells."""
    groups: list[list[int]] = []
    for p in sorted(pids):
        for g in groups:
            if same_fd_table(g[0], p):
                g.append(p)
                break
        else:
            groups.append([p])
    return [tuple(g) for g in groups if len(g) > 1]


def check_table_group(pids: tuple[int, ...], parents: dict[int, int]) -> None:
    """Processes sharing one fd table come back sharing it only as a parent and descendants each made from its
    parent with CLONE_FILES: the restore clones each member from its parent, which holds the table already."""
    tops = [p for p in pids if parents[p] not in pids]
    if len(tops) != 1:
        raise Unsupported(f"pids {', '.join(map(str, pids))} share one fd table (CLONE_FILES) without one of "
                          "them being the parent of the others (clone can only give a table to a child); "
                          "not supported", pid=tops[-1])


def refuse_table_outside(root: int, tree: set[int]) -> None:
    """The root of a dump sharing its fd table or its fs state with a process outside the tree (its parent, or a
    sibling made by the same parent with CLONE_FILES or CLONE_FS): the restored root would get one of its own,
    and the sharing would be lost. Only the root can: any other process of the tree got them from its parent, in the tree."""
    ppid = procfs.read_status(root).ppid
    try:
        siblings = procfs.children(ppid) if ppid > 0 else []
    except LazarusError:
        siblings = []
    for other in [ppid, *siblings]:
        if other <= 0 or other in tree:
            continue
        try:
            same, same_fs = same_fd_table(root, other), same_resource(root, other, "fs")
        except LazarusError:
            continue  # gone meanwhile, or not ours to compare
        if same:
            raise Unsupported(f"pid {root} shares its fd table (CLONE_FILES) with pid {other}, outside the dumped "
                              "tree; not supported (dump the tree of a process that holds every sharer)", pid=root)
        if same_fs:
            raise Unsupported(f"pid {root} shares its fs state (CLONE_FS: cwd, root, umask) with pid {other}, "
                              "outside the dumped tree; not supported (dump the tree of a process that holds every "
                              "sharer)", pid=root)


def table_holders(found: Sharing, parents: dict[int, int]) -> dict[int, int]:
    """pid -> the process whose fd table it shares and whose image holds it (the group's top: the one whose
    parent is not in the group), for every member of an fd table group but that top."""
    out: dict[int, int] = {}
    for st in found.states:
        if st.kind == "files":
            top = next(p for p in st.pids if parents.get(p) not in st.pids)
            out.update({p: top for p in st.pids if p != top})
    return out


def refuse_shared(pids: list[int]) -> Sharing:
    """What the processes `pids` share, found once (dump/sharing.py). An fd table shared by a parent and its
    descendants comes back shared (dump/sharefds.py); open file descriptions of files, pipes
    and FIFOs come back shared (dump/sharefds.py stores them once); for everything else still refused, raise
    Unsupported naming both pids (and the fd or address).

    The processes must be stopped (their fds and mappings cannot change meanwhile)."""
    if len(pids) < 2:
        return Sharing()
    parents = {p: procfs.read_status(p).ppid for p in pids}
    tables = fd_tables(pids)
    for group in tables:
        check_table_group(group, parents)
    others = {p for group in tables for p in group if parents[p] in group}
    found = detect(pids, pages=False, tables=others)
    for st in found.states:
        if st.kind == "fs":
            check_fs_group(st.pids, {p: procfs.read_status(p).ppid for p in st.pids})
    problems = refusals(found)
    if problems:
        raise Unsupported(problems[0])
    kept = {(p, fd) for d in found.descriptions if d.kind in SHAREABLE for p, fd in d.holders}
    # A deleted file several processes map: each fd of it comes back on the one object made for the mappings
    # (dump/files.py "object_file"), whether its description is shared or each process has its own; an fd of
    # its own only if its process maps the file too (else it would come back as a copy of its own).
    mapped = {(m.dev, m.ino): {x.pid for x in m.mappings} for m in found.memory if m.kind == "deleted"}
    for d in found.descriptions:
        if d.kind not in SHAREABLE:
            (p, pfd), (q, qfd) = d.holders[0], next(h for h in d.holders if h[0] != d.holders[0][0])
            raise Unsupported(f"pid {p} fd {pfd} and pid {q} fd {qfd} share one open {d.kind} file "
                              f"description; {_LATER}", pid=q)
    seen: dict[tuple[int, int], list[_Fd]] = {}
    for p in pids:
        if p in others:
            continue  # its fds are its parent's, one table
        for key, fds in _fds(p).items():
            for other in seen.get(key, []):
                if other.pid == p or (other.pid, other.fd) in kept:
                    continue
                for mine in fds:
                    if (p, mine.fd) in kept or {other.pid, p} <= mapped.get(key, set()):
                        continue
                    if same_file_across(other.pid, other.fd, p, mine.fd):  # pragma: no cover - found above
                        raise Unsupported(f"pid {other.pid} fd {other.fd} and pid {p} fd {mine.fd} share one open "
                                          f"file description ({mine.target}); {_LATER}", pid=p)
                    if not _named(mine.target, mine.mode):
                        raise Unsupported(f"pid {other.pid} fd {other.fd} and pid {p} fd {mine.fd} are open on one "
                                          f"{mine.target}; {_LATER}", pid=p)
            seen.setdefault(key, []).extend(fds)
    return found


def shared_memory(found: Sharing) -> dict[tuple[int, int], tuple[str, int]]:
    """(st_dev, inode) -> (shared id, storing pid) of each memory object several processes map or hold
    (shared anonymous memory, a memfd, a deleted file, a System V segment): its content goes once into the
    page file of the lowest pid holding it, and every holder's object record names the id (dump/memory.py
    _plan_object)."""
    return {(m.dev, m.ino): (m.id, m.pids[0]) for m in found.memory}


def sysv_attaches(found: Sharing) -> dict[int, int]:
    """shmid -> mappings the processes have of each System V segment several of them attached."""
    return {m.ino: len(m.mappings) for m in found.memory if m.kind == "sysv"}
