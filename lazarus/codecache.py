"""The compiled code of the modules a command imports, in one file mapped at start-up (the `lazarus` launcher).

A `lazarus restore` imports ~100 modules from source files (lazarus's own and the standard library's). Each
costs the import system ~40-50 us before its code runs: a search through sys.path (directory listings, stats),
then opening, reading and checking its .pyc. `make install` (lazarus/launcher.py) writes the code of those
modules into one file; the launcher reads it first, and a finder placed ahead of the standard ones hands each
module its code from there: one stat of its source per module instead of the search and the .pyc.

Nothing is trusted blindly: a module whose source file is not the one recorded (path, size, mtime) is left to
the normal import system (which compiles it again, as after any edit), and so is any module not in the file.
The file records the sys.path it was made for: with another one (PYTHONPATH set, another interpreter), or an
unreadable or foreign file, the launcher does not use it at all.

lazarus/launcher.py writes it (write(), in an interpreter started as the launcher starts the command).
"""

from __future__ import annotations

import marshal
import os
import sys
from _frozen_importlib import ModuleSpec

# What the file holds: a 4-byte length, the index (marshal: MAGIC, interpreter, sys.path, {name: (origin,
# is_package, size, mtime_ns, offset, length)}), then each module's marshalled code at offset (after the index).
MAGIC = "lazarus-codecache-2"

# Imported to find what goes into the file: every command's modules (restore, its lazy-pages daemon and guard,
# dump and its watchdog, the service, show), with everything they import at module level. The file is mapped,
# so what one command does not import costs it nothing.
ENTRY_MODULES = (
    "lazarus.cli", "lazarus.api", "lazarus.restore", "lazarus.restore.uffd", "lazarus.lazy.daemon",
    "lazarus.lazy.handoff", "lazarus.lazy.server", "lazarus.lazy.guard", "lazarus.lazy.trust",
    "lazarus.lazy.anchor", "lazarus.lazy.spawn", "lazarus.kernel.uffd", "lazarus.dump", "lazarus.dump.watchdog",
    "lazarus.images.summary", "lazarus.service", "argparse", "gettext", "textwrap", "locale",
)


class CodeCache:
    """A meta path finder and loader serving modules from the file's code (see the module's docstring)."""

    def __init__(self, entries: dict[str, tuple[str, bool, int, int, int, int]], code: memoryview) -> None:
        self.entries = entries
        self.code = code
        self.served: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        origin, is_package, size, mtime_ns = entry[:4]
        try:
            st = os.stat(origin)
        except OSError:
            st = None
        if st is None or st.st_size != size or st.st_mtime_ns != mtime_ns:
            del self.entries[name]  # changed since the install: the normal import system compiles it
            return None
        spec = ModuleSpec(name, self, origin=origin, is_package=is_package)
        spec.has_location = True  # __file__ is the source's, as a normal import sets it
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(origin)]
        return spec

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: object) -> None:
        name = module.__name__  # type: ignore[attr-defined]
        offset, length = self.entries.pop(name)[4:]
        code = marshal.loads(self.code[offset:offset + length])
        self.served.append(name)
        exec(code, module.__dict__)  # type: ignore[attr-defined]


def install(path: str) -> CodeCache | None:
    """Put the cache in `path` ahead of the import system's finders, if it was made for this interpreter and
    this sys.path; None (nothing changed) otherwise."""
    if os.environ.get("PYTHONPATH"):
        return None
    import mmap  # an extension module the restore loads anyway (its page files)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Mapped, not read: a command faults in the pages of the modules it imports and no others, so the
            # file can hold every command's modules (write() replaces it by a rename, never in place).
            data = memoryview(mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ))
        finally:
            os.close(fd)
        n = int.from_bytes(data[:4], "little")
        magic, executable, paths, entries = marshal.loads(data[4:4 + n])
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if magic != MAGIC or executable != sys.executable or paths != sys.path[1:]:
        return None
    cache = CodeCache(entries, data[4 + n:])
    sys.meta_path.insert(0, cache)
    return cache


def collect(modules: tuple[str, ...] = ENTRY_MODULES) -> dict[str, tuple[str, bool, int, int, bytes]]:
    """Import `modules` here and return the code of every module then loaded from a source file."""
    for name in modules:
        __import__(name)
    out = {}
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        loader = getattr(spec, "loader", None)
        origin = getattr(spec, "origin", None)
        if type(loader).__name__ != "SourceFileLoader" or not origin or not origin.endswith(".py"):
            continue  # built in, frozen, an extension, __main__
        code = loader.get_code(name)
        st = os.stat(origin)
        out[name] = (origin, spec.submodule_search_locations is not None, st.st_size, st.st_mtime_ns,
                     marshal.dumps(code))
    return out


def write(out: str) -> None:
    """Write the cache to `out`. Run in an interpreter started as the launcher starts the command (-S, its
    paths appended to sys.path) with sys.path[0] removed: the launcher's is its own directory, which holds no
    module, and the rest must be the same for the modules to be those it would find."""
    index, blobs, offset = {}, [], 0
    for name, (origin, is_package, size, mtime_ns, code) in collect().items():
        index[name] = (origin, is_package, size, mtime_ns, offset, len(code))
        blobs.append(code)
        offset += len(code)
    head = marshal.dumps((MAGIC, sys.executable, sys.path, index))
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(4, "little") + head + b"".join(blobs))
    os.replace(tmp, out)
