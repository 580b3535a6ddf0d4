"""Lazarus: checkpoint/restore of Linux processes, with lazy restore through userfaultfd.

The library API (lazarus/api.py): lazarus.dump, lazarus.restore, lazarus.check, lazarus.show. They are
loaded on first use, so that `import lazarus` (and the command's start-up) stays cheap.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"
_API = ("dump", "restore", "check", "show", "Restoration", "CheckResult", "prepare_restore", "prepare_dump",
        "release_prepared")


def __getattr__(name: str) -> object:
    if name in _API:
        from lazarus import api
        return getattr(api, name)
    raise AttributeError(f"module 'lazarus' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`lazarus.dump` and `lazarus.restore` name the API's functions, although lazarus/dump/ and lazarus/restore/
    are subpackages too: the import system sets a subpackage as an attribute of its parent once it is imported,
    which would replace the function by the module. These two names keep answering the functions (use
    `from lazarus.restore import X` or sys.modules for the subpackages)."""

    @property
    def dump(self) -> object:
        from lazarus.api import dump
        return dump

    @dump.setter
    def dump(self, _module: object) -> None:
        pass

    @property
    def restore(self) -> object:
        from lazarus.api import restore
        return restore

    @restore.setter
    def restore(self, _module: object) -> None:
        pass


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", *_API]
