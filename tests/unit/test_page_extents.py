"""The dump's one-copy page path: PagesWriter.extend (a shared mapping of the page file, hashed from the file's own
pages) and MemoryDumper filling it from a process's memory, with its spot check. No root needed: the memory read
is this process's own (process_vm_readv and PAGEMAP_SCAN of oneself need no privilege)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import random
from pathlib import Path

import pytest
import xxhash

from lazarus.dump import memory as dump_memory
from lazarus.errors import DumpError, ImageError
from lazarus.images import CHUNK_SIZE, PAGE_SIZE, Image, ImageWriter
from lazarus.images.writer import PageExtent
from lazarus.kernel import procfs
from lazarus.kernel.syscall import buffer_address

FIELDS = {"kernel_release": "6.18.0-test", "arch": "x86_64", "cpu": {"xcr0": 0x2E7, "xstate_size": 2432},
          "root_pid": 42, "tasks": [42]}
TASK = {"pid": 42, "core": {"regs": [1]}, "mm": {"vmas": []}, "files": [], "signals": {}, "misc": {"comm": "t"}}


def data(npages: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(npages * PAGE_SIZE)


def sums_of(raw: bytes) -> list[int]:
    return [xxhash.xxh3_64_intdigest(raw[o:o + CHUNK_SIZE]) for o in range(0, len(raw), CHUNK_SIZE)]


def test_extents_and_appends_mixed_give_the_sums_of_the_file(tmp_path: Path) -> None:
    # 3 pages appended, 21 pages through an extent filled in 3 parts, 5 appended, 40 through another: chunk
    # boundaries fall inside appends, inside extents and across the seams.
    pieces = [("append", 3), ("extent", [4, 9, 8]), ("append", 5), ("extent", [40])]
    expect = b""
    d = tmp_path / "img"
    with ImageWriter(d, fsync=False) as w:
        pw = w.pages(42)
        for seed, (how, what) in enumerate(pieces):
            if how == "append":
                raw = data(what, seed)
                assert pw.append(raw) == len(expect) // PAGE_SIZE
                expect += raw
                continue
            total = sum(what) * PAGE_SIZE
            raw = data(sum(what), seed)
            with pw.extend(total) as ext:
                assert ext.first == len(expect) // PAGE_SIZE
                off = 0
                for n in what:
                    ext.view[off:off + n * PAGE_SIZE] = raw[off:off + n * PAGE_SIZE]
                    ext.filled(n * PAGE_SIZE)
                    off += n * PAGE_SIZE
            expect += raw
        w.write_task(42, TASK)
        w.commit(FIELDS)
    assert (d / "pages-42.img").read_bytes() == expect
    with Image.open(d) as img:
        img.verify_pages(42)  # every chunk, hashed again here, matches the sums the writer made
    sums = (d / "pages-42.sums").read_bytes()
    assert [int.from_bytes(sums[i:i + 8], "little") for i in range(0, len(sums), 8)] == sums_of(expect)


def test_extent_left_unfilled_makes_the_writer_unusable(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        pw = w.pages(42)
        ext = pw.extend(4 * PAGE_SIZE)
        with pytest.raises(ImageError, match="still being filled"):
            pw.append(b"\0" * PAGE_SIZE)
        ext.filled(2 * PAGE_SIZE)
        with pytest.raises(ImageError, match="closed with 8192 of 16384 bytes filled"):
            ext.close()
        with pytest.raises(ImageError, match="left unfilled"):
            pw.append(b"\0" * PAGE_SIZE)
        w.write_task(42, TASK)
        with pytest.raises(ImageError, match="left unfilled"):
            w.commit(FIELDS)
    assert not (tmp_path / "img").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n", [0, 100, -PAGE_SIZE])
def test_extent_sizes_must_be_whole_pages(tmp_path: Path, n: int) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w, pytest.raises(ImageError, match="not a positive"):
        w.pages(42).extend(n)


def test_extent_overfilled_is_refused(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w, w.pages(42).extend(PAGE_SIZE) as ext:
        with pytest.raises(ImageError, match="filled 8192 bytes at 0"):
            ext.filled(2 * PAGE_SIZE)
        ext.filled(PAGE_SIZE)


def test_commit_reads_back_only_appended_page_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verified: list[int] = []
    real = Image.verify_pages
    monkeypatch.setattr(Image, "verify_pages", lambda self, pid: (verified.append(pid), real(self, pid))[1])
    fields = {**FIELDS, "tasks": [42, 43]}
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        with w.pages(42).extend(PAGE_SIZE) as ext:
            ext.filled(PAGE_SIZE)
        w.pages(43).append(data(1, 0))
        w.write_task(42, TASK)
        w.write_task(43, {**TASK, "pid": 43})
        w.commit(fields)
    assert verified == [43]


class _Region:
    """An anonymous private mapping of this process filled with known data, and its Vma."""

    def __init__(self, npages: int) -> None:
        self.mm = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.raw = data(npages, 7)
        # A hole (never touched) in the middle: no run may cover it.
        hole = npages // 2
        self.mm[:hole * PAGE_SIZE] = self.raw[:hole * PAGE_SIZE]
        self.mm[(hole + 1) * PAGE_SIZE:] = self.raw[(hole + 1) * PAGE_SIZE:]
        self.hole = hole
        self.start = buffer_address(self.mm)
        vma = next(v for v in procfs.read_smaps(os.getpid()) if v.start <= self.start < v.end)
        # Only the region: the vma may have merged with neighbouring anonymous memory this process writes to
        # (malloc arenas), which would change under the spot check.
        self.vma = dataclasses.replace(vma, start=self.start, end=self.start + npages * PAGE_SIZE)


def _dump_region(tmp_path: Path, region: _Region) -> tuple[dict, Path]:
    d = tmp_path / "img"
    with ImageWriter(d, fsync=False) as w:
        mem = dump_memory.MemoryDumper(os.getpid(), w.pages(42), w.write_blob)
        try:
            recs, _ = mem.dump([region.vma])
        finally:
            mem.close()
        w.write_task(42, TASK)
        w.commit(FIELDS)
    return recs[0], d


def test_dumper_copies_a_mapping_into_the_page_file(tmp_path: Path) -> None:
    region = _Region(300)
    rec, d = _dump_region(tmp_path, region)
    pagefile = (d / "pages-42.img").read_bytes()
    covered = 0
    npages = len(region.raw) // PAGE_SIZE
    for vaddr, n, index in rec["pages"]:
        for i in range(n):
            page = (vaddr - region.start) // PAGE_SIZE + i
            assert 0 <= page < npages, f"a run outside the mapping: {vaddr:#x} + {n} pages"
            assert page != region.hole, "a run covers the page that was never touched"
            got = pagefile[(index + i) * PAGE_SIZE:(index + i + 1) * PAGE_SIZE]
            assert got == region.raw[page * PAGE_SIZE:(page + 1) * PAGE_SIZE], f"page {page}"
            covered += 1
    assert covered == 299


def test_spot_check_catches_a_page_file_that_does_not_hold_the_memory(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The file gets one wrong byte in its first page before it is hashed, so sums and file agree with each other:
    # only the comparison with the task's memory can tell.
    real = PageExtent.filled

    def corrupt(self: PageExtent, n: int) -> None:
        if self.done == 0:
            self.view[0] ^= 0xFF
        real(self, n)

    monkeypatch.setattr(PageExtent, "filled", corrupt)
    region = _Region(64)
    with pytest.raises(DumpError, match=r"differs from its copy at byte 0 of pages-42.img"):
        _dump_region(tmp_path, region)
    assert not (tmp_path / "img").exists()
