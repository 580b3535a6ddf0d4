/*
 * bench.h - helpers shared by the benchmark targets (header only): a log line writer, the SIGUSR2
 * flag, the pattern mixer, the check of a whole region against it, and a monotonic clock.
 */
#ifndef LAZ_BENCH_H
#define LAZ_BENCH_H

#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static int log_fd = -1;
static volatile sig_atomic_t usr2_seen;

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2), unused));

static void logf_(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(log_fd, line, (size_t)n) < 0)
		_exit(3);
}

static void __attribute__((unused)) on_usr2(int sig)
{
	(void)sig;
	usr2_seen = 1;
}

/* A pseudo-random 64-bit value depending only on x (splitmix64 finaliser). */
static inline uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* Check that word i of mem holds mix(seed + i) for every word; logs PASS or FAIL; returns the exit status. */
static int __attribute__((unused)) check_words(const uint64_t *mem, size_t words, uint64_t seed)
{
	size_t bad = 0, first_bad = 0;

	for (size_t i = 0; i < words; i++) {
		if (mem[i] != mix(seed + i)) {
			if (!bad++)
				first_bad = i;
		}
	}
	if (bad) {
		logf_("FAIL: %zu of %zu words differ, first at offset %#zx", bad, words, first_bad * 8);
		return 1;
	}
	logf_("PASS");
	return 0;
}

static double __attribute__((unused)) now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
