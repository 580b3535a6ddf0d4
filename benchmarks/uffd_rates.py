#!/usr/bin/env python3
"""Lazy server vs raw kernel, measured in the same run (root, gcc).

    python benchmarks/uffd_rates.py [--mib 256] [--faults 3000] [--rounds 5]

1. Fault round trip, as seen by the faulting process (the C helper of tests/test_uffd.py times each first
   touch): a raw minimal handler (poll + read + UFFDIO_COPY, which wakes) vs the LazyServer (fault_batch=1,
   no background); plus the server's own latency (read -> copy returned). Ratio target: <= 1.2.
2. Background transfer: raw UFFDIO_COPY in 2 MiB chunks from the page-file mapping vs LazyServer(background)
   until complete (xxh3 chunk checksums on, as in a real restore, and off). Ratio target: >= 0.9.
3. Fault batch: time for the helper to read its memory in order with fault_batch 1/4/16/64 (no background).

Prints medians over --rounds runs, alternating raw and server runs so that both see the same machine state
(the figures are only comparable within one run; other load on the machine shows up as noise).
"""

from __future__ import annotations

import argparse
import importlib.util
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lazarus.kernel.abi import MADV_DONTNEED  # noqa: E402
from lazarus.kernel.uffd import Outcome, PageFault  # noqa: E402
from lazarus.kernel.vm import madvise  # noqa: E402
from lazarus.lazy.server import LazyServer  # noqa: E402
from lazarus.lazy.sources import ImagePageSource  # noqa: E402


def _load_helpers():
    spec = importlib.util.spec_from_file_location("lazarus_tests_uffd_helpers", ROOT / "tests" / "test_uffd.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load_helpers()
P = T.P


def lat_line(h) -> tuple[float, float]:
    (line,) = h.info("LAT")
    _, _, _n, med, p99 = line.split()
    return int(med) / 1000, int(p99) / 1000


def raw_faults(helper_bin, work, pf, npages) -> tuple[float, float]:
    h = T.Helper(helper_bin, work, npages, 0, 7, "lat")
    try:
        u = h.take_uffd()
        base = pf.address(0)
        poller = select.poll()
        poller.register(u.fd, select.POLLIN)
        h.go()
        deadline = time.monotonic() + 60
        while h.proc.poll() is None and time.monotonic() < deadline:
            if not poller.poll(100):
                continue
            for ev in u.read_events():
                if isinstance(ev, PageFault):
                    a = ev.address & ~(P - 1)
                    u.copy(a, base + (a - h.addr), P)
        h.wait(10)
        assert h.result() == "PASS", h.text()
        u.close()
        return lat_line(h)
    finally:
        h.kill()


def server_faults(helper_bin, work, pf, npages, batch=1) -> tuple[tuple[float, float], dict, float]:
    h = T.Helper(helper_bin, work, npages, 0, 7, "lat")
    try:
        srv = LazyServer(background=False, fault_batch=batch)
        srv.add_process(h.pid, h.take_uffd(), ImagePageSource(h.vmas(), pf))
        t0 = time.perf_counter()
        h.go()
        stats = srv.run(timeout=120)
        srv.close()
        h.wait(10)
        elapsed = time.perf_counter() - t0
        assert h.result() == "PASS", h.text()
        return lat_line(h), stats["fault_latency_us"], elapsed
    finally:
        h.kill()


def raw_copy_rate(helper_bin, work, pf, npages, chunk=2 << 20) -> float:
    h = T.Helper(helper_bin, work, npages, 0, 7, "idle")
    try:
        u = h.take_uffd()
        base = pf.address(0)
        total = npages * P
        t0 = time.perf_counter_ns()
        off = 0
        while off < total:
            n = min(chunk, total - off)
            done, out = u.copy(h.addr + off, base + off, n)
            assert out is Outcome.DONE, out
            off += n
        dt = time.perf_counter_ns() - t0
        u.close()
        h.go()
        h.wait(30)
        assert h.result() == "PASS", h.text()
        return total / dt
    finally:
        h.kill()


def server_copy_rate(helper_bin, work, pf, npages, verify=True, drop=True) -> tuple[float, float]:
    """drop=False: served pages stay in the server's mapping of the page file (as before they were dropped
    every ImagePageSource.DROP_BYTES, to keep its RSS flat): what dropping them costs."""
    h = T.Helper(helper_bin, work, npages, 0, 7, "idle")
    saved = ImagePageSource.DROP_BYTES
    if not drop:
        ImagePageSource.DROP_BYTES = 1 << 62
    # each server run starts from the page file mapped but not populated, as a fresh lazy-pages daemon has it
    madvise(pf.address(0), npages * P, MADV_DONTNEED)
    try:
        srv = LazyServer(background=True)
        srv.add_process(h.pid, h.take_uffd(), ImagePageSource(h.vmas(), pf, verify=verify))
        t0 = time.perf_counter_ns()
        stats = srv.run(timeout=120)
        dt = time.perf_counter_ns() - t0
        srv.close()
        h.go()
        h.wait(30)
        assert h.result() == "PASS", h.text()
        return npages * P / dt, stats["background_rate_gbps"]
    finally:
        ImagePageSource.DROP_BYTES = saved
        h.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="memory size for the transfer rates")
    ap.add_argument("--faults", type=int, default=3000, help="pages touched for the fault round trips")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uffd-rates-") as d:
        work = Path(d)
        helper_bin = T.build_helper(work / "bin")
        big = a.mib * 256
        path = work / "pages.img"
        T.write_page_file(path, big, 0, 7)
        pf = T.StandInPageFile(path)
        # warm up: the first touch of guest memory is slow on this VM
        raw_copy_rate(helper_bin, work, pf, big)
        server_copy_rate(helper_bin, work, pf, big)
        raw_faults(helper_bin, work, pf, min(a.faults, big))

        rf, sf, sl, raw_rate, srv_rate, srv_rate_nv, srv_bg = [], [], [], [], [], [], []
        fault_ratio, fault_ratio99, on_ratio, off_ratio = [], [], [], []
        srv_rate_keep, drop_ratio = [], []
        for _ in range(a.rounds):
            # each round is paired: server figures are divided by raw figures of the same round (raw taken
            # before and after), which cancels most of the drift of a shared machine
            r1 = raw_faults(helper_bin, work, pf, a.faults)
            lat, own, _ = server_faults(helper_bin, work, pf, a.faults)
            r2 = raw_faults(helper_bin, work, pf, a.faults)
            rf += [r1, r2]
            sf.append(lat)
            sl.append((own["median"], own["p99"]))
            fault_ratio.append(lat[0] / ((r1[0] + r2[0]) / 2))
            fault_ratio99.append(lat[1] / ((r1[1] + r2[1]) / 2))
            c1 = raw_copy_rate(helper_bin, work, pf, big)
            on, bg = server_copy_rate(helper_bin, work, pf, big)
            off = server_copy_rate(helper_bin, work, pf, big, verify=False)[0]
            keep = server_copy_rate(helper_bin, work, pf, big, drop=False)[0]
            srv_rate_keep.append(keep)
            drop_ratio.append(on / keep)
            c2 = raw_copy_rate(helper_bin, work, pf, big)
            raw_rate += [c1, c2]
            srv_rate.append(on)
            srv_bg.append(bg)
            srv_rate_nv.append(off)
            on_ratio.append(on / ((c1 + c2) / 2))
            off_ratio.append(off / ((c1 + c2) / 2))
        batches = {}
        for b in (1, 4, 16, 64):
            batches[b] = statistics.median(server_faults(helper_bin, work, pf, a.faults, b)[2]
                                           for _ in range(a.rounds))

        def med(xs, i=None):
            return statistics.median(x[i] for x in xs) if i is not None else statistics.median(xs)

        print(f"fault round trip, seen by the faulting process ({a.faults} faults, medians of {a.rounds} rounds):")
        print(f"  raw handler (poll+read+copy):  median {med(rf, 0):7.1f} us   p99 {med(rf, 1):7.1f} us")
        print(f"  LazyServer (fault_batch=1):    median {med(sf, 0):7.1f} us   p99 {med(sf, 1):7.1f} us")
        print(f"  LazyServer own (read->copy):   median {med(sl, 0):7.1f} us   p99 {med(sl, 1):7.1f} us")
        print(f"  ratio server/raw (paired):     median {med(fault_ratio):7.2f}      p99 {med(fault_ratio99):7.2f}"
              "   (target <= 1.2)")
        print(f"background transfer, {a.mib} MiB:")
        print(f"  raw UFFDIO_COPY 2 MiB:         {med(raw_rate):6.2f} GB/s")
        print(f"  LazyServer (checksums on):     {med(srv_rate):6.2f} GB/s end to end "
              f"({med(srv_bg):.2f} GB/s in its background steps)")
        print(f"  LazyServer (checksums off):    {med(srv_rate_nv):6.2f} GB/s")
        print(f"  LazyServer (checksums on, served pages kept mapped): {med(srv_rate_keep):6.2f} GB/s; dropping "
              f"them every {ImagePageSource.DROP_BYTES >> 20} MiB: {med(drop_ratio):.2f} of that (paired)")
        print(f"  ratio server/raw (paired):     {med(on_ratio):6.2f} (checksums on), {med(off_ratio):.2f} (off)"
              "   (target >= 0.9)")
        print(f"reading {a.faults} pages in order, faults only, by fault_batch:")
        for b, t in batches.items():
            print(f"  fault_batch={b:<3d} {t * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
