"""The eager restore's page check on two CPUs finds a bad chunk in either half (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazarus.errors import ImageError
from lazarus.images import Image, ImageWriter
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


def test_good_image_passes(image: Path) -> None:
    with Image.open(image) as img:
        verify_pages_two_cpus(img, PID)


@pytest.mark.parametrize("where", [0.1, 0.9], ids=["lower-half", "upper-half"])
def test_flipped_byte_in_either_half_is_found(image: Path, tmp_path: Path, where: float) -> None:
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
    with Image.open(bad) as img, pytest.raises(ImageError, match=f"pages-{PID}.img"):
        verify_pages_two_cpus(img, PID)
