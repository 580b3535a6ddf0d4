"""Lazarus: checkpoint/restore of Linux processes, with lazy restore through userfaultfd.

The library API (lazarus/api.py): lazarus.dump, lazarus.restore, lazarus.check, lazarus.show. They are
loaded on first use, so that `import lazarus` (and the command's start-up) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
_API = ("dump", "restore", "check", "show", "Restoration", "CheckResult")


def __getattr__(name: str) -> object:
    if name in _API:
        from lazarus import api
        return getattr(api, name)
    raise AttributeError(f"module 'lazarus' has no attribute {name!r}")


__all__ = ["__version__", *_API]
