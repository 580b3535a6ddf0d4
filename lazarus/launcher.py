"""The `lazarus` command's launcher, written by `make install` over the console script pip made.

pip's script starts the interpreter as any program does: `site` scans the venv's site-packages and runs its
`.pth` files (setuptools' distutils hack imports a module of its own there), ~3-4 ms of every command, a tenth
of a lazy restore's whole command. The launcher starts the interpreter with -S (no site) and puts on sys.path
what site would have put there, as found at install time: the venv's site-packages (rich, xxhash) and the
directories its `.pth` files name (the repository, for the editable install). PYTHONPATH and the other
PYTHON* variables still apply (-S is not -I). What is lost: the user's own site-packages (~/.local), which
lazarus does not use, and `.pth` files added to the venv after the install (run `make install` again).

    python -m lazarus.launcher PATH     writes the launcher to PATH (the console script), for this interpreter
"""

from __future__ import annotations

import contextlib
import os
import sys

# Linux reads at most this much of a `#!` line (BINPRM_BUF_SIZE was 128 before 5.1): a longer interpreter
# path keeps pip's own script.
_SHEBANG_MAX = 127


def site_paths() -> list[str]:
    """The entries site adds to sys.path for this interpreter (site-packages and `.pth` directories), in order."""
    base = set(_sys_path("-S"))
    out: list[str] = []
    for p in _sys_path():
        if p and p not in base and p not in out and os.path.isdir(p):
            out.append(p)
    return out


def _sys_path(*flags: str) -> list[str]:
    """sys.path of this interpreter started with `flags`, without PYTHONPATH (which applies at each start)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, *flags, "-c", "import sys; print('\\n'.join(sys.path[1:]))"],
                         capture_output=True, text=True, check=True, env=env).stdout
    return out.splitlines()


def _imports(python: str, paths: list[str]) -> bool:
    """Whether the launcher's interpreter, started as the launcher starts it, finds lazarus.cli on `paths`."""
    import subprocess
    code = f"import sys; sys.path.extend({paths!r}); import lazarus.cli"
    return subprocess.run([python, "-S", "-c", code], capture_output=True).returncode == 0


def script(python: str, paths: list[str], cache: str | None = None) -> str:
    use_cache = ("from lazarus.codecache import install\n"
                 f"install({cache!r})  # the modules' code in one file (lazarus/codecache.py)\n") if cache else ""
    return (f"#!{python} -S\n"
            "# The lazarus command, written by `make install` (lazarus/launcher.py): the interpreter starts without\n"
            "# site's scan of the venv, and these are the paths that scan gave at install time.\n"
            "import gc\n"
            "import sys\n"
            "\n"
            "gc.disable()  # through start-up's imports, as python -m lazarus does (cli._gc_off)\n"
            f"sys.path.extend({paths!r})\n"
            f"{use_cache}"
            "from lazarus.cli import entry\n"
            "entry()\n")


def cache_path(launcher: str) -> str:
    """Where the launcher at `launcher` keeps its code cache: beside it (VENV/bin/lazarus-code.cache)."""
    return f"{os.path.abspath(launcher)}-code.cache"


def _write_cache(python: str, paths: list[str], out: str) -> bool:
    """The code cache for the launcher (lazarus/codecache.py), written by its interpreter started as the launcher
    starts it; False (and no file) if that fails."""
    import subprocess
    code = (f"import sys; del sys.path[0]; sys.path.extend({paths!r}); "
            f"from lazarus.codecache import write; write({out!r})")
    if subprocess.run([python, "-S", "-c", code], capture_output=True, cwd="/").returncode == 0:
        return True
    with contextlib.suppress(OSError):
        os.unlink(out)
    return False


def write(path: str) -> bool:
    """Write the launcher to `path` (atomically, mode 0755); False, leaving `path` as it is, where the
    interpreter's path is too long for a `#!` line or site was not run here."""
    python = sys.executable
    if len(python) + len(" -S") + 2 > _SHEBANG_MAX or sys.flags.no_site:
        return False
    paths = site_paths()
    # setuptools' default editable install (taken where compat mode is gone) puts no directory on sys.path: it
    # installs an import hook from a .pth, which -S skips. The repository itself is then what must be added.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in paths:
        paths.append(root)
    if not _imports(python, paths):
        return False
    cache = cache_path(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(script(python, paths, cache if _write_cache(python, paths, cache) else None))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lazarus.launcher PATH", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if write(sys.argv[1]) else 1)
