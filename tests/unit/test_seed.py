"""restore/seed.py: which image layouts leave the seed's trampoline free (the others are cloned from the
restorer instead)."""

from __future__ import annotations

from lazarus.restore.seed import SEED_ADDR, fits

SIZE = 4 * 4096


def _vma(start: int, end: int) -> dict[str, int]:
    return {"start": start, "end": end}


def test_a_usual_layout_leaves_the_seed_address_free() -> None:
    vmas = [_vma(0x5555_5555_0000, 0x5555_5556_0000), _vma(0x7F00_0000_0000, 0x7F00_0010_0000),
            _vma(0x7FFF_FFFD_E000, 0x7FFF_FFFF_F000)]
    assert fits(vmas, SEED_ADDR, SIZE)


def test_a_mapping_over_the_seed_address_or_within_its_guard_gap_does_not_fit() -> None:
    assert not fits([_vma(SEED_ADDR, SEED_ADDR + 4096)], SEED_ADDR, SIZE)
    assert not fits([_vma(SEED_ADDR - 0x10_0000, SEED_ADDR - 0x1000)], SEED_ADDR, SIZE)  # ends 4 KiB before
    assert not fits([_vma(SEED_ADDR + SIZE + 0x1000, SEED_ADDR + SIZE + 0x2000)], SEED_ADDR, SIZE)
    # a mapping just past the 1 MiB guard on each side is fine
    assert fits([_vma(SEED_ADDR - 0x20_0000, SEED_ADDR - 0x10_0000),
                 _vma(SEED_ADDR + SIZE + 0x10_0000, SEED_ADDR + SIZE + 0x20_0000)], SEED_ADDR, SIZE)
