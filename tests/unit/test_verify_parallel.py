"""The eager restore's page check on two CPUs finds a bad chunk in either half (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazarus.errors import ImageError
from lazarus.images import Image, ImageWriter
from lazarus.images.format import CHUNK_SIZE
from lazarus.images.reader import PageFile
from lazarus.restore import PARALLEL_VERIFY_MIN, verify_pages_two_cpus

PID = 4242


def make_image(tmp_path: Path, nbytes: int) -> Path:
    d = tmp_path / "img"
    w = ImageWriter(d, fsync=False)
    pw = w.pages(PID)
    block = bytes(range(256)) * (1 << 12)  # 1 MiB, no chunk is all zeros
    for i in range(nbytes // len(block)):
        pw.append(block[i % 256:] + block[: i % 256])
    w.write_task(PID, {"pid": PID, "core": {}, "mm": {}, "files": [], "signals": {}, "misc": {}})
    w.commit({"kernel_release": os.uname().release, "arch": "x86_64", "cpu": {"xcr0": 7, "xstate_size": 832},
              "root_pid": PID, "tasks": [PID]})
    return d


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("pv"), PARALLEL_VERIFY_MIN + (16 << 20))


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The chunks the parent checks itself, in order; a fall back to checking everything in the parent (what
    it does when the child cannot tell) fails the test, as then the child's half went unchecked by it."""
    calls: list[int] = []
    real = PageFile.verify_chunk

    def verify_chunk(self: PageFile, chunk: int) -> None:
        calls.append(chunk)
        real(self, chunk)

    monkeypatch.setattr(PageFile, "verify_chunk", verify_chunk)
    monkeypatch.setattr(Image, "verify_pages", lambda self, pid: pytest.fail("the parent re-checked every chunk"))
    return calls


def test_good_image_checked_half_by_each(image: Path, no_fallback: list[int]) -> None:
    with Image.open(image) as img:
        n = img.page_file(PID).nchunks
        verify_pages_two_cpus(img, PID)
    assert no_fallback == list(range(n // 2)), "the parent checked other chunks than its lower half"


@pytest.mark.parametrize("where", [0.1, 0.9], ids=["lower-half", "upper-half"])
def test_flipped_byte_in_either_half_is_found(image: Path, tmp_path: Path, where: float,
                                              no_fallback: list[int]) -> None:
    bad = tmp_path / "bad"
    os.mkdir(bad)
    for f in image.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    page_file = bad / f"pages-{PID}.img"
    offset = int(page_file.stat().st_size * where)
    with open(page_file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))
    chunk = offset // CHUNK_SIZE
    with Image.open(bad) as img:
        half = img.page_file(PID).nchunks // 2
        with pytest.raises(ImageError, match=rf"pages-{PID}\.img: .*chunk {chunk}\b"):
            verify_pages_two_cpus(img, PID)
    if where < 0.5:
        assert no_fallback == list(range(chunk + 1))  # found by the parent, in its own half
    else:
        # the parent checked its half, then only the chunk the child named: the child found it
        assert no_fallback == [*range(half), chunk]
