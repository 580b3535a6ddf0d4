"""Mapping state a dump must refuse rather than lose (the mapping targets themselves run in
test_dump_restore.py: madvise, guard, deleted-map, memfd-seals)."""

from __future__ import annotations

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


def test_dump_refuses_deleted_file_with_another_link(harness: H.Harness) -> None:
    """A mapped file unlinked from its name but still linked elsewhere: a restore would recreate a copy,
    cut off from that other link, so the dump refuses it naming the mapping, and the process runs on."""
    case = H.Case("deleted-map-linked", "deleted_map", ("linked",))
    target = harness.start_case(case)
    before = H.snapshot(target.pid)
    image = harness.image_dir()
    res = harness.dump(target, image)
    H.assert_clean_error(res, r"mapping 0x[0-9a-f]+-0x[0-9a-f]+ .*deleted-a", r"other link")
    assert not image.exists() and H.sibling_leftovers(image) == []
    assert target.alive(), target.describe()
    harness.settle(case, target)
    assert not H.diff_snapshots(before, H.snapshot(target.pid))
    H.expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0
