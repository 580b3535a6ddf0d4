"""The targets check themselves: without any dump they PASS, and every check they make can FAIL.

Each target declares its corruption points ("# corrupt-points: ..." in its log). With
LAZ_SELFTEST_CORRUPT=NAME it damages that piece of state after the trigger and before
verifying, and must then report FAIL (exit 1). This proves that a PASS after a restore means
something. Nothing here needs lazarus.
"""

from __future__ import annotations

import pytest

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

# Cases for the self-test: every dump/restore case, the register target on smaller register
# sets, the unsupported-resource targets, and a shortened Python target.
SELF_CASES: tuple[H.Case, ...] = (
    *H.CASES,
    H.Case("regs-avx", "regs", ("avx",), syscall=None),
    H.Case("regs-sse", "regs", ("sse",), syscall=None),
    H.Case("pyasync", "pyasync", ("700",), "none", None),
    *(H.Case(f"unsupported-{m}", "unsupported", (m,)) for m in H.UNSUPPORTED_MODES),
    *(H.Case(f"files-refuse-{m}", "files_refuse", (m,)) for m in H.FILES_REFUSE_MODES),
    *(H.Case(f"refused-proc-{m}", "refused_proc", (m,)) for m in H.REFUSED_PROC_MODES),
    H.Case("pyscript", "pyscript", ("150000",), "none", None),
    H.Case("pythreads", "pythreads", ("400",), "none", None),
    H.Case("pypool", "pypool", ("60",), "none", None),
    H.Case("pyshared", "pyshared", ("120",), "none", None),
    H.Case("thp", "thp"),
    H.Case("lazy-churn", "lazy_churn", ("200",)),
    H.Case("guestperm-plain", "guestperm", ("plain",)),
)
BATCH = 6
# Targets that need set-up only their own test module makes; each of these modules runs the self-test too.
DRIVEN_ELSEWHERE = {"cgroup": "tests/test_membership.py (joins cgroups the test creates)"}
# A child of its own to trigger: tests/test_lazy_anchor.py runs it as it is, corrupted, eager and lazy.
DRIVEN_ELSEWHERE["forkwait"] = "tests/test_lazy_anchor.py"
# Trees are not dumped yet: tests/test_sharing.py drives these (detection, restore primitives, their FAILs).
DRIVEN_ELSEWHERE["share_tree"] = DRIVEN_ELSEWHERE["share_take"] = "tests/test_sharing.py"
DRIVEN_ELSEWHERE["cow_fork"] = "tests/test_sharing.py"


@pytest.mark.parametrize("case", SELF_CASES, ids=lambda c: c.id)
def test_target_passes_without_dump(harness: H.Harness, case: H.Case) -> None:
    target = harness.start_case(case, selftest=True)
    result = harness.run_case(case, target)
    H.expect_pass(result, target)
    assert target.wait_exit(10) == 0, target.describe()
    points = H.corrupt_points(target.log)
    assert points, f"{case.id} declares no corruption points: {target.describe()}"
    assert not any(line.startswith("# corrupting") for line in target.log_text().splitlines())


def _corrupted_run(harness: H.Harness, case: H.Case, point: str) -> H.Target:
    return harness.start_case(case, env={"LAZ_SELFTEST_CORRUPT": point}, selftest=True)


def _expect_fail(harness: H.Harness, case: H.Case, target: H.Target, point: str) -> str | None:
    """None if the run failed as it should, else a description of what went wrong."""
    result = harness.run_case(case, target)
    status = target.wait_exit(10)
    text = target.log_text()
    applied = [line for line in text.splitlines() if line.startswith("# corrupting ")]
    if point != "1" and applied != [f"# corrupting {point}"]:
        return f"point {point}: not applied (log: {text!r})"
    if point == "1" and len(applied) != 1:
        return f"LAZ_SELFTEST_CORRUPT=1 applied {applied}"
    if not result.startswith("FAIL") or "internal:" in result:
        return f"point {point}: result {result!r}, expected a FAIL (log: {text!r})"
    if status != 1:
        return f"point {point}: exit status {status}, expected 1"
    return None


@pytest.mark.parametrize("case", SELF_CASES, ids=lambda c: c.id)
def test_every_check_can_fail(harness: H.Harness, case: H.Case) -> None:
    first = _corrupted_run(harness, case, "1")
    points = H.corrupt_points(first.log)
    assert points, first.describe()
    problems = [p for p in [_expect_fail(harness, case, first, "1")] if p]
    for i in range(0, len(points), BATCH):
        batch = [(point, _corrupted_run(harness, case, point)) for point in points[i : i + BATCH]]
        problems += [p for point, target in batch if (p := _expect_fail(harness, case, target, point))]
    assert not problems, "\n".join(problems)


def test_every_target_is_covered() -> None:
    """Each target the harness builds has its source, and is driven by at least one case."""
    sources = {p.stem for p in H.TARGETS_SRC.glob("*.c")}
    assert set(H.C_TARGETS) <= sources, set(H.C_TARGETS) - sources
    driven = {c.target for c in SELF_CASES} | set(DRIVEN_ELSEWHERE)
    assert set(H.C_TARGETS) | {"pyscript"} <= driven


def test_targets_name_what_they_exercise() -> None:
    """Each target starts with a comment naming what it exercises (DESIGN.md, Tests)."""
    for src in [*(H.TARGETS_SRC / f"{name}.c" for name in H.C_TARGETS), H.TARGETS_SRC / "pyscript.py"]:
        head = src.read_text().lstrip()
        assert head.startswith(("/*", '"""')), src
        assert "exercise" in head[:600].lower(), f"{src.name}: top comment should say what it exercises"
