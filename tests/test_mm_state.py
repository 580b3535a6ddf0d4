"""Mapping state a dump must refuse rather than lose (the mapping targets themselves run in
test_dump_restore.py: madvise, guard, deleted-map, memfd-seals)."""

from __future__ import annotations

import json

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


@pytest.mark.parametrize(("mode", "names"), [
    # Unlinked from its name but still linked elsewhere: a restore would recreate a copy, cut off from
    # that other link.
    ("linked", (r"mapping 0x[0-9a-f]+-0x[0-9a-f]+ .*deleted-a", r"other link")),
])
def test_dump_refuses_deleted_file(harness: H.Harness, mode: str, names: tuple[str, ...]) -> None:
    """The dump refuses naming the mapping or fd, and the process runs on unchanged."""
    case = H.Case(f"deleted-map-{mode}", "deleted_map", (mode,))
    target = harness.start_case(case)
    before = H.snapshot(target.pid)
    image = harness.image_dir()
    res = harness.dump(target, image)
    H.assert_clean_error(res, *names)
    assert not image.exists() and H.sibling_leftovers(image) == []
    assert target.alive(), target.describe()
    harness.settle(case, target)
    assert not H.diff_snapshots(before, H.snapshot(target.pid))
    H.expect_pass(harness.run_case(case, target), target, res)
    assert target.wait_exit(10) == 0


def test_lazy_fork_child_of_late_wipeonfork_memory_is_empty(harness: H.Harness) -> None:
    """Served on faults only (--no-background), so that the mapping the target makes WIPEONFORK after the
    restore still has all its pages pending when it forks: the child's inherited uffd registration must
    not get the parent's data there (madvise.c checks the child sees zeros, the parent its data)."""
    case = H.CASES_BY_ID["madvise"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, "--no-background", lazy=True, like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()


def test_lazy_restore_checks_the_pages_it_writes_before_the_task_runs(harness: H.Harness) -> None:
    """Locked memory is written at restore even when lazy (mlock needs it in place): its page data is checked
    against the image's sums first, and a corrupt chunk refuses the restore, naming the page file."""
    case = H.CASES_BY_ID["madvise"]
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    task = json.loads((image / f"task-{target.pid}.json").read_text())
    locked = [v for v in task["mm"]["vmas"] if "lo" in v["vmflags"] and v["pages"]]
    assert locked, "the image has no locked mapping with pages"
    path = image / f"pages-{target.pid}.img"
    with open(path, "r+b") as f:
        off = locked[0]["pages"][0][2] * 4096 + 100
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = harness.restore(image, lazy=True, like=target)
    H.assert_clean_error(r.proc, rf"pages-{target.pid}\.img", r"chunk")
    assert r.pid is None, f"a restore that failed wrote pid {r.pid}"


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_deleted_file_whose_name_was_taken(harness: H.Harness, mode: str) -> None:
    """A new file took the deleted file's name: the restore recreates the deleted one in a private directory
    beside it (as it always does), leaves the new file alone, and removes what it made (deleted_map.c checks
    all three)."""
    case = H.Case("deleted-map-replaced", "deleted_map", ("replaced",))
    target = harness.start_case(case)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, res.stderr
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()
