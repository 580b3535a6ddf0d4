"""Property tests of lazarus.lazy.ranges.PendingPages against a dict model {page address: file index}."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lazarus.lazy.ranges import PAGE_SIZE, PendingPages

P = PAGE_SIZE
SPACE = 256  # pages of address space the state machine plays in


def model_of(runs):
    m = {}
    for start, n, f in runs:
        for k in range(n):
            m[start + k * P] = f + k
    return m


def as_model(pp: PendingPages) -> dict[int, int]:
    return model_of(pp.runs())


@st.composite
def run_lists(draw, space=SPACE):
    """Non-overlapping runs with distinct, arbitrary file indexes."""
    cuts = sorted(set(draw(st.lists(st.integers(0, space), max_size=24))))
    runs = []
    fidx = draw(st.integers(0, 1000))
    for a, b in zip(cuts, cuts[1:], strict=False):
        if draw(st.booleans()):
            runs.append((a * P, b - a, fidx))
            fidx += (b - a) + draw(st.integers(0, 5))
    draw(st.randoms()).shuffle(runs)
    return runs


@given(run_lists())
def test_construction_and_lookup(runs):
    pp = PendingPages(runs)
    m = model_of(runs)
    assert pp.pages == len(m) == len(pp)
    assert as_model(pp) == m
    for page in range(SPACE + 2):
        a = page * P
        assert pp.lookup(a + 123 if page % 3 else a) == m.get(a)
        assert (a in pp) == (a in m)


def test_overlap_rejected():
    with pytest.raises(ValueError):
        PendingPages([(0, 4, 0), (3 * P, 2, 10)])
    with pytest.raises(ValueError):
        PendingPages([(100, 1, 0)])
    pp = PendingPages([(0, 4, 0)])
    with pytest.raises(ValueError):
        pp.add(2 * P, 4, 9)
    pp.add(4 * P, 1, 9)
    assert pp.lookup(4 * P) == 9


class PendingMachine(RuleBasedStateMachine):
    @initialize(runs=run_lists())
    def setup(self, runs):
        self.pp = PendingPages(runs)
        self.m = model_of(runs)

    @rule(a=st.integers(0, SPACE), n=st.integers(0, 40))
    def take(self, a, n):
        got = self.pp.take(a * P, n * P)
        want = [x for x in self.m if a * P <= x < (a + n) * P]
        for x in want:
            del self.m[x]
        assert got == len(want)

    @rule(a=st.integers(0, SPACE), n=st.integers(0, 40), off=st.integers(0, P - 1))
    def remove_unaligned(self, a, n, off):
        start, end = a * P + off, (a + n) * P + off
        got = self.pp.remove(start, end)
        lo, hi = start & ~(P - 1), (end + P - 1) & ~(P - 1)
        want = [x for x in self.m if lo <= x < hi] if end > start else []
        for x in want:
            del self.m[x]
        assert got == len(want)

    @rule(a=st.integers(0, SPACE), b=st.integers(0, SPACE + 64), n=st.integers(1, 40))
    def remap(self, a, b, n):
        if a == b or (a < b + n and b < a + n):
            return  # mremap never overlaps source and destination
        moved = {x: f for x, f in self.m.items() if a * P <= x < (a + n) * P}
        for x in list(self.m):
            if a * P <= x < (a + n) * P or b * P <= x < (b + n) * P:
                del self.m[x]
        for x, f in moved.items():
            self.m[x - a * P + b * P] = f
        got = self.pp.remap(a * P, b * P, n * P)
        assert got == len(moved)
        # the kernel then sends UNMAP for the old range: nothing of the moved pages may be lost
        self.pp.remove(a * P, (a + n) * P)

    @rule()
    def fork(self):
        at_fork = dict(self.m)
        child = self.pp.copy()
        self.pp.take(0, 8 * P)  # parent moves on; the child's copy must not change
        for x in [x for x in self.m if x < 8 * P]:
            del self.m[x]
        assert child.pages == len(at_fork)
        assert as_model(child) == at_fork  # every page and its file index, as at the fork
        # and the other way round: the child draining its copy leaves the parent's set alone (invariant)
        child.take(0, (SPACE + 128) * P)
        assert not child and child.lookup(next(iter(at_fork), 0)) is None

    @rule(a=st.integers(0, SPACE + 64), n=st.sampled_from([1, 2, 4, 16, 64]))
    def window(self, a, n):
        w = self.pp.window(a * P + 5, n)
        if a * P not in self.m:
            assert w is None
            return
        start, npages, f = w
        lo = (a * P) & ~(n * P - 1)
        assert lo <= start <= a * P < start + npages * P <= lo + n * P
        for k in range(npages):
            assert self.m[start + k * P] == f + k

    @rule(a=st.integers(0, SPACE + 64), maxp=st.integers(1, 70))
    def next_chunk(self, a, maxp):
        c = self.pp.next_chunk(a * P + 7, maxp * P)
        if not self.m:
            assert c is None
            return
        start, npages, f = c
        assert 1 <= npages <= maxp
        for k in range(npages):
            assert self.m[start + k * P] == f + k
        after = [x for x in self.m if x >= a * P]
        assert start == (min(after) if after else min(self.m))

    @invariant()
    def same(self):
        assert self.pp.pages == len(self.m)
        assert as_model(self.pp) == self.m
        runs = list(self.pp.runs())
        for (s1, n1, _), (s2, _, _) in zip(runs, runs[1:], strict=False):
            assert s1 + n1 * P <= s2


TestPendingMachine = PendingMachine.TestCase
TestPendingMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class TinyBlocks(PendingPages):
    """Blocks of 1-2 runs: every operation crosses, splits or empties blocks."""

    __slots__ = ()
    BLOCK = 1


class TinyBlocksMachine(PendingMachine):
    @initialize(runs=run_lists())
    def setup(self, runs):
        self.pp = TinyBlocks(runs)
        self.m = model_of(runs)


TestTinyBlocksMachine = TinyBlocksMachine.TestCase
TestTinyBlocksMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_scattered_faults_stay_cheap():
    """10^5 single pages taken out of the middle of one 4 GiB run (scattered faults): every one is gone, and the
    runs stay in blocks (no flat list of 10^5 entries to shift on each take)."""
    base, n = 0x10000000, 1 << 20
    pp = PendingPages([(base, n, 0)])
    rng = random.Random(3)
    picked = rng.sample(range(1, n - 1, 2), 100_000)
    for k in picked:
        assert pp.take(base + k * P, P) == 1
    assert pp.pages == n - len(picked)
    assert pp.nruns() == len(picked) + 1
    assert max(len(b) for b in pp._bs) <= 2 * PendingPages.BLOCK
    for k in picked[:1000]:
        assert pp.lookup(base + k * P) is None
        assert pp.lookup(base + (k + 1) * P) == k + 1


def test_draining_by_background_chunks_and_faults():
    runs = [(i * 16 * P, 8, i * 8) for i in range(200)]
    pp = PendingPages(runs)
    rng = random.Random(1)
    cursor = 0
    seen = 0
    while pp:
        if rng.random() < 0.3:
            a = rng.randrange(0, 200 * 16) * P
            w = pp.window(a, 16)
            if w:
                seen += pp.take(w[0], w[1] * P)
            continue
        start, n, f = pp.next_chunk(cursor, 5 * P)
        assert pp.lookup(start) == f
        seen += pp.take(start, n * P)
        cursor = start + n * P
    assert seen == 1600
    assert pp.next_chunk(0, P) is None


@pytest.mark.parametrize("kind", ["few-large", "scattered"])
def test_scales(kind):
    """4 GiB in a few runs, and 10^5 scattered runs: draining by 2 MiB chunks with faults mixed in takes every
    page exactly once. (How fast: benchmarks/structures.py; no timing is asserted here.)"""
    if kind == "few-large":
        runs = [(0x7f0000000000 + i * (1 << 31), (1 << 30) // P, i * ((1 << 30) // P)) for i in range(4)]
    else:
        runs = [(0x10000000 + i * 64 * P, 1 + (i % 7), i * 8) for i in range(100_000)]
    pp = PendingPages(runs)
    total = pp.pages
    rng = random.Random(2)
    addrs = [s for s, _, _ in runs]
    cursor = 0
    taken = ops = 0
    while pp:
        if ops % 4 == 0:
            a = rng.choice(addrs) + rng.randrange(0, 8) * P
            w = pp.window(a, 16)
            if w:
                taken += pp.take(w[0], w[1] * P)
        c = pp.next_chunk(cursor, 2 << 20)
        if c is None:
            break
        taken += pp.take(c[0], c[1] * P)
        cursor = c[0] + c[1] * P
        ops += 1
    assert pp.pages == 0 and total > 0
    assert taken == total


def test_remap_many_runs_then_unmap_old():
    runs = [(i * 2 * P, 1, i) for i in range(1000)]
    pp = PendingPages(runs)
    moved = pp.remap(0, 1 << 30, 2000 * P)
    assert moved == 1000
    assert pp.remove(0, 2000 * P) == 0  # the UNMAP that follows mremap drops nothing
    assert pp.lookup((1 << 30) + 2 * P * 10) == 10
