/*
 * cow_tree.c - exercises copy-on-write pages kept shared by a tree restore (issue 9's Pss requirement), each
 * process checking its own memory after the restore: a parent with MIB MiB of private anonymous memory, a
 * child that rewrote one page in eight of it, and a grandchild (forked by the child afterwards) that rewrote
 * one page in 64 of its own (page 1, 65, 129, ...).
 *
 *   cow_tree LOGFILE [MIB [split|still]]     (MIB: 32 unless given)
 *
 * still: the grandchild writes nothing (the tree exactly; benchmarks/targets/cowtree.c is this file).
 *
 * split: the child makes the last page of its region read-only after writing, so its mapping is no longer its
 * parent's (two vmas): the pages it shares with the parent cannot be kept shared by a restore (private copies).
 *
 * stamp(page, seed): every 8-byte word of the page is laz_mix(page ^ seed). The parent stamps every page with
 * SEED; the child restamps page 0, 8, 16, ... with SEED + 1; the grandchild restamps page 1, 65, ... with SEED + 2.
 * Each process opens the log itself and /dev/null for its stdio, and readiness comes up through pipes every
 * process closes before READY: nothing but the memory is shared between them at the dump.
 * Logs "# tree PARENT CHILD GRANDCHILD" and "# region ADDR BYTES", then READY. After SIGUSR2 the parent sends
 * SIGUSR2 to the child, the child to the grandchild; each checks every page of its region, the grandchild
 * exits 0 or 1, the child exits with its own verdict and the grandchild's, and the parent writes PASS only if
 * its own region and the child's status are right.
 */
#include "common.h"

#include <sys/wait.h>

#define SEED 0xc0feULL

static unsigned char *mem;
static size_t npages;
static int gwrites = 1; /* the grandchild rewrites one page in 64 (not with "still") */

static uint64_t want_of(size_t p, int who)
{
	if (who >= 2 && gwrites && p % 64 == 1)
		return laz_mix(p ^ (SEED + 2));
	if (who >= 1 && p % 8 == 0)
		return laz_mix(p ^ (SEED + 1));
	return laz_mix(p ^ SEED);
}

static void stamp(size_t p, uint64_t v)
{
	uint64_t *w = (uint64_t *)(mem + p * LAZ_PAGE);

	for (size_t i = 0; i < LAZ_PAGE / 8; i++)
		w[i] = v;
}

static long bad_page(int who)
{
	for (size_t p = 0; p < npages; p++) {
		uint64_t want = want_of(p, who);
		const uint64_t *w = (const uint64_t *)(mem + p * LAZ_PAGE);
		for (size_t i = 0; i < LAZ_PAGE / 8; i++)
			if (w[i] != want)
				return (long)p;
	}
	return -1;
}


static void wait_eof(int fd)
{
	char c;

	while (read(fd, &c, 1) > 0)
		;
	close(fd);
}

int main(int argc, char **argv)
{
	int up[2], gup[2], info[2];

	laz_init(argc, argv);
	size_t size = (argc > 2 ? strtoul(argv[2], NULL, 0) : 32) << 20;
	npages = size / LAZ_PAGE;
	gwrites = !(argc > 3 && !strcmp(argv[3], "still"));
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || pipe(up) || pipe(info))
		laz_die("setup");
	madvise(mem, size, MADV_NOHUGEPAGE); /* 4 KiB pages: one page in eight is the child's own */
	for (size_t p = 0; p < npages; p++)
		stamp(p, want_of(p, 0));

	pid_t child = fork(), grandchild = 0;
	if (child < 0)
		laz_die("fork");
	if (child == 0) {
		close(up[0]);
		close(info[0]);
		laz_child_own_stdio();
		for (size_t p = 0; p < npages; p += 8)
			stamp(p, want_of(p, 1));
		if (argc > 3 && !strcmp(argv[3], "split") && mprotect(mem + size - LAZ_PAGE, LAZ_PAGE, PROT_READ))
			_exit(5);
		if (pipe(gup))
			_exit(5);
		pid_t g = fork();
		if (g < 0)
			_exit(5);
		if (g == 0) {
			close(gup[0]);
			close(up[1]);
			close(info[1]);
			laz_child_own_stdio();
			for (size_t p = 1; gwrites && p < npages; p += 64)
				stamp(p, want_of(p, 2));
			close(gup[1]);
			laz_wait_usr2();
			if (laz_corrupt("grandchild"))
				mem[65 * LAZ_PAGE + 7] ^= 1;
			_exit(bad_page(2) < 0 ? 0 : 1);
		}
		close(gup[1]);
		wait_eof(gup[0]);
		if (write(info[1], &g, sizeof(g)) != sizeof(g))
			_exit(5);
		close(info[1]);
		close(up[1]);
		laz_wait_usr2();
		kill(g, SIGUSR2);
		if (laz_corrupt("child"))
			mem[8 * LAZ_PAGE + 3] ^= 1;
		long bad = bad_page(1);
		int st = 0;
		if (waitpid(g, &st, 0) != g)
			_exit(6);
		_exit((bad < 0 ? 0 : 1) | (WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 2));
	}
	close(up[1]);
	close(info[1]);
	if (read(info[0], &grandchild, sizeof(grandchild)) != sizeof(grandchild))
		laz_die("read grandchild pid");
	close(info[0]);
	wait_eof(up[0]);
	laz_log("# tree %d %d %d", (int)getpid(), (int)child, (int)grandchild);
	laz_log("# region %#lx %zu", (unsigned long)mem, size);
	laz_ready("parent child grandchild");
	laz_wait_usr2();
	kill(child, SIGUSR2);
	if (laz_corrupt("parent"))
		mem[16 * LAZ_PAGE] ^= 1;
	long bad = bad_page(0);
	int st = 0;
	LAZ_CHECK(bad < 0, "parent: page %ld differs", bad);
	LAZ_CHECK(waitpid(child, &st, 0) == child, "waitpid child");
	LAZ_CHECK(WIFEXITED(st) && !(WEXITSTATUS(st) & 1), "child: its memory differs (status %#x)", st);
	LAZ_CHECK(WIFEXITED(st) && !(WEXITSTATUS(st) & 2), "grandchild: its memory differs (status %#x)", st);
	laz_finish();
}
