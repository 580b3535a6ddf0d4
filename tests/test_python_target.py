"""A plain CPython interpreter dumped mid-computation and restored (eagerly and lazily) must
finish with exactly the result of an uninterrupted run (tests/targets/pyscript.py)."""

from __future__ import annotations

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("python", H.PYTHONS)
def test_python_mid_computation(
    harness: H.Harness, python_references: H.PythonReferences, python: str, mode: str
) -> None:
    """python "lazarus" is the very interpreter binary lazarus runs on (restorer and restored
    process share their executable); "system" is the distribution's python3, if it has one."""
    reference = python_references["pyscript", python]
    target = harness.start_target("pyscript", python=python)
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump failed: {res.stderr}"
    assert H.result_line(target.log) is None, "the script finished before the dump: nothing was tested"
    H.restore_to_reference(harness, image, target, mode, reference)
