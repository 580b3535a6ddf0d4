"""The process tree of an image (inventory field `tree`, format version 3): who is whose parent, sessions,
process groups, zombies and stopped tasks. Pure Python: parsing, checks, creation order, drawing.

    inventory.json "tree": [ {pid, ppid, pgid, sid, state, exit, comm}, ... ]   (root first, then by pid)
        state "running": a live process with its task-PID.json (listed in "tasks")
        state "stopped": the same, in a job-control stop at the dump; left stopped after the restore
        state "zombie":  exited and not yet reaped by its parent; no task file; `exit` is its wait status

Version 1 and 2 images have no tree: they hold one process, and parse_tree() makes a one-node tree for them (as
for a version 3 image of a single process, which may omit it).
"""

from __future__ import annotations

from lazarus.errors import ImageError
from lazarus.records import record

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

INVENTORY = "inventory.json"
STATES = ("running", "stopped", "zombie")
NODE_SCHEMA = {"pid": int, "ppid": int, "pgid": int, "sid": int, "state": str, "comm": str}


@record(frozen=True)
class Node:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    comm: str
    exit: int | None = None  # wait(2) status of a zombie

    @property
    def zombie(self) -> bool:
        return self.state == "zombie"

    @property
    def stopped(self) -> bool:
        return self.state == "stopped"

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "ppid": self.ppid, "pgid": self.pgid, "sid": self.sid, "state": self.state,
                "comm": self.comm, "exit": self.exit}


class Tree:
    """The nodes of an image by pid, with the root; `order` lists parents before their children."""

    def __init__(self, root: int, nodes: list[Node]) -> None:
        self.root = root
        self.nodes = {n.pid: n for n in nodes}
        self.order: list[int] = []
        todo = [root]
        while todo:
            pid = todo.pop(0)
            self.order.append(pid)
            todo.extend(self.children(pid))

    def children(self, pid: int) -> list[int]:
        return sorted(n.pid for n in self.nodes.values() if n.ppid == pid and n.pid != self.root)

    def live(self) -> list[int]:
        """Processes with a task file, parents first."""
        return [p for p in self.order if not self.nodes[p].zombie]

    def __getitem__(self, pid: int) -> Node:
        return self.nodes[pid]


def _fail(i: int, why: str) -> ImageError:
    return ImageError(f"{INVENTORY}: tree[{i}]: {why}")


def parse_tree(inv: dict[str, Any]) -> Tree:
    """Check and read the inventory's `tree` against its `root_pid` and `tasks`. Raises ImageError naming the
    entry. A version 1/2 image (no tree) gives a one-node tree of its root."""
    root, tasks = inv["root_pid"], inv["tasks"]
    version = inv.get("version", 3)
    if "tree" not in inv:
        if len(tasks) != 1 and version >= 3:
            raise ImageError(f"{INVENTORY}: missing field 'tree'")
        # Before version 3 an image held one process (a restore refuses one that lists more).
        return Tree(root, [Node(root, 0, 0, 0, "running", "")])
    if version < 3:
        raise ImageError(f"{INVENTORY}: field 'tree' in a version {version} image (trees came with version 3)")
    raw = inv["tree"]
    if not isinstance(raw, list) or not raw:
        raise ImageError(f"{INVENTORY}: field 'tree' must be a non-empty array")
    nodes: list[Node] = []
    seen: set[int] = set()
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise _fail(i, "must be an object")
        for key, want in NODE_SCHEMA.items():
            if key not in rec:
                raise _fail(i, f"missing field '{key}'")
            if not isinstance(rec[key], want) or isinstance(rec[key], bool):
                raise _fail(i, f"field '{key}' must be {'an integer' if want is int else 'a string'}")
        pid = rec["pid"]
        if pid <= 0 or pid in seen:
            raise _fail(i, f"pid {pid} is not a new positive pid")
        seen.add(pid)
        if rec["state"] not in STATES:
            raise _fail(i, f"pid {pid}: state {rec['state']!r} is not one of {', '.join(STATES)}")
        for key in ("ppid", "pgid", "sid"):
            if rec[key] < 0:
                raise _fail(i, f"pid {pid}: {key} {rec[key]} is negative")
        status = rec.get("exit")
        if rec["state"] == "zombie":
            if type(status) is not int or not 0 <= status <= 0xFFFF:
                raise _fail(i, f"pid {pid}: a zombie needs its wait status in 'exit' (0..65535)")
            if pid in tasks:
                raise _fail(i, f"pid {pid}: a zombie cannot also be in 'tasks'")
        elif pid not in tasks:
            raise _fail(i, f"pid {pid} is {rec['state']} but not in 'tasks'")
        nodes.append(Node(pid, rec["ppid"], rec["pgid"], rec["sid"], rec["state"], rec["comm"],
                          status if rec["state"] == "zombie" else None))
    missing = set(tasks) - seen
    if missing:
        raise ImageError(f"{INVENTORY}: pid {min(missing)} is in 'tasks' but not in 'tree'")
    by_pid = {n.pid: n for n in nodes}
    if root not in by_pid or by_pid[root].zombie:
        raise ImageError(f"{INVENTORY}: root_pid {root} is not a live process of 'tree'")
    for i, n in enumerate(nodes):
        if n.pid == root:
            continue
        parent = by_pid.get(n.ppid)
        if parent is None or parent.zombie:
            raise _fail(i, f"pid {n.pid}: parent {n.ppid} is not a live process of the tree")
    tree = Tree(root, nodes)
    if len(tree.order) != len(nodes):
        lost = sorted(set(by_pid) - set(tree.order))
        raise ImageError(f"{INVENTORY}: pid {lost[0]} does not descend from root_pid {root}")
    return tree


def draw(tree: Tree, threads: dict[int, int] | None = None) -> list[str]:
    """The tree as text lines, one per process: pid, comm, pgid/sid, threads, zombie/stopped marks."""
    threads = threads or {}
    lines: list[str] = []

    def walk(pid: int, prefix: str, last: bool, top: bool) -> None:
        n = tree[pid]
        marks = []
        if threads.get(pid, 1) > 1:
            marks.append(f"{threads[pid]} threads")
        if n.zombie:
            st = n.exit or 0
            marks.append(f"zombie, killed by signal {st & 0x7F}" if st & 0x7F else f"zombie, exit {st >> 8}")
        if n.stopped:
            marks.append("stopped")
        ids = f"pgid {n.pgid} sid {n.sid}" if n.sid or n.pgid else ""
        text = f"{pid} ({n.comm})" + (f" {ids}" if ids else "") + (f" [{', '.join(marks)}]" if marks else "")
        lines.append(text if top else prefix + ("`-- " if last else "|-- ") + text)
        kids = tree.children(pid)
        for j, kid in enumerate(kids):
            walk(kid, prefix if top else prefix + ("    " if last else "|   "), j == len(kids) - 1, False)

    walk(tree.root, "", True, True)
    return lines
