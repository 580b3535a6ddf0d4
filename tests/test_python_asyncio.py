"""A CPython asyncio program (tests/targets/pyasync.py: epoll, the self-pipe socket pair, call_later timers, an
eventfd) dumped mid-work and restored eagerly and lazily must finish with exactly the result of an
uninterrupted run of the same program."""

from __future__ import annotations

import json
import os

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("python", H.PYTHONS)
def test_asyncio_mid_work(
    harness: H.Harness, python_references: H.PythonReferences, python: str, mode: str
) -> None:
    reference = python_references["pyasync", python]
    target = harness.start_target("pyasync", python=python)
    links = [os.readlink(f"/proc/{target.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{target.pid}/fd")]
    # What the test is about: the loop's epoll, its self-pipe socket pair and the eventfd are all there.
    assert "anon_inode:[eventpoll]" in links and "anon_inode:[eventfd]" in links, links
    assert sum(link.startswith("socket:") for link in links) == 2, links
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    assert H.result_line(target.log) is None, "the program finished before the dump: nothing was tested"
    files = json.loads((image / f"task-{target.pid}.json").read_text())["files"]
    assert any(f["type"] == "unix" and f["queue"] for f in files), f"no data queued in the self-pipe: {files}"
    assert any(f["type"] == "eventfd" and f["count"] for f in files), f"the eventfd counter is 0: {files}"
    H.restore_to_reference(harness, image, target, mode, reference)
