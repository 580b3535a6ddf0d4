/*
 * lazy_events.c - exercises the non-cooperative userfaultfd events on memory a lazy restore has not
 * filled yet: fork, mremap, madvise(MADV_DONTNEED / MADV_REMOVE) and munmap, one per mode or all
 * combined (it passes after an eager restore too).
 *
 *   lazy_events LOGFILE MODE      MODE: fork | mremap | madvise | munmap | all
 *
 * Setup fills a 32 MiB anonymous region and a 4 MiB shared anonymous region with patterns, then
 * waits for SIGUSR2. After the trigger it does the mode's operation FIRST, before reading any of
 * the regions, so that (under `restore --lazy --no-background`) the event hits pages that are still
 * missing, then verifies:
 *   fork     child and parent both see the data as of the fork; writes in one never show in the
 *            other (each side writes its own marks into different pages, then checks the other's
 *            pages still hold the original pattern); the child reports through its exit status.
 *   mremap   a 4 MiB piece moved elsewhere holds its data at the new address (later faults there
 *            get the moved pages), and the old range is unmapped.
 *   madvise  MADV_DONTNEED'ed anonymous pages and MADV_REMOVE'd shared pages read zeros, never the
 *            image's data; the neighbours keep their data.
 *   munmap   nothing is copied into an unmapped hole: memory mapped there afresh reads zeros.
 *   all      every one of the above in sequence, then a fork.
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define ANON_SIZE (32UL << 20)
#define SHM_SIZE (4UL << 20)
#define PIECE (4UL << 20)
#define SEED_ANON 0x1111ULL
#define SEED_SHM 0x2222ULL

static unsigned char *anon, *shm;

static long mismatch_offset(const unsigned char *p, size_t len, uint64_t off, uint64_t seed)
{
	return laz_find_mismatch_offset(p, len, off, seed);
}

static int all_zero(const unsigned char *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return 0;
	return 1;
}

static void check_anon(size_t from, size_t to, const char *what)
{
	long bad = mismatch_offset(anon + from, to - from, from, SEED_ANON);
	LAZ_CHECK(bad < 0, "%s: anon data differs at offset %#lx", what, (unsigned long)(from + bad));
}

static void do_fork(void)
{
	/* Fork first, then have each side read and write: both see the memory as of the fork. */
	pid_t child = fork();
	if (child < 0) {
		laz_failf("fork: %s", strerror(errno));
		return;
	}
	if (child == 0) {
		int bad = 0;
		for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			anon[off] = 0xC1;             /* child marks even pages */
		for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			if (mismatch_offset(anon + off, LAZ_PAGE, off, SEED_ANON) >= 0)
				bad |= 1;             /* odd pages: original data */
		for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			if (mismatch_offset(anon + off + 1, LAZ_PAGE - 1, off + 1, SEED_ANON) >= 0)
				bad |= 2;
		if (mismatch_offset(shm, SHM_SIZE, 0, SEED_SHM) >= 0)
			bad |= 4;
		_exit(bad);
	}
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
		anon[off] = 0xD2;                     /* parent marks odd pages */
	int status = 0;
	if (waitpid(child, &status, 0) != child) {
		laz_failf("waitpid: %s", strerror(errno));
		return;
	}
	LAZ_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork child saw wrong data (status %#x)", status);
	for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE) {
		if (mismatch_offset(anon + off, LAZ_PAGE, off, SEED_ANON) >= 0) {
			laz_failf("parent sees a child write or lost data at %#lx", (unsigned long)off);
			break;
		}
	}
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE) {
		if (anon[off] != 0xD2 ||
		    mismatch_offset(anon + off + 1, LAZ_PAGE - 1, off + 1, SEED_ANON) >= 0) {
			laz_failf("parent data wrong at %#lx", (unsigned long)off);
			break;
		}
	}
	/* put the parent's pages back so later checks see the pattern */
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
		laz_fill_offset(anon + off, 1, off, SEED_ANON);
}

static void do_mremap(void)
{
	/* Move the piece at [8 MiB, 12 MiB) to a fresh spot; the hole it leaves stays unmapped. */
	unsigned char *dst = mmap(NULL, PIECE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dst == MAP_FAILED) {
		laz_failf("reserve: %s", strerror(errno));
		return;
	}
	unsigned char *moved = mremap(anon + (8UL << 20), PIECE, PIECE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
	if (moved == MAP_FAILED) {
		laz_failf("mremap: %s", strerror(errno));
		return;
	}
	long bad = mismatch_offset(moved, PIECE, 8UL << 20, SEED_ANON);
	LAZ_CHECK(bad < 0, "mremap: moved data differs at +%#lx", (unsigned long)bad);
	unsigned char vec;
	LAZ_CHECK(mincore(anon + (8UL << 20), LAZ_PAGE, &vec) == -1 && errno == ENOMEM,
		  "mremap: old range is still mapped");
	check_anon(0, 8UL << 20, "mremap (before the piece)");
	check_anon(12UL << 20, ANON_SIZE, "mremap (after the piece)");
	/* Put the piece back so later modes find the layout they expect. */
	if (mremap(moved, PIECE, PIECE, MREMAP_MAYMOVE | MREMAP_FIXED, anon + (8UL << 20)) == MAP_FAILED)
		laz_failf("mremap back: %s", strerror(errno));
}

static void do_madvise(void)
{
	size_t a = 16UL << 20, alen = 2UL << 20, s = 1UL << 20, slen = 1UL << 20;
	LAZ_CHECK(madvise(anon + a, alen, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s", strerror(errno));
	LAZ_CHECK(madvise(shm + s, slen, MADV_REMOVE) == 0, "MADV_REMOVE: %s", strerror(errno));
	LAZ_CHECK(all_zero(anon + a, alen), "MADV_DONTNEED: anonymous pages are not zero");
	LAZ_CHECK(all_zero(shm + s, slen), "MADV_REMOVE: shared pages are not zero");
	check_anon(a - (1UL << 20), a, "madvise (neighbour below)");
	check_anon(a + alen, a + alen + (1UL << 20), "madvise (neighbour above)");
	long bad = mismatch_offset(shm, s, 0, SEED_SHM);
	LAZ_CHECK(bad < 0, "madvise: shared data below the removed range differs at %#lx", (unsigned long)bad);
	bad = mismatch_offset(shm + s + slen, SHM_SIZE - s - slen, s + slen, SEED_SHM);
	LAZ_CHECK(bad < 0, "madvise: shared data above the removed range differs");
	/* restore the pattern for later modes */
	laz_fill_offset(anon + a, alen, a, SEED_ANON);
	laz_fill_offset(shm + s, slen, s, SEED_SHM);
}

static void do_munmap(void)
{
	size_t h = 24UL << 20, hlen = 2UL << 20;
	LAZ_CHECK(munmap(anon + h, hlen) == 0, "munmap: %s", strerror(errno));
	unsigned char *again = mmap(anon + h, hlen, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (again != anon + h) {
		laz_failf("mmap into the hole: %s", strerror(errno));
		return;
	}
	LAZ_CHECK(all_zero(again, hlen), "munmap: memory mapped afresh in the hole is not zero");
	check_anon(h - (1UL << 20), h, "munmap (neighbour below)");
	check_anon(h + hlen, ANON_SIZE, "munmap (neighbour above)");
	laz_fill_offset(anon + h, hlen, h, SEED_ANON);
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	const char *mode = argc > 2 ? argv[2] : "all";

	anon = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shm = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED || shm == MAP_FAILED)
		laz_die("mmap");
	laz_fill_offset(anon, ANON_SIZE, 0, SEED_ANON);
	laz_fill_offset(shm, SHM_SIZE, 0, SEED_SHM);
	laz_ready("data");
	laz_wait_usr2();

	int all = !strcmp(mode, "all");
	if (laz_corrupt("data"))
		anon[5 * LAZ_PAGE + 3] ^= 0x40;
	if (all || !strcmp(mode, "mremap"))
		do_mremap();
	if (all || !strcmp(mode, "madvise"))
		do_madvise();
	if (all || !strcmp(mode, "munmap"))
		do_munmap();
	if (all || !strcmp(mode, "fork"))
		do_fork();
	check_anon(0, ANON_SIZE, "final");
	long bad = mismatch_offset(shm, SHM_SIZE, 0, SEED_SHM);
	LAZ_CHECK(bad < 0, "final: shared data differs at %#lx", (unsigned long)bad);
	laz_finish();
}
