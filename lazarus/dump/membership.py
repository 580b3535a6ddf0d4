"""Which namespaces, cgroups and session a task belongs to: namespaces other than Lazarus's own are refused (a
restore would put the process in the restorer's), cgroups are saved and rejoined at restore, and a session
led by another process is refused unless the user asks for it to be replaced (`--shell-job`)."""

from __future__ import annotations

import os

from lazarus.errors import Unsupported
from lazarus.kernel import cgroups
from lazarus.kernel.procfs import Stat

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any


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


def check_session(pid: int, stat: Stat, shell_job: bool) -> None:
    """A restored task can lead a new session but cannot join one led by a process outside the image, nor get
    its controlling terminal back: refuse both unless shell_job, which restores it into the session (and
    terminal) of `lazarus restore`, as CRIU's option of that name does."""
    if shell_job:
        return
    if stat.session != pid:
        raise Unsupported(f"pid {pid} is in session {stat.session}, which another process leads (a shell job?); "
                          "dump it with --shell-job to restore it into the session of `lazarus restore`")
    if stat.tty_nr:
        raise Unsupported(f"pid {pid} has a controlling terminal (tty {os.major(stat.tty_nr)}:"
                          f"{os.minor(stat.tty_nr)}); dump it with --shell-job to restore it with the terminal "
                          "of `lazarus restore`")
