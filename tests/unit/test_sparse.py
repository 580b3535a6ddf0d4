"""Unlinked files are saved as their data extents only (SEEK_DATA/SEEK_HOLE): holes stay holes."""

from __future__ import annotations

import os
from pathlib import Path

from lazarus.dump.files import sparse_content


def test_extents_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 8 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(b"a" * 4096)
        f.seek(size - 4096)
        f.write(b"z" * 4096)
    extents, data = sparse_content(str(path), size)
    assert extents == [[1 << 20, 4096], [size - 4096, 4096]]
    assert data == b"a" * 4096 + b"z" * 4096


def test_trailing_hole_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "tail"
    with open(path, "wb") as f:
        f.write(b"x" * 100)
        f.truncate(1 << 20)
    extents, data = sparse_content(str(path), 1 << 20)
    assert len(extents) == 1 and extents[0][0] == 0 and extents[0][1] >= 100 and data[:100] == b"x" * 100
    assert data[100:] == bytes(len(data) - 100)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sparse_content(str(empty), 0) == ([], b"")
    assert os.path.getsize(path) == 1 << 20
