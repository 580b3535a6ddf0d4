"""Image format: round trips, atomic writing, and detection of every kind of damage (no root needed)."""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from lazarus.errors import ImageError
from lazarus.images import (
    CHUNK_SIZE,
    PAGE_SIZE,
    PAGES_PER_CHUNK,
    TASK_SCHEMA,
    Image,
    ImageWriter,
    validate_task,
)
from lazarus.images.format import inventory_bytes, inventory_self_check

KERNEL = "6.18.0-test"
XCR0 = 0x2E7
XSTATE = 2432


def task(pid: int, **changes: Any) -> dict[str, Any]:
    base = {"pid": pid, "core": {"regs": [1, 2, 3]}, "mm": {"vmas": []}, "files": [], "signals": {},
            "misc": {"comm": "t"}}
    return {**base, **changes}


def inventory_fields(root: int = 42, tasks: list[int] | None = None) -> dict[str, Any]:
    tasks = tasks if tasks is not None else [42, 43, 44]
    fields = {"kernel_release": KERNEL, "arch": "x86_64", "cpu": {"xcr0": XCR0, "xstate_size": XSTATE},
              "root_pid": root, "tasks": tasks}
    if len(tasks) > 1:  # the others children of the root
        fields["tree"] = [{"pid": p, "ppid": 0 if p == root else root, "pgid": root, "sid": root,
                           "state": "running", "comm": "t", "exit": None} for p in tasks]
    return fields


def page_data(npages: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(npages * PAGE_SIZE)


# pid 42: 37 pages (two whole chunks and a partial one) appended in pieces that straddle chunk boundaries;
# pid 43: a pages file with nothing in it; pid 44: no pages file at all.
PIECES = [3, 7, 1, 20, 6]
DATA_42 = page_data(sum(PIECES), 1)


def write_image(d: Path, *, fsync: bool = False) -> Path:
    with ImageWriter(d, fsync=fsync) as w:
        pw = w.pages(42)
        off = 0
        for n in PIECES:
            assert pw.append(DATA_42[off:off + n * PAGE_SIZE]) == off // PAGE_SIZE
            off += n * PAGE_SIZE
        w.pages(43)
        for pid in (42, 43, 44):
            w.write_task(pid, task(pid))
        assert w.write_blob("shm-1", b"shared memory contents" * 100) == "shm-1"
        w.write_json("tree.json", {"root": 42, "children": {"42": [43, 44]}})
        assert w.commit(inventory_fields()) == d
    return d


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image(tmp_path_factory.mktemp("pristine") / "img")


@pytest.fixture
def image(pristine: Path, tmp_path: Path) -> Path:
    d = tmp_path / "img"
    shutil.copytree(pristine, d)
    return d


def rewrite_inventory(d: Path, change: Any, *, reseal: bool = True) -> None:
    inv = json.loads((d / "inventory.json").read_text())
    change(inv)
    if reseal:
        inv["self_check"] = inventory_self_check(inv)
    (d / "inventory.json").write_bytes(inventory_bytes(inv))


def open_error(d: Path) -> str:
    with pytest.raises(ImageError) as ei:
        Image.open(d)
    return str(ei.value)


# -- round trip ------------------------------------------------------------------------------------------------


def test_round_trip(pristine: Path) -> None:
    assert sorted(os.listdir(pristine)) == ["blob-shm-1.img", "inventory.json", "pages-42.img", "pages-42.sums",
                                             "pages-43.img", "pages-43.sums", "task-42.json", "task-43.json",
                                             "task-44.json", "tree.json"]
    assert not [p for p in os.listdir(pristine.parent) if ".tmp-" in p]
    with Image.open(pristine) as img:
        assert img.tasks == [42, 43, 44] and img.root_pid == 42
        assert img.inventory["format"] == "lazarus-image" and img.inventory["version"] == 3
        assert img.inventory["page_chunk"] == CHUNK_SIZE
        for pid in (42, 43, 44):
            assert img.task(pid) == task(pid)
            img.verify_pages(pid)
        assert img.blob("shm-1") == b"shared memory contents" * 100
        assert img.json("tree.json") == {"root": 42, "children": {"42": [43, 44]}}
        pf = img.page_file(42)
        assert pf.npages == 37 and pf.size == len(DATA_42)
        assert bytes(pf.view(0, 37)) == DATA_42
        img.check_machine(KERNEL, XCR0, XSTATE)
        with pytest.raises(ImageError, match="task-99.json"):
            img.task(99)
        with pytest.raises(ImageError, match="blob-nope.img"):
            img.blob("nope")


def test_sums_file_is_little_endian_xxh3_per_chunk(pristine: Path) -> None:
    raw = (pristine / "pages-42.sums").read_bytes()
    expected = [xxhash.xxh3_64_intdigest(DATA_42[o:o + CHUNK_SIZE]) for o in range(0, len(DATA_42), CHUNK_SIZE)]
    assert list(struct.unpack(f"<{len(expected)}Q", raw)) == expected
    assert (pristine / "pages-43.sums").read_bytes() == b""


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=8))
def test_sums_do_not_depend_on_append_boundaries(tmp_path_factory: pytest.TempPathFactory,
                                                 pieces: list[int]) -> None:
    d = tmp_path_factory.mktemp("pieces") / "img"
    data = page_data(sum(pieces), 2)
    with ImageWriter(d, fsync=False) as w:
        pw = w.pages(1)
        off = 0
        for n in pieces:
            pw.append(memoryview(data)[off:off + n * PAGE_SIZE])
            off += n * PAGE_SIZE
        w.write_task(1, task(1))
        w.commit(inventory_fields(1, [1]))
    sums = (d / "pages-1.sums").read_bytes()
    expected = b"".join(struct.pack("<Q", xxhash.xxh3_64_intdigest(data[o:o + CHUNK_SIZE]))
                        for o in range(0, len(data), CHUNK_SIZE))
    assert sums == expected
    with Image.open(d) as img:
        img.verify_pages(1)
        assert bytes(img.page_file(1).view(0, len(data) // PAGE_SIZE)) == data


def test_append_must_be_page_aligned(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img") as w, pytest.raises(ImageError, match="not a multiple of 4096"):
        w.pages(1).append(b"x" * 100)


def test_fsync_path(tmp_path: Path) -> None:
    write_image(tmp_path / "img", fsync=True)
    with Image.open(tmp_path / "img") as img:
        img.verify_pages(42)


# -- atomic writing --------------------------------------------------------------------------------------------


def test_refuses_existing_dir(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x").write_text("")
    with pytest.raises(ImageError, match="already exists and is not empty"):
        ImageWriter(tmp_path / "img")
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageError, match="already exists"):
        ImageWriter(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    with pytest.raises(ImageError, match="already exists"):
        ImageWriter(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "img", "link"]
    assert os.listdir(tmp_path / "img") == ["x"]


def test_takes_an_empty_dir(tmp_path: Path) -> None:
    """CRIU users create DIR first: an empty directory is replaced by the finished image."""
    (tmp_path / "img").mkdir()
    w = ImageWriter(tmp_path / "img")
    w.write_task(1, task(1))
    w.commit(inventory_fields(1, [1]))
    assert os.listdir(tmp_path) == ["img"]
    with Image.open(tmp_path / "img") as img:
        assert img.tasks == [1]


def test_empty_dir_filled_meanwhile_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    w = ImageWriter(tmp_path / "img")
    w.write_task(1, task(1))
    (tmp_path / "img" / "theirs").write_text("keep me")
    with pytest.raises(ImageError, match="already exists"):
        w.commit(inventory_fields(1, [1]))
    assert os.listdir(tmp_path) == ["img"]
    assert (tmp_path / "img" / "theirs").read_text() == "keep me"


def test_refuses_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="parent directory"):
        ImageWriter(tmp_path / "nope" / "img")


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "img")
    w.pages(1).append(b"\0" * PAGE_SIZE)
    w.write_task(1, task(1))
    assert len(os.listdir(tmp_path)) == 1
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ImageError, match="aborted"):
        w.write_blob("x", b"")


def test_exception_in_with_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ImageWriter(tmp_path / "img") as w:
        w.pages(1).append(b"\0" * PAGE_SIZE)
        raise RuntimeError("dump failed")
    assert os.listdir(tmp_path) == []


def test_uncommitted_with_block_leaves_nothing(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img") as w:
        w.write_task(1, task(1))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"arch": "x86_64"}, "missing field 'kernel_release'"),
    (inventory_fields(1, [1, 2]), "task-2.json: not written"),
    (inventory_fields(7, [1]), "root_pid 7 is not in 'tasks'"),
    ({**inventory_fields(1, [1]), "version": 4}, "'version' is set by the writer"),
    ({**inventory_fields(1, [1]), "cpu": {"xcr0": 1}}, "missing field 'cpu.xstate_size'"),
])
def test_commit_refuses_bad_inventory_and_cleans_up(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    w = ImageWriter(tmp_path / "img")
    w.write_task(1, task(1))
    with pytest.raises(ImageError, match=message):
        w.commit(fields)
    assert os.listdir(tmp_path) == []


def test_commit_reads_back_and_refuses_bad_task(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "img")
    w.write_task(1, {"pid": 1})
    with pytest.raises(ImageError, match="task-1.json: missing field 'core'"):
        w.commit(inventory_fields(1, [1]))
    assert os.listdir(tmp_path) == []


def test_commit_refuses_dir_that_appeared_meanwhile(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "img")
    w.write_task(1, task(1))
    (tmp_path / "img").mkdir()
    with pytest.raises(ImageError, match="already exists"):
        w.commit(inventory_fields(1, [1]))
    assert os.listdir(tmp_path) == ["img"]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 300])
def test_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with ImageWriter(tmp_path / "img") as w:
        with pytest.raises(ImageError, match="invalid"):
            w.write_blob(name, b"")
        with pytest.raises(ImageError, match="invalid"):
            w.write_json(name + ".json" if name else name, {})
    with pytest.raises(ImageError, match="invalid json file name"), ImageWriter(tmp_path / "img2") as w:
        w.write_json("inventory.json", {})


def test_refuses_writing_a_file_twice(tmp_path: Path) -> None:
    with ImageWriter(tmp_path / "img") as w:
        w.write_blob("x", b"1")
        with pytest.raises(ImageError, match="written twice"):
            w.write_blob("x", b"2")


# -- damage ----------------------------------------------------------------------------------------------------


def test_flipped_byte_anywhere_is_detected(image: Path) -> None:
    """Every byte of every metadata file and sampled bytes of page data, each XORed with a random value."""
    rng = random.Random(1234)
    for name in sorted(os.listdir(image)):
        path = image / name
        original = path.read_bytes()
        if name.endswith(".img") and name.startswith("pages-"):
            positions = sorted({0, len(original) - 1, *(rng.randrange(len(original)) for _ in range(40)),
                                *range(CHUNK_SIZE - 1, len(original), CHUNK_SIZE)}) if original else []
        else:
            positions = list(range(len(original)))
        for pos in positions:
            damaged = bytearray(original)
            damaged[pos] ^= rng.randrange(1, 256)
            path.write_bytes(damaged)
            try:
                with pytest.raises(ImageError) as ei, Image.open(image) as img:
                    for pid in img.tasks:
                        img.verify_pages(pid)
                assert str(ei.value).startswith(name), (name, pos, str(ei.value))
            finally:
                path.write_bytes(original)
    with Image.open(image) as img:
        img.verify_pages(42)


def test_flipped_page_byte_is_found_only_by_page_checks(image: Path) -> None:
    with open(image / "pages-42.img", "r+b") as f:
        f.seek(CHUNK_SIZE + 100)
        b = f.read(1)
        f.seek(CHUNK_SIZE + 100)
        f.write(bytes([b[0] ^ 0x40]))
    with Image.open(image) as img:
        with pytest.raises(ImageError, match=r"pages-42.img: checksum mismatch in chunk 1 \(bytes 65536-131071\)"):
            img.verify_pages(42)
        pf = img.page_file(42)
        pf.verify_chunk_for(0)
        pf.verify_chunk_for(PAGES_PER_CHUNK - 1)
        pf.verify_chunk_for(2 * PAGES_PER_CHUNK)
        pf.verify_chunk_for(36)
        for page in range(PAGES_PER_CHUNK, 2 * PAGES_PER_CHUNK):
            with pytest.raises(ImageError, match="chunk 1"):
                pf.verify_chunk_for(page)
        assert pf.is_verified(0) and not pf.is_verified(1) and pf.is_verified(2)
        with pytest.raises(ImageError, match="chunk 1"):
            pf.verify_range(10, 10)
        pf.verify_range(0, PAGES_PER_CHUNK)


def test_verified_chunks_are_remembered(image: Path) -> None:
    with Image.open(image) as img:
        pf = img.page_file(42)
        assert not any(pf.is_verified(c) for c in range(3))
        pf.verify_chunk_for(20)
        assert [pf.is_verified(c) for c in range(3)] == [False, True, False]
        img.verify_pages(42)
        assert all(pf.is_verified(c) for c in range(3))
        assert img.page_file(42) is pf


@pytest.mark.parametrize("name", ["pages-42.img", "pages-42.sums", "task-43.json", "blob-shm-1.img",
                                  "tree.json", "pages-43.sums"])
def test_truncated_file(image: Path, name: str) -> None:
    size = (image / name).stat().st_size
    cut = max(size - 1, 0)
    if name == "pages-42.img":
        cut = size - PAGE_SIZE
    if size == 0:
        (image / name).write_bytes(b"\0" * 8)
        assert open_error(image).startswith(f"{name}: 8 bytes, expected 0 (trailing data)")
        return
    os.truncate(image / name, cut)
    assert open_error(image).startswith(f"{name}: truncated at byte {cut}, expected {size}")


@pytest.mark.parametrize("name", ["pages-42.img", "task-42.json", "blob-shm-1.img"])
def test_trailing_data(image: Path, name: str) -> None:
    size = (image / name).stat().st_size
    with open(image / name, "ab") as f:
        f.write(b"\0" * PAGE_SIZE)
    assert open_error(image).startswith(f"{name}: {size + PAGE_SIZE} bytes, expected {size} (trailing data)")


def test_pages_file_shrunk_after_open(image: Path) -> None:
    with Image.open(image) as img:
        os.truncate(image / "pages-42.img", PAGE_SIZE)
        with pytest.raises(ImageError, match="pages-42.img: truncated at byte 4096"):
            img.verify_pages(42)


@pytest.mark.parametrize("name", ["pages-42.img", "pages-42.sums", "task-44.json", "blob-shm-1.img",
                                  "tree.json", "pages-43.img"])
def test_missing_file(image: Path, name: str) -> None:
    (image / name).unlink()
    assert open_error(image).startswith(f"{name}: missing")


def test_not_a_regular_file(image: Path) -> None:
    (image / "task-42.json").unlink()
    (image / "task-42.json").mkdir()
    assert open_error(image).startswith("task-42.json: not a regular file")


def test_unlisted_image_file(image: Path) -> None:
    (image / "notes.txt").write_text("harmless")
    Image.open(image).close()
    (image / "task-45.json").write_text("{}")
    assert open_error(image).startswith("task-45.json: not listed in inventory.json")


def test_missing_or_bad_directory(tmp_path: Path) -> None:
    assert "no such image directory" in open_error(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    assert "not a directory" in open_error(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert "empty directory" in open_error(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert open_error(tmp_path / "other").startswith("inventory.json: missing")


def test_error_names_image_directory(image: Path) -> None:
    (image / "task-42.json").unlink()
    assert str(image) in open_error(image)


def test_unparsable_inventory(image: Path) -> None:
    (image / "inventory.json").write_text('{"format": "lazarus-image",')
    assert open_error(image).startswith("inventory.json: not valid JSON")
    (image / "inventory.json").write_text("[1, 2]")
    assert open_error(image).startswith("inventory.json: top level must be an object, not an array")
    (image / "inventory.json").write_bytes(b"\xff\xfe")
    assert open_error(image).startswith("inventory.json: not valid JSON")


def test_wrong_format_name(image: Path) -> None:
    rewrite_inventory(image, lambda inv: inv.update(format="criu"))
    assert open_error(image).startswith("inventory.json: format 'criu', not 'lazarus-image'")


def test_other_version(image: Path) -> None:
    rewrite_inventory(image, lambda inv: inv.update(version=7))
    assert open_error(image).startswith(
        "inventory.json: format version 7 (written by a newer lazarus), this lazarus reads versions 1, 2, 3, 4, 5, 6")


def test_version_1_still_read(image: Path) -> None:
    rewrite_inventory(image, lambda inv: (inv.update(version=1), inv.pop("tree")))
    with Image.open(image) as img:
        assert img.inventory["version"] == 1
        assert list(img.tree.nodes) == [42]


def test_inventory_edited_without_new_self_check(image: Path) -> None:
    rewrite_inventory(image, lambda inv: inv.update(root_pid=43), reseal=False)
    assert open_error(image).startswith("inventory.json: checksum mismatch")


def test_inventory_reformatted(image: Path) -> None:
    inv = json.loads((image / "inventory.json").read_text())
    (image / "inventory.json").write_text(json.dumps(inv, indent=2))
    assert open_error(image).startswith("inventory.json: checksum mismatch")


@pytest.mark.parametrize(("change", "message"), [
    (lambda inv: inv.pop("cpu"), "inventory.json: missing field 'cpu'"),
    (lambda inv: inv["cpu"].update(xcr0="7"), "inventory.json: field 'cpu.xcr0' must be an integer, not a string"),
    (lambda inv: inv.update(page_chunk=4096), "page_chunk 4096"),
    (lambda inv: inv.update(tasks=[42, 43, 44, 45]), "task-45.json: not listed"),
    (lambda inv: inv.update(root_pid=1), "root_pid 1 is not in 'tasks'"),
    (lambda inv: inv.update(tasks=[42, 42, 43, 44]), "lists a pid twice"),
    (lambda inv: inv["files"].pop("pages-42.sums"), "pages-42.sums: not listed"),
    (lambda inv: inv["files"].update({"../etc": {"size": 1, "xxh3": "0" * 16}}), "invalid file name"),
    (lambda inv: inv["files"]["pages-42.img"].update(xxh3="0" * 16), "must have xxh3 null"),
    (lambda inv: inv["files"]["task-42.json"].update(xxh3=None), "not 16 hex digits"),
    (lambda inv: inv["files"]["pages-42.img"].update(size=100), "not a multiple of 4096"),
])
def test_inconsistent_inventory(image: Path, change: Any, message: str) -> None:
    rewrite_inventory(image, change)
    assert message in open_error(image)


def test_sums_count_must_match_pages(image: Path) -> None:
    os.truncate(image / "pages-42.img", CHUNK_SIZE)

    def fix(inv: dict[str, Any]) -> None:
        inv["files"]["pages-42.img"]["size"] = CHUNK_SIZE

    rewrite_inventory(image, fix)
    assert open_error(image).startswith("pages-42.sums: 3 chunk sums, pages-42.img has 1 chunks")


# -- machine ---------------------------------------------------------------------------------------------------


def test_check_machine(pristine: Path) -> None:
    with Image.open(pristine) as img:
        img.check_machine(KERNEL, XCR0, XSTATE)
        with pytest.raises(ImageError, match=f"image made on kernel {KERNEL}, this is 6.1.0"):
            img.check_machine("6.1.0", XCR0, XSTATE)
        with pytest.raises(ImageError, match=r"image CPU XSTATE layout \(xcr0=0x2e7, size=2432\) differs from "
                                             r"this CPU \(xcr0=0x7, size=2432\)"):
            img.check_machine(KERNEL, 0x7, XSTATE)
        with pytest.raises(ImageError, match=r"size=832\)"):
            img.check_machine(KERNEL, XCR0, 832)


# -- page files ------------------------------------------------------------------------------------------------


def test_page_file_address_and_view(pristine: Path) -> None:
    with Image.open(pristine) as img:
        pf = img.page_file(42)
        for i in (0, 1, 15, 16, 36):
            page = DATA_42[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            assert bytes(pf.view(i, 1)) == page
            assert ctypes.string_at(pf.address(i), PAGE_SIZE) == page
        assert pf.address(5) - pf.address(0) == 5 * PAGE_SIZE
        assert bytes(pf.view(3, 4)) == DATA_42[3 * PAGE_SIZE:7 * PAGE_SIZE]
        for bad in (lambda: pf.address(37), lambda: pf.address(-1), lambda: pf.view(30, 8),
                    lambda: pf.verify_chunk_for(37), lambda: pf.check_range(0, 38)):
            with pytest.raises(ImageError, match="pages-42.img"):
                bad()
        pf.check_range(0, 37)
        view = pf.view(0, 1)
        pf.close()
        # the mapping outlives close() while a view still refers to it
        assert bytes(view) == DATA_42[:PAGE_SIZE]
        view.release()
        with pytest.raises(ImageError, match="after close"):
            pf.address(0)
        assert img.page_file(42) is not pf
        assert bytes(img.page_file(42).view(36, 1)) == DATA_42[36 * PAGE_SIZE:]


def test_empty_and_absent_page_files(pristine: Path) -> None:
    with Image.open(pristine) as img:
        assert img.has_pages(43) and not img.has_pages(44)
        for pid in (43, 44):
            pf = img.page_file(pid)
            assert pf.npages == 0 and pf.size == 0
            assert bytes(pf.view(0, 0)) == b""
            pf.verify_all()
            with pytest.raises(ImageError, match=f"pages-{pid}.img"):
                pf.address(0)
        with pytest.raises(ImageError, match="pages-99.img"):
            img.page_file(99)


def test_page_file_memory_is_not_written_back(image: Path) -> None:
    before = (image / "pages-42.img").read_bytes()
    with Image.open(image) as img:
        img.verify_pages(42)
        ctypes.string_at(img.page_file(42).address(0), PAGE_SIZE)
    assert (image / "pages-42.img").read_bytes() == before


# -- task schema -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "message"), [
    ([], "task-42.json: top level must be an object, not an array"),
    ({k: v for k, v in task(42).items() if k != "mm"}, "task-42.json: missing field 'mm'"),
    (task(42, core=[]), "task-42.json: field 'core' must be an object, not an array"),
    (task(42, files={}), "task-42.json: field 'files' must be an array, not an object"),
    ({**task(42), "pid": True}, "task-42.json: field 'pid' must be an integer, not a boolean"),
    ({**task(42), "pid": "42"}, "task-42.json: field 'pid' must be an integer, not a string"),
    ({**task(42), "pid": 41}, "task-42.json: field 'pid' is 41, expected 42"),
])
def test_validate_task(obj: Any, message: str) -> None:
    with pytest.raises(ImageError) as ei:
        validate_task(obj, "task-42.json")
    assert str(ei.value) == message


def test_task_schema_is_extensible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASK_SCHEMA, "mm", {"vmas": list, "brk": int})
    validate_task(task(42, mm={"vmas": [], "brk": 4096}), "task-42.json")
    with pytest.raises(ImageError, match="task-42.json: missing field 'mm.brk'"):
        validate_task(task(42), "task-42.json")
    with pytest.raises(ImageError, match="field 'mm.vmas' must be an array, not null"):
        validate_task(task(42, mm={"vmas": None, "brk": 1}), "task-42.json")
