/*
 * forktree.c - benchmark target: a tree of processes sharing copy-on-write memory.
 *
 *   forktree LOGFILE MIB NPROC PERMILLE       stdin/stdout/stderr = /dev/null
 *
 * The root fills MIB MiB of anonymous private memory (word i holds laz_mix(seed + i)), then forks NPROC-1
 * children. Child k (1..NPROC-1) rewrites the pages whose number p has laz_mix(p * NPROC + k) % 1000 <
 * PERMILLE (about PERMILLE/1000 of the region, a different set per child) with laz_mix(seed + i) ^ k, so
 * those pages become its own and every other page stays shared with the root and the other children.
 * Each child opens its log and stdio again (own_fds) and logs "# child K PID" when done; the root then logs "# region ADDR LEN", "# pids P1 P2 ..." and
 * "READY" and waits for SIGUSR2 (so does every child).
 *
 * On SIGUSR2 the root sends SIGUSR2 to each child; each checks every word of its region and exits 0 (all
 * right) or 1 (logging "# child K: N words differ ..."); the root checks its own region, reaps the children,
 * and logs "PASS" (exit 0) or "FAIL: ..." (exit 1). So a PASS after a restore says that each process got its
 * own pages back, the shared ones and the rewritten ones, and its parent.
 *
 * Used by benchmarks/trees.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

#define MAX_PROCS 256

static uint64_t *mem;
static size_t words, pages;
static uint64_t seed;
static unsigned long nproc, permille;

static int rewritten(size_t page, unsigned long k)
{
	return k != 0 && laz_mix((uint64_t)page * nproc + k) % 1000 < permille;
}

static uint64_t expected(size_t i, unsigned long k)
{
	uint64_t v = laz_mix(seed + i);

	return rewritten(i * 8 / LAZ_PAGE, k) ? v ^ k : v;
}

/* Number of words of this process's region (process k: 0 the root) that are not what they must be. */
static size_t check_region(unsigned long k, size_t *first_bad)
{
	size_t bad = 0;

	for (size_t i = 0; i < words; i++) {
		if (mem[i] != expected(i, k) && !bad++)
			*first_bad = i;
	}
	return bad;
}

/*
 * A child's fds opened again by name: the log (O_APPEND, so lines still land whole) and /dev/null on 0-2.
 * The tree then shares memory only, not open file descriptions: what this benchmark measures is memory, and a
 * dump that does not yet keep shared descriptions can still take the tree.
 */
static void own_fds(const char *log)
{
	int fd = open(log, O_WRONLY | O_APPEND);

	if (fd < 0 || dup2(fd, laz_log_fd) < 0)
		_exit(3);
	close(fd);
	fd = open("/dev/null", O_RDWR);
	if (fd < 0)
		_exit(3);
	for (int i = 0; i < 3; i++)
		if (dup2(fd, i) < 0)
			_exit(3);
	if (fd > 2)
		close(fd);
}

static void child(unsigned long k, const char *log)
{
	size_t per_page = LAZ_PAGE / 8, bad, first = 0;
	pid_t parent = getppid();

	own_fds(log);

	for (size_t p = 0; p < pages; p++) {
		if (!rewritten(p, k))
			continue;
		for (size_t i = p * per_page; i < (p + 1) * per_page && i < words; i++)
			mem[i] = laz_mix(seed + i) ^ k;
	}
	laz_log("# child %lu %d", k, (int)getpid());
	laz_wait_usr2();
	bad = check_region(k, &first);
	if (getppid() != parent) {
		laz_log("# child %lu: parent %d, not %d", k, (int)getppid(), (int)parent);
		_exit(1);
	}
	if (bad) {
		laz_log("# child %lu: %zu words differ, first at offset %#zx", k, bad, first * 8);
		_exit(1);
	}
	_exit(0);
}

int main(int argc, char **argv)
{
	pid_t kids[MAX_PROCS];
	char line[64 * MAX_PROCS / 8 + 64];
	size_t len, bad, first = 0;
	unsigned long mib, logged = 0, failed = 0;
	double t0;

	if (argc < 5)
		return 2;
	laz_init(argc, argv);
	mib = strtoul(argv[2], NULL, 10);
	nproc = strtoul(argv[3], NULL, 10);
	permille = strtoul(argv[4], NULL, 10);
	if (mib == 0 || nproc == 0 || nproc > MAX_PROCS || permille > 1000)
		return 2;
	words = mib * (1UL << 20) / 8;
	pages = (words * 8 + LAZ_PAGE - 1) / LAZ_PAGE;
	mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		laz_die("mmap %lu MiB", mib);
	seed = laz_mix((uint64_t)getpid() << 20 ^ (uint64_t)(now() * 1e6));
	t0 = now();
	fill_words(mem, words, seed);

	for (unsigned long k = 1; k < nproc; k++) {
		pid_t pid = fork();

		if (pid < 0)
			laz_die("fork %lu", k);
		if (pid == 0)
			child(k, argv[1]); /* does not return */
		kids[k] = pid;
	}
	/* Wait until every child has rewritten its pages and logged so: then the tree is what it will be. */
	while (logged < nproc - 1) {
		char buf[1 << 16];
		FILE *f = fopen(argv[1], "r");

		logged = 0;
		if (f) {
			while (fgets(buf, sizeof(buf), f))
				logged += strncmp(buf, "# child ", 8) == 0;
			fclose(f);
		}
		if (logged < nproc - 1)
			usleep(2000);
	}
	len = (size_t)snprintf(line, sizeof(line), "# pids %d", (int)getpid());
	for (unsigned long k = 1; k < nproc && len < sizeof(line) - 16; k++)
		len += (size_t)snprintf(line + len, sizeof(line) - len, " %d", (int)kids[k]);
	laz_log("# region %p %zu fill-seconds %.3f", (void *)mem, words * 8, now() - t0);
	laz_log("%s", line);
	laz_log("READY");

	laz_wait_usr2();
	for (unsigned long k = 1; k < nproc; k++)
		kill(kids[k], SIGUSR2);
	bad = check_region(0, &first);
	for (unsigned long k = 1; k < nproc; k++) {
		int status;

		if (waitpid(kids[k], &status, 0) != kids[k] || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
	}
	if (bad || failed) {
		laz_log("FAIL: root: %zu words differ (first at offset %#zx); %lu of %lu children failed", bad,
			first * 8, failed, nproc - 1);
		return 1;
	}
	laz_log("PASS");
	return 0;
}
