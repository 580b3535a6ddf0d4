/*
 * cow_fork.c - exercises the restore order proposed for copy-on-write pages (docs/IMAGES.md, "Shared objects
 * (format 3)"): the test places the shared pages in the parent before it forks, the child's lazy range then
 * covers only its own pages, and both check what they see.
 *
 *   cow_fork LOGFILE MIB
 *
 * Maps MIB MiB of private anonymous memory without touching it, logs "# region ADDR BYTES" and READY, and
 * waits. The test fills the region from outside (every page: stamp(page, SEED)) and sends SIGUSR1: the process
 * forks a child, which logs "# child: PID" and waits. The test gives the child its own pages (page 0, 8, 16...:
 * stamp(page, SEED + 1)) and sends SIGUSR2 to both. The child checks every page of its region and reports
 * through a pipe, then waits to be killed; the parent checks its own region, reads the child's verdict, logs
 * "# checked" and waits for a second SIGUSR2 (the test measures the tree's Pss meanwhile), then kills the child
 * and logs PASS or FAIL.
 * stamp(page, seed): every 8-byte word of the page is laz_mix(page ^ seed).
 */
#include "common.h"

#include <sys/wait.h>

#define SEED 0xc0feULL

static volatile sig_atomic_t usr1_seen;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_seen = 1;
}

static long bad_page(const unsigned char *mem, size_t npages, int child)
{
	for (size_t p = 0; p < npages; p++) {
		uint64_t want = laz_mix(p ^ (child && p % 8 == 0 ? SEED + 1 : SEED));
		const uint64_t *w = (const uint64_t *)(mem + p * LAZ_PAGE);
		for (size_t i = 0; i < LAZ_PAGE / 8; i++)
			if (w[i] != want)
				return (long)p;
	}
	return -1;
}

static void wait_term(void)
{
	sigset_t none;

	sigemptyset(&none);
	for (;;)
		sigsuspend(&none);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigset_t set, old;
	int verdict[2];

	laz_init(argc, argv);
	if (argc < 3)
		laz_die("usage: cow_fork LOGFILE MIB");
	size_t size = strtoul(argv[2], NULL, 0) << 20, npages = size / LAZ_PAGE;
	unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || pipe(verdict))
		laz_die("setup");
	madvise(mem, size, MADV_NOHUGEPAGE); /* 4 KiB pages: the child's one page in eight is its own */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, &old);
	laz_log("# region %#lx %zu", (unsigned long)mem, size);
	laz_ready("parent child");
	sigprocmask(SIG_SETMASK, NULL, &old);
	sigdelset(&old, SIGUSR1);
	while (!usr1_seen)
		sigsuspend(&old);

	pid_t child = fork();
	if (child < 0)
		laz_die("fork");
	if (child == 0) {
		laz_log("# child: %d", (int)getpid());
		laz_wait_usr2();
		if (laz_corrupt("child"))
			mem[5] ^= 1;
		long bad = bad_page(mem, npages, 1);
		if (write(verdict[1], &bad, sizeof(bad)) != sizeof(bad))
			_exit(3);
		wait_term();
	}
	laz_wait_usr2();
	if (laz_corrupt("parent"))
		mem[8 * LAZ_PAGE + 3] ^= 1;
	long bad = bad_page(mem, npages, 0), cbad = -2;
	LAZ_CHECK(bad < 0, "parent: page %ld differs", bad);
	LAZ_CHECK(read(verdict[0], &cbad, sizeof(cbad)) == sizeof(cbad) && cbad < 0, "child: page %ld differs", cbad);
	laz_log("# checked");
	laz_usr2_seen = 0;
	laz_wait_usr2();
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	laz_finish();
}
