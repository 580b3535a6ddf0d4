"""The restore command's import set (start-up cost): what a plain `lazarus restore --lazy -d` loads before it
restores, in a fresh interpreter started as the launcher starts it (python -S). The modules listed here were
taken off that path (docs/BENCHMARKS.md, "The plain CLI's start-up, sixth session"); they must stay off.
tests/test_lazy.py checks the same on a real restore, and tests/unit/test_records.py dataclasses and typing."""

from __future__ import annotations

import json
import subprocess
import sys

import lazarus

# What the command imports at module level on its way to a single process's lazy restore (cli._plain_line,
# api._restore_detached, lazy/daemon.fork_daemon, the restore, its uffd and the handoff).
COMMAND_MODULES = ("lazarus.cli", "lazarus.lazy.spawn", "lazarus.api", "lazarus.lazy.daemon", "lazarus.kernel.uffd", "lazarus.restore.uffd",
                   "lazarus.restore", "lazarus.lazy.handoff", "lazarus.lazy.anchor")
# Off the path: socket (its enum conversions, selectors; the handoff uses _socket), threading (the lazy server's
# copy helper only), what only a tree, --pidns, an eager restore or the daemon use, what the clifast branches
# took off before (logging, argparse for a plain restore line, the dump, dataclasses and typing), and pathlib
# with what it loads (urllib.parse, ipaddress: ~4-7 ms here; directories are str on this path).
OFF_PATH = ("socket", "selectors", "threading", "logging", "argparse", "dataclasses", "typing", "inspect",
            "pathlib", "urllib.parse", "ipaddress",
            "lazarus.dump", "lazarus.restore.tree", "lazarus.restore.sharefds", "lazarus.restore.cow",
            "lazarus.restore.thp", "lazarus.lazy.server", "lazarus.lazy.guard", "lazarus.lazy.trust",
            "lazarus.restore.anonfd", "lazarus.restore.unixsk", "lazarus.kernel.handles", "termios")


def _imported(modules: tuple[str, ...]) -> tuple[list[str], list[str]]:
    root = lazarus.__path__[0].rsplit("/", 1)[0]
    code = (f"import sys; sys.path[:0] = {[root, *sys.path]!r}\n"
            f"for m in {modules!r}: __import__(m)\n"
            "abi = sys.modules.get('lazarus.kernel.abi')\n"
            "got = [sorted(sys.modules), [n for n in abi._MAKERS if n in vars(abi)] if abi else []]\n"
            "import json; print(json.dumps(got))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True).stdout
    mods, structs = json.loads(out.splitlines()[-1])
    return mods, structs


def test_restore_command_imports_none_of_the_modules_taken_off_its_path() -> None:
    mods, structs = _imported(COMMAND_MODULES)
    assert not set(OFF_PATH) & set(mods), sorted(set(OFF_PATH) & set(mods))
    assert structs == []  # kernel/abi.py makes its ctypes structs on first use


def test_the_daemon_is_forked_before_the_heavy_imports() -> None:
    """cli.cmd_restore forks the private daemon from lazy/spawn.py before it imports the API: what the command
    has loaded by then is all the daemon shares with it, and the daemon's start-up runs beside the rest."""
    mods, _ = _imported(("lazarus.cli", "lazarus.lazy.spawn"))
    heavy = {"json", "re", "enum", "socket", "lazarus.api", "lazarus.lazy.daemon", "lazarus.restore",
             "lazarus.kernel.uffd", "lazarus.images"}
    assert not heavy & set(mods), sorted(heavy & set(mods))
    assert "lazarus.lazy.spawn" in mods


def test_the_lazy_daemon_imports_no_pathlib() -> None:
    """The private lazy-pages daemon is forked from the command and imports the server's side while the command
    restores: its start-up is on the command's path as well."""
    mods, _ = _imported((*COMMAND_MODULES, "lazarus.lazy.server", "lazarus.lazy.guard", "lazarus.lazy.trust",
                         "lazarus.images.validate", "lazarus.images.mm"))
    assert not {"pathlib", "urllib.parse", "ipaddress"} & set(mods)


def test_the_modules_taken_off_are_still_reachable() -> None:
    """The list above means something: the lazy server does load socket, a tree restore its modules, the dump
    pathlib."""
    mods, _ = _imported(("lazarus.restore", "lazarus.lazy.server", "lazarus.dump"))
    assert {"socket", "lazarus.lazy.guard", "pathlib", "urllib.parse"} <= set(mods)
    import lazarus.restore.sharefds  # noqa: F401
    import lazarus.restore.tree  # noqa: F401 - imported where restore_tree runs
