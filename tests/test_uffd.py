"""Real-kernel tests of lazarus.kernel.uffd, pidfd and vm, and the test-time C helper shared with
tests/test_lazy_server.py and benchmarks/uffd_rates.py (build_helper, Helper, StandInPageFile, write_page_file).

The helper (C, built with gcc at test time) maps anonymous memory, registers it on a userfaultfd it creates in
itself, sends us that uffd over a unix socket, waits for SIGUSR2, then exercises the memory (see HELPER_C).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import xxhash

from lazarus.errors import FeatureMissing, ImageError, KernelError, NoSuchTask
from lazarus.kernel import abi, vm
from lazarus.kernel.pidfd import PidFd, pidfd_open
from lazarus.kernel.syscall import buffer_address
from lazarus.kernel.uffd import (
    CopyHelper,
    Fork,
    Outcome,
    PageFault,
    Remap,
    Remove,
    Uffd,
    Unmap,
    decode_events,
    fdinfo_features,
    parse_uffd_fdinfo,
)

P = abi.PAGE_SIZE
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (userfaultfd events, pidfd_getfd)")
TARGETS = Path(__file__).resolve().parent / "targets"

HELPER_C = r"""
/*
 * uffd_helper - the faulting side of the lazy-server tests (built by tests/test_uffd.py at test time).
 *
 *   uffd_helper LOGFILE SOCKPATH NPAGES HOLE_EVERY SEED SCENARIO [DELAY_US]
 *
 * Maps NPAGES of anonymous memory, creates a userfaultfd in itself (EVENT_FORK|REMAP|REMOVE|UNMAP|THREAD_ID),
 * registers the region for missing faults, sends the uffd over SOCKPATH (SCM_RIGHTS, with the line
 * "ADDR NPAGES DEST\n") and closes its own copy. Logs READY, waits for SIGUSR2, runs SCENARIO, then logs PASS
 * or FAIL: ... (tests/targets/common.h protocol).
 *
 * Expected contents: page p holds 512 u64 words equal to (SEED << 32 | p), except "holes" (p % HOLE_EVERY ==
 * HOLE_EVERY - 1 when HOLE_EVERY > 0) which are not in the image and must read as zeros.
 *
 * Scenarios (all on memory never touched before): read, rread (pseudo-random order), idle (touch nothing
 * until SIGUSR2, then verify), fork, mremap, dontneed, munmap, mprotect (split the vma, then read), events
 * (do the operations, verify nothing), lat (read in order, timing each first touch; logs
 * "# LAT n median_ns p99_ns").
 */
#include "common.h"

#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static char *region;
static char *dest;
static unsigned long npages, hole_every;
static uint64_t seed;
static long delay_us;

static int is_hole(unsigned long p)
{
    return hole_every && p % hole_every == hole_every - 1;
}

static uint64_t val(unsigned long p)
{
    return seed << 32 | p;
}

/* Check page at addr holds page p's data (or zeros if want_zero); first failure per call is recorded. */
static int check_page(const char *addr, unsigned long p, int want_zero, const char *what)
{
    const volatile uint64_t *w = (const volatile uint64_t *)addr;
    uint64_t want = want_zero ? 0 : val(p);
    unsigned i;

    for (i = 0; i < LAZ_PAGE / 8; i++) {
        uint64_t got = w[i];
        if (got != want) {
            laz_failf("%s: page %lu word %u: %#llx, want %#llx", what, p, i, (unsigned long long)got,
                  (unsigned long long)want);
            return -1;
        }
    }
    return 0;
}

static void check_range(const char *base, unsigned long first, unsigned long n, int zero, const char *what)
{
    unsigned long p;

    for (p = first; p < first + n && laz_nfail < 5; p++) {
        if (check_page(base + (p - first) * LAZ_PAGE, p, zero || is_hole(p), what))
            break;
        if (delay_us)
            usleep(delay_us);
    }
}

static void send_uffd(const char *sockpath, int uffd)
{
    char line[128];

    snprintf(line, sizeof(line), "%lu %lu %lu\n", (unsigned long)region, npages, (unsigned long)dest);
    if (laz_send_fds(sockpath, line, &uffd, 1))
        laz_die("sending the uffd to %s", sockpath);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void scenario_lat(void)
{
    uint64_t *lat = calloc(npages, sizeof(*lat));
    unsigned long p, n = 0;
    struct timespec a, b;

    for (p = 0; p < npages; p++) {
        volatile char *addr = region + p * LAZ_PAGE;
        clock_gettime(CLOCK_MONOTONIC, &a);
        (void)*addr;
        clock_gettime(CLOCK_MONOTONIC, &b);
        lat[n++] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)(b.tv_nsec - a.tv_nsec);
    }
    check_range(region, 0, npages, 0, "lat");
    qsort(lat, n, sizeof(*lat), cmp_u64);
    laz_log("# LAT %lu %llu %llu", n, (unsigned long long)lat[n / 2], (unsigned long long)lat[(n * 99) / 100]);
    free(lat);
}

static void scenario_rread(void)
{
    unsigned long i, p;
    /* visit every page once in a scrambled order: a full-period LCG over the next power of two,
     * skipping indexes >= npages */
    unsigned long m = 1;

    while (m < npages)
        m <<= 1;
    p = 0;
    for (i = 0; i < m && laz_nfail < 5; i++) {
        p = (p * 5 + 3) & (m - 1);
        if (p < npages)
            check_page(region + p * LAZ_PAGE, p, is_hole(p), "rread");
    }
}

static int wait_child(pid_t pid, const char *who)
{
    int st, i;

    for (i = 0; i < 10000; i++) { /* bounded: 10 s */
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(1000);
    }
    laz_failf("%s: child %d did not exit", who, pid);
    kill(pid, SIGKILL);
    return -1;
}

static void scenario_fork(void)
{
    unsigned long q = npages / 4, p;
    int c2p[2], p2c[2];
    char b = 0;
    pid_t pid;
    uint64_t *w;

    /* parent takes the first quarter in and modifies page 1 before forking */
    check_range(region, 0, q, 0, "fork: before");
    w = (uint64_t *)(region + 1 * LAZ_PAGE);
    w[0] = 0xdead0001;
    if (pipe(c2p) || pipe(p2c))
        laz_die("pipe");
    pid = fork();
    if (pid < 0)
        laz_die("fork");
    if (pid == 0) {
        int bad = 0;
        uint64_t *w2 = (uint64_t *)(region + 2 * LAZ_PAGE + q * LAZ_PAGE);

        if (((uint64_t *)(region + LAZ_PAGE))[0] != 0xdead0001)
            bad |= 1;
        /* child writes a page never touched (q+2), then tells the parent */
        w2[1] = 0xc41d;
        if (write(c2p[1], "c", 1) != 1 || read(p2c[0], &b, 1) != 1)
            bad |= 2;
        /* the parent wrote page q+3 after our fork: we must see the image data there */
        for (p = q; p < npages; p++) {
            const uint64_t *pw = (const uint64_t *)(region + p * LAZ_PAGE);
            uint64_t want = is_hole(p) ? 0 : val(p);
            unsigned i;
            for (i = 0; i < 512; i++) {
                uint64_t exp = want;
                if (p == q + 2 && i == 1)
                    exp = 0xc41d;
                if (pw[i] != exp) {
                    bad |= 4;
                    break;
                }
            }
        }
        _exit(bad);
    }
    if (read(c2p[0], &b, 1) != 1)
        laz_failf("fork: child sync");
    ((uint64_t *)(region + (q + 3) * LAZ_PAGE))[1] = 0x9a7e;
    if (write(p2c[1], "p", 1) != 1)
        laz_failf("fork: parent sync");
    {
        int rc = wait_child(pid, "fork");
        if (rc)
            laz_failf("fork: child reported %d (1: pre-fork write, 2: sync, 4: data)", rc);
    }
    /* parent: page q+2 must not show the child's write, q+3 has ours */
    for (p = q; p < npages && laz_nfail < 5; p++) {
        const uint64_t *pw = (const uint64_t *)(region + p * LAZ_PAGE);
        uint64_t want = is_hole(p) ? 0 : val(p);
        unsigned i;
        for (i = 0; i < 512; i++) {
            uint64_t exp = (p == q + 3 && i == 1) ? 0x9a7e : want;
            if (pw[i] != exp) {
                laz_failf("fork: parent page %lu word %u: %#llx want %#llx", p, i,
                      (unsigned long long)pw[i], (unsigned long long)exp);
                break;
            }
        }
    }
    laz_log("# CHILD %d", pid);
}

static void scenario_mremap(void)
{
    unsigned long q = npages / 4;
    char *old = region + q * LAZ_PAGE;
    void *r = mremap(old, q * LAZ_PAGE, q * LAZ_PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest);

    if (r != dest)
        laz_die("mremap");
    check_range(dest, q, q, 0, "mremap: moved");
    check_range(region, 0, q, 0, "mremap: before");
    check_range(region + 2 * q * LAZ_PAGE, 2 * q, npages - 2 * q, 0, "mremap: after");
}

static void scenario_dontneed(void)
{
    unsigned long q = npages / 4;

    if (madvise(region + q * LAZ_PAGE, q * LAZ_PAGE, MADV_DONTNEED))
        laz_die("madvise");
    check_range(region + q * LAZ_PAGE, q, q, 1, "dontneed: dropped");
    check_range(region, 0, q, 0, "dontneed: before");
    check_range(region + 2 * q * LAZ_PAGE, 2 * q, npages - 2 * q, 0, "dontneed: after");
}

static void scenario_munmap(void)
{
    unsigned long q = npages / 4;
    char *hole = region + q * LAZ_PAGE;

    if (munmap(hole, q * LAZ_PAGE))
        laz_die("munmap");
    usleep(20000); /* give a confused server time to copy something into a new mapping there */
    if (mmap(hole, q * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != hole)
        laz_die("mmap hole");
    check_range(hole, q, q, 1, "munmap: hole");
    check_range(region, 0, q, 0, "munmap: before");
    check_range(region + 2 * q * LAZ_PAGE, 2 * q, npages - 2 * q, 0, "munmap: after");
}

static void scenario_mprotect(void)
{
    unsigned long q = npages / 4;

    /* split the registered vma in three, at boundaries no aligned fault window respects: copies across
     * them must be cut (ENOENT otherwise) */
    if (mprotect(region + (q + 3) * LAZ_PAGE, (q + 2) * LAZ_PAGE, PROT_READ))
        laz_die("mprotect");
    check_range(region, 0, npages, 0, "mprotect");
}

static void scenario_events(void)
{
    unsigned long q = npages / 4;
    pid_t pid;

    if (madvise(region, q * LAZ_PAGE, MADV_DONTNEED))
        laz_die("madvise");
    if (mremap(region + q * LAZ_PAGE, q * LAZ_PAGE, q * LAZ_PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest) != dest)
        laz_die("mremap");
    if (munmap(region + 2 * q * LAZ_PAGE, q * LAZ_PAGE))
        laz_die("munmap");
    pid = fork();
    if (pid == 0)
        _exit(0);
    if (pid < 0)
        laz_die("fork");
    wait_child(pid, "events");
    laz_log("# CHILD %d", pid);
}

int main(int argc, char **argv)
{
    struct uffdio_api api = { .api = UFFD_API };
    struct uffdio_register reg = { 0 };
    const char *scenario;
    int uffd;

    laz_init(argc, argv);
    if (argc < 7)
        laz_die("usage");
    npages = strtoul(argv[3], NULL, 0);
    hole_every = strtoul(argv[4], NULL, 0);
    seed = strtoull(argv[5], NULL, 0);
    scenario = argv[6];
    delay_us = argc > 7 ? strtol(argv[7], NULL, 0) : 0;

    region = mmap(NULL, npages * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    dest = mmap(NULL, npages * LAZ_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED || dest == MAP_FAILED)
        laz_die("mmap");
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        laz_die("userfaultfd");
    api.features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
               UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID;
    if (ioctl(uffd, UFFDIO_API, &api))
        laz_die("UFFDIO_API");
    reg.range.start = (unsigned long)region;
    reg.range.len = npages * LAZ_PAGE;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        laz_die("UFFDIO_REGISTER");
    send_uffd(argv[2], uffd);
    close(uffd);
    laz_ready("none");
    laz_wait_usr2();

    if (!strcmp(scenario, "read"))
        check_range(region, 0, npages, 0, "read");
    else if (!strcmp(scenario, "rread"))
        scenario_rread();
    else if (!strcmp(scenario, "idle"))
        check_range(region, 0, npages, 0, "idle");
    else if (!strcmp(scenario, "lat"))
        scenario_lat();
    else if (!strcmp(scenario, "fork"))
        scenario_fork();
    else if (!strcmp(scenario, "mremap"))
        scenario_mremap();
    else if (!strcmp(scenario, "dontneed"))
        scenario_dontneed();
    else if (!strcmp(scenario, "munmap"))
        scenario_munmap();
    else if (!strcmp(scenario, "mprotect"))
        scenario_mprotect();
    else if (!strcmp(scenario, "events"))
        scenario_events();
    else
        laz_die("unknown scenario %s", scenario);
    laz_finish();
}
"""


# ---------------------------------------------------------------------------------------------
# helper plumbing (also imported by tests/test_lazy_server.py and benchmarks/uffd_rates.py)


def build_helper(outdir: Path) -> Path:
    """Compile HELPER_C into outdir/uffd_helper (gcc; includes tests/targets/common.h)."""
    outdir.mkdir(parents=True, exist_ok=True)
    src = outdir / "uffd_helper.c"
    src.write_text(HELPER_C)
    binary = outdir / "uffd_helper"
    subprocess.run(["gcc", "-O2", "-Wall", "-I", str(TARGETS), "-o", str(binary), str(src)], check=True,
                   timeout=120)
    return binary


def page_value(seed: int, p: int) -> int:
    return (seed << 32) | p


def is_hole(p: int, hole_every: int) -> bool:
    return bool(hole_every) and p % hole_every == hole_every - 1


def write_page_file(path: Path, npages: int, hole_every: int, seed: int) -> int:
    """The image pages of the helper's region: every non-hole page p, in order. Returns file pages."""
    n = 0
    with open(path, "wb") as f:
        buf = []
        for p in range(npages):
            if is_hole(p, hole_every):
                continue
            buf.append(struct.pack("<Q", page_value(seed, p)) * (P // 8))
            n += 1
            if len(buf) >= 1024:
                f.write(b"".join(buf))
                buf = []
        f.write(b"".join(buf))
    return n


def image_vmas(addr: int, npages: int, hole_every: int) -> list[dict]:
    """The lazy vma of the helper's region in image form: "pages": [[vaddr, npages, file_page_index], ...]."""
    runs = []
    fidx = 0
    p = 0
    while p < npages:
        if is_hole(p, hole_every):
            p += 1
            continue
        q = p
        while q < npages and not is_hole(q, hole_every):
            q += 1
        runs.append([addr + p * P, q - p, fidx])
        fidx += q - p
        p = q
    return [{"start": addr, "end": addr + npages * P, "pages": runs}]


class StandInPageFile:
    """Stand-in for lazarus.images.PageFile: the page file mapped MAP_PRIVATE, PROT_READ|PROT_WRITE (never
    written), address() for UFFDIO_COPY, verify_chunk_for() against xxh3 sums taken at construction."""

    CHUNK = 65536

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.name = path.name
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._mm = mmap.mmap(self._fd, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = buffer_address(self._mm)
        self._verify = verify
        mv = memoryview(self._mm)
        self._sums = [xxhash.xxh3_64_intdigest(mv[o:o + self.CHUNK]) for o in range(0, self.size, self.CHUNK)]
        mv.release()
        self.verified = 0
        # one byte per chunk, set by chunk_matches: the verify-ahead process is a fork, so it is shared memory
        self._ahead = mmap.mmap(-1, max(1, len(self._sums)), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._inline = bytearray(len(self._sums))

    def address(self, i: int) -> int:
        if not 0 <= i < self.size // P:
            raise ImageError(f"{self.name}: page {i} beyond end of file")
        return self._base + i * P

    def verify_chunk_for(self, i: int) -> None:
        if not self._verify:
            return
        chunk = i * P // self.CHUNK
        start = chunk * self.CHUNK
        end = min(start + self.CHUNK, self.size)
        # never touch the mapping past the current end of the file (SIGBUS): check the size first
        if os.fstat(self._fd).st_size < end:
            raise ImageError(f"{self.name}: truncated (chunk {chunk} needs {end} bytes)")
        mv = memoryview(self._mm)
        try:
            if xxhash.xxh3_64_intdigest(mv[start:end]) != self._sums[chunk]:
                raise ImageError(f"{self.name}: checksum mismatch in chunk {chunk}")
        finally:
            mv.release()
        self.verified += 1
        self._inline[chunk] = 1

    def check_size(self) -> None:
        """As images.PageFile.check_size: ImageError if the file is shorter now than when it was mapped."""
        now = os.fstat(self._fd).st_size
        if now < self.size:
            raise ImageError(f"{self.name}: truncated to {now} bytes while in use, expected {self.size}")

    @property
    def nchunks(self) -> int:
        return len(self._sums)

    def chunk_matches(self, chunk: int) -> bool:
        """For the verify-ahead process (lazy/sources.AheadVerifier), as images.PageFile has it."""
        start = chunk * self.CHUNK
        mv = memoryview(self._mm)
        try:
            ok = xxhash.xxh3_64_intdigest(mv[start:start + self.CHUNK]) == self._sums[chunk]
        finally:
            mv.release()
        if ok:
            self._ahead[chunk] = 1
        return ok

    def ahead_checked_chunks(self) -> int:
        """How many chunks a verify-ahead process found good (counted here, not by the code under test)."""
        return sum(self._ahead[: self.nchunks])

    def unchecked_chunks(self) -> list[int]:
        """Chunks checked neither inline nor ahead."""
        return [c for c in range(self.nchunks) if not self._inline[c] and not self._ahead[c]]


class Helper:
    """One running helper process with its uffd received over a unix socket."""

    _n = 0

    def __init__(self, binary: Path, workdir: Path, npages: int, hole_every: int, seed: int, scenario: str,
                 delay_us: int = 0) -> None:
        Helper._n += 1
        self.npages, self.hole_every, self.seed, self.scenario = npages, hole_every, seed, scenario
        self.log = workdir / f"helper-{Helper._n}-{scenario}.log"
        sock_path = workdir / f"h{Helper._n}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(sock_path))
        lsock.listen(1)
        lsock.settimeout(10)
        self.proc = subprocess.Popen(
            [str(binary), str(self.log), str(sock_path), str(npages), str(hole_every), str(seed), scenario,
             str(delay_us)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.uffd_fd = -1
        try:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 256, 1)
            if not fds:
                raise AssertionError(f"helper sent no uffd: {msg!r} {self.text()}")
            self.uffd_fd = fds[0]
            addr, n, dest = (int(x) for x in msg.split())
            self.addr, self.dest = addr, dest
            assert n == npages
            self._wait_line("READY", 10)
        except BaseException:
            self.kill()
            raise
        finally:
            lsock.close()
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()

    def take_uffd(self) -> Uffd:
        fd, self.uffd_fd = self.uffd_fd, -1
        return Uffd.adopt(fd)

    def vmas(self) -> list[dict]:
        return image_vmas(self.addr, self.npages, self.hole_every)

    def text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def _wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None and prefix not in self.text():
                break
            time.sleep(0.005)
        raise AssertionError(f"helper: no {prefix!r} line: {self.text()!r}")

    def go(self) -> None:
        os.kill(self.pid, signal.SIGUSR2)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def result(self) -> str:
        lines = [ln for ln in self.text().splitlines() if ln.startswith(("PASS", "FAIL"))]
        return lines[-1] if lines else ""

    def info(self, tag: str) -> list[str]:
        return [ln for ln in self.text().splitlines() if ln.startswith(f"# {tag} ")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.uffd_fd >= 0:
            os.close(self.uffd_fd)
            self.uffd_fd = -1


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def helper_bin(tmp_path_factory) -> Path:
    return build_helper(tmp_path_factory.mktemp("uffd-helper"))


@pytest.fixture
def helpers(helper_bin, tmp_path):
    """Factory of Helper processes; every one is killed at the end of the test."""
    made: list[Helper] = []

    def make(npages: int = 64, hole_every: int = 0, seed: int = 7, scenario: str = "read",
             delay_us: int = 0) -> Helper:
        h = Helper(helper_bin, tmp_path, npages, hole_every, seed, scenario, delay_us)
        made.append(h)
        return h

    yield make
    for h in made:
        h.kill()


@pytest.fixture
def page_file(tmp_path):
    def make(npages: int, hole_every: int = 0, seed: int = 7, *, verify: bool = True) -> StandInPageFile:
        path = tmp_path / f"pages-{npages}-{hole_every}-{seed}.img"
        write_page_file(path, npages, hole_every, seed)
        return StandInPageFile(path, verify=verify)

    return make


# ---------------------------------------------------------------------------------------------
# decoding and fdinfo (no kernel needed)


def test_decode_events_matches_abi_layout():
    msgs = []
    m = abi.uffd_msg()
    m.event = abi.UFFD_EVENT_PAGEFAULT
    m.arg.pagefault.flags = abi.UFFD_PAGEFAULT_FLAG_WRITE
    m.arg.pagefault.address = 0x7F0000001000
    m.arg.pagefault.ptid = 4242
    msgs.append(bytes(m))
    m = abi.uffd_msg()
    m.event = abi.UFFD_EVENT_FORK
    m.arg.fork.ufd = 17
    msgs.append(bytes(m))
    m = abi.uffd_msg()
    m.event = abi.UFFD_EVENT_REMAP
    m.arg.remap.from_, m.arg.remap.to, m.arg.remap.len = 0x1000, 0x9000, 0x3000
    msgs.append(bytes(m))
    m = abi.uffd_msg()
    m.event = abi.UFFD_EVENT_REMOVE
    m.arg.remove.start, m.arg.remove.end = 0x2000, 0x5000
    msgs.append(bytes(m))
    m = abi.uffd_msg()
    m.event = abi.UFFD_EVENT_UNMAP
    m.arg.remove.start, m.arg.remove.end = 0x6000, 0x8000
    msgs.append(bytes(m))
    evs = decode_events(b"".join(msgs))
    assert evs == [PageFault(0x7F0000001000, abi.UFFD_PAGEFAULT_FLAG_WRITE, 4242), Fork(17),
                   Remap(0x1000, 0x9000, 0x3000), Remove(0x2000, 0x5000), Unmap(0x6000, 0x8000)]
    assert evs[0].write
    bad = bytearray(32)
    bad[0] = 0x77
    with pytest.raises(KernelError):
        decode_events(bytes(bad))


def test_fill_arg_layouts_match_abi():
    from lazarus.kernel import uffd as U

    assert U._COPY_ARG.size == abi.STRUCT_SIZES["uffdio_copy"]
    assert U._ZERO_ARG.size == abi.STRUCT_SIZES["uffdio_zeropage"]
    assert abi.uffdio_copy.copy.offset == 32 and abi.uffdio_zeropage.zeropage.offset == 24


def test_parse_uffd_fdinfo():
    text = (Path(__file__).parent / "unit" / "fixtures" / "fdinfo_uffd.txt").read_text()
    info = parse_uffd_fdinfo(text)
    assert info is not None
    assert info.features == 0x42 and info.initialized and info.api == 0xAA
    assert parse_uffd_fdinfo("pos:\t0\nflags:\t02\n") is None


# ---------------------------------------------------------------------------------------------
# local uffd


@needs_root
def test_create_reports_enabled_features_and_missing_ones():
    want = (abi.UFFD_FEATURE_EVENT_FORK | abi.UFFD_FEATURE_EVENT_REMAP | abi.UFFD_FEATURE_EVENT_REMOVE
            | abi.UFFD_FEATURE_EVENT_UNMAP)
    with Uffd.create(want) as u:
        assert u.features == want  # the enabled set (fdinfo), not everything the kernel supports
        assert fdinfo_features(os.getpid(), u.fd) == want
        with pytest.raises(KernelError) as ei:
            u.api(0)  # a second handshake is refused
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(FeatureMissing, match="0x40000000"):
        Uffd.create(1 << 30)
    u = Uffd.create(0, user_mode_only=True)
    u.close()
    u.close()
    assert u.closed


@needs_root
def test_local_copy_outcomes():
    """EEXIST, partial EAGAIN, ENOENT are outcomes; contents land where asked. Only present pages are read."""
    npages = 16
    region = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    other = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = bytearray(b"".join(struct.pack("<Q", 0x1000 + i) * (P // 8) for i in range(npages)))
    base, sbase = buffer_address(region), buffer_address(src)
    with Uffd.create(abi.UFFD_FEATURE_EVENT_REMOVE) as u:
        ioctls = u.register(base, npages * P)
        assert ioctls & (1 << 0x03) and ioctls & (1 << 0x04)  # COPY and ZEROPAGE allowed
        assert u.copy(base + 3 * P, sbase + 3 * P, P) == (P, Outcome.DONE)
        assert u.copy(base + 3 * P, sbase + 3 * P, P) == (0, Outcome.EXISTS)
        assert u.copy(base + 2 * P, sbase + 2 * P, 4 * P) == (P, Outcome.PARTIAL)  # stops at page 3
        assert u.copy(base + 4 * P, sbase + 4 * P, 2 * P) == (2 * P, Outcome.DONE)
        assert u.zeropage(base + 8 * P, 2 * P) == (2 * P, Outcome.DONE)
        assert u.zeropage(base + 8 * P, P) == (0, Outcome.EXISTS)
        assert u.copy(buffer_address(other), sbase, P) == (0, Outcome.NOENT)  # not registered
        assert u.read_events() == []
        for i in (2, 3, 4, 5):
            assert region[i * P:(i + 1) * P] == src[i * P:(i + 1) * P]
        assert region[8 * P:10 * P] == bytes(2 * P)
        u.wake(base, npages * P)
        u.unregister(base, npages * P)
    region.close()
    other.close()


def test_copy_helper_runs_copies_beside_ours():
    """The helper thread fills its range while we fill ours; outcomes and errors come back as Uffd.copy's."""
    npages = 64
    region = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = bytearray(b"".join(struct.pack("<Q", 0x5000 + i) * (P // 8) for i in range(npages)))
    base, sbase = buffer_address(region), buffer_address(src)
    half = npages // 2 * P
    with Uffd.create() as u, CopyHelper() as helper:
        u.register(base, npages * P)
        helper.start(u, base + half, sbase + half, half)
        assert helper.busy
        with pytest.raises(RuntimeError):
            helper.start(u, base, sbase, P)  # one copy at a time
        assert u.copy(base, sbase, half) == (half, Outcome.DONE)
        assert helper.result() == (half, Outcome.DONE)
        assert not helper.busy
        assert region[:] == src
        helper.start(u, base + P, sbase, P)
        assert helper.result() == (0, Outcome.EXISTS)
        u.unregister(base, npages * P)
        region.madvise(mmap.MADV_DONTNEED)
        u.register(base, npages * P)
        helper.start(u, base, 0x1000, P)  # an unreadable source is an error, raised by result()
        with pytest.raises(KernelError) as ei:
            helper.result()
        assert ei.value.errno == errno.EFAULT
        with pytest.raises(RuntimeError):
            helper.result()  # nothing started
        u.unregister(base, npages * P)
    assert not helper._thread.is_alive()
    region.close()


def test_copy_all_fills_every_run_from_two_threads(monkeypatch):
    """The eager fill (restore/uffd.copy_all): many steps shared by us and the helper thread, across vmas and
    runs, and pages already present (the copy stops at them and goes on after them)."""
    from lazarus.restore import uffd as ruffd

    monkeypatch.setattr(ruffd, "STEP", 4 * P)  # many steps, so the two threads share the work
    npages = 96
    region = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = bytearray(b"".join(struct.pack("<Q", 0x7000 + i) * (P // 8) for i in range(npages)))
    base, sbase = buffer_address(region), buffer_address(src)

    class Pages:  # the page file: file page i at src + i pages
        def address(self, idx: int) -> int:
            return sbase + idx * P

    # file page i is meant for region page i; the second vma has two runs
    vmas = [
        {"kind": "anon", "shared": False, "pages": [[base, 40, 0]]},
        {"kind": "anon", "shared": False, "pages": [[base + 48 * P, 30, 48], [base + 80 * P, 16, 80]]},
        {"kind": "file", "shared": False, "pages": [[base + 40 * P, 8, 40]]},  # not uffd's: skipped
    ]
    with Uffd.create() as u:
        u.register(base, npages * P)
        # already present: page 10 (mid-step, ours), 13 (mid-step, the helper's) and 48-49 (a run's first step)
        assert u.copy(base + 10 * P, sbase + 10 * P, P) == (P, Outcome.DONE)
        assert u.copy(base + 13 * P, sbase + 13 * P, P) == (P, Outcome.DONE)
        assert u.copy(base + 48 * P, sbase + 48 * P, 2 * P) == (2 * P, Outcome.DONE)
        assert ruffd.copy_all(u, vmas, Pages()) == 40 + 30 + 16
        unsaved = set(range(40, 48)) | {78, 79}  # the skipped vma, and the gap between the two runs
        for i in range(npages):
            # a present page is EEXIST to a copy (reading a missing one here would wait forever)
            if i in unsaved:
                assert u.copy(base + i * P, sbase, P) == (P, Outcome.DONE), f"page {i} was filled"
            else:
                assert u.copy(base + i * P, sbase, P) == (0, Outcome.EXISTS), f"page {i} is missing"
                assert region[i * P:(i + 1) * P] == src[i * P:(i + 1) * P], f"page {i}"
        u.unregister(base, npages * P)
    region.close()


# ---------------------------------------------------------------------------------------------
# a real foreign process


@needs_root
def test_raw_fault_serving(helpers, page_file):
    """A minimal handler (poll, read, copy) serves a foreign process's faults: the Uffd layer alone works."""
    h = helpers(npages=64, hole_every=5, scenario="rread")
    pf = page_file(64, 5)
    u = h.take_uffd()
    pend = {}
    for run in h.vmas()[0]["pages"]:
        for k in range(run[1]):
            pend[run[0] + k * P] = run[2] + k
    h.go()
    faults = 0
    deadline = time.monotonic() + 20
    p = select.poll()
    p.register(u.fd, select.POLLIN)
    while h.proc.poll() is None and time.monotonic() < deadline:
        if not p.poll(50):
            continue
        for ev in u.read_events():
            assert isinstance(ev, PageFault), ev
            a = ev.address & ~(P - 1)
            assert ev.tid == h.pid  # THREAD_ID is on in the helper
            if a in pend:
                n, out = u.copy(a, pf.address(pend[a]), P)
            else:
                n, out = u.zeropage(a, P)
            assert out is Outcome.DONE, out
            faults += 1
    assert h.wait(10) == 0, h.text()
    assert h.result() == "PASS"
    assert faults == 64
    # the process is gone: expected outcomes, not exceptions
    assert u.copy(h.addr, pf.address(0), P)[1] is Outcome.GONE
    assert u.read_events() == []
    u.close()


@needs_root
def test_non_cooperative_events(helpers):
    """DONTNEED -> REMOVE, mremap -> REMAP then UNMAP of the old range, munmap -> UNMAP, fork -> FORK with a
    new uffd in our fd table."""
    h = helpers(npages=64, scenario="events")
    u = h.take_uffd()
    q = 16
    h.go()
    events = []
    deadline = time.monotonic() + 20
    p = select.poll()
    p.register(u.fd, select.POLLIN)
    while h.proc.poll() is None and time.monotonic() < deadline:
        if p.poll(50):
            events += u.read_events()
    assert h.wait(10) == 0, h.text()
    forks = [e for e in events if isinstance(e, Fork)]
    rest = [e for e in events if not isinstance(e, Fork)]
    a = h.addr
    assert rest == [Remove(a, a + q * P), Remap(a + q * P, h.dest, q * P), Unmap(a + q * P, a + 2 * q * P),
                    Unmap(a + 2 * q * P, a + 3 * q * P)], rest
    assert len(forks) == 1
    child = Uffd.adopt(forks[0].ufd)
    assert child.features == u.features
    assert child.features & abi.UFFD_FEATURE_EVENT_FORK
    # the child has exited: its uffd says so through outcomes
    assert child.zeropage(h.addr + 3 * q * P, P)[1] is Outcome.GONE
    child.close()
    u.close()


# ---------------------------------------------------------------------------------------------
# pidfd


@needs_root
def test_pidfd(helpers):
    h = helpers(npages=4, scenario="idle")
    with PidFd.open(h.pid) as pfd:
        assert not pfd.exited()
        fd = pfd.getfd(0)  # the helper's stdin (/dev/null)
        assert os.path.samestat(os.fstat(fd), os.stat("/dev/null"))
        os.close(fd)
        with pytest.raises(KernelError):
            pfd.getfd(999)
        assert pfd.kill()
        assert pfd.wait(10)
        assert pfd.exited()
        h.proc.wait(10)
        assert pfd.send_signal(0) is False
    with pytest.raises(NoSuchTask):
        pidfd_open(h.pid)


# ---------------------------------------------------------------------------------------------
# process_vm_readv / writev


def test_vm_many_iovecs_roundtrip():
    pid = os.getpid()
    n = 3000  # three batches of IOV_MAX
    src = bytearray(os.urandom(n * 24))
    dst = bytearray(len(src))
    sbase, dbase = buffer_address(src), buffer_address(dst)
    # remote: 3000 scattered 16-byte pieces of src (every other 24-byte slot, reversed), local: one buffer
    remote = [(sbase + i * 24, 16) for i in range(n)][::-1]
    assert vm.readv(pid, [(dbase, 16 * n)], remote) == 16 * n
    want = b"".join(bytes(src[i * 24:i * 24 + 16]) for i in range(n)[::-1])
    assert bytes(dst[:16 * n]) == want
    # both sides scattered with different boundaries
    dst2 = bytearray(16 * n)
    local = [(buffer_address(dst2) + i * 10, 10) for i in range(16 * n // 10)] + [(buffer_address(dst2) + (16 * n // 10) * 10, (16 * n) % 10)]
    local = [iv for iv in local if iv[1]]
    assert vm.readv(pid, local, remote) == 16 * n
    assert bytes(dst2) == want
    # write back somewhere else
    out = bytearray(16 * n)
    assert vm.writev(pid, [(dbase, 16 * n)], [(buffer_address(out) + i * 16, 16) for i in range(n)]) == 16 * n
    assert out == dst[:16 * n]
    assert vm.read(pid, sbase, 100) == bytes(src[:100])
    with pytest.raises(ValueError):
        vm.readv(pid, [(dbase, 10)], [(sbase, 11)])


def test_vm_partial_transfer_reports_where():
    pid = os.getpid()
    good = bytearray(b"x" * 3 * P)
    hole = mmap.mmap(-1, 2 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    haddr = buffer_address(hole)
    hole.close()  # now unmapped (nothing else maps there in a test process this quickly)
    dst = bytearray(4 * P)
    remote = [(buffer_address(good), 2 * P), (haddr, P), (buffer_address(good), P)]
    with pytest.raises(vm.PartialTransfer) as ei:
        vm.readv(pid, [(buffer_address(dst), 4 * P)], remote)
    assert ei.value.done == 2 * P and ei.value.remote_address == haddr
    assert vm.readv(pid, [(buffer_address(dst), 4 * P)], remote, strict=False) == 2 * P
    with pytest.raises(NoSuchTask):
        vm.read(2**22 + 12345, buffer_address(good), 8)


def test_helper_builds(helper_bin):
    assert helper_bin.exists()

