"""Shared fixtures: the built targets, a per-test Harness, the `root` marker, artifact keeping.

pytest is made a child subreaper so that restored (orphaned) processes and anything a
`lazarus` command leaves behind are adopted by it, reaped, and reported if still alive after
a test. Images and logs of failed tests stay under the pytest temp dir (the path is printed
in the report); those of passed tests are removed, as images can be large.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (rootdir-relative "prepend" import mode, no tests/__init__.py)
    import harness as H
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests import harness as H


def pytest_configure(config: pytest.Config) -> None:
    try:
        H.set_child_subreaper()
    except OSError as e:  # pragma: no cover - prctl exists on every supported kernel
        config.issue_config_time_warning(pytest.PytestWarning(f"cannot become a child subreaper: {e}"), 2)


# Test files whose every test needs what `lazarus check` lists for a purpose (dump, restore, lazy). A test
# parametrized with mode="lazy" also needs "lazy" (see needs()): an eager test never skips for a lazy-only gap.
NEEDS = {
    "test_dump_restore.py": ("dump", "restore"), "test_python_target.py": ("dump", "restore"),
    "test_lazy.py": ("dump", "restore", "lazy"), "test_lazy_server.py": ("lazy",), "test_uffd.py": ("lazy",),
    "test_bad_input.py": ("dump", "restore"), "test_cpu.py": ("dump",), "test_pidns.py": ("dump", "restore", "pidns"),
    "test_membership.py": ("dump", "restore"), "test_thp.py": ("dump", "restore"),
    "test_hostile_images.py": ("dump", "restore", "lazy"), "test_python_asyncio.py": ("dump", "restore"),
    "test_anonfd.py": ("dump", "restore"), "test_files.py": ("dump", "restore"),
    "test_refused_proc.py": ("dump",), "test_dump_killed.py": ("dump", "restore"),
    "test_mm_state.py": ("dump", "restore"), "test_lazy_anchor.py": ("dump", "restore", "lazy"),
    "test_lazy_trust.py": ("dump", "restore", "lazy"),
    "test_unsupported.py": ("dump",), "test_cli.py": ("dump",),
    "test_real_xz.py": ("dump", "restore"), "test_real_trees.py": ("dump", "restore"),
    "test_sharing.py": ("dump", "restore"),  # and lazy for its COW test, which checks that itself
}


def needs(item: pytest.Item) -> tuple[str, ...]:
    """The purposes one test needs: its file's, plus "lazy" for a lazy run of a test that runs both ways."""
    purposes = NEEDS.get(item.path.name, ())
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("mode") == "lazy" and "lazy" not in purposes:
        purposes = (*purposes, "lazy")
    return purposes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)
        return
    # Skip (with the reason) only where `lazarus check` shows a feature missing; otherwise a test that needs
    # the feature runs and must pass.
    from lazarus.kernel import features

    missing: dict[str, str] = {}
    for purpose in ("dump", "restore", "lazy", "pidns"):
        lacking = features.missing_for(purpose)
        if lacking:
            missing[purpose] = ", ".join(f"{f.name} ({f.detail})" for f in lacking)
    if not missing:
        return
    for item in items:
        for purpose in needs(item):
            if purpose in missing:
                item.add_marker(pytest.mark.skip(reason=f"lazarus check: {purpose} needs {missing[purpose]}"))
                break


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    work = getattr(item, "lazarus_work", None)
    if work is not None and report.failed:
        report.sections.append(("lazarus artifacts", f"images and logs kept in {work}"))
    return report


@pytest.fixture(scope="session")
def open_root() -> Iterator[Path]:
    """A directory of this session outside pytest's temp root, searchable by every uid (0711): the targets'
    binaries, and the files of targets a restore opens as another uid than root (harness.DROPS_PRIVILEGES).
    Not under /tmp/pytest-of-USER: pytest makes that 0700 again whenever a session starts (_pytest/tmpdir.py),
    so another session starting (another worktree's, a rerun) while a test runs took those files away from the
    restored process ("uid 2002 may not open misc.log-1"; a failure depending on who else runs pytest).
    Removed at the end of the session."""
    d = Path(tempfile.mkdtemp(prefix="lazarus-tests-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def target_bins(open_root: Path) -> dict[str, Path]:
    """The C targets, compiled once per session (in open_root: an executable is opened as the process's uid)."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.fail("gcc is needed to build tests/targets")
    return H.build_targets(open_root / "targets")


@pytest.fixture(scope="session")
def python_references(
    tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]
) -> Iterator[H.PythonReferences]:
    """references["pyscript", python]: the RESULT line of one uninterrupted run, computed on first use."""
    h = H.Harness(target_bins, tmp_path_factory.mktemp("python_reference"))
    try:
        yield H.PythonReferences(h)
    finally:
        h.cleanup()


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, target_bins: dict[str, Path], tmp_path: Path, open_root: Path
) -> Iterator[H.Harness]:
    """A Harness working in this test's tmp_path (and a directory of its own in open_root for files other uids
    open); kills what it started afterwards and fails the test (as an error in teardown) if a process was left
    behind by the code under test."""
    open_work = Path(tempfile.mkdtemp(dir=open_root))
    open_work.chmod(0o711)
    h = H.Harness(target_bins, tmp_path, open_work=open_work)
    request.node.lazarus_work = tmp_path
    yield h
    leftovers = h.cleanup()
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.passed:
        for image in tmp_path.glob("img*"):
            shutil.rmtree(image, ignore_errors=True)
        shutil.rmtree(open_work, ignore_errors=True)
    if leftovers:
        pytest.fail(f"processes left behind (killed now): {', '.join(leftovers)}", pytrace=False)
