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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat as statmod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lazarus.dump.sharing import subtract
from lazarus.errors import Unsupported
from lazarus.images.mm import refused_vmflag
from lazarus.kernel import abi, procfs, vm
from lazarus.kernel.pagemap import Pagemap
from lazarus.kernel.procfs import Vma

SPECIAL = {"[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar_vclock"}
_READ_CHUNK = 16 << 20


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
        raise Unsupported(f"{where}: System V shared memory is not supported")
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


class MemoryDumper:
    """Reads every mapping of a stopped task into the image."""

    def __init__(self, pid: int, pages_writer: Any, write_blob: Any) -> None:
        self.pid = pid
        self.pages = pages_writer
        self.write_blob = write_blob
        self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        self.bufs = (bytearray(_READ_CHUNK), bytearray(_READ_CHUNK))
        self.cur = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pages-writer")
        self.busy: list[Future[int] | None] = [None, None]
        self.next_index = pages_writer.npages
        self.total_pages = 0
        # Copy-on-write runs its parent gives it back at restore (dump/cow.py): stored in the owner's file only.
        self.skip: list[tuple[int, int]] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.finish()
        self.pool.shutdown(wait=True)
        os.close(self.mem)

    def dump(self, vmas: list[Vma]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        objects: dict[tuple[Any, int, str], dict[str, Any]] = {}
        with Pagemap(self.pid) as pm:
            for vma in vmas:
                kind = vma_kind(vma)
                if kind == "vsyscall":
                    continue
                out.append(self._dump_vma(pm, vma, kind, objects))
        self._dump_unmapped_memfds(objects)
        self.finish()
        return out, list(objects.values())

    def _dump_vma(self, pm: Pagemap, vma: Vma, kind: str,
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
        rec["guards"] = [[s, (e - s) // abi.PAGE_SIZE] for s, e in pm.guard_pages(vma.start, vma.end)]
        if kind == "file":
            rec["file"] = file_identity(self.pid, vma)
        if kind != "shmem" and not vma.shared:
            # Private mappings keep the pages the process wrote (copies); shared ones live in their file
            # or object.
            runs = pm.present_pages(vma.start, vma.end, anon_only=(kind != "anon"))
            if self.skip:
                runs = subtract(runs, self.skip)
            rec["pages"] = self._read_runs(runs, readable=bool(vma.prot & abi.PROT_READ))
        if kind in ("shmem", "memfd", "deleted"):
            key = (vma.dev, vma.inode, kind)
            obj = objects.get(key)
            if obj is None:
                # The exact name (maps escapes newlines) of a deleted file: it is recreated there if free.
                vpath = procfs.map_file_path(self.pid, vma) if kind == "deleted" else vma.path
                obj = self._dump_object(f"/proc/{self.pid}/map_files/{vma.start:x}-{vma.end:x}", kind,
                                        len(objects), where, vpath)
                objects[key] = obj
            rec["object"] = obj["id"]
        return rec

    def _dump_unmapped_memfds(self, objects: dict[tuple[Any, int, str], dict[str, Any]]) -> None:
        """A memfd the task holds only through an fd: saved as an object like a mapped one (the fd code
        finds it by inode).

        Also refuses an fd to a deleted file that is mapped too: the fd code recreates its own copy, and the
        two would come back as two inodes (MemoryState.recreated is where it could find the mapped one)."""
        inodes = {o["inode"] for o in objects.values()}
        deleted = {(k[0], o["inode"]) for k, o in objects.items() if o["kind"] == "deleted"}
        fd_dir = f"/proc/{self.pid}/fd"
        for name in sorted(os.listdir(fd_dir), key=int):
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(f"{fd_dir}/{name}")
                if deleted and link.endswith(" (deleted)") and not link.startswith("/memfd:"):
                    st = os.stat(f"{fd_dir}/{name}")
                    if (_dev_pair(st.st_dev), st.st_ino) in deleted:
                        raise Unsupported(f"fd {name} ({link}): a deleted file that is also mapped is not "
                                          f"supported as an open file yet")
                if not link.startswith("/memfd:"):
                    continue
                st = os.stat(f"{fd_dir}/{name}")
                if st.st_ino in inodes:
                    continue
                name_part = link[len("/memfd:"):]
                if name_part.endswith(" (deleted)"):
                    name_part = name_part[: -len(" (deleted)")]
                obj = self._dump_object(f"{fd_dir}/{name}", "memfd", len(objects), f"fd {name} ({link})",
                                        "/memfd:" + name_part)
                objects[(st.st_dev, st.st_ino, "memfd")] = obj
                inodes.add(st.st_ino)

    def _dump_object(self, path: str, kind: str, index: int, where: str, vpath: str) -> dict[str, Any]:
        """Save the content of an object shared by mappings (shared anonymous memory, a memfd, a deleted
        file) into the page file, with what makes it that object (memfd name and seals; a deleted file's
        path, mode and owner).

        The object is read through map_files (or the fd), skipping holes (SEEK_DATA/SEEK_HOLE), so a sparse
        object stays small. Its runs are [object offset, npages, file page index].
        """
        fd = os.open(path, os.O_RDONLY)
        runs: list[list[int]] = []
        try:
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
            elif kind == "memfd":
                if st.st_blksize > abi.PAGE_SIZE:
                    raise Unsupported(f"{where}: hugetlb memfds are not supported")
                extra = {"seals": fcntl.fcntl(fd, abi.F_GET_SEALS), "mode": statmod.S_IMODE(st.st_mode),
                         "uid": st.st_uid, "gid": st.st_gid}
            off = 0
            while off < size:
                try:
                    data = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:
                    break  # ENXIO: no data after off
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
                start = data & ~(abi.PAGE_SIZE - 1)
                end = min((hole + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1), (size + abi.PAGE_SIZE - 1)
                          & ~(abi.PAGE_SIZE - 1))
                runs.append([start, (end - start) // abi.PAGE_SIZE, self.next_index])
                self.next_index += (end - start) // abi.PAGE_SIZE
                pos = start
                while pos < end:
                    n = min(end - pos, _READ_CHUNK)
                    self._flush([(pos, n)], n, reader=lambda view, batch, fd=fd: _pread_file(fd, view, batch))
                    pos += n
                off = end
        finally:
            os.close(fd)
        self.total_pages += sum(r[1] for r in runs)
        name = vpath[len("/memfd:"):] if kind == "memfd" else ""
        return {"id": index, "kind": kind, "name": name, "size": size, "pages": runs, "inode": st.st_ino,
                **extra}

    def _read_runs(self, runs: list[tuple[int, int]], readable: bool) -> list[list[int]]:
        """Copy the pages of `runs` ([start, end) byte ranges) into the page file; returns [vaddr, n, index].

        Runs are gathered into buffer-sized batches read with one process_vm_readv each (or /proc/pid/mem
        for mappings the task cannot read itself); a writer thread appends one buffer to the page file while
        the next is being read.
        """
        out: list[list[int]] = []
        batch: list[tuple[int, int]] = []
        filled = 0
        for start, end in runs:
            addr = start
            out.append([start, (end - start) // abi.PAGE_SIZE, self.next_index])
            self.next_index += (end - start) // abi.PAGE_SIZE
            while addr < end:
                n = min(end - addr, _READ_CHUNK - filled)
                batch.append((addr, n))
                filled += n
                addr += n
                if filled == _READ_CHUNK:
                    self._flush(batch, filled, readable)
                    batch, filled = [], 0
        if batch:
            self._flush(batch, filled, readable)
        self.total_pages += sum(n for _, n, _ in out)
        return out

    def _flush(self, batch: list[tuple[int, int]], nbytes: int, readable: bool = True,
               reader: Any = None) -> None:
        buf = self.bufs[self.cur]
        busy = self.busy[self.cur]
        if busy is not None:
            busy.result()  # the writer is done with this buffer: it may be filled again
        view = memoryview(buf)[:nbytes]
        if reader is not None:
            reader(view, batch)
        elif readable:
            vm.read_into(self.pid, batch, buf)
        else:
            off = 0
            for addr, n in batch:
                got = os.preadv(self.mem, [view[off:off + n]], addr)
                if got != n:
                    raise OSError(5, f"short read of memory at {addr + got:#x}")
                off += n
        # Appends stay in order: the pool has a single thread.
        self.busy[self.cur] = self.pool.submit(self.pages.append, view)
        self.cur ^= 1

    def finish(self) -> None:
        for i, fut in enumerate(self.busy):
            if fut is not None:
                fut.result()
                self.busy[i] = None
        if self.pages.npages != self.next_index:
            raise OSError(5, f"page file holds {self.pages.npages} pages, expected {self.next_index}")
