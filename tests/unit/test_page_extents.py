"""The dump's page path: PagesWriter.extend/PageExtent.put (chunks hashed from the caller's buffer and written with
O_DIRECT, from several threads in any order) and MemoryDumper filling it from a process's memory, with its spot
check. No root needed: the memory read is this process's own (process_vm_readv and PAGEMAP_SCAN of oneself need no
privilege)."""

from __future__ import annotations

import json
import mmap
import os
import random
from pathlib import Path

import pytest
import xxhash

from lazarus.dump import memory as dump_memory
from lazarus.errors import DumpError, ImageError
from lazarus.images import CHUNK_SIZE, PAGE_SIZE, PAGES_PER_CHUNK, Image, ImageWriter
from lazarus.images.writer import PageExtent
from lazarus.kernel import procfs
from lazarus.kernel.syscall import buffer_address
from lazarus.records import replace

FIELDS = {"kernel_release": "6.18.0-test", "arch": "x86_64", "cpu": {"xcr0": 0x2E7, "xstate_size": 2432},
          "root_pid": 42, "tasks": [42]}
TASK = {"pid": 42, "core": {"regs": [1]}, "mm": {"vmas": []}, "files": [], "signals": {}, "misc": {"comm": "t"}}


def data(npages: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(npages * PAGE_SIZE)


def sums_of(raw: bytes) -> list[int]:
    return [xxhash.xxh3_64_intdigest(raw[o:o + CHUNK_SIZE]) for o in range(0, len(raw), CHUNK_SIZE)]


def aligned(raw: bytes) -> mmap.mmap:
    """`raw` in a page-aligned buffer, as an O_DIRECT write needs."""
    m = mmap.mmap(-1, max(len(raw), PAGE_SIZE))
    m[:len(raw)] = raw
    return m


@pytest.mark.parametrize("direct", [True, False])
def test_extents_and_appends_mixed_give_the_sums_of_the_file(tmp_path: Path, direct: bool) -> None:
    # 3 pages appended and 13 more to end on a chunk boundary (16 pages = 1 chunk); an extent of 37 chunks put in
    # 3 pieces out of order (the last one partial: 2 pages over 36 chunks); then appends going on with that
    # partial chunk and past it.
    d = tmp_path / "img"
    expect = b""
    with ImageWriter(d, fsync=False, direct=direct) as w:
        pw = w.pages(42)
        for n, seed in ((3, 1), (13, 2)):
            raw = data(n, seed)
            assert pw.append(raw) == len(expect) // PAGE_SIZE
            expect += raw
        total = 36 * CHUNK_SIZE + 2 * PAGE_SIZE
        raw = data(total // PAGE_SIZE, 3)
        with pw.extend(total) as ext:
            assert ext.first == 16
            for off, end in ((20 * CHUNK_SIZE, total), (0, 7 * CHUNK_SIZE), (7 * CHUNK_SIZE, 20 * CHUNK_SIZE)):
                buf = aligned(raw[off:end])
                ext.put(off, memoryview(buf)[:end - off])
        expect += raw
        for n, seed in ((5, 4), (30, 5)):
            raw = data(n, seed)
            assert pw.append(raw) == len(expect) // PAGE_SIZE
            expect += raw
        assert pw.direct == direct or not direct
        w.write_task(42, TASK)
        w.commit(FIELDS)
    assert (d / "pages-42.img").read_bytes() == expect
    with Image.open(d) as img:
        img.verify_pages(42)  # every chunk, hashed again here, matches the sums the writer made
    sums = (d / "pages-42.sums").read_bytes()
    assert [int.from_bytes(sums[i:i + 8], "little") for i in range(0, len(sums), 8)] == sums_of(expect)


def test_extent_left_unfilled_makes_the_writer_unusable(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False, direct=True) as w:
        pw = w.pages(42)
        ext = pw.extend(3 * CHUNK_SIZE)
        with pytest.raises(ImageError, match="still being filled"):
            pw.append(b"\0" * PAGE_SIZE)
        ext.put(CHUNK_SIZE, aligned(bytes(2 * CHUNK_SIZE)))
        with pytest.raises(ImageError, match="closed with chunk 0 not written"):
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


def test_extent_starts_on_a_chunk_boundary(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        pw = w.pages(42)
        pw.append(data(3, 0))
        with pytest.raises(ImageError, match="chunk boundary, not at byte 12288"):
            pw.extend(PAGE_SIZE)


@pytest.mark.parametrize(("off", "n"), [(PAGE_SIZE, CHUNK_SIZE), (0, PAGE_SIZE), (CHUNK_SIZE, 2 * CHUNK_SIZE)])
def test_put_misaligned_or_beyond_the_end_is_refused(tmp_path: Path, off: int, n: int) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        ext = w.pages(42).extend(2 * CHUNK_SIZE)
        with pytest.raises(ImageError, match=f"put of {n} bytes at {off} of a 131072-byte extent"):
            ext.put(off, aligned(bytes(n)))


def test_chunk_put_twice_is_refused(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        ext = w.pages(42).extend(2 * CHUNK_SIZE)
        ext.put(0, aligned(bytes(2 * CHUNK_SIZE)))
        with pytest.raises(ImageError, match="chunk put twice"):
            ext.put(CHUNK_SIZE, aligned(bytes(CHUNK_SIZE)))


def test_direct_writes_refused_by_the_device_go_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    refused: list[int] = []
    with ImageWriter(tmp_path / "img", fsync=False, direct=True) as w:
        pw = w.pages(42)
        if not pw.direct:
            pytest.skip("this filesystem refuses O_DIRECT at open already")
        dfd = pw._dfd

        def pwrite(fd: int, buf: object, pos: int) -> int:
            if fd == dfd:
                refused.append(pos)
                raise OSError(22, "Invalid argument")
            return real_pwrite(fd, buf, pos)

        monkeypatch.setattr(os, "pwrite", pwrite)
        raw = data(2 * PAGES_PER_CHUNK, 9)
        with pw.extend(len(raw)) as ext:
            ext.put(0, aligned(raw[:CHUNK_SIZE]))
            ext.put(CHUNK_SIZE, aligned(raw[CHUNK_SIZE:]))
        assert not pw.direct
        w.write_task(42, TASK)
        w.commit(FIELDS)
    assert refused == [0]
    assert (tmp_path / "img" / "pages-42.img").read_bytes() == raw


def test_commit_reads_back_only_appended_page_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verified: list[int] = []
    real = Image.verify_pages
    monkeypatch.setattr(Image, "verify_pages", lambda self, pid: (verified.append(pid), real(self, pid))[1])
    fields = {**FIELDS, "tasks": [42, 43],  # two tasks: a tree (format 3), 43 the root's child
              "tree": [{"pid": p, "ppid": 0 if p == 42 else 42, "pgid": 42, "sid": 42, "state": "running",
                        "comm": "t", "exit": None} for p in (42, 43)]}
    with ImageWriter(tmp_path / "img", fsync=False, direct=True) as w:
        with w.pages(42).extend(PAGE_SIZE) as ext:
            ext.put(0, aligned(data(1, 0)))
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
        self.vma = replace(vma, start=self.start, end=self.start + npages * PAGE_SIZE)


def _dump_region(tmp_path: Path, region: _Region, direct: bool = True) -> tuple[dict, Path]:
    d = tmp_path / "img"
    with ImageWriter(d, fsync=False, direct=direct) as w:
        mem = dump_memory.MemoryDumper(os.getpid(), w.pages(42), w.write_blob)
        try:
            recs, _ = mem.dump([region.vma])
        finally:
            mem.close()
        w.write_task(42, TASK)
        w.commit(FIELDS)
    return recs[0], d


# O_DIRECT from buffers; pwrite from small buffers (the default); in place through a shared mapping
@pytest.mark.parametrize("way", ["direct", "buffered", "mapped"])
@pytest.mark.parametrize("npages", [300, 5000])  # 1 or 3 pieces of 8 MiB (direct, mapped), 5 or 79 of 256 KiB
def test_dumper_copies_a_mapping_into_the_page_file(tmp_path: Path, npages: int, way: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dump_memory, "_MAPPED", way == "mapped")
    region = _Region(npages)
    rec, d = _dump_region(tmp_path, region, way == "direct")
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
    assert covered == npages - 1


@pytest.mark.parametrize("direct", (True, False), ids=("direct", "buffered"))
def test_spot_check_catches_a_page_file_that_does_not_hold_the_memory(tmp_path: Path, direct: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The file gets one wrong byte in its first page before it is hashed, so sums and file agree with each other:
    # only the comparison with the task's memory can tell.
    real = PageExtent.put

    def corrupt(self: PageExtent, off: int, buf: memoryview) -> None:
        if off == 0:
            buf[0] ^= 0xFF
        real(self, off, buf)

    monkeypatch.setattr(PageExtent, "put", corrupt)
    region = _Region(64)
    with pytest.raises(DumpError, match=r"differs from its copy at byte 0 of pages-42.img"):
        _dump_region(tmp_path, region, direct=direct)
    assert not (tmp_path / "img").exists()


def test_spot_check_catches_a_wrong_page_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same for the in-place (mapped) way: the page is spoilt in the mapping before filled() hashes it.
    real = PageExtent.filled

    def corrupt(self: PageExtent, off: int, n: int) -> None:
        if off == 0:
            self.mapping()[0] ^= 0xFF
        real(self, off, n)

    monkeypatch.setattr(PageExtent, "filled", corrupt)
    monkeypatch.setattr(dump_memory, "_MAPPED", True)  # not the default way any more
    with pytest.raises(DumpError, match=r"differs from its copy at byte 0 of pages-42.img"):
        _dump_region(tmp_path, _Region(64), direct=False)
    assert not (tmp_path / "img").exists()


def test_dumper_without_a_shared_mapping_writes_from_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A filesystem that cannot map the page file shared: the copy threads write their buffers instead.
    def refuse(self: PageExtent) -> None:
        raise ImageError("pages-42.img: cannot map: No such device")

    monkeypatch.setattr(PageExtent, "mapping", refuse)
    region = _Region(3000)
    rec, d = _dump_region(tmp_path, region, direct=False)
    pagefile = (d / "pages-42.img").read_bytes()
    for vaddr, n, index in rec["pages"]:
        off = vaddr - region.start
        assert pagefile[index * PAGE_SIZE:(index + n) * PAGE_SIZE] == region.raw[off:off + n * PAGE_SIZE]


def _split_image(d: Path) -> bytes:
    """An image whose page file is split: a chunk appended, an extent of 12 chunks split after 5 of them (put out
    of order, one put across the split), 3 pages appended after it (into the second part). Returns the data."""
    head, body, tail = data(PAGES_PER_CHUNK, 1), data(12 * PAGES_PER_CHUNK, 2), data(3, 3)
    with ImageWriter(d, fsync=False) as w:
        pw = w.pages(42)
        pw.append(head)
        with pw.extend(len(body), split=5 * CHUNK_SIZE) as ext:
            for off, end in ((8, 12), (0, 4), (4, 8)):  # chunks [4, 8) cross the split
                ext.put(off * CHUNK_SIZE, body[off * CHUNK_SIZE:end * CHUNK_SIZE])
        pw.append(tail)
        w.write_task(42, TASK)
        w.commit(FIELDS)
    return head + body + tail


def test_a_split_page_file_reads_as_one(tmp_path: Path) -> None:
    d = tmp_path / "img"
    expect = _split_image(d)
    first = (d / "pages-42.img").read_bytes()
    assert len(first) == 6 * CHUNK_SIZE, "the first part ends at the split"
    assert first + (d / "pages-42.1.img").read_bytes() == expect
    with Image.open(d) as img:
        assert img.inventory["version"] == 6
        pf = img.page_file(42)
        assert pf.npages == len(expect) // PAGE_SIZE
        assert bytes(pf.view(0, pf.npages)) == expect  # one contiguous mapping of both parts
        img.verify_pages(42)
        pf.check_size()


@pytest.mark.parametrize("damage", ["missing", "short", "byte"])
def test_a_damaged_second_part_is_named(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "img"
    _split_image(d)
    part = d / "pages-42.1.img"
    if damage == "missing":
        part.unlink()
    elif damage == "short":
        os.truncate(part, part.stat().st_size - PAGE_SIZE)
    else:
        with open(part, "r+b") as f:
            f.seek(CHUNK_SIZE + 7)
            f.write(b"\xff")
    want = {"missing": r"pages-42\.1\.img: missing", "short": r"pages-42\.1\.img: truncated at byte",
            "byte": r"pages-42\.img: .*chunk 7"}[damage]
    with pytest.raises(ImageError, match=want), Image.open(d) as img:
        img.verify_pages(42)


def test_a_split_extent_refuses_what_would_mix_the_parts(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img", fsync=False) as w:
        pw = w.pages(42)
        with pytest.raises(ImageError, match="cannot split"):
            pw.extend(4 * CHUNK_SIZE, split=CHUNK_SIZE + PAGE_SIZE)  # not on a chunk
        ext = pw.extend(4 * CHUNK_SIZE, split=2 * CHUNK_SIZE)
        with pytest.raises(ImageError, match="across the split"):
            ext.written(CHUNK_SIZE, 2 * CHUNK_SIZE, bytearray(CHUNK_SIZE))
        with pytest.raises(ImageError, match="cannot be mapped"):
            ext.mapping()


def test_dumper_splits_a_large_page_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The split as a large dump makes it, scaled down: 1 MiB pieces, from 4 MiB on; no task to write its own
    # pages here, so two threads copy, taking the parts in turn.
    monkeypatch.setattr(dump_memory, "_SPLIT_MIN", 4 << 20)
    monkeypatch.setattr(dump_memory.selfwrite, "PIECE", 1 << 20)
    region = _Region(3000)
    rec, d = _dump_region(tmp_path, region, direct=False)
    assert (d / "pages-42.1.img").stat().st_size > 0
    assert (d / "pages-42.img").stat().st_size % (1 << 20) == 0, "split on a piece boundary"
    with Image.open(d) as img:
        assert img.inventory["version"] == 6
        img.verify_pages(42)
        pf = img.page_file(42)
        for vaddr, n, index in rec["pages"]:
            off = vaddr - region.start
            assert bytes(pf.view(index, n)) == region.raw[off:off + n * PAGE_SIZE]


def test_a_second_part_in_an_older_version_is_refused(tmp_path: Path) -> None:
    from lazarus.images.format import inventory_bytes, inventory_self_check

    d = tmp_path / "img"
    _split_image(d)
    inv = json.loads((d / "inventory.json").read_text())
    inv["version"] = 5
    inv["self_check"] = inventory_self_check(inv)
    (d / "inventory.json").write_bytes(inventory_bytes(inv))
    with pytest.raises(ImageError, match=r"pages-42\.1\.img: in a version 5 image \(split page files came with "
                                         r"version 6\)"):
        Image.open(d)


def test_spot_check_names_the_part_that_holds_a_wrong_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The last page of a split file, spoilt before it is hashed: the message names the second part and the byte
    # in it.
    real = PageExtent.put

    def corrupt(self: PageExtent, off: int, buf: memoryview) -> None:
        if off + len(buf) == self.nbytes:
            buf[-1] ^= 0xFF
        real(self, off, buf)

    monkeypatch.setattr(PageExtent, "put", corrupt)
    monkeypatch.setattr(dump_memory, "_SPLIT_MIN", 4 << 20)
    monkeypatch.setattr(dump_memory.selfwrite, "PIECE", 1 << 20)
    region = _Region(3000)  # 2999 pages written: the second part holds 2999 - 1536 of them
    with pytest.raises(DumpError, match=rf"differs from its copy at byte {(2999 - 1536 - 1) * PAGE_SIZE} of "
                                        r"pages-42\.1\.img"):
        _dump_region(tmp_path, region, direct=False)
    assert not (tmp_path / "img").exists()
