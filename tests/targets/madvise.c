/*
 * madvise.c - exercises the per-mapping state of the VmFlags line of /proc/PID/smaps: one anonymous
 * mapping each with MADV_DONTDUMP, WIPEONFORK, RANDOM, SEQUENTIAL, HUGEPAGE, NOHUGEPAGE, MERGEABLE and
 * DONTFORK, one mlock'ed, one mlock2(MLOCK_ONFAULT)'ed, one mseal'ed, a plain one, one split by a
 * madvise on its middle pages, and one made read-only after it was written (keeps its accounting, "ac").
 * After restore each must show exactly its flags (and the plain ones none extra), hold its data, and a
 * fork child must see the WIPEONFORK mapping empty and the DONTFORK one absent. One more mapping ("late")
 * is made WIPEONFORK only after the restore, before it is touched: a lazily restored child must see it
 * empty too (the parent still sees its data).
 *
 * Usage: madvise LOGFILE      Trigger: SIGUSR2.
 */
#include "vmflags.h"

#include <sys/syscall.h>
#include <sys/wait.h>

#define NPAGES 4UL
#define SPLIT_PAGES 8UL
#define BASE "rd wr mr mw me ac"
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#define SYS_MLOCK2 325
#define SYS_MSEAL 462

static const char POINTS[] = "dd wf rr sr hg nh mg dc lo lf sl plain split ro data fork late";

struct region {
	const char *name;
	int advice;      /* madvise advice, or -1 */
	const char *flags;
	unsigned char *p;
};

static struct region regions[] = {
	{ "dd", MADV_DONTDUMP, BASE " dd", NULL },
	{ "wf", MADV_WIPEONFORK, BASE " wf", NULL },
	{ "rr", MADV_RANDOM, BASE " rr", NULL },
	{ "sr", MADV_SEQUENTIAL, BASE " sr", NULL },
	{ "hg", MADV_HUGEPAGE, BASE " hg", NULL },
	{ "nh", MADV_NOHUGEPAGE, BASE " nh", NULL },
	{ "mg", MADV_MERGEABLE, BASE " mg", NULL },
	{ "dc", MADV_DONTFORK, BASE " dc", NULL },
	{ "lo", -1, BASE " lo", NULL },
	{ "lf", -1, BASE " lo lf", NULL },
	{ "sl", -1, BASE " sl", NULL },
	{ "plain", -1, BASE, NULL },
	{ "ro", -1, "rd mr mw me ac", NULL },
	{ "late", -1, BASE " wf", NULL },
};
#define NREG (sizeof(regions) / sizeof(regions[0]))

static unsigned char *split;

static struct region *reg(const char *name)
{
	for (size_t i = 0; i < NREG; i++)
		if (!strcmp(regions[i].name, name))
			return &regions[i];
	laz_die("no region %s", name);
}

static void *map_filled(size_t len, uint64_t seed)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		laz_die("mmap");
	laz_fill(p, len, seed);
	return p;
}

static void setup(void)
{
	for (size_t i = 0; i < NREG; i++) {
		struct region *r = &regions[i];

		r->p = map_filled(NPAGES * LAZ_PAGE, 0x1000 + i);
		if (r->advice >= 0 && madvise(r->p, NPAGES * LAZ_PAGE, r->advice))
			laz_die("madvise %s", r->name);
	}
	if (mlock(reg("lo")->p, NPAGES * LAZ_PAGE))
		laz_die("mlock");
	if (syscall(SYS_MLOCK2, reg("lf")->p, NPAGES * LAZ_PAGE, MLOCK_ONFAULT))
		laz_die("mlock2 ONFAULT");
	if (syscall(SYS_MSEAL, reg("sl")->p, NPAGES * LAZ_PAGE, 0))
		laz_die("mseal");
	if (mprotect(reg("ro")->p, NPAGES * LAZ_PAGE, PROT_READ))
		laz_die("mprotect ro");
	split = map_filled(SPLIT_PAGES * LAZ_PAGE, 0x2000);
	if (madvise(split + 2 * LAZ_PAGE, 3 * LAZ_PAGE, MADV_DONTDUMP))
		laz_die("madvise split");
}

static void corrupt(void)
{
	static const struct { const char *name; int advice; } undo[] = {
		{ "dd", 17 /* MADV_DODUMP */ }, { "wf", 19 /* MADV_KEEPONFORK */ }, { "rr", MADV_NORMAL },
		{ "sr", MADV_NORMAL }, { "hg", MADV_NOHUGEPAGE }, { "nh", MADV_HUGEPAGE },
		{ "mg", 13 /* MADV_UNMERGEABLE */ }, { "dc", 11 /* MADV_DOFORK */ },
	};

	for (size_t i = 0; i < sizeof(undo) / sizeof(undo[0]); i++)
		if (laz_corrupt(undo[i].name))
			madvise(reg(undo[i].name)->p, NPAGES * LAZ_PAGE, undo[i].advice);
	if (laz_corrupt("lo"))
		munlock(reg("lo")->p, NPAGES * LAZ_PAGE);
	if (laz_corrupt("lf")) {
		munlock(reg("lf")->p, NPAGES * LAZ_PAGE);
		mlock(reg("lf")->p, NPAGES * LAZ_PAGE);
	}
	if (laz_corrupt("sl"))
		reg("sl")->flags = BASE; /* a seal cannot be undone: expect its absence instead */
	if (laz_corrupt("plain"))
		madvise(reg("plain")->p, NPAGES * LAZ_PAGE, MADV_DONTDUMP);
	if (laz_corrupt("split"))
		madvise(split + 2 * LAZ_PAGE, 3 * LAZ_PAGE, 17);
	if (laz_corrupt("ro"))
		mprotect(reg("ro")->p, NPAGES * LAZ_PAGE, PROT_READ | PROT_WRITE);
	if (laz_corrupt("data"))
		reg("rr")->p[LAZ_PAGE + 8] ^= 1;
	if (laz_corrupt("fork"))
		madvise(reg("wf")->p, NPAGES * LAZ_PAGE, 19);
	if (!laz_corrupt("late"))
		madvise(reg("late")->p, NPAGES * LAZ_PAGE, MADV_WIPEONFORK);
}

/* In a fork child: the WIPEONFORK mapping is there and empty, the DONTFORK one is gone. */
static void check_fork(void)
{
	int status;
	pid_t pid = fork();

	if (pid < 0) {
		laz_failf("fork: %s", strerror(errno));
		return;
	}
	if (pid == 0) {
		const unsigned char *w = reg("wf")->p, *late = reg("late")->p;
		char perms[5];
		int bad = 0;

		for (size_t i = 0; i < NPAGES * LAZ_PAGE; i++) {
			if (w[i])
				bad |= 1;
			if (late[i])
				bad |= 8;
		}
		if (laz_vma_of(reg("dc")->p, perms, NULL, 0) == 0)
			bad |= 2;
		if (laz_find_mismatch(reg("plain")->p, NPAGES * LAZ_PAGE, 0x1000 + (reg("plain") - regions)) >= 0)
			bad |= 4;
		_exit(bad);
	}
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
		laz_failf("fork child: status %#x", status);
		return;
	}
	LAZ_CHECK(!(WEXITSTATUS(status) & 1), "fork child: the WIPEONFORK mapping is not empty");
	LAZ_CHECK(!(WEXITSTATUS(status) & 2), "fork child: the DONTFORK mapping is there");
	LAZ_CHECK(!(WEXITSTATUS(status) & 4), "fork child: the plain mapping lost its data");
	LAZ_CHECK(!(WEXITSTATUS(status) & 8), "fork child: the mapping made WIPEONFORK after restore is not empty");
}

static void verify(void)
{
	check_fork(); /* first: the parent has not touched "late" since the restore */

	for (size_t i = 0; i < NREG; i++) {
		struct region *r = &regions[i];
		long bad = laz_find_mismatch(r->p, NPAGES * LAZ_PAGE, 0x1000 + i);

		laz_expect_vmflags(r->name, r->p, r->flags);
		LAZ_CHECK(bad < 0, "%s: data differs at offset %ld", r->name, bad);
	}
	laz_expect_vmflags("split head", split, BASE);
	laz_expect_vmflags("split middle", split + 2 * LAZ_PAGE, BASE " dd");
	laz_expect_vmflags("split middle end", split + 4 * LAZ_PAGE, BASE " dd");
	laz_expect_vmflags("split tail", split + 5 * LAZ_PAGE, BASE);
	LAZ_CHECK(laz_find_mismatch(split, SPLIT_PAGES * LAZ_PAGE, 0x2000) < 0, "split: data differs");
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { verify, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
