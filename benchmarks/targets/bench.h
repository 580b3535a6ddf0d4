/*
 * bench.h - helpers for the benchmark targets (header only). They speak the test targets' log protocol
 * (READY, then one PASS or FAIL line), so they use its helpers (tests/targets/common.h: laz_log,
 * laz_usr2_seen/laz_usr2_handler, laz_mix); added here: the fill and the check of a whole region and a
 * monotonic clock.
 */
#ifndef LAZ_BENCH_H
#define LAZ_BENCH_H

#include "../../tests/targets/common.h"

/* Word i of mem := laz_mix(seed + i): the contents check_words() expects. */
LAZ_FN void fill_words(uint64_t *mem, size_t words, uint64_t seed)
{
	for (size_t i = 0; i < words; i++)
		mem[i] = laz_mix(seed + i);
}

/* Check that word i of mem holds laz_mix(seed + i) for every word; logs PASS or FAIL; returns the exit status. */
LAZ_FN int check_words(const uint64_t *mem, size_t words, uint64_t seed)
{
	size_t bad = 0, first_bad = 0;

	for (size_t i = 0; i < words; i++) {
		if (mem[i] != laz_mix(seed + i)) {
			if (!bad++)
				first_bad = i;
		}
	}
	if (bad) {
		laz_log("FAIL: %zu of %zu words differ, first at offset %#zx", bad, words, first_bad * 8);
		return 1;
	}
	laz_log("PASS");
	return 0;
}

LAZ_FN double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
