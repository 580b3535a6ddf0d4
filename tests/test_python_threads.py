"""A CPython program with a thread pool, a producer and a consumer (tests/targets/pythreads.py) dumped mid-work
and restored eagerly and lazily must finish with exactly the result of an uninterrupted run."""

from __future__ import annotations

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
def reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[str]:
    h = H.Harness(target_bins, tmp_path_factory.mktemp("pythreads_reference"))
    try:
        target = h.start_target("pythreads", python="lazarus")
        H.expect_pass(target.wait_result(120), target)
        assert target.wait_exit(10) == 0
        line = result_line(target.log)
        assert line is not None, target.describe()
        yield line
    finally:
        h.cleanup()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_python_threads_mid_work(harness: H.Harness, reference: str, mode: str) -> None:
    target = harness.start_target("pythreads", python="lazarus")
    tids = len(list(Path(f"/proc/{target.pid}/task").iterdir()))
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    assert result_line(target.log) is None, "the program finished before the dump: nothing was tested"
    assert tids >= 4, f"only {tids} threads when dumped"
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    H.expect_pass(r.target.wait_result(120), r.target, r)
    assert r.target.wait_exit(15) == 0
    assert result_line(target.log) == reference, f"different result after restore:\n{target.log_text()}"
