"""Writing an image: everything goes to DIR.tmp-XXXX, which becomes DIR only once it is complete and verified."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import xxhash

from lazarus.errors import ImageError
from lazarus.images.format import (
    CALLER_INVENTORY_FIELDS,
    CHUNK_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INVENTORY,
    INVENTORY_SCHEMA,
    PAGE_SIZE,
    blob_name,
    canonical_json,
    check_name,
    check_pid,
    check_schema,
    hex64,
    inventory_bytes,
    inventory_self_check,
    json_bytes,
    pages_name,
    sums_name,
    sums_to_bytes,
    task_name,
    xxh3,
)
from lazarus.images.reader import Image


def _write_all(fd: int, data: memoryview, fname: str, pos: int | None = None) -> None:
    """Write all of `data` at the file position (pos None) or at offset `pos`."""
    off = 0
    end = len(data)
    while off < end:
        try:
            n = os.write(fd, data[off:]) if pos is None else os.pwrite(fd, data[off:], pos + off)
        except OSError as e:
            raise ImageError(f"{fname}: write failed: {e.strerror}") from e
        if n <= 0:  # pragma: no cover - os.write raises rather than returning 0 for regular files
            raise ImageError(f"{fname}: write made no progress at byte {off}")
        off += n


def _write_file(path: Path, data: bytes | memoryview) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ImageError(f"{path.name}: written twice") from None
    except OSError as e:
        raise ImageError(f"{path.name}: cannot create: {e.strerror}") from e
    try:
        _write_all(fd, memoryview(data).cast("B"), path.name)
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    """A real directory (not a symlink to one) with nothing in it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths: list[Path], writeback: Callable[[int, int, int], None] | None) -> None:
    """fsync every file of `paths`, having started the writeback of all of them first.

    One fsync after another, each new file's fsync waits for its own data and then a journal commit of its
    own (~4 ms each on the machine measured: 25-50 ms for an image's six files). With every file's data on its
    way first, the first fsync's commit carries the others' block allocations too, and the later fsyncs find
    their data written and their metadata committed."""
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            if writeback is not None:
                with contextlib.suppress(OSError):
                    writeback(fds[-1], 0, 0)  # 0: to the end of the file
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


class PagesWriter:
    """Writes raw page data to pages-PID.img and checksums it per 64 KiB chunk as it goes.

    Two ways in, which may be mixed (data always lands at the end of what is written so far):

    - `extend(n)` (the dump's way, one copy): grows the file by n bytes with fallocate, maps that stretch
      MAP_SHARED and hands out a PageExtent, into which the caller copies the pages (process_vm_readv writes
      the target's pages straight into the page cache). As each part is reported filled, its chunks are
      hashed by reading the file's own pages through that mapping, so the sums describe what the file holds;
      and its writeback is started at once, so that the disk works while the next part is copied.
    - `append(buf)`: writes a caller's buffer and hashes that buffer (through memoryview slices, no copies).

    A chunk may span several appends or extents: it is fed to a streaming hasher, so the sums equal those of
    the finished file.

        file:   [ appended | extent 1 (filled) | extent 2: filled | being filled ... ]
                                                                  ^ size: hashed up to here
    """

    WRITEBACK_STEP = 32 << 20

    def __init__(self, directory: Path, pid: int, writeback: Callable[[int, int, int], None] | None = None) -> None:
        self.pid = pid
        # Starting writeback of each written stretch at once lets the disk work while we read the next,
        # so the final fsync finds little left to do (half the time of a dump that fsyncs at the end).
        self._writeback = writeback
        self._flushed = 0
        self.name = pages_name(pid)
        self._path = directory / self.name
        self._sums_path = directory / sums_name(pid)
        try:
            # Read and write: a shared writable mapping of the file needs both.
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ImageError(f"{self.name}: cannot create: {e.strerror}") from e
        self._size = 0
        self._sums = array("Q")
        self._partial = xxhash.xxh3_64()
        self._partial_len = 0
        self._closed = False
        self._broken = False  # an extent was left unfilled: nothing more may be written
        self._extent: PageExtent | None = None
        # Whether any data came from a caller's buffer (append) rather than being hashed from the file's pages:
        # only such data gains anything from being read back and hashed again (see ImageWriter._verify).
        self.appended = False
        self.sums_entry: tuple[int, int] | None = None

    @property
    def npages(self) -> int:
        return self._size // PAGE_SIZE

    @property
    def size(self) -> int:
        return self._size

    def _check_writable(self) -> None:
        if self._closed:
            raise ImageError(f"{self.name}: append after close")
        if self._broken:
            raise ImageError(f"{self.name}: an extent was left unfilled; the file is unusable")
        if self._extent is not None:
            raise ImageError(f"{self.name}: an extent of {self._extent.nbytes} bytes is still being filled")

    def append(self, buf: Any) -> int:
        """Append whole pages.

        Parameters: buf -- a C-contiguous bytes-like object whose length is a multiple of 4096.
        Returns: the file page index of the first appended page (what the task json records).
        Raises: ImageError if the length is not page aligned, the writer is closed or filling an extent, or
            the write fails.
        """
        self._check_writable()
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n % PAGE_SIZE:
            raise ImageError(f"{self.name}: append of {n} bytes, not a multiple of {PAGE_SIZE}")
        first = self._size // PAGE_SIZE
        if n == 0:
            return first
        self.appended = True
        _write_all(self._fd, mv, self.name, self._size)
        self._hash(mv)
        self._size += n
        self._maybe_writeback()
        return first

    def extend(self, nbytes: int) -> PageExtent:
        """Grow the file by `nbytes` (a multiple of 4096) and map that stretch for the caller to fill in place.

        Returns: a PageExtent; its first page is file page `extent.first`. Fill it, reporting each part done
            with `extent.filled(n)` in order, then `close()` it (or use it as a context manager).
        Raises: ImageError if the length is not page aligned, the writer is closed or filling another extent,
            or the filesystem cannot give the space (ENOSPC is reported here, never as a SIGBUS later).
        """
        self._check_writable()
        if nbytes % PAGE_SIZE or nbytes <= 0:
            raise ImageError(f"{self.name}: extent of {nbytes} bytes, not a positive multiple of {PAGE_SIZE}")
        off = self._size
        try:
            # Blocks allocated up front (unwritten extents: no zeroes are written): writing through the
            # mapping then never fails for want of space, and page faults on it skip the delayed-allocation
            # work (a third less CPU per byte than a growing sparse file here).
            os.posix_fallocate(self._fd, off, nbytes)
        except OSError as e:
            raise ImageError(f"{self.name}: cannot allocate {nbytes} bytes at {off}: {e.strerror}") from e
        try:
            mm = mmap.mmap(self._fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=off)
        except OSError as e:
            raise ImageError(f"{self.name}: cannot map {nbytes} bytes at {off}: {e.strerror}") from e
        if nbytes >= _HUGE:
            # The page cache holds large folios here: mapped by PMD, a 512 MiB extent takes ~200 page faults
            # instead of ~3000. Only advice: refused on some filesystems, which is fine.
            with contextlib.suppress(OSError, AttributeError):
                mm.madvise(mmap.MADV_HUGEPAGE)
        self._extent = PageExtent(self, mm, off, nbytes)
        return self._extent

    def _filled(self, ext: PageExtent, mv: memoryview) -> None:
        """`mv` (the next bytes of `ext`, already in the file) is complete: hash it and count it written."""
        self._hash(mv)
        self._size += len(mv)
        self._maybe_writeback()

    def _extent_closed(self, ext: PageExtent) -> None:
        if self._extent is ext:
            self._extent = None
        if ext.done != ext.nbytes:
            # Never half an extent in a finished file: a writer whose extent was not filled is unusable.
            self._broken = True
            raise ImageError(f"{self.name}: extent at byte {ext.offset} closed with {ext.done} of "
                             f"{ext.nbytes} bytes filled")

    def _maybe_writeback(self) -> None:
        if self._writeback is not None and self._size - self._flushed >= self.WRITEBACK_STEP:
            self._writeback(self._fd, self._flushed, self._size - self._flushed)
            self._flushed = self._size

    def _hash(self, mv: memoryview) -> None:
        off = 0
        n = len(mv)
        if self._partial_len:
            take = min(CHUNK_SIZE - self._partial_len, n)
            self._partial.update(mv[:take])
            self._partial_len += take
            off = take
            if self._partial_len == CHUNK_SIZE:
                self._sums.append(self._partial.intdigest())
                self._partial.reset()
                self._partial_len = 0
        whole_end = off + (n - off) // CHUNK_SIZE * CHUNK_SIZE
        digest = xxhash.xxh3_64_intdigest
        self._sums.extend(digest(mv[o:o + CHUNK_SIZE]) for o in range(off, whole_end, CHUNK_SIZE))
        if whole_end < n:
            self._partial.update(mv[whole_end:])
            self._partial_len = n - whole_end

    def close(self) -> None:
        """Finish the file: the last, partial chunk gets its sum and pages-PID.sums is written."""
        if self._closed:
            return
        if self._extent is not None:
            raise ImageError(f"{self.name}: closed while an extent is being filled")
        if self._broken:
            raise ImageError(f"{self.name}: an extent was left unfilled; the file is unusable")
        self._closed = True
        try:
            os.close(self._fd)
        except OSError as e:
            raise ImageError(f"{self.name}: close failed: {e.strerror}") from e
        if self._partial_len:
            self._sums.append(self._partial.intdigest())
            self._partial_len = 0
        data = sums_to_bytes(self._sums)
        _write_file(self._sums_path, data)
        self.sums_entry = (len(data), xxh3(data))

    def _discard(self) -> None:
        if self._extent is not None:
            with contextlib.suppress(Exception):
                self._extent.release()
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


_HUGE = 2 << 20


class PageExtent:
    """A stretch of pages-PID.img mapped shared and writable, being filled in place (PagesWriter.extend).

    `mmap` is the mapping (its address is where process_vm_readv may write); `view` a memoryview of it. Bytes
    are filled front to back: `filled(n)` says the next n bytes are in, which hashes them from the mapping.
    """

    def __init__(self, writer: PagesWriter, mm: mmap.mmap, offset: int, nbytes: int) -> None:
        self._writer = writer
        self.mmap = mm
        self.view = memoryview(mm)
        self.offset = offset
        self.nbytes = nbytes
        self.first = offset // PAGE_SIZE
        self.done = 0

    def filled(self, n: int) -> None:
        """The next `n` bytes (a multiple of 4096) of the extent hold their data now."""
        if n % PAGE_SIZE or n < 0 or self.done + n > self.nbytes:
            raise ImageError(f"{self._writer.name}: filled {n} bytes at {self.done} of a {self.nbytes}-byte extent")
        self._writer._filled(self, self.view[self.done:self.done + n])
        self.done += n

    def release(self) -> None:
        """Unmap (the data stays in the file)."""
        if self.mmap.closed:
            return
        self.view.release()
        self.mmap.close()

    def close(self) -> None:
        """Unmap and give the writer back; raises ImageError if the extent was not filled completely."""
        self.release()
        self._writer._extent_closed(self)

    def __enter__(self) -> PageExtent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.release()  # the image is being thrown away: the error in flight says why
            if self._writer._extent is self:
                self._writer._extent = None
            self._writer._broken = True


def _start_time(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot, /proc/PID/stat field 22), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _tmp_prefix(name: str, pid: int) -> str:
    # The writer's pid and start time are in the name, so that a later writer can tell a directory left behind
    # by a killed one (remove it) from one still being written (leave it).
    return f"{name}.tmp-{pid}-{_start_time(pid)}-"


def remove_stale_tmp(final: Path) -> list[Path]:
    """Remove DIR.tmp-PID-START-* directories next to `final` whose writer is dead (pid gone, or reused by a
    process started at another time). Returns what was removed. Names of another form are left alone."""
    removed: list[Path] = []
    head = f"{final.name}.tmp-"
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(head) or not entry.is_dir(follow_symlinks=False):
            continue
        parts = entry.name[len(head):].split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid, start = int(parts[0]), int(parts[1])
        if _start_time(pid) == start:
            continue  # its writer still runs
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


class ImageWriter:
    """Builds an image directory atomically.

    Files are written into DIR.tmp-PID-START-XXXX next to DIR (the writer's pid and start time: a later writer to
    the same DIR removes those whose writer died, see remove_stale_tmp); commit() adds the checksums and inventory, syncs,
    verifies the whole image by reading it back, then renames it to DIR. Used as a context manager, an image
    not committed by the end of the block is removed.
    """

    def __init__(self, final_dir: Path | str, *, fsync: bool = True,
                 writeback: Callable[[int, int, int], None] | None = None) -> None:
        self._writeback = writeback
        final = Path(final_dir)
        # An existing empty directory is taken (CRIU users create DIR first): commit() renames the finished
        # image over it, which rename(2) does atomically only while it is still an empty directory.
        self._replace_empty = _is_empty_dir(final)
        if os.path.lexists(final) and not self._replace_empty:
            raise ImageError(f"{final}: already exists" + (" and is not empty" if final.is_dir() else ""),
                             path=str(final))
        parent = final.parent
        if not parent.is_dir():
            raise ImageError(f"{final}: parent directory {parent} does not exist", path=str(final))
        self.final_dir = final
        self._fsync = fsync
        remove_stale_tmp(final)
        try:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name, os.getpid()), dir=parent))
        except OSError as e:
            raise ImageError(f"{final}: cannot create temporary directory: {e.strerror}",
                             path=str(final)) from e
        self._pages: dict[int, PagesWriter] = {}
        # name -> (size, xxh3) of the json and blob files, hashed from the bytes we wrote
        self._files: dict[str, tuple[int, int]] = {}
        self._state = "open"

    # -- writing --------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise ImageError(f"{self.final_dir}: image writer already {self._state}", path=str(self.final_dir))

    def pages(self, pid: int) -> PagesWriter:
        """The PagesWriter of pages-PID.img, created on first use."""
        self._check_open()
        check_pid(pid)
        pw = self._pages.get(pid)
        if pw is None:
            pw = self._pages[pid] = PagesWriter(self.tmp_dir, pid, self._writeback)
        return pw

    def write_json(self, name: str, obj: Any) -> str:
        """Write `obj` as NAME (which must end in .json); returns NAME."""
        self._check_open()
        check_name(name, "json file")
        if not name.endswith(".json") or name == INVENTORY:
            raise ImageError(f"invalid json file name {name!r}")
        try:
            data = json_bytes(obj)
        except (TypeError, ValueError) as e:
            raise ImageError(f"{name}: cannot encode as JSON: {e}") from e
        self._add(name, data)
        return name

    def write_task(self, pid: int, obj: dict[str, Any]) -> str:
        """Write task-PID.json; returns its file name."""
        return self.write_json(task_name(check_pid(pid)), obj)

    def write_blob(self, name: str, data: Any) -> str:
        """Write bytes-like `data` as blob-NAME.img; returns NAME, the key for Image.blob()."""
        self._check_open()
        check_name(name, "blob")
        self._add(blob_name(name), memoryview(data).cast("B"))
        return name

    def _add(self, fname: str, data: bytes | memoryview) -> None:
        if fname in self._files:
            raise ImageError(f"{fname}: written twice")
        _write_file(self.tmp_dir / fname, data)
        self._files[fname] = (len(data), xxh3(data))

    # -- finishing ------------------------------------------------------------------------------------------

    def commit(self, inventory_fields: dict[str, Any]) -> Path:
        """Finish, verify and publish the image; returns DIR.

        Parameters: inventory_fields -- kernel_release, arch, cpu {xcr0, xstate_size}, root_pid, tasks (list of
            pids, each with a task-PID.json written), plus any extra fields to keep in the inventory.
        Raises: ImageError if fields are missing, a file cannot be written, the read-back check fails or DIR
            appeared meanwhile. The temporary directory is removed on failure.
        """
        self._check_open()
        try:
            inv = self._inventory(inventory_fields)
            for pw in self._pages.values():
                pw.close()
            files = inv["files"]
            for name, (size, digest) in self._files.items():
                files[name] = {"size": size, "xxh3": hex64(digest)}
            for pid, pw in self._pages.items():
                assert pw.sums_entry is not None
                files[pw.name] = {"size": pw.size, "xxh3": None}
                files[sums_name(pid)] = {"size": pw.sums_entry[0], "xxh3": hex64(pw.sums_entry[1])}
            inv["self_check"] = inventory_self_check(inv)
            _write_file(self.tmp_dir / INVENTORY, inventory_bytes(inv))
            if self._fsync:
                _fsync_files([self.tmp_dir / name for name in (*files, INVENTORY)], self._writeback)
                _fsync_path(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
            self._verify()
            if os.path.lexists(self.final_dir) and not (self._replace_empty and _is_empty_dir(self.final_dir)):
                raise ImageError(f"{self.final_dir}: already exists", path=str(self.final_dir))
            # Over an empty directory, rename(2) fails (ENOTEMPTY, ENOTDIR) if something else took its place
            # since the check: the image never replaces anything but an empty directory.
            os.rename(self.tmp_dir, self.final_dir)
        except OSError as e:
            self.abort()
            raise ImageError(f"{self.final_dir}: cannot finish the image: {e.strerror}",
                             path=str(self.final_dir)) from e
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        if self._fsync:
            try:
                _fsync_path(self.final_dir.parent, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as e:
                raise ImageError(f"{self.final_dir}: image written, but syncing its parent directory failed: "
                                 f"{e.strerror}", path=str(self.final_dir)) from e
        return self.final_dir

    def _inventory(self, fields: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in CALLER_INVENTORY_FIELDS if k not in fields]
        if missing:
            raise ImageError(f"{INVENTORY}: missing field '{missing[0]}'")
        reserved = {"format", "version", "page_chunk", "files", "self_check"} & fields.keys()
        if reserved:
            raise ImageError(f"{INVENTORY}: field '{sorted(reserved)[0]}' is set by the writer")
        try:
            canonical_json(fields)
        except (TypeError, ValueError) as e:
            raise ImageError(f"{INVENTORY}: cannot encode as JSON: {e}") from e
        inv: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "page_chunk": CHUNK_SIZE,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               **fields, "files": {}, "self_check": ""}
        check_schema(inv, INVENTORY_SCHEMA, INVENTORY)
        tasks = inv["tasks"]
        for pid in tasks:
            check_pid(pid)
            if task_name(pid) not in self._files:
                raise ImageError(f"{task_name(pid)}: not written, but pid {pid} is in the task list")
        if len(set(tasks)) != len(tasks):
            raise ImageError(f"{INVENTORY}: duplicate pids in 'tasks'")
        if inv["root_pid"] not in tasks:
            raise ImageError(f"{INVENTORY}: root_pid {inv['root_pid']} is not in 'tasks'")
        for pid in self._pages:
            if pid not in tasks:
                raise ImageError(f"{pages_name(pid)}: pid {pid} is not in 'tasks'")
        return inv

    def _verify(self) -> None:
        # Reading back through the reader proves the image opens exactly as a restore will see it: the
        # inventory, the checksum of every json, blob and sums file, every file's size. Page data is hashed again
        # only where it was hashed from a caller's buffer (append): the sums of extents were computed by reading
        # the page file's own pages after they were filled, so hashing those pages again would read the same
        # page cache and prove nothing more (fsync has already reported any write error).
        with Image.open(self.tmp_dir) as img:
            for pid, pw in self._pages.items():
                if pw.appended:
                    img.verify_pages(pid)

    def abort(self) -> None:
        """Throw the unfinished image away. Does nothing once committed or aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        for pw in self._pages.values():
            pw._discard()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


