"""Which namespaces and cgroups a task belongs to: namespaces other than Lazarus's own are refused (a restore
would put the process in the restorer's), cgroups are saved and rejoined at restore."""

from __future__ import annotations

import os
from typing import Any

from lazarus.errors import Unsupported
from lazarus.kernel import cgroups


def check_namespaces(pid: int) -> None:
    """Refuse a task in any namespace that is not also Lazarus's: it would come back in ours."""
    theirs, ours = cgroups.namespaces(pid), cgroups.namespaces(os.getpid())
    for name, link in theirs.items():
        if ours.get(name) != link:
            raise Unsupported(f"pid {pid} is in another {name} namespace ({link}, lazarus is in "
                              f"{ours.get(name, 'none')}); namespaces are not supported")


def dump_cgroups(pid: int) -> list[dict[str, Any]]:
    return [{"hierarchy": m.hierarchy, "controllers": m.controllers, "path": m.path}
            for m in cgroups.memberships(pid)]
