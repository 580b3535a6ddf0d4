/*
 * faulter.c - benchmark target for the fault round trip under lazy restore.
 *
 *   faulter LOGFILE MIB K                  stdin/stdout/stderr = /dev/null
 *   faulter LOGFILE MIB K raw SOCKPATH
 *
 * Holds MIB MiB of private anonymous memory filled as memhog.c fills it (every 64-bit word a
 * pseudo-random value of its index and a per-run seed). It picks K pages in K distinct, randomly chosen
 * 64 KiB windows of that memory (K <= MIB * 16), in random order, before it logs READY, so that a
 * lazy server filling the aligned 16-page window around a fault never brings in a page that is
 * touched later. Protocol (as the test targets):
 *
 *   - logs "# region ADDR LEN fill-seconds S" and "READY", then waits for SIGUSR2;
 *   - on SIGUSR2 reads one word of each of the K pages, timing each read alone with
 *     clock_gettime(CLOCK_MONOTONIC) before and after it, and logs "# LAT K median_ns p99_ns max_ns";
 *   - then checks every word of its memory and logs "PASS" (exit 0) or "FAIL: ..." (exit 1).
 *
 * Restored with `lazarus restore --lazy --no-background`, each of the K reads is the first touch of a
 * page nobody has filled: a real page fault served by the lazy server.
 *
 * raw mode (a kernel probe, not a restore): the memory is NOT filled. Instead the pattern goes into a
 * memfd, the region is registered for missing faults on a userfaultfd made here, and both descriptors
 * are sent over the unix socket SOCKPATH (SCM_RIGHTS [uffd, memfd], with the line "ADDR LEN\n") to a
 * minimal handler (benchmarks/lazy_restore.py) which serves each fault with UFFDIO_COPY from the memfd.
 * Same touches, same timing; afterwards only the K touched pages are checked (the rest was never
 * served), then PASS/FAIL as above.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WINDOW (64UL << 10)
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))

#include "bench.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* raw mode: a uffd registered on [mem, mem+len) and the memfd holding the data, sent to the handler. */
static int send_fds(const char *sockpath, void *mem, size_t len, int uffd, int memfd)
{
	char line[128];
	int fds[2] = { uffd, memfd };

	snprintf(line, sizeof(line), "%lu %zu\n", (unsigned long)mem, len);
	return laz_send_fds(sockpath, line, fds, 2);
}

static int setup_raw(const char *sockpath, uint64_t *mem, size_t len, uint64_t seed)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	uint64_t *src;
	size_t words = len / sizeof(uint64_t);
	int memfd, uffd;

	memfd = memfd_create("faulter-pages", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, (off_t)len)) {
		laz_log("FAIL: setup: memfd: %s", strerror(errno));
		return -1;
	}
	src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (src == MAP_FAILED) {
		laz_log("FAIL: setup: mmap memfd: %s", strerror(errno));
		return -1;
	}
	fill_words(src, words, seed);
	munmap(src, len);
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
		laz_log("FAIL: setup: userfaultfd: %s", strerror(errno));
		return -1;
	}
	memset(&reg, 0, sizeof(reg));
	reg.range.start = (unsigned long)mem;
	reg.range.len = len;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) {
		laz_log("FAIL: setup: UFFDIO_REGISTER: %s", strerror(errno));
		return -1;
	}
	if (send_fds(sockpath, mem, len, uffd, memfd)) {
		laz_log("FAIL: setup: sending the uffd to %s: %s", sockpath, strerror(errno));
		return -1;
	}
	close(uffd);
	close(memfd);
	return 0;
}

static int check_page(const uint64_t *mem, size_t page, uint64_t seed)
{
	const volatile uint64_t *w = mem + page * WORDS_PER_PAGE;

	for (size_t i = 0; i < WORDS_PER_PAGE; i++)
		if (w[i] != laz_mix(seed + page * WORDS_PER_PAGE + i))
			return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct timespec ts, a, b;
	unsigned long mib, k;
	uint64_t seed, rng, *mem, *lat;
	char *map;
	size_t len, words, windows, *pages, bad = 0, first_bad = 0;
	int raw;
	double t0;

	if (argc < 4)
		return 2;
	/* the log, and SIGUSR2 handled (no SA_RESTART) but blocked until laz_wait_usr2() */
	laz_init(argc, argv);
	mib = strtoul(argv[2], NULL, 10);
	k = strtoul(argv[3], NULL, 10);
	raw = argc >= 6 && !strcmp(argv[4], "raw");
	if (mib == 0 || k == 0)
		return 2;
	len = mib * (1UL << 20);
	words = len / sizeof(uint64_t);
	windows = len / WINDOW;
	if (k > windows) {
		laz_log("FAIL: setup: %lu touches need %lu distinct 64 KiB windows; %lu MiB has %zu", k, k, mib,
		      windows);
		return 1;
	}

	/* 64 KiB-aligned (the server's fault windows are aligned in absolute addresses): map more, trim. */
	map = mmap(NULL, len + WINDOW, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (map == MAP_FAILED) {
		laz_log("FAIL: setup: mmap %lu MiB: %s", mib, strerror(errno));
		return 1;
	}
	mem = (uint64_t *)(((uintptr_t)map + WINDOW - 1) & ~(uintptr_t)(WINDOW - 1));
	if ((char *)mem > map)
		munmap(map, (size_t)((char *)mem - map));
	if ((char *)mem + len < map + len + WINDOW)
		munmap((char *)mem + len, (size_t)(map + len + WINDOW - ((char *)mem + len)));
	clock_gettime(CLOCK_REALTIME, &ts);
	seed = laz_mix((uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32));

	/* K distinct windows: a partial Fisher-Yates shuffle of all window indexes; one random page in each. */
	pages = malloc(windows * sizeof(*pages));
	lat = malloc(k * sizeof(*lat));
	if (!pages || !lat) {
		laz_log("FAIL: setup: out of memory");
		return 1;
	}
	for (size_t w = 0; w < windows; w++)
		pages[w] = w;
	rng = seed;
	for (size_t i = 0; i < k; i++) {
		size_t j = i + (size_t)((rng = laz_mix(rng)) % (windows - i)), t = pages[i];

		pages[i] = pages[j];
		pages[j] = t;
		pages[i] = pages[i] * (WINDOW / PAGE) + (size_t)((rng = laz_mix(rng)) % (WINDOW / PAGE));
	}

	t0 = now();
	if (raw) {
		if (setup_raw(argv[5], mem, len, seed))
			return 1;
	} else {
		fill_words(mem, words, seed);
	}
	laz_log("# region %p %zu fill-seconds %.3f", (void *)mem, len, now() - t0);
	laz_log("READY");

	laz_wait_usr2();

	/* Bring in the bookkeeping (lazily restored too) before timing, so no other fault is in the way. */
	memset(lat, 0, k * sizeof(*lat));
	for (size_t i = 0; i < k; i++)
		lat[i] = pages[i];
	for (size_t i = 0; i < k; i++) {
		const volatile uint64_t *p = mem + pages[i] * WORDS_PER_PAGE;

		clock_gettime(CLOCK_MONOTONIC, &a);
		(void)*p;
		clock_gettime(CLOCK_MONOTONIC, &b);
		lat[i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)b.tv_nsec - (uint64_t)a.tv_nsec;
	}
	qsort(lat, k, sizeof(*lat), cmp_u64);
	laz_log("# LAT %lu %llu %llu %llu", k, (unsigned long long)lat[k / 2], (unsigned long long)lat[(k * 99) / 100],
	      (unsigned long long)lat[k - 1]);

	if (raw) {
		for (size_t i = 0; i < k; i++)
			if (check_page(mem, pages[i], seed) && !bad++)
				first_bad = pages[i] * PAGE;
		if (bad) {
			laz_log("FAIL: %zu of %lu touched pages differ, first at offset %#zx", bad, k, first_bad);
			return 1;
		}
		laz_log("PASS");
		return 0;
	}
	return check_words(mem, words, seed);
}
