"""Objects shared between processes, on real forked programs: detection at dump (lazarus/dump/sharing.py) finds
exactly what the share_tree target knows it shares, and the restore primitives (lazarus/restore/sharing.py) put
one open file description, one pipe with its queued data and one memory object into several live stopped
share_take targets, which then check them themselves."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazarus.dump import sharing as detect
from lazarus.kernel import abi, procfs, ptrace
from lazarus.remote import RemoteTask, find_syscall_insn, free_gap
from lazarus.restore import sharing as prim

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root
PAGE = abi.PAGE_SIZE


def _tree(target: H.Target) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in target.log_text().splitlines():
        m = re.match(r"# (tree|cow|shm|memfd) (.*)", line)
        if m:
            out[m.group(1)] = [int(x, 0) for x in m.group(2).split()]
    return out


def _in(run: detect.SharedPages, lo: int, hi: int) -> bool:
    return all(lo <= a < hi for _, a in run.at)


def test_detection_finds_exactly_what_the_tree_shares(harness: H.Harness) -> None:
    target = harness.start_target("share_tree")
    info = _tree(target)
    p, c, g, f = info["tree"]
    everyone = {p, c, g, f}
    found = detect.detect([p, c, g, f])

    def holders(fd: int) -> set[tuple[int, int]]:
        ds = [d for d in found.descriptions if any(h[1] == fd for h in d.holders)]
        assert len(ds) == 1, f"fd {fd}: {ds}"
        return set(ds[0].holders)

    # The inherited file: one description, its offset, in all four.
    d30 = next(d for d in found.descriptions if (p, 30) in d.holders)
    assert set(d30.holders) == {(x, 30) for x in everyone} and d30.pos == 37 and d30.kind == "file"
    # fd 34: the same file opened by P and by C on their own (same inode, flags, offset): two descriptions,
    # P's held by P and F (one fd table), C's by C and G (inherited); none held by both sides.
    d34 = [set(d.holders) for d in found.descriptions if any(h[1] == 34 for h in d.holders)]
    assert sorted(d34, key=min) == sorted([{(p, 34), (f, 34)}, {(c, 34), (g, 34)}], key=min)
    assert holders(33) == {(x, 33) for x in everyone}
    # The pipe: read end in C and G, write end in P and F; one pipe record naming both descriptions.
    [pipe] = [x for x in found.pipes if not x.fifo]
    byid = {d.id: d for d in found.descriptions}
    assert [set(byid[i].holders) for i in pipe.readers] == [{(c, 31), (g, 31)}]
    assert [set(byid[i].holders) for i in pipe.writers] == [{(p, 32), (f, 32)}]
    assert not pipe.fifo
    # The FIFO opened read-write: one description, both a reader and a writer of one shared FIFO record.
    [fifo] = [x for x in found.pipes if x.fifo]
    assert fifo.readers == fifo.writers and set(byid[fifo.readers[0]].holders) == {(x, 36) for x in everyone}
    # What cannot come back shared yet is named: the eventfd (and nothing of the rest).
    [refused] = detect.refusals(found)
    assert "fd 35" in refused and "anon" in refused and f"pid {g} fd 35" in refused, refused
    # Memory: the memfd (mapped and held at fd 33) and the shared anonymous memory, mapped by all four.
    kinds = {m.kind: m for m in found.memory}
    assert set(kinds) == {"memfd", "shmem"}, found.memory
    assert {(x.pid, x.start) for x in kinds["memfd"].mappings} == {(x, info["memfd"][0]) for x in everyone}
    assert set(kinds["memfd"].fds) == {(x, 33) for x in everyone}
    shm_at, shm_pages = info["shm"]
    assert {(x.pid, x.start, x.end) for x in kinds["shmem"].mappings} == {
        (x, shm_at, shm_at + shm_pages * PAGE) for x in everyone}
    # fd table and fs state: P and F only (clone with CLONE_FILES | CLONE_FS); no shared address space.
    assert {(s.kind, s.pids) for s in found.states} == {("files", (p, f)), ("fs", (p, f))}
    # Copy-on-write: C rewrote pages 0, 8, 16, ... of the region, then forked G; F and G wrote nothing.
    cow_at, npages = info["cow"]
    lo, hi = cow_at, cow_at + npages * PAGE
    runs = [r for r in found.pages if _in(r, lo, hi)]
    pair: dict[frozenset[int], int] = {}
    for r in runs:
        ps = sorted(r.pids)
        for i, a in enumerate(ps):
            for b in ps[i + 1:]:
                pair[frozenset((a, b))] = pair.get(frozenset((a, b)), 0) + r.npages
    rewritten = npages // 8
    assert pair == {frozenset((p, c)): npages - rewritten, frozenset((p, g)): npages - rewritten,
                    frozenset((p, f)): npages, frozenset((c, g)): npages, frozenset((c, f)): npages - rewritten,
                    frozenset((g, f)): npages - rewritten}, pair
    # Each page's owner is the holders' nearest common ancestor, and holds it: P for the pages nobody wrote,
    # C for the ones C wrote (shared with G only).
    for r in runs:
        rel = (r.at[0][1] - lo) // PAGE
        if set(r.pids) == {c, g}:
            assert r.owner == c and r.owner_has and rel % 8 == 0, r
        else:
            assert r.owner == p and r.owner_has, r
    assert sum(r.npages for r in runs if set(r.pids) == {c, g}) == rewritten
    # The JSON shape for the image, ids stable across two detections of the same tree.
    assert detect.detect([p, c, g, f]).to_json() == found.to_json()
    target.signal(signal.SIGUSR2)
    H.expect_pass(target.wait_result(), target)


# -- restore primitives ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def injected(pid: int) -> Iterator[RemoteTask]:
    """Seize and stop a waiting target, inject through a RemoteTask, put it back exactly and let it go."""
    ptrace.seize(pid, abi.PTRACE_O_TRACESYSGOOD)
    try:
        ptrace.interrupt(pid)
        while True:
            st = ptrace.wait(pid)
            if st.stopped and st.event == abi.PTRACE_EVENT_STOP:
                break
            ptrace.cont(pid, st.stop_sig)
        vdso = next(v for v in procfs.read_maps(pid) if v.path == "[vdso]")
        ip = find_syscall_insn(pid, vdso.start, vdso.end)
        assert ip is not None
        with RemoteTask(pid, ip) as task:
            yield task
    finally:
        with contextlib.suppress(Exception):
            ptrace.detach(pid)


def _fd_offset(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_CUR)


def test_primitives_put_one_file_pipe_and_memory_into_two_tasks(harness: H.Harness, tmp_path: Path) -> None:
    a = harness.start_target("share_take")
    b = harness.start_target("share_take")
    for t in (a, b):
        assert H.wait_in_syscall(t.pid, H.SYS_RT_SIGSUSPEND), t.describe()
    # One open file description (offset 11, O_APPEND) given to both at fd 40.
    path = tmp_path / "shared-file"
    path.write_bytes(b"x" * 64)
    ours_file = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    os.lseek(ours_file, 11, os.SEEK_SET)
    prim.set_status(ours_file, os.O_APPEND)
    # One pipe with 70000 queued bytes (more than the default capacity): read end to a, write end to b.
    data = bytearray(70000)
    seed = 0x77
    data[:] = _laz_fill(len(data), seed)
    r, w = prim.new_pipe(bytes(data), 128 * 1024)
    # Shared anonymous memory: 3 pages of pattern and a page of slots, made once, mapped into both.
    shm_seed, npages = 0x99, 4
    with injected(a.pid) as ta:
        ours_shm = prim.new_shmem(ta, npages * PAGE)
    prim.fill(ours_shm, [(0, _laz_fill((npages - 1) * PAGE, shm_seed))])
    memfd = prim.new_memfd("share-take", 2 * PAGE)
    prim.fill(memfd, [(0, _laz_fill(2 * PAGE, 5))])
    expect: dict[int, list[str]] = {a.pid: [], b.pid: []}
    for slot, (t, pipe_fd, pipe_line) in enumerate(((a, r, "pread 41 70000 119"), (b, w, "pwrite 41 token-b"))):
        with injected(t.pid) as task:
            shm_at = free_gap(t.pid, npages * PAGE)
            with prim.FdCourier(task) as courier:
                courier.give(ours_file, 40)
                courier.give(pipe_fd, 41, cloexec=True)
                prim.map_object(courier, ours_shm, [prim.Placement(shm_at, shm_at + npages * PAGE, 0)])
                mfd_at = free_gap(t.pid, 2 * PAGE)
                prim.map_object(courier, memfd, [prim.Placement(mfd_at, mfd_at + 2 * PAGE, 0)])
        expect[t.pid] += [f"file 40 {11 if slot == 0 else 65} {os.O_RDWR | os.O_APPEND}", "cloexec 40 0",
                          "cloexec 41 1", pipe_line, f"shm {shm_at:x} {npages} {shm_seed} {slot}",
                          f"maps {shm_at:x} /dev/zero", f"maps {mfd_at:x} /memfd:share-take"]
        # The task now holds the very same descriptions (kcmp), not copies.
        assert detect.kcmp.same_file(os.getpid(), ours_file, t.pid, 40)
        assert detect.kcmp.same_file(os.getpid(), pipe_fd, t.pid, 41)
    os.close(w)  # b's copy of the write end is the only writer now
    # a first: its one byte through fd 40 (O_APPEND) moves the shared offset to 65, where b must find it.
    for t in (a, b):
        Path(f"{t.log}.expect").write_text("\n".join(expect[t.pid]) + "\n")
        t.signal(signal.SIGUSR2)
        H.expect_pass(t.wait_result(), t)
    # Seen from our side: the offset both moved, the token b wrote, the slots both wrote.
    assert _fd_offset(ours_file) == 64 + 2  # O_APPEND: each write went to the end
    os.set_blocking(r, False)
    assert os.read(r, 100) == b"token-b"
    slots = os.pread(ours_shm, 16, (npages - 1) * PAGE)
    assert [int.from_bytes(slots[i:i + 8], "little") for i in (0, 8)] == [a.pid, b.pid]
    for fd in (ours_file, r, ours_shm, memfd):
        os.close(fd)


def test_share_take_fails_without_the_injected_state(harness: H.Harness) -> None:
    """The target's checks can fail: the same expectations, nothing injected."""
    t = harness.start_target("share_take")
    Path(f"{t.log}.expect").write_text("file 40 11 1026\ncloexec 41 1\npread 41 10 1\nshm 10000000 4 1 0\n"
                                       "maps 10000000 /dev/zero\n")
    t.signal(signal.SIGUSR2)
    result = t.wait_result()
    assert result.startswith("FAIL") and "fd 40" in result and "no mapping" in result, result


def _laz_fill(n: int, seed: int) -> bytes:
    """common.h laz_fill_offset(buf, n, 0, seed): u64 number i is laz_mix(i ^ seed), little-endian."""
    return b"".join(_mix((i ^ seed) & (2**64 - 1)).to_bytes(8, "little") for i in range(n // 8))


def _mix(x: int) -> int:
    m = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_fd_delivery_pidfd_getfd_against_scm_rights(harness: H.Harness) -> None:
    """The measurement behind FdCourier's choice (printed with -s): both deliver the same descriptions; the
    median time per fd of each way for 1, 16 and 64 fds."""
    t = harness.start_target("share_take")
    assert H.wait_in_syscall(t.pid, H.SYS_RT_SIGSUSPEND), t.describe()
    ours = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(64)]
    try:
        with injected(t.pid) as task:
            task.alloc_scratch(abi.PAGE_SIZE)
            for n in (1, 16, 64):
                times: dict[str, list[float]] = {"pidfd_getfd": [], "scm_rights": []}
                for _ in range(3):
                    t0 = time.perf_counter()
                    with prim.FdCourier(task) as courier:
                        for i in range(n):
                            courier.give(ours[i], 100 + i)
                    times["pidfd_getfd"].append(time.perf_counter() - t0)
                    assert all(detect.kcmp.same_file(os.getpid(), ours[i], t.pid, 100 + i) for i in range(n))
                    t0 = time.perf_counter()
                    prim.give_scm(task, [(ours[i], 200 + i, False) for i in range(n)])
                    times["scm_rights"].append(time.perf_counter() - t0)
                    assert all(detect.kcmp.same_file(os.getpid(), ours[i], t.pid, 200 + i) for i in range(n))
                    for i in range(n):
                        task.syscall(abi.SYS.close, 100 + i)
                        task.syscall(abi.SYS.close, 200 + i)
                print(f"fd delivery, {n} fds: " + ", ".join(
                    f"{k} {statistics.median(v) / n * 1e6:.0f} us/fd" for k, v in times.items()))
            assert sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/fd")) == [0, 1, 2, 3]
    finally:
        for fd in ours:
            os.close(fd)
    t.signal(signal.SIGKILL)


# -- the restore order for copy-on-write pages ----------------------------------------------------------------
COW_SEED = 0xC0FE


def _stamp(page: int, seed: int) -> bytes:
    return _mix(page ^ seed).to_bytes(8, "little") * (PAGE // 8)


def _tree_pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_cow_pages_placed_in_the_parent_before_fork_are_never_copied_twice(harness: H.Harness) -> None:
    """The order docs/IMAGES.md proposes, on a real fork: the shared pages go into the parent before it forks;
    the child drops only its own pages and serves them lazily from a userfaultfd registered over the whole
    region. Only the child's own pages fault (exactly one in eight), and the tree's Pss is that of the
    original tree (one copy of the shared pages), not that of a copy per task."""
    from lazarus.kernel import features, vm
    from lazarus.kernel.syscall import buffer_address
    from lazarus.kernel.uffd import Outcome, PageFault
    from lazarus.restore.uffd import uffd_in_task

    lacking = features.missing_for("lazy")
    if lacking:
        pytest.skip("lazarus check: lazy needs " + ", ".join(f"{f.name} ({f.detail})" for f in lacking))
    mib = int(os.environ.get("LAZARUS_COW_MIB", "32"))  # the tree is 256: LAZARUS_COW_MIB=256 pytest -s -k cow
    t = harness.start_target("cow_fork", str(mib))
    start, size = (int(x, 0) for x in re.search(r"# region (\S+) (\S+)", t.log_text()).groups())
    npages = size // PAGE
    for first in range(0, npages, 1024):  # the parent's pages: shared by both after the fork
        n = min(1024, npages - first)
        vm.write(t.pid, start + first * PAGE, b"".join(_stamp(p, COW_SEED) for p in range(first, first + n)))
    parent_pss = _tree_pss([t.pid])
    t.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not (m := re.search(r"# child: (\d+)", t.log_text())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m, t.describe()
    child = int(m.group(1))
    harness.register(child, "cow_fork child")
    assert H.wait_in_syscall(child, H.SYS_RT_SIGSUSPEND), t.describe()
    own = [(start + p * PAGE, start + (p + 1) * PAGE) for p in range(0, npages, 8)]
    with injected(child) as task:
        task.alloc_scratch(PAGE)
        assert prim.drop_pages(task, own) == npages // 8 * PAGE
        uffd = uffd_in_task(task, [(start, start + size)], 0)
    src = bytearray(PAGE)
    faults: list[int] = []
    try:
        t.signal(signal.SIGUSR2)
        os.kill(child, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while "# checked" not in t.log_text() and time.monotonic() < deadline:
            for ev in uffd.read_events():
                if isinstance(ev, PageFault):
                    page = (ev.address - start) // PAGE
                    faults.append(page)
                    src[:] = _stamp(page, COW_SEED + 1)
                    _, outcome = uffd.copy(ev.address & ~(PAGE - 1), buffer_address(src), PAGE)
                    assert outcome in (Outcome.DONE, Outcome.EXISTS), outcome
            time.sleep(0.001)
        assert "# checked" in t.log_text(), t.describe()
        pss = _tree_pss([t.pid, child])
    finally:
        uffd.close()
    assert sorted(faults) == list(range(0, npages, 8)), f"{len(faults)} faults, not the child's own pages only"
    # One copy of the region, plus the child's own eighth, plus the two small processes' own memory.
    expected = parent_pss + size // 8 + (parent_pss - size)
    assert pss <= 1.15 * expected and pss < 1.5 * size, (pss / 2**20, expected / 2**20)
    print(f"cow order, {mib} MiB region: tree Pss {pss / 2**20:.1f} MiB (one copy per task: "
          f"{(2 * parent_pss) / 2**20:.1f} MiB), {len(faults)} lazy faults for {npages} pages")
    t.signal(signal.SIGUSR2)
    H.expect_pass(t.wait_result(), t)


def test_cow_fork_fails_without_the_placed_pages(harness: H.Harness) -> None:
    """cow_fork's checks can fail: nothing placed in the parent, nothing served to the child."""
    t = harness.start_target("cow_fork", "1")
    t.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not (m := re.search(r"# child: (\d+)", t.log_text())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m, t.describe()
    harness.register(int(m.group(1)), "cow_fork child")
    assert H.wait_in_syscall(int(m.group(1)), H.SYS_RT_SIGSUSPEND), t.describe()
    t.signal(signal.SIGUSR2)
    os.kill(int(m.group(1)), signal.SIGUSR2)
    assert H.wait_for_line(t.log, "# checked", 10), t.describe()
    t.signal(signal.SIGUSR2)
    result = t.wait_result()
    assert result.startswith("FAIL") and "parent: page 0" in result and "child: page 0" in result, result


def test_a_file_opened_by_its_first_holder_is_taken_and_given_to_another(harness: H.Harness,
                                                                        tmp_path: Path) -> None:
    """take(): the description a task opened itself (under its own credentials) becomes ours, then b's."""
    a = harness.start_target("share_take")
    b = harness.start_target("share_take")
    path = tmp_path / "opened-by-a"
    path.write_bytes(b"y" * 32)
    with injected(a.pid) as ta:
        ta.alloc_scratch(PAGE)
        fd = ta.syscall(abi.SYS.openat, abi.AT_FDCWD & (2**64 - 1), ta.cstring(str(path)), os.O_RDWR, 0)
        ta.syscall(abi.SYS.lseek, fd, 5, os.SEEK_SET)
        ours = prim.take(a.pid, fd)
    try:
        with injected(b.pid) as tb, prim.FdCourier(tb) as courier:
            courier.give(ours, 43)
        assert detect.kcmp.same_file(a.pid, fd, b.pid, 43)
        assert not detect.kcmp.same_file(a.pid, fd, b.pid, 0)
        assert _fd_offset(ours) == 5
        assert os.readlink(f"/proc/{b.pid}/fd/43") == str(path)
    finally:
        os.close(ours)
    for t in (a, b):
        t.signal(signal.SIGKILL)
