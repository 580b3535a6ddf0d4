"""Images that pass their checksums because someone recomputed them (issue 8, "images are trusted too much").

Each edit below is made to a copy of a good image, which is then re-sealed: the task file's size and xxh3 in the
inventory and the inventory's self-check are recomputed, so only the semantic check can catch it. Eager and
lazy restore must both refuse it with one line naming the file and field, before any process exists. A short
hypothesis run then puts random numbers into the structural fields (page runs, vma bounds, object sizes, fd
numbers): each image is refused cleanly or restores a process that passes its own checks.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H


pytestmark = pytest.mark.root
MODES = ("eager", "lazy")


reseal_task = H.reseal_task


def refused(h: H.Harness, image: Path, mode: str, *patterns: str) -> str:
    before = H.children_of(os.getpid())
    r = h.restore(image, lazy=mode == "lazy")
    line = H.assert_clean_error(r.proc, *patterns)
    assert r.proc.returncode == 1, line
    time.sleep(0.05)
    new = [p for p in H.children_of(os.getpid()) - before if H.is_alive(p)]
    assert not new, f"restore of a hostile image left processes {new}"
    return line


@pytest.fixture(scope="module")
def images(target_bins: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good images of the misc target (memory, creds) and the fds target (pipes, dups), made once; the
    original misc Target is kept under "misc-target" for the restores the fuzz accepts."""
    work = tmp_path_factory.mktemp("hostile")
    h = H.Harness(target_bins, work)
    out: dict[str, Any] = {}
    try:
        for case_id in ("misc", "fds"):
            target = h.start_case(H.CASES_BY_ID[case_id])
            image = h.image_dir(f"good-{case_id}")
            res = h.dump(target, image)
            assert res.returncode == 0, res.stderr
            out[case_id] = image
            out[f"{case_id}-target"] = target
    finally:
        h.cleanup()
    return out


def _anon_run(task: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    for v in task["mm"]["vmas"]:
        if v["kind"] == "anon" and v["pages"]:
            return v, v["pages"][0]
    raise AssertionError("no anonymous page run in the image")


def negative_length(task: dict[str, Any]) -> None:
    _anon_run(task)[1][1] = -4096


def outside_mapping(task: dict[str, Any]) -> None:
    v, run = _anon_run(task)
    run[0] = v["end"]


def overlapping_vmas(task: dict[str, Any]) -> None:
    vmas = task["mm"]["vmas"]
    vmas[1]["start"] = vmas[0]["start"]


def unaligned_vma(task: dict[str, Any]) -> None:
    task["mm"]["vmas"][0]["end"] += 100


def past_page_file(task: dict[str, Any]) -> None:
    _anon_run(task)[1][2] = 1 << 40


def soft_above_hard(task: dict[str, Any]) -> None:
    task["misc"]["rlimits"][7] = [10, 5]


EDITS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "negative-run": ("misc", negative_length, r"mm\.vmas\[\d+\]\.pages\[0\]\[1\]"),
    "run-outside-mapping": ("misc", outside_mapping, r"outside its vma"),
    "overlapping-vmas": ("misc", overlapping_vmas, r"mm\.vmas\[1\]\.start.*overlaps"),
    "unaligned-vma": ("misc", unaligned_vma, r"mm\.vmas\[0\]\.end.*aligned"),
    "run-past-page-file": ("misc", past_page_file, r"past the page file"),
    "rlimit-soft-above-hard": ("misc", soft_above_hard, r"misc\.rlimits\[7\]"),
}


def huge_pipe(task: dict[str, Any]) -> None:
    pipe = next(f for f in task["files"] if f["type"] == "pipe")
    pipe["pipe_size"] = 1 << 40


def dup_of_missing(task: dict[str, Any]) -> None:
    rec = next(f for f in task["files"] if "dup_of" in f)
    rec["dup_of"] = 999


def repeated_fd(task: dict[str, Any]) -> None:
    task["files"][1]["fd"] = task["files"][0]["fd"]


EDITS.update({
    "pipe-size-2^40": ("fds", huge_pipe, r"pipe_size"),
    "dup-of-missing-fd": ("fds", dup_of_missing, r"dup_of"),
    "repeated-fd": ("fds", repeated_fd, r"repeats fd"),
})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_hostile_edit_refused(harness: H.Harness, images: dict[str, Path], edit: str, mode: str) -> None:
    case_id, change, pattern = EDITS[edit]
    image = H.copy_image(images[case_id], harness.image_dir())
    reseal_task(image, change)
    line = refused(harness, image, mode, pattern)
    assert re.search(r"task-\d+\.json", line), line


# -- fuzz ----------------------------------------------------------------------------------------------------

def _structural_slots(task: dict[str, Any]) -> list[tuple[list[Any] | dict[str, Any], Any]]:
    """(container, key) of each number that says where memory or fds are."""
    slots: list[tuple[Any, Any]] = []
    for v in task["mm"]["vmas"]:
        slots += [(v, "start"), (v, "end")]
        for run in v["pages"]:
            slots += [(run, 0), (run, 1), (run, 2)]
    for o in task["mm"]["objects"]:
        slots.append((o, "size"))
        for run in o["pages"]:
            slots += [(run, 0), (run, 1), (run, 2)]
    for f in task["files"]:
        slots.append((f, "fd"))
    return slots


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pick=st.integers(min_value=0, max_value=10**6),
       value=st.one_of(st.integers(min_value=-(1 << 64), max_value=1 << 65),
                       st.sampled_from([0, -1, 4096, 1 << 47, (1 << 64) - 1]),
                       st.text(max_size=3), st.none()),
       mode=st.sampled_from(MODES))
def test_fuzz_structural_numbers(harness: H.Harness, images: dict[str, Path], pick: int, value: Any,
                                 mode: str) -> None:
    image = H.copy_image(images["misc"], harness.image_dir(f"fuzz-{pick}-{mode}"))
    try:
        def change(task: dict[str, Any]) -> None:
            slots = _structural_slots(task)
            container, key = slots[pick % len(slots)]
            container[key] = value

        reseal_task(image, change)
        r = harness.restore(image, lazy=mode == "lazy", like=images["misc-target"])
        if r.proc.returncode != 0:
            line = H.assert_clean_error(r.proc)
            assert r.proc.returncode == 1, line
            return
        # Accepted: only an edit that changed nothing that matters may get here, and then the restored
        # process must pass its own checks.
        assert r.target is not None
        H.expect_pass(harness.run_case(H.CASES_BY_ID["misc"], r.target), r.target, r)
        assert r.target.wait_exit(10) == 0
    finally:
        harness.cleanup()
        shutil.rmtree(image, ignore_errors=True)


@pytest.mark.parametrize("how", ["dir-world-writable", "file-group-writable", "file-other-owner", "symlink"])
def test_image_others_could_write_refused(harness: H.Harness, images: dict[str, Path], how: str) -> None:
    """Who may write images: root (or the restorer) alone. An image another user could have written is
    refused before anything is created, naming the file."""
    image = H.copy_image(images["misc"], harness.image_dir())
    (task_path,) = image.glob("task-*.json")
    if how == "dir-world-writable":
        image.chmod(0o777)
        pattern = re.escape(str(image))
    elif how == "file-group-writable":
        task_path.chmod(0o664)
        pattern = task_path.name
    elif how == "file-other-owner":
        os.chown(task_path, 65534, 65534)
        pattern = "uid 65534"
    else:
        real = image.parent / f"{image.name}-real-task"
        task_path.rename(real)
        task_path.symlink_to(real)
        pattern = "not a regular file"
    refused(harness, image, "eager", pattern)
