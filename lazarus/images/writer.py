"""Writing an image: everything goes to DIR.tmp-XXXX, which becomes DIR only once it is complete and verified."""

from __future__ import annotations

import contextlib
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
    COW_FILE,
    COW_VERSION,
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


def _write_all(fd: int, data: memoryview, fname: str) -> None:
    off = 0
    end = len(data)
    while off < end:
        try:
            n = os.write(fd, data[off:])
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


class PagesWriter:
    """Appends raw page data to pages-PID.img and checksums it per 64 KiB chunk as it goes.

    The data is hashed straight from the caller's buffer through memoryview slices (no copies); a chunk that
    straddles two append() calls is fed to a streaming hasher, so the sums equal those of the finished file.
    """

    WRITEBACK_STEP = 64 << 20

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
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ImageError(f"{self.name}: cannot create: {e.strerror}") from e
        self._size = 0
        self._sums = array("Q")
        self._partial = xxhash.xxh3_64()
        self._partial_len = 0
        self._closed = False
        self.sums_entry: tuple[int, int] | None = None

    @property
    def npages(self) -> int:
        return self._size // PAGE_SIZE

    @property
    def size(self) -> int:
        return self._size

    def append(self, buf: Any) -> int:
        """Append whole pages.

        Parameters: buf -- a C-contiguous bytes-like object whose length is a multiple of 4096.
        Returns: the file page index of the first appended page (what the task json records).
        Raises: ImageError if the length is not page aligned, the writer is closed, or the write fails.
        """
        if self._closed:
            raise ImageError(f"{self.name}: append after close")
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n % PAGE_SIZE:
            raise ImageError(f"{self.name}: append of {n} bytes, not a multiple of {PAGE_SIZE}")
        first = self._size // PAGE_SIZE
        if n == 0:
            return first
        _write_all(self._fd, mv, self.name)
        self._hash(mv)
        self._size += n
        if self._writeback is not None and self._size - self._flushed >= self.WRITEBACK_STEP:
            self._writeback(self._fd, self._flushed, self._size - self._flushed)
            self._flushed = self._size
        return first

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
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


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
                for name in (*files, INVENTORY):
                    _fsync_path(self.tmp_dir / name)
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
        version = COW_VERSION if COW_FILE in self._files else FORMAT_VERSION
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
        # Reading back through the reader proves the image opens exactly as a restore will see it.
        with Image.open(self.tmp_dir) as img:
            for pid in self._pages:
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


