"""Mapping state, without root: VmFlags policy, which memory a lazy restore serves, guard regions in
PAGEMAP_SCAN."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from lazarus.images.mm import is_lazy, lazy_object_ids, lazy_vmas, refused_vmflag
from lazarus.kernel import pagemap

P = 4096
MADV_GUARD_INSTALL = 102  # include/uapi/asm-generic/mman-common.h
BASE = ["rd", "wr", "mr", "mw", "me", "ac"]


def test_vmflags_policy() -> None:
    for flags in (BASE, BASE + ["dd", "wf", "rr", "sr", "hg", "nh", "mg", "dc", "gu", "lo", "lf", "sl"],
                  ["rd", "sh", "mr", "me", "ms"], BASE + ["gd", "nr", "sd"]):
        assert refused_vmflag(flags) is None, flags
    assert "hugetlb" in (refused_vmflag(BASE + ["ht"]) or "")
    assert "userfaultfd" in (refused_vmflag(BASE + ["um"]) or "")
    assert "shadow stack" in (refused_vmflag(BASE + ["ss"]) or "")
    # A flag a newer kernel may add is refused, not silently dropped.
    assert "'zz' is not known" in (refused_vmflag(BASE + ["zz"]) or "")


def _vma(start: int, kind: str = "anon", shared: bool = False, flags: list[str] | None = None,
         **extra: object) -> dict:
    return {"start": start, "end": start + 4 * P, "kind": kind, "shared": shared, "offset": 0,
            "vmflags": BASE + (flags or []), "pages": [[start, 4, 0]], **extra}


def test_locked_sealed_and_wipeonfork_memory_is_filled_before_the_task_runs() -> None:
    assert is_lazy(_vma(0x10000))
    assert is_lazy(_vma(0x10000, flags=["dd", "dc", "hg"]))
    for flag in ("lo", "sl", "wf"):
        assert not is_lazy(_vma(0x10000, flags=[flag])), flag
    assert not is_lazy(_vma(0x10000, kind="deleted"))


def test_objects_served_lazily() -> None:
    objs = [{"id": i, "kind": k, "pages": [[0, 4, 4 * i]], "size": 4 * P, **x}
            for i, (k, x) in enumerate([("shmem", {}), ("memfd", {"seals": 1}), ("memfd", {"seals": 0xE}),
                                        ("deleted", {}), ("shmem", {}), ("shmem", {}), ("shmem", {})])]
    vmas = [_vma(0x100000 * (i + 1), kind=o["kind"], shared=True, object=o["id"]) for i, o in enumerate(objs)]
    vmas[4]["guards"] = [[vmas[4]["start"], 1]]
    vmas[5]["vmflags"] = vmas[5]["vmflags"] + ["lo"]
    vmas[6]["shared"] = False
    mm = {"vmas": vmas, "objects": objs}
    # plain shmem and an unsealed memfd: lazily; sealed memfd, deleted file, guarded, locked, private: not.
    assert lazy_object_ids(mm, []) == {0, 1}
    assert lazy_object_ids(mm, [{"type": "memfd", "object": 1}]) == {0}
    assert [v["start"] for v in lazy_vmas(mm, {0, 1})] == [0x100000, 0x200000]


@pytest.mark.skipif(not pagemap.guard_supported(), reason="lazarus check: PAGEMAP_SCAN has no PAGE_IS_GUARD")
def test_guard_regions_are_listed_and_never_counted_as_pages() -> None:
    m = mmap.mmap(-1, 16 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.write(b"x" * 16 * P)
        try:
            m.madvise(MADV_GUARD_INSTALL, 4 * P, 2 * P)
        except OSError as e:
            pytest.skip(f"MADV_GUARD_INSTALL: {e}")
        view = ctypes.c_char.from_buffer(m)
        base = ctypes.addressof(view)
        del view  # the buffer export would keep the mmap from closing

        def rel(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
            return [((s - base) // P, (e - base) // P) for s, e in runs]

        assert rel(pagemap.guard_pages(os.getpid(), base, base + 16 * P)) == [(4, 6)]
        assert rel(pagemap.present_pages(os.getpid(), base, base + 16 * P)) == [(0, 4), (6, 16)]
    finally:
        m.close()
