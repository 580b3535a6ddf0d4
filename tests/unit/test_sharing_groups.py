"""The pure grouping of lazarus/dump/sharing.py on made-up procfs/kcmp/pagemap answers: which fds are one open
file description, which pipes and memory objects span tasks, which pages are one copy-on-write page and who owns
them; ids stable whatever order the tasks come in."""

from __future__ import annotations

import os
import stat
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from lazarus.dump import sharing as S
from lazarus.kernel import abi
from lazarus.kernel.procfs import Vma

PAGE = abi.PAGE_SIZE
REG = stat.S_IFREG | 0o600
FIFO = stat.S_IFIFO | 0o600
PIPEFS = 15


def fd(n: int, target: str, ino: int, *, mode: int = REG, flags: int = os.O_RDWR, pos: int = 0,
       dev: int = 2049) -> S.FdSnap:
    return S.FdSnap(n, target, dev, ino, mode, flags, pos)


def task(pid: int, ppid: int, fds: tuple[S.FdSnap, ...] = (), vmas: tuple[Vma, ...] = ()) -> S.TaskSnap:
    return S.TaskSnap(pid, ppid, fds, vmas)


def kcmp_by(descr: dict[tuple[int, int], str], calls: list | None = None) -> S.SameFile:
    """A fake kcmp(KCMP_FILE): (pid, fd) -> description name."""
    def same(a: tuple[int, int], b: tuple[int, int]) -> bool:
        if calls is not None:
            calls.append((a, b))
        return descr[a] == descr[b]
    return same


def test_group_compares_only_within_a_key_and_against_one_representative() -> None:
    calls: list[tuple[int, int]] = []

    def same(a: int, b: int) -> bool:
        calls.append((a, b))
        return a % 3 == b % 3

    classes = S.group([1, 4, 7, 2, 5, 10], key=lambda x: x % 2, same=same)
    assert classes == [[1, 7], [4, 10], [2], [5]]
    assert all(a % 2 == b % 2 for a, b in calls)
    assert all(a in (1, 4, 7, 2, 5, 10) for a, _ in calls)


def test_inherited_description_is_found_and_a_second_open_is_not() -> None:
    # 10 and 11 both hold fd 3 (inherited) and fd 4 (each opened the file on its own: same inode, flags, pos).
    snaps = [task(10, 1, (fd(3, "/f", 7, pos=5), fd(4, "/f", 7))),
             task(11, 10, (fd(3, "/f", 7, pos=5), fd(4, "/f", 7)))]
    same = kcmp_by({(10, 3): "A", (11, 3): "A", (10, 4): "B", (11, 4): "C"})
    descs, pipes = S.find_descriptions(snaps, same)
    assert [(d.id, d.holders, d.pos, d.kind) for d in descs] == [("file-1", ((10, 3), (11, 3)), 5, "file")]
    assert pipes == []


def test_candidates_with_other_offsets_or_flags_are_never_compared() -> None:
    calls: list = []
    snaps = [task(10, 1, (fd(3, "/f", 7, pos=5),)), task(11, 10, (fd(3, "/f", 7, pos=6),)),
             task(12, 10, (fd(3, "/f", 7, pos=5, flags=os.O_RDONLY),))]
    descs, _ = S.find_descriptions(snaps, kcmp_by({(10, 3): "A", (11, 3): "A", (12, 3): "A"}, calls))
    assert descs == [] and calls == []


def test_pipe_with_ends_in_two_tasks_lists_both_descriptions() -> None:
    r = fd(5, "pipe:[99]", 99, mode=FIFO, flags=os.O_RDONLY, dev=PIPEFS)
    w = fd(6, "pipe:[99]", 99, mode=FIFO, flags=os.O_WRONLY, dev=PIPEFS)
    own = fd(7, "pipe:[98]", 98, mode=FIFO, flags=os.O_RDONLY, dev=PIPEFS)  # a pipe of one task only
    snaps = [task(20, 1, (w, own)), task(21, 20, (r,))]
    descs, pipes = S.find_descriptions(snaps, kcmp_by({(20, 6): "w", (21, 5): "r", (20, 7): "o"}))
    byid = {d.id: d for d in descs}
    assert len(pipes) == 1
    [p] = pipes
    assert (p.id, p.ino, p.fifo, p.pids) == ("pipe-1", 99, False, (20, 21))
    assert [byid[i].holders for i in p.readers] == [((21, 5),)]
    assert [byid[i].holders for i in p.writers] == [((20, 6),)]
    assert all(d.ino == 99 for d in descs), "a pipe held by one task is not shared"


def test_fifo_opened_by_two_tasks_is_a_shared_fifo() -> None:
    a = fd(3, "/tmp/q", 55, mode=FIFO, flags=os.O_RDONLY)
    b = fd(3, "/tmp/q", 55, mode=FIFO, flags=os.O_WRONLY)
    _, pipes = S.find_descriptions([task(1, 0, (a,)), task(2, 0, (b,))], kcmp_by({(1, 3): "r", (2, 3): "w"}))
    assert [(p.fifo, len(p.readers), len(p.writers)) for p in pipes] == [(True, 1, 1)]


def vma(start: int, npages: int, path: str = "", *, shared: bool = False, ino: int = 0, dev: tuple[int, int] = (0, 0),
        deleted: bool = False, pgoff: int = 0) -> Vma:
    return Vma(start, start + npages * PAGE, abi.PROT_READ | abi.PROT_WRITE, shared, pgoff, dev, ino, path, deleted)


def test_memory_objects_shared_by_mapping_or_fd() -> None:
    shm = vma(0x10000, 4, "/dev/zero", shared=True, ino=300, dev=(0, 1), deleted=True)
    mfd = vma(0x20000, 2, "/memfd:m", shared=True, ino=301, dev=(0, 1), deleted=True)
    priv = vma(0x30000, 8)  # private anonymous memory is not an object
    only_one = vma(0x40000, 1, "/dev/zero", shared=True, ino=302, dev=(0, 1), deleted=True)
    held = fd(9, "/memfd:h (deleted)", 303, dev=os.makedev(0, 1))  # a memfd held, not mapped, by both
    snaps = [task(2, 1, (held,), (shm, mfd, priv, only_one)),
             task(3, 2, (held, fd(4, "/memfd:m (deleted)", 301, dev=os.makedev(0, 1))), (shm, priv))]
    objs = S.find_memory(snaps)
    assert [(o.id, o.kind, o.ino, o.pids) for o in objs] == [
        ("mem-1", "shmem", 300, (2, 3)), ("mem-2", "memfd", 301, (2, 3)), ("mem-3", "memfd", 303, (2, 3))]
    assert objs[1].fds == ((3, 4),) and [m.pid for m in objs[1].mappings] == [2]
    assert objs[2].mappings == () and objs[2].fds == ((2, 9), (3, 9))


def test_states_group_by_kcmp() -> None:
    files = {1: "a", 2: "a", 3: "b", 4: "a"}
    out = S.find_states([4, 3, 2, 1], lambda a, b, kind: kind == "files" and files[a] == files[b])
    assert [(s.id, s.kind, s.pids) for s in out] == [("files-1", "files", (1, 2, 4))]


PARENTS = {1: 0, 2: 1, 3: 2, 4: 1}  # 1 -> 2 -> 3, and 1 -> 4


def entries(pfns: list[int | None], flags: int = 0) -> array:
    return array("Q", [0 if f is None else abi.PM_PRESENT | flags | f for f in pfns])


def test_common_ancestor() -> None:
    assert S.common_ancestor([3, 2], PARENTS) == 2
    assert S.common_ancestor([3, 4], PARENTS) == 1
    assert S.common_ancestor([3], PARENTS) == 3


def test_pages_shared_after_fork_with_owner_and_runs() -> None:
    base = 0x100000
    # 1 holds frames 100..107; 2 rewrote page 0 (frame 200) and shares the rest; 3 (forked by 2 after that)
    # writes nothing; 4 (forked by 1) rewrote page 7.
    frames = [S.PageFrames(1, base, entries(list(range(100, 108)))),
              S.PageFrames(2, base, entries([200, *range(101, 108)])),
              S.PageFrames(3, base, entries([200, *range(101, 108)])),
              S.PageFrames(4, base, entries([*range(100, 107), 400]))]
    runs = S.find_pages(frames, PARENTS)
    got = {(r.owner, r.owner_has, r.npages, r.at) for r in runs}
    assert got == {
        (1, True, 1, ((1, base), (4, base))),                                      # 2 and 3 rewrote it
        (1, True, 6, ((1, base + PAGE), (2, base + PAGE), (3, base + PAGE), (4, base + PAGE))),
        (1, True, 1, ((1, base + 7 * PAGE), (2, base + 7 * PAGE), (3, base + 7 * PAGE))),  # 4 rewrote it
        (2, True, 1, ((2, base), (3, base))),                                      # 2's own page, in 3 too
    }
    pairs = S.Sharing(pages=tuple(runs)).pages_between()
    assert pairs[(1, 2)] == 7 and pairs[(2, 3)] == 8 and pairs[(1, 4)] == 7 and pairs[(3, 4)] == 6


def test_pages_the_owner_rewrote_are_marked() -> None:
    # 1 forked 2 and 4, then rewrote its page: the children still share the old frame, 1 has another.
    frames = [S.PageFrames(1, 0x1000, entries([500])), S.PageFrames(2, 0x1000, entries([77])),
              S.PageFrames(4, 0x1000, entries([77]))]
    [run] = S.find_pages(frames, PARENTS)
    assert (run.owner, run.owner_has, run.at) == (1, False, ((2, 0x1000), (4, 0x1000)))


def test_pages_not_counted_as_shared() -> None:
    zero = 9
    frames = [S.PageFrames(1, 0x1000, entries([zero, 11, None, 13])),
              S.PageFrames(1, 0x9000, entries([14], abi.PM_FILE_SHARED)),
              S.PageFrames(1, 0xa000, entries([15, 15])),          # one frame twice in one task (KSM)
              S.PageFrames(2, 0x1000, entries([zero, 11, 12, 13], abi.PM_MMAP_EXCLUSIVE)),
              S.PageFrames(2, 0x9000, entries([14], abi.PM_FILE_SHARED)),
              S.PageFrames(2, 0xa000, entries([15, 15]))]
    assert S.find_pages(frames, PARENTS, zero=zero) == []


def test_runs_break_where_addresses_do_not_follow() -> None:
    # 2 moved its copy of the second page elsewhere (mremap): two runs, not one.
    frames = [S.PageFrames(1, 0x1000, entries([21, 22])), S.PageFrames(2, 0x1000, entries([21])),
              S.PageFrames(2, 0x8000, entries([22]))]
    runs = S.find_pages(frames, PARENTS)
    assert [r.at for r in runs] == [((1, 0x1000), (2, 0x1000)), ((1, 0x2000), (2, 0x8000))]


def test_ids_do_not_depend_on_the_order_of_tasks() -> None:
    snaps = [task(10, 1, (fd(3, "/f", 7), fd(5, "/g", 8))), task(11, 10, (fd(3, "/f", 7), fd(5, "/g", 8)))]
    same = kcmp_by({(10, 3): "A", (11, 3): "A", (10, 5): "B", (11, 5): "B"})
    one = S.find_descriptions(snaps, same)
    two = S.find_descriptions(list(reversed(snaps)), same)
    assert one == two and [d.id for d in one[0]] == ["file-1", "file-2"]
    frames = [S.PageFrames(1, 0x1000, entries([1, 2])), S.PageFrames(2, 0x1000, entries([1, 2]))]
    assert S.find_pages(frames, PARENTS) == S.find_pages(list(reversed(frames)), PARENTS)
    sharing = S.Sharing(descriptions=tuple(one[0]), pages=tuple(S.find_pages(frames, PARENTS)))
    js = sharing.to_json()
    assert js["files"][0] == {"id": "file-1", "kind": "file", "ino": 7, "flags": os.O_RDWR, "pos": 0,
                              "holders": [[10, 3], [11, 3]]}
    assert js["cow"] == [{"id": "cow-1", "owner": 1, "owner_has": True, "npages": 2,
                          "at": [[1, 0x1000], [2, 0x1000]]}]


def test_inherited_ranges_and_what_each_task_stores() -> None:
    base = 0x100000
    frames = [S.PageFrames(1, base, entries(list(range(100, 108)))),
              S.PageFrames(2, base, entries([200, *range(101, 108)])),
              S.PageFrames(3, base, entries([200, *range(101, 108)]))]
    runs = S.find_pages(frames, PARENTS)
    end = base + 8 * PAGE
    assert S.inherited_ranges(runs, 1) == []
    assert S.inherited_ranges(runs, 2) == [(base + PAGE, end)]  # page 0 is 2's own (it owns it, with 3)
    assert S.inherited_ranges(runs, 3) == [(base, end)]
    assert S.subtract([(base, end)], S.inherited_ranges(runs, 2)) == [(base, base + PAGE)]
    assert S.subtract([(base, end)], S.inherited_ranges(runs, 3)) == []


def test_subtract_and_merge() -> None:
    assert S.merge([(5, 7), (0, 2), (2, 3), (6, 9)]) == [(0, 3), (5, 9)]
    assert S.subtract([(0, 10), (20, 30)], [(2, 4), (8, 22), (25, 26)]) == [(0, 2), (4, 8), (22, 25), (26, 30)]
    assert S.subtract([(0, 10)], []) == [(0, 10)]
    assert S.subtract([(0, 10)], [(0, 10)]) == []


def test_refusals_name_pids_and_fds() -> None:
    sock = S.FileDescription("file-1", "socket", 8, 77, 2, 0, ((5, 4), (6, 4)))
    ok = S.FileDescription("file-2", "file", 8, 78, 2, 0, ((5, 3), (6, 3)))
    sysv = S.MemoryObject("mem-1", "sysv", 1, 32768, (S.Mapping(5, 0x1000, 0x2000, 0, True),
                                                      S.Mapping(6, 0x1000, 0x2000, 0, True)), ())
    vm = S.SharedState("vm-1", "vm", (5, 6))
    files = S.SharedState("files-1", "files", (5, 6))
    out = S.refusals(S.Sharing(descriptions=(sock, ok), memory=(sysv,), states=(vm, files)))
    # A System V segment is not refused here (dump/memory.py checks it: removed, attached only by the tree)
    assert out == ["pid 5 fd 4, pid 6 fd 4: one open socket file shared by several processes is not supported",
                   "pids 5, 6: an address space (CLONE_VM) shared by processes that are not threads of one another "
                   "is not supported"]
    assert S.refusals(S.Sharing(descriptions=(ok,), states=(files,))) == []

TREE = {1: 0, 2: 1, 3: 1, 4: 2, 5: 4}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(TREE)),
                       st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=1, max_size=24),
                       min_size=1, max_size=5),
       st.integers(0, 3))
def test_pages_against_brute_force(layout: dict[int, list[int | None]], shift: int) -> None:
    """Every (task, page) whose frame another task maps too is in exactly one run, with exactly the tasks that
    map that frame, owned by their nearest common ancestor; nothing else is."""
    base = 0x10000
    frames = [S.PageFrames(pid, base + (pid % 2) * shift * PAGE, entries(pfns)) for pid, pfns in layout.items()]
    want: dict[tuple[int, int], frozenset[int]] = {}
    by_frame: dict[int, list[tuple[int, int]]] = {}
    for pf in frames:
        for i, e in enumerate(pf.entries):
            if e:
                by_frame.setdefault(e & abi.PM_PFN_MASK, []).append((pf.pid, pf.start + i * PAGE))
    for at in by_frame.values():
        pids = [p for p, _ in at]
        if len(at) > 1 and len(set(pids)) == len(pids):
            for p, a in at:
                want[(p, a)] = frozenset(pids)
    got: dict[tuple[int, int], frozenset[int]] = {}
    for run in S.find_pages(frames, TREE):
        assert run.owner == S.common_ancestor(run.pids, TREE)
        assert run.owner_has == (run.owner in run.pids)
        for k in range(run.npages):
            for p, a in run.at:
                assert (p, a + k * PAGE) not in got
                got[(p, a + k * PAGE)] = frozenset(run.pids)
    assert got == want
