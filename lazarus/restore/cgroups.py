"""Put a restored task back into the cgroups it was dumped in.

Checked before anything is created (every cgroup must still exist), applied right after the task is created
and before its memory is filled, so that the pages are charged to its own memory cgroup, not the restorer's.
A hierarchy where the task was in the same cgroup as the restorer needs nothing.
"""

from __future__ import annotations

import os

from lazarus.errors import LazarusError, RestoreError
from lazarus.kernel import cgroups

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


def plan(saved: list[dict[str, Any]] | None, pid: int) -> list[str]:
    """The cgroup directories the task must join, in hierarchy order. RestoreError if one is gone or its
    hierarchy is not mounted here."""
    if not saved:
        return []
    ours = {m.key: m.path for m in cgroups.memberships(os.getpid())}
    mounts = None  # read only when a cgroup differs from ours (the usual restore joins none)
    out = []
    for rec in saved:
        m = cgroups.Membership(int(rec["hierarchy"]), str(rec["controllers"]), str(rec["path"]))
        if ours.get(m.key) == m.path:
            continue
        if m.key not in ours:
            raise RestoreError(f"cgroup hierarchy {m.hierarchy} ({m.controllers or 'v2'}) of the image does not "
                               "exist here", stage="validate", pid=pid)
        if mounts is None:
            mounts = cgroups.read_mounts()
        where = cgroups.cgroup_dir(m, mounts)
        if where is None:
            raise RestoreError(f"cgroup {m.controllers or 'v2'}:{m.path}: its hierarchy is not mounted here",
                               stage="validate", pid=pid)
        if not os.path.isdir(where) or ".." in m.path.split("/"):
            raise RestoreError(f"cgroup {where} no longer exists", stage="validate", pid=pid, path=where)
        out.append(where)
    return out


def join(pid: int, directories: list[str]) -> None:
    for where in directories:
        try:
            cgroups.move_to(pid, where)
        except LazarusError as e:
            raise RestoreError(str(e), stage="cgroups", pid=pid, path=where) from e
