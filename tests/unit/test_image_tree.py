"""The inventory's process tree (format version 3): checks, creation order, drawing."""

from __future__ import annotations

import re
from typing import Any

import pytest

from lazarus.errors import ImageError
from lazarus.images.tree import draw, parse_tree


def node(pid: int, ppid: int, pgid: int = 10, sid: int = 10, state: str = "running", exit: int | None = None,
         comm: str = "t") -> dict[str, Any]:
    return {"pid": pid, "ppid": ppid, "pgid": pgid, "sid": sid, "state": state, "comm": comm, "exit": exit}


def inv(tree: list[dict[str, Any]], tasks: list[int], version: int = 3) -> dict[str, Any]:
    return {"version": version, "root_pid": 10, "tasks": tasks, "tree": tree}


GOOD = [node(10, 1), node(12, 10, pgid=12), node(11, 10), node(13, 11, sid=13, pgid=13),
        node(14, 10, state="zombie", exit=7 << 8), node(15, 10, state="stopped")]


def test_order_parents_first_and_zombies_not_live() -> None:
    t = parse_tree(inv(GOOD, [10, 11, 12, 13, 15]))
    assert t.order == [10, 11, 12, 14, 15, 13]
    assert t.live() == [10, 11, 12, 15, 13]
    assert t[14].zombie and t[14].exit == 7 << 8 and t[15].stopped


def test_draw_marks() -> None:
    lines = draw(parse_tree(inv(GOOD, [10, 11, 12, 13, 15])), {11: 3})
    assert lines[0] == "10 (t) pgid 10 sid 10"
    assert lines[1] == "|-- 11 (t) pgid 10 sid 10 [3 threads]"
    assert lines[2] == "|   `-- 13 (t) pgid 13 sid 13"
    assert "14 (t) pgid 10 sid 10 [zombie, exit 7]" in lines[4]
    assert lines[5].endswith("15 (t) pgid 10 sid 10 [stopped]")


@pytest.mark.parametrize(("tree", "tasks", "why"), [
    ([node(10, 1), node(11, 99)], [10, 11], "tree[1]: pid 11: parent 99 is not a live process of the tree"),
    ([node(10, 1), node(11, 12), node(12, 11)], [10, 11, 12], "pid 11 does not descend from root_pid 10"),
    ([node(10, 1), node(11, 10, state="zombie")], [10], "tree[1]: pid 11: a zombie needs its wait status"),
    ([node(10, 1), node(11, 10, state="zombie", exit=0)], [10, 11], "a zombie cannot also be in 'tasks'"),
    ([node(10, 1), node(11, 10)], [10], "tree[1]: pid 11 is running but not in 'tasks'"),
    ([node(10, 1)], [10, 11], "pid 11 is in 'tasks' but not in 'tree'"),
    ([node(10, 1), node(11, 10, state="dead")], [10, 11], "state 'dead' is not one of"),
    ([node(10, 1), node(10, 10)], [10], "tree[1]: pid 10 is not a new positive pid"),
    ([node(10, 1), {**node(11, 10), "pgid": "x"}], [10, 11], "tree[1]: field 'pgid' must be an integer"),
    ([node(10, 1), node(11, 10, state="zombie", exit=5), node(12, 11)], [10, 12],
     "pid 12: parent 11 is not a live process"),
])
def test_bad_trees_refused_by_name(tree: list[dict[str, Any]], tasks: list[int], why: str) -> None:
    with pytest.raises(ImageError, match=re.escape(why)):
        parse_tree(inv(tree, tasks))


def test_old_versions_have_no_tree() -> None:
    t = parse_tree({"version": 2, "root_pid": 10, "tasks": [10]})
    assert t.order == [10]
    with pytest.raises(ImageError, match="field 'tree' in a version 2 image"):
        parse_tree(inv(GOOD, [10, 11, 12, 13, 15], version=2))
    with pytest.raises(ImageError, match="missing field 'tree'"):
        parse_tree({"version": 3, "root_pid": 10, "tasks": [10, 11]})


def _nodes(*recs: dict[str, Any]) -> dict[int, Any]:
    from lazarus.images.tree import Node
    return {r["pid"]: Node(r["pid"], r["ppid"], r["pgid"], r["sid"], r["state"], r["comm"], r["exit"])
            for r in recs}


def test_dump_accepts_what_a_restore_rebuilds() -> None:
    from lazarus.dump.tree import check_tree
    check_tree(10, _nodes(*GOOD, node(16, 11, pgid=12)))  # a member of a group another child leads


@pytest.mark.parametrize(("extra", "why"), [
    (node(16, 11, sid=99, pgid=99), "pid 16 is in session 99, led by outside the tree, which it did not inherit "
                                    "from its parent 11"),
    (node(16, 13, sid=10, pgid=10), "pid 16 is in session 10, led by pid 10, which it did not inherit from its "
                                    "parent 13"),
    (node(16, 11, pgid=77), "pid 16 is in process group 77, whose leader is not a live process of the tree"),
    (node(16, 11, pgid=11), "pid 16 is in process group 11, whose leader is not a live process of the tree"),
    (node(16, 13, sid=13, pgid=16, state="zombie", exit=0), "pid 16 is a zombie in another session or process group"),
])
def test_dump_refuses_what_a_restore_cannot_rebuild(extra: dict[str, Any], why: str) -> None:
    from lazarus.dump.tree import check_tree
    from lazarus.errors import Unsupported
    with pytest.raises(Unsupported, match=re.escape(why)):
        check_tree(10, _nodes(*GOOD, extra))
