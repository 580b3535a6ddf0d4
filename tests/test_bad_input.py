"""Bad input to dump and restore: every case exits 1 (the README's promise) with exactly one line
"lazarus: error: ..." on stderr (never a traceback), and no process is killed or created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

PLAIN = H.CASES_BY_ID["misc"]  # a small target that waits for SIGUSR2


@pytest.fixture
def no_new_processes() -> Iterator[None]:
    """Fails the test if a process adopted by (or started under) pytest appears during it."""
    before = H.children_of(os.getpid())
    yield
    time.sleep(0.2)
    new = [f"{pid} ({H.comm(pid)})" for pid in H.children_of(os.getpid()) - before if H.is_alive(pid)]
    assert not new, f"processes appeared: {new}"


def still_fine(h: H.Harness, target: H.Target) -> None:
    """The target survived untouched: alive, and PASSes its own checks."""
    assert target.alive(), f"the target was killed: {target.describe()}"
    H.expect_pass(h.run_case(PLAIN, target), target)
    assert target.wait_exit(10) == 0


# ----------------------------------------------------------------------------------------------
# dump


def test_dump_nonexistent_pid(harness: H.Harness, no_new_processes: None) -> None:
    pid = H.unused_pid()
    image = harness.image_dir()
    H.assert_clean_error(harness.dump(pid, image), str(pid))
    assert H.sibling_leftovers(image) == []


def test_dump_kernel_thread(harness: H.Harness, no_new_processes: None) -> None:
    pid = H.find_kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread is visible in this pid namespace")
    started = H.start_time(pid)
    image = harness.image_dir()
    H.assert_clean_error(harness.dump(pid, image), str(pid))
    assert H.sibling_leftovers(image) == []
    assert H.start_time(pid) == started


def test_dump_already_traced(harness: H.Harness) -> None:
    target = harness.start_case(PLAIN)
    ready = harness.path("tracer.ready")
    tracer = subprocess.Popen(
        [sys.executable, str(H.TARGETS_SRC / "tracer.py"), str(target.pid), str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    harness.popens.append(tracer)
    harness.register(tracer.pid, "tracer helper")
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline and tracer.poll() is None:
        time.sleep(0.02)
    assert ready.exists() and ready.read_text().startswith("SEIZED"), "the helper could not seize the target"

    image = harness.image_dir()
    H.assert_clean_error(harness.dump(target, image), r"trac|ptrace")
    assert H.sibling_leftovers(image) == []
    assert target.alive()

    tracer.kill()
    tracer.wait(10)
    deadline = time.monotonic() + 10
    while H.snapshot(target.pid)["status"]["TracerPid"] != "0" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.02)
    still_fine(harness, target)


def test_dump_into_existing_dir(harness: H.Harness, no_new_processes: None) -> None:
    target = harness.start_case(PLAIN)
    image = harness.image_dir()
    image.mkdir()
    (image / "keep.txt").write_text("mine\n")
    H.assert_clean_error(harness.dump(target, image), r"exist")
    assert sorted(p.name for p in image.iterdir()) == ["keep.txt"]
    assert (image / "keep.txt").read_text() == "mine\n"
    assert H.sibling_leftovers(image) == [image.name]
    still_fine(harness, target)


@pytest.mark.parametrize("delay_ms", [0, 2, 5, 10, 20, 40, 80])
def test_dump_of_exiting_process(harness: H.Harness, delay_ms: int) -> None:
    """A target that exits on its own while being dumped: either a whole image, or a clean error
    and no image at all; never a traceback or a half-written directory."""
    target = harness.start_target("sleeper", "exit", str(delay_ms))
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    if res.returncode == 0:
        assert image.is_dir()
    else:
        H.assert_clean_error(res)
        assert H.sibling_leftovers(image) == [], "a failed dump left files"
    target.wait_exit(10)


def test_dump_pid_in_use_restore_refused(harness: H.Harness) -> None:
    """dump --leave-running, then restore while the original still runs: refused, naming the pid."""
    target = harness.start_case(PLAIN)
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, res.stderr
    before = H.children_of(os.getpid())
    r = harness.restore(image)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    H.assert_clean_error(r.proc, rf"\b{target.pid}\b")
    assert H.children_of(os.getpid()) == before
    harness.settle(PLAIN, target)
    still_fine(harness, target)


# ----------------------------------------------------------------------------------------------
# restore


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[Path]:
    """A valid image of the fds target (pages, task json, blobs), its original gone."""
    work = tmp_path_factory.mktemp("bad_input_image")
    h = H.Harness(target_bins, work)
    try:
        target = h.start_case(H.CASES_BY_ID["fds"])
        image = work / "img-good"
        res = h.dump(target, image)
        if res.returncode != 0 or not image.is_dir():
            pytest.fail(f"cannot make the image the restore cases start from: {res.stderr}")
        assert target.wait_exit(10) is not None
        yield image
    finally:
        h.cleanup()
        shutil.rmtree(work / "img-good", ignore_errors=True)


def restore_refused(h: H.Harness, image: Path, *patterns: str, lazy: bool = False) -> str:
    before = H.children_of(os.getpid())
    r = h.restore(image, lazy=lazy)
    assert isinstance(r.proc, subprocess.CompletedProcess)
    line = H.assert_clean_error(r.proc, *patterns)
    time.sleep(0.1)
    new = [p for p in H.children_of(os.getpid()) - before if H.is_alive(p)]
    assert not new, f"restore of a bad image left processes {new}"
    return line


def broken_copy(h: H.Harness, good: Path, edit: Callable[[Path], None]) -> Path:
    image = H.copy_image(good, h.image_dir())
    edit(image)
    return image


def test_restore_missing_dir(harness: H.Harness) -> None:
    missing = harness.image_dir()
    restore_refused(harness, missing, str(missing.name))


def test_restore_empty_dir(harness: H.Harness) -> None:
    empty = harness.image_dir()
    empty.mkdir()
    restore_refused(harness, empty, r"inventory|empty|image")


def test_lazy_detached_restore_of_a_bad_image_leaves_no_daemon(harness: H.Harness, good_image: Path) -> None:
    """`restore --lazy -d` forks its lazy-pages daemon before it reads the image (so that both start at once):
    a bad image still gets its one-line error, neither the daemon nor its guard outlives the command, and
    nothing is written into the directory."""
    missing = harness.image_dir()
    restore_refused(harness, missing, str(missing.name), lazy=True)
    empty = harness.image_dir()
    empty.mkdir()
    restore_refused(harness, empty, r"inventory|empty|image", lazy=True)
    assert not (empty / "lazy-pages.log").exists(), "a refused restore left the daemon's log in the image directory"

    def drop_pages(image: Path) -> None:
        for pages in image.glob("pages-*.img"):
            pages.unlink()

    restore_refused(harness, broken_copy(harness, good_image, drop_pages), r"pages-\d+\.img", lazy=True)


def test_restore_truncated_pages(harness: H.Harness, good_image: Path) -> None:
    def truncate(image: Path) -> None:
        pages = sorted(image.glob("pages-*.img"))
        assert pages, "no pages file in the image"
        size = pages[0].stat().st_size
        os.truncate(pages[0], size // 2)

    restore_refused(harness, broken_copy(harness, good_image, truncate), r"pages-\d+\.img")


def test_restore_one_flipped_byte_in_each_file(harness: H.Harness, good_image: Path) -> None:
    files = H.image_files(good_image)
    assert any(f.name == "inventory.json" for f in files), [f.name for f in files]
    problems = []
    for f in files:
        image = broken_copy(harness, good_image, lambda img, name=f.name: H.flip_byte(img / name))
        try:
            restore_refused(harness, image)
        except AssertionError as e:
            problems.append(f"{f.name}: {e}")
        finally:
            shutil.rmtree(image, ignore_errors=True)
    assert not problems, "\n".join(problems)


def edit_inventory(image: Path, change: Callable[[dict], None]) -> None:
    """Change inventory.json and re-seal it with lazarus.images (its self-check recomputed), so that only the
    change itself is wrong. Without those helpers the test fails: it must never skip silently."""
    from lazarus.images.format import inventory_bytes, inventory_self_check

    path = image / "inventory.json"
    inv = json.loads(path.read_text())
    change(inv)
    assert "self_check" in inv, "inventory.json has no self_check to re-seal"
    inv["self_check"] = inventory_self_check(inv)
    path.write_bytes(inventory_bytes(inv))


def test_restore_other_format_version(harness: H.Harness, good_image: Path) -> None:
    def bump(inv: dict) -> None:
        inv["version"] = int(inv.get("version", 1)) + 100

    image = broken_copy(harness, good_image, lambda img: edit_inventory(img, bump))
    restore_refused(harness, image, r"version")


def test_restore_other_cpu_layout(harness: H.Harness, good_image: Path) -> None:
    def other_cpu(inv: dict) -> None:
        cpu = inv["cpu"]
        cpu["xcr0"] = 0x7 if int(cpu["xcr0"]) != 0x7 else 0x3
        cpu["xstate_size"] = int(cpu["xstate_size"]) + 64

    image = broken_copy(harness, good_image, lambda img: edit_inventory(img, other_cpu))
    restore_refused(harness, image, r"cpu|xcr0|xstate|xsave")


def test_restore_other_kernel_release(harness: H.Harness, good_image: Path) -> None:
    def other_kernel(inv: dict) -> None:
        inv["kernel_release"] = "0.0.1-not-this-kernel"

    image = broken_copy(harness, good_image, lambda img: edit_inventory(img, other_kernel))
    restore_refused(harness, image, r"kernel")


@pytest.mark.parametrize("field", ["core.regs", "mm.vmas[0].kind", "files[0].fd", "signals.blocked"])
def test_restore_task_field_missing(harness: H.Harness, good_image: Path, field: str) -> None:
    """A task file whose checksums are right but which lacks a field the restore needs (a writer bug, or
    another tool's image) is refused naming the field, before any process is created."""
    from lazarus.images.format import hex64, json_bytes, xxh3

    def drop_field(image: Path) -> None:
        (task_path,) = image.glob("task-*.json")
        task = json.loads(task_path.read_text())
        *parents, last = field.replace("[0]", ".0").split(".")
        node = task
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[last]
        data = json_bytes(task)
        task_path.write_bytes(data)

        def reseal(inv: dict) -> None:
            inv["files"][task_path.name].update(size=len(data), xxh3=hex64(xxh3(data)))

        edit_inventory(image, reseal)

    image = broken_copy(harness, good_image, drop_field)
    restore_refused(harness, image, re.escape(field.split(".")[-1]))


def test_restore_with_working_directory_gone(harness: H.Harness) -> None:
    """The task's cwd is checked before anything is created."""
    target = harness.start_case(H.CASES_BY_ID["misc"])
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (task_file,) = image.glob("task-*.json")
    cwd = Path(json.loads(task_file.read_text())["misc"]["cwd"])
    assert cwd.is_dir() and cwd != Path("/")
    moved = cwd.with_name(cwd.name + ".moved")
    cwd.rename(moved)
    try:
        restore_refused(harness, image, re.escape(str(cwd)))
        assert not H.is_alive(target.pid)
    finally:
        moved.rename(cwd)


@pytest.mark.parametrize("change", ["mtime", "size", "inode"])
def test_restore_refuses_a_changed_mapped_file(harness: H.Harness, change: str) -> None:
    """A shared file mapping is restored by path: a file changed since the dump is refused, naming it."""
    target = harness.start_case(H.CASES_BY_ID["memory-keep"])
    image = harness.image_dir()
    assert harness.dump(target, image).returncode == 0
    (task_file,) = image.glob("task-*.json")
    vmas = json.loads(task_file.read_text())["mm"]["vmas"]
    path = Path(next(v["path"] for v in vmas if v["kind"] == "file" and v["shared"]))
    st = path.stat()
    if change == "mtime":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "size":
        with open(path, "ab") as f:
            f.write(b"x")
    else:
        # Replaced by a copy with the same size and mtime; made before the original goes, so that the
        # filesystem cannot hand the freed inode number straight back.
        copy = path.with_name(path.name + ".new")
        copy.write_bytes(path.read_bytes())
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
        copy.rename(path)
        assert path.stat().st_ino != st.st_ino
    restore_refused(harness, image, re.escape(str(path)), "changed")
    assert not H.is_alive(target.pid)
