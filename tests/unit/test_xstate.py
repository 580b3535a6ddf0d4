"""kernel/xstate.py: the CPU's XSTATE layout, probed once per boot and read from a cache afterwards. A cache is
used only when it is ours, closed to others and of this boot: anything else means probing again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazarus.kernel import features, xstate

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the probe traces a child (root, as `lazarus check`)")


@needs_root
def test_probe_matches_check() -> None:
    assert xstate.probe() == features.cpu_xstate()


def test_cache_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    path = str(d / "cpu-xstate")
    assert xstate.read_cache(path) is None
    xstate.write_cache(0x2E7, 2696, path)
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert xstate.read_cache(path) == (0x2E7, 2696)
    assert not [p for p in os.listdir(d) if p != "cpu-xstate"], "temporary file left behind"


@pytest.mark.parametrize("damage", ["other boot", "garbage", "group writable", "open directory", "symlink",
                                    "implausible"])
def test_doubtful_cache_is_ignored(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "cache"
    path = d / "cpu-xstate"
    xstate.write_cache(0x2E7, 2696, str(path))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    if damage == "other boot":
        path.write_text(f"{boot[:-1]}{'0' if boot[-1] != '0' else '1'} 0x2e7 2696\n")
    elif damage == "garbage":
        path.write_text("0x2e7 2696\n")
    elif damage == "group writable":
        path.chmod(0o664)
    elif damage == "open directory":
        d.chmod(0o777)
    elif damage == "symlink":
        real = tmp_path / "elsewhere"
        real.write_text(path.read_text())
        path.unlink()
        path.symlink_to(real)
    elif damage == "implausible":
        path.write_text(f"{boot} 0x4 2696\n")
    assert xstate.read_cache(str(path)) is None


@needs_root
def test_machine_xstate_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cache the probe runs once and its answer is cached; with one, no child is forked."""
    monkeypatch.setattr(xstate, "CACHE", str(tmp_path / "c" / "cpu-xstate"))
    probes = []
    real = xstate.probe
    monkeypatch.setattr(xstate, "probe", lambda: probes.append(1) or real())
    monkeypatch.setattr(xstate, "_memo", None)
    first = xstate.machine_xstate()
    assert probes == [1] and xstate.read_cache(xstate.CACHE) == first
    monkeypatch.setattr(xstate, "_memo", None)
    assert xstate.machine_xstate() == first and probes == [1]
    assert first == features.cpu_xstate()
