"""Kernel feature probe and PAGEMAP_SCAN, on this machine and on child processes this test starts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazarus.errors import FeatureMissing, NoSuchTask
from lazarus.kernel import abi, features, pagemap, procfs

FIX = Path(__file__).parent / "fixtures"
P = abi.PAGE_SIZE
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ---------------------------------------------------------------------------------------------
# pure logic


def F(name: str, ok: bool, *purposes: str) -> features.Feature:  # noqa: N802 - reads like a row
    return features.Feature(name, ok, "", purposes[0], purposes[1:])


def test_missing_for_and_exit_code() -> None:
    rows = [F("a", True, "dump", "restore"), F("b", False, "lazy"), F("soft-dirty", False, "info"),
            F("c", False, "pre-copy")]
    assert features.missing_for("dump", rows) == []
    assert rows[0].purposes == ("dump", "restore")
    assert [f.name for f in features.missing_for("lazy", rows)] == ["b"]
    assert features.check_exit_code(rows) == 0  # lazy/pre-copy/info gaps never fail `check`
    rows.append(F("d", False, "restore"))
    assert features.check_exit_code(rows) == 1
    with pytest.raises(ValueError):
        features.missing_for("nonsense", rows)


def test_vdso_layout_from_fixture() -> None:
    vmas = procfs.parse_maps((FIX / "maps.txt").read_text())
    v = features.parse_vdso_layout(vmas)
    assert (v.vvar_pages, v.vvar_vclock_pages, v.vdso_pages) == (4, 2, 2)
    assert v.contiguous and v.order == ("[vvar]", "[vvar_vclock]", "[vdso]")
    gap = [x for x in vmas if x.path != "[vvar_vclock]"]
    assert not features.parse_vdso_layout(gap).contiguous


def test_parse_xstate() -> None:
    data = bytearray(2432)
    struct.pack_into("<Q", data, 464, 0xE7)
    struct.pack_into("<QQ", data, 512, 0xA2, 0)
    assert features.parse_xstate(bytes(data)) == (0xE7, 2432, 0xA2)
    struct.pack_into("<Q", data, 520, 1 << 63)  # compacted: not the ptrace format
    with pytest.raises(ValueError):
        features.parse_xstate(bytes(data))
    with pytest.raises(ValueError):
        features.parse_xstate(b"\0" * 100)


# ---------------------------------------------------------------------------------------------
# the live probe


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_probe_is_clean_and_well_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _fd_count()
    # pytest is a child subreaper (conftest.py): orphans of other tests may be our children; only new ones count
    children = set(procfs.children(os.getpid()))
    rows = features.probe()
    assert _fd_count() == before, "a probe leaked an fd"
    assert set(procfs.children(os.getpid())) <= children, "a probe left a child behind"
    names = [f.name for f in rows]
    assert len(names) == len(set(names))
    for f in rows:
        assert isinstance(f.required_for, str) and set(f.purposes) <= set(features.PURPOSES), f
        assert f.detail, f
    sd = features.get("soft-dirty", rows)
    assert sd is not None and sd.purposes == ("info",)
    first = features.report()
    monkeypatch.setattr(features, "probe", lambda: pytest.fail("report() probed again instead of its cache"))
    assert features.report() == first  # cached


@needs_root
def test_this_machine_can_dump_and_restore() -> None:
    rows = features.report()
    assert features.check_exit_code(rows) == 0, [f for f in rows if not f.available]
    features.require("dump")
    features.require("restore")
    for name in ("userfaultfd", "PAGEMAP_SCAN", "clone3 set_tid", "pidfd_getfd", "uffd WP_ASYNC"):
        f = features.get(name, rows)
        assert f is not None and f.available, f


@needs_root
def test_cpu_xstate() -> None:
    xcr0, size = features.cpu_xstate()
    assert xcr0 & 3 == 3  # x87 | SSE
    assert size >= 576 if xcr0 & 4 else size >= 512  # AVX state ends at 832; legacy + header at 576
    assert features.cpu_xstate() == (xcr0, size)


def test_uffd_features_mask_matches_rows() -> None:
    mask = features.uffd_features()
    row = features.get("uffd EVENT_FORK")
    assert row is not None and row.available == bool(mask & abi.UFFD_FEATURE_EVENT_FORK)


def test_require_raises_feature_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "report", lambda refresh=False: [F("userfaultfd", False, "lazy")])
    with pytest.raises(FeatureMissing, match="userfaultfd unavailable"):
        features.require("lazy")


# ---------------------------------------------------------------------------------------------
# PAGEMAP_SCAN on a child with a known memory layout

CHILD = textwrap.dedent("""
    import ctypes, json, mmap, os, sys
    P = 4096
    addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
    a = mmap.mmap(-1, 64 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a.madvise(mmap.MADV_NOHUGEPAGE)
    for i in (0, 1, 2, 10, 63):
        a[i * P] = 1
    _ = a[20 * P]  # a read maps the shared zero page
    with open(sys.argv[1], "wb") as f:
        f.write(b"f" * 16 * P)
    fd = os.open(sys.argv[1], os.O_RDWR)
    b = mmap.mmap(fd, 16 * P, mmap.MAP_PRIVATE)
    for i in range(16):
        _ = b[i * P]  # page-cache pages, mapped but not ours
    b[3 * P] = b[4 * P] = 0x41  # copy-on-write: these became anonymous
    big = mmap.mmap(-1, 4 << 30, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # MAP_NORESERVE
    big.madvise(mmap.MADV_NOHUGEPAGE)
    for off in range(0, 4 << 30, 2 << 20):
        big[off] = 7
    big[(4 << 30) - 1] = 7
    print(json.dumps({"anon": addr(a), "file": addr(b), "big": addr(big)}), flush=True)
    sys.stdin.read()
""")


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, int]]]:
    data = tmp_path_factory.mktemp("pagemap") / "data.bin"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            pytest.fail("pagemap child did not start")
        yield proc.pid, json.loads(line)
    finally:
        proc.kill()
        proc.wait()


def pages(runs: list[tuple[int, int]], base: int) -> list[tuple[int, int]]:
    return [((s - base) // P, (e - base) // P) for s, e in runs]


def test_scan_categories(child: tuple[int, dict[str, int]]) -> None:
    pid, at = child
    a = at["anon"]
    regions = pagemap.scan(pid, a, a + 64 * P, category_anyof_mask=abi.PAGE_IS_PRESENT,
                           return_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_PFNZERO)
    got = [((s - a) // P, (e - a) // P, c) for s, e, c in regions]
    present, zero = abi.PAGE_IS_PRESENT, abi.PAGE_IS_PFNZERO
    assert got == [(0, 3, present), (10, 11, present), (20, 21, present | zero), (63, 64, present)]


def test_present_pages_anon(child: tuple[int, dict[str, int]]) -> None:
    pid, at = child
    a = at["anon"]
    assert pages(pagemap.present_pages(pid, a, a + 64 * P), a) == [(0, 3), (10, 11), (63, 64)]
    assert pages(pagemap.present_pages(pid, a, a + 64 * P, skip_zero=False), a) == [
        (0, 3), (10, 11), (20, 21), (63, 64)]


def test_present_pages_private_file(child: tuple[int, dict[str, int]]) -> None:
    pid, at = child
    f = at["file"]
    assert pages(pagemap.present_pages(pid, f, f + 16 * P), f) == [(0, 16)]
    assert pages(pagemap.present_pages(pid, f, f + 16 * P, anon_only=True), f) == [(3, 5)]


def test_small_vector_loops_and_merges(child: tuple[int, dict[str, int]]) -> None:
    pid, at = child
    a, f = at["anon"], at["file"]
    with pagemap.Pagemap(pid, vec_len=1) as pm:
        assert pages(pm.present_pages(a, a + 64 * P), a) == [(0, 3), (10, 11), (63, 64)]
        # the file mapping splits into file/anon/file regions; across calls they must still merge
        assert pages(pm.present_pages(f, f + 16 * P), f) == [(0, 16)]
        full = pm.scan(a, a + 64 * P)
    with pagemap.Pagemap(pid) as pm:
        assert pm.scan(a, a + 64 * P) == full
        assert pages([(s, e) for s, e, _ in pm.scan(a, a + 64 * P, abi.PAGE_IS_PRESENT, max_pages=2)], a) == [
            (0, 2)]


def test_sparse_4gib(child: tuple[int, dict[str, int]]) -> None:
    pid, at = child
    big = at["big"]
    with pagemap.Pagemap(pid) as pm:
        runs = pm.present_pages(big, big + (4 << 30))  # how fast: benchmarks/structures.py
    expect = [(k * 512, k * 512 + 1) for k in range(2048)]
    expect[-1] = (2047 * 512, 2047 * 512 + 1)
    expect.append(((4 << 30) // P - 1, (4 << 30) // P))
    assert pages(runs, big) == expect


@pytest.mark.parametrize("vec_len", [1, 7, 511, 512, 513, 2048])
def test_sparse_4gib_any_vector_size(child: tuple[int, dict[str, int]], vec_len: int) -> None:
    # The kernel bounces results through a 512-entry buffer and its walk_end is stale after the last round;
    # every vector size must still give each run exactly once.
    pid, at = child
    big = at["big"]
    with pagemap.Pagemap(pid) as pm:
        want = pm.present_pages(big, big + (4 << 30))
    with pagemap.Pagemap(pid, vec_len=vec_len) as pm:
        assert pm.present_pages(big, big + (4 << 30)) == want
        assert pagemap.merge_runs(pm.scan(big, big + (4 << 30), abi.PAGE_IS_PRESENT)) == want


def test_whole_address_space(child: tuple[int, dict[str, int]]) -> None:
    pid, _ = child
    total = 0
    with pagemap.Pagemap(pid) as pm:
        for v in procfs.read_maps(pid):
            if v.is_special or v.shared:
                continue
            for s, e in pm.present_pages(v.start, v.end, anon_only=v.is_file_private):
                assert v.start <= s < e <= v.end
                total += e - s
    assert total > 0


def test_no_such_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(NoSuchTask):
        pagemap.present_pages(proc.pid, 0x10000, 0x20000)
