"""Private directories for the files a restore recreates (unlinked files, deleted FIFOs and directories, the
deleted cwd, mapped deleted files).

An image names the path such a file had, and whoever wrote the image chooses it: a restore that created the file
there (as root, with the image's mode) would let an image put a file, setuid even, wherever it likes. So every
recreated file is made in a directory made for it alone: mkdtemp (mode 0700, owned by root) beside the old path
when that directory is root's, not writable by others unless sticky (so nobody else can rename what is in
it) and on the same filesystem as the original (so the task's file keeps its filesystem: a later linkat of it
works as before), else in the root-only runtime directory /run/lazarus/recreate. Only the basename of the old
path is used, inside that directory; the file is created O_EXCL|O_NOFOLLOW, mode 0600, filled, opened by the
task, unlinked, and given its owner and mode only then, through the task's /proc fd link. The directory is then
removed.

A restore killed in between can leave such a directory, with at most one 0600 file of root's in it, readable by
root alone. Its name holds the restorer's pid and start time (.lazarus-restore-PID-START-XXXX), and every
directory outside the runtime one is listed first in /run/lazarus/restores/PID-START: the next restore removes
the directories of every restorer that is gone (sweep_stale), and /run is emptied at boot anyway.
"""

from __future__ import annotations

import contextlib
import os
import stat

RUN = "/run/lazarus"
RECREATE = f"{RUN}/recreate"
LEDGERS = f"{RUN}/restores"
PREFIX = ".lazarus-restore-"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def _me() -> str:
    return f"{os.getpid()}-{_start_time(os.getpid())}"


def _root_dir(path: str, private: bool = True) -> None:
    """Make `path` a directory of root's (mode 0700), refusing a symlink, someone else's directory, or one that
    others may write (private: that others may enter) there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & (0o077 if private else 0o022):
        raise OSError(f"{path} is not a directory of root's that only root may {'enter' if private else 'write'}")


def _safe_parent(parent: str, dev: int | None) -> bool:
    """Whether a private directory may be made in `parent`: root's, nobody else may rename entries in it,
    and on the original's filesystem."""
    try:
        st = os.lstat(parent)
    except OSError:
        return False
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not others_write
            and (dev is None or st.st_dev == dev))


def make(old_path: str, dev: int | None) -> str:
    """A new private directory (0700, root's) for recreating the file that was at `old_path`."""
    prefix = f"{PREFIX}{_me()}-"
    parent = os.path.dirname(old_path.rstrip("/")) or "/"
    if _safe_parent(parent, dev):
        try:
            _root_dir(RUN, private=False)
            _root_dir(LEDGERS)
            with open(f"{LEDGERS}/{_me()}", "a") as ledger:
                ledger.write(parent + "\n")
            import tempfile  # here: most restores recreate nothing
            return tempfile.mkdtemp(prefix=prefix, dir=parent)
        except OSError:
            pass  # a read-only filesystem, ...: the runtime directory
    _root_dir(RUN, private=False)
    _root_dir(RECREATE)
    import tempfile
    return tempfile.mkdtemp(prefix=prefix, dir=RECREATE)


def name_in(private: str, old_path: str, default: str) -> str:
    """The recreated file's path: the old basename, inside the private directory."""
    base = os.path.basename(old_path.rstrip("/"))
    return os.path.join(private, base if base not in ("", ".", "..") else default)


def remove(private: str) -> None:
    """Remove a private directory and what is left in it (only ever files we made)."""
    import shutil
    shutil.rmtree(private, ignore_errors=True)


def done() -> None:
    """Forget this restorer's ledger once every private directory it made is gone again."""
    with contextlib.suppress(OSError):
        os.unlink(f"{LEDGERS}/{_me()}")


def _sweep(parent: str, owner: str) -> None:
    head = f"{PREFIX}{owner}-"
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for e in entries:
            if (e.name.startswith(head) and e.is_dir(follow_symlinks=False)
                    and e.stat(follow_symlinks=False).st_uid == 0):
                import shutil
                shutil.rmtree(e.path, ignore_errors=True)


def sweep_stale() -> None:
    """Remove the private directories left by restores that were killed (their pid gone or reused)."""
    owners: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(RECREATE) as entries:
        for e in entries:
            parts = e.name[len(PREFIX):].split("-") if e.name.startswith(PREFIX) else []
            if len(parts) == 3:
                owners.add(f"{parts[0]}-{parts[1]}")
    for owner in owners:
        pid, _, start = owner.partition("-")
        if pid.isdigit() and str(_start_time(int(pid))) != start:
            _sweep(RECREATE, owner)
    ledgers: list[str] = []
    with contextlib.suppress(OSError), os.scandir(LEDGERS) as entries:
        ledgers = [e.name for e in entries]
    for owner in ledgers:
        pid, _, start = owner.partition("-")
        if not pid.isdigit() or str(_start_time(int(pid))) == start:
            continue
        try:
            with open(f"{LEDGERS}/{owner}") as f:
                parents = set(f.read().split("\n")) - {""}
        except OSError:
            continue
        for parent in parents:
            _sweep(parent, owner)
        with contextlib.suppress(OSError):
            os.unlink(f"{LEDGERS}/{owner}")
