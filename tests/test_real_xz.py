"""A multi-threaded compressor from Debian, `xz -T2`, dumped while its worker threads compress and restored
eagerly and lazily: its output file must be byte for byte that of an uninterrupted run.

xz in threaded mode cuts its input into blocks of --block-size and compresses them on its worker threads while
the main thread reads the input and writes finished blocks in order; the output depends only on the input,
the options and the thread count (-T1 writes another format), never on timing: the reference fixture checks
this with two uninterrupted runs. Its stdout is a regular file the harness opened, so the image holds one
process (three threads, the self-pipe xz keeps for its signal handlers, the input and output files).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import harness as H
    import realprogs as R
except ImportError:  # pragma: no cover
    from tests import harness as H
    from tests import realprogs as R

pytestmark = pytest.mark.root

# 16 blocks of 1 MiB at preset 1: about 1.5 s on two idle cores, so the dump finds it mid-work with both
# workers busy, and each run stays short. More blocks than threads keeps the workers in turn.
INPUT_SIZE = 16 << 20
XZ_OPTIONS = ("-T2", "-1", "--block-size=1MiB", "-c")


def xz_argv(inp: Path) -> list[str]:
    return [str(R.need_program("xz")), *XZ_OPTIONS, str(inp)]


@pytest.fixture(scope="module")
def xz_reference(
    tmp_path_factory: pytest.TempPathFactory, target_bins: dict[str, Path]
) -> Iterator[tuple[Path, bytes]]:
    """(input file, output of an uninterrupted run), after checking that two such runs agree byte for byte."""
    work = tmp_path_factory.mktemp("xz_reference")
    inp = R.write_text_input(work / "input.txt", INPUT_SIZE)
    h = H.Harness(target_bins, work)
    try:
        outs = []
        for i in range(2):
            target = R.start_program(h, "xz", xz_argv(inp), work / f"reference-{i}.xz")
            assert target.wait_exit(120) == 0, f"xz failed: {R.stderr_of(target)}"
            outs.append(target.log.read_bytes())
        assert outs[0] == outs[1], "two uninterrupted runs of xz -T2 differ: the comparison would prove nothing"
        assert len(outs[0]) > 1 << 20
        yield inp, outs[0]
    finally:
        h.cleanup()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_xz_threads_mid_work(harness: H.Harness, xz_reference: tuple[Path, bytes], mode: str) -> None:
    inp, reference = xz_reference
    out = harness.path("out.xz")
    target = R.start_program(harness, "xz", xz_argv(inp), out)
    # Started its two workers and written a first block (only a worker makes one): it is compressing now.
    R.wait_until(lambda: len(R.threads_of(target.pid)) >= 3 and R.file_size(out) > 0, 60,
                 "worker threads and first output", target)
    workers = [t for t in R.threads_of(target.pid) if t != target.pid]
    image = harness.image_dir()
    res = harness.dump(target, image)
    assert res.returncode == 0, f"dump of xz failed: {res.stderr}"
    partial = R.file_size(out)
    assert 0 < partial < len(reference), (
        f"xz had written {partial} of {len(reference)} bytes when dumped: not mid-work, nothing was tested")
    assert out.read_bytes() == reference[:partial], "the output before the dump already differs"

    shown = harness.lazarus("show", "--json", str(image))
    assert shown.returncode == 0, shown.stderr
    (task,) = json.loads(shown.stdout)["tasks"]
    assert [t["tid"] for t in task["threads"]] == workers, (task["threads"], workers)

    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0, f"restore of xz failed: {r.stderr}"
    assert r.pid == target.pid and r.target is not None
    code = r.target.wait_exit(120)
    assert code == 0, f"restored xz ended with {code}: {R.stderr_of(target)}"
    assert R.stderr_of(target) == "", R.stderr_of(target)
    got = out.read_bytes()
    assert got == reference, (f"restored xz wrote {len(got)} bytes, the uninterrupted run {len(reference)}; "
                              f"first difference at byte {R.first_difference(got, reference)}")
