"""restore/tree.py BackgroundChecks: a tree's /proc-only checks on a thread, collected by wait()."""

from __future__ import annotations

import pytest

from lazarus.errors import RestoreError
from lazarus.restore.tree import BackgroundChecks


def test_every_check_runs_before_wait_returns() -> None:
    done: list[int] = []
    checks = BackgroundChecks()
    for pid in (10, 11, 12):
        checks.submit(pid, done.append, pid)
    checks.wait()
    assert done == [10, 11, 12]


def test_the_first_error_is_raised_naming_its_task() -> None:
    def bad(_: object) -> None:
        raise RestoreError("mapping 0x1000-0x2000 [anon]: restored with VmFlags rd", stage="memory")
    checks = BackgroundChecks()
    checks.submit(10, lambda _: None, 0)
    checks.submit(11, bad, 0)
    checks.submit(12, bad, 0)
    with pytest.raises(RestoreError, match=r"VmFlags rd \(pid 11\)"):
        checks.wait()


def test_a_task_gone_is_a_restore_error() -> None:
    def gone(_: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")
    checks = BackgroundChecks()
    checks.submit(13, gone, 0)
    with pytest.raises(RestoreError, match="mappings of task 13: No such file"):
        checks.wait()


def test_close_without_checks_and_after_failure() -> None:
    BackgroundChecks().close()  # never started: nothing to join
    checks = BackgroundChecks()
    checks.submit(1, lambda _: None, 0)
    checks.close()  # the failure path: joined, errors dropped
