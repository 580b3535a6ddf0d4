"""Per-process state a restore could not give back is refused at dump, naming it, and the process is left
running and unchanged (tests/targets/refused_proc.c checks its own state after the refused dump)."""

from __future__ import annotations

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

# mode -> a regex the one-line error must match
EXPECTED = {
    "securebits": r"pid \d+: securebits 0x\w+ are set",
    "cpu_overrun": r"pid \d+: POSIX timer \d+ on CLOCK_PROCESS_CPUTIME has overrun count \d+",
}


def test_every_mode_is_tested() -> None:
    assert sorted(EXPECTED) == sorted(H.REFUSED_PROC_MODES)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_dump_refuses_proc_state(harness: H.Harness, mode: str) -> None:
    case = H.Case(f"refused-proc-{mode}", "refused_proc", (mode,))
    target = harness.start_case(case)
    # The calls the dump injects run on the process's own CPU clock (a few ms), so its 1 ms CPU-time timer
    # may expire meanwhile: its (blocked) signal may become pending, as after any CPU use of its own.
    ignore = ("ShdPnd",) if mode == "cpu_overrun" else ()
    H.refused_unchanged(harness, case, target, EXPECTED[mode], ignore_status=ignore)
