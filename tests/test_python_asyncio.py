"""A CPython asyncio program (tests/targets/pyasync.py: epoll, the self-pipe socket pair, call_later timers, an
eventfd) dumped mid-work and restored eagerly and lazily must finish with exactly the result of an
uninterrupted run of the same program."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


def result_line(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return line
    return None


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]
) -> Iterator[dict[str, str]]:
    """The RESULT line of one uninterrupted run per interpreter, computed on first use."""
    h = H.Harness(target_bins, tmp_path_factory.mktemp("pyasync_reference"))

    class Lazy(dict[str, str]):
        def __missing__(self, python: str) -> str:
            target = h.start_target("pyasync", python=python)
            H.expect_pass(target.wait_result(120), target)
            assert target.wait_exit(10) == 0
            line = result_line(target.log)
            assert line is not None, target.describe()
            self[python] = line
            return line

    try:
        yield Lazy()
    finally:
        h.cleanup()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("python", H.PYTHONS)
def test_asyncio_mid_work(harness: H.Harness, references: dict[str, str], python: str, mode: str) -> None:
    reference = references[python]
    target = harness.start_target("pyasync", python=python)
    links = [os.readlink(f"/proc/{target.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{target.pid}/fd")]
    # What the test is about: the loop's epoll, its self-pipe socket pair and the eventfd are all there.
    assert "anon_inode:[eventpoll]" in links and "anon_inode:[eventfd]" in links, links
    assert sum(link.startswith("socket:") for link in links) == 2, links
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    assert result_line(target.log) is None, "the program finished before the dump: nothing was tested"
    files = json.loads((image / f"task-{target.pid}.json").read_text())["files"]
    assert any(f["type"] == "unix" and f["queue"] for f in files), f"no data queued in the self-pipe: {files}"
    assert any(f["type"] == "eventfd" and f["count"] for f in files), f"the eventfd counter is 0: {files}"

    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore of {target.exe} failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    H.expect_pass(r.target.wait_result(120), r.target, r)
    assert r.target.wait_exit(15) == 0
    assert result_line(target.log) == reference, f"different result after restore:\n{target.log_text()}"
