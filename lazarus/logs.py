"""Loggers that import `logging` only once a message could be shown.

Importing logging (with traceback, linecache, tokenize, textwrap, string, threading, weakref) was ~6-9 ms of
every command's start-up, for messages that are off unless `-v`. A logger from getLogger() here forwards to
logging's logger of the same name as soon as `logging` is imported by anyone, so whoever configures logging (a
test, the service, an embedding program, `lazarus -v`) gets every message as before. Until then debug and info
messages are dropped, which is what logging does with them by default (root logger at WARNING); a warning or an
error imports logging and goes through it, after `on_first_use` (the CLI's handler set-up) has run.
"""

from __future__ import annotations

import sys

# Called once, just before the first message that goes to logging (the CLI sets it; see cli._setup_logging).
on_first_use = None


def _first_use() -> None:
    global on_first_use
    hook, on_first_use = on_first_use, None
    if hook is not None:
        hook()


class Logger:
    """The part of logging.Logger that lazarus calls."""

    __slots__ = ("name", "_real")

    def __init__(self, name: str) -> None:
        self.name = name
        self._real = None

    def _logger(self):  # a logging.Logger (not annotated: its module is not imported here on purpose)
        real = self._real
        if real is None:
            import logging
            _first_use()
            real = self._real = logging.getLogger(self.name)
        return real

    def _live(self) -> bool:
        return self._real is not None or "logging" in sys.modules

    # stacklevel=2: the record names the caller, not this module.
    def debug(self, msg: object, *args: object, **kw: object) -> None:
        if self._live():
            self._logger().debug(msg, *args, stacklevel=2, **kw)

    def info(self, msg: object, *args: object, **kw: object) -> None:
        if self._live():
            self._logger().info(msg, *args, stacklevel=2, **kw)

    def warning(self, msg: object, *args: object, **kw: object) -> None:
        self._logger().warning(msg, *args, stacklevel=2, **kw)

    def error(self, msg: object, *args: object, **kw: object) -> None:
        self._logger().error(msg, *args, stacklevel=2, **kw)

    def exception(self, msg: object, *args: object, **kw: object) -> None:
        self._logger().exception(msg, *args, stacklevel=2, **kw)


def getLogger(name: str) -> Logger:
    return Logger(name)


__all__ = ["Logger", "getLogger"]
