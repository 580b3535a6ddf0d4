"""Struct sizes and ioctl numbers of the kernel layer against the kernel's own values (no root needed)."""

from __future__ import annotations

import ctypes

import pytest

from lazarus.kernel import abi

# sizeof() of each struct as the kernel defines it on x86_64, written here rather than taken from abi.py:
# checked with gcc against <sys/user.h>, <linux/ptrace.h>, <linux/prctl.h>, <linux/sched.h> and
# <linux/userfaultfd.h>; page_region, pm_scan_arg (<linux/fs.h>, 6.7+), uffdio_poison and uffdio_move (6.6/6.8+)
# counted from their u64 fields in the 6.18 headers.
KERNEL_SIZES = {
    "user_regs_struct": 216, "iovec": 16, "peeksiginfo_args": 16, "ptrace_rseq_configuration": 24,
    "kernel_sigaction": 32, "stack_t": 24, "itimerval": 32, "rlimit64": 16, "prctl_mm_map": 104,
    "clone_args": 88, "page_region": 24, "pm_scan_arg": 96, "uffdio_api": 24, "uffdio_range": 16,
    "uffdio_register": 32, "uffdio_copy": 40, "uffdio_zeropage": 32, "uffdio_writeprotect": 24,
    "uffdio_continue": 32, "uffdio_poison": 32, "uffdio_move": 40, "uffd_msg": 32,
}


@pytest.mark.parametrize("name", KERNEL_SIZES)
def test_struct_size(name: str) -> None:
    assert ctypes.sizeof(getattr(abi, name)) == KERNEL_SIZES[name]


@pytest.mark.parametrize("name,size", list(abi.STRUCT_SIZES.items()), ids=lambda x: str(x))
def test_struct_size_table(name: str, size: int) -> None:
    """abi.STRUCT_SIZES (the ioctl numbers' sizes at import, before any struct class is made) agrees with the
    layouts; the kernel's values are KERNEL_SIZES."""
    assert ctypes.sizeof(getattr(abi, name)) == size
    if name in KERNEL_SIZES:
        assert size == KERNEL_SIZES[name]


def test_structs_are_made_on_first_use_once() -> None:
    """Importing abi makes no ctypes class (start-up cost); each is made when first asked for, then kept."""
    import subprocess
    import sys
    code = ("import lazarus.kernel.abi as a; made = [n for n in a._MAKERS if n in vars(a)]; "
            "t = a.timeval; assert a.itimerval._fields_[0][1] is t; "
            "c = a.uffdio_copy; r = a.uffdio_register; from lazarus.kernel.abi import uffd_msg; "
            "print(made, c is a.uffdio_copy, a.uffdio_range in [f[1] for f in r._fields_], "
            "issubclass(a._uffd_arg, __import__('ctypes').Union), uffd_msg.__module__, a.pidfd_info.__doc__[:7])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "True", "True", "lazarus.kernel.abi", "include"], out
    with pytest.raises(AttributeError):
        abi.no_such_struct  # noqa: B018


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
