"""Rebuild a task's address space by injected syscalls: clear the restorer's copy, move the vdso, map
every vma of the image, bring back shared objects, and fill private pages (eagerly here; lazily via uffd).
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Callable

from lazarus.errors import RestoreError
from lazarus.images.mm import SEALS_NONE, VMFLAGS_COMPARED, is_lazy
from lazarus.kernel import abi, procfs
from lazarus.records import field, record
from lazarus.remote import Batch, RemoteTask
from lazarus.restore import private
from lazarus.restore.access import Access, mapped_access
from lazarus.restore.files import _OPEN_MASK
from lazarus.restore.sharing import SharedMemory

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_NEG1 = (1 << 64) - 1
_MADVISE = {"dd": abi.MADV_DONTDUMP, "hg": abi.MADV_HUGEPAGE, "nh": abi.MADV_NOHUGEPAGE,
            "dc": abi.MADV_DONTFORK, "wf": abi.MADV_WIPEONFORK, "rr": abi.MADV_RANDOM,
            "sr": abi.MADV_SEQUENTIAL, "mg": abi.MADV_MERGEABLE}
VDSO_KINDS = ("vvar", "vvar_vclock", "vdso")


@record
class MemoryState:
    """What the address-space rebuild leaves for later stages."""

    object_fds: dict[int, int] = field(default_factory=dict)  # image object id -> fd in the task
    # Deleted files recreated for mappings, by their inode at dump time -> (the path used, since unlinked;
    # the task's fd, held like object_fds): an fd of the task to the same deleted file can dup it to stay
    # on the same inode.
    recreated: dict[int, tuple[str, int]] = field(default_factory=dict)
    # fd number -> the task's fd (held like object_fds) opened again on a deleted file's object for an fd record
    # of type "object_file": its own open file description, with the record's access and open flags.
    reopened: dict[int, int] = field(default_factory=dict)


def free_gaps(vmas: list[dict[str, Any]], lo: int = 0x10000, hi: int = 0x7FFF_FFFF_F000) -> list[tuple[int, int]]:
    """Gaps between the image's mappings (candidate places for the trampoline)."""
    gaps = []
    cur = lo
    for v in sorted(vmas, key=lambda v: v["start"]):
        if v["start"] > cur:
            gaps.append((cur, v["start"]))
        cur = max(cur, v["end"])
    if cur < hi:
        gaps.append((cur, hi))
    return gaps


def trampoline_candidates(vmas: list[dict[str, Any]], size: int) -> list[int]:
    """Addresses where a `size` trampoline fits in the image's layout, with a guard gap on both sides."""
    out = []
    guard = 1 << 20
    for start, end in free_gaps(vmas):
        for base in (start + guard, (start + end) // 2 & ~0xFFFFF, end - guard - size):
            if start + guard <= base and base + size + guard <= end:
                out.append(base)
    # Prefer mid-range addresses, far from both the program and the stack.
    out.sort(key=lambda a: abs(a - 0x3000_0000_0000))
    return out


TASK_SIZE = 0x7FFF_FFFF_F000


def clear_address_space(task: RemoteTask, keep: tuple[int, int], batch: Batch | None = None,
                        also: list[tuple[int, int]] | None = None) -> dict[str, procfs.Vma]:
    """Unmap everything the task inherited from the restorer except `keep` and the vdso block.

    A few munmaps over the gaps between what stays (munmap accepts holes), instead of one per vma: the
    restorer is a Python process with a hundred or more mappings. batch: queue the calls there (its caller
    runs it), else run them now.
    """
    specials: dict[str, procfs.Vma] = {}
    stay = [keep, *(also or [])]  # also: vmas a child keeps from its parent (copy-on-write runs, restore/cow.py)
    for vma in procfs.read_maps(task.pid):
        if vma.path in ("[vdso]", "[vvar]", "[vvar_vclock]"):
            specials[vma.path.strip("[]")] = vma
            stay.append((vma.start, vma.end))
    cur = 0
    b = batch if batch is not None else task.batch()
    for start, end in sorted(stay):
        if start > cur:
            b.call(abi.SYS.munmap, cur, start - cur)
        cur = max(cur, end)
    if cur < TASK_SIZE:
        b.call(abi.SYS.munmap, cur, TASK_SIZE - cur)
    if batch is None:
        b.run()
    return specials


def move_vdso(task: RemoteTask, have: dict[str, procfs.Vma], image_vmas: list[dict[str, Any]],
              scratch_gap: int, batch: Batch | None = None) -> None:
    """Move the task's vvar/vvar_vclock/vdso to where the image had them, keeping them together. batch: queue
    the calls there (its caller runs it)."""
    want = {v["kind"]: v for v in image_vmas if v["kind"] in VDSO_KINDS}
    b = batch if batch is not None else task.batch()
    for kind in VDSO_KINDS:
        if kind in have and kind not in want:
            b.call(abi.SYS.munmap, have[kind].start, have[kind].end - have[kind].start)
    moves = []
    for kind in VDSO_KINDS:
        if kind not in want:
            continue
        if kind not in have:
            raise RestoreError(f"the image has a [{kind}] mapping but this kernel gives none", stage="memory")
        cur, dst = have[kind], want[kind]
        if cur.end - cur.start != dst["end"] - dst["start"]:
            raise RestoreError(f"[{kind}] is {cur.end - cur.start} bytes here, {dst['end'] - dst['start']} "
                               f"in the image", stage="memory")
        moves.append((cur.start, cur.end - cur.start, dst["start"]))
    # Two passes through a scratch gap, so no move lands on a block that has not moved yet.
    flags = abi.MREMAP_MAYMOVE | abi.MREMAP_FIXED
    tmp = scratch_gap
    staged = []
    for old, size, dst in moves:
        b.call(abi.SYS.mremap, old, size, size, flags, tmp)
        staged.append((tmp, size, dst))
        tmp += size
    for old, size, dst in staged:
        b.call(abi.SYS.mremap, old, size, size, flags, dst)
    if batch is None:
        b.run()


def _same_file(v: dict[str, Any]) -> Callable[[os.stat_result], str | None]:
    """The check of a mapped file's inode before it is opened for its mapping."""
    want = v["file"]

    def check(st: os.stat_result) -> str | None:
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if (st.st_dev, st.st_ino) != (want.get("dev", st.st_dev), want["ino"]):
            return "is another file now"
        return None
    return check


class SpaceBuilder:
    """Maps the image's vmas into the task."""

    def __init__(self, task: RemoteTask, image: Any, pid: int, access: Access) -> None:
        self.task = task
        self.access = access  # mapped files are opened as the restored credentials could open them
        self.image = image
        self.pid = pid
        self.fd_cache: dict[tuple[str, int], int] = {}
        self.state = MemoryState()
        self.deferred_prot: list[dict[str, Any]] = []  # anon vmas mapped writable, their prot set later
        self.late_seals: list[tuple[int, int, str]] = []  # (task fd, seals, memfd name) added after mapping
        # A lazy restore checks page data chunk by chunk as it uses it (an eager one checked it all first).
        self.verify = False
        self.kept: set[int] = set()  # starts of vmas a child keeps from its parent (restore/cow.py)
        self.sysv_ids: dict[int, int] = {}  # image object id -> shmid of a System V segment (attached by shmat)
        # Segments this task makes (object, record holding the content, its page file): made, attached and
        # removed in map_vmas (a segment removed before anything attached it would be gone at once).
        self.sysv_new: list[tuple[dict[str, Any], dict[str, Any], Any]] = []
        # Image object id -> the fd records ("object_file") this task opens on that deleted file's object
        # itself (reopen_records).
        self.reopen: dict[int, list[dict[str, Any]]] = {}

    def _open(self, path: str, flags: int) -> int:
        key = (path, flags)
        if key not in self.fd_cache:
            addr = self.task.cstring(path)
            self.fd_cache[key] = self.task.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, addr, flags, 0,
                                                   what=f"open {path}")
        return self.fd_cache[key]

    def _open_mapped(self, v: dict[str, Any], flags: int) -> int:
        """A mapped file, opened (once per path and access) as the restored credentials could: the mapping
        gives the process the file's content, and a shared writable one lets it write the file."""
        key = (v["path"], flags)
        if key not in self.fd_cache:
            self.fd_cache[key] = self.access.open(v["path"], flags, _same_file(v), f"mapping {v['start']:#x}")
        return self.fd_cache[key]

    def close_cached(self) -> None:
        b = self.task.batch()
        for fd in self.fd_cache.values():
            if not b.fits(1):
                b.run()
            b.call(abi.SYS.close, fd)
        b.run()
        self.fd_cache.clear()

    def create_objects(self, objects: list[dict[str, Any]], hold_above: int, page_file: Any,
                       lazy_ids: set[int], shared: SharedMemory | None = None) -> None:
        """Create each shared object (shared anonymous memory, memfd, recreated deleted file), with its
        content unless it is served lazily, then its owner, mode and seals; its fd is kept at >= hold_above
        until the fds are restored. An object other tasks of the tree hold too (a record with "shared") is
        made by the first of them built, with the content from the record storing it, and given to the
        others as that very object (`shared`, restore/sharing.py)."""
        given: list[dict[str, Any]] = []
        for obj in objects:
            sid = obj.get("shared") if shared is not None else None
            content, pf = obj, page_file
            if obj["kind"] == "sysv":
                self.sysv_ids[obj["id"]] = obj["shmid"]
                if sid is not None and shared is not None and shared.made(sid):
                    continue  # attached by its id: made by a task built before
            if sid is not None:
                assert shared is not None
                if shared.made(sid):
                    given.append(obj)
                    continue
                content, other = shared.stored(obj)
                pf = other if other is not None else page_file
            if obj["kind"] == "sysv":
                self.sysv_new.append((obj, content, pf))
                if sid is not None:
                    assert shared is not None
                    shared.fds[sid] = -1  # no fd: the others attach it by its id
                continue
            high = self._create_object(obj, content, hold_above, pf, lazy_ids, shared if sid is not None else None)
            self.state.object_fds[obj["id"]] = high
            if sid is not None:
                assert shared is not None
                shared.lend(sid, self.pid, high)
        if given:
            assert shared is not None
            fds = shared.give(self.task, [o["shared"] for o in given], hold_above)
            for obj, fd in zip(given, fds, strict=True):
                self.state.object_fds[obj["id"]] = fd
                name = shared.names.get(obj["shared"])
                for rec in self.reopen.get(obj["id"], ()):
                    if name is not None:
                        self._reopen(rec, name[1], hold_above)
                    else:
                        self._reopen(rec, f"/proc/self/fd/{fd}", hold_above, magic=True)

    def _reopen(self, rec: dict[str, Any], path: str, hold_above: int, *, magic: bool = False) -> None:
        """Open the deleted file's object at `path` (its recreated name, or the task's own fd link of it when
        the object was given: `magic`) with the fd record's access and open flags; kept >= hold_above until
        the fd phase places it (restore/files.py)."""
        flags = rec["flags"] & _OPEN_MASK
        where = f"fd {rec['fd']} ({rec.get('path')} (deleted))"
        if magic and flags & abi.O_NOFOLLOW:
            # The kernel refuses O_NOFOLLOW on the /proc link, and the name is only known to the task that made
            # the object.
            raise RestoreError(f"{where}: opened with O_NOFOLLOW by a process that did not make its mapped "
                               f"object; not supported", stage="files", pid=self.pid, path=rec.get("path"))
        t = self.task
        tfd = t.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, t.cstring(path), flags, 0, what=f"open {where}")
        self.state.reopened[rec["fd"]] = t.syscall(abi.SYS.fcntl, tfd, abi.F_DUPFD, hold_above)
        t.syscall(abi.SYS.close, tfd)

    def _create_object(self, obj: dict[str, Any], content: dict[str, Any], hold_above: int, page_file: Any,
                       lazy_ids: set[int], shared: SharedMemory | None = None) -> int:
        """One object made in the task, its content from `content` (obj itself, or the record storing a shared
        object's content); returns the task's fd of it (>= hold_above)."""
        t = self.task
        size = obj["size"]
        seals = obj.get("seals", SEALS_NONE)
        if obj["kind"] == "deleted":
            return self._recreate_deleted(obj, hold_above, page_file, content, shared)
        if obj["kind"] == "memfd":
            flags = 0
            if seals != SEALS_NONE:
                flags |= abi.MFD_ALLOW_SEALING
                if seals & abi.F_SEAL_EXEC and not obj.get("mode", 0o777) & 0o111:
                    flags |= abi.MFD_NOEXEC_SEAL
            fd = t.syscall(abi.SYS.memfd_create, t.cstring(obj["name"]), flags, what="memfd_create")
            t.syscall(abi.SYS.ftruncate, fd, size)
        else:
            # A shared anonymous object only exists as a mapping; its file is reachable through
            # map_files, which lets us map it again at each vma and write its content.
            length = max(size, abi.PAGE_SIZE)
            addr = t.syscall(abi.SYS.mmap, 0, length, abi.PROT_READ | abi.PROT_WRITE,
                             abi.MAP_SHARED | abi.MAP_ANONYMOUS, _NEG1, 0)
            fd = t.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1,
                           t.cstring(f"/proc/self/map_files/{addr:x}-{addr + length:x}"), abi.O_RDWR, 0)
            t.syscall(abi.SYS.munmap, addr, length)
        high = t.syscall(abi.SYS.fcntl, fd, abi.F_DUPFD, hold_above)
        t.syscall(abi.SYS.close, fd)
        if content["pages"] and obj["id"] not in lazy_ids:
            _write_runs_into(f"/proc/{self.pid}/fd/{high}", os.O_WRONLY, content, page_file, self.verify)
        if obj["kind"] == "memfd":
            self._owner_and_mode(f"/proc/{self.pid}/fd/{high}", obj)
            if seals != SEALS_NONE:
                # Once the content is in and the size set (a write or shrink seal forbids both), and
                # before the mappings: a read-only shared mapping of a write-sealed memfd is made without
                # VM_MAYWRITE. But F_SEAL_FUTURE_WRITE after them: it allows the writable mappings made
                # before it and no new ones (and F_SEAL_SEAL would forbid adding it later).
                late = seals & (abi.F_SEAL_FUTURE_WRITE | abi.F_SEAL_SEAL)
                if seals & ~late:
                    t.syscall(abi.SYS.fcntl, high, abi.F_ADD_SEALS, seals & ~late,
                              what=f"memfd {obj['name']!r} seals")
                if late:
                    self.late_seals.append((high, late, obj["name"]))
        return high

    @staticmethod
    def _owner_and_mode(path: str, obj: dict[str, Any]) -> None:
        if "uid" in obj:
            os.chown(path, obj["uid"], obj["gid"])
        if "mode" in obj:
            os.chmod(path, obj["mode"])

    def _recreate_deleted(self, obj: dict[str, Any], hold_above: int, page_file: Any,
                          content: dict[str, Any] | None = None, shared: SharedMemory | None = None) -> int:
        """A mapped file that was deleted: recreated with its content (root's, mode 0600 and O_EXCL) under its
        old name inside a private directory of ours (restore/private.py: never at the path the image names),
        opened by the task, unlinked again, and only then given its owner and mode, through the task's fd.
        One several tasks hold, some of which open fds of it (`shared`), keeps its name in the private
        directory (root's, 0700) until every task is built (SharedMemory.close). Returns the task's fd
        (>= hold_above)."""
        top = private.make(obj["path"], None)
        path = private.name_in(top, obj["path"], "file")
        try:
            try:
                _write_runs_into(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 content or obj, page_file, self.verify, create=obj["size"])
            except OSError as e:
                raise RestoreError(f"cannot recreate deleted file {obj['path']}: {e.strerror}",
                                   stage="memory", path=obj["path"]) from e
            t = self.task
            tfd = t.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, t.cstring(path), abi.O_RDWR | abi.O_NOFOLLOW, 0,
                            what=f"open recreated {path}")
            high = t.syscall(abi.SYS.fcntl, tfd, abi.F_DUPFD, hold_above)
            t.syscall(abi.SYS.close, tfd)
            for rec in self.reopen.get(obj["id"], ()):
                self._reopen(rec, path, hold_above)  # while it has a name: its open flags may hold O_NOFOLLOW
            if shared is not None and obj["shared"] in shared.reopened():
                shared.names[obj["shared"]] = (top, path)  # later holders open their fds of it by name too
        finally:
            if shared is None or obj.get("shared") not in shared.names:
                private.remove(top)
        self._owner_and_mode(f"/proc/{self.pid}/fd/{high}", obj)
        self.state.recreated[obj["inode"]] = (path, high)
        return high

    def _object_fd(self, v: dict[str, Any]) -> int:
        """The task's fd to map a shared object's vma from: a read-only reopen for a shared mapping that
        was made through a read-only fd (the kernel then drops VM_SHARED and VM_MAYWRITE: 'sh' and 'mw'
        absent; a write-sealed memfd drops only 'mw', and does so itself)."""
        fd = self.state.object_fds[v["object"]]
        if not v["shared"] or "sh" in v["vmflags"] or v["kind"] == "shmem":
            return fd
        key = (f"object-{v['object']}", abi.O_RDONLY)
        if key not in self.fd_cache:
            self.fd_cache[key] = self.task.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1,
                                                   self.task.cstring(f"/proc/self/fd/{fd}"), abi.O_RDONLY, 0)
        return self.fd_cache[key]

    def map_vmas(self, vmas: list[dict[str, Any]]) -> None:
        """mmap every vma at its place, then its madvise state and guard regions (before any page is in:
        a guard install would drop the data of its pages)."""
        # The files first (each open is checked between injected calls), then every mmap, mprotect and
        # madvise in as few batches as fit in scratch.
        fds: dict[int, int] = {}
        wanted: dict[tuple[str, int], tuple[str, int, Any, str]] = {}
        for v in vmas:
            key = (v["path"], mapped_access(v))
            if v["kind"] == "file" and v["start"] not in self.kept and key not in self.fd_cache and key not in wanted:
                wanted[key] = (v["path"], key[1], _same_file(v), f"mapping {v['start']:#x}")
        self.fd_cache.update(zip(wanted, self.access.open_many(list(wanted.values())), strict=True))
        for i, v in enumerate(vmas):
            if v["kind"] == "file" and v["start"] not in self.kept:  # kept: from the fork (restore/cow.py)
                fds[i] = self._open_mapped(v, mapped_access(v))
            elif v["kind"] in ("shmem", "memfd", "deleted"):
                fds[i] = self._object_fd(v)
        made = [self._make_sysv(obj) for obj, _, _ in self.sysv_new]
        try:
            self._map_all(vmas, fds)
        except BaseException:
            for shmid in made:
                self.task.raw(abi.SYS.shmctl, shmid, abi.IPC_RMID, 0)
            raise
        for (obj, content, pf), shmid in zip(self.sysv_new, made, strict=True):
            # Removed at once, as it was: alive while attached (the other holders attach it by its id, which
            # Linux allows after IPC_RMID), gone with the last detach, also if the restore fails.
            self.task.syscall(abi.SYS.shmctl, shmid, abi.IPC_RMID, 0, what=f"shmctl(IPC_RMID) of segment {shmid}")
            if content["pages"]:
                self._fill_sysv(obj, content, pf, vmas)
        self.sysv_new.clear()

    def _make_sysv(self, obj: dict[str, Any]) -> int:
        """shmget of a new private segment with the dumped id (kernel.shm_next_id), size and mode."""
        shmid, t = obj["shmid"], self.task
        try:
            with open("/proc/sys/kernel/shm_next_id", "w") as f:
                f.write(str(shmid))
        except OSError as e:
            raise RestoreError(f"System V segment {shmid}: cannot set kernel.shm_next_id: {e.strerror}",
                               stage="memory") from e
        got = t.syscall(abi.SYS.shmget, abi.IPC_PRIVATE, obj["size"], abi.IPC_CREAT | abi.IPC_EXCL | obj["mode"],
                        what=f"shmget of System V segment {shmid}")
        if got != shmid:
            t.raw(abi.SYS.shmctl, got, abi.IPC_RMID, 0)
            raise RestoreError(f"System V segment {shmid}: that id is taken here (the new segment got {got})",
                               stage="memory", pid=self.pid)
        if (obj["uid"], obj["gid"]) != (0, 0):
            # Its owner (the creator stays this task, root now): IPC_SET reads uid, gid and mode of the
            # struct ipc64_perm that begins struct shmid64_ds (key, uid, gid, cuid, cgid, mode).
            t.write(t.scratch, struct.pack("<iIIIII", 0, obj["uid"], obj["gid"], 0, 0, obj["mode"]) + bytes(88))
            t.syscall(abi.SYS.shmctl, shmid, abi.IPC_SET, t.scratch, what=f"shmctl(IPC_SET) of segment {shmid}")
        return shmid

    def _fill_sysv(self, obj: dict[str, Any], content: dict[str, Any], page_file: Any,
                   vmas: list[dict[str, Any]]) -> None:
        """The content of a segment this task made, written once through one of its attaches (map_files)."""
        v = next(v for v in vmas if v.get("object") == obj["id"])
        path = f"/proc/{self.pid}/map_files/{v['start']:x}-{v['end']:x}"
        _write_runs_into(path, os.O_RDWR | os.O_CLOEXEC, content, page_file, self.verify)

    def _map_all(self, vmas: list[dict[str, Any]], fds: dict[int, int]) -> None:
        b = self.task.batch()
        for i, v in enumerate(vmas):
            kind = v["kind"]
            if kind in VDSO_KINDS:
                continue
            if not b.fits(4 + len(v.get("guards", [])) + sum(f in _MADVISE for f in v["vmflags"])):
                b.run()
            start, length, prot = v["start"], v["end"] - v["start"], v["prot"]
            flags = abi.MAP_FIXED
            if "nr" in v["vmflags"]:
                flags |= abi.MAP_NORESERVE
            # Accounting ("ac") is charged when a private mapping is made writable and stays when it is made
            # read-only later (an ELF's RELRO): map it writable first, then set the real protection.
            map_prot = prot
            if not v["shared"] and "ac" in v["vmflags"] and not prot & abi.PROT_WRITE:
                map_prot |= abi.PROT_WRITE
            if start in self.kept:
                # Inherited from its parent with the pages they share (restore/cow.py): kept, not mapped again.
                b.call(abi.SYS.mprotect, start, length, map_prot, what=f"mprotect of kept {start:#x}")
            elif kind == "anon":
                flags |= abi.MAP_PRIVATE | abi.MAP_ANONYMOUS
                if "gd" in v["vmflags"]:
                    flags |= abi.MAP_GROWSDOWN
                b.call(abi.SYS.mmap, start, length, map_prot, flags, _NEG1, 0, what=f"mmap anonymous {start:#x}")
            elif kind in ("file", "shmem", "memfd", "deleted"):
                flags |= abi.MAP_SHARED if v["shared"] else abi.MAP_PRIVATE
                b.call(abi.SYS.mmap, start, length, map_prot, flags, fds[i], v["offset"], what=f"mmap {v['path']}")
            elif kind == "sysv":
                shmid = self.sysv_ids[v["object"]]
                how = (0 if prot & abi.PROT_WRITE else abi.SHM_RDONLY) | (abi.SHM_EXEC if prot & abi.PROT_EXEC else 0)
                b.call(abi.SYS.shmat, shmid, start, how, what=f"shmat of System V segment {shmid} at {start:#x}")
                got = abi.PROT_READ | (prot & (abi.PROT_WRITE | abi.PROT_EXEC))
                if got != prot:
                    b.call(abi.SYS.mprotect, start, length, prot)
            else:
                raise RestoreError(f"unknown vma kind {kind!r} at {start:#x}", stage="memory")
            if map_prot != prot:
                if kind == "anon":
                    self.deferred_prot.append(v)
                else:
                    b.call(abi.SYS.mprotect, start, length, prot)
            for flag in v["vmflags"]:
                if flag in _MADVISE:
                    b.call(abi.SYS.madvise, start, length, _MADVISE[flag],
                           what=f"madvise {flag} {start:#x}-{v['end']:#x}")
            guards = v.get("guards", [])
            for gstart, n in guards:
                b.call(abi.SYS.madvise, gstart, n * abi.PAGE_SIZE, abi.MADV_GUARD_INSTALL,
                       what=f"guard region at {gstart:#x}")
            if "gu" in v["vmflags"] and not guards:
                # The vma once had guard regions, since removed: the flag stays, and so does it here.
                b.call(abi.SYS.madvise, start, abi.PAGE_SIZE, abi.MADV_GUARD_INSTALL, what="guard flag")
                b.call(abi.SYS.madvise, start, abi.PAGE_SIZE, abi.MADV_GUARD_REMOVE, what="guard flag")
        for fd, seals, name in self.late_seals:
            if not b.fits(1):
                b.run()
            b.call(abi.SYS.fcntl, fd, abi.F_ADD_SEALS, seals, what=f"memfd {name!r} seals")
        # The files opened for mapping serve nothing once mapped (map_vmas alone uses them): closed in this
        # same injection rather than one of their own later (close_cached finds none left then).
        for fd in self.fd_cache.values():
            if not b.fits(1):
                b.run()
            b.call(abi.SYS.close, fd)
        b.run()
        self.fd_cache.clear()
        self.late_seals.clear()

    def finish_vmas(self, vmas: list[dict[str, Any]], page_file: Any) -> None:
        """The steps that need the pages in: read-only anonymous memory that keeps its accounting, mlock,
        mseal (mlock faults every page in; a sealed mapping can no longer be changed)."""
        t = self.task
        for v in self.deferred_prot:
            # mprotect drops the accounting of an anonymous mapping that never had a page (no anon_vma):
            # give it one first, with a page of its own data, or a zero page dropped again.
            start, length = v["start"], v["end"] - v["start"]
            if v["pages"] and page_file is not None:
                first = v["pages"][0][0]
                self.write_range([v], page_file, first, first + abi.PAGE_SIZE)
            else:
                fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
                try:
                    os.pwrite(fd, bytes(abi.PAGE_SIZE), start)
                finally:
                    os.close(fd)
                t.syscall(abi.SYS.madvise, start, abi.PAGE_SIZE, abi.MADV_DONTNEED)
            t.syscall(abi.SYS.mprotect, start, length, v["prot"])
        self.deferred_prot.clear()
        for v in vmas:
            if "lo" in v["vmflags"] and v["kind"] not in VDSO_KINDS:
                how = abi.MLOCK_ONFAULT if "lf" in v["vmflags"] else 0
                ret = t.raw(abi.SYS.mlock2, v["start"], v["end"] - v["start"], how)
                if ret < 0:
                    raise RestoreError(f"mapping {v['start']:#x}-{v['end']:#x} {v['path'] or '[anon]'} was "
                                       f"locked in memory, and mlock here fails: {os.strerror(-ret)}",
                                       stage="memory")
        for v in vmas:
            if "sl" in v["vmflags"] and v["kind"] not in VDSO_KINDS:
                t.syscall(abi.SYS.mseal, v["start"], v["end"] - v["start"], 0,
                          what=f"mseal {v['start']:#x}-{v['end']:#x}")

    def check_vmflags(self, vmas: list[dict[str, Any]]) -> None:
        """Refuse a restore whose mappings do not show the image's VmFlags again (compared by address: the
        kernel may merge neighbours whose flags agree)."""
        have = procfs.read_smaps(self.pid)
        for v in vmas:
            if v["kind"] in VDSO_KINDS:
                continue
            want = set(v["vmflags"]) & VMFLAGS_COMPARED
            covered = v["start"]
            for h in have:
                if h.end <= v["start"] or h.start >= v["end"]:
                    continue
                got = set(h.vmflags) & VMFLAGS_COMPARED
                if h.start > covered or got != want:
                    raise RestoreError(
                        f"mapping {v['start']:#x}-{v['end']:#x} {v['path'] or '[anon]'}: restored with VmFlags "
                        f"{' '.join(sorted(got)) or '-'} at {h.start:#x}, the image has {' '.join(sorted(want))}",
                        stage="memory")
                covered = h.end
            if covered < v["end"]:
                raise RestoreError(f"mapping {v['start']:#x}-{v['end']:#x}: not mapped after the restore",
                                   stage="memory")

    def write_pages(self, vmas: list[dict[str, Any]], page_file: Any, skip_lazy: bool) -> int:
        """Write every saved page (only file-private ones when `skip_lazy`) through /proc/pid/mem."""
        mem = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
        written = 0
        try:
            for v in vmas:
                if skip_lazy and is_lazy(v):
                    continue
                for vaddr, n, idx in v["pages"]:
                    if self.verify:
                        page_file.verify_range(idx, n)
                    view = page_file.view(idx, n)
                    off = 0
                    while off < len(view):
                        try:
                            got = os.pwrite(mem, view[off:off + (64 << 20)], vaddr + off)
                        except OSError as e:
                            raise RestoreError(f"cannot write pages at {vaddr + off:#x} ({v['kind']} "
                                               f"{v['path']}): {e.strerror}", stage="memory") from e
                        if got <= 0:
                            raise RestoreError(f"short write at {vaddr + off:#x}", stage="memory")
                        off += got
                    written += n
        finally:
            os.close(mem)
        return written

    def write_range(self, vmas: list[dict[str, Any]], page_file: Any, start: int, end: int) -> int:
        """Write the saved pages that overlap [start, end) now (pages the restore itself touches)."""
        lo, hi = start & ~(abi.PAGE_SIZE - 1), (end + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)
        picked = []
        for v in vmas:
            if v["end"] <= lo or v["start"] >= hi:
                continue
            clipped = []
            for vaddr, n, idx in v["pages"]:
                a, b = max(vaddr, lo), min(vaddr + n * abi.PAGE_SIZE, hi)
                if a < b:
                    clipped.append([a, (b - a) // abi.PAGE_SIZE, idx + (a - vaddr) // abi.PAGE_SIZE])
            if clipped:
                picked.append({**v, "pages": clipped})
        return self.write_pages(picked, page_file, skip_lazy=False)


def _write_runs_into(path: str, flags: int, obj: dict[str, Any], page_file: Any, verify: bool, *,
                     create: int | None = None) -> None:
    """Open `path` (the object's file: the task's fd of it, its mapping, or a new file of `create` bytes, mode
    0600), write the object's saved runs into it (_write_runs), close it."""
    fd = os.open(path, flags, 0o600)
    try:
        if create is not None:
            os.ftruncate(fd, create)
        _write_runs(fd, obj, page_file, verify)
    finally:
        os.close(fd)


def _write_runs(fd: int, obj: dict[str, Any], page_file: Any, verify: bool) -> None:
    """Write an object's saved runs ([offset, npages, file page index]) into `fd`, up to its size."""
    size = obj["size"]
    for offset, n, idx in obj["pages"]:
        if verify:
            page_file.verify_range(idx, n)
        view = page_file.view(idx, n)[: max(0, min(n * abi.PAGE_SIZE, size - offset))]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def close_inherited_fds(task: RemoteTask, batch: Batch | None = None) -> None:
    """Every fd the task inherited from the restorer (batch: queued there, for its caller to run)."""
    if batch is not None:
        batch.call(abi.SYS.close_range, 0, 0xFFFFFFFF, 0, check=False)
        return
    with contextlib.suppress(Exception):
        task.syscall(abi.SYS.close_range, 0, 0xFFFFFFFF, 0)


def reopen_records(fds: list[dict[str, Any]], shared: dict[str, Any] | None, pid: int) -> dict[int, list[dict[str, Any]]]:
    """Image object id -> the fd records of type "object_file" (an fd to a deleted file the task maps too) that
    task `pid` opens itself: its own, and each description shared with other tasks that it holds first
    (shared.json "files", restored by its first holder: restore/sharefds.py plan)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for rec in fds:
        if rec["type"] == "object_file" and "dup_of" not in rec:
            out.setdefault(rec.get("object", -1), []).append(rec)
    for d in (shared or {}).get("files", ()):
        if d.get("type") == "object_file" and d["holders"][0][0] == pid:
            out.setdefault(d["object"], []).append({**d, "fd": d["holders"][0][1]})
    return out
