/*
 * counter.c - the Lazarus demo program.
 *
 * Fills MIB MiB of anonymous memory with a pseudo-random pattern and remembers its checksum,
 * then counts: one line per second appended to LOGFILE ("tick N"). On SIGUSR2 it recomputes
 * the checksum of its memory and logs "PASS ..." (or "FAIL ..."), then keeps counting.
 * It runs until it is killed.
 *
 * Usage: counter LOGFILE [MIB]      (MIB defaults to 16)
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

static int log_fd = -1;
static volatile sig_atomic_t verify_requested;

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One write per line: the log is O_APPEND, so lines never interleave. */
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

static void on_usr2(int sig)
{
	(void)sig;
	verify_requested = 1;
}

/* splitmix64: a pseudo-random word depending only on x. */
static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t checksum(const uint64_t *w, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	return h;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	struct timespec ts;
	unsigned long mib = 16, tick = 0;
	uint64_t seed, expected, *mem;
	size_t words;

	if (argc < 2)
		return 2;
	if (argc > 2)
		mib = strtoul(argv[2], NULL, 10);
	log_fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (log_fd < 0 || mib == 0)
		return 2;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr2;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR2, &sa, NULL);

	words = mib * (1UL << 20) / sizeof(uint64_t);
	mem = mmap(NULL, words * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		logf_("FAIL: mmap %lu MiB: %s", mib, strerror(errno));
		return 1;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	seed = mix((uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32));
	for (size_t i = 0; i < words; i++)
		mem[i] = mix(seed + i);
	expected = checksum(mem, words);
	logf_("started: pid %d, %lu MiB filled, checksum %016llx", getpid(), mib, (unsigned long long)expected);

	for (;;) {
		logf_("tick %lu", ++tick);
		/* sleep() returns early when SIGUSR2 arrives; then we verify and go on counting. */
		sleep(1);
		if (verify_requested) {
			uint64_t got = checksum(mem, words);

			verify_requested = 0;
			if (got == expected)
				logf_("PASS: %lu MiB verified, checksum %016llx, pid %d, at tick %lu", mib,
				      (unsigned long long)got, getpid(), tick);
			else
				logf_("FAIL: checksum %016llx, expected %016llx", (unsigned long long)got,
				      (unsigned long long)expected);
		}
	}
}
