"""`lazarus dump --direct` (page data written with O_DIRECT, straight to the device) gives images that restore like
any other, eager and lazy: targets with anonymous memory, huge pages, shared memory objects (memfd with seals, a
deleted mapped file) and threads check their own state after the restore."""

from __future__ import annotations

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
    H.dump_with_then_restore(harness, case, mode == "lazy", "--direct")
