"""The private daemon of `restore --lazy -d` opens the image before the restore reads it, but checks it
(validate_image) only when the restore does not vouch for it: each handoff carries the inventory self_check of
the image the restore checked (lazy/handoff.py send_only `checked`, Listener `unchecked`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lazarus.images import validate
from lazarus.lazy import handoff, trust


class Reached(Exception):
    """_add() got past the image's check (to the task lookup, stubbed to stop here)."""


class _Closable:
    fd = -1
    task_fd = None

    def close(self) -> None:
        pass


class _Server:
    def add_watch(self, fd: int, callback: Any) -> None:
        pass


@pytest.fixture
def add(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A Listener's _add() with everything after the image's check stubbed out; yields (listener maker, checks
    made, the image)."""
    checks: list[Any] = []
    monkeypatch.setattr(validate, "validate_image", checks.append)
    monkeypatch.setattr(trust, "verify_named_task", lambda _peer, _pid: _Closable())
    monkeypatch.setattr(handoff.Uffd, "adopt", staticmethod(lambda _fd, **_kw: _Closable()))

    def stop(_pid: int) -> int:
        raise Reached
    monkeypatch.setattr(handoff, "_own_pid", stop)
    (tmp_path / "inventory.json").write_text("{}")
    img = SimpleNamespace(inventory={"self_check": "0123456789abcdef"})
    socks: list[socket.socket] = []

    def listener(*, unchecked: bool, connected: bool = True) -> handoff.Listener:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socks.extend((a, b))
        return handoff.Listener(_Server(), a, connected=connected, images={str(tmp_path): img},
                                unchecked=unchecked)

    def call(lst: handoff.Listener, checked: str | None) -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            with pytest.raises(Reached):
                lst._add(None, 1, tmp_path, fd, checked)  # type: ignore[arg-type]
        finally:
            os.close(fd)

    yield listener, call, checks, img
    for s in socks:
        s.close()


def test_checked_once_when_the_restore_does_not_vouch(add: Any) -> None:
    listener, call, checks, img = add
    lst = listener(unchecked=True)
    call(lst, None)
    assert checks == [img]
    call(lst, None)  # the next process of the same tree: the image is checked already
    assert checks == [img]


def test_checked_when_the_restore_vouched_for_another_inventory(add: Any) -> None:
    listener, call, checks, img = add
    call(listener(unchecked=True), "fedcba9876543210")
    assert checks == [img]


def test_not_checked_again_when_the_restore_checked_the_same_inventory(add: Any) -> None:
    listener, call, checks, img = add
    call(listener(unchecked=True), img.inventory["self_check"])
    assert checks == []


def test_an_image_seeded_checked_is_not_checked_again(add: Any) -> None:
    listener, call, checks, _img = add
    call(listener(unchecked=False), None)
    assert checks == []


def test_only_the_restores_own_socketpair_skips_the_check(add: Any) -> None:
    """A listening server (not connected to one restore) never takes a peer's word for it."""
    listener, _call, _checks, _img = add
    assert listener(unchecked=True, connected=False)._unchecked == set()
