/*
 * memhog.c - benchmark target: holds MIB MiB of filled anonymous private memory.
 *
 * Every 64-bit word of the region holds a pseudo-random value depending on its index and a
 * per-run seed, so no page is zero and no two pages are alike. Protocol (as the test targets):
 *
 *   memhog LOGFILE MIB        stdin/stdout/stderr = /dev/null
 *   - logs "# region ADDR LEN fill-seconds S" and "READY", then waits for SIGUSR2;
 *   - on SIGUSR2 checks every word and logs "PASS" (exit 0) or "FAIL: ..." (exit 1).
 *
 * Used by benchmarks/dump_restore.py and the lazy-restore benchmarks (the region address lets
 * the harness read it with process_vm_readv).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

int main(int argc, char **argv)
{
	struct timespec ts;
	unsigned long mib;
	uint64_t seed, *mem;
	size_t words;
	double t0;

	if (argc < 3)
		return 2;
	/* the log, and SIGUSR2 handled (no SA_RESTART) but blocked until laz_wait_usr2() */
	laz_init(argc, argv);
	mib = strtoul(argv[2], NULL, 10);
	if (mib == 0)
		return 2;

	words = mib * (1UL << 20) / sizeof(uint64_t);
	mem = mmap(NULL, words * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		laz_log("FAIL: setup: mmap %lu MiB: %s", mib, strerror(errno));
		return 1;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	seed = laz_mix((uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32));
	t0 = now();
	fill_words(mem, words, seed);
	laz_log("# region %p %zu fill-seconds %.3f", (void *)mem, words * sizeof(uint64_t), now() - t0);
	laz_log("READY");

	laz_wait_usr2();

	return check_words(mem, words, seed);
}
