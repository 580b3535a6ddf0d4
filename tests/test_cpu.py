"""The CPU's register state is saved at the length the kernel reports for this CPU, whatever the CPU."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


def cpuid_xsave_size(tmp: os.PathLike[str]) -> int:
    exe = os.path.join(tmp, "cpuid_xsave")
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O1", "-o", exe, str(H.TARGETS_SRC / "cpuid_xsave.c")], check=True, timeout=60,
                   capture_output=True)
    return int(subprocess.run([exe], check=True, capture_output=True, text=True, timeout=10).stdout)


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
