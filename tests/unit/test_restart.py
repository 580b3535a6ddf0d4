"""How a task dumped inside a system call is resumed (restore/core.final_registers; no root needed)."""

from __future__ import annotations

import errno

from lazarus.kernel import abi
from lazarus.restore.core import final_registers

NEG1 = (1 << 64) - 1


def core_with(**regs: int) -> dict:
    r = abi.user_regs_struct()
    r.rip = 0x1000
    for k, v in regs.items():
        setattr(r, k, v & NEG1)
    return {"regs": bytes(r).hex()}


def test_not_in_a_syscall_is_left_alone() -> None:
    regs, restart = final_registers(core_with(rax=5, orig_rax=-1))
    assert (regs.rax, regs.rip, restart) == (5, 0x1000, False)


def test_completed_syscall_is_left_alone() -> None:
    regs, restart = final_registers(core_with(rax=0, orig_rax=abi.SYS.read))
    assert (regs.rax, regs.rip, restart) == (0, 0x1000, False)


def test_erestartsys_is_restarted_by_the_kernel() -> None:
    for code in (abi.ERESTARTSYS, abi.ERESTARTNOINTR, abi.ERESTARTNOHAND):
        regs, restart = final_registers(core_with(rax=-code, orig_rax=abi.SYS.read))
        assert restart and regs.rip == 0x1000 and regs.orig_rax == abi.SYS.read


def test_restart_block_nanosleep_sleeps_the_remaining_time() -> None:
    regs, restart = final_registers(core_with(rax=-abi.ERESTART_RESTARTBLOCK, orig_rax=abi.SYS.nanosleep,
                                              rdi=0x5000, rsi=0x6000))
    assert not restart
    assert (regs.rax, regs.rip, regs.rdi, regs.orig_rax) == (abi.SYS.nanosleep, 0x1000 - 2, 0x6000, NEG1)


def test_restart_block_absolute_clock_nanosleep_keeps_its_deadline() -> None:
    regs, _ = final_registers(core_with(rax=-abi.ERESTART_RESTARTBLOCK, orig_rax=abi.SYS.clock_nanosleep,
                                        rsi=1, rdx=0x5000, r10=0x6000))  # TIMER_ABSTIME
    assert (regs.rax, regs.rdx) == (abi.SYS.clock_nanosleep, 0x5000)


def test_sigtimedwait_cut_short_by_the_freeze_is_restarted() -> None:
    regs, restart = final_registers(core_with(rax=-errno.EINTR, orig_rax=abi.SYS.rt_sigtimedwait))
    assert (regs.rax, regs.rip, restart) == (abi.SYS.rt_sigtimedwait, 0x1000 - 2, False)
