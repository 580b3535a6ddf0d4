"""Real programs made of several processes, dumped mid-work: a Python program whose ThreadPoolExecutor threads
feed a multiprocessing.Pool of forked workers (tests/targets/pypool.py), and a shell pipeline, `sh -c` with a
producer, a filter and a compressor writing a file. Restored eagerly and lazily, each must finish with exactly
the result of an uninterrupted run.

The shell pipeline is dumped mid-work and restored (restore_tree_to_reference). The Python pool is still
refused (README, "Today's limits"): the test asserts that the dump is refused in one line naming the shared
memory object (its semaphores), that nothing is left behind, and that the program then finishes untouched
with the uninterrupted run's result (nothing lost). Its `# TREE:` comment shows the call that replaces the
refusal check once shared memory between processes is dumped.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    import harness as H
    import realprogs as R
except ImportError:  # pragma: no cover
    from tests import harness as H
    from tests import realprogs as R

pytestmark = pytest.mark.root

# What `lazarus dump` says of a process with children today (lazarus/dump/__init__.py, check_resources), or,
# once trees are dumped but objects shared between processes not yet (pipes, inherited open files), that.
TREE_REFUSAL = (r"^lazarus: error: (pid {pid} has child process \d+; process trees are not supported yet"
                r"|pid \d+ .*pid \d+ .*; objects shared between processes are not supported yet)$")

# seq | grep | gzip: about 2 s on two idle cores. gzip -n leaves out name and time: the same bytes every run.
PIPELINE_LAST = 12_000_000
PIPELINE = f"seq 1 {PIPELINE_LAST} | grep 7 | gzip -n > out.gz"


def refused_then_finishes(
    harness: H.Harness,
    res: subprocess.CompletedProcess,
    image: Path,
    target: H.Target,
    tree: list[int],
    result: Callable[[], object],
    reference: object,
) -> str:
    """Today: the dump of a tree is refused in one line naming processes of the tree, creates nothing, and the
    program, every process of it still there, goes on to the uninterrupted run's result."""
    line = H.assert_clean_error(res, TREE_REFUSAL.format(pid=target.pid))
    named = [int(p) for p in re.findall(r"(?:pid|child process) (\d+)", line)]
    assert named and set(named) <= set(tree), f"the refusal names pids {named}, not of the tree {tree}: {line}"
    assert H.sibling_leftovers(image) == [], f"the refused dump left {H.sibling_leftovers(image)}"
    assert target.alive(), f"the refused dump ended the program: {target.describe()}"
    code = target.wait_exit(180)
    assert code == 0, f"{target.name} ended with {code} after the refused dump: {R.stderr_of(target)}"
    assert result() == reference, f"{target.name}: another result after the refused dump"
    return line


def restore_tree_to_reference(
    harness: H.Harness,
    res: subprocess.CompletedProcess,
    image: Path,
    target: H.Target,
    tree: list[int],
    mode: str,
    result: Callable[[], object],
    reference: object,
) -> None:
    """Once trees land: the dump took every process of the tree mid-work and ended them; the restore (eager or
    lazy) brings the tree back under the same pids and it finishes with the uninterrupted run's result."""
    assert res.returncode == 0, f"dump of the tree of {target.pid} failed: {res.stderr}"
    held = R.wait_pids_free(tree)
    assert not held, f"pids {held} of the dumped tree still exist: {[H.proc_state(p) for p in held]}"
    assert result() != reference, f"{target.name} had finished when dumped: nothing was tested"
    shown = harness.lazarus("show", "--json", str(image))
    assert shown.returncode == 0, shown.stderr
    pids = sorted(t["pid"] for t in json.loads(shown.stdout)["tasks"])
    assert pids == sorted(tree), f"the image holds pids {pids}, the tree was {sorted(tree)}"
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore of the tree of {target.pid} failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    code = r.target.wait_exit(180)
    assert code == 0, f"restored {target.name} ended with {code}: {target.describe()}"
    assert result() == reference, f"another result after a {mode} restore:\n{target.describe()}"


# ----------------------------------------------------------------------------------------------
# Python: ThreadPoolExecutor threads feeding a multiprocessing.Pool (fork)


@pytest.fixture(scope="module")
def pypool_reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[str]:
    h = H.Harness(target_bins, tmp_path_factory.mktemp("pypool_reference"))
    try:
        target = h.start_target("pypool", python="lazarus")
        H.expect_pass(target.wait_result(180), target)
        assert target.wait_exit(15) == 0
        line = H.result_line(target.log)
        assert line is not None, target.describe()
        yield line
    finally:
        h.cleanup()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_python_pool_and_threads_mid_work(harness: H.Harness, pypool_reference: str, mode: str) -> None:
    target = harness.start_target("pypool", python="lazarus")  # READY: a second of work done, most to come
    R.wait_until(lambda: len(R.descendants(target.pid)) >= 3 and len(R.threads_of(target.pid)) >= 7, 30,
                 "three workers and the feeder and pool threads", target)
    tree = [target.pid, *R.descendants(target.pid)]
    image = harness.image_dir()
    res = harness.dump(target, image)

    def result() -> str | None:
        return H.result_line(target.log)

    # Its pipes and inherited files are dumped now; the semaphores multiprocessing maps MAP_SHARED from
    # /dev/shm/sem.* (unlinked at once: "deleted" memory objects, one mapped by every worker) are shared memory
    # between processes, still refused (the [cow] part of issue 9), so this waits for that:
    # TREE: restore_tree_to_reference(harness, res, image, target, tree, mode, result, pypool_reference)
    line = refused_then_finishes(harness, res, image, target, tree, result, pypool_reference)
    assert re.search(r"map one shared memory object \(/dev/shm/sem\.", line), line
    assert "PASS" in target.log_text().splitlines(), target.describe()


# ----------------------------------------------------------------------------------------------
# Shell: producer | filter | compressor > file


def start_pipeline(harness: H.Harness) -> tuple[H.Target, Path]:
    """`sh -c PIPELINE` in a directory of its own; returns the shell and the file gzip writes."""
    where = harness.path("pipeline")
    where.mkdir()
    target = R.start_program(harness, "pipeline", ["sh", "-c", PIPELINE], where / "sh.out", cwd=where)
    return target, where / "out.gz"


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[bytes]:
    for program in ("sh", "seq", "grep", "gzip"):
        R.need_program(program)
    h = H.Harness(target_bins, tmp_path_factory.mktemp("pipeline_reference"))
    try:
        target, out = start_pipeline(h)
        assert target.wait_exit(180) == 0, R.stderr_of(target)
        data = out.read_bytes()
        text = gzip.decompress(data)  # a whole gzip stream: a truncated one raises
        last = next(n for n in range(PIPELINE_LAST, 0, -1) if "7" in str(n))
        assert text.startswith(b"7\n17\n27\n") and text.endswith(b"\n%d\n" % last), "unexpected pipeline output"
        yield data
    finally:
        h.cleanup()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_shell_pipeline_mid_work(harness: H.Harness, pipeline_reference: bytes, mode: str) -> None:
    target, out = start_pipeline(harness)
    # seq, grep and gzip forked, and gzip has written compressed data: the pipeline is flowing.
    R.wait_until(lambda: len(R.descendants(target.pid)) >= 3 and R.file_size(out) > 0, 30,
                 "three children and output", target)
    tree = [target.pid, *R.descendants(target.pid)]
    image = harness.image_dir()
    res = harness.dump(target, image)

    def result() -> bytes:
        return out.read_bytes()

    restore_tree_to_reference(harness, res, image, target, tree, mode, result, pipeline_reference)
