"""The pure parts of POSIX timer dump and restore: /proc/PID/timers parsing, clock decoding, and the
split of pending siginfos between timers and the rest."""

from __future__ import annotations

import pytest

from lazarus.dump.timers import ProcTimer, clock_name, parse_timers
from lazarus.errors import DumpError
from lazarus.restore.timers import siginfo_timer, split_pending

# As Linux 6.18 prints them (fs/proc/base.c show_timer), newest first.
PROC_TIMERS = """\
ID: 6
signal: 37/0000000000000042
notify: signal/pid.4242
ClockID: 1
ID: 3
signal: 10/000000000000004d
notify: signal/tid.4242
ClockID: 0
ID: 4
signal: 0/0000000000000000
notify: none/pid.4242
ClockID: 7
ID: 2
signal: 35/ffffffff5eed0001
notify: signal/pid.4242
ClockID: -6
"""


def test_parse_timers() -> None:
    got = parse_timers(PROC_TIMERS, 4242)
    assert got == [
        ProcTimer(6, 37, 0x42, 0, 4242, 1),
        ProcTimer(3, 10, 0x4D, 4, 4242, 0),  # SIGEV_SIGNAL | SIGEV_THREAD_ID
        ProcTimer(4, 0, 0, 1, 4242, 7),  # SIGEV_NONE
        ProcTimer(2, 35, 0xFFFFFFFF5EED0001, 0, 4242, -6),
    ]


def test_parse_timers_empty_and_broken() -> None:
    assert parse_timers("", 1) == []
    with pytest.raises(DumpError, match="cannot parse /proc/7/timers"):
        parse_timers("ID: 1\nsignal: 14\nnotify: signal/pid.7\nClockID: 1\n", 7)


@pytest.mark.parametrize("clock,name", [
    (0, "CLOCK_REALTIME"), (1, "CLOCK_MONOTONIC"), (7, "CLOCK_BOOTTIME"), (11, "CLOCK_TAI"),
    (-6, "CLOCK_PROCESS_CPUTIME"),  # CLOCK_PROCESS_CPUTIME_ID as the kernel stores it: ~0 << 3 | 2
    (-2, "CLOCK_THREAD_CPUTIME"),  # CLOCK_THREAD_CPUTIME_ID: ~0 << 3 | 4 | 2
    ((~4242 << 3) | 2, "CLOCK_PROCESS_CPUTIME"),  # clock_getcpuclockid(own pid)
    (8, None), (9, None),  # the *_ALARM clocks
    ((~4243 << 3) | 2, None),  # another process's CPU clock
    ((~3 << 3) | 3, None),  # a dynamic (fd) clock
])
def test_clock_name(clock: int, name: str | None) -> None:
    assert clock_name(clock, 4242) == name


def _siginfo(signo: int, code: int, timer_id: int = 0) -> str:
    info = signo.to_bytes(4, "little") + bytes(4) + code.to_bytes(4, "little", signed=True) + bytes(4)
    info += timer_id.to_bytes(4, "little", signed=True)
    return (info + bytes(128 - len(info))).hex()


def test_siginfo_timer() -> None:
    assert siginfo_timer(bytes.fromhex(_siginfo(34, -2, 5))) == (34, 5)
    assert siginfo_timer(bytes.fromhex(_siginfo(34, -1, 5))) is None  # SI_QUEUE


def test_split_pending() -> None:
    timers = [{"id": 5, "signo": 36, "notify": 0}, {"id": 3, "signo": 10, "notify": 4},
              {"id": 4, "signo": 0, "notify": 1}]
    own = _siginfo(36, -2, 5)
    queued = _siginfo(36, -1)  # sigqueue() by someone: stays
    deleted = _siginfo(35, -2, 9)  # timer 9 is gone: the kernel would drop it
    wrong_signo = _siginfo(37, -2, 5)
    rest, ids = split_pending(timers, [own, queued, deleted, wrong_signo], thread=False)
    assert (rest, ids) == ([queued], {5})
    # Timer 3 signals its thread: its signal is in the thread queue, not the process queue.
    rest, ids = split_pending(timers, [_siginfo(10, -2, 3)], thread=True)
    assert (rest, ids) == ([], {3})
    rest, ids = split_pending(timers, [_siginfo(10, -2, 3)], thread=False)
    assert (rest, ids) == ([], set())


def _timer_record() -> dict[str, object]:
    return {"id": 5, "signo": 36, "sigev_value": 7, "notify": 0, "notify_pid": 9, "clock": 1,
            "clock_name": "CLOCK_MONOTONIC", "interval": [0, 10_000_000], "value": [0, 5], "overrun": 3}


def test_check_timers() -> None:
    from lazarus.errors import ImageError
    from lazarus.restore.timers import check_timers

    assert check_timers([_timer_record()], "task-9.json") == [_timer_record()]
    with pytest.raises(ImageError, match=r"task-9.json: field 'signals.timers' must be an array"):
        check_timers({}, "task-9.json")
    bad = _timer_record() | {"overrun": "3"}
    with pytest.raises(ImageError, match=r"field 'signals.timers\[0\].overrun' must be an integer"):
        check_timers([bad], "task-9.json")
    bad = _timer_record() | {"value": [0, 1_000_000_000]}
    with pytest.raises(ImageError, match=r"field 'signals.timers\[0\].value' must be \[seconds, nanoseconds\]"):
        check_timers([bad], "task-9.json")


def test_check_proc_state() -> None:
    from lazarus.errors import ImageError
    from lazarus.restore.core import check_proc_state

    prctl = {"child_subreaper": 1, "pdeathsig": 0, "keepcaps": 0, "thp_disable": None, "mce_kill": 2, "tsc": 1,
             "speculation": [2, None, 8], "mdwe": 0, "memory_merge": None, "cpuid": 1, "futex_hash_slots": 0}
    caps = {"inh": 0, "prm": 1, "eff": 1, "bnd": 3, "amb": 0}
    check_proc_state({"prctl": prctl, "caps": caps}, "t.json")
    check_proc_state({}, "t.json")  # an image from before these fields
    with pytest.raises(ImageError, match=r"field 'misc.prctl.pdeathsig' must be an integer or null"):
        check_proc_state({"prctl": prctl | {"pdeathsig": "x"}}, "t.json")
    with pytest.raises(ImageError, match=r"misc.prctl.speculation"):
        check_proc_state({"prctl": prctl | {"speculation": ["x"]}}, "t.json")
    with pytest.raises(ImageError, match=r"misc.caps"):
        check_proc_state({"caps": caps | {"bnd": 1 << 64}}, "t.json")
