"""The address space: mappings, the pages that hold data, and shared-memory objects.

    vma kinds          what the image keeps                         restored by
    ---------          -------------------                          -----------
    anon   private     present pages (pages-PID.img)                mmap anon + copy (eager) / uffd (lazy)
    file   private     file identity + pages the process modified   mmap file + write modified pages
    file   shared      file identity only (the file holds the data) mmap file
    shmem/memfd        one object (its whole content, seals)        new object, mapped at each vma
    deleted            one object per deleted file (its content)    file recreated, unlinked, mapped at each vma
                       + private: pages the process modified        + modified pages written
    vdso/vvar          position only                                the restorer's vdso moved there

Every vma also keeps its VmFlags (madvise, mlock and mseal state, re-applied at restore; flags that cannot
come back are refused, see images/mm.py) and its guard regions (page-table markers, reinstalled at restore).
A memfd the task holds open without mapping it is saved as an object too.

How the page data gets to the disk (measurements in docs/BENCHMARKS.md, "Dump: where the time goes"):

    1. plan: one PAGEMAP_SCAN per vma (which pages are present, which sit in huge pages), each object's data
       extents (SEEK_DATA/SEEK_HOLE); every run gets its place in pages-PID.img, in vma order;
    2. the page file grows by the total at once (fallocate, PagesWriter.extend);
    3. two threads each take the next piece of the file and read it from the task with process_vm_readv
       (objects: preadv); both are outside the GIL for all but the hashing. By default a 256 KiB piece is
       read into the thread's own buffer (which stays in the CPU's cache), hashed, and written with pwrite into
       the page cache; the writeback of every 8 MiB starts at once unless the dump is not synced. With
       `direct` (O_DIRECT) 8 MiB pieces go from the buffer to the device, no page cache filled. (_MAPPED: the
       one-copy way, reading straight into a shared mapping of the page file, measured slower here);
    4. spot check: a sample of pages of every private run is read from the (still frozen) task again and
       compared with the file as read back (from the device itself when direct), which proves the runs
       recorded point at the right place of the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat as statmod
import threading
from collections.abc import Iterator

from lazarus.dump import selfwrite
from lazarus.dump.thp import huge_runs
from lazarus.errors import DumpError, ImageError, Unsupported
from lazarus.images.mm import refused_vmflag
from lazarus.images.ranges import subtract, window
from lazarus.kernel import abi, procfs, vm
from lazarus.kernel.pagemap import Pagemap
from lazarus.kernel.procfs import Vma
from lazarus.kernel.syscall import buffer_address, populate_write
from lazarus.remote import RemoteTask

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

SPECIAL = {"[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar_vclock"}
# Bytes a copy thread reads, hashes and writes at a time (a multiple of the 64 KiB chunk). Measured on 512 MiB:
# 8 MiB pieces with two threads beat 16 MiB ones (the device starts sooner); the iovecs stay below IOV_MAX.
_PIECE = 8 << 20
_THREADS = 2
# Whether each piece of the mapped page file is populated (MADV_POPULATE_WRITE) before it is read into. Off: in
# the real dump at 2 GiB it measured slower (median 3.7 s against 2.5 s, 7 runs), though in a bare copy loop it
# was sometimes 3x faster; benchmarks/dump_ways.py (ways api / api_nopop) flips it to measure again.
_POPULATE = False
# Whether the page file is filled through a shared mapping of it (one copy, but each fresh page-cache folio
# faulted in, zeroed and then overwritten) rather than by pwrite from each thread's small buffer (two copies,
# the second from the CPU's cache). Off: measured in one run (docs/BENCHMARKS.md, "Dump: pwrite from small
# buffers, --no-sync, batched injection"), the mapping took 2.6-2.7x the CPU at 2 GiB and 1.7-2.4x at 512 MiB.
# benchmarks/dump_ways.py (ways api_map / api_pwrite) flips it.
_MAPPED = False
# The piece of a thread that writes from its own buffer into the page cache (not direct): 256 KiB stays in the
# L2 cache from process_vm_readv to pwrite (8 MiB buffers measured 1.6x the CPU at 64 MiB).
_SMALL = 256 << 10
# From this size on, buffered page data is split in two files (images/writer.py PagesWriter, format
# PARTS_VERSION), so that two writers fill the page cache at once (buffered writes to one file serialise on its
# inode lock): the task writes the first part itself (dump/selfwrite.py) while a thread of ours copies the
# second. Fresh page cache costs the most here, not the copy: on a VM that hands freed memory back to its host
# (free page reporting), each first touch of a page is a fault in the host, and two CPUs take them at once (a
# bare 2 GiB write: 1 writer 2.1-3.0 s, 2 writers into 2 files 1.2-1.5 s, alternating rounds; docs/BENCHMARKS.md).
_SPLIT_MIN = 64 << 20
_SPLIT_SHARE = 0.5  # of the pages, in the second part (whole selfwrite pieces)
_PAGE = abi.PAGE_SIZE


def vma_kind(vma: Vma) -> str:
    """Classify a mapping, or raise Unsupported naming it."""
    path = vma.path
    where = f"mapping {vma.start:#x}-{vma.end:#x} {path or '[anon]'}"
    if path in SPECIAL:
        return SPECIAL[path]
    if path == "[vsyscall]":
        return "vsyscall"
    if path.startswith("/memfd:"):
        return "memfd"
    if vma.shared and (path == "/dev/zero" or path == "") and (vma.deleted or path == ""):
        return "shmem"
    if path.startswith("/SYSV"):
        return "sysv"
    if "ht" in vma.vmflags:
        raise Unsupported(f"{where}: hugetlb mappings are not supported")
    if path == "" or path.startswith("[heap]") or path.startswith("[stack]") or path.startswith("[anon"):
        if vma.shared:
            return "shmem"
        return "anon"
    if vma.deleted:
        if path == "/secretmem":
            raise Unsupported(f"{where}: secret memory (memfd_secret) is not supported")
        if path.startswith("/["):
            raise Unsupported(f"{where}: kernel-internal mappings ({path}) are not supported")
        return "deleted"
    try:
        st = os.stat(path)
    except OSError as e:
        raise Unsupported(f"{where}: cannot stat the mapped file: {e.strerror}") from e
    if not statmod.S_ISREG(st.st_mode):
        if path == "/dev/zero" and not vma.shared:
            return "anon"
        raise Unsupported(f"{where}: mapping of a non-regular file is not supported")
    return "file"


def _dev_pair(dev: int) -> tuple[int, int]:
    """st_dev as the (major, minor) pair /proc/PID/maps shows."""
    return os.major(dev), os.minor(dev)


def file_identity(pid: int, vma: Vma) -> dict[str, Any]:
    """Identity of the file behind a mapping, to refuse a restore if it changed."""
    st = os.stat(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}")
    # ctime too: a file replaced by a copy with the same size and mtime may even get the same inode number
    # back, but never the same ctime.
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _pread_file(fd: int, view: memoryview, batch: list[tuple[int, int]]) -> None:
    off = 0
    for pos, n in batch:
        while n:
            got = os.preadv(fd, [view[off:off + n]], pos)
            if got <= 0:
                # A file shorter than its pages (the tail of the last page): the rest reads as zeros.
                view[off:off + n] = bytes(n)
                got = n
            off, pos, n = off + got, pos + got, n - got


class _Source:
    """A stretch of the page file to fill: task memory (`runs` of (address, length), read with
    process_vm_readv, or through /proc/PID/mem if the task cannot read it itself) or an object's file
    (`fd` and runs of (offset, length))."""

    __slots__ = ("runs", "readable", "fd", "nbytes")

    def __init__(self, runs: list[tuple[int, int]], readable: bool = True, fd: int = -1) -> None:
        self.runs = runs
        self.readable = readable
        self.fd = fd
        self.nbytes = sum(n for _, n in self.runs)

    def __repr__(self) -> str:
        return f"_Source(runs={self.runs!r}, readable={self.readable!r}, fd={self.fd!r}, nbytes={self.nbytes!r})"


Piece = tuple[int, list[tuple["_Source", list[tuple[int, int]]]], int]


def _pieces(sources: list[_Source], size: int) -> Iterator[Piece]:
    """Cut the concatenated sources into consecutive pieces of `size` bytes (the last may be shorter): yields
    (offset, [(source, [(start, length), ...]), ...], nbytes), a piece's runs grouped by source."""
    off = 0
    parts: list[tuple[_Source, list[tuple[int, int]]]] = []
    filled = 0
    for src in sources:
        for start, length in src.runs:
            pos, end = start, start + length
            while pos < end:
                n = min(end - pos, size - filled)
                if parts and parts[-1][0] is src:
                    parts[-1][1].append((pos, n))
                else:
                    parts.append((src, [(pos, n)]))
                filled += n
                pos += n
                if filled == size:
                    yield off, parts, filled
                    off += filled
                    parts, filled = [], 0
    if parts:
        yield off, parts, filled


_spare: list[mmap.mmap] = []


def _split(total: int) -> int:
    """Where a buffered page file of `total` bytes is split (0: not): on a selfwrite piece boundary."""
    if total < _SPLIT_MIN:
        return 0
    at = round(total * (1 - _SPLIT_SHARE) / selfwrite.PIECE) * selfwrite.PIECE
    return at if 0 < at < total else 0


def _buffers(n: int) -> list[mmap.mmap]:
    """`n` page-aligned piece buffers, kept between dumps: a long-lived process (the service) finds them
    touched already (first touches of fresh memory cost this VM 3x)."""
    while len(_spare) < n:
        _spare.append(mmap.mmap(-1, _PIECE))
    return _spare[:n]


def _cut(addr: int, n: int, hot: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """The run [addr, addr+n) cut at the page ranges `hot`: [(start, length, inside a hot range)], in order."""
    out: list[tuple[int, int, bool]] = []
    pos, end = addr, addr + n
    for hs, he in sorted(hot):
        if he <= pos or hs >= end:
            continue
        if hs > pos:
            out.append((pos, hs - pos, False))
        s2 = max(hs, pos)
        e2 = min(he, end)
        out.append((s2, e2 - s2, True))
        pos = e2
    if pos < end:
        out.append((pos, end - pos, False))
    return out


def _spread(npages: int) -> list[int]:
    """Which pages of a run of `npages` the spot check reads: its first and last, and one per 16 MiB."""
    k = min(npages, 2 + npages // 4096)
    if k <= 1:
        return [0]
    return sorted({i * (npages - 1) // (k - 1) for i in range(k)})


class MemoryDumper:
    """Reads every mapping of a stopped task into the image (see the module docstring for the steps)."""

    def __init__(self, pid: int, pages_writer: Any, write_blob: Any) -> None:
        self.pid = pid
        self.pages = pages_writer
        self.write_blob = write_blob
        self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        self.next_index = pages_writer.npages
        self.total_pages = 0
        self._sources: list[_Source] = []
        self._fds: list[int] = []
        # Copy-on-write runs its parent gives it back at restore (dump/cow.py): stored in the owner's file only.
        self.skip: list[tuple[int, int]] = []
        # Memory objects other tasks of the tree hold too (dump/sharing.py find_memory): (st_dev, inode) ->
        # (shared id, the pid whose page file stores the content once).
        self.shared: dict[tuple[int, int], tuple[str, int]] = {}
        # System V segments: shmid -> how many mappings the dumped processes have of it (the segment's nattch
        # must be that: no process outside holds it). Unset ones: this task's own mappings.
        self.attaches: dict[int, int] = {}
        self._own_attaches: dict[int, int] = {}
        self._sysv: dict[int, procfs.SysvShm] | None = None
        # How to inject into the task for its own pwritev of its pages (dump/selfwrite.py): (syscall address,
        # journal, whether batches may run as code); None: the old copy only.
        self.inject: tuple[int, Any, bool] | None = None
        self.selfwrite = ""  # what the task wrote itself, or why not (for the log and the tests)
        # Memory the kernel itself writes whenever the task runs (its rseq area: cpu_id, mm_cid), [(addr, size)]:
        # while the task writes its own pages it runs, so those pieces are copied only after it stopped for good.
        self.volatile: list[tuple[int, int]] = []

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        os.close(self.mem)

    def dump(self, vmas: list[Vma]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        objects: dict[tuple[Any, int, str], dict[str, Any]] = {}
        for vma in vmas:
            if vma.path.startswith("/SYSV"):
                self._own_attaches[vma.inode] = self._own_attaches.get(vma.inode, 0) + 1
        with Pagemap(self.pid) as pm:
            for vma in vmas:
                kind = vma_kind(vma)
                if kind == "vsyscall":
                    continue
                out.append(self._plan_vma(pm, vma, kind, objects))
        self._dump_unmapped_memfds(objects)
        self._copy()
        self.finish()
        return out, list(objects.values())

    def _place(self, source: _Source) -> int:
        """Give the source its place in the page file; returns its first file page index."""
        first = self.next_index
        if source.nbytes:
            self._sources.append(source)
            self.next_index += source.nbytes // _PAGE
            self.total_pages += source.nbytes // _PAGE
        return first

    def _plan_vma(self, pm: Pagemap, vma: Vma, kind: str,
                  objects: dict[tuple[Any, int, str], dict[str, Any]]) -> dict[str, Any]:
        where = f"mapping {vma.start:#x}-{vma.end:#x} {vma.path or '[anon]'}"
        rec: dict[str, Any] = {
            "start": vma.start, "end": vma.end, "prot": vma.prot, "shared": vma.shared,
            "offset": vma.offset, "path": vma.path, "kind": kind, "vmflags": sorted(vma.vmflags),
            "pages": [], "guards": [],
        }
        if kind in ("vdso", "vvar", "vvar_vclock"):
            return rec
        why = refused_vmflag(vma.vmflags)
        if why:
            raise Unsupported(f"{where}: {why}")
        # Guard markers read as EFAULT and are no data: record them, and never read them.
        rec["guards"] = [[s, (e - s) // _PAGE] for s, e in pm.guard_pages(vma.start, vma.end)]
        if kind == "file":
            rec["file"] = file_identity(self.pid, vma)
        if kind != "shmem" and not vma.shared:
            # Private mappings keep the pages the process wrote (copies); shared ones live in their file
            # or object.
            runs, huge = pm.present_and_huge(vma.start, vma.end, anon_only=(kind != "anon"))
            if self.skip:
                runs = subtract(runs, window(self.skip, vma.start, vma.end))
            index = self._place(_Source([(s, e - s) for s, e in runs], readable=bool(vma.prot & abi.PROT_READ)))
            for s, e in runs:
                rec["pages"].append([s, (e - s) // _PAGE, index])
                index += (e - s) // _PAGE
            if kind == "anon":
                # Which of them sit in transparent huge pages, from the same scan (see thp.py).
                hr = huge_runs(huge)
                if hr:
                    rec["huge"] = hr
        if kind in ("shmem", "memfd", "deleted", "sysv"):
            key = (vma.dev, vma.inode, kind)
            obj = objects.get(key)
            if obj is None:
                # The exact name (maps escapes newlines) of a deleted file: it is recreated there if free.
                vpath = procfs.map_file_path(self.pid, vma) if kind == "deleted" else vma.path
                obj = self._plan_object(f"/proc/{self.pid}/map_files/{vma.start:x}-{vma.end:x}", kind,
                                        len(objects), where, vpath, (os.makedev(*vma.dev), vma.inode))
                objects[key] = obj
            rec["object"] = obj["id"]
            if kind == "sysv" and (vma.offset or vma.end - vma.start != -(-obj["size"] // _PAGE) * _PAGE):
                raise Unsupported(f"{where}: part of a System V segment mapped (split by mprotect or munmap) is "
                                  f"not supported")
        return rec

    def _dump_unmapped_memfds(self, objects: dict[tuple[Any, int, str], dict[str, Any]]) -> None:
        """A memfd the task holds only through an fd: saved as an object like a mapped one (the fd code
        finds it by inode).

        An fd to a deleted file that is mapped too needs nothing here: the fd code finds its object by inode
        (dump/files.py, type "object_file")."""
        inodes = {o["inode"] for o in objects.values()}
        fd_dir = f"/proc/{self.pid}/fd"
        for name in sorted(os.listdir(fd_dir), key=int):
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(f"{fd_dir}/{name}")
                if not link.startswith("/memfd:"):
                    continue
                st = os.stat(f"{fd_dir}/{name}")
                if st.st_ino in inodes:
                    continue
                name_part = link[len("/memfd:"):]
                if name_part.endswith(" (deleted)"):
                    name_part = name_part[: -len(" (deleted)")]
                obj = self._plan_object(f"{fd_dir}/{name}", "memfd", len(objects), f"fd {name} ({link})",
                                        "/memfd:" + name_part, (st.st_dev, st.st_ino))
                objects[(st.st_dev, st.st_ino, "memfd")] = obj
                inodes.add(st.st_ino)

    def _plan_object(self, path: str, kind: str, index: int, where: str, vpath: str,
                     key: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """Record an object shared by mappings (shared anonymous memory, a memfd, a deleted file) and place
        its content in the page file, with what makes it that object (memfd name and seals; a deleted file's
        path, mode and owner). The fd stays open until the copy.

        The object is read through map_files (or the fd), skipping holes (SEEK_DATA/SEEK_HOLE), so a sparse
        object stays small. Its runs are [object offset, npages, file page index].

        An object other tasks of the tree hold too (self.shared) is marked with its shared id; its content is
        stored once, by one of them: the others record "content" (that pid) and no runs (docs/IMAGES.md).
        """
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        runs: list[list[int]] = []
        st = os.fstat(fd)
        size = st.st_size
        extra: dict[str, Any] = {}
        if kind == "deleted":
            if not statmod.S_ISREG(st.st_mode):
                raise Unsupported(f"{where}: mapping of a deleted non-regular file is not supported")
            if st.st_nlink:
                raise Unsupported(f"{where}: the deleted file still has {st.st_nlink} other link(s), "
                                  f"which a restore could not reach")
            extra = {"path": vpath, "mode": statmod.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        elif kind == "sysv":
            extra = self._sysv_segment(st.st_ino, where)
        elif kind == "memfd":
            if st.st_blksize > _PAGE:
                raise Unsupported(f"{where}: hugetlb memfds are not supported")
            extra = {"seals": fcntl.fcntl(fd, abi.F_GET_SEALS), "mode": statmod.S_IMODE(st.st_mode),
                     "uid": st.st_uid, "gid": st.st_gid}
        extents: list[tuple[int, int]] = []
        off = 0
        rounded = (size + _PAGE - 1) & ~(_PAGE - 1)
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after off
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            start = data & ~(_PAGE - 1)
            end = min((hole + _PAGE - 1) & ~(_PAGE - 1), rounded)
            extents.append((start, end - start))
            off = end
        name = vpath[len("/memfd:"):] if kind == "memfd" else ""
        shared = self.shared.get(key)
        if shared is not None:
            if kind == "memfd" and extra["seals"] & abi.F_SEAL_FUTURE_WRITE:
                # Made once, sealed by the task making it: the other holders could not map it writable after.
                raise Unsupported(f"{where}: a memfd sealed against future writes (F_SEAL_FUTURE_WRITE) that "
                                  f"several processes hold is not supported")
            extra["shared"] = shared[0]
            if shared[1] != self.pid:
                extra["content"] = shared[1]
                extents = []
        page = self._place(_Source(extents, fd=fd))
        for start, n in extents:
            runs.append([start, n // _PAGE, page])
            page += n // _PAGE
        return {"id": index, "kind": kind, "name": name, "size": size,
                "pages": runs, "inode": st.st_ino, **extra}

    def _sysv_segment(self, shmid: int, where: str) -> dict[str, Any]:
        """What makes a System V segment again: removed (IPC_RMID) while attached, and attached only by the
        dumped processes, each mapping the whole segment. A segment still in the IPC namespace is refused: it
        outlives the dump, and a restore would meet it (or its key) there."""
        if self._sysv is None:
            self._sysv = procfs.read_sysv_shm()
        seg = self._sysv.get(shmid)
        if seg is None:
            raise Unsupported(f"{where}: System V segment {shmid} is not in /proc/sysvipc/shm (another IPC "
                              f"namespace?)")
        if not seg.mode & abi.SHM_DEST:
            raise Unsupported(f"{where}: System V segment {shmid} (key {seg.key:#x}) is still in the IPC "
                              f"namespace; only one removed with IPC_RMID while attached is supported")
        mine = self.attaches.get(shmid, self._own_attaches.get(shmid, 0))
        if seg.nattch != mine:
            raise Unsupported(f"{where}: System V segment {shmid} is attached {seg.nattch} times, {mine} of them "
                              f"by the dumped processes")
        return {"shmid": shmid, "key": seg.key, "mode": seg.mode & 0o777, "uid": seg.uid, "gid": seg.gid}

    def _copy(self) -> None:
        """Fill the page file from every planned source (steps 2-4 of the module docstring)."""
        total = sum(src.nbytes for src in self._sources)
        if not total:
            return
        split = 0 if self.pages.direct or _MAPPED else _split(total)
        with self.pages.extend(total, split=split) as ext:
            lock = threading.Lock()
            failed: list[BaseException] = []

            # With _MAPPED (not the default), the extent is mapped and read into in place (a filesystem that cannot
            # map it shared gets buffered writes from the threads' buffers instead).
            mapped = None
            if not self.pages.direct and _MAPPED:
                with contextlib.suppress(ImageError):
                    mapped = ext.mapping()
            # Buffered writes go from small buffers, which stay in the CPU's cache between the read and the write.
            step = _SMALL if mapped is None and not self.pages.direct else _PIECE
            pieces = _pieces(self._sources, step)

            base = buffer_address(mapped) if mapped is not None else 0
            populate = _POPULATE

            def work(buf: mmap.mmap) -> None:
                view = memoryview(buf if mapped is None else mapped)
                try:
                    while not failed:
                        with lock:
                            piece = next(pieces, None)
                        if piece is None:
                            return
                        off, parts, n = piece
                        if mapped is not None:
                            if populate:
                                # The piece's page-cache folios made and mapped writable in one call instead
                                # of one fault (and page_mkwrite) per folio inside process_vm_readv.
                                populate_write(base + off, n)
                            self._fill(view[off:off + n], mapped, parts, off)
                            ext.filled(off, n)
                            continue
                        self._fill(view[:n], buf, parts)
                        ext.put(off, view[:n])
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                    failed.append(e)
                finally:
                    view.release()

            if mapped is None and not self.pages.direct:
                self._copy_small(ext, total, split)
                self._spot_check(ext.offset)
                return
            nthreads = min(_THREADS, -(-total // step))
            bufs = _buffers(nthreads) if mapped is None else [mapped] * nthreads
            helpers = [threading.Thread(target=work, args=(b,), name="pages-copy") for b in bufs[1:]]
            for t in helpers:
                t.start()
            work(bufs[0])
            for t in helpers:
                t.join()
            if failed:
                raise failed[0]
            self._spot_check(ext.offset)

    def _copy_small(self, ext: Any, total: int, split: int) -> None:
        """Buffered: where it may (dump/selfwrite.py), the task writes its own runs of readable memory into the
        page file, 16 MiB pieces at a time, while a helper thread hashes each piece written (read back from the
        page cache) and copies what the task cannot (objects, unreadable mappings) the old way; else two threads
        copy everything the old way (process_vm_readv into a small buffer, hash, pwrite). A split file's second
        part (from byte `split` of the extent on, 0: none) is all copied the old way, by the helper while the
        task writes the first."""
        plan = list(_pieces(self._sources, selfwrite.PIECE))
        # Per piece: the task's pwritev calls (its readable memory), the rest (extent offset, source, runs), and
        # the pages holding its rseq area (written once it runs no more: the kernel rewrites them as it runs).
        own: dict[int, list[selfwrite.Call]] = {}
        raw: dict[int, list[tuple[int, _Source, list[tuple[int, int]]]]] = {}
        late: dict[int, list[tuple[int, _Source, list[tuple[int, int]]]]] = {}
        hot = [(v & ~(_PAGE - 1), (v + vn + _PAGE - 1) & ~(_PAGE - 1)) for v, vn in self.volatile]

        def readable(i: int, start: int, runs: list[tuple[int, int]], src: _Source) -> None:
            if split and plan[i][0] >= split:  # the second part is ours to copy; the task writes the first
                raw.setdefault(i, []).append((start, src, runs))
            else:
                own.setdefault(i, []).extend(selfwrite.calls_for(i, ext.offset + start, runs))

        for i, (off, parts, _) in enumerate(plan):
            pos = off
            for src, batch in parts:
                if not (src.fd < 0 and src.readable):
                    raw.setdefault(i, []).append((pos, src, batch))
                    pos += sum(n for _, n in batch)
                    continue
                start, runs = pos, []
                for a, n in batch:
                    for sa, sn, is_hot in _cut(a, n, hot):
                        if is_hot:
                            if runs:
                                readable(i, start, runs, src)
                            late.setdefault(i, []).append((pos, src, [(sa, sn)]))
                            start, runs = pos + sn, []
                        else:
                            runs.append((sa, sn))
                        pos += sn
                if runs:
                    readable(i, start, runs, src)
        writer: selfwrite.SelfWriter | None = None
        why = "not asked"
        if self.inject is not None:
            why = "less than the minimum"
            if sum(n for calls in own.values() for _, _, iovs in calls for _, n in iovs) >= selfwrite.MIN:
                why = selfwrite.refusal(self.pid, ext.offset + total) or ""
        if not why:
            ip, journal, batch = self.inject  # type: ignore[misc]
            writer = selfwrite.SelfWriter(RemoteTask(self.pid, ip, journal=journal), self.pages.fileno(), batch)
        cond = threading.Condition()
        # ("copy", off, parts, n): read, hash, write; ("raw", piece, items, 0): read and write unhashed;
        # ("hash", off, None, n): hash from the file.
        tasks: list[tuple[str, int, Any, int]] = []
        closed = [False]
        failed: list[BaseException] = []
        left: dict[int, int] = {}  # piece -> its parts (the task's calls, the raw rest) not written yet

        def old_way(pieces: list[int]) -> None:
            # A split file's two parts taken in turn: two threads copying at once then write different files.
            by_part: tuple[list[tuple[str, int, Any, int]], ...] = ([], [])
            for i in pieces:
                off, parts, _ = plan[i]
                srcs = [_Source(batch, readable=src.readable, fd=src.fd) for src, batch in parts]
                by_part[bool(split) and off >= split].extend(("copy", off + o, sub, m)
                                                             for o, sub, m in _pieces(srcs, _SMALL))
            first, second = by_part
            k = min(len(first), len(second))
            tasks.extend(t for pair in zip(first[:k], second[:k], strict=True) for t in pair)
            tasks.extend(first[k:] + second[k:])

        def finish(i: int) -> None:
            with cond:
                left[i] -= 1
                if not left[i]:
                    tasks.append(("hash", plan[i][0], None, plan[i][2]))
                    cond.notify()

        def work(buf: mmap.mmap) -> None:
            view = memoryview(buf)
            try:
                while not failed:
                    with cond:
                        while not tasks and not closed[0] and not failed:
                            cond.wait()
                        if not tasks:
                            return
                        kind, off, parts, n = tasks.pop(0)
                    if kind == "hash":
                        ext.written(off, n, view[:_SMALL])
                    elif kind == "raw":
                        for pos, src, batch in parts:
                            for o, sub, m in _pieces([_Source(batch, readable=src.readable, fd=src.fd)], _SMALL):
                                self._fill(view[:m], buf, sub)
                                ext.write(pos + o, view[:m])
                        finish(off)
                    else:
                        self._fill(view[:n], buf, parts)
                        ext.put(off, view[:n])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                failed.append(e)
                with cond:
                    cond.notify_all()
            finally:
                view.release()

        opened = False
        try:
            if writer is not None:
                opened = writer.open()
                if not opened:
                    self.selfwrite = f"not used: {writer.failure}"
            # Pieces done in parts (the task's calls, the rest, the rseq area once the task stops): those the task
            # writes in, and those of the second part that hold the rseq area (the kernel rewrites it while the
            # task runs); every other piece is copied whole the old way.
            mine = set(own) | set(late) if opened else set()
            old_way([i for i in range(len(plan)) if i not in mine])
            for i in mine:
                left[i] = (i in own) + (i in raw) + (i in late)
                if i in raw:
                    tasks.append(("raw", i, raw[i], 0))
            bufs = _buffers(_THREADS)
            helper = threading.Thread(target=work, args=(bufs[1],), name="pages-copy")
            helper.start()
            try:
                if opened:
                    assert writer is not None
                    calls = [c for i in sorted(own) for c in own[i]]
                    rest = writer.write(calls, finish, lambda: bool(failed))
                    if rest and not failed:
                        # The rest the old way, unhashed; each such piece is hashed whole from the file after.
                        self._write_rest(ext, rest, bufs[0])
                        for i in sorted({c[0] for c in rest}):
                            finish(i)
                    written = sum(n for c in calls for _, n in c[2]) - sum(n for c in rest for _, n in c[2])
                    self.selfwrite = f"{written} bytes by the task itself" + (
                        f", the rest copied: {writer.failure}" if rest else "")
                    writer.close()
                    writer = None
                    with cond:  # the task runs no more: its rseq area holds still
                        tasks.extend(("raw", i, items, 0) for i, items in late.items() if i in mine)
                        cond.notify_all()
                elif writer is None:
                    self.selfwrite = f"not used: {why}"
            except BaseException as e:
                failed.append(e)  # the helper stops at once: the dump fails
                raise
            finally:
                with cond:
                    closed[0] = True
                    cond.notify_all()
                work(bufs[0])
                helper.join()
        finally:
            if writer is not None:
                selfwrite.close_quietly(writer)
        if failed:
            raise failed[0]

    def _write_rest(self, ext: Any, rest: list[selfwrite.Call], buf: mmap.mmap) -> None:
        """What the task did not write: read here and written (not hashed: whole pieces are, after)."""
        view = memoryview(buf)
        base = buffer_address(buf)
        try:
            for _, pos, iovs in rest:
                for o, parts, m in _pieces([_Source(iovs)], _PIECE):
                    vm.readv(self.pid, [(base, m)], parts[0][1])
                    ext.write(pos - ext.offset + o, view[:m])
        finally:
            view.release()

    def _fill(self, view: memoryview, buf: mmap.mmap, parts: list[tuple[_Source, list[tuple[int, int]]]],
              at: int = 0) -> None:
        """Read one piece's runs, source after source, into `view` (`buf` from byte `at` on)."""
        off = 0
        base = buffer_address(buf) + at
        for src, batch in parts:
            n = sum(length for _, length in batch)
            if src.fd >= 0:
                _pread_file(src.fd, view[off:off + n], batch)
            elif src.readable:
                vm.readv(self.pid, [(base + off, n)], batch)
            else:
                self._read_mem(view[off:off + n], batch)
            off += n

    def _read_mem(self, view: memoryview, batch: list[tuple[int, int]]) -> None:
        """Read task memory through /proc/PID/mem (mappings the task itself may not read, PROT_NONE)."""
        off = 0
        for addr, n in batch:
            got = os.preadv(self.mem, [view[off:off + n]], addr)
            if got != n:
                raise OSError(5, f"short read of memory at {addr + got:#x}")
            off += n

    def _spot_check(self, file_offset: int) -> None:
        """Read a sample of each private run from the task again and compare it with the page file as read
        back (from the device itself when the file is written with O_DIRECT).

        The task is frozen, so its private memory cannot change: a difference means a page went to the wrong
        place of the file (or the file lost it), and the image would restore wrong memory."""
        want: list[tuple[int, int, bool]] = []  # (address, file offset, readable)
        off = file_offset
        for src in self._sources:
            if src.fd < 0:
                pos = off
                for addr, n in src.runs:
                    want += [(addr + i * _PAGE, pos + i * _PAGE, src.readable) for i in _spread(n // _PAGE)]
                    pos += n
            off += src.nbytes
        if not want:
            return
        want.sort(key=lambda w: not w[2])  # readable ones first: one process_vm_readv for all of them
        mem = mmap.mmap(-1, len(want) * _PAGE)
        disk = mmap.mmap(-1, len(want) * _PAGE)  # page-aligned, as an O_DIRECT read needs
        got = memoryview(mem)
        dview = memoryview(disk)
        try:
            nread = sum(1 for w in want if w[2])
            if nread:
                vm.read_into(self.pid, [(a, _PAGE) for a, _, _ in want[:nread]], mem)
            for i, (a, _, _) in enumerate(want[nread:], nread):
                self._read_mem(got[i * _PAGE:(i + 1) * _PAGE], [(a, _PAGE)])
            self.pages.read_back([fo for _, fo, _ in want], disk)
            for i, (a, fo, _) in enumerate(want):
                if got[i * _PAGE:(i + 1) * _PAGE] != dview[i * _PAGE:(i + 1) * _PAGE]:
                    raise DumpError(f"pid {self.pid}: page {a:#x} differs from its copy at {self.pages.where(fo)}; "
                                    f"the image would be wrong", pid=self.pid)
        finally:
            got.release()
            dview.release()
            mem.close()
            disk.close()

    def finish(self) -> None:
        if self.pages.npages != self.next_index:
            raise OSError(5, f"page file holds {self.pages.npages} pages, expected {self.next_index}")
