"""The process tree a dump takes: found while freezing, and refused where a restore could not rebuild it.

    frozen = {}; todo = [root]
    while todo:                                  a process is frozen (group stop, every thread seized, its own
        p = todo.pop()                           watchdog) before its children are read: a stopped process
        zombie? -> recorded, not seized          cannot fork, so once its children list is read it is final;
        else: watchdog, seize, SIGSTOP           a child forked before that is in the list and frozen in turn
        todo += children(p) not yet seen         (repeat until no process adds a new one)

A restore makes each child by a clone in its restored parent, so what a child has from its parent comes back,
and what it got otherwise must be rebuilt (restore/tree.py). The rules here (check_tree) refuse what that
cannot do: a session it did not inherit nor lead, a process group whose leader is not in the tree, a zombie or
group member whose group or session is not its parent's.
"""

from __future__ import annotations

from lazarus.dump.membership import check_namespaces
from lazarus.dump.watchdog import Watchdog
from lazarus.errors import DumpError, LazarusError, NoSuchTask, Unsupported
from lazarus.images.tree import Node
from lazarus.kernel import kcmp, procfs
from lazarus.logs import getLogger
from lazarus.records import field, record

log = getLogger(__name__)


@record
class Frozen:
    """A process of the tree in our group stop: its watchdog and the other threads we seized."""

    pid: int
    watchdog: Watchdog
    was_stopped: bool  # in a job-control stop before the dump: stays stopped whatever happens
    threads: list[int] = field(default_factory=list)
    held: dict[int, list[str]] = field(default_factory=dict)  # pending SIGCONTs our SIGSTOP discards (dump/sigcont.py)


def precheck_child(pid: int) -> procfs.Stat:
    """What can be refused in a child before touching it (the root has dump.precheck)."""
    stat = procfs.read_stat(pid)
    if stat.is_kernel_thread:  # pragma: no cover - a kernel thread is nobody's child but kthreadd's
        raise Unsupported(f"pid {pid} is a kernel thread")
    status = procfs.read_status(pid)
    if status.tracer_pid:
        raise DumpError(f"pid {pid} (a child in the tree) is already traced by pid {status.tracer_pid}", pid=pid)
    check_namespaces(pid)
    return stat


def _same_vm(a: int, b: int) -> bool:
    try:
        return kcmp.same_resource(a, b, "vm")
    except (LazarusError, OSError):
        return False  # gone meanwhile: it shares nothing any more


def _in_vfork(pid: int) -> bool:
    """A thread of `pid` waits in vfork() for its child (wait_for_vfork_done; killable, so shown as "D")."""
    for tid in procfs.tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
            state = procfs.read_stat(tid).state
        except (LazarusError, OSError):
            continue
        if "vfork" in wchan or state == "D":
            return True
    return False


def refuse_shared_mm(pid: int, *, root: bool) -> None:
    """Before `pid` is seized: a child sharing its address space (clone with CLONE_VM and no CLONE_THREAD,
    vfork) cannot be rebuilt, and a process waiting in vfork() would never stop for the dump (the wait takes
    only fatal signals): refused by name at once, not after a stop that times out. The root sharing its
    parent's address space (a vfork child before its exec) is refused too: a restore gives it its own."""
    try:
        kids = procfs.children(pid)
    except NoSuchTask:
        return  # gone meanwhile: the freeze that follows finds it so
    for k in kids:
        if not _same_vm(pid, k):
            continue
        if _in_vfork(pid):
            raise Unsupported(f"pid {pid} is in vfork(), waiting for its child {k}, which shares its address "
                              "space until it calls exec or exits; not supported (dump again once it has)", pid=pid)
        raise Unsupported(f"pid {pid} and its child {k} share one address space (clone with CLONE_VM) without "
                          "being threads of one process; not supported", pid=k)
    if root:
        try:
            ppid = procfs.read_stat(pid).ppid
        except NoSuchTask:
            return
        if ppid > 0 and _same_vm(pid, ppid):
            raise Unsupported(f"pid {pid} shares the address space of its parent {ppid} (a vfork child before "
                              "its exec, or clone with CLONE_VM); not supported", pid=pid)


def node_of(pid: int, stat: procfs.Stat, state: str) -> Node:
    return Node(pid, stat.ppid, stat.pgrp, stat.session, state, stat.comm,
                stat.exit_code if state == "zombie" else None)


def check_tree(root: int, nodes: dict[int, Node]) -> None:
    """Refuse, naming the pid, what a restore cannot rebuild (see the module docstring). The root's own
    session and group are dump.check_session's business."""
    top = nodes[root]
    for pid, n in nodes.items():
        if pid == root:
            continue
        parent = nodes[n.ppid]
        if n.zombie:
            if (n.sid, n.pgid) != (parent.sid, parent.pgid):
                raise Unsupported(f"pid {pid} is a zombie in another session or process group than its parent "
                                  f"{parent.pid}; not supported")
            continue
        if n.sid != parent.sid and n.sid != pid:
            where = "outside the tree" if n.sid not in nodes else f"pid {n.sid}"
            raise Unsupported(f"pid {pid} is in session {n.sid}, led by {where}, which it did not inherit from "
                              f"its parent {parent.pid}; not supported")
        if n.pgid in (pid, parent.pgid):
            continue
        if n.pgid == top.pgid:
            continue  # the root's group: whatever the restore gives the root
        leader = nodes.get(n.pgid)
        if leader is None or leader.zombie or leader.pgid != leader.pid:
            raise Unsupported(f"pid {pid} is in process group {n.pgid}, whose leader is not a live process of "
                              "the tree; not supported")
        if leader.sid != n.sid:  # pragma: no cover - the kernel keeps a group inside one session
            raise Unsupported(f"pid {pid}: process group {n.pgid} is in another session")


def refuse_zombie_leader(pid: int, nodes: dict[int, Node]) -> None:
    """A zombie whose exit left live threads behind (it is their leader) cannot be rebuilt."""
    try:
        tids = procfs.tasks(pid)
    except NoSuchTask:
        return
    if len(tids) > 1:
        raise Unsupported(f"pid {pid} is a zombie thread-group leader with {len(tids) - 1} live threads; "
                          "not supported")
