"""Transparent huge pages come back: a target holding 16 MiB in huge pages has at least as many after an eager
restore, and after a lazy restore once every page is in (UFFDIO_COPY alone would leave 4 KiB pages)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root
CASE = H.Case("thp", "thp")


@pytest.mark.parametrize("mode", ("eager", "lazy"))
def test_huge_pages_come_back(harness: H.Harness, mode: str, tmp_path: Path) -> None:
    target = harness.start_case(CASE)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    task = json.loads((image / f"task-{target.pid}.json").read_text())
    assert any(v.get("huge") for v in task["mm"]["vmas"]), "the dump recorded no huge pages"
    stats = tmp_path / "stats.json"
    extra = ["--stats", str(stats)] if mode == "lazy" else []
    r = harness.restore(image, *extra, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    if mode == "lazy":
        deadline = time.monotonic() + 30
        while not stats.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s = json.loads(stats.read_text())
        assert s["lost"] == [], s
        assert s["huge_collapsed_bytes"] >= 2 << 20, s
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    assert r.target.wait_exit(10) == 0
