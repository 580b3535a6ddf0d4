"""The CPU's register state comes back whatever the CPU: the XSTATE at the length the kernel reports, AVX-512
(zmm0-31, k0-7) and AMX (the tile permission, tmm0-7 and their configuration), eagerly and lazily.

What this CPU has is what `lazarus check` says (its "AVX-512" and "AMX" rows); the regs target reports in its
log which parts it ran ("# parts: avx512 amx"), so a part that silently did not run fails here, and a part the
CPU lacks is skipped with check's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lazarus.kernel import abi, features

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

MODES = ("eager", "lazy")
TILEDATA = 1 << 18  # XSTATE component 18, XTILEDATA (arch/x86/include/asm/fpu/types.h)
TILES = 1 << 17 | TILEDATA  # with XTILECFG
XSTATE_BV_OFFSET = 512  # the XSAVE header's first word in the standard-format regset


def cpuid_xsave_size(tmp: os.PathLike[str]) -> int:
    exe = os.path.join(tmp, "cpuid_xsave")
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O1", "-o", exe, str(H.TARGETS_SRC / "cpuid_xsave.c")], check=True, timeout=60,
                   capture_output=True)
    return int(subprocess.run([exe], check=True, capture_output=True, text=True, timeout=10).stdout)


def check_row(name: str) -> features.Feature:
    row = features.get(name)
    assert row is not None, f"`lazarus check` has no {name} row"
    return row


def needs(name: str) -> None:
    row = check_row(name)
    if not row.available:
        pytest.skip(f"lazarus check: {name}: {row.detail}")


def regs_case(mode: str) -> H.Case:
    return H.Case(f"regs-{mode}", "regs", (mode,), syscall=None)


def parts(target: H.Target) -> list[str]:
    for line in target.log_text().splitlines():
        if line.startswith("# parts:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"no '# parts:' line in the log: {target.describe()}")


def task_core(image: Path, pid: int) -> dict[str, Any]:
    return json.loads((image / f"task-{pid}.json").read_text())["core"]


def xstate_bv(core: dict[str, Any]) -> int:
    return int.from_bytes(bytes.fromhex(core["xstate"])[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little")


def dump_then_restore(harness: H.Harness, case: H.Case, mode: str) -> tuple[H.Target, dict[str, Any]]:
    """Start, dump (the original goes), restore in `mode`, trigger; the restored target must PASS.
    Returns the original target and the image's core record."""
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}\n{target.describe()}"
    core = task_core(image, target.pid)
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, f"restore failed: exit {r.returncode}\n{r.stderr}"
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()
    return target, core


def test_xstate_saved_at_cpu_length(harness: H.Harness, tmp_path: os.PathLike[str]) -> None:
    want = cpuid_xsave_size(tmp_path)
    case = next(c for c in H.CASES if c.id == "regs")
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, res.stderr
    inv = json.loads((image / "inventory.json").read_text())
    task = json.loads((image / f"task-{target.pid}.json").read_text())
    saved = len(task["core"]["xstate"]) // 2
    assert saved == want, f"saved {saved} bytes of XSTATE; CPUID says this CPU's XSAVE area is {want}"
    assert inv["cpu"]["xstate_size"] == want


@pytest.mark.parametrize("mode", MODES)
def test_register_parts_follow_check(harness: H.Harness, mode: str) -> None:
    """Every part `lazarus check` shows ran in the target, came back, and nothing else was claimed."""
    target, _ = dump_then_restore(harness, regs_case("auto"), mode)
    ran = parts(target)
    vector = "avx512" if check_row("AVX-512").available else ran[0]
    assert ran[0] == vector and vector in ("avx512", "avx", "sse"), f"parts {ran}, check: {check_row('AVX-512')}"
    assert ("amx" in ran) == check_row("AMX").available, f"parts {ran}, check: {check_row('AMX')}"


@pytest.mark.parametrize("mode", MODES)
def test_avx512_registers_restored(harness: H.Harness, mode: str) -> None:
    needs("AVX-512")
    target, _ = dump_then_restore(harness, regs_case("noamx"), mode)
    assert parts(target) == ["avx512"]


@pytest.mark.parametrize("mode", MODES)
def test_amx_tiles_and_permission_restored(harness: H.Harness, mode: str) -> None:
    """Tiles in use: the image holds the permission and the tile data; the restored task has both, and its
    next tile instruction works (CRIU 4.2's dies of SIGILL there)."""
    needs("AMX")
    target, core = dump_then_restore(harness, regs_case("auto"), mode)
    assert "amx" in parts(target)
    assert core["xcomp_perm"] & TILES == TILES, f"core.xcomp_perm {core['xcomp_perm']:#x}"
    assert xstate_bv(core) & TILES == TILES, f"xstate_bv {xstate_bv(core):#x}: the tiles were not saved in use"


@pytest.mark.parametrize("mode", MODES)
def test_amx_permission_without_tiles_restored(harness: H.Harness, mode: str) -> None:
    """Permission asked for, tiles never used: the permission alone must come back (the target checks it and
    uses a tile for the first time after the restore)."""
    needs("AMX")
    target, core = dump_then_restore(harness, regs_case("amxperm"), mode)
    assert parts(target)[-1] == "amx-perm"
    assert core["xcomp_perm"] & TILES == TILES
    assert not xstate_bv(core) & TILEDATA


@pytest.mark.parametrize("mode", MODES)
def test_permission_check_can_fail(harness: H.Harness, mode: str) -> None:
    """The image field is what brings the permission back: strip it from an image (tiles unused, so the restore
    itself has no reason to refuse) and the restored target must report the permission lost."""
    needs("AMX")

    def strip(core: dict[str, Any]) -> None:
        core["xcomp_perm"] &= ~TILEDATA

    case = regs_case("amxperm")
    image, target = edited_image(harness, case, strip)
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    result = harness.run_case(case, r.target)
    assert result.startswith("FAIL") and "permission lost" in result, f"{result}\n{r.target.describe()}"


def test_amx_permission_not_granted_unasked(harness: H.Harness) -> None:
    """A process that never asked for tiles must not come back with the permission (the target checks)."""
    needs("AMX")
    _, core = dump_then_restore(harness, regs_case("noamx"), "eager")
    assert not core["xcomp_perm"] & TILEDATA


# -- refusals: one line, nothing left running ------------------------------------------------------------------

def edited_image(harness: H.Harness, case: H.Case,
                 change: Callable[[dict[str, Any]], None]) -> tuple[Path, H.Target]:
    """Dump `case` and rewrite its task file with `change(core)`, checksums resealed (only the change is wrong)."""
    from lazarus.images.format import hex64, inventory_bytes, inventory_self_check, json_bytes, xxh3

    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    path = image / f"task-{target.pid}.json"
    task = json.loads(path.read_text())
    change(task["core"])
    data = json_bytes(task)
    path.write_bytes(data)
    inv = json.loads((image / "inventory.json").read_text())
    inv["files"][path.name].update(size=len(data), xxh3=hex64(xxh3(data)))
    inv["self_check"] = inventory_self_check(inv)
    (image / "inventory.json").write_bytes(inventory_bytes(inv))
    return image, target


def restore_refused(harness: H.Harness, image: Path, pid: int, *patterns: str) -> None:
    r = harness.restore(image)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, *patterns)
    assert r.proc.returncode == 1
    assert not H.is_alive(pid), f"pid {pid} runs after a refused restore"


def test_tiles_without_permission_refused(harness: H.Harness) -> None:
    needs("AMX")

    def drop(core: dict[str, Any]) -> None:
        core["xcomp_perm"] &= ~TILES

    image, target = edited_image(harness, regs_case("auto"), drop)
    restore_refused(harness, image, target.pid, r"xcomp_perm", r"tile", str(target.pid))


def test_permission_this_kernel_cannot_grant_refused(harness: H.Harness) -> None:
    """An image whose process held a permission this CPU and kernel do not offer fails before anything runs."""
    supp = features.xcomp_supported()
    if supp is None:
        pytest.skip("lazarus check: AMX: arch_prctl(ARCH_GET_XCOMP_SUPP) unavailable, no permission to restore")
    foreign = next(1 << b for b in range(63, 1, -1) if not supp >> b & 1)

    def grant_more(core: dict[str, Any]) -> None:
        core["xcomp_perm"] |= foreign

    image, target = edited_image(harness, regs_case("noamx"), grant_more)
    restore_refused(harness, image, target.pid, r"permission", r"offer", str(target.pid))


def test_xstate_of_other_length_refused(harness: H.Harness) -> None:
    """A task's XSTATE must be exactly this CPU's regset length (the kernel would answer EFAULT)."""
    _, size = features.cpu_xstate()

    def shorten(core: dict[str, Any]) -> None:
        core["xstate"] = core["xstate"][:-128]

    image, target = edited_image(harness, regs_case("noamx"), shorten)
    restore_refused(harness, image, target.pid, r"core\.xstate", str(size - 64), str(size))


def test_check_rows_agree_with_xcr0() -> None:
    xcr0, _ = features.cpu_xstate()
    assert check_row("AVX-512").available == (xcr0 & abi.XFEATURE_MASK_AVX512 == abi.XFEATURE_MASK_AVX512)
    if check_row("AMX").available:
        assert xcr0 & TILES == TILES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("perm", ["amx", "plain"])
def test_guest_permission_restored(harness: H.Harness, mode: str, perm: str) -> None:
    """The permission a VMM asked for on behalf of its guests comes back exactly: granted where it was, and
    not granted where it was not."""
    if perm == "amx":
        needs("AMX")
    case = H.Case(f"guestperm-{perm}", "guestperm", (perm,))
    _, core = dump_then_restore(harness, case, mode)
    assert core.get("xcomp_guest_perm") is not None, "the dump did not record the guest permission"
    assert bool(core["xcomp_guest_perm"] & TILEDATA) == (perm == "amx"), core["xcomp_guest_perm"]
