"""Opening and validating an image; page data through read-only mmaps whose addresses go to UFFDIO_COPY."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import stat
import sys
import time
from array import array
from types import TracebackType

import xxhash

from lazarus.errors import ImageError
from lazarus.images.format import (
    CHUNK_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INVENTORY,
    INVENTORY_SCHEMA,
    PAGE_SIZE,
    PAGES_PER_CHUNK,
    PARTS_VERSION,
    READABLE_VERSIONS,
    TASK_SCHEMA,
    blob_name,
    check_name,
    check_schema,
    hex64,
    inventory_bytes,
    inventory_self_check,
    is_own_file,
    json_type_name,
    nchunks,
    pages_name,
    pages_parts,
    sums_from_bytes,
    sums_name,
    task_name,
)
from lazarus.images.tree import Tree, parse_tree

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

_TASK_RE = re.compile(r"task-([0-9]+)\.json")
_PAGES_RE = re.compile(r"pages-([0-9]+)(\.1)?\.img")
_SUMS_RE = re.compile(r"pages-([0-9]+)\.sums")
_HEX64_RE = re.compile(r"[0-9a-f]{16}")
_READ_SIZE = 1 << 20


def validate_task(obj: object, name: str) -> None:
    """Check the top level of a task-PID.json against TASK_SCHEMA (extend the schema, not this function).

    Raises: ImageError "task-42.json: field 'core' must be an object, not an array" and the like.
    """
    check_schema(obj, TASK_SCHEMA, name)
    m = _TASK_RE.fullmatch(name)
    assert isinstance(obj, dict)
    if m and obj["pid"] != int(m.group(1)):
        raise ImageError(f"{name}: field 'pid' is {obj['pid']}, expected {m.group(1)}")


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _parse_json(fname: str, data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ImageError(f"{fname}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ImageError(f"{fname}: not valid JSON ({e})") from None


def _chunk_error(name: str, chunk: int, size: int) -> ImageError:
    start = chunk * CHUNK_SIZE
    end = min(start + CHUNK_SIZE, size) - 1
    return ImageError(f"{name}: checksum mismatch in chunk {chunk} (bytes {start}-{end})")


def _size_error(name: str, size: int, expected: int) -> ImageError:
    if size < expected:
        return ImageError(f"{name}: truncated at byte {size}, expected {expected}")
    return ImageError(f"{name}: {size} bytes, expected {expected} (trailing data)")


_MADV_POPULATE_READ = 22  # include/uapi/asm-generic/mman-common.h (Linux 5.14)


def _open_part(directory: str, name: str) -> int:
    try:
        return os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{name}: missing") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open: {e.strerror}") from e


def _map_parts(fds: list[int], sizes: list[int], total: int) -> mmap.mmap:
    """One private mapping of `total` bytes whose stretches are the parts, in order: an anonymous reservation
    (the mmap object, which unmaps all of it when closed), each part mapped over its stretch (MAP_FIXED)."""
    # The one place images/ needs the kernel layer to read (mmap cannot place a mapping): only for split files.
    from lazarus.kernel.syscall import buffer_address, map_file_at

    mm = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        base, at = buffer_address(mm), 0
        for fd, n in zip(fds, sizes, strict=True):
            if n:
                map_file_at(base + at, n, fd)
            at += n
    except BaseException:  # a KernelError is an OSError: PageFile names the file
        mm.close()
        raise
    return mm


class PageFile:
    """pages-PID.img mapped read-only (copy-on-write and never written, see address()).

    `address(i)` is the address of file page i inside this process, to hand to UFFDIO_COPY; `view(i, n)` the
    same bytes as a memoryview. Chunks are verified against pages-PID.sums on request; which ones already passed
    is kept in a bitmap shared with the Image, so a chunk is hashed at most once.
    """

    def __init__(self, directory: str | None, pid: int, parts: list[tuple[str, int]], sums: array,
                 verified: bytearray) -> None:
        """Map the task's page file, DIRECTORY/pages-PID.img, each part (name, expected size) in order: a split
        one (format.PARTS_VERSION) is mapped as one contiguous run of pages. directory None or no parts stands
        for a task without page data (no file, nothing mapped)."""
        self.pid = pid
        self.name = pages_name(pid)
        self.size = expected_size = sum(n for _, n in parts)
        self.npages = expected_size // PAGE_SIZE
        self._sums = sums
        self._verified = verified
        self._base: int | None = None
        self._mm: mmap.mmap | None = None
        self._mv: memoryview | None = None
        self._fd = -1
        # (fd, name, size) of a second part: checked like the first (check_size)
        self._more: list[tuple[int, str, int]] = []
        self._size_checked = 0.0
        self.closed = False
        if directory is None or not parts:
            assert expected_size == 0
            return
        fds: list[int] = []
        try:
            for name, want in parts:
                fd = _open_part(directory, name)
                fds.append(fd)
                size = os.fstat(fd).st_size
                if size != want:
                    raise _size_error(name, size, want)
            if len(parts) == 1 and expected_size:
                # MAP_PRIVATE + PROT_WRITE only so that the writable-buffer address helper accepts the mapping;
                # nothing writes to it, so no page is ever copied and the file is never modified.
                self._mm = mmap.mmap(fds[0], expected_size, flags=mmap.MAP_PRIVATE,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            elif expected_size:
                self._mm = _map_parts(fds, [n for _, n in parts], expected_size)
            if self._mm is not None:
                self._mv = memoryview(self._mm)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise ImageError(f"{self.name}: cannot map: {e.strerror}") from e
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # Kept open to notice a page file truncated under us before reading a mapped page past its new end
        # (which would kill this process with SIGBUS instead of reporting the loss).
        self._fd = fds[0]
        self._more = [(fd, name, n) for fd, (name, n) in zip(fds[1:], parts[1:], strict=True)]

    def populate(self, first: int = 0, n: int | None = None) -> None:
        """Map file pages [first, first+n) (default: all) in at once, for a reader about to read them all: one
        madvise instead of a page fault per few pages (~10 ms per 64 MiB here). Best effort: a kernel without
        MADV_POPULATE_READ (before 5.14) faults them in as they are read."""
        if self._mm is None:
            return
        n = self.npages - first if n is None else n
        with contextlib.suppress(OSError, ValueError):
            self._mm.madvise(_MADV_POPULATE_READ, first * PAGE_SIZE, n * PAGE_SIZE)

    def _check(self, first: int, n: int) -> memoryview:
        if self._mv is None:
            if self.closed:
                raise ImageError(f"{self.name}: used after close")
            if n == 0 and first == 0:
                return memoryview(b"")
        if first < 0 or n < 0 or first + n > self.npages:
            raise ImageError(f"{self.name}: pages [{first}, {first + n}) beyond end of file ({self.npages} pages)")
        assert self._mv is not None
        return self._mv

    def check_range(self, first: int, n: int) -> None:
        """Raise ImageError unless file pages [first, first+n) exist (for validating a task's page lists)."""
        self._check(first, n)

    def address(self, file_page_index: int) -> int:
        """Address of file page `file_page_index` in this process's mapping; valid until close()."""
        self._check(file_page_index, 1)
        if self._base is None:
            # The only kernel-layer dependency of images/, imported here so that reading an image
            # elsewhere (show, verify) does not load ctypes.
            from lazarus.kernel.syscall import buffer_address

            self._base = buffer_address(self._mm)
        return self._base + file_page_index * PAGE_SIZE

    def view(self, first: int, n: int) -> memoryview:
        """The bytes of file pages [first, first+n), without copying; release it before close() to unmap."""
        mv = self._check(first, n)
        return mv[first * PAGE_SIZE:(first + n) * PAGE_SIZE]

    @property
    def identity(self) -> tuple[int, int, int, int] | None:
        """(st_dev, st_ino, size, xxh3 of the chunk sums) of the file mapped here: two PageFiles with the same
        identity hold the same data, so one mapping can serve both (lazy/pagefiles.py). None when nothing is
        mapped (a task without page data, or closed)."""
        if self._fd < 0:
            return None
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino, self.size, xxhash.xxh3_64_intdigest(self._sums.tobytes())

    # -- verification -----------------------------------------------------------------------------------------

    def is_verified(self, chunk: int) -> bool:
        if not 0 <= chunk < len(self._sums):
            return False
        return bool(self._verified[chunk >> 3] & (1 << (chunk & 7)))

    def verify_chunk(self, chunk: int) -> None:
        """Check 64 KiB chunk `chunk` against its sum, once. Raises ImageError on a mismatch."""
        if not 0 <= chunk < len(self._sums):
            raise ImageError(f"{self.name}: chunk {chunk} beyond end of file ({len(self._sums)} chunks)")
        if self._verified[chunk >> 3] & (1 << (chunk & 7)):
            return
        mv = self._check(0, 0)
        start = chunk * CHUNK_SIZE
        if self._fd >= 0 and time.monotonic() - self._size_checked > 0.002:
            # At most every 2 ms: an fstat per 64 KiB chunk cost the lazy server up to 10% of its rate.
            self.check_size()
        if xxhash.xxh3_64_intdigest(mv[start:start + CHUNK_SIZE]) != self._sums[chunk]:
            raise _chunk_error(self.name, chunk, self.size)
        self._verified[chunk >> 3] |= 1 << (chunk & 7)

    def check_size(self) -> None:
        """Raise ImageError if the file is now shorter than when it was opened (cut short while mapped)."""
        if self._fd < 0:
            return
        first = self.size - sum(n for _, _, n in self._more)
        for fd, name, want in ((self._fd, self.name, first), *self._more):
            try:
                now = os.fstat(fd).st_size
            except OSError as e:
                raise ImageError(f"{name}: cannot stat: {e.strerror}") from e
            if now < want:
                raise ImageError(f"{name}: truncated to {now} bytes while in use, expected {want}")
        self._size_checked = time.monotonic()

    @property
    def nchunks(self) -> int:
        return len(self._sums)

    def chunk_matches(self, chunk: int) -> bool:
        """Hash chunk `chunk` and compare it with its sum, remembering nothing (for a verifier elsewhere)."""
        mv = self._check(0, 0)
        start = chunk * CHUNK_SIZE
        return xxhash.xxh3_64_intdigest(mv[start:start + CHUNK_SIZE]) == self._sums[chunk]

    def verify_chunk_for(self, page_index: int) -> None:
        """Verify the chunk holding file page `page_index` (the lazy server calls this before serving it)."""
        self._check(page_index, 1)
        self.verify_chunk(page_index // PAGES_PER_CHUNK)

    def verify_range(self, first: int, n: int) -> None:
        """Verify every chunk touching file pages [first, first+n)."""
        self._check(first, n)
        if n:
            for chunk in range(first // PAGES_PER_CHUNK, (first + n - 1) // PAGES_PER_CHUNK + 1):
                self.verify_chunk(chunk)

    def verify_all(self) -> None:
        """Verify every chunk not yet verified, streaming through the mapping."""
        total = nchunks(self.size)
        if total == 0:
            return
        mv = self._check(0, 0)
        sums = self._sums
        verified = self._verified
        digest = xxhash.xxh3_64_intdigest
        for byte_index in range(len(verified)):
            if verified[byte_index] == 0xFF:
                continue
            bits = verified[byte_index]
            for chunk in range(byte_index * 8, min(byte_index * 8 + 8, total)):
                bit = 1 << (chunk & 7)
                if bits & bit:
                    continue
                start = chunk * CHUNK_SIZE
                if digest(mv[start:start + CHUNK_SIZE]) != sums[chunk]:
                    raise _chunk_error(self.name, chunk, self.size)
                bits |= bit
            verified[byte_index] = bits

    def close(self) -> None:
        """Unmap. If views are still alive the mapping lives on until the last of them is released."""
        self.closed = True
        self._base = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd, _, _ in self._more:
            os.close(fd)
        self._more = []
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._mm is not None:
            # An outstanding view keeps the mapping alive; it is unmapped when the last view goes.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> PageFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Image:
    """A validated image directory. Use Image.open(); close() (or `with`) unmaps any page files."""

    def __init__(self, path: str, inventory: dict[str, Any], jsons: dict[str, Any],
                 sums: dict[int, array]) -> None:
        self.path = path
        self.inventory = inventory
        self.files: dict[str, dict[str, Any]] = inventory["files"]
        self.tasks: list[int] = list(inventory["tasks"])
        self.root_pid: int = inventory["root_pid"]
        self.tree: Tree = parse_tree(inventory)
        self._jsons = jsons
        self._sums = sums
        self._verified = {pid: bytearray((len(s) + 7) // 8) for pid, s in sums.items()}
        self._page_files: dict[int, PageFile] = {}

    # -- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Image:
        """Open and validate an image: inventory, presence and size of every file, checksums of all but page
        data, task json schemas. Page data is checked by verify_pages() or PageFile.verify_*.

        Raises: ImageError, one line naming the file and what is wrong with it.
        """
        path = os.fspath(path)  # a str: the restore command imports no pathlib (cli._RESTORE_VALUES)
        try:
            return cls._open(path)
        except ImageError as e:
            if e.path is None:
                e.path = str(path)
            raise

    @classmethod
    def _open(cls, path: str) -> Image:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageError(f"{path}: no such image directory") from None
        except OSError as e:
            raise ImageError(f"{path}: cannot access: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{path}: not a directory")
        try:
            present = set(os.listdir(path))
        except OSError as e:
            raise ImageError(f"{path}: cannot list: {e.strerror}") from e
        if not present:
            raise ImageError(f"{path}: empty directory, not an image")
        if INVENTORY not in present:
            raise ImageError(f"{INVENTORY}: missing")

        inv = cls._read_inventory(path)
        files: dict[str, dict[str, Any]] = inv["files"]
        for name in sorted(present - files.keys() - {INVENTORY}):
            if is_own_file(name):
                raise ImageError(f"{name}: not listed in {INVENTORY}")

        jsons: dict[str, Any] = {}
        sums: dict[int, array] = {}
        for name in sorted(files):
            entry, where = files[name], os.path.join(path, name)
            if entry["xxh3"] is None:
                _stat_size(where, name, entry["size"])
                continue
            m = _SUMS_RE.fullmatch(name)
            if m is not None and entry["size"] % 8 == 0:
                sums[int(m.group(1))] = _read_sums(where, name, entry["size"], entry["xxh3"])
                continue
            data = _read_checked(where, name, entry["size"], entry["xxh3"], keep=name.endswith(".json")
                                 or m is not None)
            if name.endswith(".json"):
                jsons[name] = _parse_json(name, data)
            elif m is not None:
                sums[int(m.group(1))] = sums_from_bytes(data)

        for pid in inv["tasks"]:
            validate_task(jsons[task_name(pid)], task_name(pid))
        for pid, s in sums.items():
            size = sum(n for _, n in pages_parts(files, pid))
            if len(s) != nchunks(size):
                raise ImageError(f"{sums_name(pid)}: {len(s)} chunk sums, {pages_name(pid)} has "
                                 f"{nchunks(size)} chunks")
        return cls(path, inv, jsons, sums)

    @staticmethod
    def _read_inventory(path: str) -> dict[str, Any]:
        try:
            with open(os.path.join(path, INVENTORY), "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ImageError(f"{INVENTORY}: cannot read: {e.strerror}") from e
        inv = _parse_json(INVENTORY, raw)
        if not isinstance(inv, dict):
            raise ImageError(f"{INVENTORY}: top level must be an object, not {json_type_name(inv)}")
        if inv.get("format") != FORMAT_NAME:
            raise ImageError(f"{INVENTORY}: format {inv.get('format')!r}, not {FORMAT_NAME!r}")
        version = inv.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            newer = " (written by a newer lazarus)" if type(version) is int and version > FORMAT_VERSION else ""
            raise ImageError(f"{INVENTORY}: format version {version}{newer}, this lazarus reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        # The inventory cannot list its own checksum, so it carries one of its canonical form; the byte-for-byte
        # comparison then catches what the canonical form hides (whitespace, key order, duplicate keys).
        if not isinstance(inv.get("self_check"), str) or inv["self_check"] != inventory_self_check(inv):
            raise ImageError(f"{INVENTORY}: checksum mismatch")
        if raw != inventory_bytes(inv):
            raise ImageError(f"{INVENTORY}: checksum mismatch (bytes differ from the canonical form)")

        check_schema(inv, INVENTORY_SCHEMA, INVENTORY)
        if inv["page_chunk"] != CHUNK_SIZE:
            raise ImageError(f"{INVENTORY}: page_chunk {inv['page_chunk']}, this lazarus uses {CHUNK_SIZE}")
        tasks = inv["tasks"]
        if not tasks:
            raise ImageError(f"{INVENTORY}: field 'tasks' is empty")
        for pid in tasks:
            if type(pid) is not int or pid <= 0:
                raise ImageError(f"{INVENTORY}: field 'tasks' holds {pid!r}, not a pid")
        if len(set(tasks)) != len(tasks):
            raise ImageError(f"{INVENTORY}: field 'tasks' lists a pid twice")
        if inv["root_pid"] not in tasks:
            raise ImageError(f"{INVENTORY}: root_pid {inv['root_pid']} is not in 'tasks'")
        _check_files(inv["files"], set(tasks), inv["version"])
        parse_tree(inv)
        return inv

    # -- metadata -------------------------------------------------------------------------------------------

    def task(self, pid: int) -> dict[str, Any]:
        """The parsed task-PID.json (validated at open)."""
        name = task_name(pid)
        if pid not in self.tasks:
            raise ImageError(f"{name}: pid {pid} is not in this image", path=str(self.path))
        obj: dict[str, Any] = self._jsons[name]
        return obj

    def json(self, name: str) -> Any:
        """Any other parsed json file of the image, by file name."""
        if name not in self._jsons:
            raise ImageError(f"{name}: not in this image", path=str(self.path))
        return self._jsons[name]

    def blob(self, name: str) -> bytes:
        """The contents of blob-NAME.img, checked again against its checksum as it is read."""
        fname = blob_name(check_name(name, "blob"))
        entry = self.files.get(fname)
        if entry is None:
            raise ImageError(f"{fname}: not in this image", path=str(self.path))
        try:
            return _read_checked(os.path.join(self.path, fname), fname, entry["size"], entry["xxh3"], keep=True)
        except ImageError as e:
            e.path = str(self.path)
            raise

    def check_machine(self, kernel_release: str, xcr0: int, xstate_size: int) -> None:
        """Refuse an image made on another kernel or on a CPU whose XSTATE layout differs from this one."""
        inv = self.inventory
        if inv["kernel_release"] != kernel_release:
            raise ImageError(f"image made on kernel {inv['kernel_release']}, this is {kernel_release}",
                             path=str(self.path))
        cpu = inv["cpu"]
        if cpu["xcr0"] != xcr0 or cpu["xstate_size"] != xstate_size:
            raise ImageError(f"image CPU XSTATE layout (xcr0={cpu['xcr0']:#x}, size={cpu['xstate_size']}) "
                             f"differs from this CPU (xcr0={xcr0:#x}, size={xstate_size})", path=str(self.path))

    # -- page data ------------------------------------------------------------------------------------------

    def has_pages(self, pid: int) -> bool:
        return pages_name(pid) in self.files

    def page_file(self, pid: int) -> PageFile:
        """The mapped pages-PID.img (an empty one if the task has no page data); shared until closed."""
        pf = self._page_files.get(pid)
        if pf is not None and not pf.closed:
            return pf
        if pid not in self.tasks:
            raise ImageError(f"{pages_name(pid)}: pid {pid} is not in this image", path=str(self.path))
        try:
            if self.has_pages(pid):
                pf = PageFile(self.path, pid, pages_parts(self.files, pid), self._sums[pid], self._verified[pid])
            else:
                pf = PageFile(None, pid, [], array("Q"), bytearray())
        except ImageError as e:
            e.path = str(self.path)
            raise
        self._page_files[pid] = pf
        return pf

    def verify_pages(self, pid: int) -> None:
        """Check all of pages-PID.img against pages-PID.sums. Raises ImageError naming the bad chunk."""
        try:
            self.page_file(pid).verify_all()
        except ImageError as e:
            e.path = str(self.path)
            raise

    def close(self) -> None:
        for pf in self._page_files.values():
            pf.close()
        self._page_files.clear()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Image {self.path} tasks={self.tasks}>"


def _check_files(files: dict[str, Any], tasks: set[int], version: int) -> None:
    for name, entry in files.items():
        check_name_or_fail(name)
        if not isinstance(entry, dict):
            raise ImageError(f"{INVENTORY}: entry of {name} must be an object, not {json_type_name(entry)}")
        size = entry.get("size")
        if type(size) is not int or size < 0:
            raise ImageError(f"{INVENTORY}: entry of {name} has size {size!r}")
        digest = entry.get("xxh3")
        if m := _PAGES_RE.fullmatch(name):
            if int(m.group(1)) not in tasks:
                raise ImageError(f"{name}: pid {m.group(1)} is not in 'tasks'")
            if digest is not None:
                raise ImageError(f"{INVENTORY}: entry of {name} must have xxh3 null (data is checked per chunk)")
            if size % PAGE_SIZE:
                raise ImageError(f"{INVENTORY}: entry of {name} has size {size}, not a multiple of {PAGE_SIZE}")
            if sums_name(int(m.group(1))) not in files:
                raise ImageError(f"{sums_name(int(m.group(1)))}: not listed in {INVENTORY}")
            if m.group(2) and pages_name(int(m.group(1))) not in files:
                raise ImageError(f"{name}: second part of {pages_name(int(m.group(1)))}, which is not listed in "
                                 f"{INVENTORY}")
            if m.group(2) and version < PARTS_VERSION:
                raise ImageError(f"{name}: in a version {version} image (split page files came with version "
                                 f"{PARTS_VERSION})")
        elif not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest):
            raise ImageError(f"{INVENTORY}: entry of {name} has xxh3 {digest!r}, not 16 hex digits")
        if (m := _SUMS_RE.fullmatch(name)) and pages_name(int(m.group(1))) not in files:
            raise ImageError(f"{pages_name(int(m.group(1)))}: not listed in {INVENTORY}")
        if (m := _TASK_RE.fullmatch(name)) and int(m.group(1)) not in tasks:
            raise ImageError(f"{name}: pid {m.group(1)} is not in 'tasks'")
    for pid in tasks:
        if task_name(pid) not in files:
            raise ImageError(f"{task_name(pid)}: not listed in {INVENTORY}")


def check_name_or_fail(name: str) -> None:
    try:
        check_name(name, "file")
    except ImageError:
        raise ImageError(f"{INVENTORY}: lists invalid file name {name!r}") from None
    if name == INVENTORY:
        raise ImageError(f"{INVENTORY}: lists itself in 'files'")


def _stat_size(path: str, name: str, expected: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ImageError(f"{name}: missing") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot access: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file")
    if st.st_size != expected:
        raise _size_error(name, st.st_size, expected)


def _read_checked(path: str, name: str, expected_size: int, expected_xxh3: str, *, keep: bool) -> bytes:
    """Hash the file as it streams past; returns its bytes if `keep`, else b""."""
    _stat_size(path, name, expected_size)
    hasher = xxhash.xxh3_64()
    parts: list[bytes] = []
    total = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                part = f.read(min(_READ_SIZE, expected_size - total + 1))
                if not part:
                    break
                total += len(part)
                if total > expected_size:
                    break
                hasher.update(part)
                if keep:
                    parts.append(part)
    except OSError as e:
        raise ImageError(f"{name}: cannot read: {e.strerror}") from e
    if total != expected_size:
        raise _size_error(name, total, expected_size)
    if hex64(hasher.intdigest()) != expected_xxh3:
        raise ImageError(f"{name}: checksum mismatch")
    return b"".join(parts)


def _read_sums(path: str, name: str, size: int, expected_xxh3: str) -> array:
    """A chunk-sums file (`size` a multiple of 8), read straight into the array it becomes and hashed there:
    one buffer, not three (read, join, frombytes). At 4 GiB of pages the file is 512 KiB, and each fresh
    buffer of that size costs a lazy restore ~128 page faults before its process runs."""
    _stat_size(path, name, size)
    sums = array("Q", [0]) * (size // 8)
    buf = memoryview(sums).cast("B")
    total = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while total < size:
                n = f.readinto(buf[total:])
                if not n:
                    break
                total += n
            if total == size and f.read(1):
                total += 1  # longer than listed
    except OSError as e:
        raise ImageError(f"{name}: cannot read: {e.strerror}") from e
    if total != size:
        raise _size_error(name, total, size)
    if hex64(xxhash.xxh3_64_intdigest(buf)) != expected_xxh3:
        raise ImageError(f"{name}: checksum mismatch")
    buf.release()
    if sys.byteorder != "little":
        sums.byteswap()
    return sums


__all__ = ["Image", "PageFile", "validate_task"]
