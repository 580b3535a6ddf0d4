"""Real programs made of several processes, dumped mid-work: a Python program whose ThreadPoolExecutor threads
feed a multiprocessing.Pool of forked workers (tests/targets/pypool.py), and a shell pipeline, `sh -c` with a
producer, a filter and a compressor writing a file. Restored eagerly and lazily, each must finish with exactly
the result of an uninterrupted run.

All are dumped mid-work and restored (restore_tree_to_reference); the Python pool's semaphores are shared
memory between its processes (deleted /dev/shm/sem.* files every worker maps), made once at restore.
"""

from __future__ import annotations

import gzip
import json
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

# seq | grep | gzip: about 2 s on two idle cores. gzip -n leaves out name and time: the same bytes every run.
PIPELINE_LAST = 12_000_000
PIPELINE = f"seq 1 {PIPELINE_LAST} | grep 7 | gzip -n > out.gz"


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
    """The dump took every process of the tree mid-work and ended them; the restore (eager or
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


def _python_reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path],
                      name: str) -> Iterator[str]:
    """The result line of the Python target `name` run to its end without a dump: what a restored run must give."""
    h = H.Harness(target_bins, tmp_path_factory.mktemp(f"{name}_reference"))
    try:
        target = h.start_target(name, python="lazarus")
        H.expect_pass(target.wait_result(180), target)
        assert target.wait_exit(15) == 0
        line = H.result_line(target.log)
        assert line is not None, target.describe()
        yield line
    finally:
        h.cleanup()


# ----------------------------------------------------------------------------------------------
# Python: ThreadPoolExecutor threads feeding a multiprocessing.Pool (fork)


@pytest.fixture(scope="module")
def pypool_reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[str]:
    yield from _python_reference(tmp_path_factory, target_bins, "pypool")


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

    # Its pipes, inherited files and the semaphores multiprocessing maps MAP_SHARED from /dev/shm/sem.*
    # (unlinked at once: "deleted" memory objects, one mapped by every worker) come back shared.
    restore_tree_to_reference(harness, res, image, target, tree, mode, result, pypool_reference)


# ----------------------------------------------------------------------------------------------
# Python: multiprocessing.Value and Array filled by forked Process workers


@pytest.fixture(scope="module")
def pyshared_reference(tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]) -> Iterator[str]:
    yield from _python_reference(tmp_path_factory, target_bins, "pyshared")


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_python_value_and_array_mid_work(harness: H.Harness, pyshared_reference: str, mode: str) -> None:
    target = harness.start_target("pyshared", python="lazarus")  # READY: a quarter of the slots done
    R.wait_until(lambda: len(R.descendants(target.pid)) >= 3, 30, "three workers", target)
    tree = [target.pid, *R.descendants(target.pid)]
    image = harness.image_dir()
    res = harness.dump(target, image)

    def result() -> str | None:
        return H.result_line(target.log)

    # The arena (an unlinked /dev/shm/pym-* file) is both an fd and a MAP_SHARED mapping in every process: the
    # fd's description is stored once (shared.json, type object_file) and opened again on the one recreated
    # object the mappings use, so the main process's pwrite through the fd is seen in its Array (its own check).
    if res.returncode == 0:
        shared = json.loads((image / "shared.json").read_text())
        assert any(d.get("type") == "object_file" for d in shared["files"]), shared["files"]
    restore_tree_to_reference(harness, res, image, target, tree, mode, result, pyshared_reference)


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
