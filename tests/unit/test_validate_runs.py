"""The page runs' one-pass check (images/validate.py _runs_in_order, _ranges_in_order) against the run-by-run
checks it stands in for: whatever it passes, they pass with the same coverage; whatever they refuse, the whole
check refuses with their message (the field named)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lazarus.errors import ImageError
from lazarus.images import validate as V

PAGE = 4096
BASE = 0x10000000


def task(runs: list[list[Any]], objects: list[dict[str, Any]] | None = None, end: int = BASE + 64 * PAGE) -> dict:
    return {
        "mm": {"vmas": [{"start": BASE, "end": end, "prot": 3, "offset": 0, "kind": "anon", "pages": runs,
                         "shared": False}],
               "objects": objects or [], "exe": "/bin/true",
               **{k: 0 for k in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                                 "start_stack", "arg_start", "arg_end", "env_start", "env_end")}},
        "files": [],
        "signals": {"actions": [[0, 0, 0, 0]] * 64, "blocked": 0, "itimers": []},
        "misc": {"umask": 0o22, "cwd": "/", "creds": {"uids": [0] * 4, "gids": [0] * 4, "groups": []},
                 "rlimits": [[0, 0]] * 16},
    }


def check(t: dict, npages: int, *, fast: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(V, "_runs_in_order", lambda *_: 0)
        try:
            V.check_task(t, "task-1.json", npages, lambda _: True, 1)
        except ImageError as e:
            return str(e)
    return "ok"


def random_runs(rng: random.Random) -> tuple[list[list[Any]], int]:
    """Runs in order, then perhaps spoilt one way or another."""
    runs, idx, addr = [], 0, BASE
    for _ in range(rng.randint(0, 12)):
        addr += PAGE * rng.randint(0, 3)
        n = rng.randint(1, 4)
        if addr + n * PAGE > BASE + 64 * PAGE:
            break
        runs.append([addr, n, idx])
        addr += n * PAGE
        idx += n
    npages = idx
    how = rng.randint(0, 9)
    if runs and how == 1:
        rng.shuffle(runs)
    elif runs and how == 2:
        runs[rng.randrange(len(runs))][0] += rng.choice([-PAGE, PAGE, 1, 64 * PAGE])
    elif runs and how == 3:
        runs[rng.randrange(len(runs))][1] += rng.choice([-1, 1, 100])
    elif runs and how == 4:
        runs[rng.randrange(len(runs))][2] += rng.choice([-1, 1])
    elif runs and how == 5:
        runs[rng.randrange(len(runs))][rng.randrange(3)] = rng.choice([True, 1.0, None, -1])
    elif runs and how == 6:
        runs[rng.randrange(len(runs))] = rng.choice([[BASE, 1], (BASE, 1, 0), BASE])
    elif how == 7:
        npages += rng.choice([-1, 1])
    return runs, max(npages, 0)


def test_one_pass_agrees_with_run_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(9)
    seen = set()
    for _ in range(3000):
        runs, npages = random_runs(rng)
        t = task(runs)
        fast, slow = check(t, npages, fast=True, monkeypatch=monkeypatch), check(t, npages, fast=False,
                                                                                monkeypatch=monkeypatch)
        assert fast == slow, (runs, npages)
        seen.add(slow == "ok")
    assert seen == {True, False}


def test_runs_out_of_order_pass_the_slow_way(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [[BASE + 4 * PAGE, 1, 1], [BASE, 1, 0]]  # valid, only not in address order
    assert V._runs_in_order(task(runs)["mm"]["vmas"], [], 2) == 0
    assert check(task(runs), 2, fast=True, monkeypatch=monkeypatch) == "ok"
    assert V._runs_in_order(task(sorted(runs))["mm"]["vmas"], [], 2) == 2


def test_overlap_named() -> None:
    runs = [[BASE, 2, 0], [BASE + PAGE, 1, 2]]
    with pytest.raises(ImageError, match=r"mm.vmas\[0\].pages\[1\]' overlaps mm.vmas\[0\].pages\[0\]"):
        V.check_task(task(runs), "task-1.json", 3, lambda _: True, 1)


def test_object_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = {"size": 3 * PAGE, "pages": [[0, 2, 1]]}
    t = task([[BASE, 1, 0]], [obj])
    assert V._runs_in_order(t["mm"]["vmas"], t["mm"]["objects"], 3) == 3
    assert check(t, 3, fast=True, monkeypatch=monkeypatch) == "ok"
    obj["pages"] = [[2 * PAGE, 2, 1]]  # past the object's size
    assert V._runs_in_order(t["mm"]["vmas"], t["mm"]["objects"], 3) == 0
    assert "outside the object" in check(t, 3, fast=True, monkeypatch=monkeypatch)


def test_cow_ranges_one_pass() -> None:
    assert V._ranges_in_order([[BASE, 2], [BASE + 2 * PAGE, 1]]) == [(BASE, BASE + 2 * PAGE),
                                                                     (BASE + 2 * PAGE, BASE + 3 * PAGE)]
    assert V._ranges_in_order([]) == []
    for bad in ([[BASE, 2], [BASE + PAGE, 1]], [[BASE + 1, 1]], [[BASE, 0]], [[BASE, True]], [[BASE]],
                [(BASE, 1)], "x", [[V.USER_TOP, 1]], [[-PAGE, 1]]):
        assert V._ranges_in_order(bad) is None, bad
