"""Namespace and cgroup membership of a task, read from procfs, and moving a task into a cgroup.

Reads /proc/PID/ns/*, /proc/PID/cgroup and /proc/self/mountinfo; the only write is a pid into a cgroup's
cgroup.procs. Machines differ: cgroup v2 alone, v1 alone, or both (a v1 hierarchy per controller beside a v2
one mounted at .../unified), so every hierarchy is looked up by its line in /proc/PID/cgroup.
"""

from __future__ import annotations

import os

from lazarus.errors import LazarusError
from lazarus.kernel.procfs import unescape_mount
from lazarus.records import record

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "time_for_children", "user",
              "uts")


@record(frozen=True, slots=True)
class Membership:
    """One line of /proc/PID/cgroup: hierarchy id, its controllers ("" for v2, "name=systemd" for a named
    v1 hierarchy) and the cgroup's path within it."""

    hierarchy: int
    controllers: str
    path: str

    @property
    def key(self) -> tuple[int, str]:
        return self.hierarchy, self.controllers


def namespaces(pid: int | str) -> dict[str, str]:
    """Namespace name -> link text ("mnt:[4026531841]") for each namespace the kernel shows."""
    out = {}
    for name in NAMESPACES:
        try:
            out[name] = os.readlink(f"/proc/{pid}/ns/{name}")
        except FileNotFoundError:  # a kernel without that namespace kind
            continue
    return out


def parse_cgroup(text: str) -> list[Membership]:
    out = []
    for line in text.splitlines():
        if not line:
            continue
        hid, controllers, path = line.split(":", 2)
        out.append(Membership(int(hid), controllers, path))
    return out


def memberships(pid: int | str) -> list[Membership]:
    with open(f"/proc/{pid}/cgroup") as f:
        return parse_cgroup(f.read())


# Mount options of a v1 hierarchy that are not controller names (kernel/cgroup/cgroup-v1.c).
_V1_OPTIONS = frozenset(("rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods",
                         "none", "all"))


def parse_mounts(text: str) -> dict[tuple[int, str], str]:
    """Mount point of each cgroup hierarchy, keyed like Membership.key (hierarchy 0 for v2).

    A v1 hierarchy is known by its controllers in the super options ("rw,cpu" or "rw,name=systemd"); its
    hierarchy id is not in mountinfo, so the key's id is filled in by the caller's /proc/PID/cgroup.
    Only mounts of the hierarchy's root are kept (a bind mount of a sub-cgroup would shift every path).
    """
    out: dict[tuple[int, str], str] = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or fields[3] != "/":
            continue
        fstype, options = rfields[0], rfields[2].split(",")
        point = unescape_mount(fields[4])
        if fstype == "cgroup2":
            out.setdefault((0, ""), point)
        elif fstype == "cgroup":
            ctl = ",".join(o for o in options if o not in _V1_OPTIONS and ("=" not in o or o.startswith("name=")))
            out.setdefault((-1, ctl), point)
    return out


def cgroup_dir(m: Membership, mounts: dict[tuple[int, str], str]) -> str | None:
    """The directory of membership `m` in this mount namespace, or None if its hierarchy is not mounted."""
    point = mounts.get((0, "")) if m.hierarchy == 0 else mounts.get((-1, m.controllers))
    if point is None:
        return None
    return os.path.join(point, m.path.lstrip("/"))


def read_mounts() -> dict[tuple[int, str], str]:
    with open("/proc/self/mountinfo") as f:
        return parse_mounts(f.read())


def move_to(pid: int, directory: str) -> None:
    """Make `pid` a member of the cgroup at `directory` (the whole process: cgroup.procs)."""
    try:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(f"{pid}\n")
    except OSError as e:
        raise LazarusError(f"cannot move pid {pid} into cgroup {directory}: {e.strerror}", pid=pid,
                           path=directory) from e
