"""A plain CPython interpreter dumped mid-computation and restored (eagerly and lazily) must
finish with exactly the result of an uninterrupted run (tests/targets/pyscript.py)."""

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
def references(
    tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]
) -> Iterator[dict[str, str]]:
    """The RESULT line of one uninterrupted run per interpreter, computed on first use."""
    h = H.Harness(target_bins, tmp_path_factory.mktemp("pyscript_reference"))

    class Lazy(dict[str, str]):
        def __missing__(self, python: str) -> str:
            target = h.start_target("pyscript", python=python)
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
def test_python_mid_computation(
    harness: H.Harness, references: dict[str, str], python: str, mode: str
) -> None:
    """python "lazarus" is the very interpreter binary lazarus runs on (restorer and restored
    process share their executable); "system" is the distribution's python3, if it has one."""
    reference = references[python]
    target = harness.start_target("pyscript", python=python)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    assert result_line(target.log) is None, "the script finished before the dump: nothing was tested"

    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore of {target.exe} failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    H.expect_pass(r.target.wait_result(120), r.target, r)
    assert r.target.wait_exit(15) == 0
    assert result_line(target.log) == reference, f"different result after restore:\n{target.log_text()}"
