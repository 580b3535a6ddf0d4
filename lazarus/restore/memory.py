"""Rebuild a task's address space by injected syscalls: clear the restorer's copy, move the vdso, map
every vma of the image, bring back shared objects, and fill private pages (eagerly here; lazily via uffd).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from lazarus.errors import RestoreError
from lazarus.images.mm import is_lazy
from lazarus.kernel import abi, procfs
from lazarus.remote import RemoteTask

_NEG1 = (1 << 64) - 1
_MADVISE = {"dd": abi.MADV_DONTDUMP, "hg": abi.MADV_HUGEPAGE, "nh": abi.MADV_NOHUGEPAGE,
            "dc": abi.MADV_DONTFORK, "wf": abi.MADV_WIPEONFORK}
VDSO_KINDS = ("vvar", "vvar_vclock", "vdso")


@dataclass
class MemoryState:
    """What the address-space rebuild leaves for later stages."""

    object_fds: dict[int, int] = field(default_factory=dict)  # image object id -> fd in the task


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


def clear_address_space(task: RemoteTask, keep: tuple[int, int]) -> dict[str, procfs.Vma]:
    """Unmap everything the task inherited from the restorer except `keep` and the vdso block.

    A few munmaps over the gaps between what stays (munmap accepts holes), instead of one per vma: the
    restorer is a Python process with a hundred or more mappings.
    """
    specials: dict[str, procfs.Vma] = {}
    stay = [keep]
    for vma in procfs.read_maps(task.pid):
        if vma.path in ("[vdso]", "[vvar]", "[vvar_vclock]"):
            specials[vma.path.strip("[]")] = vma
            stay.append((vma.start, vma.end))
    cur = 0
    for start, end in sorted(stay):
        if start > cur:
            task.syscall(abi.SYS.munmap, cur, start - cur)
        cur = max(cur, end)
    if cur < TASK_SIZE:
        task.syscall(abi.SYS.munmap, cur, TASK_SIZE - cur)
    return specials


def move_vdso(task: RemoteTask, have: dict[str, procfs.Vma], image_vmas: list[dict[str, Any]],
              scratch_gap: int) -> None:
    """Move the task's vvar/vvar_vclock/vdso to where the image had them, keeping them together."""
    want = {v["kind"]: v for v in image_vmas if v["kind"] in VDSO_KINDS}
    for kind in VDSO_KINDS:
        if kind in have and kind not in want:
            task.syscall(abi.SYS.munmap, have[kind].start, have[kind].end - have[kind].start)
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
        task.syscall(abi.SYS.mremap, old, size, size, flags, tmp)
        staged.append((tmp, size, dst))
        tmp += size
    for old, size, dst in staged:
        task.syscall(abi.SYS.mremap, old, size, size, flags, dst)


class SpaceBuilder:
    """Maps the image's vmas into the task."""

    def __init__(self, task: RemoteTask, image: Any, pid: int) -> None:
        self.task = task
        self.image = image
        self.pid = pid
        self.fd_cache: dict[tuple[str, int], int] = {}
        self.state = MemoryState()

    def _open(self, path: str, flags: int) -> int:
        key = (path, flags)
        if key not in self.fd_cache:
            addr = self.task.cstring(path)
            self.fd_cache[key] = self.task.syscall(abi.SYS.openat, abi.AT_FDCWD & _NEG1, addr, flags, 0,
                                                   what=f"open {path}")
        return self.fd_cache[key]

    def close_cached(self) -> None:
        for fd in self.fd_cache.values():
            self.task.syscall(abi.SYS.close, fd)
        self.fd_cache.clear()

    def create_objects(self, objects: list[dict[str, Any]], hold_above: int, page_file: Any,
                       lazy_ids: set[int]) -> None:
        """Create each shared-memory object, with its content unless it is served lazily; its fd is kept at
        >= hold_above until the fds are restored."""
        t = self.task
        for obj in objects:
            size = obj["size"]
            if obj["kind"] == "memfd":
                fd = t.syscall(abi.SYS.memfd_create, t.cstring(obj["name"]), 0)
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
            if obj["pages"] and obj["id"] not in lazy_ids:
                wfd = os.open(f"/proc/{self.pid}/fd/{high}", os.O_WRONLY)
                try:
                    for offset, n, idx in obj["pages"]:
                        view = page_file.view(idx, n)[: max(0, min(n * abi.PAGE_SIZE, size - offset))]
                        done = 0
                        while done < len(view):
                            done += os.pwrite(wfd, view[done:], offset + done)
                finally:
                    os.close(wfd)
            self.state.object_fds[obj["id"]] = high

    def map_vmas(self, vmas: list[dict[str, Any]]) -> None:
        t = self.task
        for v in vmas:
            kind = v["kind"]
            if kind in VDSO_KINDS:
                continue
            start, length, prot = v["start"], v["end"] - v["start"], v["prot"]
            if kind == "anon":
                flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED
                if "gd" in v["vmflags"]:
                    flags |= abi.MAP_GROWSDOWN
                if "nr" in v["vmflags"]:
                    flags |= abi.MAP_NORESERVE
                t.syscall(abi.SYS.mmap, start, length, prot, flags, _NEG1, 0)
            elif kind == "file":
                if v["shared"]:
                    acc = abi.O_RDWR if "mw" in v["vmflags"] or prot & abi.PROT_WRITE else abi.O_RDONLY
                    flags = abi.MAP_SHARED | abi.MAP_FIXED
                else:
                    acc = abi.O_RDONLY
                    flags = abi.MAP_PRIVATE | abi.MAP_FIXED
                fd = self._open(v["path"], acc)
                t.syscall(abi.SYS.mmap, start, length, prot, flags, fd, v["offset"],
                          what=f"mmap {v['path']}")
            elif kind in ("shmem", "memfd"):
                fd = self.state.object_fds[v["object"]]
                t.syscall(abi.SYS.mmap, start, length, prot, abi.MAP_SHARED | abi.MAP_FIXED, fd,
                          v["offset"])
            else:
                raise RestoreError(f"unknown vma kind {kind!r} at {start:#x}", stage="memory")
            for flag in v["vmflags"]:
                if flag in _MADVISE:
                    t.raw(abi.SYS.madvise, start, length, _MADVISE[flag])

    def write_pages(self, vmas: list[dict[str, Any]], page_file: Any, skip_lazy: bool) -> int:
        """Write every saved page (only file-private ones when `skip_lazy`) through /proc/pid/mem."""
        mem = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
        written = 0
        try:
            for v in vmas:
                if skip_lazy and is_lazy(v):
                    continue
                for vaddr, n, idx in v["pages"]:
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


def close_inherited_fds(task: RemoteTask) -> None:
    with contextlib.suppress(Exception):
        task.syscall(abi.SYS.close_range, 0, 0xFFFFFFFF, 0)
