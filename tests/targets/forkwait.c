/*
 * forkwait.c - exercises a fork while memory is still missing after a lazy restore, with a child that
 * waits before touching anything: a test can act on the Lazarus processes serving both meanwhile.
 *
 *   forkwait LOGFILE
 *
 * Setup fills a 16 MiB anonymous region with a pattern, then waits for SIGUSR2. After the trigger it
 * forks at once (nothing read before); the child logs "# forked child PID" and waits for a SIGUSR2 of
 * its own, then checks every page of the region holds the pattern and exits 0 (1 if not). The parent
 * waits for the child, checks the region itself, and reports PASS or FAIL.
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define SIZE (16UL << 20)
#define SEED 0x4444ULL

static unsigned char *mem;

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		laz_die("mmap");
	laz_fill_offset(mem, SIZE, 0, SEED);
	laz_ready("data");
	laz_wait_usr2();

	pid_t child = fork();
	if (child < 0)
		laz_die("fork");
	if (child == 0) {
		laz_usr2_seen = 0; /* the parent's trigger came before the fork */
		laz_log("# forked child %d", (int)getpid());
		laz_wait_usr2();
		_exit(laz_find_mismatch_offset(mem, SIZE, 0, SEED) >= 0);
	}
	if (laz_corrupt("data"))
		mem[3 * LAZ_PAGE + 5] ^= 0x40;
	int status = 0;
	if (waitpid(child, &status, 0) != child)
		laz_die("waitpid");
	LAZ_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork child saw wrong data (status %#x)", status);
	long bad = laz_find_mismatch_offset(mem, SIZE, 0, SEED);
	LAZ_CHECK(bad < 0, "parent data differs at offset %#lx", (unsigned long)bad);
	laz_finish();
}
