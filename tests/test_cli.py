"""The command line around dump/restore: check, show, error reporting and option checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


def test_check_reports_every_feature(harness: H.Harness) -> None:
    res = harness.lazarus("check")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("userfaultfd", "PAGEMAP_SCAN", "clone3 set_tid", "pidfd_getfd", "soft-dirty", "vdso",
                 "uffd WP_ASYNC", "freezer"):
        assert name in res.stdout, f"check does not report {name}"
    assert "dump and restore can work" in res.stdout


def test_show_summarizes_an_image(harness: H.Harness) -> None:
    target = harness.start_case(H.CASES_BY_ID["fds"])
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, res.stderr
    out = harness.lazarus("show", str(image), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    (task,) = summary["tasks"]
    assert task["pid"] == target.pid
    assert task["exe"] == str(target.exe)
    kinds = {v["kind"] for v in task["vmas"]}
    assert {"anon", "file", "vdso"} <= kinds
    heap = [v for v in task["vmas"] if v["kind"] == "anon"]
    assert heap and all(v["lazy"] for v in heap), "anonymous memory is what --lazy serves"
    assert not any(v["lazy"] for v in task["vmas"] if v["kind"] == "file")
    assert task["pages"] == sum(v["pages"] for v in task["vmas"]) > 0
    fds = {f["fd"]: f for f in task["fds"]}
    live = {int(p.name) for p in Path(f"/proc/{target.pid}/fd").iterdir()}
    assert set(fds) == live, f"show lists fds {sorted(fds)}, the process has {sorted(live)}"
    assert fds[17]["type"] == "file"
    assert int(task["registers"]["rip"], 16) != 0
    assert summary["total_bytes"] == sum(p.stat().st_size for p in image.iterdir() if p.is_file())
    plain = harness.lazarus("show", str(image))
    assert plain.returncode == 0 and str(target.exe) in plain.stdout and "lazy" in plain.stdout


def test_errors_are_one_line_and_debug_shows_the_traceback(harness: H.Harness) -> None:
    missing = harness.image_dir()
    res = harness.lazarus("restore", "-D", str(missing))
    H.assert_clean_error(res, missing.name)
    dbg = harness.lazarus("--debug", "restore", "-D", str(missing))
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


@pytest.mark.parametrize("opt", [["--no-background"], ["--stats", "x.json"], ["--lazy-pages-socket", "s"]])
def test_lazy_options_need_lazy(harness: H.Harness, opt: list[str]) -> None:
    res = harness.lazarus("restore", "-D", str(harness.image_dir()), *opt)
    assert res.returncode == 2, res.stderr
    assert "--lazy" in res.stderr and "Traceback" not in res.stderr


def test_only_present_pages_are_saved(harness: H.Harness) -> None:
    """memory.c maps 64 MiB of which it touches every 7th page: the image holds those pages, not 64 MiB."""
    target = harness.start_case(H.CASES_BY_ID["memory-keep"])
    image = harness.image_dir()
    assert harness.dump(target, image, "--leave-running").returncode == 0
    summary = json.loads(harness.lazarus("show", str(image), "--json").stdout)
    (task,) = summary["tasks"]
    # the sparse region: the anonymous vmas of 4 MiB and more (the unmapped page splits it in two)
    sparse = [v for v in task["vmas"] if v["kind"] == "anon" and int(v["end"], 16) - int(v["start"], 16) >= 4 << 20]
    span_pages = sum(int(v["end"], 16) - int(v["start"], 16) for v in sparse) // 4096
    saved = sum(v["pages"] for v in sparse)
    assert span_pages >= 16000, sparse
    # every 7th page, give or take the edges: far fewer than the region's pages
    assert span_pages // 8 <= saved <= span_pages // 6, (saved, span_pages)
    page_file = next(image.glob("pages-*.img"))
    assert page_file.stat().st_size < span_pages * 4096 // 3


def test_dump_into_an_existing_empty_directory(harness: H.Harness) -> None:
    """`mkdir d && lazarus dump -D d` (as with CRIU): the empty directory becomes the image; a non-empty one is
    refused and left as it was, with the process running."""
    case = H.CASES_BY_ID["misc"]
    target = harness.start_case(case)
    full = harness.image_dir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    res = harness.dump(target, full)
    H.assert_clean_error(res, re.escape(str(full)), "not empty")
    assert res.returncode == 1
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"] and target.alive()
    assert H.sibling_leftovers(full) == [full.name]

    empty = harness.image_dir()
    empty.mkdir()
    res = harness.dump(target, empty)
    assert res.returncode == 0, res.stderr
    assert (empty / "inventory.json").is_file() and not target.alive()
    assert H.sibling_leftovers(empty) == [empty.name]
    r = harness.restore(empty, like=target)
    assert r.returncode == 0 and r.target is not None, r.stderr
    H.expect_pass(harness.run_case(case, r.target), r.target, r)
    assert r.target.wait_exit(15) == 0, r.target.describe()
