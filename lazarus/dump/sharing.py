"""What the processes of a dumped tree share with each other, found at dump across a set of pids.

    snapshot(pid)  procfs only: fds (link, inode, flags, offset), mappings, parent  -> TaskSnap
    frames(pid)    /proc/PID/pagemap of private mappings (root: PFNs)               -> PageFrames
         |                              |
         v                              v
    find_descriptions / find_pipes / find_memory / find_states / find_pages        pure: what procfs and
         |                                                                          kcmp (passed in) report
         v
    Sharing: typed records with stable ids ("file-1", "pipe-1", ...), stored once in the image and referred to
    by id from each task (docs/IMAGES.md, "Shared objects (format 3)")

Identity comes from the kernel, never from names: two fds are one open file description only when kcmp
(KCMP_FILE) says so (inode, flags and offset only pick the candidates: one description shows one of each); two
mappings are one object when their device and inode agree; two processes share one fd table or fs state when
kcmp (KCMP_FILES, KCMP_FS) says so; two pages are one copy-on-write page when pagemap gives the same frame.

Ids are numbered in the order of the lowest (pid, fd), or (pid, address) for memory and pages, holding each
object, so the same tree always gets the same ids whatever order its pids are given in.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from lazarus.errors import KernelError, NoSuchTask
from lazarus.images.ranges import Range, merge, subtract
from lazarus.kernel import abi, kcmp, pfn, procfs
from lazarus.kernel.procfs import Vma
from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")

Holder = tuple[int, int]  # (pid, fd)
SameFile = Callable[[Holder, Holder], bool]
SameState = Callable[[int, int, str], bool]
STATE_KINDS = ("files", "fs", "vm", "sighand")


# -- what procfs reports ----------------------------------------------------------------------------------------
@record(frozen=True, slots=True)
class FdSnap:
    """One fd as procfs shows it: the link target, the inode it opens (stat through the link), the status flags
    of its open file description (fdinfo, O_CLOEXEC left out: that one is the fd's) and its offset."""
    fd: int
    target: str
    dev: int
    ino: int
    mode: int
    flags: int
    pos: int


@record(frozen=True, slots=True)
class TaskSnap:
    pid: int
    ppid: int
    fds: tuple[FdSnap, ...]
    vmas: tuple[Vma, ...]


@record(frozen=True, slots=True)
class PageFrames:
    """The pagemap entries of one private mapping of a task: entries[i] is the page at start + i pages."""
    pid: int
    start: int
    entries: array


def snapshot(pid: int) -> TaskSnap:
    """What procfs says about `pid`'s fds and mappings. The task must be frozen (offsets, fd table)."""
    fds = []
    for fd, target in procfs.list_fds(pid).items():
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            info = procfs.read_fdinfo(pid, fd)
        except FileNotFoundError:
            continue  # closed meanwhile: only possible for a task that is not frozen
        except OSError as e:
            if not os.path.exists(f"/proc/{pid}"):
                raise NoSuchTask(f"no such process {pid}", pid=pid) from e
            raise KernelError(f"stat fd {fd} ({target})", e.errno or errno.EIO, pid=pid) from None
        fds.append(FdSnap(fd, target, st.st_dev, st.st_ino, st.st_mode, info.flags & ~abi.O_CLOEXEC, info.pos))
    return TaskSnap(pid, procfs.read_status(pid).ppid, tuple(fds), tuple(procfs.read_maps(pid)))


def frames(snap: TaskSnap) -> list[PageFrames]:
    """Pagemap entries of every private, ordinary mapping of the task (anonymous memory and the written pages
    of private file mappings can both be copy-on-write shared after a fork)."""
    out = []
    path = f"/proc/{snap.pid}/pagemap"
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, after the translation of its errors
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchTask(f"no such process {snap.pid}", pid=snap.pid) from None
    except OSError as e:
        raise KernelError(f"open {path}", e.errno or errno.EIO, pid=snap.pid, path=path) from None
    with f:
        for v in snap.vmas:
            if v.shared or v.is_special or v.path == "[vsyscall]":
                continue
            out.append(PageFrames(snap.pid, v.start, pfn.read_entries(snap.pid, v.start, v.end, fd=f.fileno())))
    return out


# -- records -------------------------------------------------------------------------------------------------
@record(frozen=True, slots=True)
class FileDescription:
    """One open file description held through fds of several tasks (or an end of a shared pipe)."""
    id: str
    kind: str  # "file", "pipe", "fifo", "memfd", "shmem", "socket", "anon", "other"
    dev: int
    ino: int
    flags: int
    pos: int
    holders: tuple[Holder, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(sorted({p for p, _ in self.holders}))


@record(frozen=True, slots=True)
class Pipe:
    """A pipe or FIFO with fds in several tasks: its open file descriptions (ids), read ends then write ends.
    Its buffered data belongs to the pipe, not to a task: it is saved once."""
    id: str
    ino: int
    fifo: bool
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    pids: tuple[int, ...]


@record(frozen=True, slots=True)
class Mapping:
    pid: int
    start: int
    end: int
    offset: int
    shared: bool


@record(frozen=True, slots=True)
class MemoryObject:
    """Shared anonymous memory, SysV shm, a memfd or a deleted file, mapped (or held through fds) by several
    tasks: one object, one content, created once."""
    id: str
    kind: str  # "shmem", "sysv", "memfd", "deleted"
    dev: int
    ino: int
    mappings: tuple[Mapping, ...]
    fds: tuple[Holder, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(sorted({m.pid for m in self.mappings} | {p for p, _ in self.fds}))


@record(frozen=True, slots=True)
class SharedState:
    """Tasks sharing one fd table (CLONE_FILES), fs state (CLONE_FS), address space (CLONE_VM) or signal
    handler table (CLONE_SIGHAND) without being threads of one process."""
    id: str
    kind: str
    pids: tuple[int, ...]


@record(frozen=True, slots=True)
class SharedPages:
    """A run of `npages` private pages that several tasks map as the very same physical pages (copy-on-write
    after fork, written by none since). `at` gives where each holder maps the first one (consecutive pages
    follow in each). `owner` is the holders' nearest common ancestor: the task that places the pages before it
    forks the others; `owner_has` is False when the owner itself has since written its own copy (it must place
    the shared content, fork, then put its own)."""
    id: str
    owner: int
    owner_has: bool
    npages: int
    at: tuple[tuple[int, int], ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p for p, _ in self.at)


@record(frozen=True, slots=True)
class Sharing:
    descriptions: tuple[FileDescription, ...] = ()
    pipes: tuple[Pipe, ...] = ()
    memory: tuple[MemoryObject, ...] = ()
    states: tuple[SharedState, ...] = ()
    pages: tuple[SharedPages, ...] = ()

    def pages_between(self) -> dict[tuple[int, int], int]:
        """Pages shared by each pair of tasks (a < b)."""
        out: dict[tuple[int, int], int] = {}
        for run in self.pages:
            pids = sorted(set(run.pids))
            for i, a in enumerate(pids):
                for b in pids[i + 1:]:
                    out[(a, b)] = out.get((a, b), 0) + run.npages
        return out

    def to_json(self) -> dict[str, Any]:
        """The "shared" object of the image inventory (docs/IMAGES.md, "Shared objects (format 3)")."""
        return {
            "files": [{"id": d.id, "kind": d.kind, "ino": d.ino, "flags": d.flags, "pos": d.pos,
                       "holders": [list(h) for h in d.holders]} for d in self.descriptions],
            "pipes": [{"id": p.id, "ino": p.ino, "fifo": p.fifo, "readers": list(p.readers),
                       "writers": list(p.writers)} for p in self.pipes],
            "memory": [{"id": m.id, "kind": m.kind, "ino": m.ino,
                        "maps": [[x.pid, x.start, x.end, x.offset, x.shared] for x in m.mappings],
                        "fds": [list(h) for h in m.fds]} for m in self.memory],
            "states": [{"id": s.id, "kind": s.kind, "pids": list(s.pids)} for s in self.states],
            "cow": [{"id": r.id, "owner": r.owner, "owner_has": r.owner_has, "npages": r.npages,
                     "at": [list(a) for a in r.at]} for r in self.pages],
        }


# -- grouping (pure) -----------------------------------------------------------------------------------------
def group(items: Iterable[T], key: Callable[[T], object], same: Callable[[T, T], bool]) -> list[list[T]]:
    """Partition `items` into classes of `same` (an equivalence), comparing only items with equal `key`: each
    item against one representative per class found so far. Classes keep the items' order; classes are in
    the order of their first item."""
    buckets: dict[object, list[list[T]]] = {}
    order: list[list[T]] = []
    for it in items:
        classes = buckets.setdefault(key(it), [])
        for cls in classes:
            if same(cls[0], it):
                cls.append(it)
                break
        else:
            cls = [it]
            classes.append(cls)
            order.append(cls)
    return order


def _fd_kind(f: FdSnap) -> str:
    if statmod.S_ISFIFO(f.mode):
        return "pipe" if f.target.startswith("pipe:[") else "fifo"
    if statmod.S_ISSOCK(f.mode):
        return "socket"
    if f.target.startswith("/memfd:"):
        return "memfd"
    if f.target.startswith("/dev/zero (deleted)") or f.target.startswith("/SYSV"):
        return "shmem"
    if f.target.startswith("anon_inode:"):
        return "anon"
    if f.target.startswith("/"):
        return "file"
    return "other"


def _description_classes(snaps: Sequence[TaskSnap], same_file: SameFile) -> list[list[tuple[int, FdSnap]]]:
    """Every open file description of the tasks, as the (pid, fd) that hold it."""
    items = [(s.pid, f) for s in sorted(snaps, key=lambda s: s.pid) for f in s.fds]
    # One description has one inode, one set of status flags and one offset: only such fds can be it.
    return group(items, key=lambda it: (it[1].dev, it[1].ino, it[1].flags, it[1].pos),
                 same=lambda a, b: same_file((a[0], a[1].fd), (b[0], b[1].fd)))


def find_descriptions(snaps: Sequence[TaskSnap], same_file: SameFile) -> tuple[list[FileDescription],
                                                                                  list[Pipe]]:
    """Open file descriptions held by several tasks, and pipes/FIFOs with fds in several tasks (all of whose
    descriptions are then listed too, so a pipe can name its ends by id)."""
    classes = _description_classes(snaps, same_file)
    by_pipe: dict[tuple[int, int], list[list[tuple[int, FdSnap]]]] = {}
    for cls in classes:
        f = cls[0][1]
        if statmod.S_ISFIFO(f.mode):
            by_pipe.setdefault((f.dev, f.ino), []).append(cls)
    shared_pipes = {k for k, v in by_pipe.items() if len({p for cls in v for p, _ in cls}) > 1}

    descs: list[FileDescription] = []
    ids: dict[int, str] = {}
    for cls in classes:
        f = cls[0][1]
        if len({p for p, _ in cls}) < 2 and (f.dev, f.ino) not in shared_pipes:
            continue
        d = FileDescription(f"file-{len(descs) + 1}", _fd_kind(f), f.dev, f.ino, f.flags, f.pos,
                            tuple((p, x.fd) for p, x in cls))
        ids[id(cls)] = d.id
        descs.append(d)

    pipes: list[Pipe] = []
    for key in sorted(shared_pipes, key=lambda k: min(((p, x.fd) for cls in by_pipe[k] for p, x in cls))):
        ends = by_pipe[key]
        readers = tuple(ids[id(c)] for c in ends if c[0][1].flags & abi.O_ACCMODE != abi.O_WRONLY)
        writers = tuple(ids[id(c)] for c in ends if c[0][1].flags & abi.O_ACCMODE != abi.O_RDONLY)
        pids = tuple(sorted({p for c in ends for p, _ in c}))
        pipes.append(Pipe(f"pipe-{len(pipes) + 1}", key[1], ends[0][0][1].target.startswith("/"),
                          readers, writers, pids))
    return descs, pipes


def _memory_kind(v: Vma) -> str | None:
    if v.is_sysv_shm:
        return "sysv"
    if v.is_shared_anon:
        return "shmem"
    if v.is_memfd:
        return "memfd"
    if v.deleted and v.inode and v.path.startswith("/") and not v.path.startswith("/["):
        return "deleted"
    return None


def find_memory(snaps: Sequence[TaskSnap]) -> list[MemoryObject]:
    """Memory objects (shared anonymous memory, SysV shm, memfds, deleted files) that several tasks map or
    hold through fds. One object is one (device, inode): the maps line shows them for a mapping, as
    /proc/PID/map_files would, and stat through the fd link for an fd."""
    maps: dict[tuple[int, int], list[Mapping]] = {}
    kinds: dict[tuple[int, int], str] = {}
    for s in sorted(snaps, key=lambda s: s.pid):
        for v in s.vmas:
            kind = _memory_kind(v)
            if kind is None:
                continue
            key = (os.makedev(*v.dev), v.inode)
            kinds.setdefault(key, kind)
            maps.setdefault(key, []).append(Mapping(s.pid, v.start, v.end, v.offset, v.shared))
    fds: dict[tuple[int, int], list[Holder]] = {}
    for s in sorted(snaps, key=lambda s: s.pid):
        for f in s.fds:
            kind = _fd_kind(f)
            key = (f.dev, f.ino)
            if key in kinds or kind in ("memfd", "shmem"):
                kinds.setdefault(key, kind)
                fds.setdefault(key, []).append((s.pid, f.fd))
    out: list[MemoryObject] = []
    cands = []
    for key, kind in kinds.items():
        m, h = tuple(maps.get(key, ())), tuple(fds.get(key, ()))
        if len({x.pid for x in m} | {p for p, _ in h}) > 1:
            first = min([(x.pid, 0, x.start) for x in m] + [(p, 1, fd) for p, fd in h])  # mappings, then fds
            cands.append((first, key, kind, m, h))
    for _, key, kind, m, h in sorted(cands, key=lambda c: c[0]):
        out.append(MemoryObject(f"mem-{len(out) + 1}", kind, key[0], key[1], m, h))
    return out


def find_states(pids: Sequence[int], same: SameState, kinds: Sequence[str] = STATE_KINDS) -> list[SharedState]:
    """Groups of processes sharing an fd table, fs state, address space or signal handlers (kcmp)."""
    out: list[SharedState] = []
    for kind in kinds:
        for cls in group(sorted(pids), key=lambda _p: 0, same=lambda a, b, k=kind: same(a, b, k)):
            if len(cls) > 1:
                out.append(SharedState(f"{kind}-{sum(s.kind == kind for s in out) + 1}", kind, tuple(cls)))
    return out


def _ancestry(pid: int, parents: dict[int, int]) -> list[int]:
    chain = [pid]
    while parents.get(chain[-1]) in parents and parents[chain[-1]] not in chain:
        chain.append(parents[chain[-1]])
    return chain


def common_ancestor(pids: Iterable[int], parents: dict[int, int]) -> int:
    """The nearest task of the set (`parents`: pid -> ppid for every task of the set) that is an ancestor of
    (or one of) all `pids`; the set's root if the tasks are not related inside it."""
    chains = [_ancestry(p, parents) for p in pids]
    common = set(chains[0]).intersection(*chains[1:])
    for p in chains[0]:
        if p in common:
            return p
    return chains[0][-1]


def find_pages(page_frames: Iterable[PageFrames], parents: dict[int, int], zero: int | None = None) -> list[
        SharedPages]:
    """Runs of private pages mapped by several tasks as one physical page (same PFN in pagemap).

    Only present pages count that are anonymous (PM_FILE_SHARED clear: a private file mapping's unwritten
    pages are the page cache's, not copy-on-write copies), mapped more than once (PM_MMAP_EXCLUSIVE clear), and
    not the zero page. A frame a task maps at two addresses (KSM) is left to each task: it is not fork's doing.
    """
    test = abi.PM_PRESENT | abi.PM_FILE_SHARED | abi.PM_MMAP_EXCLUSIVE
    pfn_mask, page = abi.PM_PFN_MASK, abi.PAGE_SIZE
    holders: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
    for pf in page_frames:
        pid, start = pf.pid, pf.start
        for i, e in enumerate(pf.entries):
            if e & test == abi.PM_PRESENT:  # present, anonymous, mapped more than once
                f = e & pfn_mask
                if f and f != zero:
                    holders[f].append((pid, start + i * page))
    owners: dict[tuple[int, ...], int] = {}
    pages = []
    for at in holders.values():
        if len(at) < 2:
            continue
        at.sort()
        pids = tuple(p for p, _ in at)
        if len(set(pids)) != len(pids):
            continue
        owner = owners.get(pids)
        if owner is None:
            owner = owners[pids] = common_ancestor(pids, parents)
        base = at[0][1]
        # Pages of one run have the same holders, owner, and distances between the holders' addresses.
        pages.append((pids[0], base, (pids, tuple(a - base for _, a in at), owner), at))
    pages.sort(key=lambda x: (x[0], x[1]))
    out: list[SharedPages] = []
    run: tuple[int, int, object, list[tuple[int, int]]] | None = None
    n = 0
    for page in pages:
        if run is not None and page[2] == run[2] and page[0] == run[0] and page[1] == run[1] + n * abi.PAGE_SIZE:
            n += 1
            continue
        if run is not None:
            out.append(_run(len(out), owners[run[2][0]], tuple(run[3]), n))  # type: ignore[index]
        run, n = page, 1
    if run is not None:
        out.append(_run(len(out), owners[run[2][0]], tuple(run[3]), n))  # type: ignore[index]
    return out


def _run(k: int, owner: int, at: tuple[tuple[int, int], ...], n: int) -> SharedPages:
    return SharedPages(f"cow-{k + 1}", owner, any(p == owner for p, _ in at), n, at)


# -- what the image stores, what a restore cannot rebuild (pure) ----------------------------------------------


def inherited_ranges(pages: Iterable[SharedPages], pid: int) -> list[Range]:
    """The [start, end) ranges of `pid` that come to it by fork from an ancestor (runs it holds but does not
    own): its page file leaves them out. Sorted and merged."""
    out: list[Range] = []
    for r in pages:
        if r.owner == pid:
            continue
        for p, a in r.at:
            if p == pid:
                out.append((a, a + r.npages * abi.PAGE_SIZE))
    return merge(out)


_REFUSED_STATES = {"vm": "an address space (CLONE_VM) shared by processes that are not threads of one another",
                   "sighand": "signal handlers (CLONE_SIGHAND) shared by processes"}


def refusals(found: Sharing) -> list[str]:
    """One line for each shared thing the restore primitives cannot rebuild yet, naming pids and fds; empty
    when everything shared can come back shared."""
    out = []
    for d in found.descriptions:
        if d.kind in ("socket", "anon", "other"):
            where = ", ".join(f"pid {p} fd {fd}" for p, fd in d.holders)
            out.append(f"{where}: one open {d.kind} file shared by several processes is not supported")
    for st in found.states:
        if st.kind in _REFUSED_STATES:
            out.append(f"pids {', '.join(map(str, st.pids))}: {_REFUSED_STATES[st.kind]} is not supported")
    return out


# -- all together ----------------------------------------------------------------------------------------------
def _kcmp_file(a: Holder, b: Holder) -> bool:
    return kcmp.same_file(a[0], a[1], b[0], b[1])


def _kcmp_state(a: int, b: int, kind: str) -> bool:
    return kcmp.same_resource(a, b, kind)


def detect(pids: Sequence[int], *, pages: bool = True, tables: Iterable[int] = ()) -> Sharing:
    """Everything the tasks `pids` (frozen, and traced or ptrace-accessible to us) share with each other.
    `tables`: pids whose fd table is another one's of `pids` (CLONE_FILES): their fds are that one's, counted
    once, so a description is shared only when a process with a table of its own holds it too."""
    same_table = set(tables)
    snaps = [snapshot(p) for p in sorted(set(pids))]
    snaps = [TaskSnap(s.pid, s.ppid, (), s.vmas) if s.pid in same_table else s for s in snaps]
    descs, pipes = find_descriptions(snaps, _kcmp_file)
    runs: list[SharedPages] = []
    if pages:
        parents = {s.pid: s.ppid for s in snaps}
        runs = find_pages((pf for s in snaps for pf in frames(s)), parents, pfn.zero_pfn())
    return Sharing(tuple(descs), tuple(pipes), tuple(find_memory(snaps)),
                   tuple(find_states([s.pid for s in snaps], _kcmp_state)), tuple(runs))


__all__ = ["FdSnap", "FileDescription", "Mapping", "MemoryObject", "PageFrames", "Pipe", "SharedPages",
           "SharedState", "Sharing", "TaskSnap", "common_ancestor", "detect", "find_descriptions", "find_memory",
           "find_pages", "find_states", "frames", "group", "inherited_ranges", "merge", "refusals", "snapshot",
           "subtract"]
