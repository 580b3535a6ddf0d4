"""The AMX permission's image field, the request derived from it, the code that makes a restored task's first
tile use, and `lazarus check`'s AVX-512/AMX rows (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazarus.errors import ImageError
from lazarus.images import Image, ImageWriter
from lazarus.kernel import features
from lazarus.restore import core as rcore

XTILECFG, XTILEDATA = 1 << 17, 1 << 18
DEFAULT_PERM = 0x200E7  # x87 SSE AVX AVX-512 and XTILECFG, as ARCH_GET_XCOMP_PERM answers before a request


@pytest.mark.parametrize("value", [0, DEFAULT_PERM, DEFAULT_PERM | XTILEDATA, (1 << 64) - 1])
def test_xcomp_perm_accepted(value: int) -> None:
    assert rcore.xcomp_perm_of({"xcomp_perm": value}) == value


def test_xcomp_perm_absent_or_null() -> None:
    assert rcore.xcomp_perm_of({}) is None  # an image from before the field
    assert rcore.xcomp_perm_of({"xcomp_perm": None}) is None  # dumped on a kernel without the call


@pytest.mark.parametrize("value", [True, -1, 1 << 64, "0x600e7", 1.5, [18]])
def test_xcomp_perm_refused(value: object) -> None:
    with pytest.raises(ImageError, match=r"core\.xcomp_perm"):
        rcore.xcomp_perm_of({"xcomp_perm": value})


@pytest.mark.parametrize(("want", "have", "feature_nr"), [
    (DEFAULT_PERM | XTILEDATA, DEFAULT_PERM, 18),  # AMX: the highest component, XTILEDATA
    (DEFAULT_PERM | XTILEDATA, DEFAULT_PERM | XTILEDATA, None),  # already granted
    (XTILECFG | XTILEDATA, 0, 18),
    (DEFAULT_PERM, DEFAULT_PERM | XTILEDATA, None),  # more than wanted: nothing to request (checked later)
    (DEFAULT_PERM | 1 << 63, DEFAULT_PERM, 63),
])
def test_xcomp_request(want: int, have: int, feature_nr: int | None) -> None:
    assert rcore.xcomp_request(want, have) == feature_nr


def test_first_tile_use_code() -> None:
    code, cfg = rcore._TILE_FIRST_USE, rcore._TILE_FIRST_USE_CFG
    assert len(code) == 64 and len(cfg) == 64
    # ldtilecfg disp32(%rip): the displacement counts from the end of the 9-byte instruction to the config.
    assert code[:5] == bytes.fromhex("c4e2784905")
    assert 9 + int.from_bytes(code[5:9], "little", signed=True) == len(code)
    body = code.rstrip(b"\xcc")
    assert body.endswith(b"\x0f\x05") and body.count(b"\x0f\x05") == 1  # the syscall RemoteTask.raw stops at
    # Palette 1, start_row 0, reserved bytes zero, tmm0 = 1 row x 64 bytes, other tiles unused.
    assert cfg[0] == 1 and cfg[1:16] == bytes(15)
    colsb = [int.from_bytes(cfg[16 + 2 * i:18 + 2 * i], "little") for i in range(16)]
    assert colsb == [64] + [0] * 15
    assert list(cfg[48:64]) == [1] + [0] * 15


def test_xcomp_perm_round_trips_through_an_image(tmp_path: Path) -> None:
    xstate = bytes(2432).hex()
    cores = {7: {"regs": "00", "xstate": xstate, "xcomp_perm": DEFAULT_PERM | XTILEDATA},
             8: {"regs": "00", "xstate": xstate, "xcomp_perm": None},
             9: {"regs": "00", "xstate": xstate, "xcomp_perm": (1 << 64) - 1}}
    with ImageWriter(tmp_path / "img") as w:
        for pid, core in cores.items():
            w.write_task(pid, {"pid": pid, "core": core, "mm": {"vmas": []}, "files": [], "signals": {},
                               "misc": {"comm": "t"}})
        w.commit({"kernel_release": "6.18.0-test", "arch": "x86_64", "cpu": {"xcr0": 0xE7, "xstate_size": 2432},
                  "root_pid": 7, "tasks": list(cores),
                  "tree": [{"pid": p, "ppid": 7 if p != 7 else 1, "pgid": 7, "sid": 7, "state": "running",
                            "comm": "t", "exit": None} for p in cores]})
    img = Image.open(tmp_path / "img")
    try:
        for pid, core in cores.items():
            back = img.task(pid)["core"]
            assert back == core
            assert rcore.xcomp_perm_of(back) == core["xcomp_perm"]
    finally:
        img.close()


def rows(xcr0: int, supp: int | None) -> dict[str, features.Feature]:
    out = {f.name: f for f in features.cpu_part_rows(xcr0, supp)}
    assert set(out) == {"AVX-512", "AMX"}
    assert all(f.purposes == ("info",) and f.detail for f in out.values())
    return out


def test_cpu_rows_amx_machine() -> None:
    r = rows(0x602E7, 0x602E7)
    assert r["AVX-512"].available and r["AMX"].available


def test_cpu_rows_avx512_only() -> None:
    r = rows(0x2E7, 0x2E7)
    assert r["AVX-512"].available and not r["AMX"].available
    assert "17-18" in r["AMX"].detail


def test_cpu_rows_avx_only() -> None:
    r = rows(0x7, 0x7)
    assert not r["AVX-512"].available and not r["AMX"].available
    assert "5-7" in r["AVX-512"].detail
    assert not rows(0x67, 0x67)["AVX-512"].available  # opmask and ZMM_Hi256 without Hi16_ZMM


def test_cpu_rows_amx_cpu_but_kernel_will_not_grant() -> None:
    assert not rows(0x602E7, None)["AMX"].available  # no ARCH_GET_XCOMP_SUPP
    r = rows(0x602E7, 0x2E7)
    assert not r["AMX"].available and "permission" in r["AMX"].detail
