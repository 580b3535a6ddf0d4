"""task.threads in an image: checked before a restore creates anything (lazarus/restore/threads.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lazarus.errors import ImageError
from lazarus.kernel import abi
from lazarus.restore.threads import THREAD_FLAGS, check_threads


def thread(tid: int) -> dict[str, Any]:
    return {"tid": tid, "core": {"regs": "00" * abi.USER_REGS_SIZE, "xstate": "00" * 832}, "blocked": 0,
            "pending_thread": ["00" * abi.SIGINFO_SIZE], "altstack": {"sp": 0, "flags": 2, "size": 0},
            "rseq": {"addr": 4096, "size": 32, "sig": 0x53053053}, "clear_child_tid": 0,
            "robust_list": {"head": 0, "len": 24}, "comm": "worker"}


TASK = {"pid": 100, "threads": [thread(101), thread(102)]}


def test_a_good_list_and_none_at_all() -> None:
    assert [t["tid"] for t in check_threads(TASK, "task-100.json")] == [101, 102]
    assert check_threads({"pid": 100}, "task-100.json") == []


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t["threads"][1].update(tid=101), r"threads\[1\]\.tid' is 101"),
    (lambda t: t["threads"][0].update(tid=100), r"threads\[0\]\.tid' is 100"),
    (lambda t: t["threads"][0].update(tid=-3), r"threads\[0\]\.tid"),
    (lambda t: t["threads"][0]["core"].update(regs="00" * 8), r"thread 101: registers"),
    (lambda t: t["threads"][0]["core"].update(xstate="zz"), r"thread 101: registers"),
    (lambda t: t["threads"][1].update(pending_thread=["00"]), r"thread 102: .*queued signal"),
    (lambda t: t["threads"][0].pop("comm"), r"missing field 'threads\[0\]\.comm'"),
    (lambda t: t["threads"][0].update(blocked="0"), r"'threads\[0\]\.blocked' must be"),
    (lambda t: t["threads"][0].update(rseq={"addr": 1}), r"threads\[0\]\.rseq\.size"),
    (lambda t: t.update(threads={}), r"'threads' must be an array"),
])
def test_bad_lists_are_refused_naming_the_field(change: Any, message: str) -> None:
    task = copy.deepcopy(TASK)
    change(task)
    with pytest.raises(ImageError, match=message):
        check_threads(task, "task-100.json")


def test_threads_share_what_pthread_create_shares() -> None:
    for flag in (abi.CLONE_VM, abi.CLONE_FS, abi.CLONE_FILES, abi.CLONE_SIGHAND, abi.CLONE_THREAD,
                 abi.CLONE_SYSVSEM, abi.CLONE_SETTLS):
        assert THREAD_FLAGS & flag
    assert THREAD_FLAGS & abi.CLONE_PTRACE  # born traced: no instruction runs before its registers are set
