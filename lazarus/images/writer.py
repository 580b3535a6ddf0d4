"""Writing an image: everything goes to DIR.tmp-XXXX, which becomes DIR only once it is complete and verified."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import xxhash

from lazarus.errors import ImageError
from lazarus.images.format import (
    CALLER_INVENTORY_FIELDS,
    CHUNK_SIZE,
    COW_FILE,
    COW_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    INVENTORY,
    INVENTORY_SCHEMA,
    PAGE_SIZE,
    PARTS_VERSION,
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
    pages_part_name,
    sums_name,
    sums_to_bytes,
    task_name,
    xxh3,
)
from lazarus.images.reader import Image

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def _write_all(fd: int, data: memoryview, fname: str, pos: int | None = None, *, raw: bool = False) -> None:
    """Write all of `data` at the file position (pos None) or at offset `pos`. raw: let OSError through."""
    off = 0
    end = len(data)
    while off < end:
        try:
            n = os.write(fd, data[off:]) if pos is None else os.pwrite(fd, data[off:], pos + off)
        except OSError as e:
            if raw:
                raise
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


# Whether PageExtent.written() hashes through a read-only mapping of the file (else pread into the caller's buffer).
_WRITTEN_MAPPED = True
_WRITTEN_WRITEBACK = True


class PagesWriter:
    """Writes raw page data to pages-PID.img and checksums it per 64 KiB chunk as it goes.

    Two ways in, which may be mixed (data always lands at the end of what is written so far):

    - `extend(n)` (the dump's way): reserves the next n bytes of the file (fallocate) and returns a PageExtent,
      into which any number of threads `put()` whole chunks from their own buffers, in any order. Each put
      hashes the caller's buffer and writes it with pwrite: into the page cache (a dump's default; the
      writeback of each 8 MiB window is started once a put completes it, if the writer has a writeback
      function), or through an O_DIRECT descriptor when the writer is `direct` (`lazarus dump --direct`: from
      the buffer to the device, no page cache filled). An extent starts on a chunk boundary.
    - `append(buf)`: writes a caller's buffer at the end and hashes that buffer (through memoryview slices, no
      copies); a chunk may span several appends: it is fed to a streaming hasher, so the sums equal those of
      the finished file.

        file:  | appended ........ | extent 1 ........ | extent 2 ... | appended ...
                                   ^ on a 64 KiB chunk boundary: extend() refuses anywhere else

    `extend(n, split=k)` puts the extent's bytes from k on (and all that comes after) into a second file,
    pages-PID.1.img (format.PARTS_VERSION), so that two writers can fill the page cache at once: buffered
    writes to one file serialise on its inode lock. Offsets stay those of the whole (the two files in a row);
    the writer sends each write to its file.
    """

    WRITEBACK_STEP = 32 << 20
    WRITEBACK_WINDOW = 8 << 20

    def __init__(self, directory: Path, pid: int, writeback: Callable[[int, int, int], None] | None = None,
                 *, direct: bool = False) -> None:
        self.pid = pid
        # Starting writeback of each written stretch at once lets the disk work while we read the next,
        # so the final fsync finds little left to do (half the time of a dump that fsyncs at the end).
        self._writeback = writeback
        self._flushed = 0
        self.name = pages_name(pid)
        self._path = directory / self.name
        self._sums_path = directory / sums_name(pid)
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ImageError(f"{self.name}: cannot create: {e.strerror}") from e
        # A second descriptor for extents when direct: O_DIRECT needs aligned buffers, which appends need not
        # have. A filesystem that refuses O_DIRECT (EINVAL) gets buffered writes instead.
        self._dfd = -1
        if direct:
            with contextlib.suppress(OSError):
                self._dfd = os.open(self._path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        # The second part (extend's split): its descriptor, and the byte of the whole where it begins.
        self._fd1 = -1
        self.boundary: int | None = None
        self._lock = threading.Lock()
        self._size = 0
        self._sums = array("Q")
        self._partial = xxhash.xxh3_64()
        self._partial_len = 0
        self._closed = False
        self._broken = False  # an extent was left unfilled: nothing more may be written
        self._extent: PageExtent | None = None
        # Whether any data came in through append(): only that is read back and hashed again at commit (see
        # ImageWriter._verify).
        self.appended = False
        self.sums_entry: tuple[int, int] | None = None

    @property
    def npages(self) -> int:
        return self._size // PAGE_SIZE

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        """The page file's (buffered) descriptor: a dump hands it to the task that writes its own pages into it
        (dump/selfwrite.py), then fills in the sums with PageExtent.written()."""
        return self._fd

    @property
    def direct(self) -> bool:
        """Whether extents are written with O_DIRECT (False: the filesystem refused it, or not asked for)."""
        return self._dfd >= 0

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
        self._write_at(mv, self._size)
        self._hash(mv)
        self._size += n
        if self._writeback is not None and self._size - self._flushed >= self.WRITEBACK_STEP:
            self._writeback_range(self._flushed, self._size - self._flushed)
            self._flushed = self._size
        return first

    def extend(self, nbytes: int, split: int = 0) -> PageExtent:
        """Reserve the next `nbytes` (a multiple of 4096) of the file for PageExtent.put(); with `split` (a
        multiple of 64 KiB inside the extent), its bytes from `split` on go to the second part (class docstring).

        Returns: a PageExtent whose first page is file page `extent.first`; close() it once every chunk is in
            (or use it as a context manager).
        Raises: ImageError if the length is not page aligned, the file does not end on a chunk boundary, the
            writer is closed or filling another extent, or the filesystem cannot give the space.
        """
        self._check_writable()
        if nbytes % PAGE_SIZE or nbytes <= 0:
            raise ImageError(f"{self.name}: extent of {nbytes} bytes, not a positive multiple of {PAGE_SIZE}")
        if self._partial_len:
            raise ImageError(f"{self.name}: an extent must start on a {CHUNK_SIZE}-byte chunk boundary, "
                             f"not at byte {self._size}")
        off = self._size
        if split:
            if split % CHUNK_SIZE or not 0 < split < nbytes or self.boundary is not None or self._dfd >= 0:
                raise ImageError(f"{self.name}: cannot split an extent of {nbytes} bytes at {split}")
            part = pages_part_name(self.pid)
            try:
                self._fd1 = os.open(self._path.with_name(part), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                    0o600)
            except OSError as e:
                raise ImageError(f"{part}: cannot create: {e.strerror}") from e
            self.boundary = off + split
        # Blocks allocated up front (unwritten extents: no zeroes are written): O_DIRECT writes into them need not
        # extend the file one by one (which ext4 serialises), and ENOSPC shows here, once.
        for fd, pos, n, name in self._spans(off, nbytes):
            try:
                os.posix_fallocate(fd, pos, n)
            except OSError as e:
                self._broken = bool(split)  # a half-made split: nothing more may be written
                raise ImageError(f"{name}: cannot allocate {n} bytes at {pos}: {e.strerror}") from e
        self._extent = PageExtent(self, off, nbytes)
        return self._extent

    def _spans(self, pos: int, n: int) -> list[tuple[int, int, int, str]]:
        """Bytes [pos, pos+n) of the whole as (fd, offset in that file, length, file name), one per part."""
        b = self.boundary
        if b is None or pos + n <= b:
            return [(self._fd, pos, n, self.name)]
        part = pages_part_name(self.pid)
        if pos >= b:
            return [(self._fd1, pos - b, n, part)]
        return [(self._fd, pos, b - pos, self.name), (self._fd1, 0, pos + n - b, part)]

    def _write_at(self, mv: memoryview, pos: int) -> None:
        at = 0
        for fd, fpos, n, name in self._spans(pos, len(mv)):
            _write_all(fd, mv[at:at + n], name, fpos)
            at += n

    def _writeback_range(self, pos: int, n: int) -> None:
        assert self._writeback is not None
        for fd, fpos, k, _ in self._spans(pos, n):
            self._writeback(fd, fpos, k)

    def where(self, pos: int) -> str:
        """Byte `pos` of the whole, as "byte N of FILE" (the part that holds it)."""
        _, fpos, _, name = self._spans(pos, 1)[0]
        return f"byte {fpos} of {name}"

    def part_sizes(self) -> list[tuple[str, int]]:
        """(file name, size) of each part written, in order."""
        if self.boundary is None:
            return [(self.name, self._size)]
        return [(self.name, self.boundary), (pages_part_name(self.pid), self._size - self.boundary)]

    def _write_extent(self, mv: memoryview, pos: int) -> None:
        """pwrite for PageExtent.put, from any thread: O_DIRECT if possible, else buffered with writeback."""
        dfd = self._dfd
        if dfd >= 0:
            try:
                _write_all(dfd, mv, self.name, pos, raw=True)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise ImageError(f"{self.name}: write failed: {e.strerror}") from e
                # The device wants larger or other alignment than pages: buffered from now on.
                with self._lock:
                    if self._dfd == dfd:
                        self._dfd = -1
                        os.close(dfd)
        self._write_at(mv, pos)
        if self._writeback is not None:
            # Once per WRITEBACK_WINDOW of the file (small puts would make one call each): the window that
            # this put completes, whatever other threads have written of it by now (advisory).
            end = pos + len(mv)
            win = self.WRITEBACK_WINDOW
            if len(mv) >= win or end // win != pos // win:
                start = pos if len(mv) >= win else end // win * win - win
                with contextlib.suppress(OSError):
                    self._writeback_range(start, end - start)

    def _extent_closed(self, ext: PageExtent) -> None:
        self._extent = None
        missing = ext.missing()
        if missing is not None:
            # Never a hole in a finished file: a writer whose extent was not filled is unusable.
            self._broken = True
            raise ImageError(f"{self.name}: extent at byte {ext.offset} closed with chunk {missing} not written")
        sums = ext.sums()
        tail = ext.nbytes % CHUNK_SIZE
        if tail:
            # A partial last chunk goes on in the streaming hasher, as if it had been appended.
            self._sums.extend(sums[:-1])
            self._partial.update(ext.tail())
            self._partial_len = tail
        else:
            self._sums.extend(sums)
        self._size += ext.nbytes

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
            if self._dfd >= 0:
                os.close(self._dfd)
                self._dfd = -1
            if self._fd1 >= 0:
                os.close(self._fd1)
                self._fd1 = -1
            os.close(self._fd)
        except OSError as e:
            raise ImageError(f"{self.name}: close failed: {e.strerror}") from e
        if self._partial_len:
            self._sums.append(self._partial.intdigest())
            self._partial_len = 0
        data = sums_to_bytes(self._sums)
        _write_file(self._sums_path, data)
        self.sums_entry = (len(data), xxh3(data))

    def read_back(self, positions: list[int], buf: Any) -> None:
        """Read the page at each byte offset of `positions` into `buf` (page-aligned, one page per position, in
        order): from the device itself when the writer is direct, so that a spot check sees what the disk
        holds, not a cache."""
        fd, opened = self._fd, -1
        if self._dfd >= 0:
            with contextlib.suppress(OSError):
                fd = opened = os.open(self._path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        mv = memoryview(buf).cast("B")
        try:
            for i, pos in enumerate(positions):
                page = mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                part_fd, fpos, _, name = self._spans(pos, PAGE_SIZE)[0]
                if os.preadv(fd if opened >= 0 else part_fd, [page], fpos) != PAGE_SIZE:
                    raise ImageError(f"{name}: short read at byte {fpos}")
        finally:
            mv.release()
            if opened >= 0:
                os.close(opened)

    def _discard(self) -> None:
        self._extent = None
        if not self._closed:
            self._closed = True
            for fd in (self._dfd, self._fd1, self._fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._dfd = self._fd1 = -1


class PageExtent:
    """The next stretch of pages-PID.img, filled by put() calls from any threads (PagesWriter.extend).

        extent:  | chunk 0 | chunk 1 | chunk 2 | ... | last (may be partial) |
        put(off, buf): off on a chunk boundary; buf whole chunks, or running to the extent's end

    Each put hashes its buffer and writes it; a chunk is put once. close() checks that every chunk is in and
    hands the sums to the writer.

    Without O_DIRECT there is a one-copy way too: `mapping()` maps the extent shared and writable; the caller
    fills a part of it in place (process_vm_readv straight into the page cache, from several threads: page
    faults on a shared file mapping run in parallel where buffered writes to one file do not), then calls
    `filled(off, n)`, which hashes that part from the file's own pages and starts its writeback.
    """

    def __init__(self, writer: PagesWriter, offset: int, nbytes: int) -> None:
        self._writer = writer
        self.offset = offset
        self.nbytes = nbytes
        self.first = offset // PAGE_SIZE
        self._sums: list[int | None] = [None] * ((nbytes + CHUNK_SIZE - 1) // CHUNK_SIZE)
        self._tail = b""
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None

    def put(self, off: int, buf: Any) -> None:
        """Hash and write `buf` at byte `off` of the extent. Thread-safe; blocks for the write.

        Parameters: off -- a multiple of 64 KiB; buf -- page-aligned in memory if the writer is direct (an mmap
            slice), a multiple of 64 KiB long unless it ends exactly at the extent's end.
        Raises: ImageError on misuse (misaligned, beyond the end, a chunk put twice) or a failed write.
        """
        mv = memoryview(buf).cast("B")
        self._record(off, mv)
        self._writer._write_extent(mv, self.offset + off)

    def _record(self, off: int, mv: memoryview) -> None:
        """Check the place of [off, off+len(mv)), hash mv into its chunks' sums."""
        n = len(mv)
        name = self._writer.name
        if off % CHUNK_SIZE or off < 0 or off + n > self.nbytes or (n % CHUNK_SIZE and off + n != self.nbytes):
            raise ImageError(f"{name}: put of {n} bytes at {off} of a {self.nbytes}-byte extent")
        digest = xxhash.xxh3_64_intdigest
        sums = [digest(mv[o:o + CHUNK_SIZE]) for o in range(0, n, CHUNK_SIZE)]
        first = off // CHUNK_SIZE
        with self._lock:
            if any(s is not None for s in self._sums[first:first + len(sums)]):
                raise ImageError(f"{name}: chunk put twice in [{off}, {off + n}) of an extent")
            self._sums[first:first + len(sums)] = sums
            if off + n == self.nbytes and self.nbytes % CHUNK_SIZE:
                self._tail = bytes(mv[n - self.nbytes % CHUNK_SIZE:])

    def mapping(self) -> mmap.mmap:
        """The extent mapped shared and writable (made on first call; unmapped by close)."""
        if self._mm is None:
            if self._writer.boundary is not None:
                raise ImageError(f"{self._writer.name}: a split extent cannot be mapped as one")
            try:
                self._mm = mmap.mmap(self._writer._fd, self.nbytes, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=self.offset)
            except OSError as e:
                raise ImageError(f"{self._writer.name}: cannot map {self.nbytes} bytes at {self.offset}: "
                                 f"{e.strerror}") from e
            if self.nbytes >= 2 << 20:
                # ext4 keeps large folios here: mapped by PMD, 512 MiB takes ~200 faults, not ~3000. Advice only.
                with contextlib.suppress(OSError, AttributeError):
                    self._mm.madvise(mmap.MADV_HUGEPAGE)
        return self._mm

    def filled(self, off: int, n: int) -> None:
        """Bytes [off, off+n) of the mapping hold their data: hash them from the mapping (the file's own pages)
        and start their writeback. Same alignment rules and thread safety as put()."""
        if self._mm is None:
            raise ImageError(f"{self._writer.name}: filled() before mapping()")
        view = memoryview(self._mm)
        try:
            self._record(off, view[off:off + n])
        finally:
            view.release()
        wb = self._writer._writeback
        if wb is not None:
            with contextlib.suppress(OSError):
                wb(self._writer._fd, self.offset + off, n)  # never split (mapping())

    def write(self, off: int, buf: Any) -> None:
        """Write `buf` at byte `off` of the extent without hashing it: part of a stretch someone else wrote the
        rest of (dump/selfwrite.py, a short write continued), whose sums written() takes from the file after."""
        mv = memoryview(buf).cast("B")
        if off < 0 or off + len(mv) > self.nbytes:
            raise ImageError(f"{self._writer.name}: write of {len(mv)} bytes at {off} of a {self.nbytes}-byte extent")
        self._writer._write_at(mv, self.offset + off)

    def written(self, off: int, n: int, buf: Any) -> None:
        """Bytes [off, off+n) of the extent are in the file, written through another descriptor of it (the
        dumped task's own pwritev, dump/selfwrite.py): hash them as the file holds them (read back from the page
        cache through `buf`, a multiple of 64 KiB long) and start their writeback. Same alignment rules and
        thread safety as put(); the bytes must lie in one part of a split file."""
        spans = self._writer._spans(self.offset + off, n)
        if len(spans) > 1:
            raise ImageError(f"{self._writer.name}: written() across the split at byte {self._writer.boundary}")
        fd, start, _, name = spans[0]
        if _WRITTEN_MAPPED:
            # Hashed straight from the page cache through a read-only mapping: no copy into a buffer first.
            try:
                mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
            except OSError:
                mm = None
            if mm is not None:
                view = memoryview(mm)
                try:
                    self._record(off, view)
                finally:
                    view.release()
                    mm.close()
                wb = self._writer._writeback
                if wb is not None and _WRITTEN_WRITEBACK:
                    with contextlib.suppress(OSError):
                        wb(fd, start, n)
                return
        mv = memoryview(buf).cast("B")
        step = len(mv)
        try:
            for o in range(off, off + n, step):
                k = min(step, off + n - o)
                got = 0
                while got < k:
                    r = os.preadv(fd, [mv[got:k]], start + o - off + got)
                    if r <= 0:
                        raise ImageError(f"{name}: short read at byte {start + o - off + got}")
                    got += r
                self._record(o, mv[:k])
        finally:
            mv.release()
        wb = self._writer._writeback
        if wb is not None:
            with contextlib.suppress(OSError):
                wb(fd, start, n)

    def missing(self) -> int | None:
        """The first chunk not put yet, or None."""
        return next((i for i, s in enumerate(self._sums) if s is None), None)

    def sums(self) -> list[int]:
        return [s for s in self._sums if s is not None]

    def tail(self) -> bytes:
        """The bytes of a partial last chunk (b"" if the extent ends on a chunk boundary)."""
        return self._tail

    def _unmap(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
                self._mm.close()
            self._mm = None

    def close(self) -> None:
        """Unmap, hand the extent back to the writer; raises ImageError if a chunk was never put."""
        self._unmap()
        self._writer._extent_closed(self)

    def __enter__(self) -> PageExtent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            # The image is being thrown away: the error in flight says why.
            self._unmap()
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


def _make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A new directory PARENT/PREFIX + 8 random hex digits, mode 0700, as tempfile.mkdtemp makes it (tempfile
    imports random and shutil: ~1.5 ms of a dump command's start)."""
    for _ in range(100):
        path = parent / f"{prefix}{os.urandom(4).hex()}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary directory name", str(parent))


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
        import shutil  # here: shutil with its compression modules is ~1.5 ms of a dump command's start
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
                 writeback: Callable[[int, int, int], None] | None = None, direct: bool = False) -> None:
        """direct: page files' extents are written with O_DIRECT (see PagesWriter)."""
        self._writeback = writeback
        self._direct = direct
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
            self.tmp_dir = _make_tmp_dir(parent, _tmp_prefix(final.name, os.getpid()))
        except OSError as e:
            raise ImageError(f"{final}: cannot create temporary directory: {e.strerror}",
                             path=str(final)) from e
        self._pages: dict[int, PagesWriter] = {}
        # name -> (size, xxh3) of the json and blob files, hashed from the bytes we wrote
        self._files: dict[str, tuple[int, int]] = {}
        self.min_version = FORMAT_VERSION  # raised by a dump that writes what older readers misread (format.py)
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
            pw = self._pages[pid] = PagesWriter(self.tmp_dir, pid, self._writeback,
                                                               direct=self._direct)
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
                for name, size in pw.part_sizes():
                    files[name] = {"size": size, "xxh3": None}
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
        version = max(COW_VERSION if COW_FILE in self._files else FORMAT_VERSION, self.min_version,
                      PARTS_VERSION if any(pw.boundary is not None for pw in self._pages.values()) else 0)
        inv: dict[str, Any] = {"format": FORMAT_NAME, "version": version, "page_chunk": CHUNK_SIZE,
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
        import shutil  # only on failure (see remove_stale_tmp)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


