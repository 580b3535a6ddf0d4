"""Struct sizes and ioctl numbers of the kernel layer against the kernel's own values (no root needed)."""

from __future__ import annotations

import ctypes

import pytest

from lazarus.kernel import abi


@pytest.mark.parametrize("struct,size", list(abi.STRUCT_SIZES.items()), ids=lambda x: getattr(x, "__name__", str(x)))
def test_struct_size(struct: type, size: int) -> None:
    assert ctypes.sizeof(struct) == size


# Values as the kernel headers expand them on x86_64 (checked against <linux/userfaultfd.h>, <linux/fs.h>).
IOCTLS = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "PAGEMAP_SCAN": 0xC0606610,
    "USERFAULTFD_IOC_NEW": 0xAA00,
}


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(name: str) -> None:
    assert getattr(abi, name) == IOCTLS[name], f"{name} = {getattr(abi, name):#x}"


def test_uffd_msg_layout() -> None:
    msg = abi.uffd_msg()
    assert abi.uffd_msg.arg.offset == 8
    assert type(msg).event.offset == 0
    assert abi._uffd_pagefault.address.offset == 8
