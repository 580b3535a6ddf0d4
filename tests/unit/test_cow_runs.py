"""The pure parts of copy-on-write runs kept by a tree restore: which runs dump/cow.py keeps (a fork can give
them back), cow.json's validation (images/validate.py check_cow), and what a lazy server is left to serve
(images/mm.py without)."""

from __future__ import annotations

from typing import Any

import pytest

from lazarus.dump.cow import keepable, to_json
from lazarus.dump.sharing import SharedPages
from lazarus.errors import ImageError
from lazarus.images.mm import without
from lazarus.images.validate import check_cow
from lazarus.kernel.procfs import Vma
from lazarus.restore.cow import plans

PAGE = 4096
A = 0x7F00_0000_0000
PARENTS = {1: 0, 2: 1, 3: 2, 4: 1}


def vma(start: int = A, end: int = A + 64 * PAGE, path: str = "") -> Vma:
    return Vma(start, end, 3, False, start // PAGE, (0, 0), 0, path)


def run(owner: int, pids: tuple[int, ...], n: int = 4, at: int = A, owner_has: bool = True) -> SharedPages:
    return SharedPages("x", owner, owner_has, n, tuple((p, at) for p in pids))


VMAS = {p: [vma()] for p in (1, 2, 3, 4)}


def test_kept_down_the_tree() -> None:
    got = keepable([run(1, (1, 2, 3)), run(2, (2, 3), at=A + 8 * PAGE)], PARENTS, VMAS)
    assert [(r.id, r.owner) for r in got] == [("cow-1", 1), ("cow-2", 2)]


@pytest.mark.parametrize("r, vmas", [
    (run(1, (2, 4), owner_has=False), VMAS),  # siblings sharing a page their parent rewrote
    (run(1, (1, 3)), VMAS),  # the grandchild's parent (2) does not hold it: no way down
    (run(1, (1, 2)), {**VMAS, 2: [vma(end=A + 32 * PAGE)]}),  # the child's vma is no longer its parent's
    (run(1, (1, 2), n=80), VMAS),  # beyond the vma
])
def test_not_kept(r: SharedPages, vmas: dict[int, list[Vma]]) -> None:
    assert keepable([r], PARENTS, vmas) == []


def task(vmas: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"mm": {"exe": "/bin/x", "vmas": vmas if vmas is not None else [
        {"start": A, "end": A + 64 * PAGE, "shared": False, "kind": "anon", "pages": []}]}}


TASKS = {p: task() for p in (1, 2, 3)}


def cow(**over: Any) -> dict[str, Any]:
    base = {"1": {"owned": [[A, 4]], "inherited": []},
            "2": {"owned": [[A + 8 * PAGE, 4]], "inherited": [[A, 4]]},
            "3": {"owned": [], "inherited": [[A, 4], [A + 8 * PAGE, 4]]}}
    return {**base, **over}


def test_check_cow_accepts() -> None:
    check_cow(cow(), PARENTS, TASKS)


@pytest.mark.parametrize("bad, why", [
    ([], "must be an object"),
    (cow(**{"9": {"owned": [], "inherited": []}}), "pid 9: not a live task"),
    (cow(**{"1": {"owned": [[A, 4]]}}), "'owned' and 'inherited' only"),
    (cow(**{"1": {"owned": [[A, "4"]], "inherited": []}}), "array of \\[start, npages\\]"),
    (cow(**{"1": {"owned": [[A + 1, 4]], "inherited": []}}), "unaligned"),
    (cow(**{"1": {"owned": [[A + 8 * PAGE, 1], [A, 4]], "inherited": []}}), "out of order"),
    (cow(**{"1": {"owned": [[A, 0]], "inherited": []}}), "empty"),
    (cow(**{"2": {"owned": [[A, 4]], "inherited": [[A, 4]]}}), "both owned and inherited"),
    (cow(**{"3": {"owned": [], "inherited": [[A, 5]]}}), "pid 3: inherits 0x7f0000004000, which its parent"),
    (cow(**{"2": {"owned": [], "inherited": [[A, 4]]}, "1": {"owned": [[A, 4]], "inherited": []},
            "3": {"owned": [], "inherited": [[A + 8 * PAGE, 1]]}}), "pid 3: inherits"),
    (cow(**{"1": {"owned": [[A, 80]], "inherited": []}, "2": {"owned": [], "inherited": [[A, 80]]}}),
     "outside its private vmas"),
])
def test_check_cow_refuses(bad: Any, why: str) -> None:
    with pytest.raises(ImageError, match=why):
        check_cow(bad, PARENTS, TASKS)


def test_check_cow_refuses_a_vma_not_the_parents() -> None:
    tasks = {**TASKS, 2: task([{"start": A, "end": A + 32 * PAGE, "shared": False, "kind": "anon"}])}
    with pytest.raises(ImageError, match="not its parent's"):
        check_cow(cow(), PARENTS, tasks)


def test_without_cuts_served_runs() -> None:
    v = {"start": A, "end": A + 16 * PAGE, "pages": [[A, 16, 100]]}
    got = without([v], [(A + 2 * PAGE, A + 4 * PAGE), (A + 15 * PAGE, A + 20 * PAGE)])
    assert got[0]["pages"] == [[A, 2, 100], [A + 4 * PAGE, 11, 104]]
    assert without([v], []) == [v]


def test_to_json_and_plans() -> None:
    runs = [run(1, (1, 2, 3)), run(2, (2, 3), at=A + 8 * PAGE), run(1, (1, 2), at=A + 4 * PAGE)]
    got = to_json(runs)
    assert got == {"1": {"owned": [[A, 8]], "inherited": []},
                   "2": {"owned": [[A + 8 * PAGE, 4]], "inherited": [[A, 8]]},
                   "3": {"owned": [], "inherited": [[A, 4], [A + 8 * PAGE, 4]]}}
    check_cow(got, PARENTS, TASKS)
    p = plans(got, PARENTS, {1: "/bin/x", 2: "/bin/x", 3: "/bin/y"})
    assert p[1].owned == [(A, A + 8 * PAGE)] and not p[1].inherited
    assert p[2].inherited == [(A, A + 8 * PAGE)] and p[2].owned == [(A + 8 * PAGE, A + 12 * PAGE)]
    assert p[2].same_exe and not p[3].same_exe
    assert p[2].kept_vmas(TASKS[2]["mm"]["vmas"]) == TASKS[2]["mm"]["vmas"] and p[1].kept_vmas([]) == []


def test_only_keeps_the_ranges() -> None:
    from lazarus.images.mm import only
    v = {"start": A, "end": A + 16 * PAGE, "pages": [[A, 4, 100], [A + 8 * PAGE, 8, 104]]}
    got = only([v], [(A + 2 * PAGE, A + 3 * PAGE), (A + 7 * PAGE, A + 10 * PAGE), (A + 15 * PAGE, A + 20 * PAGE)])
    assert got[0]["pages"] == [[A + 2 * PAGE, 1, 102], [A + 8 * PAGE, 2, 104], [A + 15 * PAGE, 1, 111]]
    assert only([v], [(A + 4 * PAGE, A + 8 * PAGE)]) == []


def test_without_many_ranges_is_linear() -> None:
    n = 20000
    v = {"start": A, "end": A + 8 * n * PAGE, "pages": [[A + 8 * i * PAGE, 1, i] for i in range(n)]}
    holes = [(A + 8 * i * PAGE, A + (8 * i + 7) * PAGE) for i in range(0, n, 2)]
    got = without([v], holes)
    assert len(got[0]["pages"]) == n // 2


def test_subtract_is_the_page_set_difference() -> None:
    """images/ranges.py subtract (the dump's page runs, the restore's holes) is the set difference of the pages,
    merged into maximal ranges, on sorted, disjoint input with adjacent ranges, as both callers give it."""
    import itertools
    import random

    from lazarus.images.ranges import subtract
    rng = random.Random(9)

    def runs(k: int) -> list[tuple[int, int]]:
        pos, out = rng.randrange(50) * 4096, []
        for _ in range(k):
            pos += rng.choice([0, 0, 1, 2, 5]) * 4096
            n = rng.randrange(1, 8) * 4096
            out.append((pos, pos + n))
            pos += n
        return out

    def pages(rs: list[tuple[int, int]]) -> set[int]:
        return {p for s, e in rs for p in range(s, e, 4096)}
    for _ in range(3000):
        r, h = runs(rng.randrange(6)), runs(rng.randrange(30))
        got = subtract(r, h)
        assert pages(got) == pages(r) - pages(h), (r, h)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(got)), got  # sorted, merged: no two touch
    assert subtract([(0, 4096), (4096, 3 * 4096)], [(4096, 8192)]) == [(0, 4096), (8192, 3 * 4096)]


def test_check_cow_names_the_first_address_outside() -> None:
    """The bisection that passes a child's thousands of inherited runs at once still finds the same first
    address outside when one is (validate.py _not_within)."""
    from lazarus.images.validate import _not_within
    outer = [(0, 100), (100, 200), (300, 400)]
    assert _not_within([(10, 20), (150, 210)], outer) == 200
    assert _not_within([(10, 20), (150, 200), (300, 310)], outer) is None
    assert _not_within([(250, 260)], outer) == 250
    assert _not_within([], outer) is None
    assert _not_within([(0, 1)], []) == 0


def test_holes_are_the_subtraction() -> None:
    """CowPlan.holes (gaps between runs, by C-level maps) gives what ranges.subtract gives, on random runs
    (touching, spanning two kept vmas, reaching past them) and kept vmas (adjacent, apart)."""
    import random

    from lazarus.images.ranges import subtract
    from lazarus.restore.cow import CowPlan
    rng = random.Random(3)
    page = 4096
    for _ in range(500):
        kept, pos = [], 0x400000
        for _ in range(rng.randint(1, 4)):
            pos += page * rng.choice([0, 0, 5])
            n = rng.randint(1, 40)
            kept.append({"start": pos, "end": pos + n * page})
            pos += n * page
        runs, a = [], 0x400000 - 3 * page
        while a < pos + 3 * page:
            a += page * rng.randint(0, 3)
            n = rng.randint(1, 6)
            runs.append((a, a + n * page))
            a += n * page
        plan = CowPlan(1, inherited=runs)
        assert plan.holes(kept) == subtract(sorted((v["start"], v["end"]) for v in kept), runs), (kept, runs)


def test_same_files_kept_from_the_fork() -> None:
    """A child's private file mapping exactly its parent's is kept (restore/cow.py same_files), pages or not;
    one that differs in anything but its pages, or that a fork does not hand over as it is, is mapped anew."""
    from lazarus.restore.cow import CowPlan

    def vma(start: int, **changes: Any) -> dict[str, Any]:
        v = {"start": start, "end": start + 0x2000, "kind": "file", "path": "/usr/lib/libc.so.6", "offset": 0,
             "prot": 5, "shared": False, "vmflags": ["rd", "ex", "mr", "mw", "me"], "pages": [],
             "file": {"ino": 7, "size": 100, "mtime_ns": 1}}
        return {**v, **changes}
    parent = [vma(0x1000), vma(0x10000, pages=[[0x10000, 1, 0]]), vma(0x20000), vma(0x30000), vma(0x40000),
              vma(0x50000, vmflags=["rd", "lo"]), vma(0x60000, shared=True), vma(0x70000, guards=[[0x70000, 1]]),
              vma(0x80000, kind="anon", path="")]
    child = [vma(0x1000), vma(0x10000, pages=[[0x10000, 1, 3]]), vma(0x20000, offset=0x1000), vma(0x30000, prot=1),
             vma(0x40000, file={"ino": 8, "size": 100, "mtime_ns": 1}), vma(0x50000, vmflags=["rd", "lo"]),
             vma(0x60000, shared=True), vma(0x70000, guards=[[0x70000, 1]]), vma(0x80000, kind="anon", path=""),
             vma(0x90000)]
    plan = CowPlan(2, inherited=[(0x80000, 0x81000)], same_exe=True, parent_vmas=parent)
    assert [v["start"] for v in plan.same_files(child)] == [0x1000, 0x10000]
    assert [v["start"] for v in plan.kept_vmas(child)] == [0x1000, 0x10000, 0x80000]
    plan.same_exe = False  # another executable: set_mm must be able to set its link
    assert plan.same_files(child) == []
    assert CowPlan(2, same_exe=True, parent_vmas=parent).same_files(child) == []  # no run inherited
