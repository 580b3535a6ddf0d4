"""`lazarus dump --direct` (page data written with O_DIRECT, straight to the device) gives images that restore like
any other, eager and lazy: targets with anonymous memory, huge pages, shared memory objects (memfd with seals, a
deleted mapped file) and threads check their own state after the restore."""

from __future__ import annotations

import json

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

CASES = [c for c in H.CASES if c.id in ("memory-keep", "memfd-seals", "deleted-map", "threads")]


@pytest.mark.parametrize("mode", ("eager", "lazy"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_direct_dump_restores(harness: H.Harness, case: H.Case, mode: str) -> None:
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image, "--direct")
    assert res.returncode == 0, res.stderr
    assert not target.alive(), f"the original pid {target.pid} still runs after the dump"
    inv = json.loads((image / "inventory.json").read_text())
    assert inv["files"][f"pages-{target.pid}.img"]["size"] > 0
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, r.stderr
    assert r.target is not None
    result = harness.run_case(case, r.target)
    H.expect_pass(result, r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()
