"""Memory of the lazy server: its RSS stays flat in the size it serves, and one page file is mapped once however
many restores of it the server serves (lazy/sources.py drops served pages from the mapping; lazy/pagefiles.py
shares it). The faulting processes are the C helper of tests/test_uffd.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import xxhash

from lazarus.kernel import abi
from lazarus.kernel.vm import madvise
from lazarus.lazy.pagefiles import MappedPageFiles
from lazarus.lazy.server import LazyServer
from lazarus.lazy.sources import ImagePageSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_lazy_server import T, expect_pass, serve  # noqa: E402

P = T.P
MiB = 1 << 20
pytestmark = T.needs_root
helper_bin, helpers, page_file = T.helper_bin, T.helpers, T.page_file


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


class SamplingSource(ImagePageSource):
    """The real source, sampling this process's RSS every 2 MiB served (the server is this process)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.samples: list[dict[str, int]] = []
        self._since = 0

    def served(self, file_index: int, npages: int) -> None:
        super().served(file_index, npages)
        self._since += npages
        if self._since * P >= 2 * MiB:
            self._since = 0
            self.samples.append(rss_kib())


def serve_measured(helpers, page_file, mib: int) -> tuple[dict[str, int], dict[str, int], int]:
    """Serve a restore of `mib` MiB in the background; returns the RSS before serving, its peak while serving
    (KiB), and the number of samples."""
    n = mib * MiB // P
    h = helpers(npages=n, hole_every=0, scenario="idle")
    pf = page_file(n, 0)
    # the stand-in computed its sums through its mapping: start from nothing of the file mapped
    madvise(pf.address(0), n * P, abi.MADV_DONTNEED)
    server = LazyServer(background=True)
    before = rss_kib()
    source = SamplingSource(h.vmas(), pf, name=pf.name)
    server.add_process(h.pid, h.take_uffd(), source)
    stats = serve(server, [h], go=False)
    h.go()
    expect_pass(h)
    assert stats["processes"][0]["state"] == "complete"
    assert stats["pages_background"] == n
    peak = {k: max(s[k] for s in source.samples) for k in before}
    return before, peak, len(source.samples)


def test_server_rss_flat_in_restored_size(helpers, page_file):
    """Serving 256 MiB costs the server no more memory than serving 16 MiB: the page file's pages leave its
    mapping as they are served (RssFile), and nothing per page is kept in Python objects (RssAnon)."""
    small_before, small_peak, _ = serve_measured(helpers, page_file, 16)
    big_before, big_peak, samples = serve_measured(helpers, page_file, 256)
    assert samples >= 100
    # file pages held at any time: what was served since the last drop (8 MiB), plus the chunks being copied
    # (two threads, 2 MiB each) and the kernel's fault-around: far below the 256 MiB served
    assert big_peak["RssFile"] - big_before["RssFile"] <= 16 * 1024, (big_before, big_peak)
    # the Python side: a few MiB at most (the copy thread, pending-run lists), whatever the size
    assert big_peak["RssAnon"] - big_before["RssAnon"] <= 8 * 1024, (big_before, big_peak)
    assert (big_peak["RssAnon"] - big_before["RssAnon"]) - (small_peak["RssAnon"] - small_before["RssAnon"]) \
        <= 4 * 1024, (small_before, small_peak, big_before, big_peak)


class IdentifiedPageFile(T.StandInPageFile):
    """The stand-in with what lazy/pagefiles.py needs of images.PageFile: identity, closed, close()."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.closed = False

    @property
    def identity(self):
        if self.closed:
            return None
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino, self.size, xxhash.xxh3_64_intdigest(str(self._sums).encode())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._mm.close()
            os.close(self._fd)


def mappings_of(path: Path) -> int:
    """How many distinct mappings (by start address of their first vma) of `path` this process has."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


def test_one_mapping_shared_by_every_restore_of_a_page_file(helpers, tmp_path, monkeypatch):
    """Two restores of one page file are served from one mapping and one verify-ahead process; a copy of the
    file (the same bytes, another inode) gets its own; all of it is gone once the restores are done."""
    monkeypatch.setattr(ImagePageSource, "VERIFY_AHEAD_MIN", 0)  # a verify-ahead process even for 4 MiB
    n = 1024
    path = tmp_path / "pages-1.img"
    T.write_page_file(path, n, 0, 7)
    other = tmp_path / "pages-2.img"  # the same bytes in another file: not the same page file
    shutil.copyfile(path, other)
    files = MappedPageFiles()
    pf1, pf2, pf3 = IdentifiedPageFile(path), IdentifiedPageFile(path), IdentifiedPageFile(other)
    hs = [helpers(npages=n, scenario="read") for _ in range(3)]
    server = LazyServer(background=False)
    sources = [files.source(h.vmas(), pf, name=pf.name) for h, pf in zip(hs, (pf1, pf2, pf3), strict=True)]
    # the second opening of pages-1.img was given up for the first one's mapping
    assert pf2.closed and not pf1.closed and not pf3.closed
    assert mappings_of(path) == 1 and mappings_of(other) == 1
    assert files.mapped == 2 and files.users(pf1) == 2 and files.users(pf3) == 1
    for h, src in zip(hs, sources, strict=True):
        server.add_process(h.pid, h.take_uffd(), src)
    verifiers = [src._verifier.pid for src in sources]
    assert verifiers[0] == verifiers[1] != verifiers[2], verifiers
    stats = serve(server, hs)
    for h in hs:
        expect_pass(h)
    assert all(p["state"] in ("complete", "exited") for p in stats["processes"]), stats["processes"]
    # every restore done: both mappings gone
    assert files.mapped == 0
    assert pf1.closed and pf3.closed
    assert mappings_of(path) == 0 and mappings_of(other) == 0
    for pid in set(verifiers):  # our children, stopped and reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_mapping_released_when_its_last_restore_completes(helpers, tmp_path):
    """The server closes a source when the last process it serves is done, not at its own end (close()): a
    long-lived server does not keep page files mapped, nor verifier processes running, for restores over."""
    n = 256
    path = tmp_path / "pages-1.img"
    T.write_page_file(path, n, 0, 7)
    files = MappedPageFiles()
    pf = IdentifiedPageFile(path)
    h = helpers(npages=n, scenario="read")
    server = LazyServer(background=True)
    try:
        server.add_process(h.pid, h.take_uffd(), files.source(h.vmas(), pf, name=pf.name))
        assert mappings_of(path) == 1
        h.go()
        stats = server.run(timeout=30)
        assert stats["processes"][0]["state"] in ("complete", "exited")
        assert files.mapped == 0 and pf.closed and mappings_of(path) == 0
    finally:
        server.close()
    expect_pass(h)
